"""Numeric formats: the reference quantize / dequantize / fake-quant / pack in plain torch.

This module is THE numerics spec of moeq (see DESIGN.md, "Numerics spec"); kernels and exporters are
tested against it. It imports nothing from moeq. All arithmetic runs in fp32 and results are cast back
to the input dtype; rounding is round-to-nearest-even everywhere.

Tensors carry an explicit ``contraction_dim`` (the GEMM's K): NVFP4 blocks of 16 run along it. A
per-tensor ``amax`` must broadcast against the tensor with size 1 along the contraction dim, e.g. a
per-expert amax ``[E]`` for a stacked weight ``[E, N, K]`` is passed as ``amax.view(E, 1, 1)``
(:func:`expand_per_expert` does that).
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "E2M1_VALUES",
    "FLOAT_DTYPES",
    "FP8_E4M3_MAX",
    "NVFP4_BLOCK",
    "FP8E4M3",
    "NVFP4",
    "QuantFormat",
    "QuantizedTensor",
    "check_float",
    "e2m1_codes",
    "e2m1_decode",
    "e2m1_round",
    "channel_amax",
    "expand_per_expert",
    "expand_weight_amax",
    "expert_amax",
    "token_amax",
    "get_format",
    "pack_nibbles",
    "register_format",
    "round_to_e4m3",
    "fp8_export_weight",
    "encode_e4m3",
    "decode_e4m3",
    "unpack_nibbles",
    "interleave_nvfp4_runs",
    "stored_form",
    "stored_shapes",
    "deinterleave_nvfp4_runs",
    "NVFP4_RUN_BYTES",
    "NVFP4_WORD_BITS",
    "available_formats",
    "block_amax",
    "nvfp4_blocks",
]

FP8_E4M3_MAX = 448.0
E2M1_MAX = 6.0
NVFP4_BLOCK = 16
NVFP4_SCALE_MIN = 2.0**-9  # smallest positive e4m3 subnormal
#: bytes (2 * 64 K elements) per run of the frozen NVFP4 storage order, :func:`interleave_nvfp4_runs`
NVFP4_RUN_BYTES = 64

#: E2M1 magnitudes indexed by the 3-bit magnitude code.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# Decision boundaries between consecutive E2M1 magnitudes with the comparison that sends a tie to the
# even code: (boundary, tie goes up). 0.25 sits between codes 0|1 -> stays 0; 0.75 between 1|2 -> 2; ...
_E2M1_BOUNDARIES = (
    (0.25, False),
    (0.75, True),
    (1.25, False),
    (1.75, True),
    (2.5, False),
    (3.5, True),
    (5.0, False),
)


# ----------------------------------------------------------------------------------------------
# helpers shared by every format
# ----------------------------------------------------------------------------------------------

#: the floating dtypes moeq's ops and kernels take (weights, activations, outputs)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_float(t: torch.Tensor | torch.dtype, name: str) -> None:
    """A tensor's (or a dtype's) float dtype is one moeq takes; the error names the argument."""
    dtype = t if isinstance(t, torch.dtype) else t.dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {dtype}")


def expert_amax(w: torch.Tensor, expert_dim: int = 0) -> torch.Tensor:
    """Per-expert ``max|w|`` of a stacked weight, fp32 ``[E]``."""
    w = w.detach().movedim(expert_dim, 0)
    if w.numel() == 0:
        return torch.zeros(w.shape[0], device=w.device)
    return w.abs().reshape(w.shape[0], w[0].numel()).amax(dim=1).float()


def channel_amax(w: torch.Tensor, expert_dim: int = 0, contraction_dim: int = -1) -> torch.Tensor:
    """Per-expert, per-output-channel ``max|w|`` of a stacked 3-D weight, fp32 ``[E, N]`` (``N``: the dim that is
    neither the experts' nor the contraction's): the amax of FP8 channel-wise weight scales."""
    if w.dim() != 3:
        raise ValueError(f"channel-wise weight scales need a stacked 3-D expert weight, got shape {tuple(w.shape)}")
    e_dim, k_dim = expert_dim % 3, contraction_dim % 3
    n_dim = 3 - e_dim - k_dim
    w = w.detach().permute(e_dim, n_dim, k_dim)
    if w.numel() == 0:
        return torch.zeros(w.shape[:2], device=w.device)
    return w.abs().amax(dim=2).float()


def token_amax(x: torch.Tensor, contraction_dim: int = -1) -> torch.Tensor:
    """Each row's ``max|x|`` along the contraction dim (kept as size 1), fp32: the amax of FP8 dynamic per-token
    activation scales, computed at run time from the activation itself. A NaN in a row makes its amax NaN."""
    if x.shape[contraction_dim] == 0:
        shape = list(x.shape)
        shape[contraction_dim] = 1
        return torch.zeros(shape, device=x.device)
    return x.detach().float().abs().amax(dim=contraction_dim, keepdim=True)


def nvfp4_blocks(x: torch.Tensor, contraction_dim: int) -> torch.Tensor:
    """fp32 view of ``x`` with the contraction dim moved last and split into 16-blocks ``[..., K/16, 16]``."""
    xk = x.float().movedim(contraction_dim, -1)
    return xk.reshape(*xk.shape[:-1], xk.shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK)


def block_amax(x: torch.Tensor, contraction_dim: int) -> torch.Tensor:
    """NVFP4 per-16-block ``max|x|`` along the contraction dim (moved last), fp32 ``[..., K/16]``."""
    return nvfp4_blocks(x.detach(), contraction_dim).abs().amax(dim=-1)


def expand_per_expert(amax: torch.Tensor, ndim: int, expert_dim: int = 0) -> torch.Tensor:
    """View a per-expert vector ``[E]`` so it broadcasts against an ``ndim``-D stacked tensor."""
    shape = [1] * ndim
    shape[expert_dim] = amax.numel()
    return amax.reshape(shape)


def expand_weight_amax(amax: torch.Tensor, ndim: int, expert_dim: int = 0, contraction_dim: int = -1) -> torch.Tensor:
    """View a weight amax so it broadcasts against its ``ndim``-D stacked weight: per expert ``[E]``
    (:func:`expand_per_expert`) or per expert and output channel ``[E, N]`` (:func:`channel_amax`; size 1 along
    the contraction dim)."""
    if amax.dim() <= 1:
        return expand_per_expert(amax, ndim, expert_dim)
    if ndim != 3 or amax.dim() != 2:
        raise ValueError(f"a channel-wise amax {tuple(amax.shape)} needs a 3-D stacked weight, got {ndim}-D")
    e_dim, k_dim = expert_dim % 3, contraction_dim % 3
    n_dim = 3 - e_dim - k_dim
    return (amax if e_dim < n_dim else amax.t()).unsqueeze(k_dim)


def _k_last(scale: torch.Tensor, ndim: int, contraction_dim: int) -> torch.Tensor:
    """Move a broadcastable per-tensor scale like its tensor (contraction dim last); scalars pass through."""
    if scale.dim() == ndim:
        return scale.movedim(contraction_dim, -1)
    if scale.numel() == 1:
        return scale.reshape(())
    raise ValueError(f"amax of shape {tuple(scale.shape)} does not broadcast against a {ndim}-D tensor")


def round_to_e4m3(y: torch.Tensor) -> torch.Tensor:
    """Round fp32 ``y`` (``|y| <= 448``) to the float8_e4m3fn grid, ties to even, as fp32.

    Built from the fp32 bits with exact operations only. On an H200 with torch 2.11, the same spec written
    with torch's float8_e4m3fn cast (and again with frexp/ldexp) gave different values on CUDA than on CPU
    for e4m3 subnormals; this form gives identical results on both (BENCHMARKS.md). moeq's numerics never
    go through torch's float8 conversions: :func:`encode_e4m3` / :func:`decode_e4m3` make the storage bits.
    """
    y = y.float()
    exponent = _exponent(y).clamp(min=-6)  # below 2**-6 the grid is uniform: step 2**-9
    quantum = _pow2(exponent - 3)
    return torch.round(y * _pow2(3 - exponent)) * quantum


def _exponent(a: torch.Tensor) -> torch.Tensor:
    """floor(log2|a|) of fp32 normals, read from the bits (exact on every device; frexp/ldexp are not)."""
    return ((a.view(torch.int32) >> 23) & 0xFF) - 127


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2**exponent as fp32, built from the bits (normal range)."""
    return ((exponent + 127) << 23).to(torch.int32).view(torch.float32)


