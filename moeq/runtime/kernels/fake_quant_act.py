"""Activation fake quant of routed rows with a static amax, shared or selected per row by ``offs``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeq.formats import QuantFormat, get_format
from moeq.runtime.kernels.launch import check_float, interpreting, run_kernel, tile_configs
from moeq.runtime.kernels.numerics import cast_like, fake_quant_fp8, fake_quant_nvfp4
from moeq.runtime.kernels.segment_amax import expert_of_rows

__all__ = ["fake_quant_act"]


@triton.autotune(configs=tile_configs(), key=["K", "IS_NVFP4", "PER_EXPERT"])
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
    if IS_NVFP4:
        q = fake_quant_nvfp4(xf, amax, INTERPRET)
    else:
        q = fake_quant_fp8(xf, amax, INTERPRET)
    out = tl.where(routed, cast_like(q, out_ptr, INTERPRET), x)
    tl.store(out_ptr + rows.to(tl.int64) * stride_os + cols, out, mask=mask)


def fake_quant_act(
    x: torch.Tensor, offs: torch.Tensor, input_amax: torch.Tensor, fmt: str | QuantFormat
) -> torch.Tensor:
    """Fake-quantize routed rows ``x [S, K]`` (K last) with amax ``[1]`` (shared) or ``[E]`` (per expert);
    rows at or past ``offs[-1]`` are returned unchanged. NVFP4: dynamic 16-blocks, static global amax."""
    fmt = get_format(fmt)
    check_float(x, "x")
    if x.dim() != 2:
        raise ValueError(f"routed rows must be 2-D [S, K], got shape {tuple(x.shape)}")
    num_experts = offs.numel()
    if offs.dtype != torch.int32 or offs.dim() != 1:
        raise ValueError(f"offs must be int32 cumulative row counts, got {offs.dtype} {tuple(offs.shape)}")
    if input_amax.numel() not in (1, num_experts):
        raise ValueError(f"input_amax has {input_amax.numel()} entries; expected 1 or {num_experts}")
    fmt.check_shape(x.shape, 1, "activation")
    x_in = x if x.stride(1) == 1 else x.contiguous()
    out = torch.empty_like(x_in)
    amax = input_amax.detach().float().contiguous()

    def launch() -> torch.Tensor:
        if x.shape[0] == 0 or num_experts == 0:
            return out

        def grid(meta):
            return (triton.cdiv(x.shape[1], meta["BLOCK_K"]) * triton.cdiv(x.shape[0], meta["BLOCK_M"]),)

        _fake_quant_act_kernel[grid](
            x_in, out, offs, amax, x.shape[0], x.shape[1], x_in.stride(0), out.stride(0),
            NUM_EXPERTS=num_experts, E_POW2=triton.next_power_of_2(num_experts), PER_EXPERT=amax.numel() > 1,
            IS_NVFP4=fmt.name == "nvfp4", INTERPRET=interpreting(),
        )  # fmt: skip
        return out

    def reference() -> torch.Tensor:
        return torch.ops.moeq.fake_quant_act(x, offs, amax, fmt.name, 0, -1)

    return run_kernel(x, launch, reference)
