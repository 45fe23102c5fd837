"""The moeq torch.compile backend: registration, mode guards, no graph breaks, clear errors."""

from __future__ import annotations

import importlib.metadata
from typing import Any

import pytest
import torch

import moeq
from moeq.integrations.hf import tiny_model
from tests.conftest import (
    FULL_INDUCTOR,
    inductor_settings_source,
    inductor_test_config,
    make_tokens,
    plain_and_checkpointed_qat_steps,
)


def test_backend_registered_by_name_and_entry_point():
    """ "moeq" is a Dynamo backend and the package declares it under torch_dynamo_backends."""
    assert "moeq" in torch._dynamo.list_backends()
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")}
    assert eps.get("moeq") == "moeq.lowering.backend:moeq_backend"
    assert importlib.metadata.entry_points(group="torch_dynamo_backends", name="moeq")[0].load() is moeq.moeq_backend


def test_unprepared_model_is_a_clear_error():
    """Compiling a model with expert GEMMs without prepare() names the problem and the fix."""
    model = tiny_model("qwen3_moe", torch.float32, num_hidden_layers=1)
    model.set_experts_implementation("grouped_mm")
    with pytest.raises(Exception, match=r"moeq.prepare\(model, cfg\)"):
        torch.compile(model, backend="moeq_aot_eager")(make_tokens())


def test_mode_changes_recompile_without_resetting_state():
    """Each mode is its own compiled graph; statistics survive every recompile."""
    compiles = []
    model = moeq.prepare(tiny_model("qwen3_moe", torch.float32, num_hidden_layers=1), moeq.FP8)
    from moeq.lowering.backend import moeq_aot_eager_backend

    def counting_backend(gm, example_inputs):
        compiles.append(len(compiles))
        return moeq_aot_eager_backend(gm, example_inputs)

    cm = torch.compile(model, backend=counting_backend)
    tokens = make_tokens()
    with torch.no_grad():
        cm(tokens)
        cm(tokens)
        assert len(compiles) == 1
        with moeq.calibrate(cm):
            cm(tokens)
            cm(tokens)
        assert len(compiles) == 2
        counts = {k: s.tokens_per_expert.clone() for k, s in moeq.quant_state(model).items()}
        assert all(c.sum() == 2 * tokens.numel() * 2 for c in counts.values())
        moeq.finalize(cm)
        cm(tokens)
        assert len(compiles) == 3
        for fqn, state in moeq.quant_state(model).items():
            assert torch.equal(state.tokens_per_expert, counts[fqn])
            assert state.input_amax.item() > 0


def test_no_graph_breaks_introduced():
    """torch._dynamo.explain: the prepared model breaks exactly where the original does."""
    tokens = make_tokens()
    plain = tiny_model("qwen3_moe", torch.float32, num_hidden_layers=1)
    plain.set_experts_implementation("grouped_mm")
    before = torch._dynamo.explain(plain)(tokens)
    prepared = moeq.prepare(tiny_model("qwen3_moe", torch.float32, num_hidden_layers=1), moeq.NVFP4)
    with moeq.calibrate(prepared):
        after = torch._dynamo.explain(prepared)(tokens)
    assert after.graph_break_count == before.graph_break_count
    assert after.graph_count == before.graph_count


def test_qat_gradients_flow_through_ste():
    """Training through the compiled fake-quant graph: expert weights get finite, non-zero gradients."""
    model = moeq.prepare(tiny_model("qwen3_moe", torch.float32, num_hidden_layers=1), moeq.NVFP4)
    cm = torch.compile(model, backend="moeq_aot_eager")
    tokens = make_tokens()
    with torch.no_grad(), moeq.calibrate(cm):
        cm(tokens)
    moeq.finalize(cm)
    model.train()
    loss = cm(tokens, labels=tokens).loss
    loss.backward()
    grad = model.model.layers[0].mlp.experts.gate_up_proj.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("calib", ["routed", "all_experts"])
