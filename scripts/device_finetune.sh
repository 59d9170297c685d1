#!/usr/bin/env bash
# One call of a borrowed GPU machine: check neural decoding on CUDA against the CPU's pixels
# (bench/decode_gpu.py), then fine-tune the given configs in parallel for TRAIN_SECONDS, and hand
# back slimmed checkpoints and one archive of logs through $OUT (such calls return at most 8 files).
#
#   OUT=/tmp/out TRAIN_SECONDS=420 BLOBS=.dev/gpu-blobs.pkl \
#     scripts/device_finetune.sh tileserver/codecs/configs/klt-cx-s*-gpu*.toml
#
# Back here: put each $OUT/<name>.pt at runs/<name>/ckpt.pt, then
# `.venv/bin/python -m tileserver.train <config> --export` (CDF tables and the held-out evaluation
# are computed here, with CompressAI's compiled parts) and `bench/compress.py` to judge it.
#
# Environment: DATA (default shared/data if present, else ../shared/data); PY (default python3);
# BLOBS (from `bench/decode_gpu.py --prepare`; the decode check is skipped without it);
# DEVICE (default cuda).  Fails fast: when every run has died before (or while) starting, it stops
# and returns the logs at once, so a broken environment costs a minute, not the call.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that comes back}"
[ $# -gt 0 ] || { echo "usage: OUT=... $0 CONFIG.toml..." >&2; exit 2; }
TRAIN_SECONDS=${TRAIN_SECONDS:-420}
STARTUP_SECONDS=${STARTUP_SECONDS:-120}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
if [ -z "${DATA:-}" ]; then
  if [ -d shared/data ]; then DATA=shared/data; else DATA=../shared/data; fi
fi
LOGS=$(mktemp -d)
log=$LOGS/device.log
mkdir -p "$OUT"

names=()
for cfg in "$@"; do names+=("$(sed -n 's/^name = "\(.*\)"/\1/p' "$cfg")"); done

collect() {
  for name in "${names[@]}"; do
    cp "runs/$name/train.log" "$LOGS/$name.train.log" 2>/dev/null || true
    [ -f "runs/$name/ckpt.pt" ] || continue
    # Model, steps and history only (q3: 3.1 MB instead of 8.5 with the optimizer states).
    "$PY" scripts/device/slim_checkpoint.py "runs/$name/ckpt.pt" "$OUT/$name.pt" >> "$log" 2>&1
  done
  tar -C "$LOGS" -czf "$OUT/logs.tgz" .
}
trap collect EXIT

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
} >> "$log" 2>&1

if [ -n "${BLOBS:-}" ]; then
  echo "== decode check $(date -u +%T)" >> "$log"
  timeout 180 "$PY" bench/decode_gpu.py --blobs "$BLOBS" --device "$DEVICE" --reps 3 \
    --out "$LOGS/decode_gpu.json" >> "$log" 2>&1 || echo "decode check failed: $?" >> "$log"
fi

until=$(date -u -d "+$TRAIN_SECONDS sec" +%H:%M:%S)
echo "== training until $until: ${names[*]}" >> "$log"
pids=()
for cfg in "$@"; do
  name=$(sed -n 's/^name = "\(.*\)"/\1/p' "$cfg")
  "$PY" -m tileserver.train "$cfg" --device "$DEVICE" --data "$DATA" --until "$until" \
    > "$LOGS/$name.out" 2>&1 &
  pids+=($!)
done
# Fail fast: stop if no run is alive before all have loaded and evaluated their start ("eval step 0").
for _ in $(seq "$STARTUP_SECONDS"); do
  sleep 1
  ready=0
  for name in "${names[@]}"; do grep -q " eval step 0 " "$LOGS/$name.out" 2>/dev/null && ready=$((ready + 1)); done
  alive=0
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done
  [ "$ready" -eq "${#names[@]}" ] || [ "$alive" -eq 0 ] && break
done
if [ "$alive" -eq 0 ]; then
  echo "no run is alive ($ready of ${#names[*]} had started): stopping" >> "$log"
  exit 1
fi
echo "== all runs stepping $(date -u +%T)" >> "$log"
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
echo "== done $(date -u +%T), status $status" >> "$log"
exit $status
