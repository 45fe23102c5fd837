"""Find the grouped-GEMM expert computations of an FX graph (torch-level Dynamo or ATen-level export).

A grouped-GEMM expert node computes ``y[rows of e] = x[rows of e] @ W[e]`` for all experts at once.
:func:`find_expert_gemms` returns one :class:`ExpertGemm` per such node, with the weight followed back
through ``transpose`` / ``permute`` / ``t`` / shape-preserving ``view`` / dtype casts to its parameter
(FQN, expert dim and contraction dim in the parameter's own layout), and one :class:`SkippedCandidate`
with a reason for every other GEMM-like node it looked at.

Experts kept as a module list of separate 2-D weights (``local_experts.3.linear_fc1.weight``) are found GEMM by GEMM
on the list's stacked view: ``weight_fqn`` is the list's key with ``*`` for the expert index, ``weight_shape``
``[E, *weight]`` and ``listed_expert`` the GEMM's expert, when the graph multiplies every expert of the list the same
number of times (once per pass over the list; ``calib="all_experts"`` runs a calibration pass before the routed one).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from moeq.state import listed_expert_key, owner_of

__all__ = [
    "FUNCTION_INLINED_META",
    "FUNCTION_KEPT_META",
    "LOOP_KEPT_META",
    "LOOP_META",
    "MODULE_LIST_FORM",
    "ExpertGemm",
    "SkippedCandidate",
    "find_expert_gemms",
    "listed_expert_key",
    "target_name",
]

#: the ``form`` of a per-expert module-list GEMM (a suffix says how it was reached)
MODULE_LIST_FORM = "per-expert module list"
#: ``node.meta`` key of a grouped node that :mod:`moeq.passes.canonicalize` made from a per-expert loop
LOOP_META = "moeq_per_expert_loop"
#: ``node.meta`` key of a loop GEMM that :mod:`moeq.passes.canonicalize` recognized but left alone: why
LOOP_KEPT_META = "moeq_per_expert_loop_kept"
#: ``node.meta`` key of an ``autograd_function_apply`` that :mod:`moeq.passes.inline_functions` did not inline: why
FUNCTION_KEPT_META = "moeq_autograd_function_kept"
#: ``node.meta`` key of the GEMM that :mod:`moeq.passes.inline_functions` made from an ``autograd.Function``
FUNCTION_INLINED_META = "moeq_autograd_function_inlined"

_GROUPED = {
    "torch._grouped_mm",
    "torch.nn.functional.grouped_mm",
    "aten._grouped_mm",
    "transformers.grouped_mm_fallback",
}
_BMM = {"torch.bmm", "method:bmm", "aten.bmm", "torch.matmul", "method:matmul", "_operator.matmul", "aten.matmul"}
_EINSUM = {"torch.einsum", "torch.functional.einsum", "aten.einsum"}
# dense GEMMs and which positional arg holds the weight
_DENSE = {
    "torch._C._nn.linear": 1,
    "torch.nn.functional.linear": 1,
    "aten.linear": 1,
    "torch.mm": 1,
    "method:mm": 1,
    "aten.mm": 1,
    "torch.addmm": 2,
    "aten.addmm": 2,
}
TRANSPOSE_TARGETS = {"torch.transpose", "method:transpose", "aten.transpose", "torch.swapaxes", "method:swapaxes"}
_PERMUTE = {"torch.permute", "method:permute", "aten.permute"}
T_TARGETS = {"torch.t", "method:t", "aten.t"}
_IDENTITY = {
    "method:to",
    "method:contiguous",
    "method:float",
    "method:bfloat16",
    "method:half",
    "method:type",
    "method:detach",
    "method:clone",
    "torch.detach",
    "torch.clone",
    "aten._to_copy",
    "aten.to",
    "aten.contiguous",
    "aten.clone",
    "aten.detach",
    "aten.alias",
    "aten.lift_fresh_copy",
}
_RESHAPE = {
    "method:view",
    "method:reshape",
    "torch.reshape",
    "aten.view",
    "aten.reshape",
    "aten._unsafe_view",
    "aten.expand",
    "method:expand",
}
_GATHER = {
    "_operator.getitem",
    "aten.select",
    "aten.index",
    "aten.index_select",
    "torch.index_select",
    "aten.slice",
    "method:__getitem__",
    "method:select",
}


@dataclass
class ExpertGemm:
    """One grouped-GEMM expert node and where its operands come from."""

    node: fx.Node
    form: str
    input: fx.Node
    offs: fx.Node | None
    weight: fx.Node  # the parameter node (placeholder or get_attr)
    weight_fqn: str
    weight_shape: tuple[int, ...]
    weight_dtype: torch.dtype | None
    weight_device: torch.device | None
    expert_dim: int  # in the parameter's layout
    contraction_dim: int  # in the parameter's layout
    input_expert_dim: int = 0  # batched forms (offs is None)
    input_contraction_dim: int = -1
    path: list[str] = field(default_factory=list)  # ops between the parameter and the GEMM
    #: expert index of a 2-D weight in a per-expert module list (``weight_fqn`` is then the list's
    #: ``experts.*.`` key and ``weight_shape`` the list stacked, ``[E, *weight]``); None for stacked weights
    listed_expert: int | None = None
    #: the experts of that module list in the model (None where the graph's weights are not a prepared model's)
    listed_total: int | None = None

    @property
    def num_experts(self) -> int:
        return self.weight_shape[self.expert_dim]


@dataclass
class SkippedCandidate:
    """A GEMM-like node that was considered and not rewritten, and why."""

    node: str
    target: str
    reason: str
    weight_fqn: str | None = None
    category: str = "dense"


def target_name(node: fx.Node) -> str:
    """A stable, readable name for a node's target: ``aten._grouped_mm``, ``method:transpose`` (also for
    ``torch.Tensor.transpose`` called as a function), ..."""
    if node.op == "call_method":
        return f"method:{node.target}"
    if node.op == "call_module":
        return f"module:{node.target}"
    target = node.target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        name = str(target)
        return (
            name[: -len(".default")]
            if name.endswith(".default")
            else re.sub(r"\.(int|dtype|dtype_layout|Tensor)$", "", name)
        )
    if target is operator.matmul:
        return "_operator.matmul"
    if target is operator.getitem:
        return "_operator.getitem"
    try:
        name = fx.node._get_qualified_name(target)  # type: ignore[arg-type]
    except Exception:
        return str(target)
    # Dynamo records some tensor-method calls as ``call_function(torch.Tensor.split, ...)``: the same op
    return f"method:{name[len('torch.Tensor.') :]}" if name.startswith("torch.Tensor.") else name


def node_shape(node: Any) -> tuple[int, ...] | None:
    """A node's shape from its ``val`` / ``example_value`` / ``tensor_meta`` meta (sizes may be SymInts); None if
    the node carries none."""
    if not isinstance(node, fx.Node):
        return None
    for key in ("val", "example_value"):
        val = node.meta.get(key)
        if isinstance(val, torch.Tensor):
            return tuple(val.shape)
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    """The object a ``get_attr`` node's dotted ``target`` names on ``gm``."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


