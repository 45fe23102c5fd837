"""Probe: the FP8 codes x codes grouped GEMM (QAT FP8 / W8A8 at training sizes) with its operand tiles loaded by
the Hopper TMA (tensor descriptors) instead of pointer loads, against moeq's shipped kernel.

Same schedule as moeq's kernel (one program per (expert m-tile, n-tile), 64-row MMA for an expert's short last
tile); only the loads differ. A 2-D descriptor over the codes ``x [M, K]`` reads whole ``BLOCK_M``-row boxes from an
expert's first row (rows of the next expert are multiplied too and never stored; rows past ``M`` read as zeros), one
over the K-contiguous weight codes ``[E * N, K]`` reads ``BLOCK_N`` rows from ``e * N + n0``. Host descriptors
(``TensorDescriptor``, encoded per launch) and device descriptors (``tl.make_tensor_descriptor``) both run.
Checks each variant against the float64 product of torch's own e4m3 casts (``probes.fp8_codes_reference``),
prints one table, writes JSON to ``--out``.

    python benchmarks/probe_tma_codes.py --out $OUT/tma.json
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from probes import ProbeTable, fp8_codes_reference, probe_inputs, qwen3_probe_main
from triton.tools.tensor_descriptor import TensorDescriptor

from moeq.runtime.kernels import fake_quant_act, fake_quant_experts
from moeq.runtime.kernels.grouped_qmm import _tile_of_program, grouped_qmm


@triton.jit
def _tma_tile(x_desc, w_desc, out_ptr, w_scale_ptr, x_amax_ptr, expert, row_start, row_end, pid_n, N, K, NUM_EXPERTS,
              stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    e = tl.minimum(expert, NUM_EXPERTS - 1)
    k_end = tl.where(expert < NUM_EXPERTS, K, 0)
    w_row = e * N + pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        a = x_desc.load([row_start, k0])
        b = w_desc.load([w_row, k0])
        acc = tl.dot(a, b.T, acc)
    acc = acc * (tl.load(x_amax_ptr) / 448.0 * tl.load(w_scale_ptr + e))
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < row_end)[:, None] & (cols < N)[None, :])


@triton.jit
def _tma_codes_kernel(
    x_desc, xt_desc, w_desc, x_ptr, w_ptr, out_ptr, offs_ptr, w_scale_ptr, x_amax_ptr, M, N, K, NUM_EXPERTS,
    stride_om, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TAIL_M: tl.constexpr, DEVICE_DESC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    expert, row_start, row_end = _tile_of_program(offs_ptr, pid // n_tiles, M, NUM_EXPERTS, E_POW2, BLOCK_M)
    if row_end > row_start:
        if DEVICE_DESC:
            x_desc = tl.make_tensor_descriptor(x_ptr, [M, K], [K, 1], [BLOCK_M, BLOCK_K])
            w_desc = tl.make_tensor_descriptor(w_ptr, [NUM_EXPERTS * N, K], [K, 1], [BLOCK_N, BLOCK_K])
        if TAIL_M == 0:
            _tma_tile(x_desc, w_desc, out_ptr, w_scale_ptr, x_amax_ptr, expert, row_start, row_end, pid % n_tiles, N,
                      K, NUM_EXPERTS, stride_om, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
        elif row_end - row_start > TAIL_M:
            _tma_tile(x_desc, w_desc, out_ptr, w_scale_ptr, x_amax_ptr, expert, row_start, row_end, pid % n_tiles, N,
                      K, NUM_EXPERTS, stride_om, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
        else:
            if DEVICE_DESC:
                xt_desc = tl.make_tensor_descriptor(x_ptr, [M, K], [K, 1], [TAIL_M, BLOCK_K])
            _tma_tile(xt_desc, w_desc, out_ptr, w_scale_ptr, x_amax_ptr, expert, row_start, row_end, pid % n_tiles, N,
                      K, NUM_EXPERTS, stride_om, TAIL_M, BLOCK_N, BLOCK_K)  # fmt: skip


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def tma_codes(xc, wc_nk, offs, w_scale, x_amax, bm, bn, bk, warps, stages, tail=64, device_desc=False):
    """``xc [M, K]`` and ``wc_nk [E, N, K]`` e4m3 codes (K-contiguous), scaled product in bf16."""
    m, k = xc.shape
    num_experts, n, _ = wc_nk.shape
    out = torch.empty(m, n, dtype=torch.bfloat16, device=xc.device)
    w2 = wc_nk.reshape(num_experts * n, k)
    if device_desc:
        triton.set_allocator(_scratch)
        x_desc = xt_desc = w_desc = None
    else:
        x_desc = TensorDescriptor.from_tensor(xc, [bm, bk])
        xt_desc = TensorDescriptor.from_tensor(xc, [tail or bm, bk])
        w_desc = TensorDescriptor.from_tensor(w2, [bn, bk])
    grid = ((triton.cdiv(m, bm) + min(num_experts, m)) * triton.cdiv(n, bn),)
    _tma_codes_kernel[grid](
        x_desc, xt_desc, w_desc, xc, w2, out, offs, w_scale, x_amax, m, n, k, num_experts, out.stride(0),
        E_POW2=max(triton.next_power_of_2(num_experts), 128), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, TAIL_M=tail,
        DEVICE_DESC=device_desc, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


VARIANTS = [  # (bm, bn, bk, warps, stages, tail, device descriptors)
    (128, 256, 128, 8, 3, 64, False),
    (128, 256, 128, 8, 4, 64, False),
    (128, 256, 128, 8, 3, 0, False),
    (128, 256, 64, 8, 4, 64, False),
    (128, 256, 64, 8, 5, 64, False),
    (128, 128, 128, 8, 4, 64, False),
    (128, 128, 128, 4, 4, 64, False),
    (128, 128, 128, 4, 5, 64, False),
    (64, 256, 128, 4, 4, 0, False),
    (128, 256, 128, 8, 3, 64, True),
    (128, 256, 128, 8, 4, 64, True),
]


def run_case(label: str, k: int, n: int, rows: int) -> list[dict]:
    p = probe_inputs(k, n, rows)
    offs, w_amax, x_amax = p.offs, p.w_amax, p.x_amax
    xc = fake_quant_act(p.x, offs, x_amax, "fp8", codes=True)
    wc_nk = fake_quant_experts(p.w_nk, w_amax, "fp8", -1, codes=True)
    wc = wc_nk.transpose(1, 2)
    w_scale = w_amax / 448.0
    table = ProbeTable(label, fp8_codes_reference(p), p.flops)
    record = table.record
    record("torch._grouped_mm bf16", lambda: torch._grouped_mm(p.x, p.w, offs).float())
    xs = (x_amax / 448).expand(rows).contiguous()
    ws = w_scale[:, None].expand(-1, n).contiguous()
    record(
        "torch._scaled_grouped_mm on the codes",
        lambda: torch._scaled_grouped_mm(xc, wc, xs, ws, offs=offs, out_dtype=torch.bfloat16),
    )
    record(
        "grouped_qmm codes (autotuned)", lambda: grouped_qmm(xc, wc, offs, w_scale, None, x_amax, "fp8", "fp8_codes")
    )
    shipped = triton.Config(
        {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "SWAP_AB": False, "FP8_DOT": True, "TAIL_M": 64},
        num_warps=8,
        num_stages=3,
    )
    record(
        "shipped 128x256x128 w8 s3 tail64",
        lambda: grouped_qmm(xc, wc, offs, w_scale, None, x_amax, "fp8", "fp8_codes", config=shipped),
    )
    for bm, bn, bk, warps, stages, tail, device_desc in VARIANTS:
        name = f"TMA {'device' if device_desc else 'host'} {bm}x{bn}x{bk} w{warps} s{stages} tail{tail}"
        tile = (bm, bn, bk, warps, stages, tail, device_desc)
        record(name, functools.partial(tma_codes, xc, wc_nk, offs, w_scale, x_amax, *tile))
    return table.print()


if __name__ == "__main__":
    qwen3_probe_main(run_case)
