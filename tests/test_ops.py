"""The moeq:: custom ops and segment helpers of moeq.lowering.ops, against per-expert python loops.

moeq.formats is tested on its own (tests/test_formats.py) and serves here as the per-segment reference.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import moeq  # noqa: F401  (registers the moeq:: ops)
from moeq.formats import get_format
from moeq.segments import check_offsets, row_expert_ids, segment_amax

SETTINGS = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

fq_weight = torch.ops.moeq.fake_quant_weight
fq_act = torch.ops.moeq.fake_quant_act
observe = torch.ops.moeq.observe_segments_


def offs_of(counts: list[int]) -> torch.Tensor:
    """int32 cumulative offsets from per-expert row counts."""
    return torch.tensor(counts, dtype=torch.int32).cumsum(0).to(torch.int32)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def ref_segment_amax(x: torch.Tensor, offs: torch.Tensor, num_experts: int):
    """Per-expert max|x| over rows [offs[e-1], offs[e]) and row counts, by python loop."""
    amax, counts, start = [], [], 0
    for e in range(num_experts):
        end = int(offs[e])
        seg = x[start:end].float()
        if seg.isnan().any():
            amax.append(float("nan"))
        else:
            amax.append(float(seg.abs().max()) if seg.numel() else 0.0)
        counts.append(end - start)
        start = end
    return torch.tensor(amax, dtype=torch.float32), torch.tensor(counts, dtype=torch.int64)


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Exact equality of dtype, shape and values (NaN == NaN)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


@st.composite
def routed_rows(draw):
    """2-D routed rows [S, K] with int32 offsets (empty experts and trailing unrouted rows allowed)."""
    counts = draw(st.lists(st.integers(0, 4), min_size=1, max_size=5))
    extra = draw(st.integers(0, 3))
    k = draw(st.integers(1, 8))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    x = randn(sum(counts) + extra, k, seed=draw(st.integers(0, 2**31 - 1)), dtype=dtype)
    x = x * 10.0 ** draw(st.integers(-3, 3))
    return x, offs_of(counts), counts


# ------------------------------------------------------------------------------------------------
# opcheck
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "dtype", "fmt", "cdim"),
    [((2, 3, 32), torch.float32, "nvfp4", 2), ((2, 32, 3), torch.bfloat16, "fp8", 1)],
)
def test_opcheck_fake_quant_weight(shape, dtype, fmt, cdim):
    """torch.library.opcheck passes for the weight fake-quant op (schema, fake impl, autograd)."""
    w = randn(*shape, dtype=dtype).requires_grad_()
    amax = torch.tensor([1.0, 2.5])
    torch.library.opcheck(fq_weight.default, (w, amax, fmt, 0, cdim))


@pytest.mark.parametrize(
    ("x", "offs", "amax", "fmt", "cdim"),
    [
        (randn(10, 32), offs_of([3, 0, 4]), torch.tensor([2.0]), "fp8", 1),
        (randn(9, 32, dtype=torch.bfloat16), offs_of([0, 5, 0, 4]), torch.tensor([1.0, 2.0, 3.0, 0.5]), "nvfp4", 1),
        (randn(3, 5, 32), None, torch.tensor([1.0, 2.0, 0.5]), "nvfp4", 2),
    ],
    ids=["routed-fp8-shared", "routed-nvfp4-per-expert-bf16", "batched-nvfp4"],
)
def test_opcheck_fake_quant_act(x, offs, amax, fmt, cdim):
    """torch.library.opcheck passes for the activation fake-quant op (routed and batched inputs)."""
    torch.library.opcheck(fq_act.default, (x.clone().requires_grad_(), offs, amax, fmt, 0, cdim))


@pytest.mark.parametrize(
    ("x", "offs", "num_experts"),
    [
        (randn(10, 8), offs_of([3, 0, 4]), 3),
        (randn(3, 4, 8, dtype=torch.bfloat16), None, 3),
    ],
    ids=["routed-empty-expert", "batched-bf16"],
)
def test_opcheck_observe_segments(x, offs, num_experts):
    """torch.library.opcheck passes for the in-place observer op."""
    running = (torch.zeros(num_experts), torch.zeros(num_experts, dtype=torch.int64))
    torch.library.opcheck(observe.default, (x, offs, *running, 0, -1))


# ------------------------------------------------------------------------------------------------
# segment helpers
# ------------------------------------------------------------------------------------------------


@SETTINGS
@given(routed_rows())
def test_row_expert_ids_matches_loop(data):
    """row_expert_ids gives each row its expert (int64), rows past offs[-1] get E."""
    x, offs, counts = data
    expected = [e for e, c in enumerate(counts) for _ in range(c)]
    expected += [len(counts)] * (x.shape[0] - len(expected))
    ids = row_expert_ids(offs, x.shape[0])
    assert ids.dtype == torch.int64
    assert ids.tolist() == expected


@SETTINGS
@given(routed_rows(), st.data())
def test_segment_amax_matches_loop(data, draw):
    """segment_amax equals the per-expert loop (empty experts 0, trailing rows ignored, NaN stays local)."""
    x, offs, counts = data
    if draw.draw(st.booleans()) and x.numel():
        x = x.clone()
        x[draw.draw(st.integers(0, x.shape[0] - 1)), 0] = float("nan")
    amax, n = segment_amax(x, offs, len(counts))
    ref_amax, ref_n = ref_segment_amax(x, offs, len(counts))
    assert_same(amax, ref_amax)
    assert_same(n, ref_n)


def test_segment_amax_trailing_rows_ignored():
    """Huge and NaN values in rows at or past offs[-1] change nothing."""
    x = torch.ones(6, 4)
    x[4] = 1e30
    x[5, 0] = float("nan")
    amax, n = segment_amax(x, offs_of([2, 2]), 2)
    assert amax.tolist() == [1.0, 1.0]
    assert n.tolist() == [2, 2]


def test_segment_amax_nan_only_its_expert():
    """A NaN in one expert's rows makes only that expert's amax NaN."""
    x = torch.ones(6, 4)
    x[3, 1] = float("nan")
    amax, _ = segment_amax(x, offs_of([2, 2, 2]), 3)
    assert amax[0] == 1.0 and bool(amax[1].isnan()) and amax[2] == 1.0


def test_segment_amax_zero_rows():
    """Zero rows give zero amax and zero counts for every expert; zero batched experts give empty results."""
    amax, n = segment_amax(torch.zeros(0, 8), offs_of([0, 0, 0]), 3)
    assert amax.tolist() == [0.0, 0.0, 0.0] and n.tolist() == [0, 0, 0]
    amax, n = segment_amax(torch.zeros(2, 0, 8), None, 2)
    assert amax.tolist() == [0.0, 0.0] and n.tolist() == [0, 0]
    amax, n = segment_amax(torch.zeros(0, 4, 8), None, 0)
    assert amax.shape == (0,) and n.shape == (0,) and n.dtype == torch.int64


@pytest.mark.parametrize("expert_dim", [0, 1])
def test_segment_amax_batched(expert_dim):
    """offs=None: per-expert amax along expert_dim, counts = rows per expert, NaN stays local."""
    x = randn(3, 5, 8, seed=3).movedim(0, expert_dim).contiguous()
    x.select(expert_dim, 2)[1, 1] = float("nan")
    amax, n = segment_amax(x, None, 3, expert_dim=expert_dim)
    expected = [float(x.select(expert_dim, e).abs().max()) for e in range(2)] + [float("nan")]
    assert_same(amax, torch.tensor(expected))
    assert n.tolist() == [5, 5, 5]


# ------------------------------------------------------------------------------------------------
# observer
# ------------------------------------------------------------------------------------------------


def test_observe_segments_accumulates():
    """observe_segments_ keeps the running max of amax and the running sum of counts across calls."""
    running_amax = torch.zeros(3)
    running_counts = torch.zeros(3, dtype=torch.int64)
    x1 = torch.tensor([[1.0, -2.0], [0.5, 0.5], [3.0, 0.0]])
    x2 = torch.tensor([[-4.0, 0.0], [1.0, 1.0], [0.25, 0.0], [9.0, 9.0]])
    observe(x1, offs_of([2, 1, 0]), running_amax, running_counts, 0, -1)
    assert running_amax.tolist() == [2.0, 3.0, 0.0] and running_counts.tolist() == [2, 1, 0]
    observe(x2, offs_of([0, 2, 1]), running_amax, running_counts, 0, -1)
    assert running_amax.tolist() == [2.0, 4.0, 0.25] and running_counts.tolist() == [2, 3, 1]


def test_observe_segments_batched_and_nan_sticks():
    """Batched observation counts rows per expert; a NaN observation stays NaN on later calls."""
    running_amax = torch.zeros(2)
    running_counts = torch.zeros(2, dtype=torch.int64)
    x = torch.ones(2, 3, 4)
    x[1, 0, 0] = float("nan")
    observe(x, None, running_amax, running_counts, 0, -1)
    observe(torch.full((2, 3, 4), 5.0), None, running_amax, running_counts, 0, -1)
    assert running_amax[0] == 5.0 and bool(running_amax[1].isnan())
    assert running_counts.tolist() == [6, 6]


@pytest.mark.parametrize(
    ("offs", "match"),
    [
        (torch.tensor([2, 4], dtype=torch.int64), "int32"),
        (torch.tensor([3, 2], dtype=torch.int32), "non-decreasing"),
        (torch.tensor([2, 9], dtype=torch.int32), "only 4 rows"),
        (torch.tensor([1, 2, 4], dtype=torch.int32), r"shape \[2\]"),
    ],
    ids=["int64", "non-monotonic", "past-end", "wrong-length"],
)
def test_observe_bad_offsets_leave_state(offs, match):
    """Bad offsets raise a clear ValueError and leave the running statistics untouched."""
    running_amax = torch.tensor([1.0, 2.0])
    running_counts = torch.tensor([3, 4])
    with pytest.raises(ValueError, match=match):
        observe(torch.ones(4, 2) * 10, offs, running_amax, running_counts, 0, -1)
    assert running_amax.tolist() == [1.0, 2.0] and running_counts.tolist() == [3, 4]


# ------------------------------------------------------------------------------------------------
# offsets validation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offs", "rows", "experts", "match"),
    [
        (torch.tensor([1, 2], dtype=torch.int64), 4, 2, "int32"),
        (torch.tensor([3, 1, 4], dtype=torch.int32), 4, 3, "non-decreasing"),
        (torch.tensor([-1, 1], dtype=torch.int32), 4, 2, ">= 0"),
        (torch.tensor([2, 5], dtype=torch.int32), 4, 2, "end at 5.*only 4 rows"),
        (torch.tensor([2, 4], dtype=torch.int32), 4, 3, r"shape \[3\]"),
        (torch.tensor([[2, 4]], dtype=torch.int32), 4, 2, r"shape \[2\]"),
    ],
    ids=["int64", "non-monotonic", "negative", "past-end", "wrong-length", "2-d"],
)
def test_check_offsets_errors(offs, rows, experts, match):
    """check_offsets names what is wrong with the offsets."""
    with pytest.raises(ValueError, match=match):
        check_offsets(offs, rows, experts)


def test_check_offsets_accepts_valid():
    """Valid offsets (empty experts, unrouted trailing rows, all zero) pass."""
    check_offsets(offs_of([0, 3, 0, 2]), 7, 4)
    check_offsets(offs_of([0, 0]), 0, 2)


def test_fake_quant_act_bad_offsets():
    """fake_quant_act rejects int64 and non-monotonic offsets by message."""
    x = torch.ones(4, 16)
    with pytest.raises(ValueError, match="int32"):
        fq_act(x, torch.tensor([2, 4]), torch.tensor([1.0]), "fp8", 0, 1)
    with pytest.raises(ValueError, match="non-decreasing"):
        fq_act(x, torch.tensor([3, 2], dtype=torch.int32), torch.tensor([1.0]), "fp8", 0, 1)
    with pytest.raises(ValueError, match="only 4 rows"):
        fq_act(x, torch.tensor([3, 6], dtype=torch.int32), torch.tensor([1.0]), "fp8", 0, 1)


def test_fake_quant_act_amax_length_mismatch_raises():
    """A per-expert amax whose length differs from the number of experts in offs is an error."""
    x = torch.ones(6, 16)
    with pytest.raises(ValueError, match=r"fake_quant_act: amax has 2 entries; expected 1 \(shared\) or 3"):
        fq_act(x, offs_of([2, 2, 2]), torch.tensor([1.0, 2.0]), "fp8", 0, 1)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float64, torch.uint8])
def test_ops_reject_non_float_inputs_by_name(dtype):
    """The ops take float32 / bfloat16 / float16 tensors; anything else (an already-quantized or integer tensor,
    float64) is an error naming the op and the argument, not a silently cast result."""
    w = torch.ones(2, 8, 16, dtype=dtype)
    x = torch.ones(6, 16, dtype=dtype)
    amax = torch.ones(2)
    want = rf"must be float32, bfloat16 or float16, got {dtype}"
    with pytest.raises(ValueError, match=rf"fake_quant_weight: w {want}"):
        torch.ops.moeq.fake_quant_weight(w, amax, "fp8", 0, 2)
    with pytest.raises(ValueError, match=rf"quantize_weight: w {want}"):
        torch.ops.moeq.quantize_weight(w, amax, "nvfp4", 0, 2)
    with pytest.raises(ValueError, match=rf"fake_quant_act: x {want}"):
        fq_act(x, offs_of([3, 3]), amax, "fp8", 0, 1)
    with pytest.raises(ValueError, match=rf"fake_quant_act_dynamic: x {want}"):
        torch.ops.moeq.fake_quant_act_dynamic(x, offs_of([3, 3]), "fp8", 0, 1)
    with pytest.raises(ValueError, match=rf"observe_segments: x {want}"):
        torch.ops.moeq.observe_segments_(x, offs_of([3, 3]), torch.zeros(2), torch.zeros(2, dtype=torch.int64), 0, 1)


# ------------------------------------------------------------------------------------------------
# fake quant numerics vs formats per segment / per expert
# ------------------------------------------------------------------------------------------------


@SETTINGS
@given(
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 2),
    st.sampled_from(["fp8", "nvfp4"]),
    st.sampled_from([torch.float32, torch.bfloat16]),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_fake_quant_weight_matches_per_expert(e, n, kb, fmt, dtype, k_last, seed):
    """fake_quant_weight equals formats' fake quant applied expert by expert with a scalar amax."""
    w = randn(e, n, 16 * kb, seed=seed, dtype=dtype) * torch.tensor([0.01, 1.0, 100.0][:e]).view(-1, 1, 1).to(dtype)
    cdim = 2
    if not k_last:
        w, cdim = w.transpose(1, 2).contiguous(), 1
    amax = torch.stack([w[i].abs().max().float() for i in range(e)])
    out = fq_weight(w, amax, fmt, 0, cdim)
    expected = torch.stack([get_format(fmt).fake_quant(w[i], amax[i], cdim - 1) for i in range(e)])
    assert_same(out, expected)


