"""``calibrate()`` / ``finalize()`` / ``quant_state()``: the calibration life cycle.

``calibrate(model)`` switches every expert quantizer of the model to observing (full-precision forward);
``finalize(model)`` reads per-expert weight statistics from the weights themselves, runs the collective
sync hooks, turns activation statistics into input amaxes (fallbacks, coverage, clear errors) and switches
the model to fake quantization. Nothing is changed unless every check passes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from moeq.formats import block_amax, expert_amax
from moeq.runtime.collectives import ProcessGroups, sync_quant_state
from moeq.state import ExpertQuantState, ModelQuantState, get_state

__all__ = ["calibrate", "finalize", "quant_state"]

logger = logging.getLogger(__name__)


def _not_frozen(state: ModelQuantState, what: str) -> None:
    if state.mode == "deploy":
        raise RuntimeError(f"{what}(): the model is frozen (moeq.freeze stored its expert weights quantized)")


@contextmanager
def calibrate(model: Any, reset: bool | None = None) -> Iterator[ModelQuantState]:
    """Within the block, forwards run in full precision and observers record per-expert statistics.

    Statistics accumulate over several ``calibrate()`` blocks; ``reset=True`` (the default after a
    ``finalize()``) starts over.
    """
    state = get_state(model)
    _not_frozen(state, "calibrate")
    if reset or (reset is None and state.finalized):
        for s in state.experts.values():
            s.reset_statistics()
        state.finalized = False
        state.calibration_sessions = 0
    state.mode = "calibrate"
    state.calibration_sessions += 1
    try:
        yield state
    finally:
        state.mode = "quantize" if state.finalized else "off"


def _input_amax(
    s: ExpertQuantState, weight_amax: torch.Tensor, errors: list[str]
) -> tuple[torch.Tensor, dict[int, str]]:
    """Turn observed per-expert statistics into the input amax the fake quant uses."""
    cfg = s.config
    obs, counts = s.observed_input_amax, s.tokens_per_expert
    flags: dict[int, str] = {}
    bad = [e for e in range(s.num_experts) if not torch.isfinite(obs[e])]
    if bad:
        errors.append(f"{s.fqn}: non-finite (NaN/inf) activations observed for experts {bad}")
        return s.input_amax, flags
    covered = (counts > 0) & (obs > 0)
    for e in range(s.num_experts):
        if counts[e] == 0:
            flags[e] = "no calibration tokens"
        elif obs[e] == 0:
            flags[e] = "all-zero calibration activations"
    if not bool(covered.any()):
        if cfg.activation is None:
            return torch.zeros_like(s.input_amax), flags
        if cfg.uncalibrated == "weight_amax":
            fallback = weight_amax.max()
            for e in range(s.num_experts):
                flags[e] = f"layer saw no tokens: input amax from weight amax {float(fallback):.4g}"
            return fallback.expand_as(s.input_amax).clone(), flags
        errors.append(
            f"{s.fqn}: no expert received a calibration token (tokens_per_expert={counts.tolist()}); "
            "calibrate with more data or set QuantConfig(uncalibrated='weight_amax')"
        )
        return s.input_amax, flags
    layer_max = obs[covered].max()
    if cfg.act_scale == "shared":
        return layer_max.reshape(1).clone(), flags
    for e in flags:
        flags[e] += f": took the layer max {float(layer_max):.4g}"
    return torch.where(covered, obs, layer_max), flags


def finalize(model: Any, ep_group: Any = None, tp_group: Any = None, dp_group: Any = None) -> ModelQuantState:
    """Fix every quantization parameter and switch the model to fake quantization.

    Raises ValueError (changing nothing) when calibration is missing, a GEMM saw no tokens at all (unless
    a fallback is configured), or statistics are not finite. Returns the model's quant state.
    """
    state = get_state(model)
    _not_frozen(state, "finalize")
    if len(state) == 0:
        raise RuntimeError(
            "finalize(): no expert GEMM has been rewritten yet; run the model compiled with backend='moeq' "
            "(or a graph from moeq.quantize_graph) at least once, inside moeq.calibrate()"
        )
    needs_data = state.config.activation is not None
    if needs_data and state.calibration_sessions == 0:
        raise RuntimeError(
            "finalize() called before calibrate(): run forward passes inside `with moeq.calibrate(model):` first "
            f"({len(state)} expert GEMMs are waiting for activation statistics)"
        )
    groups = ProcessGroups(ep_group, tp_group, dp_group)
    with torch.no_grad():
        weight_stats = {}
        for fqn, s in sorted(state.items()):
            w = state.weight(fqn)
            amax = expert_amax(w, s.expert_dim)
            block = block_amax(w, s.contraction_dim) if state.config.weight == "nvfp4" else None
            weight_stats[fqn] = (amax, block)
        sync_quant_state(state, groups)
        errors: list[str] = []
        updates = {}
        for fqn, s in sorted(state.items()):
            amax, block = weight_stats[fqn]
            input_amax, flags = _input_amax(s, amax, errors)
            zero = [e for e in range(s.num_experts) if amax[e] == 0]
            for e in zero:
                flags[e] = (flags.get(e, "") + "; " if e in flags else "") + "all-zero weight: scale set to 1/448"
                logger.warning("moeq: %s expert %d has an all-zero weight", fqn, e)
            safe_amax = torch.where(amax == 0, torch.ones_like(amax), amax)
            updates[fqn] = (safe_amax, block, input_amax, flags)
        if errors:
            raise ValueError("finalize() failed; nothing was changed:\n  " + "\n  ".join(errors))
        for fqn, (amax, block, input_amax, flags) in updates.items():
            s = state[fqn]
            s.weight_amax.copy_(amax.to(s.weight_amax.device))
            if block is not None:
                s.weight_block_amax = block.to(s.weight_amax.device)
            s.input_amax.copy_(input_amax.to(s.input_amax.device))
            s.calibrated.copy_(s.tokens_per_expert > 0)
            s.flags = flags
    state.finalized = True
    state.mode = "quantize"
    covered = sum(int(s.calibrated.sum()) for s in state.experts.values())
    total = sum(s.num_experts for s in state.experts.values())
    logger.info("moeq: finalized %d expert GEMMs; %d/%d experts saw calibration tokens", len(state), covered, total)
    return state


def quant_state(model: Any) -> dict[str, ExpertQuantState]:
    """``{weight FQN: ExpertQuantState}`` of a prepared model, compiled wrapper or quantized graph."""
    return get_state(model).as_dict()
