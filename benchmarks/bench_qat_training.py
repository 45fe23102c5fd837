"""QAT training step of one Qwen3-30B-A3B-shaped MoE layer: moeq (compiled) vs the bf16 layer (compiled).

The layer is transformers' ``Qwen3MoeSparseMoeBlock`` (hidden 2048, 128 experts of intermediate 768, top-8, bf16,
random weights, experts on transformers' ``grouped_mm``). Each variant is compiled, moeq's calibrated and
finalized, then one step is ``forward`` + ``backward`` (gradients into the input, the router and the expert
weights, set to None before each step as ``zero_grad`` does). Reported per token count: forward ms and step ms (``triton.testing.do_bench``, median), the step's
summed CUDA kernel time (torch.profiler; the step ms less this is CPU launch overhead the GPU waited on), the memory the
forward keeps for backward (MB allocated after the forward, less before), and the expert weight gradients'
relative error against the bf16 layer's (the quantization's effect, a sanity check, not a target).

``--cudagraphs`` compiles every variant with Inductor's CUDA graphs (``options={"triton.cudagraphs": True}``,
``torch.compiler.cudagraph_mark_step_begin()`` before each call): the steps without the host's launch overhead.

A variant ``CONFIG:POLICY:reuse`` (or ``...:reuse:dequantized``, which also keeps each weight's dequantized copy)
times its steps inside ``moeq.reuse_weight_codes`` (a gradient-accumulation
micro-batch: the weights' codes computed once per optimizer step); "codes ms" is that once-per-step entry (every
expert weight quantized), to be spread over the step's micro-batches.

    python benchmarks/bench_qat_training.py --out $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import time

import torch
from bench_e2e_modelopt import qwen3_30b_a3b_layer, set_experts_implementation
from report import print_and_save
from triton.testing import do_bench

import moeq
from moeq.lowering.inductor import fusion

#: ``--small``: the layer's tiny shapes (a CPU smoke run of a benchmark's plumbing)
SMALL_SHAPES = dict(hidden=64, intermediate=32, experts=8)


def layer_and_calibration(device: str, small: bool) -> tuple[torch.nn.Module, torch.Tensor]:
    """The Qwen3-30B-A3B-shaped layer (``SMALL_SHAPES`` with ``small``) and the 2048 tokens moeq calibrates on."""
    base = qwen3_30b_a3b_layer(device, **(SMALL_SHAPES if small else {}))
    hidden = base.mlp.gate.weight.shape[1]
    return base, torch.randn(4, 512, hidden, device=device, dtype=torch.bfloat16)


def step_inputs(tokens: int, hidden: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's input ``[1, tokens, hidden]`` (requiring grad) and output gradient, seeded by ``tokens``."""
    gen = torch.Generator(device=device).manual_seed(tokens)
    x = torch.randn(1, tokens, hidden, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    return x, torch.randn(x.shape, device=device, dtype=torch.bfloat16, generator=gen)


def compiled_variant(
    base: torch.nn.Module,
    cfg_name: str | None,
    calib: torch.Tensor,
    options: dict[str, object] | None = None,
    deploy: bool = False,
) -> torch.nn.Module:
    """A copy of ``base`` on transformers' grouped_mm experts, compiled with Inductor ``options``: the bf16 layer
    (``cfg_name`` None), or moeq-prepared with that config, calibrated on ``calib`` and finalized (and frozen with
    ``deploy``). In train mode unless deployed."""
    layer = copy.deepcopy(base)
    set_experts_implementation(layer, "grouped_mm")
    if cfg_name is None:
        return torch.compile(layer.train(), options=options)
    model = moeq.prepare(layer, getattr(moeq, cfg_name))
    compiled = torch.compile(model, backend="moeq", options=options)
    with torch.no_grad():
        with moeq.calibrate(compiled):
            compiled(calib)
        moeq.finalize(compiled)
        if deploy:
            moeq.freeze(compiled)
    return compiled if deploy else compiled.train()


def expert_grads(layer: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for n, p in layer.named_parameters() if "experts" in n]


def step(layer, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    """Forward and backward as after an optimizer's ``zero_grad(set_to_none=True)``: the gradients are fresh
    tensors, not accumulated into the previous step's (which would add a read-add-write of every weight)."""
    x.grad = None
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    torch.autograd.backward(out[0] if isinstance(out, tuple) else out, grad_out)


def quantize_weights_once(layer, dequantized: bool) -> None:
    """What ``moeq.reuse_weight_codes`` costs once per optimizer step: entering it (every expert weight quantized)."""
    with moeq.reuse_weight_codes(layer, dequantized=dequantized):
        pass


def saved_mb(layer, x: torch.Tensor) -> float:
    """Memory the forward keeps alive for backward (its autograd graph), in MB."""
    if x.device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = layer(x)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    del out
    return kept / 1e6


def kernel_ms(fn, device: str) -> tuple[float, str]:
    """GPU time of one call: the sum of its CUDA kernels' durations (the CPU's launch overhead excluded), and
    the profiler's table of the kernels that took longest."""
    if device != "cuda":
        return float("nan"), ""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    total = sum(getattr(a, "self_device_time_total", 0.0) for a in averages) / 1e3
    return total, averages.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70)


def marking_steps(fn):
    """``fn`` preceded by ``torch.compiler.cudagraph_mark_step_begin()`` (each call a new CUDA-graph step)."""

    def marked():
        torch.compiler.cudagraph_mark_step_begin()
        return fn()

    return marked


def time_ms(fn, device: str, rep: int) -> float:
    if device == "cuda":
        return do_bench(fn, warmup=3, rep=rep, return_mode="median")
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


HEADER = ["tokens", "variant", "fwd ms (no grad)", "fwd ms (train)", "step ms", "step kernels ms", "vs bf16 step",
          "codes ms (once per optimizer step)", "kept for bwd MB", "expert grad rel err vs bf16"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--tokens", default="512,4352", help="tokens per step (x8 routed rows)")
    parser.add_argument("--variants", default="FP8:auto,FP8:never,NVFP4:auto",
                        help="moeq CONFIG:fusion-policy pairs next to the bf16 anchor")  # fmt: skip
    parser.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run of the plumbing)")
    parser.add_argument("--cudagraphs", action="store_true", help="compile with Inductor's CUDA graphs")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    options = {"triton.cudagraphs": True} if args.cudagraphs else None
    call = marking_steps if args.cudagraphs else (lambda fn: fn)
    shapes = SMALL_SHAPES if args.small else {}
    base, calib = layer_and_calibration(device, args.small)
    hidden = base.mlp.gate.weight.shape[1]
    sizes = [int(t) for t in args.tokens.split(",")]
    inputs = {tokens: step_inputs(tokens, hidden, device) for tokens in sizes}
    anchor_grads, anchor_ms, rows, results = {}, {}, [], []
    for variant in [None, *args.variants.split(",")]:
        name, policy, *reuse = variant.split(":") if variant else (None, "auto")
        label = "bf16 (inductor)" if name is None else f"QAT {name} (moeq, fusion {policy})"
        dequantized = "dequantized" in reuse
        label += (", codes reused" if reuse else "") + (" with dequantized copies" if dequantized else "")
        label += ", CUDA graphs" * args.cudagraphs
        torch._dynamo.reset()  # each variant compiles afresh (the policy is read when Inductor compiles)
        with fusion(policy), contextlib.ExitStack() as block:
            layer = compiled_variant(base, name, calib, options)
            codes_ms = float("nan")
            if reuse:
                codes_ms = time_ms(lambda: quantize_weights_once(layer, dequantized), device, 30)  # noqa: B023
                block.enter_context(moeq.reuse_weight_codes(layer, dequantized=dequantized))
            for tokens in sizes:
                x, grad_out = inputs[tokens]
                layer.zero_grad(set_to_none=True)
                call(lambda: step(layer, x, grad_out))()  # noqa: B023
                grads = [g.float() for g in expert_grads(layer)]
                anchor_grads.setdefault(tokens, grads)
                rel = max(((g - a).norm() / a.norm()).item() for g, a in zip(grads, anchor_grads[tokens]))
                with torch.no_grad():
                    fwd = time_ms(call(lambda: layer(x)), device, 30)  # noqa: B023
                fwd_train = time_ms(call(lambda: layer(x)), device, 30)  # noqa: B023
                ms = time_ms(call(lambda: step(layer, x, grad_out)), device, 60)  # noqa: B023
                gpu_ms, kernels = kernel_ms(call(lambda: step(layer, x, grad_out)), device)  # noqa: B023
                slug = (
                    label.split(" (")[0].replace(" ", "_")
                    + ("" if name is None else f"_{policy}")
                    + "_reuse" * bool(reuse)
                    + "_dequantized" * dequantized
                    + "_cudagraphs" * args.cudagraphs
                )
                with open(os.path.join(args.out, f"kernels_{slug}_{tokens}.txt"), "w") as fh:
                    fh.write(kernels)
                kept = float("nan") if args.cudagraphs else saved_mb(layer, x)  # replays keep outputs in their pool
                anchor_ms.setdefault(tokens, ms)
                results.append(dict(tokens=tokens, variant=label, no_grad_fwd_ms=fwd, train_fwd_ms=fwd_train,
                                    step_ms=ms, step_kernel_ms=gpu_ms, codes_ms=codes_ms, saved_mb=kept,
                                    grad_rel_err_vs_bf16=rel))  # fmt: skip
                rows.append([str(tokens), label, f"{fwd:.3f}", f"{fwd_train:.3f}", f"{ms:.3f}", f"{gpu_ms:.3f}",
                             f"{anchor_ms[tokens] / ms:.2f}x", f"{codes_ms:.3f}", f"{kept:,.0f}", f"{rel:.3f}"])  # fmt: skip
                print(f"  {tokens} tokens, {label}: " + " | ".join(f"{h} {v}" for h, v in zip(HEADER[2:], rows[-1][2:])),
                      flush=True)  # fmt: skip
    rows.sort(key=lambda r: int(r[0]))
    print_and_save(args.out, "bench_qat_training", HEADER, rows, results=results, shapes=shapes)


if __name__ == "__main__":
    main()
