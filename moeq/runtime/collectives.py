"""Collective sync of calibration statistics over the EP / TP / DP process groups.

``finalize()`` gathers each expert GEMM's local statistics into a :class:`LayerStats` and runs the sync
hooks in sorted-name order; every hook walks the layers in sorted-FQN order and packs them into **one
flat buffer per collective**, so a finalize issues O(number of groups) collectives however many layers
and experts the model has, and every rank issues the same collectives in the same order (a rank whose
experts saw no token contributes neutral values: no deadlock).

Before the hooks, :func:`agree_before_sync` (one all_gather_object per group) checks that every rank holds the
same expert GEMMs with the same local shapes and passes every rank's precondition errors (finalize before
calibrate, nothing rewritten, ...) to every rank: a rank that cannot finalize makes all ranks raise the same
error, instead of raising alone while its peers wait in a collective it never joins.

Built-in hooks (semantics of DESIGN.md "Collective hooks"):

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
    "agree_before_sync",
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
    #: a column-parallel weight's largest channel amax over its TP ranks (set by the TP hook)
    sharded_weight_max: Tensor = field(default_factory=lambda: torch.zeros(()))

    def __post_init__(self) -> None:
        self.weight_amax = _finite_or_inf(self.weight_amax.float())
        self.observed_input_amax = _finite_or_inf(self.observed_input_amax.float())

    def covered(self) -> Tensor:
        """Experts that saw at least one token with a non-zero activation."""
        return (self.tokens > 0) & (self.observed_input_amax > 0)

    def update_layer_values(self) -> None:
        """This rank's layer-wide values from its experts: the largest covered input amax, the weight amax, and
        whether any expert saw a token (what ``sync_ep`` reduces)."""
        covered = self.covered()
        self.layer_input_amax = self.observed_input_amax[covered].max() if bool(covered.any()) else torch.zeros(())
        self.layer_weight_amax = torch.maximum(_max_or_zero(self.weight_amax), self.sharded_weight_max)
        self.layer_covered = covered.any().float()


def _max_or_zero(t: Tensor) -> Tensor:
    """The largest entry of ``t`` (0-d), 0 for an empty ``t`` (a rank with no local experts)."""
    return t.max() if t.numel() else torch.zeros(())


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


def agree_before_sync(layout: list[tuple[str, tuple[int, ...]]], errors: list[str], groups: ProcessGroups) -> list[str]:
    """Every rank's errors, the same sorted list on each rank (``errors`` as they are in one process).

    ``layout`` is this rank's ``(weight FQN, local shape)`` per expert GEMM. One all_gather_object per group, in
    role order, carries the errors and the distinct layouts each rank has heard of; the EP, TP and DP groups form
    a grid, so after the three hops every rank has heard of every rank. Ranks that hold different expert GEMMs
    become one more error, phrased alike everywhere. Clears :data:`collective_log` (a finalize's first collective).
    """
    collective_log.clear()
    if not groups.distributed:
        return list(errors)
    me = dist.get_rank()
    heard = {f"rank {me}: {e}" for e in errors}
    layouts = {tuple(layout): me}
    seen: set[int] = set()
    for role in ROLES:
        group = groups.group(role)
        if groups.size(role) == 1 or id(group) in seen:
            continue
        seen.add(id(group))
        for their_errors, their_layouts in all_gather_objects((heard, layouts), group):
            heard |= their_errors
            for theirs, rank in their_layouts.items():
                layouts[theirs] = min(rank, layouts.get(theirs, rank))
        collective_log[(role, "all_gather_object")] += 1
    if len(layouts) > 1 and not heard:
        (first, a), (second, b) = sorted(layouts.items(), key=lambda item: item[1])[:2]
        heard.add(
            f"ranks hold different expert GEMMs: rank {a} has {sorted(set(first) - set(second))[:4]} that rank {b} "
            f"lacks, which has {sorted(set(second) - set(first))[:4]}. Run the same model (and at least one "
            "calibration forward) on every rank before finalize()"
        )
    return sorted(heard)


def _tp_reduced(s: LayerStats) -> list[Tensor]:
    """The statistics of one layer that TP ranks reduce with MAX: the weight amax (each shard holds part of every
    expert's weight) and the observed input amax. A column-parallel weight's channel-wise amaxes are each rank's
    own; only their largest is reduced, so that the layer-wide weight amax (a fallback input amax, the check for
    NaN/inf) is the same on every TP rank."""
    if s.channels_sharded:
        return [_max_or_zero(s.weight_amax).reshape(1), s.observed_input_amax]
    return [s.weight_amax, s.observed_input_amax]


def sync_tp(stats: dict[str, LayerStats], groups: ProcessGroups) -> None:
    """Built-in hook ``10-tp``: MAX-reduce over the TP group what each shard holds part of (:func:`_tp_reduced`), in
    one flat collective."""
    layers = [stats[k] for k in sorted(stats)]
    if not layers:
        return
    parts = [t for s in layers for t in _tp_reduced(s)]
    flat = torch.cat([t.reshape(-1) for t in parts])
    _all_reduce(flat, dist.ReduceOp.MAX, groups, "tp")
    reduced = iter(c.reshape(t.shape).clone() for c, t in zip(flat.split([t.numel() for t in parts]), parts))
    for s in layers:
        if s.channels_sharded:
            s.sharded_weight_max = next(reduced).reshape(())
        else:
            s.weight_amax = next(reduced)
        s.observed_input_amax = next(reduced)


def sync_dp(stats: dict[str, LayerStats], groups: ProcessGroups) -> None:
    """Built-in hook ``20-dp``: replicas saw different tokens, so MAX-reduce the observed input amax and SUM the
    per-expert token counts over the DP group (one collective each)."""
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
    """Built-in hook ``30-ep``: each EP rank owns other experts, so only the layer-wide values (input and weight
    amax, whether any expert was covered), which fallbacks and shared scales read, are MAX-reduced over the group."""
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
_HOOKS: dict[str, SyncHook] = {"10-tp": sync_tp, "20-dp": sync_dp, "30-ep": sync_ep}


def register_sync_hook(name: str, hook: SyncHook) -> None:
    """Register ``hook(stats, groups)`` to run inside ``finalize()``; hooks run sorted by ``name``
    (built-ins: ``10-tp``, ``20-dp``, ``30-ep``; they run after :func:`agree_before_sync`)."""
    _HOOKS[name] = hook


def registered_sync_hooks() -> list[str]:
    """The names of the hooks ``finalize()`` runs, in the order it runs them."""
    return sorted(_HOOKS)


def sync_statistics(stats: dict[str, LayerStats], groups: ProcessGroups) -> None:
    """Run every hook in a fixed, rank-independent order; afterwards ``stats`` hold global values."""
    with torch.no_grad():
        for name in sorted(_HOOKS):
            _HOOKS[name](stats, groups)
    if groups.distributed:
        logger.info("moeq: synced %d expert GEMMs with %s", len(stats), dict(collective_log))
