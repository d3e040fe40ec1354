"""`alexnet-pipe bench-loader`: the very pipeline `train` uses, timed after a warm-up.

Figures: images/s and MB/s of shard bytes (median over repeats); with `compare_model` the AlexNet
training-step rate on the same device fed by synthetic device-resident tensors, and the ratio
loader / model; with `baseline` a plain PyTorch DataLoader doing the same work with PIL and numpy
in worker processes on the same shards, and the ratio DALI / baseline.
"""
from __future__ import annotations

import atexit
import os
import statistics
import time
from pathlib import Path

import numpy as np

from alexnet_base import resources
from alexnet_base.config import ENCODINGS, BenchConfig, LoaderConfig
from alexnet_base.errors import UserError
from alexnet_pipe import augment, distributed
from alexnet_pipe.normalize import Normalization
from alexnet_pipe.prepared import Shards, open_shards
from alexnet_pipe.reader import ShardReader
from alexnet_pipe.runtime import Runtime, train_step
from preprocessing import resize
from preprocessing.shards import MANIFEST_FILE, read_manifest


def timed_rate(it, n_batches: int | None, seconds: float | None, warmup: int, batch: int,
               sync=lambda: None, settle=None) -> float:
    """images/s of one pass over iterator `it`: `warmup` batches untimed, then n batches or
    `seconds`; settle(): called between the two (something to wait for before timing)."""
    for _ in range(warmup):
        next(it)
    if settle is not None:
        settle()
    sync()
    t0, n = time.perf_counter(), 0
    while (n < n_batches) if seconds is None else (time.perf_counter() - t0 < seconds):
        next(it)
        n += 1
    sync()  # a CPU-GPU sync point: the last batch must be finished
    return n * batch / (time.perf_counter() - t0)


STREAM = 1_000_000  # epochs a benchmark's loader streams: more than any benchmark reaches


def endless(loader):
    """Epoch after epoch of a loader, as one iterator."""
    while True:
        yield from loader


def bench_loader(config: BenchConfig) -> dict:
    config.validate()
    cfg = config.loader
    runtime = Runtime.for_device(distributed.device(cfg.device), channels_last=cfg.channels_last)
    data = open_shards(cfg.data, ("train",), verify=cfg.verify)
    info, norm = data.split("train"), data.normalization(cfg.augment)
    sync = _cuda_sync if runtime.gpu else (lambda: None)
    # the baseline first, while this process has no reader threads or pipelines of ours: its
    # DataLoader may fork (a fork during a read is held off by reading.FORK_GATE as well)
    baseline = baseline_rate(config, data, norm) if config.baseline else None
    rates = []
    loader = data.loader("train", cfg, device=runtime.device, epochs=STREAM)  # across epochs,
    # as a long run reads
    it = endless(loader)
    for _ in range(config.repeats):
        rates.append(timed_rate(it, config.batches, config.seconds,
                                config.warmup if not rates else 0, cfg.batch_size, sync))
    threads, readers = loader.workers  # as built: JPEG gets none where /dev/shm is small
    result = {"device": "gpu" if runtime.gpu else "cpu", "encoding": info.encoding,
              "batch_size": cfg.batch_size, "threads": threads, "readers": readers,
              "mean": cfg.augment.mean, "images_per_s": statistics.median(rates),
              "mb_per_s": statistics.median(rates) * info.bytes_per_image / 1e6,
              "repeats": rates}
    if config.compare_model:
        result["model_images_per_s"] = model_step_rate(cfg, runtime, info.num_classes)
        result["loader_over_model"] = result["images_per_s"] / result["model_images_per_s"]
    if baseline is not None:
        result["baseline_images_per_s"] = baseline
        result["dali_over_baseline"] = result["images_per_s"] / result["baseline_images_per_s"]
    return result


def _cuda_sync():
    import torch
    torch.cuda.synchronize()


def model_step_rate(cfg: LoaderConfig, runtime: Runtime, num_classes: int, steps: int = 10,
                    warmup: int = 3, arch: str = "alexnet", compile_mode: str | None = None,
                    model=None, in_channels: int = 3, settle=None) -> float:
    """The paper's SGD steps (runtime.train_step, optim.sgd) on synthetic device-resident input
    in the loader's dtype and layout, cuDNN's autotuning as train sets it: what the loader has
    to keep up with. compile_mode: torch.compile's mode (None: eager); model, in_channels:
    another network and its input channels (the benchmarks' variants); settle(): called after
    the warm-up, before the clock starts (a background job to wait for)."""
    import torch
    from alexnet_pipe import optim
    from alexnet_pipe.model import build_model
    runtime.configure()
    device = runtime.device
    model = runtime.place((model or build_model(arch, num_classes=num_classes,
                                                crop=cfg.augment.crop)).to(device))
    opt = optim.sgd(model)
    run = model if compile_mode is None else torch.compile(model, dynamic=False,
                                                           mode=compile_mode)
    x = runtime.batch(torch.randn(cfg.batch_size, in_channels, cfg.augment.crop,
                                  cfg.augment.crop, device=device).to(getattr(torch, cfg.dtype)))
    y = torch.randint(0, num_classes, (cfg.batch_size,), device=device)

    def steps_iter():
        while True:
            train_step(run, opt, x, y, runtime=runtime)
            yield
    warmup += 0 if compile_mode is None else 3  # compiling, autotuning, capturing graphs
    return timed_rate(steps_iter(), steps, None, warmup, cfg.batch_size,
                      _cuda_sync if runtime.gpu else (lambda: None), settle)


