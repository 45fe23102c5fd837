"""Benchmark the moeq quantization kernels on the GPU against same-run anchors.

Anchors: device copy bandwidth (bytes read + written), a per-expert loop of torch fake quant (E launches
of formats.py, the way module-hook quantizers run), and the same fake quant written as one vectorized
torch expression over the stacked weight compiled by Inductor. Correctness (bit-exactness against the
reference) is checked first. Kernels are timed three ways: eager ``do_bench`` (median, L2 flushed; a short
kernel also pays the host's launch latency there), CUDA-graph replays of 10 launches (no host gaps; as
compiled models with ``mode="reduce-overhead"`` run) and the CUPTI kernel duration from the profiler.
Prints one table; writes JSON details to $OUT (or ./out).

    python benchmarks/bench_quant_kernels.py [--skip-calibration]
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time

import torch
import triton
from bench_grouped_qmm import bench as graph_bench
from report import save_report
from triton.testing import do_bench

import moeq
from moeq.formats import expand_per_expert, expert_amax, get_format
from moeq.integrations.hf import tiny_model
from moeq.runtime import kernels
from moeq.runtime.kernels.fake_quant_experts import _fake_quant_experts_kernel
from moeq.runtime.kernels.segment_amax import _segment_amax_kernel

WEIGHTS = {
    "qwen3-30b-a3b gate_up": (128, 1536, 2048),
    "qwen3-30b-a3b down": (128, 2048, 768),
    "mixtral gate_up": (8, 28672, 4096),
}

#: (label, Qwen3-MoE config overrides, token batch shape) of the calibration-forward comparison
CALIBRATION_MODELS = [
    ("tiny Qwen3-MoE 512h/32e", dict(hidden_size=512, moe_intermediate_size=256, num_experts=32), (8, 256)),
    (
        "small Qwen3-MoE 2048h/128e",
        dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8),
        (8, 1024),
    ),
]

#: alternating rounds of the calibration-forward comparison
ROUNDS = 5


def bench(fn, warmup=25, rep=100) -> float:
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def kernel_ms(fn, name: str, calls: int = 50) -> float:
    """Median device time (ms) of the GPU kernels whose name contains ``name``, from the profiler (CUPTI),
    over ``calls`` calls each after an L2 flush (as ``do_bench``): the kernel alone, without the gaps a
    Python launch leaves on an idle GPU. For the short kernels (segment_amax, ~0.04 ms) the eager ``do_bench``
    figure moves with the host's launch latency (the autotuner's Python path), not with the kernel. On the H200
    this reads the issue-bound NVFP4 kernels 6-8% slower than the event timings bracketing them (the kernel runs
    slower with the profiler on), so BENCHMARKS.md judges by the event timings and lists this one beside them."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    times = [
        e.time_range.elapsed_us() / 1e3
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and name in e.name
    ]
    if len(times) < calls:
        raise RuntimeError(f"profiler saw {len(times)} {name!r} kernels for {calls} calls")
    return statistics.median(times)


def copy_bandwidth() -> float:
    src = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e9  # TB/s


def user_fake_quant(w, amax, fmt):
    """The fake quant a user writes as one fp32 torch expression over the stacked weight (the Inductor
    anchor): same formulas as the spec, plain fp32 ops, torch's float8 cast."""
    a = amax.float().view(-1, 1, 1)
    x = w.float()
    if fmt == "fp8":
        s = a / 448.0
        return ((x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s).to(w.dtype)
    g = (a / 2688.0).unsqueeze(-1)
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // 16, 16)
    sb = (blocks.abs().amax(-1, keepdim=True) / (6.0 * g)).clamp(2**-9, 448).to(torch.float8_e4m3fn).float()
    scale = sb * g
    y = (blocks / scale).abs()
    q = torch.bucketize(y, torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device=w.device), right=False)
    vals = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], device=w.device)[q]
    return (torch.where(blocks < 0, -vals, vals) * scale).reshape(x.shape).to(w.dtype)


def loop_fake_quant(w, amax, fmt):
    f = get_format(fmt)
    return torch.stack([f.fake_quant(w[e], amax[e].reshape(1, 1), -1) for e in range(w.shape[0])])


