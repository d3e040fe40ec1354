"""The shard format: written once here, imported by the writer, the reader, `inspect` and the tests.

An output folder of `prepare` holds

    train-00000.h5, train-00001.h5, ...   shards of the training split (a seeded shuffle of all classes)
    val-00000.h5, ...                     shards of the validation split (sorted by file name)
    stats.h5                              statistics of the training pixels (see `write_stats`)
    manifest.json                         counts, classes, options, shard checksums, skipped inputs
    .partial/                             per-shard partial sums, so a resumed run need not re-decode

Each shard (format version 2) holds, for N images, plain contiguous HDF5 datasets that any h5py
user can read and that the loaders read without h5py, at each dataset's file offset:

    images   jpeg: (total_bytes,) uint8, every image's JPEG bytes one after the other
             raw:  (N, 256, 256, 3) uint8, HWC RGB
    offsets  jpeg only: (N + 1,) int64, image i is images[offsets[i]:offsets[i + 1]]
    labels   (N,) int32, class index 0..C-1 (sorted wnids)
    keys     (N,) UTF-8 strings, the source path relative to the ImageNet root
    attrs    format_version (int), encoding ("jpeg" | "raw"), size (int), split (str)

How the training loader reads these bytes fast is alexnet_pipe/reading.py's business.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from alexnet_base.config import ENCODINGS
from alexnet_base.errors import UserError, os_error
from alexnet_base.files import atomic_path

FORMAT_VERSION = 2
IMAGES, OFFSETS, LABELS, KEYS = "images", "offsets", "labels", "keys"
STATS_FILE = "stats.h5"
MANIFEST_FILE = "manifest.json"
PARTIAL_DIR = ".partial"
# Pixel scale of every statistic in stats.h5: values are on the 0-255 scale of uint8 pixels.
STATS_PIXEL_SCALE = 255.0


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.h5"


def list_shards(out: Path, split: str) -> list[Path]:
    """The complete shards of one split, in index order (temporary files are never listed)."""
    return sorted(Path(out).glob(f"{split}-[0-9][0-9][0-9][0-9][0-9].h5"))


def write_shard(path: Path, *, images: list, labels: list[int], keys: list[str], encoding: str,
                size: int, split: str) -> None:
    """Write one shard atomically. `images`: JPEG bytes, or (size, size, 3) uint8 arrays for raw."""
    n = len(labels)
    with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=False) as f:
        # track_times=False: no timestamps in the file, so two runs write identical bytes.
        # Contiguous, uncompressed datasets: their bytes sit at one file offset.
        if encoding == "jpeg":
            lengths = [len(data) for data in images]
            f.create_dataset(IMAGES, data=np.frombuffer(b"".join(images), np.uint8),
                             track_times=False)
            f.create_dataset(OFFSETS, data=np.concatenate([[0], np.cumsum(lengths)]).astype(
                np.int64), track_times=False)
        else:
            f.create_dataset(IMAGES, data=np.stack(images) if n else
                             np.zeros((0, size, size, 3), np.uint8), track_times=False)
        f.create_dataset(LABELS, data=np.asarray(labels, np.int32).reshape(n), track_times=False)
        f.create_dataset(KEYS, data=np.array(keys, dtype=object).reshape(n),
                         dtype=h5py.string_dtype("utf-8"), track_times=False)
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["encoding"] = encoding
        f.attrs["size"] = size
        f.attrs["split"] = split


def open_shard(path: Path) -> h5py.File:
    """Open a shard read-only after checking that it is one of ours, of this format version."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: shard not found; run `alexnet-pipe prepare` again to rebuild it")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        if e.errno is not None:  # the OS refused (too many open files, I/O error, ...)
            raise os_error(path, e, "open the shard") from None
        raise UserError(f"{path}: not a readable HDF5 shard ({e}); if its sha256 differs from "
                        f"the one in {MANIFEST_FILE}, it is damaged: prepare it again") from None
    try:
        version, encoding = f.attrs.get("format_version"), f.attrs.get("encoding")
    except (OSError, RuntimeError, KeyError, ValueError) as e:  # h5py: damaged metadata
        f.close()
        raise UserError(f"{path}: damaged shard (its HDF5 metadata cannot be read: {e}); "
                        f"`alexnet-pipe verify` lists every damaged file, and the same prepare "
                        f"command rewrites them") from None
    if version != FORMAT_VERSION or encoding not in ENCODINGS:
        f.close()
        raise UserError(f"{path}: shard format version {version}, this alexnet-pipe reads version "
                        f"{FORMAT_VERSION}; prepare the data again with this version")
    return f


