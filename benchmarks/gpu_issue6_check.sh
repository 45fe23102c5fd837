# Issue 6's GPU acceptance tests in one short call (carry .whl): the compiled tiny Qwen3-MoE in every mode against
# the CPU reference, the profiler's one Triton kernel per expert GEMM, the Gluon QAT NVFP4 kernel, the observer and
# the combine (the triton_ops whose registration changed in session 47). Writes $OUT/issue6_check.log.
. benchmarks/gpu_env.sh || exit
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout -s INT ${1:-420} python -m pytest -p no:cacheprovider tests/test_gpu.py -n 8 -q -rfE --tb=short --durations=8 \
  -k "compiled_model_grouped_qmm_matches_cpu_reference or profiler_one_triton_kernel or qat_nvfp4_gluon or segment_amax or combine or compiled_qat_nvfp4_once" \
  > "$OUT/issue6_check.log" 2>&1
echo "pytest rc $?"
grep -E "passed|failed|^FAILED|^ERROR" "$OUT/issue6_check.log" | cut -c1-200 | tail -12
