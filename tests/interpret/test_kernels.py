"""Every Triton kernel equals the moeq.formats reference bit for bit (CPU, TRITON_INTERPRET=1).

Random inputs over several seeds, odd shapes (E=1, K=16, N not a multiple of the tile, empty experts),
bf16 and fp32, both contraction-dim layouts, and amax values below the data's max so saturation and
clamping are exercised.
"""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

from moeq import segments
from moeq.formats import (
    channel_amax,
    e2m1_round,
    expand_per_expert,
    expand_weight_amax,
    expert_amax,
    get_format,
    round_to_e4m3,
    stored_form,
)
from moeq.lowering import ops
from moeq.runtime import kernels
from moeq.runtime.kernels.numerics import round_e2m1, round_e4m3, round_to_bf16
from tests.conftest import (
    assert_same_bits,
    far_below_block_weights,
    gradients_with_clipped_weights,
    nonfinite_weights,
)

assert os.environ.get("TRITON_INTERPRET") == "1"

DTYPES = [torch.float32, torch.bfloat16]
FORMATS = ["fp8", "nvfp4"]
# (stacked weight shape, contraction dim)
WEIGHT_SHAPES = [((3, 40, 64), 2), ((2, 48, 33), 1), ((1, 17, 16), 2), ((4, 16, 272), 2)]


def _weights(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[0]).view(-1, 1, 1)
    w[0, 0, :3] = torch.tensor([0.0, -0.0, 1e-30])
    return w.to(dtype)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("shape", "k_dim"), WEIGHT_SHAPES)
def test_fake_quant_experts_bit_exact(shape, k_dim, fmt, dtype, seed):
    """fake_quant_experts == formats.fake_quant, all experts in one launch."""
    w = _weights(shape, dtype, seed)
    if fmt == "nvfp4" and w.shape[k_dim] % 16:
        pytest.skip("NVFP4 needs K % 16 == 0 (rejection is tested below)")
    amax = expert_amax(w) * torch.tensor([0.7, 1.0, 1.0, 1.0])[: shape[0]]
    if shape[0] > 2:
        amax[1] = 0.0  # an expert with a zero amax must give zeros, not NaN
    expected = get_format(fmt).fake_quant(w, expand_per_expert(amax, 3), k_dim)
    got = kernels.fake_quant_experts(w, amax, fmt, k_dim)
    assert got.dtype == w.dtype and got.shape == w.shape
    assert_same_bits(got, expected, fmt)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_fake_quant_experts_nan_and_inf_as_the_spec(fmt, dtype):
    """NaN and +-inf weights: NVFP4 blocks holding a NaN come out all NaN (the spec's block amax and clamp
    keep NaN), infinities saturate, zero amax gives zeros; bit for bit elsewhere."""
    w, amax = nonfinite_weights(dtype)
    expected = get_format(fmt).fake_quant(w, expand_per_expert(amax, 3), -1)
    assert expected.isnan().any() and expected.isfinite().any()
    assert_same_bits(kernels.fake_quant_experts(w, amax, fmt, -1), expected, fmt)


def test_fake_quant_experts_rejects_bad_input():
    """K not a multiple of 16 for NVFP4, wrong rank, amax length, integer weights and more experts than a
    CUDA grid holds are clear errors."""
    w = torch.randn(2, 8, 24)
    with pytest.raises(ValueError, match="multiple of the block size 16"):
        kernels.fake_quant_experts(w, expert_amax(w), "nvfp4")
    with pytest.raises(ValueError, match="3-D"):
        kernels.fake_quant_experts(w[0], expert_amax(w), "fp8")
    with pytest.raises(ValueError, match="entries for 2 experts"):
        kernels.fake_quant_experts(w, torch.ones(3), "fp8")
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        kernels.fake_quant_experts(w.to(torch.int32), torch.ones(2), "fp8")
    many = torch.zeros(65536, 1, 16)
    with pytest.raises(ValueError, match="more than 65535 experts or row tiles"):
        kernels.fake_quant_experts(many, torch.ones(65536), "fp8")


def _stored_nvfp4(w, amax, k_dim):
    """formats' NVFP4 quantization in the stored form (the reference of ``nvfp4_weight_codes``)."""
    return stored_form(get_format("nvfp4").quantize(w, expand_per_expert(amax, 3), k_dim))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize(("shape", "k_dim"), [*WEIGHT_SHAPES, ((2, 144, 24), 1), ((1, 8, 400), 2)])
def test_nvfp4_weight_codes_bit_exact(shape, k_dim, dtype, seed):
    """nvfp4_weight_codes == formats' NVFP4 quantize in the stored form (packed E2M1 pairs in the deploy order,
    e4m3 block scales, the global scale) bit for bit: K past whole 128-element runs (the last run's padding bytes
    zero), both contraction dims, an expert with a zero amax, saturating values, signed zeros and tiny values."""
    w = _weights(shape, dtype, seed)
    if w.shape[k_dim] % 16:
        pytest.skip("NVFP4 needs K % 16 == 0 (rejection is tested below)")
    amax = expert_amax(w) * torch.tensor([0.7, 1.0, 1.0, 1.0])[: shape[0]]
    if shape[0] > 2:
        amax[1] = 0.0
    got, want = kernels.nvfp4_weight_codes(w, amax, k_dim), _stored_nvfp4(w, amax, k_dim)
    for name, g, e in zip(("data", "scale", "block_scale"), got, want):
        assert_same_bits(g, e, name)


