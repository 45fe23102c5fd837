"""Canonicalize per-expert loops into one grouped GEMM, so the expert pass sees them like grouped experts.

DESIGN's table: a per-expert loop (N ``linear`` / ``mm`` on slices of one stacked ``[E, ...]`` weight) is
rewritten into one grouped op "when the structure allows". Two structures are rewritten, each pattern beside its
replacement (``w[e]`` a slice of one 3-D parameter, every expert 0..E-1 once and in order, each GEMM used only by
the ``stack`` / ``cat``, no bias):

    stack([gemm(x[e], w[e]) for e in range(E)])           ->  bmm(x[:E], w as [E, K, N])
    cat([gemm(x_e, w[e]) for e in range(E)])              ->  _grouped_mm(x, w as [E, K, N], offs=cumsum(rows))

``gemm(a, w[e])`` is ``linear(a, w[e])`` or ``a @ w[e]`` / ``mm(a, w[e])``, with ``w[e]`` possibly transposed
(``.t()``, ``transpose(0, 1)``); ``x_e`` in the ``cat`` form is the e-th piece of ``x.split(sizes)`` along rows, or
consecutive row slices ``x[a_e:b_e]`` (the last may be ``x[a:]``) starting at row 0 (then x's row count must be
known, so slices are exact), and the weight bf16 (``torch._grouped_mm``'s meta kernel takes nothing else; such a
loop is reported with that reason). Only shape-preserving, dtype-preserving ops may sit between ``w[e]`` and the
GEMM (a cast would change what the grouped op computes). The offsets are a constant int32 tensor where the split
sizes are Python ints, and computed in the graph where some are symbolic (Dynamo makes sizes that change between
calls dynamic). Anything else is left alone; :mod:`moeq.passes.find` then reports each GEMM of the loop with its
reason. Works on torch-level (Dynamo, ``symbolic_trace``) and ATen-level (export) graphs.
"""

from __future__ import annotations

import itertools
import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from moeq.passes.find import (
    LOOP_KEPT_META,
    LOOP_META,
    T_TARGETS,
    TRANSPOSE_TARGETS,
    fetch_attr,
    node_shape,
    target_name,
)

__all__ = ["canonicalize_expert_loops"]

logger = logging.getLogger(__name__)

_STACK = {"torch.stack", "aten.stack"}
_CAT = {"torch.cat", "aten.cat", "torch.concat", "torch.concatenate"}
_LINEAR = {"torch._C._nn.linear", "torch.nn.functional.linear", "aten.linear"}
_MATMUL = {"torch.mm", "method:mm", "aten.mm", "torch.matmul", "method:matmul", "_operator.matmul", "aten.matmul"}
_SPLIT = {"torch.split", "method:split", "aten.split_with_sizes", "torch.functional.split"}
_SELECT = {"aten.select", "method:select"}
_SLICE = {"aten.slice"}
_GETITEM = {"_operator.getitem", "method:__getitem__"}
# between w[e] and the GEMM: ops that keep values, shape and dtype (no casts)
_SAME_VALUES = {"method:contiguous", "method:detach", "method:clone", "torch.detach", "torch.clone", "aten.contiguous"}
_SAME_VALUES |= {"aten.clone", "aten.detach", "aten.alias"}


@dataclass
class _ExpertSlice:
    """``w[expert]`` reached the GEMM as its weight operand, K along ``k_dim`` of the 3-D parameter (1 or 2)."""

    param: fx.Node
    expert: int
    k_dim: int


@dataclass
class _Gemm:
    node: fx.Node
    x: fx.Node
    slice: _ExpertSlice


def _dim_arg(node: fx.Node, index: int, default: int = 0) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get("dim", default)


