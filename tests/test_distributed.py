"""Distributed calibration on real gloo process groups (4 processes): layout invariance over EP x TP x DP,
zero-token ranks, reshardable checkpoints, and the number of collectives per finalize().

The harness (``dist_harness.py``) slices one global tiny Qwen3-MoE per rank. The reference is the same
global model calibrated and finalized in this (single) process on all the data. Per global expert, every
quant parameter must be bit-identical to the reference, and so must the fake-quantized weight shards
and, without TP, the model output. With TP the row-parallel down projection sums partial products in
another order, so the output is compared with a tolerance and its difference reported.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from dist_harness import (
    CONFIGS,
    MODEL_KW,
    REFUSALS,
    Layout,
    build,
    calibrate_and_finalize,
    compile_experts,
    eval_batch,
    join_within,
    per_expert_params,
    shard_experts,
    starve_experts,
    synthetic_finalize,
    worker,
)

import moeq
from moeq.io.checkpoint import CheckpointError
from tests.conftest import start_ranks

STARVED = [4, 5, 6, 7]  # global experts with no layer-0 token: all of EP rank 1 (EP=2) / ranks 2, 3 (EP=4)
TIMEOUT_S = 240

pytestmark = pytest.mark.distributed


def _spawn(world: int, out_dir: Path, plan: list[tuple[Layout, list[dict[str, Any]]]]) -> float:
    init_file = out_dir / "pg"
    start = time.perf_counter()
    join_within(start_ranks(worker, (world, str(init_file), str(out_dir), plan), nprocs=world), TIMEOUT_S)
    return time.perf_counter() - start


def _reference(fmt: str, starve: bool, out_dir: Path, save: Path | None = None) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: CPU GEMM results may depend on the thread count
    try:
        layout = Layout()
        model = build(layout, 0, None, fmt)
        if starve:
            starve_experts(model, 0, STARVED)
        compiled = calibrate_and_finalize(model, layout, 0, None)
        if save is not None:
            moeq.save_state(model, save)
        result = {"params": per_expert_params(model, layout, 0), "logits": compiled(eval_batch()).logits.detach()}
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    return result


JOBS = {
    "fp8-starve": dict(fmt="fp8_per_expert", starve=STARVED),
    "nvfp4": dict(fmt="nvfp4"),
    "fp8-dynamic": dict(fmt="fp8_dynamic"),
}
#: the jobs each layout runs, each one ``test_layout_invariance[{job}-{layout}]``. A job is a compile, a calibration, a
#: finalize and an output on every rank of its layout (~5 s of CI's two cores with four ranks), so not every pair runs:
#: FP8 with starved experts runs under every layout; NVFP4 and FP8_DYNAMIC under EP x DP (EP without TP: the output
#: bit for bit) and TP=2 (the tolerances; it saves the checkpoints the resharding tests load), FP8_DYNAMIC under EP x
#: TP too (its column-parallel channel amaxes beside the EP sync). NVFP4 under EP x TP, EP=4 or DP alone runs no other
#: sync: its shared input amax is the layer-wide max FP8's starved experts take under those layouts, its per-expert
#: weight amax is reduced over TP as FP8's is and its block scales are each TP shard's own (TP=2 checks them); EP=4
#: loads it from both checkpoints and, with megatron-core, calibrates it on megatron's groups. FP8_DYNAMIC under EP=4
#: or DP alone: EP x DP runs the same syncs, EP=4 and EP x TP load its channel amaxes from TP=2.
PLAN = {
    Layout(ep=2, dp=2): ["fp8-starve", "nvfp4", "fp8-dynamic"],
    Layout(tp=2): ["fp8-starve", "nvfp4", "fp8-dynamic"],
    Layout(ep=4): ["fp8-starve"],
    Layout(ep=2, tp=2): ["fp8-starve", "fp8-dynamic"],
    Layout(dp=2): ["fp8-starve"],
}
WORLD = 4
HAVE_MEGATRON = (
    importlib.util.find_spec("megatron") is not None and importlib.util.find_spec("megatron.core") is not None
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("dist")
    ckpt = {"ep2": out / "ckpt-ep2", "tp2": out / "ckpt-tp2", "tp2-dynamic": out / "ckpt-tp2-dynamic"}
    saves = {
        (Layout(ep=2, dp=2), "nvfp4"): "ep2",
        (Layout(tp=2), "nvfp4"): "tp2",
        (Layout(tp=2), "fp8-dynamic"): "tp2-dynamic",
    }
    plan = []
    for layout, names in PLAN.items():
        jobs = [{"name": f"{layout}-{name}", **JOBS[name]} for name in names]
        for job, name in zip(jobs, names):
            if (layout, name) in saves:
                job["save"] = str(ckpt[saves[layout, name]])
        if layout == Layout(tp=2):  # its own checkpoint loads under EP=4 (below) and in one process
            jobs.append({"name": f"{layout}-load-ep2", "fmt": "nvfp4", "load": str(ckpt["ep2"])})
        if layout == Layout(ep=4):
            jobs += [{"name": f"{layout}-load-{c}", "fmt": "nvfp4", "load": str(ckpt[c])} for c in ("ep2", "tp2")]
            if HAVE_MEGATRON:
                jobs.append({"name": f"{layout}-megatron", "fmt": "nvfp4", "megatron": True})
        if layout == Layout(ep=2, tp=2):  # the refusals first: the synthetic finalize then proves the ranks in step
            jobs.append({"name": "refusals", "refusals": True})
            jobs.append({"name": "synthetic", "synthetic": True, "layers": [2, 48], "experts": 64})
        if layout in (Layout(ep=4), Layout(ep=2, tp=2)):  # after Layout(tp=2) saved it
            jobs.append({"name": f"{layout}-load-tp2-dynamic", "fmt": "fp8_dynamic", "load": str(ckpt["tp2-dynamic"])})
        plan.append((layout, jobs))
    seconds = _spawn(WORLD, out, plan)
    reference = {name: _reference(spec["fmt"], "starve" in spec, out) for name, spec in JOBS.items()}
    return {"dir": out, "ckpt": ckpt, "reference": reference, "seconds": seconds}


def _load(out: Path, name: str, layout: Layout) -> list[dict[str, Any]]:
    return [torch.load(out / f"{name}-rank{r}.pt", weights_only=False) for r in range(layout.world)]


def _global_params(ranks: list[dict[str, Any]], layout: Layout) -> dict[str, dict[str, Any]]:
    """Per-global-expert parameters assembled from the ranks; TP and DP replicas must agree exactly."""
    out: dict[str, dict[str, Any]] = {}
    for fqn in ranks[0]["params"]:
        per_ep = []
        channels = _column_channels(fqn, ranks[0]["params"][fqn], layout)
        for e in range(layout.ep):
            replicas = [r["params"][fqn] for r in ranks if r["params"][fqn]["coords"][1] == e]
            first = replicas[0]
            for other in replicas[1:]:
                for key in ("weight_amax", "input_amax", "tokens", "calibrated", "observed"):
                    if key == "weight_amax" and channels and other["coords"][2] != first["coords"][2]:
                        continue  # a column-parallel weight's channel amaxes: each TP rank holds its own channels
                    assert torch.equal(first[key], other[key]), f"{fqn} {key}: TP/DP replicas of EP rank {e} differ"
                assert first["flags"] == other["flags"]
            per_ep.append(replicas)
        cat = {k: torch.cat([rep[0][k] for rep in per_ep]) for k in ("tokens", "calibrated", "observed")}
        if channels:
            cat["weight_amax"] = _join_shards(fqn, per_ep, layout, "weight_amax")
        else:
            cat["weight_amax"] = torch.cat([rep[0]["weight_amax"] for rep in per_ep])
        shared = [rep[0]["input_amax"] for rep in per_ep]
        cat["input_amax"] = shared[0] if shared[0].numel() == 1 else torch.cat(shared)
        if shared[0].numel() == 1:
            assert all(torch.equal(shared[0], x) for x in shared), f"{fqn}: EP ranks disagree on the shared input amax"
        cat["flags"] = {g: note for rep in per_ep for g, note in rep[0]["flags"].items()}
        cat["fake_quant_weight"] = _join_shards(fqn, per_ep, layout)
        out[fqn] = cat
    return out


def _column_channels(fqn: str, params: dict[str, Any], layout: Layout) -> bool:
    """Whether ``fqn``'s weight amax is channel-wise over a column-parallel (TP-split) output dim."""
    return params["weight_amax"].dim() == 2 and layout.tp > 1 and fqn.endswith("gate_up_proj")


