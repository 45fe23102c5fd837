"""The grouped_qmm Triton kernel under the interpreter against an independent reference: formats.py Q/DQ
of both operands, then a float64 per-expert matmul. Tiny shapes (the interpreter is slow)."""

from __future__ import annotations

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

from moeq.formats import channel_amax, expand_per_expert, expert_amax, get_format, stored_form
from moeq.lowering.ops import _fake_quant_act_reference
from moeq.runtime.kernels.grouped_qmm import grouped_qmm
from tests.conftest import deployed_weight_operand, per_expert_matmul_f64, stored_weight_args

# (counts per expert, K, N): empty experts, unrouted tail rows, K and N not multiples of the tile, E=1
SHAPES = [([5, 0, 19], 48, 40, 3), ([0, 0, 7, 33], 32, 24, 0), ([21], 16, 8, 2)]
#: the transposed (swap-AB) tile the GPU picks for decode-sized batches
SWAPPED = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128, "SWAP_AB": True})
#: 32-row tiles whose m-tiles of at most 16 rows (an expert's short last tile) run a 16-row, swap-AB MMA: the
#: GPU's 128-row tiles with 64-row tails, in small
TAILED = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 128, "SWAP_AB": False, "TAIL_M": 16})


def _problem(counts, k, n, tail, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = (torch.randn(int(offs[-1]) + tail, k, generator=g) * 2).to(dtype)
    w_nk = (torch.randn(len(counts), n, k, generator=g) * torch.logspace(-2, 0, len(counts)).view(-1, 1, 1)).to(dtype)
    return x, w_nk, offs


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def _act(x, offs, fmt, per_expert):
    if fmt is None:
        return x, None
    amax = torch.linspace(1.0, 4.0, offs.numel()) if per_expert else torch.tensor([3.0])
    return _fake_quant_act_reference(x, offs, amax, fmt, 0, -1), amax


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape", SHAPES, ids=["odd", "empty-first", "E1"])
@pytest.mark.parametrize(
    ("w_fmt", "x_fmt", "per_expert"),
    [("fp8", "fp8", False), ("nvfp4", "nvfp4", False), ("nvfp4", None, False), ("fp8", "nvfp4", True)],
)
def test_qat_matches_reference(w_fmt, x_fmt, per_expert, shape, seed):
    """QAT: weight fake-quantized in the load path (K = dim 1 of a transposed [E, N, K] weight)."""
    counts, k, n, tail = shape
    x, w_nk, offs = _problem(counts, k, n, tail, torch.bfloat16, seed)
    w = w_nk.transpose(1, 2)
    amax = expert_amax(w) * 0.9
    xq, x_amax = _act(x, offs, x_fmt, per_expert)
    wq = get_format(w_fmt).fake_quant(w, expand_per_expert(amax, 3), 1)
    got = grouped_qmm(x, w, offs, amax, None, x_amax, f"fake_{w_fmt}", x_fmt)
    ref = per_expert_matmul_f64(xq, wq, offs)
    assert got.dtype == torch.bfloat16
    assert _rel(got, ref) < 1e-2
    assert torch.equal(got[int(offs[-1]) :], torch.zeros_like(got[int(offs[-1]) :]))


@pytest.mark.parametrize("shape", SHAPES[:2], ids=["odd", "empty-first"])
@pytest.mark.parametrize(("w_fmt", "x_fmt"), [("fp8", "fp8"), ("fp8", None), ("nvfp4", None), ("nvfp4", "nvfp4")])
@pytest.mark.parametrize("config", [None, SWAPPED, TAILED], ids=["tuned", "swapped", "tailed"])
def test_deploy_matches_reference(w_fmt, x_fmt, shape, config):
    """Deploy: stored e4m3 / packed E2M1 weights (K-last, as freeze stores them) dequantized in registers;
    W8A8 multiplies e4m3 operands and scales the accumulator. Also with the swap-AB tile."""
    counts, k, n, tail = shape
    x, w_nk, offs = _problem(counts, k, n, tail, torch.bfloat16, 3)
    fmt = get_format(w_fmt)
    q = fmt.quantize(w_nk, expand_per_expert(expert_amax(w_nk), 3), 2)
    wq = fmt.dequantize(q, torch.bfloat16).transpose(1, 2)
    xq, x_amax = _act(x, offs, x_fmt, False)
    data, scale, block = stored_weight_args(q)
    got = grouped_qmm(x, data, offs, scale, block, x_amax, w_fmt, x_fmt, config=config)
    assert _rel(got, per_expert_matmul_f64(xq, wq, offs)) < 1e-2


@pytest.mark.parametrize("shape", SHAPES[:2], ids=["odd", "empty-first"])
@pytest.mark.parametrize(("x_fmt", "quantize_once"), [(None, None), ("fp8", False), ("fp8", True)])
@pytest.mark.parametrize("config", [None, SWAPPED], ids=["tuned", "swapped"])
def test_deploy_fp8_contracting_stored_n_matches_reference(x_fmt, quantize_once, shape, config):
    """The dgrad of a QAT FP8 training step (moeq.lowering.joint): the stored codes ``[E, N, K]`` taken as they
    are, so the GEMM contracts over the weight's N (its rows) and the operand's contiguous dim is the output's."""
    counts, k, n, tail = shape
    x, w_nk, offs = _problem(counts, k, n, tail, torch.bfloat16, 5)
    grad = (torch.randn(x.shape[0], n, generator=torch.Generator().manual_seed(6)) * 2).to(x.dtype)
    fmt = get_format("fp8")
    q = fmt.quantize(w_nk, expand_per_expert(expert_amax(w_nk) * 0.9, 3), 2)
    data, scale, _ = stored_weight_args(q)
    data = data.transpose(1, 2)  # back to the stored [E, N, K]: K' = N, N' = K
    assert data.is_contiguous()
    gq, g_amax = _act(grad, offs, x_fmt, False)
    got = grouped_qmm(grad, data, offs, scale, None, g_amax, "fp8", x_fmt, config=config, quantize_once=quantize_once)
    ref = per_expert_matmul_f64(gq, fmt.dequantize(q, torch.bfloat16), offs)
    assert got.shape == (grad.shape[0], k)
    assert _rel(got, ref) < 1e-2
    assert torch.equal(got[int(offs[-1]) :], torch.zeros_like(got[int(offs[-1]) :]))


@pytest.mark.parametrize("config", [None, SWAPPED], ids=["tuned", "swapped"])
def test_one_row_experts_fill_the_grid_bound(config):
    """Every expert gets one row (each its own partial m-tile) and 12 unrouted tail rows follow: with 16-row
    tiles the batch needs exactly the grid's bound, ``cdiv(M, BLOCK_M) + min(E, M)`` = 1 + 4 m-tiles. K = 256
    takes two tile steps, so the block scales loaded one step ahead are used. Every row matches the reference
    and the tail is zero."""
    x, w_nk, offs = _problem([1, 1, 1, 1], 256, 24, 12, torch.bfloat16, 5)
    fmt = get_format("nvfp4")
    q = fmt.quantize(w_nk, expand_per_expert(expert_amax(w_nk), 3), 2)
    data, scale, block = stored_weight_args(q)
    got = grouped_qmm(x, data, offs, scale, block, None, "nvfp4", None, config=config)
    ref = per_expert_matmul_f64(x, fmt.dequantize(q, torch.bfloat16).transpose(1, 2), offs)
    routed = int(offs[-1])
    per_row = (got[:routed].double() - ref[:routed]).norm(dim=1) / ref[:routed].norm(dim=1)
    assert per_row.max() < 1e-2, per_row
    assert torch.equal(got[routed:], torch.zeros_like(got[routed:]))


@pytest.mark.parametrize("w_mode", ["fake_fp8", "fake_nvfp4", "fp8", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("config", [None, SWAPPED, TAILED], ids=["tuned", "swapped", "tailed"])
def test_weight_operand_bit_exact(w_mode, dtype, config):
    """One-hot activation rows select weight rows: the kernel's weight operand equals formats.py exactly
    (deploy NVFP4: with the global scale applied once, see ``deployed_weight_operand``), also with the
    transposed (swap-AB) tile of decode-sized batches."""
    counts, k, n = [6, 0, 10, 35], 32, 24
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    g = torch.Generator().manual_seed(5)
    w_nk = (torch.randn(4, n, k, generator=g) * 0.1).to(dtype)
    amax = expert_amax(w_nk) * 0.8
    fmt = get_format(w_mode.removeprefix("fake_"))
    picks = torch.randint(0, k, (51,), generator=g)
    x = torch.nn.functional.one_hot(picks, k).to(dtype)
    if w_mode.startswith("fake_"):
        expected_w = fmt.fake_quant(w_nk, expand_per_expert(amax, 3), 2).transpose(1, 2)
        got = grouped_qmm(x, w_nk.transpose(1, 2), offs, amax, None, None, w_mode, None, config=config)
    else:
        q = fmt.quantize(w_nk, expand_per_expert(amax, 3), 2)
        expected_w = deployed_weight_operand(q, dtype).transpose(1, 2)
        data, scale, block = stored_weight_args(q)
        got = grouped_qmm(x, data, offs, scale, block, None, w_mode, None, config=config)
    experts = torch.searchsorted(offs, torch.arange(51, dtype=torch.int32), right=True)
    assert torch.equal(got, expected_w[experts, picks])


@pytest.mark.parametrize("n_contiguous", [False, True], ids=["as-frozen", "n-contiguous"])
def test_stored_nvfp4_several_runs_bit_exact(n_contiguous):
    """K = 272: two whole 128-element storage runs and a zero-padded third, each tile step reading a run's
    words; the stored data also given N-contiguous (the launcher makes it K-contiguous for its 32-bit word
    loads). One-hot rows recover every weight exactly (``deployed_weight_operand``)."""
    counts, k, n = [5, 0, 11], 272, 24
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    g = torch.Generator().manual_seed(11)
    w_nk = (torch.randn(3, n, k, generator=g) * torch.logspace(-3, 0, k).view(1, 1, -1)).to(torch.bfloat16)
    fmt = get_format("nvfp4")
    q = fmt.quantize(w_nk, expand_per_expert(expert_amax(w_nk), 3), 2)
    picks = torch.randint(0, k, (16,), generator=g)
    x = torch.nn.functional.one_hot(picks, k).to(torch.bfloat16)
    data, scale, block = stored_weight_args(q)
    if n_contiguous:
        data = data.contiguous()
    got = grouped_qmm(x, data, offs, scale, block, None, "nvfp4", None, config=SWAPPED)
    experts = torch.searchsorted(offs, torch.arange(16, dtype=torch.int32), right=True)
    expected = deployed_weight_operand(q, torch.bfloat16).transpose(1, 2)
    assert torch.equal(got, expected[experts, picks])


@pytest.mark.parametrize("x_fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize("per_expert", [False, True], ids=["shared", "per-expert"])
def test_activation_operand_bit_exact(x_fmt, per_expert):
    """Identity weights: the kernel's activation operand equals formats.py fake quant exactly."""
    counts, k = [4, 0, 13], 32
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = (torch.randn(17, k, generator=torch.Generator().manual_seed(7)) * 3).to(torch.bfloat16)
    w = torch.eye(k, dtype=torch.bfloat16).expand(3, k, k)
    expected, x_amax = _act(x, offs, x_fmt, per_expert)
    got = grouped_qmm(x, w, offs, None, None, x_amax, "plain", x_fmt)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("per_expert", [False, True], ids=["shared", "per-expert"])
@pytest.mark.parametrize("shape", SHAPES, ids=["odd", "empty-first", "E1"])
@pytest.mark.parametrize("w_mode", ["fake_fp8", "fp8"])
@pytest.mark.parametrize("config", [None, SWAPPED, TAILED], ids=["tuned", "swapped", "tailed"])
def test_fp8_codes_activations_match_reference(w_mode, shape, per_expert, config):
    """``x_mode="fp8_codes"``: x quantized once to its e4m3 codes (formats' FP8 ``quantize``, per row with
    its expert's amax); the kernel multiplies the codes and scales the product by ``amax / 448``. Against the
    formats fake quant of x and w and a float64 matmul; the unrouted tail is zero; output bf16."""
    counts, k, n, tail = shape
    x, w_nk, offs = _problem(counts, k, n, tail, torch.bfloat16, 9)
    xq, x_amax = _act(x, offs, "fp8", per_expert)
    codes = _fake_quant_act_codes(x, offs, x_amax)
    fmt = get_format("fp8")
    amax = expert_amax(w_nk) * 0.9
    if w_mode == "fake_fp8":
        w = w_nk.transpose(1, 2)
        wq = fmt.fake_quant(w, expand_per_expert(amax, 3), 1)
        got = grouped_qmm(codes, w, offs, amax, None, x_amax, "fake_fp8", "fp8_codes", config=config)
    else:
        q = fmt.quantize(w_nk, expand_per_expert(amax, 3), 2)
        wq = fmt.dequantize(q, torch.bfloat16).transpose(1, 2)
        data, scale, block = stored_weight_args(q)
        got = grouped_qmm(codes, data, offs, scale, block, x_amax, "fp8", "fp8_codes", config=config)
    assert got.dtype == torch.bfloat16
    assert _rel(got, per_expert_matmul_f64(xq, wq, offs)) < 1e-2
    assert torch.equal(got[int(offs[-1]) :], torch.zeros_like(got[int(offs[-1]) :]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("per_expert", [False, True], ids=["shared", "per-expert"])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=["odd", "empty-first"])
@pytest.mark.parametrize("mode", ["qat", "deploy"])
def test_quantize_once_equals_in_load_quantization(mode, shape, per_expert, dtype):
    """``quantize_once=True`` (activation codes and QAT weight codes in their own passes, then the codes
    GEMM) gives the in-load kernel's output bit for bit (same codes, same dot under the interpreter), in x's
    dtype, and both match formats' fake quant and a float64 matmul."""
    counts, k, n, tail = shape
    x, w_nk, offs = _problem(counts, k, n, tail, dtype, 13)
    xq, x_amax = _act(x, offs, "fp8", per_expert)
    fmt = get_format("fp8")
    amax = expert_amax(w_nk) * 0.9
    if mode == "qat":
        args = (w_nk.transpose(1, 2), offs, amax, None, x_amax, "fake_fp8", "fp8")
        wq = fmt.fake_quant(w_nk, expand_per_expert(amax, 3), 2).transpose(1, 2)
    else:
        q = fmt.quantize(w_nk, expand_per_expert(amax, 3), 2)
        data, scale, block = stored_weight_args(q)
        args = (data, offs, scale, block, x_amax, "fp8", "fp8")
        wq = fmt.dequantize(q, dtype).transpose(1, 2)
    once = grouped_qmm(x, *args, quantize_once=True)
    in_load = grouped_qmm(x, *args, quantize_once=False)
    assert once.dtype == dtype
    assert torch.equal(once, in_load)
    assert _rel(once, per_expert_matmul_f64(xq, wq, offs)) < 1e-2


def test_quantize_once_by_size():
    """The default: FP8 x FP8 GEMMs quantize the activations once above 16 mean rows per expert, a QAT FP8
    weight above 48; other modes never."""
    from moeq.runtime.kernels.grouped_qmm import quantizes_once, quantizes_weight_once

    assert quantizes_once("fake_fp8", "fp8", 17 * 8, 8) and quantizes_once("fp8", "fp8", 34816, 128)
    assert not quantizes_once("fake_fp8", "fp8", 16 * 8, 8)
    assert not quantizes_once("fake_nvfp4", "nvfp4", 34816, 128) and not quantizes_once("fp8", None, 34816, 128)
    assert quantizes_weight_once("fake_fp8", "fp8", 49 * 8, 8) and quantizes_weight_once("fake_fp8", "fp8", 34816, 128)
    assert not quantizes_weight_once("fake_fp8", "fp8", 48 * 8, 8)
    assert not quantizes_weight_once("fp8", "fp8", 34816, 128)  # stored weights are codes already
    assert not quantizes_weight_once("fake_nvfp4", "nvfp4", 34816, 128)


@pytest.mark.parametrize(("counts", "passes"), [([20, 0, 31, 27], ["act"]), ([60, 0, 75, 71], ["act", "weight"])],
                         ids=["24-rows-per-expert", "51-rows-per-expert"])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("per_expert", [False, True], ids=["shared", "per-expert"])
def test_quantize_once_by_size_launches(counts, passes, dtype, per_expert, monkeypatch):
    """QAT FP8 with ``quantize_once=None``: between 16 and 48 mean rows per expert only the activation codes
    pass runs and the GEMM fake-quantizes the bf16 weight as it loads it; above 48 the weight codes pass runs
    too, in its own launch or inside the GEMM's (the real passes, counted). Either way the output equals the
    in-load kernel's bit for bit and the float64 product of formats' fake quants."""
    from moeq.runtime.kernels import grouped_qmm as launcher
    from moeq.runtime.kernels import weight_pass_gemm as fused

    calls = []
    for module, name in ((launcher, "fake_quant_act"), (launcher, "fake_quant_experts"), (fused, "weight_pass_gemm")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _n=name, _r=real, **kw: calls.append(_n) or _r(*a, **kw))
    x, w_nk, offs = _problem(counts, 32, 24, 3, dtype, 21)
    xq, x_amax = _act(x, offs, "fp8", per_expert)
    amax = expert_amax(w_nk) * 0.9
    wq = get_format("fp8").fake_quant(w_nk, expand_per_expert(amax, 3), 2).transpose(1, 2)
    args = (w_nk.transpose(1, 2), offs, amax, None, x_amax, "fake_fp8", "fp8")
    by_size = grouped_qmm(x, *args)
    assert by_size.dtype == dtype
    weight_pass = "weight_pass_gemm" if launcher.WEIGHT_PASS_IN_GEMM else "fake_quant_experts"
    assert calls == [{"act": "fake_quant_act", "weight": weight_pass}[p] for p in passes]
    assert torch.equal(by_size, grouped_qmm(x, *args, quantize_once=False))
    assert _rel(by_size, per_expert_matmul_f64(xq, wq, offs)) < 1e-2


def _fake_quant_act_codes(x, offs, amax):
    from moeq.runtime.kernels.fake_quant_act import act_codes_reference

    return act_codes_reference(x, offs, amax)


def test_fp8_codes_activation_operand_bit_exact():
    """Identity FP8 weights (scale 1): the output is the codes times the activation scale, which is
    formats' FP8 fake quant of x bit for bit."""
    counts, k = [4, 0, 13], 32
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = (torch.randn(17, k, generator=torch.Generator().manual_seed(7)) * 3).to(torch.bfloat16)
    expected, x_amax = _act(x, offs, "fp8", True)
    eye = torch.eye(k).expand(3, k, k)
    q = get_format("fp8").quantize(eye, torch.full((3, 1, 1), 448.0), 2)
    data, scale, block = stored_weight_args(q)
    got = grouped_qmm(_fake_quant_act_codes(x, offs, x_amax), data, offs, scale, block, x_amax, "fp8", "fp8_codes")
    assert torch.equal(got, expected)


def test_op_runs_kernel_under_interpreter():
    """torch.ops.moeq.grouped_qmm on CPU tensors under TRITON_INTERPRET=1 launches the kernel (wrap_triton)."""
    x, w_nk, offs = _problem([3, 0, 9], 32, 16, 1, torch.bfloat16, 2)
    w = w_nk.transpose(1, 2)
    amax = expert_amax(w)
    got = torch.ops.moeq.grouped_qmm(x, w, offs, amax, None, torch.tensor([2.0]), "qat", "nvfp4", "nvfp4")
    ref = torch.ops.moeq.grouped_qmm_reference(x, w, offs, amax, None, torch.tensor([2.0]), "qat", "nvfp4", "nvfp4")
    assert _rel(got, ref.double()) < 1e-2


@pytest.mark.parametrize("quantize_once", [False, True], ids=["in-load", "once"])
def test_op_passes_quantize_once(quantize_once, monkeypatch):
    """torch.ops.moeq.grouped_qmm carries ``quantize_once`` to the launcher: the activation codes pass runs
    exactly when asked (the real pass, counted), its launches go through wrap_triton, and both paths equal the
    CPU reference op within rounding."""
    from moeq.runtime.kernels import grouped_qmm as launcher

    calls = []
    real = launcher.fake_quant_act
    monkeypatch.setattr(launcher, "fake_quant_act", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    x, w_nk, offs = _problem([6, 0, 11], 32, 16, 2, torch.bfloat16, 4)
    w, amax, x_amax = w_nk.transpose(1, 2), expert_amax(w_nk), torch.tensor([3.0])
    got = torch.ops.moeq.grouped_qmm(x, w, offs, amax, None, x_amax, "qat", "fp8", "fp8", quantize_once)
    ref = torch.ops.moeq.grouped_qmm_reference(x, w, offs, amax, None, x_amax, "qat", "fp8", "fp8")
    assert _rel(got, ref.double()) < 1e-2
    assert len(calls) == int(quantize_once) and all(kw["codes"] and kw["wrap"] is not None for kw in calls)


# -- FP8 channel-wise weight scales and dynamic per-token activation scales (moeq.FP8_DYNAMIC) --------------


def _token_fake_quant(x, offs):
    from moeq.lowering.ops import _fake_quant_act_dynamic_reference

    return _fake_quant_act_dynamic_reference(x, offs, "fp8", 0, -1)


@pytest.mark.parametrize("quantize_once", [False, True], ids=["in-load", "once"])
@pytest.mark.parametrize("x_fmt", ["fp8_token", "fp8", None])
@pytest.mark.parametrize("shape", SHAPES, ids=["odd", "empty-first", "E1"])
@pytest.mark.parametrize("mode", ["qat", "deploy"])
def test_channel_wise_weights_match_reference(mode, shape, x_fmt, quantize_once):
    """Channel-wise weight scales ``[E, N]`` (QAT: fake-quantized as loaded or as codes; deploy: stored e4m3)
    with per-token, static or no activation quantization == formats.py operands times a float64 matmul."""
    counts, k, n, tail = shape
    x, w_nk, offs = _problem(counts, k, n, tail, torch.bfloat16, 5)
    fmt = get_format("fp8")
    amax = channel_amax(w_nk, 0, 2) * (
        0.7 + 0.3 * torch.rand(len(counts), n, generator=torch.Generator().manual_seed(1))
    )
    wq = fmt.fake_quant(w_nk, amax.unsqueeze(2), 2).transpose(1, 2)
    if x_fmt == "fp8_token":
        xq, x_amax = _token_fake_quant(x, offs), None
    else:
        xq, x_amax = _act(x, offs, x_fmt, False)
    if mode == "qat":
        got = grouped_qmm(
            x, w_nk.transpose(1, 2), offs, amax, None, x_amax, "fake_fp8", x_fmt, quantize_once=quantize_once
        )
    else:
        data, scale, _ = stored_form(fmt.quantize(w_nk, amax.unsqueeze(2), 2))
        assert scale.shape == (len(counts), n)
        got = grouped_qmm(x, data.transpose(1, 2), offs, scale, None, x_amax, "fp8", x_fmt, quantize_once=quantize_once)
    assert _rel(got, per_expert_matmul_f64(xq, wq, offs)) < 1e-2
    assert torch.equal(got[int(offs[-1]) :], torch.zeros_like(got[int(offs[-1]) :]))


def test_per_token_rows_scale_independently():
    """One-hot weights read single activation columns back: each row's values are its own per-token fake quant
    (a row 1000x larger than its neighbour does not change the neighbour's codes)."""
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x[2] *= 1000
    offs = torch.tensor([4, 6], dtype=torch.int32)
    eye = torch.eye(32).to(torch.bfloat16).expand(2, 32, 32).contiguous()
    got = grouped_qmm(x, eye, offs, torch.ones(2, 32), None, None, "fake_fp8", "fp8_token", quantize_once=False)
    amax = torch.ones(2, 32)
    wq = get_format("fp8").fake_quant(eye, amax.unsqueeze(1), 1)
    assert _rel(got, per_expert_matmul_f64(_token_fake_quant(x, offs), wq, offs)) < 1e-2
    # within one bf16 ulp (2^-7 of the value at most, just above a power of two): the kernel rounds (x codes * w
    # codes) * (s_x s_w) once, the reference rounds each fake-quant value first, so a value near a bf16 midpoint may
    # round either way (a neighbour's 1000x amax would be off by ~1000x, not one rounding)
    torch.testing.assert_close(got[3], _token_fake_quant(x, offs)[3] * wq[0].diagonal().to(torch.bfloat16),
                               rtol=2.0**-7, atol=0.0)  # fmt: skip


def test_channel_wise_scale_of_the_wrong_shape():
    x, w_nk, offs = _problem([3, 2], 16, 8, 0, torch.bfloat16, 0)
    with pytest.raises(ValueError, match=r"channel-wise w_scale \(2, 16\) needs an FP8 weight and shape \(2, 8\)"):
        grouped_qmm(x, w_nk.transpose(1, 2), offs, torch.ones(2, 16), None, None, "fake_fp8", None)


def test_per_token_unrouted_rows_stay_zero_whatever_they_hold():
    """Rows past ``offs[-1]`` with NaN / inf come out as zeros (their per-row amax is never applied)."""
    x, w_nk, offs = _problem([3, 4], 32, 16, 3, torch.bfloat16, 0)
    x[-1, 2], x[-2, 0] = float("nan"), float("inf")
    amax = channel_amax(w_nk, 0, 2)
    for once in (False, True):
        got = grouped_qmm(x, w_nk.transpose(1, 2), offs, amax, None, None, "fake_fp8", "fp8_token", quantize_once=once)
        assert torch.equal(got[7:], torch.zeros_like(got[7:])) and not got[:7].isnan().any()


# -- QAT FP8's weight codes pass inside the codes GEMM's launch (moeq.runtime.kernels.weight_pass_gemm) ---------


def _two_launches(x, args, monkeypatch):
    from moeq.runtime.kernels import grouped_qmm as launcher

    with monkeypatch.context() as m:
        m.setattr(launcher, "WEIGHT_PASS_IN_GEMM", False)
        return grouped_qmm(x, *args, quantize_once=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("x_fmt", "per_expert", "channels"),
    [("fp8", False, False), ("fp8", True, False), ("fp8_token", False, True), ("fp8", False, True)],
    ids=["shared", "per-expert", "fp8-dynamic", "channels-static"],
)
@pytest.mark.parametrize("shape", SHAPES, ids=["odd", "empty-first", "E1"])
def test_weight_pass_in_gemm_equals_two_launches(shape, x_fmt, per_expert, channels, dtype, monkeypatch):
    """The one-launch QAT FP8 path (weight codes written by some work items, GEMM tiles waiting for their
    expert's codes) gives the two-launch output bit for bit (per-expert or channel-wise weight scales, static or
    per-token activations, empty experts, unrouted rows as zeros) and the float64 product of formats' fake
    quants."""
    from moeq.runtime.kernels import grouped_qmm as launcher

    counts, k, n, tail = shape
    x, w_nk, offs = _problem(counts, k, n, tail, dtype, 31)
    fmt = get_format("fp8")
    amax = channel_amax(w_nk, 0, 2) if channels else expert_amax(w_nk) * 0.9
    wq = fmt.fake_quant(w_nk, amax.unsqueeze(2) if channels else expand_per_expert(amax, 3), 2).transpose(1, 2)
    if x_fmt == "fp8_token":
        xq, x_amax = _token_fake_quant(x, offs), None
    else:
        xq, x_amax = _act(x, offs, x_fmt, per_expert)
    args = (w_nk.transpose(1, 2), offs, amax, None, x_amax, "fake_fp8", x_fmt)
    calls = []
    monkeypatch.setattr(launcher, "WEIGHT_PASS_IN_GEMM", True)
    monkeypatch.setattr(launcher, "fake_quant_experts", lambda *a, **kw: calls.append(a) or None)
    got = grouped_qmm(x, *args, quantize_once=True)
    assert calls == []  # no weight codes launch of its own
    monkeypatch.undo()
    assert got.dtype == dtype
    assert torch.equal(got, _two_launches(x, args, monkeypatch))
    assert _rel(got, per_expert_matmul_f64(xq, wq, offs)) < 1e-2
    assert torch.equal(got[int(offs[-1]) :], torch.zeros_like(got[int(offs[-1]) :]))


@pytest.mark.parametrize("static", [False, True], ids=["tickets", "static"])
@pytest.mark.parametrize("channels", [False, True], ids=["per-expert", "channels"])
def test_weight_pass_gemm_writes_the_codes(channels, static):
    """``weight_pass_gemm`` writes the weight's e4m3 codes in ``w``'s layout, formats' FP8 ``quantize`` bit for
    bit (what a training step saves for backward), with either schedule; every expert's codes are written,
    also those of experts without rows."""
    from moeq.runtime.kernels.fake_quant_act import act_codes_reference
    from moeq.runtime.kernels.weight_pass_gemm import weight_pass_gemm, weight_pass_gemm_configs

    x, w_nk, offs = _problem([9, 0, 14, 0], 48, 40, 2, torch.bfloat16, 32)
    fmt = get_format("fp8")
    amax = channel_amax(w_nk, 0, 2) if channels else expert_amax(w_nk)
    expanded = amax.unsqueeze(2) if channels else expand_per_expert(amax, 3)
    x_amax = torch.tensor([3.0])
    codes = torch.full_like(w_nk, 7.0, dtype=torch.float8_e4m3fn).transpose(1, 2)
    out = torch.empty(x.shape[0], 40, dtype=torch.bfloat16)
    config = weight_pass_gemm_configs()[0]
    config = triton.Config(dict(config.kwargs, STATIC_SCHEDULE=static))
    weight_pass_gemm(act_codes_reference(x, offs, x_amax), w_nk.transpose(1, 2), offs, amax, fmt.scale_from_amax(amax),
                     x_amax, out, codes, config=config)  # fmt: skip
    expected = fmt.quantize(w_nk, expanded, 2).data
    assert torch.equal(codes.transpose(1, 2).view(torch.uint8), expected.view(torch.uint8))
    wq = fmt.fake_quant(w_nk, expanded, 2).transpose(1, 2)
    xq, _ = _act(x, offs, "fp8", False)
    assert _rel(out, per_expert_matmul_f64(xq, wq, offs)) < 1e-2


@settings(max_examples=12, deadline=None)
@given(
    counts=st.lists(st.integers(0, 40), min_size=1, max_size=6),
    k=st.sampled_from([16, 32, 48, 80]),
    n=st.sampled_from([8, 24, 40]),
    tail=st.integers(0, 3),
    static=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_weight_pass_gemm_random_problems(counts, k, n, tail, static, seed):
    """Random routings (empty experts, unrouted rows), K and N: the one-launch kernel (either schedule) writes
    formats' FP8 codes of every expert and multiplies them exactly as the codes GEMM of the same tile does on those
    codes, bit for bit."""
    from moeq.runtime.kernels.fake_quant_act import act_codes_reference
    from moeq.runtime.kernels.weight_pass_gemm import codes_gemm_tile, weight_pass_gemm, weight_pass_gemm_configs

    x, w_nk, offs = _problem(counts, k, n, tail, torch.bfloat16, seed)
    fmt = get_format("fp8")
    amax, x_amax = expert_amax(w_nk), torch.tensor([2.5])
    expected = fmt.quantize(w_nk, expand_per_expert(amax, 3), 2)
    config = weight_pass_gemm_configs()[0]
    tile = codes_gemm_tile(config)
    x_codes = act_codes_reference(x, offs, x_amax)
    scale = fmt.scale_from_amax(amax)
    codes = torch.zeros_like(w_nk, dtype=torch.float8_e4m3fn).transpose(1, 2)
    out = torch.full((x.shape[0], n), float("nan"), dtype=torch.bfloat16)
    weight_pass_gemm(x_codes, w_nk.transpose(1, 2), offs, amax, scale, x_amax, out, codes,
                     config=triton.Config(dict(config.kwargs, STATIC_SCHEDULE=static)))  # fmt: skip
    assert torch.equal(codes.transpose(1, 2).view(torch.uint8), expected.data.view(torch.uint8))
    data, _, _ = stored_weight_args(expected)
    want = grouped_qmm(x_codes, data, offs, scale, None, x_amax, "fp8", "fp8_codes", config=tile)
    assert torch.equal(out, want)
