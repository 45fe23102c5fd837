"""Calibrate a tiny MoE, then export it for serving engines in both checkpoint formats.

python examples/export_for_vllm.py [--family qwen3_moe|mixtral|gpt_oss] [--config NVFP4|FP8] [--out DIR]

1. build a tiny random-weight transformers MoE (no download) and ``moeq.prepare`` it;
2. calibrate under ``torch.compile`` and ``moeq.finalize``;
3. ``moeq.export_hf`` in ``modelopt`` format (vLLM / SGLang / TensorRT-LLM read ``hf_quant_config.json``) and
   in ``compressed-tensors`` format (vLLM reads ``config.json``'s ``quantization_config``);
4. print each output tree with file sizes and a few per-expert tensors (shards
   are kept small here to show the sharded layout).

A real model is exported the same way: ``AutoModelForCausalLM.from_pretrained(...)`` instead of
``tiny_model``, your calibration data instead of random tokens, and ``tokenizer=`` to save its tokenizer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open

import moeq
from moeq.integrations.hf import tiny_model


def print_tree(root: Path) -> None:
    """The directory listing with sizes, then the first expert's tensors of the first layer."""
    print(f"{root}/")
    for path in sorted(root.iterdir()):
        print(f"  {path.name:<40} {path.stat().st_size:>9,d} bytes")
    index = root / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    for name in files:
        with safe_open(str(root / name), "pt") as f:
            for key in sorted(f.keys()):
                if "layers.0." in key and ".experts.0." in key:
                    t = f.get_tensor(key)
                    print(f"    {key:<58} {str(t.dtype).removeprefix('torch.'):<14} {list(t.shape)}")
    config = json.loads((root / "config.json").read_text())["quantization_config"]
    print(f"  quantization_config: quant_method={config['quant_method']!r}", end="")
    print(f", format={config['format']!r}" if "format" in config else f", quant_algo={config['quant_algo']!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen3_moe")
    parser.add_argument("--config", default="NVFP4", choices=["NVFP4", "FP8"])
    parser.add_argument("--out", default="exported", type=Path)
    args = parser.parse_args()

    model = tiny_model(args.family, torch.bfloat16, seed=0)
    moeq.prepare(model, getattr(moeq, args.config))
    cmodel = torch.compile(model, backend="moeq_aot_eager")
    tokens = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), moeq.calibrate(cmodel):
        cmodel(tokens)
    moeq.finalize(cmodel)

    for fmt in ("modelopt", "compressed-tensors"):
        out = moeq.export_hf(cmodel, args.out / fmt, format=fmt, max_shard_size="100KB", overwrite=True)
        print_tree(out)


if __name__ == "__main__":
    main()
