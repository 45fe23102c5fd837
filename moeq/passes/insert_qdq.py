"""Insert per-expert quantizers around each expert GEMM found by :mod:`moeq.passes.find`.

For every :class:`~moeq.passes.find.ExpertGemm` the weight parameter is routed through its
:class:`~moeq.state.ExpertQuantState` (``role="weight"``: fake quant in its stored layout, before any
transpose) and the activation through the same state (``role="input"``: observer while calibrating,
fake quant after ``finalize()``). The states are shared with the model, so every graph rewritten from
the same model reads and writes the same statistics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from moeq.formats import FLOAT_DTYPES, get_format
from moeq.passes.canonicalize import canonicalize_expert_loops
from moeq.passes.explain import GraphReport, RewrittenGemm
from moeq.passes.find import ExpertGemm, SkippedCandidate, find_expert_gemms, target_name
from moeq.passes.inline_checkpoint import tag_inserted_nodes
from moeq.passes.inline_functions import inline_linear_functions
from moeq.segments import single_expert_offsets
from moeq.state import CODES_BUFFERS, ExpertQuantState, ModelQuantState

__all__ = ["LiftedBuffer", "insert_qdq", "rewrite_graph"]

logger = logging.getLogger(__name__)

_META_KEYS = ("val", "example_value", "tensor_meta")
_FROZEN = ("frozen_data", "frozen_scale", "frozen_block_scale")

#: lifted state buffers are static graph inputs (CUDA-graph replays read them in place); False restores ordinary
#: inputs, which cudagraph trees copy at every replay (for ``benchmarks/bench_cudagraphs.py``'s comparison)
STATIC_STATE_INPUTS = True


def _validate(rec: ExpertGemm, state: ModelQuantState) -> None:
    if rec.weight_dtype is not None and rec.weight_dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{rec.weight_fqn}: expert weight has dtype {rec.weight_dtype}; moeq quantizes float32/bfloat16/float16 "
            "weights (is this weight already quantized?)"
        )
    for fmt_name, what in ((state.config.weight, "weight"), (state.config.activation, "activation")):
        if fmt_name is None:
            continue
        fmt = get_format(fmt_name)
        try:
            fmt.check_shape(rec.weight_shape, rec.contraction_dim, what=f"expert weight {rec.weight_fqn}")
        except ValueError as err:
            raise ValueError(f"{err} (needed for the {what} format {fmt_name})") from None


@dataclass(frozen=True)
class LiftedBuffer:
    """A state buffer lifted to a trailing graph input. ``weight_index``: position among the graph's
    inputs of the expert weight it belongs to (None for a get_attr weight). A compiled graph is reused
    by Dynamo for every module running the same code (e.g. each decoder layer after a graph break), so
    the runner resolves the buffer from the weight actually passed, not from the one seen at compile."""

    state: ExpertQuantState
    name: str
    weight_index: int | None


def _copy_meta(dst: fx.Node, src: fx.Node) -> None:
    for key in _META_KEYS:
        if key in src.meta:
            dst.meta[key] = src.meta[key]


class _Quantizers:
    """Emits the quantizer nodes of one expert state, in one of two styles.

    ``lift_state=False`` (``quantize_graph``): a ``call_module`` of the shared
    :class:`~moeq.state.ExpertQuantState`, which reads the calibration mode at run time.
    ``lift_state=True`` (the compile backend): the state's buffers become extra graph inputs and the
    ``moeq::`` ops of the *current* mode are called directly, so AOTAutograd and Inductor see plain
    custom ops on plain inputs; Dynamo's guard on the mode recompiles when it changes.
    """

    def __init__(self, gm: fx.GraphModule, state: ModelQuantState, lift_state: bool) -> None:
        self.gm, self.state, self.lift_state = gm, state, lift_state
        self.graph = gm.graph
        self.lifted: list[LiftedBuffer] = []
        self._placeholders: dict[tuple[str, str], fx.Node] = {}
        inputs = [n for n in self.graph.nodes if n.op == "placeholder"]
        self._input_index = {n: i for i, n in enumerate(inputs)}
        self._weight_index: dict[str, int | None] = {}

    def bind(self, est: ExpertQuantState, weight: fx.Node) -> None:
        self._weight_index.setdefault(est.fqn, self._input_index.get(weight))

    def _buffer(self, est: ExpertQuantState, name: str) -> fx.Node:
        key = (est.fqn, name)
        if key not in self._placeholders:
            last = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
            with self.graph.inserting_after(last):
                node = self.graph.placeholder(f"{graph_name(est.fqn)}_{name}")
            node.meta["example_value"] = _fake(getattr(est, name))
            node._dynamo_source = None  # type: ignore[attr-defined]  # not a user input; AOT accepts None
            # a static input for CUDA graphs, as Dynamo marks parameters: replays read the buffer where it is
            # (updated in place: finalize, reuse_weight_codes) instead of copying it into the graph's memory
            if STATIC_STATE_INPUTS:
                node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
            self._placeholders[key] = node
            self.lifted.append(LiftedBuffer(est, name, self._weight_index.get(est.fqn)))
        return self._placeholders[key]

    def weight(self, est: ExpertQuantState, name: str, w: fx.Node, expert: int | None = None) -> fx.Node | None:
        """The quantized weight; ``expert``: the index of a module list's 2-D weight in the stacked state (its
        one-expert slices of the state's buffers quantize it as ``[1, *weight]``)."""
        if not self.lift_state:
            return self.graph.call_module(name, (w,), {"role": "weight", "expert": expert})
        if est.mode not in ("deploy", "quantize"):
            return None
        if est.mode == "deploy":
            buffers = [self._expert_slice(self._buffer(est, b), expert) for b in _FROZEN]
            op = torch.ops.moeq.dequant_weight.default
            args = (*buffers, est.config.weight, est.contraction_dim, est.frozen_dtype)
        else:
            amax = self._expert_slice(self._buffer(est, "weight_amax"), expert)
            if expert is not None:
                w = self.graph.call_function(torch.ops.aten.unsqueeze.default, (w, 0))
            if est.codes_reused:  # moeq.reuse_weight_codes
                codes = [self._expert_slice(self._buffer(est, b), expert) for b in CODES_BUFFERS]
                copy = self._buffer(est, "codes_dequantized") if est.codes_dequantized.numel() else None
                dequantized = self._expert_slice(copy, expert) if copy is not None else None
                op = torch.ops.moeq.fake_quant_weight_from_codes.default
                args = (w, amax, *codes, est.config.weight, est.expert_dim, est.contraction_dim, dequantized)
            else:
                op = torch.ops.moeq.fake_quant_weight.default
                args = (w, amax, est.config.weight, est.expert_dim, est.contraction_dim)
        wq = self.graph.call_function(op, args)
        return wq if expert is None else self.graph.call_function(torch.ops.aten.squeeze.dim, (wq, 0))

    def _expert_slice(self, buffer: fx.Node, expert: int | None) -> fx.Node:
        """``buffer[expert:expert + 1]`` (all of it for a stacked weight, or where the buffer is empty)."""
        if expert is None or buffer.meta["example_value"].numel() == 0:
            return buffer
        return self.graph.call_function(torch.ops.aten.slice.Tensor, (buffer, 0, expert, expert + 1))

    def input(self, est: ExpertQuantState, name: str, rec: ExpertGemm) -> fx.Node | None:
        if not self.lift_state:
            kwargs = {"role": "input", "expert_dim": rec.input_expert_dim, "contraction_dim": rec.input_contraction_dim}
            return self.graph.call_module(name, (rec.input, rec.offs), kwargs)
        if est.mode == "calibrate":
            obs, counts = self._buffer(est, "observed_input_amax"), self._buffer(est, "tokens_per_expert")
            op = torch.ops.moeq.observe_segments_.default
            args = (rec.input, rec.offs, obs, counts, rec.input_expert_dim, rec.input_contraction_dim)
            self.graph.call_function(op, args)
            return None
        if est.mode in ("quantize", "deploy") and est.config.dynamic_activations:
            op = torch.ops.moeq.fake_quant_act_dynamic.default
            args = (rec.input, rec.offs, est.config.activation, rec.input_expert_dim, rec.input_contraction_dim)
            return self.graph.call_function(op, args)
        if est.mode in ("quantize", "deploy") and est.config.activation is not None:
            amax = self._buffer(est, "input_amax")
            op = torch.ops.moeq.fake_quant_act.default
            args = (rec.input, rec.offs, amax, est.config.activation, rec.input_expert_dim, rec.input_contraction_dim)
            return self.graph.call_function(op, args)
        return None