# --- the baseline: a plain PyTorch DataLoader doing the same work with PIL and numpy -----------

class _TorchDataset:
    """Map-style dataset over the same shards: decode (PIL), crop, flip, lighting, mean (numpy)."""

    def __init__(self, reader: ShardReader, aug, seed: int, basis, mean, std):
        self.reader, self.aug, self.seed, self.basis = reader, aug, seed, basis
        self.mean, self.std = mean, std

    def __len__(self):
        return self.reader.split.total

    def __getitem__(self, i):
        import torch
        rng = np.random.default_rng([self.seed, i])  # image i's draws, from --seed
        aug, size = self.aug, self.reader.split.size
        p = augment.random_params(rng, 1, size=size, aug=aug)
        (data,), (label,) = self.reader.read(np.array([i]))
        image = resize.decode_jpeg(data.tobytes()) if data.ndim == 1 else data
        offset = (augment.lighting_offsets(p["alpha"], self.basis)[0] if self.basis is not None
                  else np.zeros(3))
        out = augment.reference(image, x=int(p["x"][0]), y=int(p["y"][0]), flip=bool(p["flip"][0]),
                                offset=offset, mean=self.mean, std=self.std, crop=aug.crop)
        return torch.from_numpy(out.astype(np.float32)), int(label)


def _exit_as_forked(_worker: int) -> None:
    """DataLoader worker_init_fn: end the worker as a forked one ends, in os._exit. A spawned
    worker ends in sys.exit, and the C++ teardown of that interpreter exit aborted it now and
    then ("terminate called without an active exception", 2 of 4 runs of the pipeline tests).
    Registered after the imports' exit handlers, it runs before them, once the worker's loop
    is done."""
    atexit.register(os._exit, 0)


def baseline_rate(config: BenchConfig, data: Shards, norm: Normalization) -> float:
    import torch
    cfg, aug = config.loader, config.loader.augment
    dataset = _TorchDataset(ShardReader(data.split("train")), aug, cfg.seed, data.lighting(aug),
                            norm.mean, norm.std)
    # as many processes as our loader has DALI threads and readers, at most the cores (torch's
    # advice)
    workers = min(sum(cfg.reader_counts(False)), resources.usable_cores())
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True,
        num_workers=workers, drop_last=True, persistent_workers=True,
        prefetch_factor=2, multiprocessing_context=resources.start_method(),
        worker_init_fn=_exit_as_forked, generator=torch.Generator().manual_seed(cfg.seed))
    it = endless(loader)
    rates = [timed_rate(it, config.batches, config.seconds, config.warmup if r == 0 else 0,
                        cfg.batch_size) for r in range(config.repeats)]
    return statistics.median(rates)


def resolve_data(data: Path, encoding: str | None) -> Path:
    """--data may be a shard folder, or a folder holding jpeg/ and raw/ shard folders."""
    data = Path(data)
    if (data / MANIFEST_FILE).is_file():
        if encoding:
            have = read_manifest(data)["encoding"]
            if have != encoding:
                raise UserError(f"--encoding {encoding}: {data} holds {have} shards")
        return data
    kinds = [k for k in ENCODINGS if (data / k / MANIFEST_FILE).is_file()]
    if not kinds:
        raise UserError(f"--data {data}: no {MANIFEST_FILE}, nor jpeg/ or raw/ shard folders; "
                        f"run `alexnet-pipe prepare` first")
    if encoding is None and len(kinds) > 1:
        raise UserError(f"--data {data}: holds {' and '.join(kinds)} shards; pick one with "
                        f"--encoding")
    pick = encoding or kinds[0]
    if pick not in kinds:
        raise UserError(f"--encoding {pick}: {data} holds only {', '.join(kinds)} shards")
    return data / pick


def format_result(r: dict) -> str:
    lines = [f"loader   {r['device']} {r['encoding']} batch {r['batch_size']} mean={r['mean']}: "
             f"{r['images_per_s']:8.1f} images/s  {r['mb_per_s']:7.1f} MB/s  "
             f"(median of {len(r['repeats'])})"]
    if "model_images_per_s" in r:
        lines.append(f"model    AlexNet train step, synthetic input: {r['model_images_per_s']:8.1f} "
                     f"images/s   loader/model = {r['loader_over_model']:.2f}x")
    if "baseline_images_per_s" in r:
        lines.append(f"baseline torch DataLoader + PIL/numpy: {r['baseline_images_per_s']:8.1f} "
                     f"images/s   DALI/baseline = {r['dali_over_baseline']:.2f}x")
    return "\n".join(lines)

