"""Where every benchmark leaves its results: ``NAME.json`` (all details) and ``NAME.txt`` (the table)."""

from __future__ import annotations

import json
import os
from typing import Any


def save_report(out_dir: str, name: str, details: dict[str, Any], table: str | None = None) -> None:
    """Write ``details`` to ``out_dir/name.json`` and, if given, ``table`` to ``out_dir/name.txt``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as fh:
        json.dump(details, fh, indent=1)
    if table is not None:
        with open(os.path.join(out_dir, f"{name}.txt"), "w") as fh:
            fh.write(table + "\n")


def device_name() -> str:
    """The GPU's name, or the CPU's on a smoke run."""
    import platform

    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"


def print_and_save(out_dir: str, name: str, header: list[str], rows: list[list[str]], **details: Any) -> None:
    """Print the run's table under a device / torch / triton / date line and save it with ``details`` (plus the
    device and versions) through :func:`save_report`."""
    import time

    import torch
    import triton

    from moeq.passes.explain import format_table

    device, table = device_name(), format_table(header, rows)
    print(f"\n{device}  torch {torch.__version__}  triton {triton.__version__}  {time.strftime('%Y-%m-%d')}")
    print(table)
    save_report(
        out_dir, name, dict(device=device, torch=torch.__version__, triton=triton.__version__, **details), table
    )
