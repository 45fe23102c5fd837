"""Quantize the routed experts of a tiny Qwen3-MoE to NVFP4 through torch.compile (see moeq/demo.py).

python examples/quickstart.py [--family mixtral] [--config FP8] [--calib all_experts] [--backend moeq_aot_eager]
"""

from moeq.demo import main

if __name__ == "__main__":
    main()
