"""explain(): the table, the graph views and the `moeq inspect` command."""

from __future__ import annotations

import subprocess
import sys

import networkx as nx
import pytest
import torch

import moeq
from moeq.integrations.hf import tiny_model
from tests.conftest import explain_text, make_tokens


def _finalized_qwen(config=moeq.NVFP4):
    model = moeq.prepare(tiny_model("qwen3_moe", torch.float32), config)
    cm = torch.compile(model, backend="moeq_aot_eager")
    with torch.no_grad(), moeq.calibrate(cm):
        cm(make_tokens(batch=1, seq=3))
    moeq.finalize(cm)
    return model, cm


def test_table_reports_coverage_amax_and_skips():
    """The table has one row per expert GEMM with coverage and amax; flagged experts and skips follow."""
    model, cm = _finalized_qwen()
    report = moeq.explain(cm)
    text = str(report)
    rows = report.rows()
    assert len(rows) == 4
    for row in rows:
        state = moeq.quant_state(model)[row["fqn"]]
        assert row["covered"] == int((state.tokens_per_expert > 0).sum())
        assert f"{row['covered']}/8" in text
        assert row["weight_amax"] == state.weight_amax.tolist()
    assert "Flagged experts:" in text and "no calibration tokens" in text
    assert "Not rewritten:" in text and "mlp.gate.weight" in text and "self_attn.q_proj.weight" in text


