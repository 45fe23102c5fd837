"""Expert / tensor / data parallelism simulated faithfully on real gloo process groups.

A global tiny transformers Qwen3-MoE (random weights, same seed on every rank) has its experts sliced
per rank: EP rank ``r`` keeps global experts ``[r * E_local, (r + 1) * E_local)``; TP shards
``gate_up_proj`` column-parallel (gate and up halves each split along the intermediate dim) and
``down_proj`` row-parallel (split along its contraction dim). Every rank runs the real router; each
(token, expert) pair is dispatched to the rank owning the expert (the others see it as an off-rank
sentinel, exactly like transformers' own EP path), and the per-pair expert outputs are combined with one
all-reduce over the EP and TP ranks before the routing-weighted sum over top-k. DP replicas calibrate
on different batches.

Rank layout: ``rank = (dp_index * ep + ep_index) * tp + tp_index``.

Worker functions run under ``torch.multiprocessing.spawn`` and write their results to files that the
pytest process compares.
"""

from __future__ import annotations

import os
import time
import types
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from transformers.integrations.moe import grouped_mm_experts_forward

import moeq
from moeq.integrations.hf import tiny_model
from moeq.runtime.collectives import ProcessGroups

TP_SHARDING = {"*.gate_up_proj": "column", "*.down_proj": "row"}
MODEL_KW = dict(num_hidden_layers=2)
CONFIGS = {
    "fp8": moeq.FP8,
    "nvfp4": moeq.NVFP4,
    "fp8_per_expert": moeq.QuantConfig(weight="fp8", activation="fp8", act_scale="per_expert"),
    "fp8_dynamic": moeq.FP8_DYNAMIC,
}


@dataclass(frozen=True)
class Layout:
    ep: int = 1
    tp: int = 1
    dp: int = 1

    @property
    def world(self) -> int:
        return self.ep * self.tp * self.dp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(dp_index, ep_index, tp_index) of ``rank``."""
        return rank // (self.ep * self.tp), (rank // self.tp) % self.ep, rank % self.tp

    def rank_of(self, d: int, e: int, t: int) -> int:
        return (d * self.ep + e) * self.tp + t

    def __str__(self) -> str:
        return f"ep{self.ep}-tp{self.tp}-dp{self.dp}"


DEVICE = torch.device("cpu")


def join_within(ctx: Any, timeout_s: float) -> None:
    """Wait for the processes of ``ctx`` (``torch.multiprocessing.start_processes(..., join=False)``); past
    ``timeout_s`` seconds kill them all and raise: a deadlock fails the test instead of waiting out CI's limit."""
    deadline = time.perf_counter() + timeout_s
    while not ctx.join(timeout=max(1.0, deadline - time.perf_counter())):
        if time.perf_counter() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"workers did not finish in {timeout_s}s (deadlock?)")


def init_process_group(rank: int, world: int, init_file: str, backend: str = "gloo") -> None:
    """gloo on CPU; with ``backend="nccl"`` each rank runs on GPU ``rank``."""
    global DEVICE
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
        DEVICE = torch.device("cuda", rank)
    dist.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )


def make_groups(layout: Layout, rank: int) -> tuple[ProcessGroups | None, Any]:
    """Create every EP, TP and DP group of ``layout`` on ranks ``[0, layout.world)`` and the group of all
    of them (every rank of the job calls new_group in the same order). Returns this rank's groups and
    the layout's world group, or (None, None) for a rank outside the layout."""
    world_group = dist.new_group(list(range(layout.world)))
    d0, e0, t0 = layout.coords(rank)
    mine: dict[str, Any] = {}
    r = range
    specs = {
        "tp": [([layout.rank_of(d, e, t) for t in r(layout.tp)], (d, e)) for d in r(layout.dp) for e in r(layout.ep)],
        "ep": [([layout.rank_of(d, e, t) for e in r(layout.ep)], (d, t)) for d in r(layout.dp) for t in r(layout.tp)],
        "dp": [([layout.rank_of(d, e, t) for d in r(layout.dp)], (e, t)) for e in r(layout.ep) for t in r(layout.tp)],
    }
    key_of = {"tp": (d0, e0), "ep": (d0, t0), "dp": (e0, t0)}
    for role in ("tp", "ep", "dp"):
        for ranks, key in specs[role]:
            group = dist.new_group(ranks)
            if key == key_of[role]:
                mine[role] = group
    if rank >= layout.world:
        return None, None
    return ProcessGroups(ep=mine["ep"], tp=mine["tp"], dp=mine["dp"]), world_group