def _join_shards(
    fqn: str, per_ep: list[list[dict[str, Any]]], layout: Layout, key: str = "fake_quant_weight"
) -> torch.Tensor:
    """The global fake-quantized weight (or channel-wise amax, ``[E, N]``) from (EP, TP) shards: gate_up is
    column-parallel with separate gate and up halves, down_proj row-parallel along its last dim."""
    experts = []
    for replicas in per_ep:
        shards = sorted((r for r in replicas if r["coords"][0] == 0), key=lambda r: r["coords"][2])
        ws = [r[key] for r in shards]
        if fqn.endswith("gate_up_proj"):
            halves = [w.chunk(2, dim=1) for w in ws]
            experts.append(torch.cat([torch.cat([h[0] for h in halves], 1), torch.cat([h[1] for h in halves], 1)], 1))
        else:
            experts.append(torch.cat(ws, dim=2))
    return torch.cat(experts)


ACTIVATION_KEYS = ("input_amax", "observed")
#: relative output difference allowed for FP8_DYNAMIC under TP (per-shard per-token scales, see below)
DYNAMIC_TP_REL = 1e-2


def _assert_same_params(got: dict[str, dict[str, Any]], ref: dict[str, dict[str, Any]], what: str, tp: int = 1) -> None:
    """Bit-identical, except: with TP > 1 the activations reaching layer 1 went through layer 0's
    row-parallel reduction (another summation order than one process), so layer 1's activation
    statistics are compared to 1e-6 relative. Layer 0's and every weight statistic stay bit-exact."""
    assert sorted(got) == sorted(ref)
    for fqn in ref:
        for key in ("weight_amax", "input_amax", "tokens", "calibrated", "observed", "fake_quant_weight"):
            a, b = got[fqn][key], ref[fqn][key]
            assert a.dtype == b.dtype and a.shape == b.shape, f"{what} {fqn} {key}"
            if tp > 1 and key in ACTIVATION_KEYS and not fqn.startswith("model.layers.0."):
                assert torch.allclose(a, b, rtol=1e-6, atol=0), f"{what} {fqn} {key}: differs by {(a - b).abs().max()}"
            else:
                assert torch.equal(a, b), f"{what} {fqn} {key}: not bit-identical to one process"
        assert got[fqn]["flags"] == ref[fqn]["flags"], f"{what} {fqn}: explain() flags differ"


