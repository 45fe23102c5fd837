# Session 39's GPU call for the tail boxes (carry .whl): (1) the probe (kernel alone, bit-equality to whole tail
# copies, loads only, the activations' pass on rows and on tokens); (2) the acceptance bench's 34k QAT rows (whole op,
# tail boxes now the default); (3) the Gluon GPU tests, the new tail-box equality test among them.
. benchmarks/gpu_env.sh || exit
nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.limit --format=csv,noheader
timeout -s INT 240 python benchmarks/probe_gluon_variants.py --family tail_boxes --out $OUT/tail_boxes.json > $OUT/tail_boxes.log 2>&1; echo probe rc $?
grep -E "bit-equal|medians|median|loads only|fake_quant|bf16  |ERROR" $OUT/tail_boxes.log | cut -c1-210 | tail -40
timeout -s INT 150 python benchmarks/bench_grouped_qmm.py --only "qwen3 gate_up M=34816,qwen3 down M=34816" \
  --modes "QAT NVFP4,QAT FP8" --out $OUT > $OUT/bench.log 2>&1; echo bench rc $?
grep -vE "Warning|warn" $OUT/bench.log | tail -14 | cut -c1-200
K="tail_boxes or qat_fp8_gluon_gemm_cuda or qat_nvfp4_gluon_gemm_cuda or register_operand or nan_and_inf or takes_quantized"
timeout -s INT 170 python -m pytest -p no:cacheprovider tests/test_gpu.py -n 8 -rfE --tb=short -q -k "$K" > $OUT/tests.log 2>&1; echo tests rc $?
grep -E "passed|failed|^FAILED|^ERROR|^E " $OUT/tests.log | cut -c1-200 | tail -10