def _combine(out: torch.Tensor, groups: ProcessGroups | None) -> torch.Tensor:
    """Sum the per-pair expert outputs over the EP ranks (one owner per pair: exact) and the TP ranks
    (row-parallel partial sums). Functional collectives, so Dynamo keeps them in the graph."""
    if groups is None:
        return out
    for role in ("ep", "tp"):
        if groups.size(role) > 1:
            out = funcol.all_reduce(out, "sum", groups.group(role))
    return out


def _sharded_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    first: int,
    groups: ProcessGroups | None,
) -> torch.Tensor:
    tokens, top_k = top_k_index.shape
    pairs = hidden_states.repeat_interleave(top_k, dim=0)
    local = top_k_index.reshape(-1, 1) - first
    on_rank = (local >= 0) & (local < self.num_experts)
    local = torch.where(on_rank, local, torch.full_like(local, self.num_experts))  # off-rank sentinel
    out = grouped_mm_experts_forward(self, pairs, local, torch.ones_like(local, dtype=hidden_states.dtype))
    out = torch.where(on_rank, out, torch.zeros_like(out))
    out = _combine(out, groups)
    return (out.view(tokens, top_k, -1) * top_k_weights.unsqueeze(-1)).sum(dim=1).to(hidden_states.dtype)


def shard_experts(model: nn.Module, layout: Layout, rank: int, groups: ProcessGroups | None) -> nn.Module:
    """Slice every experts module of ``model`` to this rank's experts and TP shards (in place)."""
    _, e_idx, t_idx = layout.coords(rank)
    for module in model.modules():
        gate_up = getattr(module, "gate_up_proj", None)
        if not (isinstance(gate_up, nn.Parameter) and gate_up.dim() == 3):
            continue
        num_experts = gate_up.shape[0]
        local = num_experts // layout.ep
        first = e_idx * local
        inter = gate_up.shape[1] // 2
        part = inter // layout.tp
        cols = slice(t_idx * part, (t_idx + 1) * part)
        gu = gate_up.data[first : first + local]
        module.gate_up_proj = nn.Parameter(torch.cat([gu[:, :inter][:, cols], gu[:, inter:][:, cols]], 1).contiguous())
        module.down_proj = nn.Parameter(module.down_proj.data[first : first + local][:, :, cols].contiguous())
        module.num_experts = local
        module._is_expert_parallel = True
        module.forward = types.MethodType(partial(_sharded_experts_forward, first=first, groups=groups), module)
    return model


def calibration_batches(dp_index: int, dp: int, total: int = 4, batch: int = 2, seq: int = 16) -> list[torch.Tensor]:
    """``total`` global batches, split between the DP replicas."""
    out = []
    for i in range(total):
        g = torch.Generator().manual_seed(100 + i)
        out.append(torch.randint(0, 256, (batch, seq), generator=g))
    return [b.to(DEVICE) for i, b in enumerate(out) if i % dp == dp_index]


def eval_batch() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(7)).to(DEVICE)


def build(layout: Layout, rank: int, groups: ProcessGroups | None, fmt: str, seed: int = 0) -> nn.Module:
    model = tiny_model("qwen3_moe", torch.float32, seed=seed, **MODEL_KW).to(DEVICE)
    shard_experts(model, layout, rank, groups)
    moeq.prepare(model, CONFIGS[fmt], tp_sharding=TP_SHARDING)
    return model


