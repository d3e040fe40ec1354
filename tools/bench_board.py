#!/usr/bin/env python3
"""What TensorBoard costs a run: the same `train` command with and without --no-tensorboard,
alternated (A B A B ...) so that the machine's drift falls on both, each a fresh process.
Reports each launch's train images/s over the epochs after the first (epoch records: the steps
and the loader, not the evaluation; the first epoch also draws the batch picture, a one-off,
reported apart), the median of each side and their ratio (1.0: the board costs nothing), and
whether both sides ended with the same weights (they must: the board reads only what the log
has read). The run's own options follow `--`.

Usage: python -m tools.bench_board --data SHARDS [--repeats 3] [--out DIR] [--json]
       [-- --epochs 2 --batch-size 16 --device cpu ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def launch(data: Path, out: Path, extra: list[str], board: bool) -> dict:
    cmd = [sys.executable, "-m", "alexnet_pipe", "train", "--data", str(data), "--out", str(out),
           *extra, *([] if board else ["--no-tensorboard"])]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["kind"] == "epoch"]
    last = sorted((out / "checkpoints").glob("epoch-*.pt"))[-1]
    model = torch.load(last, map_location="cpu", weights_only=True)["model"]
    rest = epochs[1:]
    return {"images_per_s": sum(r["train_images"] for r in rest) / sum(r["seconds"] for r in rest),
            "first_epoch_s": epochs[0]["seconds"], "model": model}


def board_cost(data: Path, extra: list[str], repeats: int, work: Path) -> dict:
    rates = {"on": [], "off": []}
    first = {"on": [], "off": []}
    models = {}
    for i in range(repeats):
        for side in ("on", "off"):
            r = launch(data, work / f"{side}-{i}", extra, board=side == "on")
            rates[side].append(r["images_per_s"])
            first[side].append(r["first_epoch_s"])
            models.setdefault(side, r["model"])
    a, b = models["on"], models["off"]
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    return {"on": rates["on"], "off": rates["off"], "median_on": on, "median_off": off,
            "on_over_off": on / off, "same_weights": same,
            "first_epoch_s_on": statistics.median(first["on"]),
            "first_epoch_s_off": statistics.median(first["off"])}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, help="Where the runs go (default: a temporary folder).")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    extra = extra or ["--epochs", "3", "--batch-size", "16", "--device", "cpu"]
    with tempfile.TemporaryDirectory() as tmp:
        result = board_cost(args.data, extra, args.repeats, args.out or Path(tmp))
    if args.json:
        print(json.dumps(result))
        return
    print(f"train images/s with TensorBoard {result['median_on']:.1f} "
          f"({', '.join(f'{r:.1f}' for r in result['on'])}), without "
          f"{result['median_off']:.1f} ({', '.join(f'{r:.1f}' for r in result['off'])}): "
          f"{result['on_over_off']:.3f}x; same weights: {result['same_weights']}; first epoch "
          f"{result['first_epoch_s_on']:.2f} s with, {result['first_epoch_s_off']:.2f} s without")


if __name__ == "__main__":
    main()
