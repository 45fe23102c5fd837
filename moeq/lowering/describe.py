"""The "Lowering" section of ``moeq.explain()``: what the ``moeq`` backend runs on CUDA for a config's expert GEMMs,
written from the describe functions of the passes that decide it (which read the live fusion policy and kernel
switches), so the text cannot drift from what the backend does."""

from __future__ import annotations

import textwrap

from moeq.config import QuantConfig
from moeq.lowering.gather_quant import describe_quantize_before_gather
from moeq.lowering.inductor import describe_combine, describe_lowering, fusion_policy
from moeq.lowering.joint import describe_training

__all__ = ["lowering_lines"]


def lowering_lines(mode: str, config: QuantConfig, module_lists: bool, width: int) -> list[str]:
    """The report's "Lowering" section for ``mode`` ("qat" / "deploy") and ``config``: a header with the fusion
    policy, then one labelled line per part of the model, wrapped to ``width`` columns; ``module_lists``: the model's
    experts include per-expert module lists (which no fused kernel takes)."""
    forward = describe_lowering(mode, config.weight, config.activation)
    if config.dynamic_activations:
        forward += " (dynamic per-token activation scales: a row-amax pass over the activations first)"
    if config.weight_scale == "channel":
        forward += "; channel-wise weight scales multiply the output columns"
    parts = [
        ("forward", f"{forward} (torch._grouped_mm and bmm experts)"),
        ("activations", describe_quantize_before_gather(mode, config.activation, config.act_scale == "shared")),
        ("training", describe_training(mode, config.weight, config.weight_scale == "channel")),
        ("combine", describe_combine()),
    ]
    if module_lists:
        parts.append(
            (
                "module lists",
                "not fused: each expert's GEMM stays the model's own, fed by moeq's quantizer ops (fake quant, or the "
                "stored weight dequantized after freeze)",
            )
        )
    header = (
        f"Lowering by backend='moeq' (Inductor), fusion '{fusion_policy()}', on CUDA (on the CPU each moeq op runs its "
        "torch reference; backend='moeq_aot_eager' runs the rewritten graph's ops unfused):"
    )
    lines = textwrap.wrap(header, width=width, break_on_hyphens=False)
    for label, text in parts:
        if text:
            lines.append(
                textwrap.fill(
                    text,
                    width=width,
                    initial_indent=f"  {label + ':':<14}",
                    subsequent_indent=" " * 16,
                    break_on_hyphens=False,
                )
            )
    return lines
