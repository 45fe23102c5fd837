"""moeq: per-expert quantization of Mixture-of-Experts models as a torch.compile / FX graph pass."""

from __future__ import annotations

import moeq.lowering.ops  # noqa: F401  (registers the moeq:: custom ops)
from moeq.api import explain, prepare, quantize_graph
from moeq.config import FP8, FP8_DYNAMIC, FP8_W8A16, NVFP4, NVFP4_W4A16, QuantConfig
from moeq.io.checkpoint import load_state, save_state
from moeq.io.export import export_hf
from moeq.lowering.backend import moeq_backend, register_backends
from moeq.passes.freeze import freeze
from moeq.runtime.calibrate import calibrate, finalize, quant_state
from moeq.runtime.codes import reuse_weight_codes
from moeq.state import ExpertQuantState

__version__ = "0.1.0"

__all__ = [
    "FP8",
    "FP8_DYNAMIC",
    "FP8_W8A16",
    "NVFP4",
    "NVFP4_W4A16",
    "ExpertQuantState",
    "QuantConfig",
    "calibrate",
    "explain",
    "export_hf",
    "finalize",
    "freeze",
    "load_state",
    "moeq_backend",
    "prepare",
    "quant_state",
    "quantize_graph",
    "reuse_weight_codes",
    "save_state",
]

register_backends()
