"""Per-expert quant state, keyed by the expert weight's fully qualified parameter name.

A :class:`ModelQuantState` is attached to the user's model (not registered as a submodule, so the
model's own ``state_dict`` is unchanged). It owns one :class:`ExpertQuantState` per expert weight; the
same objects are inserted into every graph the pass rewrites (compiled, exported, re-traced), so all of
them share one set of statistics and a recompile never resets calibration.

Modes: ``"off"`` (full precision), ``"calibrate"`` (full precision, observers record), ``"quantize"``
(fake quant with the finalized parameters), ``"deploy"`` (after ``moeq.freeze``: weights stored quantized).
"""

from __future__ import annotations

import fnmatch
import logging
import re
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from moeq.config import QuantConfig

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

__all__ = [
    "ExpertQuantState",
    "ModelQuantState",
    "MODES",
    "get_state",
    "is_listed_key",
    "is_under",
    "listed_expert_key",
    "listed_members",
    "owner_of",
    "attach_state",
    "register_owner",
    "stacked_expert_params",
    "stacked_expert_weights",
]

logger = logging.getLogger(__name__)

MODES = ("off", "calibrate", "quantize", "deploy")
#: the buffers of moeq.reuse_weight_codes' codes (quantize_weight's outputs), in the op's argument order
CODES_BUFFERS = ("codes_data", "codes_scale", "codes_block_scale")
_STATE_ATTR = "_moeq_state"
# parameter object -> (ModelQuantState, FQN); lets the pass map a graph input back to its state
_PARAM_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


