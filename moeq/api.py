"""User entry points: ``prepare`` (for torch.compile) and ``quantize_graph`` (for traced graphs)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx, nn

from moeq.config import NVFP4, QuantConfig
from moeq.integrations.hf import (
    is_module_list_moe_block,
    is_routed_experts_module,
    route_block_to_all_experts,
    route_to_all_experts,
    use_grouped_experts,
)
from moeq.lowering.describe import lowering_lines
from moeq.lowering.inductor import check_compile_switches
from moeq.lowering.ops import remove_expert_module_entries
from moeq.passes.explain import Explanation
from moeq.passes.inline_checkpoint import inline_checkpointed_experts
from moeq.passes.insert_qdq import rewrite_graph
from moeq.state import (
    ModelQuantState,
    attach_state,
    get_state,
    is_under,
    listed_expert_key,
    owner_of,
    stacked_expert_params,
)

__all__ = ["explain", "prepare", "quantize_graph"]

logger = logging.getLogger(__name__)


def _mode_guard(module: nn.Module, args: Any) -> None:
    """Forward pre-hook on modules that own expert weights. Dynamo traces it, so comparing the mode here
    makes Dynamo guard on its value and on the model's config: a mode change recompiles the graph (statistics
    live on the model), and so does another prepared model under another config or lowering switches
    (:func:`~moeq.lowering.inductor.check_compile_switches`). Run eagerly (not traced), it
    warns once per mode that the expert GEMMs are not quantized there. Traced outside mode "off" (and outside
    ``torch.export``), it puts the side-effect marker ``moeq::expert_module_entry`` into the graph, which the moeq
    backends remove and which warns where another backend compiled the graph (those run the expert GEMMs unquantized
    too)."""
    mode = module._moeq_mode
    mode.check()
    check_compile_switches()
    if not torch.compiler.is_compiling():
        mode.warn_eager(type(module).__name__)
    elif mode.value != "off" and not _exporting():
        torch.ops.moeq.expert_module_entry(type(module).__name__, mode.value)


def _exporting() -> bool:
    """``torch.compiler.is_exporting()`` as Dynamo should trace it. Dynamo in torch 2.11 folds ``is_exporting()`` to
    True in every graph it traces, torch.compile's too (later versions read the flag instead), which kept the marker
    out of every compiled graph there: no warning under another backend and no rewrite inside checkpointed regions.
    Reading the flag itself is right on every version."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


TP_SHARD_KINDS = ("column", "row")


_MODE_READING_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def _mode_reading_class(cls: type, names: tuple[str, ...]) -> type:
    """A subclass of ``cls`` whose expert-parameter attributes read the calibration mode first.

    Dynamo guards on what a frame reads. Reading the mode wherever an expert weight is read makes every
    compiled frame that uses one recompile on a mode change, also when a graph break puts the grouped
    GEMM in a different frame from the module's forward entry (where the pre-hook guard sits)."""
    key = (cls, names)
    if key not in _MODE_READING_CLASSES:

        def reader(name: str) -> property:
            def get(self: nn.Module) -> Any:
                self._moeq_mode.check()
                if name in self._parameters:
                    return self._parameters[name]
                if name in self._buffers:  # moeq.freeze replaced the parameter by a stand-in buffer
                    return self._buffers[name]
                raise AttributeError(name)

            return property(get)

        namespace = {name: reader(name) for name in names}
        namespace["__module__"] = cls.__module__
        namespace["__qualname__"] = cls.__qualname__
        _MODE_READING_CLASSES[key] = type(cls.__name__, (cls,), namespace)
    return _MODE_READING_CLASSES[key]


def _expert_params(prefix: str, module: nn.Module) -> tuple[str, ...]:
    """The module's own expert weights: stacked ``[E, ...]`` parameters, or the 2-D weight of one expert of a
    per-expert module list (``experts.3.w1``, Megatron's ``local_experts.3.linear_fc1``)."""
    listed = [
        n for n, p in module.named_parameters(recurse=False) if p.dim() == 2 and listed_expert_key(f"{prefix}.{n}")
    ]
    return tuple(sorted(stacked_expert_params(module) + listed))


