"""Which SASS does the GPU machine's Triton build for the QAT NVFP4 Gluon kernel? (session 40, for the next GPU call)

Offline (``GluonConfig.compile_for_sm90()``), Triton 3.6's bundled ptxas 12.8 turns the shipped NVFP4 kernel's 20 PTX
``wgmma``s into 8 ``HGMMA``s, the main rows' only (no ``64x64`` tail ``wgmma``), where Triton 3.9's ptxas keeps all
20. Yet on the GPU (Triton 3.6) the kernel's tail rows are right (bit-exact tests with tails, relative error 1.7e-3
at 34k rows), so either the GPU compiles with another ptxas or the offline build differs from the launch. This
launches the kernel once on a problem with tail rows in a fresh Triton cache, checks the output against
``fake_quant_experts`` + float64, and prints the ptxas used and the ``HGMMA`` widths and count of the cubin it built
next to the offline build's.

    python benchmarks/sass_of_launched_gluon.py
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.tools.disasm import get_sass  # noqa: E402

from moeq.runtime.kernels import fake_quant_act, fake_quant_experts  # noqa: E402
from moeq.runtime.kernels.qat_gluon import NVFP4_CONFIGS, qat_nvfp4_gluon_gemm  # noqa: E402


def hgmma_summary(cubin: bytes) -> str:
    sass = get_sass(cubin)
    widths = collections.Counter(re.findall(r"HGMMA\.64x(\d+)x16", sass))
    return (
        f"{sum(widths.values())} HGMMA, widths {dict(widths)}, {sass.count('WARPGROUP.DEPBAR.LE gsb0, 0x0')} full waits"
    )


def main() -> None:
    print("triton", triton.__version__, "ptxas", get_ptxas(90).path, os.environ.get("TRITON_PTXAS_PATH", "(no env)"))
    config = NVFP4_CONFIGS[0]
    print("offline:", hgmma_summary(config._replace(persistent=False).compile_for_sm90().asm["cubin"]))
    torch.manual_seed(0)
    experts, k, n = 4, 256, 256
    counts = torch.tensor([300, 0, 17, 290])  # 256 main rows + tails, an empty expert
    offs = torch.cumsum(counts, 0).to(torch.int32).cuda()
    x = torch.randn(int(counts.sum()), k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(experts, n, k, device="cuda", dtype=torch.bfloat16) * 0.05
    w_amax = w.abs().flatten(1).amax(1).float()
    x_amax = x.abs().amax().float().reshape(1)
    xq = fake_quant_act(x, offs, x_amax, "nvfp4")
    out = qat_nvfp4_gluon_gemm(xq, w.transpose(1, 2), offs, w_amax, config=config)
    wq = fake_quant_experts(w, w_amax, "nvfp4", -1).double()
    ref = torch.cat(
        [xq[s:e].double() @ wq[i].T for i, (s, e) in enumerate(zip([0, *offs.tolist()[:-1]], offs.tolist()))]
    )
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    print(f"launch: relative error vs float64 {rel:.2e} (tail rows included)")
    for path in glob.glob(os.path.join(os.environ["TRITON_CACHE_DIR"], "**", "qat_ws_kernel.cubin"), recursive=True):
        with open(path, "rb") as f:
            print("launched:", hgmma_summary(f.read()))


if __name__ == "__main__":
    main()
