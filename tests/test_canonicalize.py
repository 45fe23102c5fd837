"""Per-expert loops canonicalized into one grouped GEMM (``moeq.passes.canonicalize``), traced three ways.

A whole loop (every expert of one stacked parameter, in order, outputs stacked / concatenated along rows) becomes
one ``bmm`` / ``_grouped_mm``: the graph computes the same values, the expert pass then quantizes it per expert like
grouped experts (same calibration statistics and outputs as the grouped module with the same weights), and
``explain()`` says where it came from. Loops that are not whole are left alone and reported with their reason.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_find import trace
from torch import nn

import moeq
from moeq.passes.canonicalize import canonicalize_expert_loops
from moeq.passes.find import find_expert_gemms, target_name

E, N, K = 4, 16, 32
SIZES = [3, 5, 0, 8]  # rows per expert, an empty expert among them
T = sum(SIZES)
FQN = "mlp.experts.w"
GEMMS = {"torch._C._nn.linear", "torch.nn.functional.linear", "aten.linear", "_operator.matmul", "aten.matmul"}
GEMMS |= {"torch.matmul", "aten.mm", "torch.mm"}


class _Experts(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.bfloat16, seed: int = 1) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter((torch.randn(E, N, K, generator=g) * 0.1).to(dtype))  # HF layout [E, N, K]


class SplitLinearCat(_Experts):
    """``cat([F.linear(x_e, w[e]) for x_e in x.split(sizes)])``: the hand-written routed loop."""

    def forward(self, x):
        pieces = x.split(SIZES)
        return torch.cat([F.linear(pieces[e], self.w[e]) for e in range(E)])


class SliceMatmulCat(_Experts):
    """Consecutive row slices and ``x_e @ w[e].t()``."""

    def forward(self, x):
        outs, start = [], 0
        for e, rows in enumerate(SIZES):
            outs.append(x[start : start + rows] @ self.w[e].t())
            start += rows
        return torch.cat(outs, dim=0)


class SliceOpenEnded(_Experts):
    """Consecutive row slices, the last one ``x[start:]``."""

    def forward(self, x):
        outs, start = [], 0
        for e, rows in enumerate(SIZES):
            piece = x[start:] if e == E - 1 else x[start : start + rows]
            outs.append(F.linear(piece, self.w[e]))
            start += rows
        return torch.cat(outs)


class SelectLinearStack(_Experts):
    """``stack([F.linear(x[e], w[e]) for e in range(E)])`` over a batched ``[E, rows, K]`` input."""

    def forward(self, x):
        return torch.stack([F.linear(x[e], self.w[e]) for e in range(E)])


class GroupedEquivalent(_Experts):
    """The grouped module the split / slice loops compute."""

    def forward(self, x):
        offs = torch.tensor(SIZES, device=x.device).cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, self.w.transpose(1, 2), offs=offs)


class BatchedEquivalent(_Experts):
    """The ``bmm`` module the batched (``stack``) loop computes."""

    def forward(self, x):
        return torch.bmm(x, self.w.transpose(1, 2))


class MLP(nn.Module):
    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.experts = experts

    def forward(self, x):
        return self.experts(x)


class Model(nn.Module):
    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.mlp = MLP(experts)

    def forward(self, x):
        return self.mlp(x)


def _input(cls: type, seed: int = 2, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (E, 3, K) if cls is SelectLinearStack else (T, K)
    return torch.randn(*shape, generator=g).to(dtype)


def _calibrate_and_finalize(run, owner, x: torch.Tensor) -> None:
    """One calibration forward of ``run`` on ``x`` (``owner``: the prepared model or the quantized graph), then
    finalize."""
    with torch.no_grad(), moeq.calibrate(owner):
        run(x)
    moeq.finalize(owner)


def _quantized_result(run, owner, x: torch.Tensor):
    """Calibrate, finalize and run again: the output, the loop weight's quant state and ``explain()``'s text."""
    _calibrate_and_finalize(run, owner, x)
    with torch.no_grad():
        out = run(x)
    return out, moeq.quant_state(owner)[FQN], str(moeq.explain(owner))


CASES = [
    (SplitLinearCat, "fx"),
    (SplitLinearCat, "export"),
    (SplitLinearCat, "dynamo"),
    (SliceMatmulCat, "export"),
    (SliceMatmulCat, "dynamo"),
    (SliceOpenEnded, "export"),
    (SliceOpenEnded, "dynamo"),
    (SelectLinearStack, "fx"),
    (SelectLinearStack, "export"),
    (SelectLinearStack, "dynamo"),
]


@pytest.mark.parametrize("cls,how", CASES, ids=[f"{c.__name__}-{h}" for c, h in CASES])
def test_whole_loops_become_one_grouped_gemm(cls, how):
    """The loop's E GEMMs are replaced by one grouped node that find() records as the expert GEMM of
    ``mlp.experts.w`` (expert dim 0, contraction dim 2 of the HF layout), and the graph's output is unchanged."""
    model = Model(cls())
    x = _input(cls)
    with torch.no_grad():
        want = model(x)
    gm, example_inputs = trace(model, (x,), how)
    done = canonicalize_expert_loops(gm, example_inputs)
    assert len(done) == 1 and f"{E} GEMMs" in done[0]
    assert not [n for n in gm.graph.nodes if target_name(n) in GEMMS]
    records, skipped = find_expert_gemms(gm, example_inputs)
    assert [(r.weight_fqn, r.expert_dim, r.contraction_dim) for r in records] == [(FQN, 0, 2)]
    assert records[0].form.startswith("per-expert loop as ")
    assert skipped == []
    with torch.no_grad():
        got = gm(*(example_inputs if example_inputs is not None else (x,)))
    got = got[0] if isinstance(got, (tuple, list)) else got
    torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-3)  # one bf16 rounding apart


