"""Triton device functions that reproduce :mod:`moeq.formats` bit for bit.

Only exact fp32 operations are used: IEEE division (``div_rn``; Triton's ``/`` on fp32 is approximate) or,
where the scales allow, Markstein's quotient (reciprocal once per scale, then a multiply and two fmas per
element; it yields the same e4m3 / E2M1 code, ``tests/test_division.py``), multiplication by powers of two,
and round-to-nearest-even through the fp32 adder. NaN follows the spec: a NaN in an NVFP4 block makes the
block NaN (the GPU's ``max.f32`` would skip it, so block maxima keep NaN explicitly). On the GPU the e4m3
rounding is the hardware's ``cvt.rn.satfinite`` conversion (RNE, saturating to +-448, NaN kept: exactly
the spec's clamp-then-round, two values per instruction); under the CPU interpreter, whose float8 casts
are not RNE, it is done by hand from the fp32 bits (:func:`round_e4m3`).
"""

from __future__ import annotations

import triton
import triton._C as _triton_c
import triton.language as tl

FP8_MAX = tl.constexpr(448.0)
NVFP4_GLOBAL_DIVISOR = tl.constexpr(2688.0)  # 6 * 448, exact in fp32
NVFP4_SCALE_MIN = tl.constexpr(0.001953125)  # 2**-9
_RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (t + M) - M rounds |t| < 2**22 to an integer, ties to even
_E2M1_MAGIC = tl.constexpr(6291456.0)  # 1.5 * 2**22: (a + M) - M rounds 0 <= a < 2 to a multiple of 1/2


@triton.jit
def safe_divisor(s):
    """A zero scale divides by 1 instead (the result is multiplied by the zero scale afterwards)."""
    return tl.where(s == 0.0, 1.0, s)


@triton.jit
def negate_where(negative, x):
    """``-x`` where ``negative``, else ``x``, keeping IEEE signed zeros: Triton compiles unary minus as
    ``0 - x``, so ``-(+0)`` would come out ``+0`` instead of the spec's ``-0`` codes; the sign is applied by
    multiplying with -1."""
    return tl.where(negative, x * -1.0, x)


@triton.jit
def round_e4m3(y):
    """Round fp32 ``y`` (|y| <= 448) to the float8_e4m3fn grid, ties to even; sign (and -0) and NaN kept."""
    bits = y.to(tl.int32, bitcast=True)
    a = tl.abs(y)
    exponent = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    exponent = tl.maximum(exponent, -6)  # below 2**-6 the e4m3 grid is uniform (subnormals, step 2**-9)
    quantum = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inverse = ((127 - exponent + 3) << 23).to(tl.float32, bitcast=True)
    rounded = ((a * inverse + _RNE_MAGIC) - _RNE_MAGIC) * quantum
    return tl.where(y == y, negate_where(bits < 0, rounded), y)


@triton.jit
def min_number(x, y, INTERPRET: tl.constexpr):
    """IEEE minNum for a non-NaN ``y``: the smaller operand, ``y`` where ``x`` is NaN. That is the GPU's
    ``min.f32`` (``tl.minimum``), but ``tl.minimum`` propagates NaN under Triton 3.6's interpreter (numpy)."""
    if INTERPRET:
        return tl.where(x < y, x, y)
    else:
        return tl.minimum(x, y)


