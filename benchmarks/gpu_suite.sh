# The GPU suite in two calls (session 38: with -n 12 the whole of tests/test_gpu.py no longer fits one 10-minute
# device call). `bash benchmarks/gpu_suite.sh a` runs the three large parametrized bit-exactness tests (152 cases);
# `... b` runs every other test function. Carry .whl (git-ignored wheels: transformers, megatron-core, modelopt
# and what they import; a fresh checkout fills it with `bash benchmarks/fetch_gpu_wheels.sh`).
# Writes $OUT/gpu_suite_<part>.log with the 15 slowest tests.
PART=${1:?usage: gpu_suite.sh a|b}
HEAVY="fake_quant_experts_bit_exact_cuda or grouped_qmm_cuda_matches_reference or grouped_qmm_cuda_weight_operand_bit_exact"
[ "$PART" = a ] && K="$HEAVY" || K="not ($HEAVY)"
. benchmarks/gpu_env.sh || exit
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout -s INT 540 python -m pytest -p no:cacheprovider tests/test_gpu.py -n 12 -rfE --tb=short -q --durations=15 \
  -k "$K" > "$OUT/gpu_suite_$PART.log" 2>&1
echo "pytest rc $?"
grep -E "passed|failed|^FAILED|^ERROR" "$OUT/gpu_suite_$PART.log" | cut -c1-200 | tail -12
