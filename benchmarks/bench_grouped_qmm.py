"""Benchmark moeq's fused grouped GEMM (moeq::grouped_qmm) on the GPU against same-run anchors.

Shapes: Qwen3-30B-A3B experts (E=128, H=2048, I=768: gate_up x[M, 2048] @ w[128, 2048, 1536], down
x[M, 768] @ w[128, 768, 2048]) at M = 64, 4096 and 34816 routed rows, and Mixtral (E=8, H=4096, I=14336)
at 8192 routed rows; roughly balanced random routing. Weights are HF-style [E, N, K] bf16 passed as the
[E, K, N] transpose, as transformers does.

Kernels: QAT FP8 / NVFP4 (fake quant of both operands in the load path), deploy W8A8 FP8 (FP8 tensor
cores), W4A16 NVFP4 and W8A16 FP8 (stored weights dequantized in registers). FP8 x FP8 rows run as
``grouped_qmm`` picks by size: above 16 mean rows per expert they quantize each operand once (activation
codes; QAT weight codes) and multiply the codes, and an extra "in-load (1 launch)" row times the one-kernel
path at those sizes. Anchors in the same run:
``torch._grouped_mm`` bf16, ``torch._scaled_grouped_mm`` FP8 rowwise (activation quantization included,
compiled by Inductor), the unfused moeq path (fake_quant_act + fake_quant_experts kernels, then
``torch._grouped_mm``) and HBM copy bandwidth. Every row is timed the same way, as CUDA-graph replays
(:func:`bench`), so host launch overhead does not hide the kernels at 64 rows. Every kernel is checked
against a reference first (formats.py-exact operands from the moeq quant kernels, fp32 per-expert
matmul): relative error < 1e-2.
Prints one table; writes JSON (and the table) under ``--out`` (default $OUT or ./out).

``--rounds N`` then times every target's kernel and its anchor N more times, alternately, and reports the
median ratio with its range: one pair of medians can mislead (session 30 saw the bf16 anchor at 0.516 ms on one
H200 and 0.581 ms on another). The GPU's clocks, power and throttle reasons are recorded before and after.

    python benchmarks/bench_grouped_qmm.py --out $OUT
    python benchmarks/bench_grouped_qmm.py --only "qwen3 gate_up M=34816" --modes "QAT FP8" --rounds 7
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time

import torch
import triton
from report import save_report
from triton.testing import do_bench

from moeq.formats import channel_amax, expand_weight_amax, expert_amax, get_format, stored_form
from moeq.lowering.grouped_qmm import quantized_operands
from moeq.runtime import kernels
from moeq.runtime.kernels.grouped_qmm import (
    dequantizes_weight_first,
    grouped_qmm,
    quantizes_nvfp4_once,
    quantizes_once,
    quantizes_weight_once,
)

CASES = [  # (label, E, K, N, routed rows)
    *[(f"qwen3 gate_up M={m}", 128, 2048, 1536, m) for m in (64, 4096, 34816)],
    *[(f"qwen3 down M={m}", 128, 768, 2048, m) for m in (64, 4096, 34816)],
    ("mixtral gate_up M=8192", 8, 4096, 28672, 8192),
    ("mixtral down M=8192", 8, 14336, 4096, 8192),
]
#: run only when named by ``--only``: Qwen3 at 128 mean rows per expert, inside the Gluon QAT FP8 kernel's range
#: (48 to 320) below the 272 of 34k rows
EXTRA_CASES = [
    (f"qwen3 {proj} M=16384", 128, k, n, 16384) for proj, k, n in (("gate_up", 2048, 1536), ("down", 768, 2048))
]

# (row label, kernel weight mode, activation format)
MODES = [
    ("QAT FP8", "fake_fp8", "fp8"),
    ("QAT NVFP4", "fake_nvfp4", "nvfp4"),
    ("deploy W8A8 FP8", "fp8", "fp8"),
    ("deploy W4A16 NVFP4", "nvfp4", None),
    ("deploy W8A16 FP8", "fp8", None),
    # moeq.FP8_DYNAMIC: channel-wise weight scales, dynamic per-token activation scales (not in the default list)
    ("QAT FP8_DYNAMIC", "fake_fp8", "fp8_token"),
    ("deploy W8A8 FP8_DYNAMIC", "fp8", "fp8_token"),
]
#: the modes run unless --modes names others
DEFAULT_MODES = [m[0] for m in MODES if "DYNAMIC" not in m[0]]


#: launches per CUDA graph in :func:`bench`
GRAPH_LAUNCHES = 10


def bench(fn, warmup=10, rep=50) -> float:
    """GPU milliseconds per call of ``fn`` (median): replays of a CUDA graph of ``GRAPH_LAUNCHES`` calls,
    as ``torch.compile(mode="reduce-overhead")`` runs a model. Timing eager calls would measure the host
    at decode sizes: one Triton launch from Python costs ~0.1 ms on the H200 host, more than the kernel."""
    fn()  # compile / autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_LAUNCHES):
            fn()
    return do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median") / GRAPH_LAUNCHES


def copy_bandwidth() -> float:
    src = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    # timed eagerly: a copy captured in a CUDA graph becomes a memcpy node (copy engines, ~2/3 of the SMs' rate)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
    return 2 * src.numel() / ms / 1e9


def gpu_state() -> dict[str, str]:
    """The GPU's clocks, power and active throttle reasons now (``nvidia-smi``), or why they are missing."""
    fields = "clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,clocks_throttle_reasons.active"
    try:
        line = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader", "-i", "0"],
                              capture_output=True, text=True, timeout=30, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    return dict(zip(fields.split(","), (v.strip() for v in line.split(","))))


