"""``export_hf``: write a calibrated model as a per-expert Hugging Face checkpoint that serving engines load.

Two formats (DESIGN.md, "Checkpoints and export"):

* ``"modelopt"``: the unified checkpoint nvidia-modelopt writes (vLLM, SGLang, TensorRT-LLM): per expert
  linear ``weight`` (NVFP4 packed uint8 / FP8 e4m3), ``weight_scale`` (e4m3 block scales / fp32 scalar),
  ``weight_scale_2`` (NVFP4 fp32 global scale) and ``input_scale``; ``hf_quant_config.json`` and a
  ``quant_method: modelopt`` ``quantization_config`` in ``config.json``. Byte-identical to modelopt 0.47's
  ``export_hf_checkpoint`` of the same model and calibration for the families modelopt also writes per expert
  (docs/export.md lists them, and where the two differ: Llama 4 and GPT-OSS, which modelopt keeps fused).
* ``"compressed-tensors"``: ``weight_packed`` / ``weight_scale`` / ``weight_global_scale`` (= 1 /
  ``weight_scale_2``) / ``input_global_scale`` (= 1 / ``input_scale``) for NVFP4 (``nvfp4-pack-quantized``);
  ``weight`` / ``weight_scale`` / ``input_scale`` for FP8 (``float-quantized``).

All numerics come from :mod:`moeq.formats`. Gate and up of one expert share one global scale: moeq's
per-expert amax of a fused ``gate_up_proj`` is already the max over both halves, and a gate / up pair kept as two
per-expert linears of a module list (``experts.*.gate_proj`` / ``up_proj``, ``w1`` / ``w3``) is exported with the
max of the two amaxes, as modelopt does. A module list's experts are written under their own names. Non-expert
tensors are copied unquantized. The checkpoint is written to a temporary sibling directory and renamed into place,
so a failed export leaves nothing behind. Under expert parallelism (``ep_group``) each rank writes its own
experts (global id ``ep_rank * E_local + local_id``), rank 0 the rest and the index.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moeq.config import QuantConfig
from moeq.formats import NVFP4_BLOCK, fp8_export_weight, get_format
from moeq.io.checkpoint_files import (
    commit_dir,
    parse_size,
    plan_shards,
    shard_names,
    temp_dir_for,
    tensor_nbytes,
    write_index,
    write_shards,
)
from moeq.io.hf_layout import ExpertLayout, expert_layout, gate_up_partner, hf_renamer, num_experts_in_config
from moeq.runtime.collectives import all_gather_objects
from moeq.state import ExpertQuantState, ModelQuantState, get_state, listed_members

__all__ = ["FORMATS", "export_hf"]

logger = logging.getLogger(__name__)

FORMATS = ("modelopt", "compressed-tensors")
#: a checkpoint's scheme, :func:`_scheme` -> modelopt quant_algo
_MODELOPT_ALGO = {
    ("nvfp4", "expert", "nvfp4", "static"): "NVFP4",
    ("nvfp4", "expert", None, None): "W4A16_NVFP4",
    ("fp8", "expert", "fp8", "static"): "FP8",
    ("fp8", "channel", "fp8", "dynamic"): "FP8_PER_CHANNEL_PER_TOKEN",
}
#: compressed-tensors: NVFP4 (W4A4, W4A16) and every FP8 weight strategy (tensor, channel) with static tensor,
#: dynamic token or no activation quantization
_CT_SUPPORTED = {("nvfp4", "expert", "nvfp4", "static"), ("nvfp4", "expert", None, None)} | {
    ("fp8", w, a, kind)
    for w in ("expert", "channel")
    for a, kind in (("fp8", "static"), ("fp8", "dynamic"), (None, None))
}


def _scheme(cfg: QuantConfig) -> tuple[str, str, str | None, str | None]:
    """(weight format, weight scale, activation format, ``"static"`` / ``"dynamic"`` activation scales)."""
    kind = None if cfg.activation is None else ("dynamic" if cfg.dynamic_activations else "static")
    return cfg.weight, cfg.weight_scale, cfg.activation, kind


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


class _Comm:
    """The few collectives the export needs; a single process when ``group`` is None."""

    def __init__(self, group: Any) -> None:
        self.group = group
        if group is None:
            self.rank, self.size = 0, 1
        else:
            import torch.distributed as dist

            self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order, on every rank."""
        return [obj] if self.group is None else all_gather_objects(obj, self.group)


