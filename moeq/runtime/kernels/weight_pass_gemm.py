"""QAT FP8 at training sizes in one launch: the weight's e4m3 codes pass and the codes GEMM, overlapped.

Above :data:`moeq.runtime.kernels.grouped_qmm.WEIGHT_CODES_ROWS_PER_EXPERT` rows per expert a QAT FP8 grouped GEMM
quantizes its bf16 weight once (a memory-bound pass: read 2 bytes, write 1 per element) and multiplies the codes on
the FP8 tensor cores (compute-bound). Run one after the other (two launches) they add up; this kernel runs them
together. One persistent program per SM takes work items from an atomic ticket counter, in an order that puts the
conversion of expert ``e + LOOKAHEAD`` beside the GEMM tiles of expert ``e``::

    slot j: [convert expert j: cdiv(N, CONV_N * CONV_TILES) items] [GEMM tiles of expert j - LOOKAHEAD]
    last slot: the tiles of the unrouted rows past offs[-1] (zeros)

so the SMs that convert use the HBM bandwidth the SMs that multiply leave. A GEMM tile of expert ``e`` first waits
until every conversion item of ``e`` has published its codes (a per-expert counter: the converting program's
stores, a CTA barrier, then a release increment; the GEMM's acquire load). Tickets are handed out in order and a
conversion never waits, so every wait ends: the items it waits for hold smaller tickets, taken by running programs.
Under Triton's interpreter the programs run one after another and the first takes every ticket in order.

The codes are written to ``w_codes`` (the FP8 ``quantize`` of :mod:`moeq.formats` bit for bit, as
:func:`moeq.runtime.kernels.fake_quant_experts` with ``codes=True``), so a caller can keep them (training saves
them for the backward). The GEMM tiles are :func:`moeq.runtime.kernels.grouped_qmm.multiply_tile_with_tail` of
the codes, so the output equals the two-launch path's bit for bit (for the same tile, :func:`codes_gemm_tile`).

Measured on the H200 (BENCHMARKS.md, session 30): bit-exact, and slower than the two launches (Qwen3 gate_up at 34k
rows 0.79-1.28 ms against 0.64-0.65 ms). The GEMM's program (8 warps, ~245 registers, 192 KB of shared memory)
holds its SM alone, so an SM converts or multiplies, never both, and one such program converts at about the SM's
average share of HBM bandwidth: splitting the SMs between the roles hides nothing. So
:data:`moeq.runtime.kernels.grouped_qmm.WEIGHT_PASS_IN_GEMM` is off. ``STATIC_SCHEDULE`` (tickets dealt round-robin,
no counter) and ``PARTS`` (1: GEMM tiles only, on codes written before; 2: conversion only) are for
``benchmarks/probe_weight_pass_parts.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from moeq.runtime.kernels.grouped_qmm import (
    TAIL_ROWS,
    W_FP8,
    X_FP8_CODES,
    m_bucket,
    multiply_tile_with_tail,
)
from moeq.runtime.kernels.launch import interpreting, launch_kernel
from moeq.runtime.kernels.numerics import fp8_codes

__all__ = ["codes_gemm_tile", "weight_pass_gemm", "weight_pass_gemm_configs"]


def weight_pass_gemm_configs() -> list[triton.Config]:
    """The codes GEMM's training-size tile (128x256x128 FP8 dots, 4 stages, 64-row tails) with the conversion
    item (``CONV_TILES`` tiles of ``[CONV_N, CONV_K]`` weight elements, ``CONV_STAGES`` in flight; 1: plain loads,
    the fastest measured, session 30) and the lookahead in experts; one tiny config under the interpreter."""
    if interpreting():
        meta = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SWAP_AB": False, "FP8_DOT": False}
        return [triton.Config(meta | {"CONV_N": 8, "CONV_K": 32, "CONV_TILES": 2, "CONV_STAGES": 2, "LOOKAHEAD": 1})]
    gemm = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "SWAP_AB": False, "FP8_DOT": True, "TAIL_M": TAIL_ROWS}
    return [
        triton.Config(
            gemm | {"CONV_N": conv_n, "CONV_K": conv_k, "CONV_TILES": tiles, "CONV_STAGES": stages, "LOOKAHEAD": 2},
            num_warps=8,
            num_stages=4,
        )
        for conv_n, conv_k, tiles, stages in ((32, 512, 1, 1), (32, 512, 2, 1), (32, 512, 4, 1), (32, 512, 2, 3))
    ]


def codes_gemm_tile(config: triton.Config) -> triton.Config:
    """The one-tile codes GEMM config (:func:`moeq.runtime.kernels.grouped_qmm.grouped_qmm`'s ``config``) with the
    GEMM tile of a ``weight_pass_gemm`` config: FP8 MMA sums depend on the tile, so this is the two-launch product
    the one launch equals bit for bit."""
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SWAP_AB", "FP8_DOT", "TAIL_M")
    tile = {key: config.kwargs[key] for key in keys if key in config.kwargs}
    return triton.Config(tile, num_warps=config.num_warps, num_stages=config.num_stages)


@triton.jit
def _convert_item(w_ptr, codes_ptr, amax_ptr, sync_ptr, expert, chunk, N, K,
                  stride_we, stride_wk, stride_wn, stride_ce, stride_ck, stride_cn,
                  W_PER_CHANNEL: tl.constexpr, INTERPRET: tl.constexpr, CONV_N: tl.constexpr,
                  CONV_K: tl.constexpr, CONV_TILES: tl.constexpr, CONV_STAGES: tl.constexpr):  # fmt: skip
    """Weight rows ``[chunk * CONV_TILES * CONV_N, +CONV_TILES * CONV_N)`` (along N) of ``expert``, all of K, to
    their e4m3 codes, ``[CONV_N, CONV_K]`` tiles in one pipelined loop (``CONV_STAGES`` tiles in flight through
    shared memory: one SM needs that many bytes outstanding to stream at several times its share of HBM
    bandwidth); then count the chunk as published in the expert's counter."""
    e = expert.to(tl.int64)
    k_tiles = tl.cdiv(K, CONV_K)
    if not W_PER_CHANNEL:
        amax = tl.load(amax_ptr + e)
    for t in tl.range(0, CONV_TILES * k_tiles, num_stages=CONV_STAGES):
        cols_n = (chunk * CONV_TILES + t // k_tiles) * CONV_N + tl.arange(0, CONV_N)
        ks = (t % k_tiles) * CONV_K + tl.arange(0, CONV_K)[None, :]
        n_mask = cols_n < N
        mask = n_mask[:, None] & (ks < K)
        w_rows = w_ptr + e * stride_we + cols_n.to(tl.int64)[:, None] * stride_wn
        w = tl.load(w_rows + ks * stride_wk, mask=mask, other=0.0).to(tl.float32)
        if W_PER_CHANNEL:
            amax = tl.load(amax_ptr + e * N + cols_n, mask=n_mask, other=0.0)[:, None]
        codes = fp8_codes(w, amax, INTERPRET).to(codes_ptr.dtype.element_ty)
        c_rows = codes_ptr + e * stride_ce + cols_n.to(tl.int64)[:, None] * stride_cn
        tl.store(c_rows + ks * stride_ck, codes, mask=mask)
    tl.debug_barrier()  # every thread's stores before the release below (cumulative at GPU scope)
    tl.atomic_add(sync_ptr + 1 + expert, 1, sem="release", scope="gpu")


@triton.jit
def _wait_for_codes(sync_ptr, expert, chunks):
    """Spin until all ``chunks`` conversion items of ``expert`` are published (acquire)."""
    done = tl.atomic_add(sync_ptr + 1 + expert, 0, sem="acquire", scope="gpu")
    while done < chunks:
        done = tl.atomic_add(sync_ptr + 1 + expert, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.autotune(
    configs=weight_pass_gemm_configs(),
    key=["N", "K", "NUM_EXPERTS", "M_BUCKET", "W_PER_CHANNEL"],
    reset_to_zero=["sync_ptr"],
)
@triton.jit
def _weight_pass_gemm_kernel(
    x_ptr,
    w_ptr,
    codes_ptr,
    codes_bits_ptr,
    out_ptr,
    offs_ptr,
    w_amax_ptr,
    w_scale_ptr,
    x_amax_ptr,
    sync_ptr,
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
    stride_ce,
    stride_ck,
    stride_cn,
    stride_om,
    stride_on,
    S_POW2: tl.constexpr,
    X_AMAX: tl.constexpr,
    W_PER_CHANNEL: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
    FP8_DOT: tl.constexpr,
    CONV_N: tl.constexpr,
    CONV_K: tl.constexpr,
    CONV_TILES: tl.constexpr,
    CONV_STAGES: tl.constexpr,
    LOOKAHEAD: tl.constexpr,
    STATIC_SCHEDULE: tl.constexpr = False,
    PARTS: tl.constexpr = 0,
    TAIL_M: tl.constexpr = 0,
):
    n_tiles = tl.cdiv(N, BLOCK_N)
    chunks = tl.cdiv(N, CONV_N * CONV_TILES)
    # the work table, one entry per slot (module doc): its tickets (conversion items + GEMM tiles), and one past
    # its last ticket
    slot = tl.arange(0, S_POW2)
    ge = slot - LOOKAHEAD
    has_gemm = (ge >= 0) & (ge < NUM_EXPERTS)
    is_tail = ge == NUM_EXPERTS
    routed = tl.load(offs_ptr + NUM_EXPERTS - 1)
    ends = tl.load(offs_ptr + ge, mask=has_gemm, other=0)
    starts = tl.load(offs_ptr + ge - 1, mask=has_gemm & (ge > 0), other=0)
    starts = tl.where(is_tail, routed, starts)
    ends = tl.where(is_tail, M, ends)
    m_tiles = tl.where(has_gemm | is_tail, tl.cdiv(ends - starts, BLOCK_M), 0)
    conv = tl.where(slot < NUM_EXPERTS, chunks, 0) if PARTS != 1 else tl.zeros_like(slot)
    count = conv + m_tiles * n_tiles if PARTS != 2 else conv
    last = tl.cumsum(count, axis=0)  # one past each slot's last ticket
    total = tl.sum(count, axis=0)

    if STATIC_SCHEDULE:  # ticket t to program t % programs, in order (no counter; every program resident)
        ticket = tl.program_id(0)
    else:
        ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed")
    while ticket < total:
        if STATIC_SCHEDULE:
            following = ticket + tl.num_programs(0)
        else:
            following = tl.atomic_add(sync_ptr, 1, sem="relaxed")  # requested now, its latency under this item
        _run_item(
        ticket, last, chunks, n_tiles,
        x_ptr, w_ptr, codes_ptr, codes_bits_ptr, out_ptr, offs_ptr, w_amax_ptr, w_scale_ptr, x_amax_ptr, sync_ptr,
        M, N, K, NUM_EXPERTS, stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ce, stride_ck, stride_cn,
        stride_om, stride_on, X_AMAX, W_PER_CHANNEL, DOT_IEEE, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_K, SWAP_AB,
        FP8_DOT, CONV_N, CONV_K, CONV_TILES, CONV_STAGES, LOOKAHEAD, TAIL_M, PARTS,
        )  # fmt: skip
        ticket = following


@triton.jit
def _run_item(
    ticket, last, chunks, n_tiles,
    x_ptr, w_ptr, codes_ptr, codes_bits_ptr, out_ptr, offs_ptr, w_amax_ptr, w_scale_ptr, x_amax_ptr, sync_ptr, M,
    N, K, NUM_EXPERTS, stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ce, stride_ck, stride_cn,
    stride_om, stride_on, X_AMAX: tl.constexpr, W_PER_CHANNEL: tl.constexpr, DOT_IEEE: tl.constexpr,
    INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr, FP8_DOT: tl.constexpr, CONV_N: tl.constexpr, CONV_K: tl.constexpr,
    CONV_TILES: tl.constexpr, CONV_STAGES: tl.constexpr, LOOKAHEAD: tl.constexpr, TAIL_M: tl.constexpr,
    PARTS: tl.constexpr,
):  # fmt: skip
    """Work item ``ticket`` of the table (module doc): a conversion item, or a GEMM tile once its expert's codes
    are published. Two reductions over the table find its slot and the slot's first ticket; the rest is scalar."""
    done = last <= ticket
    j = tl.sum(done.to(tl.int32), axis=0)
    r = ticket - tl.max(tl.where(done, last, 0), axis=0)
    conv_j = tl.where(j < NUM_EXPERTS, chunks, 0) if PARTS != 1 else 0
    if r < conv_j:
        _convert_item(w_ptr, codes_ptr, w_amax_ptr, sync_ptr, j, r, N, K,
                      stride_we, stride_wk, stride_wn, stride_ce, stride_ck, stride_cn,
                      W_PER_CHANNEL, INTERPRET, CONV_N, CONV_K, CONV_TILES, CONV_STAGES)  # fmt: skip
    else:
        g = r - conv_j
        expert = j - LOOKAHEAD
        if expert < NUM_EXPERTS:
            first = tl.load(offs_ptr + expert - 1, mask=expert > 0, other=0)
            row_end = tl.load(offs_ptr + expert)
        else:  # the unrouted rows
            first = tl.load(offs_ptr + NUM_EXPERTS - 1)
            row_end = M
        row_start = first + (g // n_tiles) * BLOCK_M
        pid_n = g % n_tiles
        if expert < NUM_EXPERTS and PARTS == 0:
            _wait_for_codes(sync_ptr, expert, chunks)
        multiply_tile_with_tail(
        x_ptr, codes_bits_ptr, out_ptr, w_scale_ptr, w_scale_ptr, x_amax_ptr, expert, row_start, row_end, pid_n,
        N, K, NUM_EXPERTS, stride_xm, stride_xk, stride_ce, stride_ck, stride_cn, 0, 0, 0, stride_om, stride_on,
        W_FP8, X_FP8_CODES, X_AMAX, W_PER_CHANNEL, DOT_IEEE, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_K, SWAP_AB, FP8_DOT,
        TAIL_M,
        )  # fmt: skip


def _check(x_codes: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, out: torch.Tensor, codes: torch.Tensor) -> None:
    if x_codes.dim() != 2 or w.dim() != 3 or x_codes.shape[1] != w.shape[1]:
        raise ValueError(f"weight_pass_gemm takes x codes [M, K] and w [E, K, N], got {tuple(x_codes.shape)} and "
                         f"{tuple(w.shape)}")  # fmt: skip
    if x_codes.element_size() != 1:
        raise ValueError(f"x_codes must be e4m3 codes (float8_e4m3fn or uint8), got {x_codes.dtype}")
    if codes.shape != w.shape or codes.dtype != torch.float8_e4m3fn:
        raise ValueError(f"codes must be float8_e4m3fn {tuple(w.shape)} (w's shape), got {codes.dtype} "
                         f"{tuple(codes.shape)}")  # fmt: skip
    if out.shape != (x_codes.shape[0], w.shape[2]):
        raise ValueError(f"out must be [{x_codes.shape[0]}, {w.shape[2]}], got {tuple(out.shape)}")
    if offs.dtype != torch.int32 or offs.numel() != w.shape[0]:
        raise ValueError(
            f"offs must be int32 [{w.shape[0]}] cumulative row counts, got {offs.dtype} {tuple(offs.shape)}"
        )


def _sm_count(device: torch.device) -> int:
    """The device's SM count: one persistent program each. Without a CUDA driver (tracing on fake CUDA
    tensors) H100 / H200's 132; the traced launch is not run there."""
    if not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def weight_pass_gemm(
    x_codes: torch.Tensor,
    w: torch.Tensor,
    offs: torch.Tensor,
    w_amax: torch.Tensor,
    w_scale: torch.Tensor,
    x_amax: torch.Tensor,
    out: torch.Tensor,
    codes: torch.Tensor,
    wrap: Callable[[Any], Any] | None = None,
    x_per_row: bool = False,
    config: triton.Config | None = None,
    programs: int | None = None,
) -> torch.Tensor:
    """``out = x_codes @ codes(w)`` per expert, writing ``codes`` (e4m3 of ``w / (w_amax / 448)``, ``w``'s shape)
    on the way, in one persistent launch (module doc). Arguments as the codes GEMM of
    :func:`moeq.runtime.kernels.grouped_qmm.grouped_qmm` takes them after its checks: ``x_codes`` e4m3 ``[M, K]``
    (float8_e4m3fn or its uint8 bits), ``w`` float ``[E, K, N]`` (any strides), ``w_amax`` / ``w_scale`` fp32 ``[E]``
    or ``[E, N]`` (the amax and its ``amax / 448``), ``x_amax`` fp32 ``[1]``, ``[E]``, or ``[M]`` with
    ``x_per_row`` (dynamic per-token codes). ``config``: launch with this config instead of autotuning.
    ``programs``: the persistent grid (default: one per SM; one under the interpreter, which runs programs in turn)."""
    _check(x_codes, w, offs, out, codes)
    m, k = x_codes.shape
    x_codes = x_codes.view(torch.uint8 if interpreting() else torch.float8_e4m3fn)  # the interpreter decodes bits
    num_experts, n = w.shape[0], w.shape[2]
    sync = torch.zeros(1 + num_experts, dtype=torch.int32, device=w.device)
    if programs is None:
        programs = 1 if interpreting() else _sm_count(w.device)
    per_channel = w_amax.dim() == 2
    x_amax_mode = 2 if x_per_row else int(x_amax.numel() > 1)
    kernel, meta = _weight_pass_gemm_kernel, {}
    configs = weight_pass_gemm_configs()
    if config is not None:
        kernel, configs = _weight_pass_gemm_kernel.fn, [config]
        meta = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    lookahead = max(c.kwargs["LOOKAHEAD"] for c in configs)
    kernel = wrap(kernel) if wrap is not None else kernel
    launch_kernel(kernel, (programs,),
        x_codes, w, codes, codes.view(torch.uint8) if interpreting() else codes, out, offs, w_amax, w_scale, x_amax, sync,
        m, n, k, num_experts, m_bucket(m, num_experts),
        x_codes.stride(0), x_codes.stride(1), w.stride(0), w.stride(1), w.stride(2),
        codes.stride(0), codes.stride(1), codes.stride(2), out.stride(0), out.stride(1),
        S_POW2=triton.next_power_of_2(num_experts + lookahead + 1), X_AMAX=x_amax_mode, W_PER_CHANNEL=per_channel,
        DOT_IEEE=out.dtype == torch.float32, INTERPRET=interpreting(), **meta,
    )  # fmt: skip
    return out
