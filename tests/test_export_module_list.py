"""``export_hf`` of per-expert module lists against nvidia-modelopt 0.47 (tiny random-weight model, bf16, CPU).

The model is a tiny transformers Qwen3-MoE whose fused experts are replaced by a module list of per-expert MLPs
with separate ``gate_proj`` / ``up_proj`` / ``down_proj`` linears (the layout of transformers 4 and of remote-code
MoE models; its state-dict names are the checkpoint's). Its outputs equal the fused model's exactly. modelopt
quantizes each expert linear and exports; moeq calibrates the module lists under torch.compile and exports. Every
tensor must be byte-identical: gate and up of one expert share one weight scale (the max of their amaxes) and
every expert of a projection one input scale.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from listed_experts import ListedExperts, listed_model
from test_export import _differing_bytes, _load_dir, _modelopt_cfg, _tokens
from torch import nn

import moeq
from moeq.integrations.hf import tiny_model

mtq = pytest.importorskip("modelopt.torch.quantization")
from modelopt.torch.export import export_hf_checkpoint  # noqa: E402

from tests.conftest import explain_text, rank_context  # noqa: E402

PRESETS = {"nvfp4": moeq.NVFP4, "fp8": moeq.FP8}


def test_listed_model_equals_the_fused_model() -> None:
    """The test model is the fused model with another expert layout: same logits, bit for bit."""
    ids = _tokens(0)
    with torch.no_grad():
        fused = tiny_model("qwen3_moe", torch.bfloat16, seed=0, num_hidden_layers=1)(ids).logits
        listed = listed_model()(ids).logits
    torch.testing.assert_close(listed, fused, rtol=0, atol=0)


@pytest.mark.parametrize("fmt,bias", [("nvfp4", False), ("fp8", False), ("nvfp4", True)])
def test_module_list_export_is_byte_identical_to_modelopt(fmt: str, bias: bool, tmp_path: Path) -> None:
    """Same key set and bytes as modelopt's export; biases (when the experts have them) are written unquantized
    under each expert's name."""
    ids = _tokens(0)

    def forward_loop(m: nn.Module) -> None:
        with torch.no_grad():
            m(input_ids=ids)

    peer = mtq.quantize(listed_model(bias=bias), copy.deepcopy(_modelopt_cfg(fmt)), forward_loop)
    export_hf_checkpoint(peer, export_dir=tmp_path / "modelopt")

    torch._dynamo.reset()
    model = moeq.prepare(listed_model(bias=bias), PRESETS[fmt])
    compiled = torch.compile(model, backend="moeq_aot_eager")
    with torch.no_grad(), warnings.catch_warnings(), torch._dynamo.config.patch(capture_scalar_outputs=True):
        warnings.simplefilter("ignore")
        with moeq.calibrate(compiled):
            compiled(ids)
    state = moeq.finalize(compiled)
    keys = [f"model.layers.0.mlp.experts.*.{p}.weight" for p in ("down_proj", "gate_proj", "up_proj")]
    assert sorted(state.fqns()) == keys
    report = moeq.explain(compiled)
    assert {r.form for r in report.rewritten} == {"per-expert module list"}
    assert not [s for s in report.skipped if s.category == "expert"]
    assert "module lists: not fused: each expert's GEMM stays the model's own" in explain_text(compiled)
    gate, up = (state[k].weight_amax for k in keys[1:])
    assert not torch.equal(gate, up), "gate and up should have different amaxes for this test to mean something"

    moeq.export_hf(model, tmp_path / "moeq", "modelopt")
    got, want = _load_dir(tmp_path / "moeq"), _load_dir(tmp_path / "modelopt")
    assert sorted(got) == sorted(want)
    assert any(".experts.7.up_proj.weight_scale" in k for k in got)
    assert any(".experts.7.down_proj.bias" in k for k in got) == bias
    assert _differing_bytes(got, want) == {}


