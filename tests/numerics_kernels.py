"""Triton kernels that run single device functions of ``moeq.runtime.kernels.numerics`` on their own, for the
interpreter suite and the GPU tests. Import inside a test: the interpreter suite must set TRITON_INTERPRET before
triton is imported."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeq.runtime.kernels.launch import interpreting
from moeq.runtime.kernels.numerics import (
    NVFP4_FAST_G_MAX,
    NVFP4_FAST_G_MIN,
    NVFP4_GLOBAL_DIVISOR,
    all_within,
    block_amax16,
    fake_quant_nvfp4_operand,
    nvfp4_block_divisor,
    reciprocal,
)


@triton.jit
def _nvfp4_operand_kernel(w_ptr, amax_ptr, out_ptr, ROWS, K: tl.constexpr, BLOCK_R: tl.constexpr,
                          INTERPRET: tl.constexpr):  # fmt: skip
    e = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs = e * ROWS * K + rows[:, None] * K + tl.arange(0, K)[None, :]
    mask = (rows < ROWS)[:, None]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.math.div_rn(tl.load(amax_ptr + e), NVFP4_GLOBAL_DIVISOR)
    six_g, inv_six_g = nvfp4_block_divisor(g)
    fast = all_within(g, NVFP4_FAST_G_MIN, NVFP4_FAST_G_MAX, INTERPRET)
    blocks = tl.reshape(w, [BLOCK_R, K // 16, 16])
    q = fake_quant_nvfp4_operand(blocks, block_amax16(blocks), g, six_g, inv_six_g, fast, INTERPRET)
    tl.store(out_ptr + offs, tl.reshape(q, [BLOCK_R, K]), mask=mask)


def nvfp4_operand_values(w: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """``numerics.fake_quant_nvfp4_operand`` of ``w [E, R, K]`` (16-blocks along K, a power of two) with per-expert
    global amax ``amax [E]``, as fp32 (the values before the Gluon kernel's bf16 store)."""
    num_experts, rows, k = w.shape
    out = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    grid = (triton.cdiv(rows, 16), num_experts)
    _nvfp4_operand_kernel[grid](w.contiguous(), amax.float().contiguous(), out, rows, K=k, BLOCK_R=16,
                                INTERPRET=interpreting())  # fmt: skip
    return out


@triton.jit
def _reciprocal_kernel(d_ptr, out_ptr, ref_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    d = tl.load(d_ptr + offs, mask=mask, other=1.0)
    tl.store(out_ptr + offs, reciprocal(d, False), mask=mask)
    tl.store(ref_ptr + offs, tl.math.div_rn(1.0, d), mask=mask)


def reciprocal_and_div_rn(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(numerics.reciprocal(d), div_rn(1, d))`` on the GPU (``reciprocal``'s fast form has no interpreter)."""
    out, ref = torch.empty_like(d), torch.empty_like(d)
    _reciprocal_kernel[(triton.cdiv(d.numel(), 1024),)](d, out, ref, d.numel(), BLOCK=1024)
    return out, ref


def check_nvfp4_operand_values(device: str) -> None:
    """``fake_quant_nvfp4_operand`` equals formats' NVFP4 ``fake_quant`` as values (a zero's sign may differ, NaN
    stands where NaN stands): every bf16 value under eight global amaxes, blocks spanning the fp32 range, and
    blocks holding NaN and +-inf."""
    from moeq.formats import expand_per_expert, expert_amax, get_format
    from tests.conftest import every_bf16_block_weights, far_below_block_weights, nonfinite_weights

    far = far_below_block_weights()
    nvfp4 = get_format("nvfp4")
    for w, amax in [every_bf16_block_weights(), (far, expert_amax(far)), nonfinite_weights()]:
        w = w.float()
        want = nvfp4.fake_quant(w, expand_per_expert(amax, 3), -1)
        got = nvfp4_operand_values(w.to(device), amax.to(device)).cpu()
        differ = (got != want) & ~(got.isnan() & want.isnan())
        assert not differ.any(), (int(differ.sum()), w[differ][:5].tolist(), got[differ][:5].tolist(),
                                  want[differ][:5].tolist())  # fmt: skip
