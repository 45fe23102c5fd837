"""transformers integration: switch experts to ``grouped_mm``, route every calibration token to every expert
(``QuantConfig(calib="all_experts")``: pre-hooks on experts modules and module-list MoE blocks), and build tiny
MoE models from config.

The tiny models have random weights and tiny hidden sizes; nothing is downloaded. They are what
``moeq demo`` / ``moeq inspect`` and the test-suite run on.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

__all__ = [
    "TINY_COMMON",
    "TINY_FAMILIES",
    "TINY_FAMILIES_BF16_ONLY",
    "expert_parameter_names",
    "is_module_list_moe_block",
    "is_routed_experts_module",
    "route_block_to_all_experts",
    "route_to_all_experts",
    "tiny_model",
    "use_grouped_experts",
]

logger = logging.getLogger(__name__)

#: config keys every tiny family shares (2 layers, hidden 64, vocab 256)
TINY_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
    max_position_embeddings=128,
)

#: the Qwen MoE families' routed experts (every layer sparse)
_QWEN_MOE = dict(
    intermediate_size=128,
    moe_intermediate_size=32,
    num_experts=8,
    num_experts_per_tok=2,
    decoder_sparse_step=1,
    mlp_only_layers=[],
)

#: family -> (config class name, model class name, config overrides)
TINY_FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", _QWEN_MOE),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2)),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            intermediate_size=128,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            num_hidden_layers=3,
            num_key_value_heads=4,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_rope_head_dim=16,
            qk_nope_head_dim=16,
            v_head_dim=16,
        ),
    ),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(_QWEN_MOE, shared_expert_intermediate_size=64)),
    "qwen3_next": (  # hybrid: linear (gated delta) attention, then full attention
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        dict(
            _QWEN_MOE,
            shared_expert_intermediate_size=64,
            layer_types=["linear_attention", "full_attention"],
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
        ),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(
            intermediate_size=128,
            moe_intermediate_size=32,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=0,
            n_group=1,
            topk_group=1,
        ),
    ),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(intermediate_size=32, num_local_experts=8)),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(intermediate_size=32, num_local_experts=8)),
    "llama4": (  # experts as bmm over [E, K, N] weights, top-1 with a shared expert
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        dict(intermediate_size=32, intermediate_size_mlp=64, num_local_experts=8, num_experts_per_tok=1),
    ),
    "jetmoe": (  # per-expert loops (MoE MLP and mixture-of-attention experts), bf16 only
        "JetMoeConfig",
        "JetMoeForCausalLM",
        dict(intermediate_size=32, kv_channels=16, num_local_experts=8, num_experts_per_tok=2),
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            intermediate_size=32,
            num_local_experts=8,
            num_experts_per_tok=2,
            layer_types=["full_attention", "sliding_attention"],
            sliding_window=16,
        ),
    ),
}

#: families whose experts are per-expert loops: moeq rewrites them into ``torch._grouped_mm``, which takes bf16 only,
#: so they quantize when run in bf16
TINY_FAMILIES_BF16_ONLY = frozenset({"jetmoe"})


def use_grouped_experts(model: nn.Module) -> bool:
    """Switch a transformers model's experts to the ``grouped_mm`` implementation (one grouped GEMM per
    projection instead of a per-expert loop). Returns True if the model supports the switch."""
    setter = getattr(model, "set_experts_implementation", None)
    if setter is None:
        return False
    switchable = getattr(type(model), "_can_set_experts_implementation", None)
    if switchable is not None and not switchable():
        # e.g. Llama 4 (experts as a bmm) or JetMoE (per-expert loops): moeq rewrites the form the model has
        logger.info(
            "moeq: %s has no experts implementation to switch; its experts run as written", type(model).__name__
        )
        return False
    try:
        setter("grouped_mm")
    except (ValueError, KeyError, AttributeError) as err:
        logger.warning("moeq: could not switch %s experts to grouped_mm: %s", type(model).__name__, err)
        return False
    return True


def is_routed_experts_module(module: nn.Module) -> bool:
    """A transformers 5 experts module (``@use_experts_implementation``): ``num_experts`` stacked experts called
    as ``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``, whichever implementation."""
    return (
        hasattr(module, "num_experts")
        and hasattr(module, "has_gate")
        and callable(getattr(module, "_apply_gate", None))
    )


#: ``calib="all_experts"`` sends every token to this many times ``top_k`` experts per extra experts call (so the
#: call holds at most that many times the routed call's rows: DeepSeek-V3's 256 experts at top-8 take 8 calls of
#: 32 experts each, not one call with 32x the activation memory)
ALL_EXPERTS_CALL_WIDTH = 4


def route_to_all_experts(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Forward pre-hook (``with_kwargs=True``) on a transformers experts module for ``QuantConfig(calib=
    "all_experts")``: while the model calibrates, first run the experts on every token for every expert (outputs
    dropped; ``ALL_EXPERTS_CALL_WIDTH * top_k`` experts per call), so each expert's observers see every calibration
    token; then the routed call runs as usual and gives the output. As nvidia-modelopt's
    ``moe_calib_experts_ratio=1.0``: statistics over both, the routed rows being a subset; the model's output is the
    routed one, unchanged.

    ``module._moeq_mode`` (moeq's mode box) is read here, so Dynamo traces the extra call only into graphs
    compiled for calibration."""
    if not module._moeq_mode.calibrating_all_experts():
        return None
    if getattr(module, "_is_expert_parallel", False):
        raise RuntimeError(
            f"moeq: calib='all_experts' on {type(module).__name__} under transformers' expert parallelism: this rank "
            "holds only its experts and sees only the tokens routed to it; calibrate with calib='routed'"
        )
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    top_k_index = kwargs["top_k_index"] if "top_k_index" in kwargs else args[1]
    tokens, experts = hidden.shape[0], module.num_experts
    width = min(experts, ALL_EXPERTS_CALL_WIDTH * top_k_index.shape[-1])
    for first in range(0, experts, width):
        chosen = torch.arange(first, min(first + width, experts), device=hidden.device).expand(tokens, -1)
        type(module).forward(module, hidden, chosen, hidden.new_zeros(chosen.shape))
    return None


