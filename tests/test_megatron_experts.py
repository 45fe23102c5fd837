"""Megatron-core's ``SequentialMLP`` (a module list of per-expert MLPs over ``torch.split`` pieces, the only expert
class megatron-core 0.16 builds without Transformer Engine or the ``grouped_gemm`` package), compiled with moeq.

Its expert GEMMs sit inside ``autograd_function_apply`` subgraphs (megatron's linears are autograd Functions) on
separate 2-D parameters, with split sizes from ``tokens_per_expert.tolist()``: moeq does not quantize such loops
yet, and must say so per expert (never a silent skip, never "dense"), and ``finalize`` must name the reason.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import moeq

megatron_experts = pytest.importorskip("megatron.core.transformer.moe.experts")

E, HIDDEN, FFN = 4, 32, 64


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A one-process gloo group (megatron's linears ask for their tensor-parallel group) rendezvousing through a file
    (no port to collide with other runs); megatron's ``parallel_state`` stays uninitialized, so its process groups
    come from a hand-built collection."""
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        store = tmp_path_factory.mktemp("gloo") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield dist.group.WORLD
    if created:
        dist.destroy_process_group()


def sequential_mlp(group) -> torch.nn.Module:
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.mlp import MLPSubmodules

    torch.manual_seed(0)
    cfg = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=FFN, moe_ffn_hidden_size=FFN,
        num_moe_experts=E, gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        bias_activation_fusion=False, use_cpu_initialization=True, params_dtype=torch.float32,
        gradient_accumulation_fusion=False,
    )  # fmt: skip
    groups = ProcessGroupCollection(tp=group, ep=group, expt_tp=group, expt_dp=group)
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return megatron_experts.SequentialMLP(E, cfg, submodules, pg_collection=groups)


@pytest.mark.parametrize("how", ["dynamo", "export"])
def test_sequential_mlp_experts_are_reported_per_expert(world, how, caplog):
    """Compiled with moeq (one Dynamo graph with ``capture_scalar_outputs``) or exported (non-strict) and passed to
    ``quantize_graph``, every expert GEMM of the loop is reported as an expert GEMM not quantized, naming its expert
    and FQN; the graph still computes the eager output; ``finalize`` refuses with the reason instead of "run the model
    compiled with backend='moeq'". ``prepare`` already warns that the module list stays unquantized."""
    with caplog.at_level("WARNING", logger="moeq.api"):
        model = moeq.prepare(sequential_mlp(world), moeq.FP8)
    assert f"local_experts holds {E} experts as a module list of separate 2-D weights" in caplog.text
    x, probs = torch.randn(10, HIDDEN), torch.rand(10)
    tokens_per_expert = torch.tensor([3, 0, 5, 2])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want, _ = model(x, tokens_per_expert, probs)
        if how == "dynamo":
            compiled = torch.compile(model, backend="moeq_aot_eager")
        else:
            exported = torch.export.export(model, (x, tokens_per_expert, probs), strict=False)
            compiled = moeq.quantize_graph(exported)
        with torch._dynamo.config.patch(capture_scalar_outputs=True), moeq.calibrate(compiled):
            got, _ = compiled(x, tokens_per_expert, probs)
    torch.testing.assert_close(got, want)
    skipped = moeq.explain(compiled).skipped
    fqns = [f"local_experts.{e}.linear_fc{i}.weight" for e in range(E) for i in (1, 2)]
    assert sorted(s.weight_fqn for s in skipped) == sorted(fqns)
    for s in skipped:
        expert = s.weight_fqn.split(".")[1]
        assert s.category == "expert", s
        assert f"2-D weight of expert {expert} in a per-expert module list" in s.reason and "not quantized" in s.reason
    with pytest.raises(RuntimeError, match=r"8 expert GEMMs, none of which moeq can rewrite; the first, on local_"):
        moeq.finalize(compiled)
