"""``moeq.export_hf`` against independent references (tiny random-weight models, bf16, CPU).

* modelopt format: every tensor moeq writes is byte-identical to what nvidia-modelopt 0.47's
  ``export_hf_checkpoint`` writes for the same model, quantized with its experts-only config and the same
  calibration batch (Qwen3-MoE and Mixtral, NVFP4 and FP8); same key set, same quant config.
* reload: the modelopt export dequantized per the numerics spec (``moeq.formats``) and loaded by transformers
  itself (which merges the per-expert tensors back into its fused experts) gives the logits of moeq's
  weight-fake-quantized model.
* compressed-tensors: the export loads with transformers + compressed-tensors on CPU; its config parses with
  compressed-tensors' own schema.
* EP=2 over gloo writes the same tensors as the single-process export (shards may split differently).
* refusals (zero / NaN / inf scales, uncalibrated experts, expert count mismatch, not finalized) name the
  expert and write nothing; a failure while writing leaves no half-written checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import moeq
from moeq.formats import NVFP4, QuantizedTensor, expand_per_expert, get_format
from moeq.integrations.hf import tiny_model
from moeq.state import get_state

mtq = pytest.importorskip("modelopt.torch.quantization")
from modelopt.torch.export import export_hf_checkpoint  # noqa: E402
from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402

from tests.conftest import experts_only, one_moe_layer, rank_context  # noqa: E402

VOCAB = 256
PRESETS = {"nvfp4": moeq.NVFP4, "fp8": moeq.FP8}
#: one decoder layer keeps the compile and modelopt passes within the CPU test budget
LAYERS = {"num_hidden_layers": 1}


def _tokens(seed: int, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _modelopt_cfg(fmt: str) -> dict:
    """modelopt's experts-only configs: the NVFP4 preset, and FP8_DEFAULT_CFG restricted to ``*.experts.*``
    (0.47 has no FP8 experts-only preset), as in test_modelopt_parity.py."""
    if fmt == "nvfp4":
        return mtq.NVFP4_EXPERTS_ONLY_CFG
    return experts_only(mtq.FP8_DEFAULT_CFG)


def _calibrated(
    family: str, config: moeq.QuantConfig, ids: torch.Tensor, seed: int = 0, **layers: Any
) -> torch.nn.Module:
    """A tiny model prepared, calibrated on ``ids`` under torch.compile and finalized by moeq."""
    torch._dynamo.reset()
    model = tiny_model(family, torch.bfloat16, seed=seed, **(layers or LAYERS))
    moeq.prepare(model, config)
    cm = torch.compile(model, backend="moeq_aot_eager")
    with torch.no_grad(), moeq.calibrate(cm):
        cm(ids)
    moeq.finalize(cm)
    return model


def _load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (one file or shards + index)."""
    index = path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    out: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(str(path / f))
        assert not set(part) & set(out), f"{f} repeats keys"
        out.update(part)
    return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _differing_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, str]:
    diff = {}
    for k in a:
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            diff[k] = f"{x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}"
        elif not torch.equal(_bytes(x), _bytes(y)):
            diff[k] = f"{int((_bytes(x) != _bytes(y)).sum())} bytes differ"
    return diff


@dataclass
class Exported:
    family: str
    fmt: str
    model: torch.nn.Module  # moeq-calibrated
    ids: torch.Tensor
    moeq_dir: Path
    peer_dir: Path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


_CASES = [("qwen3_moe", "nvfp4"), ("qwen3_moe", "fp8"), ("mixtral", "nvfp4"), ("mixtral", "fp8")]
#: more families modelopt splits per expert, as moeq does (session 25's survey of every tiny family): the same
#: tensors and configs. granitemoe and phimoe: the same tensors; their configs differ in one exclude_modules entry,
#: where modelopt 0.47 names the router by its in-memory module (``...router``), which no checkpoint tensor has
#: (it renames weight keys, not module names), and moeq names the module the router's weight is saved under.
#: llama4 / gpt_oss are written per expert by moeq and fused by modelopt (docs/export.md); jetmoe modelopt cannot
#: quantize.
_MORE_FAMILIES = ["olmoe", "deepseek_v3", "qwen2_moe", "qwen3_next", "glm4_moe"]
_CONFIG_CASES = _CASES + [(f, q) for f in _MORE_FAMILIES for q in ("nvfp4", "fp8")]
_BYTE_CASES = _CONFIG_CASES + [(f, q) for f in ("granitemoe", "phimoe") for q in ("nvfp4", "fp8")]
_CACHE: dict[tuple[str, str], Exported] = {}