PAIRS = [
    (SplitLinearCat, GroupedEquivalent),
    (SliceMatmulCat, GroupedEquivalent),
    (SelectLinearStack, BatchedEquivalent),
]


@pytest.mark.parametrize("cls,equivalent", PAIRS, ids=[c.__name__ for c, _ in PAIRS])
@pytest.mark.parametrize("fmt", ["FP8", "NVFP4"])
def test_quantized_loop_matches_quantized_grouped_module(cls, equivalent, fmt):
    """``torch.compile(backend="moeq")`` of the loop: calibration records the same per-expert statistics, and the
    finalized outputs are bit for bit those of the grouped (or batched) module with the same weights."""
    cfg = getattr(moeq, fmt)
    outs, states, reports = [], [], []
    for experts in (cls(), equivalent()):
        torch._dynamo.reset()
        model = moeq.prepare(Model(experts), cfg)
        compiled = torch.compile(model, backend="moeq", fullgraph=True)
        out, state, report = _quantized_result(compiled, model, _input(cls))
        outs.append(out)
        states.append(state)
        reports.append(report)
    loop, grouped = states
    if cls is not SelectLinearStack:
        assert torch.equal(loop.tokens_per_expert, torch.tensor(SIZES))
    assert torch.equal(loop.tokens_per_expert, grouped.tokens_per_expert)
    assert torch.equal(loop.observed_input_amax, grouped.observed_input_amax)
    assert torch.equal(loop.weight_amax, grouped.weight_amax)
    assert torch.equal(outs[0], outs[1])
    assert f"per-expert loop as {'bmm' if cls is SelectLinearStack else 'grouped_mm'}" in reports[0]
    assert FQN in reports[0]


class Subset(_Experts):
    """Only experts 0..E-2: not a whole loop."""

    def forward(self, x):
        return torch.stack([F.linear(x[e], self.w[e]) for e in range(E - 1)])


class Reversed(_Experts):
    def forward(self, x):
        return torch.stack([F.linear(x[e], self.w[E - 1 - e]) for e in range(E)])


class WithBias(_Experts):
    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.zeros(E, N, dtype=torch.bfloat16))

    def forward(self, x):
        return torch.stack([F.linear(x[e], self.w[e], self.b[e]) for e in range(E)])


