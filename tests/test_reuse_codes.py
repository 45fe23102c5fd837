"""``moeq.reuse_weight_codes``: QAT forwards inside the block read each expert weight's codes computed on entry.

Checked against the same forwards without the block (which quantize the weight every time): outputs and gradients
over several micro-batches, compiled with ``backend="moeq"`` on tiny transformers MoEs and through
``moeq.quantize_graph``; what the compiled graphs run (no weight quantization inside the block, the deploy kernels
on the codes); the recompile when the block ends; and every misuse named in the errors.
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
from torch import nn
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import run_and_get_code

import moeq
from moeq.formats import expert_amax
from moeq.integrations.hf import expert_parameter_names, tiny_model
from moeq.lowering.inductor import combine_fusion, fusion
from moeq.state import get_state
from tests.conftest import compiled_and_finalized, make_tokens


def _quantizes_weights(code: str) -> bool:
    """Whether Inductor's code calls an op that quantizes an expert weight."""
    return bool(re.search(r"torch\.ops\.moeq\.(fake_quant_weight|quantize_weight)\.default\(", code))


def _finalized(cfg_name: str, model: nn.Module | None = None) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """A tiny Qwen3-MoE (one layer), prepared, compiled, calibrated and finalized: ``(model, compiled, tokens)``."""
    model = moeq.prepare(model or tiny_model("qwen3_moe", torch.bfloat16, num_hidden_layers=1), getattr(moeq, cfg_name))
    tokens = make_tokens()
    return model, compiled_and_finalized(model, tokens), tokens


def _accumulate(model, cm, tokens, reuse: bool, micro_batches: int = 3, **block):
    """Gradient accumulation over ``micro_batches`` (different token rows each): ``(losses, expert grads, code)``,
    the code Inductor generated for the first micro-batch (``run_and_get_code`` compiles afresh each time)."""
    model.zero_grad(set_to_none=True)
    model.train()
    losses, code = [], []
    with moeq.reuse_weight_codes(cm, **block) if reuse else contextlib.nullcontext():
        for i in range(micro_batches):
            micro = tokens.roll(i, dims=1)

            def step(micro=micro):
                loss = cm(micro, labels=micro).loss
                loss.backward()
                return loss.detach()

            if i == 0:
                loss, code = run_and_get_code(step)
            else:
                loss = step()
            losses.append(loss)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if ".experts." in n and p.dim() >= 2}
    return losses, grads, "\n".join(code)


def test_accumulated_gradients_equal_the_block_free_ones():
    """Three micro-batches with and without the block: losses and expert gradients equal bit for bit, and inside
    the block no graph quantizes a weight (FP8: :func:`test_fp8_block_runs_deploy_kernels_on_the_codes`; module
    lists: ``test_megatron_experts.py::test_sequential_mlp_accumulates_with_reused_codes``). QAT NVFP4 training
    graphs run their GEMMs unfused under every policy (policy "auto", the default, here); inside the block each
    reads the weight through ``moeq::fake_quant_weight_from_codes`` (the dequant of the packed codes, once per
    micro-batch)."""
    model, cm, tokens = _finalized("NVFP4")
    with fusion("auto"), combine_fusion(False):
        losses_a, grads_a, code_a = _accumulate(model, cm, tokens, reuse=False)
        losses_b, grads_b, code_b = _accumulate(model, cm, tokens, reuse=True)
    assert _quantizes_weights(code_a) and not _quantizes_weights(code_b)
    layers = 2  # gate_up and down
    reads = code_b.count("torch.ops.moeq.fake_quant_weight_from_codes.default(")
    assert reads == layers  # the dgrad reads the saved output, as the block-free graph saves its fake quant
    assert torch.equal(torch.stack(losses_a), torch.stack(losses_b))
    for name, grad in grads_a.items():
        assert grad.abs().sum() > 0 and torch.equal(grad, grads_b[name]), name


