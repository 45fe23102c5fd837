"""Time moeq::dequant_weight's Triton kernel (the unfused deploy path's dequantization) on Qwen3-30B-A3B expert
weights against an HBM copy measured in the same run; bytes = stored bytes read + output bytes written."""

from __future__ import annotations

import functools

import torch
import triton
from triton.testing import do_bench

from moeq.formats import expand_per_expert, expert_amax, get_format, stored_form
from moeq.lowering import ops
from moeq.runtime.kernels import dequant_stored_weight


def main() -> None:
    src = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_tbs = 2 * src.numel() / do_bench(lambda: dst.copy_(src), return_mode="median") / 1e9
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"HBM copy {copy_tbs:.2f} TB/s")
    for name, (e, n, k) in {"gate_up": (128, 1536, 2048), "down": (128, 2048, 768)}.items():
        w = torch.randn(e, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        amax = expert_amax(w)
        for fmt in ("fp8", "nvfp4"):
            data, scale, block = stored_form(get_format(fmt).quantize(w, expand_per_expert(amax, 3), 2))
            got = dequant_stored_weight(data, scale, block, fmt, torch.bfloat16)
            same = torch.equal(got.view(torch.int16), ops._dequant_weight_reference(data, scale, block, fmt, -1,
                                                                                     torch.bfloat16).view(torch.int16))  # fmt: skip
            args = (data, scale, block, fmt)
            ms = do_bench(functools.partial(dequant_stored_weight, *args, torch.bfloat16), return_mode="median")
            nbytes = data.numel() + block.numel() + 2 * got.numel()
            reference = functools.partial(ops._dequant_weight_reference, *args, -1, torch.bfloat16)
            ref_ms = do_bench(reference, return_mode="median", rep=20)
            print(f"{name:8s} {fmt:6s} kernel {ms:.4f} ms  {nbytes / ms / 1e9:.2f} TB/s = {nbytes / ms / 1e9 / copy_tbs:.2f}"
                  f" of copy;  torch-op reference {ref_ms:.3f} ms ({ref_ms / ms:.0f}x);  bit-exact {same}")  # fmt: skip


if __name__ == "__main__":
    main()
