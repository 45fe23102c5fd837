"""Where the CPU test suite's time goes: a pytest plugin that records, per test, torch's compile-phase timings and
every graph Dynamo hands to a moeq backend.

    PYTHONPATH=benchmarks MOEQ_COMPILE_PROFILE=/tmp/profile .venv/bin/python -m pytest -p compile_profile \\
        -m "not interpret" --ignore=tests/interpret -n 2 --dist loadfile
    .venv/bin/python benchmarks/compile_profile.py /tmp/profile

Each worker writes ``<dir>/<worker>.json``; run as a script, this file sums them: the test time, Dynamo's compiles
and their tracing, the backend (moeq's pass, AOTAutograd, Inductor), and how many compiled graphs repeat one traced
before (keyed by Dynamo's graph code, input shapes and compiler; not by quant mode or format, so equal keys can
still be different compiles: an upper bound on what tests sharing a compiled flow could save).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

#: torch's ``dynamo_timed`` phases summed per test
PHASES = {
    "dynamo": "_compile.compile_inner",
    "tracing": "bytecode_tracing",
    "backend": "OutputGraph.call_user_compiler",
    "inductor": "compile_fx_inner",
}

_tests: list[dict[str, Any]] = []
_graphs: list[dict[str, Any]] = []
_current: dict[str, str | None] = {"test": None}


def _phase_totals() -> dict[str, float]:
    from torch._dynamo.utils import compilation_time_metrics

    return {name: sum(compilation_time_metrics.get(key, [])) for name, key in PHASES.items()}


def _keep_metrics_across_resets() -> None:
    """``torch._dynamo.reset()`` (the tests run it around each test) clears ``compilation_time_metrics``: keep them."""
    import torch._dynamo
    import torch._dynamo.utils as dynamo_utils

    def reset_frame_count() -> None:
        dynamo_utils.curr_frame = 0
        dynamo_utils.cumulative_time_spent_ns.clear()

    torch._dynamo.reset_frame_count = reset_frame_count


def _record_moeq_graphs() -> None:
    import moeq.lowering.backend as backend

    compile_graph = backend._compile

    def recording_compile(gm, example_inputs, compiler):
        start = time.perf_counter()
        try:
            return compile_graph(gm, example_inputs, compiler)
        finally:
            shapes = [tuple(x.shape) if hasattr(x, "shape") else type(x).__name__ for x in example_inputs]
            name = getattr(compiler, "__name__", type(compiler).__name__)
            key = hashlib.sha1(f"{gm.code}{shapes}{name}".encode()).hexdigest()[:12]
            _graphs.append(
                {"test": _current["test"], "key": key, "compiler": name, "seconds": time.perf_counter() - start}
            )

    backend._compile = recording_compile


def pytest_configure(config: pytest.Config) -> None:
    _keep_metrics_across_resets()
    _record_moeq_graphs()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _current["test"] = item.nodeid
    before, start = _phase_totals(), time.perf_counter()
    yield
    after = _phase_totals()
    _tests.append(
        {"test": item.nodeid, "wall": time.perf_counter() - start, **{k: after[k] - before[k] for k in after}}
    )


def pytest_sessionfinish(session: pytest.Session) -> None:
    out = Path(os.environ.get("MOEQ_COMPILE_PROFILE", "compile_profile"))
    out.mkdir(parents=True, exist_ok=True)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    (out / f"{worker}.json").write_text(json.dumps({"tests": _tests, "graphs": _graphs}))


def summarize(folder: Path) -> str:
    """The plugin's per-worker records in ``folder``, summed into a few lines."""
    tests, graphs = [], []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        tests += data["tests"]
        graphs += data["graphs"]
    wall = sum(t["wall"] for t in tests)
    lines = [f"{len(tests)} tests, {wall:.0f} s of test time"]
    for name in PHASES:
        total = sum(t[name] for t in tests)
        lines.append(f"  {name:<9} {total:7.0f} s  {100 * total / max(wall, 1e-9):4.0f}%")
    by_key: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for g in graphs:
        by_key[g["key"]].append(g)
    repeats = [g for same in by_key.values() for g in same[1:]]
    lines.append(
        f"{len(graphs)} graphs through moeq backends ({dict(collections.Counter(g['compiler'] for g in graphs))}), "
        f"{len(by_key)} distinct; {len(repeats)} repeat a traced graph, "
        f"{sum(g['seconds'] for g in repeats):.0f} s of backend time"
    )
    by_file = collections.Counter(g["test"].split("::")[0] for g in repeats if g["test"])
    lines += [f"  {n:4d} repeats  {f}" for f, n in by_file.most_common(10)]
    slowest = sorted(tests, key=lambda t: -t["wall"])[:15]
    lines.append("slowest tests: wall / dynamo / tracing / backend / inductor (s)")
    lines += [
        f"  {t['wall']:6.1f} {t['dynamo']:6.1f} {t['tracing']:6.1f} {t['backend']:6.1f} {t['inductor']:6.1f}  {t['test']}"
        for t in slowest
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1] if len(sys.argv) > 1 else "compile_profile")))
