"""The MoE combine: routed rows (expert-sorted) scaled by their routing weights, gathered back to token order
and summed over each token's top-k, in one pass.

transformers' grouped experts end with::

    weighted = y * w_sorted.unsqueeze(-1)                      # [S, H], S = T * top_k rows in expert order
    out = weighted[inv_perm].view(T, top_k, H).sum(dim=1)      # [T, H]

Inductor fuses that into one reduction over ``top_k`` whose row index comes from a load, so it cannot prove
the gathered addresses contiguous along H and reads them an element at a time (0.245 ms for Qwen3-30B-A3B's
4352 tokens on an H200, 0.65 TB/s; ``benchmarks/profile_moe_layer.py``). Here each program owns a tile of
tokens x H and, for each of the top_k slots, loads the gathered rows as whole contiguous runs of H.

The backward is two gradients of the same gathered rows: ``dy = grad[perm // top_k] * w[:, None]`` and
``dw = (grad[perm // top_k] * y).sum(1)``. Inductor runs them as two kernels that each gather ``grad`` an element
at a time (a pointwise one and a row reduction, 0.081 + 0.155 ms in a Qwen3-30B-A3B-shaped QAT step, BENCHMARKS.md
session 26); here one program owns a block of routed rows and walks H once, reading ``y`` and the gathered
gradient rows as contiguous runs and writing ``dy`` and ``dw``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from moeq.runtime.combine import (
    check_combine_args,
    check_combine_backward_args,
    combine_backward_dtypes,
    combine_dtype,
    combine_experts_backward_reference,
    combine_experts_reference,
)
from moeq.runtime.kernels.launch import (
    cdiv,
    combine_backward_configs,
    combine_configs,
    interpreting,
    known_empty,
    launch_kernel,
    run_kernel,
)
from moeq.runtime.kernels.numerics import cast_like

__all__ = ["combine_experts", "combine_experts_backward"]


@triton.autotune(configs=combine_configs(), key=["H", "TOP_K"])
@triton.jit
def _combine_experts_kernel(
    y_ptr,
    w_ptr,
    mask_ptr,
    index_ptr,
    out_ptr,
    T,
    H,
    stride_y,
    stride_mask,
    stride_out,
    TOP_K: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ROUND_PRODUCT: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # grid (H tiles, token tiles): H tiles fastest, so programs in flight share their tokens' index loads
    tokens = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_mask = tokens < T
    mask = t_mask[:, None] & (cols[None, :] < H)
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        rows = tl.load(index_ptr + tokens.to(tl.int64) * TOP_K + slot, mask=t_mask, other=0)
        y = tl.load(y_ptr + rows.to(tl.int64)[:, None] * stride_y + cols[None, :], mask=mask, other=0.0)
        if HAS_MASK:  # y * mask as torch multiplies by a bool (0 * inf and 0 * NaN stay NaN)
            keep = tl.load(mask_ptr + rows.to(tl.int64)[:, None] * stride_mask + cols[None, :], mask=mask, other=0)
            y = y.to(tl.float32) * keep.to(tl.float32)  # exact; in fp32 (the interpreter's bf16 0 * inf is 0)
        if HAS_WEIGHTS:
            # the model's product, rounded to y's dtype where eager torch's product has that dtype; the sum in fp32
            weight = tl.load(w_ptr + rows, mask=t_mask, other=0.0).to(tl.float32)
            product = y.to(tl.float32) * weight[:, None]
            acc += cast_like(product, y_ptr, INTERPRET).to(tl.float32) if ROUND_PRODUCT else product
        else:
            acc += y.to(tl.float32)
    out_offs = tokens.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out_ptr + out_offs, cast_like(acc, out_ptr, INTERPRET), mask=mask)


def combine_experts(
    y: torch.Tensor,
    weights: torch.Tensor | None,
    index: torch.Tensor,
    top_k: int,
    out_dtype: torch.dtype | None = None,
    wrap: Callable[[Any], Any] | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[t] = sum_j y[index[t*top_k + j]] * weights[index[t*top_k + j]]`` ([T, H]), as the model's eager code
    computes it: each product in the dtype torch promotes y and weights to (rounded to y's dtype when that is it),
    summed in fp32, cast to ``out_dtype`` (default: the promoted dtype); ``weights`` None: the rows unscaled (y's
    dtype). ``mask`` (bool, y's shape): ``y * mask`` in place of ``y``, read in the same pass (an activation's STE
    mask on the gradient this sums). ``index`` holds valid row numbers of ``y`` (not bounds-checked on the GPU).
    ``wrap``: applied to the kernel before launching (``wrap_triton`` in a triton_op)."""
    check_combine_args(y, weights, index, top_k, out_dtype, mask)
    rows, hidden = y.shape
    tokens = rows // top_k
    product_dtype = combine_dtype(y, weights)
    out = torch.empty(tokens, hidden, dtype=out_dtype or product_dtype, device=y.device)
    if known_empty(tokens, hidden):
        return out
    y = y if y.stride(1) == 1 else y.contiguous()
    index = index.contiguous()  # the kernel reads the indices and weights at unit stride
    weights = weights.contiguous() if weights is not None else None
    mask_bytes = None if mask is None else (mask if mask.stride(1) == 1 else mask.contiguous()).view(torch.uint8)

    def launch():
        def grid(meta):
            return (cdiv(hidden, meta["BLOCK_H"]), cdiv(tokens, meta["BLOCK_T"]))

        kernel = wrap(_combine_experts_kernel) if wrap is not None else _combine_experts_kernel
        launch_kernel(kernel, grid, y, weights if weights is not None else y, mask_bytes if mask is not None else y,
                      index, out, tokens, hidden, y.stride(0), mask_bytes.stride(0) if mask is not None else 0,
                      out.stride(0), TOP_K=top_k, HAS_WEIGHTS=weights is not None, HAS_MASK=mask is not None,
                      ROUND_PRODUCT=product_dtype == y.dtype, INTERPRET=interpreting())  # fmt: skip
        return out

    return run_kernel(y, launch, lambda: combine_experts_reference(y, weights, index, top_k, out_dtype, mask))


