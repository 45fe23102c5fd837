"""Probe: host time per call of moeq's CUDA ops (eager dispatch: what Inductor's generated code pays for each
call of an opaque custom op) at 512 tokens (4096 routed rows) of a Qwen3 layer, with launch plans off
(``kernel[grid]`` every call) and on (:func:`moeq.runtime.kernels.launch.launch_kernel`). Beside them, the floors an
op call is made of: one aten op, an empty ``torch.library.custom_op``, ``torch._grouped_mm``, and the runtime
launchers the ops call (the difference is the custom op's dispatch, autograd and triton_op layers). Then cProfile of
the two slowest. ``--small``: tiny shapes, where no kernel holds the host back (and a CPU smoke run of the
plumbing, the ops' reference paths). On the GPU: ``python benchmarks/probe_launch_overhead.py --out $OUT``."""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time

import torch

import moeq  # noqa: F401  registers the ops
from moeq.formats import expert_amax
from moeq.runtime.kernels import launch
from moeq.runtime.kernels.fake_quant_act import fake_quant_act as launch_fake_quant_act
from moeq.runtime.kernels.grouped_qmm import grouped_qmm as launch_grouped_qmm

CALLS = 50
PROFILED = ("grouped_qmm qat fp8 (w [E,K,N] view)", "quantize_weight fp8")


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
    """CPU microseconds per call of ``CALLS`` calls issued back to back (not waiting for the GPU)."""
    for _ in range(5):
        fn()
    synchronize()
    started = time.perf_counter()
    for _ in range(CALLS):
        fn()
    host = (time.perf_counter() - started) / CALLS * 1e6
    synchronize()
    return host


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--small", action="store_true", help="8 experts, K = N = 256, 64 rows")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    E, H, INTER, rows = (8, 256, 128, 64) if args.small else (128, 2048, 768, 4096)
    w = (torch.randn(E, 2 * INTER, H, device=dev) * 0.02).to(torch.bfloat16)
    amax = expert_amax(w)
    x = torch.randn(rows, H, device=dev, dtype=torch.bfloat16)
    offs = (torch.arange(1, E + 1, device=dev) * (rows // E)).to(torch.int32)
    x_amax = x.abs().amax().float().reshape(1)
    data, scale, block = torch.ops.moeq.quantize_weight(w, amax, "fp8", 0, 2)
    dy = torch.randn(rows, 2 * INTER, device=dev, dtype=torch.bfloat16)
    ops = torch.ops.moeq
    calls = {
        "grouped_qmm qat fp8 (w [E,K,N] view)": lambda: ops.grouped_qmm(
            x, w.transpose(1, 2), offs, amax, None, x_amax, "qat", "fp8", "fp8", None
        ),
        "  its launcher (runtime grouped_qmm)": lambda: launch_grouped_qmm(
            x, w.transpose(1, 2), offs, amax, None, x_amax, "fake_fp8", "fp8"
        ),
        "grouped_qmm deploy fp8 codes": lambda: ops.grouped_qmm(
            x, data.transpose(1, 2), offs, scale, None, x_amax, "deploy", "fp8", "fp8", None
        ),
        "quantize_weight fp8": lambda: ops.quantize_weight(w, amax, "fp8", 0, 2),
        "quantize_weight nvfp4": lambda: ops.quantize_weight(w, amax, "nvfp4", 0, 2),
        "fake_quant_act fp8": lambda: ops.fake_quant_act(x, offs, x_amax, "fp8", 0, 1),
        "  its launcher (runtime fake_quant_act)": lambda: launch_fake_quant_act(x, offs, x_amax, "fp8"),
        "fake_quant_weight fp8": lambda: ops.fake_quant_weight(w, amax, "fp8", 0, 2),
        "grouped_wgrad_ste": lambda: ops.grouped_wgrad_ste(dy.t(), x, offs, w, amax.view(-1, 1, 1), [0, 1, 2]),
        "torch._grouped_mm (anchor)": lambda: torch._grouped_mm(x, w.transpose(1, 2), offs),
        "empty custom_op (anchor)": lambda: torch.ops.moeq_probe.empty_like(x),
        "aten add (anchor)": lambda: x + 1,
    }
    lines = [f"{'op':40s} {'plans off':>12s} {'plans on':>12s}  (host us/call, {dev}, {rows} rows)"]
    print(lines[0], flush=True)
    for name, fn in calls.items():
        if dev == "cpu" and "launcher" in name:
            continue  # the launchers run on CUDA tensors (or under the interpreter)
        launch.FAST_LAUNCH = False
        off = host_us(fn)
        launch.FAST_LAUNCH = True
        lines.append(f"{name:40s} {off:12.1f} {host_us(fn):12.1f}")
        print(lines[-1], flush=True)
    for name in PROFILED:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(CALLS):
            calls[name]()
        profiler.disable()
        synchronize()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
        lines.append(f"\n=== cProfile {name}, {CALLS} calls\n{text.getvalue()}")
    with open(os.path.join(args.out, "probe_launch_overhead.txt"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
