"""On a real GPU: every Triton kernel is bit-exact with moeq.formats (computed on the CPU), and a compiled
tiny HF MoE gives identical outputs with the Triton kernels and with the reference path."""

from __future__ import annotations

import contextlib

import pytest
import torch
import triton

import moeq
from moeq import segments
from moeq.formats import expand_per_expert, expert_amax, get_format
from moeq.integrations.hf import tiny_model
from moeq.lowering import inductor as inductor_module
from moeq.lowering import ops
from moeq.lowering.inductor import fusion, unfused
from moeq.runtime import kernels
from moeq.runtime.kernels.grouped_qmm import grouped_qmm as launch_grouped_qmm
from tests.conftest import (
    assert_same_bits,
    deployed_weight_operand,
    every_bf16_block_weights,
    far_below_block_weights,
    gradients_with_clipped_weights,
    make_tokens,
    nonfinite_weights,
    per_expert_matmul_f64,
    plain_and_checkpointed_qat_steps,
    stored_weight_args,
)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize(
    ("shape", "k_dim"), [((8, 96, 256), 2), ((4, 256, 80), 1), ((1, 33, 16), 2), ((16, 512, 1024), 2)]
)
def test_fake_quant_experts_bit_exact_cuda(shape, k_dim, fmt, dtype, seed):
    """fake_quant_experts on CUDA == formats.fake_quant on CPU, bit for bit."""
    from moeq.runtime import kernels

    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * torch.logspace(-2, 1, shape[0]).view(-1, 1, 1)).to(dtype)
    amax = expert_amax(w) * 0.8
    expected = get_format(fmt).fake_quant(w, expand_per_expert(amax, 3), k_dim)
    got = kernels.fake_quant_experts(w.cuda(), amax.cuda(), fmt, k_dim).cpu()
    assert_same_bits(got, expected, fmt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("shape", "k_dim"), [((8, 96, 256), 2), ((4, 2048, 96), 1), ((2, 24, 400), 2)])
def test_nvfp4_weight_codes_cuda(shape, k_dim, dtype):
    """nvfp4_weight_codes on CUDA == formats' NVFP4 stored form on the CPU, bit for bit (NaN, infinities and blocks
    spanning the fp32 range included: the GPU's e4m3 conversion writes NaN as 0x7F, as torch's cast does), and
    ``moeq::quantize_weight`` of an NVFP4 weight on CUDA launches it (session 42: the torch reference took 54.7 ms
    for one Qwen3-30B-A3B layer's experts on entering ``reuse_weight_codes``)."""
    from torch.profiler import ProfilerActivity, profile

    from moeq.formats import stored_form
    from moeq.runtime import kernels

    g = torch.Generator().manual_seed(7)
    w = torch.randn(shape, generator=g) * torch.logspace(-2, 1, shape[0]).view(-1, 1, 1)
    amax = expert_amax(w) * 0.8
    w[0].view(-1)[[3, 40]] = float("nan")
    w[1].view(-1)[[5, 77]] = torch.tensor([float("inf"), -float("inf")])
    w = w.to(dtype)
    want = stored_form(get_format("nvfp4").quantize(w, expand_per_expert(amax, 3), k_dim))
    got = kernels.nvfp4_weight_codes(w.cuda(), amax.cuda(), k_dim)
    for name, a, b in zip(("data", "scale", "block_scale"), got, want):
        assert_same_bits(a.cpu(), b, name)
    blocks, amax_wide = far_below_block_weights(), torch.tensor([3e38, 1e15])
    want = stored_form(get_format("nvfp4").quantize(blocks, expand_per_expert(amax_wide, 3), 2))
    for name, a, b in zip(
        ("data", "scale", "block_scale"), kernels.nvfp4_weight_codes(blocks.cuda(), amax_wide.cuda(), 2), want
    ):
        assert_same_bits(a.cpu(), b, name)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        stored = torch.ops.moeq.quantize_weight(w.cuda(), amax.cuda(), "nvfp4", 0, k_dim)
        torch.cuda.synchronize()
    assert [e.name for e in prof.events() if "_nvfp4_codes_kernel" in e.name], "quantize_weight did not launch it"
    for a, b in zip(stored, got):
        assert_same_bits(a, b)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_segment_amax_and_act_bit_exact_cuda(dtype, seed):
    """segment_amax and fake_quant_act (FP8/NVFP4, shared/per-expert) on CUDA == the CPU reference."""
    from moeq.runtime import kernels

    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 40, (16,), generator=g)
    counts[3] = 0
    offs = counts.cumsum(0).to(torch.int32)
    x = (torch.randn(int(offs[-1]) + 5, 256, generator=g) * 3).to(dtype)
    amax_ref, counts_ref = segments.segment_amax(x, offs, 16)
    amax, got_counts = kernels.segment_amax(x.cuda(), offs.cuda(), 16)
    assert torch.equal(amax.cpu(), amax_ref) and torch.equal(got_counts.cpu(), counts_ref)
    for fmt in ("fp8", "nvfp4"):
        for act_amax in (torch.tensor([2.0]), torch.linspace(0.5, 5.0, 16)):
            expected = ops._fake_quant_act_reference(x, offs, act_amax, fmt, 0, -1)
            got = kernels.fake_quant_act(x.cuda(), offs.cuda(), act_amax.cuda(), fmt).cpu()
            assert_same_bits(got, expected, f"{fmt}, {act_amax.numel()} amax")


