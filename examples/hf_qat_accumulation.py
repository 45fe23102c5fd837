"""QAT of a transformers MoE with gradient accumulation: the expert weights are quantized once per optimizer step.

    python examples/hf_qat_accumulation.py [--config FP8|NVFP4] [--steps 20] [--micro-batches 4]

The flow: prepare -> torch.compile(backend="moeq") -> calibrate -> finalize -> QAT steps. Each step accumulates
gradients over several micro-batches inside ``moeq.reuse_weight_codes``, which quantizes every expert weight once
on entry; the micro-batches read those codes instead of quantizing the weights again, and the optimizer steps
after the block. Before training, the script checks that one step's accumulated gradients equal those of the same
micro-batches without the block. A tiny Qwen3-MoE with random weights (no download); runs on CPU or one GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from tqdm import tqdm

import moeq
from moeq.integrations.hf import expert_parameter_names, tiny_model

VOCAB, SEQ = 256, 64


def batch_of(generator: torch.Generator, micro_batches: int, device: torch.device) -> torch.Tensor:
    """Random token ids, one row per micro-batch."""
    return torch.randint(0, VOCAB, (micro_batches, SEQ), generator=generator).to(device)


def accumulate(compiled: torch.nn.Module, tokens: torch.Tensor, reuse: bool) -> float:
    """Forward and backward of each micro-batch (a row of ``tokens``), gradients summed; the mean loss."""
    losses = []
    with moeq.reuse_weight_codes(compiled) if reuse else contextlib.nullcontext():
        for micro in tokens.split(1):
            loss = compiled(micro, labels=micro).loss / tokens.shape[0]
            loss.backward()
            losses.append(loss.detach())
    return float(torch.stack(losses).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="FP8", choices=["FP8", "NVFP4"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--layers", type=int, default=2, help="decoder layers of the tiny model (two expert weights each)"
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    model = moeq.prepare(
        tiny_model("qwen3_moe", torch.bfloat16, num_hidden_layers=args.layers).to(device), getattr(moeq, args.config)
    )
    compiled = torch.compile(model, backend="moeq")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad(), moeq.calibrate(compiled):
        compiled(batch_of(gen, 8, device))
    moeq.finalize(compiled)
    model.train()

    experts = {name: model.get_parameter(name) for name in expert_parameter_names(model)}
    check = batch_of(gen, args.micro_batches, device)
    grads = {}
    for reuse in (False, True):
        model.zero_grad(set_to_none=True)
        accumulate(compiled, check, reuse)
        grads[reuse] = {name: p.grad.clone() for name, p in experts.items()}
    same = all(torch.equal(grads[False][n], grads[True][n]) for n in experts)
    print(f"accumulated expert gradients equal to the block-free step's: {same}")
    with moeq.reuse_weight_codes(compiled) as report:
        pass
    print(f"codes reused for {len(report.reused)} expert weights ({sum(report.reused.values()) / 1e6:.2f} MB)")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    started = time.perf_counter()
    for _ in (bar := tqdm(range(args.steps), desc=f"QAT {args.config}, {args.micro_batches} micro-batches per step")):
        optimizer.zero_grad(set_to_none=True)
        loss = accumulate(compiled, batch_of(gen, args.micro_batches, device), reuse=True)
        optimizer.step()  # outside the block: the next step quantizes the new weights
        bar.set_postfix(loss=f"{loss:.3f}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - started) / max(args.steps, 1) * 1e3
    print(
        f"trained {args.steps} steps, {per_step:.1f} ms per step (first-step compiles included), final loss {loss:.3f}"
    )


if __name__ == "__main__":
    main()
