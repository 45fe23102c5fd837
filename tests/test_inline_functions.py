"""Autograd Functions on per-expert module-list weights (megatron's linears with grad enabled): inlined when both
subgraphs are exactly a linear and its gradient, kept and reported with the reason otherwise."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import moeq

E, K, N = 3, 16, 8
SIZES = [5, 0, 7]


class LinearFunction(torch.autograd.Function):
    """A linear written as megatron writes its own: ``x @ w.t() (+ b)``, backward ``g @ w``, ``g.t() @ x``,
    ``g.sum(0)``."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.use_bias = b is not None
        y = torch.matmul(x, w.t())
        return y + b if b is not None else y

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad.matmul(w), grad.contiguous().t().matmul(x.contiguous()), grad.sum(0) if ctx.use_bias else None


class ScaledDgrad(LinearFunction):
    """Not the linear's gradient: dgrad doubled (as a stand-in for a backward that also does something else)."""

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return 2 * grad.matmul(w), grad.t().matmul(x), grad.sum(0) if ctx.use_bias else None


class ScaledForward(LinearFunction):
    """Not a linear: the output doubled."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.use_bias = b is not None
        return torch.matmul(x, w.t()) * 2


class Expert(nn.Module):
    def __init__(self, function: type[torch.autograd.Function], bias: bool) -> None:
        super().__init__()
        self.function = function
        self.weight = nn.Parameter(torch.randn(N, K) / 4)
        self.bias = nn.Parameter(torch.randn(N)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function.apply(x, self.weight, self.bias)


class ListMoE(nn.Module):
    """Experts as a module list, each fed its contiguous piece of the routed rows (megatron ``SequentialMLP``'s
    structure with one linear per expert)."""

    def __init__(self, function: type[torch.autograd.Function], bias: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.experts = nn.ModuleList(Expert(function, bias) for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([expert(piece) for expert, piece in zip(self.experts, x.split(SIZES))])


def train_step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_()
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    grads = [p.grad for p in model.parameters()]
    model.zero_grad()
    return y.detach(), x.grad, *grads


@pytest.mark.parametrize("bias", [False, True])
def test_exact_linear_function_is_inlined_without_changing_values_or_gradients(bias):
    """With every expert excluded, inlining is the only change moeq makes: the compiled step's output and gradients
    equal the eager model's, which runs the Function's own backward."""
    x = torch.randn(sum(SIZES), K)
    eager = train_step(ListMoE(LinearFunction, bias), x)
    model = moeq.prepare(ListMoE(LinearFunction, bias), dataclasses.replace(moeq.FP8, exclude=("experts.*",)))
    compiled = torch.compile(model, backend="moeq_aot_eager")
    got = train_step(compiled, x)
    for a, b in zip(got, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    skipped = moeq.explain(compiled).skipped
    assert [s.weight_fqn for s in skipped] == ["experts.*.weight"] * E
    assert all("excluded by QuantConfig.exclude" in s.reason for s in skipped)


def test_exact_linear_function_is_quantized():
    """Not excluded, the inlined GEMMs are the module list's expert GEMMs: calibrated, finalized, and the QAT step's
    output differs from full precision."""
    x = torch.randn(sum(SIZES), K)
    model = moeq.prepare(ListMoE(LinearFunction), moeq.FP8)
    compiled = torch.compile(model, backend="moeq_aot_eager")
    with moeq.calibrate(compiled):
        full = train_step(compiled, x)
    state = moeq.finalize(compiled)
    torch.testing.assert_close(
        state["experts.*.weight"].weight_amax, torch.stack([e.weight.abs().max() for e in model.experts])
    )
    assert state["experts.*.weight"].tokens_per_expert.tolist() == SIZES
    quantized = train_step(compiled, x)
    assert not torch.equal(quantized[0], full[0]) and quantized[2].abs().sum() > 0
    report = moeq.explain(compiled)
    assert {r.form for r in report.rewritten} == {
        "per-expert module list (autograd.Function inlined)"
    } and not report.skipped


@pytest.mark.parametrize(
    "function,why",
    [
        (ScaledDgrad, "not inlined: its backward computes a gradient by _operator.mul, not a GEMM"),
        (ScaledForward, "not inlined: its forward computes _operator.mul, not x @ w.t()"),
    ],
)
def test_function_that_is_not_exactly_a_linear_is_kept_and_reported(function, why):
    """A Function whose forward or backward is not exactly a linear keeps its own code (the eager values and
    gradients), and each of its GEMMs is reported as an expert GEMM not quantized, with what it does instead;
    ``finalize`` names the reason."""
    x = torch.randn(sum(SIZES), K)
    eager = train_step(ListMoE(function), x)
    model = moeq.prepare(ListMoE(function), moeq.FP8)
    compiled = torch.compile(model, backend="moeq_aot_eager")
    with moeq.calibrate(compiled):
        got = train_step(compiled, x)
    for a, b in zip(got, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    skipped = moeq.explain(compiled).skipped
    assert sorted(s.weight_fqn for s in skipped) == [f"experts.{e}.weight" for e in range(E)]
    for s in skipped:
        assert s.category == "expert" and why in s.reason and "not quantized" in s.reason, s.reason
    with pytest.raises(RuntimeError, match=r"3 expert GEMMs, none of which moeq can rewrite; .*autograd.Function"):
        moeq.finalize(compiled)
