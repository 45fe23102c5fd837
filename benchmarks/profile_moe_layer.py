"""Where a compiled MoE layer's GPU time goes, by kernel category: would fusing more into the expert GEMMs pay?

Issue 6 allows the gate/up SiLU-and-mul and the down projection's routing-weight scaling as GEMM prologue /
epilogue fusions "where they measurably pay". A fusion can save at most the time of the kernels it removes, so
this profiles one Qwen3-30B-A3B-shaped layer (transformers' ``Qwen3MoeSparseMoeBlock``: hidden 2048, 128 experts
of 768, top-8, bf16, random weights, ``grouped_mm`` experts) compiled by Inductor (bf16) and by moeq (deploy:
calibrated, finalized, frozen; QAT: the training step), and sums each call's CUDA kernel time (torch.profiler,
``--calls`` calls averaged) into categories by kernel name:

- expert GEMM: moeq's ``_grouped_qmm_kernel``, ``torch._grouped_mm``'s CUTLASS kernels (names with "grouped");
- quantization passes: moeq's activation / weight / dequant / mask kernels;
- combine: ``moeq::combine_experts`` and its backward (routing-weight scaling, un-permute, top-k sum; Inductor's own fused gather-
  reduction for it falls under "other");
- SiLU-and-mul: Inductor kernels whose fused-op name has ``silu`` (the gate/up activation, and its backward);
- routing: router GEMM, softmax, top-k, sort, histogram, offsets;
- everything else (gather of routed rows, routing-weight scaling, combine, copies).

    python benchmarks/profile_moe_layer.py --out $OUT
"""

from __future__ import annotations

import argparse
import os
import re
from collections import defaultdict

import torch
from bench_e2e_modelopt import qwen3_30b_a3b_layer
from bench_qat_training import compiled_variant, step
from report import print_and_save

from moeq.lowering.inductor import combine_fusion

CATEGORIES = (
    ("expert GEMM", r"_grouped_qmm_kernel|^(?!triton_).*[Gg]roup"),  # Inductor names fused kernels after their ops
    ("quant passes", r"_fake_quant_act|_fake_quant_experts|_dequant_weight|_segment_amax|_mask_clipped|_weight_amax"),
    ("combine", r"_combine_experts_(backward_)?kernel"),
    ("SiLU-and-mul", r"silu|sigmoid"),
    ("routing", r"topk|sort|Sort|softmax|histc|histogram|cumsum|scan|gemm|gemv|nvjet|xmma|cutlass"),
)


def category(kernel: str) -> str:
    """The category of a CUDA kernel's name (first match in :data:`CATEGORIES`), else ``other``."""
    for name, pattern in CATEGORIES:
        if re.search(pattern, kernel):
            return name
    return "other"


def kernel_times(fn, calls: int) -> dict[str, float]:
    """Mean CUDA time per call (ms) of each kernel name over ``calls`` calls of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name] += event.device_time / 1e3 / calls
    return dict(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--tokens", default="64,4352", help="tokens per call (x8 routed rows)")
    parser.add_argument("--variants", default="bf16,FP8:deploy,FP8:deploy:inductor,NVFP4_W4A16:deploy,bf16:train,"
                        "FP8:train,FP8:train:inductor",
                        help="bf16 | CONFIG:deploy (frozen, forward) | bf16:train / CONFIG:train (QAT step); "
                             "a third field 'inductor' leaves the MoE combine to Inductor")  # fmt: skip
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    base = qwen3_30b_a3b_layer("cuda")
    hidden = base.mlp.gate.weight.shape[1]
    calib = torch.randn(4, 512, hidden, device="cuda", dtype=torch.bfloat16)
    names = [c for c, _ in CATEGORIES] + ["other"]
    rows, results = [], []
    for variant in args.variants.split(","):
        cfg, mode, combine = (variant.split(":") + ["", ""])[:3]
        train = mode == "train"
        torch._dynamo.reset()
        with combine_fusion(combine != "inductor"):
            layer = compiled_variant(base, None if cfg == "bf16" else cfg, calib, deploy=mode == "deploy")
        for tokens in (int(t) for t in args.tokens.split(",")):
            gen = torch.Generator(device="cuda").manual_seed(tokens)
            x = torch.randn(1, tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
            if train:
                x.requires_grad_()
                grad_out = torch.randn(x.shape, device="cuda", dtype=torch.bfloat16, generator=gen)

                def call():
                    step(layer, x, grad_out)  # noqa: B023
            else:

                def call():
                    with torch.no_grad():
                        layer(x)  # noqa: B023

            with combine_fusion(combine != "inductor"):  # read when the first call compiles
                for _ in range(3):
                    call()
            times = kernel_times(call, args.calls)
            per_category = dict.fromkeys(names, 0.0)
            for kernel, ms in times.items():
                per_category[category(kernel)] += ms
            total = sum(per_category.values())
            label = f"{variant} {'step' if train else 'forward'}"
            rows.append([str(tokens), label, f"{total:.3f}"]
                        + [f"{per_category[c]:.3f} ({per_category[c] / total:.0%})" for c in names])  # fmt: skip
            results.append(dict(tokens=tokens, variant=variant, train=train, total_ms=total, categories=per_category,
                                kernels=dict(sorted(times.items(), key=lambda kv: -kv[1]))))  # fmt: skip
            print(f"  {tokens} tokens, {label} done", flush=True)
    header = ["tokens", "variant", "kernels ms", *[f"{c} ms (share)" for c in names]]
    print_and_save(args.out, "profile_moe_layer", header, rows, results=results)


if __name__ == "__main__":
    main()
