"""Calibration parity with nvidia-modelopt 0.47 on tiny Qwen3-MoE (bf16, CPU).

For each case, one random-weight tiny Qwen3-MoE is built. modelopt quantizes a deepcopy with
``mtq.NVFP4_EXPERTS_ONLY_CFG``, or with an experts-only FP8 config derived from ``mtq.FP8_DEFAULT_CFG``
(0.47 has no FP8 experts-only preset). moeq calibrates the original model with the matching preset
under ``torch.compile(backend="moeq_aot_eager")``. Both use the same calibration batches.

modelopt's layout for transformers 5.x fused experts:

* ``model.layers.{i}.mlp.experts.{gate_up,down}_proj_weight_quantizers.{e}``: one quantizer per expert,
  with a 0-d bf16 amax.
* ``model.layers.{i}.mlp.experts.{gate_up,down}_proj_input_quantizer``: one quantizer shared by all
  experts, with a 0-d bf16 amax.

modelopt forces ``_experts_implementation="eager"``, so it calibrates on the per-expert Python loop
(``F.linear`` per expert). moeq calibrates on the ``grouped_mm`` path.

On CPU the down_proj inputs of the two paths are bit-identical. ``test_down_proj_inputs_eager_vs_grouped``
compares them element by element: 0 elements differ and the max abs difference is 0.0 (no bf16 ulp).
So every amax comparison here is exact (``torch.equal``); no tolerance is used.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch

mtq = pytest.importorskip("modelopt.torch.quantization")
import transformers.integrations.moe as hf_moe  # noqa: E402
from modelopt.torch.quantization.nn import TensorQuantizer  # noqa: E402
from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor  # noqa: E402

import moeq  # noqa: E402
from moeq.integrations.hf import tiny_model  # noqa: E402
from tests.conftest import experts_only  # noqa: E402

PROJS = ("gate_up_proj", "down_proj")
VOCAB = 256


def _tokens(seed: int, shape: tuple[int, int]) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class Case:
    fmt: str  # "nvfp4" | "fp8"
    seed: int  # model seed
    batches: tuple[tuple[int, tuple[int, int]], ...]  # (token seed, (batch, seq)) per calibration batch

    @property
    def id(self) -> str:
        return f"{self.fmt}-model{self.seed}-" + "+".join(f"tok{s}x{b}x{t}" for s, (b, t) in self.batches)


CASES = [
    Case("nvfp4", 0, ((0, (2, 16)),)),
    Case("nvfp4", 1, ((1, (4, 32)), (2, (4, 32)))),
    Case("fp8", 0, ((0, (2, 16)),)),
    Case("fp8", 2, ((3, (2, 24)), (4, (2, 24)))),
]


@dataclass
class Result:
    case: Case
    model: torch.nn.Module  # calibrated and finalized by moeq
    peer: torch.nn.Module  # quantized by modelopt
    batches: list[torch.Tensor]
    weights_before: dict[str, torch.Tensor]  # the moeq model's parameters before anything ran
    weights_after_modelopt: dict[str, torch.Tensor]  # the same, right after mtq.quantize(peer)
    state: dict  # moeq.quant_state(model)
    # modelopt's calibration forward, per layer: top-k expert ids and the inputs of its shared input quantizers
    # (one call per routed expert, in the eager loop's ascending expert order)
    topk: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    inputs: dict[tuple[int, str], list[torch.Tensor]] = field(default_factory=dict)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _run(case: Case) -> Result:
    torch._dynamo.reset()  # a fresh model per case; avoid hitting Dynamo's recompile limit
    model = tiny_model("qwen3_moe", torch.bfloat16, seed=case.seed)
    peer = copy.deepcopy(model)
    batches = [_tokens(s, shape) for s, shape in case.batches]
    weights_before = _snapshot(model)

    # --- modelopt on the deepcopy, recording what its eager loop feeds the shared input quantizers
    res = Result(case, model, peer, batches, weights_before, {}, {})
    mcfg = mtq.NVFP4_EXPERTS_ONLY_CFG if case.fmt == "nvfp4" else experts_only(mtq.FP8_DEFAULT_CFG)

    def forward_loop(m: torch.nn.Module) -> None:
        hooks = []
        for i, layer in enumerate(m.model.layers):
            experts = layer.mlp.experts
            hooks.append(
                experts.register_forward_pre_hook(lambda mod, args, i=i: res.topk.setdefault(i, []).append(args[1]))
            )
            for p in PROJS:
                q = getattr(experts, f"{p}_input_quantizer")
                hooks.append(
                    q.register_forward_pre_hook(
                        lambda mod, args, key=(i, p): res.inputs.setdefault(key, []).append(args[0].detach().clone())
                    )
                )
        try:
            with torch.no_grad():
                for ids in batches:
                    m(input_ids=ids)
        finally:
            for h in hooks:
                h.remove()

    res.peer = mtq.quantize(peer, mcfg, forward_loop)
    res.weights_after_modelopt = _snapshot(model)

    # --- moeq on the original model
    moeq.prepare(model, moeq.NVFP4 if case.fmt == "nvfp4" else moeq.FP8)
    cm = torch.compile(model, backend="moeq_aot_eager")
    with torch.no_grad(), moeq.calibrate(cm):
        for ids in batches:
            cm(ids)
    moeq.finalize(cm)
    res.state = moeq.quant_state(model)
    return res


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.id)
def result(request) -> Result:
    return _run(request.param)


def _layers(res: Result) -> range:
    return range(len(res.model.model.layers))


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_same_quantizers(result: Result) -> None:
    """Both tools quantize exactly the same expert GEMMs. moeq has one state per fused expert weight
    (gate_up_proj, down_proj of every layer), and modelopt has E weight quantizers plus 1 shared input
    quantizer for each of them, and no other quantizer (experts-only config). The moeq config is the
    matching preset (NVFP4 or FP8, act_scale="shared")."""
    res = result
    num_experts = res.model.config.num_experts
    expected = {f"model.layers.{i}.mlp.experts.{p}" for i in _layers(res) for p in PROJS}
    assert set(res.state) == expected
    for s in res.state.values():
        assert s.config == (moeq.NVFP4 if res.case.fmt == "nvfp4" else moeq.FP8)
        assert s.config.act_scale == "shared"
    enabled = {n for n, m in res.peer.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled}
    want = set()
    for fqn in expected:
        want.add(f"{fqn}_input_quantizer")
        want.update(f"{fqn}_weight_quantizers.{e}" for e in range(num_experts))
    assert enabled == want


def test_weight_amax_matches_modelopt(result: Result) -> None:
    """Check 1: for every layer, projection and expert, moeq's fp32 per-expert ``weight_amax[e]``
    equals modelopt's ``{proj}_weight_quantizers.{e}.amax`` (0-d bf16, converted to fp32) exactly.
    The check covers experts that received no calibration tokens."""
    res = result
    for i in _layers(res):
        experts = res.peer.model.layers[i].mlp.experts
        for p in PROJS:
            s = res.state[f"model.layers.{i}.mlp.experts.{p}"]
            quantizers = getattr(experts, f"{p}_weight_quantizers")
            assert len(quantizers) == s.num_experts
            for q in quantizers:
                assert q.amax.dim() == 0 and q.amax.dtype == torch.bfloat16
            theirs = torch.stack([q.amax for q in quantizers]).float()
            assert s.weight_amax.dtype == torch.float32 and s.weight_amax.shape == (s.num_experts,)
            assert torch.equal(s.weight_amax, theirs), (
                f"layer {i} {p}: max |moeq - modelopt| weight amax = {_maxdiff(s.weight_amax, theirs)}"
            )


def test_input_amax_matches_modelopt(result: Result) -> None:
    """Check 2: moeq's shared ``input_amax`` (shape [1]) equals modelopt's shared
    ``{proj}_input_quantizer.amax`` (0-d bf16 → fp32) exactly, for gate_up_proj (hidden states)
    and for down_proj (act(gate) * up). The down_proj equality is exact on CPU because both
    calibration paths compute bit-identical down_proj inputs; ``test_down_proj_inputs_eager_vs_grouped``
    checks this element by element."""
    res = result
    for i in _layers(res):
        experts = res.peer.model.layers[i].mlp.experts
        for p in PROJS:
            s = res.state[f"model.layers.{i}.mlp.experts.{p}"]
            q = getattr(experts, f"{p}_input_quantizer")
            assert q.amax.dim() == 0 and q.amax.dtype == torch.bfloat16
            theirs = q.amax.float().reshape(1)
            assert s.input_amax.shape == (1,) and s.input_amax.dtype == torch.float32
            assert float(s.input_amax) > 0
            assert torch.equal(s.input_amax, theirs), (
                f"layer {i} {p}: moeq input amax {s.input_amax.item()!r} != modelopt {theirs.item()!r} "
                f"(diff {_maxdiff(s.input_amax, theirs)})"
            )


def test_per_expert_input_statistics_match_eager_loop(result: Result) -> None:
    """moeq's per-expert input statistics (``observed_input_amax`` [E] and ``tokens_per_expert`` [E])
    match what modelopt's eager per-expert loop fed its shared input quantizers during the same
    calibration forward. The expected token counts come from the router's top-k ids
    (``(top_k_index == e).sum()``). The expected amax per expert is ``max|x|`` over that expert's rows
    (0 for an expert without tokens). Both match exactly. modelopt's shared amax is the max of these
    values, so this check pins down the per-expert values behind check 2."""
    res = result
    for i in _layers(res):
        num_experts = res.state[f"model.layers.{i}.mlp.experts.gate_up_proj"].num_experts
        topk = torch.cat(res.topk[i])  # [tokens over all batches, k]
        counts = torch.stack([(topk == e).sum() for e in range(num_experts)])
        for p in PROJS:
            s = res.state[f"model.layers.{i}.mlp.experts.{p}"]
            assert torch.equal(s.tokens_per_expert, counts), f"layer {i} {p}"
            # the eager loop visits the hit experts in ascending order, once per calibration batch
            expected_amax = torch.zeros(num_experts)
            calls = iter(res.inputs[(i, p)])
            for batch_topk in res.topk[i]:
                for e in range(num_experts):
                    n = int((batch_topk == e).sum())
                    if n == 0:
                        continue
                    x = next(calls)
                    assert x.shape[0] == n, f"layer {i} {p} expert {e}: {x.shape[0]} rows, {n} routed tokens"
                    expected_amax[e] = torch.maximum(expected_amax[e], x.abs().amax().float())
            assert next(calls, None) is None
            assert torch.equal(s.observed_input_amax, expected_amax), (
                f"layer {i} {p}: max per-expert |moeq - eager loop| input amax = "
                f"{_maxdiff(s.observed_input_amax, expected_amax)}"
            )


def test_down_proj_inputs_eager_vs_grouped(result: Result) -> None:
    """Investigation behind the exact down_proj input-amax check.

    modelopt computes the down_proj input per expert as ``act(gate) * up`` from
    ``F.linear(x_e, gate_up_proj[e])`` (eager loop, bf16). moeq observes the input of the second
    ``grouped_mm`` (``F.grouped_mm`` over expert-sorted rows, bf16). Here a deepcopy of the
    unquantized model is run with ``experts_implementation="grouped_mm"``, and the ``(input, offs)`` of
    every ``transformers.integrations.moe._grouped_mm`` call are recorded. Each grouped row is matched
    to the eager row of the same expert and token (rows are matched by their bit-identical gate_up
    input). The test asserts:

    * the down_proj inputs are bit-identical. Measured on torch 2.13 CPU over every case here
      (2048-8192 elements per layer): 0 elements differ and the max abs difference is 0.0. On CPU the
      grouped GEMM gives the same bf16 results per expert as ``F.linear``.
    * the per-expert amax of the grouped rows equals moeq's ``observed_input_amax``. This shows that
      moeq observed exactly these tensors.

    No tolerance is justified because the difference is exactly zero. On GPU, cuBLAS/CUTLASS grouped
    kernels may accumulate in a different order, and this bound would have to be re-measured there.
    """
    res = result
    grouped = tiny_model("qwen3_moe", torch.bfloat16, seed=res.case.seed)  # same weights, never quantized
    for n, p in grouped.named_parameters():
        assert torch.equal(p, res.weights_before[n]), n
    grouped.set_experts_implementation("grouped_mm")
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    orig = hf_moe._grouped_mm

    def recording(inp, weight, offs):
        calls.append((inp.detach().clone(), offs.clone()))
        return orig(inp, weight, offs)

    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(hf_moe, "_grouped_mm", recording)
        for ids in res.batches:
            grouped(input_ids=ids)
    n_layers = len(_layers(res))
    assert len(calls) == 2 * n_layers * len(res.batches)

    num_experts = res.model.config.num_experts
    eager_calls = {p: {i: iter(res.inputs[(i, p)]) for i in _layers(res)} for p in PROJS}
    differing = total = 0
    max_abs = 0.0
    grouped_amax = {i: torch.zeros(num_experts) for i in _layers(res)}
    for b, batch_topk in enumerate(zip(*(res.topk[i] for i in _layers(res)), strict=True)):
        for i in _layers(res):
            (xg, offs), (hg, offs_dn) = calls[2 * (b * n_layers + i)], calls[2 * (b * n_layers + i) + 1]
            assert torch.equal(offs, offs_dn)
            start = 0
            for e in range(num_experts):
                end = int(offs[e])
                assert end - start == int((batch_topk[i] == e).sum())
                if end == start:
                    continue
                xe, he = next(eager_calls["gate_up_proj"][i]), next(eager_calls["down_proj"][i])
                grouped_amax[i][e] = torch.maximum(grouped_amax[i][e], hg[start:end].abs().amax().float())
                free = list(range(start, end))
                for r in range(xe.shape[0]):
                    q = next(q for q in free if torch.equal(xg[q], xe[r]))
                    free.remove(q)
                    d = (hg[q].float() - he[r].float()).abs()
                    differing += int((d != 0).sum())
                    total += d.numel()
                    max_abs = max(max_abs, d.max().item())
                start = end
    assert total > 0
    assert differing == 0 and max_abs == 0.0, (
        f"eager-loop vs grouped_mm down_proj inputs: {differing}/{total} elements differ, max abs diff {max_abs}"
    )
    for i in _layers(res):
        s = res.state[f"model.layers.{i}.mlp.experts.down_proj"]
        assert torch.equal(s.observed_input_amax, grouped_amax[i]), f"layer {i}"


def test_modelopt_does_not_touch_moeq_model(result: Result) -> None:
    """modelopt's quantize runs on a deepcopy and leaves the moeq model alone. After ``mtq.quantize``
    and after moeq's calibrate/finalize, the moeq model's parameters are bit-identical to the
    originals and share no storage with the peer. The moeq model's experts module is still the plain
    transformers class and holds no modelopt quantizer. It still uses moeq's ``grouped_mm``
    experts implementation, while the peer was switched to ``eager`` by modelopt."""
    res = result
    params = dict(res.model.named_parameters())
    assert params.keys() == res.weights_before.keys()
    for snap in (res.weights_after_modelopt, {n: p.detach() for n, p in params.items()}):
        for n, w in res.weights_before.items():
            assert torch.equal(snap[n], w), f"{n} changed"
    peer_ptrs = {p.data_ptr() for p in res.peer.parameters()}
    assert not any(p.data_ptr() in peer_ptrs for p in params.values())
    assert not any(isinstance(m, TensorQuantizer) for m in res.model.modules())
    experts = res.model.model.layers[0].mlp.experts
    assert type(experts).__name__ == "Qwen3MoeExperts"
    assert res.model.config._experts_implementation == "grouped_mm"
    assert res.peer.config._experts_implementation == "eager"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("amax_factor", [1.0, 0.3, 5.0])
def test_nvfp4_dequantize_multiplies_as_modelopt(seed, amax_factor):
    """DESIGN's ``e2m1(q) * float(s_b) * g_e`` is computed as ``e2m1(q) * (float(s_b) * g_e)``, the order of
    nvidia-modelopt's ``NVFP4QTensor.dequantize`` (the two orders differ by an ulp now and then): moeq's packed
    codes and scales, dequantized by modelopt, give moeq's values bit for bit (modelopt's table decodes the
    negative-zero code as +0; adding +0 makes both zeros +0)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 64, generator=gen) * torch.rand(24, 1, generator=gen) * 10.0 ** (seed - 1)
    fmt = moeq.formats.get_format("nvfp4")
    q = fmt.quantize(w, (w.abs().amax() * amax_factor).view(1, 1))
    packed = NVFP4QTensor(w.shape, torch.float32, q.data)
    theirs = packed.dequantize(torch.float32, scale=q.block_scale, double_scale=q.scale, block_sizes={-1: 16})
    ours = fmt.dequantize(q, dtype=torch.float32) + 0.0
    assert torch.equal((theirs + 0.0).view(torch.int32), ours.view(torch.int32))
