"""``python -m moeq demo | inspect | bench`` (also installed as the ``moeq`` console script)."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from moeq.demo import add_config_arguments, add_family_argument, config_from_args


def _inspect(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    import moeq
    from moeq.integrations.hf import tiny_model

    if args.export and args.calib == "all_experts":
        parser.error(
            "--calib all_experts reroutes tokens while the model runs, so it needs torch.compile, not --export"
        )
    model = moeq.prepare(tiny_model(args.family, getattr(torch, args.dtype)), config_from_args(parser, args))
    tokens = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    kwargs = {"use_cache": False}
    if args.export:
        run = moeq.quantize_graph(torch.export.export(model, (tokens,), kwargs=kwargs).module())
    else:
        run = torch.compile(model, backend="moeq_aot_eager")
    with torch.no_grad():
        with moeq.calibrate(run):
            run(tokens, **kwargs)
        moeq.finalize(run)
    print(moeq.explain(model))
    if args.svg:
        moeq.explain(model).to_svg(args.svg)
        print(f"wrote {args.svg}")


def _bench(args: argparse.Namespace) -> None:
    from moeq.formats import expand_per_expert, expert_amax, get_format
    from moeq.passes.explain import format_table

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for e, n, k in [(8, 256, 512), (32, 512, 1024)]:
        w = torch.randn(e, n, k, device=device, dtype=torch.bfloat16)
        amax = expand_per_expert(expert_amax(w), 3)
        for fmt in ("fp8", "nvfp4"):
            f = get_format(fmt)
            f.fake_quant(w, amax)
            start = time.perf_counter()
            for _ in range(3):
                f.fake_quant(w, amax)
            if device == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - start) / 3 * 1e3
            gbs = 2 * w.numel() * w.element_size() / ms / 1e6
            rows.append([f"[{e}, {n}, {k}]", fmt, f"{ms:.2f}", f"{gbs:.2f}"])
    print(f"reference (formats.py) fake quant on {device}; GPU kernels: benchmarks/")
    print(format_table(["weight", "format", "ms", "GB/s (read+write)"], rows))


def main(argv: list[str] | None = None) -> None:
    """The ``moeq`` console script: ``demo``, ``inspect`` or ``bench`` (``argv``: the arguments after the program)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:  # the demo parses its own options (argparse's REMAINDER drops a leading --option)
        from moeq.demo import main as demo_main

        return demo_main(argv[1:], prog="moeq demo")
    parser = argparse.ArgumentParser(prog="moeq", description="per-expert quantization of MoE models")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the quickstart on a built-in tiny MoE (moeq demo -h: its options)")
    inspect = sub.add_parser("inspect", help="print explain() for a built-in tiny MoE")
    add_family_argument(inspect)
    inspect.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the model's dtype")
    add_config_arguments(inspect, "NVFP4")
    inspect.add_argument(
        "--export", action="store_true", help="use torch.export + quantize_graph instead of torch.compile"
    )
    inspect.add_argument("--svg", default=None, help="also draw the rewritten regions to this SVG file")
    sub.add_parser("bench", help="time the reference fake-quant ops on this machine")
    args = parser.parse_args(argv)
    if args.command == "inspect":
        _inspect(args, inspect)
    else:
        _bench(args)


if __name__ == "__main__":
    sys.exit(main())