_SOURCE_PARTS = re.compile(r"\['([^']+)'\]|\.([A-Za-z_][A-Za-z0-9_]*)")


def _fqn_from_source(name: str) -> str:
    """``L['self']._modules['mlp']._modules['experts']._parameters['w1']`` -> ``mlp.experts.w1``."""
    name = re.sub(r"^[LG]\[['\"][^'\"]+['\"]\]", "", name)  # the frame local (self, or whatever it is named)
    parts = [a or b for a, b in _SOURCE_PARTS.findall(name)]
    parts = [p for p in parts if p not in ("_modules", "_parameters", "_buffers")]
    return ".".join(parts)


def _fqn_from_placeholder_name(name: str) -> str:
    """Dynamo's placeholder naming: ``l_self_modules_mlp_modules_experts_parameters_w1_`` -> ``mlp.experts.w1``."""
    body = re.sub(r"^l_[a-z0-9]+_", "", name).rstrip("_")
    body = re.sub(r"^(modules|parameters|buffers)_", "", body)
    return re.sub(r"_(modules|parameters|buffers)_", ".", body)


class ParamResolver:
    """Maps placeholder / get_attr nodes to (FQN, tensor) of the parameter they hold."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list[Any] | None) -> None:
        self.gm = gm
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.values = dict(zip(placeholders, example_inputs)) if example_inputs is not None else {}

    def resolve(self, node: fx.Node) -> tuple[str, torch.Tensor | None] | None:
        if node.op == "get_attr":
            value = fetch_attr(self.gm, str(node.target))
            if not isinstance(value, torch.Tensor):
                return None
            owner = owner_of(value)
            return (owner[1] if owner else str(node.target)), value
        if node.op == "placeholder":
            value = self.values.get(node)
            if isinstance(value, torch.Tensor):
                owner = owner_of(value)
                if owner is not None:
                    return owner[1], value
                if not isinstance(value, torch.nn.Parameter):
                    return None
            grapharg = node.meta.get("grapharg")
            source = getattr(grapharg, "source", None) or getattr(node, "_dynamo_source", None)
            if source is not None:
                name = source.name
                if "_parameters" in name or "_modules" in name:
                    return _fqn_from_source(name), value if isinstance(value, torch.Tensor) else None
            if "_parameters_" in node.name:
                return _fqn_from_placeholder_name(node.name), value if isinstance(value, torch.Tensor) else None
        return None


@dataclass
class _WeightTrace:
    root: fx.Node | None
    fqn: str | None = None
    tensor: torch.Tensor | None = None
    chain: list[fx.Node] = field(default_factory=list)  # GEMM-side first
    failure: str | None = None


def _first_tensor_arg(node: fx.Node) -> fx.Node | None:
    arg = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    return arg if isinstance(arg, fx.Node) else None


def _trace_weight(node: Any, resolver: ParamResolver) -> _WeightTrace:
    """Follow a GEMM operand back through view-like ops to a parameter."""
    chain: list[fx.Node] = []
    cur = node
    while isinstance(cur, fx.Node):
        if cur.op in ("placeholder", "get_attr"):
            resolved = resolver.resolve(cur)
            if resolved is None:
                return _WeightTrace(cur, chain=chain, failure="operand is a graph input, not a parameter")
            return _WeightTrace(cur, resolved[0], resolved[1], chain)
        kind = target_name(cur)
        if kind in TRANSPOSE_TARGETS | _PERMUTE | T_TARGETS | _IDENTITY:
            chain.append(cur)
            cur = _first_tensor_arg(cur)
            continue
        if kind in _RESHAPE:
            src = _first_tensor_arg(cur)
            if src is not None and node_shape(src) is not None and node_shape(src) == node_shape(cur):
                chain.append(cur)
                cur = src
                continue
            return _WeightTrace(
                None,
                chain=chain,
                failure=f"operand reaches the GEMM through a reshape ({kind}) that may move the expert or contraction dim",
            )
        if kind in _GATHER:
            src = _first_tensor_arg(cur)
            inner = _trace_weight(src, resolver) if src is not None else None
            if inner is not None and inner.fqn is not None:
                return _WeightTrace(
                    None, inner.fqn, inner.tensor, chain, failure=f"per-expert slice ({kind}) of parameter {inner.fqn}"
                )
            return _WeightTrace(None, chain=chain, failure=f"operand is computed by {kind}")
        return _WeightTrace(None, chain=chain, failure=f"operand is computed by {kind}, not a parameter")
    return _WeightTrace(None, failure="operand is not a tensor node")


def _normalize(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _map_dims(trace: _WeightTrace, rank: int) -> list[int] | None:
    """For each dim of the GEMM operand, the parameter dim it comes from (None if unknown)."""
    cur = list(range(rank))
    for node in reversed(trace.chain):  # parameter side first
        kind = target_name(node)
        if kind in TRANSPOSE_TARGETS:
            d0 = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim0")
            d1 = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim1")
            if not isinstance(d0, int) or not isinstance(d1, int):
                return None
            d0, d1 = _normalize(d0, rank), _normalize(d1, rank)
            cur[d0], cur[d1] = cur[d1], cur[d0]
        elif kind in _PERMUTE:
            dims = (
                node.args[1:]
                if len(node.args) > 2
                else (node.args[1] if len(node.args) > 1 else node.kwargs.get("dims"))
            )
            dims = list(dims) if isinstance(dims, (list, tuple)) else None
            if dims is None or not all(isinstance(d, int) for d in dims) or len(dims) != rank:
                return None
            cur = [cur[_normalize(d, rank)] for d in dims]
        elif kind in T_TARGETS:
            if rank != 2:
                return None
            cur = [cur[1], cur[0]]
    return cur


def _parse_einsum(eq: str) -> tuple[str, str, str] | None:
    eq = eq.replace(" ", "")
    if "..." in eq or "->" not in eq:
        return None
    lhs, out = eq.split("->")
    ops = lhs.split(",")
    return (ops[0], ops[1], out) if len(ops) == 2 else None


def find_expert_gemms(
    gm: fx.GraphModule, example_inputs: list[Any] | None = None
) -> tuple[list[ExpertGemm], list[SkippedCandidate]]:
    """Every grouped-GEMM expert node of ``gm``, plus every GEMM-like node not taken, with its reason."""
    resolver = ParamResolver(gm, example_inputs)
    found: list[ExpertGemm] = []
    skipped: list[SkippedCandidate] = []

    def skip(node: fx.Node, reason: str, fqn: str | None = None, category: str = "expert") -> None:
        skipped.append(SkippedCandidate(node.name, target_name(node), reason, fqn, category))

    for node in gm.graph.nodes:
        if node.op == "call_module":
            _classify_leaf_module(gm, node, skip)
            continue
        if node.op not in ("call_function", "call_method"):
            continue
        kind = target_name(node)
        if kind in _GROUPED:
            _match_grouped(node, kind, resolver, found, skip)
        elif kind in _BMM:
            _match_batched(node, kind, resolver, found, skip)
        elif kind in _EINSUM:
            _match_einsum(node, resolver, found, skip)
        elif kind in _DENSE:
            _classify_dense(node, _DENSE[kind], resolver, found, skip)
        elif kind.endswith("autograd_function_apply"):
            _classify_autograd_function(node, resolver, skip)
    return _group_listed_experts(found, skip), skipped


def _arg(node: fx.Node, index: int, name: str) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


def _record(
    node: fx.Node,
    form: str,
    x: fx.Node,
    offs: fx.Node | None,
    trace: _WeightTrace,
    op_expert_dim: int,
    op_k_dim: int,
    x_expert_dim: int,
    x_k_dim: int,
    stacked: bool = True,
) -> ExpertGemm | str:
    tensor = trace.tensor
    shape = tuple(tensor.shape) if tensor is not None else node_shape(trace.root)
    if shape is None:
        return f"parameter {trace.fqn} has no shape information"
    if stacked and len(shape) != 3:
        return f"parameter {trace.fqn} is {len(shape)}-D, not a 3-D stacked expert weight"
    dims = _map_dims(trace, len(shape))
    if dims is None:
        return f"cannot follow the dims of {trace.fqn} through {[target_name(n) for n in trace.chain]}"
    assert trace.root is not None and trace.fqn is not None
    return ExpertGemm(
        node=node,
        form=form,
        input=x,
        offs=offs,
        weight=trace.root,
        weight_fqn=trace.fqn,
        weight_shape=shape,
        weight_dtype=tensor.dtype if tensor is not None else None,
        weight_device=tensor.device if tensor is not None else None,
        expert_dim=dims[op_expert_dim],
        contraction_dim=dims[op_k_dim],
        input_expert_dim=x_expert_dim,
        input_contraction_dim=x_k_dim,
        path=[target_name(n) for n in reversed(trace.chain)],
    )


def _match_grouped(node, kind, resolver, found, skip) -> None:
    a, b = (
        _arg(node, 0, "mat_a" if "transformers" not in kind else "input"),
        _arg(node, 1, "mat_b" if "transformers" not in kind else "weight"),
    )
    offs = _arg(node, 2, "offs")
    if offs is None:
        return skip(node, "grouped_mm without offs: not grouped by expert")
    trace = _trace_weight(b, resolver)
    if trace.failure is not None:
        a_trace = _trace_weight(a, resolver)
        if a_trace.failure is None:
            return skip(
                node, f"3-D x 2-D grouped_mm with parameter {a_trace.fqn} as mat_a (weight-gradient form)", a_trace.fqn
            )
        return skip(node, f"weight (mat_b) {trace.failure}", trace.fqn)
    form = "transformers.grouped_mm_fallback" if "transformers" in kind else "grouped_mm"
    if node.meta.get(LOOP_META) is not None:
        form = "per-expert loop as grouped_mm"
    rec = _record(node, form, a, offs, trace, 0, 1, 0, -1)
    if isinstance(rec, str):
        return skip(node, rec, trace.fqn)
    found.append(rec)


def _match_batched(node, kind, resolver, found, skip) -> None:
    a, b = _arg(node, 0, "input"), _arg(node, 1, "mat2" if "bmm" in kind else "other")
    shapes = (node_shape(a), node_shape(b))
    tb, ta = _trace_weight(b, resolver), _trace_weight(a, resolver)
    if tb.failure is None:
        trace, x, k_w, k_x = tb, a, 1, 2
    elif ta.failure is None:
        trace, x, k_w, k_x = ta, b, 2, 1
    else:
        if "matmul" not in kind:
            fqn = tb.fqn or ta.fqn
            return skip(
                node,
                f"no 3-D parameter operand ({tb.failure}; {ta.failure})",
                fqn,
                "activation" if fqn is None else "expert",
            )
        return skip(node, "matmul without a parameter operand (activation x activation)", None, "activation")
    if "matmul" in kind and any(s is not None and len(s) != 3 for s in shapes):
        if _weight_rank(trace) == 2:  # x @ w.t() on a 2-D parameter (Megatron's linears): per expert or dense
            if trace is tb:
                return _match_listed(node, a, trace, 0, found, skip)
            return _skip_2d(node, trace.fqn, 2, skip)
        return skip(node, f"matmul of shapes {shapes}: not a batched expert GEMM", trace.fqn, "dense")
    form = "per-expert loop as bmm" if node.meta.get(LOOP_META) is not None else "bmm"
    rec = _record(node, form, x, None, trace, 0, k_w, 0, k_x)
    if isinstance(rec, str):
        return skip(node, rec, trace.fqn, "dense" if "2-D" in rec else "expert")
    found.append(rec)


def _match_einsum(node, resolver, found, skip) -> None:
    eq = node.args[0] if node.args else None
    operands = list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    parsed = _parse_einsum(eq) if isinstance(eq, str) else None
    if parsed is None or len(operands) != 2:
        return skip(node, f"einsum {eq!r}: only two-operand equations with an explicit output are recognized")
    subs = parsed[:2]
    out = parsed[2]
    for w_idx in (1, 0):
        trace = _trace_weight(operands[w_idx], resolver)
        if trace.failure is not None:
            continue
        w_sub, x_sub = subs[w_idx], subs[1 - w_idx]
        batch = [c for c in w_sub if c in x_sub and c in out]
        contract = [c for c in w_sub if c in x_sub and c not in out]
        if len(batch) != 1 or len(contract) != 1:
            return skip(node, f"einsum {eq!r}: needs exactly one expert (batch) and one contraction index", trace.fqn)
        e, k = batch[0], contract[0]
        rec = _record(
            node,
            "einsum",
            operands[1 - w_idx],
            None,
            trace,
            w_sub.index(e),
            w_sub.index(k),
            x_sub.index(e),
            x_sub.index(k),
        )
        if isinstance(rec, str):
            return skip(node, rec, trace.fqn)
        found.append(rec)
        return None
    return skip(node, f"einsum {eq!r} has no 3-D parameter operand", None, "activation")


def _weight_rank(trace: _WeightTrace) -> int | str:
    """The traced parameter's rank ("?" where the graph does not say)."""
    shape = tuple(trace.tensor.shape) if trace.tensor is not None else node_shape(trace.root)
    return len(shape) if shape is not None else "?"


