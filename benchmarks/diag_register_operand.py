"""The register-operand QAT NVFP4 kernel against float64 on shapes with tail rows, run three times (wrong or
run-to-run different outputs: ptxas reusing an in-flight wgmma's A registers), then kernel-alone timings at Qwen3
gate_up / down (34k rows). ``python benchmarks/diag_register_operand.py SYNC``: SYNC 1 sets ``RS_WGMMA_SYNC``; the
ptxas is whichever ``TRITON_PTXAS_PATH`` names (session 37)."""

import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from triton.backends.nvidia.compiler import get_ptxas_version  # noqa: E402

from moeq.formats import get_format  # noqa: E402
from moeq.runtime.kernels import qat_gluon  # noqa: E402
from moeq.runtime.kernels.fake_quant_act import fake_quant_act, wgmma_k_order  # noqa: E402
from moeq.runtime.kernels.qat_gluon import NVFP4_CONFIGS, REGISTER_A_CONFIGS, qat_nvfp4_gluon_gemm  # noqa: E402

qat_gluon.RS_WGMMA_SYNC = sys.argv[1] == "1"

print("ptxas", get_ptxas_version(90).strip().splitlines()[-1], "sync", qat_gluon.RS_WGMMA_SYNC, flush=True)


def operands(counts, k, n, g):
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    rows = int(offs[-1])
    x = (torch.randn(rows + 37, k, generator=g) * 2).to(torch.bfloat16)
    scale = torch.logspace(-3, 0, len(counts)).view(-1, 1, 1)
    w_nk = (torch.randn(len(counts), n, k, generator=g) * scale).to(torch.bfloat16)
    return offs, x, w_nk, w_nk.float().abs().amax((1, 2)) * 0.9


def product(xq, wq, offs):
    ref = torch.zeros(xq.shape[0], wq.shape[1], dtype=torch.float64)
    mag = torch.zeros_like(ref)
    start = 0
    for e, end in enumerate(offs.tolist()):
        xe, we = xq[start:end].double(), wq[e].double().T
        ref[start:end] = xe @ we
        mag[start:end] = xe.abs() @ we.abs()
        start = end
    return ref, mag


for counts, k, n in (([300, 0, 1, 330, 64, 0, 257, 700, 17, 320, 321], 768, 1024), ([5, 400, 0], 2048, 200)):
    offs, x, w_nk, amax = operands(counts, k, n, torch.Generator().manual_seed(11))
    wq_ref = get_format("nvfp4").fake_quant(w_nk, amax.view(-1, 1, 1))
    x_fq = fake_quant_act(x.cuda(), offs.cuda(), torch.tensor([3.0], device="cuda"), "nvfp4")
    ref, mag = product(x_fq.cpu(), wq_ref, offs)
    for cfg, with_codes in (
        (REGISTER_A_CONFIGS[0], False),
        (REGISTER_A_CONFIGS[0], True),
        (REGISTER_A_CONFIGS[2], False),
        (REGISTER_A_CONFIGS[2], True),
    ):
        bad_total, same = 0, True
        first = None
        for _ in range(3):
            codes = torch.zeros(len(counts), n, k, dtype=torch.bfloat16, device="cuda") if with_codes else None
            got = qat_nvfp4_gluon_gemm(
                x_fq, w_nk.cuda().transpose(1, 2), offs.cuda(), amax.cuda(), config=cfg, codes=codes
            ).cpu()
            first = got if first is None else first
            same &= torch.equal(first, got)
            bad_total += int(((got.double() - ref).abs() > 2.0**-8 * mag + 2.0**-8 * ref.abs() + 1e-30).sum())
        print(
            f"  k {k} n {n} | {cfg.name[40:]:50s} codes {with_codes!s:5s} | deterministic {same} | bad {bad_total} (3 runs)",
            flush=True,
        )

# kernel-alone timing at Qwen3-30B-A3B, 34k rows (random routing as the probes)
g = torch.Generator().manual_seed(0)
for label, k, n in (("gate_up", 2048, 1536), ("down", 768, 2048)):
    counts = torch.bincount(torch.randint(0, 128, (34816,), generator=g), minlength=128)
    offs = counts.cumsum(0).to(torch.int32).cuda()
    x = torch.randn(34816, k, generator=g).to(torch.bfloat16).cuda()
    w = (torch.randn(128, n, k, generator=g) * 0.02).to(torch.bfloat16).cuda()
    amax = w.float().abs().amax((1, 2))
    xq = fake_quant_act(x, offs, torch.tensor([4.0], device="cuda"), "nvfp4")
    xp = wgmma_k_order(xq).contiguous()
    flops = 2 * 34816 * k * n
    t_bf16 = triton.testing.do_bench(lambda x=x, w=w, offs=offs: torch._grouped_mm(x, w.transpose(1, 2), offs), rep=200)
    line = f"{label}: bf16 {t_bf16:.4f} ms"
    for cfg in (NVFP4_CONFIGS[0], REGISTER_A_CONFIGS[0], REGISTER_A_CONFIGS[1]):
        xin = xp if cfg.register_a == 2 else xq
        t = triton.testing.do_bench(
            lambda xin=xin, w=w, offs=offs, amax=amax, cfg=cfg: qat_nvfp4_gluon_gemm(
                xin, w.transpose(1, 2), offs, amax, config=cfg, x_in_wgmma_k_order=cfg.register_a == 2
            ),
            rep=200,
        )
        line += f" | {cfg.name[5:30]}{' lane' if cfg.register_a == 2 else ''} st{cfg.sx}/{cfg.s16} {t:.4f} ms ({t_bf16 / t:.2f}x bf16, {flops / t / 1e9:.0f} TF/s)"
    print(line, flush=True)
