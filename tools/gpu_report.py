#!/usr/bin/env python3
"""The GPU table, measured in one run: card; loader img/s (JPEG and raw shards, pixel mean) on the
GPU; AlexNet bf16 train-step img/s on synthetic input; their ratio; real-pipeline train img/s
over synthetic; data-wait over a multi-epoch train run; reader-only img/s with one worker and
with all; which stage limits. Writes WORK/report.json and WORK/report.md.

Usage: gpu_report.py --work DIR [--device gpu|cpu] [--images 4096] [--batch-size 256]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402

from alexnet_base.config import AugmentConfig, BenchConfig, LoaderConfig, PrepareConfig  # noqa: E402
from alexnet_pipe.bench import bench_loader, model_step_rate  # noqa: E402
from bench_reader import reader_rate  # noqa: E402
from make_sample_imagenet import make_sample  # noqa: E402
from preprocessing.prepare import run as prepare_run  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=4.0)
    a = ap.parse_args()
    gpu = a.device == "gpu"
    r = {"card": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
         "cores": len(os.sched_getaffinity(0))}
    tree = a.work / "imagenet"
    if not tree.exists():
        make_sample(tree, 8, a.images // 8, max(4, a.batch_size // 8), seed=0, quirks=False,
                    large=0)  # val: at least one full batch
    for enc in ("jpeg", "raw"):
        prepare_run(PrepareConfig(imagenet_root=tree, out=a.work / enc, encoding=enc,
                                  progress=False))
    cfg = LoaderConfig(data=a.work / "jpeg", batch_size=a.batch_size, device=a.device,
                       augment=AugmentConfig(mean="pixel"))
    threads, workers = cfg.readers(gpu, "jpeg")  # on a GPU the same for raw
    r.update(threads=threads, workers=workers)
    for enc in ("jpeg", "raw"):
        res = bench_loader(BenchConfig(loader=LoaderConfig(**{**cfg.__dict__,
                                                              "data": a.work / enc}),
                                       seconds=a.seconds, repeats=3))
        r[f"loader_{enc}"] = res["images_per_s"]
    r["model_synthetic"] = model_step_rate(cfg, gpu, 1000, steps=30, warmup=5)
    r["loader_over_model"] = r["loader_jpeg"] / r["model_synthetic"]
    r["reader_1_worker"] = reader_rate(a.work / "jpeg", 1, a.batch_size, a.seconds, None)
    r["reader_all_workers"] = reader_rate(a.work / "jpeg", workers, a.batch_size, a.seconds, None)
    run = a.work / "run"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "alexnet_pipe", "train", "--data",
                           str(a.work / "jpeg"), "--out", str(run), "--epochs", "3",
                           "--batch-size", str(a.batch_size), "--device", a.device,
                           "--bias-init", "caffe", "--log-every", "20"], cwd=ROOT,
                          capture_output=True, text=True)
    r["train_seconds"] = time.perf_counter() - t0
    if proc.returncode == 0:
        records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        epochs = [r for r in records if r["kind"] == "epoch"]
        steady = epochs[1:] or epochs
        r["train_real"] = sum(e["images_per_s"] for e in steady) / len(steady)
        r["real_over_synthetic"] = r["train_real"] / r["model_synthetic"]
        r["data_wait"] = sum(e["data_wait"] for e in steady) / len(steady)
    else:
        r["train_error"] = proc.stderr[-2000:]
    stages = {"reader": r["reader_all_workers"], "loader": r["loader_jpeg"],
              "model": r["model_synthetic"]}
    r["limiting_stage"] = min(stages, key=stages.get)
    out = a.out or a.work / "report.json"
    out.write_text(json.dumps(r, indent=2))
    rows = [("card", r["card"]), ("cores / DALI threads / reader workers",
                                  f"{r['cores']} / {threads} / {workers}")]
    rows += [(k.replace("_", " "), f"{v:.3f}" if isinstance(v, float) else str(v))
             for k, v in r.items() if k not in ("card", "cores", "threads", "workers", "torch")]
    md = "| what | value |\n| --- | --- |\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    (a.work / "report.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
