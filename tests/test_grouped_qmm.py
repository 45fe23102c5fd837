"""moeq::grouped_qmm on CPU: the op against an independent float64 reference, its STE autograd against
autograd of the unfused reference, freeze(), and the Inductor pass that puts the op into compiled graphs."""

from __future__ import annotations

import operator
import re

import pytest
import torch
import triton
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import run_and_get_code

import moeq
from moeq.formats import deinterleave_nvfp4_runs, expand_per_expert, expert_amax, get_format
from moeq.integrations.hf import expert_parameter_names, tiny_model
from moeq.lowering.inductor import (
    FUSE_MAX_ROWS_PER_EXPERT,
    GroupedQmmPass,
    _ComposedPass,
    combine_fusion,
    fusion,
    fusion_policy,
    with_grouped_qmm_pass,
)
from moeq.lowering.ops import _fake_quant_act_reference
from tests.conftest import (
    assert_same_bits,
    compiled_and_finalized,
    make_tokens,
    per_expert_matmul_f64,
    stored_weight_args,
)

COUNTS = [7, 0, 30, 1]


def _problem(dtype, seed=0, k=64, n=24, tail=3):
    g = torch.Generator().manual_seed(seed)
    offs = torch.tensor(COUNTS).cumsum(0).to(torch.int32)
    x = (torch.randn(int(offs[-1]) + tail, k, generator=g) * 2).to(dtype)
    w_nk = (torch.randn(len(COUNTS), n, k, generator=g) * 0.1).to(dtype)
    return x, w_nk, offs


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("w_fmt", "x_fmt"), [("fp8", "fp8"), ("nvfp4", "nvfp4"), ("nvfp4", None), ("fp8", None)])
@pytest.mark.parametrize("mode", ["qat", "deploy"])
def test_op_matches_float64_reference(mode, w_fmt, x_fmt, dtype):
    x, w_nk, offs = _problem(dtype)
    fmt = get_format(w_fmt)
    amax = expert_amax(w_nk) * 0.9
    x_amax = torch.tensor([3.0]) if x_fmt else None
    xq = _fake_quant_act_reference(x, offs, x_amax, x_fmt, 0, -1) if x_fmt else x
    if mode == "qat":
        w = w_nk.transpose(1, 2)
        wq = fmt.fake_quant(w, expand_per_expert(amax, 3), 1)
        got = torch.ops.moeq.grouped_qmm(x, w, offs, amax, None, x_amax, "qat", w_fmt, x_fmt)
    else:
        q = fmt.quantize(w_nk, expand_per_expert(amax, 3), 2)
        wq = fmt.dequantize(q, dtype).transpose(1, 2)
        data, scale, block = stored_weight_args(q)
        got = torch.ops.moeq.grouped_qmm(x, data, offs, scale, block, x_amax, "deploy", w_fmt, x_fmt)
    assert got.dtype == dtype and got.shape == (x.shape[0], w_nk.shape[1])
    assert _rel(got, per_expert_matmul_f64(xq, wq, offs)) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert not got[int(offs[-1]) :].any()


@pytest.mark.parametrize(("w_fmt", "x_fmt"), [("fp8", "fp8"), ("nvfp4", "nvfp4"), ("nvfp4", None)])
def test_ste_autograd_matches_reference_autograd(w_fmt, x_fmt):
    """dgrad / wgrad of the fused op == autograd through the unfused moeq ops + a float64 matmul."""
    x, w_nk, offs = _problem(torch.float32, seed=1)
    x.requires_grad_()
    w = w_nk.transpose(1, 2).detach().requires_grad_()
    amax = expert_amax(w) * 0.7  # some weights clipped: the STE mask matters
    x_amax = torch.tensor([2.0]) if x_fmt else None
    out = torch.ops.moeq.grouped_qmm(x, w, offs, amax, None, x_amax, "qat", w_fmt, x_fmt)
    grad = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), grad)
    xq = torch.ops.moeq.fake_quant_act(x, offs, x_amax, x_fmt, 0, -1) if x_fmt else x
    wq = torch.ops.moeq.fake_quant_weight(w, amax, w_fmt, 0, 1)
    ref = per_expert_matmul_f64(xq, wq, offs)
    rx, rw = torch.autograd.grad(ref, (x, w), grad.double())
    assert _rel(out, ref) < 1e-5 and _rel(gx, rx) < 1e-5 and _rel(gw, rw) < 1e-5
    assert (gw == 0).any() and (gx == 0).any()


def test_op_rejects_bad_input():
    x, w_nk, offs = _problem(torch.bfloat16)
    w, amax = w_nk.transpose(1, 2), expert_amax(w_nk)
    with pytest.raises(ValueError, match="mode"):
        torch.ops.moeq.grouped_qmm(x, w, offs, amax, None, None, "train", "fp8", None)
    with pytest.raises(ValueError, match="int32"):
        torch.ops.moeq.grouped_qmm(x, w, offs.long(), amax, None, None, "qat", "fp8", None)


def _finalized(cfg, dtype=torch.bfloat16, freeze=False, tokens=None, family="qwen3_moe", **overrides):
    """A tiny ``family`` model, one decoder layer unless ``overrides`` say otherwise, prepared with ``cfg``, compiled
    by ``backend="moeq"``, calibrated on ``tokens``, finalized (and frozen): the compiled model."""
    model = moeq.prepare(tiny_model(family, dtype, **{"num_hidden_layers": 1, **overrides}), cfg)
    cm = compiled_and_finalized(model, make_tokens() if tokens is None else tokens)
    if freeze:
        moeq.freeze(cm)
    return cm


