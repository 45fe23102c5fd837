"""``moeq::combine_experts`` and the Inductor pass that puts it in place of transformers' grouped-experts combine
(routing-weight scaling, un-permute, top-k sum). The kernel itself: ``tests/interpret/test_combine.py`` and
``tests/test_gpu.py``."""

from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code
from torch.fx.experimental.proxy_tensor import make_fx

import moeq
from moeq.integrations.hf import expert_parameter_names, tiny_model
from moeq.lowering import inductor
from moeq.lowering.inductor import combine_fusion, fuse_expert_combine
from tests.conftest import (
    assert_combine_backward_close,
    combine_backward_inputs,
    compiled_and_finalized,
    make_tokens,
    one_moe_layer,
)

TOP_K, HIDDEN = 2, 16


@pytest.fixture
def any_top_k(monkeypatch):
    """The tiny models route top-2 over a few dozen rows, where the pass leaves the combine to Inductor (no faster
    there, see ``COMBINE_MIN_TOP_K`` and ``COMBINE_MIN_ROWS``): these tests lower the bounds to exercise the
    rewrite itself."""
    monkeypatch.setattr(inductor, "COMBINE_MIN_TOP_K", 1)
    monkeypatch.setattr(inductor, "COMBINE_MIN_ROWS", 0)


def _routed(tokens: int = 6, experts: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:TOP_K] for _ in range(tokens)]).reshape(-1)
    ids_sorted, perm = torch.sort(ids)
    offs = torch.cumsum(torch.bincount(ids_sorted, minlength=experts), 0).int()
    x = torch.randn(tokens * TOP_K, 8, generator=g).bfloat16()
    w = torch.randn(experts, 8, HIDDEN, generator=g).bfloat16()
    weights = torch.rand(tokens * TOP_K, generator=g).bfloat16()[perm]
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel())
    return x, w, offs, weights, inv_perm


def _combine(x, w, offs, weights, inv_perm):
    """transformers' grouped experts' tail: down GEMM, then the combine."""
    y = torch._grouped_mm(x, w, offs)
    return (y * weights.unsqueeze(-1))[inv_perm].view(-1, TOP_K, y.shape[1]).sum(dim=1)


def _traced(fn, *args) -> torch.fx.GraphModule:
    return make_fx(fn, tracing_mode="fake")(*args)


def _keeps_weighted(x, w, offs, weights, inv_perm):
    y = torch._grouped_mm(x, w, offs)
    weighted = y * weights.unsqueeze(-1)
    return weighted[inv_perm].view(-1, TOP_K, y.shape[1]).sum(dim=1), weighted


def _fp32_weights(x, w, offs, weights, inv_perm):
    """Mixtral's: fp32 routing weights, so an fp32 product and sum, cast back to bf16."""
    y = torch._grouped_mm(x, w, offs)
    return (y * weights.float().unsqueeze(-1))[inv_perm].view(-1, TOP_K, y.shape[1]).sum(dim=1).to(y.dtype)


def _sum_in_another_dtype(x, w, offs, weights, inv_perm):
    y = torch._grouped_mm(x, w, offs)
    return (y * weights.unsqueeze(-1))[inv_perm].view(-1, TOP_K, y.shape[1]).sum(dim=1, dtype=torch.float32)


def _not_experts(x, w, offs, weights, inv_perm):
    y = x @ w[0]
    return (y * weights.unsqueeze(-1))[inv_perm].view(-1, TOP_K, y.shape[1]).sum(dim=1)


def _weights_as_view(x, w, offs, weights, inv_perm):
    y = torch._grouped_mm(x, w, offs)
    return (weights.view(-1, 1) * y)[inv_perm].view(-1, TOP_K, y.shape[1]).sum(dim=1)