@pytest.mark.parametrize("config", ["NVFP4", "FP8"])
def test_compiled_model_triton_equals_reference_path(config):
    """A compiled tiny Qwen3-MoE on CUDA: identical statistics and outputs with Triton kernels and with
    the reference implementation of the moeq ops (same GEMMs, so any difference would be the kernels)."""
    results = []
    for use_reference in (False, True):
        torch._dynamo.reset()
        model = moeq.prepare(tiny_model("qwen3_moe", torch.bfloat16).cuda(), getattr(moeq, config))
        cm = torch.compile(model, backend="moeq")
        tokens = make_tokens(batch=4, seq=64).cuda()
        guard = ops.reference_kernels() if use_reference else torch.no_grad()
        # unfused: this test compares the quantization kernels (same cuBLAS GEMMs on both sides); the fused
        # grouped_qmm kernel is compared with the reference path in test_compiled_model_grouped_qmm_*
        with torch.no_grad(), guard, unfused():
            with moeq.calibrate(cm):
                cm(tokens)
            moeq.finalize(cm)
            logits = cm(tokens).logits
        stats = {
            k: (s.observed_input_amax.cpu(), s.tokens_per_expert.cpu()) for k, s in moeq.quant_state(model).items()
        }
        results.append((logits.cpu(), stats))
    (a, stats_a), (b, stats_b) = results
    assert torch.equal(a, b)
    for fqn in stats_a:
        assert torch.equal(stats_a[fqn][0], stats_b[fqn][0]) and torch.equal(stats_a[fqn][1], stats_b[fqn][1])


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_formats_same_on_cuda_and_cpu(fmt):
    """formats.py itself is device-independent: evaluated by torch on CUDA it equals the CPU result."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(16, 256, 512, generator=g) * 0.02).to(torch.bfloat16)
    amax = expand_per_expert(expert_amax(w), 3)
    f = get_format(fmt)
    assert_same_bits(f.fake_quant(w.cuda(), amax.cuda(), -1).cpu(), f.fake_quant(w, amax, -1), fmt)
    q_cuda, q_cpu = f.quantize(w.cuda(), amax.cuda(), -1), f.quantize(w, amax, -1)
    assert torch.equal(q_cuda.data.cpu().view(torch.uint8), q_cpu.data.view(torch.uint8))


# ----------------------------------------------------------------------------------------------
# moeq::grouped_qmm: the fused Q/DQ + grouped GEMM kernel
# ----------------------------------------------------------------------------------------------

QMM_MODES = [
    ("qat", "fp8", "fp8"),
    ("qat", "nvfp4", "nvfp4"),
    ("qat", "nvfp4", None),
    ("qat", "fp8", None),
    ("deploy", "fp8", "fp8"),
    ("deploy", "fp8", None),
    ("deploy", "nvfp4", None),
    ("deploy", "nvfp4", "nvfp4"),
]


def _qmm_operands(mode, w_fmt, x_fmt, w_nk, x, offs, amax, x_amax):
    """(kernel weight args, reference x̂, reference ŵ [E, K, N]) computed on the CPU with formats.py."""
    fmt = get_format(w_fmt)
    xq = ops._fake_quant_act_reference(x, offs, x_amax, x_fmt, 0, -1) if x_fmt else x
    if mode == "qat":
        w = w_nk.transpose(1, 2)
        return (w, amax, None), xq, fmt.fake_quant(w, expand_per_expert(amax, 3), 1)
    q = fmt.quantize(w_nk, expand_per_expert(amax, 3), 2)
    return stored_weight_args(q), xq, deployed_weight_operand(q, x.dtype).transpose(1, 2)


#: the transposed (swap-AB) tile for decode-sized batches, forced (autotuning picks it only for small batches)
SWAPPED = triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SWAP_AB": True}, num_warps=4, num_stages=3)
#: e4m3 operands multiplied as 16-bit floats (the other FP8 x FP8 choice autotuning has)
SIXTEEN_BIT_DOT = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "SWAP_AB": False, "FP8_DOT": False})


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    ("counts", "k", "n", "config"),
    [
        ([37, 0, 250, 3, 0, 90], 256, 192, None),
        ([1000], 512, 320, None),
        ([1, 0, 2, 1, 0, 0, 3, 1], 512, 320, SWAPPED),
        ([37, 0, 250, 3, 0, 90], 256, 192, SIXTEEN_BIT_DOT),
    ],
    ids=["odd", "one-expert", "decode-swapped", "16-bit-dot"],
)
@pytest.mark.parametrize(("mode", "w_fmt", "x_fmt"), QMM_MODES)
def test_grouped_qmm_cuda_matches_reference(mode, w_fmt, x_fmt, counts, k, n, config, seed):
    """grouped_qmm on CUDA vs formats.py Q/DQ operands + float64 per-expert matmul (CPU): rel err < 1e-2,
    autotuned and with the swap-AB tile forced."""
    g = torch.Generator().manual_seed(seed)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = (torch.randn(int(offs[-1]) + 5, k, generator=g) * 2).to(torch.bfloat16)
    w_nk = (torch.randn(len(counts), n, k, generator=g) * 0.05).to(torch.bfloat16)
    amax = expert_amax(w_nk)
    x_amax = torch.tensor([float(x.abs().max())]) if x_fmt else None
    (w, scale, block), xq, wq = _qmm_operands(mode, w_fmt, x_fmt, w_nk, x, offs, amax, x_amax)
    ref = torch.zeros(x.shape[0], n, dtype=torch.float64)
    start = 0
    for e, end in enumerate(offs.tolist()):
        ref[start:end] = xq[start:end].double() @ wq[e].double()
        start = end
    cuda = [t.cuda() if t is not None else None for t in (x, w, offs, scale, block, x_amax)]
    if config is None:  # FP8 x FP8: quantization in the load path and quantized once (codes GEMM)
        choices = (False, True) if (w_fmt, x_fmt) == ("fp8", "fp8") else (None,)
        outputs = [torch.ops.moeq.grouped_qmm(*cuda, mode, w_fmt, x_fmt, once).cpu() for once in choices]
    else:
        w_mode = f"fake_{w_fmt}" if mode == "qat" else w_fmt
        outputs = [launch_grouped_qmm(*cuda, w_mode, x_fmt, config=config, quantize_once=False).cpu()]
    for got in outputs:
        rel = ((got.double() - ref).norm() / ref.norm()).item()
        assert rel < 1e-2, rel
        assert not got[int(offs[-1]) :].any()


@pytest.mark.parametrize("config", [None, SWAPPED], ids=["autotuned", "swap-ab"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("mode", "w_fmt"), [("qat", "fp8"), ("qat", "nvfp4"), ("deploy", "fp8"), ("deploy", "nvfp4")])
def test_grouped_qmm_cuda_weight_operand_bit_exact(mode, w_fmt, dtype, config):
    """One-hot activation rows select weight rows: the in-kernel weight Q/DQ equals formats.py bit for bit
    (autotuned, and in the swap-AB decode tile)."""
    g = torch.Generator().manual_seed(3)
    counts, k, n = [40, 0, 88], 256, 160
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    w_nk = (torch.randn(3, n, k, generator=g) * torch.logspace(-3, 0, 3).view(-1, 1, 1)).to(dtype)
    amax = expert_amax(w_nk) * 0.8
    picks = torch.randint(0, k, (128,), generator=g)
    x = torch.nn.functional.one_hot(picks, k).to(dtype)
    (w, scale, block), _, wq = _qmm_operands(mode, w_fmt, None, w_nk, x, offs, amax, None)
    cuda = [t.cuda() if t is not None else None for t in (x, w, offs, scale, block)]
    if config is None:
        got = torch.ops.moeq.grouped_qmm(*cuda, None, mode, w_fmt, None).cpu()
    else:
        w_mode = f"fake_{w_fmt}" if mode == "qat" else w_fmt
        got = launch_grouped_qmm(*cuda, None, w_mode, None, config=config).cpu()
    experts = torch.searchsorted(offs, torch.arange(128, dtype=torch.int32), right=True)
    assert torch.equal(got, wq[experts, picks])


def _codes_product(x_codes, w_codes, offs, scales):
    """Float64 per-expert product of e4m3 codes ``x [M, K]`` and ``w [E, N, K]`` times ``scales[e]``, and the same
    with absolute values (``sum_k |x_k w_k|``, what bounds the FP8 MMA's accumulation error); zeros past
    ``offs[-1]``."""
    ref = torch.zeros(x_codes.shape[0], w_codes.shape[1], dtype=torch.float64)
    magnitude = torch.zeros_like(ref)
    start = 0
    for e, end in enumerate(offs.tolist()):
        xe, we = x_codes[start:end].double(), w_codes[e].double().T
        ref[start:end] = (xe @ we) * scales[e]
        magnitude[start:end] = (xe.abs() @ we.abs()) * scales[e]
        start = end
    return ref, magnitude


@pytest.mark.parametrize("per_expert", [False, True], ids=["shared", "per-expert"])
@pytest.mark.parametrize(
    ("counts", "k", "n"), [([3000, 0, 1, 5000, 777, 0, 2900, 4100], 768, 1024), ([20000], 256, 520)]
)
def test_codes_gemm_training_size(counts, k, n, per_expert):
    """The quantize-once GEMM (``x_mode="fp8_codes"``) at training sizes, far more tiles than SMs, fp32 output,
    against the float64 product of the same e4m3 codes. The operands are exact, so only the sums differ: Hopper's
    FP8 MMA keeps about 14 bits of its running sum (truncated), which bounds each element's error by
    ``2^-8 * sum_k |x_k w_k|`` at K <= 1024 (K / 32 additions of at most ``2^-13`` of that sum). A row or column
    stored to the wrong tile is off by about the value itself (~``sum |x w| / sqrt(K)``, far above the bound).
    Empty experts; unrouted tail rows zero."""
    g = torch.Generator().manual_seed(5)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    num_experts, rows = len(counts), int(offs[-1])
    x_codes = (torch.randn(rows + 37, k, generator=g) * 60).clamp(-448, 448).to(torch.float8_e4m3fn)
    w_codes = (torch.randn(num_experts, n, k, generator=g) * 60).clamp(-448, 448).to(torch.float8_e4m3fn)
    w_scale = torch.rand(num_experts, generator=g) * 1e-3
    x_amax = torch.rand(num_experts if per_expert else 1, generator=g) * 8 + 1
    got = launch_grouped_qmm(x_codes.cuda(), w_codes.cuda().transpose(1, 2), offs.cuda(), w_scale.cuda(), None,
                             x_amax.cuda(), "fp8", "fp8_codes", out_dtype=torch.float32).cpu()  # fmt: skip
    ref, magnitude = _codes_product(
        x_codes, w_codes, offs, x_amax.double().expand(num_experts) / 448 * w_scale.double()
    )
    err = (got.double() - ref).abs()
    assert (err <= 2.0**-8 * magnitude + 1e-30).all(), (err / magnitude.clamp(min=1e-30)).max().item()
    assert not got[rows:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k_first", [False, True], ids=["hf-n-k", "k-first"])
def test_qat_fp8_quantize_once_training_size(k_first, dtype):
    """QAT FP8 quantized once at training sizes (far more tiles than SMs; experts of 1 to 5000 rows, empty
    ones): activation codes pass, weight codes pass, codes GEMM, against the float64 product of formats' FP8
    codes of both operands. The codes are exact, so only the sums differ: within ``2^-8 * sum_k |x_k w_k|``
    (Hopper's FP8 MMA accumulation, see :func:`test_codes_gemm_training_size`), plus the bf16 output's rounding.
    HF's ``[E, N, K]`` weights and K-first (GPT-OSS) ones. Unrouted tail rows zero."""
    from moeq.runtime.kernels.fake_quant_act import act_codes_reference

    g = torch.Generator().manual_seed(9)
    counts, k, n = [3000, 0, 1, 5000, 777, 0, 2900, 4100], 768, 1024
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    num_experts, rows = len(counts), int(offs[-1])
    x = (torch.randn(rows + 37, k, generator=g) * 2).to(dtype)
    w_nk = (torch.randn(num_experts, n, k, generator=g) * torch.logspace(-3, 0, num_experts).view(-1, 1, 1)).to(dtype)
    amax, x_amax = expert_amax(w_nk) * 0.9, torch.tensor([6.0])
    fp8 = get_format("fp8")
    w_codes = fp8.quantize(w_nk, expand_per_expert(amax, 3), 2).data
    x_codes = act_codes_reference(x, offs, x_amax)
    w = w_nk.transpose(1, 2).contiguous() if k_first else w_nk.transpose(1, 2)
    got = launch_grouped_qmm(x.cuda(), w.cuda(), offs.cuda(), amax.cuda(), None, x_amax.cuda(), "fake_fp8", "fp8",
                             quantize_once=True).cpu()  # fmt: skip
    assert got.dtype == dtype
    scales = fp8.scale_from_amax(amax.float()).double() * fp8.scale_from_amax(x_amax.float()).double()
    ref, magnitude = _codes_product(x_codes, w_codes, offs, scales)
    bound = 2.0**-8 * magnitude + (2.0**-8 * ref.abs() if dtype == torch.bfloat16 else 0) + 1e-30
    err = (got.double() - ref).abs()
    assert (err <= bound).all(), (err / bound).max().item()
    assert not got[rows:].any()


@pytest.mark.parametrize("static", [False, True], ids=["tickets", "static"])
@pytest.mark.parametrize("channels", [False, True], ids=["per-expert", "channels"])
@pytest.mark.parametrize("k_first", [False, True], ids=["hf-n-k", "k-first"])
def test_weight_pass_in_gemm_cuda(k_first, channels, static, monkeypatch):
    """QAT FP8 at training sizes with the weight codes pass inside the codes GEMM's launch (persistent programs,
    GEMM tiles waiting on their expert's published codes): over five launches, every output equals the codes GEMM
    of the same tile on ``fake_quant_experts``' codes bit for bit (FP8 MMA sums depend on the K tile, so the
    comparison fixes it), and the codes it writes equal them (a tile that read codes before they were published
    would differ). Through the launcher (autotuned among configs of the same GEMM tile) too."""
    from moeq.runtime.kernels.fake_quant_act import fake_quant_act
    from moeq.runtime.kernels.weight_pass_gemm import codes_gemm_tile, weight_pass_gemm, weight_pass_gemm_configs

    g = torch.Generator().manual_seed(11)
    counts, k, n = [3000, 0, 1, 5000, 777, 0, 2900, 4100, 64, 2000], 768, 1024
    offs = torch.tensor(counts).cumsum(0).to(torch.int32).cuda()
    x = (torch.randn(int(offs[-1]) + 37, k, generator=g) * 2).to(torch.bfloat16).cuda()
    w_nk = (torch.randn(len(counts), n, k, generator=g) * torch.logspace(-3, 0, len(counts)).view(-1, 1, 1)).cuda()
    w = w_nk.to(torch.bfloat16).transpose(1, 2)
    w = w.contiguous() if k_first else w
    amax = w.float().abs().amax(1) if channels else w.float().abs().amax((1, 2)) * 0.9
    x_amax = torch.tensor([6.0], device="cuda")
    config = weight_pass_gemm_configs()[0]
    tile = codes_gemm_tile(config)
    config = triton.Config(dict(config.kwargs, STATIC_SCHEDULE=static), num_warps=config.num_warps,
                           num_stages=config.num_stages)  # fmt: skip
    x_codes = fake_quant_act(x, offs, x_amax, "fp8", codes=True)
    codes_ref = kernels.fake_quant_experts(w, amax, "fp8", 1, codes=True)
    scale = get_format("fp8").scale_from_amax(amax)
    before = launch_grouped_qmm(x_codes, codes_ref, offs, scale, None, x_amax, "fp8", "fp8_codes", config=tile)
    for _ in range(5):
        codes = torch.zeros_like(w, dtype=torch.float8_e4m3fn)
        out = torch.full_like(before, float("nan"))
        weight_pass_gemm(x_codes, w, offs, amax, scale, x_amax, out, codes, config=config)
        assert torch.equal(out, before)
        assert torch.equal(codes.view(torch.uint8), codes_ref.view(torch.uint8))
    from moeq.runtime.kernels import grouped_qmm as launcher

    monkeypatch.setattr(launcher, "WEIGHT_PASS_IN_GEMM", True)
    monkeypatch.setattr(launcher, "GLUON_QAT_FP8", False)
    got = launch_grouped_qmm(x, w, offs, amax, None, x_amax, "fake_fp8", "fp8", quantize_once=True)
    assert torch.equal(got, before)


@pytest.fixture
def gluon_qat_fp8(monkeypatch):
    """QAT FP8 from 48 to 320 rows per expert through the warp-specialized Gluon kernel (Hopper only; the default
    there, set here so that the test says what it runs)."""
    from moeq.runtime.kernels import grouped_qmm as launcher

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon QAT FP8 kernel needs sm_90")
    monkeypatch.setattr(launcher, "GLUON_QAT_FP8", True)


#: the QAT NVFP4 Gluon kernels' GPU cases: experts with 256 rows or fewer, with a tail (257-320), with a second group
#: (321+), empty ones; then K and N not multiples of the tiles
NVFP4_GLUON_SHAPES = pytest.mark.parametrize(
    ("counts", "k", "n"),
    [([300, 0, 1, 330, 64, 0, 257, 700, 17, 320, 321], 768, 1024), ([5, 400, 0], 2000, 200)],
    ids=["tails-and-second-groups", "k-and-n-not-tile-multiples"],
)


def _gluon_operands(counts: list[int], k: int, n: int, g: torch.Generator):
    """A Gluon kernel test's CPU operands: int32 cumulative ``offs`` of ``counts``, bf16 ``x`` with 37 unrouted rows
    past them, experts' ``w [E, N, K]`` spanning three decades, and amax 0.9 of each expert's max (the largest
    values saturate)."""
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    num_experts, rows = len(counts), int(offs[-1])
    x = (torch.randn(rows + 37, k, generator=g) * 2).to(torch.bfloat16)
    scale = torch.logspace(-3, 0, num_experts).view(-1, 1, 1)
    w_nk = (torch.randn(num_experts, n, k, generator=g) * scale).to(torch.bfloat16)
    return offs, x, w_nk, w_nk.float().abs().amax((1, 2)) * 0.9


@pytest.mark.parametrize("per_expert", [False, True], ids=["shared", "per-expert"])
@pytest.mark.parametrize(
    ("counts", "k", "n"),
    [
        ([300, 0, 1, 330, 64, 0, 257, 700, 17, 320, 321], 768, 1024),
        ([5, 400, 0], 2000, 200),
        ([(e * 37) % 300 for e in range(200)], 256, 192),
    ],
    ids=["tails-and-second-groups", "k-and-n-not-tile-multiples", "200-experts"],
)
@pytest.mark.usefixtures("gluon_qat_fp8")
def test_qat_fp8_gluon_gemm_cuda(counts, k, n, per_expert):
    """The Gluon QAT FP8 kernel: its weight codes (of experts with rows) equal formats' FP8 ``quantize`` (CPU) bit
    for bit; its output equals the two-launch path's (codes pass, then the codes GEMM) bit for bit, and the float64
    product of the same codes within the FP8 MMA's accumulation bound (see ``test_codes_gemm_training_size``).
    Experts with 256 rows or fewer, with a tail (257-320), with a second group (321+), empty ones; unrouted tail rows
    zero; K and N not multiples of the tiles; more experts than 128. Every configuration of ``CONFIGS`` (one program
    per tile and persistent) and ``tuned_config``'s choice. ``grouped_qmm`` with ``GLUON_QAT_FP8`` takes this kernel
    (its launch is in the profile, no weight codes pass)."""
    from torch.profiler import ProfilerActivity, profile

    from moeq.runtime.kernels.fake_quant_act import fake_quant_act
    from moeq.runtime.kernels.qat_gluon import CONFIGS, qat_fp8_gluon_gemm

    g = torch.Generator().manual_seed(7)
    offs, x, w_nk, amax = _gluon_operands(counts, k, n, g)
    num_experts, rows = len(counts), int(offs[-1])
    x_amax = torch.rand(num_experts if per_expert else 1, generator=g) * 4 + 4
    fp8 = get_format("fp8")
    codes_ref = fp8.quantize(w_nk, amax.view(-1, 1, 1)).data
    x_codes = fake_quant_act(x.cuda(), offs.cuda(), x_amax.cuda(), "fp8", codes=True)
    w = w_nk.cuda().transpose(1, 2)
    two_launches = launch_grouped_qmm(x_codes, codes_ref.cuda().transpose(1, 2), offs.cuda(),
                                      fp8.scale_from_amax(amax).cuda(), None, x_amax.cuda(), "fp8", "fp8_codes")  # fmt: skip
    routed = torch.tensor(counts) > 0  # the kernel converts the weights of experts with rows
    for config in (*CONFIGS, None):
        codes = torch.zeros(num_experts, n, k, dtype=torch.float8_e4m3fn, device="cuda")
        got = qat_fp8_gluon_gemm(x_codes, w, offs.cuda(), amax.cuda(), x_amax.cuda(), config=config, codes=codes)
        assert_same_bits(codes.cpu()[routed], codes_ref[routed])
        assert torch.equal(got, two_launches), config
    scales = fp8.scale_from_amax(x_amax).double().expand(num_experts) * fp8.scale_from_amax(amax).double()
    ref, magnitude = _codes_product(x_codes.cpu(), codes_ref, offs, scales)
    err = (got.cpu().double() - ref).abs()
    assert (err <= 2.0**-8 * magnitude + 2.0**-8 * ref.abs() + 1e-30).all()  # sums, then the bf16 rounding
    assert not got[rows:].any()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fused = launch_grouped_qmm(x.cuda(), w, offs.cuda(), amax.cuda(), None, x_amax.cuda(), "fake_fp8", "fp8",
                                   quantize_once=True)  # fmt: skip
        torch.cuda.synchronize()
    assert torch.equal(fused, two_launches)
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len([n for n in names if "qat_ws_kernel" in n]) == 1, names
    assert not [n for n in names if "fake_quant_experts" in n or "grouped_qmm" in n], names


@pytest.mark.parametrize("nvfp4", [False, True], ids=["fp8", "nvfp4"])
def test_qat_gluon_tail_boxes_equal_whole_tail_copies_cuda(nvfp4):
    """A group's tail rows copied in ``tail_box``-row TMA boxes, only as many as it has, give the bits of the whole
    64-row tail copy (the slots' other rows are stale; no store reads their products): tails of 1, 15, 16, 17, 44,
    63 and 64 rows, a second group, empty experts, unrouted rows, for every configuration with 0, 8, 16 and 32-row
    boxes."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernels need sm_90")
    from moeq.runtime.kernels.fake_quant_act import fake_quant_act
    from moeq.runtime.kernels.qat_gluon import CONFIGS, NVFP4_CONFIGS, qat_fp8_gluon_gemm, qat_nvfp4_gluon_gemm

    counts = [257, 0, 271, 272, 273, 300, 319, 320, 5, 321, 700, 256]
    offs, x, w_nk, amax = _gluon_operands(counts, 512, 384, torch.Generator().manual_seed(5))
    offs, w, amax, x_amax = offs.cuda(), w_nk.cuda().transpose(1, 2), amax.cuda(), torch.tensor([3.0]).cuda()
    if nvfp4:
        x_in = fake_quant_act(x.cuda(), offs, x_amax, "nvfp4")
        configs, gemm = NVFP4_CONFIGS, lambda c: qat_nvfp4_gluon_gemm(x_in, w, offs, amax, config=c)
    else:
        x_in = fake_quant_act(x.cuda(), offs, x_amax, "fp8", codes=True)
        configs, gemm = CONFIGS, lambda c: qat_fp8_gluon_gemm(x_in, w, offs, amax, x_amax, config=c)
    for config in configs:
        want = gemm(config._replace(tail_box=0))
        assert want[: int(offs[-1])].any() and not want[int(offs[-1]) :].any()
        for box in (8, 16, 32):
            assert torch.equal(gemm(config._replace(tail_box=box)), want), (config.name, box)


@NVFP4_GLUON_SHAPES
def test_qat_nvfp4_gluon_gemm_cuda(counts, k, n):
    """The Gluon kernel in QAT NVFP4 form: the weight values it makes in shared memory (of experts with rows) equal
    formats' NVFP4 ``fake_quant`` (CPU), blocks with a saturating value included: as values for the operand path
    of ``NVFP4_CONFIGS`` (a zero's sign is not kept) and bit for bit with the exact converter (``exact=1``); its
    output, from bf16 ``wgmma`` of those values and the fake-quantized activations, is within the fp32 accumulation
    bound of their float64 product, for every configuration and the tuned choice; unrouted rows are zero."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernel needs sm_90")
    from moeq.runtime.kernels.fake_quant_act import fake_quant_act
    from moeq.runtime.kernels.qat_gluon import NVFP4_CONFIGS, qat_nvfp4_gluon_gemm

    offs, x, w_nk, amax = _gluon_operands(counts, k, n, torch.Generator().manual_seed(11))
    num_experts, rows = len(counts), int(offs[-1])
    wq_ref = get_format("nvfp4").fake_quant(w_nk, amax.view(-1, 1, 1))
    x_fq = fake_quant_act(x.cuda(), offs.cuda(), torch.tensor([3.0], device="cuda"), "nvfp4")
    ref, magnitude = _codes_product(x_fq.cpu(), wq_ref, offs, torch.ones(num_experts, dtype=torch.float64))
    routed = torch.tensor(counts) > 0
    for config in (*NVFP4_CONFIGS, NVFP4_CONFIGS[0]._replace(exact=1), None):
        codes = torch.zeros(num_experts, n, k, dtype=torch.bfloat16, device="cuda")
        got = qat_nvfp4_gluon_gemm(x_fq, w_nk.cuda().transpose(1, 2), offs.cuda(), amax.cuda(), config=config,
                                   codes=codes)  # fmt: skip
        if config is not None and config.exact == 1:
            assert_same_bits(codes.cpu()[routed], wq_ref[routed])
        else:
            assert torch.equal(codes.cpu()[routed], wq_ref[routed]), config
        err = (got.cpu().double() - ref).abs()
        assert (err <= 2.0**-8 * magnitude + 2.0**-8 * ref.abs() + 1e-30).all(), config  # sums, then bf16
        assert not got[rows:].any(), config


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
@pytest.mark.parametrize(
    ("counts", "k", "n"),
    [
        ([256, 257, 272, 273, 288, 289, 319, 320, 321, 700, 0, 5, 100], 768, 1024),
        ([5, 400, 0, 270], 2000, 200),
    ],
    ids=["every-tail-width", "k-and-n-not-tile-multiples"],
)
def test_qat_gluon_swapped_cuda(fmt, counts, k, n):
    """``GluonConfig.swap`` (the product's transpose: the weight tile the A operand, the rows B, the tail's wgmma 16,
    32 or 64 rows wide): groups without tail rows, with tails of each width, experts past one group, empty ones, K
    and N not tile multiples; whole tails and 16-row tail boxes. The output is within the fp32 accumulation bound of
    the float64 product of the operands' values (NVFP4: the fake-quantized values; FP8: the codes times the scales),
    unrouted rows zero, and the weight values it makes equal formats'."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernel needs sm_90")
    from moeq.runtime.kernels.fake_quant_act import fake_quant_act
    from moeq.runtime.kernels.qat_gluon import CONFIGS, NVFP4_CONFIGS, qat_fp8_gluon_gemm, qat_nvfp4_gluon_gemm

    offs, x, w_nk, amax = _gluon_operands(counts, k, n, torch.Generator().manual_seed(13))
    num_experts, rows = len(counts), int(offs[-1])
    routed = torch.tensor(counts) > 0
    w, offs_cuda, amax_cuda = w_nk.cuda().transpose(1, 2), offs.cuda(), amax.cuda()
    if fmt == "nvfp4":
        wq_ref = get_format("nvfp4").fake_quant(w_nk, amax.view(-1, 1, 1))
        x_in = fake_quant_act(x.cuda(), offs_cuda, torch.tensor([3.0], device="cuda"), "nvfp4")
        ref, magnitude = _codes_product(x_in.cpu(), wq_ref, offs, torch.ones(num_experts, dtype=torch.float64))
        base, codes_type = NVFP4_CONFIGS[0], torch.bfloat16
    else:
        fp8 = get_format("fp8")
        wq_ref = fp8.quantize(w_nk, amax.view(-1, 1, 1)).data
        x_amax = torch.tensor([5.0])
        x_in = fake_quant_act(x.cuda(), offs_cuda, x_amax.cuda(), "fp8", codes=True)
        scales = fp8.scale_from_amax(x_amax).double() * fp8.scale_from_amax(amax).double()
        ref, magnitude = _codes_product(x_in.cpu(), wq_ref, offs, scales)
        base, codes_type = CONFIGS[4], torch.float8_e4m3fn
    for box in (0, 16):
        config = base._replace(swap=True, stacked=False, tail_box=box)
        codes = torch.zeros(num_experts, n, k, dtype=codes_type, device="cuda")
        if fmt == "nvfp4":  # the operand's values: a zero's sign is not kept
            got = qat_nvfp4_gluon_gemm(x_in, w, offs_cuda, amax_cuda, config=config, codes=codes)
            assert torch.equal(codes.cpu()[routed], wq_ref[routed]), config.name
        else:
            got = qat_fp8_gluon_gemm(x_in, w, offs_cuda, amax_cuda, x_amax.cuda(), config=config, codes=codes)
            assert_same_bits(codes.cpu()[routed], wq_ref[routed], config.name)
        err = (got.cpu().double() - ref).abs()
        bad = ~(err <= 2.0**-8 * magnitude + 2.0**-8 * ref.abs() + 1e-30)
        assert not bad.any(), (config.name, int(bad.sum()), bad.nonzero()[:5].tolist())
        assert not got[rows:].any(), config.name


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_qat_gluon_tuned_choice_keeps_the_bits_cuda(fmt):
    """``tuned_config`` picks among a family's configurations by timing, so the choice may differ from run to run:
    every configuration of ``NVFP4_CONFIGS`` / ``CONFIGS`` gives the same output bits (groups with tails of each
    width, an expert past one group, empty experts; K and N off the tiles), so a compiled model's output does not
    depend on which one won."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernel needs sm_90")
    from moeq.runtime.kernels.fake_quant_act import fake_quant_act
    from moeq.runtime.kernels.qat_gluon import CONFIGS, NVFP4_CONFIGS, qat_fp8_gluon_gemm, qat_nvfp4_gluon_gemm

    counts = [256, 257, 272, 289, 319, 320, 321, 700, 0, 5, 100]
    offs, x, w_nk, amax = _gluon_operands(counts, 1008, 1056, torch.Generator().manual_seed(17))
    w, offs, amax = w_nk.cuda().transpose(1, 2), offs.cuda(), amax.cuda()
    if fmt == "nvfp4":
        x_in = fake_quant_act(x.cuda(), offs, torch.tensor([3.0], device="cuda"), "nvfp4")
        outputs = {c.name: qat_nvfp4_gluon_gemm(x_in, w, offs, amax, config=c) for c in NVFP4_CONFIGS}
    else:
        x_amax = torch.tensor([5.0], device="cuda")
        x_in = fake_quant_act(x.cuda(), offs, x_amax, "fp8", codes=True)
        outputs = {c.name: qat_fp8_gluon_gemm(x_in, w, offs, amax, x_amax, config=c) for c in CONFIGS}
    (first, want), *others = outputs.items()
    assert want.any()
    for name, got in others:
        assert_same_bits(got, want, f"{name} against {first}")


@NVFP4_GLUON_SHAPES
def test_qat_nvfp4_register_operand_cuda(counts, k, n):
    """The experimental register-operand QAT NVFP4 kernel (``REGISTER_A_CONFIGS``): the weight values it makes in
    registers equal formats' NVFP4 ``fake_quant`` as values, and its output is within the fp32 accumulation bound of
    the float64 product, unrouted rows zero; the whole-16-blocks-a-lane form with the activations in ``wgmma_k_order``
    (written so by ``fake_quant_act``, or permuted by the launcher), which needs K a multiple of 64."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernel needs sm_90")
    from moeq.runtime.kernels.fake_quant_act import fake_quant_act
    from moeq.runtime.kernels.qat_gluon import REGISTER_A_CONFIGS, qat_nvfp4_gluon_gemm

    offs, x, w_nk, amax = _gluon_operands(counts, k, n, torch.Generator().manual_seed(11))
    num_experts, rows = len(counts), int(offs[-1])
    wq_ref = get_format("nvfp4").fake_quant(w_nk, amax.view(-1, 1, 1))
    x_amax = torch.tensor([3.0], device="cuda")
    x_fq = fake_quant_act(x.cuda(), offs.cuda(), x_amax, "nvfp4")
    ref, magnitude = _codes_product(x_fq.cpu(), wq_ref, offs, torch.ones(num_experts, dtype=torch.float64))
    routed = torch.tensor(counts) > 0
    for config in REGISTER_A_CONFIGS:
        if config.register_a == 2 and k % 64:
            continue
        for permuted_by_act_pass in (False, True)[: 1 + (config.register_a == 2)]:
            codes = torch.zeros(num_experts, n, k, dtype=torch.bfloat16, device="cuda")
            x_in = fake_quant_act(x.cuda(), offs.cuda(), x_amax, "nvfp4", in_wgmma_k_order=True) \
                if permuted_by_act_pass else x_fq  # fmt: skip
            got = qat_nvfp4_gluon_gemm(x_in, w_nk.cuda().transpose(1, 2), offs.cuda(), amax.cuda(), config=config,
                                       codes=codes, x_in_wgmma_k_order=permuted_by_act_pass)  # fmt: skip
            assert torch.equal(codes.cpu()[routed], wq_ref[routed]), config
            err = (got.cpu().double() - ref).abs()
            assert (err <= 2.0**-8 * magnitude + 2.0**-8 * ref.abs() + 1e-30).all(), config
            assert not got[rows:].any(), config


def test_qat_nvfp4_gluon_nan_and_inf_weights_cuda():
    """A NaN in a weight's 16-block makes that block NaN and +-inf saturates to the block's largest value, as formats'
    NVFP4 ``fake_quant`` does, in the Gluon kernels' weight values (the block amax and clip on bf16 pairs): the
    shipped configuration and the register-operand one; the outputs are NaN exactly where the float64 product is."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernel needs sm_90")
    from moeq.runtime.kernels.fake_quant_act import fake_quant_act
    from moeq.runtime.kernels.qat_gluon import NVFP4_CONFIGS, REGISTER_A_CONFIGS, qat_nvfp4_gluon_gemm

    counts = [200, 70, 0, 300]
    offs, x, w_nk, amax = _gluon_operands(counts, 256, 256, torch.Generator().manual_seed(17))
    w_nk[0, 5, 16:32] = torch.linspace(-1, 1, 16).bfloat16()
    w_nk[0, 5, 20] = float("nan")
    w_nk[1, 100, 40] = float("inf")
    w_nk[3, 7, 200] = -float("inf")
    wq_ref = get_format("nvfp4").fake_quant(w_nk, amax.view(-1, 1, 1))
    x_fq = fake_quant_act(x.cuda(), offs.cuda(), torch.tensor([3.0], device="cuda"), "nvfp4")
    ref, magnitude = _codes_product(x_fq.cpu(), wq_ref, offs, torch.ones(len(counts), dtype=torch.float64))
    routed = torch.tensor(counts) > 0
    assert wq_ref[0, 5, 16:32].isnan().all() and wq_ref[1, 100, 40].isfinite()
    for config in (NVFP4_CONFIGS[0], REGISTER_A_CONFIGS[0]):
        codes = torch.zeros(len(counts), 256, 256, dtype=torch.bfloat16, device="cuda")
        got = qat_nvfp4_gluon_gemm(x_fq, w_nk.cuda().transpose(1, 2), offs.cuda(), amax.cuda(), config=config,
                                   codes=codes).cpu().double()  # fmt: skip
        torch.testing.assert_close(codes.cpu()[routed], wq_ref[routed], rtol=0, atol=0, equal_nan=True)
        assert torch.equal(got.isnan(), ref.isnan()), config
        finite = ~ref.isnan()
        err = (got[finite] - ref[finite]).abs()
        assert (err <= 2.0**-8 * magnitude[finite] + 2.0**-8 * ref[finite].abs() + 1e-30).all(), config