class ExpertQuantState(nn.Module):
    """Quant state of one stacked expert weight ``[E, ...]`` and the activation feeding its GEMM.

    Buffers: ``weight_amax [E]`` (``[E, N]`` with FP8 channel-wise scales), ``weight_block_amax`` (NVFP4, per
    16-block along K, filled by ``finalize``), ``input_amax`` (``[1]`` shared, ``[E]`` per expert, empty for dynamic
    per-token scales; what the fake quant uses),
    ``observed_input_amax [E]`` and ``tokens_per_expert [E]`` (raw calibration statistics: the rows each expert
    observed, under ``calib="all_experts"`` every calibration token once plus the routed ones),
    ``calibrated [E]`` (the expert observed at least one token).
    """

    def __init__(
        self, fqn: str, weight_shape: tuple[int, ...], expert_dim: int, contraction_dim: int, config: QuantConfig
    ) -> None:
        super().__init__()
        self.fqn = fqn
        self.weight_shape = tuple(weight_shape)
        self.expert_dim = expert_dim
        self.contraction_dim = contraction_dim
        self.config = config
        self.mode = "off"
        #: per-expert notes shown by explain(), keyed by global expert id
        self.flags: dict[int, str] = {}
        num_experts = self.weight_shape[expert_dim]
        #: expert parallelism: this rank holds global experts [expert_offset, expert_offset + E_local)
        self.expert_offset = 0
        #: tensor parallelism: "column" (output dim sharded), "row" (K sharded) or None (replicated)
        self.tp_shard: str | None = None
        n_in = {"shared": 1, "per_expert": num_experts, "token": 0}[config.act_scale]
        self.register_buffer("weight_amax", torch.zeros(self.weight_amax_shape))
        self.register_buffer("weight_block_amax", torch.zeros(0))
        self.register_buffer("input_amax", torch.zeros(n_in))
        self.register_buffer("observed_input_amax", torch.zeros(num_experts))
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts, dtype=torch.int64))
        self.register_buffer("calibrated", torch.zeros(num_experts, dtype=torch.bool))
        # deploy (moeq.freeze): the stored weight, K-last; empty until frozen
        self.frozen_dtype: torch.dtype | None = None
        self.register_buffer("frozen_data", torch.zeros(0, dtype=torch.uint8))
        self.register_buffer("frozen_scale", torch.zeros(0))
        self.register_buffer("frozen_block_scale", torch.zeros(0, dtype=torch.uint8))
        # QAT (moeq.reuse_weight_codes): the weight's codes, computed once for several forwards; not saved
        self.codes_reused = False
        self.register_buffer("codes_data", torch.zeros(0, dtype=torch.uint8), persistent=False)
        self.register_buffer("codes_scale", torch.zeros(0), persistent=False)
        self.register_buffer("codes_block_scale", torch.zeros(0, dtype=torch.uint8), persistent=False)
        # reuse_weight_codes(dequantized=True): the codes' dequant, in the weight's layout and dtype (empty if not)
        self.register_buffer("codes_dequantized", torch.zeros(0), persistent=False)

    @property
    def num_experts(self) -> int:
        return self.weight_shape[self.expert_dim]

    @property
    def weight_amax_shape(self) -> tuple[int, ...]:
        """``(E,)``, or ``(E, N)`` for FP8 channel-wise scales (``N``: the weight's output-channel dim)."""
        if self.config.weight_scale != "channel":
            return (self.num_experts,)
        if len(self.weight_shape) != 3:
            raise ValueError(
                f"{self.fqn}: channel-wise weight scales need a stacked 3-D expert weight, got shape "
                f"{list(self.weight_shape)}"
            )
        n_dim = 3 - self.expert_dim % 3 - self.contraction_dim % 3
        return (self.num_experts, self.weight_shape[n_dim])

    def global_weight_shape(self, ep_size: int, tp_size: int) -> tuple[int, ...]:
        """The unsharded weight shape: all experts of every EP rank, TP shards joined."""
        shape = list(self.weight_shape)
        shape[self.expert_dim] *= ep_size
        if self.tp_shard is not None and tp_size > 1:
            dims = [d for d in range(len(shape)) if d not in (self.expert_dim, self.contraction_dim % len(shape))]
            dim = self.contraction_dim % len(shape) if self.tp_shard == "row" else dims[-1]
            shape[dim] *= tp_size
        return tuple(shape)

    def reset_statistics(self) -> None:
        """Forget observed activation statistics (weights are re-read at finalize)."""
        self.observed_input_amax.zero_()
        self.tokens_per_expert.zero_()
        self.calibrated.zero_()
        self.flags.clear()

    def forward(
        self,
        t: Tensor,
        offs: Tensor | None = None,
        *,
        role: str,
        expert_dim: int = 0,
        contraction_dim: int = -1,
        expert: int | None = None,
    ) -> Tensor:
        """Graph hook: ``role="weight"`` fake-quantizes the stacked weight (``expert``: the 2-D weight of that
        expert of a module list), ``role="input"`` observes or fake-quantizes the GEMM's activation. Under tracing
        the current mode is baked into the graph."""
        cfg = self.config
        if role == "weight":
            if self.mode not in ("deploy", "quantize"):
                return t
            pick = slice(None) if expert is None else slice(expert, expert + 1)

            def picked(buffer: Tensor) -> Tensor:  # this expert's slice (an empty buffer as it is)
                return buffer[pick] if buffer.numel() else buffer

            w = t if expert is None else t.unsqueeze(0)
            if self.mode == "deploy":
                stored = [picked(b) for b in (self.frozen_data, self.frozen_scale, self.frozen_block_scale)]
                wq = torch.ops.moeq.dequant_weight(*stored, cfg.weight, self.contraction_dim, t.dtype)
            elif self.codes_reused:
                codes = [picked(c) for c in self.codes()]
                wq = torch.ops.moeq.fake_quant_weight_from_codes(
                    w, picked(self.weight_amax), *codes, cfg.weight, self.expert_dim, self.contraction_dim
                )
            else:
                wq = torch.ops.moeq.fake_quant_weight(
                    w, picked(self.weight_amax), cfg.weight, self.expert_dim, self.contraction_dim
                )
            return wq if expert is None else wq.squeeze(0)
        if self.mode == "calibrate":
            torch.ops.moeq.observe_segments_(
                t, offs, self.observed_input_amax, self.tokens_per_expert, expert_dim, contraction_dim
            )
        elif self.mode in ("quantize", "deploy") and cfg.dynamic_activations:
            return torch.ops.moeq.fake_quant_act_dynamic(t, offs, cfg.activation, expert_dim, contraction_dim)
        elif self.mode in ("quantize", "deploy") and cfg.activation is not None:
            return torch.ops.moeq.fake_quant_act(t, offs, self.input_amax, cfg.activation, expert_dim, contraction_dim)
        return t

    def codes(self) -> tuple[Tensor, Tensor, Tensor]:
        """The weight's reused codes (``quantize_weight``'s data, scale and block scales)."""
        return tuple(getattr(self, name) for name in CODES_BUFFERS)

    def extra_repr(self) -> str:
        return (
            f"{self.fqn}: E={self.num_experts}, shape={list(self.weight_shape)}, K dim={self.contraction_dim}, "
            f"{self.config.name}, act_scale={self.config.act_scale}"
        )


