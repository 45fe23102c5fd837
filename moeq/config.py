"""Quantization configs: what to quantize and how. Validated at construction with clear errors."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from moeq.formats import available_formats

__all__ = ["QuantConfig", "FP8", "NVFP4", "NVFP4_W4A16", "FP8_W8A16"]

_ACT_SCALES = ("shared", "per_expert")
_CALIB = ("routed",)
_UNCALIBRATED = ("error", "weight_amax")
# activation formats never carry fewer bits than the weight format they feed
_BITS = {"fp8": 8, "nvfp4": 4}


@dataclass(frozen=True)
class QuantConfig:
    """Per-expert quantization of the routed-expert GEMMs.

    weight:        weight format, ``"fp8"`` (per-expert per-tensor) or ``"nvfp4"`` (per-expert global
                   scale, e4m3 scales per 16-block along K).
    activation:    activation format or ``None`` for weight-only (W8A16 / W4A16).
    act_scale:     ``"shared"``: one input amax per expert GEMM (max over experts; what serving engines
                   load); ``"per_expert"``: one per expert, experts without tokens take the layer's max.
    calib:         ``"routed"``: activation statistics from the tokens the model's router sends.
    uncalibrated:  what ``finalize()`` does with a GEMM whose experts saw no token at all: ``"error"``
                   (default) or ``"weight_amax"`` (use the layer's max weight amax as input amax).
    exclude:       fnmatch patterns of weight FQNs to leave unquantized (reported by ``explain()``).
    """

    weight: str = "nvfp4"
    activation: str | None = "nvfp4"
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
                f"{self.weight!r}; W{_BITS[self.weight]}A{_BITS[self.activation]} is not a supported combination"
            )
        for name, value, allowed in (
            ("act_scale", self.act_scale, _ACT_SCALES),
            ("calib", self.calib, _CALIB),
            ("uncalibrated", self.uncalibrated, _UNCALIBRATED),
        ):
            if value not in allowed:
                raise ValueError(f"QuantConfig.{name}={value!r} is not valid; choose one of {list(allowed)}")
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))
        else:
            object.__setattr__(self, "exclude", tuple(self.exclude))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        """Build from a plain dict (e.g. JSON); unknown keys are an error that names them."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in known]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, known, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"unknown QuantConfig keys: {', '.join(hints)}; known keys: {known}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["exclude"] = list(self.exclude)
        return data

    def replace(self, **changes: Any) -> QuantConfig:
        return QuantConfig.from_dict({**self.to_dict(), **changes})

    @property
    def name(self) -> str:
        bits_w = _BITS.get(self.weight, 8)
        if self.activation is None:
            return f"{self.weight.upper()} W{bits_w}A16"
        return f"{self.weight.upper()} W{bits_w}A{_BITS.get(self.activation, 8)}"


FP8 = QuantConfig(weight="fp8", activation="fp8")
NVFP4 = QuantConfig(weight="nvfp4", activation="nvfp4")
NVFP4_W4A16 = QuantConfig(weight="nvfp4", activation=None)
FP8_W8A16 = QuantConfig(weight="fp8", activation=None)
