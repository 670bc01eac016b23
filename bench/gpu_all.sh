#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# One call on a lent GPU machine (no internet; torch, triton, pybind11, scikit-build-core are
# preinstalled): build, run the GPU tests and every benchmark, and leave in $OUT the log and one
# archive, results.tar.gz, holding every record (JSON lines), plot and log (the device tool
# returns at most 8 files).   run(command="bash bench/gpu_all.sh")
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
RES=$(mktemp -d)/results
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1
log() { echo "[gpu_all $(date +%H:%M:%S)] $*" | tee -a "$RES/gpu_all.log"; }
finish() { tar -C "$(dirname "$RES")" -czf "$OUT/results.tar.gz" results; cp "$RES/gpu_all.log" "$OUT/"; }
trap finish EXIT

log "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
log "build"
python3 -m pip install --no-build-isolation --no-deps -q -e . >"$RES/build.log" 2>&1 \
  || { log "build failed (see build.log)"; tail -50 "$RES/build.log"; exit 1; }
python3 -m epdrt.cli info --json "$RES/info.json" | tee -a "$RES/gpu_all.log"

log "pytest -m gpu"
python3 -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$RES/pytest-gpu.log" | tail -15

# Every registered benchmark, each into its own JSON-lines file (planner: below, on 7B shapes).
for name in $(python3 -c "from epdrt.bench import BENCHMARKS; print(' '.join(BENCHMARKS))"); do
  [ "$name" = planner ] && continue
  log "bench $name"
  python3 -m epdrt.cli bench "$name" --json "$RES/bench-$name.jsonl" 2>&1 \
    | tee "$RES/bench-$name.log" | tail -25
done
# End to end on real-size shapes (random weights; config-only directories, weights drawn at load).
MODELS=$(mktemp -d)
for arch in llava qwen2-vl; do
  log "bench e2e on $arch 7B shapes"
  python3 -m epdrt.cli make-tiny-model "$MODELS/$arch-7b" --arch "$arch" --size 7b >/dev/null
  python3 -m epdrt.cli bench e2e --model "$MODELS/$arch-7b" --requests 32 --rate 2 \
    --json "$RES/bench-e2e-$arch-7b.jsonl" 2>&1 | tee "$RES/bench-e2e-$arch-7b.log" | tail -25
done
# The planner's simulator against real runs on this GPU: one worker per GPU, so with one GPU
# only the aggregated deployment (its stages take turns on the GPU, as the simulator models).
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
DEPLOY="aggregated:0:1:0"
[ "$GPUS" -ge 3 ] && DEPLOY="epd:1:1:1,pd:0:1:1,aggregated:0:1:0"
log "bench planner on llava 7B shapes ($GPUS GPU(s): $DEPLOY)"
python3 -m epdrt.cli bench planner --model "$MODELS/llava-7b" --deployments "$DEPLOY" \
  --quick-profile --requests 100 --rates 1,20 --save-profile "$RES/planner-llava-7b.profile.json" \
  --json "$RES/bench-planner-llava-7b.jsonl" 2>&1 | tee "$RES/bench-planner-llava-7b.log" | tail -40
log "done; records in $OUT/results.tar.gz"
