"""QuantConfig presets, validation errors, and dict round trips."""

from __future__ import annotations

import dataclasses
import json

import pytest

import moeq
from moeq.config import QuantConfig


@pytest.mark.parametrize(
    ("preset", "weight", "activation", "name"),
    [
        ("FP8", "fp8", "fp8", "FP8 W8A8"),
        ("NVFP4", "nvfp4", "nvfp4", "NVFP4 W4A4"),
        ("NVFP4_W4A16", "nvfp4", None, "NVFP4 W4A16"),
        ("FP8_W8A16", "fp8", None, "FP8 W8A16"),
    ],
)
def test_presets(preset, weight, activation, name):
    """Each preset has the documented formats, the default policies, and a readable name."""
    cfg = getattr(moeq, preset)
    assert isinstance(cfg, QuantConfig)
    assert (cfg.weight, cfg.activation) == (weight, activation)
    assert (cfg.act_scale, cfg.calib, cfg.uncalibrated, cfg.exclude) == ("shared", "routed", "error", ())
    assert cfg.name == name


def test_default_is_nvfp4():
    """QuantConfig() defaults to NVFP4 W4A4 and equals the NVFP4 preset."""
    assert QuantConfig() == moeq.NVFP4


def test_frozen():
    """Configs are immutable."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        moeq.FP8.weight = "nvfp4"


def test_unknown_weight_format():
    """An unknown weight format names the value and lists the known formats."""
    with pytest.raises(ValueError, match=r"weight='int4'.*not a known format") as info:
        QuantConfig(weight="int4")
    assert "fp8" in str(info.value) and "nvfp4" in str(info.value)


def test_unknown_activation_format():
    """An unknown activation format names the value and mentions None as a choice."""
    with pytest.raises(ValueError, match=r"activation='fp16'.*or None"):
        QuantConfig(weight="fp8", activation="fp16")


def test_activation_fewer_bits_than_weight():
    """fp8 weights with nvfp4 activations (W8A4) are rejected with a message saying why."""
    with pytest.raises(ValueError, match=r"fewer bits.*W8A4"):
        QuantConfig(weight="fp8", activation="nvfp4")


def test_weight_alone_says_the_activation_default_and_the_fix():
    """QuantConfig(weight="fp8") keeps the default NVFP4 activations (W8A4): the error says so and names the fixes."""
    with pytest.raises(ValueError, match=r"defaults to 'nvfp4': set activation='fp8' \(W8A8\) or activation=None"):
        QuantConfig(weight="fp8")


def test_constructor_misspelled_keyword_names_the_field():
    """A misspelt keyword of the constructor is a TypeError (as for any dataclass) that also names the field meant."""
    with pytest.raises(TypeError, match=r"'act_scales' \(did you mean 'act_scale'\?\); known keys: \['weight'"):
        QuantConfig(weight="fp8", activation="fp8", act_scales="token")


def test_constructor_traces_in_a_compiled_function():
    """Building a QuantConfig inside a compiled function traces (fullgraph): the misspelt-keyword check runs only
    once the dataclass constructor has failed, so a valid call is the plain dataclass ``__init__`` to Dynamo."""
    import torch

    @torch.compile(fullgraph=True, backend="eager")
    def scaled(x: torch.Tensor) -> torch.Tensor:
        cfg = QuantConfig(weight="fp8", activation="fp8", act_scale="token")
        return x * (2.0 if cfg.act_scale == "token" else 3.0)

    torch._dynamo.reset()
    assert torch.equal(scaled(torch.ones(3)), torch.full((3,), 2.0))


def test_w4a8_allowed():
    """nvfp4 weights with fp8 activations are a valid combination."""
    cfg = QuantConfig(weight="nvfp4", activation="fp8")
    assert cfg.name == "NVFP4 W4A8"


@pytest.mark.parametrize(
    ("field", "value", "choices"),
    [
        ("act_scale", "per_token", r"\['shared', 'per_expert', 'token'\]"),
        ("weight_scale", "row", r"\['expert', 'channel'\]"),
        ("uncalibrated", "zero", r"\['error', 'weight_amax'\]"),
        ("calib", "all", r"\['routed', 'all_experts'\]"),
    ],
)
def test_bad_policy_values(field, value, choices):
    """Bad act_scale / uncalibrated / calib values name the field, the value and the valid choices."""
    with pytest.raises(ValueError, match=rf"QuantConfig\.{field}='{value}'.*{choices}"):
        QuantConfig(**{field: value})


def test_from_dict_misspelled_key():
    """A misspelled key is an error naming it with a 'did you mean' hint."""
    with pytest.raises(ValueError, match=r"'act_scal' \(did you mean 'act_scale'\?\)"):
        QuantConfig.from_dict({"weight": "fp8", "act_scal": "shared"})


def test_from_dict_unknown_key_lists_known():
    """An unrelated unknown key is named, and the known keys are listed."""
    with pytest.raises(ValueError, match="'zzz'") as info:
        QuantConfig.from_dict({"zzz": 1})
    assert "did you mean" not in str(info.value)
    assert "known keys" in str(info.value) and "act_scale" in str(info.value)


@pytest.mark.parametrize(
    "cfg",
    [
        moeq.FP8,
        moeq.NVFP4_W4A16,
        moeq.FP8_DYNAMIC,
        QuantConfig(
            weight="fp8",
            activation="fp8",
            act_scale="per_expert",
            calib="all_experts",
            uncalibrated="weight_amax",
            exclude=("*.layers.0.*", "*shared*"),
        ),
    ],
)
def test_dict_round_trip(cfg):
    """from_dict(to_dict(cfg)) == cfg, also through JSON; exclude is a list in the dict."""
    data = cfg.to_dict()
    assert isinstance(data["exclude"], list)
    assert set(data) == {f.name for f in dataclasses.fields(QuantConfig)}
    assert QuantConfig.from_dict(data) == cfg
    assert QuantConfig.from_dict(json.loads(json.dumps(data))) == cfg


def test_exclude_str_becomes_tuple():
    """exclude given as a single str becomes a one-element tuple (not a tuple of characters)."""
    assert QuantConfig(exclude="*.gate*").exclude == ("*.gate*",)
    assert QuantConfig(exclude=["a", "b"]).exclude == ("a", "b")
    assert QuantConfig.from_dict({"exclude": "lm_head"}).exclude == ("lm_head",)


def test_replace_validates():
    """replace() returns a changed copy and validates like the constructor."""
    cfg = moeq.FP8.replace(act_scale="per_expert")
    assert cfg.act_scale == "per_expert" and moeq.FP8.act_scale == "shared"
    with pytest.raises(ValueError, match="did you mean 'weight'"):
        moeq.FP8.replace(weigth="nvfp4")
    with pytest.raises(ValueError, match="fewer bits"):
        moeq.FP8.replace(activation="nvfp4")