def _skip_2d(node: fx.Node, fqn: str | None, rank: int | str, skip, why: str | None = None) -> None:
    """A GEMM on a 2-D parameter moeq does not quantize: one expert of a per-expert module list that cannot be
    rewritten (``why``; reported as an expert GEMM), else a dense GEMM."""
    listed = listed_expert_key(fqn or "")
    if listed is not None and rank == 2:
        return skip(node, f"2-D weight of expert {listed[1]} in a per-expert module list: {why}, not quantized", fqn)
    return skip(
        node,
        f"dense GEMM on {rank}-D weight: not a routed expert (attention, router, shared expert, dense MLP)",
        fqn,
        "dense",
    )


def _match_listed(node: fx.Node, x: Any, trace: _WeightTrace, op_k_dim: int, found, skip) -> None:
    """A GEMM of one expert's 2-D weight in a per-expert module list (Megatron ``SequentialMLP``, HF eager loops):
    recorded with its expert index (:func:`_group_listed_experts` completes it), else reported. ``op_k_dim``: the
    weight operand's contraction dim (1 for ``linear``, 0 for ``x @ w``)."""
    listed = listed_expert_key(trace.fqn or "")
    if listed is None or _weight_rank(trace) != 2:
        return _skip_2d(node, trace.fqn, _weight_rank(trace), skip)
    x_shape = node_shape(x)
    if x_shape is not None and len(x_shape) != 2:
        return _skip_2d(node, trace.fqn, 2, skip, f"its input is {len(x_shape)}-D (moeq takes [rows, K] tokens)")
    dims = _map_dims(trace, 2)
    if dims is None:
        return _skip_2d(node, trace.fqn, 2, skip, "cannot follow its dims through the graph")
    form = MODULE_LIST_FORM + (" (autograd.Function inlined)" if node.meta.get(FUNCTION_INLINED_META) else "")
    rec = _record(node, form, x, None, trace, 0, op_k_dim, 0, -1, stacked=False)
    if isinstance(rec, str):
        return _skip_2d(node, trace.fqn, 2, skip, rec)
    rec.weight_fqn, rec.listed_expert = listed
    rec.expert_dim, rec.contraction_dim = 0, dims[op_k_dim] + 1
    owner = owner_of(trace.tensor) if trace.tensor is not None else None
    if owner is not None and owner[0]._root is not None:
        rec.listed_total = len(owner[0].present_members(rec.weight_fqn))
    found.append(rec)


