#!/usr/bin/env bash
# Train the neural codec's qualities from scratch on one CUDA device within a single device call
# and hand back the phase-5 checkpoints (slimmed: no optimizer states) and one archive of logs
# through $OUT (the device machine's output folder; such calls return at most 8 files).
#
#   OUT=/some/dir MINUTES=8 scripts/train_device.sh              # all five qualities, in parallel
#   OUT=/some/dir MINUTES=8 scripts/train_device.sh 140 100      # only klt-hp-s140 and klt-hp-s100
#
# The five phases of docs/training.md, each stopped by its step count or its share of MINUTES:
# phase 1 (klt-hp-sNNN.toml) 40 %, phase 2 (klt-hp-sNNN-256.toml) 20 %, phase 3 (klt-cx-sNNN.toml:
# the context model, rate-only) 15 %, phase 4 (klt-cx-sNNN-joint.toml) 15 %, phase 5
# (klt-cx-sNNN-q8.toml: integer decoding) the rest; runs resume from runs/<name>/ckpt.pt when those
# are carried over.  Back here, put each $OUT/klt-cx-sNNN-q8.pt at runs/klt-cx-sNNN-q8/ckpt.pt and
# export with `python -m tileserver.train <config> --export`: export computes the CDF tables that
# ship, with CompressAI's compiled parts, which a machine prepared by scripts/device_prepare.sh
# lacks.  To fine-tune the installed models instead, see scripts/device_finetune.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that comes back}"
MINUTES=${MINUTES:-8}
DEVICE=${DEVICE:-cuda}
# The shared data: ./shared/data on a device machine's copy of the tree, else ../shared/data.
if [ -z "${DATA:-}" ]; then
  if [ -d shared/data ]; then DATA=shared/data; else DATA=../shared/data; fi
fi
# The project venv here; a device machine's own python3 there (scripts/device_prepare.sh).
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
C=tileserver/codecs/configs
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(280 200 140 100 065)
end_at() { date -u -d "+$((MINUTES * 60 * $1 / 100)) sec" +%H:%M:%S; }
phase1_end=$(end_at 40)
phase2_end=$(end_at 60)
phase3_end=$(end_at 75)
phase4_end=$(end_at 90)
phase5_end=$(end_at 100)
mkdir -p "$OUT/logs"

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
logs=$(mktemp -d)
for s in "${steps[@]}"; do
  for name in "klt-hp-s$s" "klt-hp-s$s-256" "klt-cx-s$s" "klt-cx-s$s-joint" "klt-cx-s$s-q8"; do
    cp "runs/$name/train.log" "$logs/$name.train.log" 2>/dev/null || true
  done
  "$PY" scripts/device/slim_checkpoint.py "runs/klt-cx-s$s-q8/ckpt.pt" "$OUT/klt-cx-s$s-q8.pt"
done
cp "$OUT"/logs/*.out "$logs/" 2>/dev/null || true
rm -rf "$OUT/logs"
tar -C "$logs" -czf "$OUT/logs.tgz" .
echo "done: phase-5 checkpoints in $OUT/klt-cx-sNNN-q8.pt, logs in $OUT/logs.tgz"
