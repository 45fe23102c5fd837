"""``QuantConfig(calib="all_experts")``: while calibrating, every token also runs through every expert.

DESIGN.md's calibration semantics: cold experts see no routed tokens, so this option routes every calibration token
to every expert, during calibration only. Checked against float64 math on transformers' own expert MLP
(``_apply_gate`` of the expert's up projection, in the weight's stored layout) and against the export bytes of
nvidia-modelopt 0.47 calibrated with ``moe_calib_experts_ratio=1.0``, which does the same.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import fx, nn

import moeq
from moeq.integrations.hf import is_routed_experts_module, tiny_model
from moeq.state import get_state
from tests.conftest import make_tokens, one_moe_layer, rank_context
from tests.listed_experts import ExpertMLP, ListedExperts

ALL_EXPERTS_FP8 = moeq.FP8.replace(act_scale="per_expert", calib="all_experts")


def _experts(model: nn.Module) -> nn.Module:
    (experts,) = [m for m in model.modules() if is_routed_experts_module(m)]
    return experts


def _expert_mlp_f64(experts: nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
    """Expert ``e``'s down-projection input for rows ``x`` in float64: the up projection in the weight's stored
    layout (``is_transposed``: ``[E, K, N]``), its bias, then transformers' own gate (SiLU-and-mul, GPT-OSS's
    clamped GLU)."""
    w = experts.gate_up_proj[e].double()
    h = x.double() @ (w if experts.is_transposed else w.T)
    if experts.has_bias:
        h = h + experts.gate_up_proj_bias[e].double()
    return experts._apply_gate(h)


def _eager_block_inputs(model: nn.Module, batches: list[torch.Tensor]) -> tuple[list, list, list]:
    """An unquantized eager run: per batch, the experts module's input rows and top-k expert ids, and the logits."""
    inputs, topk = [], []

    def record(module: nn.Module, args: tuple) -> None:
        inputs.append(args[0])
        topk.append(args[1])

    hook = _experts(model).register_forward_pre_hook(record)
    with torch.no_grad():
        logits = [model(ids, use_cache=False).logits for ids in batches]
    hook.remove()
    return inputs, topk, logits


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_every_expert_observes_every_token(family: str) -> None:
    """Under ``backend="moeq"`` each expert's observers see every calibration token, plus the tokens routed to it:
    the down projection's per-expert input amax equals float64 math over all tokens, the up projection's is the max
    over all tokens for every expert, token counts are ``tokens + routed`` per expert. The calibrating forward's
    output is the routed model's, and finalize() calibrates every expert."""
    batches = [make_tokens(seed=1), make_tokens(seed=2, batch=3, seq=7)]
    model = tiny_model(family, torch.float32, **one_moe_layer(family))
    inputs, topk, reference_logits = _eager_block_inputs(copy.deepcopy(model), batches)
    moeq.prepare(model, ALL_EXPERTS_FP8)
    cm = torch.compile(model, backend="moeq_aot_eager")
    with torch.no_grad(), moeq.calibrate(cm):
        logits = [cm(ids, use_cache=False).logits for ids in batches]
    moeq.finalize(cm)
    for got, want in zip(logits, reference_logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    experts = _experts(model)
    num_experts = experts.num_experts
    up_amax = max(float(x.abs().max()) for x in inputs)
    down_all = torch.zeros(num_experts, dtype=torch.float64)
    down_routed = torch.zeros(num_experts, dtype=torch.float64)
    tokens = torch.zeros(num_experts, dtype=torch.int64)
    with torch.no_grad():
        for x, ids in zip(inputs, topk):
            tokens += x.shape[0] + torch.bincount(ids.flatten(), minlength=num_experts)
            for e in range(num_experts):
                act = _expert_mlp_f64(experts, x, e).abs()
                down_all[e] = max(down_all[e], act.max())
                routed = (ids == e).any(dim=-1)
                if routed.any():
                    down_routed[e] = max(down_routed[e], act[routed].max())
    state = moeq.quant_state(model)
    prefix = next(iter(state)).rsplit(".", 1)[0]
    up, down = state[f"{prefix}.gate_up_proj"], state[f"{prefix}.down_proj"]
    for s in (up, down):
        assert torch.equal(s.tokens_per_expert, tokens), (s.fqn, s.tokens_per_expert, tokens)
        assert bool(s.calibrated.all()) and not s.flags, s.flags
    torch.testing.assert_close(
        up.observed_input_amax.double(), torch.full((num_experts,), up_amax, dtype=torch.float64)
    )
    torch.testing.assert_close(down.observed_input_amax.double(), down_all, rtol=1e-5, atol=0)
    # not vacuous: tokens the router did not send raise some expert's amax above its routed-only one
    assert bool((down_all > down_routed * (1 + 1e-3)).any()), (down_all, down_routed)
    assert "calib=all_experts" in str(moeq.explain(cm))


#: the other transformers 5 families whose experts modules take (hidden_states, top_k_index, top_k_weights), each
#: built with one MoE decoder layer
MORE_FAMILIES = ["deepseek_v3", "glm4_moe", "granitemoe", "mixtral", "olmoe", "phimoe", "qwen2_moe", "qwen3_next"]


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_more_families_calibrate_every_expert_on_every_token(family: str) -> None:
    """Every expert weight of each family counts every calibration token plus the tokens its router sent (read from
    an eager copy's experts calls), and every expert is calibrated."""
    ids = make_tokens(seed=5)
    model = tiny_model(family, torch.float32, **one_moe_layer(family))
    _, topk, _ = _eager_block_inputs(copy.deepcopy(model), [ids])
    moeq.prepare(model, ALL_EXPERTS_FP8)
    cm = torch.compile(model, backend="moeq_aot_eager")
    with torch.no_grad(), moeq.calibrate(cm):
        cm(ids, use_cache=False)
    moeq.finalize(cm)
    experts = _experts(model)
    want = ids.numel() + torch.bincount(topk[0].flatten(), minlength=experts.num_experts)
    state = moeq.quant_state(model)
    assert len(state) == 2
    for s in state.values():
        assert torch.equal(s.tokens_per_expert, want) and bool(s.calibrated.all()), (s.fqn, s.tokens_per_expert, want)


def test_checkpoint_loads_into_a_model_prepared_for_routed_calibration(tmp_path: Path) -> None:
    """``calib`` says how statistics were gathered, not what the quantized model computes: a finalized state saved
    under ``all_experts`` loads into the same model prepared with ``calib="routed"``, every amax and count equal."""
    model = moeq.prepare(tiny_model("qwen3_moe", torch.float32, num_hidden_layers=1), ALL_EXPERTS_FP8)
    cm = torch.compile(model, backend="moeq_aot_eager")
    with torch.no_grad(), moeq.calibrate(cm):
        cm(make_tokens(seed=6))
    moeq.finalize(cm)
    moeq.save_state(model, tmp_path / "state")
    other = moeq.prepare(
        tiny_model("qwen3_moe", torch.float32, num_hidden_layers=1), ALL_EXPERTS_FP8.replace(calib="routed")
    )
    moeq.load_state(other, tmp_path / "state")
    saved, loaded = moeq.quant_state(model), moeq.quant_state(other)
    assert sorted(saved) == sorted(loaded)
    for fqn, s in saved.items():
        for name in ("weight_amax", "input_amax", "tokens_per_expert"):
            assert torch.equal(getattr(loaded[fqn], name), getattr(s, name)), (fqn, name)


class Transformers4Block(nn.Module):
    """A MoE block as transformers 4's Mixtral wrote it: a linear gate, ``top_k`` on the block itself, the experts a
    module list called from the block's forward (through ``ListedExperts``' sorted split)."""

    def __init__(self, hidden: int = 16, inter: int = 8, experts: int = 4, top_k: int = 1) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.top_k = top_k
        self.experts = ListedExperts(ExpertMLP(hidden, inter, nn.SiLU()) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = torch.topk(self.gate(x).softmax(dim=-1), self.top_k, dim=-1)
        return self.experts(x, chosen, weights)


def test_block_with_top_k_on_itself_runs_every_token_through_every_expert() -> None:
    """The block's hook raises the block's own ``top_k`` to the expert count for one forward, then restores it:
    each expert's down-projection input amax equals float64 math over every token, counts are tokens + routed, and
    the calibrating output is the top-1 block's."""
    torch.manual_seed(0)
    block = Transformers4Block()
    x = torch.randn(24, 16)
    with torch.no_grad():
        want = block(x)
        _, chosen = torch.topk(block.gate(x), 1, dim=-1)
    moeq.prepare(block, ALL_EXPERTS_FP8)
    cm = torch.compile(block, backend="moeq_aot_eager")
    with torch.no_grad(), torch._dynamo.config.patch(capture_scalar_outputs=True), moeq.calibrate(cm):
        got = cm(x)
    moeq.finalize(cm)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert block.top_k == 1
    state = moeq.quant_state(block)
    down = state["experts.*.down_proj.weight"]
    with torch.no_grad():
        act = torch.stack([e.act_fn(e.gate_proj(x).double()) * e.up_proj(x).double() for e in block.experts])
    torch.testing.assert_close(down.observed_input_amax.double(), act.abs().amax(dim=(1, 2)), rtol=1e-6, atol=0)
    counts = x.shape[0] + torch.bincount(chosen.flatten(), minlength=4)
    assert all(torch.equal(s.tokens_per_expert, counts) for s in state.values()), counts


def test_re_prepared_with_routed_calibration_routes_as_the_model_does() -> None:
    """The hooks stay on the modules after a re-prepare with ``calib="routed"``, and follow the new state: the
    next calibration counts routed tokens only."""
    torch.manual_seed(0)
    block = Transformers4Block()
    x = torch.randn(24, 16)
    with torch.no_grad():
        _, chosen = torch.topk(block.gate(x), 1, dim=-1)
    routed = torch.bincount(chosen.flatten(), minlength=4)
    for config, want in ((ALL_EXPERTS_FP8, x.shape[0] + routed), (ALL_EXPERTS_FP8.replace(calib="routed"), routed)):
        moeq.prepare(block, config)
        cm = torch.compile(block, backend="moeq_aot_eager")
        with torch.no_grad(), torch._dynamo.config.patch(capture_scalar_outputs=True), moeq.calibrate(cm):
            cm(x)
        for s in moeq.quant_state(block).values():
            assert torch.equal(s.tokens_per_expert, want), (config.calib, s.tokens_per_expert, want)


def _counting_grouped_gemms(model: nn.Module, counts: list[tuple[str, int]]) -> object:
    """A ``moeq_aot_eager`` backend that first records the model's mode and how many grouped GEMMs Dynamo's graph
    holds, per graph compiled."""
    moeq_backend = torch._dynamo.lookup_backend("moeq_aot_eager")

    def backend(gm: fx.GraphModule, example_inputs: list) -> object:
        nodes = [n for n in gm.graph.nodes if n.op == "call_function" and "grouped_mm" in str(n.target)]
        counts.append((get_state(model).mode, len(nodes)))
        return moeq_backend(gm, example_inputs)

    return backend


def test_all_experts_calls_in_chunks_observe_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``ALL_EXPERTS_CALL_WIDTH = 1`` the extra experts calls take ``top_k`` experts each (4 calls of 2 of the
    8 experts, bounding their activation memory to the routed call's): statistics bit-equal to one call of all 8."""
    import moeq.integrations.hf as hf

    ids = make_tokens(seed=7)
    states = {}
    for width in (hf.ALL_EXPERTS_CALL_WIDTH, 1):
        monkeypatch.setattr(hf, "ALL_EXPERTS_CALL_WIDTH", width)
        torch._dynamo.reset()
        model = moeq.prepare(tiny_model("qwen3_moe", torch.float32, num_hidden_layers=1), ALL_EXPERTS_FP8)
        counts: list[tuple[str, int]] = []
        cm = torch.compile(model, backend=_counting_grouped_gemms(model, counts))
        with torch.no_grad(), moeq.calibrate(cm):
            cm(ids)
        moeq.finalize(cm)
        states[width] = moeq.quant_state(model)
        assert counts == [("calibrate", 2 * (1 + 8 // min(8, 2 * width)))], counts
    for fqn, want in states[hf.ALL_EXPERTS_CALL_WIDTH].items():
        got = states[1][fqn]
        for name in ("observed_input_amax", "tokens_per_expert", "input_amax"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (fqn, name)


def test_data_parallel_ranks_sync_to_the_single_process_statistics(tmp_path: Path) -> None:
    """Two gloo data-parallel ranks, each calibrating its own batch with every token through every expert, finalize
    (``dp_group``) to the statistics of one process that calibrated on both batches: input amaxes bit-equal (max
    over ranks), token counts equal (summed over ranks)."""
    from all_experts_dp_worker import STATISTICS, calibration_batch, run_rank

    model = moeq.prepare(tiny_model("qwen3_moe", torch.float32, num_hidden_layers=1), ALL_EXPERTS_FP8)
    cm = torch.compile(model, backend="moeq_aot_eager")
    with torch.no_grad(), moeq.calibrate(cm):
        for rank in range(2):
            cm(calibration_batch(rank))
    moeq.finalize(cm)
    procs = [rank_context().Process(target=run_rank, args=(r, 2, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert sorted(got) == sorted(moeq.quant_state(model))
        for fqn, s in moeq.quant_state(model).items():
            for name in STATISTICS:
                assert torch.equal(got[fqn][name], getattr(s, name)), (rank, fqn, name)


def test_the_extra_call_is_traced_into_calibration_graphs_only() -> None:
    """Dynamo's calibration graph holds each expert weight's grouped GEMM twice (every token to every expert, then
    the routed call); after finalize() the recompiled graph holds it once, as with routed calibration."""
    model = tiny_model("qwen3_moe", torch.bfloat16, num_hidden_layers=1)
    moeq.prepare(model, moeq.FP8.replace(calib="all_experts"))
    counts: list[tuple[str, int]] = []
    cm = torch.compile(model, backend=_counting_grouped_gemms(model, counts))
    ids = make_tokens(seed=3)
    with torch.no_grad():
        with moeq.calibrate(cm):
            cm(ids)
        moeq.finalize(cm)
        cm(ids)
    graphs = dict(counts)
    assert graphs["calibrate"] == 4 and graphs["quantize"] == 2, counts


def test_all_experts_refuses_what_it_cannot_route() -> None:
    """Each refusal names what is wrong and leaves nothing attached."""
    with pytest.raises(ValueError, match=r"calib='all_experts' .* weight-only config \(activation=None\) has none"):
        moeq.FP8_W8A16.replace(calib="all_experts")
    with pytest.raises(ValueError, match=r"act_scale='token' computes them from each row at run time"):
        moeq.FP8_DYNAMIC.replace(calib="all_experts")
    with pytest.raises(ValueError, match=r"calib='everything' is not valid; choose one of \['routed', 'all_experts'\]"):
        moeq.FP8.replace(calib="everything")
    llama4 = tiny_model("llama4", torch.bfloat16, num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"route their tokens otherwise: model\.layers\.0\.feed_forward\.experts "):
        moeq.prepare(llama4, ALL_EXPERTS_FP8)
    assert get_state(llama4, required=False) is None
    # a convolution's 3-D weight is no expert: Qwen3-Next's linear attention is accepted, only experts get the hook
    hybrid = moeq.prepare(tiny_model("qwen3_next", torch.float32), ALL_EXPERTS_FP8)
    hooked = {n for n, m in hybrid.named_modules() if getattr(m, "_moeq_all_experts_installed", False)}
    assert hooked == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    assert any(isinstance(m, nn.Conv1d) for m in hybrid.modules())
    # nor is a 3-D parameter outside an expert module (Kimi-Linear's forget gate has a 4-D ``A_log``)
    gated = tiny_model("qwen3_moe", torch.float32, num_hidden_layers=1)
    gated.model.layers[0].self_attn.register_parameter("A_log", nn.Parameter(torch.zeros(1, 1, 4, 1)))
    moeq.prepare(gated, ALL_EXPERTS_FP8)


class HandWrittenMoE(nn.Module):
    """Stacked expert weights on a module that is not a transformers experts module (and not named like one)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 16, 8))

    def forward(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return torch._grouped_mm(x.bfloat16(), self.w.bfloat16(), offs).float()


def test_finalize_refuses_expert_gemms_it_could_not_route() -> None:
    """An expert GEMM the pass finds on any other module saw routed tokens only: finalize() names its weight and
    changes nothing, rather than passing routed statistics off as all-experts ones."""
    model = moeq.prepare(HandWrittenMoE(), ALL_EXPERTS_FP8)
    cm = torch.compile(model, backend="moeq_aot_eager")
    with torch.no_grad(), moeq.calibrate(cm):
        cm(torch.randn(10, 16), torch.tensor([3, 5, 5, 10], dtype=torch.int32))
    with pytest.raises(
        RuntimeError, match=r"finalize\(\): QuantConfig\(calib='all_experts'\).*routed tokens alone: \['w'\]"
    ):
        moeq.finalize(cm)
    state = get_state(model)
    assert not state.finalized and state.mode == "off"

    class Experts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 16, 8, dtype=torch.bfloat16))

        def forward(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
            return torch._grouped_mm(x, self.w, offs)

    gm = fx.symbolic_trace(Experts())
    with pytest.raises(ValueError, match=r"quantize_graph: .*calib='all_experts'.* routing is fixed when it is traced"):
        moeq.quantize_graph(gm, ALL_EXPERTS_FP8)
    assert get_state(gm, required=False) is None


def test_expert_parallel_experts_module_is_refused_at_calibration() -> None:
    """transformers' expert parallelism leaves each rank its own experts: routing every token to every expert is
    not something one rank can do, so the calibrating forward raises with the reason."""
    model = moeq.prepare(tiny_model("qwen3_moe", torch.float32, num_hidden_layers=1), ALL_EXPERTS_FP8)
    _experts(model)._is_expert_parallel = True
    cm = torch.compile(model, backend="moeq_aot_eager")
    with pytest.raises(RuntimeError, match=r"calib='all_experts' on Qwen3MoeExperts under transformers' expert"):
        with torch.no_grad(), moeq.calibrate(cm):
            cm(make_tokens(seed=4))


mtq = pytest.importorskip("modelopt.torch.quantization")
from listed_experts import listed_model  # noqa: E402
from modelopt.torch.export import export_hf_checkpoint  # noqa: E402
from test_export import _differing_bytes, _load_dir, _modelopt_cfg  # noqa: E402

PARITY = [("nvfp4", "fused"), ("fp8", "fused"), ("fp8", "listed")]


@pytest.mark.parametrize(("fmt", "layout"), PARITY, ids=[f"{f}-{lay}" for f, lay in PARITY])
def test_modelopt_all_experts_calibration_byte_parity(fmt: str, layout: str, tmp_path: Path) -> None:
    """moeq with ``calib="all_experts"`` exports the same bytes as modelopt 0.47 calibrated with
    ``moe_calib_experts_ratio=1.0`` on the same model and batch (every expert tensor, input scales included) and the
    same ``hf_quant_config.json`` quantization section.

    modelopt applies the ratio to MoE blocks whose experts are a module list (transformers 5's fused experts are
    not iterable), so its side runs the module-list copy of the tiny Qwen3-MoE (same weights and logits as the
    fused one, ``listed_experts.py``); under a ratio it keeps each expert's input amax (no cross-expert sync), which
    is moeq's ``act_scale="per_expert"``. moeq runs the fused model (its experts module's hook) or the same
    module-list model (the block's hook raises ``top_k``, as modelopt does). moeq's routed calibration of the same
    model differs from both, so the comparison is not vacuous."""
    ids = make_tokens(seed=0)
    cfg = {**copy.deepcopy(_modelopt_cfg(fmt)), "algorithm": {"method": "max", "moe_calib_experts_ratio": 1.0}}
    peer = mtq.quantize(listed_model(), cfg, lambda m: m(input_ids=ids))
    export_hf_checkpoint(peer, export_dir=tmp_path / "modelopt")
    theirs = _load_dir(tmp_path / "modelopt")

    preset = (moeq.NVFP4 if fmt == "nvfp4" else moeq.FP8).replace(act_scale="per_expert")
    ours = {}
    for calib in ("all_experts", "routed"):
        torch._dynamo.reset()
        model = listed_model() if layout == "listed" else tiny_model("qwen3_moe", torch.bfloat16, num_hidden_layers=1)
        moeq.prepare(model, preset.replace(calib=calib))
        cm = torch.compile(model, backend="moeq_aot_eager")
        with torch.no_grad(), torch._dynamo.config.patch(capture_scalar_outputs=True), moeq.calibrate(cm):
            cm(ids)
        moeq.finalize(cm)
        if layout == "listed":
            assert model.model.layers[0].mlp.gate.top_k == 2  # restored after the all-experts forward
            assert {r.form for r in moeq.explain(cm).rewritten} == {"per-expert module list"}
        ours[calib] = _load_dir(moeq.export_hf(model, tmp_path / f"moeq-{calib}", "modelopt"))
    assert sorted(ours["all_experts"]) == sorted(theirs)
    assert _differing_bytes(ours["all_experts"], theirs) == {}
    quant = [
        json.loads((tmp_path / d / "hf_quant_config.json").read_text())["quantization"]
        for d in ("moeq-all_experts", "modelopt")
    ]
    assert quant[0] == quant[1]
    differ = _differing_bytes(ours["routed"], theirs)
    assert differ and all(k.endswith("input_scale") for k in differ), differ
