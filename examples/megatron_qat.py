"""Quantization-aware training of a megatron-core ``SequentialMLP`` (per-expert module lists) with moeq.

    python examples/megatron_qat.py [--config NVFP4|FP8] [--steps 150] [--backend moeq|moeq_aot_eager]

The flow: prepare -> torch.compile -> calibrate (full precision, grad enabled) -> finalize -> QAT steps (moeq
inlines megatron's linear autograd Functions so every expert GEMM is fake-quantized with an STE backward; each step
accumulates ``--micro-batches`` micro-batches inside ``moeq.reuse_weight_codes``, so the expert weights are quantized
once per optimizer step) ->
freeze (weights stored quantized) -> deploy forward -> save_state. The student learns to match the full-precision
module (the same seeded weights, left unquantized) on random routed tokens; the script prints the quantization error
before and after QAT. Needs megatron-core (``pip install -e .[megatron]``); runs on CPU or one GPU.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import moeq

EXPERTS, HIDDEN, FFN, TOKENS = 4, 64, 128, 4096


def sequential_mlp(device: torch.device) -> torch.nn.Module:
    """A megatron-core SequentialMLP on one rank (every parallel group is this process's one-rank group)."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    cfg = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=FFN, moe_ffn_hidden_size=FFN,
        num_moe_experts=EXPERTS, gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        bias_activation_fusion=False, use_cpu_initialization=True, params_dtype=torch.float32,
        gradient_accumulation_fusion=False,  # a fused wgrad into main_grad is not a plain linear: moeq would not inline it
    )  # fmt: skip
    group = dist.group.WORLD
    groups = ProcessGroupCollection(tp=group, ep=group, expt_tp=group, expt_dp=group)
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return SequentialMLP(EXPERTS, cfg, submodules, pg_collection=groups).to(device)


def routed_batch(generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens already permuted by expert (as megatron's dispatcher hands them over), counts and routing probs."""
    experts = torch.randint(0, EXPERTS, (TOKENS,), generator=generator)
    counts = torch.bincount(experts, minlength=EXPERTS)
    x = torch.randn(TOKENS, HIDDEN, generator=generator) * (1 + experts.sort().values[:, None] / EXPERTS)
    probs = torch.rand(TOKENS, generator=generator)
    return x.to(device), counts, probs.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="NVFP4", choices=["NVFP4", "FP8"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--micro-batches", type=int, default=2, help="gradient accumulation per optimizer step")
    parser.add_argument("--backend", default=None, help="default: moeq on CUDA, moeq_aot_eager on CPU")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = args.backend or ("moeq" if device.type == "cuda" else "moeq_aot_eager")
    warnings.filterwarnings("ignore", module="megatron")
    torch._dynamo.config.capture_scalar_outputs = True  # tokens_per_expert.tolist() inside one graph

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
        torch.manual_seed(0)
        student = sequential_mlp(device)
        torch.manual_seed(0)  # the same weights (its process groups cannot be deep-copied)
        teacher = sequential_mlp(device).requires_grad_(False)
        moeq.prepare(student, getattr(moeq, args.config))
        compiled = torch.compile(student, backend=backend)
        gen = torch.Generator().manual_seed(0)

        with moeq.calibrate(compiled):
            for _ in range(4):
                compiled(*routed_batch(gen, device))
        moeq.finalize(compiled)
        held_out = [routed_batch(torch.Generator().manual_seed(1000 + i), device) for i in range(4)]

        def quantization_error() -> float:
            with torch.no_grad():
                err = [F.mse_loss(compiled(*b)[0], teacher(*b)[0]) / teacher(*b)[0].pow(2).mean() for b in held_out]
            return float(torch.stack(err).mean())

        before = quantization_error()
        print(moeq.explain(compiled))
        optimizer = torch.optim.Adam(student.parameters(), lr=args.lr)
        for _ in (bar := tqdm(range(args.steps), desc=f"QAT {args.config}")):
            optimizer.zero_grad(set_to_none=True)
            with moeq.reuse_weight_codes(compiled) as reused:  # each module list quantized once for the step
                for _ in range(args.micro_batches):
                    batch = routed_batch(gen, device)
                    loss = F.mse_loss(compiled(*batch)[0], teacher(*batch)[0]) / args.micro_batches
                    loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item() * args.micro_batches:.3e}")
        print(f"expert weights quantized once per step: {len(reused.reused)} module lists")
        after = quantization_error()
        print(f"relative quantization error on held-out batches: {before:.4e} before QAT, {after:.4e} after")

        with torch.no_grad():
            qat_out = compiled(*held_out[0])[0]
            moeq.freeze(compiled)  # weights replaced by their stored quantized form
            deployed = compiled(*held_out[0])[0]
        print(f"deploy vs QAT output, max abs difference: {(deployed - qat_out).abs().max().item():.3e}")
        moeq.save_state(compiled, f"{tmp}/quant_state")
        print(f"quant state saved ({len(moeq.quant_state(compiled))} module lists)")
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
