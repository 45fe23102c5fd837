"""Probe: a persistent FP8 codes x codes grouped GEMM (flattened tile/K loop, Triton's software pipeliner
overlaps a tile's epilogue with the next tile's loads) against moeq's one-tile-per-program kernel.

Qwen3-30B-A3B shapes at 34k routed rows (the quantize-once GEMM of QAT FP8 / W8A8). Checks each variant
against the float64 product of the codes, prints one table, writes JSON to ``--out``."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from probes import ProbeTable, probe_inputs, qwen3_probe_main

from moeq.runtime.kernels import fake_quant_act, fake_quant_experts
from moeq.runtime.kernels.grouped_qmm import grouped_qmm


@triton.jit
def _tile_rows(ends, starts, cum, tiles, e_idx, tile_m, M, NUM_EXPERTS, BLOCK_M: tl.constexpr):
    expert = tl.sum((cum <= tile_m).to(tl.int32), axis=0)
    here = e_idx == expert
    first_tile = tl.sum(tl.where(here, cum - tiles, 0), axis=0)
    row_start = tl.sum(tl.where(here, starts, 0), axis=0) + (tile_m - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(here, ends, 0), axis=0)
    if expert >= NUM_EXPERTS:  # unrouted tail rows: zeros
        routed = tl.sum(tl.where(e_idx == NUM_EXPERTS - 1, ends, 0), axis=0)
        row_start = routed + (tile_m - tl.sum(tiles, axis=0)) * BLOCK_M
        row_end = M
    return expert, row_start, row_end


@triton.jit
def _persistent_codes_kernel(
    x_ptr, w_ptr, out_ptr, offs_ptr, w_scale_ptr, x_amax_ptr,
    M, N, K, NUM_EXPERTS, NUM_PROGRAMS,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_om, stride_on,
    E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FLATTEN: tl.constexpr, SPLIT_M: tl.constexpr,
):  # fmt: skip
    e_idx = tl.arange(0, E_POW2)
    valid = e_idx < NUM_EXPERTS
    ends = tl.load(offs_ptr + e_idx, mask=valid, other=0)
    starts = tl.load(offs_ptr + e_idx - 1, mask=valid & (e_idx > 0), other=0)
    tiles = tl.where(valid, tl.cdiv(ends - starts, BLOCK_M), 0)
    cum = tl.cumsum(tiles, axis=0)
    routed = tl.sum(tl.where(e_idx == NUM_EXPERTS - 1, ends, 0), axis=0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    num_tiles = (tl.sum(tiles, axis=0) + tl.cdiv(M - routed, BLOCK_M)) * n_tiles
    k_tiles = tl.cdiv(K, BLOCK_K)
    x_s = tl.load(x_amax_ptr) / 448.0
    tile_c = tl.program_id(0) - NUM_PROGRAMS
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=FLATTEN):
        expert, row_start, row_end = _tile_rows(ends, starts, cum, tiles, e_idx, tile // n_tiles, M, NUM_EXPERTS,
                                                BLOCK_M)  # fmt: skip
        e = tl.minimum(expert, NUM_EXPERTS - 1).to(tl.int64)
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < tl.where(expert < NUM_EXPERTS, row_end, 0)
        cols = (tile % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        if SPLIT_M:  # two half-height dots; the lower one skipped when the tile's rows fit the upper half
            HALF: tl.constexpr = BLOCK_M // 2
            acc_hi = tl.zeros((HALF, BLOCK_N), dtype=tl.float32)
            acc_lo = tl.zeros((HALF, BLOCK_N), dtype=tl.float32)
            full = row_end - row_start > HALF
            rows_hi = row_start + tl.arange(0, HALF)
            rows_lo = rows_hi + HALF
            ok_hi = rows_hi < tl.where(expert < NUM_EXPERTS, row_end, 0)
            ok_lo = rows_lo < tl.where(expert < NUM_EXPERTS, row_end, 0)
            for ki in range(k_tiles):
                ks = ki * BLOCK_K + tl.arange(0, BLOCK_K)
                wq = tl.load(w_ptr + e * stride_we + cols.to(tl.int64)[:, None] * stride_wn + ks[None, :] * stride_wk,
                             mask=(cols < N)[:, None] & (ks < K)[None, :], other=0.0)  # fmt: skip
                xh = tl.load(x_ptr + rows_hi.to(tl.int64)[:, None] * stride_xm + ks[None, :] * stride_xk,
                             mask=ok_hi[:, None] & (ks < K)[None, :], other=0.0)  # fmt: skip
                acc_hi = tl.dot(xh, tl.trans(wq), acc_hi)
                if full:
                    xl = tl.load(x_ptr + rows_lo.to(tl.int64)[:, None] * stride_xm + ks[None, :] * stride_xk,
                                 mask=ok_lo[:, None] & (ks < K)[None, :], other=0.0)  # fmt: skip
                    acc_lo = tl.dot(xl, tl.trans(wq), acc_lo)
            acc = tl.reshape(tl.permute(tl.join(acc_hi, acc_lo), (2, 0, 1)), (BLOCK_M, BLOCK_N))
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for ki in range(k_tiles):
                ks = ki * BLOCK_K + tl.arange(0, BLOCK_K)
                xa = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :] * stride_xk,
                             mask=row_ok[:, None] & (ks < K)[None, :], other=0.0)  # fmt: skip
                wq = tl.load(w_ptr + e * stride_we + cols.to(tl.int64)[:, None] * stride_wn + ks[None, :] * stride_wk,
                             mask=(cols < N)[:, None] & (ks < K)[None, :], other=0.0)  # fmt: skip
                acc = tl.dot(xa, tl.trans(wq), acc)
        tile_c += NUM_PROGRAMS
        expert_c, row_start_c, row_end_c = _tile_rows(ends, starts, cum, tiles, e_idx, tile_c // n_tiles, M,
                                                      NUM_EXPERTS, BLOCK_M)  # fmt: skip
        e_c = tl.minimum(expert_c, NUM_EXPERTS - 1)
        acc = acc * (x_s * tl.load(w_scale_ptr + e_c))
        rows_c = row_start_c + tl.arange(0, BLOCK_M)
        cols_c = (tile_c % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        o_ptrs = out_ptr + rows_c.to(tl.int64)[:, None] * stride_om + cols_c[None, :] * stride_on
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows_c < row_end_c)[:, None] & (cols_c < N)[None, :])


def persistent_codes(
    xc, wc, offs, w_scale, x_amax, bm, bn, bk, warps, stages, programs_per_sm=1, flatten=True, split=False
):
    m, k = xc.shape
    num_experts, _, n = wc.shape
    out = torch.empty(m, n, dtype=torch.bfloat16, device=xc.device)
    sms = torch.cuda.get_device_properties(xc.device).multi_processor_count
    programs = min(sms * programs_per_sm, (triton.cdiv(m, bm) + num_experts) * triton.cdiv(n, bn))
    _persistent_codes_kernel[(programs,)](
        xc, wc, out, offs, w_scale, x_amax, m, n, k, num_experts, programs,
        xc.stride(0), xc.stride(1), wc.stride(0), wc.stride(1), wc.stride(2), out.stride(0), out.stride(1),
        E_POW2=max(triton.next_power_of_2(num_experts), 128), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, FLATTEN=flatten, SPLIT_M=split,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


VARIANTS = [  # (bm, bn, bk, warps, stages, programs per SM, flatten[, split])
    (128, 256, 128, 8, 3, 1, True),
    (128, 256, 128, 8, 4, 1, True),
    (128, 256, 128, 8, 3, 1, False),
    (128, 256, 64, 8, 4, 1, True),
    (128, 128, 128, 8, 3, 2, True),
    (64, 256, 64, 4, 4, 2, True),
    (128, 256, 128, 8, 3, 1, True, True),
]


def run_case(label: str, k: int, n: int, rows: int) -> list[dict]:
    p = probe_inputs(k, n, rows)
    offs, w_amax, x_amax = p.offs, p.w_amax, p.x_amax
    xc = fake_quant_act(p.x, offs, x_amax, "fp8", codes=True)
    wc = fake_quant_experts(p.w_nk, w_amax, "fp8", -1, codes=True).transpose(1, 2)
    w_scale = w_amax / 448.0
    ref = torch.zeros(rows, n, dtype=torch.float64, device="cuda")
    for e, (s, t) in enumerate(zip([0] + offs.tolist()[:-1], offs.tolist())):
        ref[s:t] = (xc[s:t].double() @ wc[e].double()) * (x_amax.double() / 448) * w_scale[e].double()
    table = ProbeTable(label, ref, p.flops)
    record = table.record
    record("torch._grouped_mm bf16", lambda: torch._grouped_mm(p.x, p.w, offs).float())
    record(
        "grouped_qmm codes (autotuned)", lambda: grouped_qmm(xc, wc, offs, w_scale, None, x_amax, "fp8", "fp8_codes")
    )
    one_tile = triton.Config(
        {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "SWAP_AB": False, "FP8_DOT": True}, num_warps=8, num_stages=3
    )
    record(
        "one-tile 128x256x128 w8 s3",
        lambda: grouped_qmm(xc, wc, offs, w_scale, None, x_amax, "fp8", "fp8_codes", config=one_tile),
    )
    for bm, bn, bk, warps, stages, per_sm, flatten, *split in VARIANTS:
        name = f"persistent {bm}x{bn}x{bk} w{warps} s{stages} x{per_sm}{'' if flatten else ' noflat'}"
        name += " split-M" if split else ""
        tile = (bm, bn, bk, warps, stages, per_sm, flatten, bool(split))
        record(name, functools.partial(persistent_codes, xc, wc, offs, w_scale, x_amax, *tile))
    return table.print()


if __name__ == "__main__":
    qwen3_probe_main(run_case)
