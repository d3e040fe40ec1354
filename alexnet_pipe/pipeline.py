"""The DALI train and validation pipelines, and the PyTorch-facing loader around them.

    HDF5 shards --(BatchSource, external_source: each JPEG stream a view of its mapped shard,
                   each raw image or padded JPEG row one pread at its offset; in this process
                   (--workers 0, the CPU's default), reader processes (JPEG, parallel) or reader
                   threads (raw, ReadAhead))
      --> JPEG bytes (feeding nvJPEG: one zero-padded (B, longest) array, each stream cut
          back out here) --decoders.image (mixed: nvJPEG on the GPU; cpu otherwise)--> HWC uint8
      or raw HWC uint8 --.gpu()-->
      --> on GPUs, minus the 256x256 mean image (mean="pixel", the paper), before the crop, so
          the crop cuts the same window of image and mean
      --> crop_mirror_normalize: crop window and mirror per sample, and mean_i = mean - offset_i,
          which folds the PCA lighting offset into the normalisation at no cost
      --> (B, 3, crop, crop) NCHW float (HWC underneath on GPUs: channels_last), or
          (B, 10, 3, crop, crop) with ten_crop
      --> on the CPU, the Loader subtracts each crop's window of the mean image (MeanWindows):
          torch's vectorised subtraction costs a third of DALI's CPU arithmetic

Train and val share one graph builder; val uses the centre crop, no flip, no lighting, and pads
its last batch (the `valid` output masks the padding).
"""
from __future__ import annotations

import copy
import os
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from alexnet_base import resources
from alexnet_base.config import LoaderConfig
from alexnet_base.errors import UserError
from alexnet_pipe import augment
from alexnet_pipe.reader import BatchSource
from preprocessing.shards import load_split, load_stats

def _dali_modules():
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as e:
        raise UserError(f"NVIDIA DALI is not installed ({e}); pip install nvidia-dali-cuda130")
    return fn, pipeline_def, types


def _start_method(gpu: bool) -> str:
    """DALI refuses to fork its reader workers once the CUDA driver is initialised (any torch.cuda
    call does it, even in a CPU pipeline's process); spawn costs about a second per worker."""
    return "spawn" if gpu else resources.start_method()