@triton.autotune(configs=combine_backward_configs(), key=["H", "TOP_K"])
@triton.jit
def _combine_experts_backward_kernel(
    grad_ptr,
    y_ptr,
    w_ptr,
    index_ptr,
    dy_ptr,
    dw_ptr,
    S,
    H,
    stride_grad,
    stride_y,
    stride_dy,
    TOP_K: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < S
    tokens = tl.load(index_ptr + rows, mask=r_mask, other=0).to(tl.int64) // TOP_K
    weight = tl.load(w_ptr + rows, mask=r_mask, other=0.0).to(tl.float32)
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for start in range(0, H, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        mask = r_mask[:, None] & (cols[None, :] < H)
        g = tl.load(grad_ptr + tokens[:, None] * stride_grad + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows64[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy_offs = rows64[:, None] * stride_dy + cols[None, :]
        tl.store(dy_ptr + dy_offs, cast_like(g * weight[:, None], dy_ptr, INTERPRET), mask=mask)
        acc += tl.sum(g * y, axis=1)
    tl.store(dw_ptr + rows, cast_like(acc, dw_ptr, INTERPRET), mask=r_mask)


def combine_experts_backward(
    grad: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    index: torch.Tensor,
    top_k: int,
    wrap: Callable[[Any], Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The combine's gradients ``(dy [S, H], dweights [S])`` for the token gradient ``grad [S / top_k, H]``:
    routed row ``r`` takes ``g = grad[index[r] // top_k]`` (``index``: the sort permutation, valid token slots, not
    bounds-checked on the GPU); ``dy[r] = g * weights[r]`` (rounded once: eager torch's and Inductor's bits),
    ``dweights[r] = sum(g * y[r])`` (products and sum in fp32, rounded once, as Inductor's reduction does; eager
    torch rounds each bf16 product first). ``wrap``: applied to the kernel before launching (``wrap_triton`` in a
    triton_op)."""
    check_combine_backward_args(grad, y, weights, index, top_k)
    rows, hidden = y.shape
    dy_dtype, dw_dtype = combine_backward_dtypes(grad, y, weights)
    dy = torch.empty(rows, hidden, dtype=dy_dtype, device=y.device)
    dw = torch.empty(rows, dtype=dw_dtype, device=y.device)
    if known_empty(rows, hidden):
        return dy, dw
    grad = grad if grad.stride(1) == 1 else grad.contiguous()
    y = y if y.stride(1) == 1 else y.contiguous()
    index, weights = index.contiguous(), weights.contiguous()

    def launch():
        def grid(meta):
            return (cdiv(rows, meta["BLOCK_R"]),)

        kernel = wrap(_combine_experts_backward_kernel) if wrap is not None else _combine_experts_backward_kernel
        launch_kernel(kernel, grid, grad, y, weights, index, dy, dw, rows, hidden, grad.stride(0), y.stride(0),
                      dy.stride(0), TOP_K=top_k, INTERPRET=interpreting())  # fmt: skip
        return dy, dw

    return run_kernel(y, launch, lambda: combine_experts_backward_reference(grad, y, weights, index, top_k))
