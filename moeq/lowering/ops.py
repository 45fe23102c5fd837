"""The ``moeq::`` custom ops: per-expert weight fake quant, activation fake quant, calibration observer.

Each op has a fake (meta) impl, straight-through-estimator autograd, and a plain-torch implementation
built on :mod:`moeq.formats` (the reference, used on every device until a kernel is registered for it
with ``op.register_kernel("cuda")``). The ops are opaque to Inductor, so its pointwise rewrites never
change the numerics.

Offsets (``offs``) follow ``torch._grouped_mm``: int32 cumulative row counts per expert; rows at or
past ``offs[-1]`` belong to no expert: they are neither observed nor quantized (returned as they are).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from moeq.formats import (
    check_float,
    expand_per_expert,
    expand_weight_amax,
    get_format,
    stored_form,
    stored_shapes,
    token_amax,
)
from moeq.segments import check_offsets, per_row_amax, segment_amax
from moeq.state import UNQUANTIZED_CONSEQUENCE

logger = logging.getLogger(__name__)

__all__ = [
    "dequant_weight",
    "fake_quant_act",
    "fake_quant_act_dynamic",
    "fake_quant_weight",
    "fake_quant_weight_from_codes",
    "grouped_wgrad_ste",
    "EXPERT_MODULE_ENTRY_TARGETS",
    "expert_module_entry",
    "remove_expert_module_entries",
    "observe_segments_",
    "observe_segments_reference_",
    "quantize_weight",
    "quantize_weight_into_",
    "stored_shapes",
    "reference_kernels",
]


def _check_amax(amax: Tensor, num_experts: int, what: str) -> None:
    if amax.numel() not in (1, num_experts):
        raise ValueError(
            f"{what}: amax has {amax.numel()} entries; expected 1 (shared) or {num_experts} (one per expert)"
        )


def _act_amax(x: Tensor, offs: Tensor | None, amax: Tensor, expert_dim: int) -> Tensor:
    if offs is not None:
        return per_row_amax(x, offs, amax)
    if amax.numel() == 1:
        return amax.reshape([1] * x.dim())
    return expand_per_expert(amax, x.dim(), expert_dim)


# ----------------------------------------------------------------------------------------------
# weight fake quant
# ----------------------------------------------------------------------------------------------


def _fake_quant_weight_reference(w: Tensor, amax: Tensor, fmt: str, expert_dim: int, contraction_dim: int) -> Tensor:
    """Fake-quantize a stacked expert weight with a per-expert amax ``[E]`` (or FP8 channel-wise ``[E, N]``)."""
    check_float(w, "fake_quant_weight: w")
    return get_format(fmt).fake_quant(
        w, expand_weight_amax(amax, w.dim(), expert_dim, contraction_dim), contraction_dim
    )


fake_quant_weight = torch.library.custom_op("moeq::fake_quant_weight", mutates_args=())(_fake_quant_weight_reference)


@fake_quant_weight.register_fake
def _(w: Tensor, amax: Tensor, fmt: str, expert_dim: int, contraction_dim: int) -> Tensor:
    return torch.empty_like(w)


def _weight_setup(ctx, inputs, output) -> None:
    w, amax, _, expert_dim, contraction_dim = inputs
    ctx.save_for_backward(w, amax)
    ctx.expert_dim, ctx.contraction_dim = expert_dim, contraction_dim


def _weight_backward(ctx, grad: Tensor):
    # STE: gradient passes where |w| <= amax (values above it were clipped by the quantizer)
    w, amax = ctx.saved_tensors
    keep = w.abs() <= expand_weight_amax(amax, w.dim(), ctx.expert_dim, ctx.contraction_dim)
    return grad * keep, None, None, None, None


fake_quant_weight.register_autograd(_weight_backward, setup_context=_weight_setup)


# ----------------------------------------------------------------------------------------------
# activation fake quant
# ----------------------------------------------------------------------------------------------


def _fake_quant_act_reference(
    x: Tensor, offs: Tensor | None, amax: Tensor, fmt: str, expert_dim: int, contraction_dim: int
) -> Tensor:
    """Fake-quantize activations with a static amax: shared (``[1]``) or per expert (``[E]``).

    2-D routed rows pick their expert's amax through ``offs``; batched inputs (``offs=None``) through
    ``expert_dim``. NVFP4 uses dynamic 16-block scales along ``contraction_dim`` under this global amax.
    """
    check_float(x, "fake_quant_act: x")
    fmt_obj = get_format(fmt)
    if offs is None:
        if amax.numel() != 1:
            _check_amax(amax, x.shape[expert_dim], "fake_quant_act")
        return fmt_obj.fake_quant(x, _act_amax(x, offs, amax, expert_dim), contraction_dim)
    check_offsets(offs, x.shape[0], offs.numel())
    _check_amax(amax, offs.numel(), "fake_quant_act")
    return _routed_rows_only(x, offs, fmt_obj.fake_quant(x, _act_amax(x, offs, amax, expert_dim), contraction_dim))


def _routed_rows_only(x: Tensor, offs: Tensor, out: Tensor) -> Tensor:
    """``out`` for the routed rows of 2-D ``x``, ``x``'s own rows at or past ``offs[-1]`` (they belong to no expert)."""
    if not offs.numel():
        return x.clone()
    routed = torch.arange(x.shape[0], device=x.device) < offs[-1].to(x.device)
    return torch.where(routed.unsqueeze(1), out, x)


