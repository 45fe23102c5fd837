"""Sharded safetensors writing shared by the exporters: shard planning, the index file, atomic directories.

Shards are named as ``save_pretrained`` names them (``model.safetensors`` when there is one shard, else
``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``). Under expert parallelism every
rank plans its own shards, the plans are gathered so each rank knows the global shard numbering, each rank
writes its own files and rank 0 writes the index.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = [
    "commit_dir",
    "parse_size",
    "plan_shards",
    "shard_names",
    "temp_dir_for",
    "tensor_nbytes",
    "write_index",
    "write_shards",
]

logger = logging.getLogger(__name__)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes of ``5GB`` / ``500MiB`` / ``1000`` (decimal units as transformers uses them, ``*iB`` binary)."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", size.upper())
        if m is None or m.group(2) not in _UNITS:
            raise ValueError(f"max_shard_size={size!r} is not a size such as 5GB, 500MB or 1000000")
        value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Greedy split of ``tensors`` (in key order) into shards of at most ``max_bytes`` (a bigger tensor
    gets a shard of its own)."""
    shards: list[list[str]] = []
    size = 0
    for key in tensors:
        n = tensor_nbytes(tensors[key])
        if not shards or (size + n > max_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards


def shard_names(total: int) -> list[str]:
    """File names of ``total`` shards, as ``save_pretrained`` writes them."""
    if total == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]


def write_shards(
    directory: Path, tensors: dict[str, torch.Tensor], shards: list[list[str]], names: list[str], metadata: dict
) -> None:
    """Write each shard's tensors to its file in ``directory``."""
    for keys, name in zip(shards, names, strict=True):
        save_file({k: tensors[k].contiguous() for k in keys}, str(directory / name), metadata=metadata)
        logger.debug("moeq: wrote %s (%d tensors)", name, len(keys))


def write_index(directory: Path, weight_map: dict[str, str], total_size: int) -> None:
    """``model.safetensors.index.json`` (only when there is more than one shard, as transformers does)."""
    if len(set(weight_map.values())) <= 1:
        return
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def temp_dir_for(out_dir: Path, token: str | None = None) -> Path:
    """A fresh sibling of ``out_dir`` to write into (same file system, so the final rename is atomic)."""
    token = token or uuid.uuid4().hex[:12]
    return out_dir.parent / f".{out_dir.name}.moeq-tmp-{token}"


def commit_dir(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``out_dir`` with a rename; an existing ``out_dir`` is replaced only with
    ``overwrite`` (moved aside first, deleted after the rename succeeded)."""
    old = None
    if out_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it")
        old = out_dir.parent / f".{out_dir.name}.moeq-old-{uuid.uuid4().hex[:12]}"
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
