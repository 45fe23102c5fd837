"""``save_state`` / ``load_state``: quant state checkpoints that load under any EP / TP layout.

Stored with ``torch.distributed.checkpoint`` in global form, so the saving layout does not matter:

* ``moeq/meta``: format version, the QuantConfig, and per expert weight FQN its global weight shape,
  expert / contraction dims and TP sharding;
* ``moeq/{fqn}/expert/{g}``: one float64 record per **global** expert id ``g`` (see ``RECORD``); float64
  holds the fp32 amaxes and the int64 token counts exactly. TP and DP replicas write identical records,
  which DCP de-duplicates;
* ``moeq/{fqn}/input_amax``: the shared input amax (``act_scale="shared"``);
* ``moeq/{fqn}/channel_amax/{g}``: FP8 channel-wise weight amax of global expert ``g`` over every output channel
  in the unsharded weight's order (a column-parallel weight's TP shards joined, a fused gate/up weight's gate and
  up slices each in place; the record holds its max);
* ``moeq/{fqn}/flags/{first}``: explain() notes of the experts starting at global id ``first``.

NVFP4 per-block amaxes are not stored: they are a function of the weights (the kernels compute block
scales from the live weight), so ``load_state`` recomputes them from this rank's shard.

``load_state`` checks the whole checkpoint against the model first (missing, extra and differing entries,
another config) and raises one error listing every problem, on every rank alike; it reads into fresh
tensors and only then copies into the quant state, so a failed load changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from moeq.config import QuantConfig
from moeq.formats import block_amax
from moeq.io.hf_layout import expert_layout, first_half, second_half
from moeq.runtime.collectives import ProcessGroups, all_gather_objects, default_groups
from moeq.state import ExpertQuantState, ModelQuantState, get_state, listed_members, stacked_expert_weights

__all__ = ["save_state", "load_state", "CheckpointError"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
RECORD = ("weight_amax", "observed_input_amax", "tokens_per_expert", "calibrated", "input_amax")


class CheckpointError(ValueError):
    """The checkpoint does not fit the model; nothing was loaded."""


def _expert_key(fqn: str, g: int) -> str:
    return f"moeq/{fqn}/expert/{g}"


def _channel_key(fqn: str, g: int) -> str:
    return f"moeq/{fqn}/channel_amax/{g}"


def _channel_split(s: ExpertQuantState, groups: ProcessGroups) -> tuple[int, int]:
    """(TP size, TP rank) over which a channel-wise amax is split: a column-parallel weight's channels; else (1, 0)."""
    if s.tp_shard == "column" and groups.size("tp") > 1:
        return groups.size("tp"), groups.rank("tp")
    return 1, 0


def _gated_module_list(state: ModelQuantState, s: ExpertQuantState) -> bool:
    """Whether ``s`` is a per-expert module list of Megatron GLU ``linear_fc1`` weights (gate and up rows stacked in
    each expert's weight: ``[gate; up]``, each split over the TP ranks)."""
    members = listed_members(s.fqn, s.num_experts)
    if not members or not members[0].endswith("linear_fc1.weight"):
        return False
    try:
        mlp = state._root.get_submodule(members[0].removesuffix(".linear_fc1.weight"))
    except AttributeError:
        return False
    return bool(getattr(getattr(mlp, "config", None), "gated_linear_unit", False))


