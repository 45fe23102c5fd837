# The GPU suite in three calls (session 38: with -n 12 the whole of tests/test_gpu.py no longer fits one 10-minute
# device call; session 51: part b alone took 476-500 s of its 540, its compiles keeping the 16 CPUs busy).
# `bash benchmarks/gpu_suite.sh a` runs the three large parametrized bit-exactness tests (152 cases); `... c` the
# tests marked `slow` (compiled training steps, minutes each); `... b` every other test. Carry .whl (git-ignored
# wheels: transformers, megatron-core, modelopt and what they import; a fresh checkout fills it with
# `bash benchmarks/fetch_gpu_wheels.sh`). Writes $OUT/gpu_suite_<part>.log with the 15 slowest tests.
PART=${1:?usage: gpu_suite.sh a|b|c}
HEAVY="fake_quant_experts_bit_exact_cuda or grouped_qmm_cuda_matches_reference or grouped_qmm_cuda_weight_operand_bit_exact"
case $PART in
  a) K="$HEAVY" M="gpu" ;;
  b) K="not ($HEAVY)" M="gpu and not slow" ;;
  c) K="not ($HEAVY)" M="gpu and slow" ;;
  *) echo "usage: gpu_suite.sh a|b|c" >&2; exit 2 ;;
esac
. benchmarks/gpu_env.sh || exit
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout -s INT 540 python -m pytest -p no:cacheprovider tests/test_gpu.py -n 12 -rfE --tb=short -q --durations=15 \
  -k "$K" -m "$M" > "$OUT/gpu_suite_$PART.log" 2>&1
echo "pytest rc $?"
grep -E "passed|failed|^FAILED|^ERROR" "$OUT/gpu_suite_$PART.log" | cut -c1-200 | tail -12