def _router_without(self: nn.Module, hidden_states: torch.Tensor, *, banned: list[int]) -> Any:
    """transformers' Qwen3-MoE top-k router, with the ``banned`` experts' logits at -inf."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = nn.functional.linear(hidden_states, self.weight)
    router_logits[:, banned] = float("-inf")
    router_probs = torch.softmax(router_logits, dtype=torch.float, dim=-1)
    top_value, indices = torch.topk(router_probs, self.top_k, dim=-1)
    if self.norm_topk_prob:
        top_value = top_value / top_value.sum(dim=-1, keepdim=True)
    return router_logits, top_value.to(router_logits.dtype), indices


def starve_experts(model: nn.Module, layer: int, banned: list[int]) -> None:
    """Route no token of layer ``layer`` to the global experts ``banned``."""
    gate = model.model.layers[layer].mlp.gate
    gate.forward = types.MethodType(partial(_router_without, banned=list(banned)), gate)


def compile_experts(model: nn.Module) -> nn.Module:
    """Compile the experts modules in place (regional compilation: FQNs unchanged; every layer runs
    the same compiled code, which moeq binds to that layer's quant state at each call)."""
    for module in model.modules():
        if getattr(module, "_is_expert_parallel", False):
            module.compile(backend="moeq_aot_eager")
    return model


def calibrate_and_finalize(
    model: nn.Module, layout: Layout, rank: int, groups: ProcessGroups | None, megatron: bool = False
) -> Any:
    """Calibrate on this DP replica's batches and finalize over the groups (``megatron=True``: pass none
    and let finalize take megatron-core's ``parallel_state`` groups)."""
    compiled = compile_experts(model)
    d_idx, _, _ = layout.coords(rank)
    with moeq.calibrate(compiled):
        for batch in calibration_batches(d_idx, layout.dp):
            compiled(batch)
    if megatron:
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=1,
                expert_model_parallel_size=layout.ep,
                expert_tensor_parallel_size=layout.tp,
            )
        moeq.finalize(compiled)
        parallel_state.destroy_model_parallel()
        return compiled
    g = groups or ProcessGroups()
    moeq.finalize(compiled, ep_group=g.ep, tp_group=g.tp, dp_group=g.dp)
    return compiled


def per_expert_params(model: nn.Module, layout: Layout, rank: int) -> dict[str, Any]:
    """This rank's per-global-expert quant parameters and its fake-quantized weight shards."""
    out: dict[str, Any] = {}
    state = moeq.quant_state(model)
    for fqn, s in state.items():
        w = model.get_parameter(fqn)
        fq = torch.ops.moeq.fake_quant_weight(
            w.detach(), s.weight_amax, s.config.weight, s.expert_dim, s.contraction_dim
        )
        out[fqn] = {
            "offset": s.expert_offset,
            "weight_amax": s.weight_amax.cpu(),
            "input_amax": s.input_amax.cpu(),
            "tokens": s.tokens_per_expert.cpu(),
            "calibrated": s.calibrated.cpu(),
            "observed": s.observed_input_amax.cpu(),
            "flags": dict(s.flags),
            "fake_quant_weight": fq.cpu(),
            "coords": layout.coords(rank),
        }
    return out


def synthetic_model(layers: int, experts: int, seed: int, config: moeq.QuantConfig = moeq.NVFP4) -> nn.Module:
    """A prepared ``layers``-layer model with ``experts`` local experts per GEMM (tiny hidden size) whose quant
    state holds synthetic calibration statistics, ready for ``finalize()`` without a compile."""
    model = nn.Module()
    for i in range(layers):
        block = nn.Module()
        block.gate_up_proj = nn.Parameter(torch.randn(experts, 32, 16))
        block.down_proj = nn.Parameter(torch.randn(experts, 16, 16))
        model.add_module(f"layer{i}", block)
    moeq.prepare(model, config)
    state = moeq.runtime.calibrate.get_state(model)
    g = torch.Generator().manual_seed(seed)
    for fqn, p in model.named_parameters():
        s = state.get_or_create(fqn, tuple(p.shape), 0, -1)
        s.observed_input_amax.copy_(torch.rand(experts, generator=g))
        s.tokens_per_expert.copy_(torch.randint(0, 5, (experts,), generator=g))
    state.calibration_sessions = 1
    return model


def synthetic_finalize(layers: int, experts: int, groups: ProcessGroups | None, seed: int) -> tuple[dict, float]:
    """Finalize a :func:`synthetic_model`: the collectives issued and the wall time."""
    from moeq.runtime.collectives import collective_log

    model = synthetic_model(layers, experts, seed)
    groups = groups or ProcessGroups()
    start = time.perf_counter()
    moeq.finalize(model, ep_group=groups.ep, tp_group=groups.tp, dp_group=groups.dp)
    return dict(collective_log), time.perf_counter() - start


