#!/usr/bin/env bash
# One-shot GPU check for a host without a package index: install DALI from an offline wheel folder,
# run the `gpu` tests, measure the GPU path (tools/gpu_report.py) and profile the step
# (tools/profile_step.py), and print one table last. Idempotent (a rerun starts clean), every
# step runs whatever failed before it; the steps' limits add up to 8 minutes. What it measured
# lands in one folder ($OUT where set, else $WORK): 6 files. The table lists the figures its time
# limit cut off; a later check with `--only` and those names measures them (and the figures
# their ratios are measured against) in the same 8 minutes, without the tests and the profile.
# Usage: tools/gpu_check.sh WHEEL_DIR [--only FIGURE ...]
#        (wheels from ../shared/offline-wheels/pack-dali.sh)
set -uo pipefail
wheels=${1:?usage: tools/gpu_check.sh WHEEL_DIR [--only FIGURE ...]}
shift
only=("$@")
if [ ${#only[@]} -gt 0 ] && [ "${only[0]}" != --only ]; then
  echo "usage: tools/gpu_check.sh WHEEL_DIR [--only FIGURE ...]" >&2; exit 2
fi
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
if [ ${#only[@]} -gt 0 ]; then  # the figures an earlier check did not reach: all 8 minutes
  step report 480 python3 tools/gpu_report.py --work "$work" --out "$work/report.json" \
    --images 2048 --seconds 3 "${only[@]}"
else
  # every GPU test runs (no -x): one failure must not hide the others
  step pytest-gpu 150 sh -c "python3 -m pytest -v -m gpu -p no:cacheprovider tests \
    > $work/pytest_gpu.log 2>&1; rc=\$?; tail -n 30 $work/pytest_gpu.log; exit \$rc"
  step report 270 python3 tools/gpu_report.py --work "$work" --out "$work/report.json" \
    --images 2048 --seconds 3
  # the split of one eager and one compiled step at 256 (the compile is cached by the report's)
  step profile 60 python3 tools/profile_step.py --device gpu --batch-size 256 --compile \
    --json "$work/profile.jsonl"
fi
echo "== steps: ${status[*]}"
# on the lent machine, what is under $OUT comes back
if [ -n "${OUT:-}" ]; then
  cp "$work"/report.json "$work"/report.md "$work"/dmon.log "$work"/profile.jsonl \
    "$work"/pytest_gpu.log "$OUT"/ 2>/dev/null
  cp "$work"/run/train.log "$OUT"/report_train.log 2>/dev/null
fi
[ -f "$work/report.md" ] && cat "$work/report.md"