def test_regional_compile_reuses_one_graph_with_each_layers_state(calib):
    """Compiling each experts module in place makes Dynamo reuse one compiled frame for every layer; the
    state buffers are bound per call from the weight passed, so every layer keeps its own statistics,
    equal to those of a whole-model compile (checked against independent hooks in test_calibration). With
    ``calib="all_experts"`` the experts module's pre-hook runs inside its compiled frame, with the same result."""
    tokens = make_tokens(seed=3, batch=2, seq=12)
    config = moeq.FP8.replace(calib=calib)
    whole = moeq.prepare(tiny_model("qwen3_moe", torch.float32, seed=4), config)
    regional = moeq.prepare(tiny_model("qwen3_moe", torch.float32, seed=4), config)
    for module in regional.modules():
        if type(module).__name__ == "Qwen3MoeExperts":
            module.compile(backend="moeq_aot_eager")
    compiled = torch.compile(whole, backend="moeq_aot_eager")
    with torch.no_grad():
        for model in (compiled, regional):
            with moeq.calibrate(model):
                model(tokens)
            moeq.finalize(model)
        want, got = moeq.quant_state(whole), moeq.quant_state(regional)
        assert sorted(got) == sorted(want) and len(want) == 4
        assert moeq.runtime.calibrate.get_state(regional).reused_graphs  # the frame was indeed reused
        for fqn in want:
            for name in ("observed_input_amax", "tokens_per_expert", "input_amax", "weight_amax"):
                assert torch.equal(getattr(got[fqn], name), getattr(want[fqn], name)), (fqn, name)
        if calib == "all_experts":  # every token reached every expert, plus the routed ones
            assert all(int(s.tokens_per_expert.min()) > tokens.numel() for s in got.values())
        layer0, layer1 = (got[f"model.layers.{i}.mlp.experts.down_proj"].observed_input_amax for i in (0, 1))
        assert not torch.equal(layer0, layer1)
        assert torch.equal(regional(tokens).logits, compiled(tokens).logits)
    assert len(moeq.explain(regional).rows()) == 4


_WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # as on a machine without triton: every import of it fails
import torch, moeq
{inductor_settings}  # what conftest's _inductor_aten_fallback gives in-process
from moeq.integrations.hf import tiny_model
model = moeq.prepare(tiny_model("qwen3_moe", torch.float32, num_hidden_layers=1), moeq.FP8)
cm = torch.compile(model, backend="moeq")
tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
with torch.no_grad(), moeq.calibrate(cm):
    cm(tokens)
moeq.finalize(cm)
with torch.no_grad():
    logits = cm(tokens).logits