def test_fp8_block_runs_deploy_kernels_on_the_codes():
    """QAT FP8, fused (the default policy): inside the block the training graph neither quantizes a weight nor saves
    one; forward and dgrad of both expert GEMMs run ``moeq::grouped_qmm`` on the codes and each wgrad's STE mask
    reads them. Losses and gradients equal the block-free step's bit for bit: that step runs the same kernels on
    codes it computes itself."""
    model, cm, tokens = _finalized("FP8")
    with combine_fusion(False):
        losses_a, grads_a, code_a = _accumulate(model, cm, tokens, reuse=False, micro_batches=2)
        losses_b, grads_b, code = _accumulate(model, cm, tokens, reuse=True, micro_batches=2)
    layers = 2  # gate_up and down
    assert code_a.count("torch.ops.moeq.quantize_weight.default(") == layers
    assert not _quantizes_weights(code)
    calls = re.findall(r"torch\.ops\.moeq\.grouped_qmm\.default\((.*)\)", code)
    assert sum("'deploy', 'fp8', 'fp8'" in c for c in calls) == layers  # forward, x quantized in the kernel
    assert sum("'deploy', 'fp8', None" in c for c in calls) == layers  # dgrad
    wgrads = re.findall(r"torch\.ops\.moeq\.grouped_wgrad_ste\.default\((.*)\)", code)
    assert len(wgrads) == layers and all(w.rsplit(",", 1)[-1].strip() != "None" for w in wgrads)
    assert torch.equal(torch.stack(losses_a), torch.stack(losses_b))
    for name, grad in grads_a.items():
        assert grad.abs().sum() > 0 and torch.equal(grad, grads_b[name]), name


def bf16_gemm_rounds_as_fp32() -> bool:
    """Whether this CPU's bf16 GEMM gives the fp32 product rounded to bf16 (AVX-512 CPUs do; AVX2-only ones sum in
    another order and differ in a few elements)."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(256, 256, generator=g).bfloat16() for _ in range(2))
    return torch.equal(a @ b, (a.float() @ b.float()).bfloat16())


@pytest.mark.parametrize("cfg_name", ["FP8", "NVFP4"])
def test_dequantized_copies_feed_the_gemms_that_read_16_bit_weights(cfg_name):
    """``dequantized=True``: each weight's dequant is computed once per block too. FP8: the dgrad multiplies that
    copy (``torch._grouped_mm``) instead of dequantizing the codes per micro-batch, while the forward stays the
    fused FP8 GEMM on the codes; NVFP4: every expert GEMM reads the copy, and no graph dequantizes. Gradients are
    the block-free ones bit for bit; the report counts the copy's bytes.

    FP8's block-free dgrad is the CPU reference GEMM (an fp32 product rounded to bf16), the copy's is a bf16
    ``torch._grouped_mm``: where this CPU's bf16 GEMM rounds otherwise (AVX2-only CPUs, e.g. AMD EPYC), a few
    gradient elements differ by at most a bf16 step of the tensor's scale. On CUDA both are the same GEMM."""
    model, cm, tokens = _finalized(cfg_name)
    with combine_fusion(False):
        _, grads_a, _ = _accumulate(model, cm, tokens, reuse=False, micro_batches=2)
        with moeq.reuse_weight_codes(cm, dequantized=True) as report:
            pass
        _, grads_b, code = _accumulate(model, cm, tokens, reuse=True, micro_batches=2, dequantized=True)
    layers = 2
    assert not re.search(r"torch\.ops\.moeq\.(fake_quant_weight_from_codes|dequant_weight|quantize_weight)", code)
    plain = re.findall(r"(?:extern_kernels\._grouped_mm|torch\.ops\.aten\._grouped_mm\.default)\(", code)
    fused = re.findall(r"torch\.ops\.moeq\.grouped_qmm\.default\(.*'deploy', 'fp8', 'fp8'", code)
    if cfg_name == "FP8":
        assert len(fused) == layers and len(plain) == layers, code  # forward on the codes, dgrad on the copy
    else:
        assert not fused and len(plain) == 2 * layers, code
    exact = cfg_name == "NVFP4" or bf16_gemm_rounds_as_fp32()
    for name, grad in grads_a.items():
        assert grad.abs().sum() > 0, name
        if exact:
            assert torch.equal(grad, grads_b[name]), name
        else:
            diff = (grad.float() - grads_b[name].float()).abs()
            assert diff.max() <= 2**-7 * grad.float().abs().max() and (diff > 0).float().mean() < 0.01, name
        weight = model.get_parameter(name)
        assert report.reused[name] > weight.numel() * weight.element_size(), name


