"""``reuse_weight_codes(model)``: QAT forwards that share one set of weights quantize each expert weight once.

In QAT mode every forward fake-quantizes every expert weight: a pass over the whole weight, which at 34k routed
rows of a Qwen3-30B-A3B layer costs about as much as the FP8 GEMM it feeds. The weights change only when the
optimizer steps, so the micro-batches of one step (gradient accumulation, pipeline schedules) and an evaluation
pass all quantize the same weights. Inside the block each expert weight is quantized once, on entry
(``moeq::quantize_weight``: FP8 codes or packed NVFP4, the form ``moeq.freeze`` stores, one Triton kernel each on
CUDA), and every forward reads
those codes (``moeq::fake_quant_weight_from_codes``: bit for bit the fake quant of the unchanged weight; the
gradient is the same straight-through estimator into the bf16 weight). Compiled FP8 graphs multiply the codes
with the deploy kernel (``moeq::grouped_qmm`` on a stored weight), which computes the QAT values from them; NVFP4
graphs dequantize the codes (one Triton pass, 0.56 bytes read per weight element instead of the fake quant's 2)
and run ``torch._grouped_mm``, because NVFP4's deploy kernel scales the fp32 product rather than each weight.
FP8 training graphs save nothing for the weight (the dgrad reads the codes again); NVFP4 ones save the
dequantized weight for the dgrad, as block-free graphs save the fake-quantized one. A per-expert module list
(Megatron ``SequentialMLP``) is quantized as its stacked state; each expert's GEMM reads its slice.

The block is the caller's promise that the expert weights do not change inside it (step the optimizer after
it). A change that bumps a weight's version counter (``optimizer.step()``, ``p.copy_()``, ``p.add_()``) is an
error on exit naming the weight; one that bypasses it (``p.data.copy_()``) cannot be seen. The codes are computed
on entry, so enter the block once the step's weight updates have landed, including an asynchronous parameter
all-gather (a ZeRO-style optimizer that overlaps it with the next forward), and with whole expert weights on each
rank (not FSDP shards, which are only whole inside the forward). Like Transformer
Engine's FP8 weight caching (``is_first_microbatch``), scoped by a ``with`` block instead of a flag.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from moeq.formats import stored_shapes
from moeq.lowering.ops import quantize_weight_into_
from moeq.state import CODES_BUFFERS, ExpertQuantState, ModelQuantState, get_state, listed_members

__all__ = ["ReusedCodes", "reuse_weight_codes"]

logger = logging.getLogger(__name__)


@dataclass
class ReusedCodes:
    """What :func:`reuse_weight_codes` did: the weights whose codes are reused (FQN -> bytes of codes) and the
    weights quantized at every forward as before, with the reason."""

    reused: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"{len(self.reused)} expert weights read from codes computed once ({sum(self.reused.values()) / 1e6:.1f} MB)"
        ]
        lines += [f"  {fqn}: {nbytes / 1e6:.2f} MB" for fqn, nbytes in sorted(self.reused.items())]
        lines += [f"  {fqn}: quantized at every forward ({why})" for fqn, why in sorted(self.skipped.items())]
        return "\n".join(lines)


def _not_reusable(est: ExpertQuantState) -> str | None:
    """Why ``est``'s weight cannot be read from codes, or None."""
    if len(est.weight_shape) != 3 or est.expert_dim % 3 != 0:
        return f"experts not along dim 0 of a 3-D weight (shape {list(est.weight_shape)}, expert dim {est.expert_dim})"
    if est.mode != "quantize":
        return f"mode {est.mode!r}"
    return None


