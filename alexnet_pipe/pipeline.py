"""The DALI train and validation pipelines, and the PyTorch-facing loader around them.

    HDF5 shards --source.BatchSource (plan.py's samples and draws, reader.py's bytes),
      external_source-->
      JPEG bytes --decoders.image (nvJPEG on a GPU, libjpeg-turbo on the CPU)--> HWC uint8
      or raw HWC uint8
      --> minus the mean image before the crop, where Placement says the graph subtracts it
      --> crop_mirror_normalize: crop window and mirror per sample, minus a per-sample mean
          (the channel mean minus the PCA lighting offset: the lighting costs nothing), / std
      --> (B, 3, crop, crop) float, CHW or HWC (channels_last), or (B, 10, 3, crop, crop)
      --> Loader: the CPU's mean-image windows (normalize.MeanWindows), the dtype, `Batch`es

Train and val share one graph; val takes the centre crop (or ten crops), no flip, no lighting,
and pads its last batch (meta's `valid` column masks the padding). What runs where is decided
once, in `Placement`; what the source hands the graph is contract.py's.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from alexnet_base import resources
from alexnet_base.config import LoaderConfig
from alexnet_base.errors import UserError
from alexnet_pipe import augment
from alexnet_pipe.contract import META, SourceBatch, source_outputs
from alexnet_pipe.normalize import MeanWindows, Normalization
from alexnet_pipe.jpeg import damaged_image
from alexnet_pipe.plan import Plan
from alexnet_pipe.reader import ShardReader
from alexnet_pipe.source import BatchSource
from alexnet_pipe.reading import HeapTrim, ReadAhead, fit_shared_memory, queue_depth, reader_shm
from preprocessing.shards import SplitInfo


def _dali_modules():
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ModuleNotFoundError as e:
        raise UserError(f"NVIDIA DALI is not installed ({e}); pip install nvidia-dali-cuda130")
    except ImportError as e:  # installed, but its libraries do not load (memory, a broken copy)
        raise UserError(f"NVIDIA DALI is installed but could not be loaded ({e})")
    return fn, pipeline_def, types


@dataclass(frozen=True)
class Placement:
    """What runs where, decided once from the device the batches go to (`for_device`)."""
    device_id: int | None      # DALI's GPU, or None: a CPU-only pipeline
    decoder: str               # "mixed" (nvJPEG) or "cpu" (libjpeg-turbo)
    mean_image_in_graph: bool  # the mean image subtracted by DALI, else by MeanWindows after it
    packed: bool               # JPEG batches as one zero-padded array (what nvJPEG is fed)
    channels_last: bool        # DALI emits HWC, handed on as an NCHW view in channels_last memory
    reader_start: str          # how reader processes start: DALI refuses to fork once CUDA is up

    @classmethod
    def for_device(cls, device, *, channels_last: bool = True) -> "Placement":
        """device: a torch.device. On a GPU everything runs there, in the model's layout; on the
        CPU the mean image is subtracted by torch after DALI, which is cheaper there."""
        gpu = device.type == "cuda"
        return cls(device_id=(device.index or 0) if gpu else None,
                   decoder="mixed" if gpu else "cpu", mean_image_in_graph=gpu, packed=gpu,
                   channels_last=channels_last and gpu,
                   reader_start="spawn" if gpu else resources.start_method())

    @property
    def dali_device(self) -> str:
        return "cpu" if self.device_id is None else "gpu"


def build_pipeline(source: BatchSource, *, norm: Normalization, config: LoaderConfig,
                   placement: Placement, threads: int, readers: int, ten_crop: bool = False):
    """The DALI graph for `source` (train or val), unbuilt. `readers`: reader threads of this
    process for raw shards (reading.ReadAhead), reader processes for JPEG shards; 0: read in
    this process when DALI asks."""
    fn, pipeline_def, types = _dali_modules()
    aug, split, dev = config.augment, source.split, placement.dali_device
    jpeg = split.encoding == "jpeg"
    callback, processes = source, 0
    if readers and not jpeg:
        callback = ReadAhead(source, readers, queue_depth(config.prefetch, readers))
    elif readers:
        processes = readers
    if processes:
        feed = dict(parallel=True, prefetch_queue_depth=queue_depth(config.prefetch, processes))
    elif jpeg and not source.packed:
        # views of the mapped shards, read in this thread: DALI copies each stream, so its
        # threads neither free views under the GIL this thread holds nor touch the mapped file
        feed = dict(parallel=False, no_copy=False)
    else:  # called in this process when DALI asks; no copy: each call returns fresh arrays
        feed = dict(parallel=False, no_copy=True)
    outputs = source_outputs(split.encoding)
    std = [float(s) for s in norm.std]

    def normalize(images, x, y, mirror, norm_mean):
        return fn.crop_mirror_normalize(images, crop=(aug.crop, aug.crop), crop_pos_x=x,
                                        crop_pos_y=y, mirror=mirror, mean=norm_mean, std=std,
                                        dtype=types.FLOAT, device=dev,
                                        output_layout="HWC" if placement.channels_last else "CHW")

    @pipeline_def(batch_size=source.plan.batch_size * source.plan.dali_batches,
                  num_threads=threads, device_id=placement.device_id, py_num_workers=processes,
                  py_start_method=placement.reader_start, prefetch_queue_depth=config.prefetch)
    def pipe():
        out = SourceBatch(*fn.external_source(
            source=callback, num_outputs=len(outputs), batch=True, batch_info=True, **feed,
            dtype=[getattr(types, o.dtype) for o in outputs], ndim=[o.ndim for o in outputs],
            layout=[o.layout for o in outputs]))
        images, meta = out.images, out.meta
        if jpeg and source.packed:  # each stream cut out of its padded row
            images = images[0:meta[META.nbytes]]
        if jpeg:
            hw = {"hw_decoder_load": config.hw_decoder_load} if placement.decoder == "mixed" else {}
            images = fn.decoders.image(images, device=placement.decoder, output_type=types.RGB,
                                       **hw)
        elif dev == "gpu":
            images = images.gpu()
        if norm.per_pixel and placement.mean_image_in_graph:  # before the crop: the crop then
            # cuts the same window of image and mean
            mean_image = fn.constant(fdata=np.asarray(norm.mean, np.float32).ravel().tolist(),
                                     shape=list(np.shape(norm.mean)), layout="HWC",
                                     dtype=types.FLOAT, device=dev)
            images = images - mean_image  # uint8 - float32 -> float32, HWC
        if not ten_crop:
            images = normalize(images, out.crop_x, out.crop_y, out.mirror, out.norm_mean)
        else:
            span = max(split.size - aug.crop, 1)
            images = fn.stack(*[normalize(images, float(cx / span), float(cy / span), int(flip),
                                          out.norm_mean)
                                for cx, cy, flip in augment.ten_crop_positions(split.size,
                                                                               aug.crop)], axis=0)
        if dev == "gpu":  # labels and mask arrive on the device with the images
            meta = meta.gpu()
        return images, meta

    return pipe()


class Workers(NamedTuple):
    """Who prepares a loader's batches: DALI's CPU threads, and the shard readers (threads for
    raw shards, processes for JPEG; 0: the pipeline's own thread reads)."""
    threads: int
    readers: int


@dataclass(frozen=True)
class Batch:
    """One batch as torch tensors, all on the pipeline's device. It unpacks as (images,
    labels), what a model trains on: `for images, labels in loader`.

    images: (B, 3, H, W) or (B, 10, 3, H, W), in the loader's dtype;
    labels: (B,) int64; valid: (B,) bool (False only for val padding);
    index: (B,) int64, the global sample index (contract.META): which image each row is.
    """
    images: object
    labels: object
    valid: object
    index: object

    def __iter__(self):
        return iter((self.images, self.labels))


class Loader:
    """Iterates `Batch`es, one epoch a `for` loop. The source streams `plan.epochs` epochs
    through one DALI epoch: the loader hands out each epoch's batches by count, so the readers
    run on into the next epoch while this one's last batches are trained on. Each DALI
    iteration holds `plan.dali_batches` batches (fewer at an epoch's end), handed out as views."""

    def __init__(self, pipe, source: BatchSource, *, dtype: str, start_epoch: int,
                 workers: tuple[int, int], prefetch: int = 2, channels_last: bool = False,
                 mean_windows: MeanWindows | None = None):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
        self.source = source
        self.plan = source.plan  # which samples and draws: the loader counts its epochs by it
        self.workers = Workers(*workers)
        # bytes of /dev/shm its reader processes fill once running (none when reading in-process)
        self.shm = reader_shm(source, prefetch, pipe.py_num_workers) if pipe.py_num_workers else 0
        self.epoch = start_epoch
        self._dtype = dtype
        self._prefetch = prefetch
        self._channels_last = channels_last
        self._mean_windows = mean_windows  # the CPU's mean image, subtracted here
        # reset by hand at the start of the next stream: nothing is read past the last one
        with warnings.catch_warnings():  # ten crops leave the crop draws unused, by design
            warnings.filterwarnings("ignore", message="The external source node .* not used")
            try:  # it starts the reader processes and runs the first iteration already
                with resources.children_deaf_to():
                    self._iter = DALIGenericIterator([pipe], ["images", "meta"],
                                                     auto_reset=False)
            except UserError:  # the reader's own, in this process
                raise
            except Exception as e:  # noqa: BLE001 - DALI's, whichever class: see _explain
                raise self._explain(e, 0) from None
        self._ended = False  # the stream's end was taken from DALI: reset before reading on
        self._done = 0       # batches handed out of the current epoch
        self._ready = []     # (images, meta) of the current DALI iteration's batches to come
        self._trim = HeapTrim()

    def __len__(self) -> int:
        return self.plan.num_batches() - self.plan.skipped(self.epoch)

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, batch) of the next batch: a loader made with start_epoch, start_batch at
        this position goes on from it with the very batches and draws this one would give."""
        return self.epoch, self.plan.skipped(self.epoch) + self._done

    def __iter__(self):
        import torch
        # DALI emits float32 (and has no bfloat16): cast on the device, after the mean windows
        cast = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(self._dtype)
        last = (self.epoch - self.plan.start_epoch + 1) % self.plan.epochs == 0
        if self._ended:
            self._iter.reset()
            self._ended = False
        done, total = 0, len(self)
        try:
            while done < total:
                if not self._ready:
                    self._ready = self._split(self._next()[0], cast)
                images, meta = self._ready.pop(0)
                done = self._done = done + 1
                yield Batch(images, meta[:, META.label], meta[:, META.valid].bool(),
                            meta[:, META.index])
            if self._ready:
                raise AssertionError("a DALI iteration ran past the end of its epoch")
            if last:  # the stream's end: DALI's StopIteration is due now
                if next(self._iter, None) is not None:
                    raise AssertionError("the reader ran past the end of its stream")
                self._ended = True
        except (UserError, AssertionError):  # the reader's own, in this process; invariants
            raise
        except Exception as e:  # noqa: BLE001 - DALI's errors name no file (a RuntimeError, or
            # an Exception carrying a reader process's traceback): find the image that failed
            raise self._explain(e, done) from None
        self.epoch, self._done = self.epoch + 1, 0
        self._trim.epoch_done(done)

    def _split(self, outputs: dict, cast) -> list:
        """One DALI iteration's (images, meta) finished (mean windows, layout, dtype) as a
        whole, then cut into its batches: views, in order."""
        images, meta = outputs["images"], outputs["meta"]
        if self._mean_windows is not None:
            self._mean_windows.subtract(images, meta[:, META.x:META.mirror + 1])
        if self._channels_last:  # (..., H, W, C) -> an (..., C, H, W) view, no copy
            images = images.movedim(-1, -3)
        images = images.to(cast) if cast is not None else images
        b = self.plan.batch_size
        return [(images[i:i + b], meta[i:i + b]) for i in range(0, len(meta), b)]

    def _next(self):
        try:
            return next(self._iter)
        except StopIteration:  # never inside a stream: every epoch has num_batches()
            raise AssertionError(f"the reader ended early in epoch {self.epoch}") from None

    def _explain(self, error: Exception, done: int) -> Exception:
        """A UserError naming the shard and key of an undecodable image in the batches that
        were in flight, or `error` itself when none is found."""
        plan = self.plan
        first = plan.skipped(self.epoch) + done
        in_flight = (self._prefetch + 2) * plan.dali_batches
        for batch in range(first, min(first + in_flight, plan.num_batches())):
            found = self.source.undecodable(self.epoch, batch)
            if found is not None:
                return damaged_image(*found)
        return _resource_error(error, self.source, self._prefetch) or error


def _resource_error(error: Exception, source: BatchSource, prefetch: int) -> UserError | None:
    """DALI's error as the OS limit it met (memory, threads), in one line, or None."""
    text = str(error)
    found = re.search(r"operator `([\w.]+)`", text)
    where = f" in {found.group(1)}" if found else ""
    if any(m in text for m in ("std::bad_alloc", "out of memory", "Out of memory")):
        return UserError(f"the data pipeline ran out of memory{where} with batches of "
                         f"{source.plan.batch_size} images, {source.plan.dali_batches} at a "
                         f"time and {prefetch} ahead; use a smaller --batch-size, --dali-batches or --prefetch")
    if "Resource temporarily unavailable" in text:  # EAGAIN: pthread_create, fork
        return UserError(f"the data pipeline could not start its threads{where} (EAGAIN, "
                         f"Resource temporarily unavailable: a limit on processes or memory, "
                         f"`ulimit -u` and `ulimit -v`); raise the limit or use fewer --threads "
                         f"and --readers")
    return None


