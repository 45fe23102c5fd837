"""``moeq.passes.find`` on hand-written MoE modules, traced three ways, and ``quantize_graph`` on the result.

Every expert module computes its GEMM in one specific way (``torch._grouped_mm`` in the HF ``[E, N, K]`` and
GPT-OSS ``[E, K, N]`` layouts, ``bmm``, ``matmul``, ``einsum``, per-expert loops, dense linears, computed
weights) and sits at ``mlp.experts`` so the parameter FQN is ``mlp.experts.w``. Each is traced with
``torch.fx.symbolic_trace``, ``torch.export`` and a Dynamo capture backend; the records must name the
parameter and give its expert / contraction dims in the parameter's own layout, and every GEMM that is not
rewritten must be reported with a reason.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moeq
from moeq.passes.find import find_expert_gemms

E, N, K, T = 4, 16, 32, 16  # experts, out features, contraction (in features), routed rows
TE = T // E  # rows per expert in the batched (bmm / einsum) forms
FQN = "mlp.experts.w"
TRACES = ["fx", "export", "dynamo"]
BF16 = torch.bfloat16


def _offs() -> torch.Tensor:
    """Uneven routing: experts get 2, 4, 5 and 5 rows."""
    return torch.tensor([2, 6, 11, 16], dtype=torch.int32)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


# ------------------------------------------------------------------------------------------------
# expert modules: each holds one stacked weight ``w`` and computes its GEMM one way
# ------------------------------------------------------------------------------------------------


class _Experts(nn.Module):
    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 1) -> None:
        super().__init__()
        self.w = nn.Parameter(_randn(*shape, seed=seed, dtype=dtype) * 0.1)


class GroupedHF(_Experts):
    """HF layout ``w [E, N, K]``, passed transposed."""

    def __init__(self, dtype: torch.dtype = BF16, k: int = K, n: int = N, seed: int = 1) -> None:
        super().__init__((E, n, k), dtype, seed)

    def forward(self, x, offs=None):
        return torch._grouped_mm(x, self.w.transpose(-2, -1), offs=offs)


class GroupedGptOss(_Experts):
    """GPT-OSS layout ``w [E, K, N]``, passed as is."""

    def __init__(self, dtype: torch.dtype = BF16, k: int = K, n: int = N, seed: int = 1) -> None:
        super().__init__((E, k, n), dtype, seed)

    def forward(self, x, offs=None):
        return torch._grouped_mm(x, self.w, offs=offs)


class GroupedPermute(_Experts):
    def __init__(self) -> None:
        super().__init__((E, N, K), BF16)

    def forward(self, x, offs=None):
        return torch._grouped_mm(x, self.w.permute(0, 2, 1), offs=offs)


class GroupedCast(_Experts):
    """fp32 master weight cast to bf16, transposed and made contiguous before the GEMM."""

    def __init__(self) -> None:
        super().__init__((E, N, K), torch.float32)

    def forward(self, x, offs=None):
        return torch._grouped_mm(x, self.w.to(torch.bfloat16).transpose(-2, -1).contiguous(), offs=offs)


class GroupedFunctional(_Experts):
    def __init__(self) -> None:
        super().__init__((E, N, K), BF16)

    def forward(self, x, offs=None):
        return F.grouped_mm(x, self.w.transpose(-2, -1), offs=offs)


class BmmActFirst(_Experts):
    """``bmm(x [E, T, K], w^T)`` with ``w [E, N, K]``."""

    def __init__(self, seed: int = 1) -> None:
        super().__init__((E, N, K), seed=seed)

    def forward(self, x, offs=None):
        return torch.bmm(x, self.w.transpose(1, 2))


class BmmWeightFirst(_Experts):
    """``bmm(w [E, N, K], x^T [E, K, T])``, transposed back to ``[E, T, N]``."""

    def __init__(self, seed: int = 1) -> None:
        super().__init__((E, N, K), seed=seed)

    def forward(self, x, offs=None):
        return torch.bmm(self.w, x.transpose(1, 2)).transpose(1, 2)


class MatmulOp(_Experts):
    def __init__(self) -> None:
        super().__init__((E, N, K))

    def forward(self, x, offs=None):
        return x @ self.w.transpose(1, 2)


class Einsum(_Experts):
    """``einsum(eq, x, w)`` (or ``(w, x)`` when the equation starts with the weight's subscripts)."""

    def __init__(self, eq: str, shape: tuple[int, ...], seed: int = 1) -> None:
        super().__init__(shape, seed=seed)
        self.eq = eq
        self.weight_first = eq.split(",")[0] in ("enk", "ekn")

    def forward(self, x, offs=None):
        if self.weight_first:
            return torch.einsum(self.eq, self.w, x)
        return torch.einsum(self.eq, x, self.w)


class Loop(_Experts):
    """One ``F.linear`` per expert on ``w[e]``: the eager per-expert loop."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__((E, N, K), dtype)

    def forward(self, x, offs=None):
        return torch.stack([F.linear(x[e], self.w[e]) for e in range(E)])


class LoopWithBias(Loop):
    """The loop with a per-expert bias: not a loop :mod:`moeq.passes.canonicalize` rewrites (grouped GEMMs take
    no bias), so it stays reported."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(dtype)
        self.b = nn.Parameter(torch.zeros(E, N, dtype=dtype))

    def forward(self, x, offs=None):
        return torch.stack([F.linear(x[e], self.w[e], self.b[e]) for e in range(E)])


class Computed(_Experts):
    """The GEMM weight is ``w * 2``: computed from the parameter, not the parameter itself."""

    def __init__(self) -> None:
        super().__init__((E, N, K), BF16)

    def forward(self, x, offs=None):
        return torch._grouped_mm(x, (self.w * 2).transpose(-2, -1), offs=offs)


class Reshaped(_Experts):
    """Flat ``w [E, N*K]`` viewed as ``[E, N, K]`` right before the GEMM."""

    def __init__(self) -> None:
        super().__init__((E, N * K))

    def forward(self, x, offs=None):
        return torch.bmm(x, self.w.view(E, N, K).transpose(1, 2))


class ActAct(nn.Module):
    """A bmm between two activations (attention-score style); no parameter feeds it."""

    def forward(self, x, offs=None):
        return torch.bmm(x, x.transpose(1, 2))


class DenseLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(K, N)

    def forward(self, x, offs=None):
        return self.proj(x)


class DenseFunctional(_Experts):
    def __init__(self) -> None:
        super().__init__((N, K))

    def forward(self, x, offs=None):
        return F.linear(x, self.w)


class MLP(nn.Module):
    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.experts = experts

    def forward(self, x, offs=None):
        return self.experts(x, offs)


class Model(nn.Module):
    """``model.mlp.experts``: the expert weight's FQN is ``mlp.experts.w``."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.mlp = MLP(experts)

    def forward(self, x, offs=None):
        return self.mlp(x, offs)


def routed_args(dtype: torch.dtype = BF16, k: int = K) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D routed rows ``[T, K]`` and their int32 offsets."""
    return _randn(T, k, seed=2, dtype=dtype), _offs()


def batched_args(seed: int = 2) -> tuple[torch.Tensor]:
    """Batched-over-experts input ``[E, TE, K]``."""
    return (_randn(E, TE, K, seed=seed),)


def trace(model: nn.Module, args: tuple, how: str):
    """``(graph module, example inputs or None)`` from symbolic_trace, export or a Dynamo capture."""
    if how == "fx":
        return torch.fx.symbolic_trace(model), None
    if how == "export":
        return torch.export.export(model, args).module(), None
    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch.compile(model, backend=capture, fullgraph=True)(*args)
    assert len(graphs) == 1, "expected one Dynamo graph (fullgraph=True)"
    return graphs[0]


def find(model: nn.Module, args: tuple, how: str):
    gm, example_inputs = trace(model, args, how)
    return find_expert_gemms(gm, example_inputs)


def only(records):
    assert len(records) == 1, f"expected exactly one expert GEMM, got {records}"
    return records[0]


def rel_err(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    scale = ref if scale is None else scale
    return float((out.float() - ref.float()).norm() / scale.float().norm())


# ------------------------------------------------------------------------------------------------
# grouped_mm (2-D routed rows x 3-D stacked weight, with offs)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", TRACES)
def test_grouped_mm_hf_layout(how):
    """grouped_mm on ``w.transpose(-2, -1)`` of an HF ``[E, N, K]`` weight: K is dim 2 of the parameter,
    experts dim 0, the nested FQN is found, the transpose is on the path and nothing is skipped."""
    records, skipped = find(Model(GroupedHF()), routed_args(), how)
    rec = only(records)
    assert rec.form == "grouped_mm"
    assert rec.weight_fqn == FQN
    assert rec.weight_shape == (E, N, K)
    assert (rec.expert_dim, rec.contraction_dim) == (0, 2)
    assert rec.num_experts == E
    assert rec.offs is not None and rec.input is not None
    assert rec.input_contraction_dim in (-1, 1)
    assert any("transpose" in op for op in rec.path), rec.path
    assert skipped == []


@pytest.mark.parametrize("how", TRACES)
def test_grouped_mm_gpt_oss_layout(how):
    """grouped_mm on a GPT-OSS ``[E, K, N]`` weight passed untransposed: K is dim 1, no view ops on the path."""
    rec = only(find(Model(GroupedGptOss()), routed_args(), how)[0])
    assert rec.form == "grouped_mm"
    assert rec.weight_fqn == FQN
    assert rec.weight_shape == (E, K, N)
    assert (rec.expert_dim, rec.contraction_dim) == (0, 1)
    assert rec.path == []


@pytest.mark.parametrize("how", TRACES)
def test_grouped_mm_through_permute(how):
    """``w.permute(0, 2, 1)`` is followed like a transpose: K stays dim 2 of the ``[E, N, K]`` parameter."""
    rec = only(find(Model(GroupedPermute()), routed_args(), how)[0])
    assert rec.weight_fqn == FQN
    assert (rec.expert_dim, rec.contraction_dim) == (0, 2)
    assert any("permute" in op for op in rec.path), rec.path


@pytest.mark.parametrize("how", TRACES)
def test_grouped_mm_through_cast_and_contiguous(how):
    """``w.to(bf16).transpose(-2, -1).contiguous()`` of an fp32 parameter: casts and contiguous are followed,
    the record keeps the parameter's shape and dims."""
    rec = only(find(Model(GroupedCast()), routed_args(), how)[0])
    assert rec.weight_fqn == FQN
    assert rec.weight_shape == (E, N, K)
    assert (rec.expert_dim, rec.contraction_dim) == (0, 2)
    assert [op.split(":")[-1].split(".")[-1] for op in rec.path] == ["to", "transpose", "contiguous"]


@pytest.mark.parametrize("how", TRACES)
def test_functional_grouped_mm(how):
    """``F.grouped_mm`` is the same expert GEMM as ``torch._grouped_mm``."""
    rec = only(find(Model(GroupedFunctional()), routed_args(), how)[0])
    assert (rec.form, rec.weight_fqn, rec.expert_dim, rec.contraction_dim) == ("grouped_mm", FQN, 0, 2)


# ------------------------------------------------------------------------------------------------
# batched experts: bmm / matmul / einsum whose batch dim is the expert dim
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", TRACES)
def test_bmm_activation_first(how):
    """``bmm(x [E, T, K], w.transpose(1, 2))``: form bmm, expert dim 0 and K dim 2 of ``w [E, N, K]``; the
    input's expert dim is 0 and its contraction dim 2."""
    records, skipped = find(Model(BmmActFirst()), batched_args(), how)
    rec = only(records)
    assert rec.form == "bmm"
    assert rec.weight_fqn == FQN
    assert (rec.expert_dim, rec.contraction_dim) == (0, 2)
    assert (rec.input_expert_dim, rec.input_contraction_dim) == (0, 2)
    assert rec.offs is None
    assert skipped == []


@pytest.mark.parametrize("how", TRACES)
def test_bmm_weight_first(how):
    """``bmm(w [E, N, K], x.transpose(1, 2))``: the weight is the first operand; K is still dim 2 of ``w``
    and the input (``[E, K, T]``) contracts along its dim 1."""
    rec = only(find(Model(BmmWeightFirst()), batched_args(), how)[0])
    assert rec.form == "bmm"
    assert rec.weight_fqn == FQN
    assert (rec.expert_dim, rec.contraction_dim) == (0, 2)
    assert (rec.input_expert_dim, rec.input_contraction_dim) == (0, 1)


@pytest.mark.parametrize("how", TRACES)
def test_matmul_operator_batched(how):
    """``x @ w.transpose(1, 2)`` with 3-D operands is a batched expert GEMM like bmm."""
    rec = only(find(Model(MatmulOp()), batched_args(), how)[0])
    assert (rec.form, rec.weight_fqn, rec.expert_dim, rec.contraction_dim) == ("bmm", FQN, 0, 2)


EINSUMS = [
    # equation, weight shape, (contraction dim of w, input expert dim, input contraction dim)
    ("etk,enk->etn", (E, N, K), (2, 0, 2)),
    ("etk,ekn->etn", (E, K, N), (1, 0, 2)),
    ("enk,etk->etn", (E, N, K), (2, 0, 2)),
    ("tek,enk->ten", (E, N, K), (2, 1, 2)),
]


@pytest.mark.parametrize("how", TRACES)
@pytest.mark.parametrize("eq,shape,dims", EINSUMS, ids=[e[0] for e in EINSUMS])
def test_einsum(how, eq, shape, dims):
    """Two-operand einsum with one shared batch index (experts) and one contracted index: form einsum, the
    contraction dim is read from the weight's subscripts, the input dims from the input's subscripts."""
    x = _randn(TE, E, K, seed=2) if eq.startswith("tek") else _randn(E, TE, K, seed=2)
    rec = only(find(Model(Einsum(eq, shape)), (x,), how)[0])
    assert rec.form == "einsum"
    assert rec.weight_fqn == FQN
    assert rec.weight_shape == shape
    assert (rec.contraction_dim, rec.input_expert_dim, rec.input_contraction_dim) == dims
    assert rec.expert_dim == 0


# ------------------------------------------------------------------------------------------------
# candidates that are not rewritten, each with a reason
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", TRACES)
def test_per_expert_loop_is_reported(how):
    """``for e in range(E): F.linear(x[e], w[e])``: find() alone makes no expert GEMM record (the quantization pass
    first rewrites whole loops, tests/test_canonicalize.py); each of the E linears is skipped with a reason that
    says per-expert slice / loop and names the parameter."""
    records, skipped = find(Model(Loop()), batched_args(), how)
    assert records == []
    assert len(skipped) == E
    for s in skipped:
        assert s.weight_fqn == FQN
        assert s.category == "expert"
        assert "per-expert" in s.reason and "loop" in s.reason
        assert FQN in s.reason


@pytest.mark.parametrize("how", TRACES)
def test_dense_nn_linear_is_reported(how):
    """A dense ``nn.Linear`` (router / shared expert) is not an expert GEMM and is reported as dense 2-D
    with its weight FQN, in every kind of graph (symbolic_trace keeps it as a ``call_module`` leaf)."""
    records, skipped = find(Model(DenseLinear()), routed_args(torch.float32), how)
    assert records == []
    assert len(skipped) == 1, skipped
    s = skipped[0]
    assert s.category == "dense"
    assert s.weight_fqn == "mlp.experts.proj.weight"
    assert "dense" in s.reason and "2-D" in s.reason


class ListedExperts(nn.Module):
    """Experts as a module list of ``nn.Linear`` (older HF MoE code, Megatron's SequentialMLP), looped over the
    pieces of ``x.split(sizes)``: separate 2-D weights, not slices of one stacked parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(K, N, bias=False) for _ in range(E))

    def forward(self, x, offs=None):
        pieces = x.split([2, 4, 5, 5])
        return torch.cat([self.experts[e](pieces[e]) for e in range(E)])


@pytest.mark.parametrize("how", ["export", "dynamo"])
def test_module_list_experts_are_found_per_expert(how):
    """Each expert's ``nn.Linear`` in a module list is an expert GEMM of the list's stacked view: keyed
    ``experts.*.weight``, ``[E, N, K]`` with K along dim 2, its expert index, its own rows as input."""
    records, skipped = find(Model(ListedExperts()), routed_args(torch.float32), how)
    assert skipped == []
    assert [r.listed_expert for r in records] == list(range(E))
    for r in records:
        assert (r.weight_fqn, r.form) == ("mlp.experts.experts.*.weight", "per-expert module list")
        assert (r.weight_shape, r.expert_dim, r.contraction_dim) == ((E, N, K), 0, 2)
        assert r.offs is None and r.input_contraction_dim == -1


def test_module_list_experts_left_as_leaf_modules_are_reported():
    """``symbolic_trace`` keeps each ``nn.Linear`` as a ``call_module`` leaf, which moeq cannot rewrite: reported per
    expert as an expert GEMM (not dense), naming the expert and saying how to trace instead."""
    records, skipped = find(Model(ListedExperts()), routed_args(torch.float32), "fx")
    assert records == []
    assert [s.weight_fqn for s in skipped] == [f"mlp.experts.experts.{e}.weight" for e in range(E)]
    for e, s in enumerate(skipped):
        assert s.category == "expert"
        assert f"2-D weight of expert {e} in a per-expert module list: a leaf nn.Linear call" in s.reason
        assert "trace with Dynamo or torch.export" in s.reason and s.reason.endswith("not quantized")


class SomeListedExperts(ListedExperts):
    """Only three of the four experts are multiplied: not the whole list."""

    def forward(self, x, offs=None):
        pieces = x.split([2, 4, 10])
        return torch.cat([self.experts[e](pieces[e]) for e in range(3)])


@pytest.mark.parametrize("how", ["export", "dynamo"])
def test_module_list_partly_multiplied_is_reported(how):
    """A graph that multiplies only some experts of a prepared model's module list is reported GEMM by GEMM, naming
    the experts it saw out of the model's (the stacked state would otherwise take the wrong expert count)."""
    model = moeq.prepare(Model(SomeListedExperts()), moeq.FP8)
    records, skipped = find(model, routed_args(torch.float32), how)
    assert records == []
    assert [s.weight_fqn for s in skipped] == [f"mlp.experts.experts.{e}.weight" for e in range(3)]
    for s in skipped:
        assert s.category == "expert"
        assert "the graph multiplies experts [0, 1, 2] of the 4 in mlp.experts.experts.*.weight" in s.reason


@pytest.mark.parametrize("how", TRACES)
def test_dense_functional_linear_is_reported(how):
    """``F.linear`` on a 2-D parameter is reported as a dense GEMM, not rewritten."""
    records, skipped = find(Model(DenseFunctional()), routed_args(torch.float32), how)
    assert records == []
    (s,) = skipped
    assert (s.category, s.weight_fqn) == ("dense", FQN)
    assert "dense" in s.reason and "2-D" in s.reason


@pytest.mark.parametrize("how", TRACES)
def test_computed_weight_is_reported(how):
    """A weight computed from the parameter (``w * 2``) is not followed to the parameter (that would
    quantize the wrong tensor): it is skipped with a reason saying the operand is computed."""
    records, skipped = find(Model(Computed()), routed_args(), how)
    assert records == []
    (s,) = skipped
    assert "grouped_mm" in s.target
    assert "computed" in s.reason and "mul" in s.reason


@pytest.mark.parametrize("how", ["export", "dynamo"])
def test_shape_changing_reshape_is_reported(how):
    """``w.view(E, N, K)`` of a flat ``[E, N*K]`` parameter may move the K dim: reported with a reason
    naming the reshape, not silently taken or silently dropped."""
    records, skipped = find(Model(Reshaped()), batched_args(), how)
    assert records == []
    (s,) = skipped
    assert "reshape" in s.reason and "view" in s.reason


@pytest.mark.parametrize("how", TRACES)
def test_bmm_of_two_activations_is_reported(how):
    """A bmm between two activations has no parameter operand: skipped as an activation GEMM, no FQN."""
    records, skipped = find(Model(ActAct()), batched_args(), how)
    assert records == []
    (s,) = skipped
    assert (s.category, s.weight_fqn) == ("activation", None)
    assert "bmm" in s.target
    assert "no 3-D parameter" in s.reason


# ------------------------------------------------------------------------------------------------
# Dynamo specifics: FQNs from placeholders
# ------------------------------------------------------------------------------------------------


def test_dynamo_without_example_inputs():
    """Without example inputs a Dynamo graph still yields the FQN (from the placeholder) and the dims."""
    gm, _ = trace(Model(GroupedHF()), routed_args(), "dynamo")
    rec = only(find_expert_gemms(gm, None)[0])
    assert (rec.weight_fqn, rec.weight_shape, rec.expert_dim, rec.contraction_dim) == (FQN, (E, N, K), 0, 2)


@pytest.mark.parametrize("how", TRACES)
def test_root_level_parameter_fqn(how):
    """A stacked weight owned by the traced module itself has FQN ``w`` in every kind of graph (Dynamo names
    its placeholder ``l_self_parameters_w_``)."""
    records, _ = find(BmmActFirst(), batched_args(), how)
    assert only(records).weight_fqn == "w"


# ------------------------------------------------------------------------------------------------
# quantize_graph: rewrite, explain, calibrate, finalize
# ------------------------------------------------------------------------------------------------


class MixedMLP(nn.Module):
    """Routed grouped_mm experts next to a dense linear, a per-expert loop with biases and a computed weight."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = GroupedHF(BF16)
        self.loop_experts = LoopWithBias(BF16)
        self.scaled_experts = Computed()
        self.shared_w = nn.Parameter(_randn(N, K, seed=3, dtype=BF16) * 0.1)

    def forward(self, x, offs):
        y = self.experts(x, offs) + F.linear(x, self.shared_w)
        y = y + self.loop_experts(x.view(E, TE, K)).reshape(T, N)
        return y + self.scaled_experts(x, offs)


class MixedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = MixedMLP()

    def forward(self, x, offs):
        return self.mlp(x, offs)


def _graph(model: nn.Module, args: tuple, how: str):
    return torch.fx.symbolic_trace(model) if how == "fx" else torch.export.export(model, args).module()


@pytest.mark.parametrize("how", ["fx", "export"])
def test_quantize_graph_fp8_grouped(how):
    """FP8 on a mixed MoE block: only ``mlp.experts.w`` gets a quant state; the graph runs unchanged before
    calibration; explain() lists the expert FQN and the reasons for the loop, dense and computed GEMMs;
    calibration records the routed rows per expert; finalize() sets weight_amax to exactly max|W_e| per
    expert; the quantized output differs from full precision by < 10 % of the expert GEMM's output."""
    torch.manual_seed(0)
    model = MixedModel()
    x, offs = routed_args()
    with torch.no_grad():
        ref = model(x, offs)
        expert_out = model.mlp.experts(x, offs)
    qgm = moeq.quantize_graph(_graph(model, (x, offs), how), moeq.FP8)
    with torch.no_grad():
        assert torch.equal(qgm(x, offs), ref)

    report = moeq.explain(qgm)
    assert [r.fqn for r in report.rewritten] == [FQN]
    assert set(moeq.quant_state(qgm)) == {FQN}
    text = str(report)
    assert FQN in text
    assert "per-expert slice" in text and "mlp.loop_experts.w" in text
    assert "dense GEMM on 2-D weight" in text and "mlp.shared_w" in text
    assert "computed" in text

    with torch.no_grad(), moeq.calibrate(qgm):
        qgm(x, offs)
    moeq.finalize(qgm)
    s = moeq.quant_state(qgm)[FQN]
    w = model.mlp.experts.w.detach()
    assert torch.equal(s.weight_amax, w.abs().amax(dim=(1, 2)).float())
    counts = torch.diff(offs, prepend=torch.zeros(1, dtype=offs.dtype)).long()
    assert torch.equal(s.tokens_per_expert, counts)
    bounds = [0, *offs.tolist()]
    seg_amax = torch.stack([x[a:b].abs().max().float() for a, b in zip(bounds[:-1], bounds[1:])])
    assert torch.equal(s.observed_input_amax, seg_amax)

    with torch.no_grad():
        out = qgm(x, offs)
    assert not torch.equal(out, ref)
    assert rel_err(out, ref, expert_out) < 0.1
    assert "finalized" in str(moeq.explain(qgm))


@pytest.mark.parametrize("how", ["fx", "export"])
@pytest.mark.parametrize("cls", [BmmActFirst, BmmWeightFirst])
def test_quantize_graph_fp8_bmm(how, cls):
    """FP8 on a batched (bmm) expert GEMM: observed input amax is per expert along the batch dim,
    weight_amax is exactly max|W_e|, and the output changes by < 10 %."""
    model = Model(cls())
    (x,) = batched_args()
    with torch.no_grad():
        ref = model(x)
    qgm = moeq.quantize_graph(_graph(model, (x,), how), moeq.FP8)
    with torch.no_grad(), moeq.calibrate(qgm):
        qgm(x)
    moeq.finalize(qgm)
    s = moeq.quant_state(qgm)[FQN]
    assert torch.equal(s.weight_amax, model.mlp.experts.w.detach().abs().amax(dim=(1, 2)))
    assert torch.equal(s.observed_input_amax, x.abs().amax(dim=(1, 2)))
    assert s.tokens_per_expert.tolist() == [TE] * E
    with torch.no_grad():
        out = qgm(x)
    assert not torch.equal(out, ref)
    assert rel_err(out, ref) < 0.1


def test_quantize_graph_names_a_float64_expert_weight():
    """An expert weight of a dtype moeq does not quantize is an error naming the weight and its dtype."""
    model = Model(BmmActFirst()).double()
    (x,) = batched_args()
    gm = torch.export.export(model, (x.double(),)).module()
    with pytest.raises(ValueError, match=rf"{FQN}: expert weight has dtype torch.float64; moeq quantizes float32"):
        moeq.quantize_graph(gm, moeq.FP8)


def _nvfp4(model: nn.Module, args: tuple, how: str):
    """Quantize ``model``'s graph with NVFP4, calibrate and finalize on ``args``; ``(graph, output)``."""
    qgm = moeq.quantize_graph(_graph(model, args, how), moeq.NVFP4)
    with torch.no_grad(), moeq.calibrate(qgm):
        qgm(*args)
    moeq.finalize(qgm)
    with torch.no_grad():
        return qgm, qgm(*args)


@pytest.mark.parametrize("how", ["fx", "export"])
def test_nvfp4_blocks_follow_contraction_dim_batched(how):
    """NVFP4 blocks run along K: the same weights and inputs computed as ``bmm(x, w^T)``, ``bmm(w, x^T)^T``
    and ``einsum('enk,etk->etn')`` give the same quantized output, and it differs from full precision. A
    wrong weight or input contraction dim would put the 16-blocks along N or T and change the result."""
    x = _randn(E, 16, K, seed=5)  # T = 16 per expert, so blocks along T would also be legal
    outs = [
        _nvfp4(Model(m), (x,), how)[1]
        for m in (BmmActFirst(seed=7), BmmWeightFirst(seed=7), Einsum("enk,etk->etn", (E, N, K), seed=7))
    ]
    ref = torch.bmm(x, BmmActFirst(seed=7).w.detach().transpose(1, 2))
    assert rel_err(outs[0], ref) > 1e-3
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["fx", "export"])
def test_nvfp4_blocks_follow_contraction_dim_grouped(how):
    """The HF ``[E, N, K]`` and GPT-OSS ``[E, K, N]`` layouts of the same expert weights give the same NVFP4
    output (blocks along K = 32 in both; N = 32 too, so wrong blocks would not raise, only differ)."""
    dtype = torch.float32 if how == "fx" else BF16
    hf = GroupedHF(dtype, k=K, n=32, seed=9)
    gpt = GroupedGptOss(dtype, k=K, n=32)
    with torch.no_grad():
        gpt.w.copy_(hf.w.transpose(1, 2))
    args = routed_args(dtype)
    out_hf = _nvfp4(Model(hf), args, how)[1]
    out_gpt = _nvfp4(Model(gpt), args, how)[1]
    with torch.no_grad():
        ref = Model(hf)(*args)
    assert rel_err(out_hf, ref) > 1e-3
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out_gpt, out_hf, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["fx", "export"])
@pytest.mark.parametrize("layout", ["hf", "gpt_oss"])
def test_nvfp4_rejects_contraction_dim_not_multiple_of_16(how, layout):
    """K = 24 is not a multiple of the NVFP4 block (16): quantize_graph raises ValueError naming the FQN and
    16, in either layout (the K dim is the parameter's dim 2 in HF layout, dim 1 in GPT-OSS layout)."""
    experts = GroupedHF(k=24) if layout == "hf" else GroupedGptOss(k=24)
    gm = _graph(Model(experts), routed_args(k=24), how)
    with pytest.raises(ValueError, match=r"mlp\.experts\.w") as info:
        moeq.quantize_graph(gm, moeq.NVFP4)
    assert "16" in str(info.value)