def test_nvfp4_weight_codes_extreme_values():
    """Blocks spanning the whole fp32 range (quotients that are -0 or underflow; global amaxes inside and outside
    the fast quotient's range) and infinities (saturating at +-6): the same bits as formats. (NaN blocks: the GPU
    test; the interpreter's e4m3 store writes NaN as 0x7C.)"""
    w = far_below_block_weights()
    amax = torch.tensor([3e38, 1e15])
    got, want = kernels.nvfp4_weight_codes(w, amax, 2), _stored_nvfp4(w, amax, 2)
    for name, g, e in zip(("data", "scale", "block_scale"), got, want):
        assert_same_bits(g, e, name)
    w = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(3))
    w[:, 1, 20], w[:, 2, 7] = float("inf"), -float("inf")
    amax = torch.tensor([2.0, 0.0])
    got, want = kernels.nvfp4_weight_codes(w, amax, 2), _stored_nvfp4(w, amax, 2)
    for name, g, e in zip(("data", "scale", "block_scale"), got, want):
        assert_same_bits(g, e, name)


def test_nvfp4_weight_codes_global_scale_of_extreme_amaxes():
    """The kernel stores each expert's global scale ``amax / 2688`` (one program an expert): formats' bits for zero,
    subnormal-quotient, huge, infinite and NaN amaxes, with every expert's codes and block scales still formats'
    (NaN's codes: the GPU test; the interpreter's e4m3 store writes NaN as 0x7C)."""
    w = _weights((5, 40, 64), torch.float32, 6)
    amax = torch.tensor([0.0, 1e-40, 3.0e38, float("inf"), float("nan")])
    got, want = kernels.nvfp4_weight_codes(w, amax, 2), _stored_nvfp4(w, amax, 2)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0, equal_nan=True)
    for name, g, e in zip(("data", "block_scale"), got[::2], want[::2]):
        assert_same_bits(g[:4], e[:4], name)


def test_nvfp4_weight_codes_into_existing_tensors():
    """``out=``: the three tensors are written in place (their storage kept); wrong shapes, dtypes or layouts,
    K not a multiple of 16, a 2-D weight and a wrong amax length are errors that say what was expected."""
    w = torch.randn(2, 32, 48)
    amax = expert_amax(w)
    out = tuple(torch.full_like(t, 7) for t in _stored_nvfp4(w, amax, 1))
    pointers = [t.data_ptr() for t in out]
    got = kernels.nvfp4_weight_codes(w, amax, 1, out=out)
    assert [t.data_ptr() for t in got] == pointers
    for g, e in zip(got, _stored_nvfp4(w, amax, 1)):
        assert_same_bits(g, e)
    with pytest.raises(ValueError, match=r"nvfp4_weight_codes: out is .* needs"):
        kernels.nvfp4_weight_codes(w, amax, 1, out=(out[0][:, :, :32], out[1], out[2]))
    with pytest.raises(ValueError, match="multiple of the block size 16"):
        kernels.nvfp4_weight_codes(torch.randn(2, 8, 24), amax, 2)
    with pytest.raises(ValueError, match="3-D"):
        kernels.nvfp4_weight_codes(w[0], amax, 1)
    with pytest.raises(ValueError, match="entries for 2 experts"):
        kernels.nvfp4_weight_codes(w, torch.ones(3), 1)
    with pytest.raises(ValueError, match="contraction_dim must be 1 or 2"):
        kernels.nvfp4_weight_codes(w, amax, 0)


def _routed(seed, dtype, counts, k=64):
    g = torch.Generator().manual_seed(seed)
    rows = sum(counts) + 3  # 3 padding rows past offs[-1]
    x = (torch.randn(rows, k, generator=g) * 4).to(dtype)
    offs = torch.tensor(counts, dtype=torch.int32).cumsum(0).to(torch.int32)
    return x, offs


COUNTS = [[5, 0, 19, 1], [0, 0, 7], [33], [0, 16, 0, 0, 2]]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("counts", COUNTS, ids=lambda c: "-".join(map(str, c)))
def test_segment_amax_bit_exact(counts, dtype, seed):
    """segment_amax: per-expert amax and counts equal the reference; running buffers update in place."""
    x, offs = _routed(seed, dtype, counts, k=80)
    amax_ref, counts_ref = segments.segment_amax(x, offs, len(counts))
    amax, got_counts = kernels.segment_amax(x, offs, len(counts))
    assert torch.equal(amax, amax_ref) and torch.equal(got_counts, counts_ref)
    running_amax, running_counts = torch.full((len(counts),), 1.5), torch.ones(len(counts), dtype=torch.int64)
    kernels.segment_amax_(x, offs, running_amax, running_counts)
    assert torch.equal(running_amax, torch.maximum(amax_ref, torch.tensor(1.5)))
    assert torch.equal(running_counts, counts_ref + 1)


