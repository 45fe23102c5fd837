"""Probe: QAT FP8 at training sizes with the weight codes pass inside the codes GEMM's launch (one persistent
kernel, :mod:`moeq.runtime.kernels.weight_pass_gemm`) against the shipped two launches (weight codes pass, then the
codes GEMM), Qwen3-30B-A3B shapes.

Each variant runs the whole op (activation codes pass included), is checked against the float64 product of
torch's own e4m3 casts and **bit for bit** against the two-launch output, and its weight codes against
``fake_quant_experts(codes=True)``'s; then timed (CUDA-graph replays). One table per case; JSON to ``--out``.

    python benchmarks/probe_weight_pass_gemm.py --rows 34816 --out $OUT/weight_pass_gemm.json
"""

from __future__ import annotations

import torch
import triton
from probes import qat_fp8_table, qat_fp8_two_launches, qwen3_probe_main

from moeq.formats import get_format
from moeq.runtime.kernels import fake_quant_act, fake_quant_experts
from moeq.runtime.kernels.weight_pass_gemm import weight_pass_gemm, weight_pass_gemm_configs


def _whole_op(p, in_gemm: bool):
    """The whole QAT FP8 op with the weight codes pass in its own launch or inside the GEMM's (autotuned)."""
    return qat_fp8_two_launches(p, WEIGHT_PASS_IN_GEMM=in_gemm)


def run_case(label: str, k: int, n: int, rows: int) -> list[dict]:
    p, table = qat_fp8_table(label, k, n, rows)  # bf16 anchor, then the op as it runs by default
    table.record("QAT FP8, weight pass in its own launch (before)", lambda: _whole_op(p, False))
    before = _whole_op(p, False)
    table.record("QAT FP8, weight pass in the GEMM's launch (autotuned)", lambda: _whole_op(p, True))
    codes_ref = fake_quant_experts(p.w, p.w_amax, "fp8", 1, codes=True)
    w_scale = get_format("fp8").scale_from_amax(p.w_amax)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    variants = [(c, False) for c in weight_pass_gemm_configs()]
    variants += [(c, True) for c in weight_pass_gemm_configs()[:2]]
    for config, static in variants:
        cfg = triton.Config(dict(config.kwargs, STATIC_SCHEDULE=static), num_warps=config.num_warps,
                            num_stages=config.num_stages)  # fmt: skip
        kw = config.kwargs
        name = (f"fused {'static' if static else 'tickets'} conv {kw['CONV_N']}x{kw['CONV_K']}x{kw['CONV_TILES']} "
                f"{kw['CONV_STAGES']}st")  # fmt: skip
        codes = torch.empty_like(p.w, dtype=torch.float8_e4m3fn)
        out = torch.empty(p.x.shape[0], n, dtype=torch.bfloat16, device="cuda")

        def fused(codes=codes, out=out, cfg=cfg):
            xc = fake_quant_act(p.x, p.offs, p.x_amax, "fp8", codes=True)
            return weight_pass_gemm(xc, p.w, p.offs, p.w_amax, w_scale, p.x_amax, out, codes, config=cfg,
                                    programs=sms)  # fmt: skip

        try:
            got = fused()
            torch.cuda.synchronize()
            same = torch.equal(got, before)
            codes_same = torch.equal(codes.view(torch.uint8), codes_ref.view(torch.uint8))
        except Exception as exc:  # out of resources etc.: recorded, the probe goes on
            table.rows.append(dict(case=label, what=name, error=str(exc)[:300]))
            print(f"{label:14s} {name:52s} ERROR {str(exc)[:120]}", flush=True)
            continue
        print(f"{label:14s} {name:52s} output equal to before: {same}, codes equal: {codes_same}", flush=True)
        table.record(name + ("" if same and codes_same else " (NOT EQUAL)"), fused)
    return table.print()


if __name__ == "__main__":
    qwen3_probe_main(run_case)