def build_pipeline(source: BatchSource, *, stats, config: LoaderConfig, gpu: bool,
                   device_id: int | None, ten_crop: bool = False, channels_last: bool = False,
                   shm_reserved: int = 0):
    """The DALI graph for `source` (train or val): (an unbuilt Pipeline, (DALI threads,
    readers)). Readers are threads of this process for raw shards (ReadAhead), processes for
    JPEG shards; 0: read in this process when DALI asks. channels_last: images come out HWC,
    which the Loader hands on as an NCHW view in channels_last memory (what the GPU model
    takes) instead of CHW that would be copied into it every step. shm_reserved: bytes of
    /dev/shm that pipelines built before this one will fill once they run (Loader.shm),
    counted against the free space along with this one's."""
    layout = "HWC" if channels_last else "CHW"
    fn, pipeline_def, types = _dali_modules()
    aug, split = config.augment, source.split
    mean, std = augment.mean_terms(stats, aug)
    threads, readers = config.readers(gpu)
    callback, workers = source, 0  # workers: reader processes
    if split.encoding == "raw" and readers:
        callback = ReadAhead(source, readers, queue_depth(config.prefetch, readers))
    elif readers:
        workers = readers = _fit_shared_memory(source, config.prefetch, readers,
                                               config.workers is None, shm_reserved)
    dev = "gpu" if gpu else "cpu"
    # float16 is cast here, unless the Loader subtracts the mean image first (in float32)
    fp16_here = config.dtype == "float16" and mean_in_graph(aug, gpu)
    out_type = types.FLOAT16 if fp16_here else types.FLOAT

    def normalize(images, x, y, mirror, norm_mean):
        # (in - mean_i) / std with mean_i = mean - offset_i: + lighting, - channel mean, HWC->CHW
        out = fn.crop_mirror_normalize(images, crop=(aug.crop, aug.crop), crop_pos_x=x,
                                       crop_pos_y=y, mirror=mirror, mean=norm_mean,
                                       std=[float(s) for s in std], dtype=types.FLOAT,
                                       output_layout=layout, device=dev)
        return fn.cast(out, dtype=out_type) if out_type != types.FLOAT else out

    if workers:
        feed = dict(parallel=True, prefetch_queue_depth=queue_depth(config.prefetch, workers))
    elif split.encoding == "jpeg" and not source.packed:
        # called in this process when DALI asks, returning views of the mapped shards (read):
        # DALI copies each stream. Without the copy, DALI's threads would free each of the
        # batch's streams under the GIL that this thread holds while it reads (a thread of
        # DALI's waited on it ~5% of the time), and would touch the mapped file themselves.
        feed = dict(parallel=False, no_copy=False)
    else:  # called in this process when DALI asks; no copy: each call returns fresh arrays
        feed = dict(parallel=False, no_copy=True)

    @pipeline_def(batch_size=config.batch_size, num_threads=threads, device_id=device_id,
                  seed=config.seed, py_num_workers=workers,
                  py_start_method=_start_method(gpu),
                  prefetch_queue_depth=config.prefetch)
    def pipe():
        jpeg = split.encoding == "jpeg"
        images, x, y, mirror, norm_mean, meta = fn.external_source(
            source=callback, num_outputs=6, batch=True, batch_info=True, **feed,
            dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32, types.FLOAT, types.INT64],
            ndim=[1 if jpeg else 3, 0, 0, 0, 1, 1],
            layout=["" if jpeg else "HWC", "", "", "", "", ""])
        if jpeg and source.packed:  # each stream cut out of its padded row (read_batch)
            images = images[0:meta[3]]
        if jpeg:
            hw = {"hw_decoder_load": config.hw_decoder_load} if gpu else {}
            images = fn.decoders.image(images, device="mixed" if gpu else "cpu",
                                       output_type=types.RGB, **hw)
        elif gpu:
            images = images.gpu()
        if aug.mean == "pixel" and gpu:  # the paper's mean image, subtracted before the crop:
            # the crop then cuts the same window of both (one op; the CPU's is MeanWindows)
            mean_image = fn.constant(fdata=np.asarray(mean, np.float32).ravel().tolist(),
                                     shape=list(np.shape(mean)), layout="HWC", dtype=types.FLOAT,
                                     device=dev)
            images = images - mean_image  # uint8 - float32 -> float32, HWC
        if not ten_crop:
            out = normalize(images, x, y, mirror, norm_mean)
        else:
            span = max(split.size - aug.crop, 1)
            crops = [normalize(images, float(cx / span), float(cy / span), int(flip), norm_mean)
                     for cx, cy, flip in augment.ten_crop_positions(split.size, aug.crop)]
            out = fn.stack(*crops, axis=0)
        if gpu:  # labels and mask arrive on the device with the images: no pageable copy
            meta = meta.gpu()
        return out, meta  # meta: (label, valid, index, stored bytes, x, y, mirror) per sample

    return pipe(), (threads, readers)


def mean_in_graph(aug, gpu: bool) -> bool:
    """Whether the DALI graph subtracts all of the mean: the channel mean always, the mean image
    on GPUs; on the CPU the Loader subtracts the mean image (MeanWindows)."""
    return aug.mean != "pixel" or gpu


class MeanWindows:
    """The paper's mean image subtracted from a CPU batch after DALI: from each image, the
    window of the mean that its crop cut (mirrored with it), one in-place torch subtraction per
    image; ten crops subtract their ten fixed windows in one broadcast.

    Why not in the graph, as on GPUs: DALI's CPU arithmetic costs about 0.9 ns an element, some
    180 us of CPU per 256x256 image, as much as the crop, mirror and normalise together;
    torch's vectorised subtraction of a 224x224 window costs about 50 us (BENCHMARKS.md).
    Outputs differ from the graph's by float32 rounding only: (x - mean_i) - window instead of
    (x - mean) - mean_i, with std 1."""

    def __init__(self, mean: np.ndarray, crop: int, *, hwc: bool, ten_crop: bool):
        import torch
        m = torch.as_tensor(np.asarray(mean, np.float32))  # (size, size, 3)
        m = m if hwc else m.permute(2, 0, 1)
        width = -2 if hwc else -1
        self._means = (m.contiguous(), m.flip(width).contiguous())  # as is, mirrored
        self._span, self._crop, self._hwc = m.shape[width] - crop, crop, hwc
        self._ten = None
        if ten_crop:
            self._ten = torch.stack([self.window(x, y, f) for x, y, f in
                                     augment.ten_crop_positions(m.shape[width], crop)])

    def window(self, x: int, y: int, mirror: bool):
        """The mean under the crop at (x, y), mirrored if `mirror`: a view, (c, c, 3) or
        (3, c, c). Mirrored, output column j is column x + c - 1 - j: column span - x + j of the
        mirrored mean."""
        src, c = self._means[int(mirror)], self._crop
        x = self._span - x if mirror else x
        return src[y:y + c, x:x + c] if self._hwc else src[:, y:y + c, x:x + c]

    def subtract(self, images, meta) -> None:
        """In place: images (B, ...) as DALI gives them; meta the batch's (B, 7) int64. On one
        torch thread: split over torch's pool, whose threads wait on cores DALI's threads keep
        busy, the same work cost 350 us of CPU an image instead of about 50."""
        import torch
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if self._ten is not None:
                images.sub_(self._ten)
                return
            # meta is a CPU tensor: MeanWindows serves CPU loaders only (a GPU's graph
            # subtracts the mean image itself), so this list is no device sync
            for image, (x, y, mirror) in zip(images, meta[:, 4:7].tolist()):
                image.sub_(self.window(x, y, mirror))
        finally:
            torch.set_num_threads(threads)


