#!/usr/bin/env bash
# One-shot GPU check for a host without a package index, in 8 minutes: install DALI from an
# offline wheel folder, then, each step under its own time limit and every process a step
# started gone before the next:
#   report  (360 s)  tools/gpu_report.py, the owed figures first; it prints first which figures
#                    it expects to reach (each figure's H200 cost is estimated in the script)
#   pytest  (65 s)   the GPU-only tests, most telling first, stopped by SIGINT at the limit
#   profile (40 s)   tools/profile_step.py: one eager and one compiled step at batch 256
# and print one table last. What it measured lands in one folder ($OUT where set, else $WORK):
# report.json, report.md, dmon.log, profile.jsonl, pytest_gpu.log, report_train.log. The
# table's last row lists the figures the limit cut off; a later check with `--only` and those
# names measures them (and the figures their ratios are measured against) with 460 s for the
# report, without the tests and the profile.
#
# Usage: tools/gpu_check.sh WHEEL_DIR [--only FIGURE ...]   (wheels: shared/offline-wheels)
#        tools/gpu_check.sh --rehearse [--only FIGURE ...]  (the same steps on the CPU, small)
# The limits can be set for a rehearsal: REPORT_S, PYTEST_S, PROFILE_S (seconds); PYTHON: the
# interpreter (default python3).
set -uo pipefail
usage="usage: tools/gpu_check.sh WHEEL_DIR|--rehearse [--only FIGURE ...]"
wheels=${1:?$usage}
shift
only=("$@")
if [ ${#only[@]} -gt 0 ] && [ "${only[0]}" != --only ]; then
  echo "$usage" >&2; exit 2
fi
rehearse=$([ "$wheels" = --rehearse ] && echo 1 || echo "")
py=${PYTHON:-python3}
site=${SITE:-$HOME/dali-site}
work=${WORK:-/tmp/gpu_check}
rm -rf "$work" && mkdir -p "$work"
status=()

reap() {  # every process still running that step $1 started (new sessions included)
  local pids
  pids=$(grep -lzx "GPU_CHECK_STEP=$1" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3)
  if [ -n "$pids" ]; then
    echo "== $1: ending what it left running: $(echo $pids)"
    kill -9 $pids 2>/dev/null
  fi
}

step() {  # step NAME SECONDS SIGNAL COMMAND...: run with a time limit, then reap, remember
  local name=$1 limit=$2 sig=$3 tag="$1.$$"; shift 3
  echo "== $name (at most $limit s)"
  local t0=$SECONDS
  GPU_CHECK_STEP=$tag timeout -s "$sig" -k 10 "$limit" "$@"; local rc=$?
  reap "$tag"
  status+=("$name=$rc in $((SECONDS - t0)) s")
}

if [ -n "$rehearse" ]; then  # the CPU, small: the order, the limits and the cut table
  device=(--device cpu --batch-size 8 --size 128 --crop 112 --timed-steps 4 --warmup-steps 2
          --seconds 0.5 --rounds 1)
  profile=(--device cpu --batch-size 2 --classes 8 --steps 1 --warmup 1)
else
  if ! PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" "$py" -c 'import nvidia.dali' 2>/dev/null
  then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
  fi
  "$py" -c 'import tqdm' 2>/dev/null || "$py" -m pip install -q --no-index --no-deps \
    --target "$site" "$wheels"/tqdm*.whl 2>/dev/null
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  device=(--device gpu)
  profile=(--device gpu --batch-size 256 --classes 8 --compile)  # the report's graph: cached
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
echo "== machine"
nvidia-smi -L 2>&1; echo "cores $(nproc), /dev/shm $(df -h --output=avail /dev/shm | tail -1)," \
  "open files $(ulimit -n)"
"$py" -c 'import torch, nvidia.dali as d; print("torch", torch.__version__, "DALI", d.__version__)'
report=("$py" tools/gpu_report.py --work "$work" --out "$work/report.json" "${device[@]}")
if [ ${#only[@]} -gt 0 ]; then  # the figures an earlier check did not reach: all 8 minutes
  limit=${REPORT_S:-460}
  step report "$limit" INT "${report[@]}" --budget "$limit" "${only[@]}"
else
  limit=${REPORT_S:-360}
  step report "$limit" INT "${report[@]}" --budget "$limit"
  # the GPU tests, the most telling first; SIGINT lets pytest end its tests' process groups
  tests=(tests/test_model.py::test_fused_lrn_on_the_gpu_within_bf16_of_the_reference
         tests/test_pipeline.py::test_gpu_pipeline_matches_cpu
         tests/test_gpu_path.py::test_gpu_training_has_no_hidden_sync_and_resumes_exactly
         tests/test_train.py::test_gpu_training_bf16_and_towers_on_one_gpu
         tests/test_train.py::test_towers_on_gpus_resume_exactly)
  step pytest-gpu "${PYTEST_S:-65}" INT sh -c "$py -m pytest -v -m gpu -p no:cacheprovider \
    ${tests[*]} > $work/pytest_gpu.log 2>&1; rc=\$?; tail -n 30 $work/pytest_gpu.log; exit \$rc"
  # the split of one eager and one compiled step (the compile is cached by the report's)
  step profile "${PROFILE_S:-40}" INT "$py" tools/profile_step.py "${profile[@]}" \
    --json "$work/profile.jsonl"
fi
echo "== steps: $(printf '%s; ' "${status[@]}")"
# on the lent machine, what is under $OUT comes back
if [ -n "${OUT:-}" ]; then
  cp "$work"/report.json "$work"/report.md "$work"/dmon.log "$work"/profile.jsonl \
    "$work"/pytest_gpu.log "$OUT"/ 2>/dev/null
  cp "$work"/run/train.log "$OUT"/report_train.log 2>/dev/null
fi
[ -f "$work/report.md" ] && cat "$work/report.md"