class WhereExperts(ListedExperts):
    """The same experts called the way transformers 4's eager Mixtral / Qwen-MoE loop did: each expert gathers its
    rows with a data-dependent ``torch.where`` on the routing mask."""

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden)
        mask = nn.functional.one_hot(top_k_index, num_classes=len(self)).permute(2, 1, 0)
        for e, expert in enumerate(self):
            slot, token = torch.where(mask[e])
            out = expert(hidden[token]) * top_k_weights[token, slot, None]
            final.index_add_(0, token, out.to(hidden.dtype))
        return final


def _calibrate(model: nn.Module, ids: torch.Tensor, **dynamo_flags: bool):
    torch._dynamo.reset()
    compiled = torch.compile(moeq.prepare(model, moeq.NVFP4), backend="moeq_aot_eager")
    with torch.no_grad(), warnings.catch_warnings(), torch._dynamo.config.patch(**dynamo_flags):
        warnings.simplefilter("ignore")
        with moeq.calibrate(compiled):
            compiled(ids)
        state = moeq.finalize(compiled)
        return state, compiled(ids).logits


def test_eager_where_loop_over_module_list_is_quantized_like_the_split():
    """With ``capture_dynamic_output_shape_ops`` the ``torch.where`` loop is one graph: every expert GEMM is
    quantized with the same per-expert statistics, and the same logits bit for bit, as the sorted-split model."""
    ids = _tokens(0)
    flags = dict(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True)
    where_model = listed_model()
    for layer in where_model.model.layers:
        layer.mlp.experts.__class__ = WhereExperts
    got_state, got = _calibrate(where_model, ids, **flags)
    want_state, want = _calibrate(listed_model(), ids, **flags)
    assert sorted(got_state.fqns()) == sorted(want_state.fqns())
    for key in want_state.fqns():
        for name in ("weight_amax", "input_amax", "tokens_per_expert"):
            assert torch.equal(getattr(got_state[key], name), getattr(want_state[key], name)), (key, name)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_eager_where_loop_split_by_graph_breaks_is_reported_with_the_fix():
    """Without the flag Dynamo breaks the graph at each ``torch.where``: each graph holds one expert, which moeq
    does not quantize alone; ``finalize`` says so and names the Dynamo flags that keep the loop in one graph."""
    where_model = listed_model()
    for layer in where_model.model.layers:
        layer.mlp.experts.__class__ = WhereExperts
    with pytest.raises(RuntimeError, match=r"expert GEMMs, none of which.*capture_dynamic_output_shape_ops = True"):
        _calibrate(where_model, _tokens(0), capture_dynamic_output_shape_ops=False)


def test_module_list_ep2_gloo_export_matches_single_process(tmp_path: Path) -> None:
    """Two gloo ranks, each holding 4 of the 8 experts of every module list (renumbered from 0) and the slice of the
    single-process finalized state, write the single-process export's tensors under global expert ids."""
    from ep_export_worker import _PER_EXPERT, run_listed_rank

    torch._dynamo.reset()
    model = moeq.prepare(listed_model(), moeq.NVFP4)
    compiled = torch.compile(model, backend="moeq_aot_eager")
    with torch.no_grad(), warnings.catch_warnings(), torch._dynamo.config.patch(capture_scalar_outputs=True):
        warnings.simplefilter("ignore")
        with moeq.calibrate(compiled):
            compiled(_tokens(0))
    state = moeq.finalize(compiled)
    single = moeq.export_hf(model, tmp_path / "single", "modelopt")
    saved = {}
    for key, s in state.items():
        entry = {b: getattr(s, b).clone() for b in _PER_EXPERT}
        entry.update(input_amax=s.input_amax.clone(), expert_dim=s.expert_dim, contraction_dim=s.contraction_dim)
        saved[key] = entry
    torch.save(saved, tmp_path / "state.pt")
    ctx = rank_context()
    args = (str(tmp_path), "nvfp4", str(tmp_path / "state.pt"), str(tmp_path / "ep"))
    procs = [ctx.Process(target=run_listed_rank, args=(r, 2, *args)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0]
    ours, want = _load_dir(tmp_path / "ep"), _load_dir(single)
    assert sorted(ours) == sorted(want)
    assert _differing_bytes(ours, want) == {}
