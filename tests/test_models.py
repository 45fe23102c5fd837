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
#: the fewest decoder layers that keep every kind of layer a family has: one where all are alike; DeepSeek-V3 keeps
#: its dense first layer (listed as dense, not rewritten) before an MoE one, GPT-OSS its full and sliding attention
FEWEST_LAYERS = {"deepseek_v3": {"num_hidden_layers": 2}, "gpt_oss": {}}


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
    model = moeq.prepare(tiny_model(family, dtype, **FEWEST_LAYERS.get(family, {"num_hidden_layers": 1})), moeq.NVFP4)
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


@pytest.mark.full_inductor
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_inductor_backend_end_to_end(dtype):
    """backend="moeq" (Inductor): calibrate is lossless, quantize changes the output by a bounded amount."""
    model = tiny_model("qwen3_moe", dtype, num_hidden_layers=1)
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
    assert len(moeq.explain(cm).rewritten) == 2


#: more transformers families: shared-expert gates (qwen2_moe), hybrid linear attention (qwen3_next), grouped
#: routing (glm4_moe), bmm experts (llama4), per-expert loops over stacked weights (jetmoe: bf16 only)
MORE_FAMILIES = ["qwen2_moe", "qwen3_next", "glm4_moe", "granitemoe", "phimoe", "llama4", "jetmoe"]
#: families whose experts are their own code, not transformers' grouped experts (``@use_experts_implementation``,
#: whose graphs under a dynamic token count the Qwen3-MoE tests cover): these also run a second batch shape
OWN_EXPERT_CODE = {"llama4", "jetmoe"}


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_more_families_quantize_every_routed_expert(family):
    """Every routed-expert weight (each 3-D parameter but a convolution's) is rewritten, in every compiled graph
    (for the families with their own expert code, batches of two shapes, so Dynamo recompiles with dynamic sizes);
    calibration leaves the output as it was, and the finalized model's output moves by a bounded, nonzero amount."""
    dtype = torch.bfloat16 if family == "jetmoe" else torch.float32
    layers = {} if family == "qwen3_next" else {"num_hidden_layers": 1}  # Qwen3-Next keeps both its layer types
    model = tiny_model(family, dtype, **layers)
    expected = {n for n, p in model.named_parameters() if p.dim() == 3 and "conv" not in n}
    batches = [make_tokens(seed=1), make_tokens(seed=2, batch=3, seq=7)][: 2 if family in OWN_EXPERT_CODE else 1]
    with torch.no_grad():
        reference = [model(t, use_cache=False).logits.float() for t in batches]
    moeq.prepare(model, moeq.FP8)
    cm = torch.compile(model, backend="moeq_aot_eager")
    # JetMoE's four expert modules per layer share one loop frame: a graph per weight shape, mode and size
    # specialization outgrows Dynamo's default of 8 recompiles (moeq warns when a frame falls back to eager)
    limit = 32 if family == "jetmoe" else torch._dynamo.config.recompile_limit
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=limit):
        with moeq.calibrate(cm):
            calibrating = [cm(t, use_cache=False).logits.float() for t in batches]
        moeq.finalize(cm)
        quantized = [cm(t, use_cache=False).logits.float() for t in batches]
    report = moeq.explain(cm)
    assert {r.fqn for r in report.rewritten} == expected
    assert report.partly_rewritten == {}
    assert not [s for s in report.skipped if s.category == "expert"], [s.reason for s in report.skipped]
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for got, want, q in zip(calibrating, reference, quantized):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        assert 0 < ((q - want).norm() / want.norm()).item() < 0.5
    for fqn, state in moeq.quant_state(model).items():
        assert state.tokens_per_expert.sum() > 0, fqn


def test_float32_per_expert_loops_are_refused_with_the_reason():
    """JetMoE in float32: its per-expert loops cannot become ``torch._grouped_mm`` (bf16 only), and finalize()
    says so, naming the weight, instead of quantizing nothing silently."""
    model = moeq.prepare(tiny_model("jetmoe", torch.float32, num_hidden_layers=1), moeq.FP8)
    cm = torch.compile(model, backend="moeq_aot_eager")
    with torch.no_grad(), moeq.calibrate(cm):
        cm(make_tokens(seed=1), use_cache=False)
    with pytest.raises(RuntimeError, match=r"none of which moeq can rewrite.*input_linear\.weight.*bf16 only"):
        moeq.finalize(cm)