def make_loader(config: LoaderConfig, split: SplitInfo, *, norm: Normalization, device,
                lighting: np.ndarray | None = None, ranks=None, start_epoch: int = 0,
                start_batch: int = 0, epochs: int = 1, ten_crop: bool = False,
                placement: Placement | None = None, shm_reserved: int = 0) -> Loader:
    """A train (random crop, flip, lighting) or val (centre crop or ten crops) loader over
    `split` (a SplitInfo: prepared.Shards opens them) delivering to `device` (a torch.device).

    norm: the normalisation (the run's, or a checkpoint's); lighting: the PCA lighting basis
    (augment.lighting_basis; None: none). ranks: a distributed.DistEnv, this process's place
    (default: rank 0 of 1): its share of the split and, with the others on its machine, of the
    cores and /dev/shm. epochs: how many epochs from `start_epoch` the readers stream without a
    drain between them (train: the rest of the run). shm_reserved: the `shm` of loaders built
    before this one that have not run yet. placement: what runs where (default:
    Placement.for_device). Reads nothing from the folder or the environment."""
    from alexnet_pipe.distributed import DistEnv
    config.validate()
    ranks = ranks or DistEnv()
    train = split.name == "train"
    aug = config.augment
    aug.validate(split.size)
    placement = placement or Placement.for_device(device, channels_last=config.channels_last)
    plan = Plan(total=split.total, size=split.size, batch_size=config.batch_size, train=train,
                augment=aug, seed=config.seed, rank=ranks.rank, world=ranks.world,
                start_epoch=start_epoch, start_batch=start_batch, epochs=epochs,
                dali_batches=config.dali_batches_for(config.batch_size))
    if plan.num_batches() == 0:  # val batches are cut to the share: train's alone can be empty
        raise UserError(f"--batch-size {config.batch_size * ranks.world}: larger than the "
                        f"{split.total} images of the {split.name} split (the global batch, "
                        f"{ranks.world} x {config.batch_size}); use a smaller batch")
    source = BatchSource(plan, ShardReader(split), lighting_basis=lighting if train else None,
                         channel_mean=norm.channel_mean(), packed=placement.packed,
                         check_jpeg=not config.verify)
    threads, readers = config.reader_counts(placement.device_id is not None, ranks.local_world)
    if readers and split.encoding == "jpeg":  # reader processes hand batches over in /dev/shm
        readers = fit_shared_memory(source, config.prefetch, readers,
                                    default=config.readers is None,
                                    local_world=ranks.local_world, note=ranks.local_rank == 0,
                                    reserved=shm_reserved)
    pipe = build_pipeline(source, norm=norm, config=config, placement=placement,
                          threads=threads, readers=readers, ten_crop=ten_crop)
    windows = None
    if norm.per_pixel and not placement.mean_image_in_graph:
        windows = MeanWindows(norm.mean, aug.crop, hwc=placement.channels_last, ten_crop=ten_crop)
    return Loader(pipe, source, dtype=config.dtype, start_epoch=start_epoch,
                  workers=(threads, readers), prefetch=config.prefetch,
                  channels_last=placement.channels_last, mean_windows=windows)
