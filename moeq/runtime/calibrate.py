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

from moeq.formats import block_amax, channel_amax, expert_amax, get_format
from moeq.runtime.collectives import LayerStats, agree_before_sync, default_groups, sync_statistics
from moeq.state import ExpertQuantState, ModelQuantState, get_state, is_under

__all__ = ["calibrate", "finalize", "quant_state"]

logger = logging.getLogger(__name__)


def _frozen(state: ModelQuantState, what: str) -> str | None:
    if state.mode == "deploy":
        return f"{what}(): the model is frozen (moeq.freeze stored its expert weights quantized)"
    return None


def _not_frozen(state: ModelQuantState, what: str) -> None:
    if message := _frozen(state, what):
        raise RuntimeError(message)


@contextmanager
def calibrate(model: Any, reset: bool | None = None) -> Iterator[ModelQuantState]:
    """Within the block, forwards run in full precision and observers record per-expert statistics.

    Statistics accumulate over several ``calibrate()`` blocks; ``reset=True`` (the default after a
    ``finalize()``) starts over. Under ``QuantConfig(calib="all_experts")`` each transformers experts module (or
    module-list MoE block) first runs every token through every expert (output dropped), then its routed call (the
    model's output).
    """
    state = get_state(model)
    _not_frozen(state, "calibrate")
    if reset is False and state.finalized and state.synced_over_dp:
        raise ValueError(
            "calibrate(reset=False) after a finalize() that summed token counts over data-parallel ranks would "
            "count those tokens again at the next finalize(); calibrate from scratch (reset=True)"
        )
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
    s: ExpertQuantState, stats: LayerStats, errors: list[str], expert_parallel: bool
) -> tuple[torch.Tensor, dict[int, str]]:
    """Turn synced statistics into the input amax the fake quant uses, and per-expert notes (keyed by
    global expert id)."""
    cfg = s.config
    obs, counts = stats.observed_input_amax, stats.tokens
    first = s.expert_offset
    flags: dict[int, str] = {}
    if cfg.dynamic_activations:  # scales computed from each row at run time: nothing to calibrate
        return s.input_amax, flags
    bad = [first + e for e in range(s.num_experts) if not torch.isfinite(obs[e])]
    if bad or not torch.isfinite(stats.layer_input_amax):
        where = f"experts {bad}" if bad else "experts on another EP rank"
        errors.append(f"{s.fqn}: non-finite (NaN/inf) activations observed for {where}")
        return s.input_amax, flags
    for e in range(s.num_experts):
        if counts[e] == 0:
            flags[first + e] = "no calibration tokens"
        elif obs[e] == 0:
            flags[first + e] = "all-zero calibration activations"
    if not bool(stats.layer_covered):
        if cfg.activation is None:
            return torch.zeros_like(s.input_amax), flags
        if cfg.uncalibrated == "weight_amax":
            fallback = stats.layer_weight_amax
            for e in range(s.num_experts):
                flags[first + e] = f"layer saw no tokens: input amax from weight amax {float(fallback):.4g}"
            return fallback.expand_as(s.input_amax).clone(), flags
        scope = " on any EP rank" if expert_parallel else ""
        errors.append(
            f"{s.fqn}: no expert received a calibration token{scope} (tokens_per_expert={counts.tolist()}); "
            "calibrate with more data or set QuantConfig(uncalibrated='weight_amax')"
        )
        return s.input_amax, flags
    layer_max = stats.layer_input_amax
    if cfg.act_scale == "shared":
        return layer_max.reshape(1).clone(), flags
    for e in flags:
        flags[e] += f": took the layer max {float(layer_max):.4g}"
    return torch.where(stats.covered(), obs, layer_max), flags


def _finalize_preconditions(state: ModelQuantState) -> list[str]:
    """Why ``finalize()`` cannot start on this rank (empty when it can)."""
    if message := _frozen(state, "finalize"):
        return [message]
    needs_data = state.config.static_activations
    if len(state) == 0:
        experts = [s for report in state.reports.values() for s in report.skipped if s.category == "expert"]
        if experts:
            return [
                f"finalize(): the compiled graphs hold {len(experts)} expert GEMMs, none of which moeq can rewrite; "
                f"the first, on {experts[0].weight_fqn}: {experts[0].reason}. moeq.explain(model) lists them all"
            ]
        if state.reports:
            return [
                f"finalize(): moeq rewrote {len(state.reports)} compiled or traced graph(s) and found no expert GEMM in them; "
                "moeq.explain(model) lists the GEMM candidates each graph had and why none was taken"
            ]
        where = (
            "inside moeq.calibrate()"
            if needs_data
            else f"(no calibrate() needed: {state.config.name} has no static activation scale)"
        )
        return [
            "finalize(): no expert GEMM has been rewritten yet; run the model compiled with backend='moeq' "
            f"(or a graph from moeq.quantize_graph) at least once {where}"
        ]
    if needs_data and state.calibration_sessions == 0:
        return [
            "finalize() called before calibrate(): run forward passes inside `with moeq.calibrate(model):` first "
            f"({len(state)} expert GEMMs are waiting for activation statistics)"
        ]
    if state.config.calib == "all_experts":
        unrouted = sorted(fqn for fqn in state.fqns() if not is_under(fqn, state.all_experts_modules))
        if unrouted:
            return [
                "finalize(): QuantConfig(calib='all_experts') ran every calibration token through every expert only "
                "at transformers' experts modules and module-list MoE blocks, and these expert weights sit elsewhere, "
                f"so their statistics came from routed tokens alone: {unrouted}. Nothing was changed; prepare the "
                "model with calib='routed' and calibrate again"
            ]
    return []


