"""Probe: variants of the Gluon QAT kernels against moeq's configurations, kernel alone (session 39).

``--family tail_boxes`` (default): the tail rows copied in ``tail_box``-row TMA boxes, only as many as a group has.

A group multiplies up to ``bm + bt`` = 256 + 64 routed rows of one expert; at Qwen3-30B-A3B's 34816 routed rows an
expert has ~272 (random routing, ``bench_grouped_qmm.routing``), so the 64-row tail copy brings ~48 rows no store
reads. The kernel alone is bound by its copies (BENCHMARKS.md session 36: loads only 0.42 of 0.69 ms on gate_up), and
the activations are most of them (every n-tile reads them again). Per projection: bf16 ``torch._grouped_mm``, then
each configuration and its ``tail_box`` variants, kernel alone, in interleaved rounds (QAT NVFP4 on activations
fake-quantized first; QAT FP8 on activation codes), each variant's output checked bit-equal to its base's and the base
against float64; the loads-only decomposition (``skip=3``); and the activations' NVFP4 pass on the routed rows and on
the tokens (``rows / 8``: the compiled graph quantizes before the routing gather, ``moeq.lowering.gather_quant``).

``--family swap``: the kernel computing the product's transpose (``GluonConfig.swap``; session 41), QAT NVFP4 and
QAT FP8, decomposed as loads plus MMA (``skip=1``: no conversion). The operands swap roles, so bit-equality with
the base is reported, not required; every output is checked against float64 (session 41 found them bit-equal).

``--family stages``: QAT NVFP4 with deeper activation / weight / converted rings (``STAGES``), kernel alone, no
decomposition.

``--family converters``: QAT NVFP4 with 8 converter warps at fewer registers (``CONVERTERS``). For QAT NVFP4 every
variant's weight values are also checked equal to ``fake_quant_experts``', and the whole op is estimated as the
kernel's median plus the activations' pass (on the routed rows, and on the tokens).

    python benchmarks/probe_gluon_variants.py [--family converters] [--rounds 3] [--cases gate_up] --out $OUT/v.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from probe_gluon_qat_nvfp4 import nvfp4_reference  # noqa: E402
from probes import ProbeTable, fp8_codes_reference, probe_inputs, save_probe  # noqa: E402

from moeq.runtime.kernels import fake_quant_act, fake_quant_experts  # noqa: E402
from moeq.runtime.kernels.qat_gluon import (  # noqa: E402
    CONFIGS,
    NVFP4_CONFIGS,
    qat_fp8_gluon_gemm,
    qat_nvfp4_gluon_gemm,
)

#: (format, base, variants): moeq's QAT NVFP4 configurations and its 7-stage QAT FP8 one copying whole 64-row tails
#: (as before session 39), with 16- and 32-row tail boxes
TAIL_BOXES = [
    ("nvfp4", NVFP4_CONFIGS[0]._replace(tail_box=0), [NVFP4_CONFIGS[0]._replace(tail_box=b) for b in (16, 32)]),
    ("nvfp4", NVFP4_CONFIGS[1]._replace(tail_box=0), [NVFP4_CONFIGS[1]._replace(tail_box=16)]),
    ("fp8", CONFIGS[4]._replace(tail_box=0), [CONFIGS[4]._replace(tail_box=b) for b in (16, 32)]),
]
#: ``--converters``: QAT NVFP4 with 8 converter warps (two a scheduler, not one) at fewer registers each, the MMA warps
#: keeping theirs (the launch's 96-register cap over 20 warps)
CONVERTERS = [
    (
        "nvfp4",
        NVFP4_CONFIGS[0],
        [
            NVFP4_CONFIGS[0]._replace(conv_warps=8, conv_regs=r, split=s, maxnreg=96)
            for r, s in ((64, 2), (56, 2), (64, 4))
        ],
    ),
]

#: ``--family swap``: the product's transpose (``GluonConfig.swap``): the converted weight tile the A operand, each
#: group's rows B, the tail's wgmma only as wide as its rows (16, 32 or 64), whole tails and 16-row tail boxes
SWAP = [
    (
        "nvfp4",
        NVFP4_CONFIGS[0],
        [NVFP4_CONFIGS[0]._replace(swap=True, stacked=False, tail_box=b) for b in (0, 16)],
    ),
    ("fp8", CONFIGS[4], [CONFIGS[4]._replace(swap=True, stacked=False, tail_box=b) for b in (0, 16)]),
]

#: ``--family stages`` (session 44): QAT NVFP4 with deeper rings, as far as Hopper's 227 KB of shared memory go: the
#: 32-deep configuration's activation / bf16 weight / converted stages from 5 / 4 / 3 up (160 KB) to 212-230 KB, and
#: the 64-deep one with a fourth activation stage for one weight stage less of each kind (230 KB)
STAGES = [
    (
        "nvfp4",
        NVFP4_CONFIGS[1],
        [NVFP4_CONFIGS[1]._replace(sx=a, s16=b, s8=c) for a, b, c in ((7, 5, 4), (6, 6, 4), (8, 4, 4), (7, 4, 3))],
    ),
    ("nvfp4", NVFP4_CONFIGS[0], [NVFP4_CONFIGS[0]._replace(sx=4, s16=2, s8=2)]),
]

FAMILY_NAMES = {"tail_boxes": TAIL_BOXES, "converters": CONVERTERS, "swap": SWAP, "stages": STAGES}


def run_case(label: str, k: int, n: int, rows: int, rounds: int, family: str) -> list[dict]:
    """One projection's table for ``family`` (:data:`FAMILY_NAMES`): the tail boxes decompose as loads only, the
    swapped kernel as no conversion, the converter variants as no MMA."""
    families = FAMILY_NAMES[family]
    decomposition = {"tail_boxes": (3, "loads only"), "swap": (1, "no conversion"), "stages": None}.get(
        family, (2, "no MMA")
    )
    p = probe_inputs(k, n, rows)
    nv_table = ProbeTable(label, nvfp4_reference(p), p.flops)
    fp8_table = ProbeTable(label, fp8_codes_reference(p), p.flops)
    nv_table.record("torch._grouped_mm bf16", lambda: torch._grouped_mm(p.x, p.w, p.offs))
    fp8_table.rows.append(nv_table.rows[0])
    xq = fake_quant_act(p.x, p.offs, p.x_amax, "nvfp4")
    x_codes = (p.x.float() / (p.x_amax / 448)).clamp(-448, 448).to(torch.float8_e4m3fn)

    wq_ref = fake_quant_experts(p.w_nk, p.w_amax, "nvfp4", -1)

    def gemm(fmt, config, skip=0, codes=None):
        if fmt == "nvfp4":
            return lambda: qat_nvfp4_gluon_gemm(xq, p.w, p.offs, p.w_amax, config=config, skip=skip, codes=codes)
        return lambda: qat_fp8_gluon_gemm(x_codes, p.w, p.offs, p.w_amax, p.x_amax, config=config, skip=skip)

    timed = []
    for fmt, base, variants in families:
        want = gemm(fmt, base)()
        torch.cuda.synchronize()
        timed.append((fmt, base))
        for variant in variants:
            try:
                same = torch.equal(gemm(fmt, variant)(), want)
                if fmt == "nvfp4":
                    codes = torch.zeros_like(p.w_nk)
                    gemm(fmt, variant, codes=codes)()
                    values = torch.equal(codes, wq_ref)
                    print(f"{label:8s} {variant.name}: weight values equal fake_quant_experts': {values}", flush=True)
                    same = same and values
            except Exception as exc:  # a variant that cannot launch (resources) is reported, the probe goes on
                print(f"{label:8s} {variant.name}: ERROR {str(exc)[:300]}", flush=True)
                continue
            print(f"{label:8s} {variant.name}: output bit-equal to the base's: {same}", flush=True)
            if same or family == "swap":  # the operands swap roles: checked against float64 in any case
                timed.append((fmt, variant))
    for r in range(rounds):
        for fmt, config in timed:
            table = nv_table if fmt == "nvfp4" else fp8_table
            table.record(f"{config.name} [kernel only] round {r}", gemm(fmt, config), checked=r == 0)
    if decomposition is None:
        decomposed = []
    elif family == "swap":
        decomposed = families
    else:
        decomposed = families[:1] + families[2:]
    for fmt, base, variants in decomposed:
        for config in (base, variants[0]):
            table = nv_table if fmt == "nvfp4" else fp8_table
            skip, what = decomposition
            table.record(f"{config.name} [{what}]", gemm(fmt, config, skip=skip), checked=False)
    tokens = rows // 8
    x_tokens, token_offs = p.x[:tokens].contiguous(), torch.tensor([tokens], dtype=torch.int32, device="cuda")
    nv_table.record("fake_quant_act NVFP4, routed rows", lambda: fake_quant_act(p.x, p.offs, p.x_amax, "nvfp4"), False)
    nv_table.record(
        f"fake_quant_act NVFP4, {tokens} tokens (before the gather)",
        lambda: fake_quant_act(x_tokens, token_offs, p.x_amax, "nvfp4"),
        checked=False,
    )
    results = nv_table.print() + fp8_table.print()[1:]
    summary = {}
    for row in results:
        if "round" in row.get("what", "") and "ms" in row:
            summary.setdefault(row["what"].split(" round")[0], []).append(row["ms"])
    bf16 = results[0]["ms"]
    act = {r["what"]: r["ms"] for r in results if r.get("what", "").startswith("fake_quant_act") and "ms" in r}
    act_rows, act_tokens = act.get("fake_quant_act NVFP4, routed rows"), min(act.values(), default=None)
    print(f"\n{label}: medians of {rounds} rounds (bf16 {bf16:.4f} ms)")
    for what, times in summary.items():
        ms = statistics.median(times)
        line = f"{label:8s} {what:100s} {ms:.4f} ms  {bf16 / ms:.3f}x bf16  ({min(times):.4f}-{max(times):.4f})"
        if "NVFP4" in what and act_rows and act_tokens:  # sums of medians, not timed together
            line += f"  + act pass: rows {bf16 / (ms + act_rows):.3f}x, tokens {bf16 / (ms + act_tokens):.3f}x"
        print(line)
        results.append(dict(case=label, what=f"{what} median", ms=ms, bf16_ratio=bf16 / ms, times=times))
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--rows", type=int, default=34816)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", default="gate_up,down")
    parser.add_argument("--family", choices=sorted(FAMILY_NAMES), default="tail_boxes")
    args = parser.parse_args()
    shapes = {"gate_up": (2048, 1536), "down": (768, 2048)}
    results = [
        row
        for case in args.cases.split(",")
        for row in run_case(case, *shapes[case], args.rows, args.rounds, args.family)
    ]
    save_probe(args.out, results)


if __name__ == "__main__":
    main()
