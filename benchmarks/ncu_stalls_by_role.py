"""Warp-stall samples of a warp-specialized kernel, summed per warp role, from Nsight Compute's source page:

    ncu -i qat.ncu-rep --page source --csv --print-source sass | gzip > source.csv.gz
    python benchmarks/ncu_stalls_by_role.py source.csv.gz

A role is the code after each ``USETMAXREG.TRY_ALLOC`` (Gluon's ``warp_specialize`` gives every partition its
register budget), named by that budget: in ``qat_ws_kernel`` 24 registers are the loader warp (and the warpgroup's
idle padding warps), the converter's budget (``GluonConfig.conv_regs``) and the MMA warps' (the largest). Prints,
for each profiled launch, each role's samples, instructions executed and its top stall reasons, then the
instructions with the most samples.
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import re


def launches(path: str) -> list[tuple[list[str], list[list[str]]]]:
    """(header, rows) of each kernel launch in the CSV (each begins with a ``"Kernel Name"`` line)."""
    opener = gzip.open if path.endswith(".gz") else open
    out, header = [], None
    with opener(path, "rt") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if row[0] == "Kernel Name":
                out.append((None, []))
            elif row[0] == "Address":
                header = row
                out[-1] = (header, out[-1][1])
            elif out:
                out[-1][1].append(row)
    return out


def role_of_budgets(rows: list[list[str]]) -> list[str]:
    """Each instruction's role: the register budget of the last ``USETMAXREG.TRY_ALLOC`` before it."""
    roles, current = [], "prologue"
    for row in rows:
        found = re.search(r"USETMAXREG\.TRY_ALLOC\.CTAPOOL UP0, (0x[0-9a-f]+)", row[1])
        if found:
            current = f"{int(found.group(1), 16)} registers"
        roles.append(current)
    return roles


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("csv")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    for n, (header, rows) in enumerate(launches(args.csv)):
        col = {name: i for i, name in enumerate(header)}
        samples, executed = col["Warp Stall Sampling (All Samples)"], col["Instructions Executed"]
        reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
        by_role: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for role, row in zip(role_of_budgets(rows), rows):
            by_role[role]["samples"] += int(row[samples] or 0)
            by_role[role]["instructions"] += int(row[executed] or 0)
            for reason in reasons:
                by_role[role][reason[6:]] += int(row[col[reason]] or 0)
        total = sum(c["samples"] for c in by_role.values())
        print(f"launch {n}: {len(rows)} SASS instructions, {total} samples")
        for role, c in by_role.items():
            top = sorted(((v, k) for k, v in c.items() if k not in ("samples", "instructions")), reverse=True)[:6]
            print(f"  {role:14s} samples {c['samples']:7d} ({c['samples'] / max(total, 1):5.1%}) "
                  f"instructions {c['instructions']:11d}  " + ", ".join(f"{k} {v}" for v, k in top))  # fmt: skip
        hottest = sorted(range(len(rows)), key=lambda i: -int(rows[i][samples] or 0))[: args.top]
        for i in sorted(hottest):
            print(f"    [{i:5d}] {rows[i][samples]:>6s} samples  {rows[i][1].strip()[:80]}")


if __name__ == "__main__":
    main()