#: one rank cannot finalize (the case, the rank); every rank of the job must raise, none may wait in a collective
REFUSALS = {
    "uncalibrated": 1,  # this rank never ran calibrate()
    "nothing-rewritten": 2,  # this rank's model never ran: no expert GEMM in its state
    "extra-layer": 3,  # this rank holds one more expert GEMM pair than its peers
    "nan-weight": 0,  # a NaN in one of this rank's experts (its EP peers hold other experts)
    "nan-column-shard": 1,  # a NaN in this rank's channels of a column-parallel weight with channel-wise scales
}


def refusal_outcome(case: str, rank: int, groups: ProcessGroups) -> str:
    """Finalize a synthetic model with ``case``'s defect on rank ``REFUSALS[case]``: the exception raised, as
    ``"Type: message"``, or ``"finalized"``."""
    culprit = rank == REFUSALS[case]
    config = moeq.FP8_DYNAMIC if case == "nan-column-shard" else moeq.NVFP4
    model = synthetic_model(3 if case == "extra-layer" and culprit else 2, 4, rank, config)
    state = moeq.runtime.calibrate.get_state(model)
    if case == "nan-column-shard":
        state["layer0.gate_up_proj"].tp_shard = "column"
        state["layer1.gate_up_proj"].tp_shard = "column"
    if culprit:
        if case == "uncalibrated":
            state.calibration_sessions = 0
        elif case == "nothing-rewritten":
            model = synthetic_model(0, 4, rank)
        elif case.startswith("nan"):
            with torch.no_grad():
                model.layer0.gate_up_proj[1, 2, 3] = float("nan")
    try:
        moeq.finalize(model, ep_group=groups.ep, tp_group=groups.tp, dp_group=groups.dp)
    except (RuntimeError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return "finalized"


def run_jobs(rank: int, layout: Layout, out_dir: str, jobs: list[dict[str, Any]]) -> None:
    """Run ``jobs`` on this rank of ``layout``. Each job: ``name``, ``fmt``; optional ``starve`` (global
    experts that get no token in layer 0), ``save`` / ``load`` (checkpoint paths); or ``synthetic`` with
    ``layers`` and ``experts`` (count the collectives of a large synthetic finalize); or ``refusals`` (every case
    of :data:`REFUSALS`)."""
    groups, world_group = make_groups(layout, rank)
    if groups is None:
        return
    for job in jobs:
        if job.get("refusals"):
            outcomes = {case: refusal_outcome(case, rank, groups) for case in REFUSALS}
            torch.save(outcomes, os.path.join(out_dir, f"{job['name']}-rank{rank}.pt"))
            continue
        if job.get("synthetic"):
            result: dict[Any, Any] = {n: synthetic_finalize(n, job["experts"], groups, rank) for n in job["layers"]}
            torch.save(result, os.path.join(out_dir, f"{job['name']}-rank{rank}.pt"))
            continue
        model = build(layout, rank, groups, job["fmt"])
        if job.get("starve"):
            starve_experts(model, 0, job["starve"])
        if "load" in job:
            moeq.load_state(model, job["load"], ep_group=groups.ep, tp_group=groups.tp, process_group=world_group)
            compiled = compile_experts(model)
        else:
            compiled = calibrate_and_finalize(model, layout, rank, groups, job.get("megatron", False))
        if "save" in job:
            moeq.save_state(model, job["save"], ep_group=groups.ep, tp_group=groups.tp, process_group=world_group)
        logits = compiled(eval_batch()).logits.detach().cpu()
        result = {"params": per_expert_params(model, layout, rank), "logits": logits}
        torch.save(result, os.path.join(out_dir, f"{job['name']}-rank{rank}.pt"))
        torch._dynamo.reset()


def worker(
    rank: int,
    world: int,
    init_file: str,
    out_dir: str,
    plan: list[tuple[Layout, list[dict[str, Any]]]],
    backend: str = "gloo",
) -> None:
    """One process of the job: every layout of ``plan`` in turn (layouts smaller than the job use its
    first ranks; the others wait at the barrier)."""
    init_process_group(rank, world, init_file, backend)
    try:
        for layout, jobs in plan:
            run_jobs(rank, layout, out_dir, jobs)
            dist.barrier()
    finally:
        dist.destroy_process_group()