def _top_k_owner(block: nn.Module) -> nn.Module | None:
    """Where a MoE block keeps its routing ``top_k``: its gate (transformers 5 routers, remote-code ``MoEGate``s) or
    the block itself (transformers 4's Mixtral / Qwen-MoE blocks)."""
    for owner in (getattr(block, "gate", None), block):
        if isinstance(getattr(owner, "top_k", None), int):
            return owner
    return None


def _num_routed_experts(block: nn.Module) -> int:
    """How many experts the block's router chooses from: its gate's or its own ``num_experts`` /
    ``n_routed_experts`` (the global count under expert parallelism), else the list's length."""
    for owner in (block.gate, block):
        for name in ("num_experts", "n_routed_experts"):
            if isinstance(getattr(owner, name, None), int):
                return getattr(owner, name)
    return len(block.experts)


def is_module_list_moe_block(module: nn.Module) -> bool:
    """A MoE block whose experts are a module list called from the block's own forward, routed by an integer
    ``top_k`` on its gate or on itself (transformers 4 layouts, remote-code models): the structure nvidia-modelopt
    calls a sparse sequential MoE."""
    experts, gate = getattr(module, "experts", None), getattr(module, "gate", None)
    return isinstance(experts, nn.ModuleList) and isinstance(gate, nn.Module) and _top_k_owner(module) is not None


def route_block_to_all_experts(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Forward pre-hook (``with_kwargs=True``) on a module-list MoE block for ``QuantConfig(calib="all_experts")``:
    while the model calibrates, first run the block with ``top_k`` raised to the number of experts (the output is
    dropped), then the routed forward runs as usual, as nvidia-modelopt's ``moe_calib_experts_ratio=1.0`` does
    for these blocks. The mode box read makes Dynamo trace the extra forward into calibration graphs only."""
    if not block._moeq_mode.calibrating_all_experts():
        return None
    owner = _top_k_owner(block)
    top_k = owner.top_k
    owner.top_k = _num_routed_experts(block)
    try:
        type(block).forward(block, *args, **kwargs)
    finally:
        owner.top_k = top_k
    return None


def tiny_model(
    family: str = "qwen3_moe", dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: Any
) -> nn.Module:
    """A tiny transformers MoE of ``family`` with random weights (no download), in eval mode."""
    import transformers

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {sorted(TINY_FAMILIES)}")
    config_cls, model_cls, extra = TINY_FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**TINY_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 3:  # HF leaves fused expert weights to _init_weights; make them well-scaled
                p.normal_(0.0, 0.05)
            elif name.endswith("_bias"):
                p.normal_(0.0, 0.02)
    return model.to(dtype).eval()


def expert_parameter_names(model: nn.Module) -> list[str]:
    """FQNs of the routed-expert weight parameters (3-D, under an ``experts`` module; biases excluded)."""
    return [n for n, p in model.named_parameters() if p.dim() == 3 and ".experts." in n]
