"""Batched (``bmm``) experts through ``moeq::grouped_qmm``: Llama-4-Scout expert shapes, deploy modes.

transformers' Llama 4 runs its routed experts as ``bmm`` over ``[E, tokens, K]``: every expert multiplies every
token (the router's scores mask the result). moeq's post-grad pass runs such a ``bmm`` as ``moeq::grouped_qmm`` on
the rows as E equal segments. Shapes: E=16, H=5120, I=8192 (gate_up ``[16, T, 5120] @ [16, 5120, 16384]``, down
``[16, T, 8192] @ [16, 8192, 5120]``) at T = 64 and 1024 tokens. Rows: ``torch.bmm`` bf16 (anchor), the unfused
deploy path (``moeq::dequant_weight`` kernel, then ``torch.bmm``) and the op as one kernel (``quantize_once=False``)
and as it picks by size (``auto``: W4A16 / W8A16 dequantize first above ``DEQUANT_FIRST_ROWS_PER_EXPERT``), W4A16
NVFP4 and W8A8 FP8; HBM
copy in the same run. Each kernel is checked against an fp32 per-expert product of the formats.py operands first
(relative error < 1e-2). Timed as CUDA-graph replays (``bench_grouped_qmm.bench``). ``--modes`` adds
``deploy W8A16 FP8``; ``--tokens`` sets T.

    python benchmarks/bench_batched_experts.py --out $OUT
"""

from __future__ import annotations

import argparse
import os
import platform

import torch
from bench_grouped_qmm import bench, copy_bandwidth, reference_mm, stored
from report import print_and_save

from moeq.formats import expert_amax
from moeq.lowering.grouped_qmm import quantized_operands

grouped_qmm = torch.ops.moeq.grouped_qmm  # what the compiled graph calls

SHAPES = [("gate_up", 5120, 16384), ("down", 8192, 5120)]
MODES = [
    ("deploy W4A16 NVFP4", "nvfp4", None),
    ("deploy W8A8 FP8", "fp8", "fp8"),
    ("deploy W8A16 FP8", "fp8", None),
]


def run_case(
    label: str, num_experts: int, k: int, n: int, tokens: int, copy_tbs: float, modes: list[str]
) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(k + n + tokens)
    x3 = torch.randn(num_experts, tokens, k, device="cuda", generator=g).bfloat16()
    w_nk = (torch.randn(num_experts, n, k, device="cuda", generator=g) * 0.02).bfloat16()
    x = x3.view(-1, k)
    offs = torch.arange(1, num_experts + 1, device="cuda", dtype=torch.int32) * tokens
    flops = 2 * num_experts * tokens * k * n
    rows = []

    def record(what: str, ms: float, weight_bytes: int, anchor: float | None = None) -> None:
        tbs = (weight_bytes + x.numel() * 2 + num_experts * tokens * n * 2) / ms / 1e9
        rows.append(
            {
                "case": label,
                "kernel": what,
                "ms": ms,
                "TFLOP/s": flops / ms / 1e9,
                "TB/s": tbs,
                "vs copy": tbs / copy_tbs,
                "vs bmm bf16": (anchor / ms) if anchor else None,
            }
        )

    w_kn = w_nk.transpose(1, 2)
    bf16_ms = bench(lambda: torch.bmm(x3, w_kn))
    record("torch.bmm bf16", bf16_ms, w_nk.numel() * 2)
    amax = expert_amax(w_nk)
    for mode, fmt, x_fmt in [m for m in MODES if m[0] in modes]:
        (data, scale, block), _ = stored(w_nk, amax, fmt)
        x_amax = x.abs().amax().float().reshape(1) if x_fmt else None
        xq, wq = quantized_operands(x, data, offs, scale, block, x_amax, "deploy", fmt, x_fmt)
        want = reference_mm(xq, wq, offs)
        got = grouped_qmm(x, data, offs, scale, block, x_amax, "deploy", fmt, x_fmt, False).float()
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 1e-2, (label, mode, rel)
        stored_bytes = sum(t.numel() * t.element_size() for t in (data, scale, block) if t is not None)

        def unfused(data=data, scale=scale, block=block, fmt=fmt, x_amax=x_amax, x_fmt=x_fmt):
            xq, w = quantized_operands(x, data, offs, scale, block, x_amax, "deploy", fmt, x_fmt)
            return torch.bmm(xq.view(num_experts, tokens, k), w)

        record(f"{mode} unfused (dequant + bmm)", bench(unfused), stored_bytes, bf16_ms)
        for once, what in ((False, f"grouped_qmm, one kernel (rel {rel:.1e})"), (None, "grouped_qmm, auto")):
            ms = bench(
                lambda d=data, s=scale, b=block, a=x_amax, f=fmt, xf=x_fmt, once=once: grouped_qmm(
                    x, d, offs, s, b, a, "deploy", f, xf, once
                )
            )
            record(f"{mode} {what}", ms, stored_bytes, bf16_ms)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--tokens", default="64,1024", help="tokens per expert (comma-separated)")
    parser.add_argument("--modes", default=",".join(m[0] for m in MODES[:2]))
    args = parser.parse_args()
    copy_tbs = copy_bandwidth()
    rows = []
    for tokens in map(int, args.tokens.split(",")):
        for name, k, n in SHAPES:
            rows += run_case(f"scout {name} T={tokens}", 16, k, n, tokens, copy_tbs, args.modes.split(","))
        torch.cuda.empty_cache()
    header = ["case", "kernel", "ms", "TFLOP/s", "TB/s", "vs copy", "vs bmm bf16"]
    table = [
        [r["case"], r["kernel"], f"{r['ms']:.4f}", f"{r['TFLOP/s']:.1f}", f"{r['TB/s']:.2f}", f"{r['vs copy']:.2f}"]
        + [f"{r['vs bmm bf16']:.2f}x" if r["vs bmm bf16"] else ""]
        for r in rows
    ]
    print(f"HBM copy {copy_tbs:.2f} TB/s ({platform.node()})")
    print_and_save(args.out, "bench_batched_experts", header, table, results=rows, copy_tbs=copy_tbs)


if __name__ == "__main__":
    main()