@pytest.mark.parametrize(
    "layout,job", [pytest.param(layout, job, id=f"{job}-{layout}") for layout, jobs in PLAN.items() for job in jobs]
)
def test_layout_invariance(runs: dict[str, Any], layout: Layout, job: str) -> None:
    ranks = _load(runs["dir"], f"{layout}-{job}", layout)
    ref = runs["reference"][job]
    ref_params = {fqn: {**p, "observed": p["observed"]} for fqn, p in ref["params"].items()}
    _assert_same_params(_global_params(ranks, layout), ref_params, f"{layout} {job}", layout.tp)
    logits = ranks[0]["logits"]
    for r in ranks[1:]:
        assert torch.equal(r["logits"], logits), f"{layout}: ranks disagree on the output"
    if layout.tp == 1:
        assert torch.equal(logits, ref["logits"]), f"{layout} {job}: output not bit-identical"
    elif job == "fp8-dynamic":
        # the row-parallel down_proj's dynamic per-token scales come from each TP rank's K shard of the row (as in
        # vLLM and Transformer Engine), not from the whole row: the output is not one process's to the last bit
        rel = ((logits - ref["logits"]).norm() / ref["logits"].norm()).item()
        assert rel < DYNAMIC_TP_REL, f"{layout} {job}: output differs by {rel:.2e} (relative)"
    else:
        diff = (logits - ref["logits"]).abs().max().item()
        assert diff <= 1e-5 * ref["logits"].abs().max().item(), f"{layout} {job}: output differs by {diff}"


@pytest.mark.skipif(not HAVE_MEGATRON, reason="megatron-core not installed")
def test_groups_from_megatron_parallel_state(runs: dict[str, Any]) -> None:
    """finalize() without groups takes megatron-core's expert-parallel groups (initialize_model_parallel
    with expert_model_parallel_size=4 on gloo): the same parameters as with explicit groups."""
    layout = Layout(ep=4)
    got = _global_params(_load(runs["dir"], f"{layout}-megatron", layout), layout)
    _assert_same_params(got, runs["reference"]["nvfp4"]["params"], "megatron parallel_state EP=4")


