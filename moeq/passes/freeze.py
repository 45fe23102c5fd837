"""Deploy mode: store each finalized expert weight quantized, once, and drop the float parameter.

``moeq.freeze(model)`` (after ``finalize()``) quantizes every expert weight with its finalized per-expert
amax into the stored form of :meth:`moeq.formats.QuantFormat.quantize` (K-last: FP8 e4m3 ``[E, N, K]`` +
scale ``[E]``; NVFP4 packed E2M1 pairs ``[E, N, cdiv(K, 128) * 64]``, in the 64-byte runs and word bit order of
:func:`~moeq.formats.interleave_nvfp4_runs` that the fused kernel decodes, + e4m3 block scales
``[E, N, K/16]`` + global scale ``[E]``), kept as buffers of the weight's :class:`~moeq.state.ExpertQuantState`. The parameter is replaced
by a stand-in of the same shape and dtype that holds one expert's worth of zeros broadcast over the
expert dim (1/E of the float weight: grouped-GEMM shape checks want real strides in the last two dims; each 2-D
weight of a per-expert module list by its own zeros),
so model code still traces, and the model switches to mode ``"deploy"``: the pass feeds its GEMMs ``moeq::dequant_weight`` of
the stored buffers, which the Inductor lowering fuses into ``moeq::grouped_qmm(mode="deploy")``. The
weight bytes read by the kernel are the quantized ones.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from tqdm import tqdm

from moeq.formats import expand_weight_amax, get_format, stored_form
from moeq.state import ModelQuantState, get_state, listed_members, register_owner

__all__ = ["freeze", "stored_form"]

logger = logging.getLogger(__name__)


def _owner(root: torch.nn.Module, fqn: str) -> tuple[torch.nn.Module, str]:
    parent, _, name = fqn.rpartition(".")
    return (root.get_submodule(parent) if parent else root), name


def freeze(model: Any) -> ModelQuantState:
    """Replace every quantized expert weight of a finalized model by its stored quantized form.

    Irreversible (the float weights are released). Raises before changing anything if the model is not
    finalized. Returns the model's quant state (mode ``"deploy"``).
    """
    state = get_state(model)
    if state.mode == "deploy":
        return state
    if not state.finalized:
        raise RuntimeError("freeze() needs a finalized model: run calibrate() and finalize() first")
    fmt = get_format(state.config.weight)
    root = state._root
    for fqn, s in sorted(state.items()):
        if s.expert_dim != 0:
            raise ValueError(f"freeze(): {fqn} has its experts along dim {s.expert_dim}; only dim 0 is supported")
    with torch.no_grad():
        items = sorted(state.items())
        for fqn, s in tqdm(items, desc="moeq freeze", unit="weight", disable=len(items) < 8):
            w = state.weight(fqn)
            amax = expand_weight_amax(s.weight_amax.to(w.device), w.dim(), s.expert_dim, s.contraction_dim)
            q = fmt.quantize(w.detach(), amax, s.contraction_dim)
            s.frozen_data, s.frozen_scale, s.frozen_block_scale = stored_form(q)
            s.frozen_dtype = w.dtype
            members = listed_members(fqn, s.num_experts)
            for member in members or [fqn]:
                module, name = _owner(root, member)
                stand_in = torch.zeros(w.shape[1:], dtype=w.dtype, device=w.device)
                if not members:
                    stand_in = stand_in.expand(w.shape)
                del module._parameters[name]
                module.register_buffer(name, stand_in, persistent=False)
                register_owner(stand_in, state, member)
            logger.info("moeq: froze %s as %s %s", fqn, fmt.name, tuple(s.frozen_data.shape))
    state.mode = "deploy"
    return state
