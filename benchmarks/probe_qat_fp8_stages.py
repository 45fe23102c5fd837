"""Probe: the whole QAT FP8 op at 34k Qwen3 rows with the codes GEMM's 128x256x128 tile forced to 3 and to 4 stages,
beside the autotuned op (and the config the autotuner chose) and the bf16 anchor (BENCHMARKS.md session 22).

Each row is checked against the float64 product of torch's own float8 casts, then timed (CUDA-graph replays); one
table; JSON to ``--out``. Run from ``benchmarks/``."""

from __future__ import annotations

import triton
from probes import qat_fp8_table, qwen3_probe_main

from moeq.runtime.kernels.grouped_qmm import TAIL_ROWS, _grouped_qmm_kernel, grouped_qmm


def run_case(label: str, k: int, n: int, rows: int) -> list[dict]:
    p, table = qat_fp8_table(label, k, n, rows)
    print(label, "autotuned best:", _grouped_qmm_kernel.best_config, flush=True)

    def qat_fp8(config: triton.Config | None = None):
        return grouped_qmm(p.x, p.w, p.offs, p.w_amax, None, p.x_amax, "fake_fp8", "fp8", config=config)

    for stages in (3, 4):
        meta = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "SWAP_AB": False, "FP8_DOT": True, "TAIL_M": TAIL_ROWS}
        config = triton.Config(meta, num_warps=8, num_stages=stages)
        table.record(f"QAT FP8 whole op, 128x256x128 w8 s{stages}", lambda config=config: qat_fp8(config))
    table.record("QAT FP8 grouped_qmm (autotuned, again)", qat_fp8)
    return table.print()


if __name__ == "__main__":
    qwen3_probe_main(run_case)
