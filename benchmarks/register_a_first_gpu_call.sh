# Session 36 left branch gluon-register-a: QAT NVFP4 with the weight as wgmma's register operand
# (qat_gluon.qat_nvfp4_rega_kernel, REGISTER_A_CONFIGS), compiled for sm_90 but never run. On that branch
# (git checkout gluon-register-a), its first GPU call: the probe checks each variant's weight values against
# fake_quant_experts and its output against the float64 reference, then times it beside the shipped configuration.
# If a variant hangs, the timeout kills it: look for a barrier phase error in _convert_mma_partition.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
timeout -s INT 240 python benchmarks/probe_gluon_qat_nvfp4.py --variants 0,7,8,9 --decompose 7 --out $OUT/probe.json > $OUT/probe.log 2>&1; echo probe rc $?
grep -v launching $OUT/probe.log | cut -c1-200 | tail -30
