#!/usr/bin/env python3
"""Does a long run hold its memory? The train loader's memory (the main process and its reader
workers, PSS from /proc/PID/smaps_rollup, so shared memory is counted once) after every epoch of
a small set, JPEG and raw shards, and the highest PSS seen within each epoch (sampled every
batch). Reports the growth from epoch 2 to the last.

Usage: bench_memory.py [--epochs 50] [--images 256] [--batch-size 32] [--work DIR]
                       [--trim-after BATCHES] [--readers N] [--encodings jpeg raw]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from alexnet_base.config import LoaderConfig, PrepareConfig  # noqa: E402
from alexnet_pipe.prepared import open_shards  # noqa: E402
from alexnet_pipe.reading import HeapTrim  # noqa: E402
from preprocessing.sample import make_sample  # noqa: E402
from preprocessing.prepare import run as prepare_run  # noqa: E402


def family(pid: int) -> list[int]:
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def pss_mb(pid: int) -> float:
    total = 0
    for p in family(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--trim-after", type=int, default=None,
                    help="batches between heap trims (default: every epoch, as a run at "
                         "ImageNet's size does; the loader's own default is "
                         f"{HeapTrim.after})")
    ap.add_argument("--readers", type=int, default=None,
                    help="readers: processes (JPEG), threads (raw); default: the product's")
    ap.add_argument("--encodings", nargs="+", choices=("jpeg", "raw"), default=["jpeg", "raw"])
    a = ap.parse_args()
    HeapTrim.after = 1 if a.trim_after is None else a.trim_after
    work = a.work or Path(tempfile.mkdtemp(prefix="bench_memory_"))
    tree = work / "imagenet"
    if not tree.exists():
        make_sample(tree, 4, a.images // 4, 1, seed=0, quirks=False, large=0)
    for enc in a.encodings:
        data = work / enc
        if not (data / "manifest.json").exists():
            prepare_run(PrepareConfig(imagenet_root=tree, out=data, encoding=enc, shard_size=32,
                                      progress=False, splits=("train",)))
        config = LoaderConfig(data=data, batch_size=a.batch_size, device="cpu",
                              readers=a.readers)
        loader = open_shards(data, ("train",), verify=False).loader(
            "train", config, device=torch.device("cpu"), epochs=a.epochs)
        mb, peak = [], []  # after each epoch; the highest within each epoch (every batch)
        for epoch in range(a.epochs):
            inside = 0.0
            for _ in loader:
                inside = max(inside, pss_mb(os.getpid()))
            mb.append(pss_mb(os.getpid()))
            peak.append(max(inside, mb[-1]))
        growth = (mb[-1] - mb[1]) / mb[1]
        print(json.dumps({"encoding": enc, "readers": list(loader.workers), "epochs": a.epochs,
                          "trim_after": HeapTrim.after,
                          "processes": len(family(os.getpid())),
                          "pss_mb_epoch2": round(mb[1], 1), "pss_mb_last": round(mb[-1], 1),
                          "pss_mb_max": round(max(mb), 1), "growth": round(growth, 4),
                          "every_10th": [round(m) for m in mb[::10]],
                          "peak_within_epoch_2": round(peak[1], 1),
                          "peak_within_epochs_after_2": round(max(peak[2:]), 1)}), flush=True)
        del loader
    return 0


if __name__ == "__main__":
    sys.exit(main())