@pytest.mark.parametrize("how", ["fx", "export"])
def test_nvfp4_accepts_non_multiple_output_dim(how):
    """Only K must be a multiple of 16: a GPT-OSS ``[E, K=32, N=24]`` weight is fine for NVFP4 (its last
    dim is N), and the rewritten graph runs through calibration and finalize with per-16-block weight
    amaxes taken along K (``[E, N, K // 16]``)."""
    qgm, out = _nvfp4(Model(GroupedGptOss(k=K, n=24)), routed_args(), how)
    assert out.shape == (T, 24)
    assert torch.isfinite(out.float()).all()
    s = moeq.quant_state(qgm)[FQN]
    assert (s.expert_dim, s.contraction_dim) == (0, 1)
    assert tuple(s.weight_block_amax.shape) == (E, 24, K // 16)


class PreQuantized(_Experts):
    """A weight stored already quantized (float8 / int8) and cast up on the fly."""

    def __init__(self, dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        self.w = nn.Parameter((_randn(E, N, K, seed=1) * 4).to(dtype), requires_grad=False)

    def forward(self, x, offs=None):
        return torch._grouped_mm(x, self.w.to(torch.bfloat16).transpose(-2, -1), offs=offs)


@pytest.mark.parametrize("how", ["fx", "export"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8], ids=["float8", "int8"])
def test_prequantized_weight_is_an_error_naming_fqn(how, dtype):
    """An expert weight that is already float8 / int8 is found (through the cast) and rejected with a
    ValueError that names its FQN and dtype, rather than quantized a second time."""
    gm = _graph(Model(PreQuantized(dtype)), routed_args(), how)
    rec = only(find_expert_gemms(gm)[0])
    assert rec.weight_dtype == dtype
    with pytest.raises(ValueError, match=r"mlp\.experts\.w") as info:
        moeq.quantize_graph(gm, moeq.FP8)
    assert str(dtype) in str(info.value)
