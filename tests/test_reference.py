"""After finalize(), the quantized model equals an independent reference within 1e-6 (fp32).

The reference is the same HF model whose experts forward is replaced by plain per-expert matmuls over
the router's own top-k decisions, with weights and activations fake-quantized by moeq.formats using the
finalized amaxes. It shares no code with the graph pass, the custom ops or grouped_mm.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F

import moeq
from moeq.formats import get_format
from moeq.integrations.hf import tiny_model
from tests.conftest import make_tokens


def _reference_experts_forward(module, hidden_states, top_k_index, top_k_weights):
    fmt_w = get_format(module._cfg.weight)
    fmt_a = get_format(module._cfg.activation) if module._cfg.activation else None
    gate_up_state, down_state = module._states
    out = torch.zeros_like(hidden_states)

    def act_q(x, state, e):
        if fmt_a is None:
            return x
        amax = state.input_amax[0] if state.input_amax.numel() == 1 else state.input_amax[e]
        return fmt_a.fake_quant(x, amax.reshape(1, 1), -1)

    for e in range(module.gate_up_proj.shape[0]):
        token, slot = torch.where(top_k_index == e)
        if token.numel() == 0:
            continue
        x = act_q(hidden_states[token], gate_up_state, e)
        w_gate_up = fmt_w.fake_quant(module.gate_up_proj[e], gate_up_state.weight_amax[e].reshape(1, 1), -1)
        gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
        h = act_q(module.act_fn(gate) * up, down_state, e)
        w_down = fmt_w.fake_quant(module.down_proj[e], down_state.weight_amax[e].reshape(1, 1), -1)
        y = F.linear(h, w_down) * top_k_weights[token, slot, None]
        out.index_add_(0, token, y)
    return out


def _reference_model(model, states, cfg):
    ref = copy.deepcopy(model)
    for name, module in ref.named_modules():
        if type(module).__name__.endswith("Experts"):
            module._cfg = cfg
            module._states = (states[f"{name}.gate_up_proj"], states[f"{name}.down_proj"])
            module.forward = types.MethodType(_reference_experts_forward, module)
    return ref


CASES = [
    ("qwen3_moe", "NVFP4", 0),
    ("qwen3_moe", "FP8", 1),
    ("qwen3_moe", "NVFP4_W4A16", 2),
    ("mixtral", "NVFP4", 3),
    ("mixtral", "FP8_W8A16", 4),
    ("olmoe", "FP8", 5),
    ("deepseek_v3", "NVFP4", 6),
    ("deepseek_v3", "FP8", 7),
]


@pytest.mark.parametrize(("family", "config", "seed"), CASES)
def test_quantized_output_matches_reference(family, config, seed):
    """Compiled moeq model (fp32) == per-expert reference within 1e-6 relative."""
    cfg = getattr(moeq, config)
    model = tiny_model(family, torch.float32, seed=seed)
    unquantized = copy.deepcopy(model)
    moeq.prepare(model, cfg)
    cm = torch.compile(model, backend="moeq_aot_eager")
    calib, test = make_tokens(seed=seed), make_tokens(seed=seed + 100)
    with torch.no_grad():
        with moeq.calibrate(cm):
            cm(calib)
        moeq.finalize(cm)
        got = cm(test).logits
        states = {k: v for k, v in moeq.quant_state(model).items()}
        expected = _reference_model(unquantized, states, cfg)(test).logits
        full_precision = unquantized(test).logits
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < 1e-6, rel
    # and quantization did something measurable
    assert ((got - full_precision).norm() / full_precision.norm()).item() > 1e-4
