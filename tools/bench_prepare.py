#!/usr/bin/env python3
"""Benchmark `prepare` against a plain PIL script on the same ImageNet-like JPEGs, in one run.

Per core: one process each, same images, best of --repeats passes. All cores: `prepare --workers N`
wall time. Prints images/s, the ratio to the plain script, the PSNR of our output against the plain
script's, and the projected time for ImageNet's 1,281,167 train images on 16 cores.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sample_imagenet import draw_image  # noqa: E402

from preprocessing import resize  # noqa: E402
from preprocessing.prepare import PrepareConfig, run as prepare_run  # noqa: E402
from preprocessing.stats import PixelSums  # noqa: E402

IMAGENET_TRAIN = 1_281_167
# ImageNet's sizes: most photos are Flickr "medium" (500 px long side), some larger.
SIZES = [(500, 375)] * 6 + [(375, 500)] * 2 + [(500, 333)] * 3 + [(400, 300), (320, 240)] \
    + [(800, 600), (1024, 768), (1600, 1200), (2048, 1365)]


def make_photos(folder: Path, n: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        k = i % 8
        path = folder / "train" / f"n{k:08d}" / f"img_{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_image(k, rng, size=SIZES[i % len(SIZES)]).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def plain_script(path: Path, size: int = 256, quality: int = 95) -> bytes:
    """What a user writes first: open, convert, resize (bicubic), crop, save."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.BICUBIC)
    left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
    buf = io.BytesIO()
    im.crop((left, top, left + size, top + size)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


_sums = PixelSums(256)


def ours(path: Path, size: int = 256, quality: int = 95) -> bytes:
    """What a prepare worker does per image, the statistics included."""
    image = resize.load_image(path, size)
    _sums.update(image)
    return resize.encode_jpeg(image, quality)


def best_rate(fn, paths, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for p in paths:
            fn(p)
        best = min(best, time.perf_counter() - t0)
    return len(paths) / best


def psnr_db(a: bytes, b: bytes) -> float:
    x, y = (np.asarray(Image.open(io.BytesIO(d)), np.float64) for d in (a, b))
    mse = np.mean((x - y) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255 ** 2 / mse))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_photos(Path(tmp) / "tree", a.images, seed=0)
        kb = np.mean([p.stat().st_size for p in paths]) / 1024
        for p in paths[:5]:  # warm the page cache and the code paths
            plain_script(p), ours(p)
        plain = best_rate(plain_script, paths, a.repeats)
        mine = best_rate(ours, paths, a.repeats)
        quality = [psnr_db(ours(p), plain_script(p)) for p in paths]
        t0 = time.perf_counter()
        prepare_run(PrepareConfig(imagenet_root=Path(tmp) / "tree", out=Path(tmp) / "out",
                                  workers=a.workers, shard_size=max(8, a.images // (4 * a.workers)),
                                  splits=("train",), progress=False))
        all_cores = a.images / (time.perf_counter() - t0)
    r = {"images": a.images, "mean_jpeg_kb": round(kb, 1), "plain_per_core": round(plain, 1),
         "prepare_per_core": round(mine, 1), "ratio_per_core": round(mine / plain, 2),
         "psnr_min_db": round(min(quality), 1), "psnr_median_db": round(float(np.median(quality)), 1),
         "workers": a.workers, "prepare_all_cores": round(all_cores, 1),
         "imagenet_hours_16_cores": round(IMAGENET_TRAIN / (mine * 16) / 3600, 2)}
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{a.images} ImageNet-like JPEGs, mean {kb:.0f} KB")
        print(f"per core   plain PIL script {plain:7.1f} img/s   prepare {mine:7.1f} img/s   "
              f"ratio {mine / plain:.2f}x")
        print(f"quality    PSNR vs plain script: min {min(quality):.1f} dB, "
              f"median {np.median(quality):.1f} dB")
        print(f"all cores  prepare --workers {a.workers}: {all_cores:.1f} img/s "
              f"({all_cores / mine:.2f}x one core)")
        print(f"projected  ImageNet train ({IMAGENET_TRAIN:,} images) on 16 cores: "
              f"{r['imagenet_hours_16_cores']:.2f} h")
    return 0


if __name__ == "__main__":
    sys.exit(main())
