"""Activation fake quant of routed rows: with a static amax, shared or selected per row by ``offs``
(:func:`fake_quant_act`), or FP8 with dynamic per-token scales, each row's own amax (:func:`fake_quant_tokens`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from moeq.formats import QuantFormat, get_format, token_amax
from moeq.runtime.kernels.launch import (
    as_fp32,
    cdiv,
    check_float,
    interpreting,
    known_empty,
    launch_kernel,
    run_kernel,
    tile_configs,
)
from moeq.runtime.kernels.numerics import (
    abs_bits,
    cast_like,
    fake_quant_fp8,
    fake_quant_nvfp4,
    float_of_abs_bits,
    fp8_codes,
)
from moeq.runtime.kernels.segment_amax import expert_of_rows
from moeq.segments import per_row_amax

__all__ = ["act_codes_reference", "fake_quant_act", "fake_quant_tokens", "row_amax", "token_codes", "wgmma_k_order"]


def check_wgmma_k_order(k: int) -> None:
    """Raise ``ValueError`` unless K can be permuted into :func:`wgmma_k_order` (whole 64-chunks)."""
    if k % 64:
        raise ValueError(f"wgmma_k_order permutes 64-chunks of K; K = {k} is not a multiple of 64")


def wgmma_k_order(x: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` with K permuted within each 64-chunk: column ``16 c + 8 h + 2 t + b`` holds ``k = 16 t + 4 c + 2 h +
    b``. It is the order in which the register-operand QAT NVFP4 kernel (``qat_gluon.lane_block_layout``) hands the
    weight's k to the wgmma, so that each lane holds whole 16-blocks; a dot product over K does not depend on the
    order of k, so activations in this order times the weight in this order is the product."""
    m, k = x.shape
    check_wgmma_k_order(k)
    return x.reshape(m, k // 64, 4, 4, 2, 2).permute(0, 1, 3, 4, 2, 5).reshape(m, k)


@triton.autotune(configs=tile_configs(), key=["K", "IS_NVFP4", "PER_EXPERT", "CODES", "WGMMA_K_ORDER"])
@triton.jit
def _fake_quant_act_kernel(
    x_ptr,
    out_ptr,
    offs_ptr,
    amax_ptr,
    S,
    K,
    stride_xs,
    stride_os,
    NUM_EXPERTS: tl.constexpr,
    E_POW2: tl.constexpr,
    PER_EXPERT: tl.constexpr,
    IS_NVFP4: tl.constexpr,
    CODES: tl.constexpr,
    WGMMA_K_ORDER: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # tile [BLOCK_M rows, BLOCK_K // 16 blocks, 16]: NVFP4 blocks along K are the last axis; 1-D grid
    # over (row tile, K tile), K tiles fastest: consecutive programs read adjacent bytes
    k_tiles = tl.cdiv(K, BLOCK_K)
    row_ids = (tl.program_id(0) // k_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = row_ids[:, None, None]
    cols = (
        (tl.program_id(0) % k_tiles) * BLOCK_K
        + tl.arange(0, BLOCK_K // 16)[None, :, None] * 16
        + tl.arange(0, 16)[None, None, :]
    )
    mask = (rows < S) & (cols < K)
    x = tl.load(x_ptr + rows.to(tl.int64) * stride_xs + cols, mask=mask, other=0.0)
    routed = rows < tl.load(offs_ptr + NUM_EXPERTS - 1)
    if PER_EXPERT:
        expert = tl.minimum(expert_of_rows(offs_ptr, row_ids, NUM_EXPERTS, E_POW2), NUM_EXPERTS - 1)
        amax = tl.load(amax_ptr + expert)[:, None, None]
    else:
        amax = tl.load(amax_ptr)
    xf = x.to(tl.float32)
    if CODES:  # FP8 codes of routed rows (zero codes elsewhere): the GEMM applies the scale
        out = tl.where(routed, fp8_codes(xf, amax, INTERPRET), 0.0).to(out_ptr.dtype.element_ty)
    else:
        if IS_NVFP4:
            q = fake_quant_nvfp4(xf, amax, INTERPRET)
        else:
            q = fake_quant_fp8(xf, amax, INTERPRET)
        out = tl.where(routed, cast_like(q, out_ptr, INTERPRET), x)
    if WGMMA_K_ORDER:  # k = 16 t + 4 c + 2 h + b of each 64-chunk to column 16 c + 8 h + 2 t + b (wgmma_k_order)
        j = cols % 16
        cols = (cols // 64) * 64 + (j // 4) * 16 + ((j // 2) % 2) * 8 + ((cols % 64) // 16) * 2 + j % 2
    tl.store(out_ptr + rows.to(tl.int64) * stride_os + cols, out, mask=mask)


def _routed_codes(x: torch.Tensor, offs: torch.Tensor, row_amax: torch.Tensor) -> torch.Tensor:
    """:mod:`moeq.formats` FP8 codes of ``x``'s rows, each with its amax in ``row_amax [S, 1]``; zero codes past
    ``offs[-1]``."""
    codes = get_format("fp8").quantize(x, row_amax.float(), -1).data
    rows = torch.arange(x.shape[0], device=x.device)
    routed = (rows < offs[-1]) if offs.numel() else torch.zeros_like(rows, dtype=torch.bool)
    return torch.where(routed[:, None], codes.view(torch.uint8), 0).view(torch.float8_e4m3fn)


def act_codes_reference(x: torch.Tensor, offs: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """:mod:`moeq.formats` FP8 codes of routed rows (each row with its expert's amax, or the shared one);
    zero codes past ``offs[-1]``."""
    return _routed_codes(x, offs, per_row_amax(x, offs, amax.float()))


def fake_quant_act(
    x: torch.Tensor,
    offs: torch.Tensor,
    input_amax: torch.Tensor,
    fmt: str | QuantFormat,
    codes: bool = False,
    wrap: Callable[[Any], Any] | None = None,
    in_wgmma_k_order: bool = False,
) -> torch.Tensor:
    """Fake-quantize routed rows ``x [S, K]`` (K last) with amax ``[1]`` (shared) or ``[E]`` (per expert); rows at or
    past ``offs[-1]`` are returned unchanged. NVFP4: dynamic 16-blocks, static global amax. (Dynamic per-token FP8:
    :func:`fake_quant_tokens`, :func:`token_codes`.)

    ``codes=True`` (FP8 only): return the e4m3 codes (float8_e4m3fn, zero past ``offs[-1]``) instead of the
    fake-quantized values; times ``amax / 448`` they are the fake quant. The grouped GEMM takes them as
    ``x_mode="fp8_codes"``. ``wrap``: applied to the kernel before launching (``wrap_triton`` in a triton_op).
    ``in_wgmma_k_order``: the result's columns in :func:`wgmma_k_order` (K a multiple of 64), for the register-operand
    QAT NVFP4 kernel."""
    fmt = get_format(fmt)
    if codes and fmt.name != "fp8":
        raise ValueError(f"codes=True returns FP8 codes; format {fmt.name!r} has none")
    check_float(x, "x")
    if x.dim() != 2:
        raise ValueError(f"routed rows must be 2-D [S, K], got shape {tuple(x.shape)}")
    num_experts = offs.numel()
    if offs.dtype != torch.int32 or offs.dim() != 1:
        raise ValueError(f"offs must be int32 cumulative row counts, got {offs.dtype} {tuple(offs.shape)}")
    if input_amax.numel() not in (1, num_experts):
        raise ValueError(f"input_amax has {input_amax.numel()} entries; expected 1 or {num_experts}")
    fmt.check_shape(x.shape, 1, "activation")
    if in_wgmma_k_order:
        check_wgmma_k_order(x.shape[1])
    x_in = x if x.stride(1) == 1 else x.contiguous()
    out = torch.empty_like(x_in, dtype=torch.float8_e4m3fn if codes else x.dtype)
    amax = as_fp32(input_amax)

    def launch() -> torch.Tensor:
        if known_empty(x.shape[0], num_experts):
            return out

        def grid(meta):
            return (cdiv(x.shape[1], meta["BLOCK_K"]) * cdiv(x.shape[0], meta["BLOCK_M"]),)

        kernel = wrap(_fake_quant_act_kernel) if wrap is not None else _fake_quant_act_kernel
        launch_kernel(kernel, grid,
            x_in, out, offs, amax, x.shape[0], x.shape[1], x_in.stride(0), out.stride(0),
            NUM_EXPERTS=num_experts, E_POW2=triton.next_power_of_2(num_experts),
            PER_EXPERT=amax.numel() > 1,
            IS_NVFP4=fmt.name == "nvfp4", CODES=codes, WGMMA_K_ORDER=in_wgmma_k_order, INTERPRET=interpreting(),
        )  # fmt: skip
        return out

    def reference() -> torch.Tensor:
        if codes:
            result = act_codes_reference(x, offs, amax)
        else:
            result = torch.ops.moeq.fake_quant_act(x, offs, amax, fmt.name, 0, -1)
        return wgmma_k_order(result) if in_wgmma_k_order else result

    return run_kernel(x, launch, reference)


@triton.autotune(configs=tile_configs(), key=["K", "QUANTIZE", "CODES"])
@triton.jit
def _fake_quant_tokens_kernel(
    x_ptr,
    out_ptr,
    amax_ptr,
    offs_ptr,
    S,
    K,
    stride_xs,
    stride_os,
    NUM_EXPERTS: tl.constexpr,
    X_BITS: tl.constexpr,
    QUANTIZE: tl.constexpr,
    CODES: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # one program per BLOCK_M rows: a first sweep over K takes each row's amax (an integer max of |x|'s bits,
    # NaN above inf: it propagates) and stores it; with QUANTIZE a second one (its tiles back from L2) writes the
    # fake quant (unrouted rows as they are) or, with CODES, the e4m3 codes (zero for unrouted rows)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    row_mask = rows < S
    routed = rows < tl.load(offs_ptr + NUM_EXPERTS - 1)
    bits = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64) * stride_xs + cols, mask=row_mask & (cols < K), other=0.0)
        bits = tl.maximum(bits, tl.max(abs_bits(x, X_BITS), axis=1))
    amax = float_of_abs_bits(bits, x_ptr.dtype.element_ty, X_BITS)[:, None]
    tl.store(amax_ptr + rows, amax, mask=row_mask)
    if QUANTIZE:
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)[None, :]
            mask = row_mask & (cols < K)
            x = tl.load(x_ptr + rows.to(tl.int64) * stride_xs + cols, mask=mask, other=0.0)
            if CODES:
                out = tl.where(routed, fp8_codes(x.to(tl.float32), amax, INTERPRET), 0.0).to(out_ptr.dtype.element_ty)
            else:
                out = tl.where(
                    routed, cast_like(fake_quant_fp8(x.to(tl.float32), amax, INTERPRET), out_ptr, INTERPRET), x
                )
            tl.store(out_ptr + rows.to(tl.int64) * stride_os + cols, out, mask=mask)


def _tokens(
    x: torch.Tensor, offs: torch.Tensor | None, quantize: bool, codes: bool, wrap: Callable[[Any], Any] | None
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One launch of the per-token kernel over routed rows ``x [S, K]``: (fake quant / e4m3 codes / None, row amax
    ``[S]`` fp32)."""
    check_float(x, "x")
    if x.dim() != 2:
        raise ValueError(f"routed rows must be 2-D [S, K], got shape {tuple(x.shape)}")
    if offs is not None and (offs.dtype != torch.int32 or offs.dim() != 1):
        raise ValueError(f"offs must be int32 cumulative row counts, got {offs.dtype} {tuple(offs.shape)}")
    x_in = x if x.stride(1) == 1 else x.contiguous()
    amax = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    out = torch.empty_like(x_in, dtype=torch.float8_e4m3fn if codes else x.dtype) if quantize else None
    if known_empty(x.shape[0]) or (offs is not None and known_empty(offs.numel())):
        return (None if out is None else out.zero_() if codes else out.copy_(x_in)), amax.zero_()
    if known_empty(x.shape[1]):
        return (None if out is None else out.zero_() if codes else out.copy_(x_in)), amax.zero_()
    ends = offs if offs is not None else torch.full((1,), x.shape[0], dtype=torch.int32, device=x.device)

    def grid(meta):
        return (cdiv(x.shape[0], meta["BLOCK_M"]),)

    kernel = wrap(_fake_quant_tokens_kernel) if wrap is not None else _fake_quant_tokens_kernel
    launch_kernel(kernel, grid,
        x_in, out if out is not None else amax, amax, ends, x.shape[0], x.shape[1], x_in.stride(0),
        out.stride(0) if out is not None else 0,
        NUM_EXPERTS=ends.numel(), X_BITS=32 if x.dtype == torch.float32 else 16, QUANTIZE=quantize, CODES=codes,
        INTERPRET=interpreting(),
    )  # fmt: skip
    return out, amax


def fake_quant_tokens(x: torch.Tensor, offs: torch.Tensor, wrap: Callable[[Any], Any] | None = None) -> torch.Tensor:
    """FP8 fake quant of routed rows ``x [S, K]`` (K last) with dynamic per-token scales: each row by its own
    ``max|x|`` (:func:`moeq.formats.token_amax`); rows at or past ``offs[-1]`` are returned unchanged."""

    def launch() -> torch.Tensor:
        return _tokens(x, offs, True, False, wrap)[0]

    def reference() -> torch.Tensor:
        return torch.ops.moeq.fake_quant_act_dynamic(x, offs, "fp8", 0, -1)

    return run_kernel(x, launch, reference)


def token_codes(
    x: torch.Tensor, offs: torch.Tensor, wrap: Callable[[Any], Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The e4m3 codes of routed rows with dynamic per-token scales (zero past ``offs[-1]``) and each row's amax
    ``[S]``, in one launch: what the quantize-once grouped GEMM multiplies (``x_mode="fp8_codes"``, per-row amax)."""

    def launch() -> tuple[torch.Tensor, torch.Tensor]:
        return _tokens(x, offs, True, True, wrap)

    def reference() -> tuple[torch.Tensor, torch.Tensor]:
        amax = token_amax(x, -1)
        return _routed_codes(x, offs, amax), amax.reshape(-1)

    return run_kernel(x, launch, reference)


def row_amax(x: torch.Tensor, wrap: Callable[[Any], Any] | None = None) -> torch.Tensor:
    """Each row's ``max|x|`` (fp32 ``[S]``; NaN where the row holds one) of ``x [S, K]``, one pass: the per-token
    amax the in-load grouped GEMM scales rows with."""

    def launch() -> torch.Tensor:
        return _tokens(x, None, False, False, wrap)[1]

    def reference() -> torch.Tensor:
        return token_amax(x, -1).reshape(-1)

    return run_kernel(x, launch, reference)
