"""`alexnet-pipe prepare`: an ImageNet tree -> shards, statistics and manifest, resumably.

The plan (which input goes into which shard) is a pure function of the tree and the options, so a
run killed at any point and started again writes exactly the shards an uninterrupted run writes.
Each worker writes whole shards: first the shard to a temporary name, then its partial sums and
skipped list to .partial/, then the rename that makes the shard complete. Statistics and manifest
are merged from .partial/ at the end, without decoding a finished shard again.
"""
from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from preprocessing import layout, resize, shards
from preprocessing.errors import UserError
from preprocessing.stats import PixelSums

PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class PrepareConfig:
    imagenet_root: Path
    out: Path
    size: int = 256                 # px, shorter side and crop (the paper)
    encoding: str = "jpeg"          # "jpeg" (re-encoded bytes) or "raw" (uint8 pixels)
    quality: int = 95               # JPEG quality of re-encoded images
    shard_size: int = 1024          # images per shard (~25 MB of JPEG at 256 px)
    workers: int = os.cpu_count() or 1
    splits: tuple[str, ...] = ("train", "val")
    val_labels: Path | None = None
    limit_per_class: int | None = None
    seed: int = 0                   # seeds the train shuffle across shards
    overwrite: bool = False
    progress: bool | None = None    # None: a bar only when stderr is a terminal

    def validate(self) -> None:
        if self.encoding not in shards.ENCODINGS:
            raise UserError(f"--encoding {self.encoding}: choose one of {', '.join(shards.ENCODINGS)}")
        if not 1 <= self.quality <= 100:
            raise UserError(f"--quality {self.quality}: must be 1..100")
        if self.size < 8:
            raise UserError(f"--size {self.size}: must be at least 8 px")
        if self.shard_size < 1:
            raise UserError(f"--shard-size {self.shard_size}: must be at least 1")
        if self.workers < 1:
            raise UserError(f"--workers {self.workers}: must be at least 1")
        if self.limit_per_class is not None and self.limit_per_class < 1:
            raise UserError(f"--limit-per-class {self.limit_per_class}: must be at least 1")
        bad = [s for s in self.splits if s not in layout.SPLITS]
        if bad or not self.splits:
            raise UserError(f"--splits {','.join(self.splits)}: choose from train,val")
        if self.val_labels is not None and not Path(self.val_labels).is_file():
            raise UserError(f"--val-labels {self.val_labels}: file not found")

    def output_options(self) -> dict:
        """The options that decide the output bytes (workers and progress do not)."""
        return {"imagenet_root": str(Path(self.imagenet_root).resolve()), "size": self.size,
                "encoding": self.encoding, "quality": self.quality, "shard_size": self.shard_size,
                "splits": list(self.splits), "limit_per_class": self.limit_per_class,
                "seed": self.seed,
                "val_labels": str(Path(self.val_labels).resolve()) if self.val_labels else None}


@dataclass(frozen=True)
class ShardJob:
    split: str
    index: int
    samples: tuple[layout.Sample, ...]


def plan_shards(tree: layout.Tree, config: PrepareConfig) -> list[ShardJob]:
    jobs = []
    for split in config.splits:
        samples = list(tree.samples[split])
        if split == "train":  # every train shard a class mix: one seeded shuffle of all inputs
            order = np.random.default_rng(config.seed).permutation(len(samples))
            samples = [samples[i] for i in order]
        for start in range(0, len(samples), config.shard_size):
            jobs.append(ShardJob(split, start // config.shard_size,
                                 tuple(samples[start:start + config.shard_size])))
    return jobs


def partial_path(out: Path, split: str, index: int) -> Path:
    return out / shards.PARTIAL_DIR / f"{split}-{index:05d}.npz"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# Set in each worker by _init_worker: the image counter that the progress bar reads.
_progress_counter = None


def _init_worker(counter) -> None:
    global _progress_counter
    _progress_counter = counter


