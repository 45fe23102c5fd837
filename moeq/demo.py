"""The quickstart: quantize the experts of a tiny Qwen3-MoE to NVFP4 through ``torch.compile``.

Random weights, synthetic tokens, no download. Run it with ``make demo``, ``python -m moeq demo`` or
``python examples/quickstart.py``. Each step below is what a user writes.
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

import moeq
from moeq.config import CALIB_MODES, PRESETS
from moeq.integrations.hf import TINY_FAMILIES, TINY_FAMILIES_BF16_ONLY, tiny_model

__all__ = ["main", "run_quickstart"]


def default_dtype(family: str, device: str) -> torch.dtype:
    """bf16 on CUDA and for the families whose experts are per-expert loops (``torch._grouped_mm``, which moeq
    rewrites them into, takes bf16 only); float32 otherwise, where the CPU reference path is exact to compare."""
    bf16 = device.startswith("cuda") or family in TINY_FAMILIES_BF16_ONLY
    return torch.bfloat16 if bf16 else torch.float32


def run_quickstart(
    family: str = "qwen3_moe",
    config: moeq.QuantConfig = moeq.NVFP4,
    backend: str = "moeq",
    batches: int = 8,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Prepare, compile, calibrate and finalize a tiny ``family`` MoE, then print ``moeq.explain`` and the output
    error against the unquantized model. On ``device="cuda"`` the model runs in bf16 and the expert GEMMs run moeq's
    Triton kernels (the report's lowering section says which); on the CPU (float32) each moeq op runs its torch
    reference, except for the families whose experts are per-expert loops (``TINY_FAMILIES_BF16_ONLY``), which run in
    bf16 as ``torch._grouped_mm`` needs. ``dtype`` overrides that choice."""
    torch.manual_seed(seed)
    dtype = dtype or default_dtype(family, device)
    model = tiny_model(family, dtype, seed=seed).to(device)
    vocab = model.config.vocab_size
    calib = [torch.randint(0, vocab, (4, 32), device=device) for _ in range(batches)]
    test = torch.randint(0, vocab, (4, 32), device=device)
    with torch.no_grad():
        reference = model(test).logits

    # 1. attach per-expert quant state (switches the HF experts to grouped_mm) and compile
    model = moeq.prepare(model, config)
    cmodel = torch.compile(model, backend=backend)

    # 2. calibrate: full-precision forwards, observers record per-expert statistics
    start = time.perf_counter()
    with torch.no_grad(), moeq.calibrate(cmodel):
        for batch in tqdm(calib, desc="calibrating", unit="batch"):
            cmodel(batch)

    # 3. finalize: weight amax from the weights, input amax from routed tokens, fallbacks, checks
    moeq.finalize(cmodel)

    # 4. the compiled model now runs per-expert fake quantization
    with torch.no_grad():
        quantized = cmodel(test).logits
    elapsed = time.perf_counter() - start

    print()
    print(moeq.explain(cmodel))
    quantized, reference = quantized.float(), reference.float()
    rel = ((quantized - reference).norm() / reference.norm()).item()
    agree = (quantized.argmax(-1) == reference.argmax(-1)).float().mean().item()
    print()
    print(f"relative output error vs the unquantized model: {rel:.4f}")
    print(f"next-token argmax agreement: {agree:.1%}")
    if config.calib == "all_experts":
        print("per-expert calibration coverage (rows each expert observed: every token, plus those routed to it):")
    else:
        print("per-expert calibration coverage (tokens routed to each expert):")
    for fqn, state in moeq.quant_state(model).items():
        if fqn.endswith("gate_up_proj") or fqn.endswith("w1"):
            print(f"  {fqn}: {state.tokens_per_expert.tolist()}")
    print(f"calibrate + finalize + quantized forward (incl. compilation): {elapsed:.1f}s")
    return {"relative_error": rel, "argmax_agreement": agree, "seconds": elapsed}


def add_family_argument(parser: argparse.ArgumentParser) -> None:
    """``--family``: one of the built-in tiny transformers MoE models (random weights, no download)."""
    parser.add_argument(
        "--family", default="qwen3_moe", choices=sorted(TINY_FAMILIES), help="tiny model family (default: qwen3_moe)"
    )


def add_config_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    """``--config`` (a preset name) and ``--calib`` (``QuantConfig.calib``), read back by :func:`config_from_args`."""
    parser.add_argument("--config", default=default, choices=PRESETS, help=f"a moeq preset (default: {default})")
    parser.add_argument("--calib", default="routed", choices=CALIB_MODES, help="QuantConfig.calib (default: routed)")


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> moeq.QuantConfig:
    """The preset ``--config`` with ``--calib``; an impossible pair ends in the parser's usage error."""
    try:
        return getattr(moeq, args.config).replace(calib=args.calib)
    except ValueError as err:
        parser.error(str(err))


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    add_family_argument(parser)
    add_config_arguments(parser, "NVFP4")
    parser.add_argument(
        "--backend", default="moeq", choices=["moeq", "moeq_aot_eager"], help="moeq (Inductor) or moeq_aot_eager"
    )
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu (float32, the torch reference of each moeq op; default) or cuda (bf16, moeq's Triton kernels)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="default: float32 on the CPU (bfloat16 for per-expert-loop families), bfloat16 on CUDA",
    )
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch build sees no CUDA device")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    config = config_from_args(parser, args)
    run_quickstart(args.family, config, args.backend, args.batches, device=args.device, dtype=dtype)


if __name__ == "__main__":
    main()