def graph_name(fqn: str) -> str:
    """An identifier for a state's graph nodes and submodule: ``moeq_`` and the FQN (``*`` of a module list's key
    as ``x``)."""
    return "moeq_" + fqn.replace(".", "_").replace("*", "x")


def _fake(t: torch.Tensor) -> Any:
    """The example value of a lifted state buffer: a fake tensor of static shape. Its sizes never change, and a
    dynamic (duck-sized) one would share symbols with the graph's sizes without a source Dynamo can guard on."""
    from torch._guards import TracingContext

    ctx = TracingContext.try_get()
    if ctx is None or ctx.fake_mode is None:
        return t
    return ctx.fake_mode.from_tensor(t, static_shapes=True)


def insert_qdq(
    gm: fx.GraphModule, records: list[ExpertGemm], state: ModelQuantState, lift_state: bool = False
) -> list[LiftedBuffer]:
    """Rewrite ``gm`` in place: quantizers on the weight and input of each record (excluded FQNs are
    left alone). Returns the state buffers lifted to extra graph inputs, in order."""
    graph = gm.graph
    emit = _Quantizers(gm, state, lift_state)
    weight_done: set[fx.Node] = set()
    for rec in records:
        if state.excluded(rec.weight_fqn):
            continue
        _validate(rec, state)
        est = state.get_or_create(
            rec.weight_fqn, rec.weight_shape, rec.expert_dim, rec.contraction_dim, rec.weight_device
        )
        name = graph_name(rec.weight_fqn)
        emit.bind(est, rec.weight)
        if not lift_state and getattr(gm, name, None) is not est:
            gm.add_submodule(name, est)
        if rec.weight not in weight_done:
            weight_done.add(rec.weight)
            users = set(rec.weight.users)
            first_user = min(users, key=lambda n: _order(graph, n))
            with graph.inserting_before(first_user):
                wq = emit.weight(est, name, rec.weight, rec.listed_expert)
            if wq is not None:
                _copy_meta(wq, rec.weight)
                rec.weight.replace_all_uses_with(wq, delete_user_cb=lambda user, users=users: user in users)
        with graph.inserting_before(rec.node):
            if rec.listed_expert is not None:  # all of this GEMM's rows are the one expert's: offsets to say so
                rec.offs = graph.call_function(single_expert_offsets, (rec.input, rec.listed_expert, rec.num_experts))
            xq = emit.input(est, name, rec)
        if xq is not None:
            _copy_meta(xq, rec.input)
            rec.node.replace_input_with(rec.input, xq)
    graph.lint()
    gm.recompile()
    return emit.lifted