@triton.jit
def max_keeping_nan(a, b):
    """``max(a, b)``, NaN if either is NaN (as ``torch.amax`` and ``clamp``); ``tl.max`` / ``tl.maximum``
    skip NaN on the GPU (``max.f32`` is IEEE maxNum)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def e2m1_grid(a):
    """Round ``a`` in ``[-6, 6]`` to the E2M1 values {0, .5, 1, 1.5, 2, 3, 4, 6} and their negatives, ties to the
    even code (a zero comes out ``+0``).

    The grid's step is 1/2 below 2, 1 below 4 and 2 above, and on each piece the even codes are the even
    multiples of the step. Adding ``M = 1.5 * 2^22 * u`` (``u`` the power of two of ``max(|a|, 1)``, its
    exponent bits) rounds ``a`` to a multiple of M's ulp, which is that step, ties to even (the fp32
    adder's RNE; ``a + M`` stays in M's binade for either sign, and M is an even multiple of the step, so the grid
    is symmetric), and subtracting M is exact: five instructions, no compare-select chain."""
    unit = (tl.maximum(tl.abs(a), 1.0).to(tl.int32, bitcast=True) & -8388608).to(tl.float32, bitcast=True)
    magic = unit * _E2M1_MAGIC
    return (a + magic) - magic


@triton.jit
def e2m1_magnitude(a):
    """Round ``a = |v|`` (fp32, NaN allowed) to the E2M1 magnitudes, saturating at 6; NaN becomes 0, as
    in ``formats.e2m1_codes``."""
    return tl.where(a == a, e2m1_grid(tl.minimum(a, 6.0)), 0.0)


@triton.jit
def round_e2m1(v):
    """Round fp32 ``v`` to the nearest E2M1 value (RNE, saturating; the sign follows ``v < 0``, NaN -> 0)."""
    return negate_where(v < 0, e2m1_magnitude(tl.abs(v)))


@triton.jit
def e4m3_codes(y, INTERPRET: tl.constexpr):
    """``e4m3(clamp(y, +-448))`` of fp32 ``y``, ties to even: float8e4nv values on the GPU (one hardware
    conversion per pair of elements), the same values as fp32 under the interpreter. (Stored to a float8 tensor
    under Triton's interpreter, a NaN becomes 0x7C, not the format's NaN 0x7F that formats.py and torch's cast
    write: the interpreter's conversion, so its tests keep NaN out of stored codes; the GPU test checks them.)"""
    if INTERPRET:
        return round_e4m3(tl.clamp(y, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL))
    else:
        return y.to(tl.float8e4nv, fp_downcast_rounding="rtne")


#: the CPU interpreter's fma rounds once in newer Triton (3.9 here; 3.6's rounds twice), so the fast
#: quotients are exact there too and the interpreter tests run them
EXACT_INTERPRETER_FMA = tl.constexpr(hasattr(getattr(_triton_c.libtriton, "interpreter", None), "fma_fp32"))
FAST_DIVISOR_MIN = tl.constexpr(8.673617379884035e-19)  # 2**-60
FAST_DIVISOR_MAX = tl.constexpr(1.152921504606847e18)  # 2**60


@triton.jit
def all_within(values, lo, hi, INTERPRET: tl.constexpr):
    """Whether every value of a tile lies in ``[lo, hi]`` (a scalar, so the kernel branches uniformly) for
    the fast quotients. Under an interpreter whose fma rounds twice (Triton 3.6) never."""
    if INTERPRET and not EXACT_INTERPRETER_FMA:
        return False
    else:
        v = values + tl.zeros((1,), tl.float32)  # a scalar becomes [1]; tensors keep their shape
        return (tl.min(v, axis=None) >= lo) & (tl.max(v, axis=None) <= hi)


@triton.jit
def fast_division_ok(divisor, INTERPRET: tl.constexpr):
    """Whether every divisor of a tile lies where :func:`divide` may use Markstein's quotient."""
    return all_within(divisor, FAST_DIVISOR_MIN, FAST_DIVISOR_MAX, INTERPRET)


@triton.jit
def markstein_quotient(x, divisor, y):
    """``(q0, q1)``: ``q0 = RN(x y)`` and Markstein's ``q1 = fma(fma(-q0, d, x), y, q0)`` with ``y = RN(1/d)``
    (once per divisor: scalars and per-block divisors broadcast). ``-d`` is formed on the divisor: Triton
    compiles ``-q0`` as ``0 - q0``, which LLVM contracts into one more per-element fma."""
    q0 = x * y
    return q0, tl.fma(tl.fma(q0, divisor * -1.0, x), y, q0)


@triton.jit
def divide_by_reciprocal(x, divisor, y, FAST):
    """:func:`divide` with the fast path's reciprocal ``y = RN(1 / divisor)`` computed by the caller (once per
    tile where the divisor is a tile's scalar)."""
    if FAST:
        q0, q1 = markstein_quotient(x, divisor, y)
        q = tl.where(tl.abs(q0) < 1.8446744073709552e19, q1, q0)
        out = tl.where(q == 0.0, x * 0.0, q)
    else:
        out = tl.math.div_rn(x, divisor)
    return out


@triton.jit
def divide(x, divisor, FAST):
    """``x / divisor`` as the spec's IEEE division feeds its rounding to e4m3 / E2M1.

    ``FAST`` (from :func:`fast_division_ok`): :func:`markstein_quotient`'s ``q1``; ``q0`` where the quotient
    overflows and the sign of ``x`` on zeros. It equals ``div_rn`` wherever the residual stays normal and gives
    the same e4m3 / E2M1 code everywhere (``tests/test_division.py`` checks this with exact emulation). Else
    ``div_rn``.
    """
    return divide_by_reciprocal(x, divisor, tl.math.div_rn(1.0, divisor), FAST)


@triton.jit
def lean_quotient(x, d, y, clip, FAST):
    """Markstein's quotient ``fma(fma(-q0, d, x), y, q0)``, ``q0 = x y``, for an MMA operand (``d`` in the fast range,
    ``y = RN(1/d)``, ``clip = 2^64 d``): ``x`` is first clipped to ``+-clip`` keeping NaN (two instructions instead of
    :func:`divide`'s overflow select), and the sign of a zero quotient is not restored (a signed zero multiplies to
    the same sums). Its e4m3 code equals :func:`divide`'s for every non-zero quotient (``tests/test_division.py``).
    Outside the fast range, IEEE division."""
    if FAST:
        xc = tl.minimum(tl.maximum(x, clip * -1.0, propagate_nan=tl.PropagateNan.ALL), clip,
                        propagate_nan=tl.PropagateNan.ALL)  # fmt: skip
        q0 = xc * y
        q = tl.fma(tl.fma(q0, d * -1.0, xc), y, q0)
    else:
        q = tl.math.div_rn(x, d)
    return q


@triton.jit
def fp8_scale(amax):
    """The FP8 per-tensor scale ``s = amax / 448``."""
    return tl.math.div_rn(amax, FP8_MAX)


@triton.jit
def fp8_codes(x, amax, INTERPRET: tl.constexpr):
    """The e4m3 codes ``e4m3(clamp(x / s, +-448))`` with ``s = amax / 448`` (``amax`` broadcasts against ``x``;
    a zero scale divides by 1: its codes are multiplied by that zero scale)."""
    d = safe_divisor(fp8_scale(amax))
    return e4m3_codes(divide(x, d, fast_division_ok(d, INTERPRET)), INTERPRET)


@triton.jit
def fake_quant_fp8(x, amax, INTERPRET: tl.constexpr):
    """``e4m3(clamp(x / s, +-448)) * s`` with ``s = amax / 448``."""
    return fp8_codes(x, amax, INTERPRET).to(tl.float32) * fp8_scale(amax)


@triton.jit
def reciprocal(d, INTERPRET: tl.constexpr):
    """``RN(1 / d)`` for a normal ``d`` whose reciprocal is normal (the NVFP4 fast range's block divisors, ``2^-49``
    to ``2^49``), with no branch: ``rcp.approx`` then two Newton-Raphson steps in fma, the sequence ``div.rn``'s
    fast path runs before its range check and slow-path call, which a per-block reciprocal would otherwise pay for
    on every block. ``tests/test_gpu.py`` checks it against ``div_rn`` for every fp32 significand at exponents across
    that range. Under the interpreter, ``div_rn``."""
    if INTERPRET:
        return tl.math.div_rn(1.0, d)
    else:
        y = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [d], dtype=tl.float32, is_pure=True,
                                      pack=1)  # fmt: skip
        minus_d = d * -1.0
        y = tl.fma(tl.fma(minus_d, y, 1.0), y, y)
        return tl.fma(tl.fma(minus_d, y, 1.0), y, y)


