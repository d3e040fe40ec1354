#!/usr/bin/env bash
# On a GPU host without a package index: install DALI from an offline wheel folder, run the `gpu`
# tests and the GPU loader benchmark, print a short table last.
# Usage: tools/gpu_check.sh WHEEL_DIR   (wheels from ../shared/offline-wheels/pack-dali.sh)
set -euo pipefail
wheels=${1:?usage: tools/gpu_check.sh WHEEL_DIR}
site=${SITE:-$HOME/dali-site}
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" tqdm 2>/dev/null || true
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c 'import nvidia.dali as d, torch; print("DALI", d.__version__, "torch", torch.__version__, torch.cuda.get_device_name())'
python3 -m pytest -q -m gpu tests 2>&1 | tail -5
work=${WORK:-/tmp/gpu_check}
python3 tools/bench_loader.py --device gpu --images 4096 --batch-size 256 --seconds 5 \
  --threads 4 --workers 4 --mean pixel --work "$work" | tail -9
for c in "" "--compile"; do
  python3 tools/bench_train.py --data "$work/jpeg" --device gpu --batch-size 128 --steps 30 \
    --threads 4 --workers 4 $c
done
python3 -m alexnet_pipe train --data "$work/jpeg" --out "$work/run" --epochs 1 --batch-size 128 \
  --bias-init caffe --threads 4 --workers 4 --log-every 50 | tail -2
python3 -m alexnet_pipe train --data "$work/raw" --out "$work/towers" --epochs 1 --batch-size 128 \
  --parallel towers --tower-devices cuda:0,cuda:0 --threads 4 --workers 4 --log-every 50 | tail -2