def encode_e4m3(v: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn storage of fp32 values already on the e4m3 grid (see :func:`round_to_e4m3`); NaN is stored
    as the format's NaN (0x7F, 0xFF with the sign bit set, as torch's CPU cast stores it; the sign of a NaN code
    is not part of the spec: the GPU's conversion writes 0x7F for both), so that dequantizing a quantized NaN
    gives NaN, as fake quant does."""
    a = v.float().abs()
    exponent = _exponent(a)
    subnormal = a < 2.0**-6
    normal_code = (exponent + 7).clamp(min=1) * 8 + (a * _pow2(-exponent.clamp(min=-6)) - 1.0) * 8.0
    code = torch.where(subnormal, a * 512.0, normal_code).to(torch.int32)
    code = torch.where(a.isnan(), 0x7F, code)  # whatever the int cast made of NaN
    code = torch.where(torch.signbit(v), code | 0x80, code)
    return code.to(torch.uint8).view(torch.float8_e4m3fn)


def decode_e4m3(q: torch.Tensor) -> torch.Tensor:
    """fp32 values of float8_e4m3fn storage (0x7F / 0xFF are NaN)."""
    bits = q.view(torch.uint8).to(torch.int32)
    exponent, mantissa = (bits >> 3) & 0xF, bits & 0x7
    mag = torch.where(
        exponent == 0,
        mantissa.float() * 2.0**-9,
        (8.0 + mantissa.float()) * _pow2(exponent - 10),
    )
    mag = torch.where((exponent == 15) & (mantissa == 7), torch.full_like(mag, float("nan")), mag)
    return torch.where((bits & 0x80) != 0, -mag, mag)


def _div(a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
    """Correctly rounded fp32 ``a / b`` on every device: the quotient of two fp32 numbers computed in
    fp64 and rounded once to fp32 is the IEEE fp32 quotient (53 >= 2 * 24 + 2 bits). torch's own fp32
    division on CUDA broke ties of the spec differently from the CPU (BENCHMARKS.md)."""
    b = b.double() if isinstance(b, torch.Tensor) else float(b)
    return (a.double() / b).float()


def _mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 ``a * b`` on every device (exact product in fp64, one rounding)."""
    return (a.double() * b.double()).float()


def _safe_divisor(scale: torch.Tensor) -> torch.Tensor:
    """A zero scale means an all-zero tensor: divide by 1 instead (the result is multiplied by 0)."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)


# ----------------------------------------------------------------------------------------------
# E2M1 (the FP4 element type of NVFP4)
# ----------------------------------------------------------------------------------------------


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 ``x`` to E2M1 codes (uint8, ``sign << 3 | index``), RNE, saturating at +-6.

    The sign bit is ``x < 0`` (so ``-0.1`` encodes as ``-0``, code 8, as modelopt does). NaN maps to 0.
    """
    mag = x.abs()
    index = torch.zeros_like(x, dtype=torch.uint8)
    for boundary, tie_up in _E2M1_BOUNDARIES:
        above = (mag >= boundary) if tie_up else (mag > boundary)
        index += above.to(torch.uint8)
    sign = (x < 0).to(torch.uint8)
    return (sign << 3) | index


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8) -> fp32 values."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    mag = table[(codes & 0x7).long()]
    return torch.where((codes & 0x8) != 0, -mag, mag)


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 ``x`` to the nearest E2M1 value (RNE, saturating), as fp32."""
    return e2m1_decode(e2m1_codes(x))


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes along the last dim: element ``2k`` low nibble, ``2k+1`` high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd last dim of {codes.shape[-1]} 4-bit codes into bytes")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _nvfp4_word_bit(byte: int, nibble: int, bit: int) -> int:
    """Where bit ``bit`` of nibble ``nibble`` of byte ``byte`` of a 32-bit word goes in the deploy order."""
    lands = (6, 7, 8, 15)[bit] + 16 * nibble  # sign at bf16 bit 15, magnitude at bits 8..6 of each half
    if byte < 3:
        return (lands + 3 * byte) % 32  # rotated back by 3 * byte bits
    return (3, 4, 0, 1)[bit] + 16 * nibble  # moved there by a multiply by 2^3 + 2^8 + 2^14


#: destination bit of source bit ``8 * byte + 4 * nibble + bit`` of each word, :func:`interleave_nvfp4_runs`
NVFP4_WORD_BITS = tuple(_nvfp4_word_bit(b, h, r) for b in range(4) for h in range(2) for r in range(4))
assert sorted(NVFP4_WORD_BITS) == list(range(32))
#: the inverse: source bit of each destination bit, :func:`deinterleave_nvfp4_runs`
_NVFP4_WORD_SOURCES = tuple(sorted(range(32), key=NVFP4_WORD_BITS.__getitem__))


@functools.cache
def _half_word_tables(destination: tuple[int, ...]) -> torch.Tensor:
    """int32 ``[2, 65536]``: each value of a word's low / high 16 bits with its bits moved to ``destination``."""
    values = torch.arange(65536, dtype=torch.int64)
    tables = torch.zeros(2, 65536, dtype=torch.int64)
    for half in range(2):
        for bit in range(16):
            tables[half] |= ((values >> bit) & 1) << destination[16 * half + bit]
    return tables.to(torch.int32)  # bit 31 wraps to the sign, as the int32 view of the word has it


