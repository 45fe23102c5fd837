"""Probe: the QAT FP8 / W8A8 codes GEMM (both operands e4m3 codes, FP8 tensor cores) at training sizes with tiles the
autotuner does not try: 256-row tiles (two warpgroups of 128 rows each, so each weight tile in shared memory feeds
twice the MMA work) and deeper pipelines, against the autotuned kernel, the whole QAT FP8 op and bf16
``torch._grouped_mm`` in the same run. Every variant is checked against the float64 product of torch's own e4m3
casts first. Session 21's question: can the codes GEMM (0.29 of the gate_up op's 0.63-0.65 ms) get the ~8% that
0.9x bf16 needs?

    python benchmarks/probe_codes_gemm_tiles.py --out $OUT/codes_gemm_tiles.json
"""

from __future__ import annotations

import triton
from probes import qat_fp8_table, qwen3_probe_main

from moeq.formats import get_format
from moeq.runtime.kernels import fake_quant_act, fake_quant_experts
from moeq.runtime.kernels.grouped_qmm import TAIL_ROWS, grouped_qmm

#: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), all with FP8 dots and TAIL_ROWS-row tails
TILES = [(128, 256, 128, 8, 3), (128, 256, 128, 8, 4), (256, 128, 128, 8, 3), (256, 128, 64, 8, 4),
         (256, 128, 128, 8, 4), (128, 128, 128, 8, 4)]  # fmt: skip


def run_case(label: str, k: int, n: int, rows: int) -> list[dict]:
    p, table = qat_fp8_table(label, k, n, rows)
    xc = fake_quant_act(p.x, p.offs, p.x_amax, "fp8", codes=True)
    wc = fake_quant_experts(p.w, p.w_amax, "fp8", 1, codes=True)
    w_scale = get_format("fp8").scale_from_amax(p.w_amax)
    table.record("codes GEMM autotuned", lambda: grouped_qmm(xc, wc, p.offs, w_scale, None, p.x_amax, "fp8",
                                                              "fp8_codes"))  # fmt: skip
    for bm, bn, bk, warps, stages in TILES:
        meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SWAP_AB": False, "FP8_DOT": True, "TAIL_M": TAIL_ROWS}
        config = triton.Config(meta, num_warps=warps, num_stages=stages)
        table.record(f"codes GEMM {bm}x{bn}x{bk} w{warps} s{stages}",
                     lambda c=config: grouped_qmm(xc, wc, p.offs, w_scale, None, p.x_amax, "fp8", "fp8_codes",
                                                  config=c))  # fmt: skip
    return table.print()


if __name__ == "__main__":
    qwen3_probe_main(run_case)
