"""One Triton grouped GEMM per expert GEMM, with the operands' quantization fused into the load path.

``out[rows of expert e] = q(x[rows]) @ q(w[e])`` for ``x [M, K]``, ``w`` logically ``[E, K, N]`` (any
strides, as ``torch._grouped_mm`` takes it; HF passes a transposed ``[E, N, K]`` view) and int32
cumulative ``offs [E]`` (empty experts allowed). Rows at or past ``offs[-1]`` belong to no expert and
are written as zeros by the same launch.

Tile schedule: one program per (expert m-tile, n-tile). The grid is an upper bound computed on the host
from shapes only, ``(cdiv(M, BLOCK_M) + min(E, M)) * cdiv(N, BLOCK_N)`` (each routed expert adds at most one
partial m-tile; spare programs exit at once); each program derives its expert and row range from ``offs`` on
the device (prefix sum over per-expert m-tile counts), so no host sync, and no tile ever straddles two experts
(per-expert scales are scalars per tile). n-tiles of one m-tile are adjacent program ids, so an x tile is read
from HBM once and an expert's weight stays in L2. With ``TAIL_M`` set, an m-tile of at most ``TAIL_M`` rows (an
expert's short last tile) runs a ``TAIL_M``-row MMA instead of a ``BLOCK_M``-row one (same schedule, less MMA work
on rows that are not there).

Weight modes (``W_MODE``): ``plain`` (no quantization), ``fake_fp8`` / ``fake_nvfp4`` (QAT: weight
fake-quantized as loaded, NVFP4 block amax from the 16-blocks of the tile), ``fp8`` (stored e4m3 bits +
per-expert scale), ``nvfp4`` (stored packed E2M1 pairs along K in the 64-byte runs and word bit order of
:func:`moeq.formats.interleave_nvfp4_runs`, read as 32-bit words, so a view that is not K-contiguous is copied
once, + e4m3 block scales + per-expert global scale). Activation modes (``X_MODE``): none, ``fp8`` /
``nvfp4`` fake quant as loaded (static amax [1] or per expert [E]; NVFP4 with dynamic 16-blocks), ``fp8_codes``
(x already quantized once to its e4m3 codes: at large row counts re-quantizing an activation tile for every
n-tile costs more than one pass over x). FP8 operands (fake-quantized or stored) enter the dot as their e4m3
values (exact in every input dtype) and their scales multiply the fp32 accumulator once per tile; when both
operands are FP8 (QAT FP8, deploy W8A8) the dot runs on the FP8 tensor cores. Fake-quantized NVFP4 operands enter as
``e2m1 * (block scale * global scale)`` in the input dtype; stored NVFP4 weights as ``e2m1 * block scale``
(exact), their global scale on the accumulator like FP8's. Each operand is therefore the :mod:`moeq.formats`
fake quant / dequantization bit for bit up to where its per-tensor scale is applied (after the sum instead of
before it), which is what the tests check (one-hot rows recover the operand exactly).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from moeq.formats import NVFP4_RUN_BYTES, get_format
from moeq.runtime.kernels.fake_quant_act import fake_quant_act, row_amax, token_codes
from moeq.runtime.kernels.fake_quant_experts import fake_quant_experts
from moeq.runtime.kernels.launch import as_fp32, cdiv, check_float, interpreting, known_empty, launch_kernel
from moeq.runtime.kernels.numerics import (
    cast_like,
    divide,
    e4m3_codes,
    fake_quant_nvfp4,
    fast_division_ok,
    fp8_scale,
    negate_where,
    safe_divisor,
)

log = logging.getLogger(__name__)

__all__ = [
    "DEQUANT_FIRST_ROWS_PER_EXPERT",
    "QUANTIZE_ONCE_ROWS_PER_EXPERT",
    "TAIL_ROWS",
    "WEIGHT_CODES_ROWS_PER_EXPERT",
    "W_MODES",
    "X_MODES",
    "dequantizes_weight_first",
    "grouped_qmm",
    "grouped_qmm_configs",
    "m_bucket",
    "prune_configs",
    "quantizes_once",
    "quantizes_weight_once",
]

#: weight modes and their kernel codes
W_MODES = {"plain": 0, "fake_fp8": 1, "fake_nvfp4": 2, "fp8": 3, "nvfp4": 4}
#: activation modes and their kernel codes
X_MODES = {None: 0, "fp8": 1, "nvfp4": 2, "fp8_codes": 3}

W_PLAIN = tl.constexpr(0)
W_FAKE_FP8 = tl.constexpr(1)
W_FAKE_NVFP4 = tl.constexpr(2)
W_FP8 = tl.constexpr(3)
W_NVFP4 = tl.constexpr(4)
X_FP8 = tl.constexpr(1)
X_NVFP4 = tl.constexpr(2)
X_FP8_CODES = tl.constexpr(3)
#: how the activation amax is given (``X_AMAX``): one for all rows, one per expert, one per row (dynamic per-token)
X_AMAX_SHARED = tl.constexpr(0)
X_AMAX_PER_EXPERT = tl.constexpr(1)
X_AMAX_PER_ROW = tl.constexpr(2)


#: row tile of an expert's last m-tile when it has at most this many rows (``TAIL_M`` of the 128-row candidates).
#: Routed experts rarely fill whole tiles: at 34k Qwen3 rows (~272 per expert, random routing) 128-row tiles
#: multiply 36% more rows than are routed, with 64-row tails 15%. H200, 34k rows, 64-row tails vs none (BENCHMARKS.md,
#: session 17): codes GEMM 128x256x128 (FP8 dot) QAT FP8 gate_up 0.6302 vs 0.6927 ms, down 0.3704 vs 0.3744, W8A8
#: 0.3405 vs 0.3528 / 0.2012 vs 0.2154 (32- / 16-row tails: 0.6602 / 0.6741 for QAT gate_up); 128x128x128 (bf16
#: dot) W4A16 0.8358 vs 0.8771 / 0.4678 vs 0.4994, QAT NVFP4 5.08 vs 5.42 / 2.66 vs 2.83.
TAIL_ROWS = 64


def grouped_qmm_configs() -> list[triton.Config]:
    """Autotuning candidates ``(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages[, swap])``, each with the FP8
    tensor cores on and off; one tiny tile under the interpreter. BLOCK_K is a multiple of 16 (NVFP4 blocks
    never straddle a K tile). ``swap``: compute the transposed tile (weights as the MMA's wide operand, rows
    as its narrow one), for decode-sized row tiles. ``FP8_DOT`` (only where both operands are FP8,
    :func:`prune_configs` sees to it): multiply the e4m3 values on the FP8 tensor cores rather than as
    16-bit floats (the same exact products; which is faster depends on the tile). Tiles of more than
    :data:`TAIL_ROWS` rows run an expert's short last m-tile as a ``TAIL_ROWS``-row MMA (``TAIL_M``)."""
    if interpreting():  # one tile per weight mode (stored NVFP4 needs BLOCK_K a multiple of its 128-element runs)
        return [
            triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": bk, "SWAP_AB": False, "FP8_DOT": False})
            for bk in (32, 128)
        ]
    candidates = [
        (16, 64, 128, 4, 4),
        (16, 128, 128, 4, 4),
        (16, 64, 256, 4, 5),
        (16, 128, 256, 8, 4),
        (16, 256, 128, 8, 4),
        (32, 128, 128, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 128, 128, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 128, 128, 8, 3),
        (128, 256, 64, 8, 3),
        (128, 128, 64, 4, 4),
        (128, 256, 64, 8, 4),
        # swap-AB: the weight tile is the MMA's 64/128-row operand (wgmma), the few routed rows its narrow one
        (16, 64, 128, 4, 3, True),
        (16, 128, 128, 4, 3, True),
        (16, 128, 128, 8, 3, True),
        (16, 256, 128, 8, 3, True),
        (16, 64, 256, 4, 3, True),
    ]
    # FP8 dots only (1-byte operand tiles; the 16-bit version does not fit in shared memory): the codes GEMM's
    # tile at training sizes, 850 TFLOP/s on the H200 (BENCHMARKS.md, session 12); four stages were 3-4% faster
    # on the codes GEMM alone at 34k Qwen3 rows (session 21: gate_up 0.2615 vs 0.2702 ms, down 0.1806 vs 0.1829),
    # 0.4% on the whole QAT FP8 op (session 22: 0.6713 vs 0.6739 ms)
    fp8_only = [(128, 256, 128, 8, 3), (128, 256, 128, 8, 4)]
    return [
        triton.Config(
            {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "SWAP_AB": any(swap), "FP8_DOT": fp8_dot}
            | ({"TAIL_M": TAIL_ROWS} if m > TAIL_ROWS else {}),
            num_warps=w,
            num_stages=s,
        )
        for fp8_dot in (True, False)
        for m, n, k, w, s, *swap in candidates + (fp8_only if fp8_dot else [])
    ]


