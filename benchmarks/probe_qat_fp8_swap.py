"""Probe: QAT FP8 at training sizes with the bf16 weight fake-quantized in the GEMM's load path as the MMA's
register operand (swap-AB: ``out^T = q(w) @ codes(x)^T``, the weight tile converted in registers feeds wgmma's A
operand directly, the activation codes its shared-memory B operand) and tall row tiles (up to 256 routed rows per
tile, wgmma's widest N), so that each weight tile is converted once per 256 rows instead of once per 128 and never
goes through shared memory; against the shipped path (activation codes, weight codes, codes GEMM: three launches)
and bf16 ``torch._grouped_mm`` in the same run. Every variant is checked against the float64 product of torch's
own e4m3 casts first. Session 21's question: can the weight pass (0.31 ms of the 0.65 ms gate_up op) go?

    python benchmarks/probe_qat_fp8_swap.py --out $OUT/qat_fp8_swap.json
"""

from __future__ import annotations

import triton
from probes import qat_fp8_table, qwen3_probe_main

from moeq.runtime.kernels import fake_quant_act
from moeq.runtime.kernels.grouped_qmm import grouped_qmm

#: (x rows per tile, weight columns per tile, BLOCK_K, warps, stages, swap-AB, TAIL_M)
CONFIGS = [
    (256, 128, 64, 8, 3, True, 64),
    (256, 128, 64, 8, 4, True, 64),
    (256, 64, 128, 4, 3, True, 64),
    (256, 64, 64, 4, 4, True, 64),
    (128, 128, 128, 8, 3, True, 64),
    (128, 128, 64, 4, 4, True, 64),
    (128, 64, 128, 4, 4, True, 64),
    (128, 256, 64, 8, 3, True, 64),
    (256, 128, 64, 8, 3, False, 64),
    (256, 128, 64, 8, 3, True, 0),
    (256, 64, 64, 4, 4, True, 0),
]


def run_case(label: str, k: int, n: int, rows: int) -> list[dict]:
    p, table = qat_fp8_table(label, k, n, rows)
    xc = fake_quant_act(p.x, p.offs, p.x_amax, "fp8", codes=True)
    table.record("activation codes pass", lambda: fake_quant_act(p.x, p.offs, p.x_amax, "fp8", codes=True), False)
    for bm, bn, bk, warps, stages, swap, tail in CONFIGS:
        meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SWAP_AB": swap, "FP8_DOT": True}
        config = triton.Config(meta | ({"TAIL_M": tail} if tail else {}), num_warps=warps, num_stages=stages)
        what = f"in-load w {bm}x{bn}x{bk} w{warps} s{stages} {'swap' if swap else 'noswap'} tail{tail}"
        table.record(what, lambda c=config: grouped_qmm(xc, p.w, p.offs, p.w_amax, None, p.x_amax, "fake_fp8",
                                                        "fp8_codes", config=c))  # fmt: skip
    return table.print()


if __name__ == "__main__":
    qwen3_probe_main(run_case)