assert logits.isfinite().all()
print(moeq.explain(cm))
"""


def test_cpu_path_needs_no_triton():
    """moeq imports, compiles with backend="moeq", calibrates, finalizes and runs a quantized CPU forward where
    triton is not installed (the moeq ops' plain-torch reference path), and explain() says so."""
    import subprocess
    import sys

    script = _WITHOUT_TRITON.format(inductor_settings=inductor_settings_source())
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the moeq ops' plain-torch reference (triton is not installed)" in done.stdout
    assert "Triton not available" not in done.stderr  # torch's per-op warning is not passed on to the user


def _calibrated(cfg, tokens):
    model = moeq.prepare(tiny_model("qwen3_moe", torch.float32, seed=5, num_hidden_layers=1), cfg)
    compiled = torch.compile(model, backend="moeq_aot_eager")
    with torch.no_grad():
        with moeq.calibrate(compiled):
            compiled(tokens)
        moeq.finalize(compiled)
    return model, compiled


def _amaxes(model) -> dict[str, torch.Tensor]:
    return {f"{fqn}.{name}": getattr(s, name).clone() for fqn, s in moeq.state.get_state(model).items()
            for name in ("weight_amax", "weight_block_amax", "input_amax")}  # fmt: skip


def test_second_model_gets_its_own_graph_and_state():
    """A second prepared model of the same classes in one process: under another config Dynamo recompiles
    (the graph's formats are constants); under the same config it may reuse the graph but each model keeps
    its own statistics. Both equal what each model gets compiled alone (after ``torch._dynamo.reset()``)."""
    first, second = make_tokens(seed=1), make_tokens(seed=2)
    alone = {}
    for name, tokens in (("FP8", first), ("NVFP4", second), ("FP8", second)):
        torch._dynamo.reset()
        model, compiled = _calibrated(getattr(moeq, name), tokens)
        with torch.no_grad():
            alone[name, tokens.sum().item()] = (_amaxes(model), compiled(tokens).logits)
    torch._dynamo.reset()
    fp8_a, fp8_a_compiled = _calibrated(moeq.FP8, first)
    before = _amaxes(fp8_a)
    for name, tokens in (("NVFP4", second), ("FP8", second)):
        model, compiled = _calibrated(getattr(moeq, name), tokens)
        amaxes, logits = alone[name, tokens.sum().item()]
        got = _amaxes(model)
        assert got.keys() == amaxes.keys() and all(torch.equal(got[k], amaxes[k]) for k in got), name
        with torch.no_grad():
            assert torch.equal(compiled(tokens).logits, logits), name
    after = _amaxes(fp8_a)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_lowering_switches_are_guarded(monkeypatch):
    """A second instance of the same classes, calibrated alike, is served the first's compiled graph (Dynamo reuses
    a frame's graph for any instance whose guards pass). Under another fusion policy, or with gather_quant off, it
    gets a graph of its own: the pre-hook reads the lowering switches, so Dynamo guards on them. Before, session
    40's end-to-end A/B (one layer per switch setting) timed the first layer's graph twice."""
    from moeq.lowering import gather_quant
    from moeq.lowering.backend import moeq_aot_eager_backend
    from moeq.lowering.inductor import fusion

    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(len(compiles))
        return moeq_aot_eager_backend(gm, example_inputs)

    tokens = make_tokens(seed=3)
    compiled = []
    for _ in range(2):
        model = moeq.prepare(tiny_model("qwen3_moe", torch.float32, seed=5, num_hidden_layers=1), moeq.NVFP4)
        compiled.append(torch.compile(model, backend=counting_backend))
        with torch.no_grad():
            with moeq.calibrate(compiled[-1]):
                compiled[-1](tokens)
            moeq.finalize(compiled[-1])
    first, second = compiled
    with torch.no_grad():
        first(tokens)
        before = len(compiles)
        second(tokens)
        assert len(compiles) == before, "the second instance was expected to reuse the first's graph"
        with fusion("never"):
            second(tokens)
        assert len(compiles) == before + 1
        monkeypatch.setattr(gather_quant, "ENABLED", False)
        second(tokens)
        assert len(compiles) == before + 2
        monkeypatch.setattr(gather_quant, "ENABLED", True)
        second(tokens)
        assert len(compiles) == before + 2  # back to the first graph's switches: its graph again


def test_lowering_switches_are_checked():
    from moeq.lowering import inductor

    with pytest.raises(ValueError, match="invalid moeq lowering switches: policy 'sometimes'"):
        inductor._POLICY = "sometimes"
        try:
            inductor.check_compile_switches()
        finally:
            inductor._POLICY = "auto"


def test_eager_run_of_a_prepared_model_warns_once_per_mode(caplog):
    """A prepared model run outside a moeq-compiled graph (e.g. Dynamo fell back to eager) says so, once per
    mode; compiled runs do not warn."""
    model, compiled = _calibrated(moeq.FP8, make_tokens(seed=1))
    tokens = make_tokens(seed=2)
    with caplog.at_level("WARNING", logger="moeq"), torch.no_grad():
        compiled(tokens)
        assert "ran eagerly" not in caplog.text
        model(tokens)
        model(tokens)
    warnings = [r.getMessage() for r in caplog.records if "ran eagerly" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "Qwen3MoeExperts ran eagerly in mode 'quantize': its expert GEMMs run unquantized" in warnings[0]


def test_graph_of_another_backend_warns_once_per_mode(caplog, monkeypatch):
    """A finalized model compiled with another backend (here aot_eager) runs its expert GEMMs unquantized: it says
    so once, naming the module, the mode and what to do; the moeq backends' graphs carry no trace of the marker
    that warns (Inductor's code on the CPU calls no moeq.expert_module_entry). The marker takes no tensor, so the
    other backend's graph computes what the eager model computes."""
    from torch._inductor.utils import run_and_get_code

    from moeq.lowering import ops

    monkeypatch.setattr(ops, "_WARNED_OUTSIDE", set())
    model, compiled = _calibrated(moeq.FP8, make_tokens(seed=1))
    tokens = make_tokens(seed=2)
    with caplog.at_level("WARNING", logger="moeq"), torch.no_grad():
        torch._dynamo.reset()
        _, code = run_and_get_code(torch.compile(model, backend="moeq"), tokens)
        assert "expert_module_entry" not in "\n".join(code)
        assert "backend other than" not in caplog.text
        torch._dynamo.reset()
        other = torch.compile(model, backend="aot_eager")
        out = other(tokens).logits
        other(tokens)
        eager = model(tokens).logits
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    warnings = [r.getMessage() for r in caplog.records if "backend other than" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert (
        "Qwen3MoeExperts ran in mode 'quantize' inside a graph compiled by a backend other than 'moeq': its expert "
        "GEMMs run unquantized. Compile the prepared model with torch.compile(model, backend='moeq')"
    ) in warnings[0]


class Checkpointed(torch.nn.Module):
    """Runs ``inner`` under torch.utils.checkpoint (non-reentrant), as training code wraps blocks to save memory;
    ``context_fn`` makes it selective activation checkpointing."""

    def __init__(self, inner: torch.nn.Module, context_fn: Any = None) -> None:
        super().__init__()
        self.inner = inner
        self.context_fn = context_fn

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        import torch.utils.checkpoint as checkpoint

        extra = {} if self.context_fn is None else {"context_fn": self.context_fn}
        return checkpoint.checkpoint(self.inner, hidden, use_reentrant=False, **extra)


def test_checkpointed_expert_modules_are_rewritten_and_recomputed():
    """Hugging Face's gradient checkpointing inside the compiled region (each decoder layer a Dynamo
    tag_activation_checkpoint subgraph; Dynamo needs skip_fwd_side_effects_in_bwd_under_checkpoint for the output
    recorder transformers mutates there) has its expert GEMMs rewritten like any other: moeq inlines the region with
    AOTAutograd's recompute tags, and its quantizer nodes join the region. The QAT step's loss and every gradient
    equal the same model's without checkpointing, and the forward saves less for backward: 0.52x measured (the
    region is recomputed; 0.83x when moeq's own nodes are left out of the region)."""
    (plain_loss, plain_grads, plain_saved, plain_report), (loss, grads, saved, report) = (
        plain_and_checkpointed_qat_steps()
    )
    assert "2 expert GEMMs rewritten" in str(report)
    assert report.recomputed == [f"model.layers.0.mlp.experts.{p}" for p in ("down_proj", "gate_up_proj")]
    assert "Inside activation-checkpointed regions" in str(report)
    assert not plain_report.recomputed and "checkpointed" not in str(plain_report)
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, plain_grads[name]), name
    assert saved < 0.75 * plain_saved, (saved, plain_saved)


def test_gradient_checkpointing_fallback_warning_names_the_dynamo_switch(caplog):
    """Without skip_fwd_side_effects_in_bwd_under_checkpoint, Dynamo falls back to eager for Hugging Face's
    checkpointed layers (transformers mutates an output recorder inside them): the experts run unquantized, and the
    warning names the switch that lets Dynamo trace them."""
    model = moeq.prepare(tiny_model("qwen3_moe", torch.float32, seed=5, num_hidden_layers=1), moeq.FP8)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    compiled = torch.compile(model, backend="moeq_aot_eager")
    with caplog.at_level("WARNING", logger="moeq"), moeq.calibrate(compiled):
        compiled(make_tokens(seed=1), use_cache=False)
    assert "Qwen3MoeExperts ran eagerly in mode 'calibrate': its expert GEMMs are not observed" in caplog.text
    assert (
        "torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True and use_cache=False" in caplog.text
    )


def test_expert_module_under_selective_checkpointing_warns(caplog):
    """Selective activation checkpointing (a context_fn: its policy picks per op at trace time) stays a subgraph
    that moeq does not rewrite: compiling says so, naming the module and the subgraph, instead of leaving a silent
    gap (explain then lists no expert GEMM)."""
    import functools

    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    policy = functools.partial(create_selective_checkpoint_contexts, lambda *_, **__: CheckpointPolicy.PREFER_RECOMPUTE)
    model = tiny_model("qwen3_moe", torch.float32, seed=5, num_hidden_layers=1)
    model.model.layers[0].mlp = Checkpointed(model.model.layers[0].mlp, context_fn=policy)
    model = moeq.prepare(model, moeq.FP8)
    compiled = torch.compile(model, backend="moeq_aot_eager")
    with caplog.at_level("WARNING", logger="moeq"), moeq.calibrate(compiled):
        compiled(make_tokens(seed=1))
    assert (
        "Qwen3MoeExperts runs inside the subgraph 'wrap_body_0' (selective activation checkpointing with a context_fn"
    ) in caplog.text
    assert "so its expert GEMMs are not quantized there" in caplog.text
    assert "0 expert GEMMs rewritten" in str(moeq.explain(compiled))


def test_marker_reaches_compiled_graphs_where_is_exporting_folds_to_true(monkeypatch):
    """Dynamo in torch 2.11 folds torch.compiler.is_exporting() to True in every graph it traces, torch.compile's too;
    moeq's pre-hook reads the export flag instead, so the marker still reaches a compiled graph (under 2.11 it did
    not: checkpointed experts then ran unquantized with no warning). Emulated here by an is_exporting that returns
    is_compiling(): False when torch itself asks, True in every frame Dynamo traces, as 2.11's fold."""
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: torch.compiler.is_compiling())
    targets: list[str] = []

    def recording_backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    model = moeq.prepare(tiny_model("qwen3_moe", torch.float32, seed=5, num_hidden_layers=1), moeq.FP8)
    with torch.no_grad(), moeq.calibrate(model):
        torch.compile(model, backend=recording_backend)(make_tokens(seed=1))
    assert "moeq.expert_module_entry" in targets, sorted(set(targets))


def test_torch_export_carries_no_marker():
    """torch.export of a prepared model outside mode "off" gets no moeq::expert_module_entry: an exported program is
    a deployable artifact, and quantize_graph needs no marker to rewrite it."""
    model = moeq.prepare(tiny_model("qwen3_moe", torch.float32, seed=5, num_hidden_layers=1), moeq.FP8)
    with moeq.calibrate(model):
        program = torch.export.export(model, (make_tokens(seed=1),), kwargs={"use_cache": False})
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.mm.default" in targets or "aten.linear.default" in targets, sorted(targets)
    assert not [t for t in targets if "expert_module_entry" in t], sorted(targets)


@pytest.mark.full_inductor
@pytest.mark.parametrize("freeze", [False, True], ids=["qat", "deploy"])
def test_new_batch_sizes_after_finalize_recompile_dynamic(freeze):
    """Calibrated at one batch size, the model then runs at others: Dynamo recompiles with a dynamic token count.
    The lifted quantization state (and the frozen weights) get static example shapes, so no guard lands on a
    size symbol without a source (which failed Dynamo's guard building for Qwen3-30B-A3B shapes, where the
    frozen gate_up weight's split was guarded). Each size runs and matches the reference path's output."""
    overrides = dict(hidden_size=96, moe_intermediate_size=40, num_experts=12, num_experts_per_tok=4)
    model = moeq.prepare(tiny_model("qwen3_moe", torch.float32, num_hidden_layers=1, **overrides), moeq.FP8)
    model.set_experts_implementation("grouped_mm")
    cm = torch.compile(model, backend="moeq")
    with torch.no_grad():
        # the calibration graph's Inductor C++ is another test's (test_models.py::test_inductor_backend_end_to_end):
        # the ATen fallback compiles it here as in the other CPU tests; the recompiles after finalize compile fully
        with torch._inductor.config.patch(inductor_test_config(FULL_INDUCTOR)), moeq.calibrate(cm):
            cm(make_tokens(0, batch=4, seq=32))
        moeq.finalize(cm)
        if freeze:
            moeq.freeze(cm)
        reference = torch.compile(model, backend="moeq_aot_eager")
        for seq in (3, 9, 17):
            tokens = make_tokens(seq, batch=1, seq=seq)
            got = cm(tokens).logits
            torch.testing.assert_close(got, reference(tokens).logits, rtol=1e-4, atol=1e-4)
