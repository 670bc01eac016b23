#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# On a machine with internet: fetch wheels of every runtime dependency of epdrt that the GPU
# host lacks, for that host (CPython 3.12, manylinux x86_64), into .gpu-wheels/ (git-ignored).
# The GPU host has no network; carry the folder to it (device tool: carry=[".gpu-wheels"]) and
# bench/gpu_all.sh installs it with --no-index --no-deps before the build.
#
#   bash bench/gpu_wheels.sh                  # -> .gpu-wheels/ for the GPU host
#   PY=3.11 DEST=dir bash bench/gpu_wheels.sh # the same packages for another Python (rehearsal)
#
# What the GPU host has is listed in docs/gpu.md (torch 2.11, triton, transformers 5.17,
# numpy, pillow, safetensors, matplotlib, msgpack, pytest, pytest-timeout, hypothesis,
# pybind11, scikit-build-core, ...). Of epdrt's dependencies it lacks these two; neither needs
# another package. bench/gpu_all.sh checks every import first, so a gap shows at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-3.12}
DEST=${DEST:-.gpu-wheels}
PACKAGES=(pyzmq==27.3.0 msgspec==0.23.0)
mkdir -p "$DEST"
tag=cp${PY/./}
for spec in "${PACKAGES[@]}"; do
  name=${spec%%==*}
  if ls "$DEST"/"${name}"-*-"$tag"-*.whl "$DEST"/"${name}"-*-abi3-*.whl >/dev/null 2>&1; then
    echo "have $spec"
    continue
  fi
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST" "$spec"
  echo "got  $spec"
done
ls -l "$DEST"
