"""CUDA graphs with ``backend="moeq"``: Inductor's cudagraph trees (``options={"triton.cudagraphs": True}``).

moeq's ops launch from Python (a custom op's dispatch and triton's launcher: 90-250 us of host time per call,
``probe_launch_overhead.py``), so small batches are host-bound; replaying a CUDA graph removes that. One
Qwen3-30B-A3B-shaped layer (bf16, random weights), calibrated at 2048 tokens: the deploy W8A8 FP8 forward
(``moeq.freeze``) at ``--decode-tokens`` and the QAT FP8 training step (forward + backward, gradients set to
None first) at ``--train-tokens``, each with and without CUDA graphs, next to the bf16 layer compiled by Inductor
the same two ways. Prints median ms (``triton.testing.do_bench``) and how far the CUDA-graph run's outputs /
expert gradients are from the eager-launched run's (relative norm). One more row replays the deploy forward with
moeq's state buffers as ordinary graph inputs (how they were before session 28), which cudagraph trees copy at
every replay; its last column is its output's distance from the static-input run's.

    python benchmarks/bench_cudagraphs.py --out $OUT
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
from bench_qat_training import compiled_variant, expert_grads, layer_and_calibration, marking_steps, step
from report import print_and_save
from triton.testing import do_bench

from moeq.passes import insert_qdq


def median_ms(fn: Callable[[], object]) -> float:
    once = marking_steps(fn)
    if not torch.cuda.is_available():  # --small on the CPU: one timed call (a smoke run of the plumbing)
        started = time.perf_counter()
        once()
        return (time.perf_counter() - started) * 1e3
    return do_bench(once, warmup=5, rep=40, return_mode="median")


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / a.float().norm()).item()


def forward_case(base, calib, cfg, cudagraphs, x) -> tuple[float, torch.Tensor]:
    torch._dynamo.reset()
    compiled = compiled_variant(base, cfg, calib, {"triton.cudagraphs": cudagraphs}, deploy=cfg is not None)
    with torch.no_grad():
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            out = compiled(x)
        out = (out[0] if isinstance(out, tuple) else out).clone()
        return median_ms(lambda: compiled(x)), out


def training_case(base, calib, cfg, cudagraphs, x, grad_out) -> tuple[float, list[torch.Tensor]]:
    torch._dynamo.reset()
    compiled = compiled_variant(base, cfg, calib, {"triton.cudagraphs": cudagraphs})
    for _ in range(3):
        torch.compiler.cudagraph_mark_step_begin()
        step(compiled, x, grad_out)
    grads = [g.clone() for g in expert_grads(compiled)]
    return median_ms(lambda: step(compiled, x, grad_out)), grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--train-tokens", type=int, default=512)
    parser.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run of the plumbing)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base, calib = layer_and_calibration(device, args.small)
    hidden = base.mlp.gate.weight.shape[1]
    x = torch.randn(1, args.decode_tokens, hidden, device=device, dtype=torch.bfloat16)
    xt = torch.randn(1, args.train_tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn_like(xt)
    rows, results = [], []
    cases = [(f"forward {args.decode_tokens} tokens", "deploy W8A8 FP8", "FP8", False)]
    cases.append((f"training step {args.train_tokens} tokens", "QAT FP8", "FP8", True))
    for case, label, cfg, training in cases:
        for name in (None, cfg):
            timings, values = {}, {}
            for cudagraphs in (False, True):
                if training:
                    timings[cudagraphs], values[cudagraphs] = training_case(base, calib, name, cudagraphs, xt, grad_out)
                else:
                    timings[cudagraphs], values[cudagraphs] = forward_case(base, calib, name, cudagraphs, x)
                    if name and cudagraphs:
                        static_out = values[cudagraphs]
                print(f"  {case}, {label if name else 'bf16'}, cudagraphs={cudagraphs}: done", flush=True)
            pairs = zip(values[False], values[True]) if training else [(values[False], values[True])]
            diff = max(rel_diff(a, b) for a, b in pairs)
            variant = label if name else "bf16 (inductor)"
            rows.append([case, variant, f"{timings[False]:.3f}", f"{timings[True]:.3f}",
                         f"{timings[False] / timings[True]:.2f}x", f"{diff:.1e}"])  # fmt: skip
            results.append(dict(case=case, variant=variant, ms=timings[False], cudagraph_ms=timings[True], diff=diff))
    # the same deploy forward with moeq's state buffers as ordinary graph inputs (before session 28): cudagraph trees
    # then copy them (the frozen weights' codes and scales) into the graph's memory at every replay
    insert_qdq.STATIC_STATE_INPUTS = False
    try:
        copied, copied_out = forward_case(base, calib, "FP8", True, x)
    finally:
        insert_qdq.STATIC_STATE_INPUTS = True
    static = next(r for r in results if r["variant"] == "deploy W8A8 FP8")
    diff = rel_diff(copied_out, static_out)
    variant = "deploy W8A8 FP8, state copied per replay"
    rows.append(
        [cases[0][0], variant, "", f"{copied:.3f}", f"{copied / static['cudagraph_ms']:.2f}x slower", f"{diff:.1e}"]
    )
    results.append(dict(case=cases[0][0], variant=variant, cudagraph_ms=copied, diff_vs_static=diff))
    header = ["case", "variant", "ms", "ms with CUDA graphs", "speedup", "CUDA-graph vs eager rel diff"]
    print_and_save(args.out, "bench_cudagraphs", header, rows, results=results)


if __name__ == "__main__":
    main()
