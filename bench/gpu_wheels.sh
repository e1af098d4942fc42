#!/usr/bin/env bash
# Wheels that let the lent GPU machine import Avalanche, made here (where the package
# registry is reachable) for that machine's Python, into build/gpu_wheels/ (ignored by git).
#
#   bash bench/gpu_wheels.sh                      # for the GPU image: CPython 3.12, x86-64
#   GPU_WHEELS_PYTHON=3.11 bash bench/gpu_wheels.sh build/wheels-311   # e.g. to try them here
#
# The GPU image has no network and no avalanche-lib, but it has torch, torchvision, numpy,
# scipy, scikit-learn, matplotlib, tensorboard, torchmetrics, tqdm, psutil, requests,
# pyyaml, click, xxhash (the device tool's KINDS.md lists its packages). So only
# avalanche-lib 0.6.0 and what its imports need beyond that image travel, about 26 MB,
# most of it wandb, which Avalanche imports at start-up (with pydantic, opentelemetry and
# protobuf: carried, at the versions tried here, rather than left to what the image has).
# They are installed there with --no-deps:
# - avalanche-lib, pytorchcv, qpsolvers, dill without their needs (torch, torchvision,
#   numpy, scipy: on the image; qpsolvers' solvers are optional), GPUtil built from its
#   sdist (it has no wheel);
# - wandb and gdown with their needs, as pip resolves them, less what the image has and
#   what only wandb's cwevals needs.
# bench/gpu_check.sh installs them into a scratch folder when build/gpu_wheels holds
# wheels: name build/gpu_wheels in the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-build/gpu_wheels}"
PYV="${GPU_WHEELS_PYTHON:-3.12}"
PY="${PYTHON:-python3}"
# On the image (and needed by torch or its other packages): not carried.
ON_IMAGE="certifi charset_normalizer click filelock idna packaging pyyaml requests tqdm typing_extensions urllib3 xxhash"
# Needed only by wandb's cwevals, which `import avalanche` never loads (anyio, h11, httpcore
# and httpx are on the image too): not carried, so nothing shadows the image's copies.
UNUSED="cwevals anyio h11 httpcore httpx sniffio distro"

rm -rf "$DEST"
mkdir -p "$DEST"
get=("$PY" -m pip download -q --only-binary=:all: --python-version "$PYV" --implementation cp -d "$DEST")
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  get+=(--platform "$p")
done
quiet() { grep -v "is ignored" || true; }  # pip's notes on this machine's local indexes
"${get[@]}" wandb gdown 2>&1 | quiet
shopt -s nocaseglob  # wheel names differ in case (PyYAML, PySocks)
for name in $ON_IMAGE $UNUSED; do rm -f "$DEST"/"$name"-*.whl; done
shopt -u nocaseglob
"${get[@]}" --no-deps avalanche-lib==0.6.0 pytorchcv qpsolvers dill 2>&1 | quiet
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" gputil 2>&1 | quiet
for name in avalanche_lib wandb gdown pytorchcv qpsolvers dill gputil pydantic_core; do
  ls "$DEST" | grep -qi "^$name-" || { echo "gpu_wheels: no wheel for $name in $DEST" >&2; exit 1; }
done
echo "gpu_wheels: $(ls "$DEST" | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
