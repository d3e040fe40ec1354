#!/usr/bin/env bash
# One-shot GPU check for a host without a package index: install DALI from an offline wheel folder,
# run the `gpu` tests, measure the GPU path, and print one table last. Idempotent (a rerun starts
# clean), every step runs whatever failed before it, 5-6 minutes on an H200 (307 s measured, before
# the report's two more train runs of about 20 s each).
# Usage: tools/gpu_check.sh WHEEL_DIR   (wheels from ../shared/offline-wheels/pack-dali.sh)
set -uo pipefail
wheels=${1:?usage: tools/gpu_check.sh WHEEL_DIR}
site=${SITE:-$HOME/dali-site}
work=${WORK:-/tmp/gpu_check}
rm -rf "$work" && mkdir -p "$work"
status=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, remember how it ended
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@"; local rc=$?
  status+=("$name=$rc")
}
if ! PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" python3 -c 'import nvidia.dali' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
fi
python3 -c 'import tqdm' 2>/dev/null || python3 -m pip install -q --no-index --no-deps \
  --target "$site" "$wheels"/tqdm*.whl 2>/dev/null
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
echo "== machine"
nvidia-smi -L 2>&1; echo "cores $(nproc), /dev/shm $(df -h --output=avail /dev/shm | tail -1)," \
  "open files $(ulimit -n)"
python3 -c 'import torch, nvidia.dali as d; print("torch", torch.__version__, "DALI", d.__version__)'
# every GPU test runs (no -x): one failure must not hide the others
step pytest-gpu 200 python3 -m pytest -v -m gpu -p no:cacheprovider tests
step report 240 python3 tools/gpu_report.py --work "$work" --out "$work/report.json"
echo "== steps: ${status[*]}"
# on the lent machine, what is under $OUT comes back: the report with it
[ -n "${OUT:-}" ] && cp "$work"/report.json "$work"/report.md "$OUT"/ 2>/dev/null
[ -n "${OUT:-}" ] && cp "$work"/run/train.log "$OUT"/report_train.log 2>/dev/null
[ -f "$work/report.md" ] && cat "$work/report.md"