class _ForkGate:
    """Reads of every ReadAhead in this process pause around a fork: the fork waits until no
    read is running and none starts until it is done. A fork in the middle of a read would copy
    into the child whatever lock the read held (h5py's, opening a shard's index; malloc's) with
    no thread left to release it: a forked child that then opens a shard waits forever (the
    suspect, not confirmed, in one hang of a multiprocessing pool started after a raw loader)."""

    def __init__(self):
        self._reinit()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(before=self._close, after_in_parent=self._open,
                                after_in_child=self._reinit)

    def _reinit(self):  # also the child's: its copy of the state has no reader threads
        self._cond, self._reads, self._forking = threading.Condition(), 0, False

    def __enter__(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._forking)
            self._reads += 1

    def __exit__(self, *exc):
        with self._cond:
            self._reads -= 1
            self._cond.notify_all()

    def _close(self):
        with self._cond:
            self._forking = True
            self._cond.wait_for(lambda: self._reads == 0)

    def _open(self):
        with self._cond:
            self._forking = False
            self._cond.notify_all()


_FORK_GATE = _ForkGate()


class _Call(NamedTuple):  # what a reader thread tells the source: DALI's batch_info, ahead
    epoch_idx: int
    iteration: int


class ReadAhead:
    """The callback of a raw pipeline's external source (not parallel: DALI calls it in its own
    process): each batch read by one of `threads` threads of this process, up to `depth`
    batches ahead of what DALI asks for, and handed over as it is (no copy).

    Raw images are read in threads, not processes: a 196 KB pread is kernel time with the GIL
    released, and a reader process's batch costs two more copies of every image (into
    /dev/shm and out again) that threads do not make, nor any /dev/shm. Reader-only on 2
    cores, 2 readers: 1.42x the processes' rate, 3.37x format 1's (BENCHMARKS.md). JPEG stays
    with processes: there per-image Python work holds the GIL, and 2 threads read no faster
    than 1. Each thread calls its own copy of the source, with its own open files (at most
    max_open_files / threads each), so no descriptor is closed under another thread's read."""

    def __init__(self, source: BatchSource, threads: int, depth: int):
        self.source, self.depth = source, max(depth, threads)
        self._each = copy.copy(source)  # no open files (BatchSource.__getstate__)
        self._each.max_open_files = max(2, source.max_open_files // threads)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="shard-reader")
        self._local = threading.local()
        self._pending = {}  # (DALI epoch, iteration) -> the Future of its batch

    def _read(self, call: _Call) -> tuple:
        mine = getattr(self._local, "source", None)
        if mine is None:
            mine = self._local.source = copy.copy(self._each)
        with _FORK_GATE:
            return mine(call)

    def __call__(self, info):
        key = (info.epoch_idx, info.iteration)
        self._pending = {k: f for k, f in self._pending.items() if k >= key}  # after a reset
        for k in range(info.iteration, info.iteration + self.depth):
            if (info.epoch_idx, k) not in self._pending:
                if self.source.position(info.epoch_idx, k) is None:  # the stream's end
                    break
                self._pending[info.epoch_idx, k] = self._pool.submit(
                    self._read, _Call(info.epoch_idx, k))
        future = self._pending.pop(key, None)
        if future is None:
            raise StopIteration
        return future.result()


def queue_depth(prefetch: int, workers: int) -> int:
    """Batches the reader processes keep in flight: two per worker, so each has its next read
    queued when it ends one (DALI hands out reads only when the pipeline takes a batch; with
    one per worker a worker idles until then: 10-15% of the reader-only rate on 2 cores)."""
    return max(prefetch, 2 * workers)


def reader_shm(source: BatchSource, prefetch: int, workers: int) -> int:
    """Bytes of shared memory the reader processes of one pipeline hold: DALI keeps prefetch +
    queue-depth batch buffers (shared by its workers), each the size of the largest batch so
    far plus 1 MiB, doubled when a batch does not fit. Raw batches are exact. A packed JPEG
    batch is one row per image as long as the batch's longest stream: taken at four times the
    mean image of the split's files, at most a raw image's bytes a row; a list of streams at
    twice the mean."""
    split = source.split
    if split.encoding == "raw":
        batch = source.batch_size * split.size * split.size * 3
    else:
        per = min(4 * split.bytes_per_image, split.size ** 2 * 3) if source.packed else \
            2 * split.bytes_per_image
        batch = source.batch_size * per
    return int((prefetch + queue_depth(prefetch, workers)) * (batch + 2**20))


def _fit_shared_memory(source: BatchSource, prefetch: int, workers: int, default: bool,
                       reserved: int = 0) -> int:
    """`workers`, if their batches fit in /dev/shm (all local ranks together; Docker's default
    is 64 MiB): when they do not, DALI's workers die of SIGBUS mid-batch and the loader fails
    with "Worker data receiving interrupted". Then the `default` workers fall back to reading
    in this process, with a note; a --workers the user chose is refused in one line."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    each = reader_shm(source, prefetch, workers) + reserved
    need, free = local * each, resources.shm_free()
    if free is None or need <= free:
        return workers
    procs = "1 reader process needs" if workers == 1 else f"{workers} reader processes need"
    ranks = f" ({each / 2**20:.0f} MiB x {local} local ranks)" if local > 1 else ""
    what = (f"{resources.SHM_DIR}: {free / 2**20:.0f} MiB free, but {procs} about "
            f"{need / 2**20:.0f} MiB{ranks} for batches of {source.batch_size} images")
    room = f"give it more room (docker run --shm-size={-(-need // 2**30)}g)"
    if default:
        if os.environ.get("LOCAL_RANK", "0") == "0":  # one note per machine
            print(f"note: {what}: reading in this process instead; {room} for reader "
                  f"processes", file=sys.stderr, flush=True)
        return 0
    raise UserError(f"--workers {workers}: {what}; use --workers 0 (reads in this process, "
                    f"no shared memory), a smaller --batch-size, or {room}")


# The loader gives the C heap's free pages back at the first epoch end after this many batches:
# every epoch at ImageNet's size (1,250-10,000 batches per process). A trim costs ~50 ms here
# (freed pages are faulted in again), which each epoch of a tiny set would feel.
TRIM_AFTER_BATCHES = 500


class Batch(NamedTuple):
    """One batch as torch tensors.

    images: (B, 3, H, W) or (B, 10, 3, H, W) on the pipeline's device, in `dtype`;
    labels: (B,) int64; valid: (B,) bool (False only for val padding);
    index: (B,) int64, the global sample index (shards in manifest order, then position in the
    shard): which image each row is. labels, valid and index live on the images' device.
    """
    images: object
    labels: object
    valid: object
    index: object


class Loader:
    """Iterates `Batch`es, one epoch a `for` loop. The source streams `source.epochs` epochs
    through one DALI epoch: the loader hands out each epoch's batches by count, so the readers
    run on into the next epoch while this one's last batches are trained on."""

    def __init__(self, pipe, source: BatchSource, *, dtype: str, start_epoch: int,
                 readers: tuple[int, int], prefetch: int = 2, channels_last: bool = False,
                 mean_windows: MeanWindows | None = None):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
        self.source = source
        self.readers = readers  # (DALI threads, reader threads (raw) or processes (JPEG))
        # bytes of /dev/shm its reader processes fill once running (none when reading in-process)
        self.shm = reader_shm(source, prefetch, pipe.py_num_workers) if pipe.py_num_workers else 0
        self.epoch = start_epoch
        self._dtype = dtype
        self._prefetch = prefetch
        self._channels_last = channels_last
        self._mean_windows = mean_windows  # the CPU's pixel mean, subtracted here
        # reset by hand at the start of the next stream: nothing is read past the last one
        with warnings.catch_warnings():  # ten crops leave the crop draws unused, by design
            warnings.filterwarnings("ignore", message="The external source node .* not used")
            self._iter = DALIGenericIterator([pipe], ["images", "meta"], auto_reset=False)
        self._ended = False  # the stream's end was taken from DALI: reset before reading on
        self._since_trim = 0  # batches handed out since the C heap was last trimmed

    def __len__(self) -> int:
        return self.source.num_batches() - self.source.skipped(self.epoch)

    def __iter__(self):
        import torch
        # DALI has no bfloat16: cast on the device; float16 too after the mean windows
        cast = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(self._dtype)
        last = (self.epoch - self.source.start_epoch + 1) % self.source.epochs == 0
        if self._ended:
            self._iter.reset()
            self._ended = False
        done, total = 0, len(self)
        try:
            while done < total:
                d = self._next()[0]
                images, meta = d["images"], d["meta"]
                if self._mean_windows is not None:
                    self._mean_windows.subtract(images, meta)
                if self._channels_last:  # (..., H, W, C) -> an (..., C, H, W) view, no copy
                    images = images.movedim(-1, -3)
                images = images.to(cast) if cast is not None else images
                done += 1
                yield Batch(images, meta[:, 0], meta[:, 1].bool(), meta[:, 2])
            if last:  # the stream's end: DALI's StopIteration is due now
                if next(self._iter, None) is not None:
                    raise AssertionError("the reader ran past the end of its stream")
                self._ended = True
        except RuntimeError as e:  # DALI's errors name no file: find the image that failed
            raise self._explain(e, done) from None
        self.epoch += 1
        self._since_trim += done
        if self._since_trim >= TRIM_AFTER_BATCHES:  # else the CPU path's memory creeps up
            resources.release_free_heap()
            self._since_trim = 0

    def _next(self):
        try:
            return next(self._iter)
        except StopIteration:  # never inside a stream: every epoch has num_batches()
            raise AssertionError(f"the reader ended early in epoch {self.epoch}") from None

    def _explain(self, error: RuntimeError, done: int) -> Exception:
        """A UserError naming the shard and key of an undecodable image in the batches that
        were in flight, or `error` itself when none is found."""
        src = self.source
        first = src.skipped(self.epoch) + done
        for batch in range(first, min(first + self._prefetch + 2, src.num_batches())):
            found = src.undecodable(self.epoch, batch)
            if found is not None:
                file, key, reason = found
                return UserError(f"{file}: image {key} cannot be decoded ({reason}); the shard "
                                 f"is damaged: prepare it again from the original images")
        return error


def make_loader(config: LoaderConfig, *, split: str = "train", train: bool | None = None,
                rank: int = 0, world: int = 1, start_epoch: int = 0, start_batch: int = 0,
                epochs: int = 1, ten_crop: bool = False, device=None, info=None, stats=None,
                channels_last: bool | None = None, shm_reserved: int = 0,
                packed: bool | None = None) -> Loader:
    """A train (random crop, flip, lighting) or val (centre crop or ten crops) loader delivering
    to `device` (a torch.device; default: --device for this process). `epochs`: how many
    epochs from `start_epoch` the readers stream without a drain between them (train: the rest
    of the run; a loader may be iterated on past them, one more stream at a time). `info`
    (the split's SplitInfo) and `stats` may be passed when the caller has read them.
    shm_reserved: the `shm` of loaders built before this one that have not run yet. packed:
    JPEG batches as one padded array (BatchSource.read_batch); default: when nvJPEG decodes."""
    from alexnet_pipe import distributed
    config.validate()
    train = (split == "train") if train is None else train
    info = load_split(config.data, split) if info is None else info
    stats = load_stats(config.data, info) if stats is None else stats
    config.augment.validate(info.size)
    device = distributed.device(config.device) if device is None else device
    gpu = device.type == "cuda"
    aug = config.augment
    basis = None
    if train and aug.lighting_std > 0:
        basis = augment.lighting_basis(stats.eigval, stats.eigvec, aug.lighting_scale)
    source = BatchSource(split=info, batch_size=config.batch_size, train=train, crop=aug.crop,
                         flip=aug.flip, lighting_std=aug.lighting_std if train else 0.0,
                         lighting_basis=basis, seed=config.seed, start_epoch=start_epoch,
                         start_batch=start_batch, epochs=epochs, rank=rank, world=world,
                         channel_mean=np.zeros(3) if aug.mean == "pixel" else stats.channel_mean,
                         packed=gpu if packed is None else packed)
    if source.num_batches() == 0:
        raise UserError(f"--batch-size {config.batch_size}: larger than this process's share of "
                        f"the {split} split ({source.share()} images); "
                        f"use a smaller batch")
    channels_last = gpu if channels_last is None else channels_last  # default: on GPUs
    pipe, readers = build_pipeline(source, stats=stats, config=config, gpu=gpu,
                                   device_id=(device.index or 0) if gpu else None,
                                   ten_crop=ten_crop, channels_last=channels_last,
                                   shm_reserved=shm_reserved)
    windows = None
    if not mean_in_graph(aug, gpu):
        windows = MeanWindows(stats.pixel_mean, aug.crop, hwc=channels_last, ten_crop=ten_crop)
    return Loader(pipe, source, dtype=config.dtype, start_epoch=start_epoch, readers=readers,
                  prefetch=config.prefetch, channels_last=channels_last, mean_windows=windows)
