"""On a real GPU: every Triton kernel is bit-exact with moeq.formats (computed on the CPU), and a compiled
tiny HF MoE gives identical outputs with the Triton kernels and with the reference path."""

from __future__ import annotations

import pytest
import torch

import moeq
from moeq.formats import expand_per_expert, expert_amax, get_format
from moeq.integrations.hf import tiny_model
from moeq.lowering import ops
from tests.conftest import make_tokens

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
    assert torch.equal(got, expected)


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
    amax_ref, counts_ref = ops.segment_amax(x, offs, 16)
    amax, got_counts = kernels.segment_amax(x.cuda(), offs.cuda(), 16)
    assert torch.equal(amax.cpu(), amax_ref) and torch.equal(got_counts.cpu(), counts_ref)
    for fmt in ("fp8", "nvfp4"):
        for act_amax in (torch.tensor([2.0]), torch.linspace(0.5, 5.0, 16)):
            expected = ops._fake_quant_act_reference(x, offs, act_amax, fmt, 0, -1)
            got = kernels.fake_quant_act(x.cuda(), offs.cuda(), act_amax.cuda(), fmt).cpu()
            assert torch.equal(got, expected), (fmt, act_amax.numel())


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
        with torch.no_grad(), guard:
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
    assert torch.equal(f.fake_quant(w.cuda(), amax.cuda(), -1).cpu(), f.fake_quant(w, amax, -1))
    q_cuda, q_cpu = f.quantize(w.cuda(), amax.cuda(), -1), f.quantize(w, amax, -1)
    assert torch.equal(q_cuda.data.cpu().view(torch.uint8), q_cpu.data.view(torch.uint8))
