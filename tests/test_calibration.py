"""Calibration statistics against independent computations from the model's own router decisions.

The reference statistics come from an uncompiled copy of the model whose experts modules are hooked:
the hook sees the router's top-k decisions and recomputes, per expert, max|x| over the routed rows
(gate_up input) and over act(gate) * up (down_proj input) with plain per-expert matmuls.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import moeq
from moeq.integrations.hf import tiny_model
from tests.conftest import make_tokens


def _router_reference(model, batches):
    """Per experts module: per-expert input amax of both GEMMs and token counts, from the router itself."""
    stats = {}

    def hook(module, args, kwargs):
        hidden, top_k_index = args[0], args[1]
        name = module._ref_name
        num_experts = module.gate_up_proj.shape[0]
        entry = stats.setdefault(
            name,
            {
                "gate_up": torch.zeros(num_experts, dtype=torch.float64),
                "down": torch.zeros(num_experts, dtype=torch.float64),
                "counts": torch.zeros(num_experts, dtype=torch.int64),
            },
        )
        for e in range(num_experts):
            tokens = (top_k_index == e).any(dim=-1).nonzero().flatten()
            rows = (top_k_index == e).sum()
            entry["counts"][e] += int(rows)
            if tokens.numel() == 0:
                continue
            x = hidden[tokens]
            h = F.linear(x, module.gate_up_proj[e])
            gate, up = h.chunk(2, dim=-1)
            act = module.act_fn(gate) * up
            entry["gate_up"][e] = max(entry["gate_up"][e], x.abs().max().double())
            entry["down"][e] = max(entry["down"][e], act.abs().max().double())

    handles = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Experts"):
            module._ref_name = name
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        for tokens in batches:
            model(tokens)
    for h in handles:
        h.remove()
    return stats


def _calibrate(model, batches, config, backend="moeq_aot_eager"):
    moeq.prepare(model, config)
    cm = torch.compile(model, backend=backend)
    with torch.no_grad(), moeq.calibrate(cm):
        for tokens in batches:
            cm(tokens)
    return cm


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_statistics_match_router_reference(family, seed):
    """Weight amax == max|W_e| exactly; input amax and token counts == the router-derived reference."""
    model = tiny_model(family, torch.float32, seed=seed)
    batches = [make_tokens(seed=seed + 10 * i, batch=1, seq=3) for i in range(2)]
    reference = _router_reference(copy.deepcopy(model), batches)
    cm = _calibrate(model, batches, moeq.QuantConfig(act_scale="per_expert"))
    states = moeq.quant_state(model)
    for module_name, ref in reference.items():
        gate_up, down = states[f"{module_name}.gate_up_proj"], states[f"{module_name}.down_proj"]
        assert torch.equal(gate_up.tokens_per_expert, ref["counts"])
        assert torch.equal(down.tokens_per_expert, ref["counts"])
        assert torch.equal(gate_up.observed_input_amax.double(), ref["gate_up"])
        torch.testing.assert_close(down.observed_input_amax.double(), ref["down"], rtol=1e-6, atol=0)
    moeq.finalize(cm)
    for fqn, state in states.items():
        w = model.get_parameter(fqn).detach()
        expected = torch.stack([w[e].abs().max() for e in range(w.shape[0])]).float()
        assert torch.equal(state.weight_amax, expected), fqn
        assert torch.equal(state.calibrated, state.tokens_per_expert > 0)


def test_zero_token_experts_flagged_and_take_peer_max():
    """3 tokens x top-2 over 8 experts leaves experts empty: per_expert mode fills them with the layer max."""
    model = tiny_model("qwen3_moe", torch.float32, seed=3)
    batches = [make_tokens(seed=5, batch=1, seq=3)]
    cm = _calibrate(model, batches, moeq.QuantConfig(act_scale="per_expert"))
    moeq.finalize(cm)
    text = str(moeq.explain(cm))
    for fqn, state in moeq.quant_state(model).items():
        empty = (state.tokens_per_expert == 0).nonzero().flatten().tolist()
        assert empty, "pigeonhole: 6 routed rows cannot cover 8 experts"
        layer_max = state.observed_input_amax.max()
        for e in range(state.num_experts):
            if e in empty:
                assert state.input_amax[e] == layer_max
                assert "no calibration tokens" in state.flags[e]
                assert f"{fqn} expert {e}: no calibration tokens" in text
            else:
                assert state.input_amax[e] == state.observed_input_amax[e]
        assert not state.calibrated[empty].any()


def test_shared_scale_is_max_over_experts():
    """act_scale="shared": one input amax per GEMM, the max over experts of the routed-row amax."""
    model = tiny_model("olmoe", torch.float32, seed=4)
    cm = _calibrate(model, [make_tokens(seed=6)], moeq.NVFP4)
    moeq.finalize(cm)
    for state in moeq.quant_state(model).values():
        assert state.input_amax.shape == (1,)
        assert state.input_amax[0] == state.observed_input_amax.max()


def test_calibration_accumulates_and_recompiles_keep_state():
    """Two calibrate() blocks accumulate (max / sum); switching modes recompiles without losing state."""
    model = tiny_model("qwen3_moe", torch.float32, seed=5)
    a, b = make_tokens(seed=7), make_tokens(seed=8)
    cm = _calibrate(model, [a], moeq.FP8)
    after_a = {
        k: (s.observed_input_amax.clone(), s.tokens_per_expert.clone()) for k, s in moeq.quant_state(model).items()
    }
    with torch.no_grad():
        cm(a)  # mode "off": recompiles, observes nothing
        with moeq.calibrate(cm):
            cm(b)
    for fqn, state in moeq.quant_state(model).items():
        amax_a, counts_a = after_a[fqn]
        assert (state.observed_input_amax >= amax_a).all()
        assert state.tokens_per_expert.sum() == counts_a.sum() + b.numel() * 2
    moeq.finalize(cm)
    with torch.no_grad():
        quantized = cm(a).logits
    assert torch.isfinite(quantized).all()
    assert moeq.explain(cm).state.finalized


def test_registered_sync_hook_runs_in_name_order_and_its_changes_reach_the_state(monkeypatch):
    """A hook registered with ``register_sync_hook`` runs inside ``finalize()`` between the built-ins by name, sees
    every expert GEMM's statistics, and what it writes is what finalize() keeps: here the observed input amax
    doubled, so each covered expert's input amax is twice the router-derived reference's."""
    from moeq.runtime import collectives

    hooks = dict(collectives._HOOKS)
    monkeypatch.setattr(collectives, "_HOOKS", hooks)
    order, seen = [], {}
    for name, hook in list(hooks.items()):
        hooks[name] = lambda stats, groups, name=name, hook=hook: (order.append(name), hook(stats, groups))

    def double_input_amax(stats, groups):
        order.append("25-double")
        for fqn, s in stats.items():
            seen[fqn] = groups.distributed
            s.observed_input_amax = s.observed_input_amax * 2

    collectives.register_sync_hook("25-double", double_input_amax)
    assert collectives.registered_sync_hooks() == ["10-tp", "20-dp", "25-double", "30-ep"]
    model = tiny_model("qwen3_moe", torch.float32, seed=7)
    batches = [make_tokens(seed=8, batch=2, seq=8)]
    reference = _router_reference(copy.deepcopy(model), batches)
    moeq.finalize(_calibrate(model, batches, moeq.QuantConfig(act_scale="per_expert")))
    assert order == ["10-tp", "20-dp", "25-double", "30-ep"]
    states = moeq.quant_state(model)
    assert seen == dict.fromkeys(states, False)
    for module_name, ref in reference.items():
        for gemm in ("gate_up", "down"):
            state = states[f"{module_name}.{gemm}_proj"]
            covered = state.tokens_per_expert > 0
            assert covered.any()
            torch.testing.assert_close(
                state.input_amax[covered].double(), 2 * ref[gemm][covered], rtol=1e-6, atol=0, msg=gemm
            )


def test_bmm_experts_count_the_routed_tokens():
    """Llama 4's bmm experts run every token through every expert, the tokens its router did not pick scaled to
    zero rows: each expert's count is the tokens its router's top-k sent it (from the router's logits), so cold
    experts show as uncovered and, per expert, take the layer's max."""
    model = tiny_model("llama4", torch.float32, seed=2)
    tokens = make_tokens(seed=3, batch=1, seq=3)
    routed = {}

    def count(module, args, output):
        _, logits = output
        picked = logits.topk(module.top_k, dim=1).indices.flatten()
        routed[len(routed)] = torch.bincount(picked, minlength=module.num_experts)

    handles = [m.register_forward_hook(count) for m in model.modules() if type(m).__name__ == "Llama4Router"]
    with torch.no_grad():
        model(tokens, use_cache=False)
    for h in handles:
        h.remove()
    cm = _calibrate(model, [tokens], moeq.QuantConfig(weight="fp8", activation="fp8", act_scale="per_expert"))
    moeq.finalize(cm)
    states = moeq.quant_state(model)
    for layer, want in routed.items():
        for gemm in ("gate_up_proj", "down_proj"):
            state = states[f"model.layers.{layer}.feed_forward.experts.{gemm}"]
            assert torch.equal(state.tokens_per_expert, want), (gemm, state.tokens_per_expert, want)
            cold = want == 0
            assert cold.any() and not state.calibrated[cold].any()
            assert (state.input_amax[cold] == state.observed_input_amax.max()).all()
