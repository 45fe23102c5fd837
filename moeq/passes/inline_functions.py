"""Inline autograd Functions that are exactly a linear, so the expert pass sees their GEMM.

With grad enabled, Dynamo keeps a custom ``torch.autograd.Function`` whole, as one ``autograd_function_apply``
higher-order op with a forward and a backward subgraph. Megatron's linears are such Functions
(``LinearWithGradAccumulationAndAsyncCommunication``), so the expert GEMMs of a ``SequentialMLP`` being trained sit
inside subgraphs that no pass rewrites. This pass replaces a Function by its forward, traced inline, when both
subgraphs are verified node by node to be a linear and that linear's own gradient:

    forward:   y = x @ w.t()        (+ b)
    backward:  dx = g @ w,  dw = g.t() @ x,  (db = g.sum(0)),  None for every other input

and nothing else, apart from grad-mode switches, disabled autocast regions and ``contiguous``. Autograd's gradient
of the inlined ``x @ w.t()`` is then the Function's backward, so no value and no gradient changes; moeq's quantizer
ops, inserted next, add their STE backward as they do for any expert GEMM.

Kept (and reported by :mod:`moeq.passes.find` with the reason stored here) is any Function whose backward does
more: a tensor-parallel all-reduce of dgrad, a wgrad accumulated into ``main_grad``
(megatron's ``gradient_accumulation_fusion=True``), a deferred wgrad. Only Functions on an expert weight of a
per-expert module list are inlined, since moeq quantizes nothing else; dense linears keep their Function.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from moeq.passes.find import FUNCTION_INLINED_META, FUNCTION_KEPT_META, ParamResolver, fetch_attr, target_name
from moeq.state import listed_expert_key

__all__ = ["inline_linear_functions"]

logger = logging.getLogger(__name__)

_APPLY = "autograd_function_apply"
_MATMUL = {"torch.matmul", "method:matmul", "_operator.matmul", "torch.mm", "method:mm"}
_T = {"method:t", "torch.t"}
_ADD = {"_operator.add", "torch.add", "method:add"}
_SUM = {"method:sum", "torch.sum"}
_CONTIGUOUS = {"method:contiguous"}
_GRAD_MODE = {"torch._C._set_grad_enabled"}
_AUTOCAST = {"torch.amp.autocast_mode._enter_autocast", "torch.amp.autocast_mode._exit_autocast"}


@dataclass
class _Linear:
    """Positions, among the Function's inputs, of the linear's operands (``bias`` None without one)."""

    x: int
    weight: int
    bias: int | None


class _NotLinear(Exception):
    """The Function is not exactly a linear; the message says what it does instead."""


def _what(node: Any) -> str:
    return target_name(node) if isinstance(node, fx.Node) else repr(node)


def _calls(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def _is_transpose_2d(node: Any) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if target_name(node) in _T:
        return True
    return target_name(node) in {"method:transpose", "torch.transpose"} and tuple(node.args[1:]) in ((0, 1), (1, 0))


def _strip(node: Any, used: set[fx.Node]) -> Any:
    """Look through ``contiguous`` (it keeps values), recording what was looked through."""
    while isinstance(node, fx.Node) and target_name(node) in _CONTIGUOUS:
        used.add(node)
        node = node.args[0]
    return node


def _forward_linear(fwd: fx.GraphModule) -> tuple[_Linear, list[Any], int]:
    """Match ``((x @ w.t() [+ b], *intermediates), saved)``; returns the operand positions, the saved values and
    the number of outputs (torch 2.11's Dynamo also returns intermediates, which nothing outside uses)."""
    placeholders = [n for n in fwd.graph.nodes if n.op == "placeholder"]
    out = next(n for n in fwd.graph.nodes if n.op == "output").args[0]
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], (tuple, list)) and out[0]):
        raise _NotLinear("its forward does not return (outputs, saved values)")
    y, saved = out[0][0], list(out[1])
    num_outputs = len(out[0])
    used: set[fx.Node] = set()
    bias = None
    if isinstance(y, fx.Node) and target_name(y) in _ADD and len(y.args) == 2 and y.args[1] in placeholders:
        used.add(y)
        y, bias = y.args[0], y.args[1]
    if not (isinstance(y, fx.Node) and target_name(y) in _MATMUL and len(y.args) == 2):
        raise _NotLinear(f"its forward computes {_what(y)}, not x @ w.t()")
    x, wt = y.args
    if not (_is_transpose_2d(wt) and wt.args[0] in placeholders and x in placeholders):
        raise _NotLinear("its forward's GEMM is not x @ w.t() on two of its inputs")
    used |= {y, wt}
    extra = [target_name(n) for n in _calls(fwd) if n not in used and target_name(n) not in _GRAD_MODE]
    if extra:
        raise _NotLinear(f"its forward also calls {', '.join(extra)}")
    index = placeholders.index
    return _Linear(index(x), index(wt.args[0]), index(bias) if bias is not None else None), saved, num_outputs