@triton.jit
def nvfp4_block_divisor(g):
    """``(6 g, RN(1 / (6 g)))``: the divisor of the block scales (a zero ``g`` divides by 6) and its reciprocal,
    which :func:`nvfp4_block_scale` takes so that a kernel computes them once per global scale."""
    six_g = 6.0 * safe_divisor(g)
    return six_g, tl.math.div_rn(1.0, six_g)


@triton.jit
def nvfp4_block_scale(block_amax, g, six_g, inv_six_g, FAST, INTERPRET: tl.constexpr):
    """e4m3 block scale ``clamp(a_b / (6 g), 2^-9, 448)``, 1.0 for a zero block or zero ``g``; NaN for a
    block holding a NaN (``block_amax`` NaN), as the spec's clamp keeps it. ``six_g, inv_six_g`` from
    :func:`nvfp4_block_divisor`. ``FAST`` (``g`` in the fast range): Markstein's quotient by ``6 g``
    (:func:`divide_by_reciprocal`: the same e4m3 scale as the IEEE quotient, and zero exactly where it is zero,
    ``tests/test_division.py``), with no per-block division."""
    s = divide_by_reciprocal(block_amax, six_g, inv_six_g, FAST)
    s = tl.where(s == 0.0, 1.0, tl.where(g == 0.0, 1.0, s))
    return e4m3_codes(max_keeping_nan(s, NVFP4_SCALE_MIN), INTERPRET).to(tl.float32)