def _run(cm, policy="always", tokens=None):
    """``(logits, Inductor's code)`` of ``cm`` compiled afresh under fusion ``policy`` (``run_and_get_code`` resets
    Dynamo): one calibration serves every policy a test compares (one calibration compile, a
    whole flow's worth of Dynamo tracing, less), and the paths compared read the same statistics."""
    # the combine's own fusion (tests/test_combine.py) rounds as eager torch does, not as Inductor: off here, so
    # that fused and unfused GEMMs are compared bit for bit
    with torch.no_grad(), fusion(policy), combine_fusion(False):
        logits, code = run_and_get_code(lambda: cm(make_tokens() if tokens is None else tokens).logits)
    return logits, "\n".join(code)


def _compiled(cfg, fuse=True, policy=None, tokens=None, **kw):
    """``(model, logits, Inductor's code)``: :func:`_finalized` run once under ``policy``."""
    cm = _finalized(cfg, tokens=tokens, **kw)
    return (cm._orig_mod, *_run(cm, policy or ("always" if fuse else "never"), tokens))


@pytest.mark.full_inductor
@pytest.mark.parametrize(
    ("config", "freeze"),
    [("NVFP4", False), ("FP8", True), ("NVFP4_W4A16", True)],
    ids=["qat-nvfp4", "deploy-w8a8", "deploy-w4a16"],
)
def test_compiled_model_calls_grouped_qmm(config, freeze):
    """backend="moeq" after finalize: Inductor's code calls moeq.grouped_qmm for every expert GEMM (no
    separate Q/DQ op left) and the logits equal the unfused path's. Deploy NVFP4 to within rounding: the fused
    op multiplies exact ``e2m1 * block scale`` operands and applies the global scale to the fp32 product,
    where the unfused path rounds each dequantized weight to bf16 before ``_grouped_mm``."""
    cm = _finalized(getattr(moeq, config), freeze=freeze, num_hidden_layers=2)
    (fused, code), (reference, ref_code) = _run(cm, "always"), _run(cm, "never")
    assert code.count("torch.ops.moeq.grouped_qmm.default(") == 4  # 2 MoE layers x (gate_up, down)
    assert "fake_quant_weight" not in code and "fake_quant_act" not in code and "dequant_weight" not in code
    assert "grouped_qmm" not in ref_code
    if config == "NVFP4_W4A16":
        assert 0 < _rel(fused, reference) < 1e-2
    else:
        assert torch.equal(fused, reference)


@pytest.mark.parametrize(
    ("config", "freeze"),
    [("NVFP4", False), ("FP8", False), ("FP8", True), ("NVFP4_W4A16", True)],
    ids=["qat-nvfp4", "qat-fp8", "deploy-w8a8", "deploy-w4a16"],
)
def test_batched_experts_call_grouped_qmm(config, freeze):
    """Llama 4's experts are a ``bmm`` over ``[E, tokens, K]``: the pass runs it as ``moeq.grouped_qmm`` on the
    rows as E equal segments (activation and weight Q/DQ inside), and the logits match the unfused bmm path's
    within bf16 rounding (the fused op rounds each expert's fp32 product once, like the bmm)."""
    cm = _finalized(getattr(moeq, config), freeze=freeze, family="llama4")
    (fused, code), (reference, ref_code) = _run(cm, "always"), _run(cm, "never")
    assert code.count("torch.ops.moeq.grouped_qmm.default(") == 2  # gate_up and down
    assert "fake_quant_weight" not in code and "fake_quant_act" not in code and "dequant_weight" not in code
    assert "grouped_qmm" not in ref_code and "bmm" in ref_code
    assert _rel(fused, reference) < 1e-2


def test_batched_experts_fuse_with_a_dynamic_token_count():
    """Compiled with dynamic shapes, Llama 4's token count is symbolic: the bmm still becomes ``moeq.grouped_qmm``
    (its offsets built in the graph from the symbolic size) and matches the unfused path."""
    model = moeq.prepare(tiny_model("llama4", torch.bfloat16, num_hidden_layers=1), moeq.FP8)
    # calibrated with static shapes (a third of the dynamic calibration graph's compile; calibrating Llama 4 under a
    # dynamic token count: test_models.py's two batch shapes), then compiled with dynamic shapes under each policy
    compiled_and_finalized(model, make_tokens(seed=1))
    cm = torch.compile(model, backend="moeq", dynamic=True)
    outs, codes = [], []
    for policy in ("always", "never"):  # one calibration; run_and_get_code recompiles under each policy
        with torch.no_grad(), fusion(policy):
            logits, code = run_and_get_code(lambda: cm(make_tokens(seed=3, seq=20)).logits)
            with torch._dynamo.config.patch(error_on_recompile=True):  # one graph serves every token count
                assert cm(make_tokens(seed=2, seq=12)).logits.shape[1] == 12
        outs.append(logits)
        codes.append("\n".join(code))
    calls = [line for line in codes[0].splitlines() if "torch.ops.moeq.grouped_qmm.default(" in line]
    assert len(calls) == 2, calls
    assert re.search(r"\(8\*s\d+\*s\d+, 32\)", codes[0]), "the rows should be the symbolic 8 * batch * seq"
    assert _rel(outs[0], outs[1]) < 1e-2


