"""End-to-end: one Qwen3-30B-A3B-shaped MoE layer forward, moeq (QAT NVFP4, compiled) vs nvidia-modelopt.

The layer is transformers' ``Qwen3MoeSparseMoeBlock`` (hidden 2048, 128 experts of intermediate 768, top-8,
bf16, random weights). Both sides quantize the same copy of it and calibrate on the same batch:

- moeq: ``moeq.prepare(layer, moeq.NVFP4)`` (experts switched to transformers' ``grouped_mm``), compiled with
  ``torch.compile(backend="moeq")``, calibrated and finalized: the QAT forward fake-quantizes weights and
  activations in moeq's fused grouped kernel (``moeq::grouped_qmm``), one launch per expert GEMM.
- modelopt 0.47: ``mtq.quantize(layer, mtq.NVFP4_EXPERTS_ONLY_CFG, forward_loop)``, its default: the experts
  run eagerly (modelopt switches them to the per-expert loop) with its NVFP4 fake quantizers.

Both outputs are compared with the unquantized layer (relative error, reported), then each forward is timed
with ``triton.testing.do_bench`` (median) at several token counts. Two more layers give moeq's cost in context: the
unquantized layer compiled by Inductor (same ``grouped_mm`` experts; "vs bf16" is its time over moeq's) and, with
``--ab-gather``, moeq with the activations' fake quant left after the routing gather
(``moeq.lowering.gather_quant.enabled(False)``), built and timed last after ``torch._dynamo.reset()``, inside the
switch's block; then moeq's layer runs again on a graph compiled after the reset, and the number of outputs
that differ from its first output and from the pass-off layer's is reported. Session 40's first A/B timed one graph twice: Dynamo had served the second instance of the layer's
class the first's graph, before moeq's pre-hook made compiled graphs guard on the lowering switches. Prints one table,
writes JSON under ``--out`` (default $OUT or ./out).

    python benchmarks/bench_e2e_modelopt.py --out $OUT
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
from report import print_and_save
from triton.testing import do_bench

import moeq

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 2048, 768, 128, 8


def qwen3_30b_a3b_layer(device: str, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE, experts: int = EXPERTS):
    """transformers' Qwen3-MoE sparse block with Qwen3-30B-A3B's expert shapes, random bf16 weights."""
    import transformers
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = transformers.Qwen3MoeConfig(
        hidden_size=hidden, moe_intermediate_size=intermediate, num_experts=experts, num_experts_per_tok=TOP_K,
        norm_topk_prob=True, num_hidden_layers=1,
    )  # fmt: skip
    torch.manual_seed(0)
    layer = Qwen3MoeSparseMoeBlock(config)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.02)
    return DecoderMLP(layer).to(device=device, dtype=torch.bfloat16).eval()


class DecoderMLP(torch.nn.Module):
    """The block as a decoder layer holds it (``mlp``), so both tools see the module names they match on
    (modelopt's experts-only config matches ``*.experts.*``)."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.mlp = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def set_experts_implementation(layer: torch.nn.Module, implementation: str) -> None:
    for module in layer.modules():
        if hasattr(module, "config") and hasattr(module.config, "_experts_implementation"):
            module.config._experts_implementation = implementation


def moeq_layer(layer, calib):
    set_experts_implementation(layer, "grouped_mm")
    model = moeq.prepare(layer, moeq.NVFP4)
    compiled = torch.compile(model, backend="moeq")
    with torch.no_grad():
        with moeq.calibrate(compiled):
            compiled(calib)
        moeq.finalize(compiled)
    return compiled


def bf16_layer(layer):
    """The unquantized layer with the same ``grouped_mm`` experts, compiled by Inductor."""
    set_experts_implementation(layer, "grouped_mm")
    return torch.compile(layer)


def modelopt_layer(layer, calib):
    import modelopt.torch.quantization as mtq

    def forward_loop(model):
        model(calib)

    with torch.no_grad():
        return mtq.quantize(layer, mtq.NVFP4_EXPERTS_ONLY_CFG, forward_loop)


def forward_ms(layer, x: torch.Tensor, device: str, rep: int) -> float:
    """Median forward time: ``do_bench`` on the GPU, one wall-clock call on the CPU (smoke runs only)."""
    if device == "cuda":
        return do_bench(lambda: layer(x), warmup=3, rep=rep, return_mode="median")
    started = time.perf_counter()
    layer(x)
    return (time.perf_counter() - started) * 1e3


def relative(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).norm() / ref.norm()).item()


