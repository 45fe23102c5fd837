"""Probe: where a compiled QAT FP8 training step of one Qwen3-30B-A3B-shaped layer at 512 tokens spends host time
(session 18: 6.1 ms of wall per step against 2.0 ms of kernels). Prints the host time to enqueue a step, the wall
time, and torch.profiler's table by self CPU time, for fusion "auto" and "never". (The "no-grad fwd host" figure
includes the first no-grad call's compile: ignore it.) On the GPU: ``python benchmarks/probe_step_host_time.py``."""

import time

import torch
from bench_e2e_modelopt import qwen3_30b_a3b_layer
from bench_qat_training import compiled_variant, step
from torch.profiler import ProfilerActivity, profile

from moeq.lowering.inductor import fusion

base = qwen3_30b_a3b_layer("cuda")
hidden = base.mlp.gate.weight.shape[1]
calib = torch.randn(4, 512, hidden, device="cuda", dtype=torch.bfloat16)
x = torch.randn(1, 512, hidden, device="cuda", dtype=torch.bfloat16).requires_grad_()
g = torch.randn_like(x)
for name, policy in (("FP8", "auto"), ("FP8", "never")):
    torch._dynamo.reset()
    with fusion(policy):
        layer = compiled_variant(base, name, calib)
        for _ in range(3):
            step(layer, x, g)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            step(layer, x, g)
        host = (time.perf_counter() - t) / 20 * 1e3
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / 20 * 1e3
        with torch.no_grad():
            t = time.perf_counter()
            for _ in range(20):
                layer(x)
            fhost = (time.perf_counter() - t) / 20 * 1e3
        torch.cuda.synchronize()
        print(f"{name} {policy}: step host {host:.3f} ms/step (enqueue), wall {wall:.3f}; no-grad fwd host {fhost:.3f}")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step(layer, x, g)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90))
