"""Joint-graph pass: a training graph's scatters through the MoE's sort permutation become gathers.

transformers' grouped experts sort the routed (token, slot) pairs by expert and undo the sort after the down
projection::

    _, perm = torch.sort(expert_ids)                       # [S], S = T * top_k
    x_sorted = hidden[perm // top_k]                       # the rows each expert multiplies
    w_sorted = weights[perm]
    inv = torch.empty_like(perm); inv[perm] = arange(S)    # the inverse permutation
    out = (y * w_sorted[:, None])[inv].view(T, top_k, H).sum(1)

AOTAutograd differentiates each gather as a scatter-add into zeros (``index_put(zeros, [i], g, accumulate=True)``),
which Inductor runs as a zero fill plus an atomic scatter. Where the graph itself shows that ``perm`` is a
permutation (a sort's indices) and ``inv`` its inverse (``index_put(empty, [perm], iota(S))``), each of them is a
gather or a combine:

- ``index_put(zeros, [inv], g, True)`` is ``g[perm]``, and ``index_put(zeros, [perm], g, True)`` is ``g[inv]``:
  every row receives exactly one value, so these are the same numbers, without the fill and the atomics (a ``-0.0``
  stays ``-0.0`` where the scatter onto zeros gives ``+0.0``);
- ``index_put(zeros[T, H], [perm // top_k], g, True)`` (the gradient of ``hidden[perm // top_k]``) sums each
  token's ``top_k`` rows: ``g[inv].view(T, top_k, H).sum(1)``, which runs as ``moeq::combine_experts`` without
  weights under the same bounds as the forward combine (:data:`moeq.lowering.inductor.COMBINE_MIN_TOP_K`,
  ``COMBINE_MIN_ROWS``). It sums the ``top_k`` rows in fp32 and rounds once, where the scatter rounds after each
  add in the gradient's dtype (in an order the GPU's atomics choose). Where ``g`` is ``g' * mask`` (the STE mask of
  the gathered rows' activation quantization, bool), the combine reads ``g'`` and the mask in its own pass.

Measured on one Qwen3-30B-A3B-shaped layer's QAT FP8 training step: BENCHMARKS.md, session 26.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from moeq.lowering.inductor import combine_pays, node_value

__all__ = ["gather_through_permutations", "inverse_permutations"]

logger = logging.getLogger(__name__)

aten = torch.ops.aten


def _same(a: Any, b: Any) -> bool:
    return statically_known_true(a == b)


def _sort_indices(node: Any) -> bool:
    """``node`` is the indices of a sort of a 1-D tensor: a permutation of ``range(len)``."""
    if not isinstance(node, fx.Node) or node.target is not operator.getitem or node.args[1] != 1:
        return False
    sort = node.args[0]
    return (
        isinstance(sort, fx.Node)
        and sort.target in (aten.sort.default, aten.sort.stable)
        and node_value(sort.args[0]) is not None
        and node_value(sort.args[0]).dim() == 1
    )


def _iota(node: Any, length: Any) -> bool:
    """``node`` is ``0, 1, ..., length - 1``."""
    if not isinstance(node, fx.Node) or node_value(node) is None or node_value(node).dim() != 1:
        return False
    if node.target == torch.ops.prims.iota.default:
        start, step = node.kwargs.get("start", 0), node.kwargs.get("step", 1)
    elif node.target == aten.arange.default:
        start, step = 0, 1
    elif node.target == aten.arange.start_step:
        start, step = node.args[0], node.args[2] if len(node.args) > 2 else 1
    else:
        return False
    return start == 0 and step == 1 and _same(node_value(node).shape[0], length)


def inverse_permutations(graph: fx.Graph) -> dict[fx.Node, fx.Node]:
    """``{inv: perm}`` for each ``inv = index_put(base, [perm], iota(S))`` whose ``perm`` is a sort's indices of
    length S: ``inv`` is then ``perm``'s inverse whatever ``base`` held (every position is written once)."""
    found = {}
    for node in graph.nodes:
        if node.target != aten.index_put.default or len(node.args[1]) != 1:
            continue
        base, (perm,), values = node.args[:3]
        accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
        if accumulate or not _sort_indices(perm) or node_value(base) is None or node_value(base).dim() != 1:
            continue
        length = node_value(perm).shape[0]
        if _same(node_value(base).shape[0], length) and _iota(values, length):
            found[node] = perm
    return found