def test_grouped_qmm_register_operand_switch_cuda(monkeypatch):
    """``GLUON_QAT_NVFP4_REGISTER_OPERAND`` on: ``grouped_qmm`` in QAT NVFP4 above the one-pass threshold runs the
    register-operand kernel (its activations written in ``wgmma_k_order``) and its product is within the fp32
    accumulation bound of the float64 product of formats' fake-quantized operands, as with the switch off."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernel needs sm_90")
    from moeq.runtime.kernels import grouped_qmm as launcher
    from moeq.runtime.kernels.fake_quant_act import fake_quant_act

    counts = [100, 0, 130, 64, 257, 90, 33, 120]
    offs, x, w_nk, amax = _gluon_operands(counts, 512, 384, torch.Generator().manual_seed(5))
    x_amax = torch.tensor([3.0], device="cuda")
    wq_ref = get_format("nvfp4").fake_quant(w_nk, amax.view(-1, 1, 1))
    x_fq = fake_quant_act(x.cuda(), offs.cuda(), x_amax, "nvfp4").cpu()
    ref, magnitude = _codes_product(x_fq, wq_ref, offs, torch.ones(len(counts), dtype=torch.float64))
    for switch in (False, True):
        monkeypatch.setattr(launcher, "GLUON_QAT_NVFP4_REGISTER_OPERAND", switch)
        got = launch_grouped_qmm(x.cuda(), w_nk.cuda().transpose(1, 2), offs.cuda(), amax.cuda(), None, x_amax,
                                 "fake_nvfp4", "nvfp4")  # fmt: skip
        err = (got.cpu().double() - ref).abs()
        assert (err <= 2.0**-8 * magnitude + 2.0**-8 * ref.abs() + 1e-30).all(), switch
        assert not got[int(offs[-1]) :].any(), switch


def test_grouped_qmm_qat_nvfp4_takes_quantized_rows_as_given_cuda():
    """QAT NVFP4 above the one-pass bound with ``x_mode`` None (rows already fake-quantized, as
    ``moeq.lowering.gather_quant`` leaves them before the routing gather): the same Gluon kernel on the same values
    as with ``x_mode`` "nvfp4" on the raw rows, so the same bits; its launch is in the profile and no activation
    pass runs."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernel needs sm_90")
    from torch.profiler import ProfilerActivity, profile

    from moeq.runtime.kernels.fake_quant_act import fake_quant_act

    counts = [100, 0, 130, 64, 257, 90, 33, 120]
    offs, x, w_nk, amax = _gluon_operands(counts, 512, 384, torch.Generator().manual_seed(6))
    x_amax = torch.tensor([3.0], device="cuda")
    offs, x, w, amax = offs.cuda(), x.cuda(), w_nk.cuda().transpose(1, 2), amax.cuda()
    raw = launch_grouped_qmm(x, w, offs, amax, None, x_amax, "fake_nvfp4", "nvfp4")
    x_fq = fake_quant_act(x, offs, x_amax, "nvfp4")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        given = launch_grouped_qmm(x_fq, w, offs, amax, None, None, "fake_nvfp4", None)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len([n for n in names if "qat_ws_kernel" in n]) == 1, names
    assert not any("fake_quant_act" in n for n in names), names
    assert torch.equal(given, raw)