def shard_info(path: Path) -> dict:
    """Number of images and attributes of one shard, without reading any image."""
    with open_shard(path) as f:
        try:
            return {"images": int(f[LABELS].shape[0]), "encoding": str(f.attrs["encoding"]),
                    "size": int(f.attrs["size"]), "split": str(f.attrs["split"])}
        except (OSError, RuntimeError, KeyError, ValueError) as e:
            raise UserError(f"{path}: damaged shard ({e}); `alexnet-pipe verify` lists every "
                            f"damaged file, and the same prepare command rewrites them") from None


@dataclass(frozen=True)
class ImageStats:
    """Statistics of the training pixels, all on the 0-255 scale (float64)."""
    count: int                # number of training images
    channel_mean: np.ndarray  # (3,) RGB
    channel_std: np.ndarray   # (3,) RGB
    pixel_mean: np.ndarray    # (size, size, 3) HWC, the mean image the paper subtracts
    rgb_cov: np.ndarray       # (3, 3) covariance of RGB over every training pixel
    eigval: np.ndarray        # (3,) eigenvalues of rgb_cov, descending
    eigvec: np.ndarray        # (3, 3) column k is the unit eigenvector of eigval[k]


_STATS_FIELDS = ("channel_mean", "channel_std", "pixel_mean", "rgb_cov", "eigval", "eigvec")


def write_stats(path: Path, stats: ImageStats) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for name in _STATS_FIELDS:
            f.create_dataset(name, data=getattr(stats, name), track_times=False)
        f.attrs["count"] = stats.count
        f.attrs["pixel_scale"] = STATS_PIXEL_SCALE
        f.attrs["format_version"] = FORMAT_VERSION


def read_stats(path: Path) -> ImageStats:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: statistics file not found; run `alexnet-pipe prepare` with the "
                        f"train split to write it")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format_version") != FORMAT_VERSION:
                raise UserError(f"{path}: statistics of format version "
                                f"{f.attrs.get('format_version')}, expected {FORMAT_VERSION}")
            arrays = {name: np.asarray(f[name][...], np.float64) for name in _STATS_FIELDS}
            count = int(f.attrs["count"])
    except (OSError, KeyError, RuntimeError, ValueError) as e:
        raise UserError(f"{path}: not a valid statistics file ({e}); run the same prepare "
                        f"command again to rewrite it") from None
    return ImageStats(count=count, **arrays)


def manifest_digest(m: dict) -> str:
    """sha256 of a manifest's content but its digest (keys sorted): every load checks it."""
    rest = {k: v for k, v in m.items() if k != "digest"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def content_digest(out: Path) -> str:
    """What names a prepared folder's content wherever it lies (each node may read a copy of
    its own): its manifest's digest."""
    m = read_manifest(out)
    return m.get("digest") or manifest_digest(m)


def read_manifest(out: Path) -> dict:
    path = Path(out) / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"{path}: no manifest; is {out} an output folder of `alexnet-pipe prepare`, "
                        f"and did prepare finish?")
    try:
        m = json.loads(path.read_bytes().decode())
    except OSError as e:
        raise os_error(path, e, "read the manifest") from None
    except ValueError as e:  # not UTF-8, not JSON
        raise UserError(f"{path}: damaged manifest ({e}); run the same prepare command again "
                        f"to rewrite it") from None
    if not isinstance(m, dict) or ("digest" in m and m["digest"] != manifest_digest(m)):
        raise UserError(f"{path}: damaged manifest (its content does not match its digest); run "
                        f"the same prepare command again to rewrite it")
    return m