def _exported(family: str, fmt: str, workdir: Path) -> Exported:
    """Both exports of one case, built once per module."""
    if (family, fmt) in _CACHE:
        return _CACHE[(family, fmt)]
    ids = _tokens(0)
    layers = one_moe_layer(family)
    peer = tiny_model(family, torch.bfloat16, seed=0, **layers)
    peer.config.architectures = [type(peer).__name__]  # modelopt's export reads it; from_pretrained models have it

    def forward_loop(m: torch.nn.Module) -> None:
        with torch.no_grad():
            m(input_ids=ids)

    peer = mtq.quantize(peer, _modelopt_cfg(fmt), forward_loop)
    peer_dir = workdir / f"modelopt-{family}-{fmt}"
    export_hf_checkpoint(peer, export_dir=peer_dir)
    model = _calibrated(family, PRESETS[fmt], ids, **layers)
    moeq_dir = moeq.export_hf(model, workdir / f"moeq-{family}-{fmt}", "modelopt")
    _CACHE[(family, fmt)] = Exported(family, fmt, model, ids, moeq_dir, peer_dir)
    return _CACHE[(family, fmt)]


# ---------------------------------------------------------------------------------------------------------
# modelopt byte parity
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "fmt"), _BYTE_CASES, ids=[f"{f}-{q}" for f, q in _BYTE_CASES])
def test_modelopt_byte_parity(family: str, fmt: str, workdir: Path) -> None:
    """Same keys, and every tensor (expert weights, block scales, global scales, input scales, and the
    unquantized rest) has the same dtype, shape and bytes as modelopt 0.47's export."""
    ex = _exported(family, fmt, workdir)
    ours, theirs = _load_dir(ex.moeq_dir), _load_dir(ex.peer_dir)
    assert sorted(ours) == sorted(theirs)
    expert_keys = [k for k in ours if ".experts." in k]
    suffixes = {k.rsplit(".", 1)[1] for k in expert_keys}
    want = {"weight", "weight_scale", "input_scale"} | ({"weight_scale_2"} if fmt == "nvfp4" else set())
    assert suffixes == want
    cfg = ex.model.config
    n_exp = next(getattr(cfg, a) for a in ("num_experts", "num_local_experts", "n_routed_experts") if hasattr(cfg, a))
    assert len(expert_keys) == cfg.num_hidden_layers * n_exp * 3 * len(want)
    diff = _differing_bytes(ours, theirs)
    print(f"{family}-{fmt}: {len(ours)} tensors compared ({len(expert_keys)} expert tensors), {len(diff)} differ")
    assert diff == {}


@pytest.mark.parametrize(("family", "fmt"), _CONFIG_CASES, ids=[f"{f}-{q}" for f, q in _CONFIG_CASES])
def test_modelopt_quant_config_matches(family: str, fmt: str, workdir: Path) -> None:
    """hf_quant_config.json and config.json's quantization_config equal modelopt's except the producer."""
    ex = _exported(family, fmt, workdir)
    ours = json.loads((ex.moeq_dir / "hf_quant_config.json").read_text())
    theirs = json.loads((ex.peer_dir / "hf_quant_config.json").read_text())
    assert ours["producer"]["name"] == "moeq"
    assert ours["quantization"] == theirs["quantization"]
    qa = json.loads((ex.moeq_dir / "config.json").read_text())["quantization_config"]
    qb = json.loads((ex.peer_dir / "config.json").read_text())["quantization_config"]
    qa.pop("producer"), qb.pop("producer")
    assert qa == qb
    ca = json.loads((ex.moeq_dir / "config.json").read_text())
    cb = json.loads((ex.peer_dir / "config.json").read_text())
    ca.pop("quantization_config"), cb.pop("quantization_config")
    assert ca == cb
    ga = json.loads((ex.moeq_dir / "generation_config.json").read_text())
    assert ga == json.loads((ex.peer_dir / "generation_config.json").read_text())


# ---------------------------------------------------------------------------------------------------------
# reload: dequantize per spec / compressed-tensors
# ---------------------------------------------------------------------------------------------------------


_REFERENCE: dict[str, tuple[torch.Tensor, torch.nn.Module]] = {}


def _weight_fake_quant_logits(family: str, fmt: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.nn.Module]:
    """Logits of moeq's weight-fake-quantized model (compiled with the weight-only preset: the loaded
    checkpoints run their activations in bf16) and that model; built once per format."""
    if fmt not in _REFERENCE:
        torch._dynamo.reset()
        model = tiny_model(family, torch.bfloat16, seed=0, **LAYERS)
        moeq.prepare(model, moeq.NVFP4_W4A16 if fmt == "nvfp4" else moeq.FP8_W8A16)
        cm = torch.compile(model, backend="moeq_aot_eager")
        with torch.no_grad():
            cm(ids)
            moeq.finalize(cm)
            _REFERENCE[fmt] = (cm(ids).logits, model)
    return _REFERENCE[fmt]