def test_segment_amax_nan_marks_only_its_expert():
    """A NaN in one expert's rows makes that expert's amax NaN and leaves the others exact."""
    x, offs = _routed(0, torch.float32, [4, 4, 4])
    x[5, 2] = float("nan")
    amax, _ = kernels.segment_amax(x, offs, 3)
    ref, _ = segments.segment_amax(x, offs, 3)
    assert amax[1].isnan() and not amax[[0, 2]].isnan().any()
    assert torch.equal(amax[[0, 2]], ref[[0, 2]])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_expert"])
@pytest.mark.parametrize("counts", COUNTS[:2], ids=lambda c: "-".join(map(str, c)))
def test_fake_quant_act_bit_exact(counts, shared, fmt, dtype, seed):
    """fake_quant_act == the reference op: static amax (shared or per expert via offs); padding rows untouched."""
    x, offs = _routed(seed, dtype, counts, k=48)
    amax = torch.tensor([2.5]) if shared else torch.linspace(0.5, 6.0, len(counts))
    expected = ops._fake_quant_act_reference(x, offs, amax, fmt, 0, -1)
    got = kernels.fake_quant_act(x, offs, amax, fmt)
    assert_same_bits(got, expected, fmt)
    assert torch.equal(got[int(offs[-1]) :], x[int(offs[-1]) :])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("fmt", FORMATS)
def test_fake_quant_act_in_wgmma_k_order(fmt, seed):
    """``in_wgmma_k_order=True``: the same values as the reference op, each 64-chunk of K in ``wgmma_k_order`` (the
    register-operand QAT NVFP4 kernel's order; the permutation applied by torch to the reference's output); a K that
    is not a multiple of 64 is refused with the figure."""
    from moeq.runtime.kernels.fake_quant_act import wgmma_k_order

    x, offs = _routed(seed, torch.bfloat16, COUNTS[0], k=128)
    amax = torch.linspace(0.5, 6.0, len(COUNTS[0]))
    expected = wgmma_k_order(ops._fake_quant_act_reference(x, offs, amax, fmt, 0, -1))
    assert_same_bits(kernels.fake_quant_act(x, offs, amax, fmt, in_wgmma_k_order=True), expected, fmt)
    x48, offs48 = _routed(seed, torch.bfloat16, COUNTS[0], k=48)
    with pytest.raises(ValueError, match="K = 48 is not a multiple of 64"):
        kernels.fake_quant_act(x48, offs48, amax, fmt, in_wgmma_k_order=True)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize(("shape", "k_dim"), WEIGHT_SHAPES[:3])
def test_fp8_weight_codes_bit_exact(shape, k_dim, dtype, seed):
    """``codes=True``: the e4m3 codes of formats' FP8 ``quantize`` (same layout as the weight), a zero amax
    included; times the expert's scale they are the fake quant."""
    w = _weights(shape, dtype, seed)
    amax = expert_amax(w) * torch.tensor([0.7, 1.0, 1.0])[: shape[0]]
    if shape[0] > 2:
        amax[1] = 0.0
    fmt = get_format("fp8")
    expected = fmt.quantize(w, expand_per_expert(amax, 3), k_dim).data.movedim(-1, k_dim)
    scale_out = torch.full_like(amax, -1.0)
    got = kernels.fake_quant_experts(w, amax, "fp8", k_dim, codes=True, scale_out=scale_out)
    assert got.dtype == torch.float8_e4m3fn and got.shape == w.shape
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(scale_out, fmt.scale_from_amax(amax))  # written by the same launch
    scale = expand_per_expert(fmt.scale_from_amax(amax), 3)
    assert torch.equal((got.float() * scale).to(dtype), fmt.fake_quant(w, expand_per_expert(amax, 3), k_dim))


@pytest.mark.parametrize(("shape", "k_dim"), WEIGHT_SHAPES[:3])
def test_fp8_weight_codes_into_a_k_last_buffer(shape, k_dim):
    """``out=``: the kernel writes the codes into an existing K-last buffer seen in the weight's layout (what
    ``moeq.reuse_weight_codes`` refills in place); the buffer keeps its address and holds formats' codes, and an
    ``out`` of another shape or dtype is an error naming both."""
    w = _weights(shape, torch.bfloat16, 3)
    amax = expert_amax(w) * 0.9
    expected = get_format("fp8").quantize(w, expand_per_expert(amax, 3), k_dim).data  # K-last
    buffer = torch.zeros(expected.shape, dtype=torch.uint8)
    address = buffer.data_ptr()
    kernels.fake_quant_experts(
        w, amax, "fp8", k_dim, codes=True, out=buffer.view(torch.float8_e4m3fn).movedim(-1, k_dim)
    )
    assert buffer.data_ptr() == address and torch.equal(buffer, expected.view(torch.uint8))
    with pytest.raises(ValueError, match=r"out is .* torch.uint8 on cpu, needs .* torch.float8_e4m3fn on cpu"):
        kernels.fake_quant_experts(w, amax, "fp8", k_dim, codes=True, out=buffer.movedim(-1, k_dim))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_expert"])
