"""Worker of the EP=2 gloo export test (tests/test_export.py): one rank of an expert-parallel model.

Kept apart from the test module so that spawned ranks import only moeq and transformers. Each rank builds
the global tiny model, keeps its slice of every stacked expert weight (global id = rank * E_local + local
id), installs the matching slice of the single-process finalized quant state and exports with ``ep_group``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

import moeq
from moeq.integrations.hf import tiny_model
from moeq.state import get_state

_PRESETS = {"nvfp4": moeq.NVFP4, "fp8": moeq.FP8}
_PER_EXPERT = ("weight_amax", "weight_block_amax", "observed_input_amax", "tokens_per_expert", "calibrated")


def run_rank(
    rank: int, world: int, tmp: str, family: str, fmt: str, state_file: str, out_dir: str, overrides: dict
) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    try:
        saved = torch.load(state_file, weights_only=False)
        model = tiny_model(family, torch.bfloat16, seed=0, **overrides)
        for name, param in list(model.named_parameters()):
            if ".experts." not in name:
                continue
            local = param.shape[0] // world
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            setattr(owner, leaf, nn.Parameter(param.detach()[rank * local : (rank + 1) * local].clone(), False))
        _install_slice_and_export(moeq.prepare(model, _PRESETS[fmt]), saved, rank, out_dir)
    finally:
        dist.destroy_process_group()


def _install_slice_and_export(model: nn.Module, saved: dict, rank: int, out_dir: str) -> None:
    """Give this rank's model its experts' slice of the single-process finalized state (local experts: the
    model's weight, stacked or a module list's members, along the expert dim) and export with ``ep_group``."""
    state = get_state(model)
    for fqn, entry in saved.items():
        shape = tuple(state.weight(fqn).shape)
        local = shape[entry["expert_dim"]]
        sl = slice(rank * local, (rank + 1) * local)
        s = state.get_or_create(fqn, shape, entry["expert_dim"], entry["contraction_dim"])
        for buf in _PER_EXPERT:
            setattr(s, buf, entry[buf][sl].clone())
        s.input_amax = entry["input_amax"].clone() if entry["input_amax"].numel() == 1 else entry["input_amax"][sl]
    state.finalized = True
    state.mode = "quantize"
    moeq.export_hf(model, out_dir, "modelopt", ep_group=dist.group.WORLD, max_shard_size="20KB")


def run_listed_rank(rank: int, world: int, tmp: str, fmt: str, state_file: str, out_dir: str) -> None:
    """One EP rank of the module-list model (tests/listed_experts.py): experts ``[rank * E_local, ...)`` renumbered
    from 0, the matching slice of the single-process finalized state, exported with ``ep_group``."""
    from listed_experts import listed_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    try:
        saved = torch.load(state_file, weights_only=False)
        local = len(listed_model().model.layers[0].mlp.experts) // world
        model = listed_model(keep=slice(rank * local, (rank + 1) * local))
        _install_slice_and_export(moeq.prepare(model, _PRESETS[fmt]), saved, rank, out_dir)
    finally:
        dist.destroy_process_group()
