# Two entry points on a fresh machine: `make demo` (the main job on a generated sample) and
# `make test` (the whole suite, what CI runs). Both create .venv and install torch's CPU build
# first, then the project. `make test-quick`: the references, the contracts and one end-to-end
# run, for the edit-test loop (under a minute on 2 cores).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo

.PHONY: demo test test-quick venv clean

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[export,test]'
	touch $@

venv: $(BIN)/.installed

# three pytest-xdist workers on two cores: the suite waits on subprocesses and their start-up
# as much as it computes (two workers: 0.77x the serial time, three 0.74x, four 0.82x on the
# 2-core machine); the slow tier first (conftest), work stolen by idle workers
test: venv
	$(BIN)/python -m pytest -q -n 3 --dist worksteal

test-quick: venv
	$(BIN)/python -m pytest -q -m "not slow"

demo: venv
	rm -rf $(DEMO)
	$(BIN)/python tools/make_sample_imagenet.py --out $(DEMO)/imagenet --classes 4 --per-class 40 --val-per-class 8
	$(BIN)/alexnet-pipe prepare --imagenet-root $(DEMO)/imagenet --out $(DEMO)/shards --shard-size 64
	$(BIN)/alexnet-pipe inspect $(DEMO)/shards
	$(BIN)/alexnet-pipe bench-loader --data $(DEMO)/shards --batch-size 32 --batches 10 --baseline
	$(BIN)/alexnet-pipe preview --data $(DEMO)/shards --out $(DEMO)/preview.png
	$(BIN)/alexnet-pipe train --data $(DEMO)/shards --out $(DEMO)/run --epochs 2 --batch-size 16 \
		--bias-init caffe --lr 0.005 --log-every 5
	$(BIN)/alexnet-pipe plot $(DEMO)/run
	$(BIN)/alexnet-pipe filters --checkpoint $(DEMO)/run/checkpoints/best.pt --out $(DEMO)/conv1.png
	$(BIN)/alexnet-pipe predict $(DEMO)/imagenet/val/ILSVRC2012_val_00000001.JPEG \
		--checkpoint $(DEMO)/run/checkpoints/best.pt
	$(BIN)/alexnet-pipe export --checkpoint $(DEMO)/run/checkpoints/best.pt --out $(DEMO)/alexnet.onnx

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
