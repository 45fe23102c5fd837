"""DESIGN.md's bad-input list (the cases that apply to the core): a clear error, and no state corrupted."""

from __future__ import annotations

import pytest
import torch
import triton

import moeq
from moeq.integrations.hf import tiny_model
from tests.conftest import make_tokens


def _compiled(config=moeq.FP8, family="qwen3_moe", dtype=torch.float32):
    model = moeq.prepare(tiny_model(family, dtype), config)
    return model, torch.compile(model, backend="moeq_aot_eager")


def test_finalize_before_calibrate():
    """finalize() without calibration data names calibrate() as the fix."""
    model, cm = _compiled()
    with torch.no_grad():
        cm(make_tokens())
    with pytest.raises(RuntimeError, match=r"finalize\(\) called before calibrate\(\)"):
        moeq.finalize(cm)
    assert not moeq.explain(cm).state.finalized


@pytest.mark.parametrize(
    ("config", "where"),
    [
        ("FP8", r"at least once inside moeq.calibrate\(\)"),
        ("FP8_DYNAMIC", r"at least once \(no calibrate\(\) needed: FP8 W8A8 \(channel weights, dynamic token"),
        ("NVFP4_W4A16", r"at least once \(no calibrate\(\) needed: NVFP4 W4A16 has no static activation scale\)"),
    ],
)
def test_finalize_before_any_graph(config, where):
    """finalize() on a prepared model that never ran says no expert GEMM was rewritten, and whether the forward it
    needs first must run inside calibrate() (static activation scales) or not (dynamic or weight-only)."""
    model = moeq.prepare(tiny_model("qwen3_moe"), getattr(moeq, config))
    with pytest.raises(
        RuntimeError,
        match=r"no expert GEMM has been rewritten yet; run the model compiled with backend='moeq' \(or a graph from "
        r"moeq.quantize_graph\) " + where,
    ):
        moeq.finalize(model)