def _move_word_bits(data: torch.Tensor, destination: tuple[int, ...]) -> torch.Tensor:
    """Bytes ``[..., 4n]`` as little-endian 32-bit words with bit ``i`` of each word moved to ``destination[i]``
    (two table lookups per word)."""
    tables = _half_word_tables(destination).to(data.device)
    halves = data.contiguous().view(torch.int16).view(*data.shape[:-1], -1, 2).to(torch.int64) & 0xFFFF
    return (tables[0][halves[..., 0]] | tables[1][halves[..., 1]]).view(torch.uint8).reshape(data.shape)


def interleave_nvfp4_runs(packed: torch.Tensor) -> torch.Tensor:
    """The deploy storage order of packed E2M1 pairs ``[..., K/2]`` (what ``moeq.freeze`` stores).

    Bytes: the last dim in runs of 64 bytes (128 K elements), byte ``8j + 4h + c`` of a run at position
    ``16c + 2j + h``, the last run padded with zero bytes. The fused kernel's MMA tile gives each GPU thread K
    pairs ``c``, ``c + 4`` of every 16-element block of a run: in this order that thread's 16 bytes sit side
    by side, one 16-byte load instead of sixteen 1-byte ones.

    Bits: each little-endian 32-bit word of that order holds its four bytes' nibbles where the kernel turns
    them into bf16 pairs in 2-4 instructions each (:data:`NVFP4_WORD_BITS`): byte ``i < 3`` lands, after a
    rotation right by ``3 i`` bits, with each nibble's sign at bit 15 (31) and its magnitude at bits 8..6
    (24..22); byte 3 lands there after masking ``0x001B001B`` and multiplying by ``2^3 + 2^8 + 2^14``.

    Checkpoints and exports keep the plain order."""
    pad = -packed.shape[-1] % NVFP4_RUN_BYTES
    if pad:
        packed = torch.cat((packed, packed.new_zeros(*packed.shape[:-1], pad)), dim=-1)
    runs = packed.reshape(*packed.shape[:-1], -1, 8, 2, 4)  # (run, j, h, c)
    return _move_word_bits(runs.movedim(-1, -3).reshape(*packed.shape[:-1], -1), NVFP4_WORD_BITS)  # (run, c, j, h)


