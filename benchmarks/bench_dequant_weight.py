"""Time moeq::dequant_weight's Triton kernel (the unfused deploy path's dequantization) on Qwen3-30B-A3B expert
weights against an HBM copy measured in the same run; bytes = stored bytes read + output bytes written.

``--sweep`` also times every autotuning candidate (``dequant_configs``) on its own, each checked bit for bit."""

from __future__ import annotations

import argparse
import functools

import torch
import triton
from triton.testing import do_bench

from moeq.formats import expand_per_expert, expert_amax, get_format, stored_form
from moeq.lowering import ops
from moeq.runtime.kernels import dequant_stored_weight
from moeq.runtime.kernels.dequant_weight import _dequant_weight_kernel
from moeq.runtime.kernels.launch import cdiv


def sweep(data, scale, block, fmt: str, want: torch.Tensor, nbytes: int, copy_tbs: float) -> None:
    """Each candidate tile launched directly (the autotuner's kernel), its output checked against ``want``."""
    words = data.view(torch.int32) if fmt == "nvfp4" else data.view(torch.float8_e4m3fn)
    blocks = block.view(torch.float8_e4m3fn) if fmt == "nvfp4" else words
    b_strides = blocks.stride() if fmt == "nvfp4" else (0, 0, 0)
    e, n, k = want.shape
    for config in _dequant_weight_kernel.configs:
        bn, bk = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
        out = torch.empty_like(want)

        def run(bn=bn, bk=bk, config=config, out=out):
            _dequant_weight_kernel.fn[(cdiv(k, bk), cdiv(n, bn), e)](
                words, scale, blocks, out, n, k, *words.stride(), *b_strides, *out.stride(),
                IS_NVFP4=fmt == "nvfp4", INTERPRET=False, BLOCK_N=bn, BLOCK_K=bk, num_warps=config.num_warps)  # fmt: skip

        run()
        same = torch.equal(out.view(torch.int16), want.view(torch.int16))
        ms = do_bench(run, return_mode="median")
        print(f"    tile {bn:3d}x{bk:<4d} {config.num_warps} warps  {ms:.4f} ms  {nbytes / ms / 1e9 / copy_tbs:.2f} of copy"
              f"  bit-exact {same}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="time every autotuning candidate too")
    args = parser.parse_args()
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
            stored = (data, scale, block, fmt)
            ms = do_bench(functools.partial(dequant_stored_weight, *stored, torch.bfloat16), return_mode="median")
            nbytes = data.numel() + block.numel() + 2 * got.numel()
            reference = functools.partial(ops._dequant_weight_reference, *stored, -1, torch.bfloat16)
            ref_ms = do_bench(reference, return_mode="median", rep=20)
            print(f"{name:8s} {fmt:6s} kernel {ms:.4f} ms  {nbytes / ms / 1e9:.2f} TB/s = {nbytes / ms / 1e9 / copy_tbs:.2f}"
                  f" of copy;  torch-op reference {ref_ms:.3f} ms ({ref_ms / ms:.0f}x);  bit-exact {same}")  # fmt: skip
            print(f"    autotuner picked {_dequant_weight_kernel.best_config}")
            if args.sweep:
                sweep(data, scale.float().contiguous(), block, fmt, got, nbytes, copy_tbs)


if __name__ == "__main__":
    main()
