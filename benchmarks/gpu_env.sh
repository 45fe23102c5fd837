# Sourced by the device-call scripts (`. benchmarks/gpu_env.sh || exit`, from the repository root): the carried
# wheels (.whl, git-ignored; `bash benchmarks/fetch_gpu_wheels.sh` fills it) installed into /tmp/site, and the
# Python path that finds them and this checkout's moeq.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