@pytest.mark.parametrize("cfg_name", ["FP8", "NVFP4"])
def test_inference_inside_the_block_is_the_qat_forward(cfg_name):
    """An evaluation forward (no grad) inside the block gives the block-free QAT output bit for bit, and that output
    is quantized (not the full-precision one); after the block the model compiles back to quantizing weights."""
    model, cm, tokens = _finalized(cfg_name)
    model.eval()
    with torch.no_grad(), combine_fusion(False):
        qat, code_a = run_and_get_code(lambda: cm(tokens).logits)
        with moeq.reuse_weight_codes(cm) as report:
            reused, code_b = run_and_get_code(lambda: cm(tokens).logits)
        after, code_c = run_and_get_code(lambda: cm(tokens).logits)
    assert sorted(report.reused) == sorted(expert_parameter_names(model)) and not report.skipped
    assert str(report).startswith("2 expert weights read from codes computed once") and "gate_up_proj" in str(report)
    modes = [re.findall(r"grouped_qmm\.default\(.*'(qat|deploy)', '", "\n".join(c)) for c in (code_a, code_b, code_c)]
    inside = ["deploy"] * 2 if cfg_name == "FP8" else []  # NVFP4: the codes' dequant, then the GEMM
    assert modes == [["qat"] * 2, inside, ["qat"] * 2]  # and back to QAT after the block
    assert torch.equal(qat, reused) and torch.equal(qat, after)
    torch._dynamo.reset()
    plain = tiny_model("qwen3_moe", torch.bfloat16, num_hidden_layers=1)
    with torch.no_grad():
        assert not torch.equal(plain(tokens).logits, qat)


def test_quantize_graph_reads_codes_at_run_time():
    """``moeq.quantize_graph`` (the state is called as a submodule, so the block takes effect without a recompile):
    gradients of two micro-batches and the output equal the block-free ones bit for bit."""

    class Experts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            gen = torch.Generator().manual_seed(1)
            self.w = nn.Parameter((torch.randn(4, 48, 32, generator=gen) * 0.1).to(torch.bfloat16))

        def forward(self, x, offs):
            return torch._grouped_mm(x, self.w.transpose(1, 2), offs)

    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    offs = torch.tensor([8, 15, 15, 40], dtype=torch.int32)  # expert 2 gets no rows
    for cfg in (moeq.FP8, moeq.NVFP4):
        qgm = moeq.quantize_graph(torch.fx.symbolic_trace(Experts()), cfg)
        with torch.no_grad(), moeq.calibrate(qgm):
            qgm(x, offs)
        moeq.finalize(qgm)
        w = qgm.get_parameter("w")

        def grads(reuse, qgm=qgm, w=w):
            w.grad = None
            outs = []
            with moeq.reuse_weight_codes(qgm) if reuse else contextlib.nullcontext():
                for i in range(2):
                    out = qgm(x.roll(i, 0), offs)
                    out.float().square().sum().backward()
                    outs.append(out.detach())
            return outs, w.grad.clone()

        (outs_a, grad_a), (outs_b, grad_b) = grads(False), grads(True)
        assert all(torch.equal(a, b) for a, b in zip(outs_a, outs_b)), cfg.name
        assert grad_a.abs().sum() > 0 and torch.equal(grad_a, grad_b), cfg.name
        with torch.no_grad():
            unquantized = torch._grouped_mm(x, w.transpose(1, 2), offs)
        assert not torch.equal(outs_a[0], unquantized), cfg.name