def test_deploy_reports_stored_bytes():
    """After freeze() the header says deploy and gives the stored bytes: per NVFP4 expert weight [E, N, K],
    whole 64-byte runs of packed pairs per row, one e4m3 scale per 16-block, one fp32 global scale per expert."""
    model, cm = _finalized_qwen()
    moeq.freeze(cm)
    report = moeq.explain(cm)
    expected = 0
    for row in report.rows():
        s = moeq.quant_state(model)[row["fqn"]]
        shape = list(s.weight_shape)
        k = shape[s.contraction_dim]
        e, n = shape[0], shape[1] * shape[2] // k
        want = e * n * (-(-k // 128) * 64 + k // 16) + 4 * e
        assert row["stored_bytes"] == want, row["fqn"]
        expected += want
    assert f"deploy: expert weights stored quantized, {expected / 2**20:.2f} MiB" in str(report)


def test_graph_views(tmp_path):
    """to_networkx / to_dot / to_svg describe parameter -> quantizer -> GEMM <- quantizer for each GEMM."""
    _, cm = _finalized_qwen(moeq.FP8)
    report = moeq.explain(cm)
    g = report.to_networkx()
    assert nx.is_directed_acyclic_graph(g)
    gemms = [n for n, d in g.nodes(data=True) if d["kind"] == "gemm"]
    assert len(gemms) == 4
    for gemm in gemms:
        kinds = {g.nodes[p]["kind"] for p in nx.ancestors(g, gemm)}
        assert {"parameter", "quantizer", "input"} <= kinds
    dot = report.to_dot()
    assert dot.startswith("digraph moeq") and dot.count("->") == g.number_of_edges()
    svg_path = tmp_path / "graph.svg"
    svg = report.to_svg(svg_path)
    assert svg_path.read_text() == svg and "<svg" in svg and "gate_up_proj" in svg


def test_inspect_command_prints_the_table():
    """`python -m moeq inspect` prints the explain() table for the built-in tiny model (here calibrated with every
    token through every expert)."""
    out = subprocess.run(
        [sys.executable, "-m", "moeq", "inspect", "--config", "FP8", "--calib", "all_experts"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert "4 expert GEMMs rewritten" in out
    assert "calib=all_experts" in out
    assert "model.layers.1.mlp.experts.down_proj" in out


def test_demo_command_passes_its_options_to_the_quickstart(monkeypatch):
    """`moeq demo --family mixtral --calib all_experts ...` reaches the quickstart with those options (a leading
    option used to be dropped by argparse's REMAINDER: "unrecognized arguments")."""
    import moeq.demo
    from moeq.__main__ import main

    calls = []
    monkeypatch.setattr(moeq.demo, "run_quickstart", lambda *args, **kwargs: calls.append((args, kwargs)))
    main(["demo", "--family", "mixtral", "--config", "FP8", "--calib", "all_experts", "--batches", "1"])
    (((family, config, backend, batches), kwargs),) = calls
    assert (family, config, backend, batches) == ("mixtral", moeq.FP8.replace(calib="all_experts"), "moeq", 1)
    assert kwargs == {"device": "cpu", "dtype": None}


def test_demo_runs_per_expert_loop_families_in_bf16():
    """The demo's default dtype: float32 on the CPU, except for families whose experts are per-expert loops (moeq
    rewrites those into torch._grouped_mm, which takes bf16 only, so `moeq demo --family jetmoe` would otherwise end
    in finalize's refusal); bf16 on CUDA. The listed families really have no grouped_mm experts implementation."""
    from moeq.demo import default_dtype
    from moeq.integrations.hf import TINY_FAMILIES_BF16_ONLY, use_grouped_experts

    assert default_dtype("qwen3_moe", "cpu") == torch.float32
    assert default_dtype("qwen3_moe", "cuda") == torch.bfloat16
    for family in TINY_FAMILIES_BF16_ONLY:
        assert default_dtype(family, "cpu") == torch.bfloat16
        assert not use_grouped_experts(tiny_model(family, torch.bfloat16, num_hidden_layers=1)), family


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_demo_command_refuses_cuda_without_a_device(capsys):
    """`moeq demo --device cuda` on a CPU-only torch ends in the usage error naming the option, not a traceback."""
    from moeq.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "moeq demo: error: --device cuda: this torch build sees no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--calib", "all_experts", "--export"], "needs torch.compile, not --export"),
        (["--config", "NVFP4_W4A16", "--calib", "all_experts"], "weight-only config"),
    ],
)
def test_inspect_command_refuses_calib_it_cannot_run(argv, message, capsys):
    """Impossible --calib combinations end in argparse's usage error with the reason, not a traceback."""
    from moeq.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_report_says_how_the_backend_lowers_the_gemms():
    """After finalize() the report says what backend="moeq" runs on CUDA for these formats under the fusion
    policy: QAT NVFP4 fused up to 16 rows per expert, then an activation pass and the Gluon kernel on sm_90, else
    the unfused path's kernels (unfused with the Gluon kernel off), QAT FP8 with its codes passes at large
    sizes, deploy W4A4 fused at every size, deploy W4A16 fused up to 384 rows per expert then dequantized first;
    "always" / "never" say so. Nothing is claimed before finalize()."""
    from moeq.lowering.inductor import fusion

    model = moeq.prepare(tiny_model("qwen3_moe", torch.float32), moeq.NVFP4)
    before = explain_text(model)
    assert "Lowering by" not in before
    assert "Nothing rewritten yet: run the model compiled with torch.compile(model, backend='moeq') once" in before
    _, cm = _finalized_qwen(moeq.NVFP4)
    lines = str(moeq.explain(cm)).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Lowering by"))
    section = lines[start : lines.index("", start)]
    labels = [line.split(":")[0].strip() for line in section[1:] if line.startswith("  ") and line[2] != " "]
    assert labels == ["forward", "activations", "training", "combine"], section
    assert all(len(line) <= 116 for line in section[1:]), section  # wrapped to the width of the tables
    text = explain_text(cm)
    assert "Lowering by backend='moeq' (Inductor), fusion 'auto', on CUDA" in text
    assert "forward: one moeq::grouped_qmm Triton kernel per expert GEMM up to 16 mean routed rows" in text
    assert "above, an activation fake-quant pass and, up to 320 on sm_90, the warp-specialized Gluon kernel" in text
    assert "a zero's sign aside" in text
    assert "else moeq's fake-quant kernels + torch._grouped_mm" in text
    moved = "runs per token before the routing gather: the same bits on top_k times fewer rows"
    assert "above 16 rows per expert or with a dynamic batch size, the NVFP4 fake quant of an input gathered" in text
    assert moved in text
    from moeq.runtime.kernels import grouped_qmm as grouped_qmm_kernels

    with pytest.MonkeyPatch.context() as patch:  # the Gluon kernel switched off: the unfused path above 16
        patch.setattr(grouped_qmm_kernels, "GLUON_QAT_NVFP4", False)
        assert "above, moeq's fake-quant kernels + torch._grouped_mm" in explain_text(cm)
    assert "a training graph saves the quantized weight for backward and keeps the Q/DQ ops; each weight's STE" in text
    with fusion("always"):
        always = explain_text(cm)
        assert "fusion 'always'" in always
        assert "forward: one moeq::grouped_qmm Triton kernel per expert GEMM at every size" in always
        assert moved not in explain_text(cm)
    assert "runs as moeq::combine_experts from top-8 and 32768 routed rows up (below, Inductor's kernel" in text
    with fusion("never"):
        never = explain_text(cm)
        assert "fusion 'never'" in never and "forward: moeq's fake-quant kernels + torch._grouped_mm" in never
        assert "combine: the MoE combine after the down projection is Inductor's" in never
    moeq.freeze(cm)
    assert "forward: one moeq::grouped_qmm Triton kernel per expert GEMM at every size" in explain_text(cm)
    torch._dynamo.reset()  # a second model: compile afresh
    _, cm8 = _finalized_qwen(moeq.FP8)
    text = explain_text(cm8)
    assert "up to 48, an activation codes pass and the GEMM (weight as loaded)" in text
    assert "up to 320 on sm_90, an activation codes pass and the warp-specialized Gluon kernel" in text
    assert "else an activation codes pass, a weight codes pass and the FP8 codes GEMM" in text
    assert moved not in text

    with pytest.MonkeyPatch.context() as patch:  # the Gluon kernel switched off: the two launches above 48
        patch.setattr(grouped_qmm_kernels, "GLUON_QAT_FP8", False)
        assert "above, an activation codes pass, a weight codes pass and the FP8 codes GEMM" in explain_text(cm8)
    with pytest.MonkeyPatch.context() as patch:  # the opt-in one-launch weight pass (BENCHMARKS.md, session 30)
        patch.setattr(grouped_qmm_kernels, "WEIGHT_PASS_IN_GEMM", True)
        in_gemm = explain_text(cm8)
    assert "above, an activation codes pass and one launch writing the weight's codes and multiplying them" in in_gemm
    assert "a training graph quantizes each expert weight to FP8 codes once per step and saves them" in text
    assert "STE mask is applied inside its wgrad GEMM (moeq::grouped_wgrad_ste)" in text
    assert "scatter-adds through the MoE's sort permutation run as gathers" in text
    assert "the combine's two gradients as one moeq::combine_experts_backward" in text
    with fusion("never"):
        never = explain_text(cm8)
        assert "a training graph saves the quantized weight for backward and keeps the Q/DQ ops" in never
        assert "grouped_wgrad_ste" not in never and "sort permutation" not in never
    moeq.freeze(cm8)  # deploy W8A8: no weight pass at any size
    text = explain_text(cm8)
    assert "up to 16 mean routed rows per expert; above, an activation codes pass and the FP8 codes GEMM" in text
    torch._dynamo.reset()
    _, cm4 = _finalized_qwen(moeq.NVFP4_W4A16)
    moeq.freeze(cm4)
    text = explain_text(cm4)
    assert "up to 384 mean routed rows per expert; above, moeq::dequant_weight's kernel + torch._grouped_mm" in text


