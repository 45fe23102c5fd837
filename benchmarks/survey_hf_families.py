"""Which transformers MoE families moeq quantizes out of the box.

For every causal-LM family of the installed transformers whose modeling code routes tokens to experts, build a
tiny random model (2 layers, hidden 64, 8 experts, top-2), ``moeq.prepare`` it under FP8, compile it with
``backend="moeq_aot_eager"``, calibrate on one batch, finalize, and run it quantized. One row per family:
expert weights in the model, expert GEMMs rewritten, the reasons for candidates not rewritten (dense GEMMs
left out), and the quantized output's relative error against the unquantized model.

    python benchmarks/survey_hf_families.py [--families qwen2_moe,dbrx] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
import traceback
import warnings

import torch

import moeq
from moeq.config import CALIB_MODES, PRESETS
from moeq.integrations.hf import TINY_COMMON

COMMON = dict(
    TINY_COMMON,
    intermediate_size=64,
    moe_intermediate_size=32,
    expert_intermediate_size=32,
    num_experts=8,
    num_local_experts=8,
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_topk=2,
    top_k=2,
    first_k_dense_replace=0,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    pad_token_id=0,
)
_MLA = dict(  # DeepSeek-style latent attention
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=16,
    num_key_value_heads=4,
    n_group=2,
    topk_group=1,
    n_shared_experts=1,
)
_HYBRID = dict(layer_types=["linear_attention", "full_attention"])
#: families whose config does not take the common keys (or needs the MoE block switched on)
OVERRIDES = {
    "dbrx": dict(
        d_model=64,
        n_heads=4,
        n_layers=2,
        max_seq_len=128,
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(hidden_size=64, ffn_hidden_size=32, moe_num_experts=8, moe_top_k=2),
    ),
    **dict.fromkeys(
        ["deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite", "glm_moe_dsa", "longcat_flash", "axk1", "axk2"],
        _MLA,
    ),
    "dots1": dict(n_shared_experts=1),
    "beam": dict(mlp_layer_types=["sparse", "sparse"], n_group=2, topk_group=1),
    "bailing_hybrid": dict(n_group=2, topk_group=1),
    "kolibri1_1": dict(index_num_heads=2),
    "dots3_note": dict(num_key_value_heads=4),
    "zaya": dict(num_experts_per_tok=1),
    "doge": dict(is_moe=True),
    "gemma4": dict(enable_moe_block=True, top_k_experts=2),
    "jamba": dict(expert_layer_period=1, expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=0),
    "qwen3_next": _HYBRID,
    "qwen3_5_moe": _HYBRID,
    "qwen4_exp": _HYBRID,
}
#: families whose causal LM takes a text config of another model type
CONFIG_TYPE = {
    "llama4": "llama4_text",
    "qwen3_5_moe": "qwen3_5_moe_text",
    "qwen4_exp": "qwen4_exp_text",
    "gemma4": "gemma4_text",
}
DENSE = "dense GEMM on 2-D weight"


def moe_families() -> list[str]:
    """Model types with a causal-LM class whose modeling code has routed experts."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = pathlib.Path(transformers.__file__).parent / "models"
    found = []
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        src = (
            "".join(p.read_text() for p in (root / model_type).glob("modeling_*.py"))
            if (root / model_type).exists()
            else ""
        )
        if "experts" in src and any(k in src for k in ("num_experts", "num_local_experts", "n_routed_experts")):
            found.append(model_type)
    return found


def tiny(model_type: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config_type = CONFIG_TYPE.get(model_type, model_type)
    config = transformers.AutoConfig.for_model(config_type, **{**COMMON, **OVERRIDES.get(model_type, {})})
    torch.manual_seed(0)
    model = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config_type])(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3:
                p.normal_(0.0, 0.05)
    return model.to(dtype).eval()


def survey(model_type: str, dtype: torch.dtype, config: moeq.QuantConfig = moeq.FP8) -> dict:
    row: dict = {"family": model_type}
    t0 = time.perf_counter()
    try:
        model = tiny(model_type, dtype)
    except Exception as err:  # noqa: BLE001 - a family that cannot be built tiny is reported, not fatal
        row["status"] = f"build failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        return row
    expert_weights = [
        n
        for n, p in model.named_parameters()
        if "expert" in n
        and p.dim() >= 2
        and not any(k in n for k in ("shared", "norm", "router"))
        and not n.endswith("bias")
    ]
    row["expert_weights"] = len(expert_weights)
    tokens = torch.randint(1, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            ref = model(tokens, use_cache=False).logits
    except Exception as err:  # noqa: BLE001 - the tiny config does not suit the family: not moeq's failure
        row["status"] = f"unquantized forward failed: {type(err).__name__}: {str(err).splitlines()[0][:100]}"
        return row
    try:
        with torch.no_grad():
            moeq.prepare(model, config)
            cmodel = torch.compile(model, backend="moeq_aot_eager")
            with moeq.calibrate(cmodel):
                cmodel(tokens, use_cache=False)
            moeq.finalize(cmodel)
            out = cmodel(tokens, use_cache=False).logits
        report = moeq.explain(cmodel)
        row["rewritten"] = len(report.rewritten)
        row["forms"] = sorted({r.form for r in report.rewritten})
        row["missed"] = sorted(set(expert_weights) - {r.fqn for r in report.rewritten})
        row["not_rewritten"] = sorted({s.reason for s in report.skipped if not s.reason.startswith(DENSE)})
        row["rel_err"] = float((out.float() - ref.float()).norm() / ref.float().norm())
        row["min_tokens_per_expert"] = min(int(s.tokens_per_expert.min()) for s in moeq.quant_state(model).values())
        row["status"] = "ok" if row["rewritten"] and not row["missed"] else "expert weights missed"
        if row["status"] == "ok" and config.calib == "all_experts" and row["min_tokens_per_expert"] < tokens.numel():
            row["status"] = "an expert saw fewer rows than calibration tokens under calib='all_experts'"
        if row["status"] == "ok" and row["rel_err"] == 0:  # look closer: are the experts in the output path?
            row["status"] = "ok, but the quantized output equals the unquantized one"
    except Exception as err:  # noqa: BLE001
        row["status"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
        row["traceback"] = traceback.format_exc()[-2000:]
    finally:
        torch._dynamo.reset()
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="", help="comma-separated model types (default: all MoE families)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", default="", help="write the rows here")
    parser.add_argument("--config", default="FP8", choices=PRESETS, help="the moeq preset to quantize with")
    parser.add_argument("--calib", default="routed", choices=CALIB_MODES, help="QuantConfig.calib")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    families = args.families.split(",") if args.families else moe_families()
    rows = []
    for family in families:
        row = survey(family, getattr(torch, args.dtype), getattr(moeq, args.config).replace(calib=args.calib))
        rows.append(row)
        print(
            f"{family:22s} {row['status'][:70]:70s} weights={row.get('expert_weights', '-')} "
            f"rewritten={row.get('rewritten', '-')} rel_err={row.get('rel_err', float('nan')):.3g} "
            f"min_tokens={row.get('min_tokens_per_expert', '-')} "
            f"{row.get('forms', '')} {row.get('missed', '')} {row.get('not_rewritten', '')}",
            flush=True,
        )
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
