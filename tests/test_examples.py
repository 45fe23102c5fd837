"""The examples run (a few steps each), so the documented flows stay working."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import inductor_settings_source

ROOT = Path(__file__).resolve().parents[1]
#: runs ``argv[1]`` as ``__main__`` with the rest as its arguments under the Inductor settings conftest's
#: ``_inductor_aten_fallback`` gives the tests' own CPU compiles (no environment variable sets them)
RUN_WITH_TEST_SETTINGS = (
    f"{inductor_settings_source()}; import runpy, sys; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def test_megatron_qat_example_runs():
    """prepare -> compile -> calibrate -> finalize -> QAT steps (two micro-batches each inside
    ``moeq.reuse_weight_codes``) -> freeze -> save_state on a megatron-core SequentialMLP; after freeze the deployed
    output equals the QAT output exactly."""
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
    assert "expert weights quantized once per step: 2 module lists" in run.stdout


def test_hf_qat_accumulation_example_runs():
    """QAT of a tiny transformers Qwen3-MoE with gradient accumulation inside ``moeq.reuse_weight_codes``: the
    example's own check (one step's gradients equal the block-free step's) holds, both expert weights of its one
    layer are read from codes, and the training steps run. Its ``backend="moeq"`` compiles run, as the other CPU
    tests', with Inductor's ATen fallback for the ops moeq does not lower (92 -> 43 s of CPU: no C++ generated for
    attention, norms or routing); under ``MOEQ_TEST_FULL_INDUCTOR=1`` those settings are Inductor's defaults."""
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            RUN_WITH_TEST_SETTINGS,
            str(ROOT / "examples" / "hf_qat_accumulation.py"),
            *"--steps 2 --micro-batches 3 --layers 1".split(),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "accumulated expert gradients equal to the block-free step's: True" in run.stdout, run.stdout
    assert "codes reused for 2 expert weights" in run.stdout, run.stdout
    assert re.search(r"trained 2 steps, .* final loss \d", run.stdout), run.stdout