def _dequantize_modelopt(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """bf16 per-expert ``.weight`` tensors from a modelopt export, dequantized with moeq.formats."""
    out = {}
    for k, t in sd.items():
        if not k.endswith(".weight") or f"{k}_scale" not in sd:
            if not k.endswith(("_scale", "_scale_2")):
                out[k] = t
            continue
        if t.dtype == torch.uint8:
            q = QuantizedTensor("nvfp4", t, sd[f"{k}_scale_2"], sd[f"{k}_scale"])
            out[k] = NVFP4().dequantize(q, torch.bfloat16)
        else:
            out[k] = get_format("fp8").dequantize(QuantizedTensor("fp8", t, sd[f"{k}_scale"]), torch.bfloat16)
    return out


def _from_state_dict(src: Path, sd: dict[str, torch.Tensor], dst: Path) -> torch.nn.Module:
    """transformers' own loading of a bf16 per-expert checkpoint (config without quantization_config)."""
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(config))
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    model, info = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _expert_params(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.dim() == 3 and ".experts." in n]


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_modelopt_export_reloads_by_dequantizing(fmt: str, workdir: Path, tmp_path: Path) -> None:
    """The modelopt export dequantized per spec and loaded by transformers (which re-fuses the per-expert
    tensors) holds expert weights bit-identical to moeq's fake-quantized weights for NVFP4; for FP8 the export
    divides in bf16 (spec, modelopt parity) and the fake quant in fp32, so a few weights are one e4m3 step
    apart (counted below). Logits agree within bf16 tolerance."""
    ex = _exported("qwen3_moe", fmt, workdir)
    reloaded = _from_state_dict(ex.moeq_dir, _dequantize_modelopt(_load_dir(ex.moeq_dir)), tmp_path / "dq")
    ref_logits, ref = _weight_fake_quant_logits("qwen3_moe", fmt, ex.ids)
    state = moeq.quant_state(ref)
    differing = 0
    with torch.no_grad():
        for fqn in _expert_params(reloaded):
            s = state[fqn]
            fq = get_format(fmt).fake_quant(
                ref.get_parameter(fqn), expand_per_expert(s.weight_amax, 3), s.contraction_dim
            )
            got = reloaded.get_parameter(fqn)
            differing += int((got != fq).sum())
            if fmt == "nvfp4":
                assert torch.equal(got, fq), fqn
            else:
                assert int((got != fq).sum()) < 0.05 * got.numel(), fqn
        logits = reloaded(ex.ids).logits
    print(
        f"{fmt}: {differing} expert weight elements differ from the fake quant; logits max |diff| "
        f"{(logits.float() - ref_logits.float()).abs().max().item()}"
    )
    assert fmt == "fp8" or differing == 0
    torch.testing.assert_close(logits.float(), ref_logits.float(), atol=2**-6, rtol=2**-7)