#: a 2-D weight of one expert in a module list (HF ``experts.3.w1.weight``, Megatron SequentialMLP's
#: ``local_experts.3.linear_fc1.weight``)
_LISTED_EXPERT = re.compile(r"((?:^|\.)(?:local_)?experts\.)(\d+)(\.)")


def stacked_expert_params(module: nn.Module) -> list[str]:
    """The module's own stacked expert weights: parameters of 3 or more dims (``[E, ...]``). A convolution's weight
    (Qwen3-Next's linear attention has a ``Conv1d``) is 3-D and no expert."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return []
    return [name for name, p in module.named_parameters(recurse=False) if p.dim() >= 3]


def stacked_expert_weights(root: nn.Module) -> list[str]:
    """FQNs of the stacked expert weights under ``root`` (:func:`stacked_expert_params` of every module)."""
    return [
        f"{prefix}.{name}" if prefix else name
        for prefix, module in root.named_modules()
        for name in stacked_expert_params(module)
    ]


def is_under(name: str, prefixes: Iterable[str]) -> bool:
    """Whether the module or parameter ``name`` is one of the modules ``prefixes`` or inside one (``""``: the root,
    which holds everything)."""
    return any(p == "" or name == p or name.startswith(f"{p}.") for p in prefixes)


def listed_expert_key(fqn: str) -> tuple[str, int] | None:
    """``(key, expert)`` of a weight in a per-expert module list: ``local_experts.3.linear_fc1.weight`` ->
    ``("local_experts.*.linear_fc1.weight", 3)``; None for any other FQN."""
    m = _LISTED_EXPERT.search(fqn)
    if m is None:
        return None
    return fqn[: m.start(2)] + "*" + fqn[m.end(2) :], int(m.group(2))


def is_listed_key(key: str) -> bool:
    """Whether ``key`` names a per-expert module list's state (``local_experts.*.linear_fc1.weight``)."""
    return ".*." in f".{key}"


def listed_members(key: str, num_experts: int) -> list[str]:
    """The weight FQNs of a per-expert module list's state key; empty for the key of a stacked weight."""
    if not is_listed_key(key):
        return []
    return [key.replace("*", str(e), 1) for e in range(num_experts)]


def _module_key(fqn: str) -> str:
    return fqn.replace(".", "__")


# what running a prepared module outside a moeq-rewritten graph means, per calibration mode (for the warnings)
UNQUANTIZED_CONSEQUENCE = {
    "calibrate": "its expert GEMMs are not observed",
    "quantize": "its expert GEMMs run unquantized",
    "deploy": "its expert weights are freeze()'s zero stand-ins, so the output is wrong",
}


class ModeBox:
    """A plain holder of the current mode and of the model's config (as its repr). Modules that own expert
    weights read both in a forward pre-hook, so Dynamo guards on them: a mode change recompiles the graph
    (never resetting statistics), and so does a second prepared model of the same classes under another
    config (a graph's Q/DQ formats are constants; the same config reuses the graph with its own state)."""

    __slots__ = ("all_experts", "codes_reused", "config_key", "value", "warned_eager")

    def __init__(self, config_key: str, all_experts: bool = False) -> None:
        self.value = "off"
        self.config_key = config_key
        #: QuantConfig(calib="all_experts"): calibration forwards run every token through every expert too
        self.all_experts = all_experts
        #: inside moeq.reuse_weight_codes: QAT graphs read the expert weights' codes computed on entry ("codes"),
        #: and their dequantized copies where a 16-bit weight is read ("dequantized"); False outside
        self.codes_reused: bool | str = False
        self.warned_eager: set[str] = set()

    def warn_eager(self, module: str) -> None:
        """Warn once per mode that a module with expert weights ran outside a moeq-compiled graph: its GEMMs are
        then neither observed nor quantized (and in deploy mode its weights are zero stand-ins)."""
        if self.value == "off" or self.value in self.warned_eager:
            return
        self.warned_eager.add(self.value)
        consequence = UNQUANTIZED_CONSEQUENCE[self.value]
        logger.warning(
            "moeq: %s ran eagerly in mode %r: %s. Only graphs compiled with backend='moeq' (or rewritten by "
            "moeq.quantize_graph) quantize; did Dynamo fall back to eager (torch._dynamo.config.recompile_limit "
            "reached, an error suppressed, or Hugging Face gradient checkpointing, which Dynamo traces only with "
            "torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True and use_cache=False)?",
            module,
            self.value,
            consequence,
        )

    def calibrating_all_experts(self) -> bool:
        """Inside ``calibrate()`` under ``QuantConfig(calib="all_experts")`` (read in traced hooks: Dynamo guards on
        the fields)."""
        self.check()
        return self.value == "calibrate" and self.all_experts

    def check(self) -> None:
        """Raise on an unknown mode; reading the fields is what makes Dynamo guard on them."""
        if self.value not in MODES or not self.config_key or self.codes_reused not in (False, "codes", "dequantized"):
            raise ValueError(
                f"invalid moeq mode {self.value!r} (config {self.config_key!r}, codes reused {self.codes_reused!r})"
            )


