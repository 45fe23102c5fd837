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
