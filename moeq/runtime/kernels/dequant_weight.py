"""A stored (frozen) expert weight dequantized in one launch: the unfused deploy path's ``moeq::dequant_weight``.

Where a deploy model's expert GEMM is not a ``torch._grouped_mm`` chain the Inductor pass can fuse (``bmm`` /
``matmul`` experts, or ``fusion("never")``), each forward dequantizes the stored weight and multiplies it with the
model's own op. Through torch ops (:mod:`moeq.formats`: table lookups, fp64 products) that took 15.6 ms (NVFP4)
/ 23.0 ms (FP8) for Qwen3-30B-A3B's gate_up weight on the H200; this kernel writes the same values bit for bit
in one pass over the stored bytes: 0.42 ms / 0.30 ms (0.59 / 0.97 of an HBM copy's bandwidth; BENCHMARKS.md,
session 13).

Numerics (:meth:`moeq.formats.FP8E4M3.dequantize`, :meth:`moeq.formats.NVFP4.dequantize`): FP8
``fp32(e4m3 * s)``; NVFP4 ``fp32(e2m1 * fp32(block * g))``; both rounded once more to the output dtype. Each
fp32 product of the kernel is the correctly rounded one, as formats' fp64 product rounded to fp32 is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeq.formats import NVFP4_RUN_BYTES
from moeq.runtime.kernels.grouped_qmm import decode_e2m1, load_e4m3, stored_e2m1_codes
from moeq.runtime.kernels.launch import cdiv, check_float, dequant_configs, interpreting, launch_kernel
from moeq.runtime.kernels.numerics import cast_like

__all__ = ["dequant_stored_weight"]


@triton.autotune(configs=dequant_configs(), key=["N", "K", "IS_NVFP4", "PER_CHANNEL"])
@triton.jit
def _dequant_weight_kernel(
    data_ptr,
    scale_ptr,
    block_ptr,
    out_ptr,
    N,
    K,
    stride_de,
    stride_dn,
    stride_dk,
    stride_be,
    stride_bn,
    stride_bk,
    stride_oe,
    stride_on,
    stride_ok,
    IS_NVFP4: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # grid (K tiles, row tiles, experts): K tiles fastest, consecutive programs write adjacent bytes
    expert = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < N
    if PER_CHANNEL:  # FP8 channel-wise scales [E, N]
        scale = tl.load(scale_ptr + expert * N + rows, mask=row_mask, other=0.0)[:, None]
    else:
        scale = tl.load(scale_ptr + expert)
    if IS_NVFP4:
        # 32-bit words of the stored 64-byte runs (the last run zero-padded), codes back in K order
        kw = tl.program_id(0) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
        w_ptrs = data_ptr + expert * stride_de + rows[:, None] * stride_dn + kw[None, :] * stride_dk
        words = tl.load(w_ptrs, mask=row_mask[:, None] & (kw < tl.cdiv(K, 128) * 16)[None, :], other=0)
        codes = stored_e2m1_codes(words.to(tl.uint32, bitcast=True), BLOCK_N, BLOCK_K)
        kb = tl.program_id(0) * (BLOCK_K // 16) + tl.arange(0, BLOCK_K // 16)
        b_ptrs = block_ptr + expert * stride_be + rows[:, None] * stride_bn + kb[None, :] * stride_bk
        block = load_e4m3(b_ptrs, row_mask[:, None] & (kb < K // 16)[None, :], INTERPRET).to(tl.float32)
        values = tl.reshape(decode_e2m1(codes) * (block * scale)[:, :, None], (BLOCK_N, BLOCK_K))
    else:
        d_ptrs = data_ptr + expert * stride_de + rows[:, None] * stride_dn + ks[None, :] * stride_dk
        values = load_e4m3(d_ptrs, row_mask[:, None] & (ks < K)[None, :], INTERPRET).to(tl.float32) * scale
    o_ptrs = out_ptr + expert * stride_oe + rows[:, None] * stride_on + ks[None, :] * stride_ok
    tl.store(o_ptrs, cast_like(values, out_ptr, INTERPRET), mask=row_mask[:, None] & (ks < K)[None, :])


def dequant_stored_weight(
    data: torch.Tensor, scale: torch.Tensor, block_scale: torch.Tensor, fmt: str, dtype: torch.dtype
) -> torch.Tensor:
    """``[E, N, K]`` in ``dtype`` from ``moeq.freeze``'s K-last buffers: e4m3 ``data [E, N, K]`` (FP8) or packed
    E2M1 ``[E, N, cdiv(K, 128) * 64]`` in the runs of :func:`moeq.formats.interleave_nvfp4_runs` with e4m3
    ``block_scale [E, N, K/16]`` (NVFP4); fp32 ``scale [E]`` (FP8 also channel-wise, ``[E, N]``). CUDA tensors, or
    CPU under the interpreter."""
    if fmt not in ("fp8", "nvfp4"):
        raise ValueError(f"dequant_stored_weight takes fmt 'fp8' or 'nvfp4', got {fmt!r}")
    check_float(dtype, "dtype")
    if data.dim() != 3 or data.element_size() != 1:
        raise ValueError(
            f"stored {fmt} data must be a 3-D 1-byte tensor [E, N, K'], got {data.dtype} {tuple(data.shape)}"
        )
    num_experts, n = data.shape[:2]
    per_channel = scale.dim() == 2
    if per_channel and (fmt != "fp8" or tuple(scale.shape) != (num_experts, n)):
        raise ValueError(f"channel-wise scales must be FP8 [{num_experts}, {n}], got {fmt} {tuple(scale.shape)}")
    if not per_channel and scale.numel() != num_experts:
        raise ValueError(f"scale must have one entry per expert ({num_experts}), got {scale.numel()}")
    if fmt == "nvfp4":
        k = 16 * block_scale.shape[-1]
        if tuple(block_scale.shape) != (num_experts, n, k // 16) or data.shape[2] != cdiv(k, 128) * 64:
            raise ValueError(
                f"nvfp4 data {tuple(data.shape)} and block scales {tuple(block_scale.shape)} do not describe one "
                f"[E, N, K] weight stored in whole {NVFP4_RUN_BYTES}-byte runs"
            )
        words = data.contiguous().view(torch.int32)
        block = block_scale.view(torch.uint8) if interpreting() else block_scale.view(torch.float8_e4m3fn)
        b_strides = block.stride()
    else:
        k = data.shape[2]
        words = data.view(torch.uint8) if interpreting() else data.view(torch.float8_e4m3fn)
        block, b_strides = words, (0, 0, 0)
    out = torch.empty(num_experts, n, k, dtype=dtype, device=data.device)
    if out.numel() == 0:
        return out

    def grid(meta):
        return (cdiv(k, meta["BLOCK_K"]), cdiv(n, meta["BLOCK_N"]), num_experts)

    launch_kernel(_dequant_weight_kernel, grid,
        words, scale.float().contiguous(), block, out, n, k,
        *words.stride(), *b_strides, *out.stride(),
        IS_NVFP4=fmt == "nvfp4", PER_CHANNEL=per_channel, INTERPRET=interpreting(),
    )  # fmt: skip
    return out
