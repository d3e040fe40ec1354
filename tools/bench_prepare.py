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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from preprocessing.sample import draw_image  # noqa: E402

from preprocessing import resize  # noqa: E402
from alexnet_base.config import PrepareConfig  # noqa: E402
from preprocessing.prepare import run as prepare_run  # noqa: E402
from preprocessing.stats import PixelSums  # noqa: E402

IMAGENET_TRAIN = 1_281_167
# ImageNet's sizes: most photos are Flickr "medium" (500 px long side), some larger.
SIZES = ([(500, 375)] * 6 + [(375, 500)] * 2 + [(500, 333)] * 3 + [(400, 300), (320, 240)]
         + [(800, 600), (1024, 768), (1600, 1200), (2048, 1365)])


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


def _prepare_seconds(root: Path, out: Path) -> float:
    t0 = time.perf_counter()
    prepare_run(PrepareConfig(imagenet_root=root, out=out, workers=1, shard_size=64,
                              splits=("train",), progress=False, overwrite=True))
    return time.perf_counter() - t0


def archive_comparison(n: int, repeats: int) -> int:
    """Per-core prepare rate from ILSVRC2012_img_train.tar (a tar of class tars, read in place)
    against the same images extracted, and the end-to-end time with the extraction counted."""
    import shutil
    import subprocess
    import tarfile
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_photos(tmp / "tree", n, seed=0)
        (tmp / "ar").mkdir()
        for cls in sorted((tmp / "tree" / "train").iterdir()):
            with tarfile.open(tmp / f"{cls.name}.tar", "w") as t:
                for f in sorted(cls.iterdir()):
                    t.add(f, f.name)
        with tarfile.open(tmp / "ar" / "ILSVRC2012_img_train.tar", "w") as t:
            for inner in sorted(tmp.glob("n*.tar")):
                t.add(inner, inner.name)
        folder = min(_prepare_seconds(tmp / "tree", tmp / "o1") for _ in range(repeats))
        archive = min(_prepare_seconds(tmp / "ar", tmp / "o2") for _ in range(repeats))
        same = all((tmp / "o1" / p.name).read_bytes() == p.read_bytes()
                   for p in (tmp / "o2").glob("*.h5"))
        t0 = time.perf_counter()  # what a user does first today: untar the tar of tars
        x = tmp / "x" / "train"
        x.mkdir(parents=True)
        subprocess.run(["tar", "-xf", str(tmp / "ar" / "ILSVRC2012_img_train.tar"), "-C", str(x)],
                       check=True)
        for inner in sorted(x.glob("*.tar")):
            (x / inner.stem).mkdir()
            subprocess.run(["tar", "-xf", str(inner), "-C", str(x / inner.stem)], check=True)
            inner.unlink()
        extract = time.perf_counter() - t0
        shutil.rmtree(tmp / "x")
    print(json.dumps({"images": n, "folder_img_per_s_core": round(n / folder, 1),
                      "archive_img_per_s_core": round(n / archive, 1),
                      "archive_over_folder": round(folder / archive, 3),
                      "extract_s": round(extract, 2), "extract_plus_prepare_s":
                      round(extract + folder, 2), "archive_prepare_s": round(archive, 2),
                      "identical_shards": same}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--archives", action="store_true",
                    help="instead: prepare from ILSVRC-style tars vs from the extracted tree, one "
                         "worker each, and extract + prepare vs prepare from the tars")
    a = ap.parse_args()
    if a.archives:
        return archive_comparison(a.images, a.repeats)
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