@SETTINGS
@given(routed_rows(), st.sampled_from(["fp8", "nvfp4"]), st.booleans(), st.data())
def test_fake_quant_act_matches_per_segment(data, fmt, per_expert, draw):
    """fake_quant_act: shared amax quantizes every segment with it; per-expert amax gives each its own."""
    x, offs, counts = data
    assume(x.shape[0] > 0)  # zero rows: test_fake_quant_act_zero_rows
    if fmt == "nvfp4":
        x = x.repeat(1, 16 // x.shape[1] + 1)[:, :16]
    e = len(counts)
    factors = draw.draw(st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=e, max_size=e))
    base = float(x.float().abs().max()) if x.numel() else 1.0
    amax = torch.tensor([base * f for f in factors]) if per_expert else torch.tensor([base * factors[0]])
    out = fq_act(x, offs, amax, fmt, 0, 1)
    assert out.dtype == x.dtype and out.shape == x.shape
    start = 0
    for i in range(e):
        end = int(offs[i])
        a = amax[i] if per_expert else amax[0]
        if end > start:  # the reference on an empty segment: test_empty_tensor in test_formats.py
            assert_same(out[start:end], get_format(fmt).fake_quant(x[start:end], a, 1))
        start = end


def test_fake_quant_act_per_expert_differs_from_shared():
    """Per-expert amax really selects each segment's own amax (rows differ from the shared result)."""
    x = torch.full((4, 16), 0.3)
    offs = offs_of([2, 2])
    shared = fq_act(x, offs, torch.tensor([448.0]), "fp8", 0, 1)
    per = fq_act(x, offs, torch.tensor([448.0, 0.3]), "fp8", 0, 1)
    assert torch.equal(per[:2], shared[:2]) and bool((shared == 0.3125).all())
    torch.testing.assert_close(per[2:], x[2:], rtol=1e-6, atol=0)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_act_batched(fmt, dtype):
    """Batched input (offs=None, expert_dim 0): expert e uses amax[e]; shared [1] amax is used by all."""
    x = randn(3, 4, 32, seed=5, dtype=dtype)
    amax = torch.tensor([0.5, 1.0, 4.0])
    out = fq_act(x, None, amax, fmt, 0, 2)
    for i in range(3):
        assert_same(out[i], get_format(fmt).fake_quant(x[i], amax[i], 1))
    shared = fq_act(x, None, torch.tensor([2.0]), fmt, 0, 2)
    assert_same(shared, get_format(fmt).fake_quant(x, torch.tensor(2.0), 2))


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_fake_quant_act_zero_rows(fmt):
    """Zero routed rows (routed: [0, K]; batched: [E, 0, K]) give empty outputs, not an error."""
    out = fq_act(torch.zeros(0, 16), offs_of([0, 0]), torch.tensor([1.0]), fmt, 0, 1)
    assert out.shape == (0, 16)
    out = fq_act(torch.zeros(2, 0, 16), None, torch.tensor([1.0, 2.0]), fmt, 0, 2)
    assert out.shape == (2, 0, 16)


