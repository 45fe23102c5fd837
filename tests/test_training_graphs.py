"""QAT training steps compiled with ``backend="moeq"`` on tiny transformers MoEs (CPU): the fused graph's loss and
expert gradients against the unfused path's, the weight codes a QAT FP8 step saves for backward, and each wgrad's
STE mask. (Kept apart from ``test_grouped_qmm.py`` so that ``make test``'s two workers, which take a file each,
share the cold-cache compile time.)"""

from __future__ import annotations

import re

import pytest
import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import run_and_get_code

import moeq
from moeq.formats import expert_amax
from moeq.integrations.hf import expert_parameter_names, tiny_model
from moeq.lowering.inductor import combine_fusion, fusion
from tests.conftest import compiled_and_finalized, make_tokens, one_moe_layer


def _clip_some_weights(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Scale a random 5% of every expert weight by 4 after calibration, so the quantizer clips some (|w| > amax):
    the STE must stop their gradients. Returns the clipped positions per parameter."""
    gen = torch.Generator().manual_seed(seed)
    clipped = {}
    with torch.no_grad():
        for name in expert_parameter_names(model):
            p = model.get_parameter(name)
            amax = expert_amax(p).view(-1, 1, 1)  # what finalize() calibrated the weight's quantizer to
            p.mul_(torch.where(torch.rand(p.shape, generator=gen) < 0.05, 4.0, 1.0).to(p.dtype))
            clipped[name] = p.abs() > amax
    return clipped


def _finalized(cfg_name: str, dtype=torch.bfloat16, family: str = "qwen3_moe", clip: bool = False):
    """A compiled tiny MoE, calibrated and finalized, in training mode, and the clipped weight positions. ``clip``:
    some weights are scaled past their amax after calibration (:func:`_clip_some_weights`)."""
    # one layer: a second adds compile time, not coverage
    model = moeq.prepare(tiny_model(family, dtype, **one_moe_layer(family)), getattr(moeq, cfg_name))
    cm = compiled_and_finalized(model, make_tokens())
    clipped = _clip_some_weights(model) if clip else {}
    model.train()
    return cm, clipped


def _training_step(cm: torch.nn.Module, policy: str):
    """One QAT training step of ``cm`` compiled afresh under fusion ``policy`` (``run_and_get_code`` resets Dynamo;
    one calibration serves every policy a test compares): (loss, expert gradients, Inductor's code)."""
    model, tokens = cm._orig_mod, make_tokens()
    model.zero_grad(set_to_none=True)

    def step():
        loss = cm(tokens, labels=tokens).loss
        loss.backward()
        return loss

    with fusion(policy), combine_fusion(False):  # fused vs unfused GEMMs, bit for bit (see test_grouped_qmm._run)
        loss, code = run_and_get_code(step)
    grads = {n: model.get_parameter(n).grad for n in expert_parameter_names(model)}
    return loss.detach(), grads, "\n".join(code)


def _wgrad_ste_codes(code: str) -> list[str]:
    """For each ``moeq::grouped_wgrad_ste`` call in Inductor's code: ``"codes"`` if it is given the weight's
    codes (its last argument a buffer), ``"none"`` if not."""
    calls = re.findall(r"torch\.ops\.moeq\.grouped_wgrad_ste\.default\((.*)\)", code)
    return ["none" if c.rsplit(",", 1)[-1].strip() == "None" else "codes" for c in calls]


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_training_step_matches_unfused(family):
    """A QAT NVFP4 training step compiled with backend="moeq": loss and expert gradients equal the unfused
    path's bit for bit (the forward keeps the Q/DQ outputs it saves for backward, so those chains stay unfused).
    Some weights are clipped: each weight's STE mask runs inside its wgrad (``moeq::grouped_wgrad_ste``) where
    the unfused graph multiplies the gradient by ``|w| <= amax``, and the clipped weights get no gradient.
    GPT-OSS stores its expert weights K-first."""
    cm, clipped = _finalized("NVFP4", family=family, clip=True)
    loss_a, grads_a, code_a = _training_step(cm, "always")
    loss_b, grads_b, code_b = _training_step(cm, "never")
    assert _wgrad_ste_codes(code_a) == ["none"] * len(grads_a) and len(grads_a) >= 2
    assert "grouped_wgrad_ste" not in code_b
    assert torch.equal(loss_a, loss_b)
    for name, grad in grads_a.items():
        assert grad is not None and grad.abs().sum() > 0 and torch.equal(grad, grads_b[name]), name
        assert clipped[name].any() and not grad[clipped[name]].any(), name
        assert grad[~clipped[name]].count_nonzero() > 0.5 * (~clipped[name]).sum(), name


def test_fp8_training_step_saves_weight_codes():
    """A QAT FP8 training step, under policy "auto" and "always": the joint-graph pass makes the forward save each
    expert weight as e4m3 codes (``moeq::quantize_weight``) instead of its fake-quantized bf16 copy, and both GEMMs
    that read it fuse into ``moeq::grouped_qmm`` (forward: FP8 x FP8 on the codes; backward's dgrad: the gradient
    times the stored codes). Loss and expert gradients equal the unfused path's (``fusion("never")``) within bf16
    rounding: the fused GEMMs scale fp32 products of codes where the unfused ones multiply bf16-rounded fake-quant
    values. Some weights are clipped: each wgrad's STE mask is given the weight's codes, and clipped weights get no
    gradient."""
    cm, clipped = _finalized("FP8", clip=True)
    loss_b, grads_b, code_b = _training_step(cm, "never")
    layers = 2  # gate_up and down of one layer
    assert "grouped_qmm" not in code_b and code_b.count("fake_quant_weight.default(") == layers
    for policy in ("auto", "always"):
        loss_a, grads_a, code = _training_step(cm, policy)
        assert _wgrad_ste_codes(code) == ["codes"] * 2, (policy, code)
        assert code.count("torch.ops.moeq.quantize_weight.default(") == layers, policy
        assert code.count("torch.ops.moeq.grouped_wgrad_ste.default(") == layers, policy
        assert "fake_quant_weight" not in code, policy
        calls = re.findall(r"torch\.ops\.moeq\.grouped_qmm\.default\((.*)\)", code)
        assert len(calls) == 2 * layers, (policy, calls)  # forward and dgrad of each
        assert sum("'deploy', 'fp8', 'fp8'" in c for c in calls) == layers  # forward: x quantized in the kernel
        assert sum("'deploy', 'fp8', None" in c for c in calls) == layers  # dgrad: bf16 gradient x codes
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-2, atol=0)
        for name, grad in grads_a.items():
            ref = grads_b[name].double()
            assert grad is not None and grad.abs().sum() > 0, (policy, name)
            assert ((grad.double() - ref).norm() / ref.norm()).item() < 1e-2, (policy, name)
            assert clipped[name].any() and not grad[clipped[name]].any(), (policy, name)


@pytest.mark.parametrize("family", ["gpt_oss"])
def test_fp8_training_step_saves_weight_codes_every_family(family):
    """GPT-OSS stores its expert weights K-first (contraction dim 1): every one is still saved as codes, each
    wgrad's STE mask reads them through a permuted view, and the step's expert gradients are those of the
    unfused path within bf16 rounding, zero where weights are clipped. (Mixtral, OLMoE and DeepSeek-V3 share
    Qwen3's layout; checked by hand in session 15, too slow for CI.)"""
    cm, clipped = _finalized("FP8", family=family, clip=True)
    _, grads, code = _training_step(cm, "auto")
    assert _wgrad_ste_codes(code) == ["codes"] * len(grads), code
    _, grads_ref, _ = _training_step(cm, "never")
    assert code.count("torch.ops.moeq.quantize_weight.default(") == len(grads) and "fake_quant_weight" not in code
    for name, grad in grads.items():
        ref = grads_ref[name].double()
        assert grad.abs().sum() > 0 and ((grad.double() - ref).norm() / ref.norm()).item() < 1e-2, name
        assert clipped[name].any() and not grad[clipped[name]].any(), name


def test_fp8_training_forward_saves_codes_not_weights():
    """What the partitioner keeps for backward: the uint8 codes of each expert weight, no bf16 tensor of an
    expert weight's shape that the forward computed (the forward graph's outputs, seen by a post-grad pass)."""

    saved: list[list[torch.Tensor]] = []

    class Record(CustomGraphPass):
        def __call__(self, graph):
            out = next(n for n in graph.nodes if n.op == "output")
            made = [a for a in out.args[0] if isinstance(a, torch.fx.Node) and a.op != "placeholder"]
            saved.append([a.meta.get("val") for a in made])  # the parameters themselves cost nothing

        def uuid(self):
            return None

    model = tiny_model("qwen3_moe", torch.bfloat16, num_hidden_layers=1)
    shapes = {tuple(p.shape) for n, p in model.named_parameters() if "experts" in n}
    cm, _ = _finalized("FP8")
    with torch._inductor.config.patch(post_grad_custom_pre_pass=Record()):
        _training_step(cm, "auto")
    forward = saved[-2]  # the forward graph is compiled before the backward graph
    kept = [v for v in forward if isinstance(v, torch.Tensor)]
    assert not any(tuple(v.shape) in shapes and v.dtype == torch.bfloat16 for v in kept)
    assert sum(tuple(v.shape) in shapes and v.dtype == torch.uint8 for v in kept) == 2
