"""Reference numerics of moeq.formats (FP8 E4M3, E2M1, NVFP4) against an independent float64 reference.

The reference below rounds by enumeration (all finite e4m3 values from their bit patterns; the eight
E2M1 magnitudes) and does every fp32 operation in float64 followed by a rounding to fp32, which equals
IEEE fp32 arithmetic for +, -, *, / (53 >= 2 * 24 + 2 bits, no double-rounding error).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moeq.formats as F
from moeq.formats import (
    QuantFormat,
    expand_per_expert,
    expert_amax,
    get_format,
    pack_nibbles,
    register_format,
    unpack_nibbles,
)

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# ------------------------------------------------------------------------------------------------
# independent reference
# ------------------------------------------------------------------------------------------------

_ALL_E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
_PATTERNS = torch.arange(256)
_POS = (~_ALL_E4M3.isnan()) & (_PATTERNS < 0x80)
E4M3_POS_VALUES = _ALL_E4M3[_POS]  # 0 .. 448, sorted by bit pattern == sorted by value
E4M3_POS_EVEN = (_PATTERNS[_POS] % 2) == 0
E2M1_REF = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def f32(x: torch.Tensor) -> torch.Tensor:
    """Round a float64 tensor to fp32 and back (one IEEE fp32 rounding)."""
    return x.float().double()


def _nearest_index(mag: torch.Tensor, grid: torch.Tensor, even: torch.Tensor) -> torch.Tensor:
    """Index of the grid value nearest to each magnitude; ties go to the candidate marked even."""
    dist = (mag.reshape(-1, 1) - grid.reshape(1, -1)).abs()
    best = dist == dist.min(dim=1, keepdim=True).values
    score = best.long() * 2 + (best & even.reshape(1, -1)).long()
    return score.argmax(dim=1).reshape(mag.shape)


def ref_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round finite values (|x| <= 448) to float8_e4m3fn by enumeration, RNE; float64 out."""
    x = x.double()
    assert bool((x.abs() <= 448).all())
    mag = E4M3_POS_VALUES[_nearest_index(x.abs(), E4M3_POS_VALUES, E4M3_POS_EVEN)]
    return torch.copysign(mag, x)


def ref_e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """E2M1 codes ``sign << 3 | index`` by nearest magnitude, ties to the even index; NaN -> 0."""
    x = x.double()
    nan = x.isnan()
    mag = x.abs().nan_to_num(0.0).clamp(max=6.0)
    index = _nearest_index(mag, E2M1_REF, torch.arange(8) % 2 == 0)
    sign = (x < 0).long()
    return torch.where(nan, 0, (sign << 3) | index).to(torch.uint8)


def ref_e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    codes = codes.long()
    mag = E2M1_REF[codes & 7]
    return torch.where((codes & 8) != 0, -mag, mag)