def test_fake_quant_act_rows_past_offsets_untouched():
    """Rows at or past offs[-1] belong to no expert and are left as they are (module docstring)."""
    x = randn(7, 16, seed=2) * 3
    out = fq_act(x, offs_of([2, 3]), torch.tensor([0.1, 0.1]), "fp8", 0, 1)
    assert torch.equal(out[5:], x[5:])


# ------------------------------------------------------------------------------------------------
# STE gradients
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize(("expert_dim", "cdim", "shape"), [(0, 2, (3, 4, 32)), (0, 1, (3, 32, 4)), (1, 2, (4, 3, 32))])
def test_weight_ste_gradient(fmt, expert_dim, cdim, shape):
    """d fake_quant_weight / dw == upstream grad * (|w| <= amax_e)."""
    w = randn(*shape, seed=7)
    w.select(expert_dim, 0)[0, 0] = -0.5  # exactly at amax: the gradient passes
    w.requires_grad_()
    amax = torch.tensor([0.5, 1.0, 1e9])
    out = fq_weight(w, amax, fmt, expert_dim, cdim)
    grad = randn(*shape, seed=8)
    (gw,) = torch.autograd.grad(out, w, grad)
    mask = torch.stack([w.detach().select(expert_dim, e).abs() <= amax[e] for e in range(3)], dim=expert_dim)
    assert_same(gw, grad * mask)
    assert 0 < int(mask.sum()) < mask.numel()


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize("per_expert", [False, True])
def test_act_ste_gradient_routed(fmt, per_expert):
    """d fake_quant_act / dx == upstream grad * (|x| <= the row's amax)."""
    x = randn(7, 16, seed=9)
    x[0, 0] = 0.5 if per_expert else 0.75  # exactly at the row's amax: the gradient passes
    x.requires_grad_()
    offs = offs_of([2, 0, 5])
    amax = torch.tensor([0.5, 3.0, 1.0]) if per_expert else torch.tensor([0.75])
    out = fq_act(x, offs, amax, fmt, 0, 1)
    grad = randn(7, 16, seed=10)
    (gx,) = torch.autograd.grad(out, x, grad)
    row_amax = torch.tensor([0.5, 0.5, 1, 1, 1, 1, 1]) if per_expert else torch.full((7,), 0.75)
    mask = x.detach().abs() <= row_amax.unsqueeze(1)
    assert_same(gx, grad * mask)
    assert 0 < int(mask.sum()) < mask.numel()


