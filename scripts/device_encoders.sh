#!/usr/bin/env bash
# One call of a borrowed GPU machine: go on training the installed encoder add-ons of the given
# qualities (scripts/train_encoder.py --resume installed; a new add-on where none is installed),
# all in parallel for MINUTES, with GPU batches, and hand back each state and log through $OUT.
#
#   OUT=/tmp/out MINUTES=7 scripts/device_encoders.sh 1 2 3 4 5
#
# Back here, for each quality q:
#   .venv/bin/python scripts/train_encoder.py --quality q --resume $OUT/qq.pt --minutes 0 --install
# (codes the 16 evaluation tiles again on this machine and writes the add-on and its manifest entry,
# with every run's steps and minutes); then bench/compress.py judges the result.
#
# Environment: DATA (default shared/data if present, else ../shared/data); PY (default python3);
# DEVICE (default cuda); BATCH (default 32 crops of 128²); LR (default 3e-4); GUARD (default 5000: an MSE
# term of the model's lambda / GUARD, 0 for none); HOLD (default 1: --hold-rate, the rate held at the
# shipped encoder's, as the installed add-ons were trained; 0 to let it move).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that comes back}"
[ $# -gt 0 ] || { echo "usage: OUT=... $0 QUALITY..." >&2; exit 2; }
MINUTES=${MINUTES:-7}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-32}
LR=${LR:-3e-4}
GUARD=${GUARD:-5000}
HOLD=${HOLD:-1}
if [ -z "${DATA:-}" ]; then
  if [ -d shared/data ]; then DATA=shared/data; else DATA=../shared/data; fi
fi
mkdir -p "$OUT"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
} > "$OUT/device.log" 2>&1

pids=()
for q in "$@"; do
  resume=()
  "$PY" - "$q" <<'EOF' && resume=(--resume installed)
import json, sys
entry = json.load(open("tileserver/codecs/weights/manifest.json"))["models"][sys.argv[1]]
sys.exit(0 if "encoder" in entry else 1)
EOF
  extra=()
  [ "$HOLD" = 1 ] && extra+=(--hold-rate)
  if [ "$GUARD" != 0 ]; then
    extra+=(--lambda-mse "$("$PY" -c 'import json, sys
print(json.load(open("tileserver/codecs/weights/manifest.json"))["models"][sys.argv[1]]["lambda"] / float(sys.argv[2]))' "$q" "$GUARD")")
  fi
  # The clock covers loading and the first evaluation too: stop hard a few minutes after MINUTES.
  timeout "$(( ${MINUTES%.*} * 60 + 240 ))" "$PY" scripts/train_encoder.py --quality "$q" "${resume[@]}" \
    --minutes "$MINUTES" --device "$DEVICE" --batch "$BATCH" --lr "$LR" --threads 2 --data "$DATA" \
    "${extra[@]}" --out "$OUT/q$q.pt" > "$OUT/q$q.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
date -u >> "$OUT/device.log"
exit $status