def _zeros(node: Any) -> bool:
    """``node`` is a tensor of zeros (``full(shape, 0)``, ``zeros``, ``new_zeros``)."""
    if not isinstance(node, fx.Node):
        return False
    if node.target == aten.full.default:
        return node.args[1] == 0
    return node.target in (aten.zeros.default, aten.new_zeros.default)


def _scatter_add(node: fx.Node) -> tuple[fx.Node, Any] | None:
    """``(index, values)`` when ``node`` is ``index_put(zeros, [index], values, accumulate=True)``."""
    if node.target != aten.index_put.default or len(node.args) < 4 or node.args[3] is not True:
        return None
    base, indices, values = node.args[:3]
    if len(indices) != 1 or not _zeros(base) or node_value(values) is None or node_value(base) is None:
        return None
    return indices[0], values


def _floor_div(node: Any) -> tuple[fx.Node, int] | None:
    """``(a, k)`` when ``node`` is ``a // k`` (integer floor division by a literal)."""
    if not isinstance(node, fx.Node) or len(node.args) < 2 or not isinstance(node.args[1], int) or node.args[1] < 1:
        return None
    floor = node.target == aten.floor_divide.default
    floor |= node.target == aten.div.Tensor_mode and node.kwargs.get("rounding_mode") == "floor"
    return (node.args[0], node.args[1]) if floor else None


def _masked(node: fx.Node, scatter: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(g, mask)`` when ``node`` is ``g * mask`` (``mask`` bool, ``g``'s shape: an activation's STE mask on its
    gradient) and ``scatter`` is its only user (besides the scatter's zero fill, which may take its shape from it),
    so the combine can read the mask in its own pass."""
    if node.target != aten.mul.Tensor or len(node.args) != 2:
        return None
    if any(user is not scatter and user is not scatter.args[0] for user in node.users):
        return None
    for g, mask in (node.args, reversed(node.args)):
        g_val, mask_val = node_value(g), node_value(mask)
        if g_val is None or mask_val is None or mask_val.dtype != torch.bool or g_val.dtype != node_value(node).dtype:
            continue
        if mask_val.dim() == g_val.dim() and all(_same(a, b) for a, b in zip(mask_val.shape, g_val.shape)):
            return g, mask
    return None


def _replace_scatter(graph: fx.Graph, node: fx.Node, target: Any, args: tuple[Any, ...]) -> None:
    """Put ``target(*args)`` in place of the scatter ``node``; its zero fill goes too once nothing else reads it."""
    zeros = node.args[0]
    with graph.inserting_before(node):
        new = graph.call_function(target, args)
    new.meta["val"] = node_value(node)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    if not zeros.users:
        graph.erase_node(zeros)


def gather_through_permutations(graph: fx.Graph) -> int:
    """Rewrite the scatter-adds through a sort permutation or its inverse (module docstring); returns the count."""
    inverses = inverse_permutations(graph)
    if not inverses:
        return 0
    perms = {perm: inv for inv, perm in inverses.items()}
    rewritten = 0
    for node in list(graph.nodes):
        matched = _scatter_add(node)
        if matched is None:
            continue
        index, values = matched
        out, src = node_value(node), node_value(values)
        if index in inverses or index in perms:
            # every row of the output receives exactly one row of values: a gather through the other permutation
            other = inverses[index] if index in inverses else perms[index]
            same_shape = out.dim() == src.dim() and all(_same(a, b) for a, b in zip(out.shape, src.shape))
            if out.dtype != src.dtype or not same_shape:
                continue
            _replace_scatter(graph, node, aten.index.Tensor, (values, [other]))
            rewritten += 1
            continue
        divided = _floor_div(index)
        if divided is None or divided[0] not in perms or out.dtype != src.dtype or src.dim() != 2:
            continue
        perm, top_k = divided
        rows = src.shape[0]
        if out.dim() != 2 or not _same(out.shape[0] * top_k, rows) or not _same(out.shape[1], src.shape[1]):
            continue
        if not combine_pays(rows, top_k):
            continue
        masked = _masked(values, node)
        args = (values, None, perms[perm], top_k, src.dtype) if masked is None else (*masked[:1], None, perms[perm],
                                                                                     top_k, src.dtype, masked[1])  # fmt: skip
        _replace_scatter(graph, node, torch.ops.moeq.combine_experts.default, args)
        if masked is not None and not values.users:
            graph.erase_node(values)
        rewritten += 1
    if rewritten:
        graph.lint()
        logger.info("moeq: %d scatter-adds through the MoE's sort permutation run as gathers", rewritten)
    return rewritten
