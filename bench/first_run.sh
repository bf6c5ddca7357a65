#!/usr/bin/env bash
# The README's first run, steps 1-4 exactly as written, timed from a fresh clone of this checkout's
# HEAD placed next to it (so that ../shared/data resolves as in the README), then removed.
#   bash bench/first_run.sh            # one line per command: seconds and the command; then the total
# Uses the `python` on PATH (activate the environment first); each command's output goes to LOG_DIR.
# KEEP=1 keeps the clone (its runs/, data/ and explanations.db) instead of removing it.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
clone="$(dirname "$repo")/first-run-$$"
logs="${LOG_DIR:-$(mktemp -d)}"
[ "${KEEP:-0}" = 1 ] && echo "keeping the clone: $clone" || trap 'rm -rf "$clone"' EXIT
git clone -q "$repo" "$clone" && cd "$clone"
n=0
step() {
  n=$((n + 1)); local t0; t0=$(date +%s.%N)
  "$@" > "$logs/$n.log" 2>&1 || { echo "failed: $* (see $logs/$n.log)"; exit 1; }
  printf '%7.1f s  %s\n' "$(echo "$(date +%s.%N) - $t0" | bc)" "$*"
}
start=$(date +%s.%N)
step python train.py --dataset synthetic --out runs/synthetic
step python evaluate.py --checkpoint runs/synthetic/best.pt
step python explain.py --checkpoint runs/synthetic/best.pt --n 500 --trust --report runs/synthetic/report.html
step python data.py ../shared/data/pathmnist28_real_test718.npz data/real718_split.npz
step python train.py --data-dir data/real718_split.npz --out runs/real-lightcnn
step python evaluate.py --checkpoint runs/real-lightcnn/best.pt --stain-shift
step python explain.py --checkpoint runs/real-lightcnn/best.pt --trust --audit --report runs/real-lightcnn/report.html
step python explain.py --checkpoint runs/real-lightcnn/best.pt --images ../shared/data/crc_val_he_7k_tiles \
    --labels-from-names --figure-grid runs/real-lightcnn/tiles-crcval.png
step sqlite3 -header -column explanations.db "SELECT s.method, x.split, count(*) AS maps,
  sum(a.predicted != x.label AND x.label >= 0) AS wrong FROM attributions a
  JOIN settings s ON s.id = a.setting_id JOIN samples x ON x.id = a.sample_id GROUP BY 1, 2;"
printf '%7.1f s  the whole first run (logs in %s)\n' "$(echo "$(date +%s.%N) - $start" | bc)" "$logs"
