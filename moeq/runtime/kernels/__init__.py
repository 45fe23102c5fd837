"""Triton kernels for per-expert quantization and calibration (one launch per stacked weight / GEMM).

Each launcher validates shapes, dtypes and devices, runs the Triton kernel on CUDA tensors (and on CPU
tensors under ``TRITON_INTERPRET=1``) and the :mod:`moeq.formats` reference otherwise. Results equal the
reference bit for bit.
"""

from moeq.runtime.kernels.dequant_weight import dequant_stored_weight
from moeq.runtime.kernels.fake_quant_act import fake_quant_act, fake_quant_tokens, row_amax, token_codes
from moeq.runtime.kernels.fake_quant_experts import fake_quant_experts
from moeq.runtime.kernels.nvfp4_codes import nvfp4_weight_codes
from moeq.runtime.kernels.segment_amax import segment_amax, segment_amax_
from moeq.runtime.kernels.ste_mask import mask_clipped_grad_
from moeq.runtime.kernels.weight_amax import expert_weight_amax

__all__ = [
    "dequant_stored_weight",
    "expert_weight_amax",
    "fake_quant_act",
    "fake_quant_tokens",
    "row_amax",
    "token_codes",
    "fake_quant_experts",
    "mask_clipped_grad_",
    "nvfp4_weight_codes",
    "segment_amax",
    "segment_amax_",
]