@pytest.mark.parametrize("counts", COUNTS[:2], ids=lambda c: "-".join(map(str, c)))
def test_fp8_act_codes_bit_exact(counts, shared, dtype):
    """``fake_quant_act(..., codes=True)``: routed rows' e4m3 codes under their (shared or expert's) amax
    equal formats' FP8 ``quantize`` data row by row; rows past ``offs[-1]`` are zero codes."""
    x, offs = _routed(4, dtype, counts, k=48)
    amax = torch.tensor([2.5]) if shared else torch.linspace(0.5, 6.0, len(counts))
    got = kernels.fake_quant_act(x, offs, amax, "fp8", codes=True)
    assert got.dtype == torch.float8_e4m3fn
    fmt, start = get_format("fp8"), 0
    for e, end in enumerate(offs.tolist()):
        a = amax if shared else amax[e : e + 1]
        expected = fmt.quantize(x[start:end], a.view(1, 1), -1).data
        assert torch.equal(got[start:end].view(torch.uint8), expected.view(torch.uint8)), f"expert {e}"
        start = end
    assert not got[int(offs[-1]) :].view(torch.uint8).any()


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_expert", "channel"])
def test_fp8_scale_out_keeps_extreme_amaxes(per_channel):
    """``scale_out``: the scales ``amax / 448`` are formats', bit for bit, for zero, subnormal-quotient, huge,
    infinite and NaN amaxes; a ``scale_out`` without codes, or of the wrong size or dtype, is an error saying
    what it needs."""
    w = _weights((4, 32, 48), torch.float32, 5)
    extremes = torch.tensor([0.0, 1e-40, 3.0e38, float("inf")])
    amax = torch.stack([extremes, extremes.roll(1)], dim=1).repeat(1, 16) if per_channel else extremes
    if per_channel:
        amax[0, 3] = float("nan")
    scale_out = torch.zeros_like(amax)
    kernels.fake_quant_experts(w, amax, "fp8", 2, codes=True, scale_out=scale_out)
    want = get_format("fp8").scale_from_amax(amax)
    torch.testing.assert_close(scale_out, want, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match=r"scale_out .* needs codes=True and a contiguous float32 tensor of 4"):
        kernels.fake_quant_experts(w, extremes, "fp8", 2, scale_out=torch.zeros(4))
    with pytest.raises(ValueError, match=r"scale_out \(\(3,\) torch.float32 on cpu\) needs codes=True"):
        kernels.fake_quant_experts(w, extremes, "fp8", 2, codes=True, scale_out=torch.zeros(3))
    with pytest.raises(ValueError, match=r"scale_out \(\(4,\) torch.float64 on cpu\)"):
        kernels.fake_quant_experts(w, extremes, "fp8", 2, codes=True, scale_out=torch.zeros(4, dtype=torch.float64))


def test_codes_are_fp8_only():
    """NVFP4 has no single code tensor: asking for codes is a clear error."""
    x, offs = _routed(0, torch.float32, [4, 4])
    with pytest.raises(ValueError, match="codes=True returns FP8 codes; format 'nvfp4'"):
        kernels.fake_quant_act(x, offs, torch.tensor([1.0]), "nvfp4", codes=True)
    with pytest.raises(ValueError, match="codes=True returns FP8 codes; format 'nvfp4'"):
        kernels.fake_quant_experts(torch.randn(2, 8, 16), torch.ones(2), "nvfp4", codes=True)


@pytest.mark.parametrize("with_blocks", [False, True])
@pytest.mark.parametrize(("shape", "k_dim"), [((3, 40, 64), 2), ((2, 48, 32), 1)])
def test_expert_weight_amax(shape, k_dim, with_blocks):
    """Per-expert max|W| and NVFP4 per-16-block amax (along K) in one launch, exact."""
    w = _weights(shape, torch.bfloat16, 0)
    amax, blocks = kernels.expert_weight_amax(w, k_dim, with_blocks)
    assert torch.equal(amax, expert_amax(w))
    if with_blocks:
        wk = w.float().movedim(k_dim, -1)
        expected = wk.abs().reshape(*wk.shape[:-1], wk.shape[-1] // 16, 16).amax(-1)
        assert torch.equal(blocks, expected)
    else:
        assert blocks is None


@triton.jit
def _apply_roundings(x_ptr, e2m1_ptr, e4m3_ptr, bf16_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < N)
    tl.store(e2m1_ptr + offs, round_e2m1(x), mask=offs < N)
    tl.store(e4m3_ptr + offs, round_e4m3(tl.minimum(tl.maximum(x, -448.0), 448.0)), mask=offs < N)
    tl.store(bf16_ptr + offs, round_to_bf16(x), mask=offs < N)


def test_device_rounding_functions():
    """round_e2m1 / round_e4m3 / round_to_bf16 device functions: every tie, saturation, signs, NaN."""

    grid_e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid_e4m3 = grid_e4m3[grid_e4m3.isfinite()].sort().values
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 1.9999999, 2.0, 3.9999998, 4.0, 5.0000005, 6.0, 6.5, 100.0]
    x = torch.cat(
        [
            torch.tensor(ties + [-t for t in ties] + [0.0, -0.0, -0.1, float("nan")]),
            (grid_e4m3[:-1] + grid_e4m3[1:]) / 2,
            torch.randn(4000, generator=torch.Generator().manual_seed(0)) * 3,
        ]
    )
    outs = [torch.empty_like(x) for _ in range(3)]
    _apply_roundings[(triton.cdiv(x.numel(), 256),)](x, *outs, x.numel(), BLOCK=256)
    assert torch.equal(outs[0].nan_to_num(7.0), e2m1_round(x).nan_to_num(7.0))
    assert torch.equal(outs[0].signbit(), e2m1_round(x).signbit())
    clamped = x.clamp(-448, 448)
    finite = clamped.isfinite()
    assert torch.equal(outs[1][finite], round_to_e4m3(clamped)[finite])
    assert torch.equal(outs[2][finite], x[finite].to(torch.bfloat16).float())


