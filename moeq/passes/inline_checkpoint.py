"""Inline activation-checkpointed regions that hold prepared expert modules, keeping them recomputed.

Dynamo traces ``torch.utils.checkpoint`` inside a compiled region into one higher-order op,
``tag_activation_checkpoint(body, *operands)``, whose body is a graph of its own that moeq's rewrite does not enter.
AOTAutograd runs such a body by tagging every op traced from it with ``recompute=PREFER_RECOMPUTE`` and one
``ac_graph_id``; its partitioner then recomputes the tagged ops in the backward instead of saving their outputs.
This pass does the same one step earlier, for bodies where a prepared module with expert weights starts
(``moeq::expert_module_entry``):

    out = tag_activation_checkpoint(body, x, w)     ->   y = x @ w   (meta: recompute, ac_graph_id)
    y = out[0]

The body's nodes are copied into the parent graph with those two tags, which AOTAutograd copies onto every aten
op it traces from a tagged node. moeq's rewrite then sees the expert GEMMs, and :func:`tag_inserted_nodes` puts the
quantizer nodes it adds into the region of the GEMMs they feed, so the checkpoint recomputes them as well.

Left alone (the marker still in the body, which :func:`moeq.lowering.ops.remove_expert_module_entries` reports):
selective activation checkpointing (a ``context_fn``: its policy picks per op at trace time), bodies that call a
further subgraph, and regions whose output tuple is used whole.
"""

from __future__ import annotations

import itertools
import logging
import operator

import torch
from torch import fx
from torch.utils.checkpoint import CheckpointPolicy

from moeq.lowering.ops import EXPERT_MODULE_ENTRY_TARGETS

__all__ = ["inline_checkpointed_experts", "tag_inserted_nodes"]

logger = logging.getLogger(__name__)

try:  # AOTAutograd's own region counter, so that inlined regions never share an id with the ones it tags
    from torch._higher_order_ops.wrap import uid as _region_ids
except ImportError:  # pragma: no cover - older torch
    _region_ids = itertools.count(1 << 20)

_TAGS = ("recompute", "ac_graph_id")


def _checkpoint_body(gm: fx.GraphModule, node: fx.Node) -> fx.GraphModule | None:
    """The body of a plain ``tag_activation_checkpoint`` node that a prepared expert module runs in, else None."""
    if node.op != "call_function" or node.target is not torch.ops.higher_order.tag_activation_checkpoint:
        return None
    body_node = node.args[0]
    if not isinstance(body_node, fx.Node) or body_node.op != "get_attr":
        return None
    body = getattr(gm, body_node.target)
    nodes = body.graph.nodes
    if not any(n.op == "call_function" and n.target in EXPERT_MODULE_ENTRY_TARGETS for n in nodes):
        return None
    if body.meta.get("_checkpoint_context_fn") is not None or node.kwargs.get("context_fn") is not None:
        return None  # selective activation checkpointing
    if any(n.op in ("get_attr", "call_module") for n in nodes):
        return None  # a nested subgraph
    if sum(n.op == "placeholder" for n in nodes) != len(node.args) - 1:
        return None
    if any(user.op != "call_function" or user.target is not operator.getitem for user in node.users):
        return None  # its output tuple is used whole
    return body


def inline_checkpointed_experts(gm: fx.GraphModule) -> int:
    """Copy each activation-checkpointed body that holds a prepared expert module into ``gm``, tagging its nodes as
    AOTAutograd would (recomputed in the backward); returns how many regions were inlined."""
    inlined = 0
    for node in list(gm.graph.nodes):
        body = _checkpoint_body(gm, node)
        if body is None:
            continue
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        region = next(_region_ids)
        env: dict[fx.Node, fx.Node] = dict(zip(placeholders, node.args[1:], strict=True))
        with gm.graph.inserting_before(node):
            outputs = gm.graph.graph_copy(body.graph, env)
        for copied in (env[n] for n in body.graph.nodes if n.op not in ("placeholder", "output")):
            copied.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
            copied.meta["ac_graph_id"] = region
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        for user in list(node.users):
            user.replace_all_uses_with(outputs[user.args[1]])
            gm.graph.erase_node(user)
        body_node = node.args[0]
        gm.graph.erase_node(node)
        if not body_node.users:
            gm.graph.erase_node(body_node)
        inlined += 1
        logger.info("moeq: inlined checkpointed region %s to rewrite its expert GEMMs (region %d)", body_node, region)
    if inlined:
        gm.delete_all_unused_submodules()
        gm.recompile()
    return inlined


def tag_inserted_nodes(gm: fx.GraphModule, before: set[fx.Node]) -> int:
    """Put each node added since ``before`` into the recompute region of its users, where all of them lie in one
    (a quantizer feeding an expert GEMM of an inlined checkpoint is recomputed with it); returns how many."""
    tagged = 0
    for node in reversed(list(gm.graph.nodes)):
        if node in before or node.op != "call_function" or not node.users or "ac_graph_id" in node.meta:
            continue
        regions = {user.meta.get("ac_graph_id") for user in node.users}
        if len(regions) != 1 or None in regions:
            continue
        user = next(iter(node.users))
        for tag in _TAGS:
            node.meta[tag] = user.meta[tag]
        tagged += 1
    return tagged