NVFP4_FAST_G_MIN = tl.constexpr(9.094947017729282e-13)  # 2**-40
NVFP4_FAST_G_MAX = tl.constexpr(1099511627776.0)  # 2**40
_TWO_75 = tl.constexpr(3.777893186295716e22)  # 2**75
_TWO_MINUS_75 = tl.constexpr(2.6469779601696886e-23)  # 2**-75


@triton.jit
def nvfp4_global_scale(amax):
    """The NVFP4 global scale ``g = amax / 2688`` (``6 * 448``), IEEE division as ``formats``' ``scale_from_amax``."""
    return tl.math.div_rn(amax, NVFP4_GLOBAL_DIVISOR)


@triton.jit
def fake_quant_nvfp4(blocks, amax, INTERPRET: tl.constexpr):
    """NVFP4 fake quant of a ``[BLOCK_M, BLOCK_K // 16, 16]`` tile (16-blocks along the last axis);
    ``amax`` is the global amax, a scalar or per row ``[BLOCK_M, 1, 1]``: :func:`fake_quant_nvfp4_blocks` with
    ``g = amax / 2688``, the fast quotient where every ``g`` of the tile lies in ``[2^-40, 2^40]``."""
    g = nvfp4_global_scale(amax)
    return fake_quant_nvfp4_blocks(blocks, g, all_within(g, NVFP4_FAST_G_MIN, NVFP4_FAST_G_MAX, INTERPRET), INTERPRET)


@triton.jit
def fake_quant_nvfp4_blocks(blocks, g, FAST, INTERPRET: tl.constexpr):
    """NVFP4 fake quant of 16-blocks along the last axis of ``blocks`` with global scale ``g`` (broadcasting).

    The spec is ``e2m1(x / d) * d`` with ``d`` the block scale times ``g``. With ``FAST`` (a scalar branch: every
    ``g`` in ``[2^-40, 2^40]``) the quotient is :func:`markstein_quotient`'s, the reciprocal once per block, and
    its E2M1 code is the IEEE quotient's: exact wherever the code depends on it (``tests/test_division.py``), an
    overflow's NaN saturates through minNum, and the sign of a zero code (the spec's ``x / d < 0``, false once the
    quotient underflows) is the exact test ``x 2^150 < -d``. Else ``div_rn`` per element. The sign rides on the
    per-block scale.
    """
    magnitude, negative, scale, _ = nvfp4_block_quotients(blocks, g, FAST, INTERPRET)
    return magnitude * negate_where(negative, scale)


