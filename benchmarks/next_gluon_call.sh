# The next GPU calls (carry .whl), in two parts that each fit one 10-minute call: `bash benchmarks/next_gluon_call.sh a`,
# then `... b`. Each step has its own time limit, so a hang ends that step, not the call. Session 41 ran s, t (its
# 25 tests then needed more than 260 s: now 540, alone) and a's end-to-end step.
# a: the end-to-end gather_quant A/B within one run (bench_e2e_modelopt.py --ab-gather: the pass-off layer built and
#    timed inside gather_quant.enabled(False), now that graphs guard on the switch), then each layer's kernels
#    (profile_e2e_gather.py) and the on/off bits (diag_gather_quant_bits.py: 16384 tokens differed in 1356 outputs in
#    sessions 40-41, in none in session 42's three runs; --output-code saves both sides' generated code).
# b: the acceptance bench's QAT NVFP4 and QAT FP8 at 34k rows through the op (3 rounds), with the "as compiled" row.
# s: the swapped kernel (session 41): its GPU tests, then probe_gluon_variants.py --family swap.
# t: every Gluon GPU test (the shipped configurations are swapped since session 41); ~8 minutes on a fresh machine.
# c: session 42's NVFP4 codes kernel (first run on a GPU in session 43: 12 passed, entry 1.0 ms): its test, the reused-codes and freeze tests that go through
#    it, then the reuse_weight_codes entry timed again (session 42 call 8: 54.7 ms through the torch reference).
PART=${1:?usage: next_gluon_call.sh a|b|c|s|t}
. benchmarks/gpu_env.sh || exit
nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.limit --format=csv,noheader
if [ "$PART" = s ]; then
  timeout -s INT 200 python -m pytest -q -x tests/test_gpu.py -k "swapped or test_qat_nvfp4_gluon_gemm_cuda" \
    -p no:cacheprovider > $OUT/tests.log 2>&1
  echo tests rc $?; tail -3 $OUT/tests.log | cut -c1-300
  timeout -s INT 300 python benchmarks/probe_gluon_variants.py --family swap --rounds 3 --out $OUT/swap.json \
    > $OUT/probe.log 2>&1
  echo probe rc $?; grep -E "median|ERROR|bit-equal|weight values| ms " $OUT/probe.log | cut -c1-230 | tail -40
elif [ "$PART" = t ]; then
  timeout -s INT 540 python -m pytest -q -rA tests/test_gpu.py -k "gluon or quantize_once or qat_nvfp4_once" \
    -p no:cacheprovider > $OUT/tests.log 2>&1
  echo tests rc $?; grep -E "passed|failed|FAILED|Error" $OUT/tests.log | tail -8 | cut -c1-300
elif [ "$PART" = c ]; then
  timeout -s INT 380 python -m pytest -q -rA tests/test_gpu.py -n 8 -p no:cacheprovider \
    -k "nvfp4_weight_codes or reused_weight_codes or freeze or w4a16" > $OUT/tests.log 2>&1
  echo tests rc $?; grep -E "passed|failed|FAILED|Error" $OUT/tests.log | tail -8 | cut -c1-300
  cd benchmarks
  timeout -s INT 180 python bench_qat_training.py --tokens 4352 \
    --variants NVFP4:auto,NVFP4:auto:reuse,NVFP4:auto:reuse:dequantized --out $OUT > $OUT/train.log 2>&1
  echo train rc $?; grep -E "tokens," $OUT/train.log | cut -c1-300
elif [ "$PART" = a ]; then
  cd benchmarks
  timeout -s INT 240 python bench_e2e_modelopt.py --tokens 4096,16384 --ab-gather --out $OUT > $OUT/e2e.log 2>&1
  echo e2e rc $?; tail -5 $OUT/e2e.log | cut -c1-220
  timeout -s INT 150 python profile_e2e_gather.py --tokens 4096,16384 --out $OUT > $OUT/profile.log 2>&1
  echo profile rc $?; grep -E "tokens,|fake_quant|qat_ws|cutlass|_grouped_mm" $OUT/profile.log | cut -c1-160
  timeout -s INT 180 python diag_gather_quant_bits.py --tokens 4096,16384 --output-code $OUT/code > $OUT/bits.log 2>&1
  echo bits rc $?; grep -E "tokens|called only|fake_quant_act\(" $OUT/bits.log | cut -c1-300
else
  timeout -s INT 300 python benchmarks/bench_grouped_qmm.py --only "qwen3 gate_up M=34816,qwen3 down M=34816" \
    --modes "QAT NVFP4,QAT FP8" --rounds 3 --out $OUT > $OUT/bench.log 2>&1
  echo bench rc $?; grep -vE "Warning|warn" $OUT/bench.log | tail -16 | cut -c1-200
fi
