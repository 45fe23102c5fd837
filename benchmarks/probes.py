"""What the ``probe_*.py`` design experiments share (each kept so its recorded numbers can be reproduced):
random inputs on Qwen3-30B-A3B shapes, the float64 reference of the FP8 codes product, rows that are checked
and then timed (CUDA-graph replays, ``bench_grouped_qmm.bench``), the printed table and the JSON file."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import triton
from bench_grouped_qmm import bench, routing


@dataclass
class ProbeInputs:
    """``x [rows, K]`` bf16, expert weights ``w_nk [E, N, K]`` (HF's layout; ``w`` is the ``[E, K, N]`` view
    the GEMM takes), int32 cumulative ``offs``, per-expert weight amax and a shared activation amax."""

    x: torch.Tensor
    w_nk: torch.Tensor
    offs: torch.Tensor
    w_amax: torch.Tensor
    x_amax: torch.Tensor

    @property
    def w(self) -> torch.Tensor:
        return self.w_nk.transpose(1, 2)

    @property
    def flops(self) -> float:
        return 2.0 * self.x.shape[0] * self.x.shape[1] * self.w_nk.shape[1]


def probe_inputs(k: int, n: int, rows: int, num_experts: int = 128) -> ProbeInputs:
    """Random inputs (seed 0) with ``rows`` routed rows spread over the experts (``bench_grouped_qmm.routing``)."""
    torch.manual_seed(0)
    offs = routing(rows, num_experts)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w_nk = torch.randn(num_experts, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    return ProbeInputs(x, w_nk, offs, w_nk.float().abs().amax(dim=(1, 2)), x.float().abs().amax().reshape(1))


def fp8_codes_reference(p: ProbeInputs) -> torch.Tensor:
    """The QAT FP8 / W8A8 product in float64: torch's own e4m3 casts of ``x / s`` and ``w / s`` (IEEE
    division), multiplied per expert, times both scales."""
    x_s, w_s = p.x_amax / 448, p.w_amax / 448
    xc = (p.x.float() / x_s).clamp(-448, 448).to(torch.float8_e4m3fn).double()
    wc = (p.w.float() / w_s[:, None, None]).clamp(-448, 448).to(torch.float8_e4m3fn).double()
    ref = torch.zeros(p.x.shape[0], p.w_nk.shape[1], dtype=torch.float64, device="cuda")
    bounds = [0] + p.offs.tolist()
    for e in range(p.w_nk.shape[0]):
        s, t = bounds[e], bounds[e + 1]
        ref[s:t] = (xc[s:t] @ wc[e]) * (p.x_amax.double() / 448) * (p.w_amax[e].double() / 448)
    return ref


@dataclass
class ProbeTable:
    """Rows of one case: each output checked against ``ref`` (relative Frobenius error), then timed; a row that
    fails (out of resources etc.) is recorded with its error and the probe goes on."""

    label: str
    ref: torch.Tensor
    flops: float
    warmup: int = 10
    rep: int = 50
    rows: list[dict] = field(default_factory=list)

    def record(self, what: str, fn: Callable[[], torch.Tensor], checked: bool = True) -> None:
        try:
            rel = float("nan")
            if checked:
                got = fn().double()
                torch.cuda.synchronize()
                rel = ((got - self.ref).norm() / self.ref.norm()).item()
            ms = bench(fn, warmup=self.warmup, rep=self.rep)
        except Exception as exc:
            self.rows.append(dict(case=self.label, what=what, error=str(exc)[:300]))
            print(f"{self.label:14s} {what:52s} ERROR {str(exc)[:120]}", flush=True)
            return
        self.rows.append(dict(case=self.label, what=what, ms=ms, TFLOPs=self.flops / ms / 1e9, rel=rel))

    def print(self) -> list[dict]:
        """Print the timed rows (ratios to the first, the bf16 anchor); returns every row."""
        timed = [r for r in self.rows if "ms" in r]
        for r in timed:
            print(f"{self.label:14s} {r['what']:52s} {r['ms']:.4f} ms {r['TFLOPs']:7.1f} TFLOP/s  "
                  f"{timed[0]['ms'] / r['ms']:.2f}x bf16  rel {r['rel']:.1e}", flush=True)  # fmt: skip
        return self.rows


def qat_fp8_two_launches(p: ProbeInputs, **flags: bool) -> torch.Tensor:
    """moeq's whole QAT FP8 op without the Gluon kernel (activation codes, weight codes pass, codes GEMM), with
    ``flags`` (e.g. ``WEIGHT_PASS_IN_GEMM``) set on :mod:`moeq.runtime.kernels.grouped_qmm` meanwhile."""
    from moeq.runtime.kernels import grouped_qmm as launcher

    flags = {"GLUON_QAT_FP8": False, **flags}
    saved = {name: getattr(launcher, name) for name in flags}
    for name, value in flags.items():
        setattr(launcher, name, value)
    try:
        return launcher.grouped_qmm(p.x, p.w, p.offs, p.w_amax, None, p.x_amax, "fake_fp8", "fp8")
    finally:
        for name, value in saved.items():
            setattr(launcher, name, value)


def qat_fp8_table(label: str, k: int, n: int, rows: int) -> tuple[ProbeInputs, ProbeTable]:
    """A QAT FP8 probe's inputs and table, opened with its anchors: bf16 ``torch._grouped_mm`` (the first row, which
    the ratios use) and moeq's whole QAT FP8 op as two launches (:func:`qat_fp8_two_launches`)."""
    p = probe_inputs(k, n, rows)
    table = ProbeTable(label, fp8_codes_reference(p), p.flops)
    table.record("torch._grouped_mm bf16", lambda: torch._grouped_mm(p.x, p.w, p.offs))
    table.record("QAT FP8 two launches (whole op)", lambda: qat_fp8_two_launches(p))
    return p, table


def save_probe(path: str | None, results: list[dict]) -> None:
    """The rows as JSON at ``path`` (if given), with the device and versions."""
    if path:
        with open(path, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           results=results), f, indent=1)  # fmt: skip


def qwen3_probe_main(run_case: Callable[[str, int, int, int], list[dict]]) -> None:
    """A probe's command line: ``--rows`` (default 34816) for Qwen3-30B-A3B's gate_up and down, JSON to ``--out``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--rows", type=int, default=34816)
    args = parser.parse_args()
    save_probe(args.out, run_case("gate_up", 2048, 1536, args.rows) + run_case("down", 768, 2048, args.rows))
