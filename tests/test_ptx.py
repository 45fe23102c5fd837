"""The inline PTX of the NVFP4 deploy decode, executed on the CPU by a small emulator of the instructions it
uses (PTX ISA semantics: ``shf.r.wrap`` funnel shift, ``cvt.rn.bf16x2.f32 d, a, b`` puts ``a`` in the upper half,
``cvt.rn.f16x2.e4m3x2`` converts the upper byte into the upper half). The expected values come from torch's own
float8 / bfloat16 casts and the E2M1 table, so a wrong mask, shift, multiplier or operand number in the PTX
fails here before it reaches a GPU."""

from __future__ import annotations

import re
import struct

import pytest
import torch

from moeq.formats import E2M1_VALUES, NVFP4_WORD_BITS, interleave_nvfp4_runs
from moeq.runtime.kernels import grouped_qmm as kernel

MASK32 = 0xFFFFFFFF


def _bf16_bits(value: float) -> int:
    return int(torch.tensor(value, dtype=torch.float32).to(torch.bfloat16).view(torch.int16)) & 0xFFFF


def _bf16_value(bits: int) -> float:
    return float(torch.tensor(bits & 0xFFFF, dtype=torch.int32).to(torch.int16).view(torch.bfloat16))


def _f32_value(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits & MASK32))[0]


def _f32_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


def _f16_of_e4m3(byte: int) -> int:
    value = torch.tensor([byte], dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float16)
    return int(value.view(torch.int16)) & 0xFFFF


def _fma_bf16x2(a: int, b: int, c: int) -> int:
    """Per 16-bit half: bf16(a * b + c), rounded once (the product of two bf16 is exact in fp32)."""
    out = 0
    for shift in (0, 16):
        x, y, z = (torch.tensor(_bf16_value(v >> shift), dtype=torch.float32) for v in (a, b, c))
        out |= _bf16_bits(float(torch.addcmul(z, x, y))) << shift
    return out


def run_ptx(asm: str, inputs: list[int], outputs: int) -> list[int]:
    """Execute the inline-asm template on 32-bit inputs ``$outputs...``; return ``$0 .. $(outputs - 1)``."""
    regs: dict[str, int] = {f"${outputs + i}": v for i, v in enumerate(inputs)}

    def value(operand: str) -> int:
        operand = operand.strip()
        if operand in regs:
            return regs[operand]
        if operand.startswith("0f"):
            return int(operand[2:], 16)
        return int(operand, 0)

    for line in asm.strip("{} ").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        args = [a.strip() for a in re.split(r",(?![^{]*})", rest)]
        if op == "mov.b32" and args[0].startswith("{"):
            lo, hi = args[0].strip("{}").split(",")
            regs[lo.strip()], regs[hi.strip()] = value(args[1]) & 0xFFFF, value(args[1]) >> 16
            continue
        a = [value(x) for x in args[1:]]
        if op == "mov.b32":
            result = a[0]
        elif op == "and.b32":
            result = a[0] & a[1]
        elif op == "shf.r.wrap.b32":
            result = (((a[1] << 32) | a[0]) >> (a[2] % 32)) & MASK32
        elif op == "mul.lo.u32":
            result = (a[0] * a[1]) & MASK32
        elif op == "fma.rn.bf16x2":
            result = _fma_bf16x2(*a)
        elif op == "cvt.rn.f16x2.e4m3x2":
            result = _f16_of_e4m3(a[0] & 0xFF) | _f16_of_e4m3(a[0] >> 8) << 16
        elif op == "cvt.f32.f16":
            result = _f32_bits(float(torch.tensor(a[0], dtype=torch.int32).to(torch.int16).view(torch.float16)))
        elif op == "mul.f32":
            result = _f32_bits(float(torch.tensor(_f32_value(a[0])) * torch.tensor(_f32_value(a[1]))))
        elif op == "cvt.rn.bf16x2.f32":
            result = _bf16_bits(_f32_value(a[0])) << 16 | _bf16_bits(_f32_value(a[1]))
        else:
            raise AssertionError(f"the emulator does not know {op!r}")
        regs[args[0]] = result
    return [regs[f"${i}"] for i in range(outputs)]


