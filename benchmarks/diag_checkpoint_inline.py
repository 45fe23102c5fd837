"""Why does a checkpointed expert module go unrewritten on the GPU machine (torch 2.11)? Compiles the tiny Qwen3-MoE
with Hugging Face gradient checkpointing on the CPU and on CUDA, logging moeq at INFO, and prints what the backend
sees: each tag_activation_checkpoint node (kwargs, body meta, whether moeq's marker is in the body), the explain
report and the loss / grad check against the uncheckpointed model."""

from __future__ import annotations

import logging
import sys

import torch

import moeq
from moeq.lowering import backend as backend_module
from moeq.lowering.ops import EXPERT_MODULE_ENTRY_TARGETS
from tests.conftest import plain_and_checkpointed_qat_steps

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s %(levelname)s %(message)s")
for name in ("torch", "torch._dynamo", "torch._inductor"):
    logging.getLogger(name).setLevel(logging.WARNING)

original = backend_module._compile


def dumping_compile(gm, *args, **kwargs):
    for node in gm.graph.nodes:
        if node.op == "call_function" and "checkpoint" in str(node.target):
            body = getattr(gm, node.args[0].target)
            marker = any(n.target in EXPERT_MODULE_ENTRY_TARGETS for n in body.graph.nodes)
            print(
                "CKPT",
                node.target,
                "kwargs",
                {k: str(v)[:80] for k, v in node.kwargs.items()},
                "body.meta",
                sorted(body.meta),
                "marker",
                marker,
                "nested",
                [n.target for n in body.graph.nodes if n.op in ("get_attr", "call_module")],
                "placeholders",
                sum(n.op == "placeholder" for n in body.graph.nodes),
                "args",
                len(node.args) - 1,
                "users",
                sorted({str(u.target) for u in node.users}),
            )
    return original(gm, *args, **kwargs)


backend_module._compile = dumping_compile
print(torch.__version__, moeq.__file__)
for device, backend in [
    (d, b)
    for d, b in (("cpu", "moeq_aot_eager"), ("cuda", "moeq_aot_eager"), ("cuda", "moeq"))
    if d == "cpu" or torch.cuda.is_available()
]:
    torch._dynamo.reset()
    plain, ckpt = plain_and_checkpointed_qat_steps(device, backend)
    print(
        "==",
        device,
        backend,
        "recomputed",
        ckpt[3].recomputed,
        "loss equal",
        torch.equal(ckpt[0], plain[0]),
        "saved",
        ckpt[2] / plain[2],
    )
    worst = max(
        ((g - plain[1][n]).abs().max() / plain[1][n].abs().max().clamp_min(1e-30)).item() for n, g in ckpt[1].items()
    )
    print("   grads bit-equal", all(torch.equal(g, plain[1][n]) for n, g in ckpt[1].items()), "worst rel", worst)
    print(str(ckpt[3])[:1500])
