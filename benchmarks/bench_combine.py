"""The MoE combine alone: ``moeq::combine_experts`` vs the same expression compiled by Inductor, and eager.

transformers' grouped experts end with ``(y * w[:, None])[inv_perm].view(T, k, H).sum(1)`` (routing-weight
scaling, un-permute, top-k sum). Shapes: Qwen3-30B-A3B (H 2048, top-8, bf16 routing weights) at 64, 4352 and
16384 tokens; Mixtral (H 4096, top-2, fp32 routing weights, the sum cast back to bf16) at 4096 tokens. Bytes: y
read once, the output written once, plus the weights and indices. Timed as CUDA-graph replays (median of
``triton.testing.do_bench_cudagraph``), so the kernels' time, not the host's launch overhead (moeq's op launches
from Python: tens of microseconds, more than the kernel at 64 tokens). Anchor in the same run: an HBM copy of y's
bytes (``torch.Tensor.copy_``). Each variant's largest relative error against the float64 combine is printed.

    python benchmarks/bench_combine.py --out $OUT
    python benchmarks/bench_combine.py --backward --out $OUT   # the two gradients: moeq::combine_experts_backward

``--backward`` times the combine's gradients for a token gradient ``g [T, H]``: ``dy = g[perm // k] * w[:, None]``
and ``dw = (g[perm // k] * y).sum(1)``, as Inductor compiles them (two kernels) against the one moeq kernel. Bytes:
y read, dy written, g read once, weights, indices and dw. Error: dw's largest relative error against float64 (dy
must equal Inductor's bit for bit).
"""

from __future__ import annotations

import argparse
import os

import torch
from report import print_and_save
from triton.testing import do_bench_cudagraph

import moeq  # noqa: F401  (registers moeq::combine_experts)

CASES = [  # (label, tokens, top_k, hidden, routing-weight dtype)
    ("qwen3 64", 64, 8, 2048, torch.bfloat16),
    ("qwen3 4352", 4352, 8, 2048, torch.bfloat16),
    ("qwen3 16384", 16384, 8, 2048, torch.bfloat16),
    ("mixtral 4096", 4096, 2, 4096, torch.float32),
    ("top-4 4352", 4352, 4, 2048, torch.bfloat16),
    ("top-2 4352", 4352, 2, 2048, torch.bfloat16),
]


def routed(tokens: int, top_k: int, hidden: int, w_dtype: torch.dtype, experts: int = 128):
    g = torch.Generator(device="cuda").manual_seed(tokens)
    ids = torch.rand(tokens, experts, device="cuda", generator=g).topk(top_k, dim=-1).indices.reshape(-1)
    _, perm = torch.sort(ids)
    weights = torch.rand(tokens * top_k, device="cuda", generator=g).to(w_dtype)[perm]
    y = torch.randn(tokens * top_k, hidden, device="cuda", generator=g).bfloat16()
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device="cuda")
    return y, weights, inv_perm


def expression(y, weights, inv_perm, top_k: int):
    return (y * weights.unsqueeze(-1))[inv_perm].view(-1, top_k, y.shape[1]).sum(dim=1).to(y.dtype)


def float64_combine(y, weights, inv_perm, top_k: int) -> torch.Tensor:
    terms = (y.double() * weights.double().unsqueeze(-1)).to(torch.promote_types(y.dtype, weights.dtype)).double()
    return terms[inv_perm].view(-1, top_k, y.shape[1]).sum(dim=1)


def backward_pair(grad, y, weights, perm, top_k: int):
    """The combine's gradients as the backward graph has them once the scatter is a gather (moeq's permutation
    pass): the token gradient repeated top_k times, gathered through the sort permutation."""
    rows = grad.unsqueeze(1).expand(-1, top_k, -1).reshape(-1, grad.shape[1])[perm]
    return rows * weights.unsqueeze(-1), (rows * y).sum(1)