def output(y):
    return y[0] if isinstance(y, tuple) else y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--tokens", default="512,4096,16384")
    parser.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run of the plumbing)")
    parser.add_argument("--ab-gather", action="store_true", help="also time moeq with gather_quant off")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = dict(hidden=64, intermediate=32, experts=8) if args.small else {}
    started = time.time()
    base = qwen3_30b_a3b_layer(device, **shapes)
    hidden = base.mlp.gate.weight.shape[1]
    calib = torch.randn(4, 512, hidden, device=device, dtype=torch.bfloat16)
    ours = moeq_layer(copy.deepcopy(base), calib)
    plain = bf16_layer(copy.deepcopy(base))
    token_counts = [int(t) for t in args.tokens.split(",")]
    batches = [torch.randn(1, t, hidden, device=device, dtype=torch.bfloat16) for t in token_counts]
    peer = modelopt_layer(copy.deepcopy(base), calib)
    results, outputs = [], []
    for tokens, x in zip(token_counts, batches):
        with torch.no_grad():
            ref = output(base(x)).float()
            got_ours, got_peer = output(ours(x)).float(), output(peer(x)).float()
            ms_ours, ms_peer = forward_ms(ours, x, device, 30), forward_ms(peer, x, device, 10)
            ms_plain = forward_ms(plain, x, device, 30)
        results.append(dict(tokens=tokens, moeq_ms=ms_ours, modelopt_ms=ms_peer, speedup=ms_peer / ms_ours,
                            rel_err_moeq=relative(got_ours, ref), rel_err_modelopt=relative(got_peer, ref),
                            rel_moeq_vs_modelopt=relative(got_ours, got_peer), bf16_ms=ms_plain,
                            moeq_quant_after_gather_ms=float("nan")))  # fmt: skip
        outputs.append(got_ours if args.ab_gather else None)
        print(f"  {tokens} tokens done ({time.time() - started:.0f} s)", flush=True)
    if args.ab_gather:  # last, on graphs of its own (the module docstring says why), the switch held while timing
        from moeq.lowering import gather_quant

        torch._dynamo.reset()
        with gather_quant.enabled(False):
            after_gather = moeq_layer(copy.deepcopy(base), calib)
            for r, x, got_ours in zip(results, batches, outputs):
                with torch.no_grad():
                    r["_off"] = output(after_gather(x)).float()
                    bad = int((r["_off"] != got_ours).sum())  # 0 expected; sessions 40-41: 1356, session 42: 0
                    r["gather_quant_differing_outputs"] = bad  # of 33.5M at 16384 tokens (last bits, GEMM downstream)
                    if bad:
                        print(f"  {r['tokens']} tokens: {bad} outputs differ with gather_quant off", flush=True)
                    r["moeq_quant_after_gather_ms"] = forward_ms(after_gather, x, device, 30)
        for r, x, got_ours in zip(results, batches, outputs):  # moeq's layer again, on a fresh graph (after the reset)
            with torch.no_grad():
                again = output(ours(x)).float()
            r["moeq_rerun_differing_outputs"] = int((again != got_ours).sum())
            r["moeq_rerun_vs_off_differing_outputs"] = int((again != r.pop("_off")).sum())
            print(f"  {r['tokens']} tokens: moeq's layer again differs from its first output in "
                  f"{r['moeq_rerun_differing_outputs']}, from the pass-off layer's in "
                  f"{r['moeq_rerun_vs_off_differing_outputs']} outputs", flush=True)  # fmt: skip
    rows = [[str(r["tokens"]), f"{r['moeq_ms']:.3f}", f"{r['tokens'] / r['moeq_ms'] * 1e3:,.0f}",
             f"{r['modelopt_ms']:.3f}", f"{r['tokens'] / r['modelopt_ms'] * 1e3:,.0f}", f"{r['speedup']:.1f}x",
             "met" if r["speedup"] >= 3 else "MISSED", f"{r['bf16_ms']:.3f} ({r['bf16_ms'] / r['moeq_ms']:.2f}x)",
             f"{r['moeq_quant_after_gather_ms']:.3f}",
             f"{r['rel_err_moeq']:.3f} / {r['rel_err_modelopt']:.3f} / {r['rel_moeq_vs_modelopt']:.3f}"]
            for r in results]  # fmt: skip
    header = ["tokens", "moeq ms", "moeq tok/s", "modelopt ms", "modelopt tok/s", "speedup", ">= 3x",
              "bf16 compiled ms (vs bf16)", "moeq, quant after gather ms",
              "rel err vs bf16: moeq / modelopt / between"]  # fmt: skip
    print_and_save(args.out, "bench_e2e_modelopt", header, rows, results=results, shapes=shapes)


if __name__ == "__main__":
    main()
