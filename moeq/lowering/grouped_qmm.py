"""``moeq::grouped_qmm``: an expert grouped GEMM with its operands' quantization fused in (one kernel; large
FP8 x FP8 batches quantize each operand once first, ``quantize_once``).

``grouped_qmm(x, w, offs, w_scale, w_block_scale, x_amax, mode, w_fmt, x_fmt, quantize_once=None)`` computes
``out[rows of expert e] = q(x[rows]) @ q(w[e])`` for ``x [M, K]``, ``w`` logically ``[E, K, N]`` and int32
cumulative ``offs``; rows at or past ``offs[-1]`` come out as zeros. Modes:

- ``"qat"``: ``w`` is the float weight, ``w_scale`` its per-expert amax ``[E]``; the weight is fake-quantized
  in ``w_fmt`` (FP8 per expert, NVFP4 per 16-block along K) as it is loaded. STE backward.
- ``"deploy"``: ``w`` is stored by :mod:`moeq.passes.freeze`: e4m3 ``[E, K, N]`` with the FP8 scale ``[E]``,
  or packed E2M1 pairs along K (uint8 ``[E, cdiv(K, 128) * 64, N]``, in the 64-byte runs and word bit order of
  :func:`moeq.formats.interleave_nvfp4_runs`) + e4m3 block scales ``[E, K/16, N]`` + global scale.

``x_fmt`` (None: A16) fake-quantizes routed activation rows with the static amax ``x_amax`` ([1] or [E]);
``"fp8_token"``: FP8 with dynamic per-token scales (each row's own amax; ``x_amax`` None). FP8 weights also take
channel-wise scales, ``w_scale [E, N]`` (``moeq.FP8_DYNAMIC``).
It is a ``torch.library.triton_op``: on CUDA the body launches the Triton kernel through ``wrap_triton``
(so a call traced by AOTAutograd is emitted by Inductor); CPU tensors go to the opaque plain-torch
reference op ``moeq::grouped_qmm_reference`` (formats.py fake quant / dequant, then per-expert matmul).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import wrap_triton

from moeq.formats import expand_weight_amax, get_format
from moeq.lowering import ops
from moeq.segments import check_offsets, per_row_amax

__all__ = ["grouped_qmm", "grouped_qmm_reference", "quantized_operands"]

MODES = ("qat", "deploy")


def _check_args(mode: str, w_fmt: str, x_fmt: str | None) -> None:
    if mode not in MODES:
        raise ValueError(f"grouped_qmm: mode must be one of {MODES}, got {mode!r}")
    for fmt in (w_fmt, "fp8" if x_fmt == "fp8_token" else x_fmt):
        if fmt is not None:
            get_format(fmt)
    if w_fmt not in ("fp8", "nvfp4"):
        raise ValueError(f"grouped_qmm: weight format must be 'fp8' or 'nvfp4', got {w_fmt!r}")


def quantized_operands(
    x: Tensor,
    w: Tensor,
    offs: Tensor,
    w_scale: Tensor,
    w_block_scale: Tensor | None,
    x_amax: Tensor | None,
    mode: str,
    w_fmt: str,
    x_fmt: str | None,
) -> tuple[Tensor, Tensor]:
    """The operands the kernel multiplies (``x̂ [M, K]``, ``ŵ [E, K, N]``, x's dtype), through the unfused
    moeq ops (formats.py on CPU, their bit-exact Triton kernels on CUDA)."""
    if mode == "qat":
        wq = torch.ops.moeq.fake_quant_weight(w, w_scale, w_fmt, 0, 1)
    else:
        block = w_block_scale.transpose(1, 2) if w_block_scale is not None else w.new_zeros(0, dtype=torch.uint8)
        wq = torch.ops.moeq.dequant_weight(w.transpose(1, 2), w_scale, block, w_fmt, 1, x.dtype)
    if x_fmt == "fp8_token":
        return torch.ops.moeq.fake_quant_act_dynamic(x, offs, "fp8", 0, -1), wq
    xq = x if x_fmt is None else torch.ops.moeq.fake_quant_act(x, offs, x_amax, x_fmt, 0, -1)
    return xq, wq


def _per_expert_mm(xq: Tensor, wq: Tensor, offs: Tensor, expert_scale: Tensor | None = None) -> Tensor:
    """Per-expert matmul in fp32 (one host sync for the offsets), times ``expert_scale[e]`` in fp32 when
    given, zeros past ``offs[-1]``."""
    out = torch.zeros(xq.shape[0], wq.shape[2], dtype=torch.float32, device=xq.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = xq[start:end].float() @ wq[e].float()
            if expert_scale is not None:
                out[start:end] *= expert_scale[e].float()
        start = end
    return out.to(xq.dtype)


@torch.library.custom_op("moeq::grouped_qmm_reference", mutates_args=())
def grouped_qmm_reference(
    x: Tensor,
    w: Tensor,
    offs: Tensor,
    w_scale: Tensor,
    w_block_scale: Tensor | None,
    x_amax: Tensor | None,
    mode: str,
    w_fmt: str,
    x_fmt: str | None,
) -> Tensor:
    """Plain-torch grouped_qmm: formats.py Q/DQ of both operands, then per-expert fp32 matmul. Deploy NVFP4
    as the kernel computes it: the weight operand ``e2m1 * block scale`` (exact), the per-expert global scale
    on the fp32 product (formats' dequantize rounds ``block * g`` first and the operand to x's dtype)."""
    _check_args(mode, w_fmt, x_fmt)
    check_offsets(offs, x.shape[0], w.shape[0])
    if mode == "deploy" and w_fmt == "nvfp4":
        xq, wq = quantized_operands(x, w, offs, torch.ones_like(w_scale), w_block_scale, x_amax, mode, w_fmt, x_fmt)
        return _per_expert_mm(xq, wq, offs, w_scale)
    xq, wq = quantized_operands(x, w, offs, w_scale, w_block_scale, x_amax, mode, w_fmt, x_fmt)
    return _per_expert_mm(xq, wq, offs)


@grouped_qmm_reference.register_fake
def _(x, w, offs, w_scale, w_block_scale, x_amax, mode, w_fmt, x_fmt):
    return x.new_empty(x.shape[0], w.shape[2])


def _zero_unrouted(out: Tensor, offs: Tensor) -> Tensor:
    """``torch._grouped_mm``'s output with the rows past ``offs[-1]`` (which it leaves unwritten) zero: on CUDA a
    kernel that writes only those rows (a ``torch.where`` rewrote the whole output), else plain torch."""
    if ops._TRITON_ENABLED and ops.runs_triton_kernel(out):
        from moeq.runtime.kernels.zero_rows import zero_unrouted_rows_

        return zero_unrouted_rows_(out, offs, wrap=wrap_triton)
    routed = torch.arange(out.shape[0], device=out.device) < offs[-1]
    return torch.where(routed.unsqueeze(1), out, torch.zeros((), dtype=out.dtype, device=out.device))


def _dequant_then_grouped_mm(
    x: Tensor, w: Tensor, offs: Tensor, w_scale: Tensor, w_block_scale: Tensor | None, w_fmt: str
) -> Tensor:
    """Deploy with 16-bit activations at large batches: the stored weight dequantized once (its Triton kernel),
    then ``torch._grouped_mm``; rows past ``offs[-1]`` zero, as the fused kernel leaves them."""
    _, wq = quantized_operands(x, w, offs, w_scale, w_block_scale, None, "deploy", w_fmt, None)
    return _zero_unrouted(torch._grouped_mm(x, wq, offs), offs)


@ops.moeq_triton_op("moeq::grouped_qmm", mutates_args=())
def grouped_qmm(
    x: Tensor,
    w: Tensor,
    offs: Tensor,
    w_scale: Tensor,
    w_block_scale: Tensor | None,
    x_amax: Tensor | None,
    mode: str,
    w_fmt: str,
    x_fmt: str | None,
    quantize_once: bool | None = None,
) -> Tensor:
    """Fused Q/DQ + grouped GEMM (see the module docstring); ``[M, N]`` in ``x.dtype``.

    ``quantize_once`` (FP8 x FP8 only): ``False`` keeps the quantization in the GEMM's load path (one
    launch), ``True`` quantizes each operand once in its own pass and multiplies the codes, ``None`` picks by
    size (:func:`moeq.runtime.kernels.grouped_qmm.quantizes_once` for the activations, ``quantizes_weight_once``
    for a QAT weight). The output is the same either way. With ``None``, a deploy GEMM with 16-bit activations
    above :data:`moeq.runtime.kernels.grouped_qmm.DEQUANT_FIRST_ROWS_PER_EXPERT` mean rows per expert runs as the
    weight's dequant kernel + ``torch._grouped_mm`` (faster there; NVFP4 then rounds ``e2m1 * block * g`` to
    x's dtype before the product, as the unfused path does)."""
    if x.device.type == "cuda" and not ops._TRITON_ENABLED:  # ops.reference_kernels(): CPU reference, copied back
        cpu = [t.cpu() if isinstance(t, Tensor) else t for t in (x, w, offs, w_scale, w_block_scale, x_amax)]
        return torch.ops.moeq.grouped_qmm_reference(*cpu, mode, w_fmt, x_fmt).to(x.device)
    if ops.runs_triton_kernel(x):
        from moeq.runtime.kernels.grouped_qmm import dequantizes_weight_first
        from moeq.runtime.kernels.grouped_qmm import grouped_qmm as launch

        _check_args(mode, w_fmt, x_fmt)
        w_mode = f"fake_{w_fmt}" if mode == "qat" else w_fmt
        large = quantize_once is None and x.is_cuda and x.dtype == torch.bfloat16
        if large and dequantizes_weight_first(w_mode, x_fmt, x.shape[0], w.shape[0]):
            return _dequant_then_grouped_mm(x, w, offs, w_scale, w_block_scale, w_fmt)
        return launch(x, w, offs, w_scale, w_block_scale, x_amax, w_mode, x_fmt, wrap=wrap_triton,
                      quantize_once=quantize_once)  # fmt: skip
    return torch.ops.moeq.grouped_qmm_reference(x, w, offs, w_scale, w_block_scale, x_amax, mode, w_fmt, x_fmt)