def _refill(buffer: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` in ``buffer`` if it has the room (same shape, dtype and device: it keeps its address), else
    ``value`` itself."""
    if (buffer.shape, buffer.dtype, buffer.device) == (value.shape, value.dtype, value.device):
        return buffer.copy_(value)
    return value


def _fill(
    state: ModelQuantState, report: ReusedCodes, dequantized: bool
) -> dict[str, tuple[list[torch.Tensor], list[int], int]]:
    """Quantize every reusable expert weight into its state's codes buffers (and, with ``dequantized``, their
    dequant into ``codes_dequantized``); returns the versions they were computed at (the weight, or a module list's
    expert weights, their versions, the amax's version)."""
    versions = {}
    with torch.no_grad():
        for fqn, est in sorted(state.items()):
            reason = _not_reusable(est)
            if reason is not None:
                report.skipped[fqn] = reason
                continue
            w = state.weight(fqn)
            args = (w, est.weight_amax, est.config.weight, est.expert_dim, est.contraction_dim)
            data_shape, block_shape = stored_shapes(w.shape, est.config.weight, est.contraction_dim)
            shapes = (data_shape, tuple(est.weight_amax.shape), block_shape)
            if [(tuple(t.shape), t.device) for t in est.codes()] == [(s, w.device) for s in shapes]:
                quantize_weight_into_(*args, *est.codes())  # the last block's buffers: same addresses
            else:
                est.codes_data, est.codes_scale, est.codes_block_scale = torch.ops.moeq.quantize_weight(*args)
            if dequantized:
                value = torch.ops.moeq.dequant_weight(*est.codes(), est.config.weight, est.contraction_dim % 3, w.dtype)
                est.codes_dequantized = _refill(est.codes_dequantized, value)
            elif est.codes_dequantized.numel():
                est.codes_dequantized = est.codes_dequantized.new_zeros(0)
            est.codes_reused = True
            members = [state.weight(m) for m in listed_members(fqn, est.num_experts)] or [w]  # module list: each
            versions[fqn] = (members, [m._version for m in members], est.weight_amax._version)
            report.reused[fqn] = sum(t.nbytes for t in (*est.codes(), est.codes_dequantized))
    return versions


def _release(state: ModelQuantState, keep: bool) -> None:
    state.mode_box.codes_reused = False
    for est in state.experts.values():
        est.codes_reused = False
        if not keep:
            for name in (*CODES_BUFFERS, "codes_dequantized"):
                setattr(est, name, getattr(est, name).new_zeros(0))


@contextmanager
def reuse_weight_codes(model: Any, keep: bool = True, dequantized: bool = False) -> Iterator[ReusedCodes]:
    """Within the block, QAT forwards of ``model`` (compiled with ``backend="moeq"``, rewritten by
    ``moeq.quantize_graph`` or eager) read each expert weight's codes computed on entry instead of quantizing the
    weight again. For the micro-batches of one optimizer step::

        for batch in loader:
            with moeq.reuse_weight_codes(cmodel):
                for micro in batch.chunk(accumulation_steps):
                    cmodel(micro).loss.backward()
            optimizer.step()

    The GEMMs read the same quantized weights as without the block; on the CPU outputs and gradients are bit for
    bit the same, on the GPU up to a kernel's accumulation order (a block-free graph may pick another tile). A
    compiled model compiles once more (Dynamo guards on the block). The codes take 1 byte per FP8 weight element
    (0.56 for NVFP4). ``keep`` (default) keeps that memory after the block, and the next block writes the new
    codes into it: the same addresses, which a CUDA-graph replay needs (a new address records the graph again);
    ``keep=False`` frees it on exit. ``dequantized``: also keep each weight's dequantized copy (2 more bytes per
    bf16 element), which compiled training graphs read where a 16-bit weight is multiplied (FP8: the dgrad, which
    otherwise dequantizes the codes at every micro-batch at training sizes; NVFP4: forward and dgrad). For FP8 the
    copies pay above ``DEQUANT_FIRST_ROWS_PER_EXPERT["fp8"]`` (256) mean routed rows per expert a micro-batch, where
    the dgrad would dequantize the codes first; below it the dgrad reads the 1-byte codes in moeq's kernel, which is
    faster than ``torch._grouped_mm`` on the 2-byte copy (H100, one Qwen3-30B-A3B layer with CUDA graphs: 1.10x bf16
    a step with codes alone against 0.99x with copies at 32 rows per expert; 0.90x against 1.08x at 272). Needs a
    finalized model (QAT mode); yields a :class:`ReusedCodes` report (bytes held per weight).
    """
    state = get_state(model)
    if state.mode != "quantize":
        hint = "moeq.freeze stored its weights quantized already" if state.mode == "deploy" else "call finalize()"
        raise RuntimeError(f"reuse_weight_codes(): the model is in mode {state.mode!r}, not QAT ('quantize'): {hint}")
    if state.mode_box.codes_reused:
        raise RuntimeError("reuse_weight_codes(): already inside a reuse_weight_codes block of this model")
    report = ReusedCodes()
    try:
        versions = _fill(state, report, dequantized)
        state.mode_box.codes_reused = "dequantized" if dequantized else "codes"
        logger.info("moeq: %s", report)
        yield report
    finally:
        _release(state, keep)
    changed = [
        f"{fqn} (version {seen} -> {now}, amax version {amax_seen} -> {state[fqn].weight_amax._version})"
        for fqn, (members, before, amax_seen) in versions.items()
        for seen, now in [(sum(before), sum(m._version for m in members))]
        if now != seen or state[fqn].weight_amax._version != amax_seen
    ]
    if changed:
        raise RuntimeError(
            "moeq: expert weights changed inside reuse_weight_codes, so forwards after the change read stale codes: "
            + ", ".join(changed)
            + ". Step the optimizer (or load weights, or finalize) outside the block."
        )
