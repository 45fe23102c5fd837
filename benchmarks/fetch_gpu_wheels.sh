# Fill .whl/ (git-ignored) with the wheels the GPU machines need beside their image (Python 3.12, torch 2.11,
# transformers 5.17, no modelopt / megatron-core / compressed-tensors): the test extras' packages at the versions the
# CPU venv runs, and what they import that the image lacks or has too old (transformers 5.25 needs huggingface_hub
# >= 2.4, which imports httpx2; modelopt needs pydantic, omegaconf and PuLP). 48 MB, under a device call's 64 MiB.
# Run here (it downloads from PyPI), then carry `.whl` in each device call; the GPU scripts install it into
# /tmp/site with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl`.
set -e
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
WHEELS="transformers==5.25.0 megatron-core==0.16.1 nvidia-modelopt==0.47.0 compressed-tensors==0.20.1
  huggingface_hub==2.4.0 tokenizers==0.23.3 kernels==0.19.1 hf-xet==1.8.0 httpx2==2.17.0 httpcore2==2.17.0
  truststore==0.10.5 idna==3.21 anyio==4.16.0 h11==0.16.0 click==8.5.1 tomlkit==0.15.3
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  omegaconf==2.4.0 PuLP==3.3.2 loguru==0.7.3"
for wheel in $WHEELS; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$wheel" 2>&1 | grep -v "is ignored" || true
done
ls .whl | wc -l
du -sh .whl