def ref_pack(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte by explicit loop: element 2k low nibble, 2k+1 high nibble."""
    flat = codes.reshape(-1, codes.shape[-1]).tolist()
    out = [[row[2 * k] | (row[2 * k + 1] << 4) for k in range(len(row) // 2)] for row in flat]
    return torch.tensor(out, dtype=torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // 2)


def ref_fp8_expert(w: torch.Tensor, amax: float) -> torch.Tensor:
    """FP8 fake quant of one tensor, float64 holding the fp32 result (before the cast to w's dtype)."""
    s = f32(torch.tensor(amax, dtype=torch.float64) / 448.0)
    div = s if float(s) != 0 else torch.ones_like(s)
    q = ref_e4m3(f32(w.double() / div).clamp(-448, 448))
    return f32(q * s)


def ref_nvfp4_expert(w: torch.Tensor, amax: float, cdim: int):
    """NVFP4 of one expert (2-D); K moved last. Returns (dequant fp32-in-float64, codes, s_b, g)."""
    wk = w.double().movedim(cdim, -1)
    n, k = wk.shape
    blocks = wk.reshape(n, k // 16, 16)
    g = f32(torch.tensor(amax, dtype=torch.float64) / 2688.0)
    if float(g) == 0:
        sb = torch.ones(n, k // 16, dtype=torch.float64)
        codes = ref_e2m1_codes(torch.zeros_like(blocks))
        return torch.zeros_like(wk), codes.reshape(n, k), sb, g
    a_b = blocks.abs().amax(dim=-1)
    s = f32(a_b / f32(6.0 * g))
    s = torch.where(s == 0, torch.ones_like(s), s).clamp(2.0**-9, 448.0)
    sb = ref_e4m3(s)
    scale = f32(sb * g).unsqueeze(-1)
    codes = ref_e2m1_codes(f32(blocks / scale))
    deq = f32(ref_e2m1_decode(codes) * scale)
    return deq.reshape(n, k), codes.reshape(n, k), sb, g


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor (so that -0.0 and 0.0 differ)."""
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8}
    return t.contiguous().view(view[t.dtype])


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    mismatch = bits(actual) != bits(expected)
    assert not bool(mismatch.any()), (
        f"{int(mismatch.sum())} of {mismatch.numel()} differ, e.g. got {actual[mismatch][:5].tolist()} "
        f"expected {expected[mismatch][:5].tolist()}"
    )


# ------------------------------------------------------------------------------------------------
# strategies
# ------------------------------------------------------------------------------------------------


@st.composite
def stacked_weights(draw, k_multiple: int = 1):
    """A stacked expert weight [E, N, K] (cdim 2) or [E, K, N] (cdim 1) with varied magnitudes."""
    e = draw(st.integers(1, 3))
    n = draw(st.integers(1, 4))
    k = draw(st.integers(1, 3)) * 16 if k_multiple == 16 else draw(st.integers(1, 24))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    k_last = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(e, n, k, generator=gen, dtype=torch.float64)
    # per-block and per-expert magnitude spread, so some block scales hit the clamps
    if k % 16 == 0:
        exps = torch.randint(-12, 6, (e, n, k // 16, 1), generator=gen).double()
        w = (w.reshape(e, n, k // 16, 16) * 2.0**exps).reshape(e, n, k)
    else:
        w = w * 2.0 ** torch.randint(-12, 6, (e, n, 1), generator=gen).double()
    w = w * 10.0 ** draw(st.integers(-4, 4))
    if draw(st.booleans()):
        w[draw(st.integers(0, e - 1))] = 0.0  # an all-zero expert
    if draw(st.booleans()) and k >= 16:
        w[..., :16] = 0.0  # all-zero blocks
    w = w.to(dtype)
    if not k_last:
        return w.transpose(1, 2).contiguous(), 1
    return w, 2


# ------------------------------------------------------------------------------------------------
# the reference itself
# ------------------------------------------------------------------------------------------------


def test_reference_e4m3_table():
    """The enumerated e4m3 table has 127 non-negative finite values from 0 to 448, 2**-9 smallest > 0."""
    assert E4M3_POS_VALUES.numel() == 127
    assert float(E4M3_POS_VALUES.max()) == 448.0
    assert float(E4M3_POS_VALUES[1]) == 2.0**-9
    assert bool((E4M3_POS_VALUES[1:] > E4M3_POS_VALUES[:-1]).all())


def test_reference_e4m3_matches_torch_cast_on_midpoints():
    """The enumeration reference agrees with torch's cast on every value, midpoint and neighbour."""
    v = E4M3_POS_VALUES.float()
    mids = ((v[1:].double() + v[:-1].double()) / 2).float()
    x = torch.cat([v, mids, mids.nextafter(torch.tensor(0.0)), mids.nextafter(torch.tensor(1e9))])
    x = torch.cat([x, -x])
    assert_bits_equal(ref_e4m3(x).float(), x.to(torch.float8_e4m3fn).float())


# ------------------------------------------------------------------------------------------------
# E2M1
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "expected"),
    [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0)],
)
def test_e2m1_ties_to_even(x, expected):
    """Every E2M1 tie rounds to the even code, for both signs."""
    t = torch.tensor([x, -x])
    assert F.e2m1_round(t).tolist() == [expected, -expected]
    assert F.e2m1_codes(t).tolist() == ref_e2m1_codes(t).tolist()


def test_e2m1_exact_values_and_codes():
    """Each representable value maps to its own code sign << 3 | index and back."""
    vals = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    assert F.e2m1_codes(vals).tolist() == list(range(8))
    assert F.e2m1_codes(-vals[1:]).tolist() == list(range(9, 16))
    assert F.e2m1_decode(torch.arange(16, dtype=torch.uint8)).tolist() == [*vals.tolist(), *(-vals).tolist()]


def test_e2m1_saturation_and_sign():
    """Values above 6 saturate to +-6 (inf too); small negatives keep the sign bit (-0.1 -> code 8)."""
    x = torch.tensor([6.0, 6.5, 7.0, 100.0, 1e30, float("inf"), -7.0, -float("inf"), -0.1, -1e-30, 0.1])
    codes = F.e2m1_codes(x)
    assert codes.dtype == torch.uint8
    assert codes.tolist() == [7, 7, 7, 7, 7, 7, 15, 15, 8, 8, 0]
    rounded = F.e2m1_round(x)
    assert rounded[:8].tolist() == [6.0] * 6 + [-6.0] * 2
    assert bool(torch.signbit(rounded[8])) and float(rounded[8]) == 0.0


def test_e2m1_nan_maps_to_zero():
    """NaN encodes as code 0 (documented) and decodes to +0."""
    x = torch.tensor([float("nan"), -float("nan")])
    assert F.e2m1_codes(x).tolist() == [0, 0]
    assert F.e2m1_round(x).tolist() == [0.0, 0.0]


def test_e2m1_boundary_neighbours():
    """Just below / above each decision boundary rounds to the nearer value."""
    b = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    x = torch.cat([b.nextafter(torch.tensor(0.0)), b.nextafter(torch.tensor(10.0))])
    x = torch.cat([x, -x])
    assert F.e2m1_codes(x).tolist() == ref_e2m1_codes(x).tolist()


@SETTINGS
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=64))
def test_e2m1_codes_match_reference(values):
    """e2m1_codes / e2m1_round equal the nearest-value reference on arbitrary fp32 values."""
    x = torch.tensor(values, dtype=torch.float32)
    codes = F.e2m1_codes(x)
    assert codes.tolist() == ref_e2m1_codes(x).tolist()
    assert_bits_equal(F.e2m1_round(x), ref_e2m1_decode(ref_e2m1_codes(x)).float())


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(1, 8))
def test_pack_unpack_round_trip(seed, rows, half_k):
    """unpack(pack(c)) == c for random 4-bit codes; the packed layout matches the explicit reference."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, 2 * half_k), generator=gen).to(torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, half_k)
    assert torch.equal(packed, ref_pack(codes))
    assert torch.equal(unpack_nibbles(packed), codes)


def test_pack_layout_low_nibble_first():
    """Element 2k goes to the low nibble, 2k+1 to the high nibble."""
    packed = pack_nibbles(torch.tensor([[0x1, 0x2, 0xF, 0x0]], dtype=torch.uint8))
    assert packed.tolist() == [[0x21, 0x0F]]


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(1, 200))
def test_nvfp4_runs_layout_and_round_trip(seed, rows, half_k):
    """Deploy storage order, checked against the kernel's decode rule written out here: byte ``8j + 4h + c``
    of each 64-byte run sits at position ``16c + 2j + h``, the last run zero-padded; position ``p`` is byte
    ``p % 4`` of little-endian word ``p // 4``, whose pair comes out of a rotation right by ``3 (p % 4)`` bits
    (or, for byte 3, a mask by ``0x001B001B`` and a multiply by ``2^3 + 2^8 + 2^14``) with each nibble's sign at
    bit 15 / 31 and its three magnitude bits at 8..6 / 24..22. Deinterleaving recovers the packed bytes."""
    packed = torch.randint(0, 256, (rows, half_k), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)
    stored = F.interleave_nvfp4_runs(packed)
    runs = -(-half_k // 64)
    assert stored.shape == (rows, 64 * runs)
    padded = torch.cat((packed, packed.new_zeros(rows, 64 * runs - half_k)), dim=1)
    b = stored.to(torch.int64)
    words = b[:, 0::4] | b[:, 1::4] << 8 | b[:, 2::4] << 16 | b[:, 3::4] << 24
    mask = 0xFFFFFFFF
    for slot in range(4):
        if slot < 3:
            r = ((words >> 3 * slot) | (words << (32 - 3 * slot))) & mask
        else:
            r = ((words & 0x001B001B) * (2**3 + 2**8 + 2**14)) & mask
        low = (r >> 6) & 7 | ((r >> 15) & 1) << 3
        high = (r >> 22) & 7 | ((r >> 31) & 1) << 3
        decoded = low | high << 4
        for word in range(16 * runs):
            position = 4 * word + slot
            run, c, j, h = position // 64, position % 64 // 16, position % 16 // 2, position % 2
            assert torch.equal(decoded[:, word], padded[:, 64 * run + 8 * j + 4 * h + c].to(torch.int64))
    assert torch.equal(F.deinterleave_nvfp4_runs(stored, 2 * half_k), packed)


def test_nvfp4_runs_bad_length_raises():
    """Stored data that is not whole runs covering K is rejected, saying what it expected."""
    with pytest.raises(ValueError, match="whole 64-byte runs covering K=256"):
        F.deinterleave_nvfp4_runs(torch.zeros(2, 96, dtype=torch.uint8), 256)


def test_pack_odd_last_dim_raises():
    """An odd number of codes in the last dim cannot be packed."""
    with pytest.raises(ValueError, match="odd"):
        pack_nibbles(torch.zeros(2, 5, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------------
# per-expert helpers
# ------------------------------------------------------------------------------------------------


@SETTINGS
@given(stacked_weights(), st.sampled_from([0, 1, 2]))
def test_expert_amax_matches_loop(wc, expert_dim):
    """expert_amax equals max|W_e| computed per expert in a python loop, as fp32 [E]."""
    w, _ = wc
    amax = expert_amax(w, expert_dim)
    expected = [float(w.select(expert_dim, e).abs().max()) for e in range(w.shape[expert_dim])]
    assert amax.dtype == torch.float32
    assert amax.tolist() == expected


def test_expand_per_expert_shapes():
    """expand_per_expert puts the E entries on expert_dim, size 1 elsewhere, values unchanged."""
    a = torch.tensor([1.0, 2.0, 3.0])
    assert expand_per_expert(a, 3).shape == (3, 1, 1)
    v = expand_per_expert(a, 3, expert_dim=1)
    assert v.shape == (1, 3, 1) and v.flatten().tolist() == [1.0, 2.0, 3.0]


# ------------------------------------------------------------------------------------------------
# FP8
# ------------------------------------------------------------------------------------------------


def _fp8_reference(w: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    out = torch.stack([ref_fp8_expert(w[e], float(amax[e])) for e in range(w.shape[0])])
    return out.to(w.dtype)


def _torch_cast_reference(w: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """Torch's own cast of the fp32 quotient, clamped to +-448, per expert."""
    out = []
    for e in range(w.shape[0]):
        s = amax[e].float() / 448.0
        div = s if float(s) != 0 else torch.ones_like(s)
        q = (w[e].float() / div).clamp(-448, 448).to(torch.float8_e4m3fn)
        out.append((q.float() * s).to(w.dtype))
    return torch.stack(out)