class Upcast(_Experts):
    """Each expert multiplies in float32 (``w[e].float()``): one bf16 grouped GEMM would compute something else."""

    def forward(self, x):
        return torch.stack([F.linear(x[e].float(), self.w[e].float()) for e in range(E)])


class OutputReused(_Experts):
    """Expert 0's output is used beside the stack: rewriting would have to keep its GEMM anyway."""

    def forward(self, x):
        outs = [F.linear(x[e], self.w[e]) for e in range(E)]
        return torch.stack(outs), outs[0] * 2


@pytest.mark.parametrize("cls", [Subset, Reversed, WithBias, Upcast, OutputReused])
@pytest.mark.parametrize("how", ["export", "dynamo"])
def test_partial_loops_are_left_alone_and_reported(cls, how):
    """Loops that are not whole stay as they are; find() reports each GEMM as a per-expert slice of the parameter
    with the loop named in the reason."""
    model = Model(cls())
    x = _input(SelectLinearStack)
    gm, example_inputs = trace(model, (x,), how)
    assert canonicalize_expert_loops(gm, example_inputs) == []
    records, skipped = find_expert_gemms(gm, example_inputs)
    assert records == []
    loops = [s for s in skipped if s.weight_fqn == FQN]
    assert len(loops) == (E - 1 if cls is Subset else E)
    assert all("per-expert slice" in s.reason and "loop" in s.reason for s in loops)


@pytest.mark.parametrize("how", ["export", "dynamo"])
def test_float32_routed_loops_are_left_alone_with_the_reason(how):
    """``torch._grouped_mm`` takes bf16 only in compiled graphs, so a float32 split loop stays a loop, and each of
    its GEMMs is reported saying so; a float32 batched (``stack``) loop becomes a ``bmm``, which takes any dtype."""
    model = Model(SplitLinearCat(torch.float32))
    gm, example_inputs = trace(model, (_input(SplitLinearCat, dtype=torch.float32),), how)
    assert canonicalize_expert_loops(gm, example_inputs) == []
    records, skipped = find_expert_gemms(gm, example_inputs)
    assert records == [] and len(skipped) == E
    assert all("bf16 only" in s.reason and "torch.float32" in s.reason and FQN in s.reason for s in skipped)
    model = Model(SelectLinearStack(torch.float32))
    gm, example_inputs = trace(model, (_input(SelectLinearStack, dtype=torch.float32),), how)
    assert len(canonicalize_expert_loops(gm, example_inputs)) == 1


def test_slices_of_unknown_row_count_are_left_alone():
    """``symbolic_trace`` records no shapes: consecutive slices might clamp, so the loop is not rewritten."""
    gm = torch.fx.symbolic_trace(Model(SliceMatmulCat()))
    assert canonicalize_expert_loops(gm) == []


def test_quantize_graph_on_an_exported_loop_matches_the_grouped_module():
    """``moeq.quantize_graph`` on an exported loop: the same FP8 statistics and output bits as on the exported
    grouped module, and ``explain()`` names the loop's form."""
    outs, states, reports = [], [], []
    x = _input(SplitLinearCat)
    for experts in (SplitLinearCat(), GroupedEquivalent()):
        model = Model(experts)
        qgm = moeq.quantize_graph(torch.export.export(model, (x,)).module(), moeq.FP8)
        out, state, report = _quantized_result(qgm, qgm, x)
        outs.append(out)
        states.append(state)
        reports.append(report)
    assert torch.equal(states[0].observed_input_amax, states[1].observed_input_amax)
    assert torch.equal(states[0].tokens_per_expert, torch.tensor(SIZES))
    assert torch.equal(outs[0], outs[1])
    assert "per-expert loop as grouped_mm" in reports[0]


def test_frozen_loop_matches_the_frozen_grouped_module():
    """``moeq.freeze`` after calibration: the loop's weight is stored once like the grouped module's (FP8 codes), and
    the compiled loop keeps giving the grouped module's output bits from the stored weight."""
    outs = []
    for experts in (SplitLinearCat(), GroupedEquivalent()):
        torch._dynamo.reset()
        model = moeq.prepare(Model(experts), moeq.FP8)
        compiled = torch.compile(model, backend="moeq")
        x = _input(SplitLinearCat)
        _calibrate_and_finalize(compiled, model, x)
        with torch.no_grad():
            moeq.freeze(model)
            outs.append(compiled(x))
        assert "mlp.experts.w" not in dict(model.named_parameters())
    assert torch.equal(outs[0], outs[1])