class _PrefillDecodeExperts(torch.nn.Module):
    """One grouped GEMM for a batch of rows; for a single row, ``x @ w[0]`` alone (a per-expert slice, which the
    pass leaves as it is). Dynamo compiles the two branches as two graphs."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 16, 8, dtype=torch.bfloat16) * 0.1)

    def forward(self, x):
        if x.shape[0] > 1:
            offs = torch.tensor([2, 4, 6, x.shape[0]], dtype=torch.int32)
            return torch._grouped_mm(x, self.w.transpose(1, 2), offs=offs)
        return torch.nn.functional.linear(x, self.w[0])


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = _PrefillDecodeExperts()

    def forward(self, x):
        return self.experts(x)


def test_weight_rewritten_in_one_graph_and_not_in_another_is_called_out():
    """A weight whose GEMM one compiled graph rewrote and another left alone is not reported as plainly
    quantized: explain() names it (and how many GEMMs on it were not rewritten) above the reasons."""
    model = moeq.prepare(_Block(), moeq.FP8)
    cm = torch.compile(model, backend="moeq_aot_eager")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), moeq.calibrate(cm):
        cm(torch.randn(8, 8, generator=g).bfloat16())
        cm(torch.randn(1, 8, generator=g).bfloat16())
    report = moeq.explain(cm)
    text = str(report)
    assert [r.fqn for r in report.rewritten] == ["experts.w"]
    assert report.partly_rewritten == {"experts.w": 1}
    assert "Rewritten in some compiled graphs only (where not, these GEMMs run unquantized):" in text
    assert "  experts.w: 1 GEMM(s) not rewritten" in text
    assert text.index("Rewritten in some compiled graphs only") < text.index("Not rewritten:")


def test_weight_only_rows_show_no_input_amax():
    """A weight-only config quantizes no activation: its rows' "input amax" cell says so instead of a range."""
    _, cm = _finalized_qwen(moeq.NVFP4_W4A16)
    rows = [line for line in str(moeq.explain(cm)).splitlines() if line.startswith("model.layers.")]
    assert len(rows) == 4 and all("- (W only)" in row for row in rows), rows