def test_act_ste_gradient_batched():
    """Batched act op: gradient passes where |x| <= amax of the element's expert."""
    x = randn(3, 4, 16, seed=11).requires_grad_()
    amax = torch.tensor([0.25, 1.0, 2.0])
    out = fq_act(x, None, amax, "nvfp4", 0, 2)
    (gx,) = torch.autograd.grad(out.sum(), x)
    assert_same(gx, (x.detach().abs() <= amax.view(3, 1, 1)).float())


@pytest.mark.parametrize("k_dim", [1, 2])
def test_dequant_of_quantize_weight_is_fake_quant_weight_nonfinite(k_dim):
    """``moeq::dequant_weight(moeq::quantize_weight(w))`` == ``moeq::fake_quant_weight(w)`` bit for bit with NaN
    and +-inf weights: the rewrite a QAT FP8 training graph gets (:mod:`moeq.lowering.joint`) keeps NaN weights
    NaN in its forward and dgrad, as the unfused graph does."""
    from tests.conftest import assert_same_bits, nonfinite_weights

    w, amax = nonfinite_weights(torch.bfloat16)
    w = w if k_dim == 2 else w.transpose(1, 2).contiguous()
    stored = torch.ops.moeq.quantize_weight(w, amax, "fp8", 0, k_dim)
    got = torch.ops.moeq.dequant_weight(*stored, "fp8", k_dim, torch.bfloat16)
    want = torch.ops.moeq.fake_quant_weight(w, amax, "fp8", 0, k_dim)
    assert_same_bits(got, want, f"k_dim {k_dim}")
    assert got.isnan().any()