@SETTINGS
@given(stacked_weights(), st.sampled_from([1.0, 0.5, 2.0]))
def test_fp8_fake_quant_matches_reference(wc, amax_factor):
    """FP8 fake quant with a per-expert amax equals the enumeration reference and torch's own cast."""
    w, cdim = wc
    amax = f32(expert_amax(w).double() * amax_factor).float()
    out = get_format("fp8").fake_quant(w, expand_per_expert(amax, w.dim()), contraction_dim=cdim)
    assert out.dtype == w.dtype and out.shape == w.shape
    expected = _fp8_reference(w, amax)
    assert_bits_equal(expected, _torch_cast_reference(w, amax))
    assert_bits_equal(out, expected)


@SETTINGS
@given(stacked_weights())
def test_fp8_quantize_dequantize(wc):
    """quantize: e4m3 data with K last and scale amax/448; dequantize(quantize(x)) == fake_quant(x)."""
    w, cdim = wc
    fmt = get_format("fp8")
    amax = expand_per_expert(expert_amax(w), w.dim())
    q = fmt.quantize(w, amax, contraction_dim=cdim)
    assert q.format == "fp8" and q.block_scale is None
    assert q.data.dtype == torch.float8_e4m3fn
    expected_shape = w.movedim(cdim, -1).shape
    assert q.data.shape == expected_shape
    assert q.scale.dtype == torch.float32
    assert q.scale.flatten().tolist() == [float(f32(a.double() / 448.0)) for a in amax.flatten()]
    s = amax.double() / 448.0
    div = torch.where(s == 0, torch.ones_like(s), f32(s))
    expected_data = ref_e4m3(f32(w.double() / div).clamp(-448, 448)).float().movedim(cdim, -1)
    assert_bits_equal(q.data.float(), expected_data)
    fake = fmt.fake_quant(w, amax, contraction_dim=cdim)
    assert_bits_equal(fmt.dequantize(q, dtype=w.dtype), fake.movedim(cdim, -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_saturates_beyond_amax(dtype):
    """Values beyond amax saturate to +-448 * s."""
    x = torch.tensor([[-1000.0, -2.0, 0.5, 2.0, 1000.0]], dtype=dtype)
    amax = torch.tensor(2.0)
    out = get_format("fp8").fake_quant(x, amax)
    s = torch.tensor(2.0) / 448.0
    sat = (torch.tensor(448.0) * s).to(dtype)
    assert out[0, 0] == -sat and out[0, -1] == sat
    assert out[0, 1] == -sat and out[0, 3] == sat


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_zero_amax_gives_zeros(dtype):
    """amax 0 gives zeros (no NaN), for a zero tensor and for nonzero values."""
    fmt = get_format("fp8")
    x = torch.tensor([[0.0, 0.0], [1.0, -3.0]], dtype=dtype)
    out = fmt.fake_quant(x, torch.zeros(2, 1))
    assert not bool(out.isnan().any())
    assert bool((out == 0).all())
    assert bool((fmt.dequantize(fmt.quantize(x, torch.zeros(2, 1)), dtype) == 0).all())


# ------------------------------------------------------------------------------------------------
# NVFP4
# ------------------------------------------------------------------------------------------------


def _nvfp4_reference(w: torch.Tensor, amax: torch.Tensor, cdim: int):
    """Stack the per-expert reference: (fake quant in w's layout, codes K-last, s_b, g)."""
    parts = [ref_nvfp4_expert(w[e], float(amax[e]), cdim - 1) for e in range(w.shape[0])]
    deq = torch.stack([p[0] for p in parts]).float()
    codes = torch.stack([p[1] for p in parts])
    sb = torch.stack([p[2] for p in parts]).float()
    g = torch.stack([p[3] for p in parts]).float()
    return deq, codes, sb, g


@SETTINGS
@given(stacked_weights(k_multiple=16), st.sampled_from([1.0, 1.0, 0.25, 3.0]))
def test_nvfp4_fake_quant_matches_reference(wc, amax_factor):
    """NVFP4 fake quant equals the independent per-expert reference bit for bit."""
    w, cdim = wc
    amax = f32(expert_amax(w).double() * amax_factor).float()
    out = get_format("nvfp4").fake_quant(w, expand_per_expert(amax, w.dim()), contraction_dim=cdim)
    deq, _, _, _ = _nvfp4_reference(w, amax, cdim)
    assert out.dtype == w.dtype and out.shape == w.shape
    assert not bool(out.isnan().any())
    assert_bits_equal(out, deq.movedim(-1, cdim).to(w.dtype))


@SETTINGS
@given(stacked_weights(k_multiple=16))
def test_nvfp4_quantize_dequantize_match_reference(wc):
    """quantize: packed codes, e4m3 block scales [..., K/16] and g; dequantize reproduces the reference."""
    w, cdim = wc
    fmt = get_format("nvfp4")
    amax = expert_amax(w)
    q = fmt.quantize(w, expand_per_expert(amax, w.dim()), contraction_dim=cdim)
    deq, codes, sb, g = _nvfp4_reference(w, amax, cdim)
    e, n, k = codes.shape
    assert q.format == "nvfp4"
    assert q.data.dtype == torch.uint8 and q.data.shape == (e, n, k // 2)
    assert torch.equal(q.data, ref_pack(codes))
    assert q.block_scale.dtype == torch.float8_e4m3fn and q.block_scale.shape == (e, n, k // 16)
    assert_bits_equal(q.block_scale.float(), sb)
    assert q.scale.dtype == torch.float32
    assert q.scale.flatten().tolist() == g.tolist()
    assert_bits_equal(fmt.dequantize(q, dtype=torch.float32), deq)
    assert_bits_equal(fmt.dequantize(q, dtype=w.dtype), deq.to(w.dtype))
    fake = fmt.fake_quant(w, expand_per_expert(amax, w.dim()), contraction_dim=cdim)
    assert_bits_equal(fmt.dequantize(q, dtype=w.dtype), fake.movedim(cdim, -1))


def test_nvfp4_zero_block_scale_one():
    """An all-zero block gets block scale 1.0 and dequantizes to zeros; other blocks are unaffected."""
    w = torch.zeros(1, 2, 32)
    w[0, 0, 16:] = torch.linspace(-3, 3, 16)
    w[0, 1, :16] = 5.0
    fmt = get_format("nvfp4")
    amax = expert_amax(w)
    q = fmt.quantize(w, amax.view(1, 1, 1))
    assert q.block_scale.float()[0, 0, 0] == 1.0 and q.block_scale.float()[0, 1, 1] == 1.0
    out = fmt.fake_quant(w, amax.view(1, 1, 1))
    assert bool((out[0, 0, :16] == 0).all()) and bool((out[0, 1, 16:] == 0).all())
    deq, _, _, _ = _nvfp4_reference(w, amax, 2)
    assert_bits_equal(out, deq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_all_zero_expert(dtype):
    """An all-zero expert (amax 0) quantizes to zeros with finite scales, no NaN; its peers are unaffected."""
    w = torch.zeros(2, 3, 32, dtype=dtype)
    w[1] = torch.randn(3, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    fmt = get_format("nvfp4")
    amax = expert_amax(w)
    out = fmt.fake_quant(w, expand_per_expert(amax, 3))
    assert not bool(out.isnan().any())
    assert bool((out[0] == 0).all())
    q = fmt.quantize(w, expand_per_expert(amax, 3))
    assert bool(q.block_scale.float().isfinite().all())
    assert bool((q.data[0] == 0).all())
    deq = fmt.dequantize(q, dtype)
    assert not bool(deq.isnan().any()) and bool((deq[0] == 0).all())
    ref, _, _, _ = _nvfp4_reference(w, amax, 2)
    assert_bits_equal(out, ref.to(dtype))


def test_nvfp4_tiny_block_amax_clamps_low():
    """A block far below the expert amax gets the smallest block scale 2**-9."""
    w = torch.full((1, 1, 32), 1e-6)
    w[0, 0, 16] = 1000.0
    fmt = get_format("nvfp4")
    amax = expert_amax(w).view(1, 1, 1)
    q = fmt.quantize(w, amax)
    assert float(q.block_scale.float()[0, 0, 0]) == 2.0**-9
    assert float(q.block_scale.float()[0, 0, 1]) == 448.0
    deq, _, sb, _ = _nvfp4_reference(w, expert_amax(w), 2)
    assert_bits_equal(q.block_scale.float(), sb)
    assert_bits_equal(fmt.fake_quant(w, amax), deq)


@pytest.mark.parametrize("amax", [1e-30, 1e-40, 1e-44])
def test_nvfp4_tiny_global_amax(amax):
    """A tiny global amax (down to a g that underflows fp32) gives finite output equal to the reference."""
    w = torch.full((1, 2, 16), amax)
    w[0, 1] = amax * 1e-3
    fmt = get_format("nvfp4")
    a = expert_amax(w)
    out = fmt.fake_quant(w, a.view(1, 1, 1))
    q = fmt.quantize(w, a.view(1, 1, 1))
    assert bool(out.isfinite().all())
    assert bool(q.block_scale.float().isfinite().all()) and bool((q.block_scale.float() > 0).all())
    deq, _, sb, _ = _nvfp4_reference(w, a, 2)
    assert_bits_equal(out, deq)
    assert_bits_equal(q.block_scale.float(), sb)


def test_nvfp4_tiny_global_amax_low_block_clamps():
    """With a 1e-30 global amax, a block 1e-6 times smaller clamps to 2**-9 as well."""
    w = torch.full((1, 1, 32), 1e-36)
    w[0, 0, 16:] = 1e-30
    q = get_format("nvfp4").quantize(w, expert_amax(w).view(1, 1, 1))
    assert float(q.block_scale.float()[0, 0, 0]) == 2.0**-9


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize("shape", [(0, 32), (2, 0, 32)])
def test_empty_tensor(fmt, shape):
    """A tensor with zero rows (an expert that got no token) quantizes to an empty result."""
    f = get_format(fmt)
    x = torch.zeros(shape)
    assert f.fake_quant(x, torch.tensor(1.0)).shape == x.shape
    q = f.quantize(x, torch.tensor(1.0))
    assert q.data.shape[:-1] == x.shape[:-1]
    assert f.dequantize(q).shape == x.shape


@pytest.mark.parametrize("method", ["fake_quant", "quantize"])
@pytest.mark.parametrize(("shape", "cdim"), [((2, 4, 24), 2), ((2, 24, 4), 1), ((3, 17), -1)])
def test_nvfp4_k_not_multiple_of_16_raises(method, shape, cdim):
    """K not a multiple of 16 is a ValueError that names the block size 16."""
    x = torch.ones(shape)
    with pytest.raises(ValueError, match="16"):
        getattr(get_format("nvfp4"), method)(x, torch.tensor(1.0), contraction_dim=cdim)


def test_nvfp4_k_multiple_of_16_along_other_dim_ok():
    """Only the contraction dim must be a multiple of 16 (here dim 1 of [2, 32, 5])."""
    x = torch.randn(2, 32, 5, generator=torch.Generator().manual_seed(1))
    out = get_format("nvfp4").fake_quant(x, expert_amax(x).view(2, 1, 1), contraction_dim=1)
    assert out.shape == x.shape and bool(out.isfinite().all())


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------


def test_get_format_by_name_and_passthrough():
    """get_format returns the registered formats by name and passes a format object through."""
    fp8, nvfp4 = get_format("fp8"), get_format("nvfp4")
    assert fp8.name == "fp8" and fp8.block_size is None
    assert nvfp4.name == "nvfp4" and nvfp4.block_size == 16
    assert get_format(fp8) is fp8
    assert {"fp8", "nvfp4"} <= set(F.available_formats())


def test_get_format_unknown_lists_known():
    """An unknown format name is a ValueError listing the known formats."""
    with pytest.raises(ValueError, match="int3") as info:
        get_format("int3")
    assert "fp8" in str(info.value) and "nvfp4" in str(info.value)


def test_register_format_custom():
    """A registered QuantFormat subclass is found by name; the registry is restored afterwards."""

    class Identity(QuantFormat):
        name = "test_identity"

        def scale_from_amax(self, amax):
            return amax.float()

        def fake_quant(self, x, amax, contraction_dim=-1):
            return x.clone()

        def quantize(self, x, amax, contraction_dim=-1):
            return F.QuantizedTensor(self.name, x.movedim(contraction_dim, -1), amax.float())

        def dequantize(self, q, dtype=torch.float32):
            return q.data.to(dtype)

    try:
        assert register_format(Identity) is Identity
        fmt = get_format("test_identity")
        assert isinstance(fmt, Identity)
        assert "test_identity" in F.available_formats()
        x = torch.arange(4.0)
        assert torch.equal(fmt.fake_quant(x, torch.tensor(1.0)), x)
    finally:
        F._REGISTRY.pop("test_identity", None)
    with pytest.raises(ValueError):
        get_format("test_identity")


def test_encode_e4m3_matches_torch_cast_including_nan():
    """Every e4m3 value (all 256 codes decoded) encodes back to its own code, and NaN of either sign encodes
    as torch's float8_e4m3fn cast stores it (0x7F / 0xFF); before session 19 NaN encoded as 0."""
    codes = torch.arange(256, dtype=torch.uint8)
    values = F.decode_e4m3(codes.view(torch.float8_e4m3fn))
    want = values.to(torch.float8_e4m3fn).view(torch.uint8)  # torch's cast: the independent reference
    assert torch.equal(F.encode_e4m3(values).view(torch.uint8), want)
    nans = torch.tensor([float("nan"), -float("nan")])
    assert torch.equal(F.encode_e4m3(nans).view(torch.uint8), nans.to(torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_dequantize_of_quantize_is_fake_quant_with_nonfinite_weights(fmt):
    """``dequantize(quantize(w)) == fake_quant(w)`` bit for bit with NaN and +-inf weights (and experts with
    amax 0): a QAT FP8 training graph saves the codes and dequantizes them for its GEMMs on that equality, and
    a NaN weight must stay NaN there rather than turn into 0."""
    from tests.conftest import assert_same_bits, nonfinite_weights

    w, amax = nonfinite_weights()
    f = get_format(fmt)
    q = f.quantize(w, expand_per_expert(amax, 3), 2)
    got = f.dequantize(q)
    assert_same_bits(got, f.fake_quant(w, expand_per_expert(amax, 3), 2), fmt)
    assert got.isnan().any()
