#!/usr/bin/env bash
# Assemble .dev/ (git-ignored; name it in the device call's `carry`) for scripts/device_finetune.sh
# on a borrowed GPU machine whose Python (3.12, with torch, numpy and numba) has no CompressAI build,
# no OpenSlide and no pytorch-msssim, and cannot reach a package index:
#   .dev/site/compressai  CompressAI's Python sources from this venv with the compiled parts replaced
#                         by scripts/device/compressai_shim (enough to train and to decode);
#   .dev/whl              wheels of openslide-python, openslide-bin and pytorch-msssim for cp312;
#   .dev/data             the training data the configs name (tissue patches, the CMU slide);
#   .dev/gpu-blobs.pkl    the benchmark tiles coded here, with the CPU's pixel digests (bench/decode_gpu.py).
# On the machine: pip install --target /tmp/site .dev/whl/*.whl, then
# PYTHONPATH=/tmp/site:$PWD/.dev/site DATA=.dev/data BLOBS=.dev/gpu-blobs.pkl scripts/device_finetune.sh ...
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
PY=${PY:-.venv/bin/python}
rm -rf .dev
mkdir -p .dev/site .dev/whl .dev/data/patches .dev/data/slides
site=$("$PY" -c 'import compressai, os; print(os.path.dirname(compressai.__file__))' 2>/dev/null)
cp -r "$site" .dev/site/
find .dev/site -name '*.so' -delete
find .dev/site -name __pycache__ -prune -exec rm -rf {} +
cp scripts/device/compressai_shim/*.py .dev/site/compressai/
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .dev/whl openslide-python==1.4.7 openslide-bin==4.0.1.2 pytorch-msssim==1.0.0
cp -r "$DATA/patches/tissue" .dev/data/patches/
cp "$DATA/slides/CMU-1-Small-Region.svs" .dev/data/slides/
"$PY" bench/decode_gpu.py --prepare .dev/gpu-blobs.pkl
mkdir -p .git/info
grep -qx '/.dev/' .git/info/exclude 2>/dev/null || echo '/.dev/' >> .git/info/exclude
du -sh .dev