def prepare(
    model: nn.Module, config: QuantConfig | None = None, *, tp_sharding: dict[str, str] | None = None
) -> nn.Module:
    """Attach per-expert quant state to ``model`` and make it ready for ``torch.compile(backend="moeq")``.

    transformers MoE models are switched to their ``grouped_mm`` experts implementation. Calling it again
    with the same config is a no-op; with another config it starts over. Returns ``model`` itself.

    ``tp_sharding`` maps weight-FQN patterns to ``"column"`` (output dim sharded) or ``"row"`` (contraction
    dim sharded) when this rank holds tensor-parallel shards of the expert weights, e.g.
    ``{"*.gate_up_proj": "column", "*.down_proj": "row"}``; checkpoints then store the weights' global shape.
    """
    config = config or NVFP4
    for pattern, kind in (tp_sharding or {}).items():
        if kind not in TP_SHARD_KINDS:
            raise ValueError(f"tp_sharding[{pattern!r}] must be one of {TP_SHARD_KINDS}, got {kind!r}")
    if not isinstance(config, QuantConfig):
        raise TypeError(
            f"config must be a moeq.QuantConfig (or preset such as moeq.NVFP4), got {type(config).__name__}"
        )
    routes = _all_experts_routes(model)
    if config.calib == "all_experts":
        _check_all_experts_routable(model, routes)
    existing = get_state(model, required=False)
    if existing is not None and existing.config == config:
        _set_tp_sharding(existing, tp_sharding)
        return model
    if existing is not None:
        logger.warning(
            "moeq.prepare: re-preparing %s with a new config; previous quant state is dropped", type(model).__name__
        )
    state = attach_state(model, config)
    _set_tp_sharding(state, tp_sharding)
    use_grouped_experts(model)
    owners = 0
    for prefix, module in model.named_modules():
        expert_params = _expert_params(prefix, module)
        owners += bool(expert_params)
        if expert_params:
            object.__setattr__(module, "_moeq_mode", state.mode_box)
            if not getattr(module, "_moeq_guard_installed", False):
                module.register_forward_pre_hook(_mode_guard)
                module.__class__ = _mode_reading_class(type(module), expert_params)
                object.__setattr__(module, "_moeq_guard_installed", True)
    for prefix, (module, hook) in routes.items():
        if config.calib == "all_experts":
            state.all_experts_modules.add(prefix)
            if not getattr(module, "_moeq_all_experts_installed", False):
                module.register_forward_pre_hook(hook, with_kwargs=True)
                object.__setattr__(module, "_moeq_all_experts_installed", True)
        if getattr(module, "_moeq_all_experts_installed", False):  # its hook reads this state's mode and config
            object.__setattr__(module, "_moeq_mode", state.mode_box)
    if not owners:
        logger.warning(
            "moeq.prepare: %s has no expert weights (no parameter of 3 or more dims [E, ...], no per-expert module "
            "list such as experts.0.w1): nothing will be quantized. moeq quantizes the routed experts of MoE models",
            type(model).__name__,
        )
    return model


def _all_experts_routes(model: nn.Module) -> dict[str, tuple[nn.Module, Any]]:
    """Where ``calib="all_experts"`` sends every token to every expert: ``{prefix: (module, pre-hook)}`` for each
    transformers experts module and each module-list MoE block (the experts of a block go through the block)."""
    routes: dict[str, tuple[nn.Module, Any]] = {}
    for prefix, module in model.named_modules():
        if is_routed_experts_module(module):
            routes[prefix] = (module, route_to_all_experts)
        elif is_module_list_moe_block(module):
            routes[prefix] = (module, route_block_to_all_experts)
    return routes


