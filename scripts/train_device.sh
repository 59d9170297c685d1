#!/usr/bin/env bash
# Train the neural codec's qualities on one CUDA device within a single device call and hand back
# the checkpoints, logs and exported weights through $OUT (the device machine's output folder).
#
#   OUT=/some/dir MINUTES=8 scripts/train_device.sh              # all five qualities, in parallel
#   OUT=/some/dir MINUTES=8 scripts/train_device.sh 140 100      # only klt-hp-s140 and klt-hp-s100
#
# Phase 1 (klt-hp-sNNN.toml) gets 55 % of MINUTES, phase 2 (klt-hp-sNNN-256.toml) 25 % and phase 3
# (klt-cx-sNNN.toml: the context model, rate-only) the rest, as in docs/training.md; runs resume
# from runs/<name>/ckpt.pt when those are carried over.  The weights
# are exported into $OUT/weights (not the package): review them with bench/compress.py, then copy
# the .pt files and the manifest entries into tileserver/codecs/weights/ to ship them.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that comes back}"
MINUTES=${MINUTES:-8}
[ "$MINUTES" -ge 5 ] || { echo "MINUTES must be at least 5 (--until has minute resolution)" >&2; exit 2; }
DEVICE=${DEVICE:-cuda}
# The shared data: ./shared/data on a device machine's copy of the tree, else ../shared/data.
if [ -z "${DATA:-}" ]; then
  if [ -d shared/data ]; then DATA=shared/data; else DATA=../shared/data; fi
fi
PY=${PY:-.venv/bin/python}
C=tileserver/codecs/configs
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(280 200 140 100 065)
phase1_end=$(date -u -d "+$((MINUTES * 55 / 100)) min" +%H:%M)
phase2_end=$(date -u -d "+$((MINUTES * 80 / 100)) min" +%H:%M)
phase3_end=$(date -u -d "+${MINUTES} min" +%H:%M)
mkdir -p "$OUT/weights" "$OUT/logs"

run_phase() {  # $1: config name pattern (NNN = the step), $2: --until
  local pids=()
  for s in "${steps[@]}"; do
    local name=${1//NNN/$s}
    "$PY" -m tileserver.train "$C/$name.toml" --device "$DEVICE" --data "$DATA" --until "$2" \
      > "$OUT/logs/$name.out" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
}

run_phase "klt-hp-sNNN" "$phase1_end"
run_phase "klt-hp-sNNN-256" "$phase2_end"
run_phase "klt-cx-sNNN" "$phase3_end"
configs=()
for s in "${steps[@]}"; do configs+=("$C/klt-cx-s$s.toml"); done
"$PY" -m tileserver.train "${configs[@]}" --export --data "$DATA" --weights-dir "$OUT/weights" \
  > "$OUT/logs/export.out" 2>&1
for s in "${steps[@]}"; do
  for name in "klt-hp-s$s" "klt-hp-s$s-256" "klt-cx-s$s"; do
    mkdir -p "$OUT/runs/$name"
    cp "runs/$name/train.log" "runs/$name/ckpt.pt" "$OUT/runs/$name/" 2>/dev/null || true
  done
done
echo "done: weights in $OUT/weights, logs in $OUT/logs, checkpoints in $OUT/runs"
