"""Quantization configs: what to quantize and how. Validated at construction with clear errors."""

from __future__ import annotations

import dataclasses
import difflib
import functools
from dataclasses import dataclass, field
from typing import Any

from moeq.formats import available_formats

__all__ = ["QuantConfig", "FP8", "FP8_DYNAMIC", "NVFP4", "NVFP4_W4A16", "FP8_W8A16", "PRESETS", "CALIB_MODES"]

_WEIGHT_SCALES = ("expert", "channel")
_ACT_SCALES = ("shared", "per_expert", "token")
#: the values of QuantConfig.calib (command lines offer them as --calib)
CALIB_MODES = ("routed", "all_experts")
_UNCALIBRATED = ("error", "weight_amax")
# activation formats never carry fewer bits than the weight format they feed
_BITS = {"fp8": 8, "nvfp4": 4}


@dataclass(frozen=True)
class QuantConfig:
    """Per-expert quantization of the routed-expert GEMMs.

    weight:        weight format, ``"fp8"`` (per-expert per-tensor) or ``"nvfp4"`` (per-expert global
                   scale, e4m3 scales per 16-block along K).
    activation:    activation format or ``None`` for weight-only (W8A16 / W4A16); default ``"nvfp4"``, so an FP8
                   weight needs ``activation="fp8"`` or ``None``. NVFP4 weights with FP8 activations (W4A8)
                   calibrate and fake-quantize, but no export format (modelopt, compressed-tensors) holds them.
    weight_scale:  ``"expert"``: one weight scale per expert (per-tensor FP8; NVFP4's global scale);
                   ``"channel"`` (FP8 only): one per expert and output channel, ``[E, N]``.
    act_scale:     ``"shared"``: one input amax per expert GEMM (max over experts; what serving engines
                   load); ``"per_expert"``: one per expert, experts without tokens take the layer's max;
                   ``"token"`` (FP8 only): dynamic, each routed row scaled by its own amax at run time (no
                   calibration data needed).
    calib:         ``"routed"``: activation statistics from the tokens the model's router sends;
                   ``"all_experts"``: while calibrating, every token also runs through every expert (transformers
                   experts modules, module-list MoE blocks; the output stays the routed one), so no expert lacks
                   statistics, as nvidia-modelopt's ``moe_calib_experts_ratio=1.0``. Costs ``E / top_k`` times the
                   expert work of a calibration forward (in calls of ``4 * top_k`` experts at experts modules).
    uncalibrated:  what ``finalize()`` does with a GEMM whose experts saw no token at all: ``"error"``
                   (default) or ``"weight_amax"`` (use the layer's max weight amax as input amax).
    exclude:       fnmatch patterns of weight FQNs to leave unquantized (reported by ``explain()``).
    """

    weight: str = "nvfp4"
    activation: str | None = "nvfp4"
    weight_scale: str = "expert"
    act_scale: str = "shared"
    calib: str = "routed"
    uncalibrated: str = "error"
    exclude: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        formats = available_formats()
        if self.weight not in formats:
            raise ValueError(f"QuantConfig.weight={self.weight!r} is not a known format; choose one of {formats}")
        if self.activation is not None and self.activation not in formats:
            raise ValueError(
                f"QuantConfig.activation={self.activation!r} is not a known format; choose one of {formats} or None"
            )
        if self.activation is not None and _BITS.get(self.activation, 8) < _BITS.get(self.weight, 8):
            raise ValueError(
                f"QuantConfig: activation format {self.activation!r} has fewer bits than weight format "
                f"{self.weight!r}; W{_BITS[self.weight]}A{_BITS[self.activation]} is not a supported combination. "
                f"The activation format defaults to 'nvfp4': set activation={self.weight!r} "
                f"(W{_BITS[self.weight]}A{_BITS[self.weight]}) or activation=None (weight-only), or use a preset "
                "such as moeq.FP8"
            )
        for name, value, allowed in (
            ("weight_scale", self.weight_scale, _WEIGHT_SCALES),
            ("act_scale", self.act_scale, _ACT_SCALES),
            ("calib", self.calib, CALIB_MODES),
            ("uncalibrated", self.uncalibrated, _UNCALIBRATED),
        ):
            if value not in allowed:
                raise ValueError(f"QuantConfig.{name}={value!r} is not valid; choose one of {list(allowed)}")
        if self.weight_scale == "channel" and self.weight != "fp8":
            raise ValueError(
                f"QuantConfig: weight_scale='channel' is an FP8 weight scale, not one of weight={self.weight!r} "
                "(NVFP4 already scales every 16-block along K)"
            )
        if self.act_scale == "token" and self.activation != "fp8":
            raise ValueError(
                f"QuantConfig: act_scale='token' (dynamic per-token scales) needs activation='fp8', got "
                f"activation={self.activation!r}"
                + (" (weight-only configs have no activation scale)" if self.activation is None else "")
            )
        if self.calib == "all_experts" and not self.static_activations:
            scales = (
                "a weight-only config (activation=None) has none"
                if self.activation is None
                else "act_scale='token' computes them from each row at run time, without calibration"
            )
            raise ValueError(
                f"QuantConfig: calib='all_experts' changes which tokens calibrate the activation scales, and {scales}; "
                "use calib='routed'"
            )
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))
        else:
            object.__setattr__(self, "exclude", tuple(self.exclude))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        """Build from a plain dict (e.g. JSON); unknown keys are an error that names them."""
        message = _unknown_keys_message(data)
        if message:
            raise ValueError(message)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields (``exclude`` as a list), the form checkpoints and exports store; ``from_dict``
        reads it back."""
        data = dataclasses.asdict(self)
        data["exclude"] = list(self.exclude)
        return data

    def replace(self, **changes: Any) -> QuantConfig:
        """A copy with ``changes`` applied, validated as a new config (an unknown key or an impossible combination
        raises ``ValueError``)."""
        return QuantConfig.from_dict({**self.to_dict(), **changes})

    @property
    def dynamic_activations(self) -> bool:
        """Activation scales computed at run time from each routed row (``act_scale="token"``): no static input
        scale, no calibration data needed."""
        return self.act_scale == "token"

    @property
    def static_activations(self) -> bool:
        """Activations quantized with a static input scale, which calibration data sets (not weight-only, not
        per-token)."""
        return self.activation is not None and not self.dynamic_activations

    @property
    def name(self) -> str:
        """A short human name, e.g. ``"NVFP4 W4A4"`` plus its scale granularity, as reports print it."""
        bits_w = _BITS.get(self.weight, 8)
        if self.activation is None:
            name = f"{self.weight.upper()} W{bits_w}A16"
        else:
            name = f"{self.weight.upper()} W{bits_w}A{_BITS.get(self.activation, 8)}"
        granularity = []
        if self.weight_scale == "channel":
            granularity.append("channel weights")
        if self.dynamic_activations:
            granularity.append("dynamic token activations")
        return f"{name} ({', '.join(granularity)})" if granularity else name


def _unknown_keys_message(keys: Any) -> str:
    """What is wrong with ``keys`` that are no QuantConfig field (each with its closest field), or ``""``."""
    known = [f.name for f in dataclasses.fields(QuantConfig)]
    hints = []
    for k in (k for k in keys if k not in known):
        close = difflib.get_close_matches(k, known, n=1)
        hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"unknown QuantConfig keys: {', '.join(hints)}; known keys: {known}" if hints else ""


_dataclass_init = QuantConfig.__init__


@functools.wraps(_dataclass_init)
def _init_naming_unknown_keys(self: QuantConfig, *args: Any, **kwargs: Any) -> None:
    """The dataclass ``__init__``, whose ``TypeError`` for a misspelt keyword also names the field it meant. The
    keys are looked at only once the dataclass ``__init__`` has failed, so Dynamo traces a valid call as it is."""
    try:
        _dataclass_init(self, *args, **kwargs)
    except TypeError as error:
        message = _unknown_keys_message(kwargs)
        if message:
            raise TypeError(message) from error
        raise


QuantConfig.__init__ = _init_naming_unknown_keys  # type: ignore[method-assign]


FP8 = QuantConfig(weight="fp8", activation="fp8")
NVFP4 = QuantConfig(weight="nvfp4", activation="nvfp4")
NVFP4_W4A16 = QuantConfig(weight="nvfp4", activation=None)
FP8_W8A16 = QuantConfig(weight="fp8", activation=None)
#: FP8 with channel-wise weight scales and dynamic per-token activation scales: what compressed-tensors calls
#: ``FP8_DYNAMIC`` and nvidia-modelopt ``FP8_PER_CHANNEL_PER_TOKEN``; needs no calibration data
FP8_DYNAMIC = QuantConfig(weight="fp8", activation="fp8", weight_scale="channel", act_scale="token")

#: the preset names (``moeq.<name>``), for command lines
PRESETS = ["NVFP4", "FP8", "NVFP4_W4A16", "FP8_W8A16", "FP8_DYNAMIC"]