def test_nvfp4_negative_values_far_below_their_block():
    """A negative weight 2^150 below its block's amax divides to -0 in fp32 only when the quotient survives:
    the kernel's E2M1 sign (the -0 code) matches formats.py on blocks spanning the whole fp32 range."""
    w = far_below_block_weights()
    amax = expert_amax(w)
    expected = get_format("nvfp4").fake_quant(w, expand_per_expert(amax, 3), 2)
    got = kernels.fake_quant_experts(w, amax, "nvfp4", 2)
    assert_same_bits(got, expected, "nvfp4")
    assert expected.signbit().any() and not expected[w < 0].signbit().all()


def test_nvfp4_operand_values():
    """numerics.fake_quant_nvfp4_operand (the Gluon QAT NVFP4 converter's MMA operand): formats' NVFP4 values,
    signed zeros aside, on every bf16 value, blocks spanning the fp32 range, NaN and inf (fast quotients where
    the interpreter's fma rounds once)."""
    from tests.numerics_kernels import check_nvfp4_operand_values

    check_nvfp4_operand_values("cpu")


# ---- dequant_stored_weight: moeq::dequant_weight's CUDA kernel (the unfused deploy path)


def _stored(w: torch.Tensor, fmt: str, amax: torch.Tensor):
    from moeq.formats import stored_form

    return stored_form(get_format(fmt).quantize(w, expand_per_expert(amax, 3), 2))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(3, 40, 64), (1, 17, 16), (2, 5, 272), (4, 33, 400)])
def test_dequant_stored_weight_bit_exact(shape, fmt, dtype, seed):
    """The stored form of ``moeq.freeze`` (K-last; NVFP4 in its 64-byte runs, K not a multiple of 128 included)
    dequantized by the kernel == the op's formats.py reference bit for bit, in every output dtype; an expert
    with a zero scale gives zeros."""
    if fmt == "fp8" and shape[2] == 16:
        shape = (1, 17, 31)  # FP8 has no 16-block constraint: an odd K
    w = _weights(shape, torch.float32, seed)
    amax = expert_amax(w) * 0.8
    if shape[0] > 2:
        amax[1] = 0.0
    data, scale, block = _stored(w, fmt, amax)
    got = kernels.dequant_stored_weight(data, scale, block, fmt, dtype)
    assert_same_bits(got, ops._dequant_weight_reference(data, scale, block, fmt, -1, dtype), fmt)


@pytest.mark.parametrize(("block_n", "block_k"), [(8, 256), (32, 512), (64, 128)])
@pytest.mark.parametrize("fmt", FORMATS)
def test_dequant_stored_weight_every_autotuned_tile(fmt, block_n, block_k, monkeypatch):
    """The GPU autotunes the dequant tile (``dequant_configs``): tiles of several 128-element runs and of more
    rows decode the same bits (K 400: a partial last run; N 37: a partial row tile)."""
    import triton

    from moeq.runtime.kernels.dequant_weight import _dequant_weight_kernel

    monkeypatch.setattr(_dequant_weight_kernel, "configs", [triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k})])
    monkeypatch.setattr(_dequant_weight_kernel, "cache", {})
    w = _weights((2, 37, 400), torch.float32, 3)
    data, scale, block = _stored(w, fmt, expert_amax(w))
    got = kernels.dequant_stored_weight(data, scale, block, fmt, torch.bfloat16)
    assert_same_bits(got, ops._dequant_weight_reference(data, scale, block, fmt, -1, torch.bfloat16), fmt)


def test_dequant_stored_weight_every_code():
    """Every e4m3 byte (NaN included) as FP8 data and as NVFP4 block scales, every E2M1 nibble, with global
    scales from 1e-40 (subnormal products, where a flush to zero would show) to 1e30: bit for bit."""
    codes = torch.arange(256, dtype=torch.uint8)
    scale = torch.tensor([1.0, 3.7e-3, 1e-40, 1e30])
    fp8 = codes.repeat(4, 3, 1)  # [E, N, K=256]
    got = kernels.dequant_stored_weight(fp8, scale, fp8.new_zeros(0), "fp8", torch.float32)
    assert_same_bits(got, ops._dequant_weight_reference(fp8, scale, fp8.new_zeros(0), "fp8", -1, torch.float32))
    from moeq.formats import interleave_nvfp4_runs

    pairs = codes.repeat(4, 256, 1)  # every nibble pair, K = 512
    blocks = codes.view(16, 16).repeat(4, 16, 2)  # [E, N=256, K/16=32]: every block scale
    data = interleave_nvfp4_runs(pairs).contiguous()
    for dtype in (torch.float32, torch.bfloat16):
        got = kernels.dequant_stored_weight(data, scale, blocks, "nvfp4", dtype)
        assert_same_bits(got, ops._dequant_weight_reference(data, scale, blocks, "nvfp4", -1, dtype), "nvfp4")


