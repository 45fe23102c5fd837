"""Probe: host time per call of moeq's CUDA ops (eager dispatch: what Inductor's generated code pays for each
call of an opaque custom op) at 512 tokens (4096 routed rows) of a Qwen3 layer, next to ``torch._grouped_mm``,
with launch plans off (``kernel[grid]`` every call) and on (:func:`moeq.runtime.kernels.launch.launch_kernel`),
and cProfile of the two slowest. On the GPU: ``python benchmarks/probe_launch_overhead.py``."""

import cProfile
import pstats
import time

import torch

import moeq  # noqa: F401  registers the ops
from moeq.formats import expert_amax
from moeq.runtime.kernels import launch

E, H, INTER, rows = 128, 2048, 768, 4096
dev = "cuda"
w = (torch.randn(E, 2 * INTER, H, device=dev) * 0.02).to(torch.bfloat16)
amax = expert_amax(w)
x = torch.randn(rows, H, device=dev, dtype=torch.bfloat16)
offs = (torch.arange(1, E + 1, device=dev) * (rows // E)).to(torch.int32)
x_amax = x.abs().amax().float().reshape(1)
data, scale, block = torch.ops.moeq.quantize_weight(w, amax, "fp8", 0, 2)
dy = torch.randn(rows, 2 * INTER, device=dev, dtype=torch.bfloat16)
calls = {
    "grouped_qmm qat fp8 (w [E,K,N] view)": lambda: torch.ops.moeq.grouped_qmm(
        x, w.transpose(1, 2), offs, amax, None, x_amax, "qat", "fp8", "fp8", None
    ),
    "grouped_qmm deploy fp8 codes": lambda: torch.ops.moeq.grouped_qmm(
        x, data.transpose(1, 2), offs, scale, None, x_amax, "deploy", "fp8", "fp8", None
    ),
    "quantize_weight fp8": lambda: torch.ops.moeq.quantize_weight(w, amax, "fp8", 0, 2),
    "fake_quant_act fp8": lambda: torch.ops.moeq.fake_quant_act(x, offs, x_amax, "fp8", 0, 1),
    "fake_quant_weight fp8": lambda: torch.ops.moeq.fake_quant_weight(w, amax, "fp8", 0, 2),
    "grouped_wgrad_ste": lambda: torch.ops.moeq.grouped_wgrad_ste(dy.t(), x, offs, w, amax.view(-1, 1, 1), [0, 1, 2]),
    "torch._grouped_mm (anchor)": lambda: torch._grouped_mm(x, w.transpose(1, 2), offs),
    "aten add (anchor)": lambda: x + 1,
}


def host_us(fn, calls=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t) / calls * 1e6
    torch.cuda.synchronize()
    return host


print(f"{'op':40s} {'plans off':>12s} {'plans on':>12s}  (host us/call)")
for name, fn in calls.items():
    launch.FAST_LAUNCH = False
    off = host_us(fn)
    launch.FAST_LAUNCH = True
    on = host_us(fn)
    print(f"{name:40s} {off:12.1f} {on:12.1f}", flush=True)
for name in ("grouped_qmm qat fp8 (w [E,K,N] view)", "quantize_weight fp8"):
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        calls[name]()
    prof.disable()
    torch.cuda.synchronize()
    print(f"\n=== cProfile {name}, 50 calls")
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)
