# Session 39's second GPU call (carry .whl): QAT NVFP4 with 8 converter warps at 56-64 registers (the probe's
# --converters), kernel alone against the shipped 4 x 104; then the tail-box equality test by name.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.limit --format=csv,noheader
timeout -s INT ${PROBE_S:-170} python benchmarks/probe_tail_boxes.py --converters --rounds 2 --cases "${CASES:-gate_up,down}" --out $OUT/converters.json > $OUT/converters.log 2>&1; echo probe rc $?
grep -E "bit-equal|medians|no MMA|ERROR" $OUT/converters.log | grep -v round | cut -c1-200 | tail -24
[ -n "$WITH_TESTS" ] && timeout -s INT 80 python -m pytest -p no:cacheprovider tests/test_gpu.py -n 2 -rA --tb=short -q -k "tail_boxes" > $OUT/tests.log 2>&1; echo tests rc $?
grep -E "PASSED|FAILED|ERROR|passed|failed|^E " $OUT/tests.log | cut -c1-200 | tail -8