fake_quant_act = torch.library.custom_op("moeq::fake_quant_act", mutates_args=())(_fake_quant_act_reference)


@fake_quant_act.register_fake
def _(x: Tensor, offs: Tensor | None, amax: Tensor, fmt: str, expert_dim: int, contraction_dim: int) -> Tensor:
    return torch.empty_like(x)


def _act_setup(ctx, inputs, output) -> None:
    x, offs, amax, _, expert_dim, _ = inputs
    ctx.save_for_backward(x, offs, amax)
    ctx.expert_dim = expert_dim


def _act_backward(ctx, grad: Tensor):
    # STE for both formats: pass where |x| <= amax. For NVFP4 the amax is the static global amax;
    # per-block scales are dynamic so nothing below it is clipped.
    x, offs, amax = ctx.saved_tensors
    keep = x.abs() <= _act_amax(x, offs, amax, ctx.expert_dim)
    return grad * keep, None, None, None, None, None


fake_quant_act.register_autograd(_act_backward, setup_context=_act_setup)


def _fake_quant_act_dynamic_reference(
    x: Tensor, offs: Tensor | None, fmt: str, expert_dim: int, contraction_dim: int
) -> Tensor:
    """Fake-quantize activations with dynamic per-token scales (``act_scale="token"``): each row along
    ``contraction_dim`` by its own amax (:func:`moeq.formats.token_amax`), computed from ``x`` itself. 2-D routed
    rows at or past ``offs[-1]`` belong to no expert and are returned as they are. Nothing is clipped (every value
    is within its row's amax), so the straight-through gradient is the identity."""
    if fmt != "fp8":
        raise ValueError(f"fake_quant_act_dynamic: dynamic per-token scales are an FP8 format, got {fmt!r}")
    check_float(x, "fake_quant_act_dynamic: x")
    out = get_format(fmt).fake_quant(x, token_amax(x, contraction_dim), contraction_dim)
    if offs is None:
        return out
    check_offsets(offs, x.shape[0], offs.numel())
    return _routed_rows_only(x, offs, out)


fake_quant_act_dynamic = torch.library.custom_op("moeq::fake_quant_act_dynamic", mutates_args=())(
    _fake_quant_act_dynamic_reference
)


@fake_quant_act_dynamic.register_fake
def _(x: Tensor, offs: Tensor | None, fmt: str, expert_dim: int, contraction_dim: int) -> Tensor:
    return torch.empty_like(x)


def _dynamic_act_backward(ctx, grad: Tensor):
    return grad, None, None, None, None


fake_quant_act_dynamic.register_autograd(_dynamic_act_backward)


