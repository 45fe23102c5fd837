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
from tests.conftest import make_tokens, one_moe_layer


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

    # HF stores W[e] as [N, K] (x @ W.T), GPT-OSS as [K, N] (x @ W, "transposed") plus biases
    transposed = getattr(module, "is_transposed", False)
    k_dim = 0 if transposed else 1

    def linear(x, weight, state, e, bias):
        w = fmt_w.fake_quant(weight[e], state.weight_amax[e].reshape(1, 1), k_dim)
        y = x @ w if transposed else F.linear(x, w)
        return y + bias[e] if bias is not None else y

    gate_up_bias = getattr(module, "gate_up_proj_bias", None)
    down_bias = getattr(module, "down_proj_bias", None)
    for e in range(module.gate_up_proj.shape[0]):
        token, slot = torch.where(top_k_index == e)
        if token.numel() == 0:
            continue
        x = act_q(hidden_states[token], gate_up_state, e)
        h = act_q(module._apply_gate(linear(x, module.gate_up_proj, gate_up_state, e, gate_up_bias)), down_state, e)
        y = linear(h, module.down_proj, down_state, e, down_bias) * top_k_weights[token, slot, None]
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
    ("gpt_oss", "NVFP4", 8),
    ("gpt_oss", "FP8", 9),
]


@pytest.mark.parametrize(("family", "config", "seed"), CASES)
def test_quantized_output_matches_reference(family, config, seed):
    """Compiled moeq model (fp32) == per-expert reference within 1e-6 relative. Qwen3-MoE with its two MoE layers
    (each layer must read its own quant state), the other families with one (the families' expert code is what
    they add; a second layer doubled the compile time)."""
    cfg = getattr(moeq, config)
    model = tiny_model(family, torch.float32, seed=seed, **({} if family == "qwen3_moe" else one_moe_layer(family)))
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