class ModelQuantState(nn.Module):
    """All expert quant states of one model, keyed by weight FQN, plus the reports of rewritten graphs."""

    def __init__(self, config: QuantConfig) -> None:
        super().__init__()
        self.config = config
        self.experts = nn.ModuleDict()
        self.mode_box = ModeBox(repr(config), all_experts=config.calib == "all_experts")
        self.finalized = False
        #: the finalized statistics already hold the sum over data-parallel ranks
        self.synced_over_dp = False
        #: number of calibrate() sessions run since the last reset
        self.calibration_sessions = 0
        self.reports: dict[str, Any] = {}
        #: weight FQN -> FQN whose compiled graph Dynamo reuses for it (same code, e.g. another layer)
        self.reused_graphs: dict[str, str] = {}
        #: weight FQN pattern -> "column" | "row": how tensor parallelism shards each expert weight
        self.tp_sharding: dict[str, str] = {}
        #: QuantConfig(calib="all_experts"): the modules whose calibration forwards run every token through every
        #: expert (moeq.prepare hooked them); finalize() refuses an expert weight owned by any other
        self.all_experts_modules: set[str] = set()
        self._root: Any = None

    # -- lookup ----------------------------------------------------------------------------------
    def __getitem__(self, fqn: str) -> ExpertQuantState:
        try:
            return self.experts[_module_key(fqn)]
        except KeyError:
            raise KeyError(f"no expert quant state for {fqn!r}; known: {sorted(self.fqns())}") from None

    def __contains__(self, fqn: object) -> bool:
        return isinstance(fqn, str) and _module_key(fqn) in self.experts

    def __len__(self) -> int:
        return len(self.experts)

    def fqns(self) -> list[str]:
        return [s.fqn for s in self.experts.values()]

    def items(self) -> Iterator[tuple[str, ExpertQuantState]]:
        for s in self.experts.values():
            yield s.fqn, s

    def as_dict(self) -> dict[str, ExpertQuantState]:
        return {fqn: s for fqn, s in sorted(self.items())}

    def forget(self, fqn: str) -> None:
        """Drop the state of ``fqn`` (used to undo a failed checkpoint load)."""
        del self.experts[_module_key(fqn)]

    def note_reused_graph(self, compiled_for: str, fqn: str) -> None:
        """Record (and log once) that the graph rewritten for ``compiled_for`` also runs the GEMM ``fqn``: Dynamo
        serves one frame's graph to every instance of a module class whose guards pass."""
        if fqn not in self.reused_graphs:
            where = "another model's " if compiled_for == fqn else ""
            logger.info("moeq: graph rewritten for %s%s also runs %s (Dynamo reused it)", where, compiled_for, fqn)
            self.reused_graphs[fqn] = compiled_for

    def tp_shard_of(self, fqn: str) -> str | None:
        """``"column"``, ``"row"`` or None (not TP-sharded) for the weight ``fqn``."""
        return next((kind for p, kind in self.tp_sharding.items() if fnmatch.fnmatchcase(fqn, p)), None)

    def excluded(self, fqn: str) -> str | None:
        """The config pattern that excludes ``fqn``, if any."""
        return next((p for p in self.config.exclude if fnmatch.fnmatchcase(fqn, p)), None)

    def get_or_create(
        self,
        fqn: str,
        weight_shape: tuple[int, ...],
        expert_dim: int,
        contraction_dim: int,
        device: torch.device | None = None,
    ) -> ExpertQuantState:
        """The state for ``fqn`` on the weight's ``device``; created on first sight, reused (with its
        statistics, moved if the model moved) afterwards."""
        if fqn in self:
            state = self[fqn]
            if state.weight_shape != tuple(weight_shape) or state.contraction_dim != contraction_dim:
                raise ValueError(
                    f"{fqn}: graph sees weight shape {tuple(weight_shape)} (K dim {contraction_dim}) but its quant "
                    f"state was made for {state.weight_shape} (K dim {state.contraction_dim})"
                )
            if device is not None and state.weight_amax.device != device:
                state.to(device)
            return state
        state = ExpertQuantState(fqn, weight_shape, expert_dim, contraction_dim, self.config)
        state.tp_shard = self.tp_shard_of(fqn)
        if device is not None:
            state.to(device)
        state.mode = self.mode
        self.experts[_module_key(fqn)] = state
        return state

    # -- mode ------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self.mode_box.value

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode_box.value = mode
        for s in self.experts.values():
            s.mode = mode

    # -- weights ---------------------------------------------------------------------------------
    def present_members(self, key: str) -> list[str]:
        """The weight FQNs of module list ``key`` that the model holds: experts 0, 1, ... up to the first missing."""
        members = []
        while True:
            member = key.replace("*", str(len(members)), 1)
            try:
                self.weight(member)
            except AttributeError:
                return members
            members.append(member)

    def weight(self, fqn: str) -> Tensor:
        """The live weight tensor of ``fqn`` in the module this state is attached to; for a per-expert module list
        (``experts.*.`` key) its experts' 2-D weights stacked (a copy)."""
        if self._root is None:
            raise RuntimeError("this quant state is not attached to a module")
        if is_listed_key(fqn):
            members = listed_members(fqn, self[fqn].num_experts) if fqn in self else self.present_members(fqn)
            if not members:
                raise AttributeError(f"the model has no module-list expert weights {fqn}")
            return torch.stack([self.weight(member) for member in members])
        try:
            return self._root.get_parameter(fqn)
        except AttributeError:
            obj = self._root
            for part in fqn.split("."):
                obj = getattr(obj, part)
            return obj


