"""Sweep moeq::grouped_qmm tile configs on one case, to choose autotuning candidates from measurements.

Times every (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, swap, FP8_DOT, maxnreg, TAIL_M) of a grid with ``do_bench`` (median) next to the
``torch._grouped_mm`` bf16 anchor of the same case, checks each config against the autotuned kernel's
output, prints the best configs per (case, mode) and writes all timings as JSON under ``--out``.

    python benchmarks/sweep_grouped_qmm.py --rows 64 --modes "deploy W8A8 FP8" "deploy W4A16 NVFP4"
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import torch
import triton
from bench_grouped_qmm import CASES, MODES, bench, routing, stored
from report import save_report

from moeq.formats import expert_amax
from moeq.runtime.kernels.grouped_qmm import grouped_qmm


def sweep_case(label, num_experts, k, n, rows, modes, grid, deadline):
    offs = routing(rows, num_experts)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w_nk = torch.randn(num_experts, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    amax = expert_amax(w_nk)
    x_amax = x.abs().amax().float().reshape(1)
    active = int((torch.diff(offs, prepend=offs.new_zeros(1)) > 0).sum())
    bf16_ms = bench(lambda: torch._grouped_mm(x, w_nk.transpose(1, 2), offs))
    deploy = {fmt: stored(w_nk, amax, fmt)[0] for fmt in ("fp8", "nvfp4")}
    results = []
    for name, w_mode, x_fmt in (m for m in MODES if m[0] in modes):
        fmt = w_mode.removeprefix("fake_")
        args = (w_nk.transpose(1, 2), amax, None) if w_mode.startswith("fake_") else deploy[fmt]
        nbytes = {"fp8": 1.0, "nvfp4": 0.5 + 1 / 16}[fmt] if not w_mode.startswith("fake_") else 2.0
        weight_bytes = nbytes * k * n * active

        def run(config=None, args=args, w_mode=w_mode, x_fmt=x_fmt):
            xa = x_amax if x_fmt else None
            return grouped_qmm(x, args[0], offs, args[1], args[2], xa, w_mode, x_fmt, config=config)

        want = run().float()
        tuned_ms = bench(run)
        rows_out = []
        for spec in grid:
            bm, bn, bk, warps, stages, swap, fp8_dot, maxnreg, tail_m = spec
            if time.time() > deadline:
                print("  deadline reached; sweep cut short", flush=True)
                break
            meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SWAP_AB": bool(swap), "FP8_DOT": bool(fp8_dot)}
            if tail_m:
                meta["TAIL_M"] = tail_m
            config = triton.Config(meta, num_warps=warps, num_stages=stages, maxnreg=maxnreg or None)
            try:
                got = run(config).float()
                err = ((got - want).norm() / want.norm().clamp(min=1e-30)).item()
                ms = bench(lambda config=config: run(config))
            except Exception as exc:  # out of shared memory / registers: record and go on
                rows_out.append(dict(config=list(spec), error=f"{type(exc).__name__}"))
                continue
            rows_out.append(dict(config=list(spec), ms=ms, err=err, TBps=weight_bytes / ms / 1e9))
        good = sorted((r for r in rows_out if "ms" in r and r["err"] < 1e-2), key=lambda r: r["ms"])
        print(f"{label} {name}: bf16 {bf16_ms:.4f} ms, autotuned {tuned_ms:.4f} ms ({bf16_ms / tuned_ms:.2f}x bf16)")
        for r in good[:10]:
            print(
                f"    {r['config']}: {r['ms']:.4f} ms  {r['TBps']:.2f} TB/s  {bf16_ms / r['ms']:.2f}x bf16", flush=True
            )
        results.append(dict(case=label, mode=name, bf16_ms=bf16_ms, tuned_ms=tuned_ms, active=active, sweep=rows_out))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--only", default="qwen3", help="cases whose label starts with this")
    parser.add_argument("--rows", type=int, nargs="*", default=[64])
    parser.add_argument("--modes", nargs="*", default=["deploy W8A8 FP8", "deploy W4A16 NVFP4"])
    parser.add_argument("--block-m", type=int, nargs="*", default=[16])
    parser.add_argument("--block-n", type=int, nargs="*", default=[32, 64, 128, 256])
    parser.add_argument("--block-k", type=int, nargs="*", default=[128, 256, 512])
    parser.add_argument("--warps", type=int, nargs="*", default=[4, 8])
    parser.add_argument("--stages", type=int, nargs="*", default=[3, 5])
    parser.add_argument("--swap", type=int, nargs="*", default=[0, 1], help="SWAP_AB values (0, 1)")
    parser.add_argument("--fp8-dot", type=int, nargs="*", default=[1], help="FP8_DOT values (0, 1; W8A8/QAT FP8)")
    parser.add_argument(
        "--maxnreg", type=int, nargs="*", default=[0], help="register caps per thread (0: ptxas's choice)"
    )
    parser.add_argument(
        "--tail-m", type=int, nargs="*", default=[0], help="row tile of an expert's last, short m-tile (0: BLOCK_M)"
    )
    parser.add_argument("--seconds", type=float, default=300.0, help="stop sweeping after this long")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    deadline = time.time() + args.seconds
    grid = list(
        itertools.product(
            args.block_m,
            args.block_n,
            args.block_k,
            args.warps,
            args.stages,
            args.swap,
            args.fp8_dot,
            args.maxnreg,
            args.tail_m,
        )
    )
    torch.manual_seed(0)
    results = []
    for case in CASES:
        if case[0].startswith(args.only) and case[4] in args.rows:
            results += sweep_case(*case, args.modes, grid, deadline)
    details = dict(device=torch.cuda.get_device_name(), triton=triton.__version__, results=results)
    save_report(args.out, "sweep_grouped_qmm", details)


if __name__ == "__main__":
    main()
