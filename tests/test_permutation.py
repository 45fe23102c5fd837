"""The joint-graph pass that turns a training graph's scatter-adds through the MoE's sort permutation into gathers
(:mod:`moeq.lowering.permutation`), on graphs traced from transformers' grouped-experts code and on a compiled
model's training step."""

from __future__ import annotations

import pytest
import torch
from torch._functorch import config as functorch_config
from torch.fx.experimental.proxy_tensor import make_fx

import moeq
from moeq.integrations.hf import tiny_model
from moeq.lowering import inductor, joint
from moeq.lowering.inductor import fuse_combine_backward
from moeq.lowering.permutation import gather_through_permutations, inverse_permutations
from tests.conftest import compiled_and_finalized, make_tokens

TOKENS, TOP_K, HIDDEN, EXPERTS = 12, 2, 24, 6


def _moe_tail(hidden, weights, ids, y, grad_out):
    """transformers' grouped experts around their GEMMs (sort, gather, routing weights, un-permute, top-k sum) with
    a pointwise stand-in for the experts; returns the gradients of the hidden states and the routing weights."""
    return _given_perm(hidden, weights, torch.sort(ids)[1], y, grad_out)


def _given_perm(hidden, weights, perm, y, grad_out):
    def forward(hidden, weights):
        x_sorted = hidden[perm // TOP_K]
        w_sorted = weights[perm]
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel())
        return ((x_sorted * y) * w_sorted.unsqueeze(-1))[inv].view(-1, TOP_K, HIDDEN).sum(dim=1)

    _, backward = torch.func.vjp(forward, hidden, weights)
    return backward(grad_out)


def _masked_moe_tail(hidden, weights, ids, y, grad_out):
    """:func:`_moe_tail` with the gathered rows multiplied by a bool mask (``|row| <= 1``): their gradient reaches
    the row gather's scatter as ``g * mask``, the form of moeq's activation STE gradient."""
    perm = torch.sort(ids)[1]

    def forward(hidden, weights):
        rows = hidden[perm // TOP_K]
        x_sorted = rows * (rows.abs() <= 1.0)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel())
        return ((x_sorted * y) * weights[perm].unsqueeze(-1))[inv].view(-1, TOP_K, HIDDEN).sum(dim=1)

    _, backward = torch.func.vjp(forward, hidden, weights)
    return backward(grad_out)


@pytest.mark.usefixtures("any_size")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_masked_row_gradient_is_read_by_the_combine(dtype):
    """An STE mask on the gathered rows' gradient (``g * mask``, mask bool) goes into the combine op, which reads it
    in its own pass: no separate multiply, the same hidden-state gradient as the scatter graph's within one
    rounding (it sums in fp32), and the masked rows' gradient exactly zero."""
    inputs = _inputs(dtype, 4)
    inputs = (inputs[0] * 1.5, *inputs[1:])  # about a third of the rows' elements clip
    gm = _traced(inputs, _masked_moe_tail)
    want_hidden, want_weights = _masked_moe_tail(*inputs)
    assert gather_through_permutations(gm.graph) == 3
    gm.recompile()
    (combine,) = [n for n in gm.graph.nodes if n.target == torch.ops.moeq.combine_experts.default]
    mask = combine.args[5]
    assert mask.meta["val"].dtype == torch.bool
    # the mask's only multiply left is the forward's (its users: that and the combine)
    assert sorted(str(u.target) for u in mask.users) == ["aten.mul.Tensor", "moeq.combine_experts.default"]
    got_hidden, got_weights = gm(*inputs)
    assert torch.equal(got_weights, want_weights)
    torch.testing.assert_close(got_hidden, want_hidden, rtol=2 * torch.finfo(dtype).eps, atol=0)
    clipped = (inputs[0].abs() > 1.0).all(dim=0)  # a column that clips in every token has no gradient at all
    assert (got_hidden[:, clipped] == 0).all()


def _inputs(dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOP_K] for _ in range(TOKENS)]).reshape(-1)
    hidden = torch.randn(TOKENS, HIDDEN, generator=g).to(dtype)
    weights = torch.rand(TOKENS * TOP_K, generator=g).to(dtype)
    y = torch.randn(TOKENS * TOP_K, HIDDEN, generator=g).to(dtype)
    grad_out = torch.randn(TOKENS, HIDDEN, generator=g).to(dtype)
    return hidden, weights, ids, y, grad_out


