# Branch gluon-register-a: QAT NVFP4 with the weight as wgmma's register operand (qat_gluon.qat_nvfp4_rega_kernel,
# REGISTER_A_CONFIGS), compiled for sm_90 but never run. Its first GPU call (git checkout gluon-register-a; carry
# .whl): the GPU tests check the weight values against formats' fake quant and the output against float64, then the
# probe checks the same at Qwen3 shapes and times variants 7-8 (whole 16-blocks a lane, K permuted: 14.5 instructions a
# weight element in the k-loop's SASS), 9 (the plain A layout: 20.2) beside the shipped configuration 0, and
# decomposes 7 (SKIP=1, no conversion). Variant 0, the shipped kernel, has the branch's converter (block amax and clip
# on bf16 pairs: 13.25 instructions a value, was 14.5; session 36's figures for it: 0.6865 / 0.4051 ms kernel alone).
# A hang is the timeout's: look for a barrier phase error in _convert_mma_partition.
. benchmarks/gpu_env.sh || exit
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
timeout -s INT 150 python -m pytest -p no:cacheprovider tests/test_gpu.py -rA --tb=short -q \
  -k "register_operand or qat_nvfp4_gluon_gemm_cuda or nvfp4_operand_values or nan_and_inf_weights" > $OUT/tests.log 2>&1; echo tests rc $?
grep -E "passed|failed|^FAILED|^E " $OUT/tests.log | cut -c1-200 | head -12
timeout -s INT 240 python benchmarks/probe_gluon_qat_nvfp4.py --variants 0,7,8,9 --decompose 7 --out $OUT/probe.json > $OUT/probe.log 2>&1; echo probe rc $?
grep -v launching $OUT/probe.log | cut -c1-200 | tail -34
# If the variants are correct and fast, the second call is the acceptance bench through grouped_qmm:
#   python benchmarks/bench_grouped_qmm.py --only "qwen3 gate_up M=34816,qwen3 down M=34816" --modes "QAT NVFP4" \
#     --rounds 3 --register-operand --out $OUT
