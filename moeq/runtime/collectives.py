"""Collective sync hooks run by ``finalize()`` over the EP / TP / DP process groups.

Hooks are registered by name and run in sorted-name order, so every rank issues the same collectives
in the same order. In a single process (no group given, or groups of size 1) nothing is communicated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

__all__ = ["ProcessGroups", "register_sync_hook", "registered_sync_hooks", "sync_quant_state"]


@dataclass(frozen=True)
class ProcessGroups:
    ep: Any = None
    tp: Any = None
    dp: Any = None

    def sizes(self) -> dict[str, int]:
        out = {}
        for name in ("ep", "tp", "dp"):
            group = getattr(self, name)
            out[name] = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
        return out

    @property
    def distributed(self) -> bool:
        return any(size > 1 for size in self.sizes().values())


SyncHook = Callable[[Any, ProcessGroups], None]
_HOOKS: dict[str, SyncHook] = {}


def register_sync_hook(name: str, hook: SyncHook) -> None:
    """Register ``hook(model_state, groups)`` to run inside ``finalize()`` (sorted by ``name``)."""
    _HOOKS[name] = hook


def registered_sync_hooks() -> list[str]:
    return sorted(_HOOKS)


def sync_quant_state(state: Any, groups: ProcessGroups) -> None:
    """Run every registered hook in a fixed, rank-independent order."""
    if not groups.distributed:
        return
    if not _HOOKS:
        raise RuntimeError(
            f"finalize() was given process groups of sizes {groups.sizes()} but no collective sync hook is "
            "registered; refusing to finalize rank-local statistics as if they were global"
        )
    for name in sorted(_HOOKS):
        _HOOKS[name](state, groups)