def _expert_slice(node: Any, k_dim_of_operand: int) -> _ExpertSlice | None:
    """Follow a 2-D GEMM weight operand back through transposes and casts to ``param[e]``; ``k_dim_of_operand``:
    which dim of the operand the GEMM contracts (0 for ``a @ b``, 1 for ``linear``)."""
    k = k_dim_of_operand
    while isinstance(node, fx.Node):
        kind = target_name(node)
        if kind in T_TARGETS:
            k = 1 - k
        elif kind in TRANSPOSE_TARGETS:
            dims = {d % 2 for d in node.args[1:3] if isinstance(d, int)}
            if dims != {0, 1}:
                return None
            k = 1 - k
        elif kind not in _SAME_VALUES:
            break
        node = node.args[0] if node.args else None
    selected = _selected_batch(node) if isinstance(node, fx.Node) else None
    if selected is None:
        return None
    param, expert = selected
    if not isinstance(param, fx.Node) or param.op not in ("placeholder", "get_attr") or expert < 0:
        return None
    return _ExpertSlice(param, expert, 1 + k)


def _gemm(node: Any) -> _Gemm | None:
    """``linear(a, w[e])`` (no bias) or ``a @ w[e]`` as (a, the expert slice)."""
    if not isinstance(node, fx.Node) or len(node.users) != 1:
        return None
    kind = target_name(node)
    if kind in _LINEAR:
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if bias is not None:
            return None
        found = _expert_slice(node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"), 1)
    elif kind in _MATMUL:
        found = _expert_slice(node.args[1] if len(node.args) > 1 else None, 0)
    else:
        return None
    x = node.args[0] if node.args else node.kwargs.get("input")
    return _Gemm(node, x, found) if found is not None and isinstance(x, fx.Node) else None


def _selected_batch(node: fx.Node) -> tuple[fx.Node, int] | None:
    """``x[e]`` (dim 0) as (x, e)."""
    kind = target_name(node)
    if kind in _GETITEM and isinstance(node.args[1], int):
        return node.args[0], node.args[1]
    if kind in _SELECT and node.args[1:2] == (0,) and isinstance(node.args[2], int):
        return node.args[0], node.args[2]
    return None


def _row_piece(node: fx.Node) -> tuple[fx.Node, int, int | None, list[int | fx.Node] | None] | None:
    """A row range of some x: ``(x, start, end, None)`` for ``x[a:b]``; ``(x, index, None, sizes)`` for the
    ``index``-th piece of ``x.split(sizes)`` (a size may be a graph value: a symbolic int)."""
    kind = target_name(node)
    if kind in _GETITEM and isinstance(node.args[1], int) and isinstance(node.args[0], fx.Node):
        split = node.args[0]
        if target_name(split) in _SPLIT and _dim_arg(split, 2) == 0:
            sizes = split.args[1] if len(split.args) > 1 else split.kwargs.get("split_size_or_sections")
            if isinstance(sizes, (list, tuple)) and all(isinstance(s, (int, fx.Node)) for s in sizes):
                return split.args[0], node.args[1], None, list(sizes)
        return None
    if kind in _GETITEM and isinstance(node.args[1], slice):  # x[a:b], x[a:] (open end: to the last row)
        s = node.args[1]
        stop = sys.maxsize if s.stop is None else s.stop
        if s.step in (None, 1) and isinstance(s.start or 0, int) and isinstance(stop, int):
            return node.args[0], s.start or 0, stop, None
        return None
    if kind in _SLICE and _dim_arg(node, 1) == 0 and len(node.args) >= 3 and node.args[4:] in ((), (1,)):
        start, end = node.args[2], node.args[3] if len(node.args) > 3 else sys.maxsize
        if isinstance(start, int) and isinstance(end, int):
            return node.args[0], start, end, None
    return None


def _value_of(param: fx.Node, resolved: dict[fx.Node, torch.Tensor]) -> torch.Tensor | None:
    """The parameter's tensor (example input / attribute), else its fake value from the graph's meta."""
    if param in resolved:
        return resolved[param]
    values = [param.meta.get(key) for key in ("val", "example_value")]
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


def _expert_count(param: fx.Node, resolved: dict[fx.Node, torch.Tensor]) -> int | None:
    value = _value_of(param, resolved)
    return value.shape[0] if value is not None and value.dim() == 3 else None


def _loop_of(node: fx.Node, resolved: dict[fx.Node, torch.Tensor]) -> list[_Gemm] | None:
    """The expert GEMMs feeding a stack / cat along dim 0, if they form a whole per-expert loop."""
    pieces = node.args[0] if node.args else node.kwargs.get("tensors")
    if not isinstance(pieces, (list, tuple)) or not pieces or _dim_arg(node, 1) != 0:
        return None
    gemms = [_gemm(p) for p in pieces]
    if any(g is None for g in gemms):
        return None
    first = gemms[0].slice
    num_experts = _expert_count(first.param, resolved)
    if num_experts is None or len(gemms) != num_experts:
        return None
    for e, g in enumerate(gemms):
        if (g.slice.param, g.slice.expert, g.slice.k_dim) != (first.param, e, first.k_dim):
            return None
    return gemms


def _weight_as_ekn(graph: fx.Graph, param: fx.Node, k_dim: int, aten: bool) -> fx.Node:
    if k_dim == 1:
        return param
    transpose = torch.ops.aten.transpose.int if aten else torch.transpose
    return graph.call_function(transpose, (param, 1, 2))


def _first_rows(graph: fx.Graph, x: fx.Node, rows: int, aten: bool) -> fx.Node:
    """``x[:rows]``, or ``x`` itself when its (static) row count is ``rows``."""
    shape = node_shape(x)
    if shape is not None and isinstance(shape[0], int) and shape[0] == rows:
        return x
    return graph.call_function(torch.ops.aten.slice.Tensor if aten else torch.narrow, (x, 0, 0, rows))


def _rewrite_stack(gm: fx.GraphModule, node: fx.Node, gemms: list[_Gemm], aten: bool) -> str | None:
    batches = [_selected_batch(g.x) for g in gemms]
    if any(b is None for b in batches):
        return None
    x = batches[0][0]
    if any(b != (x, e) for e, b in enumerate(batches)):
        return None
    graph = gm.graph
    with graph.inserting_before(node):
        x = _first_rows(graph, x, len(gemms), aten)
        w = _weight_as_ekn(graph, gemms[0].slice.param, gemms[0].slice.k_dim, aten)
        bmm = graph.call_function(torch.ops.aten.bmm.default if aten else torch.bmm, (x, w))
    return _replace(node, bmm, gemms, "bmm")


def _rewrite_cat(
    gm: fx.GraphModule, node: fx.Node, gemms: list[_Gemm], aten: bool, resolved: dict[fx.Node, torch.Tensor]
) -> str | None:
    pieces = [_row_piece(g.x) for g in gemms]
    if any(p is None for p in pieces):
        return None
    x = pieces[0][0]
    if any(p[0] is not x for p in pieces):
        return None
    if pieces[0][3] is not None:  # x.split(sizes): every piece of one split, in order
        sizes = pieces[0][3]
        if len(sizes) != len(gemms) or any(p[3] != sizes or p[1] != e for e, p in enumerate(pieces)):
            return None
        end = None  # split's sizes add up to x's row count: all of x
    else:  # consecutive slices from row 0, over a known number of rows (Python slices clamp)
        rows = node_shape(x)
        if rows is None or not all(isinstance(r, int) for r in rows[:1]):
            return None
        if any(p[1] < 0 or p[2] < 0 for p in pieces):  # counted from the end: not handled
            return None
        bounds = [min(p[1], rows[0]) for p in pieces] + [min(pieces[-1][2], rows[0])]
        if bounds[0] != 0:
            return None
        if any(min(p[2], rows[0]) != bounds[e + 1] for e, p in enumerate(pieces)):
            return None
        sizes = [b - a for a, b in itertools.pairwise(bounds)]
        if any(s < 0 for s in sizes):
            return None
        end = bounds[-1]
    param = gemms[0].slice.param
    value = _value_of(param, resolved)
    dtype = value.dtype if value is not None else None
    if dtype != torch.bfloat16:  # torch._grouped_mm's meta kernel (so every compiled graph) takes bf16 only
        for g in gemms:
            g.node.meta[LOOP_KEPT_META] = (
                f"not rewritten into torch._grouped_mm, which takes bf16 only (weight {dtype}; run the model in "
                "bf16 to quantize it)"
            )
        return None
    device = value.device
    graph = gm.graph
    with graph.inserting_before(node):
        x = x if end is None else _first_rows(graph, x, end, aten)
        w = _weight_as_ekn(graph, param, gemms[0].slice.k_dim, aten)
        offs_node = _offsets(graph, sizes, device, aten)
        target = torch.ops.aten._grouped_mm.default if aten else torch._grouped_mm
        grouped = graph.call_function(target, (x, w), {"offs": offs_node})
    return _replace(node, grouped, gemms, "grouped_mm")


def _offsets(graph: fx.Graph, sizes: list[int | fx.Node], device: torch.device, aten: bool) -> fx.Node:
    """int32 cumulative row counts: a constant for Python-int sizes; computed in the graph when some size is a
    symbolic int (Dynamo makes split sizes dynamic once they change between calls, e.g. from ``.tolist()``)."""
    if all(isinstance(s, int) for s in sizes):
        offs = list(itertools.accumulate(sizes))
        return graph.call_function(torch.tensor, (offs,), {"dtype": torch.int32, "device": device})
    scalar = torch.ops.aten.scalar_tensor.default if aten else torch.scalar_tensor
    stack = torch.ops.aten.stack.default if aten else torch.stack
    cumsum = torch.ops.aten.cumsum.default if aten else torch.cumsum
    counts = [graph.call_function(scalar, (s,), {"dtype": torch.int64, "device": device}) for s in sizes]
    return graph.call_function(cumsum, (graph.call_function(stack, (counts,)), 0), {"dtype": torch.int32})


def _replace(node: fx.Node, new: fx.Node, gemms: list[_Gemm], form: str) -> str:
    what = f"per-expert loop of {len(gemms)} GEMMs on slices of {gemms[0].slice.param.name} as one {form}"
    new.meta[LOOP_META] = what
    for key in ("val", "example_value"):
        if key in node.meta:
            new.meta[key] = node.meta[key]
    node.replace_all_uses_with(new)
    return what


def canonicalize_expert_loops(gm: fx.GraphModule, example_inputs: list[Any] | None = None) -> list[str]:
    """Rewrite every whole per-expert loop of ``gm`` (module doc) into one ``bmm`` / ``_grouped_mm`` in place;
    returns a description of each rewrite. The loop's GEMMs and slices are removed when nothing else uses them."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    resolved: dict[fx.Node, torch.Tensor] = {}
    if example_inputs is not None:
        resolved = {n: v for n, v in zip(placeholders, example_inputs) if isinstance(v, torch.Tensor)}
    for n in gm.graph.nodes:
        value = fetch_attr(gm, str(n.target)) if n.op == "get_attr" else None
        if isinstance(value, torch.Tensor):
            resolved[n] = value
    done = []
    for node in list(gm.graph.nodes):
        kind = target_name(node)
        if node.op != "call_function" or kind not in _STACK | _CAT:
            continue
        gemms = _loop_of(node, resolved)
        if gemms is None:
            continue
        aten = isinstance(node.target, torch._ops.OpOverload)
        if kind in _STACK:
            what = _rewrite_stack(gm, node, gemms, aten)
        else:
            what = _rewrite_cat(gm, node, gemms, aten, resolved)
        if what is not None:
            logger.info("moeq: %s", what)
            done.append(what)
    if done:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return done