def _version() -> str:
    from moeq import __version__

    return __version__


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------


def _check_state(
    hf_model: nn.Module, state: ModelQuantState, layouts: dict[str, ExpertLayout], fmt: str, comm: _Comm
) -> list[str]:
    """Every reason this rank's quant state cannot be exported, each naming the layer and expert."""
    cfg = state.config
    scheme = _scheme(cfg)
    if fmt == "modelopt" and scheme not in _MODELOPT_ALGO:
        return [
            f"{cfg.name} (weight={cfg.weight!r}, weight_scale={cfg.weight_scale!r}, activation={cfg.activation!r}, "
            f"act_scale={cfg.act_scale!r}) has no modelopt checkpoint algorithm; modelopt format supports "
            f"{sorted(_MODELOPT_ALGO.values())}, use 'compressed-tensors'"
        ]
    if fmt == "compressed-tensors" and scheme not in _CT_SUPPORTED:
        return [f"{cfg.name} has no compressed-tensors export (supported: NVFP4, NVFP4 W4A16 and every FP8 scheme)"]
    if not state.finalized:
        return ["the quant state is not finalized: run moeq.calibrate(...) and moeq.finalize(model) before export"]
    errors: list[str] = []
    declared = num_experts_in_config(getattr(hf_model, "config", None))
    for fqn, s in sorted(state.items()):
        weight = state.weight(fqn)
        if tuple(weight.shape) != s.weight_shape:
            errors.append(f"{fqn}: weight shape {tuple(weight.shape)} != quant state shape {s.weight_shape}")
            continue
        if declared is not None and s.num_experts * comm.size != declared:
            errors.append(
                f"{fqn}: the model holds {s.num_experts} experts x {comm.size} EP rank(s) = "
                f"{s.num_experts * comm.size}, but its config declares {declared} experts"
            )
            continue
        if cfg.weight == "nvfp4" and weight.shape[s.contraction_dim] % NVFP4_BLOCK:
            errors.append(f"{fqn}: contraction dim {weight.shape[s.contraction_dim]} is not a multiple of 16")
            continue
        out_dim = ({0, 1, 2} - {s.expert_dim, s.contraction_dim}).pop()
        if layouts[fqn].gated() and weight.shape[out_dim] % 2:
            errors.append(f"{fqn}: a fused gate/up weight needs an even output dim, got shape {tuple(weight.shape)}")
            continue
        errors.extend(_check_experts(s, comm.rank * s.num_experts))
    return errors


def _bad(v: float) -> bool:
    return not (v > 0.0 and v != float("inf"))  # True for zero, negative, NaN and inf


def _check_experts(s: ExpertQuantState, first_id: int) -> list[str]:
    cfg = s.config
    errors = []
    for e in range(s.num_experts):
        ge = first_id + e
        amax = s.weight_amax[e].reshape(-1).tolist()
        bad = [(c, w) for c, w in enumerate(amax) if _bad(w)]
        if bad:
            where = "" if s.weight_amax.dim() == 1 else f" (output channels {[c for c, _ in bad][:8]})"
            errors.append(
                f"{s.fqn} expert {ge}: weight amax {bad[0][1]}{where} would give a zero, NaN or inf weight scale"
            )
        if not cfg.static_activations:
            continue
        a = float(s.input_amax[0 if s.input_amax.numel() == 1 else e])
        if _bad(a):
            errors.append(f"{s.fqn} expert {ge}: input amax {a} would give a zero, NaN or inf input scale")
        elif cfg.act_scale == "per_expert" and not bool(s.calibrated[e]) and cfg.uncalibrated == "error":
            errors.append(
                f"{s.fqn} expert {ge}: uncalibrated (no routed calibration token) and no fallback configured; "
                "calibrate with more data or set QuantConfig(uncalibrated='weight_amax') to accept the layer "
                "fallback finalize() recorded"
            )
    return errors