def manifest(*, encoding: str, size: int, options: dict, val_layout: str | None,
             classes: list[str], names: dict[str, str], counts: dict[str, list[int]],
             shard_list: list[dict], stats: dict | None, skipped: list[dict],
             left_out: dict[str, int]) -> dict:
    """The manifest.json schema: what `prepare` made, for `inspect`, the loaders and people;
    sealed with its own digest (manifest_digest)."""
    m = {
        "format_version": FORMAT_VERSION,
        "encoding": encoding,
        "size": size,
        "options": options,             # the options that decide the bytes
        "val_layout": val_layout,       # folders | kaggle | labels-file
        "classes": [{"index": i, "wnid": w, "name": names[w]} for i, w in enumerate(classes)],
        "counts": {split: sum(c) for split, c in counts.items()},
        "counts_per_class": counts,     # split -> images per class index
        "shards": shard_list,           # {file, split, images, sha256, bytes}, in index order
        "stats": stats,                 # summary of stats.h5 and its sha256, or None without train
        "skipped": sorted(skipped, key=lambda s: s["path"]),  # {path, reason}
        "left_out_by_limit": left_out,  # split -> inputs over --limit-per-class (not listed)
    }
    return {**m, "digest": manifest_digest(m)}


# --- reading a prepared folder: what the loaders, evaluate and inspect check ----------------------

@dataclass(frozen=True)
class SplitInfo:
    """The shards of one split, as the manifest lists them, checked against the files."""
    name: str                       # "train" | "val"
    files: tuple[str, ...]
    counts: tuple[int, ...]         # images per shard
    encoding: str
    size: int                       # px, the side of every stored image
    num_classes: int
    class_names: tuple[str, ...]
    train_images: int | None        # images in the train split: what stats.h5 must have counted
    wnids: tuple[str, ...] = ()     # the classes' WordNet ids, in label order

    @property
    def total(self) -> int:
        return sum(self.counts)

    @cached_property
    def bytes_per_image(self) -> float:
        """Shard file bytes per image (one stat per shard, once)."""
        return sum(os.path.getsize(f) for f in self.files) / max(self.total, 1)


def load_split(data: Path, split: str) -> SplitInfo:
    data = Path(data)
    m = read_manifest(data)
    if m.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{data / MANIFEST_FILE}: format version {m.get('format_version')}, this "
                        f"alexnet-pipe reads {FORMAT_VERSION}; prepare the data again")
    entries = [e for e in m["shards"] if e["split"] == split]
    if not entries or sum(e["images"] for e in entries) == 0:
        raise UserError(f"{data}: no {split} images; prepare with --splits including {split}")
    for e in entries:  # a missing or foreign shard is named now, not deep inside a DALI worker
        path = data / e["file"]
        info = shard_info(path)
        # a cut or extended copy, by its size alone (a stat; the manifest has had sizes since
        # this version): `verify` hashes the bytes
        if "bytes" in e and path.stat().st_size != e["bytes"]:
            raise UserError(f"{path}: {path.stat().st_size} bytes, the manifest says "
                            f"{e['bytes']}: damaged or cut short; run the same `alexnet-pipe "
                            f"prepare` command again to rewrite it")
        if info["images"] != e["images"] or info["split"] != split:
            raise UserError(f"{data / e['file']}: {info['images']} {info['split']} images, the "
                            f"manifest says {e['images']} {split}; run prepare again")
    return SplitInfo(name=split, files=tuple(str(data / e["file"]) for e in entries),
                     counts=tuple(e["images"] for e in entries), encoding=m["encoding"],
                     size=m["size"], num_classes=len(m["classes"]),
                     class_names=tuple(c["name"] for c in m["classes"]),
                     train_images=m["counts"].get("train"),
                     wnids=tuple(c["wnid"] for c in m["classes"]))


def load_stats(data: Path, split: SplitInfo) -> ImageStats:
    """stats.h5 of a prepared folder, checked against the split's shards."""
    path = Path(data) / STATS_FILE
    stats = read_stats(path)
    if stats.pixel_mean.shape != (split.size, split.size, 3) or stats.count != split.train_images:
        raise UserError(f"{path}: statistics of {stats.count} images of "
                        f"{stats.pixel_mean.shape[0]} px do not match the shards "
                        f"({split.train_images} train images of {split.size} px); "
                        f"run prepare again")
    return stats
