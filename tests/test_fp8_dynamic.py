"""FP8 with channel-wise weight scales and dynamic per-token activation scales (``moeq.FP8_DYNAMIC``).

References, none of them moeq's own code: float64 quotients with torch's float8 cast for the numerics,
nvidia-modelopt 0.47's ``FP8_PER_CHANNEL_PER_TOKEN_CFG`` (restricted to the experts) for the per-channel weight
amaxes, the model's logits and the exported bytes, and compressed-tensors' own ``FP8_DYNAMIC`` preset for its
checkpoint config.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import moeq
from moeq.integrations.hf import tiny_model
from moeq.runtime.collectives import LayerStats, ProcessGroups, sync_tp

mtq = pytest.importorskip("modelopt.torch.quantization")
from modelopt.torch.export import export_hf_checkpoint  # noqa: E402

from tests.conftest import FULL_INDUCTOR, experts_only, explain_text, one_moe_layer, start_ranks  # noqa: E402

VOCAB = 256


def _tokens(seed: int, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _fp8_reference(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """Fake quant per the spec, computed independently: ``s = amax / 448`` and ``x / s`` as float64 quotients
    rounded once to fp32, clamped, torch's own e4m3 cast, times ``s`` in float64, rounded to fp32, back to x's
    dtype. A zero amax leaves the (all-zero) values as they are."""
    s = (amax.double() / 448.0).float()
    safe = torch.where(s == 0, torch.ones_like(s), s)
    q = (x.double() / safe.double()).float().clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()
    return (q.double() * s.double()).float().to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k_dim", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_channel_weight_fake_quant_matches_float64_reference(seed: int, k_dim: int, dtype: torch.dtype) -> None:
    """Each expert's output channel gets its own scale; the op equals the reference bit for bit, and its STE
    gradient passes everywhere (nothing exceeds its channel's amax)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(4, 24, 32, generator=g) * torch.rand(4, 24, 1, generator=g) * 3).to(dtype)
    w[1, 5] = 0  # an all-zero channel
    if k_dim == 1:
        w = w.transpose(1, 2).contiguous()  # [E, K, N]: K along dim 1
    amax = moeq.formats.channel_amax(w, 0, k_dim)
    expected_amax = w.float().abs().amax(dim=k_dim)
    assert amax.shape == (4, 24) and torch.equal(amax, expected_amax)
    ref = _fp8_reference(w, expected_amax.unsqueeze(k_dim))
    wp = w.clone().requires_grad_(True)
    out = torch.ops.moeq.fake_quant_weight(wp, amax, "fp8", 0, k_dim)
    assert torch.equal(out, ref)
    out.backward(torch.ones_like(out))
    assert torch.equal(wp.grad, torch.ones_like(w))
    # a clipped weight (above its channel's amax) gets no gradient
    low = amax.clone()
    low[2, 3] = 0.5 * low[2, 3]
    wp.grad = None
    torch.ops.moeq.fake_quant_weight(wp, low, "fp8", 0, k_dim).sum().backward()
    clipped = w.abs() > moeq.formats.expand_weight_amax(low, 3, 0, k_dim)
    assert clipped.any() and torch.equal(wp.grad == 0, clipped)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dynamic_token_fake_quant_matches_float64_reference(seed: int) -> None:
    """Each routed row is scaled by its own amax; rows past ``offs[-1]`` are returned as they are, a zero row stays
    zero, and the gradient is the identity."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(13, 40, generator=g) * torch.rand(13, 1, generator=g) * 10).to(torch.bfloat16)
    x[4] = 0
    offs = torch.tensor([3, 3, 7, 11], dtype=torch.int32)  # an empty expert; rows 11 and 12 unrouted
    ref = _fp8_reference(x, x.float().abs().amax(dim=1, keepdim=True))
    xp = x.clone().requires_grad_(True)
    out = torch.ops.moeq.fake_quant_act_dynamic(xp, offs, "fp8", 0, -1)
    assert torch.equal(out[:11], ref[:11])
    assert torch.equal(out[11:], x[11:]) and not torch.equal(ref[11:], x[11:])
    assert torch.equal(out[4], torch.zeros_like(out[4]))
    out.backward(torch.arange(13 * 40, dtype=torch.bfloat16).reshape(13, 40))
    assert torch.equal(xp.grad, torch.arange(13 * 40, dtype=torch.bfloat16).reshape(13, 40))
    batched = torch.ops.moeq.fake_quant_act_dynamic(x[:12].reshape(3, 4, 40), None, "fp8", 0, -1)
    assert torch.equal(batched.reshape(12, 40), _fp8_reference(x[:12], x[:12].float().abs().amax(1, keepdim=True)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(weight="nvfp4", activation="nvfp4", weight_scale="channel"), "weight_scale='channel' is an FP8"),
        (dict(weight="nvfp4", activation="nvfp4", act_scale="token"), "act_scale='token'"),
        (dict(weight="fp8", activation=None, act_scale="token"), "weight-only configs have no activation scale"),
        (dict(weight="fp8", activation="fp8", weight_scale="row"), "QuantConfig.weight_scale='row' is not valid"),
    ],
)
def test_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        moeq.QuantConfig(**kwargs)


def test_fake_quant_act_dynamic_refuses_nvfp4() -> None:
    with pytest.raises(ValueError, match="dynamic per-token scales are an FP8 format, got 'nvfp4'"):
        torch.ops.moeq.fake_quant_act_dynamic(torch.ones(2, 16), None, "nvfp4", 0, -1)


# ---------------------------------------------------------------------------------------------------------
# whole models against nvidia-modelopt 0.47
# ---------------------------------------------------------------------------------------------------------


_RUNS: dict[str, dict] = {}


def _run(family: str, workdir: Path) -> dict:
    """modelopt and moeq on the same tiny model: both finalized without calibration data, both exported."""
    if family in _RUNS:
        return _RUNS[family]
    ids = _tokens(0)
    layers = one_moe_layer(family)
    peer = tiny_model(family, torch.bfloat16, seed=0, **layers)
    peer.config.architectures = [type(peer).__name__]
    with torch.no_grad():
        plain = peer(input_ids=ids).logits

    def forward_loop(m: torch.nn.Module) -> None:
        with torch.no_grad():
            m(input_ids=ids)

    peer = mtq.quantize(peer, experts_only(mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG), forward_loop)
    with torch.no_grad():
        peer_logits = peer(input_ids=ids).logits
    # modelopt's per-expert axis=0 weight quantizers (its export rewrites the modules, so read them first)
    peer_amax = {
        f"{name}.{attr.removesuffix('_weight_quantizers')}": [q.amax.float().reshape(-1).clone() for q in quantizers]
        for name, module in peer.named_modules()
        for attr, quantizers in vars(module)["_modules"].items()
        if attr.endswith("_weight_quantizers")
    }
    peer_dir = workdir / f"modelopt-{family}"
    export_hf_checkpoint(peer, export_dir=peer_dir)
    torch._dynamo.reset()
    model = tiny_model(family, torch.bfloat16, seed=0, **layers)
    moeq.prepare(model, moeq.FP8_DYNAMIC)
    cm = torch.compile(model, backend="moeq_aot_eager")
    with torch.no_grad():
        cm(input_ids=ids)  # no calibrate(): dynamic activations need no data
    moeq.finalize(cm)
    with torch.no_grad():
        logits = cm(input_ids=ids).logits
    moeq_dir = moeq.export_hf(model, workdir / f"moeq-{family}", "modelopt")
    ct_dir = moeq.export_hf(model, workdir / f"moeq-ct-{family}", "compressed-tensors")
    _RUNS[family] = dict(
        ids=ids, peer_amax=peer_amax, model=model, cm=cm, plain=plain, peer_logits=peer_logits, logits=logits,
        peer_dir=peer_dir, moeq_dir=moeq_dir, ct_dir=ct_dir,
    )  # fmt: skip
    return _RUNS[family]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fp8_dynamic")


FAMILIES = ["qwen3_moe", "mixtral"]
#: more families whose per-expert export modelopt also writes (as tests/test_export.py's FP8 and NVFP4 cases)
EXPORT_FAMILIES = FAMILIES + ["olmoe", "deepseek_v3", "qwen2_moe", "glm4_moe"]


@pytest.mark.parametrize("family", FAMILIES)
def test_channel_amax_equals_modelopt(family: str, workdir: Path) -> None:
    """Every expert's per-channel weight amax equals modelopt's per-expert ``axis=0`` weight quantizer's."""
    run = _run(family, workdir)
    state = moeq.quant_state(run["model"])
    assert sorted(state) == sorted(run["peer_amax"])
    for fqn, s in state.items():
        theirs = run["peer_amax"][fqn]
        assert len(theirs) == s.num_experts == 8
        for e in range(s.num_experts):
            assert torch.equal(s.weight_amax[e], theirs[e]), f"{fqn} expert {e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_modelopt_fake_quant(family: str, workdir: Path) -> None:
    """moeq's FP8_DYNAMIC logits are modelopt's up to the rounding of their scale arithmetic (moeq follows the spec,
    ``x / (amax / 448)`` in fp32; modelopt multiplies by ``448 / amax``): the two are much closer to each other than
    to the unquantized model (measured: apart / moved 0.27 for qwen3_moe, 0.14 for mixtral)."""
    run = _run(family, workdir)
    moved = (run["logits"].float() - run["plain"].float()).norm()
    apart = (run["logits"].float() - run["peer_logits"].float()).norm()
    assert moved > 0 and apart < 0.4 * moved, (float(apart), float(moved))


def assert_matches_aot_eager(rel: float, what: object) -> None:
    """``rel``, the relative difference of ``backend="moeq"``'s result from aot_eager's unfused graphs, is 0 under the
    tests' ATen fallback (moeq's rewrites change no value) and below 5% under ``MOEQ_TEST_FULL_INDUCTOR=1``, where
    Inductor's generated bf16 kernels move the values."""
    assert rel < 0.05 if FULL_INDUCTOR else rel == 0, (what, rel)


@pytest.mark.parametrize("family", FAMILIES)
def test_inductor_backend_matches_aot_eager(family: str, workdir: Path) -> None:
    """backend='moeq' (Inductor on the CPU) fuses each expert GEMM into moeq::grouped_qmm with channel-wise weight
    scales and dynamic per-token activations (its CPU reference path here) and computes the logits of aot_eager's
    unfused graphs: bit for bit where Inductor runs ATen's kernels (the CPU tests' fallback), within 5% under
    ``MOEQ_TEST_FULL_INDUCTOR=1``."""
    from torch._inductor.utils import run_and_get_code

    run = _run(family, workdir)
    torch._dynamo.reset()
    cm = torch.compile(run["model"], backend="moeq")
    with torch.no_grad():
        logits, code = run_and_get_code(lambda: cm(input_ids=run["ids"]).logits)
    calls = "\n".join(code)
    assert calls.count("torch.ops.moeq.grouped_qmm.default(") == 2 and calls.count("'fp8_token'") == 2
    assert "fake_quant_act_dynamic" not in calls and "fake_quant_weight" not in calls
    rel = (logits.float() - run["logits"].float()).norm() / run["logits"].float().norm()
    # under full Inductor, its own bf16 kernels (attention, norms) already move the unquantized mixtral's logits by
    # 0.56% from eager, and FP8 roundings amplify that: moeq.FP8 (per tensor) 1.3%, FP8_DYNAMIC 2.1% (qwen3_moe 0.8%)
    assert_matches_aot_eager(float(rel), family)
    assert "channel-wise weight scales multiply the output columns" in explain_text(cm)
    # the fused chains compute exactly what the unfused ops do under the same backend (on the CPU, grouped_qmm's
    # reference path: formats.py operands, fp32 product)
    from moeq.lowering.inductor import fusion

    torch._dynamo.reset()
    with fusion("never"), torch.no_grad():
        unfused, code = run_and_get_code(
            lambda: torch.compile(run["model"], backend="moeq")(input_ids=run["ids"]).logits
        )
    assert "torch.ops.moeq.grouped_qmm.default(" not in "\n".join(code)
    assert torch.equal(unfused, logits)


@pytest.mark.parametrize("family", EXPORT_FAMILIES)
def test_modelopt_export_byte_parity(family: str, workdir: Path) -> None:
    """The modelopt-format checkpoint has modelopt's tensors, byte for byte, and its configs."""
    run = _run(family, workdir)
    ours, theirs = (
        load_file(str(run["moeq_dir"] / "model.safetensors")),
        load_file(str(run["peer_dir"] / "model.safetensors")),
    )
    assert set(ours) == set(theirs)
    scales = [k for k in ours if k.endswith(".weight_scale")]
    assert scales and all(ours[k].dim() == 1 and ours[k].dtype == torch.float32 for k in scales)
    assert not [k for k in ours if k.endswith("input_scale")]
    for k, t in ours.items():
        assert t.dtype == theirs[k].dtype and t.shape == theirs[k].shape, k
        assert torch.equal(
            t.contiguous().view(-1).view(torch.uint8), theirs[k].contiguous().view(-1).view(torch.uint8)
        ), k
    hq = [
        json.loads((d / "hf_quant_config.json").read_text())["quantization"] for d in (run["moeq_dir"], run["peer_dir"])
    ]
    assert hq[0] == hq[1] and hq[0]["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN"
    qc = [
        json.loads((d / "config.json").read_text())["quantization_config"] for d in (run["moeq_dir"], run["peer_dir"])
    ]
    assert qc[0].pop("producer")["name"] == "moeq"
    qc[1].pop("producer")
    assert qc[0] == qc[1]


def test_compressed_tensors_export_follows_its_fp8_dynamic_preset(workdir: Path) -> None:
    """config.json's scheme has compressed-tensors' own FP8_DYNAMIC weight and activation arguments; each expert
    weight times its ``[N, 1]`` scale is the spec's per-channel fake quant of the model's weight."""
    from compressed_tensors.quantization import preset_name_to_scheme

    run = _run("qwen3_moe", workdir)
    qc = json.loads((run["ct_dir"] / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    preset = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    for ours, theirs in ((group["weights"], preset.weights), (group["input_activations"], preset.input_activations)):
        for key in ("num_bits", "type", "symmetric", "strategy", "dynamic"):
            value = getattr(theirs, key)
            assert ours[key] == getattr(value, "value", value), key
    sd = load_file(str(run["ct_dir"] / "model.safetensors"))
    w = run["model"].model.layers[0].mlp.experts.down_proj.detach()  # [E, H, I]: experts' [N, K]
    for e in (0, 5):
        scale = sd[f"model.layers.0.mlp.experts.{e}.down_proj.weight_scale"]
        assert scale.shape == (w.shape[1], 1)
        dequant = (sd[f"model.layers.0.mlp.experts.{e}.down_proj.weight"].float().double() * scale.double()).float()
        assert torch.equal(dequant.to(w.dtype), _fp8_reference(w[e], w[e].float().abs().amax(1, keepdim=True)))


# ---------------------------------------------------------------------------------------------------------
# training, deploy, checkpoints
# ---------------------------------------------------------------------------------------------------------


def test_training_reuse_codes_and_freeze() -> None:
    """QAT gradients inside moeq.reuse_weight_codes equal the block-free step's bit for bit; after freeze the
    deployed logits equal the fake-quant logits."""
    torch._dynamo.reset()
    ids = _tokens(3)
    model = tiny_model("qwen3_moe", torch.bfloat16, seed=2, num_hidden_layers=1)
    moeq.prepare(model, moeq.FP8_DYNAMIC)
    cm = torch.compile(model, backend="moeq_aot_eager")
    with torch.no_grad():
        cm(input_ids=ids)
    moeq.finalize(cm)
    cm(input_ids=ids).logits.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if ".experts." in n}
    model.zero_grad()
    with moeq.reuse_weight_codes(cm) as report:
        cm(input_ids=ids).logits.float().square().mean().backward()
    assert len(report.reused) == 2
    for n, p in model.named_parameters():
        if ".experts." in n:
            assert torch.equal(p.grad, grads[n]), n
    with torch.no_grad():
        quantized = cm(input_ids=ids).logits
    moeq.freeze(cm)
    state = moeq.quant_state(model)["model.layers.0.mlp.experts.gate_up_proj"]
    assert state.frozen_scale.shape == state.weight_amax.shape == (8, state.weight_shape[1])
    with torch.no_grad():
        assert torch.equal(cm(input_ids=ids).logits, quantized)


def test_checkpoint_round_trip_and_config_mismatch(tmp_path: Path) -> None:
    torch._dynamo.reset()
    model = tiny_model("qwen3_moe", torch.bfloat16, seed=0, num_hidden_layers=1)
    moeq.prepare(model, moeq.FP8_DYNAMIC)
    cm = torch.compile(model, backend="moeq_aot_eager")
    with torch.no_grad():
        cm(input_ids=_tokens(0))
    moeq.finalize(cm)
    moeq.save_state(model, tmp_path / "ckpt")
    other = tiny_model("qwen3_moe", torch.bfloat16, seed=1, num_hidden_layers=1)
    moeq.prepare(other, moeq.FP8_DYNAMIC)
    moeq.load_state(other, tmp_path / "ckpt")
    for fqn, s in moeq.quant_state(model).items():
        assert torch.equal(moeq.quant_state(other)[fqn].weight_amax, s.weight_amax), fqn
    per_tensor = tiny_model("qwen3_moe", torch.bfloat16, seed=1, num_hidden_layers=1)
    moeq.prepare(per_tensor, moeq.FP8)
    with pytest.raises(moeq.io.checkpoint.CheckpointError, match="'weight_scale': \\('channel', 'expert'\\)"):
        moeq.load_state(per_tensor, tmp_path / "ckpt")


def test_finalize_flags_all_zero_channels() -> None:
    torch._dynamo.reset()
    model = tiny_model("qwen3_moe", torch.bfloat16, seed=0, num_hidden_layers=1)
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[3, :5] = 0
    moeq.prepare(model, moeq.FP8_DYNAMIC)
    cm = torch.compile(model, backend="moeq_aot_eager")
    with torch.no_grad():
        cm(input_ids=_tokens(0))
    state = moeq.finalize(cm)["model.layers.0.mlp.experts.down_proj"]
    assert state.flags == {3: "5 all-zero output channels: scale set to 1/448"}
    assert torch.equal(state.weight_amax[3, :5], torch.ones(5))


# ---------------------------------------------------------------------------------------------------------
# tensor parallelism: channel-wise amaxes of a column-parallel weight stay each rank's own
# ---------------------------------------------------------------------------------------------------------


def _tp_worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        base = torch.arange(12, dtype=torch.float32).reshape(2, 6) + 10 * rank
        stats = {
            "column": LayerStats("column", (2, 6, 4), base.clone(), torch.full((2,), float(rank)), torch.ones(2, dtype=torch.int64), channels_sharded=True),
            "row": LayerStats("row", (2, 6, 4), base.clone(), torch.full((2,), float(rank)), torch.ones(2, dtype=torch.int64)),
        }  # fmt: skip
        sync_tp(stats, ProcessGroups(tp=dist.group.WORLD))
        torch.save({k: (s.weight_amax, s.observed_input_amax) for k, s in stats.items()}, f"{out}/tp{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_tp_sync_keeps_column_parallel_channel_amax_local(tmp_path: Path) -> None:
    start_ranks(_tp_worker, (str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    base = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    for rank in range(2):
        got = torch.load(tmp_path / f"tp{rank}.pt")
        assert torch.equal(got["column"][0], base + 10 * rank)  # its own channels
        assert torch.equal(got["row"][0], base + 10)  # MAX over the K shards
        assert torch.equal(got["column"][1], torch.ones(2)) and torch.equal(got["row"][1], torch.ones(2))


def test_training_step_under_inductor_matches_aot_eager() -> None:
    """A QAT step compiled with backend='moeq' (joint-graph passes: FP8 codes with channel-wise scales saved for
    backward, grouped_qmm forwards) gives the expert gradients of the unfused aot_eager graphs: bit for bit where
    Inductor runs ATen's kernels (the CPU tests' fallback), so moeq's rewrites change no gradient; within 5% under
    ``MOEQ_TEST_FULL_INDUCTOR=1``, where Inductor's generated bf16 kernels move them."""
    from torch._inductor.utils import run_and_get_code

    ids = _tokens(4)
    model = moeq.prepare(tiny_model("qwen3_moe", torch.bfloat16, seed=4, num_hidden_layers=1), moeq.FP8_DYNAMIC)
    cm = torch.compile(model, backend="moeq_aot_eager")
    with torch.no_grad():
        cm(input_ids=ids)
    moeq.finalize(cm)
    grads = []
    for backend in ("moeq_aot_eager", "moeq"):  # one calibration; the finalized model compiled by each backend
        torch._dynamo.reset()
        model.zero_grad(set_to_none=True)
        cm = torch.compile(model, backend=backend)

        def step(cm=cm) -> None:
            cm(input_ids=ids).logits.float().square().mean().backward()

        if backend == "moeq":
            _, code = run_and_get_code(step)
            assert "torch.ops.moeq.quantize_weight.default(" in "\n".join(code)
        else:
            step()
        grads.append({n: p.grad.float() for n, p in model.named_parameters() if ".experts." in n})
        if backend == "moeq":  # the same step reading codes computed once (moeq.reuse_weight_codes): bit-equal
            model.zero_grad()
            with moeq.reuse_weight_codes(cm):
                step()
            for n, p in model.named_parameters():
                if ".experts." in n:
                    assert torch.equal(p.grad.float(), grads[-1][n]), n
    # under full Inductor, its bf16 kernels already move the unquantized model's expert gradients by 1.2% from
    # aot_eager here and FP8 roundings amplify it (moeq.FP8: 10% / 3.6%; FP8_DYNAMIC: 2.8% / 3.4% for gate_up / down)
    for name, ref in grads[0].items():
        rel = (grads[1][name] - ref).norm() / ref.norm()
        assert_matches_aot_eager(float(rel), name)


def test_transformers_loads_the_compressed_tensors_export(workdir: Path) -> None:
    """transformers + compressed-tensors (``CompressedTensorsConfig(dequantize=True)``) load the FP8_DYNAMIC export
    with no missing or unexpected key, and every expert weight they rebuild is the per-channel fake quant of the
    model's own weight (the export's codes and scales are exactly the fake quant's)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    run = _run("qwen3_moe", workdir)
    loaded, info = AutoModelForCausalLM.from_pretrained(
        run["ct_dir"],
        quantization_config=CompressedTensorsConfig(dequantize=True),
        dtype=torch.bfloat16,
        output_loading_info=True,
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    experts, theirs = run["model"].model.layers[0].mlp.experts, loaded.model.layers[0].mlp.experts
    for proj in ("gate_up_proj", "down_proj"):
        w = getattr(experts, proj).detach()
        assert torch.equal(getattr(theirs, proj).detach(), _fp8_reference(w, w.float().abs().amax(2, keepdim=True)))


# ---------------------------------------------------------------------------------------------------------
# the other FP8 granularity combinations QuantConfig allows
# ---------------------------------------------------------------------------------------------------------

COMBINATIONS = {
    "channel-static": moeq.QuantConfig(weight="fp8", activation="fp8", weight_scale="channel"),
    "expert-token": moeq.QuantConfig(weight="fp8", activation="fp8", act_scale="token"),
    "channel-w8a16": moeq.QuantConfig(weight="fp8", activation=None, weight_scale="channel"),
}


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_other_granularities_compile_export_and_reload(name: str, tmp_path: Path) -> None:
    """Each combination: Inductor (grouped_qmm on the CPU) agrees with aot_eager (bit for bit under the tests' ATen
    fallback, within 5% under ``MOEQ_TEST_FULL_INDUCTOR=1``), the compressed-tensors export has
    the matching strategies and reloads in transformers as the fake-quantized weights, and the modelopt format
    refuses it with a clear error (modelopt 0.47 has no algorithm for it)."""
    from torch._inductor.utils import run_and_get_code
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    cfg = COMBINATIONS[name]
    ids = _tokens(5)
    model = moeq.prepare(tiny_model("qwen3_moe", torch.bfloat16, seed=6, num_hidden_layers=1), cfg)
    cm = torch.compile(model, backend="moeq_aot_eager")
    with torch.no_grad(), moeq.calibrate(cm):
        cm(input_ids=ids)
    moeq.finalize(cm)
    with torch.no_grad():  # one calibration; the finalized model compiled again by each backend
        logits = [cm(input_ids=ids).logits.float()]
        out, code = run_and_get_code(lambda: torch.compile(model, backend="moeq")(input_ids=ids).logits)
    logits.append(out.float())
    assert "\n".join(code).count("torch.ops.moeq.grouped_qmm.default(") == 2
    rel = ((logits[1] - logits[0]).norm() / logits[0].norm()).item()
    assert_matches_aot_eager(rel, name)
    with pytest.raises(ValueError, match="has no modelopt checkpoint algorithm"):
        moeq.export_hf(model, tmp_path / "modelopt", "modelopt")
    out_dir = moeq.export_hf(model, tmp_path / "ct", "compressed-tensors")
    group = json.loads((out_dir / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == ("channel" if cfg.weight_scale == "channel" else "tensor")
    acts = group["input_activations"]
    if cfg.activation is None:
        assert acts is None
    else:
        assert (acts["strategy"], acts["dynamic"]) == (
            ("token", True) if cfg.dynamic_activations else ("tensor", False)
        )
    loaded = AutoModelForCausalLM.from_pretrained(
        out_dir, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.bfloat16
    )
    w = model.model.layers[0].mlp.experts.down_proj.detach()
    if cfg.weight_scale == "channel":  # divided in fp32: exactly the fake quant
        expected = _fp8_reference(w, w.float().abs().amax(2, keepdim=True))
    else:  # per tensor, divided in the weight's bf16 (the modelopt-parity export rule of the numerics spec)
        s = (w.float().abs().amax((1, 2)).double() / 448.0).float()
        codes = torch.stack([w[e] / s[e].reshape(()) for e in range(w.shape[0])]).float().clamp(-448.0, 448.0)
        expected = (codes.to(torch.float8_e4m3fn).double() * s.double().view(-1, 1, 1)).float().to(w.dtype)
    assert torch.equal(loaded.model.layers[0].mlp.experts.down_proj.detach(), expected)


@pytest.mark.parametrize("layout", ["halves", "interleaved", "plain"])
@pytest.mark.parametrize("size", [2, 4])
def test_channel_amax_tp_join_and_split_are_inverse(layout: str, size: int) -> None:
    """Checkpoint channel order under TP: each part of a fused weight (gate, up) is split over the ranks; joining the
    ranks' local amaxes puts every channel at its unsharded position, and splitting gives each rank its own back."""
    from moeq.io.checkpoint import _tp_positions
    from moeq.io.hf_layout import first_half, second_half

    parts = {
        "halves": [first_half, second_half],
        "interleaved": [lambda t: t[0::2], lambda t: t[1::2]],
        "plain": [lambda t: t],
    }[layout]
    n = 48
    unsharded = torch.arange(n, dtype=torch.float32)  # channel c holds the value c
    # what TP rank r holds: its slice of every part, parts in the weight's own (local) layout
    local = []
    for rank in range(size):
        slices = [rows(unsharded).chunk(size)[rank] for rows in parts]
        if layout == "interleaved":
            local.append(torch.stack(slices, 1).reshape(-1))
        else:
            local.append(torch.cat(slices))
    joined = torch.zeros(n)
    for rank in range(size):
        glob, loc = _tp_positions(parts, n, size, rank)
        joined[glob] = local[rank][loc]
        back = torch.zeros(n // size)
        back[loc] = unsharded[glob]
        assert torch.equal(back, local[rank])
    assert torch.equal(joined, unsharded)
