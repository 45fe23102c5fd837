"""Joint-graph pass: a QAT training graph saves its FP8 expert weights for backward as e4m3 codes.

AOTAutograd traces forward and backward together; a QAT FP8 expert weight then feeds two grouped GEMMs::

    wq = moeq.fake_quant_weight(w, amax, "fp8", 0, k)    # the weight's size in bf16
    y  = aten._grouped_mm(xq, permute(wq), offs)          # forward
    dx = aten._grouped_mm(dy, permute'(wq), offs)         # backward (dgrad), reading the saved wq

so the partitioner saves ``wq`` (a second copy of every expert weight) and the post-grad pass cannot fuse the
forward GEMM (its weight has another user). :class:`SaveWeightCodesPass` rewrites the chain to::

    data, scale, block = moeq.quantize_weight(w, amax, "fp8", 0, k)     # e4m3 codes, K-last (freeze's form)
    wq = moeq.dequant_weight(data, scale, block, "fp8", k, dtype)        # tagged: recompute in backward

``dequant_weight(quantize_weight(w))`` is ``fake_quant_weight(w)`` bit for bit, and the STE gradient of the
weight (``grad * (|w| <= amax)``) was traced from ``w`` and ``amax``, so the step computes the same values. The
partitioner now saves the codes (half the bytes) and recomputes the dequant in backward, where it has one user;
the post-grad pass (:mod:`moeq.lowering.inductor`) fuses each GEMM with its dequant into ``moeq::grouped_qmm``
(forward: FP8 x FP8 MMAs on the codes; dgrad: the bf16 gradient times the codes of the transposed weight).

Only FP8 weights: their scale is per expert, so the codes serve either orientation of the GEMM. NVFP4 blocks run
along K, so the dgrad (which contracts over N) cannot read them; QAT NVFP4 training graphs stay unfused.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.utils.checkpoint import CheckpointPolicy

from moeq.lowering.inductor import fusion_enabled, gemm_targets

__all__ = ["SaveWeightCodesPass", "describe_training", "save_weight_codes"]

logger = logging.getLogger(__name__)

_VIEWS = (torch.ops.aten.permute.default, torch.ops.aten.transpose.int)


def _gemm_users(node: fx.Node, gemms: set[Any]) -> list[fx.Node] | None:
    """The grouped GEMMs that take ``node`` (through permute / transpose views) as their weight, or None if
    anything else uses it."""
    found = []
    for user in node.users:
        if user.target in _VIEWS:
            below = _gemm_users(user, gemms)
            if below is None:
                return None
            found += below
        elif user.target in gemms and len(user.args) >= 2 and user.args[1] is node and user.args[0] is not node:
            found.append(user)
        else:
            return None
    return found


def save_weight_codes(graph: fx.Graph) -> int:
    """Rewrite every QAT FP8 weight chain of a joint graph that feeds more than one grouped GEMM (forward and
    dgrad) to save e4m3 codes; returns the count."""
    gemms = gemm_targets()
    rewritten = 0
    for node in [n for n in graph.nodes if n.target == torch.ops.moeq.fake_quant_weight.default]:
        w, amax, fmt, expert_dim, k_dim = node.args
        val = node.meta.get("val")
        if fmt != "fp8" or expert_dim % 3 != 0 or val is None or val.dim() != 3:
            continue
        users = _gemm_users(node, gemms)
        if users is None or len(users) < 2:
            continue
        with graph.inserting_before(node):
            stored = graph.call_function(torch.ops.moeq.quantize_weight.default, (w, amax, fmt, expert_dim, k_dim))
            stored.meta["val"] = torch.ops.moeq.quantize_weight.default(val, amax.meta["val"], fmt, expert_dim, k_dim)
            parts = []
            for i in range(3):
                part = graph.call_function(operator.getitem, (stored, i))
                part.meta["val"] = stored.meta["val"][i]
                parts.append(part)
            dequant = graph.call_function(torch.ops.moeq.dequant_weight.default, (*parts, fmt, k_dim % 3, val.dtype))
        dequant.meta.update(node.meta)
        dequant.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        node.replace_all_uses_with(dequant)
        graph.erase_node(node)
        rewritten += 1
        logger.info(
            "moeq: training graph saves an expert weight %s as FP8 codes for backward (%d GEMMs)",
            list(val.shape),
            len(users),
        )
    if rewritten:
        graph.lint()
    return rewritten


def describe_training(mode: str, w_fmt: str) -> str:
    """What a training graph compiled by the ``moeq`` backend does with its expert GEMMs under the current
    fusion policy (for ``moeq.explain``)."""
    if mode == "qat" and w_fmt == "fp8" and fusion_enabled():
        return (
            "a training graph quantizes each expert weight to FP8 codes once per step and saves them for backward "
            "(not a bf16 copy); forward and dgrad run moeq::grouped_qmm on the codes"
        )
    return "a training graph saves the quantized weight for backward and keeps the Q/DQ ops"


class SaveWeightCodesPass(CustomGraphPass):
    """The joint-graph pass object installed by the ``moeq`` backend (``joint_custom_post_pass``)."""

    def __call__(self, graph: fx.Graph) -> None:
        save_weight_codes(graph)

    def uuid(self) -> Any:
        return get_hash_for_files((__file__,))