def _wrapped(module: Any) -> Iterator[Any]:
    """``module`` and the modules it wraps: torch.compile's ``_orig_mod``, (Distributed)DataParallel's ``module``,
    in any nesting."""
    while module is not None:
        yield module
        inner = getattr(module, "_orig_mod", None)
        if inner is None and isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = module.module
        module = inner


def get_state(module: Any, required: bool = True) -> ModelQuantState | None:
    """The :class:`ModelQuantState` attached to ``module`` (or to the module a torch.compile or (Distributed)
    DataParallel wrapper holds)."""
    if isinstance(module, ModelQuantState):
        return module
    for candidate in _wrapped(module):
        state = getattr(candidate, _STATE_ATTR, None)
        if isinstance(state, ModelQuantState):
            return state
    if required:
        raise ValueError(
            f"{type(module).__name__} has no moeq quant state: call moeq.prepare(model, cfg) "
            "or moeq.quantize_graph(gm, cfg) first"
        )
    return None


def owner_of(param: Tensor) -> tuple[ModelQuantState, str] | None:
    """The (state, FQN) a parameter was registered under by :func:`attach_state`, if any."""
    return _PARAM_OWNERS.get(param)


def register_owner(tensor: Tensor, state: ModelQuantState, fqn: str) -> None:
    """Map a tensor that stands in for an expert weight (``moeq.freeze``) to its state and FQN."""
    _PARAM_OWNERS[tensor] = (state, fqn)


def attach_state(module: nn.Module, config: QuantConfig) -> ModelQuantState:
    """Attach a fresh :class:`ModelQuantState` to ``module`` and register its parameters by FQN."""
    state = ModelQuantState(config)
    object.__setattr__(state, "_root", module)  # not a submodule: the model owns the state, not vice versa
    object.__setattr__(module, _STATE_ATTR, state)
    for fqn, param in module.named_parameters(remove_duplicate=False):
        _PARAM_OWNERS[param] = (state, fqn)
    return state