def _check_all_experts_routable(model: nn.Module, routes: dict[str, Any]) -> None:
    """Raise, naming them, if expert modules own weights that ``calib="all_experts"`` cannot route every token to
    (outside ``routes``: bmm experts, per-expert loops inside one module, Megatron expert linears). Only modules
    named ``*expert*`` are judged here (a 3-D parameter elsewhere, such as Kimi-Linear's ``A_log``, need not be an
    expert weight); ``finalize()`` refuses any expert GEMM the pass found outside ``routes``."""
    others = [
        f"{prefix or '<root>'} ({type(module).__name__})"
        for prefix, module in model.named_modules()
        if "expert" in prefix.lower() and _expert_params(prefix, module) and not is_under(prefix, routes)
    ]
    if others:
        shown = ", ".join(others[:4]) + (f", ... ({len(others) - 4} more)" if len(others) > 4 else "")
        raise ValueError(
            "QuantConfig(calib='all_experts') runs every calibration token through every expert at transformers' "
            "experts modules (experts(hidden_states, top_k_index, top_k_weights)) and at MoE blocks with a module "
            "list of experts and an integer top_k; these modules own expert weights but route their tokens "
            f"otherwise: {shown}. Use calib='routed' for this model"
        )


def _set_tp_sharding(state: ModelQuantState, tp_sharding: dict[str, str] | None) -> None:
    if tp_sharding is None:
        return
    state.tp_sharding = dict(tp_sharding)
    for fqn, s in state.items():
        s.tp_shard = state.tp_shard_of(fqn)


def quantize_graph(gm: Any, config: QuantConfig | None = None) -> fx.GraphModule:
    """Run the expert Q/DQ pass on a traced graph and return it (rewritten in place).

    ``gm``: ``torch.export.export(...).module()`` (an ExportedProgram is accepted too) or a
    ``torch.fx.symbolic_trace`` result. If its parameters belong to a model passed to :func:`prepare`,
    the graph shares that model's quant state; otherwise a state is attached to the graph itself.
    Then use ``moeq.calibrate(qgm)`` / ``moeq.finalize(qgm)`` as with a compiled model.
    """
    kind = "fx"
    if hasattr(gm, "module") and hasattr(gm, "graph_signature"):
        gm = gm.module()
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"quantize_graph expects a torch.fx.GraphModule or ExportedProgram, got {type(gm).__name__}")
    if any(n.op == "call_function" and str(n.target).startswith("aten.") for n in gm.graph.nodes):
        kind = "export"
    states: dict[int, ModelQuantState] = {}
    for p in gm.parameters():
        owner = owner_of(p)
        if owner is not None:
            states[id(owner[0])] = owner[0]
    if len(states) > 1:
        raise ValueError("quantize_graph: the graph holds parameters of several prepared models")
    if states:
        state = next(iter(states.values()))
        if config is not None and config != state.config:
            raise ValueError(
                f"quantize_graph: this graph's parameters belong to a model prepared with {state.config}, not {config}"
            )
    if (state.config if states else config or NVFP4).calib == "all_experts":
        raise ValueError(
            "quantize_graph: QuantConfig(calib='all_experts') reroutes tokens at transformers' experts modules while "
            "calibrate() runs, and a traced graph's routing is fixed when it is traced; use moeq.prepare(model, cfg) "
            "with torch.compile(model, backend='moeq'), or calib='routed'"
        )
    if states:
        object.__setattr__(gm, "_moeq_state", state)
    else:
        state = attach_state(gm, config or NVFP4)
    inline_checkpointed_experts(gm)
    remove_expert_module_entries(gm)
    rewrite_graph(gm, state, None, kind=kind)
    return gm


def explain(model: Any) -> Explanation:
    """Explain what moeq did to ``model`` (a prepared model, its ``torch.compile`` wrapper, or a graph
    returned by ``quantize_graph``): ``str()`` of the result gives the report."""
    return Explanation(get_state(model), lowering=lowering_lines)