def calibration_forward(size: dict, shape: tuple[int, int]) -> tuple[float, float, list]:
    tokens = torch.randint(0, 256, shape, device="cuda")
    plain = tiny_model("qwen3_moe", torch.bfloat16, **size).cuda()
    plain.set_experts_implementation("grouped_mm")
    plain_c = torch.compile(plain)
    model = moeq.prepare(tiny_model("qwen3_moe", torch.bfloat16, **size).cuda(), moeq.NVFP4)
    model_c = torch.compile(model, backend="moeq")
    with torch.no_grad():
        # CPU-bound at these sizes: alternate the two models over a few rounds and keep each one's median,
        # so host-side drift (clocks, other processes) does not land on one side only
        plain_ms, calib_ms = [], []
        for _ in range(ROUNDS):
            plain_ms.append(bench(lambda: plain_c(tokens)))
            with moeq.calibrate(model_c):
                calib_ms.append(bench(lambda: model_c(tokens)))
        ms_plain, ms_calib = statistics.median(plain_ms), statistics.median(calib_ms)
        with moeq.calibrate(model_c):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                model_c(tokens)
                torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    profile = [(e.key[:60], e.count, round(e.device_time_total / 1e3, 4)) for e in events[:12]]
    return ms_calib, ms_plain, profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--skip-calibration", action="store_true", help="only the kernels, not the model forwards")
    args = parser.parse_args()
    out_dir = args.out
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    copy_tbs = copy_bandwidth()
    rows, details = (
        [],
        {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "python": platform.python_version(),
            "copy_TBps": copy_tbs,
            "results": [],
        },
    )
    rows.append(["HBM copy (anchor)", "-", "-", "-", f"{copy_tbs:.2f}", "1.00", *["-"] * 6])
    for name, shape in WEIGHTS.items():
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
        amax = expert_amax(w)
        nbytes = 2 * w.numel() * w.element_size()
        for fmt in ("fp8", "nvfp4"):
            f = get_format(fmt)
            got = kernels.fake_quant_experts(w, amax, fmt, -1)
            ref = f.fake_quant(w, expand_per_expert(amax, 3), -1)  # formats.py evaluated by torch on CUDA
            cpu_ref = f.fake_quant(w.cpu(), expand_per_expert(amax.cpu(), 3), -1)  # the spec, on CPU
            exact = torch.equal(got.cpu(), cpu_ref)
            torch_cuda_mismatch = (ref.cpu() != cpu_ref).sum().item()
            if torch_cuda_mismatch:
                i = (ref.cpu() != cpu_ref).nonzero()[0].tolist()
                print("  formats.py on CUDA != on CPU at", torch_cuda_mismatch, "elements, e.g. x =",
                      w[tuple(i)].item(), "cuda", ref[tuple(i)].item(), "cpu", cpu_ref[tuple(i)].item(),
                      "amax", amax[i[0]].item(), flush=True)  # fmt: skip
            compiled = torch.compile(lambda w, a, fmt=fmt: user_fake_quant(w, a, fmt))
            inductor_out = compiled(w, amax)
            inductor_mismatch = (inductor_out != ref).float().mean().item()
            quantize = functools.partial(kernels.fake_quant_experts, w, amax, fmt, -1)
            ms_kernel, ms_graph, ms_device = bench(quantize), graph_bench(quantize), kernel_ms(quantize, "fake_quant")
            ms_inductor = bench(lambda w=w, a=amax, c=compiled: c(w, a))
            ms_loop = bench(lambda w=w, a=amax, f=fmt: loop_fake_quant(w, a, f), warmup=5, rep=20)
            tbs = nbytes / ms_kernel / 1e9
            tuned = str(_fake_quant_experts_kernel.best_config)
            rows.append(
                [f"fake_quant_experts {name}", fmt, str(list(shape)), f"{ms_kernel:.3f}", f"{tbs:.2f}",
                 f"{tbs / copy_tbs:.2f}", f"{ms_graph:.3f}", f"{nbytes / ms_graph / 1e9 / copy_tbs:.2f}",
                 f"{ms_device:.3f}", f"{nbytes / ms_device / 1e9 / copy_tbs:.2f}",
                 f"{ms_loop / ms_kernel:.1f}x", f"{ms_inductor / ms_kernel:.2f}x"]
            )  # fmt: skip
            details["results"].append(
                dict(kernel="fake_quant_experts", shape=shape, fmt=fmt, exact=exact, ms=ms_kernel, TBps=tbs,
                     kernel_ms=ms_device, graph_ms=ms_graph,
                     ms_loop=ms_loop, ms_inductor=ms_inductor, inductor_mismatch_fraction=inductor_mismatch,
                     config=tuned)
            )  # fmt: skip
            print(
                f"{name} {fmt}: kernel == CPU spec: {exact}; inductor mismatching elements={inductor_mismatch:.2e}; "
                f"tuned config {tuned}",
                flush=True,
            )
            print("  ", rows[-1], flush=True)
    # calibration observer over 34k routed rows x 2048
    rows_n, k, e = 34816, 2048, 128
    x = torch.randn(rows_n, k, device="cuda", dtype=torch.bfloat16)
    counts = torch.full((e,), rows_n // e, dtype=torch.int32, device="cuda")
    offs = counts.cumsum(0).to(torch.int32)
    from moeq.segments import segment_amax as reference_segment_amax

    amax, cnt = kernels.segment_amax(x, offs, e)
    ra, rc = reference_segment_amax(x, offs, e)
    exact = torch.equal(amax, ra) and torch.equal(cnt, rc)
    running = (torch.zeros(e, device="cuda"), torch.zeros(e, dtype=torch.int64, device="cuda"))
    observe = functools.partial(kernels.segment_amax_, x, offs, *running)
    ms, ms_graph, ms_device = bench(observe), graph_bench(observe), kernel_ms(observe, "segment_amax")
    tbs = x.numel() * x.element_size() / ms / 1e9
    tbs_device = x.numel() * x.element_size() / ms_device / 1e9
    rows.append(
        [
            "segment_amax 34k x 2048",
            "-",
            f"[{rows_n}, {k}]",
            f"{ms:.3f}",
            f"{tbs:.2f}",
            f"{tbs / copy_tbs:.2f}",
            f"{ms_graph:.4f}",
            f"{x.numel() * x.element_size() / ms_graph / 1e9 / copy_tbs:.2f}",
            f"{ms_device:.4f}",
            f"{tbs_device / copy_tbs:.2f}",
            "-",
            "-",
        ]
    )
    tuned = str(_segment_amax_kernel.best_config)
    details["results"].append(
        dict(
            kernel="segment_amax",
            shape=[rows_n, k],
            exact=exact,
            ms=ms,
            TBps=tbs,
            kernel_ms=ms_device,
            kernel_TBps=tbs_device,
            graph_ms=ms_graph,
            config=tuned,
        )
    )
    print(f"segment_amax exact={exact}; tuned config {tuned}", flush=True)
    # calibration forward of a compiled HF MoE: moeq (observers on) vs the same model compiled without moeq
    for label, size, shape in [] if args.skip_calibration else CALIBRATION_MODELS:
        ms_calib, ms_plain, profile = calibration_forward(size, shape)
        rows.append([f"calibration fwd ({label})", "-", f"{list(shape)} tokens", f"{ms_calib:.3f}", *["-"] * 7,
                     f"{ms_calib / ms_plain:.2f}x of plain ({ms_plain:.3f} ms)"])  # fmt: skip
        details["results"].append(dict(kernel="calibration_forward", model=label, ms=ms_calib, ms_plain=ms_plain,
                                       ratio=ms_calib / ms_plain, profile=profile))  # fmt: skip
        print(label, f"{ms_calib:.3f} ms vs {ms_plain:.3f} ms", profile[:6], flush=True)
    header = ["what", "fmt", "shape", "ms", "TB/s", "vs copy", "graph ms", "graph vs copy", "CUPTI ms", "CUPTI vs copy"]
    header += ["vs loop", "vs Inductor"]
    from moeq.passes.explain import format_table

    table = format_table(header, rows)
    print(f"\n{details['device']}  torch {details['torch']}  triton {details['triton']}  {time.strftime('%Y-%m-%d')}")
    print(table)
    save_report(out_dir, "bench_quant_kernels", details, table)


if __name__ == "__main__":
    main()