def _ct_export(fmt: str, workdir: Path) -> Exported:
    ex = _exported("qwen3_moe", fmt, workdir)
    out = workdir / f"moeq-ct-qwen3_moe-{fmt}"
    if not out.exists():
        moeq.export_hf(ex.model, out, "compressed-tensors")
    return Exported("qwen3_moe", fmt, ex.model, ex.ids, out, ex.peer_dir)


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_compressed_tensors_layout_and_config(fmt: str, workdir: Path) -> None:
    """The compressed-tensors export holds the reciprocal scales of the modelopt export (same bytes for the
    packed / fp8 weights and block scales) and its quantization_config parses with compressed-tensors'
    own schema."""
    from compressed_tensors.quantization import QuantizationConfig

    ct = _ct_export(fmt, workdir)
    ours, mo = _load_dir(ct.moeq_dir), _load_dir(_exported("qwen3_moe", fmt, workdir).moeq_dir)
    qc = json.loads((ct.moeq_dir / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.format == ("nvfp4-pack-quantized" if fmt == "nvfp4" else "float-quantized")
    modules = sorted({k.rsplit(".", 1)[0] for k in mo if k.endswith(".input_scale")})
    assert modules
    # transformers + compressed-tensors load it compressed: every parameter is found, and the ignore list
    # keeps the unquantized linears (attention, router) plain; transformers' fused experts keep no static
    # input scale (it runs them weight-only), the only tensors it leaves unused
    loaded, info = AutoModelForCausalLM.from_pretrained(ct.moeq_dir, dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"], info
    assert {k.rsplit(".", 1)[1] for k in info["unexpected_keys"]} == {
        "input_global_scale" if fmt == "nvfp4" else "input_scale"
    }
    assert type(loaded.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    for m in modules:
        if fmt == "nvfp4":
            assert torch.equal(_bytes(ours[f"{m}.weight_packed"]), _bytes(mo[f"{m}.weight"]))
            assert torch.equal(_bytes(ours[f"{m}.weight_scale"]), _bytes(mo[f"{m}.weight_scale"]))
            assert torch.equal(ours[f"{m}.weight_global_scale"], (1 / mo[f"{m}.weight_scale_2"]).reshape(1))
            assert torch.equal(ours[f"{m}.input_global_scale"], (1 / mo[f"{m}.input_scale"]).reshape(1))
        else:
            assert torch.equal(_bytes(ours[f"{m}.weight"]), _bytes(mo[f"{m}.weight"]))
            assert torch.equal(ours[f"{m}.weight_scale"], mo[f"{m}.weight_scale"].reshape(1))
            assert torch.equal(ours[f"{m}.input_scale"], mo[f"{m}.input_scale"].reshape(1))


def _ct_nvfp4_dequantized_experts(path: Path) -> dict[str, torch.Tensor]:
    """compressed-tensors' own NVFP4 decompressor applied to every per-expert module of the checkpoint."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationConfig

    sd = _load_dir(path)
    qc = QuantizationConfig.model_validate(json.loads((path / "config.json").read_text())["quantization_config"])
    scheme = qc.config_groups["group_0"]
    out = {}
    for key in sd:
        if key.endswith(".weight_packed"):
            m = key.removesuffix(".weight_packed")
            local = {n: sd[f"{m}.{n}"] for n in ("weight_packed", "weight_scale", "weight_global_scale")}
            out[f"{m}.weight"] = NVFP4PackedCompressor.decompress(local, scheme)["weight"].to(torch.bfloat16)
        elif not key.rsplit(".", 1)[1].startswith(("weight_", "input_")):
            out[key] = sd[key]
    return out


def test_compressed_tensors_fp8_round_trip(workdir: Path) -> None:
    """transformers + compressed-tensors (``CompressedTensorsConfig(dequantize=True)``, CPU) load the FP8
    export; expert weights equal the spec's dequantization of the exported tensors and logits match moeq's
    weight-fake-quantized model within bf16 tolerance."""
    ct = _ct_export("fp8", workdir)
    loaded, info = AutoModelForCausalLM.from_pretrained(
        ct.moeq_dir,
        quantization_config=CompressedTensorsConfig(dequantize=True),
        dtype=torch.bfloat16,
        output_loading_info=True,
    )
    assert not info["missing_keys"], info
    # compressed-tensors keeps no static input scale when it dequantizes (weights only)
    assert {k.rsplit(".", 1)[1] for k in info["unexpected_keys"]} <= {"input_scale"}, info
    loaded.eval()
    spec = _from_state_dict(
        ct.moeq_dir,
        _dequantize_modelopt(_load_dir(_exported("qwen3_moe", "fp8", workdir).moeq_dir)),
        workdir / "ct-fp8-spec",
    )
    for fqn in _expert_params(loaded):
        assert torch.equal(loaded.get_parameter(fqn), spec.get_parameter(fqn)), fqn
    ref_logits, _ = _weight_fake_quant_logits("qwen3_moe", "fp8", ct.ids)
    with torch.no_grad():
        logits = loaded(ct.ids).logits
    torch.testing.assert_close(logits.float(), ref_logits.float(), atol=2**-6, rtol=2**-7)


def test_compressed_tensors_nvfp4_round_trip(workdir: Path, tmp_path: Path) -> None:
    """The NVFP4 export decompressed by compressed-tensors' own ``NVFP4PackedCompressor`` (which divides the
    block scale by ``weight_global_scale``) and loaded by transformers gives moeq's weight-fake-quantized
    logits within bf16 tolerance. transformers' ``dequantize=True`` path is not used for the experts here:
    see ``test_transformers_dequantize_nvfp4_experts``."""
    ct = _ct_export("nvfp4", workdir)
    loaded = _from_state_dict(ct.moeq_dir, _ct_nvfp4_dequantized_experts(ct.moeq_dir), tmp_path / "ct")
    ref_logits, ref = _weight_fake_quant_logits("qwen3_moe", "nvfp4", ct.ids)
    state = moeq.quant_state(ref)
    with torch.no_grad():
        for fqn in _expert_params(loaded):
            s = state[fqn]
            fq = NVFP4().fake_quant(ref.get_parameter(fqn), expand_per_expert(s.weight_amax, 3), s.contraction_dim)
            got = loaded.get_parameter(fqn)
            # 1/g then s_b / (1/g) instead of s_b * g: at most a rounding apart
            torch.testing.assert_close(got.float(), fq.float(), atol=0, rtol=2**-7)
        logits = loaded(ct.ids).logits
    torch.testing.assert_close(logits.float(), ref_logits.float(), atol=2**-6, rtol=2**-7)


@pytest.mark.xfail(
    strict=True,
    reason="transformers 5.23 CompressedTensorsDequantize builds its per-expert DummyModule from weight_packed "
    "and weight_scale only, so weight_global_scale is dropped and NVFP4 expert weights come out 1/g too large",
)
def test_transformers_dequantize_nvfp4_experts(workdir: Path) -> None:
    """transformers' own ``dequantize=True`` load of the NVFP4 export matches the compressed-tensors decompression."""
    ct = _ct_export("nvfp4", workdir)
    loaded = AutoModelForCausalLM.from_pretrained(
        ct.moeq_dir, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.bfloat16
    ).eval()
    ref_logits, _ = _weight_fake_quant_logits("qwen3_moe", "nvfp4", ct.ids)
    with torch.no_grad():
        logits = loaded(ct.ids).logits
    torch.testing.assert_close(logits.float(), ref_logits.float(), atol=2**-6, rtol=2**-7)


# ---------------------------------------------------------------------------------------------------------
# refusals and atomic writes
# ---------------------------------------------------------------------------------------------------------


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if name in p.name)


@pytest.mark.parametrize(
    ("buffer", "value", "message"),
    [
        ("weight_amax", 0.0, "weight amax 0.0 would give a zero, NaN or inf weight scale"),
        ("weight_amax", float("nan"), "weight amax nan would give a zero, NaN or inf weight scale"),
        ("input_amax", float("inf"), "input amax inf would give a zero, NaN or inf input scale"),
    ],
)
def test_refuses_bad_scales(buffer: str, value: float, message: str, workdir: Path, tmp_path: Path) -> None:
    ex = _exported("qwen3_moe", "nvfp4", workdir)
    s = moeq.quant_state(ex.model)["model.layers.0.mlp.experts.down_proj"]
    buf = getattr(s, buffer)
    index = 0 if buffer == "input_amax" else 5
    saved = buf.clone()
    buf[index] = value
    try:
        with pytest.raises(ValueError) as err:
            moeq.export_hf(ex.model, tmp_path / "out")
    finally:
        buf.copy_(saved)
    expert = "expert 0" if buffer == "input_amax" else "expert 5"
    assert f"model.layers.0.mlp.experts.down_proj {expert}: {message}" in str(err.value)
    assert _leftovers(tmp_path, "out") == []


def test_refuses_uncalibrated_expert_without_fallback(tmp_path: Path) -> None:
    """Per-expert input scales: an expert that saw no routed token is refused unless the config accepts
    finalize()'s fallback (``uncalibrated='weight_amax'``)."""
    ids = _tokens(3, batch=1, seq=2)  # 2 tokens x top-2 of 8 experts: at most 4 experts see a token
    cfg = moeq.QuantConfig(weight="nvfp4", activation="nvfp4", act_scale="per_expert")
    model = _calibrated("qwen3_moe", cfg, ids)
    s = moeq.quant_state(model)["model.layers.0.mlp.experts.gate_up_proj"]
    cold = [e for e in range(s.num_experts) if not bool(s.calibrated[e])]
    assert cold, "precondition: some expert saw no calibration token"
    with pytest.raises(ValueError) as err:
        moeq.export_hf(model, tmp_path / "out")
    assert (
        f"model.layers.0.mlp.experts.gate_up_proj expert {cold[0]}: uncalibrated (no routed calibration token) "
        "and no fallback configured" in str(err.value)
    )
    assert _leftovers(tmp_path, "out") == []
    # finalize() gives the same input amaxes under uncalibrated="weight_amax" when every layer saw tokens
    # (that setting only changes layers without any token), so switching the config here equals
    # calibrating with it, without a second compile
    accepting = cfg.replace(uncalibrated="weight_amax")
    get_state(model).config = accepting
    for state in moeq.quant_state(model).values():
        state.config = accepting
    out = moeq.export_hf(model, tmp_path / "out")
    sd = _load_dir(out)
    name = f"model.layers.0.mlp.experts.{cold[0]}.gate_proj.input_scale"
    assert float(sd[name]) == float(NVFP4().scale_from_amax(s.input_amax[cold[0]]))


def test_refuses_expert_count_mismatch(workdir: Path, tmp_path: Path) -> None:
    ex = _exported("qwen3_moe", "nvfp4", workdir)
    ex.model.config.num_experts = 16
    try:
        with pytest.raises(ValueError) as err:
            moeq.export_hf(ex.model, tmp_path / "out")
    finally:
        ex.model.config.num_experts = 8
    assert (
        "model.layers.0.mlp.experts.down_proj: the model holds 8 experts x 1 EP rank(s) = 8, but its config "
        "declares 16 experts" in str(err.value)
    )
    assert _leftovers(tmp_path, "out") == []


def test_refuses_tp_shards(workdir: Path, tmp_path: Path) -> None:
    """A model prepared with ``tp_sharding`` holds tensor-parallel shards: export_hf, which writes whole tensors,
    refuses it with the way out (no ``tp_group`` given, so nothing says this process holds whole weights), and
    writes nothing."""
    ex = _exported("qwen3_moe", "nvfp4", workdir)
    state = moeq.quant_state(ex.model)["model.layers.0.mlp.experts.gate_up_proj"]
    state.tp_shard = "column"
    try:
        with pytest.raises(ValueError) as err:
            moeq.export_hf(ex.model, tmp_path / "out")
    finally:
        state.tp_shard = None
    assert (
        "['model.layers.0.mlp.experts.gate_up_proj'] are the weights of a model prepared with tp_sharding, so "
        "tensor-parallel shards. Save the quant state (moeq.save_state), load it with moeq.load_state into the whole "
        "model prepared without tp_sharding, and export that" in str(err.value)
    )
    assert _leftovers(tmp_path, "out") == []


def test_refuses_unfinalized_model(tmp_path: Path) -> None:
    model = tiny_model("qwen3_moe", torch.bfloat16, seed=0, **LAYERS)
    moeq.prepare(model, moeq.NVFP4)
    with pytest.raises(ValueError, match="not finalized: run moeq.calibrate"):
        moeq.export_hf(model, tmp_path / "out")
    with pytest.raises(ValueError, match="format='safetensors' is not one of"):
        moeq.export_hf(model, tmp_path / "out", format="safetensors")


def test_failed_write_leaves_nothing(workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after some shards were written leaves neither the checkpoint nor its temporary directory,
    and an existing checkpoint is kept."""
    import moeq.io.checkpoint_files as files

    ex = _exported("qwen3_moe", "nvfp4", workdir)
    real = files.save_file
    calls = []

    def failing(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(files, "save_file", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        moeq.export_hf(ex.model, tmp_path / "out", max_shard_size="20KB")
    assert len(calls) == 3
    assert _leftovers(tmp_path, "out") == []
    monkeypatch.setattr(files, "save_file", real)
    moeq.export_hf(ex.model, tmp_path / "out")
    with pytest.raises(FileExistsError):
        moeq.export_hf(ex.model, tmp_path / "out")
    monkeypatch.setattr(files, "save_file", failing)
    calls.clear()
    with pytest.raises(RuntimeError, match="disk full"):
        moeq.export_hf(ex.model, tmp_path / "out", max_shard_size="20KB", overwrite=True)
    assert _leftovers(tmp_path, "out") == ["out"]
    assert _differing_bytes(_load_dir(tmp_path / "out"), _load_dir(ex.moeq_dir)) == {}


# ---------------------------------------------------------------------------------------------------------
# expert parallelism
# ---------------------------------------------------------------------------------------------------------


def test_ep2_gloo_export_matches_single_process(workdir: Path, tmp_path: Path) -> None:
    """Two gloo ranks, each holding 4 of the 8 experts (and the slice of the single-process finalized
    state), write the same tensors and configs as the single-process export; rank 0 writes the index."""
    from ep_export_worker import _PER_EXPERT, run_rank

    ex = _exported("qwen3_moe", "nvfp4", workdir)
    saved = {}
    for fqn, s in moeq.quant_state(ex.model).items():
        entry = {b: getattr(s, b).clone() for b in _PER_EXPERT}
        entry.update(input_amax=s.input_amax.clone(), expert_dim=s.expert_dim, contraction_dim=s.contraction_dim)
        saved[fqn] = entry
    torch.save(saved, tmp_path / "state.pt")
    out = tmp_path / "ep"
    ctx = rank_context()
    args = (str(tmp_path), "qwen3_moe", "nvfp4", str(tmp_path / "state.pt"), str(out), LAYERS)
    procs = [ctx.Process(target=run_rank, args=(r, 2, *args)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    ours, single = _load_dir(out), _load_dir(ex.moeq_dir)
    assert sorted(ours) == sorted(single)
    assert _differing_bytes(ours, single) == {}
    for name in ("hf_quant_config.json", "config.json"):
        assert json.loads((out / name).read_text()) == json.loads((ex.moeq_dir / name).read_text())
    assert _leftovers(tmp_path, "ep") == ["ep"]


# ---------------------------------------------------------------------------------------------------------
# GPT-OSS layout
# ---------------------------------------------------------------------------------------------------------


def test_gpt_oss_interleaved_transposed_biased_layout(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """GPT-OSS keeps ``gate_up_proj [E, H, 2I]`` (contraction dim first) with gate and up interleaved, as
    its forward reads them (``gate_up[..., ::2]``, ``gate_up[..., 1::2]``, ``x @ W``), and
    ``down_proj [E, I, H]``, plus ``*_bias [E, N]``. Each exported per-expert linear dequantizes to the
    matching columns, transposed, of moeq's fake-quantized fused weight, and carries its bias slice."""
    ids = _tokens(0)
    torch._dynamo.reset()
    model = tiny_model("gpt_oss", torch.bfloat16, seed=0)
    moeq.prepare(model, moeq.NVFP4)
    cm = torch.compile(model, backend="moeq_aot_eager")
    with torch.no_grad(), moeq.calibrate(cm):
        cm(ids)
    moeq.finalize(cm)
    with caplog.at_level("WARNING", logger="moeq.io.export"):
        sd = _dequantize_modelopt(_load_dir(moeq.export_hf(model, tmp_path / "gpt_oss")))
    # the layout vLLM's GPT-OSS loader does not read is said at export time
    assert "vLLM's GPT-OSS loader reads only the fused, interleaved gate_up_proj" in caplog.text
    state = moeq.quant_state(model)
    experts = model.model.layers[1].mlp.experts
    prefix = "model.layers.1.mlp.experts"
    fq = {}
    for leaf in ("gate_up_proj", "down_proj"):
        s = state[f"{prefix}.{leaf}"]
        assert s.contraction_dim == 1
        fq[leaf] = NVFP4().fake_quant(getattr(experts, leaf).detach(), expand_per_expert(s.weight_amax, 3), 1)
    for e in range(experts.gate_up_proj.shape[0]):
        got = {p: sd[f"{prefix}.{e}.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj")}
        assert torch.equal(got["gate_proj"], fq["gate_up_proj"][e][:, 0::2].T)
        assert torch.equal(got["up_proj"], fq["gate_up_proj"][e][:, 1::2].T)
        assert torch.equal(got["down_proj"], fq["down_proj"][e].T)
        assert torch.equal(sd[f"{prefix}.{e}.gate_proj.bias"], experts.gate_up_proj_bias[e, 0::2])
        assert torch.equal(sd[f"{prefix}.{e}.up_proj.bias"], experts.gate_up_proj_bias[e, 1::2])
        assert torch.equal(sd[f"{prefix}.{e}.down_proj.bias"], experts.down_proj_bias[e])
    assert not any(k.endswith(("gate_up_proj", "gate_up_proj_bias", "down_proj_bias")) for k in sd)


# ---------------------------------------------------------------------------------------------------------
# weight-only presets
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_weight_only_presets(fmt: str, workdir: Path, tmp_path: Path) -> None:
    """NVFP4 W4A16 exports in both formats without input scales (modelopt ``W4A16_NVFP4``); FP8 W8A16 exports
    as compressed-tensors without input activations, and modelopt format, which has no FP8 weight-only
    algorithm, is refused by name. The weights equal those of the W4A4 / W8A8 export of the same model."""
    _, model = _weight_fake_quant_logits("qwen3_moe", fmt, _tokens(0))
    ct = _load_dir(moeq.export_hf(model, tmp_path / "ct", "compressed-tensors"))
    assert not any(k.endswith(("input_scale", "input_global_scale")) for k in ct)
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["input_activations"] is None
    if fmt == "fp8":
        with pytest.raises(ValueError, match="FP8 W8A16 .* has no modelopt checkpoint algorithm"):
            moeq.export_hf(model, tmp_path / "mo", "modelopt")
        assert _leftovers(tmp_path, "mo") == []
        return
    mo = _load_dir(moeq.export_hf(model, tmp_path / "mo", "modelopt"))
    assert not any(k.endswith("input_scale") for k in mo)
    quant = json.loads((tmp_path / "mo" / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "W4A16_NVFP4" and quant["group_size"] == 16
    full = _load_dir(_exported("qwen3_moe", "nvfp4", workdir).moeq_dir)
    assert _differing_bytes(mo, {k: full[k] for k in mo}) == {}


def test_fp8_export_division_in_weight_dtype_is_at_most_one_step_from_fake_quant(workdir: Path) -> None:
    """The FP8 export rounds ``W / s`` to bf16 before the e4m3 cast (modelopt's rule, for byte parity); the
    fake quant divides in fp32. Where they disagree, the stored e4m3 codes are neighbours (one step apart)."""
    ex = _exported("qwen3_moe", "fp8", workdir)
    sd = _load_dir(ex.moeq_dir)
    experts = ex.model.model.layers[0].mlp.experts
    half = experts.gate_up_proj.shape[1] // 2
    total = differing = 0
    for e in range(experts.gate_up_proj.shape[0]):
        weights = {
            "gate_proj": experts.gate_up_proj[e, :half],
            "up_proj": experts.gate_up_proj[e, half:],
            "down_proj": experts.down_proj[e],
        }
        for name, w in weights.items():
            key = f"model.layers.0.mlp.experts.{e}.{name}"
            scale = sd[f"{key}.weight_scale"]
            exported = sd[f"{key}.weight"].view(torch.uint8).int()
            assert torch.equal(get_format("fp8").scale_from_amax(scale * 448.0), scale)  # same scale as exported
            grid = get_format("fp8").quantize(w.detach(), scale * 448.0).data.view(torch.uint8).int()
            step = (exported - grid).abs()
            assert int(step.max()) <= 1, key
            total += step.numel()
            differing += int((step != 0).sum())
    print(f"fp8 export vs fake-quant grid: {differing}/{total} codes one step apart")
    assert 0 < differing < 0.05 * total


def test_config_and_tokenizer_carried_over(workdir: Path, tmp_path: Path) -> None:
    """config.json is the model's config plus quantization_config; a tokenizer passed in is saved, else the
    tokenizer files of a local ``config._name_or_path`` are copied."""
    from tokenizers import Tokenizer, models
    from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

    ex = _exported("qwen3_moe", "nvfp4", workdir)
    loaded = AutoConfig.from_pretrained(ex.moeq_dir)
    for key in ("hidden_size", "num_experts", "num_hidden_layers", "model_type", "moe_intermediate_size"):
        assert getattr(loaded, key) == getattr(ex.model.config, key), key
    assert loaded.quantization_config["quant_method"] == "modelopt"

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0, "moe": 1, "quant": 2}, unk_token="[UNK]"))
    )
    out = moeq.export_hf(ex.model, tmp_path / "with_tok", tokenizer=tok)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tok.get_vocab()

    source = tmp_path / "hub_copy"
    tok.save_pretrained(source)
    ex.model.config._name_or_path = str(source)
    try:
        out = moeq.export_hf(ex.model, tmp_path / "from_path")
    finally:
        ex.model.config._name_or_path = ""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()


def test_stacked_parameter_named_weight_exports_under_its_module(tmp_path: Path) -> None:
    """JetMoE stacks its experts in ``input_linear.weight`` (``[E, 2F, H]``): expert e is written as
    ``input_linear.{e}.weight`` (not ``input_linear.{e}.weight.weight``), with the per-expert scale from the
    quant state and e4m3 codes equal to torch's own float8 cast of ``w[e] / scale`` (a bf16 weight over a 0-d fp32
    scale: rounded to bf16, the spec's export rule)."""
    model = moeq.prepare(tiny_model("jetmoe", torch.bfloat16), moeq.FP8)
    cm = torch.compile(model, backend="moeq_aot_eager")
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=32):
        with moeq.calibrate(cm):
            cm(_tokens(1, batch=4, seq=32), use_cache=False)
        moeq.finalize(cm)
    out = moeq.export_hf(model, tmp_path / "jetmoe", format="modelopt")
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors.update(load_file(f))
    assert not [k for k in tensors if k.endswith(".weight.weight")]
    fqn = "model.layers.0.mlp.input_linear.weight"
    state = moeq.quant_state(model)[fqn]
    w = model.get_parameter(fqn).detach()
    for e in range(w.shape[0]):
        key = f"model.layers.0.mlp.input_linear.{e}"
        scale = tensors[f"{key}.weight_scale"]
        assert torch.equal(scale, (state.weight_amax[e] / 448.0).to(scale.dtype).reshape(scale.shape))
        want = (w[e] / scale.reshape(())).to(torch.float8_e4m3fn)
        assert (w[e] / scale.reshape(())).dtype == torch.bfloat16
        assert torch.equal(tensors[f"{key}.weight"].view(torch.uint8), want.view(torch.uint8)), e
