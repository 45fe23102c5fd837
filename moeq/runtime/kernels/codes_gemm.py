"""The quantize-once GEMM: a persistent grouped GEMM of FP8 codes on the FP8 tensor cores.

Above :data:`~moeq.runtime.kernels.grouped_qmm.QUANTIZE_ONCE_ROWS_PER_EXPERT` mean rows per expert,
:func:`~moeq.runtime.kernels.grouped_qmm.grouped_qmm` quantizes each FP8 operand once (activation codes, QAT
weight codes) and multiplies the e4m3 codes here: ``out[rows of e] = (x_codes @ w_codes[e]) * s_x * s_w[e]``.

Persistent: one program per SM walks the (expert m-tile, n-tile) list with the grid as its stride, and the tile
loop and the K loop are one flattened loop (``tl.range(flatten=True)``), so Triton's software pipeliner issues
the next tile's first operand loads while a tile's epilogue scales and stores it. With short K (the down
projection: 6 steps of 128) a one-tile-per-program kernel spends a large share of each tile filling its pipeline
and storing its output with the tensor cores idle. Tiles and their experts come from ``offs`` on the device
(:func:`expert_tiles`, :func:`tile_rows`, the same prefix sum as the one-tile kernel); no tile straddles two
experts. Rows past ``offs[-1]`` (routed to no expert) get zero tiles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from moeq.runtime.kernels.launch import interpreting
from moeq.runtime.kernels.numerics import cast_like, fp8_scale, load_e4m3

__all__ = ["codes_gemm_configs", "expert_tiles", "grouped_codes_gemm", "tile_rows", "uses_codes_gemm"]


@triton.jit
def expert_tiles(offs_ptr, NUM_EXPERTS, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per expert (vectors over ``E_POW2``): index, first row, end row, m-tile count and inclusive prefix sum
    of the m-tile counts, from the cumulative ``offs``."""
    e_idx = tl.arange(0, E_POW2)
    valid = e_idx < NUM_EXPERTS
    ends = tl.load(offs_ptr + e_idx, mask=valid, other=0)
    starts = tl.load(offs_ptr + e_idx - 1, mask=valid & (e_idx > 0), other=0)
    tiles = tl.where(valid, tl.cdiv(ends - starts, BLOCK_M), 0)
    return e_idx, starts, ends, tiles, tl.cumsum(tiles, axis=0)


@triton.jit
def tile_rows(e_idx, starts, ends, tiles, cum, tile_m, M, NUM_EXPERTS, BLOCK_M: tl.constexpr):
    """(expert, first row, end row) of global m-tile ``tile_m``: experts' m-tiles in order, then the tiles of the
    unrouted tail rows (expert == NUM_EXPERTS, to be zeroed); end <= first for a spare program."""
    expert = tl.sum((cum <= tile_m).to(tl.int32), axis=0)
    here = e_idx == expert
    row_start = (
        tl.sum(tl.where(here, starts, 0), axis=0) + (tile_m - tl.sum(tl.where(here, cum - tiles, 0), axis=0)) * BLOCK_M
    )
    row_end = tl.sum(tl.where(here, ends, 0), axis=0)
    if expert >= NUM_EXPERTS:
        routed = tl.sum(tl.where(e_idx == NUM_EXPERTS - 1, ends, 0), axis=0)
        row_start = routed + (tile_m - tl.sum(tiles, axis=0)) * BLOCK_M
        row_end = M
    return expert, row_start, row_end