def _check_backward(
    bwd: fx.GraphModule, fwd: fx.GraphModule, linear: _Linear, saved: list[Any], num_outputs: int
) -> None:
    """Raise unless the backward returns exactly the linear's gradients (module doc) and does nothing else."""
    fwd_inputs = [n for n in fwd.graph.nodes if n.op == "placeholder"]
    grad, *rest = [n for n in bwd.graph.nodes if n.op == "placeholder"]
    intermediate_grads, saved_inputs = rest[: num_outputs - 1], rest[num_outputs - 1 :]
    if any(n.users for n in intermediate_grads):
        raise _NotLinear("its backward uses the gradient of an intermediate output")
    if len(saved_inputs) != len(saved):
        raise _NotLinear("its backward takes other values than the forward saved")
    # each backward input -> the position of the forward input it is (a computed saved value is not accepted)
    position = {}
    for node, value in zip(saved_inputs, saved):
        if value in fwd_inputs:
            position[node] = fwd_inputs.index(value)
    grads = next(n for n in bwd.graph.nodes if n.op == "output").args[0]
    if not isinstance(grads, (tuple, list)) or len(grads) != len(fwd_inputs):
        raise _NotLinear("its backward does not return one gradient per input")
    used: set[fx.Node] = set()

    def is_input(node: Any, pos: int) -> bool:
        node = _strip(node, used)
        return node is grad if pos < 0 else position.get(node) == pos

    def matmul(node: Any) -> tuple[Any, Any]:
        node = _strip(node, used)
        if not (isinstance(node, fx.Node) and target_name(node) in _MATMUL and len(node.args) == 2):
            raise _NotLinear(f"its backward computes a gradient by {_what(node)}, not a GEMM")
        used.add(node)
        return node.args

    for pos, g in enumerate(grads):
        if pos == linear.x:
            a, b = matmul(g)
            ok = is_input(a, -1) and is_input(b, linear.weight)
        elif pos == linear.weight:
            a, b = matmul(g)
            a = _strip(a, used)
            ok = _is_transpose_2d(a) and is_input(a.args[0], -1) and is_input(b, linear.x)
            used.add(a)
        elif pos == linear.bias:
            g = _strip(g, used)
            used.add(g)
            dims = g.args[1:] or (g.kwargs.get("dim"),)
            ok = target_name(g) in _SUM and is_input(g.args[0], -1) and tuple(dims) in ((0,), ([0],), ((0,),))
        else:
            ok = g is None
        if not ok:
            raise _NotLinear(f"its backward's gradient for input {pos} is not the linear's")
    extra = []
    for n in _calls(bwd):
        kind = target_name(n)
        if n in used or kind in _GRAD_MODE or kind.endswith("_exit_autocast"):
            continue
        if kind.endswith("_enter_autocast") and len(n.args) > 2 and n.args[2] is False:
            continue  # a disabled autocast region: the GEMMs run in the inputs' dtype, as autograd's would
        extra.append(kind)
    if extra:
        raise _NotLinear(f"its backward also calls {', '.join(dict.fromkeys(extra))}")


def _linear_of(gm: fx.GraphModule, node: fx.Node) -> _Linear:
    fwd, bwd = (fetch_attr(gm, str(a.target)) for a in node.args[:2])
    if not isinstance(fwd, fx.GraphModule) or not isinstance(bwd, fx.GraphModule):
        raise _NotLinear("its subgraphs are not available")
    if node.kwargs.get("non_differentiable_idx"):
        raise _NotLinear("it marks outputs non-differentiable")
    if any(u.op != "call_function" or u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
        raise _NotLinear("more than its first output is used")
    linear, saved, num_outputs = _forward_linear(fwd)
    _check_backward(bwd, fwd, linear, saved, num_outputs)
    return linear


def _inline(gm: fx.GraphModule, node: fx.Node, linear: _Linear) -> None:
    operands = node.args[2:]
    fwd = fetch_attr(gm, str(node.args[0].target))
    matmul = next(n for n in fwd.graph.nodes if target_name(n) in _MATMUL)
    graph = gm.graph
    with graph.inserting_before(node):
        wt = graph.call_method("t", (operands[linear.weight],))
        y = graph.call_function(torch.matmul, (operands[linear.x], wt))
        y.meta[FUNCTION_INLINED_META] = True
        wt.meta.update({k: v for k, v in matmul.args[1].meta.items() if k == "example_value"})
        y.meta.update({k: v for k, v in matmul.meta.items() if k == "example_value"})
        if linear.bias is not None:
            y = graph.call_function(operator.add, (y, operands[linear.bias]))
    for user in list(node.users):
        if "example_value" in user.meta:
            y.meta["example_value"] = user.meta["example_value"]
        user.replace_all_uses_with(y)
        graph.erase_node(user)
    graph.erase_node(node)


def inline_linear_functions(gm: fx.GraphModule, example_inputs: list[Any] | None = None) -> list[str]:
    """Replace each ``autograd_function_apply`` on an expert weight of a module list that is exactly a linear
    (module doc) by its forward in place; the others get the reason in ``node.meta[FUNCTION_KEPT_META]``. Returns
    a description of each inlined Function."""
    resolver = ParamResolver(gm, example_inputs)
    done = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not target_name(node).endswith(_APPLY):
            continue
        operands = node.args[2:]
        fqns = [r[0] if isinstance(a, fx.Node) and (r := resolver.resolve(a)) else None for a in operands]
        if not any(f is not None and listed_expert_key(f) is not None for f in fqns):
            continue
        try:
            linear = _linear_of(gm, node)
        except _NotLinear as why:
            node.meta[FUNCTION_KEPT_META] = f"not inlined: {why}"
            continue
        weight = fqns[linear.weight]
        if weight is None or listed_expert_key(weight) is None:
            continue
        _inline(gm, node, linear)
        what = f"autograd.Function on {weight} inlined as its linear (x @ w.t())"
        logger.info("moeq: %s", what)
        done.append(what)
    if done:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return done