def repeated_ratios(anchor_fn, kernel_fn, rounds: int) -> dict[str, object]:
    """Time ``anchor_fn`` and ``kernel_fn`` alternately ``rounds`` times (:func:`bench` each): the anchor / kernel
    ratio of every round, and its median."""
    anchor_ms, kernel_ms = [], []
    for _ in range(rounds):
        anchor_ms.append(bench(anchor_fn))
        kernel_ms.append(bench(kernel_fn))
    ratios = [a / k for a, k in zip(anchor_ms, kernel_ms)]
    return dict(anchor_ms=anchor_ms, kernel_ms=kernel_ms, ratios=ratios, median=statistics.median(ratios))


def routing(rows: int, num_experts: int) -> torch.Tensor:
    """int32 cumulative offsets of ``rows`` routed rows spread roughly evenly (random) over the experts."""
    g = torch.Generator().manual_seed(rows + num_experts)
    expert = torch.randint(0, num_experts, (rows,), generator=g)
    return torch.bincount(expert, minlength=num_experts).cumsum(0).to(torch.int32).cuda()


def rowwise_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=1).float().clamp(min=1e-12) / 448.0
    return (x.float() / scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def reference_mm(xq: torch.Tensor, wq: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(xq.shape[0], wq.shape[2], device=xq.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = xq[start:end].float() @ wq[e].float()
        start = end
    return out


def stored(w_nk: torch.Tensor, amax: torch.Tensor, fmt: str):
    """Deploy weights as moeq.freeze stores them (K-last), in the kernel's [E, K', N] view, and the
    dequantized reference weight [E, K, N]."""
    f = get_format(fmt)
    q = f.quantize(w_nk, expand_weight_amax(amax, 3, 0, 2), 2)
    data, scale, block = stored_form(q)
    deq = f.dequantize(q, w_nk.dtype).transpose(1, 2)
    return (data.transpose(1, 2), scale, block.transpose(1, 2) if block.numel() else None), deq


def unfused_deploy(x, offs, data, scale, block, fmt: str):
    """The unfused deploy GEMM: ``moeq::dequant_weight`` of the stored weight (the kernel's ``[E, K', N]`` views
    as :func:`stored` returns them, through the op's own ``quantized_operands``), then ``torch._grouped_mm``."""
    _, w = quantized_operands(x, data, offs, scale, block, None, "deploy", fmt, None)
    return torch._grouped_mm(x, w, offs)


def scaled_anchor(label, x, w_nk, offs, record):
    """Time the ``torch._scaled_grouped_mm`` FP8 rowwise anchor (activation quantization included) into
    ``record(ms, fn)``, or say why it is missing."""
    num_experts, n, k = w_nk.shape
    try:
        wq8, ws8 = rowwise_fp8(w_nk.reshape(-1, k))
        wq8, ws8 = wq8.view(num_experts, n, k).transpose(1, 2), ws8.view(num_experts, n)
        quant = torch.compile(rowwise_fp8)

        def scaled():
            xq8, xs8 = quant(x)
            return torch._scaled_grouped_mm(xq8, wq8, xs8, ws8, offs=offs, out_dtype=torch.bfloat16)

        scaled()
        record(bench(scaled), scaled)
    except Exception as err:  # report, never hide: the row says why it is missing
        print(f"  {label}: torch._scaled_grouped_mm unavailable: {type(err).__name__}: {err}"[:300], flush=True)


def run_case(label, num_experts, k, n, rows, copy_tbs, modes=tuple(DEFAULT_MODES), rounds=0):
    torch.manual_seed(0)
    offs = routing(rows, num_experts)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w_nk = torch.randn(num_experts, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    w = w_nk.transpose(1, 2)
    amax = expert_amax(w_nk)
    x_amax = x.abs().amax().float().reshape(1)
    active = int((torch.diff(offs, prepend=offs.new_zeros(1)) > 0).sum())
    flops = 2.0 * rows * k * n
    results = []
    timed = {}  # row name -> the callable it timed, for --rounds

    def record(what, ms, weight_bytes, exact=None, anchor=None, fn=None):
        timed[what] = fn
        results.append(
            dict(case=label, what=what, ms=ms, TFLOPs=flops / ms / 1e9, TBps=weight_bytes / ms / 1e9, ok=exact,
                 anchor=anchor, E=num_experts, K=k, N=n, rows=rows, active_experts=active)
        )  # fmt: skip

    per_expert = k * n

    # anchors
    def bf16():
        return torch._grouped_mm(x, w, offs)

    record("torch._grouped_mm bf16", bench(bf16), 2 * per_expert * active, fn=bf16)
    if "deploy W8A8 FP8" in modes or "deploy W8A8 FP8_DYNAMIC" in modes:
        scaled_anchor(
            label, x, w_nk, offs,
            lambda ms, fn: record("torch._scaled_grouped_mm FP8 rowwise", ms, per_expert * active, fn=fn),
        )  # fmt: skip
    for fmt in [f for f in ("fp8", "nvfp4") if f"QAT {f.upper()}" in modes]:

        def unfused(fmt=fmt):
            xq = kernels.fake_quant_act(x, offs, x_amax, fmt)
            wq = kernels.fake_quant_experts(w_nk, amax, fmt, -1)
            return torch._grouped_mm(xq, wq.transpose(1, 2), offs)

        record(f"unfused QAT {fmt.upper()} (moeq kernels + _grouped_mm)", bench(unfused), 2 * per_expert * active,
               fn=unfused)  # fmt: skip
    deploy = {fmt: stored(w_nk, amax, fmt) for fmt in ("fp8", "nvfp4")}
    if any("DYNAMIC" in m for m in modes):
        amax_channels = channel_amax(w_nk, 0, 2)
        deploy["fp8 channels"] = stored(w_nk, amax_channels, "fp8")
    for name, w_mode, _ in [m for m in MODES if m[0] in modes and m[1] in deploy and m[2] is None]:
        # the path fusion("never") takes, timed eagerly as every recorded run did (the torch-op dequant it had
        # until session 13 could not be captured in a CUDA graph); milliseconds, so launch latency stays hidden
        unfused_ms = do_bench(lambda fmt=w_mode: unfused_deploy(x, offs, *deploy[fmt][0], fmt), return_mode="median")
        record(f"unfused {name} (dequant_weight + _grouped_mm, eager)", unfused_ms, 2 * per_expert * active)
    # moeq grouped_qmm
    for name, w_mode, x_fmt in [m for m in MODES if m[0] in modes]:
        fmt = w_mode.removeprefix("fake_")
        dynamic = x_fmt == "fp8_token"  # FP8_DYNAMIC: channel-wise weights too
        w_amax = amax_channels if dynamic else amax
        if dynamic:
            xq = kernels.fake_quant_tokens(x, offs)
        else:
            xq = kernels.fake_quant_act(x, offs, x_amax, x_fmt) if x_fmt else x
        if w_mode.startswith("fake_"):
            args, wq, nbytes = (w, w_amax, None), kernels.fake_quant_experts(w_nk, w_amax, fmt, -1).transpose(1, 2), 2
        else:
            args, wq = deploy["fp8 channels" if dynamic else fmt]
            nbytes = 1 if fmt == "fp8" else 0.5 + 1 / 16

        ref = reference_mm(xq, wq, offs)
        # by size (the default), and for FP8 x FP8 batches that quantize once also the one-launch kernel (and
        # where the default keeps a QAT weight in the load path, the three-launch path that writes its codes)
        once = quantizes_once(w_mode, "fp8" if dynamic else x_fmt, rows, num_experts)
        once = once or quantizes_nvfp4_once(w_mode, x_fmt, rows, num_experts)
        variants = [(name, None)] + ([(f"{name} in-load (1 launch)", False)] if once else [])
        if once and w_mode == "fake_fp8" and not quantizes_weight_once(w_mode, "fp8", rows, num_experts):
            variants.append((f"{name} weight codes pass too (3 launches)", True))
        for row_name, quantize_once in variants:

            def fused(args=args, w_mode=w_mode, x_fmt=x_fmt, quantize_once=quantize_once):
                x_scale = x_amax if x_fmt and x_fmt != "fp8_token" else None
                return grouped_qmm(x, args[0], offs, args[1], args[2], x_scale, w_mode, x_fmt,
                                   quantize_once=quantize_once)  # fmt: skip

            got = fused().float()
            rel = ((got - ref).norm() / ref.norm()).item()
            record(row_name, bench(fused), nbytes * per_expert * active, exact=rel, fn=fused)
            print(f"  {label} {row_name}: rel err vs reference {rel:.2e}", flush=True)
        if name == "QAT NVFP4" and rows > 16 * num_experts:  # where gather_quant moves a static count
            record_as_compiled(x, args, offs, x_amax, wq, rows // TOP_K[label.split()[0]],
                               lambda *a, **kw: record(*a, 2 * per_expert * active, **kw))  # fmt: skip
        if (
            not w_mode.startswith("fake_")
            and x_fmt is None
            and dequantizes_weight_first(w_mode, None, rows, num_experts)
        ):

            def op(args=args, fmt=fmt):  # what a compiled graph runs: the weight's dequant kernel + _grouped_mm
                return torch.ops.moeq.grouped_qmm(x, args[0], offs, args[1], args[2], None, "deploy", fmt, None)

            rel = ((op().float() - ref).norm() / ref.norm()).item()
            record(f"{name} op (dequant first)", bench(op), nbytes * per_expert * active, exact=rel, fn=op)
    for r in results if rounds else []:
        for mode, anchor, _, at_rows in [*TARGETS, (AS_COMPILED, "torch._grouped_mm bf16", None, 34816)]:
            if r["what"] == mode and rows == at_rows and timed.get(anchor) is not None:
                r.setdefault("rounds", {})[anchor] = repeated_ratios(timed[anchor], timed[mode], rounds)
    return results


#: routed rows per token of each model (Qwen3-30B-A3B top-8, Mixtral top-2)
TOP_K = {"qwen3": 8, "mixtral": 2}


#: the row :func:`record_as_compiled` adds (not a target of issue 6's, which times the op on routed rows; with
#: ``--rounds`` also timed against bf16 in rounds)
AS_COMPILED = "QAT NVFP4 as compiled (tokens quantized before the gather)"


def record_as_compiled(x, args, offs, x_amax, wq, tokens, record) -> None:
    """QAT NVFP4 as a compiled model runs it (``moeq.lowering.gather_quant``): the activations' pass over the tokens
    before the routing gather, then the op on the gathered, already quantized rows (``x_fmt`` None). The gather itself
    is left out, as it is from the bf16 anchor (both graphs gather the same bf16 rows). The rows here are the tokens'
    rows in routing order, checked against float64 of the same values."""
    torch.manual_seed(1)
    x_tokens = torch.randn(tokens, x.shape[1], device="cuda", dtype=torch.bfloat16)
    index = torch.randint(tokens, (x.shape[0],), device="cuda")
    token_offs = torch.full([1], tokens, dtype=torch.int32, device="cuda")
    rows_q = kernels.fake_quant_act(x_tokens, token_offs, x_amax, "nvfp4")[index]

    def as_compiled():
        kernels.fake_quant_act(x_tokens, token_offs, x_amax, "nvfp4")
        return grouped_qmm(rows_q, args[0], offs, args[1], args[2], None, "fake_nvfp4", None)

    ref = reference_mm(rows_q, wq, offs)
    rel = ((as_compiled().float() - ref).norm() / ref.norm()).item()
    record(AS_COMPILED, bench(as_compiled), exact=rel, fn=as_compiled)
    print(f"  {AS_COMPILED}, {tokens} tokens: rel err vs reference {rel:.2e}", flush=True)


TARGETS = [  # (mode, anchor, ratio, rows) on both Qwen3 projections
    ("QAT FP8", "torch._grouped_mm bf16", 0.9, 34816),
    ("QAT FP8", "unfused QAT FP8 (moeq kernels + _grouped_mm)", 1.3, 34816),
    ("QAT NVFP4", "torch._grouped_mm bf16", 0.9, 34816),
    ("QAT NVFP4", "unfused QAT NVFP4 (moeq kernels + _grouped_mm)", 1.3, 34816),
    ("deploy W8A8 FP8", "torch._scaled_grouped_mm FP8 rowwise", 1.0, 34816),
    ("deploy W8A8 FP8", "torch._grouped_mm bf16", 1.6, 64),
    ("deploy W4A16 NVFP4", "torch._grouped_mm bf16", 2.5, 64),
    # not issue 6's: the FP8_DYNAMIC rows against the same anchors (session 29; expected, not yet measured)
    ("deploy W8A8 FP8_DYNAMIC", "torch._scaled_grouped_mm FP8 rowwise", 1.0, 34816),
    ("QAT FP8_DYNAMIC", "torch._grouped_mm bf16", 0.9, 34816),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument(
        "--only",
        default="",
        help="run only the cases whose label starts with this (e.g. qwen3; several: comma-separated)",
    )
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES),
                        help="comma-separated kernel rows to run (their anchors come with them; bf16 always)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=0,
                        help="then time each target's kernel and anchor this many more times, alternately")  # fmt: skip
    parser.add_argument("--no-gluon", action="store_true",
                        help="QAT FP8 as two launches instead of the Gluon kernel (GLUON_QAT_FP8 off)")  # fmt: skip
    parser.add_argument("--register-operand", action="store_true",
                        help="QAT NVFP4 by the experimental register-operand kernel (GLUON_QAT_NVFP4_REGISTER_OPERAND)")  # fmt: skip
    args = parser.parse_args()
    from moeq.runtime.kernels import grouped_qmm as launcher

    launcher.GLUON_QAT_FP8 = not args.no_gluon
    launcher.GLUON_QAT_NVFP4_REGISTER_OPERAND = args.register_operand
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    copy_tbs = copy_bandwidth()
    details = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   python=platform.python_version(), copy_TBps=copy_tbs, gpu_before=gpu_state(), gluon=not args.no_gluon,
                   register_operand=args.register_operand,
                   results=[])  # fmt: skip
    print(f"HBM copy: {copy_tbs:.2f} TB/s", flush=True)
    named = CASES + EXTRA_CASES if args.only else CASES
    for case in [c for c in named if any(c[0].startswith(only) for only in args.only.split(","))]:
        details["results"] += run_case(*case, copy_tbs, modes=args.modes.split(","), rounds=args.rounds)
        print(f"  done {case[0]} ({time.time() - started:.0f} s)", flush=True)
    by_key = {(r["case"], r["what"]): r for r in details["results"]}
    rows = [["HBM copy", "-", "-", "-", f"{copy_tbs:.2f}", "-", "-", "-", "-"]]
    verdicts = []
    for r in details["results"]:
        ratio_text = "-"
        for mode, anchor, ratio, at_rows in TARGETS:
            if r["what"] == mode and r["rows"] == at_rows and r["case"].startswith("qwen3"):
                a = by_key.get((r["case"], anchor))
                if a is None:
                    ratio_text = f"{anchor.split(' (')[0]}: not measured"
                    verdicts.append(dict(case=r["case"], mode=mode, anchor=anchor, ratio=None, target=ratio, met="n/a"))
                    rows.append([r["case"], r["what"], f"{r['ms']:.4f}", f"{r['TFLOPs']:.1f}", f"{r['TBps']:.2f}",
                                 "-" if r["ok"] is None else f"{r['ok']:.1e}", ratio_text, f">= {ratio}x",
                                 "n/a (anchor missing)"])  # fmt: skip
                    continue
                speedup = a["ms"] / r["ms"]
                ratio_text = f"{speedup:.2f}x {anchor.split(' (')[0]}"
                target = f">= {ratio}x"
                met = "met" if speedup >= ratio else "MISSED"
                verdicts.append(dict(case=r["case"], mode=mode, anchor=anchor, ratio=speedup, target=ratio, met=met))
                rows.append([r["case"], r["what"], f"{r['ms']:.4f}", f"{r['TFLOPs']:.1f}", f"{r['TBps']:.2f}",
                             "-" if r["ok"] is None else f"{r['ok']:.1e}", ratio_text, target, met])  # fmt: skip
        if ratio_text == "-":
            bf16 = by_key.get((r["case"], "torch._grouped_mm bf16"))
            vs = f"{bf16['ms'] / r['ms']:.2f}x bf16" if bf16 and r is not bf16 else "-"
            rows.append([r["case"], r["what"], f"{r['ms']:.4f}", f"{r['TFLOPs']:.1f}", f"{r['TBps']:.2f}",
                         "-" if r["ok"] is None else f"{r['ok']:.1e}", vs, "-", "-"])  # fmt: skip
    details["verdicts"] = verdicts
    details["gpu_after"] = gpu_state()
    repeats = [
        [r["case"], r["what"], anchor.split(" (")[0], str(len(rr["ratios"])), f"{rr['median']:.2f}x",
         f"{min(rr['ratios']):.2f}x..{max(rr['ratios']):.2f}x",
         f"{min(rr['anchor_ms']):.4f}..{max(rr['anchor_ms']):.4f}", f"{min(rr['kernel_ms']):.4f}..{max(rr['kernel_ms']):.4f}"]
        for r in details["results"]
        for anchor, rr in r.get("rounds", {}).items()
    ]  # fmt: skip
    from moeq.passes.explain import format_table

    header = ["case", "kernel", "ms", "TFLOP/s", "weight TB/s", "rel err", "ratio to anchor", "target", "met"]
    table = format_table(header, rows)
    bad = [r for r in details["results"] if r["ok"] is not None and not r["ok"] < 1e-2]
    print(f"\n{details['device']}  torch {details['torch']}  triton {details['triton']}  {time.strftime('%Y-%m-%d')}")
    print(table)
    if repeats:
        print(f"\nrepeated, alternating ({args.rounds} rounds):")
        print(format_table(["case", "kernel", "anchor", "rounds", "median ratio", "range", "anchor ms", "kernel ms"],
                           repeats))  # fmt: skip
    for when in ("gpu_before", "gpu_after"):
        print(f"{when}: {details[when]}")
    print(f"correctness: {'all kernels within 1e-2 of the reference' if not bad else f'{len(bad)} FAILED'}")
    print(f"wall time {time.time() - started:.0f} s")
    save_report(args.out, "bench_grouped_qmm", details, table)


if __name__ == "__main__":
    main()