def test_model_without_experts_warns_at_prepare_and_finalize_says_what_the_graphs_held(caplog):
    """A dense model: prepare() warns that it found no expert weight; after a moeq-compiled calibration forward,
    finalize() says the rewritten graph held no expert GEMM and points at explain()."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    with caplog.at_level("WARNING", logger="moeq"):
        moeq.prepare(model, moeq.FP8)
    assert "moeq.prepare: Sequential has no expert weights" in caplog.text
    cm = torch.compile(model, backend="moeq_aot_eager")
    with torch.no_grad(), moeq.calibrate(cm):
        cm(torch.randn(2, 8))
    with pytest.raises(RuntimeError, match=r"moeq rewrote 1 compiled or traced graph\(s\) and found no expert GEMM"):
        moeq.finalize(cm)


def test_weight_only_config_needs_no_calibration():
    """W8A16 / W4A16 quantize weights only: finalize() works without activation statistics."""
    model, cm = _compiled(moeq.NVFP4_W4A16)
    with torch.no_grad():
        cm(make_tokens())
    moeq.finalize(cm)
    for state in moeq.quant_state(model).values():
        assert (state.weight_amax > 0).all()


def test_layer_without_tokens_is_an_error_naming_it_and_changes_nothing():
    """A GEMM whose experts saw no token: finalize() names it; nothing is committed; fallback works."""
    model, cm = _compiled()
    with torch.no_grad(), moeq.calibrate(cm):
        cm(make_tokens())
    victim = moeq.quant_state(model)["model.layers.1.mlp.experts.down_proj"]
    victim.tokens_per_expert.zero_()
    victim.observed_input_amax.zero_()
    before = {k: s.weight_amax.clone() for k, s in moeq.quant_state(model).items()}
    with pytest.raises(
        ValueError, match=r"model\.layers\.1\.mlp\.experts\.down_proj: no expert received a calibration token"
    ):
        moeq.finalize(cm)
    for fqn, state in moeq.quant_state(model).items():
        assert torch.equal(state.weight_amax, before[fqn])
    assert not moeq.explain(cm).state.finalized


def test_uncalibrated_fallback_uses_weight_amax():
    """QuantConfig(uncalibrated="weight_amax"): the empty GEMM takes its max weight amax, flagged."""
    model, cm = _compiled(moeq.QuantConfig(weight="fp8", activation="fp8", uncalibrated="weight_amax"))
    with torch.no_grad(), moeq.calibrate(cm):
        cm(make_tokens())
    victim = moeq.quant_state(model)["model.layers.1.mlp.experts.down_proj"]
    victim.tokens_per_expert.zero_()
    victim.observed_input_amax.zero_()
    moeq.finalize(cm)
    assert victim.input_amax.item() == victim.weight_amax.max().item()
    assert "layer saw no tokens" in victim.flags[0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations_named_at_finalize(bad):
    """NaN/inf in calibration activations: finalize() names the GEMM and the experts."""
    model, cm = _compiled()
    with torch.no_grad(), moeq.calibrate(cm):
        cm(make_tokens())
    model.model.layers[0].self_attn.o_proj.weight.data[0, 0] = bad
    with torch.no_grad(), moeq.calibrate(cm):
        cm(make_tokens())
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.\d\.mlp\.experts\.\w+: non-finite \(NaN/inf\) activations observed for experts \[",
    ):
        moeq.finalize(cm)


def test_non_finite_expert_weights_named_at_finalize():
    """A NaN in one expert weight and an -inf in another: finalize() names each GEMM and expert, commits nothing."""
    model, cm = _compiled(moeq.NVFP4)
    with torch.no_grad(), moeq.calibrate(cm):
        cm(make_tokens())
    with torch.no_grad():
        model.model.layers[1].mlp.experts.gate_up_proj[3, 5, 7] = float("nan")
        model.model.layers[0].mlp.experts.down_proj[6, 1, 2] = float("-inf")
    before = {k: s.weight_amax.clone() for k, s in moeq.quant_state(model).items()}
    with pytest.raises(ValueError) as raised:
        moeq.finalize(cm)
    lines = str(raised.value).splitlines()
    assert lines[1:] == [
        "  model.layers.0.mlp.experts.down_proj: non-finite (NaN/inf) weight amax for experts [6]",
        "  model.layers.1.mlp.experts.gate_up_proj: non-finite (NaN/inf) weight amax for experts [3]",
    ], lines
    for fqn, state in moeq.quant_state(model).items():
        assert torch.equal(state.weight_amax, before[fqn])
    assert not moeq.explain(cm).state.finalized


def test_all_zero_expert_weight_gets_a_safe_scale():
    """An all-zero expert (pruned) keeps a finite, non-zero scale, is flagged, and outputs stay finite."""
    model, cm = _compiled(moeq.NVFP4)
    with torch.no_grad():
        model.model.layers[0].mlp.experts.gate_up_proj[2].zero_()
        with moeq.calibrate(cm):
            cm(make_tokens())
    moeq.finalize(cm)
    state = moeq.quant_state(model)["model.layers.0.mlp.experts.gate_up_proj"]
    assert state.weight_amax[2] == 1.0 and state.flags[2] == f"all-zero weight: scale set to 1/{6 * 448}"
    with torch.no_grad():
        assert torch.isfinite(cm(make_tokens()).logits).all()


def test_nvfp4_needs_k_multiple_of_16():
    """A model whose expert contraction dim is not a multiple of 16 is rejected for NVFP4, naming the weight."""
    model = moeq.prepare(tiny_model("qwen3_moe", torch.float32, moe_intermediate_size=24), moeq.NVFP4)
    with pytest.raises(Exception, match=r"model\.layers\.0\.mlp\.experts\.down_proj.*multiple of the block size 16"):
        torch.compile(model, backend="moeq_aot_eager")(make_tokens())


def test_grouped_qmm_stored_nvfp4_layout_checked():
    """The kernel launcher names the stored NVFP4 length it needs (whole 64-byte runs of K) and the tile
    constraint, before launching anything."""
    from moeq.runtime.kernels.grouped_qmm import grouped_qmm

    x, offs = torch.zeros(4, 256, dtype=torch.bfloat16), torch.tensor([4], dtype=torch.int32)
    block, scale = torch.zeros(1, 16, 8, dtype=torch.uint8), torch.ones(1)
    with pytest.raises(ValueError, match="needs 128 bytes along K .*got 96"):
        grouped_qmm(x, torch.zeros(1, 96, 8, dtype=torch.uint8), offs, scale, block, None, "nvfp4", None)
    config = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "SWAP_AB": False})
    with pytest.raises(ValueError, match="BLOCK_K must be a multiple of 128"):
        grouped_qmm(
            x, torch.zeros(1, 128, 8, dtype=torch.uint8), offs, scale, block, None, "nvfp4", None, config=config
        )


def test_grouped_qmm_fp8_codes_input_checked():
    """Activation codes (``x_mode="fp8_codes"``) must be e4m3 (or uint8) bits, pair with FP8 weights, and only
    they choose the output dtype: each misuse is named before anything launches."""
    from moeq.runtime.kernels.grouped_qmm import grouped_qmm

    x, offs = torch.zeros(4, 32, dtype=torch.bfloat16), torch.tensor([4], dtype=torch.int32)
    w8, scale, amax = torch.zeros(1, 32, 8, dtype=torch.float8_e4m3fn), torch.ones(1), torch.ones(1)
    with pytest.raises(ValueError, match=r"x_mode 'fp8_codes' takes x as e4m3 codes .*got torch.bfloat16"):
        grouped_qmm(x, w8, offs, scale, None, amax, "fp8", "fp8_codes")
    codes = x.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="x_mode 'fp8_codes' pairs with FP8 weights .*got 'plain'"):
        grouped_qmm(codes, torch.zeros(1, 32, 8, dtype=torch.bfloat16), offs, None, None, amax, "plain", "fp8_codes")
    with pytest.raises(ValueError, match="unknown activation mode 'int8'; choose one of fp8, nvfp4, fp8_codes"):
        grouped_qmm(x, w8, offs, scale, None, amax, "fp8", "int8")
    with pytest.raises(ValueError, match=r"output dtype \(torch.float32\) must be x's \(torch.bfloat16\)"):
        grouped_qmm(x, w8, offs, scale, None, amax, "fp8", "fp8", out_dtype=torch.float32)
    with pytest.raises(ValueError, match="x_mode 'fp8_codes' pairs with FP8 weights .*got 'fake_nvfp4'"):
        grouped_qmm(codes, torch.zeros(1, 32, 8), offs, amax, None, amax, "fake_nvfp4", "fp8_codes")


def test_config_object_required():
    """prepare() with something that is not a QuantConfig says what it expects."""
    with pytest.raises(TypeError, match="moeq.QuantConfig"):
        moeq.prepare(tiny_model("qwen3_moe"), {"weight": "fp8"})
