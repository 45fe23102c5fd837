"""The unrouted-tail zeroing kernel (``zero_unrouted_rows_``) under the Triton interpreter: rows at or past
``offs[-1]`` become zero, every other bit stays as it was."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeq.runtime.kernels.zero_rows import zero_unrouted_rows_

assert os.environ.get("TRITON_INTERPRET") == "1"


def _expected(out: torch.Tensor, routed_end: int) -> torch.Tensor:
    want = out.clone()
    want[routed_end:] = 0
    return want


def _assert_bits_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit: NaN payloads and signed zeros of the routed rows included."""
    as_int = {2: torch.int16, 4: torch.int32}[got.element_size()]
    assert torch.equal(got.contiguous().view(as_int), want.contiguous().view(as_int))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=["bf16", "fp32", "fp16"])
@pytest.mark.parametrize(
    ("counts", "rows", "cols"),
    [
        ([5, 0, 7], 12, 130),  # every row routed: nothing changes
        ([5, 0, 7], 80, 130),  # a tail that spans two row blocks, cols past one column block
        ([0, 0], 9, 3),  # no routed row: all zero
        ([64], 64 + 1, 256),  # one tail row right after a full block
        ([1, 2, 3], 200, 1),
    ],
)
def test_zero_unrouted_rows(counts, rows, cols, dtype):
    g = torch.Generator().manual_seed(rows * cols)
    out = torch.randn(rows, cols, generator=g).to(dtype)
    out[0, 0], out[-1, -1] = float("nan"), -0.0
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    want = _expected(out, int(offs[-1]))
    got = zero_unrouted_rows_(out, offs)
    assert got is out
    _assert_bits_equal(out, want)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 150), cols=st.integers(1, 300), routed=st.integers(0, 150), seed=st.integers(0, 2**16))
def test_zero_unrouted_rows_random(rows, cols, routed, seed):
    routed = min(routed, rows)
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(rows, cols, generator=g).bfloat16()
    offs = torch.tensor([routed // 3, routed], dtype=torch.int32)
    want = _expected(out, routed)
    _assert_bits_equal(zero_unrouted_rows_(out, offs), want)


def test_zero_unrouted_rows_of_a_strided_view():
    """A column slice of a wider buffer (row stride 96) and a transposed view: only the view's tail rows change."""
    base = torch.randn(40, 96).bfloat16()
    keep = base.clone()
    view = base[:, 16:80]
    zero_unrouted_rows_(view, torch.tensor([10, 25], dtype=torch.int32))
    keep[25:, 16:80] = 0
    _assert_bits_equal(base, keep)
    wide = torch.randn(30, 50)
    keep = wide.clone()
    zero_unrouted_rows_(wide.t(), torch.tensor([33], dtype=torch.int32))  # rows of the view = columns of wide
    keep[:, 33:] = 0
    _assert_bits_equal(wide, keep)


def test_no_experts_zero_everything():
    out = torch.randn(7, 5)
    _assert_bits_equal(zero_unrouted_rows_(out, torch.zeros(0, dtype=torch.int32)), torch.zeros(7, 5))


@pytest.mark.parametrize(
    ("out", "offs", "message"),
    [
        (torch.zeros(4), torch.tensor([2], dtype=torch.int32), "out must be 2-D"),
        (torch.zeros(4, 2), torch.tensor([2]), "offs must be int32"),
        (torch.zeros(4, 2), torch.tensor([[2]], dtype=torch.int32), "offs must be int32"),
    ],
)
def test_zero_unrouted_rows_bad_input(out, offs, message):
    with pytest.raises(ValueError, match=message):
        zero_unrouted_rows_(out, offs)
