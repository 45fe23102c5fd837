"""Probe: QAT FP8 at training sizes with the weight's codes written by the codes GEMM's own programs.

The shipped quantize-once path is three launches: activation codes, weight codes (the bf16 weight read whole,
its codes written: 1.2 GB for Qwen3 gate_up, 0.31 ms) and the codes GEMM (~0.29 ms, tensor-core bound). In
``_weight_codes_in_gemm_kernel`` (here) each program (up to GROUP_M m-tiles of one expert x one n-tile) writes the
codes of the weight slice it multiplies, then reads them back from L2 for its m-tiles: a weight phase of its own
(QUANT_K step, QUANT_STAGES pipeline depth) or, LEADER, inside the first m-tile's K loop. Programs in the
memory-bound phase could then run beside programs in the tensor-core phase, which separate launches serialize.
Result (H200, session 16, BENCHMARKS.md): not so. Best gate_up 0.797 ms against 0.710 for the three launches, down
a tie (0.392 / 0.392): a program holds its SM alone, so its tensor cores idle while it quantizes. Rejected.

Every row is checked against the float64 product of torch's own float8 casts, then timed (CUDA-graph replays);
one table; JSON to ``--out``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from bench_grouped_qmm import bench
from probes import ProbeTable, fp8_codes_reference, probe_inputs, qwen3_probe_main

from moeq.runtime.kernels import fake_quant_act
from moeq.runtime.kernels.grouped_qmm import _tile_of_program, grouped_qmm, load_e4m3, m_bucket
from moeq.runtime.kernels.launch import interpreting
from moeq.runtime.kernels.numerics import cast_like, divide, e4m3_codes, fast_division_ok, fp8_scale, safe_divisor

#: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, QUANT_K, QUANT_STAGES, LEADER, warps, stages)
TILES = [
    (128, 256, 128, 4, 64, 1, False, 8, 3),
    (128, 256, 128, 4, 128, 1, False, 8, 3),
    (128, 256, 128, 4, 64, 3, False, 8, 3),
    (128, 256, 128, 2, 64, 3, False, 8, 3),
    (128, 256, 128, 8, 128, 3, False, 8, 3),
    (128, 128, 128, 4, 128, 3, False, 8, 3),
    (128, 128, 128, 4, 64, 3, False, 4, 3),
    (128, 128, 128, 4, 64, 1, True, 8, 3),
    (128, 128, 64, 4, 64, 1, True, 8, 4),
    (128, 256, 64, 4, 64, 1, True, 8, 3),
]


def tile_config(m, n, k, g, q, qs, leader, w, s) -> triton.Config:
    meta = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": g, "QUANT_K": q, "QUANT_STAGES": qs,
            "LEADER": leader, "FP8_DOT": True}  # fmt: skip
    return triton.Config(meta, num_warps=w, num_stages=s)


@triton.jit
def _weight_codes_in_gemm_kernel(
    x_ptr,
    w_ptr,
    codes_ptr,
    codes_bits_ptr,
    out_ptr,
    offs_ptr,
    w_amax_ptr,
    x_amax_ptr,
    M,
    N,
    K,
    NUM_EXPERTS,
    M_BUCKET,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wk,
    stride_wn,
    stride_om,
    stride_on,
    E_POW2: tl.constexpr,
    X_PER_EXPERT: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    QUANT_K: tl.constexpr,
    QUANT_STAGES: tl.constexpr,
    LEADER: tl.constexpr,
    FP8_DOT: tl.constexpr,
):
    """QAT FP8 at training sizes: activation codes x a bf16 weight. One program per (up to ``GROUP_M`` m-tiles
    of one expert, n-tile): it writes the e4m3 codes of its expert's ``[BLOCK_N, K]`` weight slice to ``codes``
    (``[E, N, K]``; programs sharing a slice write the same bytes), first in a weight phase of its own or
    (``LEADER``) as its first m-tile loads the weight for its dot, and multiplies its other m-tiles with the
    codes on the FP8 tensor cores, the slice still in L2. The weight's memory-bound quantization then runs
    beside other programs' tensor-core work instead of in a launch of its own."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    tile_g = pid // n_tiles
    pid_n = pid % n_tiles
    expert, row_start, row_end = _tile_of_program(offs_ptr, tile_g, M, NUM_EXPERTS, E_POW2, BLOCK_M * GROUP_M)
    row_end = tl.minimum(row_end, row_start + BLOCK_M * GROUP_M)
    routed = expert < NUM_EXPERTS
    e = tl.minimum(expert, NUM_EXPERTS - 1).to(tl.int64)
    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = cols_n < N
    slice_offs = e * N * K + cols_n.to(tl.int64)[:, None] * K
    w_rows = w_ptr + e * stride_we + cols_n.to(tl.int64)[:, None] * stride_wn
    w_s = fp8_scale(tl.load(w_amax_ptr + e))
    w_div = safe_divisor(w_s)
    w_fast = fast_division_ok(w_div, INTERPRET)
    if not LEADER and routed and row_end > row_start:
        for k0 in tl.range(0, K, QUANT_K, num_stages=QUANT_STAGES):
            kq = k0 + tl.arange(0, QUANT_K)
            mask = n_mask[:, None] & (kq < K)[None, :]
            w = tl.load(w_rows + kq[None, :] * stride_wk, mask=mask, other=0.0)
            codes = e4m3_codes(divide(w.to(tl.float32), w_div, w_fast), INTERPRET)
            tl.store(codes_ptr + slice_offs + kq[None, :], codes.to(codes_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()  # the slice's codes, written by every thread, are read back by every thread
    if X_PER_EXPERT:
        x_amax = tl.load(x_amax_ptr + e)
    else:
        x_amax = tl.load(x_amax_ptr)
    acc_scale = fp8_scale(x_amax) * w_s
    k_end = tl.where(routed, K, 0)  # the unrouted tail only gets zeros
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if LEADER and m0 == row_start:
            for k0 in range(0, k_end, BLOCK_K):
                k2 = k0 + tl.arange(0, BLOCK_K)
                k_mask = k2 < K
                x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + k2[None, :] * stride_xk
                xa = load_e4m3(x_ptrs, row_mask[:, None] & k_mask[None, :], INTERPRET)
                mask = n_mask[:, None] & k_mask[None, :]
                w = tl.load(w_rows + k2[None, :] * stride_wk, mask=mask, other=0.0)
                codes = e4m3_codes(divide(w.to(tl.float32), w_div, w_fast), INTERPRET)
                tl.store(codes_ptr + slice_offs + k2[None, :], codes.to(codes_ptr.dtype.element_ty), mask=mask)
                acc = _codes_dot(xa, codes, acc, out_ptr, FP8_DOT)
            tl.debug_barrier()  # as above: the other m-tiles read the codes back
        else:
            for k0 in range(0, k_end, BLOCK_K):
                k2 = k0 + tl.arange(0, BLOCK_K)
                k_mask = k2 < K
                x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + k2[None, :] * stride_xk
                xa = load_e4m3(x_ptrs, row_mask[:, None] & k_mask[None, :], INTERPRET)
                wq = load_e4m3(codes_bits_ptr + slice_offs + k2[None, :], n_mask[:, None] & k_mask[None, :], INTERPRET)
                acc = _codes_dot(xa, wq, acc, out_ptr, FP8_DOT)
        acc = acc * acc_scale
        o_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols_n[None, :] * stride_on
        tl.store(o_ptrs, cast_like(acc, out_ptr, INTERPRET), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _codes_dot(xa, wq, acc, out_ptr, FP8_DOT: tl.constexpr):
    """``acc + xa @ wq^T`` for e4m3 values: on the FP8 tensor cores, or (interpreter) widened to fp32, which is
    exact (the interpreter multiplies 16-bit floats as their bit patterns)."""
    if FP8_DOT:
        return tl.dot(xa, tl.trans(wq), acc)
    else:
        return tl.dot(xa.to(tl.float32), tl.trans(wq.to(tl.float32)), acc, input_precision="ieee")


def _weight_codes_gemm(
    x_codes: torch.Tensor,
    w: torch.Tensor,
    offs: torch.Tensor,
    w_amax: torch.Tensor,
    x_amax: torch.Tensor,
    out: torch.Tensor,
    config: triton.Config,
) -> torch.Tensor:
    """Launch :func:`_weight_codes_in_gemm_kernel` : ``x_codes [M, K]``
    e4m3 codes, ``w`` the bf16 QAT weight, logically ``[E, K, N]``; the codes scratch ``[E, N, K]`` is as large
    as the weight codes pass's output. ``config``: the tile (:data:`TILES`)."""
    m, k = x_codes.shape
    num_experts, n = w.shape[0], w.shape[2]
    codes = torch.empty(num_experts, n, k, dtype=torch.float8_e4m3fn, device=w.device)
    bits = codes.view(torch.uint8) if interpreting() else codes

    def grid(meta):  # as the main kernel's, for m-tiles of BLOCK_M * GROUP_M rows
        rows = meta["BLOCK_M"] * meta["GROUP_M"]
        return ((triton.cdiv(m, rows) + min(num_experts, m)) * triton.cdiv(n, meta["BLOCK_N"]),)

    meta = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    _weight_codes_in_gemm_kernel[grid(config.kwargs)](
        x_codes, w, codes, bits, out, offs, w_amax, x_amax,
        m, n, k, num_experts, m_bucket(m, num_experts),
        x_codes.stride(0), x_codes.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        E_POW2=max(triton.next_power_of_2(num_experts), 128), X_PER_EXPERT=x_amax.numel() > 1,
        INTERPRET=interpreting(), **meta,
    )  # fmt: skip
    return out


def run_case(label: str, k: int, n: int, rows: int) -> list[dict]:
    p = probe_inputs(k, n, rows)
    x, w, offs, w_amax, x_amax = p.x, p.w, p.offs, p.w_amax, p.x_amax
    table = ProbeTable(f"{label} {rows}", fp8_codes_reference(p), p.flops, warmup=25, rep=100)
    for _ in range(3):  # a cold GPU's first timings run slow (BENCHMARKS.md, session 13): warm it first
        bench(lambda: torch._grouped_mm(x, w, offs), warmup=25, rep=100)
    table.record("torch._grouped_mm bf16", lambda: torch._grouped_mm(x, w, offs))
    args = (w, offs, w_amax, None, x_amax, "fake_fp8", "fp8")
    table.record("weight codes pass (3 launches, shipped)", lambda: grouped_qmm(x, *args, quantize_once=True))
    for tile in TILES:
        config = tile_config(*tile)
        name = "leader" if tile[6] else f"phase q{tile[4]} s{tile[5]}"
        what = f"  {tile[0]}x{tile[1]}x{tile[2]} g{tile[3]} {name} w{tile[7]} s{tile[8]} (+act)"

        def fused(config=config):
            xcodes = fake_quant_act(x, offs, x_amax, "fp8", codes=True)
            out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
            return _weight_codes_gemm(xcodes, w, offs, w_amax.float(), x_amax.float(), out, config=config)

        table.record(what, fused)
    return table.print()


if __name__ == "__main__":
    qwen3_probe_main(run_case)
