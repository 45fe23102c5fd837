"""Worker of the data-parallel ``calib="all_experts"`` test (tests/test_all_experts.py): one gloo rank of a DP=2 job.

Kept apart from the test module so that spawned ranks import only moeq and transformers. Each rank holds the whole
tiny model, calibrates on its own batch with every token through every expert, finalizes with ``dp_group`` and
saves its per-expert statistics.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import moeq
from moeq.integrations.hf import tiny_model

#: the statistics the test compares across ranks and with one process
STATISTICS = ("input_amax", "observed_input_amax", "tokens_per_expert", "calibrated")


def calibration_batch(rank: int) -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(10 + rank))


def run_rank(rank: int, world: int, tmp: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    try:
        config = moeq.FP8.replace(act_scale="per_expert", calib="all_experts")
        model = moeq.prepare(tiny_model("qwen3_moe", torch.float32, num_hidden_layers=1), config)
        cm = torch.compile(model, backend="moeq_aot_eager")
        with torch.no_grad(), moeq.calibrate(cm):
            cm(calibration_batch(rank))
        moeq.finalize(cm, dp_group=dist.group.WORLD)
        stats = {fqn: {k: getattr(s, k).clone() for k in STATISTICS} for fqn, s in moeq.quant_state(model).items()}
        torch.save(stats, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
