"""Hugging Face per-expert layout: how a stacked expert weight maps to the per-expert tensors of a checkpoint.

transformers 5 keeps routed experts fused in memory (``experts.gate_up_proj [E, 2I, H]``,
``experts.down_proj [E, H, I]``) and splits them back into per-expert ``nn.Linear`` weights when it saves,
through the model's checkpoint conversion mapping (``transformers.conversion_mapping``). This module reads
that mapping to name the per-expert tensors exactly as ``save_pretrained`` does (Qwen3-MoE
``mlp.experts.{e}.gate_proj|up_proj|down_proj``, Mixtral ``block_sparse_moe.experts.{e}.w1|w3|w2``), and
knows the layouts the mapping does not describe: GPT-OSS stores ``gate_up_proj [E, H, 2I]`` transposed
(contraction dim first) with gate and up interleaved along the last dim, plus ``*_bias [E, N]``. Families
without a conversion rule (Llama 4, GPT-OSS, GraniteMoE, JetMoE: transformers saves them fused) get the
``gate_proj|up_proj|down_proj`` names (a stacked ``weight``: its module's name), which ``save_pretrained``
would not write.

Every per-expert weight is returned as a 2-D ``[N, K]`` tensor (contraction dim last), as ``nn.Linear``
and the serving engines store it. A per-expert module list (``experts.{e}.w1.weight``, keyed ``experts.*.w1.weight``
in the quant state) already has that layout: each expert's weight is written under its own name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moeq.state import is_listed_key

__all__ = ["ExpertLayout", "ExpertPart", "expert_layout", "gate_up_partner", "hf_renamer", "num_experts_in_config"]

logger = logging.getLogger(__name__)

#: per-expert leaf names of a gate and an up projection kept as two linears
_GATE_UP_LEAVES = (("gate_proj", "up_proj"), ("w1", "w3"))
#: config attributes that hold the routed-expert count, by model family
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class ExpertPart:
    """One per-expert linear cut out of a stacked weight: its module name template (``{e}`` = global
    expert id, in-memory naming) and which output rows of the expert's ``[N, K]`` weight it takes."""

    module: str
    rows: Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class ExpertLayout:
    """How the stacked expert weight ``fqn`` becomes per-expert ``[n, K]`` weights (and biases)."""

    fqn: str
    parts: tuple[ExpertPart, ...]
    expert_dim: int
    contraction_dim: int
    bias_fqn: str | None = None
    #: a per-expert module list's bias members (``experts.*.w1.bias``, ``*`` = local expert id), if it has them
    member_bias: str | None = None

    def expert_weight(self, weight: Tensor, local_id: int) -> Tensor:
        """Expert ``local_id``'s weight as ``[N, K]`` (contraction dim last)."""
        w = weight.detach().movedim(self.expert_dim, 0)[local_id]
        k_dim = self.contraction_dim - (1 if self.contraction_dim > self.expert_dim else 0)
        return w.movedim(k_dim, -1)

    def gated(self) -> bool:
        return len(self.parts) == 2


