#!/usr/bin/env bash
# Train the neural codec's qualities on one CUDA device within a single device call and hand back
# the checkpoints, logs and exported weights through $OUT (the device machine's output folder).
#
#   OUT=/some/dir MINUTES=8 scripts/train_device.sh              # all five qualities, in parallel
#   OUT=/some/dir MINUTES=8 scripts/train_device.sh 140 100      # only klt-hp-s140 and klt-hp-s100
#
# The five phases of docs/training.md, each stopped by its step count or its share of MINUTES:
# phase 1 (klt-hp-sNNN.toml) 40 %, phase 2 (klt-hp-sNNN-256.toml) 20 %, phase 3 (klt-cx-sNNN.toml:
# the context model, rate-only) 15 %, phase 4 (klt-cx-sNNN-joint.toml) 15 %, phase 5
# (klt-cx-sNNN-q8.toml: integer decoding) the rest; runs resume from runs/<name>/ckpt.pt when those
# are carried over.  The phase-5 weights (the shipped kind) are exported into $OUT/weights (not the
# package): review them with bench/compress.py, then copy the .pt files and the manifest entries
# into tileserver/codecs/weights/ to ship them.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that comes back}"
MINUTES=${MINUTES:-8}
[ "$MINUTES" -ge 8 ] || { echo "MINUTES must be at least 8 (--until has minute resolution)" >&2; exit 2; }
DEVICE=${DEVICE:-cuda}
# The shared data: ./shared/data on a device machine's copy of the tree, else ../shared/data.
if [ -z "${DATA:-}" ]; then
  if [ -d shared/data ]; then DATA=shared/data; else DATA=../shared/data; fi
fi
PY=${PY:-.venv/bin/python}
C=tileserver/codecs/configs
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(280 200 140 100 065)
end_at() { date -u -d "+$((MINUTES * $1 / 100)) min" +%H:%M; }
phase1_end=$(end_at 40)
phase2_end=$(end_at 60)
phase3_end=$(end_at 75)
phase4_end=$(end_at 90)
phase5_end=$(end_at 100)
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
run_phase "klt-cx-sNNN-joint" "$phase4_end"
run_phase "klt-cx-sNNN-q8" "$phase5_end"
configs=()
for s in "${steps[@]}"; do configs+=("$C/klt-cx-s$s-q8.toml"); done
"$PY" -m tileserver.train "${configs[@]}" --export --data "$DATA" --weights-dir "$OUT/weights" \
  > "$OUT/logs/export.out" 2>&1
for s in "${steps[@]}"; do
  for name in "klt-hp-s$s" "klt-hp-s$s-256" "klt-cx-s$s" "klt-cx-s$s-joint" "klt-cx-s$s-q8"; do
    mkdir -p "$OUT/runs/$name"
    cp "runs/$name/train.log" "runs/$name/ckpt.pt" "$OUT/runs/$name/" 2>/dev/null || true
  done
done
echo "done: weights in $OUT/weights, logs in $OUT/logs, checkpoints in $OUT/runs"
