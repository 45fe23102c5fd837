"""Probe: QAT FP8 above 48 rows per expert as one warp-specialized Gluon kernel (Hopper), Qwen3 shapes at 34k rows.

The shipped op runs the weight's e4m3 codes pass (memory-bound, ~0.31 ms at 34k rows on gate_up) and then the codes
GEMM (compute-bound, ~0.27 ms). Sessions 14-30 found that converting the bf16 weight tile in the GEMM's load path
costs more than the MMA it feeds, because the same warps convert and multiply. Here three warp roles share an SM:

- a 1-warp loader issues TMA copies of the activation codes tile and the bf16 weight tile into shared-memory rings;
- converter warps read each bf16 weight tile, divide by the expert's FP8 scale exactly as :mod:`moeq.formats`
  (``numerics.divide``), convert to e4m3 (``cvt.rn.satfinite``) and store the codes into a third ring;
- the default partition runs FP8 ``wgmma`` on the activation codes and the weight codes.

So the CUDA-core conversion overlaps the tensor-core MMA instead of preceding it. A program multiplies a group of up
to BM + BT routed rows of one expert (a second accumulator holds the BT tail rows), so one conversion of a weight
tile serves all of them. The activation codes come from moeq's own pass (``fake_quant_act(codes=True)``).
``--compile-only`` compiles every variant for sm_90 on a machine without a GPU.

Session 32 ran the first form (one m-tile of 256 or 128 rows per program, commit b8175d3) on the H200: bit-exact and
slower than the two launches (BENCHMARKS.md). This form, with up to 64 or 128 tail rows in a second accumulator so
that one conversion serves an expert's rows, has only been compiled.

    python benchmarks/probe_gluon_qat_fp8.py --out $OUT/gluon_qat_fp8.json
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NamedTuple

import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from moeq.runtime.kernels.numerics import (  # noqa: E402
    FAST_DIVISOR_MAX,
    FAST_DIVISOR_MIN,
    divide,
    fp8_scale,
    safe_divisor,
)


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _tile_of_program(offs_ptr, tile_m, M, NUM_EXPERTS, E_POW2: gl.constexpr, BLOCK_M: gl.constexpr):
    """moeq.runtime.kernels.grouped_qmm._tile_of_program in Gluon: (expert, first row, end row) of m-tile ``tile_m``."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    e_idx = gl.arange(0, E_POW2, layout=layout)
    valid = e_idx < NUM_EXPERTS
    ends = gl.load(offs_ptr + e_idx, mask=valid, other=0)
    starts = gl.load(offs_ptr + e_idx - 1, mask=valid & (e_idx > 0), other=0)
    tiles = gl.where(valid, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
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
def lean_quotient(x, d, y, clip, FAST):
    """Markstein's quotient ``fma(fma(-q0, d, x), y, q0)``, ``q0 = x y``, for an MMA operand (``d`` in the fast range,
    ``y = RN(1/d)``): ``x`` is first clipped to ``+-2^64 d`` keeping NaN (two instructions instead of the overflow
    select), and the sign of a zero quotient is not restored (a signed zero multiplies to the same sums). Its e4m3
    code equals ``divide``'s for every non-zero quotient. Outside the fast range, IEEE division."""
    if FAST:
        xc = gl.minimum(gl.maximum(x, clip * -1.0, propagate_nan=tl.PropagateNan.ALL), clip,
                        propagate_nan=tl.PropagateNan.ALL)  # fmt: skip
        q0 = xc * y
        q = gl.fma(gl.fma(q0, d * -1.0, xc), y, q0)
    else:
        q = gl.div_rn(x, d)
    return q


@gluon.jit
def _load_partition(x_desc, xt_desc, w_desc, x8, xt8, rx, ex, w16, r16, e16, row_start, w_row, k_tiles, has_tail):
    """TMA: the bf16 weight tile, then the activation codes tile (and the tail rows' tile where the group has them)."""
    BK: gl.constexpr = x_desc.block_type.shape[1]
    BM: gl.constexpr = x_desc.block_type.shape[0]
    SX: gl.constexpr = x8.shape[0]
    S16: gl.constexpr = w16.shape[0]
    for i in range(k_tiles):
        s = i % S16
        mbarrier.wait(e16.index(s), ((i // S16) & 1) ^ 1)
        mbarrier.expect(r16.index(s), w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(w_desc, [w_row, i * BK], r16.index(s), w16.index(s))
        sx = i % SX
        mbarrier.wait(ex.index(sx), ((i // SX) & 1) ^ 1)
        if has_tail:
            mbarrier.expect(rx.index(sx), x_desc.block_type.nbytes + xt_desc.block_type.nbytes)
        else:
            mbarrier.expect(rx.index(sx), x_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(x_desc, [row_start, i * BK], rx.index(sx), x8.index(sx))
        tma.async_copy_global_to_shared(xt_desc, [row_start + BM, i * BK], rx.index(sx), xt8.index(sx), pred=has_tail)


@gluon.jit
def _convert_partition(w16, r16, e16, c8, r8, e8, k_tiles, w_div, w_fast, w_inv, w_clip, codes_ptr, codes_row, K,
                       SPLIT: gl.constexpr, WRITE_CODES: gl.constexpr, EXACT: gl.constexpr):  # fmt: skip
    S16: gl.constexpr = w16.shape[0]
    S8: gl.constexpr = c8.shape[0]
    BN: gl.constexpr = w16.shape[1]
    BK: gl.constexpr = w16.shape[2]
    PART: gl.constexpr = BN // SPLIT
    L: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (BK // 8), BK // 8], [gl.num_warps(), 1], [1, 0])
    for i in range(k_tiles):
        s = i % S16
        t = i % S8
        mbarrier.wait(r16.index(s), (i // S16) & 1)
        mbarrier.wait(e8.index(t), ((i // S8) & 1) ^ 1)
        for h in gl.static_range(SPLIT):
            v = w16.index(s).slice(h * PART, PART, dim=0).load(L).to(gl.float32)
            if EXACT == 1:
                q = divide(v, w_div, w_fast).to(gl.float8e4nv, fp_downcast_rounding="rtne")
            elif EXACT == 2:
                q = lean_quotient(v, w_div, w_inv, w_clip, w_fast).to(gl.float8e4nv, fp_downcast_rounding="rtne")
            else:  # the probe's ceiling: one multiply by the reciprocal (not the spec's division)
                q = (v * w_inv).to(gl.float8e4nv, fp_downcast_rounding="rtne")
            c8.index(t).slice(h * PART, PART, dim=0).store(q)
            if WRITE_CODES:
                r = codes_row + h * PART + gl.arange(0, PART, layout=gl.SliceLayout(1, L))
                c = i * BK + gl.arange(0, BK, layout=gl.SliceLayout(0, L))
                gl.store(codes_ptr + r.to(gl.int64)[:, None] * K + c[None, :], q)
        fence_async_shared()
        mbarrier.arrive(e16.index(s))
        mbarrier.arrive(r8.index(t))


@gluon.constexpr_function
def acc_layout(num_warps, bn):
    """The wgmma accumulator layout (FP8: k = 32) the MMA partition and the epilogue share."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, bn, 32])


@gluon.jit
def _mma_partition(x8, xt8, rx, ex, c8, r8, e8, k_tiles, has_tail, BM: gl.constexpr, BT: gl.constexpr,
                   BN: gl.constexpr):  # fmt: skip
    """FP8 wgmma of each k-step's codes tile against the group's BM rows and, where it has them, its BT tail rows: one
    conversion of the weight serves up to BM + BT routed rows."""
    SX: gl.constexpr = x8.shape[0]
    S8: gl.constexpr = c8.shape[0]
    layout: gl.constexpr = acc_layout(gl.num_warps(), BN)
    acc = gl.zeros([BM, BN], gl.float32, layout)
    acc_t = gl.zeros([BT, BN], gl.float32, layout)
    if has_tail:
        for i in range(k_tiles):
            sx = i % SX
            t = i % S8
            mbarrier.wait(rx.index(sx), (i // SX) & 1)
            mbarrier.wait(r8.index(t), (i // S8) & 1)
            b = c8.index(t).permute((1, 0))
            acc = warpgroup_mma(x8.index(sx), b, acc, is_async=True)
            acc_t = warpgroup_mma(xt8.index(sx), b, acc_t, is_async=True)
            acc, acc_t = warpgroup_mma_wait(num_outstanding=2, deps=(acc, acc_t))
            mbarrier.arrive(ex.index((i + SX - 1) % SX), pred=i > 0)
            mbarrier.arrive(e8.index((i + S8 - 1) % S8), pred=i > 0)
    else:
        for i in range(k_tiles):
            sx = i % SX
            t = i % S8
            mbarrier.wait(rx.index(sx), (i // SX) & 1)
            mbarrier.wait(r8.index(t), (i // S8) & 1)
            acc = warpgroup_mma(x8.index(sx), c8.index(t).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            mbarrier.arrive(ex.index((i + SX - 1) % SX), pred=i > 0)
            mbarrier.arrive(e8.index((i + S8 - 1) % S8), pred=i > 0)
    acc, acc_t = warpgroup_mma_wait(num_outstanding=0, deps=(acc, acc_t))
    return (acc, acc_t)


@gluon.jit
def _store_rows(out_ptr, acc, first, row_end, pid_n, N, stride_om, scale, ROWS: gl.constexpr, BN: gl.constexpr,
                num_warps: gl.constexpr):  # fmt: skip
    layout: gl.constexpr = acc_layout(num_warps, BN)
    rows = first + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
    cols = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
    mask = (rows < row_end)[:, None] & (cols < N)[None, :]
    gl.store(out_ptr + rows.to(gl.int64)[:, None] * stride_om + cols[None, :], (acc * scale).to(gl.bfloat16), mask=mask)


@gluon.jit
def qat_fp8_ws_kernel(x_desc, xt_desc, w_desc, out_ptr, offs_ptr, w_amax_ptr, x_amax_ptr, codes_ptr, M, N, K,
                      NUM_EXPERTS, stride_om, E_POW2: gl.constexpr, SX: gl.constexpr, S16: gl.constexpr,
                      S8: gl.constexpr, SPLIT: gl.constexpr, CONV_WARPS: gl.constexpr, CONV_REGS: gl.constexpr,
                      WRITE_CODES: gl.constexpr, EXACT: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    """One program per (group of up to BM + BT routed rows of one expert, n-tile): the rows' FP8 codes times the
    weight tile's e4m3 codes, converted once per k-step by the converter warps; ``(acc * x_s * w_s)`` stored bf16."""
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BT: gl.constexpr = xt_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    pid = gl.program_id(0)
    n_tiles = gl.cdiv(N, BN)
    tile_m = pid // n_tiles
    pid_n = pid % n_tiles
    expert, row_start, row_end = _tile_of_program(offs_ptr, tile_m, M, NUM_EXPERTS, E_POW2, BM + BT)
    e = gl.minimum(expert, NUM_EXPERTS - 1)
    k_tiles = gl.where(expert < NUM_EXPERTS, gl.cdiv(K, BK), 0)  # the unrouted tail and spare programs: zeros
    has_tail = row_end - row_start > BM
    w_amax = gl.load(w_amax_ptr + e)
    w_s = fp8_scale(w_amax)
    w_div = safe_divisor(w_s)
    w_fast = (w_div >= FAST_DIVISOR_MIN) & (w_div <= FAST_DIVISOR_MAX)
    w_inv = gl.div_rn(1.0, w_div)
    w_clip = w_div * 18446744073709551616.0  # 2^64 d: clipped quotients stay finite and saturate alike
    out_scale = fp8_scale(gl.load(x_amax_ptr)) * w_s
    w_row = e * N + pid_n * BN

    x8 = gl.allocate_shared_memory(gl.float8e4nv, [SX, BM, BK], x_desc.layout)
    xt8 = gl.allocate_shared_memory(gl.float8e4nv, [SX, BT, BK], xt_desc.layout)
    w16 = gl.allocate_shared_memory(gl.bfloat16, [S16, BN, BK], w_desc.layout)
    c8_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, BK], gl.float8e4nv)
    c8 = gl.allocate_shared_memory(gl.float8e4nv, [S8, BN, BK], c8_layout)
    rx = gl.allocate_shared_memory(gl.int64, [SX, 1], mbarrier.MBarrierLayout())
    ex = gl.allocate_shared_memory(gl.int64, [SX, 1], mbarrier.MBarrierLayout())
    r16 = gl.allocate_shared_memory(gl.int64, [S16, 1], mbarrier.MBarrierLayout())
    e16 = gl.allocate_shared_memory(gl.int64, [S16, 1], mbarrier.MBarrierLayout())
    r8 = gl.allocate_shared_memory(gl.int64, [S8, 1], mbarrier.MBarrierLayout())
    e8 = gl.allocate_shared_memory(gl.int64, [S8, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(SX):
        mbarrier.init(rx.index(s), count=1)
        mbarrier.init(ex.index(s), count=1)
    for s in gl.static_range(S16):
        mbarrier.init(r16.index(s), count=1)
        mbarrier.init(e16.index(s), count=1)
    for s in gl.static_range(S8):
        mbarrier.init(r8.index(s), count=1)
        mbarrier.init(e8.index(s), count=1)

    acc, acc_t = gl.warp_specialize(
        [
            (_mma_partition, (x8, xt8, rx, ex, c8, r8, e8, k_tiles, has_tail, BM, BT, BN)),
            (_load_partition, (x_desc, xt_desc, w_desc, x8, xt8, rx, ex, w16, r16, e16, row_start, w_row, k_tiles,
                               has_tail)),
            (_convert_partition, (w16, r16, e16, c8, r8, e8, k_tiles, w_div, w_fast, w_inv, w_clip, codes_ptr,
                                  w_row, K, SPLIT, WRITE_CODES, EXACT)),
        ],
        [1, CONV_WARPS],
        [24, CONV_REGS],
    )  # fmt: skip
    _store_rows(out_ptr, acc, row_start, row_end, pid_n, N, stride_om, out_scale, BM, BN, num_warps)
    if has_tail:
        _store_rows(out_ptr, acc_t, row_start + BM, row_end, pid_n, N, stride_om, out_scale, BT, BN, num_warps)


class Variant(NamedTuple):
    """One launch configuration of :func:`qat_fp8_ws_kernel`."""

    bm: int  # rows multiplied in the main accumulator
    bt: int  # tail rows in the second accumulator (a group holds up to bm + bt routed rows)
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
    exact: int  # 0: reciprocal multiply (not the spec; a ceiling), 1: numerics.divide, 2: lean_quotient

    @property
    def name(self) -> str:
        return (f"gluon ws {self.bm}+{self.bt}x{self.bn}x{self.bk} st {self.sx}/{self.s16}/{self.s8} "
                f"split {self.split} conv {self.conv_warps}w/{self.conv_regs}r mma {self.mma_warps}w "
                f"maxnreg {self.maxnreg}" + [" RECIPROCAL (not exact)", " divide", " lean"][self.exact])  # fmt: skip

    def layouts(self):
        """Shared layouts of the activation codes, tail codes and bf16 weight TMA blocks."""
        return (gl.NVMMASharedLayout.get_default_for([self.bm, self.bk], gl.float8e4nv),
                gl.NVMMASharedLayout.get_default_for([self.bt, self.bk], gl.float8e4nv),
                gl.NVMMASharedLayout.get_default_for([self.bn, self.bk], gl.bfloat16))  # fmt: skip

    def constexprs(self, write_codes: bool = False) -> dict:
        return dict(E_POW2=128, SX=self.sx, S16=self.s16, S8=self.s8, SPLIT=self.split, CONV_WARPS=self.conv_warps,
                    CONV_REGS=self.conv_regs, WRITE_CODES=write_codes, EXACT=self.exact, num_warps=self.mma_warps)  # fmt: skip


VARIANTS = [
    Variant(256, 64, 64, 64, 3, 3, 3, 1, 4, 96, 4, 168, 0),
    Variant(256, 64, 64, 64, 3, 3, 3, 1, 4, 96, 4, 168, 2),
    Variant(256, 64, 64, 128, 2, 2, 2, 2, 4, 96, 4, 168, 2),
    Variant(256, 128, 128, 64, 3, 3, 2, 2, 4, 96, 8, 128, 2),
    Variant(256, 128, 128, 64, 3, 3, 2, 2, 4, 96, 8, 128, 0),
    Variant(256, 64, 64, 64, 3, 4, 4, 1, 4, 96, 4, 168, 2),
]


def compile_only() -> None:
    """Compile every variant for sm_90 (no GPU needed) and print shared memory, registers and instruction counts."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    for v in VARIANTS:
        xl, tl_, wl = v.layouts()
        sig = {"x_desc": f"tensordesc<fp8e4nv{[v.bm, v.bk]},{xl!r}>", "xt_desc": f"tensordesc<fp8e4nv{[v.bt, v.bk]},{tl_!r}>",
               "w_desc": f"tensordesc<bf16{[v.bn, v.bk]},{wl!r}>",
               "out_ptr": "*bf16", "offs_ptr": "*i32", "w_amax_ptr": "*fp32", "x_amax_ptr": "*fp32",
               "codes_ptr": "*fp8e4nv", "M": "i32", "N": "i32", "K": "i32", "NUM_EXPERTS": "i32", "stride_om": "i32"}  # fmt: skip
        consts = v.constexprs()
        sig.update({k: "constexpr" for k in consts})
        try:
            k = triton.compile(GluonASTSource(qat_fp8_ws_kernel, sig, consts),
                               target=GPUTarget("cuda", 90, 32), options={"num_warps": v.mma_warps, "maxnreg": v.maxnreg})  # fmt: skip
        except Exception as exc:
            print(f"{v.name}: ERROR {str(exc)[-600:]}")
            continue
        ptx = k.asm["ptx"]
        regs = [line.split()[-1].rstrip(";") for line in ptx.splitlines() if "setmaxnreg" in line]
        print(f"{v.name}: shared {k.metadata.shared} B, warps {k.metadata.num_warps}, "
              f"wgmma {ptx.count('wgmma.mma_async')}, cvt e4m3x2 {ptx.count('cvt.rn.satfinite.e4m3x2')}, "
              f"local {ptx.count('st.local')}, setmaxnreg {' '.join(regs)}")  # fmt: skip


def run_case(label: str, k: int, n: int, rows: int) -> list[dict]:
    import torch
    from probes import qat_fp8_table
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from moeq.runtime.kernels import fake_quant_act, fake_quant_experts
    from moeq.runtime.kernels.grouped_qmm import grouped_qmm

    p, table = qat_fp8_table(label, k, n, rows)
    num_experts = p.w_nk.shape[0]
    shipped = grouped_qmm(p.x, p.w, p.offs, p.w_amax, None, p.x_amax, "fake_fp8", "fp8")
    codes_ref = fake_quant_experts(p.w, p.w_amax, "fp8", 1, codes=True)  # [E, K, N] view of [E, N, K] codes
    w2 = p.w_nk.reshape(num_experts * n, k)

    for v in VARIANTS:
        xl, tl_, wl = v.layouts()
        grid = ((triton.cdiv(rows, v.bm + v.bt) + num_experts) * triton.cdiv(n, v.bn),)
        w_desc = TensorDescriptor.from_tensor(w2, [v.bn, v.bk], wl)
        out = torch.empty(rows, n, dtype=torch.bfloat16, device="cuda")

        def op(write_codes=False, codes=None, v=v, w_desc=w_desc, out=out, grid=grid, xl=xl, tl_=tl_):
            xc = fake_quant_act(p.x, p.offs, p.x_amax, "fp8", codes=True)
            x_desc = TensorDescriptor.from_tensor(xc, [v.bm, v.bk], xl)
            xt_desc = TensorDescriptor.from_tensor(xc, [v.bt, v.bk], tl_)
            qat_fp8_ws_kernel[grid](x_desc, xt_desc, w_desc, out, p.offs, p.w_amax, p.x_amax,
                                    codes if codes is not None else out, rows, n, k, num_experts, out.stride(0),
                                    maxnreg=v.maxnreg, **v.constexprs(write_codes))  # fmt: skip
            return out

        print(f"{label:14s} {v.name}: launching", flush=True)
        try:
            codes = torch.zeros(num_experts, n, k, dtype=torch.float8_e4m3fn, device="cuda")
            got = op(True, codes.view(num_experts * n, k))
            torch.cuda.synchronize()
            same_codes = torch.equal(codes.view(torch.uint8), codes_ref.transpose(1, 2).view(torch.uint8))
            diff = (got.float() - shipped.float()).abs().max().item()
            print(f"{label:14s} {v.name}: codes bit-equal to fake_quant_experts: {same_codes}; max |diff| {diff:.3g}",
                  flush=True)  # fmt: skip
        except Exception as exc:
            print(f"{label:14s} {v.name}: ERROR {str(exc)[:300]}", flush=True)
            continue
        table.record(v.name, op)
    return table.print()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--compile-only", action="store_true")
    args, rest = parser.parse_known_args()
    if args.compile_only:
        os.environ.setdefault("TRITON_CACHE_DIR", "/tmp/moeq_gluon_cache")
        compile_only()
        return
    sys.argv = [sys.argv[0], *rest]
    from probes import qwen3_probe_main

    qwen3_probe_main(run_case)


if __name__ == "__main__":
    main()
