"""Sweep tile configs of fake_quant_experts and segment_amax, to choose autotuning candidates from measurements.

Each config of the autotuner's list plus a few extra candidates is launched directly (no autotuner), checked
bit for bit against the autotuned kernel's output, and timed with ``do_bench`` (median, long runs: the
autotuner's own short timings pick different configs from run to run on these 0.05-1 ms kernels). Prints the
best configs per case with TB/s and the ratio to the same run's copy bandwidth; JSON under ``--out``.

    python benchmarks/sweep_quant_kernels.py
"""

from __future__ import annotations

import argparse
import functools
import os

import torch
import triton
from bench_quant_kernels import WEIGHTS, bench, copy_bandwidth
from report import save_report

from moeq.formats import expert_amax
from moeq.runtime import kernels
from moeq.runtime.kernels.fake_quant_experts import _fake_quant_experts_kernel
from moeq.runtime.kernels.launch import observer_configs, tile_configs
from moeq.runtime.kernels.segment_amax import _segment_amax_kernel

EXTRA_TILES = [(8, 512, 4), (16, 512, 4), (8, 1024, 8), (4, 256, 2)]
EXTRA_OBSERVER = [(8, 1024, 4), (16, 1024, 4), (8, 2048, 8), (32, 2048, 8), (64, 1024, 8), (16, 512, 4), (32, 512, 4)]


def _candidates(configs: list[triton.Config], names: tuple[str, str], extra: list[tuple[int, int, int]]):
    listed = [(c.kwargs[names[0]], c.kwargs[names[1]], c.num_warps) for c in configs]
    return [(c, c in listed) for c in listed + [e for e in extra if e not in listed]]


def print_best(label: str, tuned_ms: float, nbytes: int, copy_tbs: float, rows: list[dict], top: int) -> None:
    """The autotuned time and the ``top`` fastest configs of a sweep (``rows`` sorted by time)."""
    print(f"{label}: autotuned {tuned_ms:.4f} ms ({nbytes / tuned_ms / 1e9 / copy_tbs:.2f} of copy)")
    for r in rows[:top]:
        print(f"    {r['config']}{'' if r['listed'] else ' (extra)'}: {r['ms']:.4f} ms {r['TBps']:.2f} TB/s "
              f"{r['TBps'] / copy_tbs:.2f} of copy, exact={r['exact']}", flush=True)  # fmt: skip


def timed(fn) -> float:
    """:func:`bench` with long runs (300 ms per config)."""
    return bench(fn, warmup=50, rep=300)


def launch_fake_quant(w, amax, out, fmt, bm, bk, warps) -> None:
    E, M, K = w.shape
    _fake_quant_experts_kernel.fn[(triton.cdiv(K, bk), triton.cdiv(M, bm), E)](
        w, out, amax, M, K, *w.stride(), *out.stride(),
        IS_NVFP4=fmt == "nvfp4", INTERPRET=False, BLOCK_M=bm, BLOCK_K=bk, num_warps=warps,
    )  # fmt: skip


def sweep_fake_quant(copy_tbs: float) -> list[dict]:
    results = []
    for name, shape in WEIGHTS.items():
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
        amax = expert_amax(w)
        nbytes = 2 * w.numel() * w.element_size()
        for fmt in ("fp8", "nvfp4"):
            want = kernels.fake_quant_experts(w, amax, fmt, -1)
            tuned_ms = timed(functools.partial(kernels.fake_quant_experts, w, amax, fmt, -1))
            rows = []
            for (bm, bk, warps), listed in _candidates(tile_configs(), ("BLOCK_M", "BLOCK_K"), EXTRA_TILES):
                out = torch.empty_like(w)
                launch = functools.partial(launch_fake_quant, w, amax, out, fmt, bm, bk, warps)
                launch()
                exact = torch.equal(out.view(torch.int16), want.view(torch.int16))
                ms = timed(launch)
                tbs = nbytes / ms / 1e9
                rows.append(dict(config=[bm, bk, warps], listed=listed, exact=exact, ms=ms, TBps=tbs))
            rows.sort(key=lambda r: r["ms"])
            print_best(f"{name} {fmt}", tuned_ms, nbytes, copy_tbs, rows, top=5)
            results.append(dict(kernel="fake_quant_experts", case=name, fmt=fmt, tuned_ms=tuned_ms, sweep=rows))
    return results


def sweep_segment_amax(copy_tbs: float) -> list[dict]:
    rows_n, k, e = 34816, 2048, 128
    x = torch.randn(rows_n, k, device="cuda", dtype=torch.bfloat16)
    offs = torch.full((e,), rows_n // e, dtype=torch.int32, device="cuda").cumsum(0).to(torch.int32)
    want = kernels.segment_amax(x, offs, e)
    running = (torch.zeros(e, device="cuda"), torch.zeros(e, dtype=torch.int64, device="cuda"))
    tuned_ms = timed(functools.partial(kernels.segment_amax_, x, offs, *running))
    nbytes = x.numel() * x.element_size()
    rows = []
    for (bs, bk, warps), listed in _candidates(observer_configs(), ("BLOCK_S", "BLOCK_K"), EXTRA_OBSERVER):
        amax, counts = torch.zeros(e, device="cuda"), torch.zeros(e, dtype=torch.int64, device="cuda")

        def launch(bs=bs, bk=bk, warps=warps, amax=amax, counts=counts):
            grid = (triton.cdiv(k, bk) * triton.cdiv(rows_n, bs),)
            _segment_amax_kernel.fn[grid](
                x, offs, amax, counts, rows_n, k, x.stride(0),
                NUM_EXPERTS=e, E_POW2=e, X_BITS=16, BLOCK_S=bs, BLOCK_K=bk, num_warps=warps,
            )  # fmt: skip

        launch()
        exact = torch.equal(amax, want[0]) and torch.equal(counts, want[1])
        ms = timed(launch)
        tbs = nbytes / ms / 1e9
        rows.append(dict(config=[bs, bk, warps], listed=listed, exact=exact, ms=ms, TBps=tbs))
    rows.sort(key=lambda r: r["ms"])
    print_best(f"segment_amax [{rows_n}, {k}]", tuned_ms, nbytes, copy_tbs, rows, top=6)
    return [dict(kernel="segment_amax", case=f"[{rows_n}, {k}]", tuned_ms=tuned_ms, sweep=rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = parser.parse_args()
    torch.manual_seed(0)
    copy_tbs = copy_bandwidth()
    print(f"HBM copy {copy_tbs:.2f} TB/s", flush=True)
    results = sweep_segment_amax(copy_tbs) + sweep_fake_quant(copy_tbs)
    details = dict(device=torch.cuda.get_device_name(), triton=triton.__version__, copy_TBps=copy_tbs, results=results)
    save_report(args.out, "sweep_quant_kernels", details)


if __name__ == "__main__":
    main()