def test_starved_rank_completes_and_flags(runs: dict[str, Any]) -> None:
    """EP ranks whose experts get no layer-0 token joined every collective; those experts took the peer
    max (per_expert scale) and are flagged under their global ids."""
    ref = runs["reference"]["fp8-starve"]["params"]["model.layers.0.mlp.experts.gate_up_proj"]
    assert ref["tokens"][STARVED].sum() == 0 and (ref["tokens"][:4] > 0).all()
    layer_max = ref["observed"][:4].max()
    assert torch.equal(ref["input_amax"][STARVED], layer_max.expand(len(STARVED)))
    assert sorted(ref["flags"]) == STARVED
    layout = Layout(ep=4)
    got = _global_params(_load(runs["dir"], f"{layout}-fp8-starve", layout), layout)
    assert sorted(got["model.layers.0.mlp.experts.gate_up_proj"]["flags"]) == STARVED


SAVED_BY = {"ep2": (Layout(ep=2, dp=2), "nvfp4"), "tp2": (Layout(tp=2), "nvfp4")}


def _saved_params(runs: dict[str, Any], ckpt: str) -> dict[str, dict[str, Any]]:
    layout, job = SAVED_BY[ckpt]
    return _global_params(_load(runs["dir"], f"{layout}-{job}", layout), layout)


