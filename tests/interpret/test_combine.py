"""The MoE combine kernel (``moeq::combine_experts``) and its backward (``moeq::combine_experts_backward``) under the
Triton interpreter, against a float64 reference of transformers' expression and against that expression in eager
torch."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeq.runtime import kernels  # noqa: F401  (registers the kernels)
from moeq.runtime.kernels.combine import combine_experts, combine_experts_backward
from tests.conftest import (
    assert_combine_backward_close,
    assert_combine_close,
    combine_backward_inputs,
    combine_expression,
    routed_rows,
)

assert os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(("tokens", "top_k", "hidden"), [(13, 2, 64), (5, 8, 200), (1, 1, 16), (40, 4, 97)])
def test_combine_matches_float64_and_the_model(tokens, top_k, hidden, dtype, seed):
    y, weights, inv_perm = routed_rows(tokens, top_k, hidden, max(8, top_k), dtype, seed)
    got = combine_experts(y, weights, inv_perm, top_k)
    assert got.dtype == dtype
    assert_combine_close(got, y, weights, inv_perm, top_k)
    model = combine_expression(y, weights, inv_perm, top_k)  # torch may add the top_k terms in another order
    torch.testing.assert_close(got, model, rtol=torch.finfo(dtype).eps, atol=1e-6 * float(model.abs().max()))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tokens=st.integers(1, 24),
    top_k=st.sampled_from([1, 2, 3, 8]),
    hidden=st.integers(1, 130),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_combine_random_shapes(tokens, top_k, hidden, dtype, seed):
    y, weights, inv_perm = routed_rows(tokens, top_k, hidden, 8, dtype, seed)
    assert_combine_close(combine_experts(y, weights, inv_perm, top_k), y, weights, inv_perm, top_k)


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16], ids=["fp32-out", "bf16-out"])
def test_combine_fp32_weights(out_dtype):
    """Mixtral's / DeepSeek-V3's fp32 routing weights on bf16 rows: an fp32 product (not rounded) and sum, then
    the model's ``.to(bf16)`` as ``out_dtype``."""
    y, weights, inv_perm = routed_rows(11, 2, 96, 8, torch.bfloat16, 5, w_dtype=torch.float32)
    got = combine_experts(y, weights, inv_perm, 2, out_dtype)
    assert got.dtype == (out_dtype or torch.float32)
    assert_combine_close(got, y, weights, inv_perm, 2)
    want = combine_expression(y, weights, inv_perm, 2).to(got.dtype)
    torch.testing.assert_close(got, want, rtol=torch.finfo(got.dtype).eps, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("tokens", "top_k", "hidden"), [(13, 2, 64), (5, 8, 200), (3, 1, 7)])
def test_combine_without_weights(tokens, top_k, hidden, dtype):
    """``weights`` None (the gradient of the gather ``hidden[perm // top_k]``): the gathered rows summed in fp32,
    in y's dtype; the op too."""
    y, _, inv_perm = routed_rows(tokens, top_k, hidden, max(8, top_k), dtype, 7)
    got = combine_experts(y, None, inv_perm, top_k)
    assert got.dtype == dtype
    assert_combine_close(got, y, None, inv_perm, top_k)
    op = torch.ops.moeq.combine_experts(y, None, inv_perm, top_k)
    assert torch.equal(op, got)


def test_combine_op_runs_the_kernel_and_takes_strided_rows():
    """``moeq::combine_experts`` (the triton_op the Inductor pass emits) on rows with a padded stride, and strided
    weights and int32 indices."""
    y, weights, inv_perm = routed_rows(9, 2, 48, 8, torch.bfloat16, 3)
    padded = torch.zeros(y.shape[0], 64, dtype=y.dtype)
    padded[:, :48] = y
    spread = torch.zeros(2 * weights.numel(), dtype=weights.dtype)
    spread[::2] = weights  # weights and indices at stride 2
    index = torch.zeros(2 * inv_perm.numel(), dtype=torch.int32)
    index[::2] = inv_perm
    got = torch.ops.moeq.combine_experts(padded[:, :48], spread[::2], index[::2], 2)
    assert_combine_close(got, y, weights, inv_perm, 2)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(("tokens", "top_k", "hidden"), [(13, 2, 64), (5, 8, 200), (1, 1, 16), (40, 4, 97)])
def test_combine_backward_matches_float64(tokens, top_k, hidden, dtype, seed):
    """Both gradients of the combine in one kernel: ``dy`` bit for bit autograd's, ``dw`` within one rounding of
    the float64 row sums (H walked in several tiles where hidden > 64)."""
    grad, y, weights, perm = combine_backward_inputs(tokens, top_k, hidden, dtype, seed)
    dy, dw = combine_experts_backward(grad, y, weights, perm, top_k)
    assert dy.dtype == dw.dtype == dtype
    assert_combine_backward_close(dy, dw, grad, y, weights, perm, top_k)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tokens=st.integers(1, 24),
    top_k=st.sampled_from([1, 2, 3, 8]),
    hidden=st.integers(1, 150),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    w_dtype=st.sampled_from([None, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_combine_backward_random_shapes(tokens, top_k, hidden, dtype, w_dtype, seed):
    """Random shapes, fp32 routing weights on bf16 rows among them (``dy`` then fp32, as torch promotes)."""
    grad, y, weights, perm = combine_backward_inputs(tokens, top_k, hidden, dtype, seed, w_dtype)
    dy, dw = combine_experts_backward(grad, y, weights, perm, top_k)
    assert dy.dtype == torch.promote_types(dtype, weights.dtype) and dw.dtype == dtype
    assert_combine_backward_close(dy, dw, grad, y, weights, perm, top_k)


def test_combine_backward_op_runs_the_kernel_on_strided_operands():
    """``moeq::combine_experts_backward`` (the triton_op the pass emits) on a padded gradient and int32 indices:
    the kernel's values, the same as the launcher's on contiguous copies."""
    grad, y, weights, perm = combine_backward_inputs(9, 2, 48, torch.bfloat16, 3)
    padded = torch.zeros(grad.shape[0], 64, dtype=grad.dtype)
    padded[:, :48] = grad
    got = torch.ops.moeq.combine_experts_backward(padded[:, :48], y, weights, perm.to(torch.int32), 2)
    want = combine_experts_backward(grad, y, weights, perm, 2)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert_combine_backward_close(*got, grad, y, weights, perm, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("tokens", "top_k", "hidden"), [(13, 2, 64), (5, 8, 200)])
def test_combine_with_a_mask_reads_it_in_the_same_pass(tokens, top_k, hidden, dtype):
    """``mask`` (bool): the rows multiplied by it first, as torch multiplies by a bool: masked finite values give
    zeros, a masked inf or NaN stays NaN; the sum then as without a mask."""
    y, _, inv_perm = routed_rows(tokens, top_k, hidden, max(8, top_k), dtype, 11)
    mask = torch.rand(y.shape, generator=torch.Generator().manual_seed(3)) < 0.6
    y[0, 0], y[1, 1], mask[0, 0], mask[1, 1] = float("inf"), float("nan"), False, False
    got = combine_experts(y, None, inv_perm, top_k, mask=mask)
    want = combine_experts(y * mask, None, inv_perm, top_k)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().sum() == 2
    finite = ~want.isnan()
    assert torch.equal(got[finite], want[finite])
    op = torch.ops.moeq.combine_experts(y, None, inv_perm, top_k, None, mask)
    assert torch.equal(op[finite], got[finite])