@triton.jit
def nvfp4_block_quotients(blocks, g, FAST, INTERPRET: tl.constexpr):
    """:func:`fake_quant_nvfp4_blocks`' parts: ``(magnitude, negative, scale, block_scale)``, the quotient's E2M1
    magnitude (on the grid, saturated), whether its code is negative, the block's scale ``e4m3 * g`` and its e4m3
    factor (``[P, B, 1]``). The fake quant is ``magnitude * (-scale if negative else scale)``; the codes
    (:mod:`moeq.runtime.kernels.nvfp4_codes`) are the magnitude's index and the sign."""
    block_amax = tl.reduce(tl.abs(blocks), 2, max_keeping_nan, keep_dims=True)
    six_g, inv_six_g = nvfp4_block_divisor(g)
    block_scale = nvfp4_block_scale(block_amax, g, six_g, inv_six_g, FAST, INTERPRET)
    scale = block_scale * g
    d = safe_divisor(scale)
    if FAST:
        q = markstein_quotient(blocks, d, reciprocal(d, INTERPRET))[1]
        negative = blocks * _TWO_75 < d * -_TWO_MINUS_75
    else:
        q = tl.math.div_rn(blocks, d)
        negative = q < 0
    return e2m1_grid(min_number(tl.abs(q), 6.0, INTERPRET)), negative, scale, block_scale


@triton.jit
def block_amax16(blocks):
    """``max |x|`` over the last axis of ``blocks [P, B, 16]`` (kept as ``[P, B, 1]``), NaN propagating, as a tree of
    pairwise maxima: four dependent steps instead of a reduction's chain of fifteen."""
    P: tl.constexpr = blocks.shape[0]
    B: tl.constexpr = blocks.shape[1]
    a = tl.abs(blocks)
    lo, hi = tl.split(tl.reshape(a, [P, B, 8, 2]))
    lo, hi = tl.split(tl.reshape(max_keeping_nan(lo, hi), [P, B, 4, 2]))
    lo, hi = tl.split(tl.reshape(max_keeping_nan(lo, hi), [P, B, 2, 2]))
    lo, hi = tl.split(tl.reshape(max_keeping_nan(lo, hi), [P, B, 1, 2]))
    return max_keeping_nan(lo, hi)


@triton.jit
def nvfp4_operand_scale(block_amax, g, six_g, inv_six_g, INTERPRET: tl.constexpr):
    """``(scale, RN(1 / scale))``: an NVFP4 block's scale ``e4m3 * g`` and its reciprocal, for ``g`` in the fast range
    ``[2^-40, 2^40]`` (:func:`fake_quant_nvfp4_operand`). There the e4m3 factor is at least ``2^-9`` (or NaN), so the
    scale is never zero and is its own divisor (:func:`safe_divisor` is the identity)."""
    scale = nvfp4_block_scale(block_amax, g, six_g, inv_six_g, True, INTERPRET) * g
    return scale, reciprocal(scale, INTERPRET)


@triton.jit
def nvfp4_operand_values(blocks, scale, inv_scale, INTERPRET: tl.constexpr):
    """The per-element half of :func:`fake_quant_nvfp4_operand`'s fast path: ``x`` clipped to ``+-RN(6 d)``, Markstein's
    quotient by ``d = scale`` with ``inv_scale = RN(1 / d)`` (:func:`nvfp4_operand_scale`), rounded by
    :func:`e2m1_grid` and multiplied back. ``scale`` and ``inv_scale`` broadcast against ``blocks``."""
    bound = scale * 6.0
    return nvfp4_clipped_operand_values(
        min_number(tl.maximum(blocks, bound * -1.0), bound, INTERPRET), scale, inv_scale
    )