def test_grouped_qmm_qat_nvfp4_takes_quantized_rows_at_decode_sizes_cuda():
    """QAT NVFP4 at or below 16 rows per expert with ``x_mode`` None: what a dynamic-batch graph runs at decode sizes
    since ``gather_quant`` moves the activations' fake quant before the gather for a dynamic token count. The op
    multiplies the rows as given (no activation pass in the profile), within the fp32 accumulation bound of the
    float64 product of formats' values; unrouted rows zero."""
    from torch.profiler import ProfilerActivity, profile

    from moeq.runtime.kernels.fake_quant_act import fake_quant_act

    counts = [3, 0, 5, 16, 1, 9, 2, 12]
    offs, x, w_nk, amax = _gluon_operands(counts, 512, 384, torch.Generator().manual_seed(8))
    x_amax = torch.tensor([3.0], device="cuda")
    x_fq = fake_quant_act(x.cuda(), offs.cuda(), x_amax, "nvfp4")
    wq = get_format("nvfp4").fake_quant(w_nk, amax.view(-1, 1, 1))
    ref, magnitude = _codes_product(x_fq.cpu(), wq, offs, torch.ones(len(counts), dtype=torch.float64))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        given = launch_grouped_qmm(x_fq, w_nk.cuda().transpose(1, 2), offs.cuda(), amax.cuda(), None, None,
                                   "fake_nvfp4", None)  # fmt: skip
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert not any("fake_quant_act" in n for n in names), names
    err = (given.cpu().double() - ref).abs()
    assert (err <= 2.0**-8 * magnitude + 2.0**-8 * ref.abs() + 1e-30).all()
    assert not given[int(offs[-1]) :].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_dequant_weight_cuda_bit_exact(fmt, dtype):
    """moeq::dequant_weight on CUDA (the Triton kernel) == the op's formats.py reference on the CPU, bit for bit:
    a random stored weight (K not a multiple of 128) and every e4m3 byte / E2M1 nibble with global scales down
    to fp32 subnormal products."""
    from moeq.formats import interleave_nvfp4_runs, stored_form

    g = torch.Generator().manual_seed(11)
    w = torch.randn(3, 96, 400, generator=g) * torch.logspace(-3, 1, 3).view(-1, 1, 1)
    amax = expert_amax(w) * 0.8
    stored = [stored_form(get_format(fmt).quantize(w, expand_per_expert(amax, 3), 2))]
    codes = torch.arange(256, dtype=torch.uint8)
    scale = torch.tensor([1.0, 3.7e-3, 1e-40, 1e30])
    if fmt == "fp8":
        stored.append((codes.repeat(4, 3, 1), scale, codes.new_zeros(0)))
    else:
        blocks = codes.view(16, 16).repeat(4, 16, 2)
        stored.append((interleave_nvfp4_runs(codes.repeat(4, 256, 1)).contiguous(), scale, blocks))
    for data, s, block in stored:
        want = ops._dequant_weight_reference(data, s, block, fmt, 1, dtype)
        got = torch.ops.moeq.dequant_weight(data.cuda(), s.cuda(), block.cuda(), fmt, 1, dtype).cpu()
        assert_same_bits(got, want, fmt)


@pytest.fixture
def fuse_always():
    """These tests check the fused kernel itself: every chain fused whatever the batch size."""
    with fusion("always"):
        yield


def _compiled_qwen(config, freeze, tokens, dtype=torch.bfloat16):
    """The tiny Qwen3-MoE (bf16 weights, in ``dtype``) prepared with ``config``, compiled, calibrated, finalized."""
    torch._dynamo.reset()
    model = moeq.prepare(tiny_model("qwen3_moe", torch.bfloat16).to(dtype).cuda(), getattr(moeq, config))
    cm = torch.compile(model, backend="moeq")
    with torch.no_grad():
        with moeq.calibrate(cm):
            cm(tokens)
        moeq.finalize(cm)
        if freeze:
            moeq.freeze(cm)
    return cm


@pytest.mark.parametrize(
    ("config", "freeze"),
    [("NVFP4", False), ("FP8", False), ("FP8", True), ("NVFP4_W4A16", True), ("FP8_W8A16", True), ("NVFP4", True)],
    ids=["qat-nvfp4", "qat-fp8", "deploy-w8a8", "deploy-w4a16", "deploy-w8a16", "deploy-w4a4"],
)
@pytest.mark.usefixtures("fuse_always")
def test_compiled_model_grouped_qmm_matches_cpu_reference(config, freeze):
    """Compiled tiny Qwen3-MoE on CUDA: the fused kernels vs the same graph with moeq::grouped_qmm (and every
    moeq op) computed by the CPU reference path; and Inductor's code calls moeq.grouped_qmm."""
    from torch._inductor.utils import run_and_get_code

    tokens = make_tokens(batch=4, seq=64).cuda()
    cm = _compiled_qwen(config, freeze, tokens)
    with torch.no_grad():
        fused, code = run_and_get_code(lambda: cm(tokens).logits.float())
        with ops.reference_kernels():
            reference = cm(tokens).logits.float()
    assert "\n".join(code).count("torch.ops.moeq.grouped_qmm.default(") == 4
    rel = ((fused - reference).norm() / reference.norm()).item()
    assert rel < 2e-2, rel


@pytest.mark.usefixtures("fuse_always")
def test_checkpointed_qat_step_equals_uncheckpointed_cuda():
    """Hugging Face gradient checkpointing under backend="moeq" on the GPU: moeq inlines each checkpointed layer with
    AOTAutograd's recompute tags, Inductor fuses the expert GEMMs (moeq::grouped_qmm) and recomputes them in the
    backward. The QAT NVFP4 step's loss equals the uncheckpointed model's bit for bit, its gradients agree to fp32
    rounding (recomputed ops may fuse into other Triton kernels than the forward's), and the forward saves less."""
    (plain_loss, plain_grads, plain_saved, _), (loss, grads, saved, report) = plain_and_checkpointed_qat_steps(
        "cuda", "moeq"
    )
    assert report.recomputed == [f"model.layers.0.mlp.experts.{p}" for p in ("down_proj", "gate_up_proj")]
    assert torch.equal(loss, plain_loss), (loss, plain_loss)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert saved < 0.75 * plain_saved, (saved, plain_saved)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_next", "glm4_moe", "granitemoe", "phimoe", "llama4", "jetmoe"])
