#!/usr/bin/env bash
# Every GPU figure of docs/performance.md in one run: one JSON and one table (about 8 minutes on one H100).
#
#   bench/gpu.sh                          # on a machine with a CUDA GPU
#   bench/gpu.sh --device cpu --quick     # the same path with tiny models on a CPU (tests/test_bench_gpu.py)
#   bench/gpu.sh --out DIR                # results folder (default runs/bench/gpu)
#
# Figure 1, DP step / non-private step: s1 v2 (batch 16, 100 phonemes + 250 tokens) in bf16 and
# fp32, s2 v2 (batch 8, its 20480-sample training slices) in bf16, every engine variant of
# bench.dp_step, interleaved, and the secure noise alone on the device at s1 v2's LoRA and full
# sizes, checked to release exactly what the CPU does (bench.secure_noise). Figure 2, memory: the
# GPU profiles' DP steps in processes capped to 6, 8, 12 and 24 GB (rtx2060, rtx3070, rtx3060,
# rtx4090; bench.profile_fit). A short DP training
# run: fedvox-client train on pseudo-speech speakers, with the profile the probe picks (bf16 on a
# bf16 GPU). Then bench.gpu_report gathers everything into gpu.json and prints the table.
#
# The machine needs fedvox importable by PYTHON (default: .venv/bin/python if present, else
# python3). A GPU machine without the registry can take fedvox's pure-Python dependencies as
# wheels: FEDVOX_WHEELS=DIR installs them from DIR first (make gpu-wheels fills .gpu-wheels/).
set -euo pipefail
cd "$(dirname "$0")/.."

device=cuda quick=0 out=runs/bench/gpu
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --quick) quick=1; shift ;;
    --out) out=$2; shift 2 ;;
    *) echo "bench/gpu.sh: unknown argument $1 (use --device cpu|cuda, --quick, --out DIR)" >&2; exit 2 ;;
  esac
done
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 RAY_USAGE_STATS_ENABLED=0
if [ -n "${FEDVOX_WHEELS:-}" ]; then
  "$PYTHON" -m pip install -q --no-index --find-links "$FEDVOX_WHEELS" --no-deps "$FEDVOX_WHEELS"/*.whl
  "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e .
fi
mkdir -p "$out"
log() { echo "== $(date +%T) $*"; }
cli() { "$PYTHON" -c "import sys; from fedvox.$1 import main; sys.argv[0] = 'fedvox'; main()" "${@:2}"; }

if [ "$quick" = 1 ]; then
  s1=(--config tiny --batch 4 --phonemes 12 --tokens 24 --repeats 1)
  s2=(--config tiny --batch 2 --tokens 40 --repeats 1)
  fit=(--device x86-avx2 --config tiny --steps 1)
  speakers=(--n 1 --utterances 6 --heldout-utterances 1 --unseen-speakers 0) steps=2
  noise=(--params 1000 70000 --repeats 1)
else
  s1=(--config v2 --batch 16 --phonemes 100 --tokens 250 --repeats 20)
  s2=(--config v2 --batch 8 --tokens 150 --repeats 10)
  fit=(--device rtx2060 --device rtx3070 --device rtx3060 --device rtx4090 --config v2 --subset full)
  speakers=(--n 1 --utterances 40 --heldout-utterances 2 --unseen-speakers 0) steps=30
  noise=(--params 1769472 77606402 --repeats 5)  # s1 v2's LoRA subset and full model
fi

for precision in bf16 fp32; do
  log "figure 1: s1 DP step, $precision"
  "$PYTHON" -m bench.dp_step --stage s1 --device "$device" --precision "$precision" "${s1[@]}" \
    --out "$out/dp_step-s1-$precision.json"
done
log "figure 1: s2 DP step, bf16"
"$PYTHON" -m bench.dp_step --stage s2 --device "$device" --precision bf16 "${s2[@]}" --out "$out/dp_step-s2-bf16.json"
log "figure 1: secure noise on the device, checked against the CPU's"
"$PYTHON" -m bench.secure_noise --device "$device" "${noise[@]}" --out "$out/secure_noise.json"
log "figure 2: memory per GPU profile"
"$PYTHON" -m bench.profile_fit --stage s1 "${fit[@]}" --out "$out/profile_fit-s1.json"

log "DP training run"
work="$out/train"
rm -rf "$work"
cli simulations.cli speakers --out "$work/speakers" --engine pseudo-speech --lang en "${speakers[@]}"
cli client.cli prepare "$work/speakers/train.list" --out "$work/data"
SECONDS=0
cli client.cli train --data "$work/data" --stage s1 --steps "$steps" --noise-multiplier 1.0 \
  --out "$work/run"
echo "{\"steps\": $steps, \"wall_s\": $SECONDS, \"run\": \"$work/run\"}" > "$out/train.json"

"$PYTHON" -m bench.gpu_report "$out"