@triton.jit
def nvfp4_clipped_operand_values(clipped, scale, inv_scale):
    """:func:`nvfp4_operand_values` of values already clipped to ``+-RN(6 d)``, or to its bf16 truncation for bf16
    values (the same E2M1 value, ``tests/test_division.py``): Markstein's quotient, :func:`e2m1_grid`, the scale."""
    return e2m1_grid(markstein_quotient(clipped, scale, inv_scale)[1]) * scale


@triton.jit
def fake_quant_nvfp4_operand(blocks, block_amax, g, six_g, inv_six_g, FAST, INTERPRET: tl.constexpr):
    """:func:`fake_quant_nvfp4_blocks` for an MMA operand: the same values except that a zero keeps no sign (the
    spec's ``-0`` for a negative ``x`` whose code is zero comes out ``+0``, which changes no dot product that starts
    from ``+0``), in about two thirds of the instructions. With ``FAST``: ``x`` is first clipped to ``+-RN(6 d)``
    (the quotient then saturates at the E2M1 maximum without an overflow), Markstein's quotient by the block's
    reciprocal, and :func:`e2m1_grid`'s magic-number rounding applied to the signed quotient (the grid is symmetric,
    so the sign needs no test and no select). ``tests/test_division.py`` checks the values against the IEEE
    quotient's for every bf16 value over the fast range. ``block_amax``: :func:`block_amax16` of ``blocks`` (a Gluon
    caller converts its layout back to the blocks'); ``six_g, inv_six_g``: :func:`nvfp4_block_divisor` of ``g``,
    computed once per global scale. The fast path is :func:`nvfp4_operand_scale` (per block) then
    :func:`nvfp4_operand_values` (per element), which a caller may also call apart. Else
    :func:`fake_quant_nvfp4_blocks`."""
    if FAST:
        scale, inv_scale = nvfp4_operand_scale(block_amax, g, six_g, inv_six_g, INTERPRET)
        out = nvfp4_operand_values(blocks, scale, inv_scale, INTERPRET)
    else:
        out = fake_quant_nvfp4_blocks(blocks, g, False, INTERPRET)
    return out


@triton.jit
def round_to_bf16(x):
    """fp32 -> nearest bf16 value (ties to even), still as fp32: its upper 16 bits are the bf16 bits (the CPU
    interpreter's own fp32 -> bf16 cast truncates and flushes subnormals; :func:`cast_like` takes the bits)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def cast_like(x, ptr, INTERPRET: tl.constexpr):
    """Cast an fp32 tile to ``ptr``'s element type with round-to-nearest-even (the GPU's conversion
    already is; the interpreter's fp32 -> bf16 truncates and flushes subnormals, so there the bf16 bits are
    made by hand: rounded, then the upper half of the fp32 word)."""
    if INTERPRET and ptr.dtype.element_ty == tl.bfloat16:
        bits = round_to_bf16(x).to(tl.int32, bitcast=True)
        return (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def abs_bits(x, BITS: tl.constexpr):
    """``|x|`` as integers of x's width ``BITS`` (sign bit cleared). For non-negative floats integer order
    is float order and every NaN lies above inf, so an integer max is ``max|x|`` with NaN propagating:
    one reduction, no float conversion of the elements. (``BITS`` is a constexpr argument: Triton 3.6
    compiles both sides of an ``if`` on ``x.dtype``.)"""
    if BITS == 32:
        return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    else:
        return x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF


@triton.jit
def float_of_abs_bits(bits, dtype: tl.constexpr, BITS: tl.constexpr):
    """Inverse of :func:`abs_bits` for reduced values, as fp32 (exact)."""
    if BITS == 32:
        return bits.to(tl.float32, bitcast=True)
    else:
        return bits.to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
