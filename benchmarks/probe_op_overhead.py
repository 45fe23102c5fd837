"""Host time of one call of each moeq op, on shapes small enough that the GPU never holds the CPU back.

Each row is microseconds of CPU time per call (``N`` calls issued back to back, then one synchronize), beside the
floors it is made of: one aten op, an empty ``torch.library.custom_op``, and the runtime launcher the op calls.
Then ``cProfile``'s functions by own time for the op named by ``--profile``.

    python benchmarks/probe_op_overhead.py --out $OUT
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time

import torch

import moeq  # noqa: F401  (registers the ops)
from moeq.runtime.kernels.fake_quant_act import fake_quant_act as launch_fake_quant_act
from moeq.runtime.kernels.grouped_qmm import grouped_qmm as launch_grouped_qmm

N = 300


@torch.library.custom_op("moeq_probe::empty_like", mutates_args=())
def empty_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@empty_like.register_fake
def _(x):
    return torch.empty_like(x)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_us(fn) -> float:
    for _ in range(5):
        fn()
    synchronize()
    started = time.perf_counter()
    for _ in range(N):
        fn()
    issued = time.perf_counter() - started
    synchronize()
    return issued * 1e6 / N


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--profile", default="grouped_qmm qat fp8")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the ops' reference paths (a smoke run)
    experts, k, n, rows = 8, 256, 256, 64
    x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(experts, k, n, device=dev, dtype=torch.bfloat16) * 0.1
    offs = (torch.arange(1, experts + 1, device=dev, dtype=torch.int32) * (rows // experts)).contiguous()
    amax = w.abs().amax(dim=(1, 2)).float()
    x_amax = torch.tensor([4.0], device=dev)
    stored = torch.ops.moeq.quantize_weight(w, amax, "fp8", 0, 1)
    ops = torch.ops.moeq
    cases = {
        "aten add": lambda: x + 1,
        "custom_op empty_like": lambda: torch.ops.moeq_probe.empty_like(x),
        "fake_quant_act fp8 (op)": lambda: ops.fake_quant_act(x, offs, x_amax, "fp8", 0, -1),
        "fake_quant_act fp8 (launcher)": lambda: launch_fake_quant_act(x, offs, x_amax, "fp8"),
        "quantize_weight fp8 (op)": lambda: ops.quantize_weight(w, amax, "fp8", 0, 1),
        "quantize_weight nvfp4 (op)": lambda: ops.quantize_weight(w, amax, "nvfp4", 0, 1),
        "grouped_qmm qat fp8 (op)": lambda: ops.grouped_qmm(x, w, offs, amax, None, x_amax, "qat", "fp8", "fp8"),
        "grouped_qmm qat fp8 (launcher)": lambda: launch_grouped_qmm(x, w, offs, amax, None, x_amax, "fake_fp8", "fp8"),
        "grouped_qmm codes fp8 (op)": lambda: ops.grouped_qmm(
            x, stored[0], offs, stored[1], None, x_amax, "deploy", "fp8", "fp8"
        ),  # fmt: skip
    }
    lines = [f"{'call':<34} {'host us':>8}  (no grad)   {'host us':>8}  (grad enabled)"]
    for name, fn in cases.items():
        if dev == "cpu" and "launcher" in name:
            continue
        with torch.no_grad():
            quiet = host_us(fn)
        lines.append(f"{name:<34} {quiet:>8.1f}              {host_us(fn):>8.1f}")
        print(lines[-1], flush=True)
    profiled = next(fn for name, fn in cases.items() if name.startswith(args.profile))
    profiler = cProfile.Profile()
    with torch.no_grad():
        profiler.enable()
        for _ in range(N):
            profiled()
        profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(35)
    with open(os.path.join(args.out, "op_overhead.txt"), "w") as fh:
        fh.write("\n".join(lines) + f"\n\ncProfile of {args.profile}, {N} calls:\n" + text.getvalue())


if __name__ == "__main__":
    main()