@pytest.mark.parametrize(
    "fn", [_combine, _fp32_weights, _weights_as_view], ids=["bf16", "fp32-weights-cast", "weights-view-first"]
)
@pytest.mark.usefixtures("any_top_k")
def test_pass_fuses_the_combine_of_an_expert_gemm(fn):
    args = _routed()
    gm = _traced(fn, *args)
    assert fuse_expert_combine(gm.graph) == 1
    gm.recompile()
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.moeq.combine_experts.default in targets
    assert not targets & {torch.ops.aten.index.Tensor, torch.ops.aten.sum.dim_IntList, torch.ops.aten.mul.Tensor}
    assert torch.ops.prims.convert_element_type.default not in targets  # the cast is the op's out_dtype
    got, want = gm(*args), fn(*args)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=torch.finfo(torch.bfloat16).eps, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("fn", [_keeps_weighted, _sum_in_another_dtype, _not_experts], ids=lambda f: f.__name__[1:])
@pytest.mark.usefixtures("any_top_k")
def test_pass_leaves_other_chains(fn):
    """An intermediate with another user, a sum in another dtype than the product's, or rows that no expert GEMM
    produced: left as they are."""
    gm = _traced(fn, *_routed())
    before = [n.target for n in gm.graph.nodes]
    assert fuse_expert_combine(gm.graph) == 0
    assert [n.target for n in gm.graph.nodes] == before


def test_default_bounds_fuse_large_top_8_batches_only():
    """Under the default bounds a top-2 combine and a small top-8 one stay Inductor's; a top-8 one over 32768 rows
    (4096 tokens of Qwen3-30B-A3B) is rewritten."""
    assert (inductor.COMBINE_MIN_TOP_K, inductor.COMBINE_MIN_ROWS) == (8, 32768)

    def top_8(x, w, offs, weights, inv_perm):
        y = torch._grouped_mm(x, w, offs)
        return (y * weights.unsqueeze(-1))[inv_perm].view(-1, 8, y.shape[1]).sum(dim=1)

    def rows(n: int):  # fake shapes: only the graph is built
        x, w, offs, weights, inv_perm = _routed()
        return x.new_empty(n, x.shape[1]), w, offs, weights.new_empty(n), inv_perm.new_empty(n)

    assert fuse_expert_combine(_traced(_combine, *rows(32768)).graph) == 0
    assert fuse_expert_combine(_traced(top_8, *rows(32760)).graph) == 0
    assert fuse_expert_combine(_traced(top_8, *rows(32768)).graph) == 1