def test_clipped_weights_get_no_gradient_inside_the_block():
    """The straight-through estimator inside the block is the fake quant's: weights scaled past their calibrated
    amax get no gradient, the others do."""
    model, cm, tokens = _finalized("FP8")
    clipped = {}
    with torch.no_grad():
        for name in expert_parameter_names(model):
            p = model.get_parameter(name)
            amax = expert_amax(p).view(-1, 1, 1)
            p[:, :2] *= 4
            clipped[name] = p.abs() > amax
    _, grads, _ = _accumulate(model, cm, tokens, reuse=True, micro_batches=1)
    for name, grad in grads.items():
        assert clipped[name].any() and not grad[clipped[name]].any(), name
        assert grad[~clipped[name]].count_nonzero() > 0.5 * (~clipped[name]).sum(), name


def test_the_next_block_refills_the_same_buffers_with_the_new_weights():
    """Blocks around optimizer steps: the second block writes the new weights' codes into the first block's buffers
    (same addresses, as CUDA-graph replays need) and its gradients are the block-free ones of the new weights;
    ``keep=False`` frees the buffers on exit."""
    model, cm, tokens = _finalized("FP8")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    _accumulate(model, cm, tokens, reuse=True, micro_batches=1)
    state = moeq.quant_state(cm)
    addresses = {fqn: [t.data_ptr() for t in s.codes()] for fqn, s in state.items()}
    codes_before = {fqn: s.codes_data.clone() for fqn, s in state.items()}
    opt.step()
    _, grads_a, _ = _accumulate(model, cm, tokens, reuse=False, micro_batches=2)
    _, grads_b, _ = _accumulate(model, cm, tokens, reuse=True, micro_batches=2)
    for fqn, s in state.items():
        assert [t.data_ptr() for t in s.codes()] == addresses[fqn], fqn
        assert not torch.equal(s.codes_data, codes_before[fqn]), fqn  # the new weights' codes
        assert torch.equal(grads_a[fqn], grads_b[fqn]), fqn
    with moeq.reuse_weight_codes(cm, keep=False):
        pass
    assert all(t.numel() == 0 for s in state.values() for t in s.codes())


def test_state_buffers_are_static_inputs_for_cuda_graphs():
    """Every state buffer the backend lifts to a graph input (amaxes, a frozen weight's codes and scales) is a
    static input of the compiled graph, as Dynamo's parameters are: CUDA-graph replays read it in place instead of
    copying it into the graph's memory (a frozen Qwen3-30B-A3B layer's codes are 603 MB)."""
    seen = []

    class Record(CustomGraphPass):
        def __call__(self, graph):
            context = torch._guards.TracingContext.try_get()
            inputs = [n.name for n in graph.nodes if n.op == "placeholder"]
            seen.append((len(inputs), set(context.fw_metadata.static_input_indices)))

        def uuid(self):
            return None

    model, cm, tokens = _finalized("FP8")
    moeq.freeze(cm)
    with torch._inductor.config.patch(post_grad_custom_pre_pass=Record()), torch.no_grad():
        cm(tokens)
    count, static = seen[-1]
    lifted = 2 * 4  # per expert weight: frozen data, scale, block scales, input amax
    assert set(range(count - lifted, count)) <= static, (count, sorted(static))


# ------------------------------------------------------------------------------------------------
# misuse
# ------------------------------------------------------------------------------------------------


def test_a_weight_changed_inside_the_block_is_an_error_naming_it():
    """An optimizer step inside the block makes later forwards read stale codes: the block's end raises, naming
    each changed weight; the model leaves the block either way (the next forward quantizes again)."""
    model, cm, tokens = _finalized("FP8")
    opt = torch.optim.SGD([model.get_parameter(expert_parameter_names(model)[0])], lr=1e-3)
    with pytest.raises(RuntimeError, match=r"changed inside reuse_weight_codes.*gate_up_proj \(version \d+ -> \d+"):
        with moeq.reuse_weight_codes(cm):
            cm(tokens, labels=tokens).loss.backward()
            opt.step()
    state = get_state(cm)
    assert not state.mode_box.codes_reused and not any(s.codes_reused for s in state.experts.values())


