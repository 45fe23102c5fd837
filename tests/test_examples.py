"""The examples run (a few steps each), so the documented flows stay working."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_megatron_qat_example_runs():
    """prepare -> compile -> calibrate -> finalize -> QAT steps -> freeze -> save_state on a megatron-core
    SequentialMLP; after freeze the deployed output equals the QAT output exactly."""
    pytest.importorskip("megatron.core.transformer.moe.experts")
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "megatron_qat.py"), "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "per-expert module list (autograd.Function inlined)" in run.stdout
    errors = re.search(r"error on held-out batches: (\S+) before QAT, (\S+) after", run.stdout)
    assert errors is not None and 0 < float(errors[1]) < 0.2 and 0 < float(errors[2]) < 0.2, run.stdout[-2000:]
    deploy = re.search(r"deploy vs QAT output, max abs difference: (\S+)", run.stdout)
    assert deploy is not None and float(deploy[1]) == 0.0
    assert "quant state saved (2 module lists)" in run.stdout