def test_scale_ptx_every_e4m3_byte():
    """Each e4m3 block scale becomes the bf16 pair (s, s) * 2^118 exactly; NaN stays NaN."""
    asm = kernel._E4M3_SCALES_AS_BF16X2.value
    for first in range(0, 256, 4):
        pairs = run_ptx(asm, [first | (first + 1) << 8 | (first + 2) << 16 | (first + 3) << 24], 4)
        for byte, pair in zip(range(first, first + 4), pairs, strict=True):
            s = float(torch.tensor([byte], dtype=torch.uint8).view(torch.float8_e4m3fn).float())
            lo, hi = _bf16_value(pair), _bf16_value(pair >> 16)
            if s != s:
                assert lo != lo and hi != hi, byte
            else:
                assert lo == hi == s * 2.0**118, (byte, lo, s)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_word_ptx_decodes_every_stored_byte(seed):
    """Stored words (interleave_nvfp4_runs of random bytes) through the decode PTX: each byte's pair is
    ``e2m1(low nibble), e2m1(high nibble)`` times its block's scale pair and 2^-8, exact (signs included)."""
    g = torch.Generator().manual_seed(seed)
    plain = torch.randint(0, 256, (64,), generator=g).to(torch.uint8)
    stored = interleave_nvfp4_runs(plain).tolist()
    scales = torch.randint(0, 0x7F, (16, 2), generator=g).tolist()  # finite, positive e4m3 bytes
    to_pair = kernel._E4M3_SCALES_AS_BF16X2.value
    for word in range(16):
        w = sum(stored[4 * word + i] << (8 * i) for i in range(4))
        scale_pairs = run_ptx(to_pair, [scales[word][0] | scales[word][1] << 8], 4)[:2]
        decoded = run_ptx(kernel._E2M1_WORDS_AS_BF16X2.value, [w, *scale_pairs], 4)
        for i, pair in enumerate(decoded):
            position = 4 * word + i
            c, j, h = position // 16, position % 16 // 2, position % 2
            byte = int(plain[8 * j + 4 * h + c])
            s = float(torch.tensor([scales[word][i // 2]], dtype=torch.uint8).view(torch.float8_e4m3fn).float())
            for half, code in ((0, byte & 0xF), (16, byte >> 4)):
                want = (-1.0 if code & 8 else 1.0) * E2M1_VALUES[code & 7] * s * 2.0**-8
                got = _bf16_value(pair >> half)
                assert got == want and (str(got)[0] == "-") == (code & 8 != 0), (word, i, half, got, want)


def test_word_ptx_reads_each_stored_bit_once():
    """One stored bit set (nibble bit ``r`` of byte ``i``'s nibble ``h``, moved by ``NVFP4_WORD_BITS``) decodes to
    that one element: E2M1 code ``1 << r`` (0.5, 1, 2) or, for the sign bit, -0; every other element +0."""
    ones = _bf16_bits(2.0**126) * 0x10001  # unit scale: the pair's bf16 values are the E2M1 values
    for source in range(32):
        byte, nibble, bit = source // 8, source % 8 // 4, source % 4
        decoded = run_ptx(kernel._E2M1_WORDS_AS_BF16X2.value, [1 << NVFP4_WORD_BITS[source], ones, ones], 4)
        halves = {(i, h): (p >> (16 * h)) & 0xFFFF for i, p in enumerate(decoded) for h in (0, 1)}
        want = 0x8000 if bit == 3 else _bf16_bits(E2M1_VALUES[1 << bit])
        assert halves.pop((byte, nibble)) == want, source
        assert set(halves.values()) == {0}, source
