"""Probe: QAT NVFP4 through the warp-specialized Gluon kernel (``qat_nvfp4_gluon_gemm``), Qwen3 shapes at 34k rows.

Hopper has no FP4 MMA, and an NVFP4 value (E2M1 times an e4m3 block scale) is not an e4m3 value, so the unfused
path fake-quantizes the weight to bf16 in a pass of its own (805 MB read and written for gate_up) before
``torch._grouped_mm``. Here the converter warps fake-quantize each bf16 weight tile in shared memory (formats' NVFP4:
16-blocks along K, the expert's global scale) and the MMA warps multiply bf16 by ``wgmma``; the activations are
fake-quantized by their own pass first, as in the unfused path. Rows: bf16 ``torch._grouped_mm``, the unfused path
(``fake_quant_act`` + ``fake_quant_experts`` + ``torch._grouped_mm``), and each ``NVFP4_CONFIGS`` entry as the whole
op (activation pass included) and alone, then the first one's decomposition (``SKIP``). Every output is checked
against the float64 product of formats' fake-quantized operands, and each configuration's weight values are checked
bit-equal to ``fake_quant_experts``.

    python benchmarks/probe_gluon_qat_nvfp4.py --out $OUT/gluon_qat_nvfp4.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from probes import ProbeTable, probe_inputs, qwen3_probe_main  # noqa: E402

from moeq.formats import get_format  # noqa: E402
from moeq.runtime.kernels import fake_quant_act, fake_quant_experts  # noqa: E402
from moeq.runtime.kernels.qat_gluon import (  # noqa: E402
    NVFP4_CONFIGS,
    REGISTER_A_CONFIGS,
    GluonConfig,
    qat_nvfp4_gluon_gemm,
)

#: moeq's configurations (the operand converter, ``numerics.fake_quant_nvfp4_operand``), the first with the exact
#: converter, the first with two converted stages, session 34's configuration (one 16-block a thread), and both
#: configurations with session 35's accumulator layout (warpgroups side by side along N, not stacked), then the
#: experimental register-operand forms (indices 7-11: 7-8 whole 16-blocks a lane, K permuted; 9-11 the plain A layout)
VARIANTS = [
    *NVFP4_CONFIGS,
    NVFP4_CONFIGS[0]._replace(exact=1),
    NVFP4_CONFIGS[0]._replace(s8=2),
    GluonConfig(256, 64, 128, 32, 5, 4, 3, 2, 4, 80, 8, 128, 2, persistent=True, nvfp4=True),
    NVFP4_CONFIGS[0]._replace(stacked=False),
    NVFP4_CONFIGS[1]._replace(stacked=False),
    *REGISTER_A_CONFIGS,
]


def nvfp4_reference(p) -> torch.Tensor:
    """formats' NVFP4 fake quant of both operands (activations: the shared amax; weights: per expert), multiplied
    per expert in float64."""
    fmt = get_format("nvfp4")
    xq = fmt.fake_quant(p.x, p.x_amax).double()
    wq = fmt.fake_quant(p.w_nk, p.w_amax.view(-1, 1, 1)).double()
    ref = torch.zeros(p.x.shape[0], p.w_nk.shape[1], dtype=torch.float64, device="cuda")
    bounds = [0] + p.offs.tolist()
    for e in range(p.w_nk.shape[0]):
        ref[bounds[e] : bounds[e + 1]] = xq[bounds[e] : bounds[e + 1]] @ wq[e].T
    return ref


def run_case(label: str, k: int, n: int, rows: int) -> list[dict]:
    p = probe_inputs(k, n, rows)
    table = ProbeTable(label, nvfp4_reference(p), p.flops)
    wq_ref = fake_quant_experts(p.w_nk, p.w_amax, "nvfp4", -1)

    def unfused():
        xq = fake_quant_act(p.x, p.offs, p.x_amax, "nvfp4")
        return torch._grouped_mm(xq, fake_quant_experts(p.w_nk, p.w_amax, "nvfp4", -1).transpose(1, 2), p.offs)

    table.record("torch._grouped_mm bf16", lambda: torch._grouped_mm(p.x, p.w, p.offs))
    table.record("unfused QAT NVFP4 (fake-quant passes + _grouped_mm)", unfused)
    xq = fake_quant_act(p.x, p.offs, p.x_amax, "nvfp4")
    xq_permuted = fake_quant_act(p.x, p.offs, p.x_amax, "nvfp4", in_wgmma_k_order=True)

    def gemm(v, x_fq=None, **kw):
        """``x_fq`` (else the fake-quant pass, timed with the op) in the order configuration ``v`` takes."""
        permuted = v.register_a == 2
        if x_fq is None:
            x_fq = fake_quant_act(p.x, p.offs, p.x_amax, "nvfp4", in_wgmma_k_order=permuted)
        elif permuted:
            x_fq = xq_permuted
        return qat_nvfp4_gluon_gemm(x_fq, p.w, p.offs, p.w_amax, config=v, x_in_wgmma_k_order=permuted, **kw)

    for v in [VARIANTS[i] for i in CHOSEN]:
        print(f"{label:14s} {v.name}: launching", flush=True)
        try:
            codes = torch.zeros_like(p.w_nk)
            gemm(v, xq, codes=codes)
            torch.cuda.synchronize()
            if v.exact == 1:  # bit for bit; the operand converter's values (a zero's sign not kept)
                same = torch.equal(codes.view(torch.int16), wq_ref.view(torch.int16))
            else:
                same = torch.equal(codes, wq_ref)
            print(f"{label:14s} {v.name}: weight values equal to fake_quant_experts: {same}", flush=True)
            if not same:
                continue
        except Exception as exc:
            print(f"{label:14s} {v.name}: ERROR {str(exc)[:300]}", flush=True)
            continue
        table.record(v.name, lambda v=v: gemm(v))
        table.record(f"{v.name} [kernel only]", lambda v=v: gemm(v, xq))
    for v in [VARIANTS[i] for i in DECOMPOSED]:
        decomposition = ((1, "no conversion"), (2, "no MMA"), (3, "loads only"))
        for skip, what in decomposition[:1] if v.register_a else decomposition:  # one role does both
            table.record(f"{v.name} [{what}]", lambda v=v, skip=skip: gemm(v, xq, skip=skip), checked=False)
    table.record("fake_quant_act NVFP4 alone", lambda: fake_quant_act(p.x, p.offs, p.x_amax, "nvfp4"), checked=False)
    table.record(
        "fake_quant_act NVFP4 alone, wgmma k order",
        lambda: fake_quant_act(p.x, p.offs, p.x_amax, "nvfp4", in_wgmma_k_order=True),
        checked=False,
    )
    return table.print()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default=None, help="comma-separated indices into VARIANTS (default: all)")
    parser.add_argument("--decompose", default="0", help="VARIANTS indices timed with roles that only pass barriers")
    args, rest = parser.parse_known_args()
    CHOSEN = [int(i) for i in args.variants.split(",")] if args.variants else list(range(len(VARIANTS)))
    DECOMPOSED = [int(i) for i in args.decompose.split(",") if i]
    sys.argv = [sys.argv[0], *rest]
    qwen3_probe_main(run_case)
