# Session 48: the compiled QAT NVFP4 test whose [gluon] case got the weight-pass code its [weight-pass] sibling had
# cached (Inductor's FX graph cache; fixed by compile_fingerprint). Runs the sibling first in one process, on a
# fresh Inductor cache, then the fingerprint tests. Carry .whl. Writes $OUT/cache_check.log.
. benchmarks/gpu_env.sh || exit
export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
T=tests/test_gpu.py::test_compiled_qat_nvfp4_once_matches_cpu_reference
timeout -s INT ${1:-300} python -m pytest -p no:cacheprovider -q -rfE --tb=short "$T[weight-pass]" "$T[gluon]" \
  tests/test_grouped_qmm.py -k "weight-pass or gluon or fingerprint or outlives" > "$OUT/cache_check.log" 2>&1
echo "pytest rc $?"
grep -E "passed|failed|^FAILED|^ERROR" "$OUT/cache_check.log" | cut -c1-200 | tail -8