def test_dequant_stored_weight_rejects_bad_input():
    data = torch.zeros(2, 4, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="fmt 'fp8' or 'nvfp4'"):
        kernels.dequant_stored_weight(data, torch.ones(2), data.new_zeros(0), "int4", torch.bfloat16)
    with pytest.raises(ValueError, match="one entry per expert \\(2\\)"):
        kernels.dequant_stored_weight(data, torch.ones(3), data.new_zeros(0), "fp8", torch.bfloat16)
    with pytest.raises(ValueError, match="1-byte tensor"):
        kernels.dequant_stored_weight(data.float(), torch.ones(2), data.new_zeros(0), "fp8", torch.bfloat16)
    with pytest.raises(ValueError, match="whole 64-byte runs"):
        kernels.dequant_stored_weight(
            data, torch.ones(2), torch.zeros(2, 4, 16, dtype=torch.uint8), "nvfp4", torch.bfloat16
        )
    with pytest.raises(ValueError, match="dtype must be float32, bfloat16 or float16"):
        kernels.dequant_stored_weight(data, torch.ones(2), data.new_zeros(0), "fp8", torch.int8)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(3, 40, 64), (1, 17, 300), (4, 9, 7)])
def test_mask_clipped_grad_bit_exact(shape, dtype, seed):
    """The in-place STE mask equals torch's ``grad * (|w| <= amax)`` bit for bit: clipped entries become
    ``g * 0`` (signed zeros; NaN from inf and NaN gradients), NaN weights clip, a weight at its amax passes;
    the gradient may be a permuted (strided) view, as the wgrad GEMM's output is."""
    g, w, amax = gradients_with_clipped_weights(shape, dtype, seed)
    want = g * (w.abs() <= amax.view(-1, 1, 1))
    assert want.isnan().any() and (want == 0).any() and (want != 0).any()
    got = g.clone()
    assert kernels.mask_clipped_grad_(got, w, amax) is got
    assert_same_bits(got, want, "contiguous")
    strided = g.transpose(1, 2).contiguous().transpose(1, 2)  # the same values, columns-first in memory
    kernels.mask_clipped_grad_(strided, w, amax.view(-1, 1, 1))
    assert_same_bits(strided, want, "strided")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("shape", "k_dim"), [((5, 40, 64), 2), ((5, 33, 48), 1)])
def test_mask_clipped_grad_from_codes_bit_exact(shape, k_dim, dtype, seed):
    """Given the weight's FP8 codes (formats' quantize with the same amax, viewed in the weight's layout), the
    mask still equals torch's ``grad * (|w| <= amax)`` bit for bit: codes of +-448 (clipped, or kept by
    rounding up to 448), NaN codes, an expert with amax 0 and one whose scale is subnormal (1e-38) all defer
    to the weight; weights on both sides of amax within a rounding of it."""
    g, w, amax = gradients_with_clipped_weights(shape, dtype, seed)
    amax[1], amax[2] = 0.0, 1e-38
    near = amax[3] * torch.linspace(0.9, 1.1, shape[2])  # about a third round to 448, half are clipped
    w[3, 0] = near.to(dtype)
    w[3, 1] = -near.to(dtype)
    want = g * (w.abs() <= amax.view(-1, 1, 1))
    data = get_format("fp8").quantize(w, expand_per_expert(amax, 3), k_dim).data  # contraction dim last
    codes = data.movedim(-1, k_dim)  # the weight's [E, M, N] layout, strided like the training graph's view
    bits = codes.view(torch.uint8) & 0x7F
    assert (bits == 0x7E).any() and (bits == 0x7F).any() and (bits < 0x7E).any()
    got = g.clone()
    assert kernels.mask_clipped_grad_(got, w, amax, codes) is got
    assert_same_bits(got, want, "codes")
    strided = g.transpose(1, 2).contiguous().transpose(1, 2)
    kernels.mask_clipped_grad_(strided, w, amax.view(-1, 1, 1), codes.view(torch.uint8))
    assert_same_bits(strided, want, "strided, uint8 codes")


def test_mask_clipped_grad_trusts_codes_below_448():
    """The codes decide where they can: codes that all claim "well inside" (0) leave every gradient as it is,
    clipped weights included (the kernel did not read them), except in the expert whose amax is too small for
    its codes (there the weights decide); codes of 448 send every entry to its weight."""
    g, w, amax = gradients_with_clipped_weights((3, 8, 32), torch.float32, 0)
    amax[2] = 1e-38
    keep = w.abs() <= amax.view(-1, 1, 1)
    assert not keep[:2].all() and not keep[2].all()
    got = g.clone()
    kernels.mask_clipped_grad_(got, w, amax, torch.zeros(3, 8, 32, dtype=torch.uint8))
    assert_same_bits(got[:2], g[:2], "trusted codes")
    assert_same_bits(got[2], (g * keep)[2], "tiny amax")
    got = g.clone()
    kernels.mask_clipped_grad_(got, w, amax, torch.full((3, 8, 32), 0x7E, dtype=torch.uint8))
    assert_same_bits(got, g * keep, "codes of 448")