def write_one_shard(job: ShardJob, config: PrepareConfig, image_root: Path) -> dict:
    """Decode, resize and encode the inputs of one shard; write it and its partial sums."""
    images, labels, keys, skipped = [], [], [], []
    sums = PixelSums(config.size)
    for sample in job.samples:
        try:
            image = resize.load_image(image_root / sample.key, config.size)
        except resize.SkipImage as e:
            skipped.append((sample.key, str(e)))
        else:
            if job.split == "train":
                sums.update(image)
            images.append(resize.encode_jpeg(image, config.quality)
                          if config.encoding == "jpeg" else image)
            labels.append(sample.label)
            keys.append(sample.key)
        if _progress_counter is not None:
            with _progress_counter.get_lock():
                _progress_counter.value += 1
    final = config.out / shards.shard_name(job.split, job.index)
    try:
        # The shard first (atomically), then its record: a shard without a record is written
        # again on resume, and the plan makes it the same shard.
        shards.write_shard(final, images=images, labels=labels, keys=keys,
                           encoding=config.encoding, size=config.size, split=job.split)
        info = {"file": final.name, "split": job.split, "images": len(labels),
                "sha256": _sha256(final), "labels": np.bincount(labels).tolist() if labels else [],
                "skipped": skipped}
        with shards.atomic_path(partial_path(config.out, job.split, job.index)) as ptmp:
            with open(ptmp, "wb") as f:  # np.savez would append .npz to a temporary name
                np.savez(f, info=json.dumps(info), **sums.to_arrays())
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise UserError(f"{final}: disk full; free space under {config.out} and run the same "
                            f"command again to resume") from None
        raise UserError(f"{final}: cannot write ({e.strerror or e}); check --out") from None
    return info


def _job_runner(args):
    return write_one_shard(*args)


def _load_partial(out: Path, job: ShardJob, sums: bool = True) -> tuple[dict, PixelSums] | None:
    """The partial record of a finished shard, or None if that shard must be (re)written.
    sums=False reads only the small record (npz members load lazily)."""
    path = partial_path(out, job.split, job.index)
    if not (out / shards.shard_name(job.split, job.index)).is_file() or not path.is_file():
        return None
    try:
        with np.load(path) as z:
            return json.loads(str(z["info"])), PixelSums.from_arrays(z) if sums else None
    except (OSError, ValueError, KeyError):
        return None  # a damaged record: write the shard again


def _prepare_out(config: PrepareConfig) -> None:
    """Create --out, or check that it holds a run of the same options (then resume)."""
    out = config.out
    plan_path = out / shards.PARTIAL_DIR / PLAN_FILE
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    ours = [p for p in out.glob("*") if p.name == shards.MANIFEST_FILE or p.suffix == ".h5"] \
        if out.is_dir() else []
    if config.overwrite:
        for p in ours:
            p.unlink()
        shutil.rmtree(out / shards.PARTIAL_DIR, ignore_errors=True)
    elif plan_path.is_file():
        previous = json.loads(plan_path.read_text())
        if previous != config.output_options():
            changed = sorted(k for k in previous.keys() | config.output_options().keys()
                             if previous.get(k) != config.output_options().get(k))
            raise UserError(f"--out {out}: holds a run with other options ({', '.join(changed)}); "
                            f"use --overwrite to replace it, or another --out")
    elif ours:
        raise UserError(f"--out {out}: already holds shards of an unknown run; use --overwrite "
                        f"to replace them, or another --out")
    try:
        (out / shards.PARTIAL_DIR).mkdir(parents=True, exist_ok=True)
        # Temporary files left by a killed run: never under a final name, never reused.
        for stale in [*out.glob("*.tmp-*"), *(out / shards.PARTIAL_DIR).glob("*.tmp-*")]:
            stale.unlink()
        shards.write_json(plan_path, config.output_options())
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def _run_jobs(todo: list[ShardJob], config: PrepareConfig, image_root: Path, total: int,
              done_images: int) -> None:
    """Write the shards of `todo` in worker processes; their records land in .partial/."""
    from tqdm import tqdm

    show = sys.stderr.isatty() if config.progress is None else config.progress
    counter = mp.Value("q", 0)
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    finished = 0
    with ctx.Pool(min(config.workers, max(len(todo), 1)), initializer=_init_worker,
                  initargs=(counter,)) as pool:
        bar = tqdm(total=total, initial=done_images, unit="img", disable=not show,
                   smoothing=0.1, desc="prepare")  # after the fork: no thread is forked
        pending = pool.imap_unordered(_job_runner, [(job, config, image_root) for job in todo])
        while finished < len(todo):
            try:
                pending.next(timeout=0.5)
                finished += 1
            except mp.TimeoutError:
                pass
            bar.n = done_images + counter.value
            bar.refresh()
    bar.close()


