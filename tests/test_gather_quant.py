"""``moeq.lowering.gather_quant``: a shared-scale NVFP4 activation fake-quant moved before the routing gather of real
transformers MoE models compiled with backend="moeq" (CPU, random weights), compared with the graph left as it was."""

from __future__ import annotations

import logging

import pytest
import torch
from torch._inductor import config as inductor_config
from torch._inductor.utils import run_and_get_code

import moeq
from moeq.integrations.hf import tiny_model
from moeq.lowering import gather_quant
from moeq.lowering.inductor import combine_fusion, fusion
from tests.conftest import compiled_and_finalized, make_tokens, one_moe_layer

MOVED = "moved before its routing gather"


def _finalized(family: str, cfg: moeq.QuantConfig, dynamic=None) -> torch.nn.Module:
    """A one-layer tiny ``family`` model prepared with ``cfg``, compiled (``dynamic``: ``torch.compile``'s),
    calibrated and finalized."""
    torch.manual_seed(0)
    model = moeq.prepare(tiny_model(family, torch.bfloat16, **one_moe_layer(family)), cfg)
    return compiled_and_finalized(model, make_tokens(batch=2, seq=64), dynamic=dynamic)


def _logits(cm: torch.nn.Module, caplog, policy: str = "auto") -> tuple[torch.Tensor, list[str]]:
    """Logits of ``cm`` compiled afresh (``run_and_get_code`` resets Dynamo; one calibration serves every setting a
    test compares) under fusion ``policy``, and the pass's log lines."""
    caplog.clear()
    with (
        caplog.at_level(logging.INFO, logger="moeq.lowering.gather_quant"),
        torch.no_grad(),
        fusion(policy),
        combine_fusion(False),
        inductor_config.patch(fx_graph_cache=False),  # the pass logs what it moved when it runs: not on a cached graph
    ):
        logits, _ = run_and_get_code(lambda: cm(make_tokens(batch=2, seq=64)).logits)
    return logits, [r.getMessage() for r in caplog.records if MOVED in r.getMessage()]


def test_bound_is_the_ops_own_pass_bound():
    """The pass moves the quantization only where ``moeq::grouped_qmm`` would run the activations' own pass anyway."""
    from moeq.runtime.kernels.grouped_qmm import QAT_NVFP4_IN_LOAD_ROWS_PER_EXPERT

    assert gather_quant.OWN_PASS_ROWS_PER_EXPERT == QAT_NVFP4_IN_LOAD_ROWS_PER_EXPERT


#: OLMoE and Mixtral are left out: their experts (where the gather is) are Qwen3-MoE's code under other names in
#: transformers 5; OLMoE's router is Qwen3-MoE's too, Mixtral's differs only in the routing weights' arithmetic
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_nvfp4_activation_quant_moves_before_the_gather_bit_for_bit(family, caplog, monkeypatch):
    """QAT NVFP4 with one activation amax (the default): the gate/up input is fake-quantized per token, then
    gathered, and the logits equal those of the graph left as it was, bit for bit (the quantization is row-local)."""
    monkeypatch.setattr(gather_quant, "OWN_PASS_ROWS_PER_EXPERT", 1)
    cm = _finalized(family, moeq.NVFP4)
    moved, lines = _logits(cm, caplog)
    top_k = tiny_model(family).config.num_experts_per_tok
    assert len(lines) == 1 and f"({2 * 64} rows instead of {2 * 64 * top_k})" in lines[0], lines
    monkeypatch.setattr(gather_quant, "OWN_PASS_ROWS_PER_EXPERT", 10**9)
    kept, lines = _logits(cm, caplog)
    assert not lines
    assert torch.equal(moved, kept)


def test_moves_with_a_dynamic_batch_bit_for_bit(caplog, monkeypatch):
    """A dynamic token count (Dynamo's usual graph once a second batch shape is seen) is moved too: the graph serves
    every batch size. The logits equal those with the pass off, bit for bit."""
    cm = _finalized("qwen3_moe", moeq.NVFP4, dynamic=True)
    moved, lines = _logits(cm, caplog)
    top_k = tiny_model("qwen3_moe").config.num_experts_per_tok
    assert len(lines) == 1 and f"rows instead of {top_k}*s" in lines[0], lines  # a symbolic count
    monkeypatch.setattr(gather_quant, "ENABLED", False)
    kept, lines = _logits(cm, caplog)
    assert not lines
    assert torch.equal(moved, kept)


@pytest.mark.parametrize(
    ("cfg", "policy", "why"),
    [
        (moeq.QuantConfig(weight="nvfp4", activation="nvfp4", act_scale="per_expert"), "auto", "per-expert amax"),
        (moeq.FP8, "auto", "FP8 activations feed FP8 MMAs inside the op"),
        (moeq.NVFP4, "always", "policy always: one kernel per GEMM"),
    ],
    ids=["per-expert-amax", "fp8", "policy-always"],
)
def test_quantization_stays_after_the_gather(cfg, policy, why, caplog, monkeypatch):
    """Not moved where the result would differ (a per-expert amax depends on the row's expert) or where the op
    quantizes the gathered rows itself (FP8 x FP8; policy "always")."""
    monkeypatch.setattr(gather_quant, "OWN_PASS_ROWS_PER_EXPERT", 1)
    _, lines = _logits(_finalized("qwen3_moe", cfg), caplog, policy=policy)
    assert not lines, why


def test_quantization_stays_at_or_below_the_bound(caplog, monkeypatch):
    """At or below the bound the op quantizes x in its load path (one kernel per expert GEMM): nothing moves."""
    config = tiny_model("qwen3_moe").config
    rows = 2 * 64 * config.num_experts_per_tok
    cm = _finalized("qwen3_moe", moeq.NVFP4)
    monkeypatch.setattr(gather_quant, "OWN_PASS_ROWS_PER_EXPERT", rows // config.num_experts)
    _, lines = _logits(cm, caplog)
    assert not lines
    monkeypatch.setattr(gather_quant, "OWN_PASS_ROWS_PER_EXPERT", rows // config.num_experts - 1)
    _, lines = _logits(cm, caplog)
    assert len(lines) == 1