def stored_form(q: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The deploy buffers of a quantized weight, K-last and contiguous: the data as uint8 (NVFP4 pairs in the
    deploy order of :func:`interleave_nvfp4_runs`), the scale in fp32 (per expert ``[E]``; FP8 channel-wise
    ``[E, N]``), the NVFP4 block scales as uint8 (empty for FP8). What ``moeq.freeze`` keeps,
    ``moeq::quantize_weight`` returns and the fused kernel reads."""
    scale = q.scale.float().reshape(q.scale.shape[0], -1) if q.scale.dim() else q.scale.float().reshape(1, 1)
    data, scale = q.data.view(torch.uint8), (scale.reshape(-1) if scale.shape[1] == 1 else scale).contiguous()
    if q.block_scale is None:
        return data.contiguous(), scale, data.new_zeros(0)
    return interleave_nvfp4_runs(data).contiguous(), scale, q.block_scale.view(torch.uint8).contiguous()


def stored_shapes(weight_shape: Any, fmt: str, contraction_dim: int) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The shapes of :func:`stored_form`'s uint8 ``data`` and ``block_scale`` for a 3-D weight (experts along
    dim 0): K-last data (NVFP4: packed in whole 64-byte runs, :func:`interleave_nvfp4_runs`)."""
    k_dim = contraction_dim % 3
    e, other, k = weight_shape[0], weight_shape[3 - k_dim], weight_shape[k_dim]
    if fmt == "nvfp4":
        runs = -(-k // (2 * NVFP4_RUN_BYTES)) * NVFP4_RUN_BYTES
        return (e, other, runs), (e, other, k // 16)
    return (e, other, k), (0,)


def deinterleave_nvfp4_runs(stored: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`interleave_nvfp4_runs` for ``k`` elements along the contraction dim."""
    if stored.shape[-1] % NVFP4_RUN_BYTES or stored.shape[-1] * 2 < k:
        raise ValueError(
            f"NVFP4 deploy data of last dim {stored.shape[-1]} bytes is not whole {NVFP4_RUN_BYTES}-byte runs "
            f"covering K={k}"
        )
    runs = _move_word_bits(stored, _NVFP4_WORD_SOURCES).reshape(*stored.shape[:-1], -1, 4, 8, 2)  # (run, c, j, h)
    return runs.movedim(-3, -1).reshape(*stored.shape[:-1], -1)[..., : k // 2]


# ----------------------------------------------------------------------------------------------
# formats
# ----------------------------------------------------------------------------------------------


@dataclass
class QuantizedTensor:
    """A quantized tensor with the contraction dim moved last (K-major), as checkpoints store it.

    ``data``: float8_e4m3fn values (FP8) or packed uint8 E2M1 pairs (NVFP4, last dim K/2).
    ``scale``: the per-tensor scale in the shape of ``amax`` (FP8 ``s``; NVFP4 global ``g``), fp32.
    ``block_scale``: NVFP4 only, float8_e4m3fn ``[..., K/16]``.
    """

    format: str
    data: torch.Tensor
    scale: torch.Tensor
    block_scale: torch.Tensor | None = None


class QuantFormat(ABC):
    """A numeric format. Add one by subclassing and decorating with :func:`register_format`."""

    name: str
    #: contraction-dim block size, or None for per-tensor formats
    block_size: int | None = None

    @abstractmethod
    def scale_from_amax(self, amax: torch.Tensor) -> torch.Tensor:
        """The per-tensor scale the format derives from an amax (fp32)."""

    @abstractmethod
    def fake_quant(self, x: torch.Tensor, amax: torch.Tensor, contraction_dim: int = -1) -> torch.Tensor:
        """Quantize then dequantize ``x``; same shape and dtype as ``x``."""

    @abstractmethod
    def quantize(self, x: torch.Tensor, amax: torch.Tensor, contraction_dim: int = -1) -> QuantizedTensor:
        """Quantize ``x`` to storage form (contraction dim moved last)."""

    @abstractmethod
    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Inverse of :meth:`quantize` (contraction dim stays last)."""

    def check_shape(self, shape: torch.Size | tuple[int, ...], contraction_dim: int, what: str = "tensor") -> None:
        """Raise if ``shape`` cannot be quantized along ``contraction_dim`` in this format."""
        if self.block_size is not None and shape[contraction_dim] % self.block_size:
            raise ValueError(
                f"{self.name}: {what} of shape {tuple(shape)} has contraction dim {contraction_dim} of size "
                f"{shape[contraction_dim]}, not a multiple of the block size {self.block_size}"
            )

    def __repr__(self) -> str:
        return f"<moeq format {self.name}>"


_REGISTRY: dict[str, QuantFormat] = {}


def register_format(cls: type[QuantFormat]) -> type[QuantFormat]:
    """Class decorator: make a format available by name (``get_format("fp8")``)."""
    _REGISTRY[cls.name] = cls()
    return cls


def get_format(fmt: str | QuantFormat) -> QuantFormat:
    """Look a format up by name (or pass a format object through)."""
    if isinstance(fmt, QuantFormat):
        return fmt
    try:
        return _REGISTRY[fmt]
    except KeyError:
        raise ValueError(f"unknown quantization format {fmt!r}; known formats: {sorted(_REGISTRY)}") from None


def available_formats() -> list[str]:
    return sorted(_REGISTRY)


@register_format
class FP8E4M3(QuantFormat):
    """FP8 E4M3, per-tensor scale ``s = amax / 448``; fake quant ``e4m3(clamp(x / s, +-448)) * s``."""

    name = "fp8"

    def scale_from_amax(self, amax: torch.Tensor) -> torch.Tensor:
        return _div(amax.float(), FP8_E4M3_MAX)

    def _grid(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``x / s`` clamped to +-448 (before rounding: overflow behaviour differs between devices) and
        rounded to the e4m3 grid, as fp32."""
        y = _div(x.float(), _safe_divisor(scale)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
        return round_to_e4m3(y)

    def fake_quant(self, x: torch.Tensor, amax: torch.Tensor, contraction_dim: int = -1) -> torch.Tensor:
        scale = self.scale_from_amax(amax)
        return _mul(self._grid(x, scale), scale).to(x.dtype)

    def quantize(self, x: torch.Tensor, amax: torch.Tensor, contraction_dim: int = -1) -> QuantizedTensor:
        scale = self.scale_from_amax(amax)
        data = encode_e4m3(self._grid(x, scale).movedim(contraction_dim, -1))
        return QuantizedTensor(self.name, data, _k_last(scale, x.dim(), contraction_dim))

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return _mul(decode_e4m3(q.data), q.scale).to(dtype)


def fp8_export_weight(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 checkpoint weight ``(w / s).to(float8_e4m3fn)`` with the division rounded to ``w``'s own dtype.

    This is the export rule of the numerics spec (not the fake-quant rule, which divides in fp32): a bf16
    weight divided by a 0-d fp32 scale stays bf16 under torch's type promotion, which is what the peer
    exporter (nvidia-modelopt) writes, so byte parity depends on the intermediate bf16 rounding. The
    quotient is the correctly rounded fp32 quotient rounded once more to ``w.dtype`` (what torch computes
    on CPU), clamped to +-448 and encoded with moeq's own e4m3 rounding.
    """
    q = _div(w.float(), scale.float().reshape(())).to(w.dtype).float()
    return encode_e4m3(round_to_e4m3(q.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)))


@register_format
class NVFP4(QuantFormat):
    """NVFP4: E2M1 values, e4m3 scales per 16-block along K, fp32 global scale ``g = amax / (6 * 448)``.

    Quantize divides by, and dequantize multiplies by, the one fp32 product ``s_b * g``: DESIGN's
    ``e2m1(q) * float(s_b) * g_e`` is ``e2m1(q) * (float(s_b) * g_e)``, the order of modelopt's dequantize
    (multiplying left to right differs from it by an ulp now and then)."""

    name = "nvfp4"
    block_size = NVFP4_BLOCK

    def scale_from_amax(self, amax: torch.Tensor) -> torch.Tensor:
        return _div(amax.float(), E2M1_MAX * FP8_E4M3_MAX)

    def block_scales(self, block_amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
        """float8_e4m3fn block scales (storage form) of :meth:`block_scale_values`."""
        return encode_e4m3(self.block_scale_values(block_amax, global_scale))

    def block_scale_values(self, block_amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
        """e4m3 block scales ``clamp(a_b / (6 g), 2^-9, 448)``; a zero block (or zero ``g``) gets 1.0."""
        s = _div(block_amax.float(), _mul(torch.full_like(global_scale, E2M1_MAX), _safe_divisor(global_scale)))
        s = torch.where((s == 0) | (global_scale == 0), torch.ones_like(s), s)
        return round_to_e4m3(s.clamp(NVFP4_SCALE_MIN, FP8_E4M3_MAX))

    def _blocked(self, x: torch.Tensor, amax: torch.Tensor, contraction_dim: int):
        """Move K last and split it into 16-blocks; returns (blocks fp32, global scale, block amax)."""
        self.check_shape(x.shape, contraction_dim)
        blocks = nvfp4_blocks(x, contraction_dim)
        g = _k_last(self.scale_from_amax(amax), x.dim(), contraction_dim).unsqueeze(-1)
        block_amax = blocks.abs().amax(dim=-1, keepdim=True)
        return blocks, g, block_amax

    def _quantize_blocks(self, x: torch.Tensor, amax: torch.Tensor, contraction_dim: int):
        blocks, g, block_amax = self._blocked(x, amax, contraction_dim)
        s_b = self.block_scale_values(block_amax, g)
        scale = _mul(s_b, g)
        codes = e2m1_codes(_div(blocks, _safe_divisor(scale)))
        return codes, scale, s_b, g

    def fake_quant(self, x: torch.Tensor, amax: torch.Tensor, contraction_dim: int = -1) -> torch.Tensor:
        codes, scale, _, _ = self._quantize_blocks(x, amax, contraction_dim)
        xk = _mul(e2m1_decode(codes), scale).reshape(*codes.shape[:-2], codes.shape[-2] * NVFP4_BLOCK)
        return xk.movedim(-1, contraction_dim).to(x.dtype)

    def quantize(self, x: torch.Tensor, amax: torch.Tensor, contraction_dim: int = -1) -> QuantizedTensor:
        codes, _, s_b, _ = self._quantize_blocks(x, amax, contraction_dim)
        packed = pack_nibbles(codes.reshape(*codes.shape[:-2], codes.shape[-2] * NVFP4_BLOCK))
        global_scale = _k_last(self.scale_from_amax(amax), x.dim(), contraction_dim)
        return QuantizedTensor(self.name, packed, global_scale, encode_e4m3(s_b.squeeze(-1)))

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = unpack_nibbles(q.data)
        blocks = e2m1_decode(codes).reshape(*codes.shape[:-1], codes.shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK)
        scale = _mul(decode_e4m3(q.block_scale).unsqueeze(-1), q.scale.unsqueeze(-1))
        return _mul(blocks, scale).reshape(*codes.shape).to(dtype)
