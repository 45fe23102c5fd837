"""Megatron-core's ``SequentialMLP`` (a module list of per-expert MLPs over ``torch.split`` pieces, the only expert
class megatron-core 0.16 builds without Transformer Engine or the ``grouped_gemm`` package), compiled with moeq.

Its expert GEMMs run on separate 2-D parameters (``local_experts.{e}.linear_fc1.weight``), with split sizes from
``tokens_per_expert.tolist()``: moeq quantizes each such module list as one stacked per-expert quant state.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import moeq
from moeq.formats import get_format
from moeq.passes.find import listed_expert_key

megatron_experts = pytest.importorskip("megatron.core.transformer.moe.experts")

E, HIDDEN, FFN = 4, 32, 64


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A one-process gloo group (megatron's linears ask for their tensor-parallel group) rendezvousing through a file
    (no port to collide with other runs); megatron's ``parallel_state`` stays uninitialized, so its process groups
    come from a hand-built collection."""
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        store = tmp_path_factory.mktemp("gloo") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield dist.group.WORLD
    if created:
        dist.destroy_process_group()


def build_sequential_mlp(num_experts: int, ep, tp, tp_size: int = 1) -> torch.nn.Module:
    """A megatron-core ``SequentialMLP`` of ``num_experts`` local experts (of E) on expert-parallel group ``ep`` and
    expert-tensor-parallel group ``tp`` of size ``tp_size``, weights from the current RNG state."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.mlp import MLPSubmodules

    cfg = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=FFN, moe_ffn_hidden_size=FFN,
        num_moe_experts=E, gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        bias_activation_fusion=False, use_cpu_initialization=True, params_dtype=torch.float32,
        gradient_accumulation_fusion=False, expert_tensor_parallel_size=tp_size,
    )  # fmt: skip
    groups = ProcessGroupCollection(tp=tp, ep=ep, expt_tp=tp, expt_dp=ep)
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return megatron_experts.SequentialMLP(num_experts, cfg, submodules, pg_collection=groups)


def sequential_mlp(group) -> torch.nn.Module:
    """The seeded global module (E experts) on the one-rank ``group``."""
    torch.manual_seed(0)
    return build_sequential_mlp(E, group, group)


def reference_output(model, x, tokens_per_expert, probs):
    """The quantized layer computed independently: the eager module, each expert's linears fed ``formats``' FP8
    fake quant of their input (one amax per projection: the max over every expert's routed rows, observed here by
    hooks in a full-precision forward) and of their weight (each expert's own ``max|W|``)."""
    fp8 = get_format("fp8")
    linears = {f"{e}.{name}": getattr(expert, name) for e, expert in enumerate(model.local_experts)
               for name in ("linear_fc1", "linear_fc2")}  # fmt: skip
    seen = {}

    def observe(key):
        return lambda module, args: seen.__setitem__(
            key, max(seen.get(key, 0.0), args[0].abs().amax(dim=(0, 1)).item() if args[0].numel() else 0.0)
        )

    hooks = [m.register_forward_pre_hook(observe(k.split(".")[1])) for k, m in linears.items()]
    model(x, tokens_per_expert, probs)
    for h in hooks:
        h.remove()
    for key, linear in linears.items():
        amax = torch.tensor(seen[key.split(".")[1]])
        linear.register_forward_pre_hook(lambda module, args, a=amax: (fp8.fake_quant(args[0], a.reshape(1, 1), 1),))
        linear.weight.copy_(fp8.fake_quant(linear.weight, linear.weight.abs().max().reshape(1, 1), 1))
    return model(x, tokens_per_expert, probs)[0]  # model: a second SequentialMLP with the same (seeded) weights


@pytest.mark.parametrize("how", ["dynamo", "export"])
def test_sequential_mlp_experts_are_quantized_per_expert(world, how, tmp_path):
    """Compiled with moeq (one Dynamo graph with ``capture_scalar_outputs``) or exported (non-strict) and passed to
    ``quantize_graph``: each module list is one quant state keyed ``local_experts.*.linear_fcN.weight`` with the
    list's E experts, whose statistics are the router's and the weights' own; the quantized output equals the
    independent reference; after ``freeze`` the deploy graph gives the same output."""
    model = moeq.prepare(sequential_mlp(world), moeq.FP8)
    x, probs = torch.randn(10, HIDDEN), torch.rand(10)
    tokens_per_expert = torch.tensor([3, 0, 5, 2])
    with torch.no_grad(), warnings.catch_warnings(), torch._dynamo.config.patch(capture_scalar_outputs=True):
        warnings.simplefilter("ignore")
        want = reference_output(sequential_mlp(world), x, tokens_per_expert, probs)
        plain, _ = model(x, tokens_per_expert, probs)
        if how == "dynamo":
            compiled = torch.compile(model, backend="moeq_aot_eager")
        else:
            exported = torch.export.export(model, (x, tokens_per_expert, probs), strict=False)
            compiled = moeq.quantize_graph(exported)
        with moeq.calibrate(compiled):
            calibrating, _ = compiled(x, tokens_per_expert, probs)
        torch.testing.assert_close(calibrating, plain)  # calibration observes in full precision
        state = moeq.finalize(compiled)
        assert sorted(state.fqns()) == [f"local_experts.*.linear_fc{i}.weight" for i in (1, 2)]
        for i in (1, 2):
            s = state[f"local_experts.*.linear_fc{i}.weight"]
            weights = [getattr(model.local_experts[e], f"linear_fc{i}").weight for e in range(E)]
            torch.testing.assert_close(s.weight_amax, torch.stack([w.abs().max() for w in weights]), rtol=0, atol=0)
            assert s.tokens_per_expert.tolist() == tokens_per_expert.tolist()
        got, _ = compiled(x, tokens_per_expert, probs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert not torch.equal(got, plain)
        report = moeq.explain(compiled)
        assert {r.form for r in report.rewritten} == {"per-expert module list"} and not report.skipped
        if how == "export":  # the stacked state saves and loads (torch.distributed.checkpoint) by its key
            moeq.save_state(compiled, tmp_path / "state")
            fresh = moeq.prepare(sequential_mlp(world), moeq.FP8)
            loaded = moeq.load_state(fresh, tmp_path / "state")
            for fqn, s in state.items():
                torch.testing.assert_close(loaded[fqn].weight_amax, s.weight_amax, rtol=0, atol=0)
                torch.testing.assert_close(loaded[fqn].input_amax, s.input_amax, rtol=0, atol=0)
        moeq.freeze(compiled)
        assert model.local_experts[2].linear_fc1.weight.abs().max() == 0  # the float weights are gone
        assert state["local_experts.*.linear_fc1.weight"].frozen_data.shape == (E, 2 * FFN, HIDDEN)
        deployed, _ = compiled(x, tokens_per_expert, probs)
        torch.testing.assert_close(deployed, got, rtol=1e-5, atol=1e-6)


def test_listed_expert_keys():
    """The module-list key of an expert weight FQN: the expert index replaced by ``*``, nothing else."""
    assert listed_expert_key("decoder.layers.0.mlp.experts.local_experts.12.linear_fc1.weight") == (
        "decoder.layers.0.mlp.experts.local_experts.*.linear_fc1.weight",
        12,
    )
    assert listed_expert_key("model.layers.1.block_sparse_moe.experts.3.w1.weight") == (
        "model.layers.1.block_sparse_moe.experts.*.w1.weight",
        3,
    )
    assert listed_expert_key("model.layers.1.mlp.experts.gate_up_proj") is None
    assert listed_expert_key("model.layers.1.shared_expert.gate_proj.weight") is None


def test_all_experts_calibration_is_refused_by_name(world):
    """``calib="all_experts"`` cannot send every token to every expert of a ``SequentialMLP`` (megatron's router and
    token dispatcher route outside it): prepare() names its expert linears and attaches nothing."""
    model = sequential_mlp(world)
    config = moeq.FP8.replace(act_scale="per_expert", calib="all_experts")
    with pytest.raises(
        ValueError, match=r"route their tokens otherwise: local_experts\.0\.linear_fc1 \(ColumnParallelLinear\)"
    ):
        moeq.prepare(model, config)
    assert moeq.state.get_state(model, required=False) is None


class SteFakeQuant(torch.autograd.Function):
    """The reference STE, written from DESIGN.md: forward ``formats``' fake quant with a fixed amax, backward the
    gradient where ``|v| <= amax`` (the quantizer clipped the rest)."""

    @staticmethod
    def forward(ctx, v, amax, fmt):
        ctx.save_for_backward(v.abs() <= amax)
        return get_format(fmt).fake_quant(v, amax.reshape(1, 1) if amax.dim() == 0 else amax, 1)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep, None, None


class _FakeQuantWeight(torch.nn.Module):
    def __init__(self, fmt, channels=False):
        super().__init__()
        self.fmt, self.channels = fmt, channels

    def forward(self, w):
        amax = w.detach().abs().amax(dim=1, keepdim=True) if self.channels else w.detach().abs().max()
        return SteFakeQuant.apply(w, amax, self.fmt)


def _quantize_input(module, args, amax, fmt):
    """Forward pre-hook: the linear's input through the reference STE, with ``amax`` or (None) each row's own."""
    x = args[0]
    return (SteFakeQuant.apply(x, x.detach().abs().amax(-1, keepdim=True) if amax is None else amax, fmt),)


def ste_reference(model, fmt, calibration, step, dynamic=False):
    """The QAT layer computed independently in eager mode: each expert linear's weight through the reference STE
    (a parametrization, so the gradient reaches the parameter) with the expert's own ``max|W|``, and its input with
    the projection's amax observed by hooks on the ``calibration`` batch; then one forward/backward on ``step``.
    ``dynamic`` (FP8_DYNAMIC): each weight row's own amax, and each input row's (per token) at run time."""
    from torch.nn.utils import parametrize

    seen = {}

    def observe(name):
        return lambda module, args: seen.__setitem__(
            name, max(seen.get(name, 0.0), args[0].abs().amax().item() if args[0].numel() else 0.0)
        )

    linears = [(name, getattr(e, name)) for e in model.local_experts for name in ("linear_fc1", "linear_fc2")]
    hooks = [linear.register_forward_pre_hook(observe(name)) for name, linear in linears]
    with torch.no_grad():
        model(*calibration)
    for h in hooks:
        h.remove()
    for name, linear in linears:
        amax = torch.tensor(seen[name], device=linear.weight.device)
        linear.register_forward_pre_hook(partial(_quantize_input, amax=None if dynamic else amax, fmt=fmt))
        parametrize.register_parametrization(linear, "weight", _FakeQuantWeight(fmt, channels=dynamic))
    x, tokens_per_expert, probs = (t.detach().clone().requires_grad_(t.is_floating_point()) for t in step)
    y = model(x, tokens_per_expert, probs)[0]
    return y, x, probs, [linear.parametrizations.weight.original for _, linear in linears]


@dataclass
class QatStep:
    """One QAT training step of a compiled ``SequentialMLP`` beside the eager STE reference's step on the same data."""

    model: torch.nn.Module
    compiled: torch.nn.Module
    calibrating: torch.Tensor  # the compiled module's output while calibrating
    plain: torch.Tensor  # the unquantized module's output on the calibration batch
    got: torch.Tensor
    x: torch.Tensor
    probs: torch.Tensor
    want: torch.Tensor
    want_x: torch.Tensor
    want_probs: torch.Tensor
    want_weights: list[torch.Tensor]


def qat_step(group, config, fmt: str, backend: str, device: str = "cpu") -> QatStep:
    """Calibrate with grad enabled (on one batch), finalize, then one forward/backward on other data (larger, so the
    input STE clips), compiled with ``backend``; and the same step of :func:`ste_reference`."""
    model = moeq.prepare(sequential_mlp(group).to(device), config)
    tokens_per_expert = torch.tensor([3, 0, 5, 2])
    calibration = (torch.randn(10, HIDDEN).to(device), tokens_per_expert, torch.rand(10).to(device))
    step = (3 * torch.randn(10, HIDDEN).to(device), tokens_per_expert, torch.rand(10).to(device))
    upstream = torch.randn(10, HIDDEN).to(device)
    with warnings.catch_warnings(), torch._dynamo.config.patch(capture_scalar_outputs=True):
        warnings.simplefilter("ignore")
        dynamic = config.dynamic_activations
        reference = ste_reference(sequential_mlp(group).to(device), fmt, calibration, step, dynamic=dynamic)
        want, want_x, want_probs, want_weights = reference
        (want * upstream).sum().backward()
        compiled = torch.compile(model, backend=backend)
        with moeq.calibrate(compiled):
            calibrating, _ = compiled(*calibration)
        plain = model(*calibration)[0]
        moeq.finalize(compiled)
        x, probs = (t.clone().requires_grad_() for t in (step[0], step[2]))
        got, _ = compiled(x, tokens_per_expert, probs)
        (got * upstream).sum().backward()
    return QatStep(model, compiled, calibrating, plain, got, x, probs, want, want_x, want_probs, want_weights)


def assert_step_matches_reference(run: QatStep, atol: float) -> None:
    """Every expert GEMM quantized through an inlined Function; output and the gradients of the input, the routing
    probabilities and every expert weight equal the reference's (``rtol`` 1e-5)."""
    report = moeq.explain(run.compiled)
    assert {r.form for r in report.rewritten} == {
        "per-expert module list (autograd.Function inlined)"
    } and not report.skipped
    torch.testing.assert_close(run.got, run.want, rtol=1e-5, atol=atol)
    torch.testing.assert_close(run.x.grad, run.want_x.grad, rtol=1e-5, atol=atol)
    torch.testing.assert_close(run.probs.grad, run.want_probs.grad, rtol=1e-5, atol=atol)
    weights = [getattr(e, name).weight for e in run.model.local_experts for name in ("linear_fc1", "linear_fc2")]
    for w, ref in zip(weights, run.want_weights, strict=True):
        torch.testing.assert_close(w.grad, ref.grad, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("config,fmt", [(moeq.FP8, "fp8"), (moeq.NVFP4, "nvfp4"), (moeq.FP8_DYNAMIC, "fp8")])
def test_sequential_mlp_qat_training_step_matches_ste_reference(world, config, fmt):
    """QAT of a ``SequentialMLP`` with grad enabled: Dynamo keeps megatron's linears as autograd Functions, which
    moeq inlines (each is verified to be exactly ``x @ w.t()`` and its gradient), so every expert GEMM is quantized.
    Calibrated with grad enabled (full precision), then one training step on other data (larger, so the input STE
    clips): output and gradients of the input, the routing probabilities and every expert weight equal the
    independent eager STE reference."""
    run = qat_step(world, config, fmt, "moeq_aot_eager")
    torch.testing.assert_close(run.calibrating, run.plain)  # calibration observes in full precision
    if not config.dynamic_activations:  # dynamic per-token scales clip nothing
        assert (run.want_x.grad == 0).any(), "the step's input should exceed the calibrated amax (STE clipping)"
    assert_step_matches_reference(run, atol=1e-6)


@pytest.mark.parametrize(
    ("config", "dequantized", "backend"),
    [(moeq.FP8, False, "moeq_aot_eager"), (moeq.NVFP4, True, "moeq"), (moeq.FP8_DYNAMIC, True, "moeq")],
    ids=["fp8-codes-aot-eager", "nvfp4-dequantized-inductor", "fp8-dynamic-dequantized-inductor"],
)
def test_sequential_mlp_accumulates_with_reused_codes(world, config, dequantized, backend):
    """Gradient accumulation of a ``SequentialMLP`` inside ``moeq.reuse_weight_codes``: each module list is quantized
    once on entry (stacked, ``local_experts.*.linear_fc1.weight``), each expert's GEMM reads its slice of the codes
    (or, with ``dequantized``, of their dequantized copy, which the joint-graph pass hands to forward and backward),
    and the weights' gradients over two micro-batches equal the block-free ones bit for bit."""
    model = moeq.prepare(sequential_mlp(world), config)
    counts = torch.tensor([3, 0, 5, 2])
    gen = torch.Generator().manual_seed(4)
    batches = [(torch.randn(10, HIDDEN, generator=gen) * s, counts, torch.rand(10, generator=gen)) for s in (1, 3, 2)]
    weights = [getattr(e, name).weight for e in model.local_experts for name in ("linear_fc1", "linear_fc2")]
    with warnings.catch_warnings(), torch._dynamo.config.patch(capture_scalar_outputs=True):
        warnings.simplefilter("ignore")
        compiled = torch.compile(model, backend=backend)
        with moeq.calibrate(compiled):
            compiled(*batches[0])
        moeq.finalize(compiled)

        def accumulate(block):
            model.zero_grad(set_to_none=True)
            with block:
                for batch in batches[1:]:
                    compiled(*batch)[0].square().sum().backward()
            return [w.grad.clone() for w in weights]

        grads = accumulate(contextlib.nullcontext())
        with moeq.reuse_weight_codes(compiled, dequantized=dequantized) as report:
            pass
        block = moeq.reuse_weight_codes(compiled, dequantized=dequantized)
        if backend == "moeq":  # Inductor's code: every expert weight read from its copy, none dequantized
            from torch._inductor.utils import run_and_get_code

            reused, code = run_and_get_code(accumulate, block)
            assert code and not re.search(r"moeq\.(fake_quant_weight|dequant_weight|quantize_weight)", "\n".join(code))
        else:
            reused = accumulate(block)
    assert sorted(report.reused) == ["local_experts.*.linear_fc1.weight", "local_experts.*.linear_fc2.weight"]
    assert not report.skipped
    assert [bool(g.abs().sum() > 0) for g in grads] == [
        True,
        True,
        False,
        False,
        True,
        True,
        True,
        True,
    ]  # expert 1: no rows
    for i, (got, want) in enumerate(zip(reused, grads, strict=True)):
        assert torch.equal(got, want), i


def test_gated_fc1_channel_amax_splits_gate_and_up(world):
    """A Megatron GLU ``linear_fc1`` module list's channel-wise amax reshards across TP sizes as gate and up slices
    (each TP rank holds ``[gate_r; up_r]``), not as one block of rows; ``linear_fc2`` as one."""
    from moeq.io.checkpoint import _part_rows

    model = moeq.prepare(sequential_mlp(world), moeq.FP8_DYNAMIC)
    state = moeq.state.get_state(model)
    rows = torch.arange(8)
    for key, parts in (("local_experts.*.linear_fc1.weight", 2), ("local_experts.*.linear_fc2.weight", 1)):
        est = state.get_or_create(key, tuple(state.weight(key).shape), 0, 2)
        got = [p(rows).tolist() for p in _part_rows(state, est)]
        assert got == ([[0, 1, 2, 3], [4, 5, 6, 7]] if parts == 2 else [list(range(8))]), key