@pytest.mark.usefixtures("fuse_always")
def test_more_families_compiled_cuda(family):
    """test_models.MORE_FAMILIES compiled with backend="moeq" on CUDA (bf16, NVFP4): every routed-expert weight is
    rewritten, the fused kernels match the same graphs computed by the CPU reference path, and Inductor's code
    calls moeq.grouped_qmm (llama4's bmm experts included: E equal row segments)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = moeq.prepare(tiny_model(family, torch.bfloat16).cuda(), moeq.NVFP4)
    expected = {n for n, p in model.named_parameters() if p.dim() == 3 and "conv" not in n}
    cm = torch.compile(model, backend="moeq")
    tokens = make_tokens(batch=4, seq=64).cuda()
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=32):
        with moeq.calibrate(cm):
            cm(tokens, use_cache=False)
        moeq.finalize(cm)
        fused, code = run_and_get_code(lambda: cm(tokens, use_cache=False).logits.float())
        with ops.reference_kernels():
            reference = cm(tokens, use_cache=False).logits.float()
    report = moeq.explain(cm)
    assert {r.fqn for r in report.rewritten} == expected and report.partly_rewritten == {}
    calls = "\n".join(code).count("torch.ops.moeq.grouped_qmm.default(")
    assert calls > 0
    rel = ((fused - reference).norm() / reference.norm()).item()
    assert rel < 2e-2, rel


@pytest.mark.slow  # minutes on the GPU machine: `benchmarks/gpu_suite.sh c` runs these
@pytest.mark.parametrize("freeze", [False, True])
def test_fp8_dynamic_compiled_cuda(freeze):
    """moeq.FP8_DYNAMIC (channel-wise weights, dynamic per-token activations) compiled with backend="moeq" on CUDA:
    finalized without calibration data, each expert GEMM a moeq::grouped_qmm with per-token activations, matching
    the same graphs computed by the CPU reference path, in QAT and after freeze."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = moeq.prepare(tiny_model("qwen3_moe", torch.bfloat16).cuda(), moeq.FP8_DYNAMIC)
    cm = torch.compile(model, backend="moeq")
    tokens = make_tokens(batch=4, seq=64).cuda()
    with torch.no_grad():
        cm(tokens)
        moeq.finalize(cm)
        if freeze:
            moeq.freeze(cm)
        out, code = run_and_get_code(lambda: cm(tokens).logits.float())
        with ops.reference_kernels():
            reference = cm(tokens).logits.float()
    calls = "\n".join(code)
    assert calls.count("torch.ops.moeq.grouped_qmm.default(") == 2 * 2 and "fake_quant_act_dynamic" not in calls
    rel = ((out - reference).norm() / reference.norm()).item()
    assert rel < 2e-2, rel


@pytest.mark.slow  # minutes on the GPU machine: `benchmarks/gpu_suite.sh c` runs these
def test_all_experts_calibration_cuda():
    """``calib="all_experts"`` under backend="moeq" on CUDA (Inductor, the Triton observer kernels): token counts
    equal the CPU run's of the same fp32 model and batch, input amaxes agree within fp32 GEMM rounding, and the
    finalized model runs."""
    config = moeq.FP8.replace(act_scale="per_expert", calib="all_experts")
    tokens = make_tokens(batch=4, seq=64)
    states = {}
    for device in ("cpu", "cuda"):
        torch._dynamo.reset()
        model = moeq.prepare(tiny_model("qwen3_moe", torch.float32, num_hidden_layers=1).to(device), config)
        cm = torch.compile(model, backend="moeq" if device == "cuda" else "moeq_aot_eager")
        with torch.no_grad():
            with moeq.calibrate(cm):
                cm(tokens.to(device))
            moeq.finalize(cm)
            assert torch.isfinite(cm(tokens.to(device)).logits).all()
        states[device] = {
            k: (s.tokens_per_expert.cpu(), s.input_amax.cpu()) for k, s in moeq.quant_state(model).items()
        }
    for fqn, (count, amax) in states["cpu"].items():
        assert torch.equal(states["cuda"][fqn][0], count), fqn
        assert count.min() > tokens.numel(), fqn  # every token, plus the routed ones
        torch.testing.assert_close(states["cuda"][fqn][1], amax, rtol=1e-5, atol=0)


def test_demo_runs_on_cuda(capsys):
    """`moeq demo --device cuda`: the quickstart in bf16 with moeq's CUDA kernels, its report saying so, and its
    quantization error within a factor of two of the same quickstart on the CPU (float32, the torch reference ops)."""
    from moeq.demo import run_quickstart

    torch._dynamo.reset()
    cpu = run_quickstart(batches=2, device="cpu")
    torch._dynamo.reset()
    capsys.readouterr()
    cuda = run_quickstart(batches=2, device="cuda")
    out = capsys.readouterr().out
    assert "4 expert GEMMs rewritten" in out and "on CUDA" in out
    assert 0.5 * cpu["relative_error"] < cuda["relative_error"] < 2 * cpu["relative_error"], (cpu, cuda)
    assert cuda["argmax_agreement"] > 0.75, cuda


@pytest.mark.parametrize(("config", "freeze"), [("NVFP4", False), ("FP8", True), ("NVFP4_W4A16", True)])
@pytest.mark.usefixtures("fuse_always")
def test_profiler_one_triton_kernel_per_expert_gemm(config, freeze):
    """The compiled forward launches exactly one Triton kernel per expert GEMM and no separate Q/DQ kernel."""
    from torch.profiler import ProfilerActivity, profile

    tokens = make_tokens(batch=4, seq=64).cuda()
    cm = _compiled_qwen(config, freeze, tokens)
    with torch.no_grad():
        for _ in range(2):  # compile and autotune outside the profile
            cm(tokens)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            cm(tokens)
            torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    qmm = [n for n in names if "grouped_qmm" in n]
    assert len(qmm) == 4, qmm  # 2 MoE layers x (gate_up, down)
    assert not [n for n in names if "fake_quant" in n or "dequant" in n or "GroupMM" in n or "grouped_mm" in n], names


