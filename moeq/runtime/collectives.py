"""Collective sync of calibration statistics over the EP / TP / DP process groups.

``finalize()`` gathers each expert GEMM's local statistics into a :class:`LayerStats` and runs the sync
hooks in sorted-name order; every hook walks the layers in sorted-FQN order and packs them into **one
flat buffer per collective**, so a finalize issues O(number of groups) collectives however many layers
and experts the model has, and every rank issues the same collectives in the same order (a rank whose
experts saw no token contributes neutral values: no deadlock).

Built-in hooks (semantics of DESIGN.md "Collective hooks"):

* ``00-layout``: every group agrees on the expert GEMMs and their local shapes (one all_gather_object per
  group), so a mismatch is a clear error instead of a hang or a silently wrong reduction.
* ``10-tp``: MAX over TP of per-expert weight amax (column- or row-parallel shards hold parts of the
  same expert) and of per-expert input amax (a row-parallel GEMM's input is sharded along K).
* ``20-dp``: MAX over DP of per-expert input amax, SUM over DP of per-expert token counts.
* ``30-ep``: MAX over EP of the layer-level values (largest covered input amax, largest weight amax,
  "some expert saw a token"): experts on different EP ranks are different experts, so per-expert values
  are never reduced over EP; only the layer-wide quantities a shared scale or a fallback needs are.

NaN/inf statistics are mapped to +inf before reducing (MAX implementations disagree on NaN), so every
rank sees the same non-finite value and raises the same error.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "LayerStats",
    "all_gather_objects",
    "ProcessGroups",
    "collective_log",
    "default_groups",
    "register_sync_hook",
    "registered_sync_hooks",
    "sync_statistics",
]

logger = logging.getLogger(__name__)

ROLES = ("ep", "tp", "dp")


@dataclass(frozen=True)
class ProcessGroups:
    """The expert-parallel, (expert-)tensor-parallel and (expert-)data-parallel groups of this rank."""

    ep: Any = None
    tp: Any = None
    dp: Any = None

    def group(self, role: str) -> Any:
        return getattr(self, role)

    def size(self, role: str) -> int:
        group = self.group(role)
        if group is None or not dist.is_initialized():
            return 1
        return dist.get_world_size(group)

    def rank(self, role: str) -> int:
        group = self.group(role)
        if group is None or not dist.is_initialized():
            return 0
        return dist.get_rank(group)

    def sizes(self) -> dict[str, int]:
        return {role: self.size(role) for role in ROLES}

    @property
    def distributed(self) -> bool:
        return any(size > 1 for size in self.sizes().values())


def default_groups(ep: Any = None, tp: Any = None, dp: Any = None) -> ProcessGroups:
    """Groups given as arguments; when none is given and megatron-core's ``parallel_state`` is
    initialized, its expert-model-parallel, expert-tensor-parallel and expert-data-parallel groups."""
    if ep is not None or tp is not None or dp is not None:
        return ProcessGroups(ep, tp, dp)
    parallel_state = sys.modules.get("megatron.core.parallel_state")  # initialized only if imported
    if parallel_state is None or not parallel_state.model_parallel_is_initialized():
        return ProcessGroups()
    return ProcessGroups(
        ep=parallel_state.get_expert_model_parallel_group(),
        tp=parallel_state.get_expert_tensor_parallel_group(),
        dp=parallel_state.get_expert_data_parallel_group(),
    )


@dataclass
class LayerStats:
    """Statistics of one expert GEMM on this rank (``E_local`` experts), synced in place by the hooks."""

    fqn: str
    weight_shape: tuple[int, ...]
    weight_amax: Tensor  # [E_local] fp32, or [E_local, N_local] with channel-wise scales
    observed_input_amax: Tensor  # [E_local] fp32
    tokens: Tensor  # [E_local] int64
    #: channel-wise weight amax of a column-parallel weight: each TP rank holds its own channels (not reduced)
    channels_sharded: bool = False
    #: layer-wide values over every EP rank (set by the EP hook; local values in one process)
    layer_input_amax: Tensor = field(default_factory=lambda: torch.zeros(()))
    layer_weight_amax: Tensor = field(default_factory=lambda: torch.zeros(()))
    layer_covered: Tensor = field(default_factory=lambda: torch.zeros(()))

    def __post_init__(self) -> None:
        self.weight_amax = _finite_or_inf(self.weight_amax.float())
        self.observed_input_amax = _finite_or_inf(self.observed_input_amax.float())

    def covered(self) -> Tensor:
        """Experts that saw at least one token with a non-zero activation."""
        return (self.tokens > 0) & (self.observed_input_amax > 0)

    def update_layer_values(self) -> None:
        covered = self.covered()
        self.layer_input_amax = self.observed_input_amax[covered].max() if bool(covered.any()) else torch.zeros(())
        self.layer_weight_amax = self.weight_amax.max() if self.weight_amax.numel() else torch.zeros(())
        self.layer_covered = covered.any().float()


def _finite_or_inf(t: Tensor) -> Tensor:
    return torch.where(torch.isfinite(t), t, torch.full_like(t, float("inf")))


#: counts of the collectives issued by the last ``sync_statistics`` call, by (role, kind)
collective_log: Counter = Counter()


def _collective_device(group: Any) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo and others take the CPU buffers as they are."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(buffer: Tensor, op: Any, groups: ProcessGroups, role: str) -> None:
    if groups.size(role) == 1 or buffer.numel() == 0:
        return
    group = groups.group(role)
    device = _collective_device(group)
    work = buffer if buffer.device == device else buffer.to(device)
    dist.all_reduce(work, op=op, group=group)
    if work is not buffer:
        buffer.copy_(work)
    collective_log[(role, "all_reduce")] += 1


def all_gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's picklable ``obj`` in rank order, on every rank of ``group`` (``[obj]`` in one process)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def check_layout(stats: dict[str, LayerStats], groups: ProcessGroups) -> None:
    """Every rank of every group must hold the same expert GEMMs with the same local shapes."""
    mine = [(fqn, tuple(s.weight_shape)) for fqn, s in sorted(stats.items())]
    seen: set[int] = set()
    for role in ROLES:
        group = groups.group(role)
        if groups.size(role) == 1 or id(group) in seen:
            continue
        seen.add(id(group))
        gathered = all_gather_objects(mine, group)
        collective_log[(role, "all_gather_object")] += 1
        for peer, theirs in enumerate(gathered):
            if theirs != mine:
                only_mine = sorted(set(mine) - set(theirs))[:4]
                only_theirs = sorted(set(theirs) - set(mine))[:4]
                raise RuntimeError(
                    f"finalize(): ranks of the {role.upper()} group hold different expert GEMMs: rank "
                    f"{groups.rank(role)} has {only_mine} that {role} rank {peer} lacks, which has {only_theirs}. "
                    "Run the same model (and at least one calibration forward) on every rank before finalize()"
                )


def _tp_reduced(s: LayerStats) -> list[Tensor]:
    """The statistics of one layer that TP ranks reduce with MAX: the weight amax (each shard holds part of every
    expert's weight; not channel-wise amaxes of a column-parallel weight, whose channels are each rank's own) and
    the observed input amax."""
    return [s.observed_input_amax] if s.channels_sharded else [s.weight_amax, s.observed_input_amax]


def sync_tp(stats: dict[str, LayerStats], groups: ProcessGroups) -> None:
    layers = [stats[k] for k in sorted(stats)]
    if not layers:
        return
    parts = [t for s in layers for t in _tp_reduced(s)]
    flat = torch.cat([t.reshape(-1) for t in parts])
    _all_reduce(flat, dist.ReduceOp.MAX, groups, "tp")
    reduced = iter(c.reshape(t.shape).clone() for c, t in zip(flat.split([t.numel() for t in parts]), parts))
    for s in layers:
        if not s.channels_sharded:
            s.weight_amax = next(reduced)
        s.observed_input_amax = next(reduced)


def sync_dp(stats: dict[str, LayerStats], groups: ProcessGroups) -> None:
    layers = [stats[k] for k in sorted(stats)]
    if not layers:
        return
    amax = torch.cat([s.observed_input_amax for s in layers])
    tokens = torch.cat([s.tokens for s in layers])
    _all_reduce(amax, dist.ReduceOp.MAX, groups, "dp")
    _all_reduce(tokens, dist.ReduceOp.SUM, groups, "dp")
    sizes = [s.tokens.numel() for s in layers]
    for s, a, t in zip(layers, amax.split(sizes), tokens.split(sizes)):
        s.observed_input_amax, s.tokens = a.clone(), t.clone()


def sync_ep(stats: dict[str, LayerStats], groups: ProcessGroups) -> None:
    layers = [stats[k] for k in sorted(stats)]
    for s in layers:
        s.update_layer_values()
    if not layers:
        return
    flat = torch.stack([torch.stack([s.layer_input_amax, s.layer_weight_amax, s.layer_covered]) for s in layers])
    _all_reduce(flat, dist.ReduceOp.MAX, groups, "ep")
    for s, (inp, wt, cov) in zip(layers, flat):
        s.layer_input_amax, s.layer_weight_amax, s.layer_covered = inp.clone(), wt.clone(), cov.clone()


SyncHook = Callable[[dict[str, LayerStats], ProcessGroups], None]
_HOOKS: dict[str, SyncHook] = {"00-layout": check_layout, "10-tp": sync_tp, "20-dp": sync_dp, "30-ep": sync_ep}


def register_sync_hook(name: str, hook: SyncHook) -> None:
    """Register ``hook(stats, groups)`` to run inside ``finalize()``; hooks run sorted by ``name``
    (built-ins: ``00-layout``, ``10-tp``, ``20-dp``, ``30-ep``)."""
    _HOOKS[name] = hook


def registered_sync_hooks() -> list[str]:
    return sorted(_HOOKS)


def sync_statistics(stats: dict[str, LayerStats], groups: ProcessGroups) -> None:
    """Run every hook in a fixed, rank-independent order; afterwards ``stats`` hold global values."""
    collective_log.clear()
    with torch.no_grad():
        for name in sorted(_HOOKS):
            _HOOKS[name](stats, groups)
    if groups.distributed:
        logger.info("moeq: synced %d expert GEMMs with %s", len(stats), dict(collective_log))