def _assert_loaded_output(logits: torch.Tensor, runs: dict[str, Any], layout: Layout, ckpt: str) -> None:
    """Saved under EP (bit-identical to one process) and loaded without TP: the same output bit for bit.
    Saved or loaded under TP: layer 1's activation scale / the row-parallel sum differ in the last bits."""
    ref = runs["reference"]["nvfp4"]["logits"]
    if layout.tp == 1 and SAVED_BY[ckpt][0].tp == 1:
        assert torch.equal(logits, ref)
    else:
        assert torch.allclose(logits, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("layout,ckpt", [(Layout(ep=4), "ep2"), (Layout(ep=4), "tp2"), (Layout(tp=2), "ep2")], ids=str)
def test_checkpoint_reshards(runs: dict[str, Any], layout: Layout, ckpt: str) -> None:
    """Every per-global-expert entry loaded under another layout equals what the saving layout had."""
    ranks = _load(runs["dir"], f"{layout}-load-{ckpt}", layout)
    _assert_same_params(_global_params(ranks, layout), _saved_params(runs, ckpt), f"{layout} loading {ckpt}")
    _assert_loaded_output(ranks[0]["logits"], runs, layout, ckpt)


@pytest.mark.parametrize("layout", [Layout(ep=4), Layout(ep=2, tp=2)], ids=str)
def test_channel_amax_checkpoint_reshards(runs: dict[str, Any], layout: Layout) -> None:
    """FP8_DYNAMIC's channel-wise weight amaxes saved under TP=2 (gate_up's channels split over the TP ranks) load
    under EP=4 and EP=2 x TP=2 as every expert's channels, the same as the saving layout had (and as one process)."""
    saving = Layout(tp=2)
    saved = _global_params(_load(runs["dir"], f"{saving}-fp8-dynamic", saving), saving)
    got = _global_params(_load(runs["dir"], f"{layout}-load-tp2-dynamic", layout), layout)
    for fqn in saved:
        for key in ("weight_amax", "fake_quant_weight"):
            assert torch.equal(got[fqn][key], saved[fqn][key]), f"{layout} {fqn} {key}"
            assert torch.equal(got[fqn][key], runs["reference"]["fp8-dynamic"]["params"][fqn][key]), f"{fqn} {key}"
    assert got["model.layers.0.mlp.experts.gate_up_proj"]["weight_amax"].shape == (8, 64)


@pytest.mark.parametrize("ckpt", ["ep2", "tp2"])
def test_checkpoint_loads_in_one_process(runs: dict[str, Any], ckpt: str) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build(Layout(), 0, None, "nvfp4")
        moeq.load_state(model, runs["ckpt"][ckpt])
        logits = compile_experts(model)(eval_batch()).logits.detach()
        params = per_expert_params(model, Layout(), 0)
    finally:
        torch.set_num_threads(threads)
    got = _global_params([{"params": params}], Layout())
    _assert_same_params(got, _saved_params(runs, ckpt), f"EP=1 loading {ckpt}")
    _assert_loaded_output(logits, runs, Layout(), ckpt)


def test_tp_checkpoint_loads_into_a_model_prepared_without_tp_sharding(runs: dict[str, Any]) -> None:
    """The TP=2 checkpoint holds per-global-expert records, so the whole model prepared without ``tp_sharding`` (a
    plain TP=1 job) loads it: the same per-expert parameters as the saving layout, and its logits."""
    from moeq.integrations.hf import tiny_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = shard_experts(tiny_model("qwen3_moe", torch.float32, seed=0, **MODEL_KW), Layout(), 0, None)
        moeq.prepare(model, CONFIGS["nvfp4"])  # build() less its tp_sharding
        moeq.load_state(model, runs["ckpt"]["tp2"])
        logits = compile_experts(model)(eval_batch()).logits.detach()
        params = per_expert_params(model, Layout(), 0)
    finally:
        torch.set_num_threads(threads)
    got = _global_params([{"params": params}], Layout())
    _assert_same_params(got, _saved_params(runs, "tp2"), "EP=1 without tp_sharding loading tp2")
    _assert_loaded_output(logits, runs, Layout(), "tp2")


def test_collectives_per_finalize_do_not_grow_with_layers(runs: dict[str, Any]) -> None:
    """EP=2 x TP=2, 64 local (128 global) experts per GEMM: 2 vs 48 layers issue the same collectives."""
    ranks = _load(runs["dir"], "synthetic", Layout(ep=2, tp=2))
    for r in ranks:
        (small, _), (large, seconds) = r[2], r[48]
        assert small == large, f"collectives grew with the layer count: {small} vs {large}"
        assert sum(large.values()) == 4, large  # layout check over EP and TP + one MAX over TP + one over EP
    print(f"48 layers x 2 GEMMs x 128 experts: {sum(large.values())} collectives {large}, finalize {seconds:.2f}s")


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_one_rank_that_cannot_finalize_makes_every_rank_raise(runs: dict[str, Any], case: str) -> None:
    """EP=2 x TP=2: one rank with a defect (no calibrate(), nothing rewritten, another layout, a NaN weight in its
    experts or in its shard of a column-parallel weight) makes finalize() raise on all four ranks, before any
    rank changed anything, instead of leaving its peers waiting in a collective or committing without it."""
    outcomes = [r[case] for r in _load(runs["dir"], "refusals", Layout(ep=2, tp=2))]
    culprit = REFUSALS[case]
    expected = {
        "uncalibrated": rf"RuntimeError: .*rank {culprit}: finalize\(\) called before calibrate\(\)",
        "nothing-rewritten": rf"RuntimeError: .*rank {culprit}: finalize\(\): no expert GEMM has been rewritten yet",
        "extra-layer": rf"RuntimeError: .*ranks hold different expert GEMMs: rank 0 has \[\] that rank {culprit} lacks, "
        r"which has \[\('layer2\.down_proj', \(4, 16, 16\)\), \('layer2\.gate_up_proj', \(4, 32, 16\)\)\]",
        "nan-weight": r"ValueError: .*layer0\.gate_up_proj: non-finite \(NaN/inf\) weight amax for experts",
        "nan-column-shard": r"ValueError: .*layer0\.gate_up_proj: non-finite \(NaN/inf\) weight amax for experts",
    }[case]
    for rank, outcome in enumerate(outcomes):
        assert re.match(expected, outcome, re.DOTALL), f"rank {rank}: {outcome}"
    if case not in ("nan-weight", "nan-column-shard"):  # raised before the sync: the same words on every rank
        assert len(set(outcomes)) == 1, outcomes


def test_single_process_collectives_is_zero() -> None:
    log, _ = synthetic_finalize(4, 8, None, 0)
    assert log == {}


# -- checkpoint errors (one process) --------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "state"
    model = build(Layout(), 0, None, "nvfp4")
    calibrate_and_finalize(model, Layout(), 0, None)
    moeq.save_state(model, path)
    torch._dynamo.reset()
    return path


def _fresh(fmt: str = "nvfp4", **model_kw: Any) -> torch.nn.Module:
    import dist_harness

    old = dict(dist_harness.MODEL_KW)
    dist_harness.MODEL_KW.update(model_kw)
    try:
        return build(Layout(), 0, None, fmt)
    finally:
        dist_harness.MODEL_KW.clear()
        dist_harness.MODEL_KW.update(old)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{fqn}.{k}": v.clone() for fqn, s in moeq.quant_state(model).items() for k, v in s.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = _snapshot(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before), "a failed load changed the quant state"


def test_checkpoint_from_model_with_more_layers(saved: Path) -> None:
    model = _fresh(num_hidden_layers=3)
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match=r"missing expert weights.*model\.layers\.2\.mlp\.experts\.down_proj"):
        moeq.load_state(model, saved)
    _assert_unchanged(model, before)


def test_checkpoint_into_model_with_fewer_layers(saved: Path) -> None:
    model = _fresh(num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"extra expert weights.*model\.layers\.1\.mlp\.experts\.gate_up_proj"):
        moeq.load_state(model, saved)


