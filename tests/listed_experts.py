"""A tiny transformers Qwen3-MoE whose fused experts are a per-expert module list (``experts.{e}.gate_proj`` ...),
the layout of transformers 4 and of remote-code MoE models. Shared by the module-list export tests and their EP
worker (which must not import the test modules)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from moeq.integrations.hf import tiny_model


class ExpertMLP(nn.Module):
    """One expert as transformers 4 wrote Qwen3-MoE's: three bias-free linears."""

    def __init__(self, hidden: int, intermediate: int, act: nn.Module, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ListedExperts(nn.ModuleList):
    """The experts as a module list, called like transformers' fused experts: rows sorted by expert, one piece
    per expert (sizes from ``tolist()``: one graph with ``capture_scalar_outputs``), outputs weighted and summed."""

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        flat = top_k_index.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // top_k_index.shape[-1]
        counts = (flat[:, None] == torch.arange(len(self), device=flat.device)).sum(0).tolist()
        out = torch.cat([expert(rows) for expert, rows in zip(self, hidden[token].split(counts))])
        out = out * top_k_weights.reshape(-1)[order, None].to(out.dtype)
        return torch.zeros_like(hidden).index_add_(0, token, out)


class ListedQwen3MoeSparseMoeBlock(Qwen3MoeSparseMoeBlock):
    """Qwen3-MoE's block with module-list experts, as a type of its own: modelopt registers a quantized wrapper per
    MoE-block type on first sight (a sequential MoE for this one), which would otherwise apply to every later fused
    Qwen3-MoE block in the same process. modelopt's export finds the per-expert linear names by the type's name, which
    still contains ``Qwen3MoeSparseMoeBlock``."""


def listed_model(seed: int = 0, bias: bool = False, keep: slice | None = None) -> nn.Module:
    """The tiny Qwen3-MoE (one layer) with its fused experts split into a module list (same weights; ``bias``: the
    down projections get random biases, which the fused model does not have; ``keep``: only these experts stay in the
    list, renumbered from 0, as on one expert-parallel rank)."""
    model = tiny_model("qwen3_moe", torch.bfloat16, seed=seed, num_hidden_layers=1)
    for layer in model.model.layers:
        fused = layer.mlp.experts
        num, two_i, hidden = fused.gate_up_proj.shape
        inter = two_i // 2
        experts = ListedExperts(ExpertMLP(hidden, inter, fused.act_fn, bias) for _ in range(num)).to(torch.bfloat16)
        with torch.no_grad():
            for e, expert in enumerate(experts):
                expert.gate_proj.weight.copy_(fused.gate_up_proj[e, :inter])
                expert.up_proj.weight.copy_(fused.gate_up_proj[e, inter:])
                expert.down_proj.weight.copy_(fused.down_proj[e])
                if bias:
                    expert.down_proj.bias.copy_(torch.randn(hidden, generator=torch.Generator().manual_seed(e)))
        layer.mlp.experts = experts if keep is None else ListedExperts(list(experts)[keep])
        layer.mlp.__class__ = ListedQwen3MoeSparseMoeBlock
    model.config.architectures = [type(model).__name__]  # modelopt's export reads it
    return model
