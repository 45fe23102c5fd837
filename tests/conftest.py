"""Shared fixtures: tiny transformers MoE models (random weights, no download) and helpers."""

from __future__ import annotations

import copy
import gc
import multiprocessing
import multiprocessing.context
import os
import zlib
from typing import Any

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Inductor's CPU kernels compile as scalar C++ here (set TORCHINDUCTOR_VEC_ISA_OK=1 to test the vectorized form):
# moeq's ops are opaque custom ops either way, and without the vector variants each graph's kernels generate and
# compile about a fifth faster (tests/test_combine.py on a cold cache: 150 -> 118 s), which CI's two cores need.
# Subprocesses the tests start (examples, distributed ranks) inherit it.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")
# one intra-op thread per pytest-xdist worker (two workers share the CI's two cores)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))

FAMILIES = ["qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss"]

#: what every rank process of the distributed tests imports. A fork server imports it once; "spawn" imported it again in
#: each rank (~8 s of CPU a rank: a 4-rank test_distributed run took 123 s with spawn, 85 s forked, on 2 cores). The
#: last two are imported lazily, by the first Hugging Face model a rank builds and by its first compile (~3 s a rank).
RANK_PRELOAD = [
    "torch",
    "transformers",
    "moeq",
    "moeq.integrations.hf",
    "dist_harness",
    "transformers.modeling_utils",
    "torch._inductor.compile_fx",
]


def rank_context() -> multiprocessing.context.BaseContext:
    """The multiprocessing context of the tests' rank processes: ``forkserver``, whose server (a fresh interpreter
    that runs nothing but these imports, so forking it is as clean as spawning) preloads :data:`RANK_PRELOAD`."""
    multiprocessing.set_forkserver_preload(RANK_PRELOAD)
    return multiprocessing.get_context("forkserver")


def start_ranks(fn, args: tuple, nprocs: int, join: bool = False):
    """``torch.multiprocessing.start_processes`` of ``fn(rank, *args)`` in :func:`rank_context`'s processes."""
    rank_context()
    return torch.multiprocessing.start_processes(fn, args=args, nprocs=nprocs, join=join, start_method="forkserver")


#: Python's cyclic-GC thresholds for the test processes (its defaults: 700, 10, 10)
GC_THRESHOLDS = (50_000, 20, 100)


