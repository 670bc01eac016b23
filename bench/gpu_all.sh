#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Everything a GPU host must measure, in two calls that fit one 15-minute lease (docs/gpu.md):
#
#   EPDRT_COMMIT=<sha> bash bench/gpu_all.sh core    # build (CUDA on), GPU tests, kernels,
#                                                    # transfer, block pool, capacity
#   EPDRT_COMMIT=<sha> bash bench/gpu_all.sh serve   # decode, e2e and planner on 7B shapes
#
# The host has no network: .gpu-wheels/ (bench/gpu_wheels.sh) must travel with the tree. Every
# step runs under its own time budget (and the whole call under EPDRT_GPU_BUDGET_S: 300 s for
# core, 390 s for serve; steps run in order of importance);
# after each step its rc and seconds are logged and everything so far is packed into $OUT:
#   $OUT/gpu-<phase>.log          this script's log (steps, rc, seconds)
#   $OUT/gpu-<phase>-steps.tsv    step, rc, seconds, budget
#   $OUT/gpu-<phase>.tar.gz       every step's log, records (JSON lines), plots, worker logs,
#                                 toolchain.json
# so a call killed at its limit still returns what it measured.
#
# Rehearsal on a CPU host: EPDRT_REHEARSAL=1 bash bench/gpu_all.sh core|serve runs the same
# steps with CPU fallbacks and small shapes, in a fresh venv holding only the GPU host's
# packages plus the wheels gpu_wheels.sh fetches (for this host's Python), and leaves the same
# $OUT layout.
set -uo pipefail
PHASE=${1:-}
case "$PHASE" in
  core | serve) ;;
  *)
    echo "usage: bash bench/gpu_all.sh core|serve" >&2
    exit 2
    ;;