def _kernels_of_a_forward_matching_the_reference(cm, tokens) -> list[str]:
    """The CUDA kernel names of one compiled forward (after a first, compiling one), having checked its logits
    against the same graph with every moeq op on the CPU reference path (relative error below 2e-2)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        got = cm(tokens).logits.float()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            cm(tokens)
            torch.cuda.synchronize()
        with ops.reference_kernels():
            reference = cm(tokens).logits.float()
    rel = ((got - reference).norm() / reference.norm()).item()
    assert rel < 2e-2, rel
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.slow  # minutes on the GPU machine: `benchmarks/gpu_suite.sh c` runs these
@pytest.mark.parametrize(
    ("config", "freeze", "seq", "weight_passes", "gluon"),
    [("FP8", False, 64, 4, False), ("FP8", True, 64, 0, False), ("FP8", False, 24, 0, False),
     ("FP8", False, 64, 0, True)],
    ids=["qat-fp8", "deploy-w8a8", "qat-fp8-24-rows", "qat-fp8-gluon"],
)  # fmt: skip
def test_compiled_model_quantize_once_matches_cpu_reference(config, freeze, seq, weight_passes, gluon, request,
                                                            monkeypatch):  # fmt: skip
    """Policy "auto" at 64 routed rows per expert (8 experts, top-2, 4 x ``seq`` tokens): each FP8 x FP8 GEMM
    quantizes once (an activation codes pass, a weight codes pass in QAT, then the codes GEMM); at 24 rows per
    expert QAT keeps the weight in the GEMM's load path (no weight codes pass); with ``GLUON_QAT_FP8`` the Gluon
    kernel converts the weight in shared memory (no weight codes pass; its launch is the GEMM). Matches the CPU
    reference path; the profile shows exactly those launches: no fake-quantized bf16 copies, one GEMM kernel per
    expert GEMM."""
    if gluon:
        request.getfixturevalue("gluon_qat_fp8")
    else:  # the two launches (the Gluon kernel is on by default on sm_90)
        from moeq.runtime.kernels import grouped_qmm as launcher

        monkeypatch.setattr(launcher, "GLUON_QAT_FP8", False)

    tokens = make_tokens(batch=4, seq=seq).cuda()
    cm = _compiled_qwen(config, freeze, tokens)
    names = _kernels_of_a_forward_matching_the_reference(cm, tokens)
    gemm = "qat_ws_kernel" if gluon else "grouped_qmm"
    assert len([n for n in names if gemm in n]) == 4, names
    # the activations' passes themselves: Inductor names the kernel producing an op's input after that op too
    # (the down projection's SiLU-and-mul kernel is "triton_poi_fused_fake_quant_act_mul_silu_...")
    assert len([n for n in names if n.startswith("_fake_quant_act_kernel")]) == 4, names
    assert len([n for n in names if "fake_quant_experts" in n]) == weight_passes, names
    assert not [n for n in names if "GroupMM" in n or "grouped_mm" in n or "dequant" in n], names


@pytest.mark.parametrize("gluon", [True, False], ids=["gluon", "weight-pass"])
def test_compiled_qat_nvfp4_once_matches_cpu_reference(gluon, monkeypatch):
    """Policy "auto", QAT NVFP4 at 64 routed rows per expert (above the in-load bound of 16): each GEMM fake-quantizes
    its activations once, then on sm_90 the Gluon kernel fake-quantizes the weight in shared memory and multiplies
    (one launch, no bf16 weight copy); with ``GLUON_QAT_NVFP4`` off, the weight's fake-quant pass and
    ``torch._grouped_mm``. Matches the CPU reference path; the profile shows those launches."""
    from moeq.runtime.kernels import grouped_qmm as launcher

    if gluon and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernel needs sm_90")
    monkeypatch.setattr(launcher, "GLUON_QAT_NVFP4", gluon)
    tokens = make_tokens(batch=4, seq=64).cuda()
    cm = _compiled_qwen("NVFP4", False, tokens)
    names = _kernels_of_a_forward_matching_the_reference(cm, tokens)
    # the activations' passes themselves: Inductor names the kernel producing an op's input after that op too
    # (the down projection's SiLU-and-mul kernel is "triton_poi_fused_fake_quant_act_mul_silu_...")
    assert len([n for n in names if n.startswith("_fake_quant_act_kernel")]) == 4, names
    assert len([n for n in names if "qat_ws_kernel" in n]) == (4 if gluon else 0), names
    assert len([n for n in names if "fake_quant_experts" in n]) == (0 if gluon else 4), names
    assert not [n for n in names if "grouped_qmm_kernel" in n], names


def _qat_fp8_training_step(policy: str, dtype: torch.dtype = torch.bfloat16):
    """One QAT FP8 training step of the compiled tiny Qwen3-MoE on CUDA: (loss, expert grads, CUDA kernel names)."""
    from torch.profiler import ProfilerActivity, profile

    from moeq.integrations.hf import expert_parameter_names

    tokens = make_tokens(batch=4, seq=64).cuda()
    with fusion(policy):
        cm = _compiled_qwen("FP8", False, tokens, dtype)
        cm.train()
        for _ in range(2):  # compile and autotune outside the profile
            cm.zero_grad(set_to_none=True)
            cm(tokens, labels=tokens).loss.backward()
        cm.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            loss = cm(tokens, labels=tokens).loss
            loss.backward()
            torch.cuda.synchronize()
    model = cm._orig_mod
    grads = {n: model.get_parameter(n).grad.float().cpu() for n in expert_parameter_names(model)}
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return loss.detach().float().cpu(), grads, names


@pytest.mark.slow  # minutes on the GPU machine: `benchmarks/gpu_suite.sh c` runs these
def test_qat_fp8_training_step_saves_codes_and_fuses_cuda():
    """A QAT FP8 training step on CUDA (moeq.lowering.joint): each expert weight is quantized to codes once
    (one ``fake_quant_experts`` codes launch), forward and dgrad run ``grouped_qmm`` on the codes, nothing
    dequantizes a weight to bf16; the loss matches the unfused path (fake-quant kernels + ``torch._grouped_mm``).

    Expert gradients are judged against the unfused path run in fp32 on the same (bf16-valued) weights: the fused
    bf16 step must be no farther from it than the unfused bf16 step is, give or take 1.5x + 1%. Comparing the two
    bf16 steps directly measures noise, not error: this model's expert gradients move by percents under last-bit
    changes of the forward (CPU, ``benchmarks/probe_gradient_sensitivity.py``: perturbing each MoE block's output
    by 2^-12 to 2^-8 of itself moved them 0.6-2.8%), and the GPU measured 2.2% and, with another tile schedule,
    6.1% between them (sessions 16-17). The CPU test carries the exactness (1%)."""
    loss, grads, names = _qat_fp8_training_step("auto")
    loss_ref, grads_ref, names_ref = _qat_fp8_training_step("never")
    _, grads_f32, _ = _qat_fp8_training_step("never", torch.float32)
    gemms = 4  # 2 MoE layers x (gate_up, down)
    assert len([n for n in names if "fake_quant_experts" in n]) == gemms, names
    assert len([n for n in names if "grouped_qmm" in n]) == 2 * gemms, names
    assert not [n for n in names if "dequant" in n], names
    assert not [n for n in names_ref if "grouped_qmm" in n], names_ref
    assert abs(loss.item() - loss_ref.item()) <= 1e-2 * abs(loss_ref.item())

    def rel(got, want):
        return ((got.double() - want.double()).norm() / want.double().norm()).item()

    errors = {n: (rel(grads[n], grads_f32[n]), rel(grads_ref[n], grads_f32[n])) for n in grads}
    for name, (fused_err, unfused_err) in errors.items():
        assert grads[name].abs().sum() > 0 and fused_err <= 1.5 * unfused_err + 1e-2, (name, errors)


@pytest.mark.slow  # minutes on the GPU machine: `benchmarks/gpu_suite.sh c` runs these
@pytest.mark.parametrize("dequantized", [False, True], ids=["codes", "dequantized"])
@pytest.mark.parametrize("config", ["FP8", "NVFP4"])
def test_reused_weight_codes_training_cuda(config, dequantized):
    """Two gradient-accumulation micro-batches inside ``moeq.reuse_weight_codes`` on CUDA: a profiled micro-batch
    launches no weight quantization (no ``fake_quant_experts``); FP8 runs ``grouped_qmm`` on the codes for forward
    and dgrad (no dequant), NVFP4 dequantizes the packed codes once per micro-batch; with ``dequantized=True`` the
    FP8 dgrad and every NVFP4 GEMM read the block's dequantized copy (no dequant launched at all). Loss and
    expert gradients agree with the same micro-batches without the block (same quantized weights; 5%: the bound
    this model's gradients need under last-bit forward changes, see the QAT FP8 training-step test)."""
    from torch.profiler import ProfilerActivity, profile

    from moeq.integrations.hf import expert_parameter_names

    tokens = make_tokens(batch=4, seq=64).cuda()
    cm = _compiled_qwen(config, False, tokens)
    model = cm._orig_mod
    cm.train()

    def accumulate(reuse: bool):
        cm.zero_grad(set_to_none=True)
        losses, names = [], []
        with moeq.reuse_weight_codes(cm, dequantized=dequantized) if reuse else contextlib.nullcontext():
            for i in range(3):  # the first compiles and autotunes; the last is profiled
                micro = tokens.roll(i, dims=1)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    loss = cm(micro, labels=micro).loss
                    loss.backward()
                    torch.cuda.synchronize()
                losses.append(loss.detach().float().cpu())
                names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        grads = {n: model.get_parameter(n).grad.float().cpu() for n in expert_parameter_names(model)}
        return torch.stack(losses), grads, names

    losses, grads, _ = accumulate(reuse=False)
    losses_b, grads_b, names = accumulate(reuse=True)
    gemms = 4  # 2 MoE layers x (gate_up, down)
    assert not [n for n in names if "fake_quant_experts" in n], names
    dequants = [n for n in names if "dequant" in n]
    qmm = [n for n in names if "grouped_qmm" in n]
    if config == "FP8":  # the forward's FP8 GEMM on the codes, and the dgrad's unless it reads the copy
        assert len(qmm) == (1 if dequantized else 2) * gemms and not dequants, names
    else:
        assert len(dequants) == (0 if dequantized else gemms) and not qmm, names
    torch.testing.assert_close(losses_b, losses, rtol=1e-2, atol=0)
    for name, grad in grads.items():
        err = ((grads_b[name].double() - grad.double()).norm() / grad.double().norm()).item()
        assert grad.abs().sum() > 0 and err < 5e-2, (name, err)


def _qwen_fp8_logits(tokens, cudagraphs: bool, scales: list[float]):
    """The tiny Qwen3-MoE, QAT FP8, compiled with or without CUDA graphs: its logits (no grad) inside one
    ``reuse_weight_codes`` block per entry of ``scales``, the expert weights multiplied by it before each block;
    then frozen, its deploy logits."""
    from moeq.integrations.hf import expert_parameter_names

    torch._dynamo.reset()
    model = moeq.prepare(tiny_model("qwen3_moe", torch.bfloat16).cuda(), moeq.FP8)
    cm = torch.compile(model, backend="moeq", options={"triton.cudagraphs": cudagraphs})
    outs = []
    with torch.no_grad():
        with moeq.calibrate(cm):
            cm(tokens, use_cache=False)
        moeq.finalize(cm)
        for scale in scales:
            for name in expert_parameter_names(model):
                model.get_parameter(name).mul_(scale)  # between blocks, as an optimizer step
            with moeq.reuse_weight_codes(cm):
                for _ in range(3):  # record, then replay
                    torch.compiler.cudagraph_mark_step_begin()
                    out = cm(tokens, use_cache=False).logits.float().clone()
            outs.append(out)
        moeq.freeze(cm)
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            out = cm(tokens, use_cache=False).logits.float().clone()
        outs.append(out)
    return outs


@pytest.mark.slow  # minutes on the GPU machine: `benchmarks/gpu_suite.sh c` runs these
def test_cuda_graph_replays_read_the_state_buffers_in_place_cuda():
    """moeq's state buffers are static graph inputs: CUDA-graph replays read them where they are. Replays inside a
    second ``reuse_weight_codes`` block (the codes refilled in place after the weights changed) and of the frozen
    model give the logits of the same model compiled without CUDA graphs, bit for bit; the two blocks differ
    (the replay read the new codes, not the first block's)."""
    tokens = make_tokens(batch=4, seq=64).cuda()
    graphed = _qwen_fp8_logits(tokens, True, [1.0, 0.5])
    plain = _qwen_fp8_logits(tokens, False, [1.0, 0.5])
    assert not torch.equal(graphed[0], graphed[1])
    for i, (got, want) in enumerate(zip(graphed, plain, strict=True)):
        assert torch.equal(got, want), i


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_fake_quant_every_bf16_value_cuda(fmt):
    """Every finite bf16 value, under per-expert amaxes from 1e-30 to 1e30 (the kernels' fast division and
    its exact fallback), fake-quantized on the GPU equals formats.py on the CPU bit for bit."""
    w, amax = every_bf16_block_weights()
    f = get_format(fmt)
    want = f.fake_quant(w, expand_per_expert(amax, 3), -1)
    got = kernels.fake_quant_experts(w.cuda(), amax.cuda(), fmt, -1).cpu()
    bad = (got.view(torch.int16) != want.view(torch.int16)).nonzero().tolist()
    examples = [(amax[e].item(), w[e, r, c].item(), got[e, r, c].item(), want[e, r, c].item()) for e, r, c in bad[:5]]
    assert not bad, f"{len(bad)} elements differ (amax, x, got, want): {examples}"


def test_nvfp4_operand_values_cuda():
    """numerics.fake_quant_nvfp4_operand on the GPU (the Gluon QAT NVFP4 converter's MMA operand, with the
    ``rcp.approx`` reciprocal): formats' NVFP4 values, signed zeros aside, on every bf16 value, blocks spanning the
    fp32 range, NaN and inf."""
    from tests.numerics_kernels import check_nvfp4_operand_values

    check_nvfp4_operand_values("cuda")


def test_reciprocal_is_div_rn_for_every_significand_cuda():
    """numerics.reciprocal (``rcp.approx`` and two Newton steps, no branch) equals ``div_rn(1, d)`` bit for bit for
    every fp32 significand at exponents across the NVFP4 fast range of block divisors (2^-49 to 2^49)."""
    from tests.numerics_kernels import reciprocal_and_div_rn

    significands = torch.arange(1 << 23, dtype=torch.int32, device="cuda")
    for exponent in (-49, -40, -9, -1, 0, 1, 8, 40, 48):
        d = ((exponent + 127) << 23 | significands).view(torch.float32)
        got, want = reciprocal_and_div_rn(d)
        differ = got.view(torch.int32) != want.view(torch.int32)
        assert not differ.any(), (exponent, d[differ][:5].tolist(), got[differ][:5].tolist())


def test_nvfp4_negative_values_far_below_their_block_cuda():
    """The GPU kernel keeps the spec's E2M1 sign on tiny quotients: -0 where the fp32 quotient by the block
    scale is a negative subnormal, +0 where it underflows to zero (blocks spanning the fp32 range)."""
    w = far_below_block_weights()
    amax = expert_amax(w)
    want = get_format("nvfp4").fake_quant(w, expand_per_expert(amax, 3), -1)
    got = kernels.fake_quant_experts(w.cuda(), amax.cuda(), "nvfp4", -1).cpu()
    assert_same_bits(got, want, "nvfp4")


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_fake_quant_nan_and_inf_cuda(fmt):
    """NaN and +-inf weights on the GPU as in formats.py on the CPU: NVFP4 blocks holding a NaN all NaN
    (the GPU's max skips NaN unless told not to), infinities saturated, zero amax giving zeros."""
    w, amax = nonfinite_weights(torch.bfloat16)
    want = get_format(fmt).fake_quant(w, expand_per_expert(amax, 3), -1)
    got = kernels.fake_quant_experts(w.cuda(), amax.cuda(), fmt, -1).cpu()
    assert_same_bits(got, want, fmt)


def test_fp8_codes_of_nan_and_inf_cuda():
    """FP8 codes of NaN and +-inf weights and activations on the GPU are formats.py's (compared as float8 values:
    a NaN code is NaN whatever its sign bit; the H200 writes 0x7F where formats, like torch's CPU cast, keeps the
    sign in 0xFF), and ``dequant_weight(quantize_weight(w))`` is ``fake_quant_weight(w)`` bit
    for bit there: a QAT FP8 training graph keeps a NaN weight NaN."""
    w, amax = nonfinite_weights(torch.bfloat16)
    want = get_format("fp8").quantize(w, expand_per_expert(amax, 3), 2).data
    got = kernels.fake_quant_experts(w.cuda(), amax.cuda(), "fp8", 2, codes=True).cpu()
    assert_same_bits(got, want, "weight codes")
    x = w.reshape(-1, 32)
    offs = torch.tensor([4, 8, 12], dtype=torch.int32)
    x_amax = torch.tensor([3.0])
    want_x = get_format("fp8").quantize(x, x_amax, -1).data
    got_x = kernels.fake_quant_act(x.cuda(), offs.cuda(), x_amax.cuda(), "fp8", codes=True).cpu()
    assert_same_bits(got_x, want_x, "activation codes")
    stored = torch.ops.moeq.quantize_weight(w.cuda(), amax.cuda(), "fp8", 0, 2)
    round_trip = torch.ops.moeq.dequant_weight(*stored, "fp8", 2, torch.bfloat16).cpu()
    assert_same_bits(round_trip, torch.ops.moeq.fake_quant_weight(w, amax, "fp8", 0, 2), "dequant(quantize)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_mask_clipped_grad_cuda(dtype):
    """The in-place STE mask on CUDA == torch's ``grad * (|w| <= amax)`` on the CPU, bit for bit, on a
    Qwen3-down-sized slice (contiguous and permuted gradient, and deciding from the weight's FP8 codes written
    by the GPU's quantize kernel: NaN and clipped weights among them)."""
    g, w, amax = gradients_with_clipped_weights((16, 768, 2048), dtype, 0)
    want = g * (w.abs() <= amax.view(-1, 1, 1))
    got = kernels.mask_clipped_grad_(g.cuda(), w.cuda(), amax.cuda())
    assert_same_bits(got.cpu(), want, "contiguous")
    permuted = g.transpose(1, 2).contiguous().cuda().transpose(1, 2)
    assert_same_bits(kernels.mask_clipped_grad_(permuted, w.cuda(), amax.cuda()).cpu(), want, "permuted")
    codes = kernels.fake_quant_experts(w.cuda(), amax.cuda(), "fp8", 2, codes=True)  # the GPU's own codes
    got = kernels.mask_clipped_grad_(g.cuda(), w.cuda(), amax.cuda(), codes)
    assert_same_bits(got.cpu(), want, "from codes")


def test_grouped_wgrad_ste_cuda():
    """``moeq::grouped_wgrad_ste`` on CUDA: the wgrad GEMM (``torch._grouped_mm``, an empty expert included)
    with the STE mask of a ``[E, N, K]`` weight applied to its ``[E, K, N]`` output, bit for bit the pointwise
    product torch computes from the same GEMM."""
    gen = torch.Generator().manual_seed(1)
    counts = torch.randint(1, 90, (8,), generator=gen)
    counts[5] = 0
    offs = counts.cumsum(0).to(torch.int32).cuda()
    rows = int(counts.sum())
    x = torch.randn(rows, 256, generator=gen).to(torch.bfloat16).cuda()
    dy = torch.randn(rows, 384, generator=gen).to(torch.bfloat16).cuda()
    _, w, amax = gradients_with_clipped_weights((8, 384, 256), torch.bfloat16, 1)
    w, amax = w.cuda(), amax.cuda()
    gemm = torch._grouped_mm(x.t(), dy, offs)  # [E, 256, 384]
    want = (gemm.permute(0, 2, 1).cpu() * (w.abs() <= amax.view(-1, 1, 1)).cpu()).permute(0, 2, 1)
    got = torch.ops.moeq.grouped_wgrad_ste(x.t(), dy, offs, w, amax.view(-1, 1, 1), [0, 2, 1])
    assert_same_bits(got.cpu(), want.contiguous(), "wgrad")
    assert not got[5].any() and (got.permute(0, 2, 1).cpu()[~(w.abs() <= amax.view(-1, 1, 1)).cpu()] == 0).all()


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in storage one element past a 16-byte boundary (Triton specializes on the alignment)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:]
    flat.copy_(t.reshape(-1))
    return flat.view(t.shape)


def test_cached_launches_equal_plain_launches_cuda(monkeypatch):
    """Every runtime kernel gives the same bits through a launch plan (:func:`moeq.runtime.kernels.launch.
    launch_kernel`'s repeat path) as through a plain ``kernel[grid]`` launch: autotuned kernels (the quant
    kernels), fixed-tile GEMMs (QAT FP8 in the load path and quantized once, QAT NVFP4, bf16), in-place kernels,
    with 16-byte aligned and misaligned operands (a separate plan each)."""
    from moeq.formats import stored_form
    from moeq.runtime.kernels import launch

    gen = torch.Generator().manual_seed(5)
    counts = torch.randint(0, 40, (8,), generator=gen)
    counts[2] = 0
    offs = counts.cumsum(0).to(torch.int32).cuda()
    rows = int(counts.sum()) + 3
    x = torch.randn(rows, 256, generator=gen).to(torch.bfloat16).cuda()
    w = (torch.randn(8, 384, 256, generator=gen) * 0.05).to(torch.bfloat16).cuda()  # [E, N, K]
    amax, x_amax = expert_amax(w) * 0.9, x.abs().amax().float().reshape(1) * 0.8
    _, w_clip, a_clip = gradients_with_clipped_weights((8, 384, 256), torch.bfloat16, 2)
    grad = torch.randn(8, 384, 256, generator=gen).to(torch.bfloat16).cuda()
    data, scale, block = stored_form(get_format("nvfp4").quantize(w.float().cpu(), expand_per_expert(amax.cpu(), 3), 2))
    stored = (data.cuda(), scale.cuda(), block.cuda())
    xs = {"aligned": x, "misaligned": _misaligned(x)}

    def gemm(xx, w_mode, x_fmt, quantize_once=None):  # one fixed tile: compiling every autotuning tile is slow
        tile = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "SWAP_AB": False}, num_warps=4)
        args = (amax, None, x_amax) if w_mode != "plain" else (None, None, None)
        return launch_grouped_qmm(
            xx, w.transpose(1, 2), offs, *args, w_mode, x_fmt, config=tile, quantize_once=quantize_once
        )

    def runs(xx):
        running = (torch.zeros(8, device="cuda"), torch.zeros(8, dtype=torch.int64, device="cuda"))
        kernels.segment_amax_(xx, offs, *running)
        return {
            "fake_quant_act": kernels.fake_quant_act(xx, offs, x_amax, "nvfp4"),
            "act codes": kernels.fake_quant_act(xx, offs, x_amax, "fp8", codes=True),
            "fake_quant_experts": kernels.fake_quant_experts(w, amax, "fp8", 2),
            "weight_amax": kernels.expert_weight_amax(w, 2, with_blocks=True)[1],
            "mask_clipped_grad_": kernels.mask_clipped_grad_(grad.clone(), w_clip.cuda(), a_clip.cuda()),
            "dequant": torch.ops.moeq.dequant_weight(*stored, "nvfp4", 1, torch.bfloat16),
            "segment_amax_": running[0],
            "qat fp8 in-load": gemm(xx, "fake_fp8", "fp8", quantize_once=False),
            "qat fp8 quantize once": gemm(xx, "fake_fp8", "fp8", quantize_once=True),
            "qat nvfp4": gemm(xx, "fake_nvfp4", "nvfp4"),
            "bf16": gemm(xx, "plain", None),
        }

    for layout, xx in xs.items():
        monkeypatch.setattr(launch, "FAST_LAUNCH", False)
        plain = runs(xx)
        monkeypatch.setattr(launch, "FAST_LAUNCH", True)
        launch._plans.clear()
        runs(xx)  # plain launches that leave their plans
        built = sum(p is not None for p in launch._plans.values())
        planned = launch.launch_counts["planned"]
        cached = runs(xx)
        assert built >= 12 and len(launch._plans) == built, (layout, built, len(launch._plans))
        assert launch.launch_counts["planned"] - planned >= 12, (layout, launch.launch_counts)
        for name, want in plain.items():
            assert_same_bits(cached[name].cpu(), want.cpu(), f"{layout} {name}")