@pytest.mark.parametrize("byte", [0, 1, 2, 3])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_mask_clipped_grad_tests_codes_four_per_word(byte, offset):
    """Contiguous, 4-byte aligned codes are tested four per 32-bit word: an undecided code (+-448, NaN) at any byte
    of a word, in a tile of decided codes (up to 0x7D / 0xFD, one step below 448), sends exactly that entry to its
    weight; codes one byte off alignment take the per-byte path with the same result. Every weight here clips, so
    the gradient is zeroed exactly where the codes defer to the weight."""
    from moeq.runtime.kernels.ste_mask import reads_words

    gen = torch.Generator().manual_seed(byte)
    shape = (2, 5, 64)
    g = torch.randn(shape, generator=gen)
    amax = torch.tensor([0.5, 2.0])
    w = torch.full(shape, 4.0)  # every weight clips
    storage = torch.randint(0, 0x7E, (2 * 5 * 64 + offset,), generator=gen, dtype=torch.uint8)
    storage |= torch.randint(0, 2, storage.shape, generator=gen, dtype=torch.uint8) << 7  # both signs
    codes = storage[offset:].view(shape)
    undecided = torch.zeros(shape, dtype=torch.bool)
    for e, row, word, value in [(0, 0, 3, 0x7E), (0, 4, 15, 0xFE), (1, 2, 0, 0x7F), (1, 3, 9, 0xFF)]:
        codes[e, row, 4 * word + byte] = value
        undecided[e, row, 4 * word + byte] = True
    assert reads_words(codes) == (offset == 0)
    got = g.clone()
    kernels.mask_clipped_grad_(got, w, amax, codes)
    assert_same_bits(got, torch.where(undecided, g * 0.0, g), f"byte {byte}")


