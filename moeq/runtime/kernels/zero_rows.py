"""Zero the rows of a grouped GEMM's output past the last expert's end (``offs[-1]``), in place.

``torch._grouped_mm`` leaves the rows at or past ``offs[-1]`` unwritten, and moeq's grouped GEMM contract has
them zero. ``torch.where(rows < offs[-1], out, 0)`` rewrites the whole output to fix a tail that is empty in a
model whose every row is routed: in a QAT FP8 training step of one Qwen3-30B-A3B layer at 4352 tokens those
passes took 0.254 ms (H200, ``benchmarks/profile_moe_layer.py``, BENCHMARKS.md session 26). Here the end is
read on the device (no host sync), programs wholly before it return at once, and only the tail is written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from moeq.runtime.kernels.launch import cdiv, known_empty, launch_kernel, run_kernel

__all__ = ["zero_unrouted_rows_", "zero_unrouted_rows_reference"]


@triton.jit
def _zero_unrouted_rows_kernel(
    out_ptr,
    offs_ptr,
    M,
    N,
    stride_m,
    stride_n,
    num_experts,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    first = tl.program_id(0) * BLOCK_M
    routed_end = tl.load(offs_ptr + num_experts - 1)
    if first + BLOCK_M > routed_end:
        rows = first + tl.arange(0, BLOCK_M)
        row_mask = (rows >= routed_end) & (rows < M)
        zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            offsets = rows.to(tl.int64)[:, None] * stride_m + cols[None, :].to(tl.int64) * stride_n
            tl.store(out_ptr + offsets, zeros, mask=row_mask[:, None] & (cols[None, :] < N))


def zero_unrouted_rows_reference(out: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``out`` with the rows at or past ``offs[-1]`` zero (all rows with no experts), in plain torch."""
    rows = torch.arange(out.shape[0], device=out.device)
    routed = rows < offs[-1] if offs.numel() else torch.zeros_like(rows, dtype=torch.bool)
    return out.masked_fill_(~routed.unsqueeze(1), 0)


def zero_unrouted_rows_(
    out: torch.Tensor, offs: torch.Tensor, wrap: Callable[[Any], Any] | None = None
) -> torch.Tensor:
    """Zero ``out [M, N]``'s rows at or past ``offs[-1]`` (int32 cumulative row ends, one per expert) in place and
    return ``out``. ``wrap``: applied to the kernel before launching (``wrap_triton`` in a triton_op)."""
    if out.dim() != 2:
        raise ValueError(f"zero_unrouted_rows_: out must be 2-D [rows, cols], got shape {tuple(out.shape)}")
    if offs.dtype != torch.int32 or offs.dim() != 1 or offs.device != out.device:
        raise ValueError(
            f"zero_unrouted_rows_: offs must be int32 cumulative row ends [E] on {out.device}, got "
            f"{offs.dtype}{tuple(offs.shape)} on {offs.device}"
        )
    num_rows, num_cols = out.shape
    if offs.numel() == 0:
        return out.zero_()

    def launch() -> torch.Tensor:
        if known_empty(num_rows, num_cols):
            return out
        kernel = wrap(_zero_unrouted_rows_kernel) if wrap is not None else _zero_unrouted_rows_kernel
        launch_kernel(kernel, (cdiv(num_rows, 64),), out, offs, num_rows, num_cols, out.stride(0), out.stride(1),
                      offs.numel(), BLOCK_M=64, BLOCK_N=128)  # fmt: skip
        return out

    return run_kernel(out, launch, lambda: zero_unrouted_rows_reference(out, offs))