def test_compiled_per_expert_loop_matches_grouped_module_cuda():
    """A per-expert loop (``cat`` of ``F.linear`` over ``x.split(sizes)``, bf16 on CUDA) compiled with
    ``backend="moeq"`` becomes one ``torch._grouped_mm`` with offsets on the GPU and quantizes (FP8) exactly like
    the grouped module with the same weights: same statistics, same output bits."""
    from tests.test_canonicalize import FQN, GroupedEquivalent, Model, SplitLinearCat, _input

    outs, states, reports = [], [], []
    for experts in (SplitLinearCat(), GroupedEquivalent()):
        torch._dynamo.reset()
        model = moeq.prepare(Model(experts).cuda(), moeq.FP8)
        compiled = torch.compile(model, backend="moeq", fullgraph=True)
        x = _input(SplitLinearCat).cuda()
        with torch.no_grad(), moeq.calibrate(model):
            compiled(x)
        moeq.finalize(model)
        with torch.no_grad():
            outs.append(compiled(x).cpu())
        states.append(moeq.quant_state(model)[FQN])
        reports.append(str(moeq.explain(model)))
    assert torch.equal(states[0].observed_input_amax.cpu(), states[1].observed_input_amax.cpu())
    assert_same_bits(outs[0], outs[1], "loop vs grouped")
    assert "per-expert loop as grouped_mm" in reports[0]


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_compiled_module_list_experts_cuda(fmt):
    """Experts as a module list of ``nn.Linear`` (fp32, on CUDA) compiled with ``backend="moeq"`` (Inductor, moeq's
    Triton quantizer kernels): each expert's output equals the float64 product of ``formats``' fake quant of its rows
    (one shared input amax over the list, observed by the test) and of its own weight (its own ``max|W|``)."""
    from tests.test_find import ListedExperts, Model, routed_args

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = moeq.prepare(Model(ListedExperts()).cuda(), moeq.FP8 if fmt == "fp8" else moeq.NVFP4)
    x, _ = routed_args(torch.float32)
    compiled = torch.compile(model, backend="moeq", fullgraph=True)
    with torch.no_grad(), moeq.calibrate(model):
        compiled(x.cuda())
    moeq.finalize(model)
    with torch.no_grad():
        got = compiled(x.cuda()).cpu()
    q = get_format(fmt)
    shared = x.abs().max().reshape(1, 1)
    want = []
    for e, rows in enumerate(x.split([2, 4, 5, 5])):
        w = model.mlp.experts.experts[e].weight.detach().cpu()
        wq = q.fake_quant(w, w.abs().max().reshape(1, 1), 1)
        want.append(q.fake_quant(rows, shared, 1).double() @ wq.double().T)
    torch.testing.assert_close(got.double(), torch.cat(want), rtol=1e-5, atol=1e-6)
    assert "per-expert module list" in str(moeq.explain(model))


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_megatron_sequential_mlp_qat_training_step_cuda(fmt, tmp_path):
    """QAT of a megatron-core ``SequentialMLP`` on CUDA with ``backend="moeq"`` (Inductor, moeq's Triton quantizer
    kernels) and grad enabled: megatron's linear Functions are inlined, every expert GEMM is quantized, and one
    training step's output and gradients (input, routing probabilities, every expert weight) equal the eager STE
    reference computed from ``formats`` on the same device."""
    pytest.importorskip("megatron.core.transformer.moe.experts")
    import torch.distributed as dist

    from tests.test_megatron_experts import assert_step_matches_reference, qat_step

    torch._dynamo.reset()
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        run = qat_step(dist.group.WORLD, moeq.FP8 if fmt == "fp8" else moeq.NVFP4, fmt, "moeq", "cuda")
    finally:
        if created:
            dist.destroy_process_group()
    assert_step_matches_reference(run, atol=1e-5)


@pytest.mark.slow  # minutes on the GPU machine: `benchmarks/gpu_suite.sh c` runs these
def test_training_step_with_permutation_gathers_cuda(monkeypatch):
    """The joint-graph rewrite of the MoE's permutation scatter-adds on the GPU (bounds lowered so that the top-k
    gather's gradient runs as the combine kernel, and the combine's gradients as its backward kernel): same loss,
    parameter gradients within 1% of the step without it (the combine sums each token's rows in fp32, the scatter
    adds them with bf16 atomics in any order)."""
    from tests.test_permutation import finalized_for_training, training_step

    monkeypatch.setattr(inductor_module, "COMBINE_MIN_TOP_K", 1)
    monkeypatch.setattr(inductor_module, "COMBINE_MIN_ROWS", 0)
    cm = finalized_for_training("cuda")
    loss, grads, counts = training_step(cm, True)
    ref_loss, ref_grads, _ = training_step(cm, False)
    assert counts == {"gathers": [3], "combine_backward": [0, 1]} and torch.equal(loss, ref_loss)
    for name, grad in grads.items():
        ref = ref_grads[name].float()
        assert (grad.float() - ref).norm() <= 1e-2 * ref.norm() + 1e-6, name