def fp8_operands(w_mode: int, x_mode: int) -> bool:
    """Whether both operands enter the dot as e4m3 values (QAT FP8, deploy W8A8): FP8 tensor cores apply."""
    return w_mode in (W_MODES["fp8"], W_MODES["fake_fp8"]) and x_mode in (X_MODES["fp8"], X_MODES["fp8_codes"])


def prune_configs(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    """Keep the row tiles that fit the mean rows per expert (``M_BUCKET``): small tiles for decode-like
    batches (weight-bandwidth bound), large ones for prefill / training batches. Stored NVFP4 weights need
    ``BLOCK_K`` a multiple of their 128-element runs."""
    args = {**named_args, **kwargs}  # Triton passes the constexpr keyword arguments separately
    bucket = args["M_BUCKET"]
    if args["W_MODE"] == W_MODES["nvfp4"]:  # stored NVFP4 is read in 128-element runs of K
        configs = [c for c in configs if c.kwargs["BLOCK_K"] % 128 == 0]
    elif interpreting():
        configs = configs[:1]
    if not fp8_operands(args["W_MODE"], args["X_MODE"]):
        configs = [c for c in configs if not c.kwargs["FP8_DOT"]]
    decode = _decode_config(args["W_MODE"], args["X_MODE"], args["N"])
    if bucket <= 2 and decode is not None:
        return [decode]
    lo, hi = (16, 16) if bucket <= 16 else (16, 64) if bucket <= 64 else (64, 128)
    if bucket > 64:  # the 64-row tile only where its K step is long enough to pay
        configs = [c for c in configs if c.kwargs["BLOCK_M"] != 64 or c.kwargs["BLOCK_K"] == 128]
    kept = [c for c in configs if lo <= c.kwargs["BLOCK_M"] <= hi]
    return kept or configs


def _decode_config(w_mode: int, x_mode: int, n: int) -> triton.Config | None:
    """The measured best tile (H100, Qwen3-30B-A3B shapes, ``benchmarks/sweep_grouped_qmm.py``) for
    decode batches (at most 2 mean rows per expert) of W8A8 and W4A16, where autotuning on a tens-of-
    microseconds kernel proved unreliable (it picked tiles 1.5x-2.7x slower than the best). Swap-AB, wider
    weight tiles for wider outputs."""
    wide = n >= 2048
    if w_mode == W_MODES["fp8"] and x_mode in (X_MODES["fp8"], X_MODES["fp8_codes"]):
        meta = {"BLOCK_M": 16, "BLOCK_N": 256 if wide else 128, "BLOCK_K": 128, "SWAP_AB": True, "FP8_DOT": True}
        warps = 8
    elif w_mode == W_MODES["nvfp4"] and x_mode == X_MODES[None]:  # H200 sweeps: 64 wide for both, 56 registers
        meta = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SWAP_AB": True, "FP8_DOT": False}
        return triton.Config(meta, num_warps=4, num_stages=3, maxnreg=56)  # 9 CTAs per SM instead of 7
    else:
        return None
    return triton.Config(meta, num_warps=warps, num_stages=3)


#: mean routed rows per expert above which :func:`grouped_qmm` quantizes FP8 operands once, each in its own
#: elementwise pass (activations; QAT weights), and multiplies the codes, instead of re-quantizing every operand
#: tile for each output tile it feeds. H200, Qwen3-30B-A3B shapes (BENCHMARKS.md, session 12): at 0.5 rows per
#: expert in-load quantization wins (one launch, no weight pass); at 32 and 272 quantizing once wins (QAT FP8
#: 1.2x / 2.7x the in-load kernel, W8A8 1.3x / 2.1-2.2x). Between them the bound is not measured.
QUANTIZE_ONCE_ROWS_PER_EXPERT = 16


def quantizes_once(w_mode: str, x_mode: str | None, rows: int, num_experts: int) -> bool:
    """Whether :func:`grouped_qmm` takes the quantize-once path: both operands FP8 (QAT FP8 or deploy W8A8)
    and more than :data:`QUANTIZE_ONCE_ROWS_PER_EXPERT` mean rows per expert."""
    fp8 = x_mode == "fp8" and w_mode in ("fp8", "fake_fp8")
    return fp8 and rows > QUANTIZE_ONCE_ROWS_PER_EXPERT * max(1, num_experts)


#: mean routed rows per expert above which the quantize-once path also writes a QAT FP8 weight's codes in their own
#: pass; up to it the codes GEMM fake-quantizes the bf16 weight tiles as it loads them (activations still quantized
#: once). The weight pass reads the whole bf16 weight and writes its codes whatever the batch (0.32 ms for Qwen3
#: gate_up); in the load path each weight tile is quantized once per m-tile of its expert. H200, Qwen3-30B-A3B shapes
#: (BENCHMARKS.md, session 14): the in-load weight is 1.18x / 1.14x faster (gate_up / down) at 32 rows per expert,
#: 1.18x / 1.12x at 48, 0.85x / 0.85x at 64 (most experts then need two m-tiles, so each weight tile is
#: quantized twice), about 0.5x at 272. Between 48 and 64 the bound is not measured.
WEIGHT_CODES_ROWS_PER_EXPERT = 48


#: whether the quantize-once path runs a QAT FP8 weight's codes pass inside the codes GEMM's launch
#: (:mod:`moeq.runtime.kernels.weight_pass_gemm`: one persistent kernel meant to overlap the memory-bound pass with
#: the compute-bound GEMM) rather than as a launch of its own before it. The products are the same bit for bit
#: (GPU-tested), but on the H200 it is slower (BENCHMARKS.md, session 30: Qwen3 gate_up at 34k rows 0.80-1.28 ms
#: against 0.64-0.65 ms for the two launches), so it is off.
WEIGHT_PASS_IN_GEMM = False


#: whether the quantize-once path multiplies a QAT FP8 weight (above :data:`WEIGHT_CODES_ROWS_PER_EXPERT` mean rows
#: per expert, up to :data:`GLUON_ROWS_PER_EXPERT`) with the warp-specialized Gluon kernel of
#: :mod:`moeq.runtime.kernels.qat_gluon` on Hopper, converting the bf16 weight to its codes in shared memory,
#: instead of a codes pass to HBM and then the codes GEMM (same products bit for bit). H100, Qwen3-30B-A3B shapes at
#: 34k rows (BENCHMARKS.md, session 34): gate_up 0.573 vs 0.75 ms, down 0.349 vs 0.417 ms for the whole op (bf16
#: ``torch._grouped_mm``: 0.579 / 0.341); at 16k rows 1.25-1.35x faster than the two launches. Session 36 (stacked
#: MMA warpgroups): 0.521 / 0.335 ms (1.13x / 1.01x bf16, medians of 3 rounds).
#: Operands it cannot take (:func:`~moeq.runtime.kernels.qat_gluon.unsupported_reason`) keep the two launches.
GLUON_QAT_FP8 = True
#: mean routed rows per expert up to which the Gluon kernel is used: a program takes up to 256 + 64 rows of one
#: expert and converts its weight tile once for them, so above this an expert's weight is converted once per group
#: of rows, where the two launches convert it once in all. Measured at 128 and 272 (Qwen3 at 16k and 34k rows).
GLUON_ROWS_PER_EXPERT = 320
_GLUON_REASONS_LOGGED: set[tuple[bool, str]] = set()


def quantizes_weight_once(w_mode: str, x_mode: str | None, rows: int, num_experts: int) -> bool:
    """Whether the quantize-once path (:func:`quantizes_once`) also quantizes a QAT FP8 weight in its own pass:
    above :data:`WEIGHT_CODES_ROWS_PER_EXPERT` mean rows per expert."""
    once = quantizes_once(w_mode, x_mode, rows, num_experts) and w_mode == "fake_fp8"
    return once and rows > WEIGHT_CODES_ROWS_PER_EXPERT * max(1, num_experts)


#: mean routed rows per expert above which a deploy GEMM with 16-bit activations (W4A16 NVFP4, W8A16 FP8) runs
#: unfused when the size is left to moeq (``quantize_once=None``): the stored weight dequantized once by its own
#: kernel, then ``torch._grouped_mm``, instead of every weight tile dequantized in registers once per m-tile it
#: feeds. H200, Llama-4-Scout expert shapes (``benchmarks/bench_batched_experts.py``, BENCHMARKS.md session 24):
#: the fused op is 2.1x / 1.6x faster (W4A16 / W8A16) at 128 rows per expert, 1.25x / 1.03x at 256, 0.87x / 0.78x
#: at 512 and 0.75x / 0.66x at 1024; session 13 had it 1.04-1.11x faster at 272 (Qwen3-30B-A3B shapes).
DEQUANT_FIRST_ROWS_PER_EXPERT = {"nvfp4": 384, "fp8": 256}


def dequantizes_weight_first(w_mode: str, x_mode: str | None, rows: int, num_experts: int) -> bool:
    """Whether a deploy GEMM with 16-bit activations is better run as dequant + ``torch._grouped_mm``: above
    :data:`DEQUANT_FIRST_ROWS_PER_EXPERT` mean rows per expert."""
    bound = DEQUANT_FIRST_ROWS_PER_EXPERT.get(w_mode) if x_mode is None else None
    return bound is not None and rows > bound * max(1, num_experts)


#: mean routed rows per expert above which QAT NVFP4 (NVFP4 weights and activations) fake-quantizes the activations
#: once in their own pass instead of in the GEMM's load path, where every activation and weight tile is quantized
#: again for each output tile it feeds (0.13x / 0.16x bf16 at Qwen3's 34k rows, BENCHMARKS.md session 17). Then the
#: Gluon kernel of :mod:`moeq.runtime.kernels.qat_gluon` (:data:`GLUON_QAT_NVFP4`, up to
#: :data:`GLUON_ROWS_PER_EXPERT`) fake-quantizes the weight in shared memory, else the weight's own pass and
#: ``torch._grouped_mm`` (:func:`qat_nvfp4_weight_pass_gemm`, the unfused path's kernels).
QAT_NVFP4_IN_LOAD_ROWS_PER_EXPERT = 16
#: whether QAT NVFP4 above :data:`QAT_NVFP4_IN_LOAD_ROWS_PER_EXPERT` rows per expert multiplies with the Gluon kernel
#: on Hopper (bf16 ``wgmma`` on NVFP4 values made in shared memory). H100, Qwen3-30B-A3B shapes at 34k rows
#: (BENCHMARKS.md, session 36): gate_up 0.78 ms against 1.21 ms for the weight pass + ``torch._grouped_mm``, down
#: 0.45 against 0.64 (bf16 ``torch._grouped_mm`` 0.58 / 0.34).
GLUON_QAT_NVFP4 = True
#: experimental, off: :data:`GLUON_QAT_NVFP4`'s product by the register-operand kernel (``qat_gluon.
#: REGISTER_A_CONFIGS[0]``: the weight fake-quantized in the MMA warps' registers, whole 16-blocks a lane, the
#: activations written in ``fake_quant_act.wgmma_k_order``) where K is a multiple of 64, in eager launches (a traced
#: graph keeps the opaque op). H100, session 38, through this op at 34k rows: 0.75x / 0.79x bf16 against the
#: shipped kernel's 0.75x / 0.78x in the same call, within the run's spread; ``bench_grouped_qmm.py --register-operand``.
GLUON_QAT_NVFP4_REGISTER_OPERAND = False


def quantizes_nvfp4_once(w_mode: str, x_mode: str | None, rows: int, num_experts: int) -> bool:
    """Whether :func:`grouped_qmm` multiplies a QAT NVFP4 weight with bf16 operands as they are (the activations
    fake-quantized once, in their own pass, or taken as given with ``x_mode`` None) rather than quantizing tiles in
    the load path: above :data:`QAT_NVFP4_IN_LOAD_ROWS_PER_EXPERT` mean rows per expert."""
    nvfp4 = w_mode == "fake_nvfp4" and x_mode in ("nvfp4", None)
    return nvfp4 and rows > QAT_NVFP4_IN_LOAD_ROWS_PER_EXPERT * max(1, num_experts)


def qat_nvfp4_weight_pass_gemm(x_fq: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, w_amax: torch.Tensor,
                               wrap: Callable[[Any], Any] | None = None) -> torch.Tensor:  # fmt: skip
    """QAT NVFP4 with fake-quantized activations ``x_fq``: the weight ``[E, K, N]`` fake-quantized in its own pass,
    then ``torch._grouped_mm`` (the unfused path's kernels); rows past ``offs[-1]`` zero."""
    from moeq.runtime.kernels.zero_rows import zero_unrouted_rows_

    wq = fake_quant_experts(w, w_amax, "nvfp4", 1, wrap=wrap)
    return zero_unrouted_rows_(torch._grouped_mm(x_fq, wq, offs), offs, wrap=wrap)


def gluon_takes(x: torch.Tensor, w: torch.Tensor, w_amax: torch.Tensor, x_amax: torch.Tensor | None,
                nvfp4: bool = False) -> bool:  # fmt: skip
    """Whether :data:`GLUON_QAT_FP8` (``nvfp4``: :data:`GLUON_QAT_NVFP4`) is on, the mean rows per expert are at
    most :data:`GLUON_ROWS_PER_EXPERT`, and the Gluon kernel takes these operands (why not is logged once)."""
    num_experts = w.shape[0]
    if not (GLUON_QAT_NVFP4 if nvfp4 else GLUON_QAT_FP8) or interpreting() or not x.is_cuda:
        return False
    if x.shape[0] > GLUON_ROWS_PER_EXPERT * max(1, num_experts):
        return False
    try:
        from moeq.runtime.kernels.qat_gluon import unsupported_reason
    except ImportError as exc:  # a Triton without Gluon
        reason = f"Gluon could not be imported ({exc})"
    else:
        reason = unsupported_reason(x, w, w_amax, x_amax, nvfp4=nvfp4)
    if reason and (nvfp4, reason) not in _GLUON_REASONS_LOGGED:
        _GLUON_REASONS_LOGGED.add((nvfp4, reason))
        instead = (
            "the weight's fake-quant pass and torch._grouped_mm" if nvfp4 else "a weight codes pass and the codes GEMM"
        )
        log.info("QAT %s: the Gluon kernel is not used (%s); %s instead", "NVFP4" if nvfp4 else "FP8", reason, instead)
    return reason is None


def gluon_gemm(x, w, offs, w_amax, x_amax, out, wrap, nvfp4: bool = False) -> torch.Tensor:
    """The Gluon kernel's product (operands :func:`gluon_takes` accepted): through the opaque op
    ``moeq::qat_fp8_gluon_gemm`` / ``moeq::qat_nvfp4_gluon_gemm`` while a graph is traced (``wrap`` set: Inductor
    cannot trace a Gluon kernel), else launched directly into ``out`` (the launcher's own output: contiguous)."""
    from moeq.runtime.kernels import qat_gluon

    if nvfp4 and wrap is not None:
        return torch.ops.moeq.qat_nvfp4_gluon_gemm(x, w, offs, w_amax)
    if nvfp4:
        return qat_gluon.qat_nvfp4_gluon_gemm(x, w, offs, w_amax, out=out, check=False)
    if wrap is not None:
        return torch.ops.moeq.qat_fp8_gluon_gemm(x, w, offs, w_amax, x_amax)
    return qat_gluon.qat_fp8_gluon_gemm(x, w, offs, w_amax, x_amax, out=out, check=False)


def m_bucket(rows: int, num_experts: int) -> int:
    """Autotune key for the token count: next power of two of the mean rows per expert (capped)."""
    return min(triton.next_power_of_2(max(1, rows // max(1, num_experts))), 4096)


@triton.jit
def decode_e4m3(bits, INTERPRET: tl.constexpr):
    """fp32 values of float8_e4m3fn bit patterns (int32 0..255; 0x7F / 0xFF are NaN); exact. The GPU converts in
    hardware."""
    if INTERPRET:
        exponent = (bits >> 3) & 0xF
        mantissa = (bits & 0x7).to(tl.float32)
        scale = ((tl.maximum(exponent, 1) - 7 - 3 + 127) << 23).to(tl.float32, bitcast=True)
        mag = tl.where(exponent == 0, mantissa, mantissa + 8.0) * scale
        mag = tl.where((bits & 0x7F) == 0x7F, float("nan"), mag)
        return negate_where((bits & 0x80) != 0, mag)
    else:
        return bits.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def load_e4m3(ptrs, mask, INTERPRET: tl.constexpr):
    """Stored e4m3 values: float8e4nv straight from memory on the GPU; under the interpreter the bits
    (a uint8 view) decoded by hand to fp32."""
    if INTERPRET:
        return decode_e4m3(tl.load(ptrs, mask=mask, other=0).to(tl.int32), INTERPRET)
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _as_operand(v, out_ptr, FP8_DOT: tl.constexpr):
    """e4m3 values as a dot operand: float8e4nv for the FP8 tensor cores, else the output dtype (exact)."""
    if FP8_DOT:
        return v
    else:
        return v.to(out_ptr.dtype.element_ty)


@triton.jit
def _block_scale_words(row_ptrs, k0, k_end, n_mask, stride_bk, K, BLOCK_K: tl.constexpr):
    """The e4m3 block scales ``[BLOCK_N, BLOCK_K // 64]`` of the tile step at ``k0`` as 32-bit words (block
    ``4 w + i`` in byte ``i`` of word ``w``; zeros past ``k_end``)."""
    kw = k0 // 64 + tl.arange(0, BLOCK_K // 64)
    mask = n_mask[:, None] & (kw < tl.cdiv(K // 16, 4))[None, :] & (kw * 64 < k_end)[None, :]
    return tl.load(row_ptrs + kw[None, :] * stride_bk, mask=mask, other=0).to(tl.uint32, bitcast=True)


@triton.jit
def _nvfp4_operand(words, scale_words, dtype: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   INTERPRET: tl.constexpr):  # fmt: skip
    """The weight tile ``[BLOCK_N, BLOCK_K]`` as ``e2m1(code) * e4m3(block) * 2^-8`` in ``dtype``, from the stored
    words ``[BLOCK_N, BLOCK_K // 8]`` (uint32: E2M1 pairs, element 2j in the low nibble of byte j, 2j + 1 in the
    high one, in the 64-byte runs and word bit order of :func:`moeq.formats.interleave_nvfp4_runs`) and the e4m3
    block scales ``[BLOCK_N, BLOCK_K // 64]`` (uint32: block 4w + i in byte i of word w). Exact in every input dtype (a product of a 2-bit and a 4-bit
    significand within [2^-18, 11]); the per-expert global scale multiplies the fp32 accumulator, as the FP8
    per-tensor scales do.

    bf16 on the GPU: each byte becomes one bf16 pair straight from its word's bits (:func:`_e2m1_words_as_bf16x2`,
    two to four instructions per pair), decoded in storage order, where Triton gives each thread of the MMA
    tile 16 adjacent bytes per row, then put in K order by a register permutation. The block scales become
    bf16 pairs once per scale (:func:`_block_scales_as_bf16x2`) before they are spread over that layout."""
    RUNS: tl.constexpr = BLOCK_K // 128
    if dtype == tl.bfloat16 and not INTERPRET:
        # word 4c + i of a run holds blocks 2i and 2i + 1: its bytes 0, 1 take the first scale, 2, 3 the second
        s0, s1, s2, s3 = _block_scales_as_bf16x2(scale_words)
        pair = tl.reshape(_word_parts_in_order(s0, s1, s2, s3, BLOCK_N, BLOCK_K // 16), (BLOCK_N, RUNS, 1, 4, 2))
        first, second = tl.split(tl.reshape(tl.broadcast_to(pair, (BLOCK_N, RUNS, 4, 4, 2)), (BLOCK_N, RUNS * 16, 2)))
        b0, b1, b2, b3 = _e2m1_words_as_bf16x2(words, first, second)
        pairs = _runs_in_k_order(_word_parts_in_order(b0, b1, b2, b3, BLOCK_N, BLOCK_K // 2), BLOCK_N, RUNS)
        low, high = _split_halves(pairs)
        out = tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K)).to(tl.bfloat16, bitcast=True)
    else:  # the same bits as the GPU path, read back as E2M1 codes
        codes = stored_e2m1_codes(words, BLOCK_N, BLOCK_K)
        sw = scale_words.to(tl.int32, bitcast=True)
        block_bits = _word_parts_in_order(sw & 255, (sw >> 8) & 255, (sw >> 16) & 255, (sw >> 24) & 255, BLOCK_N,
                                          BLOCK_K // 16)  # fmt: skip
        scale = decode_e4m3(block_bits, INTERPRET) * 0.00390625
        out = tl.reshape((decode_e2m1(codes) * scale[:, :, None]).to(dtype), (BLOCK_N, BLOCK_K))
    return out


@triton.jit
def stored_e2m1_codes(words, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The E2M1 codes (``sign << 3 | index``, int32 ``[BLOCK_N, BLOCK_K // 16, 16]``, K order) of the stored
    words ``[BLOCK_N, BLOCK_K // 8]`` (uint32, whole 64-byte runs of :func:`moeq.formats.interleave_nvfp4_runs`):
    the GPU path's bit moves, read back as codes."""
    b0, b1, b2, b3 = _landed_bytes(words)
    pairs = _runs_in_k_order(_word_parts_in_order(b0, b1, b2, b3, BLOCK_N, BLOCK_K // 2), BLOCK_N, BLOCK_K // 128)
    low = ((pairs >> 6) & 7) | ((pairs >> 12) & 8)
    high = ((pairs >> 22) & 7) | ((pairs >> 28) & 8)
    return tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K // 16, 16)).to(tl.int32)


@triton.jit
def _landed_bytes(words):
    """Byte ``i`` of each stored word with its nibbles' signs at bits 15 / 31 and magnitudes at bits 8..6 /
    24..22 (other bits cleared): the integer steps of :data:`_E2M1_WORDS_AS_BF16X2`, four tensors."""
    b0 = words & 0x81C081C0
    b1 = ((words >> 3) | (words << 29)) & 0x81C081C0
    b2 = ((words >> 6) | (words << 26)) & 0x81C081C0
    b3 = ((words & 0x001B001B) * 16648) & 0x81C081C0
    return b0, b1, b2, b3


@triton.jit
def _word_parts_in_order(b0, b1, b2, b3, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """Per-byte values given as byte ``i`` of each word (four ``[ROWS, WIDTH // 4]`` tensors) as one ``[ROWS,
    WIDTH]`` tensor in storage order, byte ``i`` of word ``w`` at ``4 w + i`` (``tl.join`` adds the new axis
    last: the outer join takes bytes 0 | 1, the inner ones 0 | 2 and 1 | 3)."""
    return tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), (ROWS, WIDTH))


@triton.jit
def _runs_in_k_order(stored, BLOCK_N: tl.constexpr, RUNS: tl.constexpr):
    """Per-byte values ``[BLOCK_N, RUNS * 64]`` from storage order (position ``16c + 2j + h`` of a run) to K
    order (byte ``8j + 4h + c``)."""
    runs = tl.permute(tl.reshape(stored, (BLOCK_N, RUNS, 4, 8, 2)), (0, 1, 3, 4, 2))
    return tl.reshape(runs, (BLOCK_N, RUNS * 64))


#: PTX of :func:`_e2m1_words_as_bf16x2`. ``$4`` is one 32-bit word of :func:`moeq.formats.interleave_nvfp4_runs`:
#: byte ``i`` of the word has its bits where a rotation right by ``3 i`` (``i < 3``), or a mask and a multiply by
#: ``2^3 + 2^8 + 2^14`` (``i = 3``), puts each nibble's sign at bf16 bit 15 and its magnitude at bits 8..6; the
#: mask ``0x81C081C0`` clears the other bytes' bits and the FMA applies the scale pair (``$5`` for bytes 0, 1,
#: ``$6`` for bytes 2, 3).
_E2M1_WORDS_AS_BF16X2 = tl.constexpr(
    "{ .reg .b32 t, z; mov.b32 z, 0x80008000;"
    " and.b32 t, $4, 0x81C081C0; fma.rn.bf16x2 $0, t, $5, z;"
    " shf.r.wrap.b32 t, $4, $4, 3; and.b32 t, t, 0x81C081C0; fma.rn.bf16x2 $1, t, $5, z;"
    " shf.r.wrap.b32 t, $4, $4, 6; and.b32 t, t, 0x81C081C0; fma.rn.bf16x2 $2, t, $6, z;"
    " and.b32 t, $4, 0x001B001B; mul.lo.u32 t, t, 16648; and.b32 t, t, 0x81C081C0; fma.rn.bf16x2 $3, t, $6, z; }"
)


@triton.jit
def _e2m1_words_as_bf16x2(words, first_scale, second_scale):
    """Per stored word, its four bytes' bf16 pairs ``(low, high nibble) * scale`` as four 32-bit tensors (PTX;
    the GPU path only). Each nibble's sign and 3 magnitude bits land at bf16 bits 15 and 8..6: ``2^-126`` times
    its E2M1 value (subnormal for 0 and 0.5, which the bf16 FMA takes as they are); the scale pairs hold the
    block scale times ``2^118`` twice, so the product is the value times the block scale times ``2^-8``, exact."""
    return tl.inline_asm_elementwise(
        asm=_E2M1_WORDS_AS_BF16X2,
        constraints="=r,=r,=r,=r,r,r,r",
        args=[words, first_scale, second_scale],
        dtype=(tl.uint32, tl.uint32, tl.uint32, tl.uint32),
        is_pure=True,
        pack=1,
    )


#: PTX of :func:`_block_scales_as_bf16x2`: four e4m3 block scales (the bytes of ``$4``) to f16 in hardware (two per
#: ``cvt``), to f32, times ``2^118``, and each to a bf16 pair (``cvt.rn.bf16x2.f32`` of the value twice); exact for
#: every e4m3 value, zero and NaN included.
_E4M3_SCALES_AS_BF16X2 = tl.constexpr(
    "{ .reg .b16 lo, hi, f0, f1, f2, f3; .reg .b32 h01, h23; .reg .f32 a0, a1, a2, a3;"
    " mov.b32 {lo, hi}, $4; cvt.rn.f16x2.e4m3x2 h01, lo; cvt.rn.f16x2.e4m3x2 h23, hi;"
    " mov.b32 {f0, f1}, h01; mov.b32 {f2, f3}, h23;"
    + "".join(
        f" cvt.f32.f16 a{i}, f{i}; mul.f32 a{i}, a{i}, 0f7A800000; cvt.rn.bf16x2.f32 ${i}, a{i}, a{i};"
        for i in range(4)
    )
    + " }"
)


@triton.jit
def _block_scales_as_bf16x2(scale_words):
    """Per 32-bit word of four e4m3 block scales, the bf16 pairs ``(s, s) * 2^118`` of its bytes 0..3 as four
    tensors (PTX, the GPU path only): the scale operands of :func:`_e2m1_words_as_bf16x2`, computed once per
    scale before they are spread over the MMA layout (declared impure so that Triton keeps them there instead
    of recomputing them for each of the four threads that share a scale)."""
    return tl.inline_asm_elementwise(
        asm=_E4M3_SCALES_AS_BF16X2,
        constraints="=r,=r,=r,=r,r",
        args=[scale_words],
        dtype=(tl.uint32, tl.uint32, tl.uint32, tl.uint32),
        is_pure=False,
        pack=1,
    )


@triton.jit
def _split_halves(pairs):
    """The low and the high 16 bits of each 32-bit element (register halves: no instructions)."""
    return tl.inline_asm_elementwise(
        asm="mov.b32 {$0, $1}, $2;",
        constraints="=h,=h,r",
        args=[pairs],
        dtype=(tl.uint16, tl.uint16),
        is_pure=True,
        pack=1,
    )


@triton.jit
def decode_e2m1(codes):
    """fp32 values of E2M1 codes (``sign << 3 | index``): index e*2+m -> 2^(e-1) * (1 + m/2), e=0: m/2."""
    e = (codes >> 1) & 0x3
    m = (codes & 0x1).to(tl.float32)
    pow2 = ((tl.maximum(e, 1) - 1 + 127) << 23).to(tl.float32, bitcast=True)
    mag = tl.where(e == 0, 0.5 * m, pow2 * (1.0 + 0.5 * m))
    return negate_where((codes & 0x8) != 0, mag)


@triton.jit
def _tile_of_program(offs_ptr, tile_m, M, NUM_EXPERTS, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, first row, end row) of global m-tile ``tile_m``: experts' m-tiles in order, then the tiles
    of the unrouted tail rows (expert == NUM_EXPERTS, to be zeroed); end <= first for a spare program."""
    e_idx = tl.arange(0, E_POW2)
    valid = e_idx < NUM_EXPERTS
    ends = tl.load(offs_ptr + e_idx, mask=valid, other=0)
    starts = tl.load(offs_ptr + e_idx - 1, mask=valid & (e_idx > 0), other=0)
    tiles = tl.where(valid, tl.cdiv(ends - starts, BLOCK_M), 0)
    cum = tl.cumsum(tiles, axis=0)
    expert = tl.sum((cum <= tile_m).to(tl.int32), axis=0)
    if expert < NUM_EXPERTS:
        here = e_idx == expert
        first_tile = tl.sum(tl.where(here, cum - tiles, 0), axis=0)
        row_start = tl.sum(tl.where(here, starts, 0), axis=0) + (tile_m - first_tile) * BLOCK_M
        row_end = tl.sum(tl.where(here, ends, 0), axis=0)
    else:
        routed = tl.load(offs_ptr + NUM_EXPERTS - 1)
        row_start = routed + (tile_m - tl.sum(tiles, axis=0)) * BLOCK_M
        row_end = M
    return expert, row_start, row_end


@triton.autotune(
    configs=grouped_qmm_configs(),
    key=["N", "K", "NUM_EXPERTS", "M_BUCKET", "W_MODE", "X_MODE"],
    prune_configs_by={"early_config_prune": prune_configs},
)
@triton.jit
def _grouped_qmm_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    offs_ptr,
    w_scale_ptr,
    w_block_ptr,
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
    stride_be,
    stride_bk,
    stride_bn,
    stride_om,
    stride_on,
    E_POW2: tl.constexpr,
    W_MODE: tl.constexpr,
    X_MODE: tl.constexpr,
    X_AMAX: tl.constexpr,
    W_PER_CHANNEL: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
    FP8_DOT: tl.constexpr,
    TAIL_M: tl.constexpr = 0,
):
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    tile_m = pid // n_tiles
    pid_n = pid % n_tiles
    expert, row_start, row_end = _tile_of_program(offs_ptr, tile_m, M, NUM_EXPERTS, E_POW2, BLOCK_M)
    multiply_tile_with_tail(
    x_ptr, w_ptr, out_ptr, w_scale_ptr, w_block_ptr, x_amax_ptr, expert, row_start, row_end, pid_n, N, K, NUM_EXPERTS,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_be, stride_bk, stride_bn, stride_om, stride_on,
    W_MODE, X_MODE, X_AMAX, W_PER_CHANNEL, DOT_IEEE, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_K, SWAP_AB, FP8_DOT, TAIL_M,
    )  # fmt: skip


@triton.jit
def multiply_tile_with_tail(
    x_ptr, w_ptr, out_ptr, w_scale_ptr, w_block_ptr, x_amax_ptr, expert, row_start, row_end, pid_n, N, K, NUM_EXPERTS,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_be, stride_bk, stride_bn, stride_om, stride_on,
    W_MODE: tl.constexpr, X_MODE: tl.constexpr, X_AMAX: tl.constexpr, W_PER_CHANNEL: tl.constexpr,
    DOT_IEEE: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr, FP8_DOT: tl.constexpr, TAIL_M: tl.constexpr,
):  # fmt: skip
    """:func:`_multiply_tile` of one m-tile, as a ``TAIL_M``-row MMA when ``TAIL_M`` is set and the tile (an
    expert's short last one) has at most that many rows."""
    if TAIL_M == 0:
        _multiply_tile(
        x_ptr, w_ptr, out_ptr, w_scale_ptr, w_block_ptr, x_amax_ptr, expert, row_start, row_end, pid_n, N, K, NUM_EXPERTS,
        stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_be, stride_bk, stride_bn, stride_om, stride_on,
        W_MODE, X_MODE, X_AMAX, W_PER_CHANNEL, DOT_IEEE, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_K, SWAP_AB, FP8_DOT,
        )  # fmt: skip
    elif row_end - row_start > TAIL_M:
        _multiply_tile(
        x_ptr, w_ptr, out_ptr, w_scale_ptr, w_block_ptr, x_amax_ptr, expert, row_start, row_end, pid_n, N, K, NUM_EXPERTS,
        stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_be, stride_bk, stride_bn, stride_om, stride_on,
        W_MODE, X_MODE, X_AMAX, W_PER_CHANNEL, DOT_IEEE, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_K, SWAP_AB, FP8_DOT,
        )  # fmt: skip
    else:  # an expert's last, short m-tile: a narrower MMA (weights as its wide operand below 64 rows)
        _multiply_tile(
        x_ptr, w_ptr, out_ptr, w_scale_ptr, w_block_ptr, x_amax_ptr, expert, row_start, row_end, pid_n, N, K, NUM_EXPERTS,
        stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_be, stride_bk, stride_bn, stride_om, stride_on,
        W_MODE, X_MODE, X_AMAX, W_PER_CHANNEL, DOT_IEEE, INTERPRET, TAIL_M, BLOCK_N, BLOCK_K, TAIL_M < 64, FP8_DOT,
        )  # fmt: skip


@triton.jit
def _multiply_tile(
    x_ptr, w_ptr, out_ptr, w_scale_ptr, w_block_ptr, x_amax_ptr, expert, row_start, row_end, pid_n, N, K, NUM_EXPERTS,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_be, stride_bk, stride_bn, stride_om, stride_on,
    W_MODE: tl.constexpr, X_MODE: tl.constexpr, X_AMAX: tl.constexpr, W_PER_CHANNEL: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr, FP8_DOT: tl.constexpr,
):  # fmt: skip
    """Rows ``[row_start, row_end)`` (at most ``BLOCK_M``) of expert ``expert`` times its n-tile ``pid_n``: the
    operands quantized as loaded (module doc), the product scaled and stored; ``expert == NUM_EXPERTS`` (the
    unrouted rows) stores zeros."""
    e = tl.minimum(expert, NUM_EXPERTS - 1).to(tl.int64)
    k_end = tl.where(expert < NUM_EXPERTS, K, 0)  # the unrouted tail only gets zeros

    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = cols_n < N
    # K as [BLOCK_K // 16, 16]: NVFP4 blocks are the last axis of every 3-D tile below
    kb = tl.arange(0, BLOCK_K // 16)[:, None] * 16 + tl.arange(0, 16)[None, :]

    x_rows = x_ptr + rows.to(tl.int64)[:, None, None] * stride_xm
    w_base = w_ptr + e * stride_we + cols_n.to(tl.int64)[:, None, None] * stride_wn

    if X_MODE != 0:
        if X_AMAX == X_AMAX_PER_ROW:  # dynamic per-token scales: one amax per row, [BLOCK_M, 1] (0 for unrouted rows,
            # whose zeros must not meet a NaN or inf amax)
            x_amax = tl.load(x_amax_ptr + rows, mask=row_mask, other=0.0)[:, None]
            x_amax = tl.where(expert < NUM_EXPERTS, x_amax, 0.0)
        elif X_AMAX == X_AMAX_PER_EXPERT:
            x_amax = tl.load(x_amax_ptr + e)
        else:
            x_amax = tl.load(x_amax_ptr)
    if W_PER_CHANNEL:  # FP8 channel-wise weight scales [E, N]: one per column of the tile, [BLOCK_N, 1]
        w_scale = tl.load(w_scale_ptr + e * N + cols_n, mask=n_mask, other=0.0)[:, None]
    elif W_MODE != W_PLAIN:
        w_scale = tl.load(w_scale_ptr + e)
    # FP8 operands enter the dot as their e4m3 values (exact in every input dtype); their scales multiply
    # the fp32 accumulator once per tile
    acc_scale = 1.0
    if X_MODE == X_FP8:
        x_s = fp8_scale(x_amax)
        x_div = safe_divisor(x_s)
        x_fast = fast_division_ok(x_div, INTERPRET)
        acc_scale = x_s
    if X_MODE == X_FP8_CODES:
        acc_scale = fp8_scale(x_amax)
    if W_MODE == W_FAKE_FP8:
        w_s = fp8_scale(w_scale)
        w_div = safe_divisor(w_s)
        w_fast = fast_division_ok(w_div, INTERPRET)
        if W_PER_CHANNEL:  # [BLOCK_N, 1] divides the weight tile's rows, [1, BLOCK_N] scales the output's columns
            acc_scale = acc_scale * tl.trans(w_s)
        else:
            acc_scale = acc_scale * w_s
    if W_MODE == W_FP8:
        if W_PER_CHANNEL:
            acc_scale = acc_scale * tl.trans(w_scale)
        else:
            acc_scale = acc_scale * w_scale
    if W_MODE == W_NVFP4:
        acc_scale = acc_scale * (w_scale * 256.0)  # the NVFP4 operand is 2^-8 times e2m1 * block scale

    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if W_MODE == W_NVFP4:
        sb_base = w_block_ptr + e * stride_be + cols_n.to(tl.int64)[:, None] * stride_bn
        sb_next = _block_scale_words(sb_base, 0, k_end, n_mask, stride_bk, K, BLOCK_K)
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + kb[None, :, :]
        k_mask = ks < K
        k2 = k0 + tl.arange(0, BLOCK_K)
        # ---- activation tile: [BLOCK_M, BLOCK_K // 16, 16] where NVFP4 needs its 16-blocks, else a plain
        # 2-D tile (contiguous loads the compiler vectorizes and pipelines; no register reshapes)
        if X_MODE == X_NVFP4:
            x = tl.load(x_rows + ks * stride_xk, mask=row_mask[:, None, None] & k_mask, other=0.0)
            xa = tl.reshape(cast_like(fake_quant_nvfp4(x.to(tl.float32), x_amax, INTERPRET), out_ptr, INTERPRET),
                            (BLOCK_M, BLOCK_K))  # fmt: skip
        else:
            x2_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + k2[None, :] * stride_xk
            x2_mask = row_mask[:, None] & (k2 < K)[None, :]
            if X_MODE == X_FP8_CODES:
                xa = _as_operand(load_e4m3(x2_ptrs, x2_mask, INTERPRET), out_ptr, FP8_DOT)
            else:
                xa = tl.load(x2_ptrs, mask=x2_mask, other=0.0)
            if X_MODE == X_FP8:
                xa = _as_operand(e4m3_codes(divide(xa.to(tl.float32), x_div, x_fast), INTERPRET), out_ptr, FP8_DOT)
        # ---- weight tile [BLOCK_N, BLOCK_K] (n, k)
        w2_ptrs = w_ptr + e * stride_we + cols_n.to(tl.int64)[:, None] * stride_wn + k2[None, :] * stride_wk
        w2_mask = n_mask[:, None] & (k2 < K)[None, :]
        if W_MODE == W_NVFP4:
            # 32-bit words of freeze's 64-byte runs (whole runs: the last one is zero-padded); the decode puts
            # the pairs back in K order in registers
            kq = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            q_ptr = w_ptr + e * stride_we + cols_n.to(tl.int64)[:, None] * stride_wn + kq[None, :] * stride_wk
            words = tl.load(q_ptr, mask=n_mask[:, None] & (kq < tl.cdiv(K, 128) * 16)[None, :], other=0)
            # block scales: 32-bit words of four (byte loads cost one memory request per byte), requested one
            # step ahead of their use (loaded in the step that uses them, the H200 measured them on the critical
            # path; requested ahead, Triton stages them through shared memory and keeps the decode's layout)
            scale_words = sb_next
            sb_next = _block_scale_words(sb_base, k0 + BLOCK_K, k_end, n_mask, stride_bk, K, BLOCK_K)
            wq = _nvfp4_operand(words.to(tl.uint32, bitcast=True), scale_words, out_ptr.dtype.element_ty, BLOCK_N,
                                BLOCK_K, INTERPRET)  # fmt: skip
        elif W_MODE == W_FP8:
            wq = _as_operand(load_e4m3(w2_ptrs, w2_mask, INTERPRET), out_ptr, FP8_DOT)
        elif W_MODE == W_FAKE_NVFP4:
            w = tl.load(w_base + ks * stride_wk, mask=n_mask[:, None, None] & k_mask, other=0.0)
            wq = tl.reshape(cast_like(fake_quant_nvfp4(w.to(tl.float32), w_scale, INTERPRET), out_ptr, INTERPRET),
                            (BLOCK_N, BLOCK_K))  # fmt: skip
        else:
            wq = tl.load(w2_ptrs, mask=w2_mask, other=0.0)
            if W_MODE == W_FAKE_FP8:
                wq = _as_operand(e4m3_codes(divide(wq.to(tl.float32), w_div, w_fast), INTERPRET), out_ptr, FP8_DOT)
            else:
                wq = wq.to(out_ptr.dtype.element_ty)
        if INTERPRET:  # the interpreter multiplies 16-bit floats as their bit patterns: widen (exact)
            xa = xa.to(tl.float32)
            wq = wq.to(tl.float32)
        if SWAP_AB:  # out^T tile [BLOCK_N, BLOCK_M] = w [BLOCK_N, BLOCK_K] @ x^T: weights as the wide operand
            a, b = wq, tl.trans(xa)
        else:
            a, b = xa, tl.trans(wq)
        if DOT_IEEE and not FP8_DOT:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if SWAP_AB:
        acc = tl.trans(acc)
    acc = acc * acc_scale  # a scalar, or per row [BLOCK_M, 1] / per column [1, BLOCK_N] / both
    o_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols_n[None, :] * stride_on
    tl.store(o_ptrs, cast_like(acc, out_ptr, INTERPRET), mask=row_mask[:, None] & n_mask[None, :])


def _check(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, w_mode: str, x_mode: str | None) -> None:
    if w_mode not in W_MODES:
        raise ValueError(f"unknown weight mode {w_mode!r}; choose one of {sorted(W_MODES)}")
    if x_mode not in X_MODES:
        raise ValueError(f"unknown activation mode {x_mode!r}; choose one of fp8, nvfp4, fp8_codes or None")
    if x_mode == "fp8_codes":
        if x.dtype not in (torch.float8_e4m3fn, torch.uint8):
            raise ValueError(f"x_mode 'fp8_codes' takes x as e4m3 codes (float8_e4m3fn or uint8), got {x.dtype}")
    else:
        check_float(x, "x")
    if x.dim() != 2 or w.dim() != 3:
        raise ValueError(f"grouped_qmm takes x [M, K] and w [E, K, N], got {tuple(x.shape)} and {tuple(w.shape)}")
    if offs.dtype != torch.int32 or offs.dim() != 1 or offs.numel() != w.shape[0]:
        raise ValueError(
            f"offs must be int32 [{w.shape[0]}] cumulative row counts, got {offs.dtype} {tuple(offs.shape)}"
        )
    if w_mode == "nvfp4":
        runs = cdiv(x.shape[1], 2 * NVFP4_RUN_BYTES) * NVFP4_RUN_BYTES
        if w.shape[1] != runs:
            raise ValueError(
                f"x has K={x.shape[1]}, so the stored nvfp4 weight needs {runs} bytes along K (whole 64-byte runs, "
                f"moeq.formats.interleave_nvfp4_runs), got {w.shape[1]}"
            )
    elif x.shape[1] != w.shape[1]:
        raise ValueError(f"x has K={x.shape[1]} but the weight has K={w.shape[1]}")
    if w_mode in ("plain", "fake_fp8", "fake_nvfp4") and x_mode == "fp8_codes":
        check_float(w, "w")
    elif w_mode in ("plain", "fake_fp8", "fake_nvfp4") and w.dtype != x.dtype:
        raise ValueError(f"x ({x.dtype}) and w ({w.dtype}) must have the same dtype")
    if x_mode == "fp8_codes" and w_mode not in ("fp8", "fake_fp8"):
        raise ValueError(f"x_mode 'fp8_codes' pairs with FP8 weights (w_mode 'fp8' or 'fake_fp8'), got {w_mode!r}")
    if w_mode in ("fp8", "nvfp4") and w.element_size() != 1:
        raise ValueError(f"stored {w_mode} weights are 1-byte tensors, got {w.dtype}")
    if (w_mode in ("fake_nvfp4", "nvfp4") or x_mode == "nvfp4") and x.shape[1] % 16:
        raise ValueError(f"NVFP4 needs K a multiple of 16, got K={x.shape[1]}")
    devices = {t.device for t in (x, w, offs)}
    if len(devices) != 1:
        raise ValueError(f"grouped_qmm operands are on different devices: {sorted(map(str, devices))}")


def block_scale_words(w_block_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 block scales ``[E, K/16, N]`` as the int32 words ``[E, N, cdiv(K/16, 4)]`` the kernel loads (block
    ``4 w + i`` of a row in byte ``i`` of word ``w``): a view of freeze's ``[E, N, K/16]`` storage when K is a
    multiple of 64, else a zero-padded copy (zero scales times the zero-padded E2M1 runs add nothing)."""
    blocks = w_block_scale.view(torch.uint8).transpose(1, 2)
    aligned = blocks.stride(2) == 1 and blocks.storage_offset() % 4 == 0
    if not (aligned and blocks.shape[2] % 4 == 0 and blocks.stride(0) % 4 == 0 and blocks.stride(1) % 4 == 0):
        padded = blocks.new_zeros(*blocks.shape[:2], cdiv(blocks.shape[2], 4) * 4)
        padded[..., : blocks.shape[2]] = blocks
        blocks = padded
    return blocks.view(torch.int32)


def grouped_qmm(
    x: torch.Tensor,
    w: torch.Tensor,
    offs: torch.Tensor,
    w_scale: torch.Tensor | None = None,
    w_block_scale: torch.Tensor | None = None,
    x_amax: torch.Tensor | None = None,
    w_mode: str = "plain",
    x_mode: str | None = None,
    out: torch.Tensor | None = None,
    wrap: Callable[[Any], Any] | None = None,
    config: triton.Config | None = None,
    out_dtype: torch.dtype | None = None,
    quantize_once: bool | None = None,
) -> torch.Tensor:
    """Launch the grouped kernel (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``); returns ``[M, N]``
    in ``out_dtype`` (default: ``x.dtype``; for ``fp8_codes`` the fake-quantized weight's dtype, else bf16).

    ``w``: logically ``[E, K, N]``: float (``plain`` / ``fake_*``), e4m3 bits (``fp8``, float8_e4m3fn or
    uint8) or packed E2M1 pairs along K (``nvfp4``, uint8 ``[E, cdiv(K, 128) * 64, N]`` in the runs of
    :func:`moeq.formats.interleave_nvfp4_runs`). ``w_scale [E]``: the weight amax
    for ``fake_*`` modes, the stored FP8 scale / NVFP4 global scale for ``fp8`` / ``nvfp4``.
    ``w_block_scale``: NVFP4 e4m3 block scales ``[E, K/16, N]``. FP8 weights (``fp8`` / ``fake_fp8``) also take
    channel-wise ``w_scale [E, N]``. ``x_mode="fp8_token"``: FP8 activations with dynamic per-token scales, each
    row by its own ``max|x|`` (computed here; ``x_amax`` is ignored). ``x_amax``: ``[1]`` or ``[E]``; with
    ``x_mode="fp8_codes"`` x already holds the e4m3 codes of ``x / (x_amax / 448)`` (quantized once, e.g. by
    :func:`moeq.runtime.kernels.fake_quant_act` with ``codes=True``) and the kernel only scales the product.
    ``wrap``: applied to the kernel before launching (``torch.library.wrap_triton`` inside a triton_op).
    ``config``: launch with this tile config instead of autotuning (for tuning sweeps).
    ``quantize_once`` (FP8 activations with FP8 weights): ``True`` quantizes x to its e4m3 codes in one pass
    and a ``fake_fp8`` weight to its codes in another, then multiplies the codes (three launches); ``False``
    quantizes both in the GEMM's load path (one launch); ``None`` (default) chooses by size: x once above
    :data:`QUANTIZE_ONCE_ROWS_PER_EXPERT` mean rows per expert (:func:`quantizes_once`), a QAT weight once
    above :data:`WEIGHT_CODES_ROWS_PER_EXPERT` (:func:`quantizes_weight_once`), else in the load path. Where the
    weight would get its own pass, on sm_90 up to :data:`GLUON_ROWS_PER_EXPERT` mean rows per expert, the Gluon
    kernel (:mod:`moeq.runtime.kernels.qat_gluon`) converts it in shared memory instead: two launches. Every
    choice gives the same products (the codes are formats' FP8 ``quantize``). QAT NVFP4 (both operands) above
    :data:`QAT_NVFP4_IN_LOAD_ROWS_PER_EXPERT` mean rows per expert (``quantize_once`` None, or True; bf16 on CUDA)
    fake-quantizes the activations once, then multiplies with the Gluon kernel on sm_90 (:data:`GLUON_QAT_NVFP4`),
    else runs the weight's fake-quant pass and ``torch._grouped_mm``; the same operand values, multiplied in fp32.
    """
    per_token = x_mode == "fp8_token"
    if per_token:
        x_mode = "fp8"
    _check(x, w, offs, w_mode, x_mode)
    num_experts, n = w.shape[0], w.shape[2]
    m, k = x.shape
    caller_out = out
    if out is not None:
        out_dtype = out.dtype
    if out_dtype is None:
        out_dtype = x.dtype if x_mode != "fp8_codes" else w.dtype if w_mode == "fake_fp8" else torch.bfloat16
    check_float(out_dtype, "out_dtype")
    if x_mode != "fp8_codes" and out_dtype != x.dtype:
        raise ValueError(f"the output dtype ({out_dtype}) must be x's ({x.dtype}); only fp8_codes inputs choose it")
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if known_empty(m, n):
        return out
    if known_empty(num_experts, k):
        return out.zero_()
    w_scale, x_amax, per_channel = _checked_scales(w, w_scale, x_amax, w_mode, x_mode, per_token)
    weight_once = quantize_once
    nvfp4_once = quantize_once
    if quantize_once is None:
        nvfp4_once = quantizes_nvfp4_once(w_mode, x_mode, m, num_experts)
        quantize_once = quantizes_once(w_mode, x_mode, m, num_experts)
        weight_once = quantizes_weight_once(w_mode, x_mode, m, num_experts)
    if quantize_once and x_mode == "fp8" and w_mode in ("fp8", "fake_fp8"):
        if per_token:  # row amax and codes in one launch
            x, x_amax = token_codes(x, offs, wrap=wrap)
        else:
            x = fake_quant_act(x, offs, x_amax, "fp8", codes=True, wrap=wrap)
        x_mode = "fp8_codes"
        if (
            w_mode == "fake_fp8"
            and weight_once
            and config is None
            and caller_out is None
            and not per_token
            and gluon_takes(x, w, w_scale, x_amax)
        ):
            return gluon_gemm(x, w, offs, w_scale, x_amax, out, wrap)
        if w_mode == "fake_fp8" and weight_once and not WEIGHT_PASS_IN_GEMM:
            w = fake_quant_experts(w, w_scale, "fp8", 1, codes=True, wrap=wrap)
            w_scale, w_mode = get_format("fp8").scale_from_amax(w_scale), "fp8"
    bf16_cuda = x.is_cuda and x.dtype == torch.bfloat16  # the Gluon kernel and torch._grouped_mm take bf16
    if nvfp4_once and w_mode == "fake_nvfp4" and bf16_cuda and config is None:
        return _qat_nvfp4_quantized_once(x, w, offs, w_scale, x_amax, x_mode, out, caller_out is None, wrap)
    if per_token and x_amax is None:  # in the load path: the kernel quantizes each row with its amax
        x_amax = row_amax(x, wrap=wrap)
    fp8_bits = torch.uint8 if interpreting() else torch.float8_e4m3fn
    if x_mode == "fp8_codes":  # the GPU loads float8e4nv directly; the interpreter decodes the bits by hand
        x = x.view(fp8_bits)
    if w_mode == "fp8":
        w = w.view(fp8_bits)
    elif w_mode == "nvfp4":  # read as the 32-bit words the decode works on: K-contiguous (freeze stores it so)
        w_nk = w.view(torch.uint8).transpose(1, 2)
        w = (w_nk if w_nk.stride(2) == 1 else w_nk.contiguous()).view(torch.int32).transpose(1, 2)
    if w_mode == "fake_fp8" and x_mode == "fp8_codes" and weight_once and WEIGHT_PASS_IN_GEMM and config is None:
        from moeq.runtime.kernels.weight_pass_gemm import weight_pass_gemm

        codes = torch.empty_like(w, dtype=torch.float8_e4m3fn)
        scale = get_format("fp8").scale_from_amax(w_scale)
        return weight_pass_gemm(x, w, offs, w_scale, scale, x_amax, out, codes, x_per_row=per_token, wrap=wrap)
    return _launch_grouped_kernel(x, w, offs, out, w_scale, w_block_scale, x_amax, w_mode, x_mode, per_token,
                                  per_channel, config, wrap)  # fmt: skip


def _checked_scales(
    w: torch.Tensor,
    w_scale: torch.Tensor | None,
    x_amax: torch.Tensor | None,
    w_mode: str,
    x_mode: str | None,
    per_token: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
    """:func:`grouped_qmm`'s weight scales and activation amax, checked against the modes and as fp32, and whether
    the weight scales are channel-wise (``[E, N]``). Per-token activations take no amax (each row's own)."""
    num_experts, n = w.shape[0], w.shape[2]
    per_channel = w_scale is not None and w_scale.dim() == 2
    if per_channel and (w_mode not in ("fp8", "fake_fp8") or tuple(w_scale.shape) != (num_experts, n)):
        raise ValueError(
            f"channel-wise w_scale {tuple(w_scale.shape)} needs an FP8 weight and shape {(num_experts, n)}, "
            f"got mode {w_mode!r}"
        )
    if w_mode != "plain":
        if w_scale is None or (w_scale.numel() != num_experts and not per_channel):
            raise ValueError(f"w_scale must have one entry per expert ({num_experts}) in mode {w_mode!r}")
        w_scale = as_fp32(w_scale)
    if per_token:  # each row's own amax (NaN where the row has one): computed later, with the codes or on its own
        x_amax = None
    elif x_mode is not None:
        if x_amax is None or x_amax.numel() not in (1, num_experts):
            raise ValueError(f"x_amax must have 1 or {num_experts} entries for activation format {x_mode!r}")
        x_amax = as_fp32(x_amax)
    return w_scale, x_amax, per_channel


def _qat_nvfp4_quantized_once(
    x: torch.Tensor,
    w: torch.Tensor,
    offs: torch.Tensor,
    w_scale: torch.Tensor,
    x_amax: torch.Tensor | None,
    x_mode: str | None,
    out: torch.Tensor,
    own_out: bool,
    wrap: Callable[[Any], Any] | None,
) -> torch.Tensor:
    """QAT NVFP4 on bf16 CUDA tensors at large sizes: x_mode "nvfp4" fake-quantizes the activations in their own
    pass first (None: x is multiplied as given, e.g. already fake-quantized before the routing gather,
    moeq.lowering.gather_quant); then the Gluon kernel on sm_90, else the weight's fake-quant pass and
    ``torch._grouped_mm``. ``own_out``: ``out`` is this call's own buffer (the caller passed none)."""
    k = x.shape[1]
    register_operand = GLUON_QAT_NVFP4_REGISTER_OPERAND and x_mode == "nvfp4" and k % 64 == 0
    if register_operand and wrap is None and own_out and gluon_takes(x, w, w_scale, None, nvfp4=True):
        from moeq.runtime.kernels import qat_gluon

        x = fake_quant_act(x, offs, x_amax, "nvfp4", in_wgmma_k_order=True)
        return qat_gluon.qat_nvfp4_gluon_gemm(x, w, offs, w_scale, out=out, check=False,
                                              config=qat_gluon.REGISTER_A_CONFIGS[0], x_in_wgmma_k_order=True)  # fmt: skip
    if x_mode == "nvfp4":
        x = fake_quant_act(x, offs, x_amax, "nvfp4", wrap=wrap)
    if own_out and gluon_takes(x, w, w_scale, None, nvfp4=True):
        return gluon_gemm(x, w, offs, w_scale, None, out, wrap, nvfp4=True)
    product = qat_nvfp4_weight_pass_gemm(x, w, offs, w_scale, wrap)
    return product if own_out else out.copy_(product)


def _launch_grouped_kernel(
    x: torch.Tensor,
    w: torch.Tensor,
    offs: torch.Tensor,
    out: torch.Tensor,
    w_scale: torch.Tensor | None,
    w_block_scale: torch.Tensor | None,
    x_amax: torch.Tensor | None,
    w_mode: str,
    x_mode: str | None,
    per_token: bool,
    per_channel: bool,
    config: triton.Config | None,
    wrap: Callable[[Any], Any] | None,
) -> torch.Tensor:
    """One launch of :func:`_grouped_qmm_kernel` (autotuned, or with ``config``) on operands :func:`grouped_qmm` has
    checked and viewed as the kernel reads them; writes and returns ``out``."""
    m, k = x.shape
    num_experts, n = w.shape[0], w.shape[2]
    dummy = offs
    block = dummy
    b_strides = (0, 0, 0)
    if w_mode == "nvfp4":
        if w_block_scale is None or tuple(w_block_scale.shape) != (num_experts, k // 16, n):
            raise ValueError(f"nvfp4 block scales must have shape {(num_experts, k // 16, n)}")
        block = block_scale_words(w_block_scale)
        b_strides = (block.stride(0), block.stride(2), block.stride(1))

    def grid(meta):  # m-tiles: at most cdiv(m, BLOCK_M) + one partial tile per routed expert (see the module doc)
        return ((cdiv(m, meta["BLOCK_M"]) + min(num_experts, m)) * cdiv(n, meta["BLOCK_N"]),)

    kernel, meta = _grouped_qmm_kernel, {}
    if config is not None:
        kernel = _grouped_qmm_kernel.fn
        if w_mode == "nvfp4" and config.kwargs["BLOCK_K"] % 128:
            raise ValueError(
                f"nvfp4 weights are read in 128-element runs of K: BLOCK_K must be a multiple of 128, got {config}"
            )
        meta = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        if config.maxnreg and not interpreting():
            meta["maxnreg"] = config.maxnreg
        fp8 = fp8_operands(W_MODES[w_mode], X_MODES[x_mode]) and not interpreting()
        meta["FP8_DOT"] = meta.get("FP8_DOT", fp8) and fp8
        grid = grid(config.kwargs)
    kernel = wrap(kernel) if wrap is not None else kernel
    launch_kernel(kernel, grid,
        x, w, out, offs,
        w_scale if w_scale is not None else dummy, block, x_amax if x_amax is not None else dummy,
        m, n, k, num_experts, m_bucket(m, num_experts),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), *b_strides, out.stride(0), out.stride(1),
        E_POW2=max(triton.next_power_of_2(num_experts), 128),
        W_MODE=W_MODES[w_mode], X_MODE=X_MODES[x_mode],
        X_AMAX=2 if per_token else int(x_amax is not None and x_amax.numel() > 1), W_PER_CHANNEL=per_channel,
        DOT_IEEE=out.dtype == torch.float32, INTERPRET=interpreting(), **meta,
    )  # fmt: skip
    return out
