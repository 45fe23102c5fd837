"""Nsight Compute's view of the QAT NVFP4 Gluon kernel (``qat_ws_kernel``) at Qwen3-30B-A3B gate_up, 34816 rows:
run under ``ncu`` to see which unit limits it (shared-memory wavefronts, tensor pipe, warp stalls by role).

    ncu --clock-control none -k regex:qat_ws_kernel --set full -o $OUT/qat python benchmarks/profile_gluon_qat.py

Each ``--skip`` value (the kernel's ``SKIP``: 0 the product, 1 no conversion, 2 no MMA) launches once.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from probes import probe_inputs  # noqa: E402

from moeq.runtime.kernels import fake_quant_act  # noqa: E402
from moeq.runtime.kernels.qat_gluon import NVFP4_CONFIGS, qat_nvfp4_gluon_gemm  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip", default="0,1,2")
    parser.add_argument("--config", type=int, default=0, help="index into NVFP4_CONFIGS")
    args = parser.parse_args()
    p = probe_inputs(2048, 1536, 34816)
    xq = fake_quant_act(p.x, p.offs, p.x_amax, "nvfp4")
    for skip in (int(s) for s in args.skip.split(",")):
        qat_nvfp4_gluon_gemm(xq, p.w, p.offs, p.w_amax, config=NVFP4_CONFIGS[args.config], skip=skip)
    torch.cuda.synchronize()