def _traced(inputs, fn=_moe_tail, remove="mutations_and_views"):
    """``fn``'s graph; ``remove="mutations"`` keeps the view ops (unsqueeze, expand, view) as Inductor's graphs have them."""
    return make_fx(torch.func.functionalize(fn, remove=remove), tracing_mode="fake")(*inputs)


def _scatter_adds(gm: torch.fx.GraphModule) -> int:
    return sum(
        1 for n in gm.graph.nodes if n.target == torch.ops.aten.index_put.default and len(n.args) > 3 and n.args[3]
    )


@pytest.fixture
def any_size(monkeypatch):
    """The gather's gradient runs as the combine op only above the forward combine's bounds: lowered here."""
    monkeypatch.setattr(inductor, "COMBINE_MIN_TOP_K", 1)
    monkeypatch.setattr(inductor, "COMBINE_MIN_ROWS", 0)


@pytest.mark.usefixtures("any_size")
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scatters_become_gathers_with_the_same_gradients(dtype, seed):
    """The three scatter-adds (combine, routing weights, row gather) are rewritten; the routing weights' and the
    un-permute's gradients are the same values, the hidden states' equal the float64 sum of each token's rows
    within one rounding of the output."""
    inputs = _inputs(dtype, seed)
    gm = _traced(inputs)
    assert len(inverse_permutations(gm.graph)) == 1 and _scatter_adds(gm) == 3
    want_hidden, want_weights = _moe_tail(*inputs)
    assert gather_through_permutations(gm.graph) == 3
    gm.recompile()
    assert _scatter_adds(gm) == 0
    assert sum(n.target == torch.ops.moeq.combine_experts.default for n in gm.graph.nodes) == 1
    got_hidden, got_weights = gm(*inputs)
    assert torch.equal(got_weights, want_weights)
    # the hidden gradient summed in float64 from the same (bit-identical) rows of the un-permuted gradient
    hidden, weights, ids, y, grad_out = inputs
    perm = torch.sort(ids)[1]
    rows = (grad_out[perm // TOP_K] * weights[perm].unsqueeze(-1)).to(dtype) * y
    exact = torch.zeros(TOKENS, HIDDEN, dtype=torch.float64).index_add_(0, perm // TOP_K, rows.double())
    magnitude = torch.zeros_like(exact).index_add_(0, perm // TOP_K, rows.double().abs())
    bound = torch.finfo(dtype).eps * exact.abs() + TOP_K * 2.0**-23 * magnitude
    assert ((got_hidden.double() - exact).abs() <= bound).all()
    torch.testing.assert_close(got_hidden, want_hidden, rtol=2 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.usefixtures("any_size")
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_combine_gradients_become_one_op(dtype, seed):
    """After the gathers, the combine's two gradients (the rows' and the routing weights') become one
    ``moeq::combine_experts_backward``: the rows' gradient (and so the hidden states') keeps its bits, the routing
    weights' is within one rounding of the float64 row sums (fp32 products, where eager rounds each to bf16)."""
    inputs = _inputs(dtype, seed)
    gm, gathers_only = _traced(inputs, remove="mutations"), _traced(inputs, remove="mutations")
    for graph in (gm.graph, gathers_only.graph):
        assert gather_through_permutations(graph) == 3
    assert fuse_combine_backward(gm.graph) == 1
    gm.recompile()
    gathers_only.recompile()
    ops = [n.target for n in gm.graph.nodes]
    # one sum left: the forward's top-k sum (the routing weights' row sums are the op's now)
    assert torch.ops.moeq.combine_experts_backward.default in ops and ops.count(torch.ops.aten.sum.dim_IntList) == 1
    got_hidden, got_weights = gm(*inputs)
    want_hidden, _ = gathers_only(*inputs)
    assert torch.equal(got_hidden, want_hidden)
    hidden, weights, ids, y, grad_out = inputs
    perm = torch.sort(ids)[1]
    terms = grad_out[perm // TOP_K].double() * (hidden[perm // TOP_K] * y).double()  # the rows as the model rounds them
    exact = torch.zeros(perm.numel(), dtype=torch.float64).index_put_((perm,), terms.sum(1))
    magnitude = torch.zeros_like(exact).index_put_((perm,), terms.abs().sum(1))
    bound = torch.finfo(dtype).eps * exact.abs() + HIDDEN * 2.0**-23 * magnitude
    assert ((got_weights.double() - exact).abs() <= bound).all()


def test_combine_gradients_of_a_small_batch_stay_inductors():
    """Under the default bounds (top-8, 32768 rows) a top-2 combine's gradients are left to Inductor, as its
    forward is."""
    gm = _traced(_inputs(torch.float32, 0), remove="mutations")
    gather_through_permutations(gm.graph)
    assert fuse_combine_backward(gm.graph) == 0
    assert not any(n.target == torch.ops.moeq.combine_experts_backward.default for n in gm.graph.nodes)


def test_default_bounds_keep_the_small_gather_gradient_a_scatter():
    """Under the default bounds (top-8, 32768 rows) a top-2 gather's gradient stays Inductor's scatter; the two
    permutation scatters still become gathers (no host cost: Inductor's own ops)."""
    gm = _traced(_inputs(torch.float32, 0))
    assert gather_through_permutations(gm.graph) == 2
    assert _scatter_adds(gm) == 1
    assert not any(n.target == torch.ops.moeq.combine_experts.default for n in gm.graph.nodes)


@pytest.mark.usefixtures("any_size")
def test_a_permutation_the_graph_does_not_show_is_left_alone():
    """``perm`` passed in (not a sort's indices in this graph): nothing says it is a permutation, so no rewrite."""
    hidden, weights, ids, y, grad_out = _inputs(torch.float32, 0)
    gm = _traced((hidden, weights, torch.sort(ids)[1], y, grad_out), _given_perm)
    assert inverse_permutations(gm.graph) == {}
    assert gather_through_permutations(gm.graph) == 0
    assert _scatter_adds(gm) == 3


def finalized_for_training(device: str = "cpu") -> torch.nn.Module:
    """A tiny one-layer Qwen3-MoE prepared for QAT FP8, compiled, calibrated and finalized, in training mode."""
    torch.manual_seed(0)
    model = moeq.prepare(tiny_model("qwen3_moe", torch.bfloat16, num_hidden_layers=1).to(device), moeq.FP8)
    cm = compiled_and_finalized(model, make_tokens().to(device))
    model.train()
    return cm


def training_step(cm: torch.nn.Module, rewrite: bool):
    """One training step of ``cm`` (:func:`finalized_for_training`) compiled afresh, with or without the rewrite:
    loss, parameter gradients and the rewrite counts of the graphs compiled (``gathers``: scatter-adds made gathers
    per joint graph; ``combine_backward``: the combine's gradients made one op, per post-grad graph). One
    calibration serves both steps a test compares."""
    torch._dynamo.reset()
    model = cm._orig_mod
    model.zero_grad(set_to_none=True)
    tokens = make_tokens().to(next(model.parameters()).device)
    counts = {"gathers": [], "combine_backward": []}

    def counted(name, rewrite_pass):
        def run(graph):
            counts[name].append(rewrite_pass(graph))
            return counts[name][-1]

        return run

    # the graph caches off: a cached training graph would skip the joint pass (and the stand-in has the pass's
    # uuid); the kernel caches stay on, as they are keyed on the generated code itself
    with (
        pytest.MonkeyPatch.context() as mp,
        torch._inductor.config.patch(fx_graph_cache=False),
        functorch_config.patch(enable_autograd_cache=False),
    ):
        gathers = gather_through_permutations if rewrite else (lambda graph: 0)
        mp.setattr(joint, "gather_through_permutations", counted("gathers", gathers))
        mp.setattr(inductor, "fuse_combine_backward", counted("combine_backward", fuse_combine_backward))
        loss = cm(tokens, labels=tokens).loss
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, counts


@pytest.mark.usefixtures("any_size")
def test_training_step_gradients_equal_the_scatter_graphs():
    """A compiled tiny Qwen3-MoE's QAT FP8 training step: with the rewrites (3 scatter-adds made gathers, then the
    combine's two gradients one op) the loss equals the step without them. The expert weights' gradients keep
    their bits (the routed rows' gradient does); the routing weights' gradient sums fp32 products in another order
    than Inductor's scatter graph, so the router's and the layers' below it move by bf16 roundings."""
    cm = finalized_for_training()
    loss, grads, counts = training_step(cm, True)
    ref_loss, ref_grads, ref_counts = training_step(cm, False)
    assert counts == {"gathers": [3], "combine_backward": [0, 1]}, counts
    assert ref_counts == {"gathers": [0], "combine_backward": [0, 0]}, ref_counts
    assert torch.equal(loss, ref_loss) and grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        ref = ref_grads[name]
        if ".experts." in name:
            assert torch.equal(grad, ref), name
        else:
            assert (grad.double() - ref.double()).norm() <= 2.0**-7 * ref.double().norm(), name
