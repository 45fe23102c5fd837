# Session 39's first GPU call (carry .whl). Session 38 left, untested on a GPU: the QAT NVFP4 activation
# fake-quant moved before the routing gather (moeq/lowering/gather_quant.py) and grouped_qmm's x_fmt None path through
# the Gluon kernel. (1) their GPU tests + the compiled-model tests; (2) the layer end to end (bench_e2e_modelopt.py:
# the moved quantization applies at 4096 and 16384 tokens; compare with session 12's moeq_ms); then, in later calls:
# bash benchmarks/gpu_suite.sh b (117 tests, 71 not run in session 38), gate_up at 64 rows and Mixtral 8k
# (bench_grouped_qmm.py --only "qwen3 gate_up M=64" / --only mixtral, ~110 s a case with autotuning).
. benchmarks/gpu_env.sh || exit
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
timeout -s INT 240 python -m pytest -p no:cacheprovider tests/test_gpu.py -n 8 -rfE --tb=short -q \
  -k "takes_quantized_rows or compiled_model or qmm_cuda_matches_reference" > $OUT/tests.log 2>&1; echo tests rc $?
grep -E "passed|failed|^FAILED|^ERROR" $OUT/tests.log | cut -c1-200 | tail -8
timeout -s INT 300 python benchmarks/bench_e2e_modelopt.py --tokens 4096,16384 --out $OUT > $OUT/e2e.log 2>&1; echo e2e rc $?
tail -20 $OUT/e2e.log | cut -c1-200