def codes_gemm_configs() -> list[triton.Config]:
    """Tiles ``(BLOCK_M, BLOCK_N, BLOCK_K)``, warps, stages and programs per SM (two only where two fit in shared
    memory); one small tile under the interpreter (the one-tile kernel's, so both sum in the same order)."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "PER_SM": 1})]
    candidates = [
        (128, 256, 128, 8, 3, 1),
        (128, 256, 128, 8, 4, 1),
        (128, 256, 64, 8, 4, 1),
        (128, 128, 128, 8, 4, 1),
        (128, 128, 128, 8, 3, 2),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "PER_SM": p}, num_warps=w, num_stages=s)
        for m, n, k, w, s, p in candidates
    ]


@triton.autotune(configs=codes_gemm_configs(), key=["N", "K", "NUM_EXPERTS", "M_BUCKET", "X_PER_EXPERT"])
@triton.jit
def _grouped_qmm_codes_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    offs_ptr,
    w_scale_ptr,
    x_amax_ptr,
    M,
    N,
    K,
    NUM_EXPERTS,
    M_BUCKET,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wk,
    stride_wn,
    stride_om,
    stride_on,
    E_POW2: tl.constexpr,
    X_PER_EXPERT: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PER_SM: tl.constexpr,
):
    e_idx, starts, ends, tiles, cum = expert_tiles(offs_ptr, NUM_EXPERTS, E_POW2, BLOCK_M)
    routed = tl.sum(tl.where(e_idx == NUM_EXPERTS - 1, ends, 0), axis=0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    num_tiles = (tl.sum(tiles, axis=0) + tl.cdiv(M - routed, BLOCK_M)) * n_tiles
    stride = tl.num_programs(0)
    # the epilogue's tile: the pipeliner runs the next tile's loads before it, so it keeps its own counter
    tile_out = tl.program_id(0) - stride
    for tile in tl.range(tl.program_id(0), num_tiles, stride, flatten=True):
        expert, row_start, row_end = tile_rows(e_idx, starts, ends, tiles, cum, tile // n_tiles, M, NUM_EXPERTS,
                                               BLOCK_M)  # fmt: skip
        e = tl.minimum(expert, NUM_EXPERTS - 1).to(tl.int64)
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < tl.where(expert < NUM_EXPERTS, row_end, 0)  # the unrouted tail multiplies zeros
        cols = (tile % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :] * stride_xk
            xa = load_e4m3(x_ptrs, row_mask[:, None] & (ks < K)[None, :], INTERPRET)
            w_ptrs = w_ptr + e * stride_we + cols.to(tl.int64)[:, None] * stride_wn + ks[None, :] * stride_wk
            wq = load_e4m3(w_ptrs, (cols < N)[:, None] & (ks < K)[None, :], INTERPRET)
            acc = tl.dot(xa, tl.trans(wq), acc)
        tile_out += stride
        expert, row_start, row_end = tile_rows(e_idx, starts, ends, tiles, cum, tile_out // n_tiles, M,
                                               NUM_EXPERTS, BLOCK_M)  # fmt: skip
        e_out = tl.minimum(expert, NUM_EXPERTS - 1)
        if X_PER_EXPERT:
            x_amax = tl.load(x_amax_ptr + e_out)
        else:
            x_amax = tl.load(x_amax_ptr)
        acc = acc * (fp8_scale(x_amax) * tl.load(w_scale_ptr + e_out))
        rows = row_start + tl.arange(0, BLOCK_M)
        cols = (tile_out % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        o_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(o_ptrs, cast_like(acc, out_ptr, INTERPRET), mask=(rows < row_end)[:, None] & (cols < N)[None, :])


def uses_codes_gemm(x: torch.Tensor, rows_per_expert_bound: int, num_experts: int) -> bool:
    """Whether a codes x codes product of ``x.shape[0]`` rows runs here (more than ``rows_per_expert_bound``
    mean rows per expert, on a GPU with FP8 tensor cores or under the interpreter)."""
    if x.shape[0] <= rows_per_expert_bound * max(1, num_experts):
        return False
    if x.device.type == "cuda":  # (tracing on fake CUDA tensors without a GPU: the one-tile kernel)
        return torch.cuda.is_available() and torch.cuda.get_device_capability(x.device) >= (8, 9)
    return interpreting()


def grouped_codes_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    offs: torch.Tensor,
    w_scale: torch.Tensor,
    x_amax: torch.Tensor,
    out: torch.Tensor,
    m_bucket: int,
    wrap: Callable[[Any], Any] | None = None,
) -> torch.Tensor:
    """``out = (x @ w[e]) * (x_amax / 448) * w_scale[e]`` per expert's rows, for e4m3 codes ``x [M, K]`` and ``w``
    logically ``[E, K, N]`` (float8_e4m3fn on the GPU, their uint8 bits under the interpreter), fp32
    ``w_scale [E]`` (the weight's FP8 scale) and ``x_amax [1]`` or ``[E]``. Validation is the caller's
    (:func:`~moeq.runtime.kernels.grouped_qmm.grouped_qmm`)."""
    m, k = x.shape
    num_experts, n = w.shape[0], w.shape[2]
    if x.device.type == "cuda":
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        sms = 4

    def grid(meta):  # persistent: programs per SM, fewer when there are fewer tiles
        tiles = (triton.cdiv(m, meta["BLOCK_M"]) + min(num_experts, m)) * triton.cdiv(n, meta["BLOCK_N"])
        return (min(sms * meta["PER_SM"], tiles),)

    kernel = wrap(_grouped_qmm_codes_kernel) if wrap is not None else _grouped_qmm_codes_kernel
    kernel[grid](
        x, w, out, offs, w_scale, x_amax,
        m, n, k, num_experts, m_bucket,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        E_POW2=max(triton.next_power_of_2(num_experts), 128),
        X_PER_EXPERT=x_amax.numel() > 1, INTERPRET=interpreting(),
    )  # fmt: skip
    return out
