"""Probe: host time of a compiled QAT FP8 training step of one Qwen3-30B-A3B-shaped layer at 512 tokens (session 18:
6.1 ms of wall per step against 2.0 ms of kernels), with moeq's launch plans off and on
(:func:`moeq.runtime.kernels.launch.launch_kernel`; toggled in the same process, same compiled graphs), next to
the bf16 layer. ``--profile`` adds torch.profiler's table by self CPU time for each moeq variant.
On the GPU: ``python benchmarks/probe_step_host_time.py``."""

import argparse
import time

import torch
from bench_e2e_modelopt import qwen3_30b_a3b_layer
from bench_qat_training import compiled_variant, step
from torch.profiler import ProfilerActivity, profile

from moeq.lowering.inductor import fusion
from moeq.runtime.kernels import launch

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tokens", type=int, default=512)
parser.add_argument("--profile", action="store_true")
parser.add_argument("--variants", default="bf16:auto,FP8:auto,FP8:never", help="config:fusion policy, comma-separated")
args = parser.parse_args()

base = qwen3_30b_a3b_layer("cuda")
hidden = base.mlp.gate.weight.shape[1]
calib = torch.randn(4, 512, hidden, device="cuda", dtype=torch.bfloat16)
x = torch.randn(1, args.tokens, hidden, device="cuda", dtype=torch.bfloat16).requires_grad_()
g = torch.randn_like(x)


def host_and_wall(layer, steps=20):
    for _ in range(3):
        step(layer, x, g)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step(layer, x, g)
    host = (time.perf_counter() - t) / steps * 1e3
    torch.cuda.synchronize()
    return host, (time.perf_counter() - t) / steps * 1e3


print(f"{args.tokens} tokens: ms per training step (host = time to enqueue, wall = until the GPU is done)")
for variant in args.variants.split(","):
    name, policy = variant.split(":")
    name = None if name == "bf16" else name
    torch._dynamo.reset()
    with fusion(policy):
        layer = compiled_variant(base, name, calib)
        for plans in (False, True) if name else (True,):
            launch.FAST_LAUNCH = plans
            launch.launch_counts.clear()
            host, wall = host_and_wall(layer)
            print(
                f"{name or 'bf16'} {policy:6s} launch plans {'on ' if plans else 'off'}: host {host:.3f}, wall {wall:.3f}; "
                f"moeq launches {dict(launch.launch_counts)}"
            )
            if args.profile and name:
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        step(layer, x, g)
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=90))
