"""`alexnet-pipe prepare`: an ImageNet tree -> shards, statistics and manifest, resumably.

The plan (which input goes into which shard) is a pure function of the tree and the options, so a
run killed at any point and started again writes exactly the shards an uninterrupted run writes.
Each worker writes whole shards: first the shard to a temporary name, then its partial sums and
skipped list to .partial/, then the rename that makes the shard complete. Statistics and manifest
are merged from .partial/ at the end, without decoding a finished shard again.
"""
from __future__ import annotations

import errno
import gc
import hashlib
import io
import json
import multiprocessing as mp
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from preprocessing import archives, layout, resize, shards
from alexnet_base import resources
from alexnet_base.config import PrepareConfig
from alexnet_base.errors import UserError, os_error
from alexnet_base.files import atomic_path, write_json
from preprocessing.stats import PixelSums
from preprocessing.verify import sha256_file

PLAN_FILE = "plan.json"
PLAN_INPUTS_FILE = "plan-inputs.json"  # {shard: sha256 of its planned inputs and labels}


def output_options(config: PrepareConfig) -> dict:
    """The options that decide the output bytes (workers and progress do not)."""
    return {"imagenet_root": str(Path(config.imagenet_root).resolve()), "size": config.size,
            "encoding": config.encoding, "quality": config.quality,
            "shard_size": config.shard_size, "splits": list(config.splits),
            "limit_per_class": config.limit_per_class, "seed": config.seed,
            "val_labels": str(Path(config.val_labels).resolve()) if config.val_labels else None}


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


# Set in each worker by _init_worker: the image counter that the progress bar reads.
_progress_counter = None


def _init_worker(counter) -> None:
    global _progress_counter
    _progress_counter = counter


def _input(sample: layout.Sample, image_root: Path, sources: list):
    """A file under the image root, or an archive member's bytes."""
    if sample.src < 0:
        return image_root / sample.key
    return io.BytesIO(archives.read_member(sources, sample))


def write_one_shard(job: ShardJob, config: PrepareConfig, image_root: Path,
                    sources: list = ()) -> dict:
    """Decode, resize and encode the inputs of one shard; write it and its partial sums."""
    images, labels, keys, skipped = [], [], [], []
    sums = PixelSums(config.size)
    for sample in job.samples:
        try:
            image = resize.load_image(_input(sample, image_root, sources), config.size)
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
                "sha256": sha256_file(final), "labels": np.bincount(labels).tolist() if labels else [],
                "skipped": skipped}
        with atomic_path(partial_path(config.out, job.split, job.index)) as ptmp:
            with open(ptmp, "wb") as f:  # np.savez would append .npz to a temporary name
                np.savez(f, info=json.dumps(info), **sums.to_arrays())
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise UserError(f"{final}: disk full; free space under {config.out} and run the same "
                            f"command again to resume") from None
        raise os_error(final, e, "write the shard") from None
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
    ours = ([p for p in out.glob("*") if p.name == shards.MANIFEST_FILE or p.suffix == ".h5"]
            if out.is_dir() else [])
    if config.overwrite:
        for p in ours:
            p.unlink()
        shutil.rmtree(out / shards.PARTIAL_DIR, ignore_errors=True)
    elif plan_path.is_file():
        previous = json.loads(plan_path.read_text())
        if previous != output_options(config):
            changed = sorted(k for k in previous.keys() | output_options(config).keys()
                             if previous.get(k) != output_options(config).get(k))
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
        write_json(plan_path, output_options(config))
    except OSError as e:
        raise UserError(f"--out {os_error(out, e, 'write there')}") from None


def _run_jobs(todo: list[ShardJob], config: PrepareConfig, tree: layout.Tree, total: int,
              done_images: int) -> None:
    """Write the shards of `todo` in worker processes; their records land in .partial/."""
    from tqdm import tqdm

    show = sys.stderr.isatty() if config.progress is None else config.progress
    ctx = mp.get_context(resources.start_method())  # spawn where CUDA is up (gpu_report)
    if ctx.get_start_method() == "fork":
        # This process's garbage is torn down here, where its threads are, not in a forked
        # worker whose collector would finalise it (a DALI pipeline or a reader thread pool
        # left by a caller's loader) and wait on threads the fork did not copy.
        gc.collect()
    counter = ctx.Value("q", 0)  # of the pool's context: spawn refuses a forked lock
    finished = 0
    with ctx.Pool(min(config.workers, max(len(todo), 1)), initializer=_init_worker,
                  initargs=(counter,)) as pool:
        bar = tqdm(total=total, initial=done_images, unit="img", disable=not show,
                   smoothing=0.1, desc="prepare")  # after the fork: no thread is forked
        pending = pool.imap_unordered(_job_runner, [(job, config, tree.image_root, tree.sources)
                                                    for job in todo])
        while finished < len(todo):
            try:
                pending.next(timeout=0.5)
                finished += 1
            except mp.TimeoutError:
                pass
            bar.n = done_images + counter.value
            bar.refresh()
    bar.close()


