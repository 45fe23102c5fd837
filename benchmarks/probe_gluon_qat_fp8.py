"""Probe: the warp-specialized Gluon QAT FP8 kernel (``moeq.runtime.kernels.qat_gluon``), Qwen3 shapes at 34k rows.

Times, against bf16 ``torch._grouped_mm`` and the two launches (weight codes pass + codes GEMM, ``GLUON_QAT_FP8``
off), every configuration ``grouped_qmm`` may choose (``CONFIGS``), other exact candidates, and two inexact
reciprocal ceilings (what the spec's division costs). Each variant's weight codes and output are first checked
bit-equal to the shipped op's. Then the kernel alone is timed with roles that only pass their barriers (``SKIP``:
no conversion, no MMA, loads only), to see where the time goes. ``--compile-only`` compiles every variant for sm_90
on a machine without a GPU.

Session 32 ran a first form (one m-tile per program) on the H200: bit-exact and slower. Session 33 (H100,
BENCHMARKS.md) ran the row-group form: the loads were the limit, and a 128-wide tile with two warpgroups side by
side brought gate_up to 0.99x bf16, down to 0.85x. Session 34 adds the persistent launch (one program per SM).

    python benchmarks/probe_gluon_qat_fp8.py --out $OUT/gluon_qat_fp8.json
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from moeq.runtime.kernels.qat_gluon import CONFIGS, GluonConfig, qat_fp8_gluon_gemm  # noqa: E402

#: moeq's configurations, then an inexact reciprocal ceiling (not the spec: what the division costs), then the
#: persistent 128-wide ones with session 35's accumulator layout (warpgroups side by side along N, not stacked). The
#: slower candidates of sessions 33 and 34 (64-wide 3/3/3 stages, 128-deep k-steps) are in BENCHMARKS.md.
VARIANTS = [
    *CONFIGS,
    GluonConfig(256, 64, 128, 64, 5, 3, 3, 2, 4, 80, 8, 128, 0, persistent=True, stacked=True),
    CONFIGS[2]._replace(stacked=False),
    CONFIGS[4]._replace(stacked=False),
]
#: indices into VARIANTS to time (``--variants``), and those decomposed with roles that only pass their barriers
CHOSEN = list(range(len(VARIANTS)))
DECOMPOSED = [i for i, v in enumerate(VARIANTS) if v in CONFIGS and v.bn == 128 and v.persistent]


def compile_only() -> None:
    """Compile every variant for sm_90 (no GPU needed) and print shared memory, registers and instruction counts."""
    for v in VARIANTS:
        try:
            k = v.compile_for_sm90()
        except Exception as exc:
            print(f"{v.name}: ERROR {str(exc)[-600:]}")
            continue
        ptx = k.asm["ptx"]
        regs = [line.split()[-1].rstrip(";") for line in ptx.splitlines() if "setmaxnreg" in line]
        print(f"{v.name}: shared {k.metadata.shared} B, warps {k.metadata.num_warps}, "
              f"wgmma {ptx.count('wgmma.mma_async')}, cvt e4m3x2 {ptx.count('cvt.rn.satfinite.e4m3x2')}, "
              f"local {ptx.count('st.local')}, setmaxnreg {' '.join(regs)}")  # fmt: skip


def run_case(label: str, k: int, n: int, rows: int) -> list[dict]:
    import torch
    from probes import qat_fp8_table, qat_fp8_two_launches

    from moeq.runtime.kernels import fake_quant_act, fake_quant_experts

    p, table = qat_fp8_table(label, k, n, rows)
    num_experts = p.w_nk.shape[0]
    shipped = qat_fp8_two_launches(p)
    codes_ref = fake_quant_experts(p.w, p.w_amax, "fp8", 1, codes=True)  # [E, K, N] view of [E, N, K] codes

    for v in [VARIANTS[i] for i in CHOSEN]:

        def op(codes=None, v=v):
            xc = fake_quant_act(p.x, p.offs, p.x_amax, "fp8", codes=True)
            return qat_fp8_gluon_gemm(xc, p.w, p.offs, p.w_amax, p.x_amax, config=v, codes=codes)

        print(f"{label:14s} {v.name}: launching", flush=True)
        try:
            codes = torch.zeros(num_experts, n, k, dtype=torch.float8_e4m3fn, device="cuda")
            got = op(codes)
            torch.cuda.synchronize()
            same_codes = torch.equal(codes.view(torch.uint8), codes_ref.transpose(1, 2).view(torch.uint8))
            diff = (got.float() - shipped.float()).abs().max().item()
            print(f"{label:14s} {v.name}: codes bit-equal to fake_quant_experts: {same_codes}; max |diff| {diff:.3g}",
                  flush=True)  # fmt: skip
        except Exception as exc:
            print(f"{label:14s} {v.name}: ERROR {str(exc)[:300]}", flush=True)
            continue
        table.record(v.name, op)
    xc = fake_quant_act(p.x, p.offs, p.x_amax, "fp8", codes=True)
    for v in [VARIANTS[i] for i in DECOMPOSED]:  # where the time goes (the kernel alone): roles that only pass the
        # barriers
        for skip, what in ((0, "kernel only"), (1, "no conversion"), (2, "no MMA"), (3, "loads only")):
            table.record(f"{v.name} [{what}]", lambda v=v, skip=skip: qat_fp8_gluon_gemm(
                xc, p.w, p.offs, p.w_amax, p.x_amax, config=v, skip=skip), checked=skip == 0)  # fmt: skip
    table.record("gluon, tuned_config's choice", lambda: qat_fp8_gluon_gemm(
        fake_quant_act(p.x, p.offs, p.x_amax, "fp8", codes=True), p.w, p.offs, p.w_amax, p.x_amax))  # fmt: skip
    return table.print()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--variants", default=None, help="comma-separated indices into VARIANTS (default: all)")
    parser.add_argument("--decompose", default=None, help="VARIANTS indices decomposed (default: the shipped "
                        "persistent 128-wide ones)")  # fmt: skip
    args, rest = parser.parse_known_args()
    global CHOSEN, DECOMPOSED
    if args.variants is not None:
        CHOSEN = [int(i) for i in args.variants.split(",") if i]
    if args.decompose is not None:
        DECOMPOSED = [int(i) for i in args.decompose.split(",") if i]
    if args.compile_only:
        os.environ.setdefault("TRITON_CACHE_DIR", "/tmp/moeq_gluon_cache")
        compile_only()
        return
    sys.argv = [sys.argv[0], *rest]
    from probes import qwen3_probe_main

    qwen3_probe_main(run_case)


if __name__ == "__main__":
    main()
