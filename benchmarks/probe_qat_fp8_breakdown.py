"""Probe: where the QAT FP8 grouped GEMM's time goes at training sizes (Qwen3-30B-A3B, 34k routed rows).

``grouped_qmm(x, w, offs, amax, None, x_amax, "fake_fp8", "fp8")`` runs three launches above 48 rows per expert:
the activations' e4m3 codes, the weight's e4m3 codes, then the codes GEMM. This times each part alone and the whole
op (CUDA-graph replays, as ``bench_grouped_qmm.py``), next to bf16 ``torch._grouped_mm`` and an HBM copy of the
weight's bytes, and prints what the parts leave unexplained (launch gaps, small torch ops). The whole op is checked
against the float64 product of torch's own e4m3 casts first. JSON to ``--out``.

    python benchmarks/probe_qat_fp8_breakdown.py --out $OUT/qat_fp8_breakdown.json
"""

from __future__ import annotations

from bench_grouped_qmm import bench
from probes import qat_fp8_table, qwen3_probe_main

from moeq.formats import get_format
from moeq.runtime.kernels import fake_quant_act, fake_quant_experts
from moeq.runtime.kernels.grouped_qmm import grouped_qmm


def run_case(label: str, k: int, n: int, rows: int) -> list[dict]:
    p, table = qat_fp8_table(label, k, n, rows)
    offs, w_amax, x_amax = p.offs, p.w_amax, p.x_amax
    xc = fake_quant_act(p.x, offs, x_amax, "fp8", codes=True)
    wc = fake_quant_experts(p.w, w_amax, "fp8", 1, codes=True)
    w_scale = get_format("fp8").scale_from_amax(w_amax)
    parts = {
        "activation codes pass": lambda: fake_quant_act(p.x, offs, x_amax, "fp8", codes=True),
        "weight codes pass": lambda: fake_quant_experts(p.w, w_amax, "fp8", 1, codes=True),
        "codes GEMM": lambda: grouped_qmm(xc, wc, offs, w_scale, None, x_amax, "fp8", "fp8_codes"),
        "weight copy (same bytes read, 1 B/elem written)": lambda: wc.copy_(p.w),
    }
    ms = {name: bench(fn) for name, fn in parts.items()}
    for name, t in ms.items():
        print(f"{label:14s} {name:52s} {t:.4f} ms", flush=True)
    rows_out = table.print()
    whole = next(r["ms"] for r in rows_out if r["what"].startswith("QAT FP8") and "ms" in r)
    parts_sum = ms["activation codes pass"] + ms["weight codes pass"] + ms["codes GEMM"]
    print(f"{label:14s} parts sum {parts_sum:.4f} ms, whole op {whole:.4f} ms, unexplained {whole - parts_sum:.4f} ms",
          flush=True)  # fmt: skip
    return rows_out + [dict(case=label, what=name, ms=t) for name, t in ms.items()]


if __name__ == "__main__":
    qwen3_probe_main(run_case)
