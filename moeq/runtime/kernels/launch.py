"""Shared launcher plumbing: input validation and the device / interpreter / reference decision."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def run_kernel(t: torch.Tensor, launch: Callable[[], torch.Tensor], reference: Callable[[], torch.Tensor]):
    """CUDA tensors run the Triton kernel; CPU tensors run it under TRITON_INTERPRET=1, else the reference."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and interpreting()):
        return launch()
    return reference()


def _configs(names: tuple[str, str], candidates: list[tuple[int, int, int]]) -> list[triton.Config]:
    """Autotuning candidates ``(block a, block b, warps)``; one small fixed tile under the interpreter."""
    if interpreting():
        return [triton.Config(dict(zip(names, (16, 64))))]
    return [triton.Config(dict(zip(names, (a, b))), num_warps=w) for a, b, w in candidates]


def tile_configs() -> list[triton.Config]:
    """Candidates for the elementwise quant kernels (rows x K tiles, warps). The 2-warp tiles lead on the H200
    (``benchmarks/sweep_quant_kernels.py``: NVFP4 0.85-0.87 of copy, FP8 1.00-1.03)."""
    return _configs(
        ("BLOCK_M", "BLOCK_K"),
        [
            (8, 128, 2),
            (16, 128, 2),
            (32, 128, 4),
            (8, 256, 4),
            (16, 128, 4),
            (16, 256, 4),
            (16, 512, 8),
            (32, 256, 8),
            (64, 128, 8),
            (32, 512, 8),
            (64, 256, 8),
        ],
    )


def observer_configs() -> list[triton.Config]:
    """Candidates for segment_amax (rows x K tiles)."""
    return _configs(
        ("BLOCK_S", "BLOCK_K"),
        [
            (32, 256, 4),
            (64, 256, 8),
            (32, 512, 8),
            (64, 512, 8),
            (128, 256, 8),
            (16, 1024, 8),
            (32, 1024, 8),
            (16, 2048, 8),
        ],
    )