# ----------------------------------------------------------------------------------------------
# tensors
# ----------------------------------------------------------------------------------------------


def _quantize_linear(w: Tensor, amax: Tensor, input_amax: Tensor | None, cfg: QuantConfig, fmt: str) -> dict:
    """Tensors of one per-expert linear (suffix -> tensor), ``w`` is ``[N, K]``; ``amax`` one value, or ``[N]`` with
    channel-wise scales."""
    out: dict[str, Tensor] = {}
    if cfg.weight_scale == "channel":
        # modelopt 0.47 (FP8_PC_PT) divides the 16-bit weight by an fp32 [N, 1] scale: promoted to fp32, that is
        # the spec's own quotient, so the data is formats.quantize's; compressed-tensors keeps the scale [N, 1]
        fp8 = get_format("fp8")
        amax = amax.float().reshape(-1, 1)
        s = fp8.scale_from_amax(amax)
        out.update(weight=fp8.quantize(w, amax).data, weight_scale=s.reshape(-1) if fmt == "modelopt" else s)
    elif cfg.weight == "nvfp4":
        amax = amax.reshape(()).float()
        q = get_format("nvfp4").quantize(w, amax, contraction_dim=-1)
        g = q.scale.reshape(()).float()
        if fmt == "modelopt":
            out.update(weight=q.data, weight_scale=q.block_scale, weight_scale_2=g)
        else:
            out.update(weight_packed=q.data, weight_scale=q.block_scale, weight_global_scale=(1.0 / g).reshape(1))
    else:
        s = get_format("fp8").scale_from_amax(amax.reshape(()).float()).reshape(())
        data = fp8_export_weight(w, s)
        out.update(weight=data, weight_scale=s if fmt == "modelopt" else s.reshape(1))
    if input_amax is not None and not cfg.dynamic_activations:
        s_in = get_format(cfg.activation).scale_from_amax(input_amax.reshape(()).float()).reshape(())
        if fmt == "modelopt":
            out["input_scale"] = s_in
        elif cfg.activation == "nvfp4":
            out["input_global_scale"] = (1.0 / s_in).reshape(1)
        else:
            out["input_scale"] = s_in.reshape(1)
    return out


def _weight_amax(state: ModelQuantState, fqn: str) -> Tensor:
    """The per-expert weight amax ``fqn`` is exported with: its own, or for a gate / up pair kept as two per-expert
    linears the max of both (serving engines fuse them with one scale per expert; modelopt 0.47 does the same)."""
    partner = gate_up_partner(fqn, state.fqns())
    amax = state[fqn].weight_amax
    if partner is None or amax.dim() > 1:  # channel-wise: gate's and up's channels are each their own
        return amax
    return torch.maximum(amax, state[partner].weight_amax)


def _expert_tensors(state: ModelQuantState, layouts: dict[str, ExpertLayout], fmt: str, rank: int) -> dict[str, Tensor]:
    """In-memory-named tensors of this rank's experts (global ids), every stacked expert weight and module list."""
    params = dict(state._root.named_parameters())
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for fqn, s in sorted(state.items()):
            layout = layouts[fqn]
            weight = state.weight(fqn)
            weight_amax = _weight_amax(state, fqn)
            bias = params[layout.bias_fqn].detach() if layout.bias_fqn else None
            for e in range(s.num_experts):
                ge = rank * s.num_experts + e
                w_nk = layout.expert_weight(weight, e)
                input_amax = None
                if s.config.static_activations:
                    input_amax = s.input_amax[0 if s.input_amax.numel() == 1 else e]
                for part in layout.parts:
                    name = part.module.format(e=ge)
                    amax = part.rows(weight_amax[e]) if weight_amax.dim() > 1 else weight_amax[e]
                    for suffix, t in _quantize_linear(part.rows(w_nk), amax, input_amax, s.config, fmt).items():
                        out[f"{name}.{suffix}"] = t.cpu()
                    if bias is not None:
                        out[f"{name}.bias"] = part.rows(bias.movedim(layout.expert_dim, 0)[e]).clone().cpu()
                    if layout.member_bias is not None:
                        out[f"{name}.bias"] = params[layout.member_bias.replace("*", str(e), 1)].detach().clone().cpu()
    return out


