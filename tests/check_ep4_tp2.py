"""EP=4 x TP=2 on 8 gloo processes: ``test_distributed.py``'s layout-invariance check for the one layout of
DESIGN.md's EP {1, 2, 4} x TP {1, 2} matrix that ``make test`` leaves out (8 processes cost about a minute of CI's
two cores; the other five layouts share one 4-process spawn there). ``make check-ep4-tp2`` runs it: every job of
``test_distributed.JOBS`` (FP8 with starved experts, NVFP4, FP8 dynamic), each per-global-expert quant parameter
bit-identical to one process and the output within the TP tolerance of ``test_layout_invariance``."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]

import test_distributed as td  # noqa: E402
from dist_harness import Layout  # noqa: E402


def main() -> None:
    layout = Layout(ep=4, tp=2)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        jobs = [{"name": f"{layout}-{name}", **spec} for name, spec in td.JOBS.items()]
        print(f"{layout}: 8 processes ran {len(jobs)} jobs in {td._spawn(layout.world, out, [(layout, jobs)]):.1f} s")
        for name, spec in td.JOBS.items():
            reference = td._reference(spec["fmt"], "starve" in spec, out)
            td.test_layout_invariance({"dir": out, "reference": {name: reference}}, layout, name)
            print(f"{layout} {name}: every per-global-expert quant parameter bit-identical to one process")
    print(f"passed in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
