"""Zeroing a grouped GEMM output's rows past ``offs[-1]``: the ``torch.where`` over the whole output that moeq ran
until session 26 against ``zero_unrouted_rows_`` (writes only the tail), on Qwen3-30B-A3B's dgrad outputs at
34816 routed rows; then the QAT FP8 dgrad op that uses it (``grouped_qmm`` deploy FP8 on the weight codes,
bf16 gradient: dequant + ``torch._grouped_mm`` + the zeroing)."""

from __future__ import annotations

import torch
import triton
from triton.testing import do_bench

from moeq.runtime.kernels.zero_rows import zero_unrouted_rows_


def where_zero(out: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    routed = torch.arange(out.shape[0], device=out.device) < offs[-1]
    return torch.where(routed.unsqueeze(1), out, torch.zeros((), dtype=out.dtype, device=out.device))


def main() -> None:
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    rows, experts = 34816, 128
    offs = torch.linspace(rows / experts, rows, experts).round().to(torch.int32).cuda()
    print(f"{'output':22s} {'where ms':>9s} {'kernel ms':>10s} {'speed-up':>9s}  same bits")
    for name, cols in (("gate_up dgrad [M, 2048]", 2048), ("down dgrad [M, 768]", 768)):
        out = torch.randn(rows + 8, cols, device="cuda").bfloat16()
        out[rows:] = float("nan")
        want = where_zero(out, offs)
        got = zero_unrouted_rows_(out.clone(), offs)
        same = torch.equal(got.view(torch.int16), want.view(torch.int16))
        t_where = do_bench(lambda out=out: where_zero(out, offs), return_mode="median")
        t_kernel = do_bench(lambda out=out: zero_unrouted_rows_(out, offs), return_mode="median")
        print(f"{name:22s} {t_where:9.4f} {t_kernel:10.4f} {t_where / t_kernel:8.1f}x  {same}")


if __name__ == "__main__":
    main()