def _non_expert_tensors(hf_model: nn.Module, state: ModelQuantState, layouts: dict[str, ExpertLayout]) -> dict:
    """Every other state-dict tensor, unquantized; tied duplicates dropped as ``save_pretrained`` does."""
    skip = set(layouts) | {lay.bias_fqn for lay in layouts.values() if lay.bias_fqn}
    for fqn, layout in layouts.items():  # a module list's members (written by _expert_tensors under global ids)
        skip.update(listed_members(fqn, state[fqn].num_experts))
        if layout.member_bias is not None:
            skip.update(listed_members(layout.member_bias, state[fqn].num_experts))
    tied = getattr(hf_model, "all_tied_weights_keys", None) or {}
    sd = hf_model.state_dict()
    return {k: v.detach().cpu() for k, v in sd.items() if k not in skip and not (k in tied and tied[k] in sd)}


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------


def _exclude_modules(
    non_expert: dict[str, Tensor], names: dict[str, str], quantized: list[str], collapse: bool
) -> list[str]:
    """HF names of the unquantized linear-like modules (a 2-D ``weight``: lm_head, embeddings, routers,
    attention projections). With ``collapse`` (modelopt, whose readers match wildcards), siblings under a
    parent that holds no quantized tensor become ``parent*`` as modelopt writes them
    (``model.layers.0.self_attn*``); compressed-tensors matches exact names or ``re:`` patterns only."""
    mods = sorted(
        {names[k].removesuffix(".weight") for k, t in non_expert.items() if k.endswith(".weight") and t.dim() == 2}
    )
    children: dict[str, list[str]] = {}
    for m in mods:
        children.setdefault(m.rpartition(".")[0], []).append(m)
    out = []
    for parent, kids in children.items():
        holds_quantized = any(q.startswith(parent + ".") for q in quantized)
        if collapse and parent and len(kids) > 1 and not holds_quantized:
            out.append(parent + "*")
        else:
            out.extend(kids)
    return sorted(out)


def _modelopt_configs(cfg: QuantConfig, exclude: list[str]) -> tuple[dict, dict]:
    """(hf_quant_config.json, config.json quantization_config) in modelopt 0.47's layout."""
    algo = _MODELOPT_ALGO[_scheme(cfg)]
    producer = {"name": "moeq", "version": _version()}
    quantization: dict[str, Any] = {"quant_algo": algo, "kv_cache_quant_algo": None}
    if cfg.weight == "nvfp4":
        quantization["group_size"] = NVFP4_BLOCK
    quantization["exclude_modules"] = exclude
    qc: dict[str, Any] = {"ignore": exclude, "quant_algo": algo, "producer": producer, "quant_method": "modelopt"}
    if algo == "FP8_PER_CHANNEL_PER_TOKEN":  # modelopt 0.47 writes no config_groups for it
        return {"producer": producer, "quantization": quantization}, qc
    bits = 4 if cfg.weight == "nvfp4" else 8
    args: dict[str, Any] = {"dynamic": False, "num_bits": bits, "type": "float"}
    if cfg.weight == "nvfp4":
        args["group_size"] = NVFP4_BLOCK
    group: dict[str, Any] = {}
    if cfg.activation is not None:
        group["input_activations"] = dict(args)
    group.update(weights=dict(args), targets=["Linear"])
    qc = {"config_groups": {"group_0": group}, **qc}
    return {"producer": producer, "quantization": quantization}, qc


