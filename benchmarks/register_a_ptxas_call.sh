# Branch gluon-register-a, session 38's first GPU call (carry .whl and .ptxas13, both git-ignored). Session 37 found
# ptxas 12.8 (Triton 3.6's bundled one) overwriting an in-flight wgmma's register A operand (wrong, run-to-run
# different tail rows). Here: (1) the overlapped form compiled by ptxas 13.5 (TRITON_PTXAS_PATH), (2) the SYNC form
# (wait for each step's wgmmas) under the bundled ptxas -- correctness over three runs against float64, then
# kernel-alone timings at Qwen3 34k rows; (3) the branch's GPU tests under both ptxas (auto SYNC picks by version).
. benchmarks/gpu_env.sh || exit
mkdir -p /tmp/p13 && gunzip -c .ptxas13/ptxas.gz > /tmp/p13/ptxas && chmod +x /tmp/p13/ptxas && /tmp/p13/ptxas --version | tail -1
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
TRITON_PTXAS_PATH=/tmp/p13/ptxas timeout -s INT 150 python benchmarks/diag_register_operand.py 0 > $OUT/diag_ptxas135_overlap.log 2>&1; echo diag13.5 rc $?
cut -c1-330 $OUT/diag_ptxas135_overlap.log | tail -12
timeout -s INT 150 python benchmarks/diag_register_operand.py 1 > $OUT/diag_ptxas128_sync.log 2>&1; echo diag12.8 rc $?
cut -c1-330 $OUT/diag_ptxas128_sync.log | tail -12
K="register_operand or qat_nvfp4_gluon_gemm_cuda or nvfp4_operand_values or nan_and_inf_weights"
timeout -s INT 150 python -m pytest -p no:cacheprovider tests/test_gpu.py -n 8 -rA --tb=short -q -k "$K" > $OUT/tests_ptxas128.log 2>&1; echo tests12.8 rc $?
grep -E "passed|failed|^FAILED|^E " $OUT/tests_ptxas128.log | cut -c1-200 | head -8
TRITON_PTXAS_PATH=/tmp/p13/ptxas timeout -s INT 150 python -m pytest -p no:cacheprovider tests/test_gpu.py -n 8 -rA --tb=short -q -k "$K" > $OUT/tests_ptxas135.log 2>&1; echo tests13.5 rc $?
grep -E "passed|failed|^FAILED|^E " $OUT/tests_ptxas135.log | cut -c1-200 | head -8