@pytest.mark.parametrize(("counts", "tail"), [([3000, 0, 1096], 0), ([3000, 0, 1000], 96), ([0, 0], 70)])
def test_zero_unrouted_rows_cuda(counts, tail):
    """The tail-zeroing kernel on the GPU: rows at or past ``offs[-1]`` of a NaN-filled buffer become zero, routed
    rows keep their bits, and it is one small kernel (no ``where`` over the whole output)."""
    from torch.profiler import ProfilerActivity, profile

    from moeq.runtime.kernels.zero_rows import zero_unrouted_rows_

    offs = torch.tensor(counts).cumsum(0).to(torch.int32).cuda()
    routed = int(offs[-1])
    out = torch.randn(routed + tail, 2048, device="cuda").bfloat16()
    out[routed:] = float("nan")
    want = out.clone()
    want[routed:] = 0
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        got = zero_unrouted_rows_(out, offs)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert got is out and torch.equal(out.view(torch.int16), want.view(torch.int16))
    assert names == ["_zero_unrouted_rows_kernel"], names


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_deploy_16bit_activations_dequantize_first_at_large_batches(fmt):
    """Above ``DEQUANT_FIRST_ROWS_PER_EXPERT`` mean rows per expert, deploy W4A16 / W8A16 with the size left to
    moeq runs the weight's dequant kernel, then ``torch._grouped_mm`` (faster there): the same bits as that pair,
    within 1e-2 of the one-kernel path (``quantize_once=False``) and of the float64 product, rows past
    ``offs[-1]`` zero, and no grouped_qmm kernel in the profile. Just below the bound the fused kernel runs."""
    from torch.profiler import ProfilerActivity, profile

    from moeq.lowering.grouped_qmm import quantized_operands
    from moeq.runtime.kernels.grouped_qmm import DEQUANT_FIRST_ROWS_PER_EXPERT

    g = torch.Generator().manual_seed(5)
    num_experts, k, n = 4, 256, 128
    w_nk = (torch.randn(num_experts, n, k, generator=g) * 0.05).bfloat16()
    q = get_format(fmt).quantize(w_nk, expand_per_expert(expert_amax(w_nk), 3), 2)
    data, scale, block = (t.cuda() if t is not None else None for t in stored_weight_args(q))
    bound = DEQUANT_FIRST_ROWS_PER_EXPERT[fmt] * num_experts
    # x's row count decides (routed or not): 8 rows past offs[-1], just above / below the bound
    for rows, dequant_first in ((bound + 64 * num_experts, True), (bound - 16, False)):
        x = torch.randn(rows + 8, k, generator=g).bfloat16().cuda()
        offs = torch.tensor([rows // 4, rows // 2, rows // 2 + rows // 8, rows], dtype=torch.int32).cuda()

        def op(quantize_once=None, x=x, offs=offs):
            return torch.ops.moeq.grouped_qmm(x, data, offs, scale, block, None, "deploy", fmt, None, quantize_once)

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            got = op()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        fused = op(quantize_once=False)
        _, wq = quantized_operands(x, data, offs, scale, block, None, "deploy", fmt, None)
        want64 = per_expert_matmul_f64(x.cpu(), deployed_weight_operand(q, torch.bfloat16).transpose(1, 2), offs.cpu())
        assert not got[rows:].any()
        assert ((got.cpu().double() - want64).norm() / want64.norm()).item() < 1e-2
        assert ((got - fused).float().norm() / fused.float().norm()).item() < 1e-2
        if dequant_first:
            assert torch.equal(got[:rows], torch._grouped_mm(x, wq, offs)[:rows])
            assert not [s for s in names if "grouped_qmm" in s] and [s for s in names if "dequant" in s], names
        else:
            assert torch.equal(got, fused)
            assert [s for s in names if "grouped_qmm" in s], names


@pytest.mark.parametrize(
    ("tokens", "top_k", "hidden", "w_dtype", "out_dtype"),
    [
        (4352, 8, 2048, torch.bfloat16, None),  # Qwen3-30B-A3B at 34k routed rows
        (1000, 2, 4096, torch.float32, torch.bfloat16),  # Mixtral: fp32 routing weights, cast back
        (3, 8, 200, torch.bfloat16, None),
    ],
)
def test_combine_experts_cuda(tokens, top_k, hidden, w_dtype, out_dtype):
    """moeq::combine_experts on CUDA against the float64 combine (products in the model's dtype) and the model's
    eager expression on the GPU."""
    from tests.conftest import assert_combine_close, combine_expression, routed_rows

    y, weights, inv_perm = routed_rows(tokens, top_k, hidden, 128, torch.bfloat16, 0, w_dtype=w_dtype)
    y, weights, inv_perm = y.cuda(), weights.cuda(), inv_perm.cuda()
    got = torch.ops.moeq.combine_experts(y, weights, inv_perm, top_k, out_dtype)
    assert got.dtype == (out_dtype or torch.promote_types(y.dtype, w_dtype))
    assert_combine_close(got, y, weights, inv_perm, top_k)
    want = combine_expression(y, weights, inv_perm, top_k).to(got.dtype)
    torch.testing.assert_close(got, want, rtol=torch.finfo(got.dtype).eps, atol=1e-6 * float(want.abs().max()))


def test_combine_experts_with_a_mask_cuda():
    """The combine reading an STE mask (bool) in its pass on CUDA: the values of ``y * mask`` combined, a masked
    inf or NaN NaN as torch gives it."""
    from tests.conftest import combine_expression, routed_rows

    y, _, inv_perm = routed_rows(4352, 8, 2048, 128, torch.bfloat16, 2)
    y, inv_perm = y.cuda(), inv_perm.cuda()
    mask = torch.rand(y.shape, device="cuda") < 0.7
    y[0, 0], y[1, 1], mask[0, 0], mask[1, 1] = float("inf"), float("nan"), False, False
    got = torch.ops.moeq.combine_experts(y, None, inv_perm, 8, None, mask)
    want = torch.ops.moeq.combine_experts(y * mask, None, inv_perm, 8)
    assert torch.equal(got.isnan(), want.isnan()) and int(got.isnan().sum()) == 2
    finite = ~want.isnan()
    assert torch.equal(got[finite], want[finite])
    model = combine_expression(y * mask, None, inv_perm, 8)
    torch.testing.assert_close(got[finite], model[finite], rtol=torch.finfo(y.dtype).eps, atol=1e-3)


@pytest.mark.parametrize(("tokens", "top_k", "hidden", "w_dtype"), [(4352, 8, 2048, torch.bfloat16),
                                                                    (300, 2, 4096, torch.float32), (7, 3, 100, None)])  # fmt: skip
def test_combine_experts_backward_cuda(tokens, top_k, hidden, w_dtype):
    """moeq::combine_experts_backward on CUDA: ``dy`` bit for bit autograd's, ``dw`` within one rounding of the
    float64 row sums; one kernel launch; and within one bf16 step of Inductor's compiled expression."""
    from torch.profiler import ProfilerActivity, profile

    from tests.conftest import assert_combine_backward_close, combine_backward_inputs

    cpu = combine_backward_inputs(tokens, top_k, hidden, torch.bfloat16, 0, w_dtype)
    grad, y, weights, perm = (t.cuda() for t in cpu)
    op = torch.ops.moeq.combine_experts_backward
    op(grad, y, weights, perm, top_k)  # autotune outside the profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dy, dw = op(grad, y, weights, perm, top_k)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert kernels == ["_combine_experts_backward_kernel"], kernels
    assert_combine_backward_close(dy, dw, grad, y, weights, perm, top_k)

    def inductor_pair(grad, y, weights, perm):
        rows = grad.unsqueeze(1).expand(-1, top_k, -1).reshape(-1, grad.shape[1])[perm]
        return rows * weights.unsqueeze(-1), (rows * y).sum(1)

    want_dy, want_dw = torch.compile(inductor_pair, backend="inductor")(grad, y, weights, perm)
    assert torch.equal(dy, want_dy)
    torch.testing.assert_close(dw, want_dw, rtol=2 * torch.finfo(dw.dtype).eps, atol=1e-6 * float(want_dw.abs().max()))


@pytest.mark.parametrize("freeze", [False, True], ids=["qat", "deploy"])
def test_compiled_model_runs_the_combine_kernel_cuda(freeze, monkeypatch):
    """backend="moeq" on CUDA: each MoE layer's combine is one ``_combine_experts_kernel`` launch; the logits equal
    the run with Inductor's combine to within one bf16 step (NVFP4 weight-only: no activation code of the second
    layer can flip with the first layer's rounding). The tiny model routes top-2 over 512 rows, below
    ``COMBINE_MIN_TOP_K`` and ``COMBINE_MIN_ROWS``: the bounds are lowered so that the rewrite runs."""
    from torch.profiler import ProfilerActivity, profile

    from moeq.lowering import inductor
    from moeq.lowering.inductor import combine_fusion

    monkeypatch.setattr(inductor, "COMBINE_MIN_TOP_K", 1)
    monkeypatch.setattr(inductor, "COMBINE_MIN_ROWS", 0)

    tokens = make_tokens(batch=4, seq=64).cuda()
    logits = {}
    for combine in (True, False):
        with combine_fusion(combine):
            cm = _compiled_qwen("NVFP4_W4A16", freeze, tokens)
            with torch.no_grad():
                for _ in range(2):
                    cm(tokens)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    logits[combine] = cm(tokens).logits.float()
                    torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        combines = [n for n in names if "_combine_experts_kernel" in n]
        assert len(combines) == (2 if combine else 0), names  # the tiny Qwen3-MoE has 2 MoE layers
    rel = ((logits[True] - logits[False]).norm() / logits[False].norm()).item()
    assert rel < 2.0**-7, rel


# -- moeq.FP8_DYNAMIC: channel-wise weight scales, dynamic per-token activation scales (session 29) ---------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fp8_dynamic_kernels_bit_exact_cuda(dtype):
    """The per-token activation kernel and the channel-wise weight kernels (fake quant, codes into a K-last buffer,
    dequant of stored codes) on CUDA == the CPU spec, bit for bit; a NaN row stays NaN, a zero row zero."""
    from moeq.formats import channel_amax, expand_weight_amax

    g = torch.Generator().manual_seed(7)
    counts = torch.randint(0, 300, (16,), generator=g)
    counts[2] = 0
    offs = counts.cumsum(0).to(torch.int32)
    x = (torch.randn(int(offs[-1]) + 9, 2048, generator=g) * torch.rand(int(offs[-1]) + 9, 1, generator=g) * 9).to(
        dtype
    )
    x[0], x[1, 5] = 0.0, float("nan")
    expected = ops._fake_quant_act_dynamic_reference(x, offs, "fp8", 0, -1)
    assert_same_bits(kernels.fake_quant_tokens(x.cuda(), offs.cuda()).cpu(), expected, "fp8 tokens")
    w = (torch.randn(16, 1536, 2048, generator=g) * 0.02).to(dtype)
    amax = channel_amax(w, 0, 2) * 0.9
    fmt = get_format("fp8")
    got = kernels.fake_quant_experts(w.cuda(), amax.cuda(), "fp8", 2).cpu()
    assert_same_bits(got, fmt.fake_quant(w, expand_weight_amax(amax, 3, 0, 2), 2), "fp8 channels")
    data, scale, block = torch.ops.moeq.quantize_weight(w.cuda(), amax.cuda(), "fp8", 0, 2)
    ref_data, ref_scale, _ = ops._quantize_weight_reference(w, amax, "fp8", 0, 2)
    assert torch.equal(data.cpu(), ref_data) and torch.equal(scale.cpu(), ref_scale)
    deq = torch.ops.moeq.dequant_weight(data, scale, block, "fp8", 2, dtype).cpu()
    assert torch.equal(deq, fmt.fake_quant(w, expand_weight_amax(amax, 3, 0, 2), 2))


@pytest.mark.parametrize("quantize_once", [None, False, True])
@pytest.mark.parametrize("mode", ["qat", "deploy"])
@pytest.mark.parametrize(("counts", "k", "n"), [([5, 0, 19, 1] * 4, 256, 128), ([300, 0, 2900, 41] * 8, 2048, 1536)])
def test_fp8_dynamic_grouped_qmm_cuda(mode, counts, k, n, quantize_once):
    """grouped_qmm with channel-wise weight scales and per-token activations on CUDA (FP8 wgmma; in-load, quantized
    once, and by size) against formats.py operands and a float64 matmul; unrouted tail rows zero."""
    from moeq.formats import channel_amax, stored_form

    g = torch.Generator().manual_seed(3)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = (torch.randn(int(offs[-1]) + 7, k, generator=g) * 2).to(torch.bfloat16)
    w_nk = (torch.randn(len(counts), n, k, generator=g) * 0.05).to(torch.bfloat16)
    amax = channel_amax(w_nk, 0, 2) * 0.9
    fmt = get_format("fp8")
    wq = fmt.fake_quant(w_nk, amax.unsqueeze(2), 2).transpose(1, 2)
    xq = ops._fake_quant_act_dynamic_reference(x, offs, "fp8", 0, -1)
    if mode == "qat":
        args = (w_nk.transpose(1, 2).cuda(), amax.cuda(), "fake_fp8")
    else:
        data, scale, _ = stored_form(fmt.quantize(w_nk, amax.unsqueeze(2), 2))
        args = (data.transpose(1, 2).cuda(), scale.cuda(), "fp8")
    got = launch_grouped_qmm(x.cuda(), args[0], offs.cuda(), args[1], None, None, args[2], "fp8_token",
                             quantize_once=quantize_once).cpu()  # fmt: skip
    ref = per_expert_matmul_f64(xq, wq, offs)
    rel = ((got.double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel
    assert not got[int(offs[-1]) :].any()


def test_nvfp4_weight_codes_global_scale_of_extreme_amaxes_cuda():
    """The NVFP4 codes kernel's stored global scale (since session 44, one program an expert) is formats'
    ``amax / 2688`` bit for bit for zero, subnormal-quotient, huge, infinite and NaN amaxes, and each expert's codes
    and block scales (NaN's included) are formats' stored form."""
    from moeq.formats import stored_form

    w = torch.randn(5, 40, 64, generator=torch.Generator().manual_seed(6))
    amax = torch.tensor([0.0, 1e-40, 3.0e38, float("inf"), float("nan")])
    got = kernels.nvfp4_weight_codes(w.cuda(), amax.cuda(), 2)
    want = stored_form(get_format("nvfp4").quantize(w, expand_per_expert(amax, 3), 2))
    torch.testing.assert_close(got[1].cpu(), want[1].reshape(-1), rtol=0, atol=0, equal_nan=True)
    for name, a, b in zip(("data", "block_scale"), got[::2], want[::2]):
        assert_same_bits(a.cpu(), b, name)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_expert", "channel"])
def test_fp8_scale_out_keeps_extreme_amaxes_cuda(per_channel):
    """The FP8 codes kernel's ``scale_out`` on the GPU (``quantize_weight``'s scale since session 43) is formats'
    ``amax / 448`` bit for bit: zero, an amax whose quotient is subnormal, huge, infinite and NaN amaxes."""
    w = torch.randn(4, 32, 48)
    extremes = torch.tensor([0.0, 1e-40, 3.0e38, float("inf")])
    amax = torch.stack([extremes, extremes.roll(1)], dim=1).repeat(1, 16) if per_channel else extremes
    if per_channel:
        amax[0, 3] = float("nan")
    scale_out = torch.zeros_like(amax).cuda()
    kernels.fake_quant_experts(w.cuda(), amax.cuda(), "fp8", 2, codes=True, scale_out=scale_out)
    want = get_format("fp8").scale_from_amax(amax)
    torch.testing.assert_close(scale_out.cpu(), want, rtol=0, atol=0, equal_nan=True)  # a NaN's payload may differ
