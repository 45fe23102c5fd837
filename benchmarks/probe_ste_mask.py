"""Probe: the in-place STE weight mask (``mask_clipped_grad_``) on a Qwen3-30B-A3B gate_up-sized weight, as the
QAT FP8 training step runs it (the wgrad GEMM's ``[E, K, N]`` output masked through its ``[E, N, K]`` permuted
view, the weight in HF's ``[E, N, K]``), with and without the weight's FP8 codes, over tiles and warps; and the same
with a gradient laid out like the weight. Each variant is checked bit for bit against torch's
``g * (|w| <= amax)`` first; prints achieved read bandwidth (the bytes the kernel must read: 2 per element from the
weight, 1 from the codes) against an HBM copy in the same run; and a variant that tests four codes per 32-bit word
(session 20's next step, not in moeq yet). JSON to ``--out``.

    python benchmarks/probe_ste_mask.py --out $OUT/ste_mask.json
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
import triton
import triton.language as tl
from bench_grouped_qmm import copy_bandwidth
from triton.testing import do_bench

from moeq.runtime.kernels import fake_quant_experts
from moeq.runtime.kernels.ste_mask import _CODES_MIN_AMAX, _mask_clipped_grad_kernel, _zero_clipped

WORD_TILES = [(16, 256, 4), (16, 512, 4), (32, 256, 4), (8, 1024, 4), (32, 512, 8)]
TILES = [(8, 256, 4), (16, 256, 4), (32, 256, 8), (4, 1024, 4), (8, 512, 8), (64, 64, 4), (32, 128, 4), (16, 512, 8)]


def launch(g, w, amax, codes, block_m, block_n, warps):
    num_experts, m, n = w.shape
    bits = codes if codes is not None else amax
    c_strides = codes.stride() if codes is not None else (0, 0, 0)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), num_experts)
    _mask_clipped_grad_kernel[grid](
        g, w, amax, bits, m, n, *g.stride(), *w.stride(), *c_strides, CODES=codes is not None,
        CODES_MIN_AMAX=_CODES_MIN_AMAX, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
    return g


@triton.jit
def _mask_words_kernel(
    g_ptr, w_ptr, amax_ptr, words_ptr, codes_ptr, M, N, stride_ge, stride_gm, stride_gn, stride_we, stride_wm,
    stride_wn, stride_ce, stride_cm, stride_de, stride_dm, CODES_MIN_AMAX: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The codes mask deciding four codes per 32-bit word: a byte is undecided iff ``(b & 0x7E) == 0x7E`` (+-448,
    NaN), i.e. iff ``(word & 0x7E7E7E7E) ^ 0x7E7E7E7E`` has a zero byte (the exact any-zero-byte test); only a tile
    with one (or a tiny amax) goes per element, as moeq's kernel does. Codes ``[E, M, N]``, N contiguous, N % 4 == 0;
    ``words_ptr`` the same bytes as int32 ``[E, M, N / 4]`` (strides ``stride_de``, ``stride_dm``)."""
    expert = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    wcols = tl.program_id(0) * (BLOCK_N // 4) + tl.arange(0, BLOCK_N // 4)
    amax = tl.load(amax_ptr + expert)
    inside_w = (rows[:, None] < M) & (wcols[None, :] < N // 4)
    d_offs = expert * stride_de + rows[:, None] * stride_dm + wcols[None, :]
    words = tl.load(words_ptr + d_offs, mask=inside_w, other=0).to(tl.uint32, bitcast=True)
    t = (words & 0x7E7E7E7E) ^ 0x7E7E7E7E
    flagged = (((t - 0x01010101) & ~t & 0x80808080) != 0) & inside_w
    tiny = (amax < CODES_MIN_AMAX).to(tl.int32)
    if tl.max(flagged.to(tl.int32)) + tiny > 0:
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        inside = (rows[:, None] < M) & (cols[None, :] < N)
        code = tl.load(codes_ptr + expert * stride_ce + rows[:, None] * stride_cm + cols[None, :], mask=inside,
                       other=0).to(tl.int32)  # fmt: skip
        undecided = inside & ((code & 0x7F) + tiny * 0x7E >= 0x7E)
        w_offs = expert * stride_we + rows[:, None] * stride_wm + cols[None, :] * stride_wn
        w = tl.load(w_ptr + w_offs, mask=undecided, other=0.0)
        g_offs = expert * stride_ge + rows[:, None] * stride_gm + cols[None, :] * stride_gn
        _zero_clipped(g_ptr + g_offs, w, amax, undecided)


def launch_words(g, w, amax, codes, block_m, block_n, warps):
    """The word-wise codes mask (codes contiguous along N, N a multiple of 4)."""
    num_experts, m, n = w.shape
    words = codes.view(torch.int32)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), num_experts)
    _mask_words_kernel[grid](
        g, w, amax, words, codes, m, n, *g.stride(), *w.stride(), codes.stride(0), codes.stride(1),
        words.stride(0), words.stride(1), CODES_MIN_AMAX=_CODES_MIN_AMAX, BLOCK_M=block_m, BLOCK_N=block_n,
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
        run = functools.partial(launch_words, w=w, amax=amax, codes=codes, block_m=bm, block_n=bn, warps=warps)
        what = f"{'wgrad [E,K,N] permuted':22s} codes as words {bm}x{bn} w{warps}"
        measure(rows, what, run, g_kn.clone().transpose(1, 2), want, w.numel(), copy_tbs)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           copy_TBs=copy_tbs, rows=rows), f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
