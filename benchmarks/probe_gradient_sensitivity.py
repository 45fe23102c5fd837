"""Probe (CPU): how far a QAT FP8 training step's expert gradients move under last-bit changes of the forward.

The tiny Qwen3-MoE of the GPU tests (2 layers, batch 4 x 64 tokens), prepared with ``moeq.FP8``, compiled with
``backend="moeq"`` and ``fusion("never")``; each MoE block's output multiplied by ``1 + eps * u`` (``u`` uniform in [-1, 1]; Inductor
fuses the product before the output's bf16 rounding, so even ``eps`` far below a bf16 ulp moves the rounding of some
elements). Prints the loss change and each expert gradient's relative change against the unperturbed step: the
noise floor that bounds how closely two correct implementations (FP8 MMA vs fp32 accumulation, say) can agree.
``tests/test_gpu.py``'s training-step bound cites it. Session 16 (CPU): eps 0 reproduces the gradients exactly;
eps 2^-12 .. 2^-8 moves them by 0.6-2.8% (layer 1's down_proj the most), 2^-7 by 1.7-6.7%.

    python benchmarks/probe_gradient_sensitivity.py
"""

from __future__ import annotations

import warnings

import torch

import moeq
from moeq.integrations.hf import expert_parameter_names, tiny_model
from moeq.lowering.inductor import fusion

EPSILONS = (0.0, 2**-12, 2**-10, 2**-8, 2**-7)


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = moeq.prepare(tiny_model("qwen3_moe", torch.bfloat16), moeq.FP8)
    tokens = torch.randint(0, model.config.vocab_size, (4, 64))
    eps = [0.0]
    for name, module in model.named_modules():
        if name.endswith("mlp.experts"):
            module.register_forward_hook(
                lambda m, i, out: (out * (1 + eps[0] * (torch.rand_like(out, dtype=torch.float32) * 2 - 1))).to(
                    out.dtype
                )
            )
    with fusion("never"):
        cm = torch.compile(model, backend="moeq")
        with torch.no_grad(), moeq.calibrate(cm):
            cm(tokens)
        moeq.finalize(cm)
        model.train()

        def step(value: float) -> tuple[float, dict[str, torch.Tensor]]:
            torch.manual_seed(1)
            eps[0] = value
            model.zero_grad(set_to_none=True)
            loss = cm(tokens, labels=tokens).loss
            loss.backward()
            return loss.item(), {n: model.get_parameter(n).grad.double().clone() for n in expert_parameter_names(model)}

        loss0, grads0 = step(0.0)
        for value in EPSILONS:
            loss, grads = step(value)
            moved = {n.split("layers.")[1]: ((grads[n] - grads0[n]).norm() / grads0[n].norm()).item() for n in grads}
            print(f"eps {value:.2e}: "
                  f"loss {abs(loss - loss0) / loss0:.1e}, " + ", ".join(f"{n} {v:.2%}" for n, v in moved.items()))  # fmt: skip


if __name__ == "__main__":
    main()
