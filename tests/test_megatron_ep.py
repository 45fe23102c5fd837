"""Expert parallelism for per-expert module lists, on real gloo process groups (2 processes).

One global megatron-core ``SequentialMLP`` (E experts, seeded) is split over two EP ranks: rank ``r`` holds a
``SequentialMLP`` of ``E / 2`` local experts whose weights are global experts ``[r * E / 2, (r + 1) * E / 2)`` and
calibrates on the rows routed to them. The reference is the global module calibrated in this (single) process on
all rows. Per global expert, every quant parameter must be bit-identical to the reference (DESIGN: global id
``ep_rank * E_local + local_id``; the shared input amax is the max over EP ranks), the quantized rows too, and the
state saved under EP=2 must load into the global module with the reference's values.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

import moeq

pytest.importorskip("megatron.core.transformer.moe.experts")
pytestmark = pytest.mark.distributed

E, EP, HIDDEN, FFN = 4, 2, 32, 64
TOKENS = [[3, 0, 5, 2], [1, 4, 0, 6]]  # tokens per global expert, two calibration batches
KEYS = [f"local_experts.*.linear_fc{i}.weight" for i in (1, 2)]
TIMEOUT_S = 240


def sequential_mlp(num_experts: int, ep: Any, tp: Any, first: int = 0) -> torch.nn.Module:
    """A ``SequentialMLP`` of ``num_experts`` experts holding global experts ``first, first + 1, ...`` of the
    seeded global module, on expert-parallel group ``ep`` and (one-rank) tensor-parallel group ``tp``."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    cfg = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=FFN, moe_ffn_hidden_size=FFN,
        num_moe_experts=E, gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        bias_activation_fusion=False, use_cpu_initialization=True, params_dtype=torch.float32,
        gradient_accumulation_fusion=False,
    )  # fmt: skip
    groups = ProcessGroupCollection(tp=tp, ep=ep, expt_tp=tp, expt_dp=tp)
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    torch.manual_seed(0)
    whole = SequentialMLP(E, cfg, submodules, pg_collection=groups)
    if num_experts == E:
        return whole
    part = SequentialMLP(num_experts, cfg, submodules, pg_collection=groups)
    for i, expert in enumerate(part.local_experts):
        expert.load_state_dict(whole.local_experts[first + i].state_dict())
    return part


def batch(index: int, experts: range) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Calibration batch ``index``: its rows grouped by global expert; the rows of ``experts`` only."""
    torch.manual_seed(100 + index)
    counts = TOKENS[index]
    x, probs = torch.randn(sum(counts), HIDDEN), torch.rand(sum(counts))
    start = sum(counts[: experts.start])
    rows = slice(start, start + sum(counts[e] for e in experts))
    return x[rows], torch.tensor([counts[e] for e in experts]), probs[rows]


def calibrate(model: torch.nn.Module, experts: range, ep_group: Any) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Compile with moeq, calibrate on both batches, finalize over ``ep_group``; the per-expert parameters and the
    quantized output of each batch."""
    model = moeq.prepare(model, moeq.FP8)
    compiled = torch.compile(model, backend="moeq_aot_eager")
    with torch.no_grad(), warnings.catch_warnings(), torch._dynamo.config.patch(capture_scalar_outputs=True):
        warnings.simplefilter("ignore")
        with moeq.calibrate(compiled):
            for i in range(len(TOKENS)):
                compiled(*batch(i, experts))
        state = moeq.finalize(compiled, ep_group=ep_group)
        outputs = [compiled(*batch(i, experts))[0] for i in range(len(TOKENS))]
    params = {
        key: {name: getattr(state[key], name).clone() for name in ("weight_amax", "input_amax", "tokens_per_expert")}
        for key in KEYS
    }
    return params, outputs


def worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=EP)
    try:
        local = E // EP
        experts = range(rank * local, (rank + 1) * local)
        alone = [dist.new_group([r]) for r in range(EP)][rank]  # every rank creates every group, in order
        model = sequential_mlp(local, dist.group.WORLD, alone, experts.start)
        params, outputs = calibrate(model, experts, dist.group.WORLD)
        moeq.save_state(model, Path(out_dir) / "ckpt", ep_group=dist.group.WORLD)
        torch.save({"params": params, "outputs": outputs}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("megatron-ep")
    ctx = mp.start_processes(worker, args=(str(out / "pg"), str(out)), nprocs=EP, join=False, start_method="spawn")
    deadline = time.perf_counter() + TIMEOUT_S
    while not ctx.join(timeout=max(1.0, deadline - time.perf_counter())):
        if time.perf_counter() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"workers did not finish in {TIMEOUT_S}s (deadlock?)")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(EP)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers
    try:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{out / 'pg-ref'}", rank=0, world_size=1)
        world = dist.group.WORLD
        reference = calibrate(sequential_mlp(E, world, world), range(E), None)
        loaded = moeq.load_state(moeq.prepare(sequential_mlp(E, world, world), moeq.FP8), out / "ckpt")
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    return {"ranks": ranks, "reference": reference, "loaded": loaded}


def test_module_list_statistics_are_per_global_expert(runs: dict[str, Any]) -> None:
    """Weight amax and token counts of rank r's local expert i are global expert r * E_local + i's, bit for bit;
    the shared input amax is the max over both ranks (each rank saw only its experts' rows)."""
    want, _ = runs["reference"]
    for key in KEYS:
        for name in ("weight_amax", "tokens_per_expert"):
            got = torch.cat([r["params"][key][name] for r in runs["ranks"]])
            assert torch.equal(got, want[key][name]), f"{key} {name}: {got} != {want[key][name]}"
        for r in runs["ranks"]:
            assert torch.equal(r["params"][key]["input_amax"], want[key]["input_amax"]), key
    assert torch.cat([r["params"][KEYS[0]]["tokens_per_expert"] for r in runs["ranks"]]).tolist() == [
        sum(t[e] for t in TOKENS) for e in range(E)
    ]


def test_module_list_quantized_rows_match_the_global_module(runs: dict[str, Any]) -> None:
    """Each rank's quantized output rows are the global module's rows for its experts, bit for bit."""
    _, want = runs["reference"]
    for i, counts in enumerate(TOKENS):
        got = torch.cat([r["outputs"][i] for r in runs["ranks"]])
        assert got.shape[0] == sum(counts)
        torch.testing.assert_close(got, want[i], rtol=0, atol=0)


def test_module_list_checkpoint_saved_under_ep2_loads_into_one_process(runs: dict[str, Any]) -> None:
    """``save_state`` under EP=2 keys each expert by its global id, so the global module (EP=1) loads the
    reference's per-expert values."""
    want, _ = runs["reference"]
    loaded = runs["loaded"]
    assert loaded.finalized
    for key in KEYS:
        for name in ("weight_amax", "input_amax", "tokens_per_expert"):
            got = getattr(loaded[key], name)
            assert torch.equal(got, want[key][name].to(got.dtype)), f"{key} {name}"
