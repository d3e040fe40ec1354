#!/usr/bin/env python3
"""The numbers stay: fixed-seed CPU runs whose checkpoints are compared bit for bit before and
after a change to the loader, the model or the trainer.

    same_numbers.py record OUT.json [--work DIR] [--only RUN ...]   # before the change
    same_numbers.py check OUT.json [--work DIR] [--only RUN ...]    # after: exit 1 on a change

The runs (the test suite's small shape: 4 classes, 16 train images at 128 px, 112 px crops):
straight (2 epochs), resumed (--max-steps 3, then --resume to 2 epochs), divide_std (channel
mean, --divide-std, --lighting-scale eigval), towers (one process), ddp and hybrid (2 gloo ranks
under torchrun). Each checkpoint is reduced to the sha256 of its weights and its optimiser's
momenta (names, dtypes, shapes, bytes), and its position (epoch, batch, step).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAST = ["--batch-size", "8", "--crop", "112", "--device", "cpu", "--threads", "1", "--readers",
        "1", "--log-every", "1", "--bias-init", "caffe", "--lr", "0.005", "--mean", "channel"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2"]
PLAIN = [sys.executable, "-m", "alexnet_pipe"]
RUNS = {  # name: [(launcher, extra train options), ...] run one after another in one folder
    "straight": [(PLAIN, ["--epochs", "2"])],
    "resumed": [(PLAIN, ["--epochs", "2", "--max-steps", "3"]),
                (PLAIN, ["--epochs", "2", "--resume"])],
    "divide_std": [(PLAIN, ["--epochs", "2", "--divide-std", "--lighting-scale", "eigval"])],
    "towers": [(PLAIN, ["--epochs", "1", "--parallel", "towers", "--tower-devices", "cpu,cpu"])],
    "ddp": [(TORCHRUN, ["--epochs", "2"])],
    "hybrid": [(TORCHRUN, ["--epochs", "2", "--parallel", "hybrid"])],
}


def digest(path: Path) -> dict:
    """The weights in the state dict's order and the momenta in the optimiser's, by value
    (dtype, shape, bytes): not by name, so that a change of the keys alone changes nothing."""
    import torch
    state = torch.load(path, map_location="cpu", weights_only=True)
    h = hashlib.sha256()
    momenta = [s["momentum_buffer"] for _, s in sorted(state["optimizer"]["state"].items())]
    for t in [*state["model"].values(), *momenta]:
        t = t.contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"sha256": h.hexdigest(), "epoch": state["epoch"], "batch": state["batch"],
            "step": state["step"]}


def data(work: Path) -> Path:
    from alexnet_base.config import PrepareConfig
    from preprocessing.prepare import run as prepare_run
    from preprocessing.sample import make_sample
    shards = work / "shards"
    if not (shards / "manifest.json").exists():
        make_sample(work / "tree", 4, 12, 3, seed=0, val_layout="kaggle", large=1)
        prepare_run(PrepareConfig(imagenet_root=work / "tree", out=shards, workers=2,
                                  progress=False, shard_size=16, encoding="raw",
                                  limit_per_class=4, size=128))
    return shards


def run(name: str, shards: Path, work: Path) -> dict:
    out = work / name
    subprocess.run(["rm", "-rf", str(out)], check=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for launcher, extra in RUNS[name]:
        cmd = [*launcher, *([] if launcher is PLAIN else [str(ROOT / "tests" / "harness.py")]),
               "train", "--data", str(shards), "--out", str(out), *FAST, *extra]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name}: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return {p.name: digest(p) for p in sorted((out / "checkpoints").glob("*.pt"))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("record", "check"))
    ap.add_argument("file", type=Path)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--only", nargs="+", choices=list(RUNS))
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="same_numbers-"))
    shards = data(work)
    names = a.only or list(RUNS)
    got = {}
    for name in names:
        got[name] = run(name, shards, work)
        print(name, json.dumps(got[name]), flush=True)
        if a.action == "record":  # after each run: a later failure keeps what was recorded
            old = json.loads(a.file.read_text()) if a.file.exists() else {}
            a.file.write_text(json.dumps({**old, name: got[name]}, indent=1) + "\n")
    if a.action == "record":
        return 0
    want = json.loads(a.file.read_text())
    changed = [n for n in names if want.get(n) != got[n]]
    for n in changed:
        print(f"CHANGED {n}: recorded {want.get(n)}, now {got[n]}")
    print("same numbers" if not changed else f"{len(changed)} of {len(names)} runs changed")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