def test_qat_gradients_of_a_loop_match_the_grouped_module():
    """QAT FP8 training through the canonicalized loop: the expert weight's gradient (STE included) and the input's
    gradient are bit for bit those of the grouped module with the same weights."""
    grads = []
    for experts in (SplitLinearCat(), GroupedEquivalent()):
        torch._dynamo.reset()
        model = moeq.prepare(Model(experts), moeq.FP8)
        compiled = torch.compile(model, backend="moeq")
        x = _input(SplitLinearCat)
        _calibrate_and_finalize(compiled, model, x)
        x.requires_grad_(True)
        compiled(x).float().square().sum().backward()
        grads.append((model.mlp.experts.w.grad, x.grad))
    assert grads[0][0] is not None and grads[0][0].abs().sum() > 0
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1], grads[1][1])


class RoutedSplitLoop(_Experts):
    """Split sizes from the router's counts, ``x.split(counts.tolist())`` as JetMoE's experts do: ``tolist()``
    breaks the graph, so the sizes enter the loop's graph as ints, and Dynamo makes them symbolic once they change
    between calls."""

    def forward(self, x, counts):
        pieces = x.split(counts.tolist())
        return torch.cat([F.linear(pieces[e], self.w[e]) for e in range(E)])


class RoutedGrouped(_Experts):
    def forward(self, x, counts):
        return torch._grouped_mm(x, self.w.transpose(1, 2), offs=counts.cumsum(0).to(torch.int32))


class RoutedMLP(nn.Module):
    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.experts = experts

    def forward(self, x, counts):
        return self.experts(x, counts)


class RoutedModel(nn.Module):
    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.mlp = RoutedMLP(experts)

    def forward(self, x, counts):
        return self.mlp(x, counts)


ROUTED_SIZES = [SIZES, [8, 0, 5, 3], [1, 2, 3, 10], [0, 0, 16, 0]]  # four batches of T rows each


@pytest.mark.parametrize("backend", ["moeq_aot_eager", "moeq"])
def test_loop_with_sizes_that_change_between_calls_stays_rewritten(backend):
    """Calibrating on batches routed differently recompiles the loop's graph with symbolic split sizes; it is
    still one grouped GEMM (offsets computed in the graph), in every mode: the calibration statistics and the
    finalized outputs equal the grouped module's, and nothing of the loop is left unquantized."""
    results = []
    for experts in (RoutedSplitLoop(), RoutedGrouped()):
        torch._dynamo.reset()
        model = moeq.prepare(RoutedModel(experts), moeq.FP8)
        compiled = torch.compile(model, backend=backend)
        batches = [(_input(SplitLinearCat, seed=s), torch.tensor(sizes)) for s, sizes in enumerate(ROUTED_SIZES)]
        with torch.no_grad(), moeq.calibrate(model):
            for x, counts in batches[:3]:
                compiled(x, counts)
        moeq.finalize(model)
        with torch.no_grad():
            outs = [compiled(x, counts) for x, counts in batches]
        results.append((outs, moeq.quant_state(model)[FQN], moeq.explain(model)))
    (loop_outs, loop, report), (grouped_outs, grouped, _) = results
    assert torch.equal(loop.tokens_per_expert, torch.tensor(ROUTED_SIZES[:3]).sum(0))
    assert torch.equal(loop.observed_input_amax, grouped.observed_input_amax)
    for got, want in zip(loop_outs, grouped_outs):
        assert torch.equal(got, want)
    assert [r.fqn for r in report.rewritten] == [FQN]
    assert not [s for s in report.skipped if s.weight_fqn == FQN], [s.reason for s in report.skipped]
    assert "per-expert loop as grouped_mm" in str(report)
