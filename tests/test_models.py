"""The pass on real transformers MoE models built from tiny configs (random weights, no download).

For every family, dtype and entry point, every routed-expert GEMM is rewritten (2 per MoE layer, counted
against the model's own expert parameters) and nothing else: attention, router and shared experts stay
dense and are listed by explain() with their reason.
"""

from __future__ import annotations

import pytest
import torch

import moeq
from moeq.integrations.hf import expert_parameter_names, tiny_model
from tests.conftest import FAMILIES, make_tokens

DTYPES = [torch.float32, torch.bfloat16]


def _run_compiled(model, tokens):
    cm = torch.compile(model, backend="moeq_aot_eager")
    with torch.no_grad(), moeq.calibrate(cm):
        cm(tokens)
    return cm


def _run_exported(model, tokens):
    ep = torch.export.export(model, (tokens,), kwargs={"use_cache": False})
    qgm = moeq.quantize_graph(ep.module())
    with torch.no_grad(), moeq.calibrate(qgm):
        qgm(tokens, use_cache=False)
    return qgm


def _dense_weight_names(model) -> set[str]:
    return {
        n
        for n, p in model.named_parameters()
        if p.dim() == 2 and n.endswith("weight") and "embed" not in n and "norm" not in n
    }


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("entry", ["compile", "export"])
def test_every_routed_expert_gemm_rewritten(family, dtype, entry):
    """All expert parameters become quantized GEMMs; shared experts, attention and router stay dense."""
    model = moeq.prepare(tiny_model(family, dtype), moeq.NVFP4)
    expected = set(expert_parameter_names(model))
    moe_layers = {n.rsplit(".", 2)[0] for n in expected}
    assert len(expected) == 2 * len(moe_layers) > 0

    runner = _run_compiled if entry == "compile" else _run_exported
    handle = runner(model, make_tokens(seed=1))
    report = moeq.explain(handle)

    assert {r.fqn for r in report.rewritten} == expected
    assert set(moeq.quant_state(model)) == expected
    dense_skipped = {s.weight_fqn for s in report.skipped if s.category == "dense"}
    dense_expected = _dense_weight_names(model) - {n for n in expected}
    assert dense_expected <= dense_skipped | {"lm_head.weight"}
    assert not (dense_skipped & expected)
    text = str(report)
    for fqn in expected:
        assert fqn in text
    assert "dense GEMM on 2-D weight" in text
    if family == "deepseek_v3":
        # the shared expert (a dense MLP beside the routed experts) is listed, not rewritten
        assert any("shared_experts" in (s.weight_fqn or "") for s in report.skipped)
    for fqn, state in moeq.quant_state(model).items():
        assert state.tokens_per_expert.sum() > 0, fqn


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_inductor_backend_end_to_end(dtype):
    """backend="moeq" (Inductor): calibrate is lossless, quantize changes the output by a bounded amount."""
    model = tiny_model("qwen3_moe", dtype)
    tokens = make_tokens(seed=2)
    with torch.no_grad():
        reference = model(tokens).logits.float()
    moeq.prepare(model, moeq.FP8)
    cm = torch.compile(model, backend="moeq")
    with torch.no_grad():
        with moeq.calibrate(cm):
            calibrating = cm(tokens).logits.float()
        moeq.finalize(cm)
        quantized = cm(tokens).logits.float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(calibrating, reference, rtol=tol, atol=tol)
    rel = ((quantized - reference).norm() / reference.norm()).item()
    assert 0 < rel < 0.1
    assert len(moeq.explain(cm).rewritten) == 4
