"""Probe: where the one-launch QAT FP8 kernel (:mod:`moeq.runtime.kernels.weight_pass_gemm`) loses its time, Qwen3
shapes at 34k rows. Its two parts alone in the persistent kernel (``PARTS=1``: GEMM tiles only, on codes written
before; ``PARTS=2``: conversion items only) next to the launches they replace (the codes GEMM of the same tile, the
weight codes pass), with the ticket counter and with the static round-robin schedule. GEMM-only rows are checked
bit for bit against the codes GEMM of the same tile; conversion-only rows' codes against the weight pass's.

    python benchmarks/probe_weight_pass_parts.py --out $OUT/weight_pass_parts.json
"""

from __future__ import annotations

import torch
import triton
from bench_grouped_qmm import bench
from probes import probe_inputs, qwen3_probe_main

from moeq.formats import get_format
from moeq.runtime.kernels import fake_quant_act, fake_quant_experts
from moeq.runtime.kernels.grouped_qmm import grouped_qmm
from moeq.runtime.kernels.weight_pass_gemm import codes_gemm_tile, weight_pass_gemm, weight_pass_gemm_configs


def run_case(label: str, k: int, n: int, rows: int) -> list[dict]:
    p = probe_inputs(k, n, rows)
    base = weight_pass_gemm_configs()[0]
    tile = codes_gemm_tile(base)
    xc = fake_quant_act(p.x, p.offs, p.x_amax, "fp8", codes=True)
    codes_ref = fake_quant_experts(p.w, p.w_amax, "fp8", 1, codes=True)
    w_scale = get_format("fp8").scale_from_amax(p.w_amax)
    gemm_ref = grouped_qmm(xc, codes_ref, p.offs, w_scale, None, p.x_amax, "fp8", "fp8_codes", config=tile)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.empty_like(gemm_ref)
    codes = torch.empty_like(codes_ref)
    results = []

    def record(what, fn, check=None):
        fn()
        torch.cuda.synchronize()
        ok = check() if check else ""
        ms = bench(fn)
        gbps = 3 * p.w.numel() / ms / 1e6
        results.append(dict(case=label, what=what, ms=ms, TFLOPs=p.flops / ms / 1e9, weight_pass_GBps=gbps, ok=ok))
        print(f"{label:8s} {what:58s} {ms:.4f} ms {p.flops / ms / 1e9:6.1f} TFLOP/s {gbps:6.0f} GB/s(w pass) {ok}",
              flush=True)  # fmt: skip

    record("codes GEMM, one tile per program (same tile)",
           lambda: grouped_qmm(xc, codes_ref, p.offs, w_scale, None, p.x_amax, "fp8", "fp8_codes", config=tile))  # fmt: skip
    record("weight codes pass (fake_quant_experts)", lambda: fake_quant_experts(p.w, p.w_amax, "fp8", 1, codes=True))
    for conv in ((32, 512, 2, 3), (32, 512, 2, 1), (64, 512, 1, 1), (32, 512, 4, 4)):
        for static in (False, True):
            for parts in (1, 2, 0):
                if parts == 1 and conv != (32, 512, 2, 3):
                    continue
                kw = dict(base.kwargs, CONV_N=conv[0], CONV_K=conv[1], CONV_TILES=conv[2], CONV_STAGES=conv[3],
                          STATIC_SCHEDULE=static, PARTS=parts)  # fmt: skip
                cfg = triton.Config(kw, num_warps=8, num_stages=base.num_stages)
                w_codes = codes_ref if parts == 1 else codes
                name = (
                    f"{['both', 'GEMM only', 'conversion only'][parts]} {'static' if static else 'tickets'} conv {conv}"
                )
                check = (lambda: torch.equal(out, gemm_ref)) if parts != 2 else None
                if parts == 2:
                    check = lambda: torch.equal(codes.view(torch.uint8), codes_ref.view(torch.uint8))  # noqa: E731
                try:
                    record(name, lambda cfg=cfg, w_codes=w_codes: weight_pass_gemm(
                        xc, p.w, p.offs, p.w_amax, w_scale, p.x_amax, out, w_codes, config=cfg, programs=sms), check)  # fmt: skip
                except Exception as exc:
                    print(f"{label:8s} {name:58s} ERROR {str(exc)[:100]}", flush=True)
    return results


if __name__ == "__main__":
    qwen3_probe_main(run_case)
