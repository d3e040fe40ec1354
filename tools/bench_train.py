#!/usr/bin/env python3
"""Training step rate (images/s) with synthetic device-resident input and with the real pipeline,
and their ratio (1 - ratio is the data-wait cost). Same model, batch, device and run.

Usage: bench_train.py --data SHARDS [--device cpu|gpu] [--batch-size 128] [--steps 20]
       [--compile] [--no-channels-last]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from alexnet_base.config import AugmentConfig, LoaderConfig
from alexnet_pipe import optim
from alexnet_pipe.bench import STREAM
from alexnet_pipe.model import build_model
from alexnet_pipe.prepared import open_shards
from alexnet_pipe.runtime import Runtime, train_step


def step_rate(model, opt, batches, steps: int, warmup: int, runtime: Runtime) -> float:
    def sync():
        if runtime.gpu:
            torch.cuda.synchronize()  # a CPU-GPU sync point: only around the timed region
    n = 0
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        x, y = runtime.batch(x, y)
        train_step(model, opt, x, y, runtime=runtime)
        if i >= warmup:
            n += len(y)
        if i + 1 == warmup + steps:
            break
    sync()
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--readers", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--no-channels-last", action="store_true")
    a = ap.parse_args()
    runtime = Runtime.for_device(torch.device("cuda" if a.device == "gpu" else "cpu"),
                                 channels_last=not a.no_channels_last)
    runtime.configure()
    cfg = LoaderConfig(data=a.data, batch_size=a.batch_size, device=a.device, threads=a.threads,
                       readers=a.readers, augment=AugmentConfig(),
                       channels_last=runtime.channels_last)
    data = open_shards(a.data, ("train",), verify=False)
    classes = data.split("train").num_classes
    loader = data.loader("train", cfg, device=runtime.device, epochs=STREAM)  # before CUDA work
    model = runtime.place(build_model(num_classes=classes).to(runtime.device))
    opt = optim.sgd(model)
    fwd = torch.compile(model) if a.compile else model
    x = torch.randn(a.batch_size, 3, 224, 224, device=runtime.device)
    y = torch.randint(0, classes, (a.batch_size,), device=runtime.device)

    def synthetic():
        while True:
            yield x, y

    def real():
        while True:
            yield from loader
    syn = step_rate(fwd, opt, synthetic(), a.steps, a.warmup, runtime)
    rl = step_rate(fwd, opt, real(), a.steps, a.warmup, runtime)
    r = {"device": a.device, "batch_size": a.batch_size, "compile": a.compile,
         "channels_last": runtime.channels_last, "synthetic_images_per_s": round(syn, 1),
         "real_images_per_s": round(rl, 1), "real_over_synthetic": round(rl / syn, 3)}
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