@pytest.mark.parametrize("w_type", ["bf16", "fp32"])
def test_nvfp4_codes_kernel_compiles_for_sm90(w_type, tmp_path, monkeypatch):
    """The NVFP4 weight codes kernel (``moeq::quantize_weight`` on CUDA) compiles for sm_90 with this Triton's
    compiler and ptxas, no GPU needed: the block scales' e4m3 conversion and Markstein's quotient in the PTX, nothing
    in local memory, and the global scale's IEEE division. (Its values: ``tests/interpret/test_kernels.py``; on the
    GPU: ``tests/test_gpu.py``.)"""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moeq.runtime.kernels.nvfp4_codes import _nvfp4_codes_kernel

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    signature = {
        "w_ptr": f"*{w_type}",
        "data_ptr": "*i32",
        "block_ptr": "*u8",
        "amax_ptr": "*fp32",
        "scale_ptr": "*fp32",
    }
    signature |= dict.fromkeys(["M", "K", "stride_we", "stride_wm", "stride_wk"], "i32")
    constants = {"WORDS": 384, "INTERPRET": False, "BLOCK_M": 32}
    source = ASTSource(_nvfp4_codes_kernel, signature | dict.fromkeys(constants, "constexpr"), constants)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = kernel.asm["ptx"]
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx and "fma.rn.f32" in ptx
    assert "div.rn.f32" in ptx, "the global scale amax / 2688 is IEEE division (formats' bits)"
    assert "st.local" not in ptx and "ld.local" not in ptx
    assert kernel.asm["cubin"]