def _group_listed_experts(found: list[ExpertGemm], skip) -> list[ExpertGemm]:
    """Give the GEMMs of each module list one stacked view ``[E, *weight]`` (E: the experts the graph multiplies,
    which must be 0..E-1, each the same number of times, with one weight shape); a list that is not whole is
    reported GEMM by GEMM."""
    lists: dict[str, list[ExpertGemm]] = {}
    for rec in found:
        if rec.listed_expert is not None:
            lists.setdefault(rec.weight_fqn, []).append(rec)
    dropped: set[int] = set()
    for key, recs in lists.items():
        experts = sorted(r.listed_expert for r in recs)
        shapes = {r.weight_shape for r in recs}
        total = recs[0].listed_total or len(set(experts))
        passes = len(recs) // total
        why = None
        if experts != sorted(list(range(total)) * passes):
            why = f"the graph multiplies experts {experts} of the {total} in {key}, not each of them as often"
            if len(set(experts)) == len(experts) < total:
                why += (
                    " (the expert loop may be split over several graphs by graph breaks, e.g. at a data-dependent "
                    "torch.where / nonzero or .tolist(): try torch._dynamo.config.capture_dynamic_output_shape_ops "
                    "= True and capture_scalar_outputs = True)"
                )
        elif len(shapes) != 1:
            why = f"the experts of {key} have different weight shapes {sorted(shapes)}"
        for r in recs:
            if why is not None:
                dropped.add(id(r))
                _skip_2d(r.node, key.replace("*", str(r.listed_expert), 1), 2, skip, why)
            else:
                r.weight_shape = (total, *r.weight_shape)
    return [r for r in found if id(r) not in dropped]


