"""Probe: QAT FP8 with the activations quantized once and the bf16 weight fake-quantized in the GEMM's load path.

The shipped quantize-once path (``grouped_qmm(..., quantize_once=True)``) runs three launches: activation codes,
weight codes (805 MB of bf16 read + 403 MB of codes written for Qwen3 gate_up, ~0.31 ms at copy bandwidth) and the
codes GEMM. Here the weight pass is folded into the GEMM (``w_mode="fake_fp8"`` with ``x_mode="fp8_codes"``): each
weight tile is divided and rounded to e4m3 in registers, once per m-tile of its expert, and enters the FP8 dot.
Swap-AB tiles make the weight the MMA's register operand (wgmma takes A from registers, B only from shared memory).

Qwen3-30B-A3B shapes; every variant is checked against the float64 product of the codes from torch's own float8
cast; prints one table, writes JSON to ``--out``. ``--nvfp4``: the same question for QAT NVFP4 (activations
fake-quantized once, weight in the load path), checked against the unfused path."""

from __future__ import annotations

import argparse

import torch
import triton
from probes import ProbeTable, fp8_codes_reference, probe_inputs, save_probe

from moeq.runtime.kernels import fake_quant_act, fake_quant_experts
from moeq.runtime.kernels.grouped_qmm import grouped_qmm

VARIANTS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, swap)
    (128, 256, 128, 8, 3, False),
    (128, 256, 64, 8, 3, False),
    (128, 256, 64, 8, 4, False),
    (128, 128, 128, 8, 3, False),
    (128, 128, 64, 8, 4, False),
    (128, 128, 128, 8, 3, True),
    (128, 128, 64, 8, 4, True),
    (256, 128, 64, 8, 3, True),
    (256, 128, 128, 8, 3, True),
    (128, 64, 128, 4, 3, True),
    (64, 128, 128, 4, 3, True),
    (128, 256, 64, 8, 3, True),
]


def config(bm, bn, bk, warps, stages, swap) -> triton.Config:
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SWAP_AB": swap, "FP8_DOT": True}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


def run_case(label: str, k: int, n: int, rows: int, variants) -> list[dict]:
    p = probe_inputs(k, n, rows)
    x, w, offs, w_amax, x_amax = p.x, p.w, p.offs, p.w_amax, p.x_amax
    table = ProbeTable(label, fp8_codes_reference(p), p.flops)
    record = table.record

    def act_codes():
        return fake_quant_act(x, offs, x_amax, "fp8", codes=True)

    record("torch._grouped_mm bf16", lambda: torch._grouped_mm(x, w, offs).float())
    record("QAT FP8 quantize once (shipped, 3 launches)",
           lambda: grouped_qmm(x, w, offs, w_amax, None, x_amax, "fake_fp8", "fp8", quantize_once=True))  # fmt: skip
    record("  activation codes pass", act_codes, checked=False)
    record("  weight codes pass", lambda: fake_quant_experts(w, w_amax, "fp8", 1, codes=True), checked=False)
    record("QAT FP8 in-load (1 launch)",
           lambda: grouped_qmm(x, w, offs, w_amax, None, x_amax, "fake_fp8", "fp8", quantize_once=False))  # fmt: skip
    wc = fake_quant_experts(w, w_amax, "fp8", 1, codes=True)  # deploy W8A8's stored weight: the same products
    for once in (False, True):
        record(f"deploy W8A8 {'activation codes + GEMM' if once else 'in-load (1 launch)'}",
               lambda once=once: grouped_qmm(x, wc, offs, w_amax / 448.0, None, x_amax, "fp8", "fp8",
                                             quantize_once=once))  # fmt: skip
    xc = act_codes()
    record("hybrid autotuned (act codes + in-load weight)",
           lambda: grouped_qmm(act_codes(), w, offs, w_amax, None, x_amax, "fake_fp8", "fp8_codes"))  # fmt: skip
    for v in variants:
        cfg = config(*v)
        name = f"hybrid {v[0]}x{v[1]}x{v[2]} w{v[3]} s{v[4]}{' swap' if v[5] else ''}"
        record(name, lambda cfg=cfg: grouped_qmm(act_codes(), w, offs, w_amax, None, x_amax, "fake_fp8", "fp8_codes",
                                                 config=cfg))  # fmt: skip
        record("  its GEMM alone", lambda cfg=cfg: grouped_qmm(xc, w, offs, w_amax, None, x_amax, "fake_fp8",
                                                               "fp8_codes", config=cfg), checked=False)  # fmt: skip
    return table.print()


def run_nvfp4_case(label: str, k: int, n: int, rows: int) -> list[dict]:
    """QAT NVFP4: the activations fake-quantized once (bf16 values) and the weight fake-quantized in the load
    path, against the one-launch kernel and the unfused path (moeq's fake-quant kernels + ``_grouped_mm``,
    the reference here: both are tested bit for bit against formats.py on the GPU)."""
    p = probe_inputs(k, n, rows)
    x, w, offs, w_amax, x_amax = p.x, p.w, p.offs, p.w_amax, p.x_amax

    def unfused():
        xq = fake_quant_act(x, offs, x_amax, "nvfp4")
        return torch._grouped_mm(xq, fake_quant_experts(w, w_amax, "nvfp4", 1), offs)

    table = ProbeTable(label, unfused().double(), p.flops)
    table.record("torch._grouped_mm bf16", lambda: torch._grouped_mm(x, w, offs))
    table.record("unfused QAT NVFP4 (reference)", unfused)
    table.record("QAT NVFP4 in-load (1 launch)",
                 lambda: grouped_qmm(x, w, offs, w_amax, None, x_amax, "fake_nvfp4", "nvfp4"))  # fmt: skip
    table.record("hybrid (act fake quant + in-load weight)",
                 lambda: grouped_qmm(fake_quant_act(x, offs, x_amax, "nvfp4"), w, offs, w_amax, None, None,
                                     "fake_nvfp4"))  # fmt: skip
    return table.print()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--rows", default="34816")
    parser.add_argument("--variants", type=int, default=len(VARIANTS), help="first N variants only")
    parser.add_argument("--shapes", default="gate_up,down", help="which Qwen3 projections")
    parser.add_argument("--nvfp4", action="store_true", help="QAT NVFP4 rows instead of FP8")
    args = parser.parse_args()
    results = []
    for rows in map(int, args.rows.split(",")):
        for label, k, n in (("gate_up", 2048, 1536), ("down", 768, 2048)):
            if label not in args.shapes.split(","):
                continue
            if args.nvfp4:
                results += run_nvfp4_case(f"{label} {rows}", k, n, rows)
            else:
                results += run_case(f"{label} {rows}", k, n, rows, VARIANTS[: args.variants])
    save_probe(args.out, results)


if __name__ == "__main__":
    main()
