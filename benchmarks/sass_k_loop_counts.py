"""Instructions per k-step in the SASS of the QAT NVFP4 Gluon kernels' fast path, without a GPU.

Compiles each configuration for sm_90 with this Triton's ptxas from a copy of ``qat_gluon`` in which the runtime
fast-range branch (``if g_fast:``, global scales in ``[2^-40, 2^40]``: every realistic weight) is always taken, so the
loops counted are the ones that run. For the register-operand kernel the loop is the MMA warps' k-loop (without and
with a 64-row tail); for the shipped kernel it is the converter warps' k-loop. Per weight value: the loop's
instructions over the values a thread converts in one k-step.

    python benchmarks/sass_k_loop_counts.py            # every register-operand and shipped NVFP4 configuration
    python benchmarks/sass_k_loop_counts.py --only 0   # REGISTER_A_CONFIGS[0] and NVFP4_CONFIGS[0]
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import pathlib
import re
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


from moeq.runtime.kernels import qat_gluon  # noqa: E402

FAST_BRANCH = "    if g_fast:\n"


def fast_path_module():
    """``qat_gluon`` with every ``if g_fast:`` taken, loaded from a file of its own (Gluon reads the source)."""
    source = pathlib.Path(qat_gluon.__file__).read_text()
    if FAST_BRANCH not in source:
        raise SystemExit("qat_gluon has no 'if g_fast:' branch to force; update this script")
    path = pathlib.Path(tempfile.mkdtemp()) / "qat_gluon_fast_path.py"
    path.write_text(source.replace(FAST_BRANCH, "    if True:  # the fast range, for counting\n"))
    spec = importlib.util.spec_from_file_location("qat_gluon_fast_path", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def innermost_loops(sass: str) -> list[list[str]]:
    """Bodies of the backward branches in ``get_sass``'s listing that hold no other such loop."""
    code, labels, spans = [], {}, []
    for line in sass.splitlines():
        if re.fullmatch(r"\w+:", line.strip()):
            labels[line.strip()[:-1]] = len(code)
        elif "\t" in line:
            code.append(line.split("\t", 1)[1].strip().rstrip(";"))
            target = re.search(r"BRA\W*(\w+)", code[-1])
            if target and target.group(1) in labels:
                spans.append((labels[target.group(1)], len(code)))
    inner = [(a, b) for a, b in spans if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans)]
    return [code[a:b] for a, b in inner]


def opcode(instruction: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0]


def count(config) -> list[tuple[int, collections.Counter]]:
    """(instructions, opcode counts) of each k-loop of ``config``'s fast path."""
    kernel = config._replace(persistent=False).compile_for_sm90()
    loops = [body for body in innermost_loops(qat_gluon.sass(kernel.asm["cubin"])) if not any("LDG" in t for t in body)]
    if config.register_a:
        loops = [body for body in loops if any("GMMA" in t for t in body)]
    else:  # the converter: no wgmma, stores the converted tile to shared memory
        loops = [b for b in loops if not any("GMMA" in t for t in b) and any(opcode(t).startswith("STS") for t in b)]
    return [(len(body), collections.Counter(map(opcode, body))) for body in loops]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", type=int, default=None, help="one index into both configuration lists")
    args = parser.parse_args()
    module = fast_path_module()
    configs = [*module.REGISTER_A_CONFIGS, *module.NVFP4_CONFIGS]
    if args.only is not None:
        configs = [module.REGISTER_A_CONFIGS[args.only], module.NVFP4_CONFIGS[args.only]]
    print(f"{'configuration':96s} {'instr/k-step':>12s} {'per value':>9s}  top opcodes")
    for config in configs:
        threads = 32 * (config.mma_warps if config.register_a else config.conv_warps)
        values = config.bn * config.bk // threads
        for instructions, ops in count(config):
            top = ", ".join(f"{k} {v}" for k, v in ops.most_common(6))
            print(f"{config.name:96s} {instructions:12d} {instructions / values:9.2f}  {top}", flush=True)


if __name__ == "__main__":
    main()