def _order(graph: fx.Graph, node: fx.Node) -> int:
    for i, n in enumerate(graph.nodes):
        if n is node:
            return i
    return 0


def rewrite_graph(
    gm: fx.GraphModule,
    state: ModelQuantState,
    example_inputs: list[Any] | None = None,
    kind: str = "fx",
    lift_state: bool = False,
) -> tuple[GraphReport, list[LiftedBuffer]]:
    """Find + insert on one graph. The report is stored on ``state`` for ``explain()`` and returned with
    the lifted state buffers (see :func:`insert_qdq`). Autograd Functions that are exactly a linear on an expert weight
    are first inlined (:func:`moeq.passes.inline_functions.inline_linear_functions`) and whole per-expert loops
    rewritten into one grouped GEMM (:func:`moeq.passes.canonicalize.canonicalize_expert_loops`). Nodes added inside
    an inlined activation-checkpoint region join it (:func:`moeq.passes.inline_checkpoint.tag_inserted_nodes`)."""
    before = set(gm.graph.nodes)
    inline_linear_functions(gm, example_inputs)
    canonicalize_expert_loops(gm, example_inputs)
    records, skipped = find_expert_gemms(gm, example_inputs)
    kept = []
    for rec in records:
        pattern = state.excluded(rec.weight_fqn)
        if pattern is None:
            kept.append(rec)
            continue
        reason = f"excluded by QuantConfig.exclude pattern {pattern!r}"
        skipped.append(SkippedCandidate(rec.node.name, target_name(rec.node), reason, rec.weight_fqn, "expert"))
    report_rows = [
        RewrittenGemm(
            fqn=r.weight_fqn,
            form=r.form,
            node=r.node.name,
            num_experts=r.num_experts,
            weight_shape=r.weight_shape,
            expert_dim=r.expert_dim,
            contraction_dim=r.contraction_dim,
            path=list(r.path),
            input_node=r.input.name,
            offs_node=r.offs.name if r.offs is not None else None,
            recomputed="ac_graph_id" in r.node.meta,
        )
        for r in kept
    ]
    lifted = insert_qdq(gm, kept, state, lift_state)
    tag_inserted_nodes(gm, before)
    report = GraphReport(kind=kind, rewritten=report_rows, skipped=skipped)
    state.reports[report.signature()] = report
    logger.info(
        "moeq: %s graph: %d expert GEMMs rewritten, %d candidates skipped", kind, len(report_rows), len(skipped)
    )
    return report, lifted