def finalize(model: Any, ep_group: Any = None, tp_group: Any = None, dp_group: Any = None) -> ModelQuantState:
    """Fix every quantization parameter and switch the model to fake quantization.

    Under expert / tensor / data parallelism pass this rank's groups (or initialize megatron-core's
    ``parallel_state``): statistics are synced with a fixed number of batched collectives, and global
    expert id = ``ep_rank * E_local + local id``. Raises (changing nothing, on every rank alike) when
    calibration is missing, a GEMM saw no tokens on any rank (unless a fallback is configured), or
    statistics are not finite. Returns the model's quant state.
    """
    state = get_state(model)
    groups = default_groups(ep_group, tp_group, dp_group)
    layout = [(fqn, tuple(s.weight_shape)) for fqn, s in sorted(state.items())]
    refusals = agree_before_sync(layout, _finalize_preconditions(state), groups)
    if refusals:
        if not groups.distributed:
            raise RuntimeError(refusals[0])
        raise RuntimeError("finalize() failed on every rank; nothing was changed:\n  " + "\n  ".join(refusals))
    ep_rank, ep_size = groups.rank("ep"), groups.size("ep")
    with torch.no_grad():
        stats: dict[str, LayerStats] = {}
        blocks = {}
        channels = state.config.weight_scale == "channel"
        for fqn, s in sorted(state.items()):
            w = state.weight(fqn)
            stats[fqn] = LayerStats(
                fqn,
                s.weight_shape,
                (channel_amax(w, s.expert_dim, s.contraction_dim) if channels else expert_amax(w, s.expert_dim)).cpu(),
                s.observed_input_amax.cpu(),
                s.tokens_per_expert.cpu(),
                channels_sharded=channels and s.tp_shard == "column",
            )
            blocks[fqn] = block_amax(w, s.contraction_dim) if state.config.weight == "nvfp4" else None
        sync_statistics(stats, groups)
        errors: list[str] = []
        updates = {}
        scale_of_one = f"1/{round(1 / float(get_format(state.config.weight).scale_from_amax(torch.ones(()))))}"
        for fqn, s in sorted(state.items()):
            s.expert_offset = ep_rank * s.num_experts
            st = stats[fqn]
            input_amax, flags = _input_amax(s, st, errors, ep_size > 1)
            amax = st.weight_amax
            zero = (amax == 0).reshape(s.num_experts, -1)
            for e in torch.nonzero(zero.any(dim=1)).flatten().tolist():
                g = s.expert_offset + e
                what = "all-zero weight" if zero.shape[1] == 1 else f"{int(zero[e].sum())} all-zero output channels"
                flags[g] = (flags[g] + "; " if g in flags else "") + f"{what}: scale set to {scale_of_one}"
                logger.warning("moeq: %s expert %d has %s", fqn, g, what)
            bad = (~torch.isfinite(amax)).reshape(s.num_experts, -1).any(dim=1)
            if bool(bad.any()):
                bad_experts = (s.expert_offset + torch.nonzero(bad).flatten()).tolist()
                errors.append(f"{fqn}: non-finite (NaN/inf) weight amax for experts {bad_experts}")
            elif not bool(torch.isfinite(st.layer_weight_amax)):
                errors.append(f"{fqn}: non-finite (NaN/inf) weight amax for experts on another EP or TP rank")
            safe_amax = torch.where(amax == 0, torch.ones_like(amax), amax)
            updates[fqn] = (safe_amax, blocks[fqn], input_amax, st, flags)
        if errors:
            raise ValueError("finalize() failed; nothing was changed:\n  " + "\n  ".join(errors))
        for fqn, (amax, block, input_amax, st, flags) in updates.items():
            s = state[fqn]
            device = s.weight_amax.device
            s.weight_amax.copy_(amax.to(device))
            if block is not None:
                s.weight_block_amax = block.to(device)
            s.input_amax.copy_(input_amax.to(device))
            s.observed_input_amax.copy_(st.observed_input_amax.to(device))
            s.tokens_per_expert.copy_(st.tokens.to(device))
            s.calibrated.copy_(s.tokens_per_expert > 0)
            s.flags = flags
    state.finalized = True
    state.synced_over_dp = groups.size("dp") > 1
    state.mode = "quantize"
    covered = sum(int(s.calibrated.sum()) for s in state.experts.values())
    total = sum(s.num_experts for s in state.experts.values())
    logger.info(
        "moeq: finalized %d expert GEMMs; %d/%d local experts saw calibration tokens", len(state), covered, total
    )
    return state


def quant_state(model: Any) -> dict[str, ExpertQuantState]:
    """``{weight FQN: ExpertQuantState}`` of a prepared model, compiled wrapper or quantized graph."""
    return get_state(model).as_dict()
