"""Expert and tensor parallelism for per-expert module lists, on real gloo process groups (2 processes).

One global megatron-core ``SequentialMLP`` (E experts, seeded) is laid out over two ranks:

* EP=2: rank ``r`` holds a ``SequentialMLP`` of ``E / 2`` local experts whose weights are global experts
  ``[r * E / 2, (r + 1) * E / 2)`` and calibrates on the rows routed to them;
* TP=2 (expert tensor parallelism): each rank holds every expert, ``linear_fc1`` column-parallel (its gate and up
  halves each split along the intermediate dim, as megatron shards a gated unit) and ``linear_fc2`` row-parallel;
  both ranks see every row. Megatron leaves the expert linears' communication to the token dispatcher
  (``explicit_expert_comm``), so the test sums the ranks' partial outputs itself.

The reference is the global module calibrated in this (single) process on all rows. Per global expert, every
quant parameter must be bit-identical to the reference (DESIGN: global id ``ep_rank * E_local + local_id``; input
amax the max over ranks; weight amax all-reduced over TP). Under EP the quantized rows must be bit-identical too;
under TP the row-parallel ``linear_fc2`` sums partial products in another order, so they are compared within a
tolerance. The state saved under each layout must load into the global module with the reference's values.

Both with ``moeq.FP8`` and with ``moeq.FP8_DYNAMIC`` (channel-wise weight amaxes: under TP=2 each rank keeps its
fc1 shard's gate and up channels, and the checkpoint joins them back into the unsharded weight's order).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import moeq

pytest.importorskip("megatron.core.transformer.moe.experts")
from dist_harness import join_within  # noqa: E402
from test_megatron_experts import FFN, HIDDEN, E, build_sequential_mlp  # noqa: E402

from tests.conftest import start_ranks  # noqa: E402

pytestmark = pytest.mark.distributed

WORLD = 2
TOKENS = [[3, 0, 5, 2], [1, 4, 0, 6]]  # tokens per global expert, two calibration batches
KEYS = [f"local_experts.*.linear_fc{i}.weight" for i in (1, 2)]
TP_SHARDING = {"*.linear_fc1.weight": "column", "*.linear_fc2.weight": "row"}
LAYOUTS = ("ep2", "tp2")
#: per-expert FP8, and FP8_DYNAMIC: channel-wise weight amaxes (a column-parallel fc1's stay on their rank, the
#: checkpoint holds them in the unsharded weight's order: a GLU fc1 rank holds ``[gate_r; up_r]``)
CONFIGS = {"fp8": moeq.FP8, "fp8_dynamic": moeq.FP8_DYNAMIC}
TIMEOUT_S = 240


def sequential_mlp(
    alone: Any, ep: Any = None, tp: Any = None, experts: range = range(E), tp_rank: int = 0, tp_size: int = 1
) -> torch.nn.Module:
    """Global experts ``experts`` of the seeded global module (built on the one-rank group ``alone``), as this
    rank's module: on expert-parallel group ``ep``, each weight its shard for tensor-parallel rank ``tp_rank``."""
    torch.manual_seed(0)
    whole = build_sequential_mlp(E, alone, alone)
    if experts == range(E) and tp_size == 1:
        return whole
    part = build_sequential_mlp(len(experts), ep or alone, tp or alone, tp_size)
    shard = slice(tp_rank * FFN // tp_size, (tp_rank + 1) * FFN // tp_size)
    with torch.no_grad():
        for expert, e in zip(part.local_experts, experts, strict=True):
            src = whole.local_experts[e]
            gate, up = src.linear_fc1.weight.chunk(2)
            expert.linear_fc1.weight.copy_(torch.cat([gate[shard], up[shard]]))
            expert.linear_fc2.weight.copy_(src.linear_fc2.weight[:, shard])
    return part


def prepare(model: torch.nn.Module, config: str) -> torch.nn.Module:
    """``CONFIGS[config]``, with the weights' tensor-parallel sharding declared in every layout (a checkpoint
    records it)."""
    return moeq.prepare(model, CONFIGS[config], tp_sharding=TP_SHARDING)


def batch(index: int, experts: range) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Calibration batch ``index``: its rows grouped by global expert; the rows of ``experts`` only."""
    torch.manual_seed(100 + index)
    counts = TOKENS[index]
    x, probs = torch.randn(sum(counts), HIDDEN), torch.rand(sum(counts))
    start = sum(counts[: experts.start])
    rows = slice(start, start + sum(counts[e] for e in experts))
    return x[rows], torch.tensor([counts[e] for e in experts]), probs[rows]


def calibrate(model: torch.nn.Module, experts: range, **groups: Any) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Calibrate on both batches and finalize over ``groups`` (the module already prepared); the per-expert
    parameters and the quantized output of each batch."""
    compiled = torch.compile(model, backend="moeq_aot_eager")
    with torch.no_grad(), warnings.catch_warnings(), torch._dynamo.config.patch(capture_scalar_outputs=True):
        warnings.simplefilter("ignore")
        with moeq.calibrate(compiled):
            for i in range(len(TOKENS)):
                compiled(*batch(i, experts))
        state = moeq.finalize(compiled, **groups)
        outputs = [compiled(*batch(i, experts))[0] for i in range(len(TOKENS))]
    params = {
        key: {name: getattr(state[key], name).clone() for name in ("weight_amax", "input_amax", "tokens_per_expert")}
        for key in KEYS
    }
    return params, outputs


def worker(rank: int, init_file: str, out_dir: str) -> None:
    """Every config under every layout, one after another in one process group (one spawn: a rank's start-up, the
    imports of torch, moeq and megatron, costs more than its calibrations)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        world = dist.group.WORLD
        alone = [dist.new_group([r]) for r in range(WORLD)][rank]  # every rank creates every group, in order
        for config in CONFIGS:
            for layout in LAYOUTS:
                torch._dynamo.reset()
                if layout == "ep2":
                    local = E // WORLD
                    experts = range(rank * local, (rank + 1) * local)
                    model = prepare(sequential_mlp(alone, ep=world, experts=experts), config)
                    groups = {"ep_group": world}
                else:
                    experts = range(E)
                    model = prepare(sequential_mlp(alone, tp=world, tp_rank=rank, tp_size=WORLD), config)
                    groups = {"tp_group": world}
                params, outputs = calibrate(model, experts, **groups)
                if layout == "tp2":  # the dispatcher's reduction of the row-parallel partial sums
                    for out in outputs:
                        dist.all_reduce(out)
                moeq.save_state(model, Path(out_dir) / f"ckpt-{config}-{layout}", **groups)
                torch.save({"params": params, "outputs": outputs}, Path(out_dir) / f"{config}-{layout}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory where both ranks wrote every config's and layout's results and checkpoints."""
    out = tmp_path_factory.mktemp("megatron-layouts")
    ctx = start_ranks(worker, (str(out / "pg"), str(out)), nprocs=WORLD)
    join_within(ctx, TIMEOUT_S)
    return out


@pytest.fixture(scope="module", params=list(CONFIGS))
def runs(request: pytest.FixtureRequest, rank_outputs: Path) -> dict[str, Any]:
    import torch.distributed as dist

    config, out = request.param, rank_outputs
    ranks = {
        layout: [torch.load(out / f"{config}-{layout}-rank{r}.pt", weights_only=False) for r in range(WORLD)]
        for layout in LAYOUTS
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers
    try:
        dist.init_process_group("gloo", init_method=f"file://{out / f'pg-ref-{config}'}", rank=0, world_size=1)
        world = dist.group.WORLD
        reference = calibrate(prepare(sequential_mlp(world), config), range(E))
        loaded = {
            layout: moeq.load_state(prepare(sequential_mlp(world), config), out / f"ckpt-{config}-{layout}")
            for layout in LAYOUTS
        }
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    return {"config": config, "ranks": ranks, "reference": reference, "loaded": loaded}


def _global_params(layout: str, ranks: list[dict[str, Any]]) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Per global expert parameters as each rank reports them: EP ranks' local experts concatenated (input amax:
    each rank's), TP ranks each whole."""
    if layout == "tp2":
        return [r["params"] for r in ranks]
    joined = []
    for r in ranks:
        joined.append(
            {
                key: {
                    "weight_amax": torch.cat([q["params"][key]["weight_amax"] for q in ranks]),
                    "tokens_per_expert": torch.cat([q["params"][key]["tokens_per_expert"] for q in ranks]),
                    "input_amax": r["params"][key]["input_amax"],
                }
                for key in KEYS
            }
        )
    return joined


def _rank_channels(amax: torch.Tensor, rank: int) -> torch.Tensor:
    """TP rank ``rank``'s channels of a GLU ``linear_fc1``'s ``[E, 2 * FFN]`` amax: its gate slice, then its up
    slice (how megatron shards a gated unit)."""
    gate, up = amax.chunk(2, dim=1)
    shard = slice(rank * FFN // WORLD, (rank + 1) * FFN // WORLD)
    return torch.cat([gate[:, shard], up[:, shard]], dim=1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_module_list_statistics_are_per_global_expert(runs: dict[str, Any], layout: str) -> None:
    """Weight amax, token counts and input amax of every global expert equal the global module's, bit for bit, on
    every rank (EP: rank r's local expert i is global expert r * E_local + i; TP: shards' amaxes all-reduced).
    FP8_DYNAMIC's channel-wise amaxes of the column-parallel fc1 stay local: TP rank r holds the global module's
    gate and up channels of its shard; the row-parallel fc2's (per output channel, over K shards) are reduced."""
    want, _ = runs["reference"]
    for rank, params in enumerate(_global_params(layout, runs["ranks"][layout])):
        for key in KEYS:
            for name in ("weight_amax", "tokens_per_expert", "input_amax"):
                got, expected = params[key][name], want[key][name]
                if name == "weight_amax" and expected.dim() == 2 and layout == "tp2" and "fc1" in key:
                    expected = _rank_channels(expected, rank)
                assert torch.equal(got, expected), f"{layout} {key} {name}: {got} != {expected}"
    if runs["config"] == "fp8_dynamic":
        assert want[KEYS[0]]["weight_amax"].shape == (E, 2 * FFN) and want[KEYS[1]]["weight_amax"].shape == (E, HIDDEN)
    assert want[KEYS[0]]["tokens_per_expert"].tolist() == [sum(t[e] for t in TOKENS) for e in range(E)]


def test_module_list_quantized_rows_match_the_global_module(runs: dict[str, Any]) -> None:
    """EP: each rank's quantized output rows are the global module's rows for its experts, bit for bit. TP: the
    sum of the ranks' partial outputs is the global module's output (row-parallel: another summation order; with
    FP8_DYNAMIC each rank scales fc2's input rows by its own K shard's max, as vLLM and Transformer Engine do, so
    within 3e-2 of the output's norm)."""
    _, want = runs["reference"]
    for i, counts in enumerate(TOKENS):
        got = torch.cat([r["outputs"][i] for r in runs["ranks"]["ep2"]])
        assert got.shape[0] == sum(counts)
        torch.testing.assert_close(got, want[i], rtol=0, atol=0)
        for r in runs["ranks"]["tp2"]:
            if runs["config"] == "fp8_dynamic":
                assert ((r["outputs"][i] - want[i]).norm() / want[i].norm()).item() < 3e-2
            else:
                torch.testing.assert_close(r["outputs"][i], want[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_module_list_checkpoint_loads_into_one_process(runs: dict[str, Any], layout: str) -> None:
    """``save_state`` under EP=2 (experts keyed by global id) or TP=2 (global weight shapes) loads into the global
    module (one process) with the reference's per-expert values."""
    want, _ = runs["reference"]
    loaded = runs["loaded"][layout]
    assert loaded.finalized
    for key in KEYS:
        for name in ("weight_amax", "input_amax", "tokens_per_expert"):
            got = getattr(loaded[key], name)
            assert torch.equal(got, want[key][name].to(got.dtype)), f"{layout} {key} {name}"