def test_checkpoint_of_a_model_with_a_convolution(tmp_path: Path) -> None:
    """A convolution's 3-D weight is no expert weight: Qwen3-Next (linear attention with a ``Conv1d``) saves and
    loads its experts' state without the checkpoint asking for the convolution (it did until session 31)."""
    from moeq.integrations.hf import tiny_model

    def calibrated() -> torch.nn.Module:
        model = moeq.prepare(tiny_model("qwen3_next", torch.float32), moeq.FP8)
        cm = torch.compile(model, backend="moeq_aot_eager")
        with torch.no_grad(), moeq.calibrate(cm):
            cm(torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)), use_cache=False)
        moeq.finalize(cm)
        return model

    model = calibrated()
    assert any(isinstance(m, torch.nn.Conv1d) for m in model.modules())
    moeq.save_state(model, tmp_path / "state")
    fresh = moeq.prepare(tiny_model("qwen3_next", torch.float32), moeq.FP8)
    moeq.load_state(fresh, tmp_path / "state")
    want = _snapshot(model)
    assert len(want) > 0 and _snapshot(fresh).keys() == want.keys()
    _assert_unchanged(fresh, want)


def test_checkpoint_mis_shaped(saved: Path) -> None:
    model = _fresh(num_experts=16)
    with pytest.raises(
        CheckpointError, match=r"entry differs from the model.*global_weight_shape.*\[8, 64, 64\].*\[16, 64, 64\]"
    ):
        moeq.load_state(model, saved)


def test_checkpoint_other_config(saved: Path) -> None:
    with pytest.raises(CheckpointError, match=r"another QuantConfig.*'weight': \('nvfp4', 'fp8'\)"):
        moeq.load_state(_fresh("fp8"), saved)


def test_checkpoint_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read a moeq quant-state checkpoint"):
        moeq.load_state(_fresh(), tmp_path)


def test_checkpoint_corrupt_data(saved: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    data = next(p for p in broken.iterdir() if p.suffix == ".distcp")
    data.write_bytes(data.read_bytes()[: os.path.getsize(data) // 3])
    model = _fresh()
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match="nothing was loaded"):
        moeq.load_state(model, broken)
    _assert_unchanged(model, before)


# -- NCCL (GPU machine with >= 2 GPUs) --------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_layout_invariance(tmp_path: Path) -> None:
    """The invariance test over NCCL with the Triton kernels: EP=2 and TP=2 against one GPU process."""
    world = 4 if torch.cuda.device_count() >= 4 else 2
    layouts = [Layout(), Layout(ep=2), Layout(tp=2)] + ([Layout(ep=4), Layout(ep=2, tp=2)] if world == 4 else [])
    plan = [(lay, [{"name": f"{lay}-{name}", **spec} for name, spec in JOBS.items()]) for lay in layouts]
    ctx = mp.start_processes(
        worker, args=(world, str(tmp_path / "pg"), str(tmp_path), plan, "nccl"), nprocs=world, join=False
    )
    while not ctx.join(timeout=TIMEOUT_S):
        pass
    for job in JOBS:
        ref_ranks = _load(tmp_path, f"{Layout()}-{job}", Layout())
        ref = _global_params(ref_ranks, Layout())
        for lay in layouts[1:]:
            ranks = _load(tmp_path, f"{lay}-{job}", lay)
            _assert_same_params(_global_params(ranks, lay), ref, f"NCCL {lay} {job}", lay.tp)
            diff = (ranks[0]["logits"] - ref_ranks[0]["logits"]).abs().max().item()
            exact = "bit-identical" if lay.tp == 1 else "bit-identical (layer-1 activation amax to 1e-6, see above)"
            print(f"NCCL {lay} {job}: parameters {exact} to one GPU process; max |logit diff| {diff:.3g}")
            if lay.tp == 1:
                assert diff == 0.0


def test_recalibrate_without_reset_after_dp_sync_is_refused() -> None:
    """After a DP finalize the token counts are already global sums; accumulating more on top would count
    them again at the next finalize."""
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.randn(4, 16, 16))
    moeq.prepare(model, moeq.FP8)
    state = moeq.runtime.calibrate.get_state(model)
    state.finalized, state.synced_over_dp = True, True
    with pytest.raises(ValueError, match="would count those tokens again"):
        with moeq.calibrate(model, reset=False):
            pass
    with moeq.calibrate(model):  # the default after finalize starts over
        assert not state.finalized