def pytest_collection_finish(session):
    """Tune the cyclic garbage collector once the test modules (torch, transformers, moeq) are imported. A compile
    allocates millions of short-lived objects (FX nodes, fake tensors, guards, variable trackers): under the default
    thresholds the collector ran ~1,100 times over one 2-layer Qwen3-MoE calibrate, finalize and training step and
    took 9% of it (2.3 of 26 s), mostly rescanning what the imports left. ``gc.freeze()`` moves those objects out
    of its scans and the higher thresholds collect rarely (14 times, 1.2 s): 26 -> 23 s for that flow. Garbage
    is still collected; tests that need a collection call ``gc.collect()``.

    Dynamo also collects the two young generations after every compile (``run_gc_after_compile``), which under
    these thresholds scans up to 50,000 fresh objects each time (~0.12 s a compile, ~550 compiles in the core
    suite): off here, the thresholds collect instead. ``tests/test_reuse_codes.py`` + ``tests/test_explain.py`` on
    one core, warm cache, alternating: 105.8 / 110.7 s off against 115.2 / 124.7 s on (session 58)."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    torch._dynamo.config.run_gc_after_compile = False


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_global_rng(request):
    """torch's global RNG seeded from the test's id: a test that draws from it gets the same inputs whichever tests
    ran before it on its xdist worker, so a failure reproduces alone (session 45's 1-ulp failure did not)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


#: ``MOEQ_TEST_FULL_INDUCTOR=1`` compiles every CPU test's graphs with Inductor's own C++ kernels (see below)
FULL_INDUCTOR = os.environ.get("MOEQ_TEST_FULL_INDUCTOR") == "1"


def inductor_test_config(full: bool) -> dict[str, bool]:
    """The Inductor settings a CPU test compiles under (:func:`_inductor_aten_fallback`); ``full``: as users do."""
    return {"fallback_by_default": not full, "reorder_for_peak_memory": full}


def inductor_settings_source() -> str:
    """Python source that gives a process a test starts (an example, a script) the tests' Inductor settings."""
    settings = inductor_test_config(FULL_INDUCTOR)
    return "import torch._inductor.config as _config; " + "; ".join(f"_config.{k} = {v}" for k, v in settings.items())


@pytest.fixture(autouse=True)
def _inductor_aten_fallback(request):
    """CPU tests compile ``backend="moeq"`` graphs with Inductor's ``fallback_by_default``: every op moeq does not
    lower runs as its ATen kernel from Inductor's wrapper instead of generated, gcc-compiled C++. moeq's passes run
    as in production (the post-grad lowering pass, the joint-graph pass, the FX graph cache with their ``uuid()``),
    and Inductor's code still shows each ``moeq::grouped_qmm`` / ``combine_experts`` call; what is skipped is C++
    code generation for attention, norms and routing, 1.0-1.4 s of gcc a kernel, which CI's two cores cannot
    afford (``tests/test_combine.py``: 201 -> 121 s of CPU). Inductor's reordering of the scheduled nodes for peak
    memory is off with it: over graphs of ~1,300 ATen calls it took a fifth of a compile (a 2-layer Qwen3-MoE
    calibrate, finalize and training step: 29 -> 22 s without the FX graph cache). Tests marked
    ``full_inductor`` (a model end to end through Inductor's own CPU code, the acceptance test of the lowering,
    dynamic shapes) and every GPU test compile as users do; so does every test under ``MOEQ_TEST_FULL_INDUCTOR=1``."""
    import torch._inductor.config

    full = FULL_INDUCTOR or any(request.node.get_closest_marker(m) for m in ("full_inductor", "gpu"))
    with torch._inductor.config.patch(inductor_test_config(full)):
        yield


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def per_expert_matmul_f64(xq: torch.Tensor, wq: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Independent grouped-GEMM reference: float64 ``xq[rows of e] @ wq[e]``, zeros past ``offs[-1]``."""
    out = torch.zeros(xq.shape[0], wq.shape[2], dtype=torch.float64)
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = xq[start:end].double() @ wq[e].double()
        start = end
    return out


def stored_weight_args(q) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A formats.py ``QuantizedTensor`` ``[E, N, K]`` as ``moeq.freeze`` stores it, in the kernel's argument
    views: (data ``[E, K', N]`` uint8, NVFP4 in its 64-byte runs; scale ``[E]``; block scales ``[E, K/16, N]``)."""
    from moeq.formats import stored_form

    data, scale, block = stored_form(q)
    return data.transpose(1, 2), scale, block.transpose(1, 2) if block.numel() else None


def deployed_weight_operand(q, dtype: torch.dtype) -> torch.Tensor:
    """The deploy kernel's weight operand from a formats.py ``QuantizedTensor``, as its one-hot rows give it:
    FP8 ``e4m3 * s`` (formats' dequantize); NVFP4 ``e2m1 * block scale`` (exact) times the global scale,
    rounded once in fp32 (the kernel multiplies its fp32 accumulator by the global scale, where formats'
    dequantize rounds ``block * g`` first)."""
    from dataclasses import replace

    from moeq.formats import get_format

    fmt = get_format(q.format)
    if q.block_scale is None:
        return fmt.dequantize(q, dtype)
    unit = fmt.dequantize(replace(q, scale=torch.ones_like(q.scale)))
    return (unit * q.scale).to(dtype)


#: what makes a tiny model of a family one MoE decoder layer besides ``num_hidden_layers=1``: GPT-OSS and Qwen3-Next
#: tie their layer count to ``layer_types``, DeepSeek-V3's first layer is dense unless told otherwise
_ONE_MOE_LAYER = {
    "gpt_oss": {"layer_types": ["full_attention"]},
    "qwen3_next": {"layer_types": ["full_attention"]},
    "deepseek_v3": {"first_k_dense_replace": 0},
}


def one_moe_layer(family: str) -> dict:
    """``tiny_model`` overrides for one decoder layer of ``family``, an MoE one."""
    return {"num_hidden_layers": 1, **_ONE_MOE_LAYER.get(family, {})}


def make_tokens(seed: int = 0, batch: int = 2, seq: int = 16, vocab: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def qat_step(
    gradient_checkpointing: bool, device: str = "cpu", backend: str = "moeq_aot_eager"
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int, Any]:
    """A calibrated NVFP4 Qwen3-MoE (with Hugging Face's gradient checkpointing of each decoder layer, or without)
    compiled with ``backend`` on ``device``, one training step: the loss, the gradients, the bytes saved for backward
    and the explain report."""
    import moeq
    from moeq.integrations.hf import tiny_model

    model = moeq.prepare(tiny_model("qwen3_moe", torch.float32, seed=5, num_hidden_layers=1).to(device), moeq.NVFP4)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad(), moeq.calibrate(compiled):
        compiled(make_tokens(seed=1).to(device), use_cache=False)
    moeq.finalize(compiled)
    model.train()
    tokens = make_tokens(seed=2).to(device)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = compiled(input_ids=tokens, labels=tokens, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(saved), moeq.explain(compiled)


def plain_and_checkpointed_qat_steps(device: str = "cpu", backend: str = "moeq_aot_eager") -> tuple[tuple, tuple]:
    """:func:`qat_step` without and with Hugging Face's gradient checkpointing (Dynamo reset between them; the
    checkpointed one traced with ``skip_fwd_side_effects_in_bwd_under_checkpoint``, which transformers' output
    recorder inside each layer needs)."""
    plain = qat_step(False, device, backend)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        return plain, qat_step(True, device, backend)


def compiled_and_finalized(model: torch.nn.Module, tokens: torch.Tensor, **compile_kw) -> torch.nn.Module:
    """A prepared ``model`` compiled with backend="moeq" (``compile_kw``: ``torch.compile``'s), calibrated on ``tokens``
    with the combine fusion off (its rounding would move a later layer's inputs) and finalized. Tests that compare two
    lowerings compile the result again under each (``run_and_get_code`` resets Dynamo): one calibration, and both
    sides read the same statistics."""
    import moeq
    from moeq.lowering.inductor import combine_fusion

    torch._dynamo.reset()
    cm = torch.compile(model, backend="moeq", **compile_kw)
    with torch.no_grad(), combine_fusion(False):
        with moeq.calibrate(cm):
            cm(tokens)
        moeq.finalize(cm)
    return cm


def explain_text(model: torch.nn.Module) -> str:
    """``str(moeq.explain(model))`` with its line wrapping undone (single spaces), for phrase checks."""
    import moeq

    return " ".join(str(moeq.explain(model)).split())


def far_below_block_weights() -> torch.Tensor:
    """[2, 4, 16] weights whose 16-blocks span the whole fp32 range: a large value, then negative ones down
    to subnormals, so some quotients by the NVFP4 block scale are -0 in fp32 and some underflow to +0.
    Expert 0's global amax (3e38) is outside the kernels' fast-division range, expert 1's (1e15) inside."""
    w = torch.zeros(2, 4, 16)
    w[0, :, 0] = torch.tensor([3e38, 1e30, 1e10, 1.0])
    w[0, :, 1:] = -torch.logspace(-45, -30, 15).float() * torch.tensor([1.0, 1e8, 1e20, 1e30]).view(4, 1)
    w[1, :, 0] = torch.tensor([1e15, 1e12, 1e9, 1.0])
    w[1, :, 1:] = -torch.logspace(-45, -25, 15).float()
    return w


def every_bf16_block_weights() -> tuple[torch.Tensor, torch.Tensor]:
    """``(w [8, 255, 256], amax [8])``: every finite bf16 value (bf16), under per-expert global amaxes from 1e-30 to
    1e30 (inside and outside the kernels' fast division range)."""
    values = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    values = values[torch.isfinite(values.float())][: 255 * 256]
    amax = torch.tensor([1e-30, 3e-12, 0.02, 1.0, 7.5, 448.0, 3e9, 1e30])
    return values.reshape(1, 255, 256).expand(amax.numel(), 255, 256).contiguous(), amax


def nonfinite_weights(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w [3, 4, 32], amax [3])``: NaN and +-inf in some 16-blocks of every expert, finite blocks beside
    them; expert 0's amax is its finite max, expert 1's is 0 and expert 2's is 1."""
    w = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(5))
    w[:, 0, 3] = float("nan")
    w[:, 1, 20] = float("inf")
    w[:, 2, 7] = -float("inf")
    w[:, 3, 17:19] = torch.tensor([float("nan"), -float("inf")])
    amax = torch.tensor([w[0][w[0].isfinite()].abs().max().item(), 0.0, 1.0])
    return w.to(dtype), amax


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """Bit-for-bit equality (``torch.equal`` treats -0 and +0 as equal; the quantization spec does not); NaN
    must stand where NaN stands, with any payload."""
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape, want.shape)
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[got.element_size()]
    differ = got.contiguous().view(as_int) != want.contiguous().view(as_int)
    if got.is_floating_point():  # NaN payloads are not part of the spec; where NaN is, is
        differ &= ~(got.isnan() & want.isnan())
    assert not differ.any(), f"{what}: {int(differ.sum())} of {differ.numel()} elements differ in their bits"


def gradients_with_clipped_weights(
    shape: tuple[int, int, int], dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight with some entries past their expert's amax (0.4-0.48 of its max|w|: about a tenth of a small
    Gaussian weight), a NaN, an inf and a weight exactly at its amax; a gradient of both signs with infs and a
    NaN where weights are clipped."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen).to(dtype)
    amax = 0.4 * w.float().abs().amax(dim=(1, 2)) * (1 + 0.2 * torch.rand(shape[0], generator=gen))
    flat = w.view(shape[0], -1)
    flat[0, 0], flat[0, 1], flat[-1, -1] = float("nan"), float("-inf"), -amax[-1].to(dtype)
    amax[-1] = flat[-1, -1].float().abs()  # a weight exactly at its amax passes
    g = torch.randn(shape, generator=gen).to(dtype)
    g.view(shape[0], -1)[0, :3] = torch.tensor([float("inf"), float("nan"), -float("inf")]).to(dtype)
    return g, w, amax


def routed_rows(
    tokens: int,
    top_k: int,
    hidden: int,
    experts: int,
    dtype: torch.dtype,
    seed: int,
    w_dtype: torch.dtype | None = None,
):
    """Expert-sorted rows ``y``, their routing weights and transformers' inverse permutation, as its grouped
    experts build them (``torch.sort`` of the flattened top-k ids)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)]).reshape(-1)
    _, perm = torch.sort(ids)
    weights = torch.rand(tokens * top_k, generator=g).to(w_dtype or dtype)[perm]
    y = (torch.randn(tokens * top_k, hidden, generator=g) * 4).to(dtype)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel())
    return y, weights, inv_perm


def combine_expression(y, weights, inv_perm, top_k):
    """transformers' grouped-experts combine (integrations/moe.py), eager; ``weights`` None: no scaling."""
    weighted = y if weights is None else y * weights.unsqueeze(-1)
    return weighted[inv_perm].view(-1, top_k, y.shape[1]).sum(dim=1)


def combine_float64(y, weights, inv_perm, top_k):
    """Each product in torch's promoted dtype (as the model computes it), summed in float64; and the sum of the
    terms' magnitudes. ``weights`` None: the rows themselves."""
    if weights is None:
        terms = y.double().cpu()[inv_perm.cpu()]
    else:
        product_dtype = torch.promote_types(y.dtype, weights.dtype)
        terms = (y.double().cpu() * weights.double().cpu().unsqueeze(-1)).to(product_dtype).double()[inv_perm.cpu()]
    return terms.view(-1, top_k, y.shape[1]).sum(dim=1), terms.abs().view(-1, top_k, y.shape[1]).sum(dim=1)


def assert_combine_close(got, y, weights, inv_perm, top_k):
    """``got`` (the combine) within one rounding to its dtype, plus fp32 accumulation, of the float64 value."""
    want, magnitude = combine_float64(y, weights, inv_perm, top_k)
    assert got.shape == want.shape
    # one rounding to the output dtype, plus fp32 accumulation (top_k additions) of the terms' magnitudes
    bound = torch.finfo(got.dtype).eps * want.abs() + top_k * 2.0**-23 * magnitude
    err = (got.double().cpu() - want).abs()
    assert (err <= bound).all(), f"max error {float(err.max()):.3g}, worst excess {float((err - bound).max()):.3g}"


def combine_backward_inputs(tokens: int, top_k: int, hidden: int, dtype: torch.dtype, seed: int, w_dtype=None):
    """The combine's backward operands: the token gradient ``[T, H]``, expert-sorted rows ``y``, their routing
    weights and the sort permutation (``inv_perm``'s inverse)."""
    y, weights, inv_perm = routed_rows(tokens, top_k, hidden, max(8, top_k), dtype, seed, w_dtype)
    grad = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return grad, y, weights, torch.argsort(inv_perm)


def assert_combine_backward_close(dy, dw, grad, y, weights, perm, top_k):
    """``dy`` equal to autograd's ``grad[perm // top_k] * weights[:, None]`` (one rounding of an exact product), and
    ``dw`` within one rounding to its dtype, plus fp32 accumulation over H, of the float64 ``sum(g * y)``."""
    rows = grad.cpu()[perm.cpu() // top_k]
    assert torch.equal(dy.cpu(), rows * weights.cpu().unsqueeze(-1))
    terms = rows.double() * y.double().cpu()
    want, magnitude = terms.sum(dim=1), terms.abs().sum(dim=1)
    bound = torch.finfo(dw.dtype).eps * want.abs() + y.shape[1] * 2.0**-23 * magnitude
    err = (dw.double().cpu() - want).abs()
    assert dw.shape == want.shape and (err <= bound).all(), f"dw max error {float(err.max()):.3g}"


def experts_only(modelopt_cfg: dict) -> dict:
    """A copy of an nvidia-modelopt quantization config whose wildcard weight and input quantizer entries apply to
    routed experts only (``*.experts.*``): modelopt 0.47 has experts-only presets for NVFP4, not for its FP8 ones."""
    cfg = copy.deepcopy(modelopt_cfg)
    renamed = 0
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") in ("*weight_quantizer", "*input_quantizer"):
            entry["quantizer_name"] = "*.experts.*" + entry["quantizer_name"][1:]
            renamed += 1
    assert renamed == 2, "the modelopt config no longer has the two wildcard weight / input quantizer entries"
    return cfg