esac
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
REHEARSAL=${EPDRT_REHEARSAL:-0}
OUT=${OUT:-$REPO/out/gpu-$PHASE}
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
WORK=$(mktemp -d)/gpu-$PHASE
mkdir -p "$WORK/worker-logs"
START=$(date +%s)
PHASE_BUDGET_S=300
[ "$PHASE" = serve ] && PHASE_BUDGET_S=390
DEADLINE=$((START + ${EPDRT_GPU_BUDGET_S:-$PHASE_BUDGET_S}))
export PYTHONUNBUFFERED=1
export EPDRT_WORKER_LOG_DIR=$WORK/worker-logs
export EPDRT_COMMIT=${EPDRT_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
export EPDRT_CUDA=ON # a build without CUDA fails instead of silently leaving it out
LOG=$WORK/gpu-$PHASE.log
STEPS=$WORK/gpu-$PHASE-steps.tsv
printf 'step\trc\tseconds\tbudget_s\n' >"$STEPS"

log() { echo "[gpu_all $PHASE $(date +%H:%M:%S) +$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

pack() {
  tar -C "$(dirname "$WORK")" -czf "$OUT/gpu-$PHASE.tar.gz.part" "gpu-$PHASE" &&
    mv "$OUT/gpu-$PHASE.tar.gz.part" "$OUT/gpu-$PHASE.tar.gz"
  cp "$LOG" "$OUT/gpu-$PHASE.log"
  cp "$STEPS" "$OUT/gpu-$PHASE-steps.tsv"
}

# step NAME BUDGET_S CMD...: runs CMD with its output in $WORK/NAME.log, under the smaller of
# BUDGET_S and the time left; logs rc and seconds, packs $OUT. Returns CMD's rc (124: timed out).
step() {
  local name=$1 budget=$2
  shift 2
  local left=$((DEADLINE - $(date +%s) - 15))
  if ((left < 20)); then
    log "SKIP $name: ${left}s left of the call's budget"
    printf '%s\tskipped\t0\t%s\n' "$name" "$budget" >>"$STEPS"
    pack
    return 125
  fi
  ((budget > left)) && budget=$left
  log "step $name (budget ${budget}s): $*"
  local t0 rc secs
  t0=$(date +%s)
  timeout -k 10 "$budget" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  secs=$(($(date +%s) - t0))
  tail -n 8 "$WORK/$name.log" | sed 's/^/    /' | tee -a "$LOG"
  log "step $name: rc=$rc in ${secs}s$([ "$rc" = 124 ] && echo ' (TIMED OUT)')"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$budget" >>"$STEPS"
  pack
  return "$rc"
}

fail_fast() {
  log "FATAL: $*"
  pack
  exit 1
}

# ---- the Python the host has, plus the wheels it lacks --------------------------------------
if [ "$REHEARSAL" = 1 ]; then
  # The GPU host's packages (docs/gpu.md) in a fresh venv; torch is this host's CPU build.
  VENV=${EPDRT_REHEARSAL_VENV:-$WORK/../rehearsal-venv}
  WHEELS=$WORK/../rehearsal-wheels
  DEADLINE=$((START + 1200)) # making the stand-in host is not the phase's time
  if [ ! -x "$VENV/bin/python3" ]; then
    step rehearsal-venv 300 bash -c "python3 -m venv '$VENV' && '$VENV/bin/pip' install -q \
      torch==2.13.0 && '$VENV/bin/pip' install -q transformers==5.17.0 triton numpy pillow \
      safetensors matplotlib msgpack pytest pytest-timeout hypothesis 'pybind11>=2.12' \
      'scikit-build-core>=0.10'" || fail_fast "could not make the rehearsal venv"
  fi
  export PATH=$VENV/bin:$PATH
  step rehearsal-wheels 120 env PY="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
    DEST="$WHEELS" bash bench/gpu_wheels.sh || fail_fast "could not fetch the wheels"
  # The call's budget is the GPU host's: it starts once the stand-in for that host is ready.
  START=$(date +%s)
  DEADLINE=$((START + ${EPDRT_GPU_BUDGET_S:-$PHASE_BUDGET_S}))
else
  WHEELS=$REPO/.gpu-wheels
fi

step toolchain 60 python3 - "$WORK/toolchain.json" <<'EOF'
import json, platform, shutil, subprocess, sys
def run(*cmd):
    if shutil.which(cmd[0]) is None:
        return None
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    return (p.stdout or p.stderr).strip()
info = {"python": sys.version.split()[0], "platform": platform.platform()}
for name in ("torch", "triton", "transformers", "numpy"):
    try:
        info[name] = __import__(name).__version__
    except Exception as exc:  # recorded, not fatal: the import check below decides
        info[name] = f"missing ({exc})"
import torch
info["torch_cuda"] = torch.version.cuda
info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
info["nvidia_smi"] = run("nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader")
info["nvcc"] = run("nvcc", "--version")
info["cmake"] = run("cmake", "--version")
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
EOF

ls "$WHEELS"/*.whl >/dev/null 2>&1 || fail_fast "no wheels in $WHEELS: run bash bench/gpu_wheels.sh on a machine with internet and carry .gpu-wheels"
step wheels 120 python3 -m pip install -q --no-index --no-deps --no-cache-dir "$WHEELS"/*.whl ||
  fail_fast "installing $WHEELS failed"
step deps 60 python3 -c "import importlib, sys
mods = 'zmq msgspec numpy torch triton transformers PIL safetensors matplotlib pytest pytest_timeout hypothesis pybind11 scikit_build_core'.split()
missing = []
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as exc:
        missing.append(f'{m}: {exc}')
print('missing:', missing or 'none')
sys.exit(1 if missing else 0)" || fail_fast "a dependency does not import (see deps.log)"

# A build directory of the call's own: a checkout's build/ may hold another Python's build.
step build 240 python3 -m pip install -v --no-build-isolation --no-deps --no-cache-dir \
  -C build-dir="$WORK/../build" -e . ||
  fail_fast "the build failed (see build.log)"
step info 60 python3 -m epdrt.cli info --json "$WORK/info.json" || fail_fast "epdrt does not import"
python3 - "$WORK/info.json" "$REHEARSAL" <<'EOF' || fail_fast "CUDA is not usable (see the log)"
import json, sys
info = json.load(open(sys.argv[1]))
if not info["cuda_compiled"]:
    sys.exit("epdrt was built without CUDA")
if sys.argv[2] != "1" and not (info["cuda_devices_core"] and info["cuda_available_torch"]):
    sys.exit(f"no CUDA device is usable: core sees {info['cuda_devices_core']}, torch "
             f"{info['cuda_available_torch']}")
print("CUDA compiled;", info["cuda_devices_core"], "device(s):", info["devices"])
EOF

GPU=1
[ "$REHEARSAL" = 1 ] && GPU=0
BENCH=(python3 -m epdrt.cli bench)

if [ "$PHASE" = core ]; then
  step pytest-gpu 240 python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts=-ra \
    --timeout 120 --junitxml="$WORK/pytest-gpu.xml"
  if [ $GPU = 1 ]; then
    step bench-kernels 90 "${BENCH[@]}" kernels --json "$WORK/bench-kernels.jsonl"
    step bench-transfer 90 "${BENCH[@]}" transfer --json "$WORK/bench-transfer.jsonl"
    step bench-capacity 120 "${BENCH[@]}" capacity --json "$WORK/bench-capacity.jsonl"
  else
    step bench-kernels 90 "${BENCH[@]}" kernels --quick --json "$WORK/bench-kernels.jsonl"
    step bench-transfer 90 "${BENCH[@]}" transfer --quick --json "$WORK/bench-transfer.jsonl"
    step bench-capacity 120 "${BENCH[@]}" capacity --size tiny --memory-budget 1 --json "$WORK/bench-capacity.jsonl"
  fi
  step bench-block-pool 30 "${BENCH[@]}" block-pool --ops 200000 --json "$WORK/bench-block-pool.jsonl"
else
  MODELS=$WORK/../models
  SIZE=7b
  [ $GPU = 1 ] || SIZE=tiny
  step make-models 90 bash -c "python3 -m epdrt.cli make-tiny-model '$MODELS/llava' --arch llava \
    --size $SIZE && python3 -m epdrt.cli make-tiny-model '$MODELS/qwen2-vl' --arch qwen2-vl \
    --size $SIZE" || fail_fast "could not write the model directories"
  # Paged decode against generate() on the same weights (7B shapes, bf16 on the GPU).
  if [ $GPU = 1 ]; then
    step bench-decode 90 "${BENCH[@]}" decode --model "$MODELS/llava" --dtype bfloat16 \
      --batches 1,8,32 --contexts 512,2048 --steps 8 --json "$WORK/bench-decode-llava-$SIZE.jsonl"
  else
    step bench-decode 90 "${BENCH[@]}" decode --model "$MODELS/llava" --quick \
      --json "$WORK/bench-decode-llava-$SIZE.jsonl"
  fi
  # One GPU: every worker of a deployment shares it (the records say so: workers_share_devices).
  # epd's KV hand-off layer by layer against pulled after the prefill, as a fourth run.
  step e2e-llava 200 "${BENCH[@]}" e2e --model "$MODELS/llava" --requests 24 --rate 2 \
    --kv-handoff layerwise,pull --request-timeout 60 --json "$WORK/bench-e2e-llava-$SIZE.jsonl"
  # The planner's simulator against real runs: with one GPU only the aggregated deployment
  # (its stages take turns on the GPU, as the simulator models); all three with 3 GPUs or more.
  DEPLOY="aggregated:0:1:0"
  [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 3 ] &&
    DEPLOY="epd:1:1:1,pd:0:1:1,aggregated:0:1:0"
  step planner-llava 200 "${BENCH[@]}" planner --model "$MODELS/llava" --deployments "$DEPLOY" \
    --quick-profile --requests 30 --rates 2,20 --calibration-requests 8 --warmup 2 \
    --warmup-burst 8 --request-timeout 60 --save-profile "$WORK/planner-llava-$SIZE.profile.json" \
    --json "$WORK/bench-planner-llava-$SIZE.jsonl"
  step e2e-qwen2-vl 150 "${BENCH[@]}" e2e --model "$MODELS/qwen2-vl" --requests 16 --rate 2 \
    --request-timeout 60 --json "$WORK/bench-e2e-qwen2-vl-$SIZE.jsonl"
fi
log "done: $(awk -F'\t' 'NR > 1 && $2 != 0 {n++} END {print n + 0}' "$STEPS") step(s) did not pass"
pack