def _part_rows(state: ModelQuantState, s: ExpertQuantState) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The output-row selections of the per-expert linears a stacked weight holds (a fused gate/up weight: gate's
    rows and up's, halves or interleaved; else all rows). Tensor parallelism splits each of them over the ranks."""
    if _gated_module_list(state, s):
        return [first_half, second_half]
    try:
        return [part.rows for part in expert_layout(state._root, s.fqn, s.expert_dim, s.contraction_dim).parts]
    except (ValueError, AttributeError, KeyError):
        return [lambda t: t]


def _tp_positions(parts: list[Any], n_global: int, size: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(global, local) channel positions of TP rank ``rank``'s channels, in matching order: each part's rows are
    split in ``size`` contiguous chunks, chunk ``rank`` on that rank (as Megatron and transformers shard a fused
    gate/up weight: each rank holds a slice of gate and the same slice of up)."""
    local_all = torch.arange(n_global // size)
    glob, loc = [], []
    for rows in parts:
        glob.append(rows(torch.arange(n_global)).chunk(size)[rank])
        loc.append(rows(local_all))
    return torch.cat(glob), torch.cat(loc)


def _global_channel_amax(state: ModelQuantState, s: ExpertQuantState, groups: ProcessGroups) -> torch.Tensor:
    """``[E_local, N_global]``: this rank's experts' channel amax with every TP rank's channels (all-gathered, put in
    the unsharded weight's channel order)."""
    amax = s.weight_amax.detach().float().cpu()
    size, _ = _channel_split(s, groups)
    if size == 1:
        return amax
    out = amax.new_zeros(amax.shape[0], amax.shape[1] * size)
    parts = _part_rows(state, s)
    for rank, local in enumerate(all_gather_objects(amax, groups.group("tp"))):
        glob, loc = _tp_positions(parts, out.shape[1], size, rank)
        out[:, glob] = local[:, loc]
    return out


def _local_channel_amax(
    state: ModelQuantState, s: ExpertQuantState, groups: ProcessGroups, glob_amax: torch.Tensor
) -> torch.Tensor:
    """This TP rank's channels ``[E_local, N_local]`` of the global channel amax ``[E_local, N_global]``."""
    size, rank = _channel_split(s, groups)
    if size == 1:
        return glob_amax
    out = glob_amax.new_zeros(glob_amax.shape[0], glob_amax.shape[1] // size)
    glob, loc = _tp_positions(_part_rows(state, s), glob_amax.shape[1], size, rank)
    out[:, loc] = glob_amax[:, glob]
    return out


def _layer_meta(s: ExpertQuantState, groups: ProcessGroups) -> dict[str, Any]:
    return {
        "global_weight_shape": list(s.global_weight_shape(groups.size("ep"), groups.size("tp"))),
        "expert_dim": s.expert_dim,
        "contraction_dim": s.contraction_dim,
        "tp_shard": s.tp_shard,
        "act_scale": s.config.act_scale,
    }


def _config_dict(config: QuantConfig) -> dict[str, Any]:
    out = dataclasses.asdict(config)
    out["exclude"] = list(out.get("exclude", ()))
    return out


#: layer metadata that says how the saving ranks held the weight, not what it is: the records are per global expert
#: and channel, so a checkpoint saved from TP shards loads into a model prepared without ``tp_sharding`` and back
_SAVING_LAYOUT_ONLY = ("tp_shard",)

#: QuantConfig fields that say how statistics were gathered, not what the quantized model computes: a checkpoint
#: loads into a model prepared with other values of them
_CALIBRATION_ONLY = ("calib",)


def save_state(
    model: Any, path: str | os.PathLike, ep_group: Any = None, tp_group: Any = None, process_group: Any = None
) -> None:
    """Save the model's quant state to the directory ``path``. Every rank of ``process_group`` (default:
    the whole job) calls it; ``ep_group`` / ``tp_group`` as given to ``finalize``."""
    state = get_state(model)
    groups = default_groups(ep_group, tp_group)
    ep_rank = groups.rank("ep")
    meta = {
        "version": FORMAT_VERSION,
        "config": _config_dict(state.config),
        "finalized": state.finalized,
        "calibration_sessions": state.calibration_sessions,
        "layers": {},
    }
    sd: dict[str, Any] = {}
    for fqn, s in sorted(state.items()):
        first = ep_rank * s.num_experts
        meta["layers"][fqn] = _layer_meta(s, groups)
        per_expert_input = s.input_amax.numel() == s.num_experts and s.config.act_scale == "per_expert"
        channels = _global_channel_amax(state, s, groups) if s.weight_amax.dim() > 1 else None
        for e in range(s.num_experts):
            if channels is not None:
                sd[_channel_key(fqn, first + e)] = channels[e].clone()
            record = torch.tensor(
                [
                    float(s.weight_amax[e].max()),
                    float(s.observed_input_amax[e]),
                    float(s.tokens_per_expert[e]),
                    float(s.calibrated[e]),
                    float(s.input_amax[e]) if per_expert_input else float("nan"),
                ],
                dtype=torch.float64,
            )
            sd[_expert_key(fqn, first + e)] = record
        if s.config.act_scale == "shared":
            sd[f"moeq/{fqn}/input_amax"] = s.input_amax.detach().float().cpu().clone()
        sd[f"moeq/{fqn}/flags/{first}"] = json.dumps({str(g): note for g, note in s.flags.items()})
    sd["moeq/meta"] = json.dumps(meta)  # strings, not dicts: DCP would flatten a dict into many entries
    dcp.save(sd, checkpoint_id=os.fspath(path), process_group=process_group)
    logger.info("moeq: saved quant state of %d expert GEMMs to %s", len(state), path)


def _expected_layers(state: ModelQuantState, groups: ProcessGroups) -> dict[str, dict[str, Any]]:
    """FQN -> layer meta this model expects, for the states that exist."""
    return {fqn: _layer_meta(s, groups) for fqn, s in sorted(state.items())}


def _collective_errors(errors: list[str], group: Any) -> list[str]:
    """Every rank's errors, on every rank (so all raise together instead of some entering the load)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return errors
    return [f"[rank {rank}] {e}" for rank, errs in enumerate(all_gather_objects(errors, group)) for e in errs]


def _ensure_states(state: ModelQuantState, layers: dict[str, dict[str, Any]], created: list[str]) -> list[str]:
    """Create the quant state of every checkpointed FQN the model has but has not traced yet (listed in
    ``created``, so a failed load can remove them again)."""
    errors = []
    for fqn, meta in layers.items():
        if fqn in state:
            continue
        try:
            w = state.weight(fqn)
        except AttributeError:
            continue  # reported as an extra entry
        if not isinstance(w, torch.Tensor) or w.dim() != len(meta["global_weight_shape"]):
            errors.append(f"{fqn}: checkpoint has a {len(meta['global_weight_shape'])}-D expert weight; model has {w}")
            continue
        state.get_or_create(fqn, tuple(w.shape), meta["expert_dim"], meta["contraction_dim"], w.device)
        created.append(fqn)
    return errors


def load_state(
    model: Any, path: str | os.PathLike, ep_group: Any = None, tp_group: Any = None, process_group: Any = None
) -> ModelQuantState:
    """Load a checkpoint written by :func:`save_state` under any EP / TP layout into ``model`` (every rank
    of ``process_group``, default the whole job, calls it).

    Raises :class:`CheckpointError` listing every missing, extra or differing entry (and a config that
    differs from the model's), changing nothing. Returns the quant state, finalized if the saved one was.
    """
    state = get_state(model)
    groups = default_groups(ep_group, tp_group)
    path = os.fspath(path)
    errors: list[str] = []
    created: list[str] = []
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except Exception as err:  # any unreadable checkpoint
        raise CheckpointError(f"cannot read a moeq quant-state checkpoint at {path!r}: {err}") from err
    entries = metadata.state_dict_metadata
    saved: dict[str, Any] = {}
    if "moeq/meta" not in entries:
        errors.append(f"{path!r} is not a moeq quant-state checkpoint (no 'moeq/meta' entry)")
    else:
        holder = {"moeq/meta": ""}
        try:
            dcp.load(holder, checkpoint_id=path, no_dist=True)
            saved = json.loads(holder["moeq/meta"])
        except (Exception, CheckpointException) as err:  # a truncated or corrupt data file
            raise CheckpointError(f"reading {path!r} failed; nothing was loaded: {err}") from err
        if saved.get("version") != FORMAT_VERSION:
            errors.append(f"checkpoint format version {saved.get('version')} != supported {FORMAT_VERSION}")
        mine = _config_dict(state.config)
        theirs = {"weight_scale": "expert", **saved.get("config", {})}  # checkpoints from before weight_scale
        for key in _CALIBRATION_ONLY:
            mine.pop(key, None)
            theirs.pop(key, None)
        if theirs != mine:
            diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
            errors.append(f"checkpoint was saved with another QuantConfig: (saved, model) = {diff}")
        errors += _ensure_states(state, saved.get("layers", {}), created)
    expected = _expected_layers(state, groups)
    saved_layers = saved.get("layers", {})
    if saved:
        untraced = {n for n in stacked_expert_weights(state._root) if not state.excluded(n)}
        missing = sorted((set(expected) | untraced) - set(saved_layers))
        extra = sorted(set(saved_layers) - set(expected))
        if missing:
            errors.append(f"missing expert weights (in the model, not in the checkpoint): {missing}")
        if extra:
            errors.append(f"extra expert weights (in the checkpoint, not in the model): {extra}")
        for fqn in sorted(set(expected) & set(saved_layers)):
            diff = {
                k: (saved_layers[fqn].get(k), v)
                for k, v in expected[fqn].items()
                if k not in _SAVING_LAYOUT_ONLY and saved_layers[fqn].get(k) != v
            }
            if diff:
                errors.append(f"{fqn}: entry differs from the model, (checkpoint, model) = {diff}")
        tensor_keys = {k for k, v in entries.items() if isinstance(v, TensorStorageMetadata)}
        want: dict[str, list[int]] = {}
        for fqn, meta in expected.items():
            num = meta["global_weight_shape"][meta["expert_dim"]]
            want.update({_expert_key(fqn, g): [len(RECORD)] for g in range(num)})
            if meta["act_scale"] == "shared":
                want[f"moeq/{fqn}/input_amax"] = [1]
            if state[fqn].weight_amax.dim() > 1:
                channels = state[fqn].weight_amax.shape[1] * _channel_split(state[fqn], groups)[0]
                want.update({_channel_key(fqn, g): [channels] for g in range(num)})
        if not errors:
            missing_keys, extra_keys = sorted(set(want) - tensor_keys), sorted(tensor_keys - set(want))
            if missing_keys:
                errors.append(f"{len(missing_keys)} missing entries: {missing_keys[:8]}")
            if extra_keys:
                errors.append(f"{len(extra_keys)} extra entries: {extra_keys[:8]}")
            for key in sorted(set(want) & tensor_keys):
                size = list(entries[key].size)
                if size != want[key]:
                    errors.append(f"{key}: mis-shaped entry {size}, expected {want[key]}")
    errors = _collective_errors(errors, process_group)
    if errors:
        _forget(state, created)
        raise CheckpointError(f"cannot load quant state from {path!r}; nothing was loaded:\n  " + "\n  ".join(errors))

    ep_rank = groups.rank("ep")
    sd: dict[str, Any] = {}
    for fqn, s in sorted(state.items()):
        first = ep_rank * s.num_experts
        for e in range(s.num_experts):
            sd[_expert_key(fqn, first + e)] = torch.empty(len(RECORD), dtype=torch.float64)
            if s.weight_amax.dim() > 1:
                sd[_channel_key(fqn, first + e)] = torch.empty(s.weight_amax.shape[1] * _channel_split(s, groups)[0])
        if s.config.act_scale == "shared":
            sd[f"moeq/{fqn}/input_amax"] = torch.empty(1)
        for key in entries:
            if key.startswith(f"moeq/{fqn}/flags/"):
                sd[key] = ""
    try:
        dcp.load(sd, checkpoint_id=path, process_group=process_group)
    except (Exception, CheckpointException) as err:  # DCP's error is a BaseException
        _forget(state, created)
        raise CheckpointError(f"reading {path!r} failed; nothing was loaded: {err}") from err
    _commit(state, sd, groups)
    state.finalized = bool(saved.get("finalized"))
    state.calibration_sessions = int(saved.get("calibration_sessions", 0))
    state.mode = "quantize" if state.finalized else "off"
    logger.info("moeq: loaded quant state of %d expert GEMMs from %s", len(state), path)
    return state


def _forget(state: ModelQuantState, fqns: list[str]) -> None:
    for fqn in fqns:
        state.forget(fqn)


def _commit(state: ModelQuantState, sd: dict[str, Any], groups: ProcessGroups) -> None:
    with torch.no_grad():
        for fqn, s in sorted(state.items()):
            first = groups.rank("ep") * s.num_experts
            records = torch.stack([sd[_expert_key(fqn, first + e)] for e in range(s.num_experts)])
            device = s.weight_amax.device
            s.expert_offset = first
            if s.weight_amax.dim() > 1:  # this rank's channels of each expert's global channel amax
                glob_amax = torch.stack([sd[_channel_key(fqn, first + e)] for e in range(s.num_experts)])
                s.weight_amax.copy_(_local_channel_amax(state, s, groups, glob_amax).to(device))
            else:
                s.weight_amax.copy_(records[:, 0].float().to(device))
            s.observed_input_amax.copy_(records[:, 1].float().to(device))
            s.tokens_per_expert.copy_(records[:, 2].long().to(device))
            s.calibrated.copy_(records[:, 3].bool().to(device))
            if s.config.act_scale == "shared":
                s.input_amax.copy_(sd[f"moeq/{fqn}/input_amax"].to(device))
            elif s.config.act_scale == "per_expert":
                s.input_amax.copy_(records[:, 4].float().to(device))
            flags: dict[int, str] = {}
            for key, value in sd.items():
                if key.startswith(f"moeq/{fqn}/flags/"):
                    notes = json.loads(value).items()
                    flags.update({int(g): note for g, note in notes if first <= int(g) < first + s.num_experts})
            s.flags = flags
            if s.config.weight == "nvfp4":
                s.weight_block_amax = block_amax(state.weight(fqn), s.contraction_dim).to(device)
