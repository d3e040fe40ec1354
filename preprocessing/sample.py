"""Generate a small ImageNet-layout tree whose classes can be learned, with ImageNet's quirks.

Each class draws one shape kind (disc, box, triangle, stripes, ring, cross) in its own hue on a noisy
textured background, at a random position, scale and colour jitter, in images of varied sizes and
aspect ratios (a few large enough for JPEG draft decoding). Mixed in: CMYK and grayscale JPEGs and a
PNG under a .JPEG name (valid, converted), and a truncated JPEG, a zero-byte file, a stray text file
and a decompression bomb (skipped). Usage:

    python tools/make_sample_imagenet.py --out DIR --classes 4 --per-class 20 --val-per-class 5 --seed 0
"""
from __future__ import annotations

import argparse
import colorsys
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("disc", "box", "triangle", "stripes", "ring", "cross")


def wnid(k: int) -> str:
    return f"n{1440764 + 1000 * k:08d}"


def class_name(k: int) -> str:
    return f"{SHAPES[k % len(SHAPES)]} {k // len(SHAPES)}, generated class {k}"


def draw_image(k: int, rng: np.random.Generator, large: bool = False,
               size: tuple[int, int] | None = None) -> Image.Image:
    if size is None:
        short = int(rng.integers(1100, 1400)) if large else int(rng.integers(90, 420))
        aspect = float(rng.uniform(0.6, 1.8))
        size = (int(short * aspect), short) if aspect >= 1 else (short, int(short / aspect))
    w, h = size
    # Background: a smooth random gradient plus noise, upsampled from a coarse grid.
    coarse = rng.integers(40, 215, size=(4, 4, 3), dtype=np.uint8)
    bg = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR), np.int16)
    bg = np.clip(bg + rng.integers(-25, 26, size=(h, w, 1), dtype=np.int16), 0, 255)
    im = Image.fromarray(bg.astype(np.uint8))
    hue = (k * 0.618034 + rng.normal(0, 0.02)) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    colour = tuple(int(255 * c) for c in (r, g, b))
    size = rng.uniform(0.3, 0.7) * min(w, h)  # of the shape, px
    cx, cy = rng.uniform(size / 2, w - size / 2), rng.uniform(size / 2, h - size / 2)
    x0, y0, x1, y1 = cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2
    d = ImageDraw.Draw(im)
    shape = SHAPES[k % len(SHAPES)]
    line = max(2, int(size / 8))
    if shape == "disc":
        d.ellipse((x0, y0, x1, y1), fill=colour)
    elif shape == "box":
        d.rectangle((x0, y0, x1, y1), fill=colour)
    elif shape == "triangle":
        d.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    elif shape == "stripes":
        for i in range(4):
            d.rectangle((x0, y0 + i * size / 4, x1, y0 + i * size / 4 + size / 8), fill=colour)
    elif shape == "ring":
        d.ellipse((x0, y0, x1, y1), outline=colour, width=line)
    else:
        d.rectangle((cx - line, y0, cx + line, y1), fill=colour)
        d.rectangle((x0, cy - line, x1, cy + line), fill=colour)
    return im


def bomb_png() -> bytes:
    """A valid PNG header claiming 30000 x 30000 pixels: PIL refuses it as a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def save(im: Image.Image, path: Path, kind: str = "jpeg") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "cmyk":
        im.convert("CMYK").save(path, "JPEG", quality=90)
    elif kind == "gray":
        im.convert("L").save(path, "JPEG", quality=90)
    elif kind == "png":
        im.save(path, "PNG")
    elif kind == "truncated":
        im.save(path, "JPEG", quality=90)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        im.save(path, "JPEG", quality=90)


def make_sample(out: Path, classes: int, per_class: int, val_per_class: int, seed: int,
                val_layout: str = "kaggle", quirks: bool = True, large: int = 2) -> None:
    out = Path(out)
    rng = np.random.default_rng(seed)
    train, val = out / "train", out / "val"
    n_train = 0
    for k in range(classes):
        for i in range(per_class):
            kind = "jpeg"
            if quirks and i == 0:  # valid images in odd formats, spread over the classes
                kind = ("cmyk", "gray", "png")[k % 3]
            is_large = n_train < large
            save(draw_image(k, rng, is_large), train / wnid(k) / f"{wnid(k)}_{i}.JPEG", kind)
            n_train += 1
    if quirks:
        save(draw_image(0, rng), train / wnid(0) / f"{wnid(0)}_truncated.JPEG", "truncated")
        (train / wnid(1 % classes) / f"{wnid(1 % classes)}_empty.JPEG").write_bytes(b"")
        (train / wnid(0) / "notes.txt").write_text("not an image\n")
        (train / wnid(2 % classes) / f"{wnid(2 % classes)}_bomb.JPEG").write_bytes(bomb_png())
    solution, labels = ["ImageId,PredictionString"], []
    n = 0
    for k in range(classes):
        for i in range(val_per_class):
            n += 1
            name = f"ILSVRC2012_val_{n:08d}"
            kind = "gray" if quirks and n == 1 else "jpeg"
            folder = val / wnid(k) if val_layout == "folders" else val
            save(draw_image(k, rng), folder / f"{name}.JPEG", kind)
            solution.append(f"{name},{wnid(k)} 10 10 100 100 {wnid(k)} 5 5 50 50")
            labels.append(f"{name}.JPEG {wnid(k)}")
    if val_layout == "kaggle":
        (out / "LOC_val_solution.csv").write_text("\n".join(solution) + "\n")
    elif val_layout == "labels":
        (out / "val_labels.txt").write_text("\n".join(labels) + "\n")
    (out / "LOC_synset_mapping.txt").write_text(
        "".join(f"{wnid(k)} {class_name(k)}\n" for k in range(classes)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--val-per-class", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-layout", choices=("kaggle", "folders", "labels"), default="kaggle")
    p.add_argument("--large", type=int, default=2, help="train images with a shorter side > 1024")
    p.add_argument("--no-quirks", action="store_true", help="only clean JPEGs")
    a = p.parse_args(argv)
    if a.classes < 1 or a.per_class < 1 or a.val_per_class < 0:
        p.error("--classes and --per-class must be at least 1, --val-per-class at least 0")
    if a.out.exists() and any(a.out.iterdir()):
        p.error(f"--out {a.out}: exists and is not empty")
    make_sample(a.out, a.classes, a.per_class, a.val_per_class, a.seed, a.val_layout,
                not a.no_quirks, a.large)
    print(f"wrote {a.classes} classes x {a.per_class} train, {a.val_per_class} val to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
