"""Are moeq's QAT NVFP4 layer outputs the same bits with ``gather_quant`` on and off on the GPU? Session 40's
``bench_e2e_modelopt.py --ab-gather`` (H100) found them different once each side ran its own graph. This prints, per
token count: whether each side is deterministic (two calls), how many output elements differ between the sides and
by how much, and whether the quantized activations themselves differ: ``fake_quant_act(tokens)[i]`` against
``fake_quant_act(tokens[i])`` on the batch with its own amax (a compiled graph's intermediate cannot be read, so the
two orders are computed directly).

    python benchmarks/diag_gather_quant_bits.py --tokens 4096,16384
"""

from __future__ import annotations

import argparse
import copy

import torch
from bench_e2e_modelopt import moeq_layer, output, qwen3_30b_a3b_layer

from moeq.lowering import gather_quant
from moeq.runtime.kernels import fake_quant_act


def differ(a: torch.Tensor, b: torch.Tensor) -> str:
    bad = a.float() != b.float()
    if not bad.any():
        return "bit-equal"
    return f"{int(bad.sum())} of {bad.numel()} differ, max |diff| {(a.float() - b.float()).abs().max().item():.3e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="4096,16384")
    args = parser.parse_args()
    base = qwen3_30b_a3b_layer("cuda")
    hidden = base.mlp.gate.weight.shape[1]
    calib = torch.randn(4, 512, hidden, device="cuda", dtype=torch.bfloat16)
    batches = [torch.randn(1, int(t), hidden, device="cuda", dtype=torch.bfloat16) for t in args.tokens.split(",")]
    outs = {}
    for name, flag in (("on", True), ("off", False)):
        torch._dynamo.reset()
        with gather_quant.enabled(flag), torch.no_grad():
            layer = moeq_layer(copy.deepcopy(base), calib)
            for x in batches:
                first, second = output(layer(x)), output(layer(x))
                outs[name, x.shape[1]] = first
                print(f"{name} {x.shape[1]} tokens: two calls {differ(first, second)}", flush=True)
    for x in batches:
        print(f"{x.shape[1]} tokens: on vs off {differ(outs['on', x.shape[1]], outs['off', x.shape[1]])}", flush=True)
        tokens = x.reshape(-1, hidden)
        index = torch.randint(tokens.shape[0], (8 * tokens.shape[0],), device="cuda")
        amax = tokens.abs().amax().float().reshape(1)
        whole = fake_quant_act(tokens, torch.tensor([tokens.shape[0]], dtype=torch.int32, device="cuda"), amax, "nvfp4")
        rows = tokens[index]
        offs = torch.tensor([rows.shape[0]], dtype=torch.int32, device="cuda")
        print(f"  fake_quant_act(tokens)[i] vs fake_quant_act(tokens[i]): "
              f"{differ(whole[index], fake_quant_act(rows, offs, amax, 'nvfp4'))}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