@pytest.mark.parametrize(("rows", "fused"), [(32760, 0), (32768, 1)])
def test_symbolic_row_count_is_judged_by_the_compiled_size(rows, fused):
    """A dynamic batch (symbolic rows, as after Dynamo's automatic-dynamic recompile): the bound reads the size the
    graph is compiled for (its hint), so a large batch keeps the op (session 26 found a Qwen3 layer recompiled for
    4352 tokens left on Inductor's combine) and a small one does not."""

    def top_8(x, w, offs, weights, inv_perm):  # the token count from the rows, top-k a literal (as in the model)
        y = torch._grouped_mm(x, w, offs)
        return (y * weights.unsqueeze(-1))[inv_perm].view(y.shape[0] // 8, 8, y.shape[1]).sum(dim=1)

    x, w, offs, weights, inv_perm = _routed()
    args = x.new_empty(rows, x.shape[1]), w, offs, weights.new_empty(rows), inv_perm.new_zeros(rows)
    gm = make_fx(top_8, tracing_mode="symbolic")(*args)
    y_rows = next(n for n in gm.graph.nodes if n.target == torch.ops.aten._grouped_mm.default).meta["val"].shape[0]
    assert not isinstance(y_rows, int) and inductor.compiled_size(y_rows) == rows
    assert fuse_expert_combine(gm.graph) == fused


def test_op_rejects_bad_input():
    y = torch.randn(12, HIDDEN).bfloat16()
    weights, index = torch.rand(12).bfloat16(), torch.randperm(12)
    op = torch.ops.moeq.combine_experts
    with pytest.raises(ValueError, match=r"y must be \[rows, hidden\]"):
        op(y[0], weights, index, 2)
    with pytest.raises(ValueError, match="y must be float32, bfloat16 or float16"):
        op(y.to(torch.int32), weights, index, 2)
    with pytest.raises(ValueError, match=r"weights must be one float per row of y \(12\), got torch.int64"):
        op(y, index, index, 2)
    with pytest.raises(ValueError, match=r"weights must be one .* got torch.bfloat16\(11,\)"):
        op(y, weights[:11], index, 2)
    with pytest.raises(ValueError, match="index must be int32/int64"):
        op(y, weights, index.float(), 2)
    with pytest.raises(ValueError, match=r"top_k \(5\) must be >= 1 and divide the row count \(12\)"):
        op(y, weights, index, 5)
    with pytest.raises(ValueError, match="out_dtype must be float32, bfloat16 or float16"):
        op(y, weights, index, 2, torch.int8)
    with pytest.raises(ValueError, match=r"mask must be bool of y's shape \(12, 16\), got torch.uint8\(12, 16\)"):
        op(y, None, index, 2, None, torch.ones(12, HIDDEN, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"mask must be bool of y's shape \(12, 16\), got torch.bool\(12, 8\)"):
        op(y, None, index, 2, None, torch.ones(12, 8, dtype=torch.bool))


def test_backward_op_rejects_bad_input():
    """The backward's own operand (the token gradient) and the combine's shared checks, by name."""
    y = torch.randn(12, HIDDEN).bfloat16()
    grad, weights, perm = torch.randn(6, HIDDEN).bfloat16(), torch.rand(12).bfloat16(), torch.randperm(12)
    op = torch.ops.moeq.combine_experts_backward
    with pytest.raises(ValueError, match=r"grad must be \[rows / top_k, hidden\] = \[6, 16\], got shape \(4, 16\)"):
        op(grad[:4], y, weights, perm, 2)
    with pytest.raises(ValueError, match=r"grad must be \[rows / top_k, hidden\] = \[4, 16\], got shape \(6, 16\)"):
        op(grad, y, weights, perm, 3)
    with pytest.raises(ValueError, match="grad must be float32, bfloat16 or float16"):
        op(grad.to(torch.int32), y, weights, perm, 2)
    with pytest.raises(ValueError, match=r"weights must be one float per row of y \(12\)"):
        op(grad, y, weights[:6], perm, 2)
    with pytest.raises(ValueError, match="index must be int32/int64"):
        op(grad, y, weights, perm.float(), 2)


@pytest.mark.parametrize("w_dtype", [None, torch.float32], ids=["bf16-weights", "fp32-weights"])
def test_backward_reference_op_matches_float64(w_dtype):
    """The CPU path of ``moeq::combine_experts_backward`` (plain torch): ``dy`` autograd's bits, ``dw`` within one
    rounding of the float64 row sums."""
    grad, y, weights, perm = combine_backward_inputs(10, 4, 40, torch.bfloat16, 2, w_dtype)
    dy, dw = torch.ops.moeq.combine_experts_backward(grad, y, weights, perm, 4)
    assert dy.dtype == torch.promote_types(torch.bfloat16, weights.dtype) and dw.dtype == torch.bfloat16
    assert_combine_backward_close(dy, dw, grad, y, weights, perm, 4)


def _finalized(family: str, config: str = "FP8") -> torch.nn.Module:
    """A tiny model prepared with ``config``, compiled with backend="moeq", calibrated and finalized."""
    model = moeq.prepare(tiny_model(family, torch.bfloat16, **one_moe_layer(family)), getattr(moeq, config))
    return compiled_and_finalized(model, make_tokens())


def _run(cm: torch.nn.Module, combine: bool, train: bool = False):
    """``cm`` compiled afresh (``run_and_get_code`` resets Dynamo) with the combine fusion on or off: its logits (and,
    with ``train``, loss and expert gradients of one step) and Inductor's code. One calibration serves both settings
    a test compares, so they read the same statistics."""
    model, tokens = cm._orig_mod, make_tokens()
    with combine_fusion(combine):
        if not train:
            with torch.no_grad():
                logits, code = run_and_get_code(lambda: cm(tokens).logits)
            return logits, None, "\n".join(code)
        model.train()
        model.zero_grad(set_to_none=True)
        loss, code = run_and_get_code(lambda: cm(tokens, labels=tokens).loss)
        loss.backward()
    grads = [model.get_parameter(n).grad for n in expert_parameter_names(model)]
    return loss.detach(), grads, "\n".join(code)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


#: Mixtral is left out: its experts, whose combine the op takes, are Qwen3-MoE's code under other names (transformers 5)
@pytest.mark.parametrize(
    "family", [pytest.param("qwen3_moe", marks=pytest.mark.full_inductor), "deepseek_v3", "gpt_oss"]
)
@pytest.mark.usefixtures("any_top_k")
def test_compiled_model_runs_the_combine_op(family):
    """backend="moeq": every MoE layer's combine runs as moeq::combine_experts (one per pair of expert GEMMs);
    the logits move from the Inductor-combined model's by rounding only (the op rounds each bf16 product to bf16
    as eager torch does, Inductor's fused kernel does not). Weight-only quantization, so that no rounding change
    flips an activation's FP8 code in the next layer (which moves DeepSeek-V3's logits by 1.7%)."""
    cm = _finalized(family, config="NVFP4_W4A16")
    (logits, _, code), (reference, _, ref_code) = _run(cm, combine=True), _run(cm, combine=False)
    gemms = code.count("torch.ops.moeq.grouped_qmm.default(")
    assert gemms >= 2 and code.count("torch.ops.moeq.combine_experts.default(") == gemms // 2
    assert "combine_experts" not in ref_code
    assert _rel(logits, reference) < 2.0**-7  # one bf16 step (measured 0.5% on GPT-OSS and DeepSeek-V3)


@pytest.mark.usefixtures("any_top_k")
def test_training_forward_runs_the_combine_op():
    """A QAT training step: the forward graph's combine runs as the op (its backward is AOTAutograd's own graph);
    loss and expert gradients as with Inductor's combine, to within rounding."""
    cm = _finalized("qwen3_moe")
    (loss, grads, code), (ref_loss, ref_grads, _) = _run(cm, combine=True, train=True), _run(cm, False, train=True)
    assert "torch.ops.moeq.combine_experts.default(" in code
    assert abs(float(loss) - float(ref_loss)) < 1e-2 * abs(float(ref_loss))
    assert all(_rel(g, r) < 5e-2 for g, r in zip(grads, ref_grads))


@pytest.mark.usefixtures("any_top_k")
def test_dynamic_token_count_keeps_the_combine_op():
    """``dynamic=True``: the token count is symbolic (rows ``8 * s``); the chain still matches (the gather index
    and the rows have the same symbolic length), the logits follow the shape and one graph serves every size."""
    torch._dynamo.reset()
    model = moeq.prepare(tiny_model("qwen3_moe", torch.bfloat16, num_hidden_layers=1), moeq.NVFP4_W4A16)
    # calibrated with static shapes (a third of the dynamic calibration graph's compile; a dynamic calibration of
    # Qwen3-MoE: tests/test_gather_quant.py), then the finalized model compiled with dynamic shapes
    calibrating = torch.compile(model, backend="moeq")
    with torch.no_grad():
        with moeq.calibrate(calibrating):
            calibrating(make_tokens())
        moeq.finalize(calibrating)
        cm = torch.compile(model, backend="moeq", dynamic=True)
        logits, code = run_and_get_code(lambda: cm(make_tokens(seed=12, seq=12)).logits)
        assert logits.shape[1] == 12
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert cm(make_tokens(seed=20, seq=20)).logits.shape[1] == 20
    assert "torch.ops.moeq.combine_experts.default(" in "\n".join(code)
