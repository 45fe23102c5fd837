"""Where moeq's QAT NVFP4 layer spends its time with ``gather_quant`` on and off, beside the bf16 layer. Session 40
wrote it when its first A/B timed the two the same (H100: 1.820 vs 1.809 ms at 4096 tokens): the kernel lists were
identical, because Dynamo had served the second instance the first's graph. Each layer is therefore built after
``torch._dynamo.reset()``.

Builds the layers as ``bench_e2e_modelopt.py --ab-gather`` does, then for each: the wall time per forward
(``do_bench``), the GPU kernels' summed time per forward (torch.profiler, ``--calls`` forwards), the host's time per
forward, and the kernels with the most time. If the kernels' sum is well below the wall time, the layer is bound by
its host (launches, syncs), and a GPU saving does not show.

    python benchmarks/profile_e2e_gather.py --tokens 4096 --out $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
from collections import defaultdict

import torch
from bench_e2e_modelopt import bf16_layer, moeq_layer, qwen3_30b_a3b_layer
from report import print_and_save
from triton.testing import do_bench


def kernel_times(layer, x: torch.Tensor, calls: int) -> tuple[dict[str, float], float, float]:
    """(ms per forward of each CUDA kernel name, summed kernel ms per forward, host ms per forward)."""
    with torch.no_grad():
        layer(x)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:  # fmt: skip
            for _ in range(calls):
                layer(x)
            torch.cuda.synchronize()
    by_name: dict[str, float] = defaultdict(float)
    host_us = 0.0
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            by_name[event.key] += event.self_device_time_total / 1e3 / calls
    for event in prof.events():
        if event.name.startswith("ProfilerStep") or event.device_type == torch.autograd.DeviceType.CUDA:
            continue
        if event.cpu_parent is None:  # top-level host ranges: the forward's own Python/C++ time
            host_us += event.cpu_time_total
    return dict(by_name), sum(by_name.values()), host_us / 1e3 / calls


def time_layer(name, layer, batches, args, rows, results) -> None:
    """Wall, kernel and host time of ``layer`` on each batch, appended to ``rows`` and ``results``."""
    for x in batches:
        tokens = x.shape[1]
        with torch.no_grad():
            layer(x)
            wall = do_bench(lambda layer=layer, x=x: layer(x), warmup=3, rep=30, return_mode="median")
        kernels, kernel_ms, host_ms = kernel_times(layer, x, args.calls)
        top = sorted(kernels.items(), key=lambda kv: -kv[1])[: args.top]
        results.append(dict(tokens=tokens, layer=name, wall_ms=wall, kernel_ms=kernel_ms, host_ms=host_ms,
                            kernels=kernels))  # fmt: skip
        rows.append([str(tokens), name, f"{wall:.3f}", f"{kernel_ms:.3f}", f"{host_ms:.3f}", str(len(kernels))])
        print(f"{tokens} tokens, {name}: wall {wall:.3f} ms, kernels {kernel_ms:.3f} ms, host {host_ms:.3f} ms")
        for key, ms in top:
            print(f"    {ms:8.4f} ms  {key[:150]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--tokens", default="4096")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    base = qwen3_30b_a3b_layer("cuda")
    hidden = base.mlp.gate.weight.shape[1]
    calib = torch.randn(4, 512, hidden, device="cuda", dtype=torch.bfloat16)
    batches = [torch.randn(1, int(t), hidden, device="cuda", dtype=torch.bfloat16) for t in args.tokens.split(",")]
    from moeq.lowering import gather_quant

    builders = {  # (switch held while building and timing, build); each after torch._dynamo.reset()
        "moeq (gather_quant on)": (contextlib.nullcontext, lambda: moeq_layer(copy.deepcopy(base), calib)),
        "moeq (gather_quant off)": (
            lambda: gather_quant.enabled(False),
            lambda: moeq_layer(copy.deepcopy(base), calib),
        ),
        "bf16 (Inductor)": (contextlib.nullcontext, lambda: bf16_layer(copy.deepcopy(base))),
    }
    rows, results = [], []
    for name, (switch, build) in builders.items():
        torch._dynamo.reset()
        with switch():
            layer = build()
            time_layer(name, layer, batches, args, rows, results)
    print_and_save(args.out, "profile_e2e_gather", ["tokens", "layer", "wall ms", "kernels ms", "host ms", "kernels"],
                   rows, results=results)  # fmt: skip


if __name__ == "__main__":
    main()