def test_the_block_needs_a_finalized_qat_model():
    model = moeq.prepare(tiny_model("qwen3_moe", torch.bfloat16, num_hidden_layers=1), moeq.FP8)
    with pytest.raises(RuntimeError, match=r"mode 'off', not QAT \('quantize'\): call finalize\(\)"):
        with moeq.reuse_weight_codes(model):
            pass
    model, cm, _ = _finalized("FP8")
    with moeq.reuse_weight_codes(cm):
        with pytest.raises(RuntimeError, match="already inside a reuse_weight_codes block"):
            with moeq.reuse_weight_codes(cm):
                pass
    moeq.freeze(cm)
    with pytest.raises(RuntimeError, match="mode 'deploy'.*moeq.freeze stored its weights quantized already"):
        with moeq.reuse_weight_codes(cm):
            pass


def test_codes_of_another_weight_are_rejected_by_the_op():
    w = torch.randn(4, 64, 32, dtype=torch.bfloat16)
    amax = w.abs().amax(dim=(1, 2)).float()
    data, scale, block = torch.ops.moeq.quantize_weight(w, amax, "fp8", 0, 2)
    with pytest.raises(ValueError, match=r"codes \(data \[4, 64, 32\].*not those of the fp8 weight \[4, 32, 64\]"):
        torch.ops.moeq.fake_quant_weight_from_codes(
            w.transpose(1, 2).contiguous(), amax, data, scale, block, "fp8", 0, 2
        )
    with pytest.raises(ValueError, match=r"3-D weight with experts along dim 0, got \[64, 32\]"):
        torch.ops.moeq.fake_quant_weight_from_codes(w[0], amax, data, scale, block, "fp8", 0, 1)
    got = torch.ops.moeq.fake_quant_weight_from_codes(w, amax, data, scale, block, "fp8", 0, 2)
    assert torch.equal(got, torch.ops.moeq.fake_quant_weight(w, amax, "fp8", 0, 2))


def _ddp_compiled_gradients() -> None:
    """The body of :func:`test_a_distributed_data_parallel_model`, in its own frame: the DDP wrapper (its reducer
    holds the process group) dies when this returns, before the group is destroyed."""
    torch._dynamo.reset()
    model = moeq.prepare(tiny_model("qwen3_moe", torch.bfloat16, num_hidden_layers=1), moeq.FP8)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    cm = torch.compile(ddp, backend="moeq")
    tokens = make_tokens()
    with torch.no_grad(), moeq.calibrate(cm):
        cm(tokens)
    moeq.finalize(cm)
    assert get_state(cm) is get_state(model) is get_state(torch.nn.DataParallel(model))
    _, grads_a, _ = _accumulate(model, cm, tokens, reuse=False, micro_batches=2)
    _, grads_b, _ = _accumulate(model, cm, tokens, reuse=True, micro_batches=2)
    for name, grad in grads_a.items():
        assert grad.abs().sum() > 0 and torch.equal(grad, grads_b[name]), name


def test_a_distributed_data_parallel_model(tmp_path):
    """``torch.compile(DistributedDataParallel(prepared))`` (a gloo group of one process): the moeq API finds the
    quant state through both wrappers, and the block's gradients equal the block-free ones bit for bit. The DDP
    reducer is freed (Dynamo's caches dropped, collected) while its gloo group lives: freed after
    ``destroy_process_group``, the group's destructor hung once joining its threads (a clean-clone run, session 38)."""
    import gc

    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        _ddp_compiled_gradients()
    finally:
        torch._dynamo.reset()
        gc.collect()
        if created:
            dist.destroy_process_group()