def test_mask_clipped_grad_rejects_bad_input():
    w = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="same stacked \\[E, M, N\\] shape"):
        kernels.mask_clipped_grad_(torch.zeros(2, 8, 4), w, torch.ones(2))
    with pytest.raises(ValueError, match="amax has 3 entries for 2 experts"):
        kernels.mask_clipped_grad_(torch.zeros_like(w), w, torch.ones(3))
    with pytest.raises(ValueError, match="grad_w must be float32, bfloat16 or float16"):
        kernels.mask_clipped_grad_(torch.zeros(2, 4, 8, dtype=torch.int32), w, torch.ones(2))
    with pytest.raises(ValueError, match="codes must be w's FP8 codes, float8_e4m3fn or uint8 \\(2, 4, 8\\)"):
        kernels.mask_clipped_grad_(torch.zeros_like(w), w, torch.ones(2), torch.zeros(2, 8, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="codes must be w's FP8 codes"):
        kernels.mask_clipped_grad_(torch.zeros_like(w), w, torch.ones(2), torch.zeros(2, 4, 8))


def test_interpreted_launches_take_the_plain_path():
    """Launch plans are for compiled kernels on CUDA: interpreted CPU launches go through ``kernel[grid]`` every
    time (counted as ``plain``), leave no plan, and repeat calls keep the reference's bits."""
    from moeq.runtime.kernels import launch

    w = _weights((2, 16, 64), torch.bfloat16, 0)
    amax = expert_amax(w)
    want = get_format("fp8").fake_quant(w, expand_per_expert(amax, 3), 2)
    launch._plans.clear()
    before = dict(launch.launch_counts)
    for _ in range(2):
        assert_same_bits(kernels.fake_quant_experts(w, amax, "fp8", 2), want, "fp8")
    assert launch.launch_counts["plain"] - before.get("plain", 0) == 2
    assert launch.launch_counts["planned"] == before.get("planned", 0) and not launch._plans


# -- FP8 channel-wise weight scales and dynamic per-token activation scales (moeq.FP8_DYNAMIC) --------------


def _channel_amax(w, k_dim):
    """Each expert's per-output-channel amax, scaled down here and there (clipping) and one channel zeroed."""
    amax = channel_amax(w, 0, k_dim) * (0.6 + 0.4 * torch.rand(w.shape[0], w.shape[3 - k_dim]))
    amax[0, 1] = 0.0  # a zero channel amax gives zeros, not NaN
    return amax


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize(("shape", "k_dim"), WEIGHT_SHAPES)
def test_fake_quant_experts_channel_wise_bit_exact(shape, k_dim, dtype, seed):
    """Channel-wise amax ``[E, N]``: fake quant and e4m3 codes == formats with the amax broadcast along K."""
    torch.manual_seed(seed)
    w = _weights(shape, dtype, seed)
    amax = _channel_amax(w, k_dim)
    fmt = get_format("fp8")
    expanded = expand_weight_amax(amax, 3, 0, k_dim)
    got = kernels.fake_quant_experts(w, amax, "fp8", k_dim)
    assert_same_bits(got, fmt.fake_quant(w, expanded, k_dim), "fp8")
    codes = kernels.fake_quant_experts(w, amax, "fp8", k_dim, codes=True)
    expected = fmt.quantize(w, expanded, k_dim).data.movedim(-1, k_dim)
    assert torch.equal(codes.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize(("shape", "k_dim"), WEIGHT_SHAPES[:2])
def test_channel_wise_codes_and_dequant_round_trip(shape, k_dim):
    """``quantize_weight``'s stored form with channel scales ``[E, N]``, written by the kernel into its buffers,
    dequantized by the dequant kernel == the fake quant, bit for bit."""
    w = _weights(shape, torch.bfloat16, 0)
    amax = _channel_amax(w, k_dim)
    data, scale, block = ops._quantize_weight_reference(w, amax, "fp8", 0, k_dim)
    assert scale.shape == amax.shape
    buffers = (torch.zeros_like(data), torch.zeros_like(scale), torch.zeros_like(block))
    ops._codes_into(w, amax, "fp8", k_dim, *buffers)
    assert torch.equal(buffers[0], data) and torch.equal(buffers[1], scale)
    got = kernels.dequant_stored_weight(data, scale, block, "fp8", torch.bfloat16).movedim(-1, k_dim)
    assert torch.equal(got, get_format("fp8").fake_quant(w, expand_weight_amax(amax, 3, 0, k_dim), k_dim))


@pytest.mark.parametrize(("shape", "k_dim"), [((3, 40, 64), 2), ((2, 144, 24), 1)])
def test_nvfp4_codes_into_and_dequant_round_trip(shape, k_dim):
    """NVFP4's stored form written by the kernel into existing buffers (what ``reuse_weight_codes`` refills each
    optimizer step), dequantized by the dequant kernel == the fake quant, bit for bit."""
    w = _weights(shape, torch.bfloat16, 1)
    amax = expert_amax(w) * 0.9
    buffers = tuple(torch.zeros_like(t) for t in ops._quantize_weight_reference(w, amax, "nvfp4", 0, k_dim))
    ops._codes_into(w, amax, "nvfp4", k_dim, *buffers)
    for got, want in zip(buffers, ops._quantize_weight_reference(w, amax, "nvfp4", 0, k_dim)):
        assert_same_bits(got, want)
    got = kernels.dequant_stored_weight(*buffers, "nvfp4", torch.bfloat16).movedim(-1, k_dim)
    assert_same_bits(got, get_format("nvfp4").fake_quant(w, expand_per_expert(amax, 3), k_dim))


def test_channel_wise_amax_of_the_wrong_shape():
    w = _weights((2, 8, 16), torch.float32, 0)
    with pytest.raises(ValueError, match=r"channel-wise weight_amax \(2, 16\) needs FP8 and shape \(2, 8\)"):
        kernels.fake_quant_experts(w, torch.ones(2, 16), "fp8", 2)
    with pytest.raises(ValueError, match="needs FP8"):
        kernels.fake_quant_experts(w, torch.ones(2, 8), "nvfp4", 2)
    with pytest.raises(ValueError, match=r"channel-wise scales must be FP8 \[2, 8\]"):
        kernels.dequant_stored_weight(
            torch.zeros(2, 8, 16, dtype=torch.uint8), torch.ones(2, 3), torch.zeros(0), "fp8", torch.float32
        )


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("k", [48, 100, 300])
@pytest.mark.parametrize("counts", COUNTS[:3], ids=lambda c: "-".join(map(str, c)))
def test_fake_quant_tokens_bit_exact(counts, k, dtype, seed):
    """Dynamic per-token FP8: each routed row by its own amax (rows longer than one K tile: two sweeps), == the
    reference op; a zero row stays zero, a row with a NaN is NaN, padding rows are untouched."""
    x, offs = _routed(seed, dtype, counts, k=k)
    x[0] = 0.0
    x[min(2, int(offs[-1]) - 1), 7] = float("nan")
    expected = ops._fake_quant_act_dynamic_reference(x, offs, "fp8", 0, -1)
    got = kernels.fake_quant_tokens(x, offs)
    assert_same_bits(got, expected, "fp8")
    assert torch.equal(got[int(offs[-1]) :], x[int(offs[-1]) :])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k", [48, 300])
def test_token_codes_and_row_amax_bit_exact(k, dtype):
    """One launch gives each row's amax (NaN-keeping, as torch.amax) and its e4m3 codes under it (zero codes past
    ``offs[-1]``): formats' FP8 ``quantize`` with a per-row amax; ``row_amax`` alone gives the same amaxes."""
    x, offs = _routed(3, dtype, COUNTS[0], k=k)
    x[1, 4] = float("nan")
    x[2] = 0.0
    codes, amax = kernels.token_codes(x, offs)
    expected_amax = x.float().abs().amax(dim=1)
    assert torch.equal(amax.isnan(), expected_amax.isnan())
    assert torch.equal(amax.nan_to_num(), expected_amax.nan_to_num())
    assert torch.equal(kernels.row_amax(x).nan_to_num(), expected_amax.nan_to_num())
    routed = int(offs[-1])
    expected = get_format("fp8").quantize(x[:routed], expected_amax[:routed, None], -1).data.view(torch.uint8)
    got = codes.view(torch.uint8)
    assert torch.equal(got[:routed][~x[:routed].isnan().any(1)], expected[~x[:routed].isnan().any(1)])
    assert not got[routed:].any()
