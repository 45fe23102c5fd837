"""QAT's expert GEMM as one warp-specialized Gluon kernel (Hopper): the bf16 weight becomes its e4m3 codes (QAT FP8)
or its NVFP4 fake-quantized bf16 values (QAT NVFP4) in shared memory while the tensor cores multiply.

Above :data:`moeq.runtime.kernels.grouped_qmm.WEIGHT_CODES_ROWS_PER_EXPERT` rows per expert the plain-Triton path
quantizes a QAT FP8 weight in a pass of its own (it reads the bf16 weight and writes its codes to HBM, then the
codes GEMM reads them back): converting in the GEMM's load path costs more than the MMA it feeds, because the same
warps convert and multiply (BENCHMARKS.md, sessions 14-30). Here one launch has three warp roles on an SM:

- a 1-warp loader issues TMA copies of the activation codes and the bf16 weight tile into shared-memory rings;
- converter warps divide each weight tile by the expert's FP8 scale exactly as :mod:`moeq.formats` (Markstein's
  quotient on the clipped value, ``numerics.lean_quotient``, or ``numerics.divide``), round to e4m3 (``cvt.rn.satfinite``)
  and store the codes into a third ring;
- the default partition runs FP8 ``wgmma`` on the activation codes and the weight codes.

A program multiplies a group of up to ``BM + BT`` routed rows of one expert (a second accumulator holds the ``BT``
tail rows), so one conversion of a weight tile serves all of an expert's rows at Qwen3-30B-A3B's ~272 rows per
expert. Products equal the two-launch path's bit for bit: the same codes, fp32 sums of exact e4m3 products, and the
scales applied to the accumulator once (``tests/test_division.py`` proves the lean quotient's codes by exact
emulation).

Its limit is the TMA traffic of the activation codes, which every n-tile reads again, so the tile that wins is 128
wide, with 8 MMA warps: two warpgroups stacked along M for the group's main rows (each wgmma 128 columns wide: a
64-column wgmma reads its operands from shared memory at the memory's full rate, and the converter's reads of the
same memory then wait behind it; session 36) and side by side along N for its 64-row tail. Every role loops over
tiles, so the kernel also runs persistent (one program per SM): the loader and the converter fill the rings for the
next tile while the MMA warps store the last, which down's short K loop (12 k-steps) needs. Each branch of the MMA
partition (groups with and without tail rows) holds its own accumulators: one live across the other branch's loop is
copied at its back edge, and ptxas then serializes every ``wgmma`` of the kernel (its C7514 / C7515 notes; session
35). H100, Qwen3-30B-A3B at 34k rows (BENCHMARKS.md, session 36 probe): gate_up 0.53 ms against 0.72 ms for the two
launches (bf16 ``torch._grouped_mm`` 0.57), down 0.34 against 0.41 (0.34).

Every shipped configuration computes the product's transpose (``GluonConfig.swap``, session 41): the converted weight
tile is each ``wgmma``'s A operand and the group's rows its B operand, so the tail's ``wgmma`` is only as wide as the
tail (16, 32 or 64 rows; :func:`_swapped_group`) instead of 64 rows for ~16. Bit-equal to the stacked arrangement
and, kernel alone on the H100 at 34k rows, 1-4% faster (QAT NVFP4 gate_up 0.688 -> 0.677 ms, down 0.397 -> 0.387;
QAT FP8 0.483 -> 0.479, 0.311 -> 0.299).

The QAT NVFP4 form (``NVFP4`` constexpr, :func:`qat_nvfp4_gluon_gemm`): Hopper has no FP4 MMA and an NVFP4 value
(E2M1 times an e4m3 block scale) is not an e4m3 value, so the activations arrive fake-quantized in bf16 (their own
pass), the converter writes the weight's fake-quantized bf16 values and the MMA is bf16 ``wgmma``. The converter
(``exact=2``) takes the operand form ``numerics.fake_quant_nvfp4_operand``: formats' values (a zero's sign aside,
which no dot product from ``+0`` sees) in about two thirds of the exact form's instructions; it reads the bf16 tile
as 32-bit words, a thread holds two whole 16-blocks along K per pass, and the block amax and the clip work on bf16
pairs (:func:`_nvfp4_words_in_registers`; session 37, exact on the H100). ``exact=1`` is the bit-for-bit form
(``numerics.fake_quant_nvfp4_blocks``, the tests' and the probe's reference). H100, 34k rows (session 36 probe, the
activations' pass included): gate_up 0.81 ms against 1.19 ms for the weight pass + ``torch._grouped_mm`` (bf16
0.57), down 0.45 against 0.63 (0.33). Alone, the loads take 0.42 / 0.26 ms (every n-tile reads the bf16 activations
again) and the kernel 0.69 / 0.41: the converter's four warps, one a scheduler, issue a third of the time and wait
on shared memory the rest, and more converter warps would take registers the MMA warps' accumulators need.

Experimental (session 37): :func:`qat_nvfp4_rega_kernel` puts the weight in the MMA warps' own registers as
``wgmma``'s A operand, with no converter warps and no shared-memory round trip. K is permuted within each 64-chunk
(``fake_quant_act.wgmma_k_order``; the activations' pass writes that order) so that each lane holds whole 16-blocks
(:func:`lane_block_layout`). On the H100 its products are exact and, kernel alone at 34k rows, it is 1% (gate_up) and
7% (down) faster than the shipped kernel (session 38). It waits for each step's wgmmas before converting the next
(``SYNC``, ``RS_WGMMA_SYNC``): without the wait ptxas (12.8, 13.4 and 13.5) reuses an in-flight wgmma's A registers,
and the wait cost nothing measurable.
``REGISTER_A_CONFIGS``, ``grouped_qmm.GLUON_QAT_NVFP4_REGISTER_OPERAND`` (off).

Experimental (session 39): ``GluonConfig.tail_box`` copies a group's tail rows in boxes, only as many as it has
(bit-equal and 1.5-2% faster loads on the H200 in its first form, which hung on experts past ``bm + bt`` rows; the
clamped form passes its GPU test, session 40). Every shipped configuration copies whole tails (the kernels' gain was
within the rounds' spread), and compiles to session 38's PTX code. (Session 39's MMA share, the
MMA warps converting part of each weight tile themselves, was slower on the H200 in session 40 and is gone.)

Gluon needs Triton's NVIDIA backend and sm_90 (``wgmma``); :func:`unsupported_reason` says why a call cannot take
this kernel, and :func:`moeq.runtime.kernels.grouped_qmm.grouped_qmm` then keeps the two launches (NVFP4: the
weight's pass and ``torch._grouped_mm``). The kernel is opaque to Inductor (``wrap_triton`` traces only
``@triton.jit`` kernels), so a compiled graph calls it through the custom ops ``moeq::qat_fp8_gluon_gemm`` and
``moeq::qat_nvfp4_gluon_gemm``.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from moeq.runtime.kernels.fake_quant_act import wgmma_k_order
from moeq.runtime.kernels.grouped_qmm import m_bucket
from moeq.runtime.kernels.launch import cdiv, interpreting
from moeq.runtime.kernels.numerics import (
    FAST_DIVISOR_MAX,
    FAST_DIVISOR_MIN,
    NVFP4_FAST_G_MAX,
    NVFP4_FAST_G_MIN,
    divide,
    fake_quant_nvfp4_blocks,
    fake_quant_nvfp4_operand,
    fp8_scale,
    lean_quotient,
    max_keeping_nan,
    nvfp4_block_divisor,
    nvfp4_clipped_operand_values,
    nvfp4_global_scale,
    nvfp4_operand_scale,
    nvfp4_operand_values,
    safe_divisor,
)

log = logging.getLogger(__name__)

__all__ = [
    "CONFIGS",
    "NVFP4_CONFIGS",
    "GluonConfig",
    "qat_fp8_gluon_gemm",
    "qat_nvfp4_gluon_gemm",
    "tuned_config",
    "unsupported_reason",
]

#: TMA global-to-shared copy (renamed ``async_load`` after Triton 3.6; same arguments)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@gluon.jit
def _words_public(tile, shape: gl.constexpr, layout: gl.constexpr):
    return tile.reinterpret(gl.int32, shape, layout)


@gluon.jit
def _words_private(tile, shape: gl.constexpr, layout: gl.constexpr):
    return tile._reinterpret(gl.int32, shape, layout)


#: a shared-memory tile viewed as 32-bit words (``_reinterpret`` in Triton 3.6, ``reinterpret`` later)
_as_words = _words_public if hasattr(gl.shared_memory_descriptor, "reinterpret") else _words_private


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _expert_row_tiles(offs_ptr, NUM_EXPERTS, E_POW2: gl.constexpr, BLOCK_M: gl.constexpr):
    """Every expert's first and end row and its number of ``BLOCK_M``-row groups (lanes past the last expert: 0)."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    e_idx = gl.arange(0, E_POW2, layout=layout)
    valid = e_idx < NUM_EXPERTS
    ends = gl.load(offs_ptr + e_idx, mask=valid, other=0)
    starts = gl.load(offs_ptr + e_idx - 1, mask=valid & (e_idx > 0), other=0)
    tiles = gl.where(valid, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    return e_idx, starts, ends, tiles


@gluon.jit
def _group_count(offs_ptr, M, NUM_EXPERTS, E_POW2: gl.constexpr, BLOCK_M: gl.constexpr):
    """How many row groups the routed rows make (none straddles two experts), plus the unrouted rows' groups."""
    e_idx, starts, ends, tiles = _expert_row_tiles(offs_ptr, NUM_EXPERTS, E_POW2, BLOCK_M)
    routed = gl.sum(gl.where(e_idx == NUM_EXPERTS - 1, ends, 0), axis=0)
    return gl.sum(tiles, axis=0) + gl.cdiv(M - routed, BLOCK_M)


@gluon.jit
def _tile_of_program(offs_ptr, tile_m, M, NUM_EXPERTS, E_POW2: gl.constexpr, BLOCK_M: gl.constexpr):
    """moeq.runtime.kernels.grouped_qmm._tile_of_program in Gluon: (expert, first row, end row) of m-tile ``tile_m``."""
    e_idx, starts, ends, tiles = _expert_row_tiles(offs_ptr, NUM_EXPERTS, E_POW2, BLOCK_M)
    cum = gl.associative_scan(tiles, 0, _add)
    expert = gl.sum((cum <= tile_m).to(gl.int32), axis=0)
    here = e_idx == expert
    first_tile = gl.sum(gl.where(here, cum - tiles, 0), axis=0)
    routed = gl.sum(gl.where(e_idx == NUM_EXPERTS - 1, ends, 0), axis=0)
    row_start = gl.where(
        expert < NUM_EXPERTS,
        gl.sum(gl.where(here, starts, 0), axis=0) + (tile_m - first_tile) * BLOCK_M,
        routed + (tile_m - gl.sum(tiles, axis=0)) * BLOCK_M,
    )
    row_end = gl.where(expert < NUM_EXPERTS, gl.sum(gl.where(here, ends, 0), axis=0), M)
    return expert, row_start, row_end


@gluon.jit
def _tile(offs_ptr, tile, M, N, K, NUM_EXPERTS, E_POW2: gl.constexpr, BLOCK_M: gl.constexpr, BN: gl.constexpr,
          BK: gl.constexpr):  # fmt: skip
    """Tile ``tile`` (row group major, n-tile minor): its expert (clamped: the unrouted rows' groups multiply
    nothing), first and end row, n-tile and k-steps (0 for unrouted rows: their output is zeros)."""
    n_tiles = gl.cdiv(N, BN)
    expert, row_start, row_end = _tile_of_program(offs_ptr, tile // n_tiles, M, NUM_EXPERTS, E_POW2, BLOCK_M)
    k_tiles = gl.where(expert < NUM_EXPERTS, gl.cdiv(K, BK), 0)
    return gl.minimum(expert, NUM_EXPERTS - 1), row_start, row_end, tile % n_tiles, k_tiles


@gluon.jit
def _nvfp4_expert_scales(w_amax):
    """``(g, g_fast, six_g, inv_six_g)``: an expert's NVFP4 global scale from its amax, whether it is in the fast
    division's range, and the block scales' divisor and its reciprocal (``numerics.nvfp4_block_divisor``)."""
    g = nvfp4_global_scale(w_amax)
    g_fast = (g >= NVFP4_FAST_G_MIN) & (g <= NVFP4_FAST_G_MAX)
    six_g, inv_six_g = nvfp4_block_divisor(g)
    return g, g_fast, six_g, inv_six_g


@gluon.jit
def _ring(STAGES: gl.constexpr):
    """``(ready, empty)``: one mbarrier each per stage of a ring, initialized for one arrival."""
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    return ready, empty


@gluon.jit
def _load_rings(SX: gl.constexpr, S16: gl.constexpr):
    """:func:`_load_partition`'s rings: ``(rx, ex)`` for the activation stages, ``(r16, e16)`` for the bf16 weight."""
    rx, ex = _ring(SX)
    r16, e16 = _ring(S16)
    return rx, ex, r16, e16


@gluon.jit
def _load_partition(x_desc, xt_desc, w_desc, x8, xt8, rx, ex, w16, r16, e16, offs_ptr, M, N, K, NUM_EXPERTS,
                    E_POW2: gl.constexpr):  # fmt: skip
    """TMA: the bf16 weight tile, then the activation tile and as many of the tail's ``TB``-row boxes as the group
    has tail rows (``xt_desc``'s block; the tail slots' other rows keep stale values, which only the rows no store
    reads multiply), for every k-step of every tile of this program. At Qwen3-30B-A3B's ~272 rows per expert a tail
    holds ~16 rows: one 16-row box instead of 64 rows cuts the activation bytes read ~11%."""
    BK: gl.constexpr = x_desc.block_type.shape[1]
    BM: gl.constexpr = x_desc.block_type.shape[0]
    TB: gl.constexpr = xt_desc.block_type.shape[0]
    BT: gl.constexpr = xt8.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    SX: gl.constexpr = x8.shape[0]
    S16: gl.constexpr = w16.shape[0]
    total = _group_count(offs_ptr, M, NUM_EXPERTS, E_POW2, BM + BT) * gl.cdiv(N, BN)
    it = 0  # k-steps issued by this program: the rings' slot and phase
    for tile in range(gl.program_id(0), total, gl.num_programs(0)):
        e, row_start, row_end, pid_n, k_tiles = _tile(offs_ptr, tile, M, N, K, NUM_EXPERTS, E_POW2, BM + BT, BN, BK)
        has_tail = row_end - row_start > BM
        # the tail's boxes: row_end is the expert's end, past this group's BM + BT rows where the expert has more
        boxes = gl.minimum(gl.maximum(gl.cdiv(row_end - row_start - BM, TB), 0), BT // TB)
        w_row = e * N + pid_n * BN
        for i in range(k_tiles):
            s = it % S16
            mbarrier.wait(e16.index(s), ((it // S16) & 1) ^ 1)
            mbarrier.expect(r16.index(s), w_desc.block_type.nbytes)
            _tma_load(w_desc, [w_row, i * BK], r16.index(s), w16.index(s))
            sx = it % SX
            mbarrier.wait(ex.index(sx), ((it // SX) & 1) ^ 1)
            if TB == BT:  # the whole tail in one copy (every shipped configuration)
                if has_tail:
                    mbarrier.expect(rx.index(sx), x_desc.block_type.nbytes + xt_desc.block_type.nbytes)
                else:
                    mbarrier.expect(rx.index(sx), x_desc.block_type.nbytes)
                _tma_load(x_desc, [row_start, i * BK], rx.index(sx), x8.index(sx))
                _tma_load(xt_desc, [row_start + BM, i * BK], rx.index(sx), xt8.index(sx), pred=has_tail)
            else:
                for j in gl.static_range(BT // TB + 1):  # one expect (an arrive) with this step's bytes
                    mbarrier.expect(rx.index(sx), x_desc.block_type.nbytes + j * xt_desc.block_type.nbytes,
                                    pred=boxes == j)  # fmt: skip
                _tma_load(x_desc, [row_start, i * BK], rx.index(sx), x8.index(sx))
                for j in gl.static_range(BT // TB):
                    _tma_load(xt_desc, [row_start + BM + j * TB, i * BK], rx.index(sx),
                              xt8.index(sx).slice(j * TB, TB, dim=0), pred=j < boxes)  # fmt: skip
            it += 1


@gluon.jit
def _convert_partition(w16, r16, e16, c8, r8, e8, offs_ptr, w_amax_ptr, codes_ptr, M, N, K, NUM_EXPERTS,
                       E_POW2: gl.constexpr, BLOCK_M: gl.constexpr, SPLIT: gl.constexpr, WRITE_CODES: gl.constexpr,
                       EXACT: gl.constexpr, NVFP4: gl.constexpr, SKIP: gl.constexpr):  # fmt: skip
    """Each bf16 weight tile divided by its expert's FP8 scale as formats does, rounded to e4m3, stored into the
    codes ring; ``NVFP4``: fake-quantized as formats' NVFP4 (16-blocks along K, the expert's global scale) and
    stored as bf16 values (``WRITE_CODES``: also to ``codes_ptr``, for tests)."""
    S16: gl.constexpr = w16.shape[0]
    S8: gl.constexpr = c8.shape[0]
    BN: gl.constexpr = w16.shape[1]
    BK: gl.constexpr = w16.shape[2]
    PART: gl.constexpr = BN // SPLIT
    VEC: gl.constexpr = 16 if NVFP4 else 8  # NVFP4: a thread holds whole 16-blocks
    L: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // (BK // VEC), BK // VEC], [gl.num_warps(), 1], [1, 0])
    # NVFP4's operand converter reads the bf16 tile as 32-bit words, two values each (a shift and a mask make them
    # fp32: one instruction a value instead of the conversion's one and a half)
    L32: gl.constexpr = gl.BlockedLayout([1, VEC // 2], [32 // (BK // VEC), BK // VEC], [gl.num_warps(), 1], [1, 0])
    W32: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, BK // 2], gl.int32)
    total = _group_count(offs_ptr, M, NUM_EXPERTS, E_POW2, BLOCK_M) * gl.cdiv(N, BN)
    it = 0
    for tile in range(gl.program_id(0), total, gl.num_programs(0)):
        e, row_start, row_end, pid_n, k_tiles = _tile(offs_ptr, tile, M, N, K, NUM_EXPERTS, E_POW2, BLOCK_M, BN, BK)
        w_amax = gl.load(w_amax_ptr + e)
        if NVFP4:  # the expert's global scale
            g, g_fast, six_g, inv_six_g = _nvfp4_expert_scales(w_amax)
        else:  # the expert's FP8 scale, its reciprocal and clip
            w_div = safe_divisor(fp8_scale(w_amax))
            w_fast = (w_div >= FAST_DIVISOR_MIN) & (w_div <= FAST_DIVISOR_MAX)
            w_inv = gl.div_rn(1.0, w_div)
            w_clip = w_div * 18446744073709551616.0  # 2^64 d: clipped quotients stay finite and saturate alike
        codes_row = e * N + pid_n * BN
        for i in range(k_tiles):
            s = it % S16
            t = it % S8
            mbarrier.wait(r16.index(s), (it // S16) & 1)
            mbarrier.wait(e8.index(t), ((it // S8) & 1) ^ 1)
            for h in gl.static_range(SPLIT if SKIP % 2 == 0 else 0):
                if NVFP4 and EXACT == 2:  # the MMA operand's values (a zero's sign not kept)
                    words = _as_words(w16.index(s), [BN, BK // 2], W32)
                    words = words.slice(h * PART, PART, dim=0).load(L32)
                    q = gl.convert_layout(_nvfp4_words_in_registers(words, g, six_g, inv_six_g, g_fast), L)
                else:
                    v = w16.index(s).slice(h * PART, PART, dim=0).load(L).to(gl.float32)
                    if NVFP4:  # bit for bit
                        q = fake_quant_nvfp4_blocks(v.reshape([PART, BK // 16, 16]), g, g_fast, False)
                        q = gl.convert_layout(q.reshape([PART, BK]), L).to(gl.bfloat16)
                    elif EXACT == 1:
                        q = divide(v, w_div, w_fast).to(gl.float8e4nv, fp_downcast_rounding="rtne")
                    elif EXACT == 2:
                        q = lean_quotient(v, w_div, w_inv, w_clip, w_fast).to(gl.float8e4nv,
                                                                              fp_downcast_rounding="rtne")  # fmt: skip
                    else:  # the probe's ceiling: one multiply by the reciprocal (not the spec's division)
                        q = (v * w_inv).to(gl.float8e4nv, fp_downcast_rounding="rtne")
                c8.index(t).slice(h * PART, PART, dim=0).store(q)
                if WRITE_CODES:
                    r = codes_row + h * PART + gl.arange(0, PART, layout=gl.SliceLayout(1, L))
                    c = i * BK + gl.arange(0, BK, layout=gl.SliceLayout(0, L))
                    mask = (r < e * N + N)[:, None] & (c < K)[None, :]  # this expert's rows, K's columns
                    gl.store(codes_ptr + r.to(gl.int64)[:, None] * K + c[None, :], q, mask=mask)
            fence_async_shared()
            mbarrier.arrive(e16.index(s))
            mbarrier.arrive(r8.index(t))
            it += 1


@gluon.constexpr_function
def acc_layout(num_warps, bn, instr_k, stacked=False):
    """The wgmma accumulator layout (k = 32 for FP8, 16 for bf16 operands): warpgroups side by side along N (8 warps:
    two 64-row-granular warpgroups, each with half the columns), so a 64-row tail still fits; ``stacked``:
    warpgroups stacked along M, each with all ``bn`` columns, so each wgmma is twice as wide and reads a quarter fewer
    operand bytes from shared memory per product (the main rows of a group; its 64-row tail keeps the side-by-side
    layout)."""
    groups = max(1, num_warps // 4)
    if stacked:
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, bn, instr_k])
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps // groups, groups],
                                     instr_shape=[16, bn // groups, instr_k])  # fmt: skip


@gluon.jit
def _store_rows(out_ptr, acc, first, row_end, pid_n, N, stride_om, scale):
    """``acc * scale`` stored bf16 into rows ``first..`` (below ``row_end``) of n-tile ``pid_n``."""
    layout: gl.constexpr = acc.type.layout
    ROWS: gl.constexpr = acc.shape[0]
    BN: gl.constexpr = acc.shape[1]
    rows = first + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
    cols = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
    mask = (rows < row_end)[:, None] & (cols < N)[None, :]
    gl.store(out_ptr + rows.to(gl.int64)[:, None] * stride_om + cols[None, :], (acc * scale).to(gl.bfloat16), mask=mask)


@gluon.jit
def _store_columns(out_ptr, acc_t, first, row_end, pid_n, N, stride_om, scale):
    """``acc_t * scale`` (the product's transpose, ``[BN, rows]``) stored bf16 into rows ``first..`` (below
    ``row_end``) of n-tile ``pid_n``: a warp's store writes eight consecutive output columns of four rows."""
    layout: gl.constexpr = acc_t.type.layout
    BN: gl.constexpr = acc_t.shape[0]
    ROWS: gl.constexpr = acc_t.shape[1]
    cols = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, layout))
    rows = first + gl.arange(0, ROWS, layout=gl.SliceLayout(0, layout))
    mask = (cols < N)[:, None] & (rows < row_end)[None, :]
    gl.store(out_ptr + rows.to(gl.int64)[None, :] * stride_om + cols[:, None], (acc_t * scale).to(gl.bfloat16),
             mask=mask)  # fmt: skip


@gluon.constexpr_function
def _at_least_8(n):
    """``max(n, 8)``: the narrowest wgmma (a group without tail rows still declares its tail accumulator)."""
    return max(n, 8)


@gluon.jit
def _swapped_step(a, x, xt, acc_lo, acc_hi, acc_t, TN: gl.constexpr):
    """One k-step's wgmmas of :func:`_swapped_group` (issued, not waited for): the weight tile ``a`` times the main
    rows ``x`` in two halves and the tail's first ``TN`` rows (``TN`` 0: none)."""
    H: gl.constexpr = x.shape[0] // 2
    acc_lo = warpgroup_mma(a, x.slice(0, H, dim=0).permute((1, 0)), acc_lo, is_async=True)
    acc_hi = warpgroup_mma(a, x.slice(H, H, dim=0).permute((1, 0)), acc_hi, is_async=True)
    if TN > 0:
        acc_t = warpgroup_mma(a, xt.slice(0, TN, dim=0).permute((1, 0)), acc_t, is_async=True)
    return acc_lo, acc_hi, acc_t


@gluon.jit
def _swapped_group(x8, xt8, rx, ex, c8, r8, e8, out_ptr, it, k_tiles, row_start, row_end, pid_n, N, stride_om, scale,
                   INSTR_K: gl.constexpr, TN: gl.constexpr):  # fmt: skip
    """One group as ``out^T = q(w) x^T`` (``GluonConfig.swap``): the converted weight tile is each wgmma's A operand
    and the group's rows its B operand, so the tail's wgmma spans only ``TN`` rows (n is any multiple of 8, m is 64:
    a 16-row tail no longer costs a 64-row MMA; ``TN`` 0: no tail). The main rows go in two halves: one wgmma over all
    ``BM`` rows needs 154 registers at the instruction, past the 128 a thread a 16-warp launch allows. Returns the
    step count."""
    BM: gl.constexpr = x8.shape[1]
    BN: gl.constexpr = c8.shape[1]
    H: gl.constexpr = BM // 2
    main_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                     instr_shape=[16, H, INSTR_K])  # fmt: skip
    tail_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                     instr_shape=[16, _at_least_8(TN), INSTR_K])  # fmt: skip
    acc_lo = gl.zeros([BN, H], gl.float32, main_l)
    acc_hi = gl.zeros([BN, H], gl.float32, main_l)
    acc_t = gl.zeros([BN, _at_least_8(TN)], gl.float32, tail_l)
    OUTSTANDING: gl.constexpr = 3 if TN > 0 else 2
    for i in range(k_tiles):
        sx, t = _await_step(rx, r8, it)
        acc_lo, acc_hi, acc_t = _swapped_step(c8.index(t), x8.index(sx), xt8.index(sx), acc_lo, acc_hi, acc_t, TN)
        acc_lo, acc_hi, acc_t = warpgroup_mma_wait(num_outstanding=OUTSTANDING, deps=(acc_lo, acc_hi, acc_t))
        _release_step(ex, e8, it - 1, i > 0)
        it += 1
    acc_lo, acc_hi, acc_t = warpgroup_mma_wait(num_outstanding=0, deps=(acc_lo, acc_hi, acc_t))
    _release_step(ex, e8, it - 1, k_tiles > 0)
    _store_columns(out_ptr, acc_lo, row_start, row_end, pid_n, N, stride_om, scale)
    _store_columns(out_ptr, acc_hi, row_start + H, row_end, pid_n, N, stride_om, scale)
    if TN > 0:
        _store_columns(out_ptr, acc_t, row_start + BM, row_end, pid_n, N, stride_om, scale)
    return it


@gluon.jit
def _mma_partition(x8, xt8, rx, ex, c8, r8, e8, out_ptr, offs_ptr, w_amax_ptr, x_amax_ptr, M, N, K, NUM_EXPERTS,
                   stride_om, E_POW2: gl.constexpr, BN: gl.constexpr, X_PER_EXPERT: gl.constexpr,
                   NVFP4: gl.constexpr, SKIP: gl.constexpr, STACKED: gl.constexpr, SWAP: gl.constexpr):  # fmt: skip
    """FP8 wgmma of each k-step's codes tile against the group's BM rows and, where it has them, its BT tail rows (one
    conversion of the weight serves up to BM + BT routed rows), then the epilogue: ``acc * x_s * w_s`` stored bf16.
    In a persistent launch the loader and the converter fill the rings for the next tile meanwhile. ``SWAP`` (every
    shipped configuration): the product's transpose, :func:`_swapped_group`."""
    BM: gl.constexpr = x8.shape[1]
    BT: gl.constexpr = xt8.shape[1]
    BK: gl.constexpr = x8.shape[2]
    INSTR_K: gl.constexpr = 16 if NVFP4 else 32
    layout: gl.constexpr = acc_layout(gl.num_warps(), BN, INSTR_K, STACKED)  # the main rows'
    tail_layout: gl.constexpr = acc_layout(gl.num_warps(), BN, INSTR_K)
    total = _group_count(offs_ptr, M, NUM_EXPERTS, E_POW2, BM + BT) * gl.cdiv(N, BN)
    it = 0
    for tile in range(gl.program_id(0), total, gl.num_programs(0)):
        e, row_start, row_end, pid_n, k_tiles = _tile(offs_ptr, tile, M, N, K, NUM_EXPERTS, E_POW2, BM + BT, BN, BK)
        has_tail = row_end - row_start > BM
        if NVFP4:  # both operands hold their fake-quantized values
            scale = 1.0
        elif X_PER_EXPERT:
            scale = fp8_scale(gl.load(x_amax_ptr + e)) * fp8_scale(gl.load(w_amax_ptr + e))
        else:
            scale = fp8_scale(gl.load(x_amax_ptr)) * fp8_scale(gl.load(w_amax_ptr + e))
        # each branch holds its own accumulators up to its stores: an accumulator live across the other branch's
        # loop is copied at its back edge, and ptxas then serializes every wgmma of the kernel (C7514 / C7515)
        if SKIP >= 2:  # a probe's decomposition: the barriers only
            for _i in range(k_tiles):
                sx, t = _await_step(rx, r8, it)
                mbarrier.arrive(ex.index(sx))
                mbarrier.arrive(e8.index(t))
                it += 1
            acc = gl.zeros([BM, BN], gl.float32, layout)
            _store_rows(out_ptr, acc, row_start, row_end, pid_n, N, stride_om, scale)
        elif SWAP:  # the tail's MMA as wide as its rows, in steps of 16 (each branch its own accumulators)
            tail = gl.minimum(row_end - row_start - BM, BT)
            if tail <= 0:
                it = _swapped_group(x8, xt8, rx, ex, c8, r8, e8, out_ptr, it, k_tiles, row_start, row_end, pid_n, N,
                                    stride_om, scale, INSTR_K, 0)  # fmt: skip
            elif tail <= 16:
                it = _swapped_group(x8, xt8, rx, ex, c8, r8, e8, out_ptr, it, k_tiles, row_start, row_end, pid_n, N,
                                    stride_om, scale, INSTR_K, 16)  # fmt: skip
            elif tail <= 32:
                it = _swapped_group(x8, xt8, rx, ex, c8, r8, e8, out_ptr, it, k_tiles, row_start, row_end, pid_n, N,
                                    stride_om, scale, INSTR_K, 32)  # fmt: skip
            else:
                it = _swapped_group(x8, xt8, rx, ex, c8, r8, e8, out_ptr, it, k_tiles, row_start, row_end, pid_n, N,
                                    stride_om, scale, INSTR_K, BT)  # fmt: skip
        elif has_tail:
            acc = gl.zeros([BM, BN], gl.float32, layout)
            acc_t = gl.zeros([BT, BN], gl.float32, tail_layout)
            for i in range(k_tiles):
                sx, t = _await_step(rx, r8, it)
                b = c8.index(t).permute((1, 0))
                acc = warpgroup_mma(x8.index(sx), b, acc, is_async=True)
                acc_t = warpgroup_mma(xt8.index(sx), b, acc_t, is_async=True)
                acc, acc_t = warpgroup_mma_wait(num_outstanding=2, deps=(acc, acc_t))
                _release_step(ex, e8, it - 1, i > 0)  # step it - 1's MMAs are done
                it += 1
            acc, acc_t = warpgroup_mma_wait(num_outstanding=0, deps=(acc, acc_t))
            _release_step(ex, e8, it - 1, k_tiles > 0)  # the tile's last step
            _store_rows(out_ptr, acc, row_start, row_end, pid_n, N, stride_om, scale)
            _store_rows(out_ptr, acc_t, row_start + BM, row_end, pid_n, N, stride_om, scale)
        else:
            acc = gl.zeros([BM, BN], gl.float32, layout)
            for i in range(k_tiles):
                sx, t = _await_step(rx, r8, it)
                acc = warpgroup_mma(x8.index(sx), c8.index(t).permute((1, 0)), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                _release_step(ex, e8, it - 1, i > 0)
                it += 1
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            _release_step(ex, e8, it - 1, k_tiles > 0)
            _store_rows(out_ptr, acc, row_start, row_end, pid_n, N, stride_om, scale)


@gluon.jit
def _await_step(rx, r8, step):
    """Wait until k-step ``step``'s activation and weight tiles are in their ring slots; the slots."""
    SX: gl.constexpr = rx.shape[0]
    S8: gl.constexpr = r8.shape[0]
    sx = step % SX
    t = step % S8
    mbarrier.wait(rx.index(sx), (step // SX) & 1)
    mbarrier.wait(r8.index(t), (step // S8) & 1)
    return sx, t


@gluon.jit
def _release_step(ex, e8, step, pred):
    """Free k-step ``step``'s activation and weight slots (its MMAs are done) where ``pred``."""
    SX: gl.constexpr = ex.shape[0]
    S8: gl.constexpr = e8.shape[0]
    mbarrier.arrive(ex.index((step + SX) % SX), pred=pred)
    mbarrier.arrive(e8.index((step + S8) % S8), pred=pred)


@gluon.jit
def qat_ws_kernel(x_desc, xt_desc, w_desc, out_ptr, offs_ptr, w_amax_ptr, x_amax_ptr, codes_ptr, M, N, K,
                  NUM_EXPERTS, stride_om, E_POW2: gl.constexpr, BT: gl.constexpr, SX: gl.constexpr,
                  S16: gl.constexpr, S8: gl.constexpr, SPLIT: gl.constexpr, CONV_WARPS: gl.constexpr,
                  CONV_REGS: gl.constexpr, WRITE_CODES: gl.constexpr, EXACT: gl.constexpr, X_PER_EXPERT: gl.constexpr,
                  NVFP4: gl.constexpr, SKIP: gl.constexpr, STACKED: gl.constexpr, SWAP: gl.constexpr,
                  num_warps: gl.constexpr):  # fmt: skip
    """Tiles are (group of up to BM + BT routed rows of one expert, n-tile); a program takes tiles ``pid``,
    ``pid + programs``, ... (one each when launched with one program per tile; persistent when launched with one per
    SM): the rows' FP8 codes times the weight tile's e4m3 codes, converted once per k-step by the converter warps;
    ``(acc * x_s * w_s)`` stored bf16. ``SKIP`` (``benchmarks/probe_gluon_qat_fp8.py`` only; wrong products): 1 the
    converter, 2 the MMA, 3 both only pass the barriers, to time each role's share."""
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    XT: gl.constexpr = x_desc.block_type.element_ty  # e4m3 codes (FP8) or bf16 fake-quantized values (NVFP4)
    x8 = gl.allocate_shared_memory(XT, [SX, BM, BK], x_desc.layout)
    xt8 = gl.allocate_shared_memory(XT, [SX, BT, BK], xt_desc.layout)
    w16 = gl.allocate_shared_memory(gl.bfloat16, [S16, BN, BK], w_desc.layout)
    c8_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, BK], XT)
    c8 = gl.allocate_shared_memory(XT, [S8, BN, BK], c8_layout)  # the weight as the MMA takes it, same type as x
    rx, ex, r16, e16 = _load_rings(SX, S16)
    r8, e8 = _ring(S8)

    gl.warp_specialize(
        [
            (_mma_partition, (x8, xt8, rx, ex, c8, r8, e8, out_ptr, offs_ptr, w_amax_ptr, x_amax_ptr, M, N, K,
                              NUM_EXPERTS, stride_om, E_POW2, BN, X_PER_EXPERT, NVFP4, SKIP, STACKED, SWAP)),
            (_load_partition, (x_desc, xt_desc, w_desc, x8, xt8, rx, ex, w16, r16, e16, offs_ptr, M, N, K,
                               NUM_EXPERTS, E_POW2)),
            (_convert_partition, (w16, r16, e16, c8, r8, e8, offs_ptr, w_amax_ptr, codes_ptr, M, N, K, NUM_EXPERTS,
                                  E_POW2, BM + BT, SPLIT, WRITE_CODES, EXACT, NVFP4, SKIP)),
        ],
        [1, CONV_WARPS],
        [24, CONV_REGS],
    )  # fmt: skip


@gluon.constexpr_function
def lane_block_layout(rows, columns, num_warps):
    """A ``[rows, columns]`` tile of a 64-deep k-step (64 bf16 values or 32 words of two) with each lane holding whole
    16-blocks: lane ``l`` of warp ``w`` holds block ``l % 4`` of rows ``16 w + l / 4`` and ``16 w + l / 4 + 8``, the
    rows the wgmma A operand gives it. The block amax is then a reduction within the thread and each block's scale is
    computed once (in the A operand's own layout a block is spread over the four lanes of a quad, so every lane
    computes all four blocks' scales)."""
    assert columns in (32, 64), f"lane_block_layout takes 64-deep k-steps (64 values or 32 words), got {columns}"
    per_block = columns // 4
    return gl.DistributedLinearLayout(reg_bases=[[0, 1 << i] for i in range(per_block.bit_length() - 1)] + [[8, 0]],
                                      lane_bases=[[0, per_block], [0, 2 * per_block], [1, 0], [2, 0], [4, 0]],
                                      warp_bases=[[16 << i, 0] for i in range(num_warps.bit_length() - 1)],
                                      block_bases=[], shape=[rows, columns])  # fmt: skip


@gluon.jit
def _to_wgmma_slots(q):
    """A ``[BN, 64]`` tile in :func:`lane_block_layout` as the wgmma A operand with K permuted (``fake_quant_act.
    wgmma_k_order``): A-operand slot ``16 c + 8 h + 2 t + b`` of lane ``t`` of a quad is ``k = 16 t + 4 c + 2 h + b``,
    a register the lane already holds, so the layout conversion moves no data."""
    BN: gl.constexpr = q.shape[0]
    return gl.permute(q.reshape([BN, 4, 4, 2, 2]), [0, 2, 3, 1, 4]).reshape([BN, 64])


@gluon.jit
def _bf16_to_f32(w):
    """bf16 -> fp32 as bits, one instruction a value: a shift for the low half of each 32-bit register, a mask for
    the high half (the conversion's code takes a permute and a shift for the high half)."""
    return gl.inline_asm_elementwise("{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000; }", "=r,=r,r", [w],
                                     dtype=gl.float32, is_pure=True, pack=2)  # fmt: skip


@gluon.jit
def _max_abs_pairs(a, b):
    """Per 32-bit word of two bf16: ``max(|a|, |b|)`` of each half, NaN if either is NaN (the sign is the xor of the
    operands' signs: callers take the magnitude). One instruction for two values."""
    return gl.inline_asm_elementwise("max.NaN.xorsign.abs.bf16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=gl.int32,
                                     is_pure=True, pack=1)  # fmt: skip


@gluon.jit
def _words_block_amax(words):
    """``max |x|`` (fp32, NaN kept) of each 16-block of ``words [R, B, 8]`` (two bf16 a word, a block's words in one
    thread): a tree of packed maxima, then the larger half."""
    R: gl.constexpr = words.shape[0]
    B: gl.constexpr = words.shape[1]
    m = _max_abs_pairs(*gl.split(words.reshape([R, B, 4, 2])))
    m = _max_abs_pairs(*gl.split(m.reshape([R, B, 2, 2])))
    m = _max_abs_pairs(*gl.split(m))
    m = gl.inline_asm_elementwise("{ .reg .b32 t; prmt.b32 t, $1, 0, 0x1032; max.NaN.xorsign.abs.bf16x2 $0, $1, t; }",
                                  "=r,r", [m], dtype=gl.int32, is_pure=True, pack=1)  # fmt: skip
    amax = (m & 0x7FFF0000).to(gl.float32, bitcast=True)
    return gl.convert_layout(amax, gl.SliceLayout(2, words.type.layout))  # the same registers, named as words' blocks


@gluon.jit
def _clip_pairs(words, bound):
    """Each bf16 half of ``words`` clipped to ``+-B``, ``B = RZ_bf16(bound)`` (fp32 ``bound`` per block, broadcast):
    two instructions for two values (``numerics.nvfp4_clipped_operand_values``: the same E2M1 values as the fp32
    clip to ``+-bound``)."""
    upper = gl.inline_asm_elementwise("prmt.b32 $0, $1, 0, 0x3232;", "=r,r", [bound.to(gl.int32, bitcast=True)],
                                      dtype=gl.int32, is_pure=True, pack=1)  # fmt: skip
    lower = upper | -2147450880  # 0x80008000: both halves negated
    return gl.inline_asm_elementwise("{ .reg .b32 t; max.bf16x2 t, $1, $2; min.bf16x2 $0, t, $3; }", "=r,r,r,r",
                                     [words, lower[:, :, None], upper[:, :, None]], dtype=gl.int32, is_pure=True,
                                     pack=1)  # fmt: skip


@gluon.jit
def _unpack_words(words):
    """``words [R, B, W]`` of two bf16 as fp32 ``[R, B, 2 W]`` in K's order (the low half first)."""
    R: gl.constexpr = words.shape[0]
    B: gl.constexpr = words.shape[1]
    W: gl.constexpr = words.shape[2]
    v = gl.join((words << 16).to(gl.float32, bitcast=True), (words & -65536).to(gl.float32, bitcast=True))
    return v.reshape([R, B, 2 * W])


@gluon.jit
def _nvfp4_words_in_registers(words, g, six_g, inv_six_g, g_fast):
    """A bf16 weight tile held as 32-bit words ``[R, BK / 2]`` (a thread holds whole 16-blocks: the converter's
    layout, or :func:`lane_block_layout`) fake-quantized as ``numerics.fake_quant_nvfp4_operand``'s values, bf16 ``[R,
    BK]`` in K's order: the block amax and the clip on bf16 pairs (:func:`_words_block_amax`, :func:`_clip_pairs`),
    the rest in fp32."""
    R: gl.constexpr = words.shape[0]
    BK: gl.constexpr = 2 * words.shape[1]
    w = words.reshape([R, BK // 16, 8])
    block_amax = _words_block_amax(w)
    if g_fast:
        scale, inv_scale = nvfp4_operand_scale(block_amax, g, six_g, inv_six_g, False)
        clipped = _unpack_words(_clip_pairs(w, scale * 6.0))
        blocks_l: gl.constexpr = gl.SliceLayout(2, clipped.type.layout)  # the same registers, named as values' blocks
        scale = gl.convert_layout(scale, blocks_l)[:, :, None]
        q = nvfp4_clipped_operand_values(clipped, scale, gl.convert_layout(inv_scale, blocks_l)[:, :, None])
    else:
        values = _unpack_words(w)
        values_amax = gl.convert_layout(block_amax, gl.SliceLayout(2, values.type.layout))[:, :, None]
        q = fake_quant_nvfp4_operand(values, values_amax, g, six_g, inv_six_g, False, False)
    return q.reshape([R, BK]).to(gl.bfloat16)


@gluon.jit
def _nvfp4_in_registers(w, g, six_g, inv_six_g, g_fast):
    """A bf16 weight tile in registers fake-quantized in place (``numerics.fake_quant_nvfp4_operand``): each
    16-block's amax a reduction over the lanes and registers that hold it, then its scale and reciprocal, then the
    values. Returned bf16 in ``w``'s layout."""
    BN: gl.constexpr = w.shape[0]
    BK: gl.constexpr = w.shape[1]
    b = _bf16_to_f32(w).reshape([BN, BK // 16, 16])
    block_amax = gl.reduce(gl.abs(b), 2, max_keeping_nan)
    if g_fast:
        scale, inv_scale = nvfp4_operand_scale(block_amax, g, six_g, inv_six_g, False)
        q = nvfp4_operand_values(b, scale[:, :, None], inv_scale[:, :, None], False)
    else:
        q = fake_quant_nvfp4_operand(b, block_amax[:, :, None], g, six_g, inv_six_g, False, False)
    return gl.convert_layout(q.reshape([BN, BK]), w.type.layout).to(gl.bfloat16)


@gluon.jit
def _register_operand(w_tile, a_l: gl.constexpr, g, six_g, inv_six_g, g_fast, SKIP: gl.constexpr,
                      LANE_BLOCKS: gl.constexpr):  # fmt: skip
    """``(operand, values)``: the wgmma A operand (layout ``a_l``) of the bf16 weight tile ``w_tile`` in shared memory,
    fake-quantized, and the fake-quantized tile in K's own order (for the tests' codes). ``LANE_BLOCKS``: loaded as
    32-bit words in :func:`lane_block_layout` (:func:`_nvfp4_words_in_registers`), the operand's K permuted
    (``fake_quant_act.wgmma_k_order``). ``SKIP`` 1 (a probe's decomposition): the tile as loaded."""
    gl.static_assert(SKIP <= 1, "the register-operand kernel decomposes only as SKIP=1 (no conversion)")
    BN: gl.constexpr = w_tile.shape[0]
    BK: gl.constexpr = w_tile.shape[1]
    if LANE_BLOCKS:
        if SKIP == 1:
            q = w_tile.load(lane_block_layout(BN, BK, gl.num_warps()))
        else:
            W32: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, BK // 2], gl.int32)
            words = _as_words(w_tile, [BN, BK // 2], W32).load(lane_block_layout(BN, BK // 2, gl.num_warps()))
            q = _nvfp4_words_in_registers(words, g, six_g, inv_six_g, g_fast)
        operand = gl.convert_layout(_to_wgmma_slots(q), a_l)
    else:
        q = w_tile.load(a_l)
        if SKIP == 0:
            q = _nvfp4_in_registers(q, g, six_g, inv_six_g, g_fast)
        operand = q
    return operand, q


@gluon.jit
def _store_codes(codes_ptr, q, first_row, end_row, first_col, K):
    """Write a converted tile ``q`` (rows from ``first_row``, columns from ``first_col``) to ``codes_ptr`` (tests),
    within the expert's rows (``end_row``) and K's columns."""
    L: gl.constexpr = q.type.layout
    r = first_row + gl.arange(0, q.shape[0], layout=gl.SliceLayout(1, L))
    c = first_col + gl.arange(0, q.shape[1], layout=gl.SliceLayout(0, L))
    mask = (r < end_row)[:, None] & (c < K)[None, :]
    gl.store(codes_ptr + r.to(gl.int64)[:, None] * K + c[None, :], q, mask=mask)


@gluon.jit
def _store_chunk(out_ptr, values, stage, first, row_end, pid_n, N, stride_om):
    """``values [BN, 64]`` bf16 (a chunk of the product's transpose) stored into rows ``first..`` (below ``row_end``)
    through ``stage`` in shared memory, read back with each thread holding eight consecutive output columns of one row:
    16-byte stores (in the accumulator's layout a thread's neighbouring columns are another lane's)."""
    BN: gl.constexpr = values.shape[0]
    layout: gl.constexpr = gl.BlockedLayout([8, 1], [BN // 8, 256 // BN], [1, gl.num_warps()], [0, 1])
    stage.store(values)
    values = stage.load(layout)
    cols = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, layout))
    rows = first + gl.arange(0, values.shape[1], layout=gl.SliceLayout(0, layout))
    mask = (cols < N)[:, None] & (rows < row_end)[None, :]
    gl.store(out_ptr + rows.to(gl.int64)[None, :] * stride_om + cols[:, None], values, mask=mask)


@gluon.jit
def _halves(t):
    """A register tensor ``[R, C]`` split along its columns into ``[R, C / 2]`` halves (a register selection)."""
    R: gl.constexpr = t.shape[0]
    C: gl.constexpr = t.shape[1]
    return gl.split(gl.permute(t.reshape([R, 2, C // 2]), [0, 2, 1]))


@gluon.jit
def _store_transposed(out_ptr, acc, stage, first, row_end, pid_n, N, stride_om):
    """``acc [BN, rows]`` (the product's transpose, 64 or 256 rows) stored bf16 into rows ``first..`` (below
    ``row_end``) in 64-row chunks (:func:`_store_chunk`)."""
    values = acc.to(gl.bfloat16)
    if acc.shape[1] == 64:
        _store_chunk(out_ptr, values, stage, first, row_end, pid_n, N, stride_om)
    else:
        gl.static_assert(acc.shape[1] == 256, "the register-operand kernel stores 64- or 256-row accumulators")
        low, high = _halves(values)
        first_q, second_q = _halves(low)
        _store_chunk(out_ptr, first_q, stage, first, row_end, pid_n, N, stride_om)
        _store_chunk(out_ptr, second_q, stage, first + 64, row_end, pid_n, N, stride_om)
        third_q, fourth_q = _halves(high)
        _store_chunk(out_ptr, third_q, stage, first + 128, row_end, pid_n, N, stride_om)
        _store_chunk(out_ptr, fourth_q, stage, first + 192, row_end, pid_n, N, stride_om)


@gluon.jit
def _operand_step(w16, r16, e16, rx, it, a_l: gl.constexpr, g, six_g, inv_six_g, g_fast, codes_ptr, codes_row,
                  codes_end, first_col, K, SKIP: gl.constexpr, LANE_BLOCKS: gl.constexpr,
                  WRITE_CODES: gl.constexpr):  # fmt: skip
    """k-step ``it``'s wgmma A operand (:func:`_register_operand`; its weight slot released once read, its values
    written to ``codes_ptr`` for tests) and the activation slot ``sx``, once its tiles have landed."""
    S16: gl.constexpr = w16.shape[0]
    SX: gl.constexpr = rx.shape[0]
    s = it % S16
    mbarrier.wait(r16.index(s), (it // S16) & 1)
    q, values = _register_operand(w16.index(s), a_l, g, six_g, inv_six_g, g_fast, SKIP, LANE_BLOCKS)
    mbarrier.arrive(e16.index(s))
    if WRITE_CODES:
        _store_codes(codes_ptr, values, codes_row, codes_end, first_col, K)
    sx = it % SX
    mbarrier.wait(rx.index(sx), (it // SX) & 1)
    return q, sx


@gluon.jit
def _convert_mma_partition(x8, xt8, rx, ex, w16, r16, e16, stage, out_ptr, offs_ptr, w_amax_ptr, codes_ptr, M, N, K,
                           NUM_EXPERTS, stride_om, E_POW2: gl.constexpr, WRITE_CODES: gl.constexpr,
                           SKIP: gl.constexpr, LANE_BLOCKS: gl.constexpr, SYNC: gl.constexpr):  # fmt: skip
    """QAT NVFP4 with the weight as the register operand (``out^T = fq(w)^T x^T``, CUTLASS's mixed-input form): the
    same warps load each bf16 weight tile from shared memory into registers (``LANE_BLOCKS``: whole 16-blocks a lane,
    K permuted; else the A-operand layout), fake-quantize it there and multiply it by the activation tiles (B, in
    shared memory). ``SYNC`` (the default, ``RS_WGMMA_SYNC``) retires each step's wgmmas before the next step's
    conversion; without it step i + 1 is converted while step i's wgmmas run, which ptxas miscompiles. No converter
    warps, no shared-memory round trip of the converted values."""
    BM: gl.constexpr = x8.shape[1]
    BT: gl.constexpr = xt8.shape[1]
    BK: gl.constexpr = x8.shape[2]
    BN: gl.constexpr = w16.shape[1]
    main_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                     instr_shape=[16, BM, 16])  # fmt: skip
    tail_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                     instr_shape=[16, BT, 16])  # fmt: skip
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=main_l, k_width=2)
    a_tail_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=tail_l, k_width=2)
    total = _group_count(offs_ptr, M, NUM_EXPERTS, E_POW2, BM + BT) * gl.cdiv(N, BN)
    it = 0
    for tile in range(gl.program_id(0), total, gl.num_programs(0)):
        e, row_start, row_end, pid_n, k_tiles = _tile(offs_ptr, tile, M, N, K, NUM_EXPERTS, E_POW2, BM + BT, BN, BK)
        has_tail = row_end - row_start > BM
        g, g_fast, six_g, inv_six_g = _nvfp4_expert_scales(gl.load(w_amax_ptr + e))
        codes_row = e * N + pid_n * BN
        q_prev = gl.zeros([BN, BK], gl.bfloat16, a_l)  # the registers the wgmma in flight reads
        if has_tail:
            acc = gl.zeros([BN, BM], gl.float32, main_l)
            acc_t = gl.zeros([BN, BT], gl.float32, tail_l)
            qt_prev = gl.zeros([BN, BK], gl.bfloat16, a_tail_l)  # the tail wgmma's operand: a value of its own
            for i in range(k_tiles):
                q, sx = _operand_step(w16, r16, e16, rx, it, a_l, g, six_g, inv_six_g, g_fast, codes_ptr, codes_row,
                                      e * N + N, i * BK, K, SKIP, LANE_BLOCKS, WRITE_CODES)  # fmt: skip
                qt = gl.convert_layout(q, a_tail_l)
                acc = warpgroup_mma(q, x8.index(sx).permute((1, 0)), acc, is_async=True)
                acc_t = warpgroup_mma(qt, xt8.index(sx).permute((1, 0)), acc_t, is_async=True)
                acc, acc_t, q_prev, q, qt_prev, qt = warpgroup_mma_wait(
                    num_outstanding=0 if SYNC else 2, deps=(acc, acc_t, q_prev, q, qt_prev, qt)
                )
                mbarrier.arrive(ex.index((it - 1 + x8.shape[0]) % x8.shape[0]), pred=i > 0)
                q_prev = q
                qt_prev = qt
                it += 1
            acc, acc_t, q_prev, qt_prev = warpgroup_mma_wait(num_outstanding=0, deps=(acc, acc_t, q_prev, qt_prev))
            mbarrier.arrive(ex.index((it - 1 + x8.shape[0]) % x8.shape[0]), pred=k_tiles > 0)
            _store_transposed(out_ptr, acc, stage, row_start, row_end, pid_n, N, stride_om)
            _store_transposed(out_ptr, acc_t, stage, row_start + BM, row_end, pid_n, N, stride_om)
        else:
            acc = gl.zeros([BN, BM], gl.float32, main_l)
            for i in range(k_tiles):
                q, sx = _operand_step(w16, r16, e16, rx, it, a_l, g, six_g, inv_six_g, g_fast, codes_ptr, codes_row,
                                      e * N + N, i * BK, K, SKIP, LANE_BLOCKS, WRITE_CODES)  # fmt: skip
                acc = warpgroup_mma(q, x8.index(sx).permute((1, 0)), acc, is_async=True)
                acc, q_prev, q = warpgroup_mma_wait(num_outstanding=0 if SYNC else 1, deps=(acc, q_prev, q))
                mbarrier.arrive(ex.index((it - 1 + x8.shape[0]) % x8.shape[0]), pred=i > 0)
                q_prev = q
                it += 1
            acc, q_prev = warpgroup_mma_wait(num_outstanding=0, deps=(acc, q_prev))
            mbarrier.arrive(ex.index((it - 1 + x8.shape[0]) % x8.shape[0]), pred=k_tiles > 0)
            _store_transposed(out_ptr, acc, stage, row_start, row_end, pid_n, N, stride_om)


@gluon.jit
def qat_nvfp4_rega_kernel(x_desc, xt_desc, w_desc, out_ptr, offs_ptr, w_amax_ptr, codes_ptr, M, N, K, NUM_EXPERTS,
                          stride_om, E_POW2: gl.constexpr, BT: gl.constexpr, SX: gl.constexpr,
                          S16: gl.constexpr, WRITE_CODES: gl.constexpr, SKIP: gl.constexpr, LANE_BLOCKS: gl.constexpr,
                          SYNC: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    """QAT NVFP4 with the weight as wgmma's register operand: a 1-warp TMA loader and the ``num_warps`` warps of
    :func:`_convert_mma_partition`, which convert and multiply, and a 16 KB stage for the transposed epilogue
    (experimental; sessions 36-37)."""
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    x8 = gl.allocate_shared_memory(gl.bfloat16, [SX, BM, BK], x_desc.layout)
    xt8 = gl.allocate_shared_memory(gl.bfloat16, [SX, BT, BK], xt_desc.layout)
    w16 = gl.allocate_shared_memory(gl.bfloat16, [S16, BN, BK], w_desc.layout)
    stage_layout: gl.constexpr = gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[0, 1])
    stage = gl.allocate_shared_memory(gl.bfloat16, [BN, 64], stage_layout)  # the epilogue's 64-row chunks
    rx, ex, r16, e16 = _load_rings(SX, S16)
    gl.warp_specialize(
        [
            (_convert_mma_partition, (x8, xt8, rx, ex, w16, r16, e16, stage, out_ptr, offs_ptr, w_amax_ptr,
                                      codes_ptr, M, N, K, NUM_EXPERTS, stride_om, E_POW2, WRITE_CODES, SKIP,
                                      LANE_BLOCKS, SYNC)),
            (_load_partition, (x_desc, xt_desc, w_desc, x8, xt8, rx, ex, w16, r16, e16, offs_ptr, M, N, K,
                               NUM_EXPERTS, E_POW2)),
        ],
        [1],
        [24],
    )  # fmt: skip


#: whether :func:`qat_nvfp4_rega_kernel` waits for each k-step's wgmmas before converting the next step's weight (no
#: overlap of conversion and MMA within a warpgroup). True unless you are studying the hazard: without the wait, ptxas
#: may reuse an in-flight wgmma's A registers for the next step's temporaries (PTX leaves it undefined; triton issue
#: #9433). Session 38 on the H100 saw wrong, run-to-run different tail rows without it under ptxas 12.8 (both
#: layouts) and 13.5 (the plain layout), and no cost from it (kernel alone within 1.3%).
RS_WGMMA_SYNC: bool = True


class GluonConfig(NamedTuple):
    """One launch configuration of :func:`qat_ws_kernel`."""

    bm: int  # rows multiplied in the main accumulator
    bt: int  # tail rows in the second accumulator (a group holds up to bm + bt routed rows of one expert)
    bn: int
    bk: int
    sx: int  # activation codes stages
    s16: int  # bf16 weight stages
    s8: int  # weight codes stages
    split: int  # the converter's passes over a tile (register pressure)
    conv_warps: int
    conv_regs: int
    mma_warps: int
    maxnreg: int
    exact: int  # 1: numerics.divide, 2: lean_quotient (both the spec's codes); NVFP4: 1 fake_quant_nvfp4_blocks (bit
    # for bit), 2 fake_quant_nvfp4_operand (the values, a zero's sign not kept); 0: reciprocal multiply (NOT the spec:
    # a probe's speed ceiling, never chosen by grouped_qmm)
    persistent: bool = False  # one program per SM looping over the tiles (else one per tile)
    nvfp4: bool = False  # QAT NVFP4: bf16 fake-quantized activations, the weight fake-quantized to bf16, bf16 wgmma
    stacked: bool = False  # the main rows' warpgroups stacked along M, each wgmma all bn columns wide (acc_layout)
    register_a: int = 0  # NVFP4, experimental: the weight as wgmma's register operand (qat_nvfp4_rega_kernel); 2:
    # each lane holds whole 16-blocks (lane_block_layout) and K is permuted (wgmma_k_order), 1: the plain A layout
    swap: bool = False  # out^T = q(w) x^T: the weight tile the A operand, the rows B (the main rows in two wgmmas
    # bm / 2 rows wide, the tail's as wide as its rows: 16, 32 or 64; _swapped_group)
    tail_box: int = 0  # rows a TMA copy of the tail brings (only the boxes holding the group's tail rows); 0: the
    # whole bt rows (every shipped configuration: the boxes are bit-equal and ~2% faster on the loads, the kernels'
    # gain within the rounds' spread; docs/grouped_qmm.md, sessions 39-40)

    @property
    def tail_rows_a_copy(self) -> int:
        return self.tail_box or self.bt

    @property
    def name(self) -> str:
        if self.register_a:
            return (f"gluon register-A NVFP4 {self.bm}+{self.bt}x{self.bn}x{self.bk} st {self.sx}/{self.s16} "
                    f"mma {self.mma_warps}w maxnreg {self.maxnreg}" + " persistent" * self.persistent
                    + " lane blocks" * (self.register_a == 2)
                    + f" tail box {self.tail_box}" * bool(self.tail_box))  # fmt: skip
        kinds = (
            ("NVFP4", "NVFP4 exact", "NVFP4 operand") if self.nvfp4 else ("RECIPROCAL (not exact)", "divide", "lean")
        )
        return (f"gluon ws {self.bm}+{self.bt}x{self.bn}x{self.bk} st {self.sx}/{self.s16}/{self.s8} "
                f"split {self.split} conv {self.conv_warps}w/{self.conv_regs}r mma {self.mma_warps}w "
                f"maxnreg {self.maxnreg} {kinds[self.exact]}" + " persistent" * self.persistent
                + " stacked" * self.stacked + " swapped" * self.swap
                + f" tail box {self.tail_box}" * bool(self.tail_box))  # fmt: skip

    def problem(self) -> str | None:
        """Why this configuration cannot build (None: it can): the MMA warps must make whole warpgroups, every
        accumulator's rows whole 64-row wgmma blocks per warpgroup (``stacked``: the main rows split between the
        warpgroups) and every wgmma 8 to 256 columns wide."""
        groups = self.mma_warps // 4
        if self.register_a and not (self.nvfp4 and self.bn == 64 * groups and self.bm <= 256 and self.bt <= 256):
            return (f"register_a is QAT NVFP4 with 64 weight rows per warpgroup (bn = {64 * groups}) and at most 256 "
                    f"main and 256 tail rows (wgmma's n), got nvfp4={self.nvfp4}, bn={self.bn}, bm={self.bm}, "
                    f"bt={self.bt}")  # fmt: skip
        if self.swap and self.stacked:
            return "swap and stacked are two accumulator arrangements; choose one"
        if self.swap and not (self.bn == 16 * self.mma_warps and self.bm % 8 == 0 and self.bm <= 256
                              and self.bt == 64):  # fmt: skip
            return (f"swap takes 64 weight rows per MMA warpgroup (bn = {16 * self.mma_warps}), bm a multiple of 8 up "
                    f"to 256 (wgmma's n) and bt = 64 (tails of 16, 32 or 64 rows), got bn={self.bn}, bm={self.bm}, "
                    f"bt={self.bt}")  # fmt: skip
        if self.register_a == 2 and self.bk != 64:
            return f"register_a=2 (whole 16-blocks a lane) takes 64-deep k-steps, got bk={self.bk}"
        if self.mma_warps % 4 or groups not in (1, 2):
            return f"mma_warps must be 4 or 8 (one or two warpgroups), got {self.mma_warps}"
        if self.bm % (64 * (groups if self.stacked else 1)) or self.bt % 64:
            return (f"bm must be a multiple of {64 * (groups if self.stacked else 1)} and bt of 64 "
                    f"(64-row wgmma blocks{' per stacked warpgroup' if self.stacked else ''}), got {self.bm}, "
                    f"{self.bt}")  # fmt: skip
        widths = {self.bn // groups} | ({self.bn} if self.stacked else set())
        if any(w % 8 or not 8 <= w <= 256 for w in widths) or self.bn % groups:
            return f"every wgmma must be 8 to 256 columns wide, a multiple of 8: bn={self.bn} gives {sorted(widths)}"
        if self.tail_box and (self.tail_box % 8 or self.bt % self.tail_box):
            return f"tail_box must divide bt and be a multiple of 8 (swizzled rows), got {self.tail_box}, bt={self.bt}"
        if self.bk % (16 if self.nvfp4 else 32):
            return f"bk must be a multiple of {16 if self.nvfp4 else 32} (the wgmma's k), got {self.bk}"
        return None

    def check(self) -> None:
        """Raise ``ValueError`` naming this configuration and :meth:`problem`'s reason, if it has one."""
        reason = self.problem()
        if reason:
            raise ValueError(f"GluonConfig {self.name}: {reason}")

    def layouts(self):
        """Shared layouts of the activation (codes or bf16 values), tail and bf16 weight TMA blocks."""
        x_type = gl.bfloat16 if self.nvfp4 else gl.float8e4nv
        return (gl.NVMMASharedLayout.get_default_for([self.bm, self.bk], x_type),
                gl.NVMMASharedLayout.get_default_for([self.bt, self.bk], x_type),
                gl.NVMMASharedLayout.get_default_for([self.bn, self.bk], gl.bfloat16))  # fmt: skip

    def constexprs(self, num_experts: int, write_codes: bool = False, x_per_expert: bool = False,
                   skip: int = 0) -> dict:  # fmt: skip
        if self.register_a:
            return dict(E_POW2=max(32, triton.next_power_of_2(num_experts)), BT=self.bt, SX=self.sx, S16=self.s16,
                        WRITE_CODES=write_codes, SKIP=skip, LANE_BLOCKS=self.register_a == 2,
                        SYNC=RS_WGMMA_SYNC,
                        num_warps=self.mma_warps)  # fmt: skip
        return dict(E_POW2=max(32, triton.next_power_of_2(num_experts)), BT=self.bt, SX=self.sx, S16=self.s16,
                    S8=self.s8,
                    SPLIT=self.split, CONV_WARPS=self.conv_warps, CONV_REGS=self.conv_regs, WRITE_CODES=write_codes,
                    EXACT=self.exact, X_PER_EXPERT=x_per_expert, NVFP4=self.nvfp4, SKIP=skip, STACKED=self.stacked,
                    SWAP=self.swap,
                    num_warps=self.mma_warps)  # fmt: skip

    def compile_for_sm90(self, x_per_expert: bool = False, num_experts: int = 128):
        """This configuration's kernel compiled ahead of time for sm_90 (no GPU needed): shared memory, register
        budgets and PTX, for tests and the probe. Specialized as a launch at model shapes is (Triton's JIT marks
        16-byte-aligned pointers and integers that are multiples of 16; vectorized stores depend on it)."""
        from triton.backends.compiler import GPUTarget
        from triton.experimental.gluon._runtime import GluonASTSource

        self.check()
        xl, tl_, wl = self.layouts()
        x_type = "bf16" if self.nvfp4 else "fp8e4nv"
        signature = {
            "x_desc": f"tensordesc<{x_type}{[self.bm, self.bk]},{xl!r}>",
            "xt_desc": f"tensordesc<{x_type}{[self.tail_rows_a_copy, self.bk]},{tl_!r}>",
            "w_desc": f"tensordesc<bf16{[self.bn, self.bk]},{wl!r}>",
            "out_ptr": "*bf16",
            "offs_ptr": "*i32",
            **dict.fromkeys(["w_amax_ptr", "x_amax_ptr"], "*fp32"),
            "codes_ptr": f"*{x_type}",
            **dict.fromkeys(["M", "N", "K", "NUM_EXPERTS", "stride_om"], "i32"),
        }
        if self.register_a:
            del signature["x_amax_ptr"]
        constants = self.constexprs(num_experts, x_per_expert=x_per_expert)
        signature.update(dict.fromkeys(constants, "constexpr"))
        aligned = [i for i, (name, kind) in enumerate(signature.items()) if kind.startswith("*") or kind == "i32"]
        attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
        kernel = qat_nvfp4_rega_kernel if self.register_a else qat_ws_kernel
        source = GluonASTSource(kernel, signature, constants, attrs)
        options = {"num_warps": self.mma_warps, "maxnreg": self.maxnreg}
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def sass(cubin: bytes) -> str:
    """The SASS listing of a compiled kernel's cubin (``triton.tools.disasm.get_sass``), whole. Triton 3.6's listing
    stops at the first instruction past 64 KB of code: its address pattern takes four hex digits (Triton 3.9's takes
    more). The QAT NVFP4 kernel's tail-row loop lies past that, so under 3.6 it looked absent (session 40: 8 of the 20
    ``HGMMA`` in its cubin listed, all 20 by ``nvdisasm``). The pattern is widened here as 3.9 has it."""
    from triton.tools import disasm

    disasm.FLINE_RE = re.compile(r"\s*/\*\w{4,}\*/\s*([^;]*;)\s*/\* 0x(\w{16}) \*/\s*")
    return disasm.get_sass(cubin)


#: the configurations :func:`qat_fp8_gluon_gemm` times once per shape key (:func:`tuned_config`) and picks from, all
#: with the lean exact quotient and groups of 256 + 64 rows: 128 x 64 tiles with 8 MMA warps (the fastest measured:
#: the activation codes, read again for every n-tile, are what limits the kernel), and 64 x 64 tiles with 4 MMA warps
#: and 6 activation stages (the activation slot of step i is released only when step i - 2's MMA is done), each
#: launched with one program per tile (session 33) and persistent, one program per SM (the loader and the converter
#: fill the rings for the next tile while the MMA warps store the last; no programs for the spare row groups of the
#: grid's upper bound), and the 128-wide tile persistent with 7 activation stages. Each computes the product's
#: transpose (``swap``, session 41: the tail's wgmma as wide as its rows; H100, 7 stages: gate_up 0.483 -> 0.479 ms,
#: down 0.311 -> 0.299 against the stacked warpgroups of session 36, themselves 0.549 -> 0.527 / 0.344 -> 0.336
#: against side by side). All bit-exact on the H100 at Qwen3 shapes. The probe, ``benchmarks/probe_gluon_qat_fp8.py``,
#: times more candidates and the inexact reciprocal ceilings.
CONFIGS = (
    GluonConfig(256, 64, 128, 64, 5, 3, 3, 2, 4, 80, 8, 128, 2, swap=True),
    GluonConfig(256, 64, 64, 64, 6, 4, 3, 1, 4, 96, 4, 168, 2, swap=True),
    GluonConfig(256, 64, 128, 64, 5, 3, 3, 2, 4, 80, 8, 128, 2, persistent=True, swap=True),
    GluonConfig(256, 64, 64, 64, 6, 4, 3, 1, 4, 96, 4, 168, 2, persistent=True, swap=True),
    GluonConfig(256, 64, 128, 64, 7, 3, 3, 2, 4, 80, 8, 128, 2, persistent=True, swap=True),
)
#: the experimental register-operand form of QAT NVFP4 (:func:`qat_nvfp4_rega_kernel`; :func:`tuned_config` never picks
#: it: 3-4% faster than the shipped kernel on the H100, session 37): 8 converting-and-multiplying warps at 240
#: registers, a 1-warp loader
REGISTER_A_CONFIGS = tuple(
    GluonConfig(256, 64, 128, bk, sx, s16, 0, 0, 0, 0, 8, 168, 2, persistent=True, nvfp4=True, register_a=form)
    for form, bk, sx, s16 in ((2, 64, 3, 4), (2, 64, 4, 3), (1, 64, 3, 4), (1, 64, 4, 3), (1, 32, 6, 8))
)
#: QAT NVFP4's candidates (:func:`qat_nvfp4_gluon_gemm`): bf16 activations and bf16 weight values in shared memory,
#: so fewer stages than FP8's at the same depth, and the operand converter (``numerics.fake_quant_nvfp4_operand``)
#: with 104 registers and two 16-blocks a thread per pass, as 64-deep k-steps in two passes (three converted stages)
#: and 32-deep ones in one; the product's transpose (``swap``). H100, kernel alone, gate_up / down: session 35
#: (side by side) 0.77 / 0.44 ms; session 36 (stacked) 0.69 / 0.41 ms; session 41 (swapped) 0.677 / 0.387 ms. The
#: converter is the limit: the MMA warps wait for its tiles (Nsight Compute, BENCHMARKS.md sessions 36 and 41), and 8
#: converter warps would leave the MMA warps too few registers for their 160 accumulator registers
#: (``benchmarks/probe_gluon_qat_nvfp4.py``).
NVFP4_CONFIGS = (
    GluonConfig(256, 64, 128, 64, 3, 3, 3, 2, 4, 104, 8, 128, 2, persistent=True, nvfp4=True, swap=True),
    GluonConfig(256, 64, 128, 32, 5, 4, 3, 1, 4, 104, 8, 128, 2, persistent=True, nvfp4=True, swap=True),
)
_TUNED: dict[tuple, GluonConfig] = {}


def tuned_config(key: tuple, launch: Callable[[GluonConfig], object], configs=CONFIGS) -> GluonConfig:
    """The fastest of ``configs`` for ``key`` (format, experts, N, K, rows bucket): each is timed with
    ``triton.testing.do_bench`` on the first call of a key (as Triton's autotuner does), then remembered."""
    if key not in _TUNED:
        from triton.testing import do_bench

        times = {config: do_bench(lambda config=config: launch(config), warmup=5, rep=25) for config in configs}
        _TUNED[key] = min(times, key=times.get)
        log.info("Gluon QAT GEMM %s: %s (%s)", key, _TUNED[key].name,
                 ", ".join(f"{ms:.4f} ms" for ms in times.values()))  # fmt: skip
    return _TUNED[key]


@functools.cache
def _device_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(
        index if index is not None else torch.cuda.current_device()
    ).multi_processor_count


def unsupported_reason(
    x_codes: torch.Tensor, w: torch.Tensor, w_amax: torch.Tensor, x_amax: torch.Tensor | None, nvfp4: bool = False
) -> str | None:
    """Why :func:`qat_fp8_gluon_gemm` (``nvfp4``: :func:`qat_nvfp4_gluon_gemm`) cannot multiply these operands
    (None: it can). ``x_codes [M, K]`` e4m3 (``nvfp4``: the bf16 fake-quantized activations), ``w`` a bf16
    ``[E, K, N]`` view of a contiguous ``[E, N, K]`` weight (HF's layout; TMA reads K-major tiles), ``w_amax [E]``,
    ``x_amax`` ``[1]`` or ``[E]`` (FP8)."""
    num_experts, k, n = w.shape
    if interpreting() or not x_codes.is_cuda or not torch.cuda.is_available():
        return "needs a CUDA device (Gluon has no interpreter)"
    if not _device_ok(x_codes.device.index if x_codes.device.index is not None else torch.cuda.current_device()):
        return "needs sm_90 (Hopper wgmma)"
    if nvfp4 and (w.dtype != torch.bfloat16 or x_codes.dtype != torch.bfloat16):
        return f"needs a bf16 weight and bf16 fake-quantized activations, got {w.dtype} and {x_codes.dtype}"
    if not nvfp4 and (w.dtype != torch.bfloat16 or x_codes.dtype not in (torch.float8_e4m3fn, torch.uint8)):
        return f"needs a bf16 weight and e4m3 activation codes, got {w.dtype} and {x_codes.dtype}"
    if not w.transpose(1, 2).is_contiguous():
        return f"needs the weight as a [E, K, N] view of a contiguous [E, N, K] tensor, got strides {w.stride()}"
    if not x_codes.is_contiguous() or k % 16:
        return f"needs contiguous activation codes with K a multiple of 16 (TMA rows), got K={k}"
    if w_amax.dim() != 1 or w_amax.numel() != num_experts:
        return f"needs per-expert weight amax [{num_experts}], got shape {tuple(w_amax.shape)}"
    if not nvfp4 and (x_amax is None or x_amax.numel() not in (1, num_experts)):
        return f"needs x_amax [1] or [{num_experts}]"
    return None


def qat_fp8_gluon_gemm(x_codes: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, w_amax: torch.Tensor,
                       x_amax: torch.Tensor, out: torch.Tensor | None = None, config: GluonConfig | None = None,
                       codes: torch.Tensor | None = None, skip: int = 0, check: bool = True) -> torch.Tensor:  # fmt: skip
    """``out[rows of e] = (x_codes[rows] @ q(w[e])) * x_s * w_s[e]`` in bf16 (rows past ``offs[-1]``: zeros), where
    ``q`` is formats' FP8 quantization by the amax ``w_amax[e]`` and ``x_s = x_amax / 448`` (shared or per expert).
    ``codes`` (``[E, N, K]`` e4m3, optional): also written with the codes of the weights of experts with rows
    (tests). ``config``: launch with it instead of :func:`tuned_config`'s choice. ``skip``: the kernel's ``SKIP``
    (a probe's decomposition; not the product).
    Raises ``ValueError`` with :func:`unsupported_reason`'s text for operands it cannot take (``check=False``:
    the caller has asked already)."""
    reason = unsupported_reason(x_codes, w, w_amax, x_amax) if check else None
    if reason:
        raise ValueError(f"qat_fp8_gluon_gemm: {reason}")
    return _launch(x_codes.view(torch.float8_e4m3fn), w, offs, w_amax, x_amax, out, config, codes, skip, CONFIGS)


def qat_nvfp4_gluon_gemm(x_fq: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, w_amax: torch.Tensor,
                         out: torch.Tensor | None = None, config: GluonConfig | None = None,
                         codes: torch.Tensor | None = None, skip: int = 0, check: bool = True,
                         x_in_wgmma_k_order: bool = False) -> torch.Tensor:  # fmt: skip
    """QAT NVFP4: ``out[rows of e] = x_fq[rows] @ fq(w[e])`` in bf16 (rows past ``offs[-1]``: zeros), where ``fq`` is
    formats' NVFP4 fake quant with the expert's amax ``w_amax[e]`` (16-blocks along K), made in shared memory and
    multiplied by bf16 ``wgmma``, and ``x_fq`` the activations already fake-quantized (``fake_quant_act``). Hopper has
    no FP4 MMA and NVFP4 values are not e4m3 values, so the operands are bf16 (exact for NVFP4 values times g).
    ``codes`` (``[E, N, K]`` bf16, optional): also written with the fake-quantized weights of experts with rows.
    A ``register_a=2`` configuration takes ``x_fq`` in ``fake_quant_act.wgmma_k_order`` (``x_in_wgmma_k_order``: the
    caller's ``fake_quant_act(..., in_wgmma_k_order=True)`` wrote it so; else it is permuted here, a copy)."""
    reason = unsupported_reason(x_fq, w, w_amax, None, nvfp4=True) if check else None
    if reason:
        raise ValueError(f"qat_nvfp4_gluon_gemm: {reason}")
    lane_blocks = config is not None and config.register_a == 2
    if x_in_wgmma_k_order and not lane_blocks:
        raise ValueError(f"qat_nvfp4_gluon_gemm: x_fq in wgmma_k_order needs a register_a=2 configuration, got "
                         f"{config.name if config is not None else 'the tuned one'}")  # fmt: skip
    if lane_blocks and not x_in_wgmma_k_order:
        x_fq = wgmma_k_order(x_fq)
    return _launch(x_fq, w, offs, w_amax, w_amax[:1], out, config, codes, skip, NVFP4_CONFIGS)  # x_amax unused


def _launch(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, w_amax: torch.Tensor, x_amax: torch.Tensor,
            out: torch.Tensor | None, config: GluonConfig | None, codes: torch.Tensor | None, skip: int,
            configs: tuple[GluonConfig, ...]) -> torch.Tensor:  # fmt: skip
    """One launch of :func:`qat_ws_kernel` with ``config`` or the tuned one of ``configs``."""
    num_experts, k, n = w.shape
    m = x.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    if m == 0 or n == 0:
        return out
    w_rows = w.transpose(1, 2).reshape(num_experts * n, k)  # a view: the check asked for [E, N, K] storage

    def launch(config: GluonConfig) -> None:
        xl, tl_, wl = config.layouts()
        x_desc = TensorDescriptor.from_tensor(x, [config.bm, config.bk], xl)
        xt_desc = TensorDescriptor.from_tensor(x, [config.tail_rows_a_copy, config.bk], tl_)
        w_desc = TensorDescriptor.from_tensor(w_rows, [config.bn, config.bk], wl)
        tiles = (cdiv(m, config.bm + config.bt) + min(num_experts, m)) * cdiv(n, config.bn)  # at most
        grid = (min(tiles, _sm_count(x.device.index)) if config.persistent else tiles,)
        consts = config.constexprs(num_experts, codes is not None, x_amax.numel() > 1, skip)
        if config.register_a:
            qat_nvfp4_rega_kernel[grid](x_desc, xt_desc, w_desc, out, offs, w_amax,
                                        codes if codes is not None else out, m, n, k, num_experts, out.stride(0),
                                        maxnreg=config.maxnreg, **consts)  # fmt: skip
            return
        qat_ws_kernel[grid](x_desc, xt_desc, w_desc, out, offs, w_amax, x_amax,
                            codes if codes is not None else out, m, n, k, num_experts, out.stride(0),
                            maxnreg=config.maxnreg, **consts)  # fmt: skip

    if config is None:  # one of moeq's configurations (tests/test_qat_gluon.py checks each)
        key = (configs[0].nvfp4, num_experts, n, k, m_bucket(m, num_experts))
        config = tuned_config(key, launch, configs)
    else:
        config.check()
    launch(config)
    return out


@torch.library.custom_op("moeq::qat_fp8_gluon_gemm", mutates_args=())
def qat_fp8_gluon_gemm_op(x_codes: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, w_amax: torch.Tensor,
                          x_amax: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """:func:`qat_fp8_gluon_gemm` as an opaque op, so a graph Inductor compiles can call the Gluon kernel. Operands
    that reach it in a form the kernel cannot take (e.g. a weight whose layout changed after tracing) get the same
    product from the weight's codes pass and the codes GEMM."""
    reason = unsupported_reason(x_codes, w, w_amax, x_amax)
    if reason is None:
        return qat_fp8_gluon_gemm(x_codes, w, offs, w_amax, x_amax, check=False)
    from moeq.formats import get_format
    from moeq.runtime.kernels.fake_quant_experts import fake_quant_experts
    from moeq.runtime.kernels.grouped_qmm import grouped_qmm

    log.warning("moeq::qat_fp8_gluon_gemm: %s; running the weight codes pass and the codes GEMM instead", reason)
    codes = fake_quant_experts(w, w_amax, "fp8", 1, codes=True)
    scale = get_format("fp8").scale_from_amax(w_amax)
    return grouped_qmm(x_codes, codes, offs, scale, None, x_amax, "fp8", "fp8_codes", out_dtype=torch.bfloat16)


@qat_fp8_gluon_gemm_op.register_fake
def _(x_codes, w, offs, w_amax, x_amax):
    return x_codes.new_empty(x_codes.shape[0], w.shape[2], dtype=torch.bfloat16)


@torch.library.custom_op("moeq::qat_nvfp4_gluon_gemm", mutates_args=())
def qat_nvfp4_gluon_gemm_op(
    x_fq: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, w_amax: torch.Tensor
) -> torch.Tensor:
    """:func:`qat_nvfp4_gluon_gemm` as an opaque op for compiled graphs. Operands the kernel cannot take at run time
    get the same operand values multiplied by the weight's fake-quant pass and ``torch._grouped_mm``."""
    reason = unsupported_reason(x_fq, w, w_amax, None, nvfp4=True)
    if reason is None:
        return qat_nvfp4_gluon_gemm(x_fq, w, offs, w_amax, check=False)
    from moeq.runtime.kernels.grouped_qmm import qat_nvfp4_weight_pass_gemm

    log.warning("moeq::qat_nvfp4_gluon_gemm: %s; running the weight's fake-quant pass and torch._grouped_mm", reason)
    return qat_nvfp4_weight_pass_gemm(x_fq, w, offs, w_amax)


@qat_nvfp4_gluon_gemm_op.register_fake
def _(x_fq, w, offs, w_amax):
    return x_fq.new_empty(x_fq.shape[0], w.shape[2], dtype=torch.bfloat16)
