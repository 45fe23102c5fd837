"""The ``moeq`` torch.compile backend: run the expert Q/DQ pass on each Dynamo graph, then Inductor.

``torch.compile(model, backend="moeq")`` after ``moeq.prepare(model, cfg)``. The pass reads the current
calibration mode while it rewrites; ``prepare()`` makes Dynamo guard on that mode, so switching between
calibrate / quantize recompiles the graph with the statistics kept on the model.
``backend="moeq_aot_eager"`` runs the same pass under AOTAutograd without Inductor (for debugging).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx

from moeq.lowering.ops import remove_expert_module_entries
from moeq.passes.find import find_expert_gemms
from moeq.passes.inline_checkpoint import inline_checkpointed_experts
from moeq.passes.insert_qdq import LiftedBuffer, rewrite_graph
from moeq.state import ExpertQuantState, ModelQuantState, is_listed_key, listed_expert_key, owner_of

__all__ = ["moeq_backend", "moeq_aot_eager_backend"]

logger = logging.getLogger(__name__)


def _state_of_graph(example_inputs: list[Any]) -> ModelQuantState | None:
    states = {
        id(o[0]): o[0] for o in (owner_of(t) for t in example_inputs if isinstance(t, torch.Tensor)) if o is not None
    }
    if len(states) > 1:
        raise RuntimeError("moeq backend: one compiled graph holds parameters of several prepared models")
    return next(iter(states.values()), None)


def _rewrite(gm: fx.GraphModule, example_inputs: list[Any]) -> list[LiftedBuffer]:
    """Rewrite ``gm``; returns the state buffers lifted to trailing graph inputs."""
    state = _state_of_graph(example_inputs)
    if state is None:
        records, _ = find_expert_gemms(gm, example_inputs)
        if records:
            names = sorted({r.weight_fqn for r in records})
            raise RuntimeError(
                f"moeq backend found {len(records)} expert GEMMs ({', '.join(names[:3])}, ...) in a model that was "
                "not prepared: call `model = moeq.prepare(model, cfg)` before torch.compile(model, backend='moeq')"
            )
        return []
    _, lifted = rewrite_graph(gm, state, example_inputs, kind="dynamo", lift_state=True)
    return lifted


def _state_for_weight(weight: Any, compiled_for: ExpertQuantState) -> ExpertQuantState:
    """The quant state of the expert weight passed in this call (a reused graph may run another layer, or the
    same layer of another model prepared with the same config)."""
    owner = owner_of(weight)
    if owner is None:
        return compiled_for
    model_state, fqn = owner
    listed = listed_expert_key(fqn)
    if listed is not None and is_listed_key(compiled_for.fqn):
        fqn = listed[0]  # one expert's weight of a module list: the list's state
    if fqn in model_state and model_state[fqn] is compiled_for:
        return compiled_for
    est = model_state.get_or_create(
        fqn, compiled_for.weight_shape, compiled_for.expert_dim, compiled_for.contraction_dim, weight.device
    )
    model_state.note_reused_graph(compiled_for.fqn, fqn)
    return est


def _with_state_inputs(compiled: Any, lifted: list[LiftedBuffer]) -> Any:
    """Call ``compiled`` with the live state buffers of the weights actually passed appended to Dynamo's
    graph arguments."""
    if not lifted:
        return compiled

    # AOTAutograd's forward takes unboxed args (its `_boxed_call` attribute is copied from the inner
    # function and does not describe it), and so does everything compile_fx / aot_eager return.
    def run(*args: Any) -> Any:
        extra = []
        for buf in lifted:
            est = buf.state if buf.weight_index is None else _state_for_weight(args[buf.weight_index], buf.state)
            value = getattr(est, buf.name)
            if buf.name == "codes_data" and value.numel() == 0:
                raise RuntimeError(
                    f"moeq: {est.fqn}: a graph compiled inside moeq.reuse_weight_codes ran without this weight's "
                    "codes (its quant state was not filled on entry); enter the context again"
                )
            extra.append(value)
        return compiled(*args, *extra)

    return run


def _copy_dynamo_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of Dynamo's graph that can gain inputs: Dynamo keeps reading the original's placeholders
    after the backend returns, so the original must stay as it is."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    for old, new in env.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source  # type: ignore[attr-defined]
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    for attr in ("_param_name_to_source", "shape_env"):
        if hasattr(gm, attr):
            setattr(copy, attr, getattr(gm, attr))
    return copy


def _compile(gm: fx.GraphModule, example_inputs: list[Any], compiler: Any) -> Any:
    gm = _copy_dynamo_graph(gm)
    inline_checkpointed_experts(gm)
    remove_expert_module_entries(gm)
    lifted = _rewrite(gm, example_inputs)
    extra = [getattr(buf.state, buf.name) for buf in lifted]
    return _with_state_inputs(compiler(gm, [*example_inputs, *extra]), lifted)


def moeq_backend(gm: fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Any:
    """Dynamo backend: expert Q/DQ pass, then Inductor (``compile_fx``) with the grouped_qmm post-grad
    pass composed into ``post_grad_custom_post_pass`` (see :mod:`moeq.lowering.inductor`) and the training
    graphs' pass (FP8 weight codes, STE masks) into ``joint_custom_post_pass`` (:mod:`moeq.lowering.joint`)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    from moeq.lowering.inductor import GroupedQmmPass, fusion_enabled, with_pass
    from moeq.lowering.joint import TrainingGraphPass

    options = dict(kwargs.get("options") or {})
    if fusion_enabled():
        for slot, cls in (
            ("joint_custom_post_pass", TrainingGraphPass),
            ("post_grad_custom_post_pass", GroupedQmmPass),
        ):
            options[slot] = with_pass(options.get(slot, getattr(inductor_config, slot, None)), cls)

    def inductor(g: fx.GraphModule, inputs: list[Any]) -> Any:
        return compile_fx(g, inputs, config_patches=options) if options else compile_fx(g, inputs)

    return _compile(gm, example_inputs, inductor)


def moeq_aot_eager_backend(gm: fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Any:
    """Dynamo backend: expert Q/DQ pass, then AOTAutograd with eager kernels (no Inductor)."""
    from torch._dynamo.backends.debugging import aot_eager

    return _compile(gm, example_inputs, aot_eager)


def register_backends() -> None:
    """Register ``"moeq"`` and ``"moeq_aot_eager"`` with Dynamo (idempotent; the ``torch_dynamo_backends`` entry
    points let ``torch.compile`` find both without an ``import moeq``)."""
    from torch._dynamo import list_backends, register_backend

    known = set(list_backends(exclude_tags=()))
    if "moeq" not in known:
        register_backend(name="moeq")(moeq_backend)
    if "moeq_aot_eager" not in known:
        register_backend(name="moeq_aot_eager")(moeq_aot_eager_backend)
