# The next GPU calls for the Gluon QAT kernels (written in session 39, not yet run; carry .whl), in two parts that
# each fit one 10-minute call: `bash benchmarks/next_gluon_call.sh a`, then `... b`. Each step has its own time limit:
# a hang (as the first tail boxes had) ends that step, not the call.
# a: (1) the GPU tests of the tail boxes (the box-count clamp for experts past 320 rows has never run) and of
#    quantized rows given at decode sizes; (2) 8 converter warps (probe_gluon_variants.py --family converters),
#    gate_up only.
# b: (1) the acceptance bench's QAT NVFP4 and QAT FP8 at 34k rows through the op (3 rounds);
#    (2) the layer end to end with gather_quant on and off and the bf16 layer (bench_e2e_modelopt.py --ab-gather).
PART=${1:?usage: next_gluon_call.sh a|b}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.limit --format=csv,noheader
if [ "$PART" = a ]; then
  timeout -s INT 200 python -m pytest -p no:cacheprovider tests/test_gpu.py -n 4 -rA --tb=short -q \
    -k "tail_boxes or qat_nvfp4_gluon_gemm_cuda or takes_quantized_rows" > $OUT/tests.log 2>&1
  echo tests rc $?; grep -E "PASSED|FAILED|ERROR|passed|failed|^E " $OUT/tests.log | cut -c1-200 | tail -14
  timeout -s INT 120 python benchmarks/probe_gluon_variants.py --family converters --cases gate_up --rounds 2 \
    --out $OUT/converters.json > $OUT/converters.log 2>&1
  echo converters rc $?; grep -E "bit-equal|medians|no MMA|ERROR" $OUT/converters.log | grep -v round | cut -c1-200 \
    | tail -10
else
  timeout -s INT 300 python benchmarks/bench_grouped_qmm.py --only "qwen3 gate_up M=34816,qwen3 down M=34816" \
    --modes "QAT NVFP4,QAT FP8" --rounds 3 --out $OUT > $OUT/bench.log 2>&1
  echo bench rc $?; grep -vE "Warning|warn" $OUT/bench.log | tail -16 | cut -c1-200
  timeout -s INT 240 python benchmarks/bench_e2e_modelopt.py --tokens 4096,16384 --ab-gather --out $OUT \
    > $OUT/e2e.log 2>&1
  echo e2e rc $?; tail -5 $OUT/e2e.log | cut -c1-220
fi
