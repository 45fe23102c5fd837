"""Probe: the in-place STE weight mask (``mask_clipped_grad_``) on a Qwen3-30B-A3B gate_up-sized weight, as the
QAT FP8 training step runs it (the wgrad GEMM's ``[E, K, N]`` output masked through its ``[E, N, K]`` permuted
view, the weight in HF's ``[E, N, K]``), with and without the weight's FP8 codes, over tiles and warps; and the same
with a gradient laid out like the weight. Each variant is checked bit for bit against torch's
``g * (|w| <= amax)`` first; prints achieved read bandwidth (the bytes the kernel must read: 2 per element from the
weight, 1 from the codes) against an HBM copy in the same run; and the codes read four per 32-bit word (moeq's
path since session 21). JSON to ``--out``.

    python benchmarks/probe_ste_mask.py --out $OUT/ste_mask.json
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
import triton
from bench_grouped_qmm import copy_bandwidth
from triton.testing import do_bench

from moeq.runtime.kernels import fake_quant_experts
from moeq.runtime.kernels.ste_mask import _CODES_MIN_AMAX, _mask_clipped_grad_kernel

WORD_TILES = [(16, 256, 4), (16, 512, 4), (32, 256, 4), (8, 1024, 4), (32, 512, 8)]
TILES = [(8, 256, 4), (16, 256, 4), (32, 256, 8), (4, 1024, 4), (8, 512, 8), (64, 64, 4), (32, 128, 4), (16, 512, 8)]


def launch(g, w, amax, codes, block_m, block_n, warps, words=False):
    """moeq's mask kernel at one tile; ``words``: test the codes four per 32-bit word (contiguous codes along N)."""
    num_experts, m, n = w.shape
    bits = codes if codes is not None else amax
    c_strides = codes.stride() if codes is not None else (0, 0, 0)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), num_experts)
    _mask_clipped_grad_kernel[grid](
        g, w, amax, bits, bits.view(torch.int32) if words else bits, m, n, *g.stride(), *w.stride(), *c_strides,
        CODES=codes is not None, WORDS=words, CODES_MIN_AMAX=_CODES_MIN_AMAX, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps,
    )  # fmt: skip
    return g


def measure(rows: list[dict], what: str, run, g: torch.Tensor, want: torch.Tensor, read: int, copy_tbs: float) -> None:
    """Check ``run(g)`` (the mask applied in place to a fresh gradient) bit for bit against ``want``, time it, and
    record / print the achieved read bandwidth of its ``read`` bytes."""
    try:
        got = run(g)
        torch.cuda.synchronize()
        exact = bool(torch.equal(got.view(torch.int16), want.view(torch.int16)))
        ms = do_bench(functools.partial(run, g), warmup=10, rep=50, return_mode="median")
    except Exception as exc:
        print(f"{what}  ERROR {str(exc)[:150]}", flush=True)
        rows.append(dict(what=what, error=str(exc)[:300]))
        return
    tbs = read / ms / 1e9
    rows.append(dict(what=what, ms=ms, read_TBs=tbs, of_copy=tbs / copy_tbs, exact=exact))
    print(f"{what}  {ms * 1e3:8.1f} us  {tbs:5.2f} TB/s read  {tbs / copy_tbs:4.2f}x copy  exact {exact}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    num_experts, n, k = 128, 1536, 2048
    w = torch.randn(num_experts, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    amax = w.float().abs().amax(dim=(1, 2)) * 0.999  # a few weights clip, as after an optimizer step
    codes = fake_quant_experts(w, amax, "fp8", -1, codes=True).view(torch.uint8)
    g_kn = torch.randn(num_experts, k, n, device="cuda", dtype=torch.bfloat16)
    want = (g_kn.transpose(1, 2) * (w.abs() <= amax.view(-1, 1, 1))).clone()
    copy_tbs = copy_bandwidth()
    rows: list[dict] = []
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  copy "
          f"{copy_tbs:.2f} TB/s", flush=True)  # fmt: skip
    for layout in ("wgrad [E,K,N] permuted", "grad like w"):
        for use_codes in (False, True):
            for bm, bn, warps in TILES:
                fresh = g_kn.clone() if layout.startswith("wgrad") else g_kn.transpose(1, 2).contiguous()
                g = fresh.transpose(1, 2) if layout.startswith("wgrad") else fresh
                run = functools.partial(launch, w=w, amax=amax, codes=codes if use_codes else None, block_m=bm,
                                        block_n=bn, warps=warps)  # fmt: skip
                what = f"{layout:22s} codes={use_codes!s:5s} {bm}x{bn} w{warps}"
                measure(rows, what, run, g, want, w.numel() * (1 if use_codes else 2), copy_tbs)
    for bm, bn, warps in WORD_TILES:
        run = functools.partial(launch, w=w, amax=amax, codes=codes, block_m=bm, block_n=bn, warps=warps, words=True)
        what = f"{'wgrad [E,K,N] permuted':22s} codes as words {bm}x{bn} w{warps}"
        measure(rows, what, run, g_kn.clone().transpose(1, 2), want, w.numel(), copy_tbs)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           copy_TBs=copy_tbs, rows=rows), f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