def _job_digests(jobs: list[ShardJob]) -> dict[str, str]:
    """{shard name: sha256 of the inputs and labels the plan puts in it}."""
    return {shards.shard_name(j.split, j.index): hashlib.sha256(json.dumps(
        [[s.key, s.label] for s in j.samples]).encode()).hexdigest() for j in jobs}


def _check_plan(config: PrepareConfig, jobs: list[ShardJob]) -> None:
    """The shards already in --out were planned from the same inputs, or prepare refuses: a
    repair must not mix two trees. The first run records the plan."""
    path = config.out / shards.PARTIAL_DIR / PLAN_INPUTS_FILE
    ours = _job_digests(jobs)
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = None  # unreadable: the partial records decide, as before it existed
        if isinstance(previous, dict) and previous != ours:
            differ = sum(previous.get(name) != digest for name, digest in ours.items())
            raise UserError(f"--imagenet-root {config.imagenet_root}: not the images the shards in "
                            f"{config.out} were made from ({differ} of {len(ours)} shards would "
                            f"hold other images); give the original tree, or --overwrite to "
                            f"prepare this one afresh")
    write_json(path, ours)


def _damaged(config: PrepareConfig, finished: list[tuple[ShardJob, dict]]) -> list[ShardJob]:
    """The finished shards whose bytes no longer hash to the sha256 recorded when they were
    written (hashed in threads, at disk speed); an unreadable one counts as damaged."""
    from concurrent.futures import ThreadPoolExecutor

    def intact(item):
        job, info = item
        try:
            return sha256_file(config.out / info["file"]) == info["sha256"]
        except OSError:
            return False
    with ThreadPoolExecutor(max(1, config.workers)) as pool:
        return [job for (job, _), ok in zip(finished, pool.map(intact, finished)) if not ok]


def run(config: PrepareConfig) -> dict:
    """Write the shards that are missing, then statistics and manifest. Returns the manifest."""
    config.validate()
    config = PrepareConfig(**{**asdict(config), "out": Path(config.out),
                              "imagenet_root": Path(config.imagenet_root)})
    if archives.kind(config.imagenet_root):  # the official tars or Kaggle's zip, read in place
        if config.val_labels is not None:
            raise UserError("--val-labels: the archives carry their own val labels (devkit or "
                            "LOC_val_solution.csv); leave it out")
        tree = archives.discover(config.imagenet_root, config.splits, config.limit_per_class,
                                 config.workers)
    else:
        tree = layout.discover(config.imagenet_root, config.splits, config.val_labels,
                               config.limit_per_class)
    _prepare_out(config)
    jobs = plan_shards(tree, config)
    _check_plan(config, jobs)
    records = [(j, _load_partial(config.out, j, sums=False)) for j in jobs]
    todo = [j for j, r in records if r is None]
    damaged = _damaged(config, [(j, r[0]) for j, r in records if r is not None])
    if damaged:  # a repair: these alone are written again, to the very bytes planned
        print(f"{len(damaged)} shard(s) differ from the sha256 recorded when they were written; "
              f"writing them again: "
              + ", ".join(shards.shard_name(j.split, j.index) for j in damaged), flush=True)
        todo += damaged
    total = sum(len(j.samples) for j in jobs)
    done_images = total - sum(len(j.samples) for j in todo)
    t0 = time.perf_counter()
    _run_jobs(todo, config, tree, total, done_images)
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
        shard_list.append({**{k: info[k] for k in ("file", "split", "images", "sha256")},
                           "bytes": (config.out / info["file"]).stat().st_size})
    stats_summary = None
    if "train" in config.splits:
        if sums.count == 0:
            bad = [pair for job, (info, _) in zip(jobs, records) if job.split == "train"
                   for pair in info["skipped"]]
            why = (f": none of its {len(bad)} could be read (the first, {bad[0][0]}: "
                   f"{bad[0][1]})" if bad else "")
            raise UserError(f"{tree.image_root / 'train'}: no readable training image{why}; "
                            f"statistics need at least one")
        stats = sums.finalize()
        shards.write_stats(config.out / shards.STATS_FILE, stats)
        stats_summary = {"file": shards.STATS_FILE,
                         "sha256": sha256_file(config.out / shards.STATS_FILE),
                         "pixel_scale": shards.STATS_PIXEL_SCALE,
                         "channel_mean": stats.channel_mean.tolist(),
                         "channel_std": stats.channel_std.tolist(),
                         "eigval": stats.eigval.tolist(), "eigvec": stats.eigvec.tolist()}
    manifest = shards.manifest(
        encoding=config.encoding, size=config.size, options=output_options(config),
        val_layout=tree.val_layout or None, classes=tree.classes, names=tree.names,
        counts=counts, shard_list=shard_list, stats=stats_summary, skipped=skipped,
        left_out={split: tree.left_out.get(split, 0) for split in config.splits})
    write_json(config.out / shards.MANIFEST_FILE, manifest)
    return manifest
