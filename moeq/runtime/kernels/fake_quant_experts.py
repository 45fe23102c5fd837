"""All experts of a stacked weight fake-quantized in one launch.

One program per ``[BLOCK_M, BLOCK_K]`` tile on a 3-D grid (K tiles, row tiles, experts): the hardware walks
it in memory order (K tiles fastest), so consecutive programs stream adjacent bytes as a 1-D elementwise kernel
does, and no program spends integer divisions recovering its tile from a flat id.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from moeq.formats import QuantFormat, expand_weight_amax, get_format
from moeq.runtime.kernels.launch import (
    as_fp32,
    cdiv,
    check_expert_grid,
    interpreting,
    launch_kernel,
    run_kernel,
    stacked_weight_dims,
    tile_configs,
)
from moeq.runtime.kernels.numerics import cast_like, fake_quant_fp8, fake_quant_nvfp4, fp8_codes, fp8_scale

__all__ = ["fake_quant_experts"]

_MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in tile_configs())


@triton.autotune(configs=tile_configs(), key=["M", "K", "IS_NVFP4", "CODES", "PER_CHANNEL"])
@triton.jit
def _fake_quant_experts_kernel(
    w_ptr,
    out_ptr,
    amax_ptr,
    scale_ptr,
    M,
    K,
    stride_we,
    stride_wm,
    stride_wk,
    stride_oe,
    stride_om,
    stride_ok,
    IS_NVFP4: tl.constexpr,
    CODES: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    WRITE_SCALE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # the tile is [BLOCK_M, BLOCK_K // 16, 16]: NVFP4 blocks of 16 along K are the last axis, so the
    # block reduction and broadcast need no reshape
    tile_k = tl.program_id(0)
    tile_m = tl.program_id(1)
    expert = tl.program_id(2)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)[:, None, None]
    cols = tile_k * BLOCK_K + tl.arange(0, BLOCK_K // 16)[None, :, None] * 16 + tl.arange(0, 16)[None, None, :]
    mask = (rows < M) & (cols < K)
    w_offs = expert.to(tl.int64) * stride_we + rows * stride_wm + cols * stride_wk
    w = tl.load(w_ptr + w_offs, mask=mask, other=0.0).to(tl.float32)
    if PER_CHANNEL:  # FP8 channel-wise amax [E, M]: one per row of the tile
        amax = tl.load(amax_ptr + expert.to(tl.int64) * M + rows, mask=rows < M, other=0.0)
    else:
        amax = tl.load(amax_ptr + expert)
    if WRITE_SCALE and tile_k == 0:  # the FP8 scales that multiply the codes back, once each
        if PER_CHANNEL:
            tl.store(scale_ptr + expert.to(tl.int64) * M + rows, fp8_scale(amax), mask=rows < M)
        elif tile_m == 0:
            tl.store(scale_ptr + expert, fp8_scale(amax))
    if CODES:
        out = fp8_codes(w, amax, INTERPRET).to(out_ptr.dtype.element_ty)
    elif IS_NVFP4:
        out = cast_like(fake_quant_nvfp4(w, amax, INTERPRET), out_ptr, INTERPRET)
    else:
        out = cast_like(fake_quant_fp8(w, amax, INTERPRET), out_ptr, INTERPRET)
    o_offs = expert.to(tl.int64) * stride_oe + rows * stride_om + cols * stride_ok
    tl.store(out_ptr + o_offs, out, mask=mask)


def fake_quant_experts(
    w: torch.Tensor,
    weight_amax: torch.Tensor,
    fmt: str | QuantFormat,
    contraction_dim: int = -1,
    codes: bool = False,
    wrap: Callable[[Any], Any] | None = None,
    out: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake-quantize a stacked expert weight ``[E, ., .]`` with per-expert amax ``[E]`` (FP8 also channel-wise,
    ``[E, N]``: one amax per expert and row along the dim that is not K); same shape/dtype.

    ``codes=True`` (FP8 only): the e4m3 codes (float8_e4m3fn, same shape and strides) instead; times the
    expert's ``amax / 448`` they are the fake quant (``moeq.formats`` FP8 ``quantize``'s data). ``wrap``: applied
    to the kernel before launching (``wrap_triton`` in a triton_op). ``out``: written instead of a new tensor
    (the result's shape and dtype, any strides: e.g. a K-last buffer viewed in ``w``'s layout). ``scale_out``
    (with ``codes``): a contiguous fp32 tensor of ``weight_amax``'s size that receives the FP8 scales ``amax / 448``
    (``formats`` FP8 ``scale_from_amax``), written by the same launch."""
    fmt = get_format(fmt)
    if codes and fmt.name != "fp8":
        raise ValueError(f"codes=True returns FP8 codes; format {fmt.name!r} has none")
    k_dim, m_dim = stacked_weight_dims(w, contraction_dim, "fake_quant_experts")
    per_channel = weight_amax.dim() == 2
    if per_channel and (fmt.name != "fp8" or tuple(weight_amax.shape) != (w.shape[0], w.shape[m_dim])):
        raise ValueError(
            f"channel-wise weight_amax {tuple(weight_amax.shape)} needs FP8 and shape {(w.shape[0], w.shape[m_dim])} "
            f"for the weight {tuple(w.shape)} (format {fmt.name!r})"
        )
    if not per_channel and weight_amax.numel() != w.shape[0]:
        raise ValueError(f"weight_amax has {weight_amax.numel()} entries for {w.shape[0]} experts")
    if scale_out is not None and (
        not codes
        or scale_out.dtype != torch.float32
        or scale_out.numel() != weight_amax.numel()
        or not scale_out.is_contiguous()
        or scale_out.device != w.device
    ):
        raise ValueError(
            f"fake_quant_experts: scale_out ({tuple(scale_out.shape)} {scale_out.dtype} on {scale_out.device}) needs "
            f"codes=True and a contiguous float32 tensor of {weight_amax.numel()} elements on {w.device}"
        )
    fmt.check_shape(w.shape, k_dim, "stacked expert weight")
    if fmt.name not in ("fp8", "nvfp4"):
        raise NotImplementedError(f"no Triton kernel for format {fmt.name!r}")
    out_dtype = torch.float8_e4m3fn if codes else w.dtype
    if out is None:
        out = torch.empty_like(w, dtype=out_dtype)
    elif out.shape != w.shape or out.dtype != out_dtype or out.device != w.device:
        raise ValueError(
            f"fake_quant_experts: out is {tuple(out.shape)} {out.dtype} on {out.device}, needs {tuple(w.shape)} "
            f"{out_dtype} on {w.device}"
        )
    amax = as_fp32(weight_amax)
    E, M, K = w.shape[0], w.shape[m_dim], w.shape[k_dim]

    def grid(meta):
        return (cdiv(K, meta["BLOCK_K"]), cdiv(M, meta["BLOCK_M"]), E)

    def reference_scale() -> None:
        if scale_out is not None:
            scale_out.copy_(fmt.scale_from_amax(amax).reshape(scale_out.shape))

    def reference() -> torch.Tensor:
        expanded = expand_weight_amax(amax, 3, 0, k_dim)
        reference_scale()
        if codes:
            return out.copy_(fmt.quantize(w, expanded, k_dim).data.movedim(-1, k_dim))
        return out.copy_(fmt.fake_quant(w, expanded, k_dim))

    def launch() -> torch.Tensor:
        check_expert_grid("fake_quant_experts", w, M, _MIN_BLOCK_M)
        kernel = wrap(_fake_quant_experts_kernel) if wrap is not None else _fake_quant_experts_kernel
        launch_kernel(kernel, grid,
            w, out, amax, amax if scale_out is None else scale_out, M, K,
            w.stride(0), w.stride(m_dim), w.stride(k_dim),
            out.stride(0), out.stride(m_dim), out.stride(k_dim),
            IS_NVFP4=fmt.name == "nvfp4", CODES=codes, PER_CHANNEL=per_channel, WRITE_SCALE=scale_out is not None,
            INTERPRET=interpreting(),
        )  # fmt: skip
        return out

    if w.numel() == 0:
        reference_scale()
        return out
    return run_kernel(w, launch, reference)