# ----------------------------------------------------------------------------------------------
# autograd: straight-through estimator, dgrad and wgrad as grouped GEMMs
# ----------------------------------------------------------------------------------------------


def _grouped_dgrad(grad: Tensor, wq: Tensor, offs: Tensor) -> Tensor:
    """``grad_x[rows e] = grad[rows e] @ ŵ[e]^T`` (zeros past ``offs[-1]``)."""
    if grad.is_cuda and grad.dtype == torch.bfloat16:
        return _zero_unrouted(torch._grouped_mm(grad, wq.transpose(1, 2), offs), offs)
    return _per_expert_mm(grad, wq.transpose(1, 2), offs)


def _grouped_wgrad(xq: Tensor, grad: Tensor, offs: Tensor, num_experts: int) -> Tensor:
    """``grad_w[e] = x̂[rows e]^T @ grad[rows e]`` ([E, K, N]; zero for empty experts)."""
    if grad.is_cuda and grad.dtype == torch.bfloat16:
        return torch._grouped_mm(xq.t(), grad, offs)
    out = torch.zeros(num_experts, xq.shape[1], grad.shape[1], dtype=torch.float32, device=xq.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[e] = xq[start:end].float().t() @ grad[start:end].float()
        start = end
    return out.to(xq.dtype)


def _setup(ctx, inputs, output) -> None:
    x, w, offs, w_scale, w_block_scale, x_amax, mode, w_fmt, x_fmt, _ = inputs
    ctx.save_for_backward(x, w, offs, w_scale, w_block_scale, x_amax)
    ctx.args = (mode, w_fmt, x_fmt)


def _backward(ctx, grad: Tensor):
    # STE, as the unfused moeq::fake_quant_* ops: gradients pass where |v| <= amax (clipped values stop)
    x, w, offs, w_scale, w_block_scale, x_amax = ctx.saved_tensors
    mode, w_fmt, x_fmt = ctx.args
    xq, wq = quantized_operands(x, w, offs, w_scale, w_block_scale, x_amax, mode, w_fmt, x_fmt)
    grad = grad.contiguous()
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = _grouped_dgrad(grad, wq, offs)
        if x_fmt not in (None, "fp8_token"):  # dynamic per-token scales clip nothing
            grad_x = grad_x * (x.abs() <= per_row_amax(x, offs, x_amax))
    if ctx.needs_input_grad[1] and mode == "qat":
        grad_w = _grouped_wgrad(xq, grad, offs, w.shape[0]) * (w.abs() <= expand_weight_amax(w_scale, 3, 0, 1))
    return grad_x, grad_w, None, None, None, None, None, None, None, None


grouped_qmm.register_autograd(_backward, setup_context=_setup)