# ----------------------------------------------------------------------------------------------
# calibration observer
# ----------------------------------------------------------------------------------------------


def _observe_segments_reference(
    x: Tensor, offs: Tensor | None, running_amax: Tensor, running_counts: Tensor, expert_dim: int, contraction_dim: int
) -> None:
    """Update running per-expert amax (max) and token counts (sum) in place, without a host sync."""
    num_experts = running_amax.numel()
    check_float(x, "observe_segments: x")
    if offs is not None:
        check_offsets(offs, x.shape[0], num_experts)
    amax, counts = segment_amax(x, offs, num_experts, expert_dim, contraction_dim)
    # torch.maximum propagates NaN, so a NaN observation sticks until finalize() reports it
    running_amax.copy_(torch.maximum(running_amax, amax))
    running_counts.add_(counts)


observe_segments_reference_ = torch.library.custom_op(
    "moeq::observe_segments_reference_", mutates_args=("running_amax", "running_counts")
)(_observe_segments_reference)


@observe_segments_reference_.register_fake
def _(
    x: Tensor, offs: Tensor | None, running_amax: Tensor, running_counts: Tensor, expert_dim: int, contraction_dim: int
) -> None:
    return None


def _not_triton_absent_notice(record: logging.LogRecord) -> bool:
    return "Triton not available" not in record.getMessage()


def moeq_triton_op(name: str, *, mutates_args: tuple[str, ...]) -> Callable[[Callable], Any]:
    """``torch.library.triton_op``, minus torch's "Triton not available" warning that defining one logs where
    triton is not installed: moeq's ops then run their plain-torch reference, and ``moeq.explain`` says so."""

    def define(fn: Callable) -> Any:
        log = logging.getLogger("torch._library.triton")
        log.addFilter(_not_triton_absent_notice)
        try:
            return triton_op(name, mutates_args=mutates_args)(fn)
        finally:
            log.removeFilter(_not_triton_absent_notice)

    return define


@moeq_triton_op("moeq::observe_segments_", mutates_args=("running_amax", "running_counts"))
def observe_segments_(
    x: Tensor, offs: Tensor | None, running_amax: Tensor, running_counts: Tensor, expert_dim: int, contraction_dim: int
) -> None:
    """Calibration observer: running per-expert amax (max) and token counts (sum), in place, no host sync.

    A ``triton_op``: for routed rows on CUDA the body launches the ``segment_amax`` Triton kernel through
    ``wrap_triton``, so Inductor emits that launch in its generated code (no Python dispatch per call, which
    dominated small calibration forwards); everything else goes to the opaque reference op.
    """
    kernels = _triton_kernels()
    if x.device.type == "cuda" and kernels is not None and _TRITON_ENABLED and offs is not None and x.dim() == 2:
        kernels.segment_amax_(x, offs, running_amax, running_counts, wrap=wrap_triton)
        return None
    if x.device.type == "cuda" and not _TRITON_ENABLED:  # reference_kernels(): the spec on the CPU, copied back
        amax_cpu, counts_cpu = running_amax.cpu(), running_counts.cpu()
        offs_cpu = offs.cpu() if offs is not None else None
        torch.ops.moeq.observe_segments_reference_(x.cpu(), offs_cpu, amax_cpu, counts_cpu, expert_dim, contraction_dim)
        running_amax.copy_(amax_cpu)
        running_counts.copy_(counts_cpu)
        return None
    torch.ops.moeq.observe_segments_reference_(x, offs, running_amax, running_counts, expert_dim, contraction_dim)
    return None


# ----------------------------------------------------------------------------------------------
# CUDA: the Triton kernels of moeq.runtime.kernels (bit-exact with the reference above)
# ----------------------------------------------------------------------------------------------