def run(config: PrepareConfig) -> dict:
    """Write the shards that are missing, then statistics and manifest. Returns the manifest."""
    config.validate()
    config = PrepareConfig(**{**asdict(config), "out": Path(config.out),
                              "imagenet_root": Path(config.imagenet_root)})
    tree = layout.discover(config.imagenet_root, config.splits, config.val_labels,
                           config.limit_per_class)
    _prepare_out(config)
    jobs = plan_shards(tree, config)
    todo = [j for j in jobs if _load_partial(config.out, j, sums=False) is None]
    total = sum(len(j.samples) for j in jobs)
    done_images = total - sum(len(j.samples) for j in todo)
    t0 = time.perf_counter()
    _run_jobs(todo, config, tree.image_root, total, done_images)
    seconds = time.perf_counter() - t0
    records = [_load_partial(config.out, j) for j in jobs]
    if any(r is None for r in records):
        raise UserError(f"--out {config.out}: some shards are missing after the run; run again")
    manifest = _write_results(config, tree, jobs, records)
    n_written = sum(manifest["counts"].values())
    n_skipped = len(manifest["skipped"])
    print(f"{n_written} written, {n_skipped} skipped"
          + (f", see skipped list in {config.out / shards.MANIFEST_FILE}" if n_skipped else "")
          + f" ({len(todo)} of {len(jobs)} shards written now in {seconds:.1f} s)")
    return manifest


def _write_results(config, tree, jobs, records) -> dict:
    sums = PixelSums(config.size)
    counts: dict[str, list[int]] = {s: [0] * len(tree.classes) for s in config.splits}
    skipped = [{"path": key, "reason": reason} for key, reason in tree.unlabelled]
    shard_list = []
    for job, (info, part) in zip(jobs, records):
        sums.merge(part)
        for label, n in enumerate(info["labels"]):
            counts[job.split][label] += n
        skipped += [{"path": key, "reason": reason} for key, reason in info["skipped"]]
        shard_list.append({k: info[k] for k in ("file", "split", "images", "sha256")})
    stats_summary = None
    if "train" in config.splits:
        if sums.count == 0:
            raise UserError(f"{tree.image_root / 'train'}: no readable training image; "
                            f"statistics need at least one")
        stats = sums.finalize()
        shards.write_stats(config.out / shards.STATS_FILE, stats)
        stats_summary = {"file": shards.STATS_FILE, "pixel_scale": shards.STATS_PIXEL_SCALE,
                         "channel_mean": stats.channel_mean.tolist(),
                         "channel_std": stats.channel_std.tolist(),
                         "eigval": stats.eigval.tolist(), "eigvec": stats.eigvec.tolist()}
    manifest = {
        "format_version": shards.FORMAT_VERSION,
        "encoding": config.encoding,
        "size": config.size,
        "options": config.output_options(),
        "val_layout": tree.val_layout or None,
        "classes": [{"index": i, "wnid": w, "name": tree.names[w]} for i, w in enumerate(tree.classes)],
        "counts": {split: sum(c) for split, c in counts.items()},
        "counts_per_class": counts,
        "shards": shard_list,
        "stats": stats_summary,
        "skipped": sorted(skipped, key=lambda s: s["path"]),
        "left_out_by_limit": {split: tree.left_out.get(split, 0) for split in config.splits},
    }
    shards.write_json(config.out / shards.MANIFEST_FILE, manifest)
    return manifest