def first_half(t: Tensor) -> Tensor:
    """The first half along dim 0 (gate of a fused ``gate_up`` weight in the half-split layout)."""
    return t[: t.shape[0] // 2]


def second_half(t: Tensor) -> Tensor:
    """The second half along dim 0 (up of a fused ``gate_up`` weight in the half-split layout)."""
    return t[t.shape[0] // 2 :]


def _even_rows(t: Tensor) -> Tensor:
    return t[0::2]


def _odd_rows(t: Tensor) -> Tensor:
    return t[1::2]


def _all_rows(t: Tensor) -> Tensor:
    return t


def _is_interleaved(model: nn.Module) -> bool:
    """GPT-OSS interleaves gate and up along the fused output dim (``gate_up[..., ::2]``, ``[..., 1::2]``)."""
    return getattr(getattr(model, "config", None), "model_type", None) == "gpt_oss"


def _converter_leaf_names(model: nn.Module, fqn: str) -> list[str] | None:
    """Per-expert leaf names (``["w1", "w3"]``) from the transformers conversion mapping whose fused
    target is ``fqn``, or None if the model has no such mapping."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import MergeModulelist, WeightConverter
    except ImportError:
        return None
    try:
        conversions = get_model_conversion_mapping(model, add_legacy=False)
    except Exception as err:  # a model transformers does not know (e.g. a plain nn.Module)
        logger.debug("moeq: no transformers conversion mapping for %s: %s", type(model).__name__, err)
        return None
    for conv in conversions:
        if not isinstance(conv, WeightConverter):
            continue
        if not any(isinstance(op, MergeModulelist) for op in conv.operations):
            continue
        targets = list(conv._original_target_patterns)
        if len(targets) != 1 or not ("." + fqn).endswith("." + targets[0].strip(".")):
            continue
        leaves = []
        for src in conv._original_source_patterns:
            _, _, tail = src.partition("*.")
            leaves.append(tail.removesuffix(".weight"))
        if all(leaves):
            return leaves
    return None


def expert_layout(model: nn.Module, fqn: str, expert_dim: int, contraction_dim: int) -> ExpertLayout:
    """The per-expert layout of the stacked expert weight ``fqn`` of ``model``, or of the per-expert module list
    keyed ``fqn`` (``experts.*.w1.weight``: each expert's own weight, written under its own name)."""
    prefix, _, leaf = fqn.rpartition(".")
    params = dict(model.named_parameters())
    if is_listed_key(fqn):
        bias = prefix + ".bias"
        has_bias = bias.replace("*", "0", 1) in params
        part = ExpertPart(prefix.replace("*", "{e}", 1), _all_rows)
        return ExpertLayout(fqn, (part,), expert_dim, contraction_dim, member_bias=bias if has_bias else None)
    bias_fqn = f"{fqn}_bias" if f"{fqn}_bias" in params else None
    names = _converter_leaf_names(model, fqn)
    gated = leaf == "gate_up_proj" or (names is not None and len(names) == 2)
    if names is None:
        names = ["gate_proj", "up_proj"] if gated else [leaf]
    if gated:
        if len(names) != 2:
            raise ValueError(f"{fqn}: expected two per-expert names for a fused gate/up weight, got {names}")
        rows = (_even_rows, _odd_rows) if _is_interleaved(model) else (first_half, second_half)
        parts = tuple(ExpertPart(f"{prefix}.{{e}}.{n}", r) for n, r in zip(names, rows, strict=True))
    else:
        if len(names) != 1:
            raise ValueError(f"{fqn}: expected one per-expert name, got {names}")
        # a stacked parameter named ``weight`` (JetMoE's ``input_linear.weight``): expert e is ``input_linear.{e}``
        leaf_name = "" if names[0] == "weight" else f".{names[0]}"
        parts = (ExpertPart(f"{prefix}.{{e}}{leaf_name}", _all_rows),)
    return ExpertLayout(fqn, parts, expert_dim, contraction_dim, bias_fqn)


def gate_up_partner(fqn: str, keys: Iterable[str]) -> str | None:
    """The key among ``keys`` of the other half of a gate / up pair kept as two per-expert linears
    (``experts.*.gate_proj.weight`` <-> ``experts.*.up_proj.weight``, Mixtral's ``w1`` <-> ``w3``), or None.
    The two share their input, and serving engines fuse them with one weight scale per expert."""
    prefix, _, leaf = fqn.removesuffix(".weight").rpartition(".")
    for pair in _GATE_UP_LEAVES:
        if leaf in pair:
            other = f"{prefix}.{pair[1 - pair.index(leaf)]}.weight"
            return other if other in set(keys) else None
    return None


def hf_renamer(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Map in-memory state-dict keys to the names ``save_pretrained`` writes (e.g. Mixtral's
    ``mlp.`` -> ``block_sparse_moe.``), using transformers' own ``revert_weight_conversion``.

    Keys are fed as distinct placeholder tensors and followed by identity, so only renamings apply; a key
    that transformers would merge or split is an error naming it.
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return {k: k for k in keys}
    placeholders = {k: torch.empty(0) for k in keys}
    owner = {id(t): k for k, t in placeholders.items()}
    reverted = revert_weight_conversion(model, dict(placeholders))
    mapping: dict[str, str] = {}
    for new_key, t in reverted.items():
        t = t[0] if isinstance(t, list) else t
        if id(t) not in owner:
            raise ValueError(f"transformers' save-time conversion produced {new_key!r} from no single moeq key")
        mapping[owner[id(t)]] = new_key
    missing = sorted(set(keys) - set(mapping))
    if missing:
        raise ValueError(f"transformers' save-time conversion dropped keys {missing[:8]}")
    return mapping


def num_experts_in_config(config: object) -> int | None:
    """The routed-expert count a model config declares, or None if it names none."""
    for key in _EXPERT_COUNT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