_TRITON_ENABLED = True


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Within the block, the moeq ops on CUDA tensors run the plain-torch reference on the CPU (the
    spec's own device) instead of the Triton kernels, and copy the result back: to compare the two."""
    global _TRITON_ENABLED
    previous, _TRITON_ENABLED = _TRITON_ENABLED, False
    try:
        yield
    finally:
        _TRITON_ENABLED = previous


def _triton_kernels() -> Any:
    """:mod:`moeq.runtime.kernels`, or None without triton (CUDA tensors then use the reference)."""
    try:
        from moeq.runtime import kernels
    except ImportError:
        return None
    return kernels


def runs_triton_kernel(t: Tensor) -> bool:
    """Whether a fused moeq op on ``t`` can run its Triton kernel: triton installed, and ``t`` on CUDA, or on the
    CPU under ``TRITON_INTERPRET=1`` (elsewhere the op's reference runs)."""
    if _triton_kernels() is None or t.device.type not in ("cuda", "cpu"):
        return False
    from moeq.runtime.kernels.launch import interpreting

    return t.is_cuda or interpreting()


def _register_cuda_kernels() -> None:
    kernels = _triton_kernels()
    if kernels is None:
        return

    @fake_quant_weight.register_kernel("cuda")
    def _(w: Tensor, amax: Tensor, fmt: str, expert_dim: int, contraction_dim: int) -> Tensor:
        if not _TRITON_ENABLED:
            return _fake_quant_weight_reference(w.cpu(), amax.cpu(), fmt, expert_dim, contraction_dim).to(w.device)
        if w.dim() != 3 or expert_dim % 3 != 0:
            return _fake_quant_weight_reference(w, amax, fmt, expert_dim, contraction_dim)
        return kernels.fake_quant_experts(w, amax, fmt, contraction_dim)

    @fake_quant_act.register_kernel("cuda")
    def _(x: Tensor, offs: Tensor | None, amax: Tensor, fmt: str, expert_dim: int, contraction_dim: int) -> Tensor:
        if not _TRITON_ENABLED:
            offs_cpu = offs.cpu() if offs is not None else None
            out = _fake_quant_act_reference(x.cpu(), offs_cpu, amax.cpu(), fmt, expert_dim, contraction_dim)
            return out.to(x.device)
        if offs is None or x.dim() != 2 or contraction_dim % 2 != 1:
            return _fake_quant_act_reference(x, offs, amax, fmt, expert_dim, contraction_dim)
        return kernels.fake_quant_act(x, offs, amax, fmt)

    @fake_quant_act_dynamic.register_kernel("cuda")
    def _(x: Tensor, offs: Tensor | None, fmt: str, expert_dim: int, contraction_dim: int) -> Tensor:
        if not _TRITON_ENABLED:
            offs_cpu = offs.cpu() if offs is not None else None
            return fake_quant_act_dynamic(x.cpu(), offs_cpu, fmt, expert_dim, contraction_dim).to(x.device)
        if offs is None or x.dim() != 2 or contraction_dim % 2 != 1 or fmt != "fp8":
            return _fake_quant_act_dynamic_reference(x, offs, fmt, expert_dim, contraction_dim)
        return kernels.fake_quant_tokens(x, offs)

    @quantize_weight.register_kernel("cuda")
    def _(w: Tensor, amax: Tensor, fmt: str, expert_dim: int, contraction_dim: int):
        if not _TRITON_ENABLED:
            data, scale, block = _quantize_weight_reference(w.cpu(), amax.cpu(), fmt, expert_dim, contraction_dim)
            return data.to(w.device), scale.to(w.device), block.to(w.device)
        if not _quantizes_in_a_kernel(w, amax, fmt, expert_dim):
            return _quantize_weight_reference(w, amax, fmt, expert_dim, contraction_dim)
        data_shape, block_shape = stored_shapes(w.shape, fmt, contraction_dim)
        stored = (
            w.new_empty(data_shape, dtype=torch.uint8),
            w.new_empty(amax.shape, dtype=torch.float32),
            w.new_empty(block_shape, dtype=torch.uint8),
        )
        _codes_into(w, amax, fmt, contraction_dim, *stored)
        return stored

    @grouped_wgrad_ste.register_kernel("cuda")
    def _(
        a: Tensor, b: Tensor, offs: Tensor, w: Tensor, amax: Tensor, perm: list[int], codes: Tensor | None = None
    ) -> Tensor:
        out = torch._grouped_mm(a, b, offs)
        if _TRITON_ENABLED:
            kernels.mask_clipped_grad_(out.permute(perm), w, amax, codes)
        else:
            _mask_clipped_grad_reference_(out.permute(perm), w, amax)
        return out

    @dequant_weight.register_kernel("cuda")
    def _(data: Tensor, scale: Tensor, block_scale: Tensor, fmt: str, contraction_dim: int, dtype: torch.dtype):
        if not _TRITON_ENABLED:
            args = (data.cpu(), scale.cpu(), block_scale.cpu(), fmt, contraction_dim, dtype)
            return _dequant_weight_reference(*args).to(data.device)
        return kernels.dequant_stored_weight(data, scale, block_scale, fmt, dtype).movedim(-1, contraction_dim)


# ----------------------------------------------------------------------------------------------
# deploy: stored (frozen) expert weights
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("moeq::dequant_weight", mutates_args=())
def dequant_weight(
    data: Tensor, scale: Tensor, block_scale: Tensor, fmt: str, contraction_dim: int, dtype: torch.dtype
) -> Tensor:
    """A weight stored by ``moeq.freeze`` (K-last ``data``: e4m3, or packed E2M1 in the 64-byte runs of
    :func:`moeq.formats.interleave_nvfp4_runs`; per-expert ``scale [E]``, or FP8 channel-wise ``[E, N]``;
    NVFP4 e4m3 ``block_scale``, empty for FP8) back in its original layout and ``dtype``, as
    ``formats.dequantize``. The fused kernel reads the stored form directly; this op is the unfused path (on
    CUDA one Triton launch, :func:`moeq.runtime.kernels.dequant_stored_weight`, bit for bit the same)."""
    return _dequant_weight_reference(data, scale, block_scale, fmt, contraction_dim, dtype)


def _dequant_weight_reference(
    data: Tensor, scale: Tensor, block_scale: Tensor, fmt: str, contraction_dim: int, dtype: torch.dtype
) -> Tensor:
    from moeq.formats import QuantizedTensor, deinterleave_nvfp4_runs

    if fmt == "nvfp4":
        data = deinterleave_nvfp4_runs(data, 16 * block_scale.shape[-1])
    q = QuantizedTensor(fmt, data, scale.reshape(scale.shape[0], -1, 1), block_scale if fmt == "nvfp4" else None)
    return get_format(fmt).dequantize(q, dtype).movedim(-1, contraction_dim)


@dequant_weight.register_fake
def _(data: Tensor, scale: Tensor, block_scale: Tensor, fmt: str, contraction_dim: int, dtype: torch.dtype) -> Tensor:
    shape = list(data.shape)
    if fmt == "nvfp4":
        shape[-1] = 16 * block_scale.shape[-1]
    out = data.new_empty(shape, dtype=dtype)
    return out.movedim(-1, contraction_dim)


@torch.library.custom_op("moeq::quantize_weight", mutates_args=())
def quantize_weight(
    w: Tensor, amax: Tensor, fmt: str, expert_dim: int, contraction_dim: int
) -> tuple[Tensor, Tensor, Tensor]:
    """A stacked expert weight (experts along dim 0) with per-expert ``amax [E]`` (or FP8 channel-wise ``[E, N]``)
    in the stored form
    ``moeq.freeze`` keeps and ``moeq::dequant_weight`` reads (:func:`moeq.formats.stored_form`: K-last uint8
    data, fp32 scale ``[E]``, NVFP4 block scales or empty). ``dequant_weight`` of it equals
    ``fake_quant_weight(w, amax)`` bit for bit; a QAT training graph saves it for backward instead of the
    fake-quantized weight (:mod:`moeq.lowering.joint`). No gradient (the STE is the fake quant's)."""
    return _quantize_weight_reference(w, amax, fmt, expert_dim, contraction_dim)


def _quantize_weight_reference(
    w: Tensor, amax: Tensor, fmt: str, expert_dim: int, contraction_dim: int
) -> tuple[Tensor, Tensor, Tensor]:
    if w.dim() != 3 or expert_dim % 3 != 0:
        raise ValueError(f"quantize_weight takes a 3-D weight with experts along dim 0, got {tuple(w.shape)}")
    check_float(w, "quantize_weight: w")
    amax = expand_weight_amax(amax, 3, 0, contraction_dim)
    return stored_form(get_format(fmt).quantize(w, amax, contraction_dim % 3))


@quantize_weight.register_fake
def _(w: Tensor, amax: Tensor, fmt: str, expert_dim: int, contraction_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    data, block = stored_shapes(w.shape, fmt, contraction_dim)
    scale = w.new_empty(amax.shape, dtype=torch.float32)
    return w.new_empty(data, dtype=torch.uint8), scale, w.new_empty(block, dtype=torch.uint8)


def _quantizes_in_a_kernel(w: Tensor, amax: Tensor, fmt: str, expert_dim: int) -> bool:
    """Whether ``quantize_weight`` of these operands runs a Triton kernel: a 3-D weight with experts along dim 0, FP8
    (per-expert or channel-wise amax) or NVFP4 (per-expert amax)."""
    shaped = w.dim() == 3 and expert_dim % 3 == 0
    return shaped and (fmt == "fp8" or (fmt == "nvfp4" and amax.numel() == w.shape[0]))


def _codes_into(w: Tensor, amax: Tensor, fmt: str, contraction_dim: int, data: Tensor, scale: Tensor,
                block: Tensor) -> None:  # fmt: skip
    """The stored form written by a Triton kernel straight into ``data``, ``scale``, ``block``: FP8 codes into K-last
    ``data`` (seen in ``w``'s layout), NVFP4 (:func:`moeq.runtime.kernels.nvfp4_weight_codes`) into all three."""
    k_dim = contraction_dim % 3
    if fmt == "nvfp4":
        _triton_kernels().nvfp4_weight_codes(w, amax, k_dim, out=(data, scale.view(-1), block))
        return
    codes = data.view(torch.float8_e4m3fn).movedim(-1, k_dim)
    _triton_kernels().fake_quant_experts(w, amax, "fp8", k_dim, codes=True, out=codes, scale_out=scale)


def quantize_weight_into_(
    w: Tensor, amax: Tensor, fmt: str, expert_dim: int, contraction_dim: int, data: Tensor, scale: Tensor, block: Tensor
) -> None:
    """``quantize_weight(w, amax, ...)`` written into existing tensors of its output shapes, so that they keep
    their addresses (CUDA graphs replay reading them). On CUDA, the codes go straight from the kernel into
    ``data``; otherwise the op's result is copied."""
    kernel = _TRITON_ENABLED and w.is_cuda and _triton_kernels() is not None
    if kernel and _quantizes_in_a_kernel(w, amax, fmt, expert_dim):
        _codes_into(w, amax, fmt, contraction_dim, data, scale, block)
        return
    for dst, src in zip(
        (data, scale, block), torch.ops.moeq.quantize_weight(w, amax, fmt, expert_dim, contraction_dim)
    ):
        dst.copy_(src)


# ----------------------------------------------------------------------------------------------
# QAT: a weight fake-quantized from codes computed earlier (moeq.reuse_weight_codes)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("moeq::fake_quant_weight_from_codes", mutates_args=())
def fake_quant_weight_from_codes(
    w: Tensor,
    amax: Tensor,
    data: Tensor,
    scale: Tensor,
    block_scale: Tensor,
    fmt: str,
    expert_dim: int,
    contraction_dim: int,
    dequantized: Tensor | None = None,
) -> Tensor:
    """``fake_quant_weight(w, amax, fmt, expert_dim, contraction_dim)`` read from ``w``'s codes
    (``quantize_weight(w, amax, ...)``'s ``data, scale, block_scale``, computed once for several forwards of the
    same weights): ``dequant_weight`` of them, bit for bit the fake quant of ``w`` while ``w`` is what they were
    computed from. The gradient is the fake quant's straight-through estimator into ``w``; ``w``'s values are
    not read in forward. ``dequantized``: that dequant computed once too (``w``'s layout and dtype), which the
    compiled graphs' passes hand to the GEMMs that read a 16-bit weight (:mod:`moeq.lowering.joint`); the op's
    own value does not read it."""
    _check_codes_of(w, data, block_scale, fmt, expert_dim, contraction_dim)
    return dequant_weight(data, scale, block_scale, fmt, contraction_dim % w.dim(), w.dtype)


def _check_codes_of(w: Tensor, data: Tensor, block_scale: Tensor, fmt: str, expert_dim: int, k_dim: int) -> None:
    """Raise unless ``data`` / ``block_scale`` have the shapes ``quantize_weight(w, ...)`` gives."""
    if w.dim() != 3 or expert_dim % 3 != 0:
        raise ValueError(
            f"fake_quant_weight_from_codes takes a 3-D weight with experts along dim 0, got {list(w.shape)} "
            f"(expert dim {expert_dim})"
        )
    data_shape, block_shape = stored_shapes(w.shape, fmt, k_dim)
    if (tuple(data.shape), data.dtype, tuple(block_scale.shape)) != (data_shape, torch.uint8, block_shape):
        raise ValueError(
            f"fake_quant_weight_from_codes: codes (data {list(data.shape)} {data.dtype}, block scales "
            f"{list(block_scale.shape)}) are not those of the {fmt} weight {list(w.shape)} with K along dim {k_dim} "
            f"(expected data {list(data_shape)} torch.uint8, block scales {list(block_shape)})"
        )


@fake_quant_weight_from_codes.register_fake
def _(
    w: Tensor,
    amax: Tensor,
    data: Tensor,
    scale: Tensor,
    block_scale: Tensor,
    fmt: str,
    expert_dim: int,
    contraction_dim: int,
    dequantized: Tensor | None = None,
) -> Tensor:
    _check_codes_of(w, data, block_scale, fmt, expert_dim, contraction_dim)
    return torch.empty_like(w)


def _codes_weight_setup(ctx, inputs, output) -> None:
    w, amax, expert_dim, contraction_dim = inputs[0], inputs[1], inputs[6], inputs[7]
    ctx.save_for_backward(w, amax)
    ctx.expert_dim, ctx.contraction_dim = expert_dim, contraction_dim


def _codes_weight_backward(ctx, grad: Tensor):
    return _weight_backward(ctx, grad)[:1] + (None,) * 8


fake_quant_weight_from_codes.register_autograd(_codes_weight_backward, setup_context=_codes_weight_setup)


# ----------------------------------------------------------------------------------------------
# training: the weight-gradient GEMM with the STE mask applied to its own output
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("moeq::grouped_wgrad_ste", mutates_args=())
def grouped_wgrad_ste(
    a: Tensor, b: Tensor, offs: Tensor, w: Tensor, amax: Tensor, perm: list[int], codes: Tensor | None = None
) -> Tensor:
    """``torch._grouped_mm(a, b, offs)``, a weight-gradient GEMM, with the straight-through estimator's mask of
    the weight ``w`` applied in place: ``out.permute(perm) *= (|w| <= amax[e])`` (``amax``: one value per expert,
    e.g. ``[E, 1, 1]``). The values of the pointwise ``mul`` the fake quant's autograd traces, which
    :mod:`moeq.lowering.joint` replaces with it; on CUDA the mask reads the weight alone and writes only the
    clipped gradients (:func:`moeq.runtime.kernels.mask_clipped_grad_`) instead of re-reading and re-writing
    the whole gradient. ``codes``: ``w``'s FP8 codes with this amax in ``w``'s layout (``quantize_weight``'s
    data, viewed), which decide most entries from 1 byte instead of the weight's 2; the values do not change."""
    out = torch._grouped_mm(a, b, offs)
    _mask_clipped_grad_reference_(out.permute(perm), w, amax)
    return out


def _mask_clipped_grad_reference_(grad_w: Tensor, w: Tensor, amax: Tensor) -> Tensor:
    return grad_w.mul_(w.abs() <= amax.reshape(-1, 1, 1))


@grouped_wgrad_ste.register_fake
def _(a: Tensor, b: Tensor, offs: Tensor, w: Tensor, amax: Tensor, perm: list[int], codes: Tensor | None = None):
    return torch._grouped_mm(a, b, offs)


_register_cuda_kernels()


# ----------------------------------------------------------------------------------------------
# a marker for graphs that another backend compiled
# ----------------------------------------------------------------------------------------------

_WARNED_OUTSIDE: set[tuple[str, str]] = set()


@torch.library.custom_op("moeq::expert_module_entry", mutates_args=())
def expert_module_entry(module: str, mode: str) -> None:
    """Marks where a prepared module with expert weights starts, in every graph Dynamo traces outside mode "off"
    (:func:`moeq.api.prepare`'s pre-hook). It takes no tensor, so it changes nothing about the graph's data flow
    (in-place ops, DTensors and aliasing are untouched), and it is registered as a side effect so that no dead-code
    pass drops it. The ``moeq`` backends and ``quantize_graph`` remove it before rewriting; it runs only in a graph
    that another backend compiled, and then warns once per module class and mode that nothing there is quantized."""
    if (module, mode) not in _WARNED_OUTSIDE:
        _WARNED_OUTSIDE.add((module, mode))
        logger.warning(
            "moeq: %s ran in mode %r inside a graph compiled by a backend other than 'moeq': %s. Compile the "
            "prepared model with torch.compile(model, backend='moeq') (or 'moeq_aot_eager'), or rewrite a traced "
            "graph with moeq.quantize_graph",
            module,
            mode,
            UNQUANTIZED_CONSEQUENCE.get(mode, "it is not quantized"),
        )


@expert_module_entry.register_fake
def _(module: str, mode: str) -> None:
    return None


torch.fx.node.has_side_effect(torch.ops.moeq.expert_module_entry)
torch.fx.node.has_side_effect(torch.ops.moeq.expert_module_entry.default)

#: the marker's targets in a Dynamo graph (the overload packet) and in an AOT / exported one
EXPERT_MODULE_ENTRY_TARGETS = (torch.ops.moeq.expert_module_entry, torch.ops.moeq.expert_module_entry.default)


def remove_expert_module_entries(gm: torch.fx.GraphModule) -> int:
    """Drop every :func:`expert_module_entry` of ``gm`` and of its subgraphs; returns how many were in ``gm`` itself.

    A marker still inside a subgraph (a higher-order op's body that :mod:`moeq.passes.inline_checkpoint` did not
    inline: selective activation checkpointing, ``torch.cond``, a nested checkpoint) means a prepared module ran
    there that moeq does not rewrite, so that module's expert GEMMs are not quantized, and this warns, naming the
    module and the subgraph."""
    top = 0
    for name, sub in gm.named_modules():
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        marks = [n for n in sub.graph.nodes if n.op == "call_function" and n.target in EXPERT_MODULE_ENTRY_TARGETS]
        for node in marks:
            if sub is not gm:
                logger.warning(
                    "moeq: %s runs inside the subgraph %r (selective activation checkpointing with a context_fn, a "
                    "nested checkpoint or another higher-order op): moeq rewrites the top-level graph and the bodies "
                    "of plain torch.utils.checkpoint regions only, so its expert GEMMs are not quantized there. Use "
                    "plain activation checkpointing (no context_fn) around expert modules, or none",
                    node.args[0],
                    name,
                )
            sub.graph.erase_node(node)
        if marks:
            sub.recompile()
        top += len(marks) if sub is gm else 0
    return top


# the fused grouped GEMM op (moeq::grouped_qmm) and the MoE combine (moeq::combine_experts) live in their own
# modules; importing ops registers them too
from moeq.lowering import combine as _combine  # noqa: E402, F401
from moeq.lowering import grouped_qmm as _grouped_qmm  # noqa: E402, F401