def _classify_dense(node, weight_index, resolver, found, skip) -> None:
    w = _arg(node, weight_index, "weight" if weight_index == 1 else "mat2")
    trace = _trace_weight(w, resolver)
    if trace.failure is None:
        x = _arg(node, weight_index - 1, "input")
        return _match_listed(node, x, trace, 1 if weight_index == 1 and "linear" in target_name(node) else 0, found,
                             skip)  # fmt: skip
    if trace.fqn is not None:
        return skip(
            node,
            f"{trace.failure}: a per-expert loop, "
            + node.meta.get(LOOP_KEPT_META, "not a whole loop moeq can rewrite into one grouped GEMM")
            + " (use grouped_mm experts, or see moeq.passes.canonicalize)",
            trace.fqn,
            "expert",
        )
    return skip(node, f"weight {trace.failure}", None, "activation")


def _classify_autograd_function(node: fx.Node, resolver: ParamResolver, skip) -> None:
    """An ``autograd.Function`` Dynamo kept as a higher-order op (megatron's linears, with grad enabled) that takes a
    parameter and that :mod:`moeq.passes.inline_functions` did not inline: its GEMM is inside the function's
    subgraph, which moeq does not rewrite; reported with the inliner's reason, never dropped."""
    for arg in node.args:
        trace = _trace_weight(arg, resolver) if isinstance(arg, fx.Node) else None
        if trace is None or trace.failure is not None:
            continue
        listed = listed_expert_key(trace.fqn or "") is not None
        kept = node.meta.get(FUNCTION_KEPT_META)
        reason = (
            f"autograd.Function on parameter {trace.fqn} (kept whole by Dynamo with grad enabled, as megatron's linears)"
            + (f", {kept}" if kept else "")
            + ": moeq does not rewrite inside autograd Functions, so this GEMM is not quantized; "
            "a Function that is exactly a linear and its gradient is inlined and quantized (moeq.passes.inline_functions)"
        )
        return skip(node, reason, trace.fqn, "expert" if listed else "dense")
    return None


def _classify_leaf_module(gm: fx.GraphModule, node: fx.Node, skip) -> None:
    """Leaf modules kept by symbolic_trace: dense linears are reported like ``F.linear``."""
    module = gm.get_submodule(str(node.target))
    if isinstance(module, torch.nn.Linear):
        why = "a leaf nn.Linear call (symbolic_trace keeps it whole; trace with Dynamo or torch.export to quantize it)"
        _skip_2d(node, f"{node.target}.weight", 2, skip, why)