def _ct_config(cfg: QuantConfig, exclude: list[str]) -> dict:
    """config.json ``quantization_config`` for compressed-tensors."""
    if cfg.weight == "nvfp4":
        fmt = "nvfp4-pack-quantized"
        weights = {
            "num_bits": 4,
            "type": "float",
            "symmetric": True,
            "strategy": "tensor_group",
            "group_size": NVFP4_BLOCK,
            "dynamic": False,
            "observer": "minmax",
        }
        acts = {**weights, "dynamic": "local"} if cfg.activation is not None else None
    else:
        fmt = "float-quantized"
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}
        acts = dict(weights) if cfg.activation is not None else None
        if cfg.weight_scale == "channel":
            weights["strategy"] = "channel"
        if cfg.dynamic_activations:
            acts.update(strategy="token", dynamic=True)
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts, "format": fmt}
        },
        "ignore": exclude,
        "kv_cache_scheme": None,
        "producer": {"name": "moeq", "version": _version()},
    }


def _write_configs(
    tmp: Path, hf_model: nn.Module, cfg: QuantConfig, fmt: str, exclude: list[str], tokenizer: Any
) -> None:
    """config.json (+ quantization_config), hf_quant_config.json, generation config and tokenizer files."""
    config = getattr(hf_model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError(f"{type(hf_model).__name__} has no Hugging Face config; export_hf needs a transformers model")
    config = copy.deepcopy(config)
    config.architectures = [type(hf_model).__name__]  # as save_pretrained records it
    if getattr(config, "dtype", None) is None:  # from_pretrained models carry it; save_pretrained writes it
        config.dtype = next((p.dtype for p in hf_model.parameters() if p.is_floating_point()), None)
    config.save_pretrained(tmp)
    data = json.loads((tmp / "config.json").read_text())
    if fmt == "modelopt":
        hf_quant, qc = _modelopt_configs(cfg, exclude)
        (tmp / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=4) + "\n")
    else:
        qc = _ct_config(cfg, exclude)
    data["quantization_config"] = qc
    (tmp / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    generation = getattr(hf_model, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
        return
    source = Path(str(getattr(config, "_name_or_path", "") or ""))
    if source.is_dir():
        for name in _TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------


#: families whose per-expert layout a serving engine is known not to read (from its loader's source; docs/export.md)
_ENGINE_LAYOUT_WARNINGS = {
    "gpt_oss": (
        "GPT-OSS experts are written per expert (experts.{e}.gate_proj|up_proj|down_proj with biases); vLLM's GPT-OSS "
        "loader reads only the fused, interleaved gate_up_proj / down_proj layout and skips other expert names "
        "without an error (models/gpt_oss.py), so it would run with unloaded experts"
    ),
}


def export_hf(
    model: Any,
    out_dir: str | Path,
    format: str = "modelopt",
    *,
    ep_group: Any = None,
    tp_group: Any = None,
    max_shard_size: int | str = "5GB",
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write the finalized ``model`` as a per-expert Hugging Face checkpoint in ``out_dir``.

    ``format``: ``"modelopt"`` or ``"compressed-tensors"``. ``ep_group``: the expert-parallel process group
    when each rank's model holds ``E_local`` experts (``out_dir`` must be on a file system all ranks see);
    TP-sharded expert weights (a model prepared with ``tp_sharding``, unless ``tp_group`` has size 1) are refused:
    reload the state under TP=1 first.
    ``tokenizer``: saved alongside (else tokenizer files are copied from ``config._name_or_path`` when it is
    a local directory). Raises ValueError naming the layer and expert for zero / NaN / inf scales,
    uncalibrated experts without a fallback, or an expert count that disagrees with the config; nothing is
    written then. Returns ``out_dir``.
    """
    if format not in FORMATS:
        raise ValueError(f"export_hf: format={format!r} is not one of {list(FORMATS)}")
    state = get_state(model)
    sharded = sorted(fqn for fqn, s in state.items() if s.tp_shard is not None)
    if sharded and (tp_group is None or _Comm(tp_group).size > 1):
        held = "this rank's" if tp_group is not None else "the weights of a model prepared with tp_sharding, so"
        raise ValueError(
            f"export_hf writes whole expert tensors; {sharded[:2]} are {held} tensor-parallel shards. Save the quant "
            "state (moeq.save_state), load it with moeq.load_state into the whole model prepared without "
            "tp_sharding, and export that (a process that holds whole weights despite tp_sharding passes a "
            "tp_group of size 1)"
        )
    hf_model = state._root
    out_dir = Path(out_dir).absolute()
    max_bytes = parse_size(max_shard_size)
    comm = _Comm(ep_group)

    layouts = {fqn: expert_layout(hf_model, fqn, s.expert_dim, s.contraction_dim) for fqn, s in state.items()}
    engine_warning = _ENGINE_LAYOUT_WARNINGS.get(getattr(getattr(hf_model, "config", None), "model_type", None))
    if engine_warning is not None and comm.rank == 0:
        logger.warning("moeq: %s", engine_warning)
    errors = [
        e for rank_errors in comm.gather(_check_state(hf_model, state, layouts, format, comm)) for e in rank_errors
    ]
    if errors:
        raise ValueError(f"export_hf refused to export {type(hf_model).__name__}:\n  " + "\n  ".join(errors))
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"export_hf: {out_dir} already exists; pass overwrite=True to replace it")

    tmp = temp_dir_for(out_dir, comm.gather(uuid.uuid4().hex[:12])[0])
    built: dict[str, Any] = {}

    def build() -> None:
        tensors = _expert_tensors(state, layouts, format, comm.rank)
        non_expert = _non_expert_tensors(hf_model, state, layouts) if comm.rank == 0 else {}
        tensors.update(non_expert)
        names = hf_renamer(hf_model, list(tensors))
        built["tensors"] = dict(sorted((names[k], t) for k, t in tensors.items()))
        built["plain"] = (non_expert, names)
        built["shards"] = plan_shards(built["tensors"], max_bytes)
        if comm.rank == 0:
            tmp.mkdir(parents=True)

    failure = _attempt(build)
    plan = [[(k, tensor_nbytes(built["tensors"][k])) for k in keys] for keys in built.get("shards", [])]
    gathered = comm.gather((failure, plan))
    _raise_failures([f for f, _ in gathered], tmp, comm)
    plans = [p for _, p in gathered]
    total = sum(len(p) for p in plans)
    all_names = shard_names(total)
    first = sum(len(p) for p in plans[: comm.rank])
    mine = all_names[first : first + len(plan)]
    failure = _attempt(lambda: write_shards(tmp, built["tensors"], built["shards"], mine, {"format": "pt"}))
    _raise_failures(comm.gather(failure), tmp, comm)

    failure = None
    if comm.rank == 0:
        weight_map = {k: all_names[i] for i, shard in enumerate(s for p in plans for s in p) for k, _ in shard}
        size = sum(n for p in plans for shard in p for _, n in shard)
        non_expert, names = built["plain"]
        plain = {names[k] for k in non_expert}
        quantized = [k for k in weight_map if k not in plain]
        exclude = _exclude_modules(non_expert, names, quantized, collapse=format == "modelopt")
        failure = _attempt(
            lambda: (
                write_index(tmp, weight_map, size),
                _write_configs(tmp, hf_model, state.config, format, exclude, tokenizer),
                commit_dir(tmp, out_dir, overwrite),
            )
        )
    _raise_failures(comm.gather(failure), tmp, comm)
    logger.info("moeq: exported %s in %s format to %s (%d shards)", type(hf_model).__name__, format, out_dir, total)
    return out_dir


def _raise_failures(failures: list[str | None], tmp: Path, comm: _Comm) -> None:
    """Raise on every rank when any rank failed (rank 0 removes the temporary directory first)."""
    failed = [f"rank {r}: {f}" for r, f in enumerate(failures) if f is not None]
    if not failed:
        return
    if comm.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    raise RuntimeError("export_hf failed; nothing was written:\n  " + "\n  ".join(failed))


def _attempt(fn: Callable[[], Any]) -> str | None:
    """Run ``fn``; its exception as text (so every rank learns of a failure on any rank), else None."""
    try:
        fn()
    except Exception as err:  # reported to every rank, then raised there
        logger.exception("moeq: export step failed")
        return f"{type(err).__name__}: {err}"
    return None