def test_freeze_stores_quantized_weights():
    model, qat, _ = _compiled(moeq.NVFP4)
    names = expert_parameter_names(model)
    weights = {n: model.get_parameter(n).detach().clone() for n in names}
    state = moeq.freeze(model)
    assert state.mode == "deploy"
    assert not set(expert_parameter_names(model)) & set(names)
    for fqn, s in moeq.quant_state(model).items():
        w = weights[fqn]
        runs = -(-w.shape[2] // 128) * 64  # whole 64-byte runs of packed pairs
        assert s.frozen_data.dtype == torch.uint8 and s.frozen_data.shape == (*w.shape[:2], runs)
        plain = get_format("nvfp4").quantize(w, expand_per_expert(s.weight_amax, 3), 2).data
        assert torch.equal(deinterleave_nvfp4_runs(s.frozen_data, w.shape[2]), plain)
        assert s.frozen_block_scale.shape == (*w.shape[:2], w.shape[2] // 16)
        deq = torch.ops.moeq.dequant_weight(s.frozen_data, s.frozen_scale, s.frozen_block_scale, "nvfp4", 2, w.dtype)
        assert torch.equal(deq, torch.ops.moeq.fake_quant_weight(w, s.weight_amax, "nvfp4", 0, 2))
    with pytest.raises(RuntimeError, match="frozen"):
        moeq.finalize(model)


def test_freeze_before_finalize_is_an_error():
    model = moeq.prepare(tiny_model("qwen3_moe", torch.bfloat16), moeq.FP8)
    with pytest.raises(RuntimeError, match="finalized"):
        moeq.freeze(model)


class _Counting(CustomGraphPass):
    calls = 0

    def __call__(self, graph):
        _Counting.calls += 1

    def uuid(self):
        return "counting"


def test_pass_composes_with_installed_pass():
    """A pass already in post_grad_custom_post_pass keeps running next to moeq's; never installed twice."""
    existing = _Counting()
    composed = with_grouped_qmm_pass(existing)
    assert isinstance(composed, _ComposedPass) and composed.passes[0] is existing
    assert with_grouped_qmm_pass(composed).passes == composed.passes
    assert isinstance(with_grouped_qmm_pass(None), GroupedQmmPass)
    assert len(with_grouped_qmm_pass([existing, existing]).passes) == 3
    assert composed.uuid() == ("counting", GroupedQmmPass().uuid())

    from torch._inductor import config

    _Counting.calls = 0
    # no FX graph cache: a cache hit would skip the passes
    with config.patch(post_grad_custom_post_pass=existing, fx_graph_cache=False):
        _, _, code = _compiled(moeq.FP8)
    assert config.post_grad_custom_post_pass is None
    assert _Counting.calls > 0 and "moeq.grouped_qmm" in code


def test_fingerprint_follows_every_setting_the_lowering_reads(monkeypatch):
    """The passes' ``uuid`` (Inductor's cache key for their effect) changes with each setting read while a graph is
    compiled: the policy, a fusion bound, the launcher's kernel switches and the reference ops."""
    from moeq.lowering import ops
    from moeq.lowering.inductor import compile_fingerprint
    from moeq.lowering.joint import TrainingGraphPass
    from moeq.runtime.kernels import grouped_qmm as launcher

    base = compile_fingerprint()
    assert GroupedQmmPass().uuid() == TrainingGraphPass().uuid() == base
    with fusion("always"):
        assert compile_fingerprint() != base
    with ops.reference_kernels():
        assert compile_fingerprint() != base
    for module, name, value in [
        (launcher, "GLUON_QAT_NVFP4", not launcher.GLUON_QAT_NVFP4),
        (launcher, "QUANTIZE_ONCE_ROWS_PER_EXPERT", launcher.QUANTIZE_ONCE_ROWS_PER_EXPERT + 1),
        (launcher, "DEQUANT_FIRST_ROWS_PER_EXPERT", {"nvfp4": 1, "fp8": 1}),
    ]:
        with monkeypatch.context() as m:
            m.setattr(module, name, value)
            assert compile_fingerprint() != base, name
    monkeypatch.setitem(FUSE_MAX_ROWS_PER_EXPERT, "qat", 10**6)
    assert compile_fingerprint() != base


def test_cached_graph_never_outlives_a_changed_bound(monkeypatch):
    """Inductor's FX graph and AOTAutograd caches stay on: a model compiled again after a fusion bound changed gets
    the code of the new bound, not the cached graph of the old one (session 48: a GPU test got the weight-pass code
    cached by its sibling with the Gluon kernel switched off)."""
    config = tiny_model("qwen3_moe").config
    seq = FUSE_MAX_ROWS_PER_EXPERT["qat"] * config.num_experts // config.num_experts_per_tok
    tokens = make_tokens(batch=2, seq=seq)  # twice the bound: test_auto_policy_fuses_where_it_pays's unfused case
    cm = _finalized(moeq.NVFP4, tokens=tokens)
    unfused, code = _run(cm, "auto", tokens)
    assert "torch.ops.moeq.grouped_qmm.default(" not in code
    monkeypatch.setitem(FUSE_MAX_ROWS_PER_EXPERT, "qat", 10**6)
    fused, code = _run(cm, "auto", tokens)
    assert code.count("torch.ops.moeq.grouped_qmm.default(") == 2
    assert torch.equal(fused, unfused)


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines launch the kernel for real (tests/test_gpu.py)")
@pytest.mark.parametrize(
    ("w_mode", "x_mode", "granular"),
    [
        ("fake_nvfp4", "nvfp4", False),
        ("fake_fp8", "fp8", False),
        ("fp8", "fp8", False),
        ("fp8", None, False),
        ("nvfp4", None, False),
        ("fake_fp8", "fp8", True),
        ("fp8", "fp8_codes", True),
    ],
    ids=lambda v: {True: "channels-tokens", False: "tensor"}.get(v, str(v)),
)
@pytest.mark.parametrize("swap", [False, True], ids=["tile", "swap-ab"])
def test_kernel_compiles_for_sm90(w_mode, x_mode, granular, swap):
    """Frontend + codegen for Hopper without a GPU (catches what only shows when compiling, e.g. non-constexpr
    globals); FP8 x FP8 (W8A8 and QAT FP8) must use FP8 wgmma, FP8 rounding the hardware's RNE conversion;
    the swap-AB decode tile (16 rows) must still run on wgmma. The 64-row tile compiles with a 16-row (swap-AB)
    short-tail MMA beside it (``TAIL_M``). ``granular``: FP8_DYNAMIC's channel-wise weight scales and per-row
    activation amaxes (still FP8 wgmma)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from moeq.runtime.kernels.grouped_qmm import W_MODES, X_MODES, _grouped_qmm_kernel

    fn = _grouped_qmm_kernel.fn
    w_ptr = {"fp8": "*fp8e4nv", "nvfp4": "*i32"}.get(w_mode, "*bf16")
    x_ptr = "*fp8e4nv" if x_mode == "fp8_codes" else "*bf16"
    pointers = dict(x_ptr=x_ptr, w_ptr=w_ptr, out_ptr="*bf16", offs_ptr="*i32")
    pointers.update(w_scale_ptr="*fp32", w_block_ptr="*i32", x_amax_ptr="*fp32")
    constexprs = dict(
        E_POW2=128, W_MODE=W_MODES[w_mode], X_MODE=X_MODES[x_mode], X_AMAX=2 if granular else 0,
        W_PER_CHANNEL=granular, FP8_DOT=w_mode in ("fp8", "fake_fp8") and x_mode in ("fp8", "fp8_codes"),
        DOT_IEEE=False, INTERPRET=False,
        BLOCK_M=16 if swap else 64, BLOCK_N=64 if swap else 128, BLOCK_K=128 if swap or w_mode == "nvfp4" else 64,
        SWAP_AB=swap, TAIL_M=0 if swap else 16,
    )  # fmt: skip
    signature = {name: pointers.get(name, "constexpr" if name in constexprs else "i32") for name in fn.arg_names}
    try:
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    except TypeError:
        pytest.skip("this Triton's ASTSource takes another signature")
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 128), options=dict(num_warps=4, num_stages=3))
    ptx = compiled.asm["ptx"]
    assert "wgmma.mma_async" in ptx
    if constexprs["FP8_DOT"]:
        assert ".e4m3.e4m3" in ptx
    if "fp8" in (w_mode, x_mode) and w_mode != "fp8":
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx
    if w_mode == "nvfp4":  # E2M1 bits straight into bf16 pairs, block scale by a bf16x2 FMA
        assert "fma.rn.bf16x2" in ptx
        # block scales come as 32-bit words: byte loads cost a memory request per byte and are not pipelined
        assert not re.search(r"ld\.global[.\w]*\.[bu]8 ", ptx)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(x=torch.zeros(5, 16, dtype=torch.float8_e4m3fn)), r"x codes \[M, K\] and w \[E, K, N\]"),
        (dict(x=torch.zeros(5, 32)), "x_codes must be e4m3 codes"),
        (dict(codes=torch.zeros(2, 32, 24, dtype=torch.bfloat16)), r"codes must be float8_e4m3fn \(2, 32, 24\)"),
        (dict(out=torch.zeros(5, 23)), r"out must be \[5, 24\]"),
        (dict(offs=torch.tensor([3, 5])), "offs must be int32"),
    ],
    ids=["k-mismatch", "x-not-codes", "codes-dtype", "out-shape", "offs-dtype"],
)
def test_weight_pass_gemm_rejects_bad_operands(change, message):
    """The one-launch kernel's launcher names the operand that does not fit before anything is launched."""
    from moeq.runtime.kernels.weight_pass_gemm import weight_pass_gemm

    args = dict(x=torch.zeros(5, 32, dtype=torch.float8_e4m3fn), w=torch.zeros(2, 32, 24), offs=torch.tensor(
        [3, 5], dtype=torch.int32), out=torch.zeros(5, 24), codes=torch.zeros(2, 32, 24, dtype=torch.float8_e4m3fn))  # fmt: skip
    args.update(change)
    amax = torch.ones(2)
    with pytest.raises(ValueError, match=message):
        weight_pass_gemm(args["x"], args["w"], args["offs"], amax, amax, torch.ones(1), args["out"], args["codes"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines launch the kernel for real (tests/test_gpu.py)")
@pytest.mark.parametrize("channels", [False, True], ids=["per-expert", "channels-tokens"])
def test_weight_pass_gemm_compiles_for_sm90(channels):
    """The one-launch weight pass + codes GEMM (``weight_pass_gemm``) compiles for Hopper with its GEMM tiles on FP8
    wgmma and their K loop pipelined (``cp.async`` stages, as the one-tile kernel's) inside the ticket loop, the
    conversion on the hardware's RNE e4m3 conversion, and the publish / wait pair as a GPU-scope release increment
    and acquire loads. Unit strides and 16-byte alignment specialized as Triton does for the launch."""
    from triton.backends.compiler import GPUTarget

    from moeq.runtime.kernels.weight_pass_gemm import _weight_pass_gemm_kernel, weight_pass_gemm_configs

    fn = _weight_pass_gemm_kernel.fn
    pointers = dict(x_ptr="*fp8e4nv", w_ptr="*bf16", codes_ptr="*fp8e4nv", codes_bits_ptr="*fp8e4nv", out_ptr="*bf16")
    pointers.update(offs_ptr="*i32", w_amax_ptr="*fp32", w_scale_ptr="*fp32", x_amax_ptr="*fp32", sync_ptr="*i32")
    config = weight_pass_gemm_configs()[0]
    constexprs = dict(config.kwargs, S_POW2=256, X_AMAX=2 if channels else 0, W_PER_CHANNEL=channels,
                      DOT_IEEE=False, INTERPRET=False, stride_xk=1, stride_ck=1, stride_wk=1, stride_on=1)  # fmt: skip
    signature = {name: pointers.get(name, "constexpr" if name in constexprs else "i32") for name in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
               if signature[name] != "constexpr" and name not in ("M", "NUM_EXPERTS", "M_BUCKET")}  # fmt: skip
    try:
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned)
    except TypeError:
        pytest.skip("this Triton's ASTSource takes another signature")
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    assert "wgmma.mma_async" in ptx and ".e4m3.e4m3" in ptx
    assert "cp.async" in ptx
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx
    assert re.search(r"(atom|red)\.global\.gpu\.release\.add", ptx)
    assert re.search(r"(atom|ld)\.global\.gpu\.acquire\.", ptx)  # an atomic add of 0 compiles to an acquire load


def test_block_scale_words_views_or_pads():
    """The NVFP4 block scales reach the kernel as int32 words of four K-contiguous scales: freeze's
    ``[E, N, K/16]`` storage as it is when K/16 is a multiple of 4, else a copy with each row zero-padded; the
    bytes are the scales, in K order, whatever the strides of the ``[E, K/16, N]`` argument."""
    from moeq.runtime.kernels.grouped_qmm import block_scale_words

    for blocks in (16, 17, 3):
        stored = torch.randint(0, 127, (2, 24, blocks), dtype=torch.uint8)  # freeze's [E, N, K/16]
        for arg in (stored.transpose(1, 2), stored.transpose(1, 2).contiguous()):
            words = block_scale_words(arg.view(torch.float8_e4m3fn))
            assert words.dtype == torch.int32 and words.shape == (2, 24, triton.cdiv(blocks, 4))
            as_bytes = words.view(torch.uint8)
            assert torch.equal(as_bytes[..., :blocks], stored)
            assert not as_bytes[..., blocks:].any()
            shares = words.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr()
            assert shares == (blocks % 4 == 0 and arg.stride(1) == 1), (blocks, arg.stride())


@pytest.mark.parametrize(
    ("cfg", "freeze", "mode", "cases"),
    [
        ("NVFP4", False, "qat", [(1, "auto", True), (2, "auto", False), (2, "always", True)]),
        ("NVFP4", True, "deploy", [(2, "auto", True)]),
        ("FP8", False, "qat", [(2, "auto", True)]),
        ("FP8", True, "deploy", [(2, "auto", True)]),
        ("FP8_W8A16", True, "deploy", [(2, "auto", True)]),
    ],
    ids=["qat-nvfp4", "deploy-w4a4", "qat-fp8", "deploy-w8a8", "deploy-w8a16"],
)
def test_auto_policy_fuses_where_it_pays(cfg, freeze, mode, cases):
    """Policy "auto" (the default) fuses a QAT NVFP4 chain up to its measured crossover in mean routed rows per
    expert and leaves bigger batches on the unfused path; deploy chains and QAT FP8 (which quantizes once at
    large sizes) fuse at every size; "always" fuses every chain. The op's ``quantize_once`` is ``None`` (by
    size) under "auto" and ``False`` (one kernel) under "always"."""
    assert fusion_policy() == "auto"
    config = tiny_model("qwen3_moe").config
    seq = FUSE_MAX_ROWS_PER_EXPERT["qat"] * config.num_experts // config.num_experts_per_tok
    cm = _finalized(getattr(moeq, cfg), freeze=freeze, tokens=make_tokens(seq=seq))
    for batch, policy, fused in cases:  # batch 1: exactly at the bound; batch 2: twice the bound
        _, code = _run(cm, policy, make_tokens(batch=batch, seq=seq))
        calls = [line for line in code.splitlines() if "torch.ops.moeq.grouped_qmm.default(" in line]
        assert len(calls) == (2 if fused else 0), (batch, policy)
        assert all(line.rstrip().endswith(", None)" if policy == "auto" else ", False)") for line in calls), calls


def test_auto_policy_fuses_qat_nvfp4_on_cuda_at_every_size(monkeypatch):
    """With bf16 activations on CUDA a QAT NVFP4 x NVFP4 chain fuses at every size (above 16 rows per expert the op itself runs the
    activation pass and the Gluon kernel, or the weight pass and ``torch._grouped_mm``); elsewhere (CPU, other dtypes), or with
    ``GLUON_QAT_NVFP4`` off, only up to the in-load bound, as the compiled test above shows."""
    from moeq.lowering import inductor
    from moeq.runtime.kernels import grouped_qmm as launcher

    bound = FUSE_MAX_ROWS_PER_EXPERT["qat"]
    assert bound == launcher.QAT_NVFP4_IN_LOAD_ROWS_PER_EXPERT
    assert inductor._pays("qat", "nvfp4", "nvfp4", 272 * 128, 128, bf16_cuda=True)
    assert not inductor._pays("qat", "nvfp4", "nvfp4", 272 * 128, 128, bf16_cuda=False)
    assert inductor._pays("qat", "nvfp4", "nvfp4", bound * 128, 128, bf16_cuda=False)
    # weight-only QAT, or activations already quantized before the routing gather: x as given, same kernel
    assert inductor._pays("qat", "nvfp4", None, 272 * 128, 128, bf16_cuda=True)
    monkeypatch.setattr(launcher, "GLUON_QAT_NVFP4", False)
    assert not inductor._pays("qat", "nvfp4", "nvfp4", 272 * 128, 128, bf16_cuda=True)


def test_unknown_fusion_policy_is_an_error():
    with pytest.raises(ValueError, match="unknown fusion policy 'sometimes'; choose one of auto, always, never"):
        with fusion("sometimes"):
            pass


@pytest.mark.parametrize(
    ("w_mode", "x_mode", "rows", "swapped"),
    [("fp8", "fp8", 64, True), ("nvfp4", None, 64, True), ("fp8", "fp8", 34816, False), ("fake_fp8", "fp8", 64, False)],
    ids=["w8a8-decode", "w4a16-decode", "w8a8-prefill", "qat-decode"],
)
def test_config_pruning_by_batch_size(w_mode, x_mode, rows, swapped):
    """Decode batches of W8A8 / W4A16 get the measured swap-AB tile (called as Triton calls the pruner:
    constexprs as keyword arguments); larger batches and QAT keep autotuning over fitting row tiles."""
    from moeq.runtime.kernels.grouped_qmm import W_MODES, X_MODES, m_bucket, prune_configs

    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": 128, "BLOCK_K": 128, "SWAP_AB": False, "FP8_DOT": fp8})
        for m in (16, 32, 64, 128)
        for fp8 in (True, False)
    ]
    named = {"M_BUCKET": m_bucket(rows, 128), "N": 1536, "K": 2048}
    kept = prune_configs(configs, named, W_MODE=W_MODES[w_mode], X_MODE=X_MODES[x_mode])
    assert kept and all(c.kwargs["SWAP_AB"] is swapped for c in kept)
    if x_mode is None:  # a 16-bit operand: the FP8 tensor cores never apply
        assert not any(c.kwargs["FP8_DOT"] for c in kept)
    elif not swapped:  # both operands FP8: autotuning chooses between FP8 and 16-bit tensor cores
        assert {c.kwargs["FP8_DOT"] for c in kept} == {True, False}
    if swapped:
        assert len(kept) == 1 and kept[0].kwargs["BLOCK_M"] == 16
    else:
        assert {c.kwargs["BLOCK_M"] for c in kept} == ({64, 128} if rows > 4096 else {16})


@pytest.mark.parametrize("in_gemm", [False, True], ids=["weight-pass-launch", "weight-pass-in-gemm"])
@pytest.mark.parametrize(("quantize_once", "launches"), [(None, 3), (False, 1)], ids=["by-size", "in-load"])
def test_launcher_traces_with_a_symbolic_row_count(quantize_once, launches, in_gemm, monkeypatch):
    """What Inductor does to the triton_op's body after a recompile with a dynamic token count: trace the
    launcher on fake CUDA tensors (no GPU needed) whose row count is symbolic. It traces; the quantize-once
    choices become guards on the rows (``rows > 16 * E`` for the activations, ``rows > 48 * E`` for the QAT
    weight), so 75 rows per expert give the three launches (activation codes, weight codes, codes GEMM; two when
    the weight pass runs inside the GEMM's launch) and ``quantize_once=False`` one."""
    from moeq.runtime.kernels import grouped_qmm as launcher

    monkeypatch.setattr(launcher, "WEIGHT_PASS_IN_GEMM", in_gemm)
    monkeypatch.setattr(launcher, "GLUON_QAT_FP8", False)  # the Triton launches (Gluon: the test below)
    if in_gemm and quantize_once is None:
        launches -= 1
    gm, rows, guards = _trace_launcher_with_symbolic_rows(quantize_once)
    assert isinstance(rows, torch.SymInt)
    assert sum("triton_kernel_wrapper" in str(n.target) for n in gm.graph.nodes) == launches
    if quantize_once is None:
        assert {f"{rows.node.expr} > 64", f"{rows.node.expr} > 192"} <= guards


def test_launcher_traces_the_gluon_kernel_as_an_opaque_op(monkeypatch):
    """On sm_90 (faked here: the trace needs no GPU) QAT FP8 from 48 to 320 rows per expert traces to the
    activation codes kernel and the opaque ``moeq::qat_fp8_gluon_gemm`` (no weight codes pass, no codes GEMM), with
    the row bounds as guards; with the Gluon kernel switched off, to the three Triton launches."""
    pytest.importorskip("moeq.runtime.kernels.qat_gluon", reason="this Triton has no Gluon")
    from moeq.runtime.kernels import grouped_qmm as launcher
    from moeq.runtime.kernels import qat_gluon

    monkeypatch.setattr(launcher, "GLUON_QAT_FP8", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(qat_gluon, "_device_ok", lambda index: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    gm, rows, guards = _trace_launcher_with_symbolic_rows(None, hf_layout=True)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert sum("triton_kernel_wrapper" in t for t in targets) == 1, targets
    assert sum("qat_fp8_gluon_gemm" in t for t in targets) == 1, targets
    assert {f"{rows.node.expr} > 64", f"{rows.node.expr} > 192", f"{rows.node.expr} <= 1280"} <= guards, guards


@pytest.mark.parametrize("gluon", [True, False], ids=["gluon", "weight-pass"])
def test_qat_nvfp4_launcher_traces_once_paths(gluon, monkeypatch):
    """QAT NVFP4 above 16 rows per expert (75 here, symbolic): the activations' fake-quant kernel, then on sm_90
    (faked) the opaque ``moeq::qat_nvfp4_gluon_gemm``, with the Gluon kernel off the weight's fake-quant kernel,
    ``torch._grouped_mm`` and the unrouted rows' zeroing; the row bounds become guards. At most 16 rows per expert
    (``quantize_once=False`` forces it) the one in-load launch stays."""
    pytest.importorskip("moeq.runtime.kernels.qat_gluon", reason="this Triton has no Gluon")
    from moeq.runtime.kernels import grouped_qmm as launcher
    from moeq.runtime.kernels import qat_gluon

    monkeypatch.setattr(launcher, "GLUON_QAT_NVFP4", gluon)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(qat_gluon, "_device_ok", lambda index: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    gm, rows, guards = _trace_launcher_with_symbolic_rows(None, hf_layout=True, fmt="nvfp4")
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    kernels = [t for t in targets if "triton_kernel_wrapper" in t]
    assert f"{rows.node.expr} > 64" in guards, guards
    if gluon:
        assert len(kernels) == 1 and sum("qat_nvfp4_gluon_gemm" in t for t in targets) == 1, targets
        assert f"{rows.node.expr} <= 1280" in guards, guards
    else:
        assert len(kernels) == 3 and sum("_grouped_mm" in t for t in targets) == 1, targets
        assert not any("gluon" in t for t in targets), targets
    gm, _, _ = _trace_launcher_with_symbolic_rows(False, hf_layout=True, fmt="nvfp4")
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert sum("triton_kernel_wrapper" in t for t in targets) == 1, targets
    assert not any("gluon" in t or "_grouped_mm" in t for t in targets), targets


def _trace_launcher_with_symbolic_rows(quantize_once, hf_layout=False, fmt="fp8"):
    """The QAT FP8 (``fmt``: or NVFP4) launcher traced by ``make_fx`` on fake CUDA tensors of 300 symbolic rows, 4
    experts: (graph, the row count, the guards' expressions). ``hf_layout``: the weight a ``[E, K, N]`` view of
    ``[E, N, K]``."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
    from torch.library import wrap_triton

    from moeq.runtime.kernels.grouped_qmm import grouped_qmm as launch

    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env)

    def fake_cuda(shape, dtype, dynamic_rows=False):
        dims = [DimDynamic.DYNAMIC if dynamic_rows and i == 0 else DimDynamic.STATIC for i in range(len(shape))]
        meta = torch.empty(shape, dtype=dtype, device="meta")
        sym = mode.from_tensor(meta, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))
        return FakeTensor(mode, meta.new_empty(sym.shape), torch.device("cuda"))

    x = fake_cuda((300, 32), torch.bfloat16, dynamic_rows=True)
    w = fake_cuda((4, 16, 32), torch.bfloat16).transpose(1, 2) if hf_layout else fake_cuda((4, 32, 16), torch.bfloat16)
    offs = fake_cuda((4,), torch.int32)
    amax, x_amax = fake_cuda((4,), torch.float32), fake_cuda((1,), torch.float32)

    def forward(x, w, offs, amax, x_amax):
        return launch(x, w, offs, amax, None, x_amax, f"fake_{fmt}", fmt, wrap=wrap_triton, quantize_once=quantize_once)

    with mode:
        gm = make_fx(forward, tracing_mode="real")(x, w, offs, amax, x_amax)
    rows = next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"].shape[0]
    return gm, rows, {str(g.expr) for g in shape_env.guards}


def _wgrad_with_mask(a, b, offs, w, amax):
    """A weight's STE gradient as AOTAutograd traces it, its wgrad output reaching the mask through views."""
    gemm = torch._grouped_mm(a, b, offs)
    return gemm.permute(0, 2, 1).transpose(1, 2).permute(0, 2, 1) * (w.abs() <= amax.view(-1, 1, 1))


def test_fuse_weight_ste_masks_follows_permutes_and_keeps_bits():
    """The joint-graph rewrite on a traced wgrad whose output reaches the mask through permute / transpose views:
    one ``grouped_wgrad_ste`` with the composed permutation (here a swap), the same bits as the traced product
    (clipped weights, an empty expert); left alone when the GEMM's output has another user."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from moeq.lowering.joint import fuse_weight_ste_masks

    gen = torch.Generator().manual_seed(0)
    offs = torch.tensor([8, 8, 24], dtype=torch.int32)
    a = torch.randn(24, 16, generator=gen).to(torch.bfloat16).t()  # [K, rows], rows contiguous: as wgrad reads x
    b = torch.randn(24, 32, generator=gen).to(torch.bfloat16)
    w = torch.randn(3, 32, 16, generator=gen).to(torch.bfloat16)  # [E, N, K]: the GEMM's [E, K, N] swapped
    amax = torch.tensor([1.0, 0.5, 1.5])
    args = (a, b, offs, w, amax)
    gm = make_fx(_wgrad_with_mask, tracing_mode="fake")(*args)
    assert fuse_weight_ste_masks(gm.graph) == 1
    gm.recompile()
    (fused,) = [n for n in gm.graph.nodes if n.target == torch.ops.moeq.grouped_wgrad_ste.default]
    assert fused.args[-2:] == ([0, 2, 1], None)  # the composed permutation; no quantize_weight here: no codes
    assert not [
        n for n in gm.graph.nodes if n.target in (torch.ops.aten._grouped_mm.default, torch.ops.aten.mul.Tensor)
    ]
    want = _wgrad_with_mask(*args)
    assert (want == 0).any() and (want != 0).any()
    assert_same_bits(gm(*args), want, "permuted wgrad")

    def also_returns_the_gemm(a, b, offs, w, amax):
        gemm = torch._grouped_mm(a, b, offs)
        return gemm.permute(0, 2, 1) * (w.abs() <= amax.view(-1, 1, 1)), gemm

    shared = make_fx(also_returns_the_gemm, tracing_mode="fake")(*args)
    assert fuse_weight_ste_masks(shared.graph) == 0


@pytest.mark.parametrize("k_first", [False, True], ids=["k-last", "k-first"])
def test_fuse_weight_ste_masks_passes_the_weights_fp8_codes(k_first):
    """Where the graph quantizes the weight to FP8 codes with the mask's amax (``quantize_weight``, as a QAT FP8
    training graph does), ``grouped_wgrad_ste`` gets those codes in the weight's layout (a permuted view when
    the weight is K-first) and the same bits; with another amax it gets none."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from moeq.lowering.joint import fuse_weight_ste_masks

    gen = torch.Generator().manual_seed(1)
    offs = torch.tensor([8, 8, 24], dtype=torch.int32)
    a = torch.randn(24, 16, generator=gen).to(torch.bfloat16).t()
    b = torch.randn(24, 32, generator=gen).to(torch.bfloat16)
    w = torch.randn(3, 32, 16, generator=gen).to(torch.bfloat16)  # [E, N, K]
    w = w.transpose(1, 2).contiguous() if k_first else w  # [E, K, N]
    perm = [0, 1, 2] if k_first else [0, 2, 1]
    amax = torch.tensor([1.0, 0.5, 1.5])

    def step(a, b, offs, w, amax, wired=True):
        data = torch.ops.moeq.quantize_weight(w, amax, "fp8", 0, 1 if k_first else 2)[0]
        gemm = torch._grouped_mm(a, b, offs).permute(perm)
        mask_amax = amax if wired else amax * 2  # another amax: its codes would not decide this mask
        return gemm * (w.abs() <= mask_amax.view(-1, 1, 1)), data

    for wired in (True, False):
        gm = make_fx(lambda *t, wired=wired: step(*t, wired), tracing_mode="fake")(a, b, offs, w, amax)
        assert fuse_weight_ste_masks(gm.graph) == 1
        gm.recompile()
        (fused,) = [n for n in gm.graph.nodes if n.target == torch.ops.moeq.grouped_wgrad_ste.default]
        codes = fused.args[-1]
        assert (codes is not None) == wired
        if wired:
            assert tuple(codes.meta["val"].shape) == tuple(w.shape)
            assert codes.target == (torch.ops.aten.permute.default if k_first else operator.getitem)
        assert_same_bits(gm(a, b, offs, w, amax)[0], step(a, b, offs, w, amax, wired)[0], f"wired={wired}")


def test_dequant_first_policy_applies_to_16bit_activations_above_the_bound():
    """Only deploy GEMMs with 16-bit activations dequantize first, and only above the measured bound."""
    from moeq.runtime.kernels.grouped_qmm import DEQUANT_FIRST_ROWS_PER_EXPERT, dequantizes_weight_first

    for fmt, bound in DEQUANT_FIRST_ROWS_PER_EXPERT.items():
        assert dequantizes_weight_first(fmt, None, bound * 8 + 1, 8)
        assert not dequantizes_weight_first(fmt, None, bound * 8, 8)
        assert not dequantizes_weight_first(fmt, "fp8", bound * 80, 8)  # W8A8: FP8 tensor cores, quantize once
        assert not dequantizes_weight_first(f"fake_{fmt}", None, bound * 80, 8)  # QAT