def backward_variants(tokens: int, top_k: int, hidden: int, w_dtype: torch.dtype):
    """``(variants, bytes moved, error of one variant's output)`` for the combine's backward."""
    y, weights, inv_perm = routed(tokens, top_k, hidden, w_dtype)
    perm = torch.argsort(inv_perm)
    grad = torch.randn(tokens, hidden, device="cuda", dtype=y.dtype)
    args = (grad, y, weights, perm, top_k)
    dy_bytes = y.numel() * torch.promote_types(y.dtype, w_dtype).itemsize
    moved = y.numel() * 2 + dy_bytes + grad.numel() * 2 + weights.numel() * (weights.element_size() + 8 + 2)
    rows = grad.double()[perm // top_k]
    want_dw = (rows * y.double()).sum(1)
    compiled = torch.compile(backward_pair, dynamic=False)
    want_dy = compiled(*args)[0]
    variants = {
        "Inductor": lambda: compiled(*args),
        "eager torch": lambda: backward_pair(*args),
        "moeq::combine_experts_backward": lambda: torch.ops.moeq.combine_experts_backward(*args),
    }

    def error(out) -> float:
        dy, dw = out
        assert torch.equal(dy, want_dy), "dy differs from Inductor's"
        return float((dw.double() - want_dw).abs().max() / want_dw.abs().max())

    return variants, moved, error, y


def forward_variants(tokens: int, top_k: int, hidden: int, w_dtype: torch.dtype):
    """``(variants, bytes moved, error of one variant's output)`` for the combine."""
    y, weights, inv_perm = routed(tokens, top_k, hidden, w_dtype)
    moved = y.numel() * 2 + tokens * hidden * 2 + weights.numel() * (weights.element_size() + 8)
    want = float64_combine(y, weights, inv_perm, top_k)
    compiled = torch.compile(expression, dynamic=False)
    variants = {
        "Inductor": lambda: compiled(y, weights, inv_perm, top_k),
        "eager torch": lambda: expression(y, weights, inv_perm, top_k),
        "moeq::combine_experts": lambda: torch.ops.moeq.combine_experts(y, weights, inv_perm, top_k, y.dtype),
    }
    return variants, moved, lambda out: float((out.double() - want).abs().max() / want.abs().max()), y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--only", default="", help="comma-separated case labels (default: all)")
    parser.add_argument("--backward", action="store_true", help="time the combine's gradients instead")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows, results = [], []
    for label, tokens, top_k, hidden, w_dtype in CASES:
        if args.only and label not in args.only.split(","):
            continue
        torch._dynamo.reset()
        case = backward_variants if args.backward else forward_variants
        variants, moved, error, y = case(tokens, top_k, hidden, w_dtype)
        # every output checked before any CUDA-graph capture (session 25's first run checked them after the copy
        # anchor's capture and read 1.2 for all three variants, eager torch included: a harness artifact)
        errors = {name: error(fn()) for name, fn in variants.items()}
        copy_dst = torch.empty_like(y)
        copy_ms = do_bench_cudagraph(lambda: copy_dst.copy_(y), return_mode="median")  # noqa: B023
        copy_tbs = 2 * y.numel() * 2 / copy_ms / 1e9
        timed = {}
        for name, fn in variants.items():
            err = errors[name]
            ms = do_bench_cudagraph(fn, return_mode="median")
            timed[name] = ms
            tbs = moved / ms / 1e9
            results.append(dict(case=label, variant=name, ms=ms, tb_s=tbs, copy_tb_s=copy_tbs, max_rel_err=err))
            rows.append([label, name, f"{ms:.4f}", f"{tbs:.2f}", f"{tbs / copy_tbs:.2f}",
                         f"{timed.get('Inductor', ms) / ms:.2f}x", f"{err:.1e}"])  # fmt: skip
        print(f"  {label} done", flush=True)
    header = ["case", "variant", "ms", "TB/s", "vs copy", "vs Inductor", "max err / max |out|"]
    name = "bench_combine_backward" if args.backward else "bench_combine"
    print_and_save(args.out, name, header, rows, results=results)


if __name__ == "__main__":
    main()
