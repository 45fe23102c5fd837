"""Are moeq's QAT NVFP4 layer outputs the same bits with ``gather_quant`` on and off on the GPU? Session 40's
``bench_e2e_modelopt.py --ab-gather`` (H100) found them different once each side ran its own graph. This prints, per
token count: whether each side is deterministic (two calls), how many output elements differ between the sides and
by how much, and whether the quantized activations themselves differ: ``fake_quant_act(tokens)[i]`` against
``fake_quant_act(tokens[i])`` on the batch with its own amax (a compiled graph's intermediate cannot be read, so the
two orders are computed directly).

    python benchmarks/diag_gather_quant_bits.py --tokens 4096,16384 [--output-code $OUT/code]

``--output-code DIR`` (session 41) saves the code Inductor generates for each side's first call at each token count
(``DIR/<on|off>_<tokens>.py``) and prints the kernels and ops each side's code calls that the other's does not: at
16384 tokens the op's weight pass and ``torch._grouped_mm`` are nodes of each side's graph (Inductor traces the
``triton_op``'s body), so the two graphs' code is where their outputs' last-bit differences should show.
``--between modelopt`` (or ``bf16``) builds and runs that layer between the two sides, as the end-to-end bench
does, and prints the process-wide settings it changed. ``--device cpu --tiny`` runs the script's own check on a small layer without a GPU.
"""

from __future__ import annotations

import argparse
import copy
import os
import re

import torch
from bench_e2e_modelopt import bf16_layer, modelopt_layer, moeq_layer, output, qwen3_30b_a3b_layer
from torch._inductor.utils import run_and_get_code

from moeq.lowering import gather_quant
from moeq.runtime.kernels import fake_quant_act


def differ(a: torch.Tensor, b: torch.Tensor) -> str:
    bad = a.float() != b.float()
    if not bad.any():
        return "bit-equal"
    return f"{int(bad.sum())} of {bad.numel()} differ, max |diff| {(a.float() - b.float()).abs().max().item():.3e}"


#: what a generated module calls: extern kernels, custom ops, and the Triton kernels it defines
CALLS = re.compile(r"extern_kernels\.\w+|torch\.ops\.\w+\.\w+|^def (triton_\w+)|(\w+_kernel)\b", re.MULTILINE)


def calls(code: str) -> set[str]:
    """The extern kernels, custom ops and Triton kernels named in generated code (kernel names without their
    Inductor-assigned numbers)."""
    return {re.sub(r"_\d+$", "", m.group(1) or m.group(2) or m.group(0)) for m in CALLS.finditer(code)}


def global_switches() -> dict:
    """Process-wide settings a layer built in between could change: matmul precision flags, determinism, and every
    Inductor and Dynamo config value."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    matmul = torch.backends.cuda.matmul
    switches = {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "matmul.allow_tf32": matmul.allow_tf32,
        "matmul.allow_bf16_reduced_precision_reduction": matmul.allow_bf16_reduced_precision_reduction,
        "matmul.allow_fp16_reduced_precision_reduction": matmul.allow_fp16_reduced_precision_reduction,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
    for name, config in (("inductor", inductor_config), ("dynamo", dynamo_config)):
        switches.update({f"{name}.{k}": repr(v) for k, v in config.get_config_copy().items()})
    return switches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="4096,16384")
    parser.add_argument("--output-code", default=None, help="save each side's generated code here")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="hidden 64, 8 experts of 32 (a check of the script)")
    parser.add_argument("--between", choices=["none", "modelopt", "bf16"], default="none",
                        help="build and run this layer after the pass-on side, before the pass-off side (as "
                        "bench_e2e_modelopt.py does), and print the process-wide settings it changed")  # fmt: skip
    args = parser.parse_args()
    device = args.device
    base = qwen3_30b_a3b_layer(device, 64, 32, 8) if args.tiny else qwen3_30b_a3b_layer(device)
    hidden = base.mlp.gate.weight.shape[1]
    calib = torch.randn(4, 512, hidden, device=device, dtype=torch.bfloat16)
    batches = [torch.randn(1, int(t), hidden, device=device, dtype=torch.bfloat16) for t in args.tokens.split(",")]
    outs, codes = {}, {}
    for name, flag in (("on", True), ("off", False)):
        if name == "off" and args.between != "none":
            before = global_switches()
            with torch.no_grad():
                peer = modelopt_layer(copy.deepcopy(base), calib) if args.between == "modelopt" else bf16_layer(
                    copy.deepcopy(base))  # fmt: skip
                for x in batches:
                    output(peer(x))
            after = global_switches()
            changed = {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys()
                       if before.get(k) != after.get(k)}  # fmt: skip
            print(f"{args.between} layer in between changed: {changed or 'nothing'}", flush=True)
        torch._dynamo.reset()
        with gather_quant.enabled(flag), torch.no_grad():
            layer = moeq_layer(copy.deepcopy(base), calib)
            for x in batches:
                first, code = run_and_get_code(lambda x=x, layer=layer: output(layer(x)))
                second = output(layer(x))
                outs[name, x.shape[1]], codes[name, x.shape[1]] = first, "\n".join(code)
                print(f"{name} {x.shape[1]} tokens: two calls {differ(first, second)}", flush=True)
    if args.output_code:
        os.makedirs(args.output_code, exist_ok=True)
        for (name, tokens), code in codes.items():
            with open(os.path.join(args.output_code, f"{name}_{tokens}.py"), "w") as f:
                f.write(code)
    for x in batches:
        t = x.shape[1]
        print(f"{t} tokens: on vs off {differ(outs['on', t], outs['off', t])}", flush=True)
        on_calls, off_calls = calls(codes["on", t]), calls(codes["off", t])
        print(f"  called only with the move: {sorted(on_calls - off_calls)}; only without: "
              f"{sorted(off_calls - on_calls)}", flush=True)  # fmt: skip
        if device != "cuda":
            continue
        tokens = x.reshape(-1, hidden)
        index = torch.randint(tokens.shape[0], (8 * tokens.shape[0],), device="cuda")
        amax = tokens.abs().amax().float().reshape(1)
        whole = fake_quant_act(tokens, torch.tensor([tokens.shape[0]], dtype=torch.int32, device="cuda"), amax, "nvfp4")
        rows = tokens[index]
        offs = torch.tensor([rows.shape[0]], dtype=torch.int32, device="cuda")
        print(f"  fake_quant_act(tokens)[i] vs fake_quant_act(tokens[i]): "
              f"{differ(whole[index], fake_quant_act(rows, offs, amax, 'nvfp4'))}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
