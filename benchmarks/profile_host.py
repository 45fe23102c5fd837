"""Where a QAT training step's host time goes: one Qwen3-30B-A3B-shaped layer, as ``bench_qat_training.py`` builds
it, per variant (``CONFIG:POLICY[:reuse[:dequantized]]``, or ``bf16``).

For each variant: the step's wall time (``do_bench`` median), its host time (the CPU time to issue ten steps without
waiting for the GPU, per step: where it exceeds the kernels' time the GPU waits on the CPU), the kernels' summed time,
then ``cProfile``'s functions by own time and torch.profiler's operators by CPU time over ten steps, saved under
``--out`` (``host_<variant>.txt``).

    python benchmarks/profile_host.py --variants bf16,FP8:auto,FP8:auto:reuse --out $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import time

import torch
from bench_qat_training import compiled_variant, kernel_ms, layer_and_calibration, step, step_inputs, time_ms

import moeq
from moeq.lowering.inductor import fusion

STEPS = 10


def host_ms(fn, device: str) -> float:
    """CPU time per call of issuing ``STEPS`` calls back to back (the GPU idle at the start, not waited on)."""
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(STEPS):
        fn()
    issued = time.perf_counter() - started
    if device == "cuda":
        torch.cuda.synchronize()
    return issued * 1e3 / STEPS


def profiles(fn) -> str:
    """cProfile's top functions by own time, then torch.profiler's operators by CPU time, over ``STEPS`` calls."""
    from torch.profiler import ProfilerActivity, profile

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(STEPS):
        fn()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    pstats.Stats(profiler, stream=text).sort_stats("cumtime").print_stats(40)
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * torch.cuda.is_available()
    with profile(activities=activities) as prof:
        for _ in range(STEPS):
            fn()
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=80)
    return text.getvalue() + "\n\ntorch.profiler, by CPU time total:\n" + table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--tokens", type=int, default=4352)
    parser.add_argument("--variants", default="bf16,FP8:auto,FP8:auto:reuse")
    parser.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run of the plumbing)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base, calib = layer_and_calibration(device, args.small)
    x, grad_out = step_inputs(args.tokens, base.mlp.gate.weight.shape[1], device)
    print(f"{'variant':<32} {'step ms':>8} {'host ms':>8} {'kernels ms':>10}", flush=True)
    for variant in args.variants.split(","):
        name, policy, *reuse = variant.split(":") if variant != "bf16" else (None, "auto")
        torch._dynamo.reset()
        with fusion(policy), contextlib.ExitStack() as block:
            layer = compiled_variant(base, name, calib)
            if reuse:
                block.enter_context(moeq.reuse_weight_codes(layer, dequantized="dequantized" in reuse))
            run = lambda: step(layer, x, grad_out)  # noqa: E731, B023
            for _ in range(3):
                run()
            ms = time_ms(run, device, 60)
            issued = host_ms(run, device)
            gpu_ms, _ = kernel_ms(run, device)
            print(f"{variant:<32} {ms:>8.3f} {issued:>8.3f} {gpu_ms:>10.3f}", flush=True)
            with open(os.path.join(args.out, f"host_{variant.replace(':', '_')}.txt"), "w") as fh:
                fh.write(f"{variant}: step {ms:.3f} ms, host {issued:.3f} ms, kernels {gpu_ms:.3f} ms\n\n")
                fh.write(profiles(run))


if __name__ == "__main__":
    main()
