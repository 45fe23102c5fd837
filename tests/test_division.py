"""Can the kernels drop the per-element IEEE division ``x / s`` (``div_rn``: reciprocal, Newton steps, a
range check and a slow-path branch, about 10 SASS instructions) for Markstein's quotient with the reciprocal
computed once per scale? ``y = RN(1/s)``, ``q0 = RN(x * y)``, ``q1 = fma(fma(-q0, s, x), y, q0)``: three
IEEE operations per element, bit for bit the same on any IEEE device.

This checks the claim the kernels would rely on, with every operation emulated exactly on the CPU (float64
holds the products exactly; the last fma's sum is rounded once through an error-free TwoSum): for every
finite bf16 value x and divisors s = amax / 448 over 14 decades, q1 equals torch's IEEE fp32 ``x / s``,
except where the residual or the quotient leave the normal range, and there the e4m3 code the spec takes
from the quotient is the same once q0 is used for overflowing quotients and the sign of zero is restored.
(An earlier CPU experiment that rounded the last fma twice had reported one wrong quotient in 2e8.)
"""

from __future__ import annotations

import torch

from moeq.formats import e2m1_round

TINY = 2.0**-126


def _rn32_of_exact_sum(s: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
    """RN32 of the exact value ``s + err`` where ``s = fl64(s + err)``: only an f32 tie at ``s`` with a
    nonzero ``err`` rounds differently from ``s`` itself."""
    t = s.to(torch.float32)
    td = t.double()
    toward = torch.where(s > td, torch.full_like(t, float("inf")), torch.full_like(t, -float("inf")))
    other = torch.nextafter(t, toward)
    tie = (s == (td + other.double()) / 2) & (s != td) & (err != 0)
    return torch.where(tie & ((err > 0) == (other.double() > td)), other, t)


def markstein_quotient(x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q0, q1)`` of Markstein's division of fp32 ``x`` by the fp32 scalar ``s``, emulated exactly."""
    y = torch.ones((), dtype=torch.float32) / s
    q0 = x * y
    r = (x.double() - q0.double() * s.double()).to(torch.float32)  # fma: exact in float64, rounded once
    p = r.double() * y.double()  # exact
    total = q0.double() + p
    b_virtual = total - q0.double()
    err = (q0.double() - (total - b_virtual)) + (p - b_virtual)
    return q0, _rn32_of_exact_sum(total, err)


def guarded_quotient(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """What a kernel would compute: q1, q0 where the quotient overflows, the sign of x on zeros."""
    q0, q1 = markstein_quotient(x, s)
    q = torch.where(q0.abs() < 2.0**64, q1, q0)
    return torch.where(q == 0, torch.copysign(q, x), q)


def _e4m3_bits(q: torch.Tensor) -> torch.Tensor:
    return q.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)


def _all_bf16() -> torch.Tensor:
    x = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    return x[torch.isfinite(x)]


def _divisors(count: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    amax = torch.cat(
        [
            10 ** (torch.rand(count, generator=g, dtype=torch.float64) * 14 - 8),
            torch.tensor([(2.0 - 2.0**-23) * 2.0**k for k in (-20, -3, 0, 5)], dtype=torch.float64),
            torch.tensor([2.0**k for k in (-9, 0, 8)], dtype=torch.float64),
        ]
    )
    return [(a.float() / 448.0).float() for a in amax]


def test_markstein_quotient_is_ieee_division_for_every_bf16_value():
    x = _all_bf16()
    normal_residual = (x.abs() >= 2.0**-100) | (x == 0)
    for s in _divisors(40, seed=0):
        truth = x / s
        q0, q1 = markstein_quotient(x, s)
        in_range = normal_residual & (x != 0) & (truth.abs() < 2.0**100) & (truth.abs() >= 2.0**-100)
        assert torch.equal(q1[in_range], truth[in_range]), float(s)
        assert torch.equal(_e4m3_bits(guarded_quotient(x, s)), _e4m3_bits(truth)), float(s)


def test_markstein_quotient_random_fp32():
    g = torch.Generator().manual_seed(1)
    for s in _divisors(10, seed=2):
        x = torch.randn(1_000_000, generator=g) * torch.exp(torch.randn(1_000_000, generator=g) * 4)
        truth = x / s
        q0, q1 = markstein_quotient(x, s)
        in_range = (x.abs() >= 2.0**-100) & (truth.abs() < 2.0**100) & (truth.abs() >= 2.0**-100)
        assert torch.equal(q1[in_range], truth[in_range]), float(s)
        assert torch.equal(_e4m3_bits(guarded_quotient(x, s)), _e4m3_bits(truth)), float(s)


def _e4m3_values_in(lo: float, hi: float) -> torch.Tensor:
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return grid[(grid >= lo) & (grid <= hi)]


def nvfp4_fast_codes(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The E2M1 value (as fp32, with the spec's sign) that the NVFP4 kernels' fast path takes from ``x / d``:
    Markstein's q1 (exact emulation), minNum(|q1|, 6) (an overflow's NaN saturates), and the sign from the
    exact test ``x 2^75 < -d 2^-75`` in fp32 (whether the IEEE quotient is a nonzero negative)."""
    q1 = markstein_quotient(x, d)[1]
    a = torch.where(q1.abs() < 6.0, q1.abs(), torch.full_like(q1, 6.0))  # NaN -> 6, as PTX min.f32
    negative = x * 2.0**75 < d * -(2.0**-75)
    magnitude = e2m1_round(a)
    return torch.where(negative, -magnitude, magnitude)


def test_nvfp4_fast_path_gives_the_e2m1_code_of_the_ieee_quotient():
    """Every finite bf16 value (and +-inf) divided by NVFP4 block scales ``d = RN(s_b g)``: every e4m3
    block scale ``s_b`` in [2^-9, 448] and global scales across the kernels' fast range [2^-40, 2^40]
    (both ends included). The fast path's E2M1 value equals ``e2m1_round(x / d)`` of torch's IEEE fp32
    division bit for bit, signed zeros included."""
    x = torch.cat([_all_bf16(), torch.tensor([float("inf"), -float("inf")])])
    gen = torch.Generator().manual_seed(3)
    globals_ = torch.cat([torch.tensor([2.0**-40, 2.0**40, 1.0]), 2.0 ** (torch.rand(5, generator=gen) * 80 - 40)])
    block_scales = _e4m3_values_in(2.0**-9, 448.0)
    checked = 0
    for g in globals_.float():
        for s_b in block_scales[torch.randperm(block_scales.numel(), generator=gen)[:12]]:
            d = s_b * g
            want = e2m1_round(x / d)
            got = nvfp4_fast_codes(x, d)
            differ = got.view(torch.int32) != want.view(torch.int32)
            assert not differ.any(), (float(g), float(s_b), x[differ][:5].tolist(), got[differ][:5].tolist())
            checked += x.numel()
    assert checked > 5_000_000


def clipped_quotient(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The quotient an MMA operand may take instead (``numerics.lean_quotient``, which the Gluon kernel uses):
    x clipped to ``+-2^64 s`` (NaN kept), then Markstein's q1; no overflow select, no zero-sign fix."""
    clip = s * 2.0**64
    return markstein_quotient(torch.where(x.isnan(), x, x.clamp(-clip, clip)), s)[1]


def test_clipped_markstein_quotient_gives_the_e4m3_value_of_the_ieee_quotient():
    """Every bf16 value, +-inf and NaN, over the divisors above (all in the fast range [2^-60, 2^60]): the e4m3
    value of the clipped quotient equals that of torch's IEEE ``x / s`` (compared as values, so a zero's sign may
    differ: it does not change a dot product that starts from +0), and NaN stays NaN."""
    x = torch.cat([_all_bf16(), torch.tensor([float("inf"), -float("inf"), float("nan")])])
    for s in _divisors(40, seed=4):
        want = _e4m3_bits(x / s).view(torch.float8_e4m3fn).float()
        got = _e4m3_bits(clipped_quotient(x, s)).view(torch.float8_e4m3fn).float()
        same = (got == want) | (got.isnan() & want.isnan())
        assert same.all(), (float(s), x[~same][:5].tolist(), got[~same][:5].tolist(), want[~same][:5].tolist())
    assert torch.isnan(clipped_quotient(torch.tensor([float("nan")]), torch.tensor(0.5))).all()


def _e4m3_block_scale(quotient: torch.Tensor) -> torch.Tensor:
    """The spec's e4m3 block scale from the quotient ``a_b / (6 g)``: 1 for a zero quotient, at least 2^-9."""
    s = torch.where(quotient == 0, torch.ones_like(quotient), quotient)
    return torch.maximum(s, torch.tensor(2.0**-9)).clamp(max=448).to(torch.float8_e4m3fn).float()


def test_nvfp4_block_scale_by_markstein_quotient():
    """The block scale's division ``a_b / (6 g)`` by Markstein's quotient (``numerics.nvfp4_block_scale`` with
    ``FAST``): for every finite bf16 block amax, +inf, and random fp32 ones, over global scales across the fast range
    [2^-40, 2^40], the e4m3 scale equals the IEEE quotient's, and the quotient is zero exactly where IEEE's is (a
    zero block takes scale 1, a tiny one 2^-9)."""
    gen = torch.Generator().manual_seed(6)
    amax = torch.cat([_all_bf16().abs().unique(), torch.tensor([float("inf")]),
                      (torch.randn(200_000, generator=gen) * torch.exp(torch.randn(200_000, generator=gen) * 8)).abs()])  # fmt: skip
    globals_ = torch.cat([torch.tensor([2.0**-40, 2.0**40, 1.0]), 2.0 ** (torch.rand(12, generator=gen) * 80 - 40)])
    for g in globals_.float():
        six_g = 6.0 * g
        truth = amax / six_g
        fast = guarded_quotient(amax, six_g)
        assert torch.equal(fast == 0, truth == 0), float(g)
        assert torch.equal(_e4m3_block_scale(fast), _e4m3_block_scale(truth)), float(g)


def nvfp4_operand_codes(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The E2M1 value ``numerics.fake_quant_nvfp4_operand`` takes from ``x / d``: x clipped to ``+-RN(6 d)``,
    Markstein's q1 (exact emulation), then the magic-number rounding of the signed quotient in fp32."""
    bound = d * 6.0
    q = markstein_quotient(torch.minimum(torch.maximum(x, -bound), bound), d)[1]
    unit = (q.abs().clamp(min=1.0).view(torch.int32) & -8388608).view(torch.float32)
    magic = unit * 6291456.0
    return (q + magic) - magic


def _fast_range_block_divisors(seed: int):
    """``(g, s_b, d = RN(s_b g))`` for 8 global scales across the NVFP4 fast range (its ends, 1 and 5 random) times 12
    random e4m3 block scales each."""
    gen = torch.Generator().manual_seed(seed)
    globals_ = torch.cat([torch.tensor([2.0**-40, 2.0**40, 1.0]), 2.0 ** (torch.rand(5, generator=gen) * 80 - 40)])
    block_scales = _e4m3_values_in(2.0**-9, 448.0)
    for g in globals_.float():
        for s_b in block_scales[torch.randperm(block_scales.numel(), generator=gen)[:12]]:
            yield g, s_b, s_b * g


def test_nvfp4_operand_path_gives_the_e2m1_value_of_the_ieee_quotient():
    """Every finite bf16 value and +-inf divided by NVFP4 block divisors ``d = RN(s_b g)`` over the fast range (as in
    the fast path's test above, x independent of d, so far beyond the block's saturation too): the operand path's
    E2M1 value equals ``e2m1_round(x / d)`` of torch's IEEE division, compared as values (a zero's sign may
    differ)."""
    x = torch.cat([_all_bf16(), torch.tensor([float("inf"), -float("inf")])])
    for g, s_b, d in _fast_range_block_divisors(seed=7):
        want = e2m1_round(x / d)
        got = nvfp4_operand_codes(x, d)
        assert torch.equal(got, want), (float(g), float(s_b), x[got != want][:5].tolist())


def test_nvfp4_operand_clip_in_bf16_gives_the_same_e2m1_value():
    """The register-operand kernel clips the bf16 weight to ``+-B`` in bf16 pairs, ``B = RZ_bf16(RN(6 d))`` (the upper
    half of the fp32 bound's bits), instead of clipping the fp32 value to ``+-RN(6 d)``: a bf16 ``x`` at most ``RN(6
    d)`` is at most ``B``, so it is untouched either way, and a larger one becomes ``B``, whose quotient lies in ``(5,
    6]`` and rounds to the E2M1 maximum as ``RN(6 d)``'s does. Checked for every finite bf16 value and +-inf over
    divisors across the fast range, as E2M1 values after Markstein's quotient (exact emulation)."""
    x = torch.cat([_all_bf16(), torch.tensor([float("inf"), -float("inf")])])
    for g, s_b, d in _fast_range_block_divisors(seed=11):
        bound_bf16 = ((d * 6.0).view(torch.int32) & -65536).view(torch.float32)  # RZ to bf16: the upper half
        clipped = torch.minimum(torch.maximum(x, -bound_bf16), bound_bf16)
        assert torch.equal(clipped.bfloat16().float(), clipped)  # the clip stays in bf16
        got = nvfp4_operand_codes(clipped, d)  # clips again to +-RN(6 d): a no-op, all |clipped| <= B <= 6 d
        assert torch.equal(got, nvfp4_operand_codes(x, d)), (float(g), float(s_b))
