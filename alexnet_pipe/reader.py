"""The DALI callback that reads the shards: which samples each rank reads in which epoch, in
which batch, with which augmentation draws. What the files are (names, manifest, statistics) is
preprocessing/shards.py's business; how their bytes are read, reading.py's; what a batch hands
the pipeline, contract.py's.

`BatchSource` is the callback of a batch-mode `fn.external_source`, parallel or not: stateless
(batch k of epoch e is a pure function of the seed, e and k), picklable, and it opens its shard
files lazily in whichever process reads, since open files neither pickle nor survive a fork. The
random draws come from here too, not from DALI's generators: a run resumed at epoch e sees
exactly the batches and augmentations of an uninterrupted run, whatever DALI's own epoch counter
says.
"""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field

import numpy as np

from alexnet_base.errors import UserError
from alexnet_pipe import augment
from alexnet_pipe.contract import META, SourceBatch
from alexnet_pipe.reading import ShardFiles
from preprocessing import shards
from preprocessing.shards import SplitInfo


def epoch_samples(total: int, *, train: bool, seed: int, epoch: int, rank: int,
                  world: int) -> np.ndarray:
    """Global sample indices that `rank` reads in `epoch`, in reading order.

    train: a fresh seeded permutation of all samples every epoch, cut into `world` equal
           disjoint shares (the remainder, < world samples, sits out this epoch).
    val:   the samples in order, cut into `world` contiguous shares of nearly equal size;
           together exactly the whole split.
    """
    if train:
        order = np.random.default_rng([seed, epoch]).permutation(total)
        share = total // world
        return order[rank * share:(rank + 1) * share]
    return np.array_split(np.arange(total), world)[rank]


def share(total: int, *, train: bool, rank: int, world: int) -> int:
    """How many samples `rank` reads each epoch: len(epoch_samples(...)) for any epoch."""
    if train:
        return total // world
    return total // world + (rank < total % world)


def batches_per_epoch(total: int, batch_size: int, *, train: bool, rank: int, world: int) -> int:
    """The same every epoch: train drops the remainder of a share, val pads its last batch."""
    n = share(total, train=train, rank=rank, world=world)
    return n // batch_size if train else -(-n // batch_size)


def damaged_image(file: str, key: str, reason: str) -> UserError:
    """What the loader says of an image it cannot decode: the file, the key, and the repair."""
    return UserError(f"{file}: image {key} cannot be decoded ({reason}); the shard is damaged: "
                     f"`alexnet-pipe verify` lists every damaged file, and the same prepare "
                     f"command rewrites them; the last checkpoint is intact (--resume)")


_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers (not DHT, JPG, DAC)


def jpeg_header_problem(stream) -> str | None:
    """Why the markers of a JPEG stream (bytes-like) do not parse up to its scan data, or None.

    The chain of ISO/IEC 10918-1 (Annex B): start of image, then marker segments (0xFF, fill
    0xFFs, a code; a big-endian length that counts itself, except for standalone codes), a frame
    header, and the start of scan, the last two holding the 1-4 components they count. Tables
    and the scan's entropy-coded bytes are not looked at: libjpeg's errors there reach DALI's
    decoder and come back as its ordinary error.

    The reader checks this where the shards were not verified: DALI 2.4's decoder crashes the
    process (a use after free in its thread pool) when its JPEG parser rejects a stream while
    other streams of the batch are still queued, so such a stream must never reach it
    (tools/fuzz_jpeg_check.py looks for streams that pass and still crash it)."""
    data = memoryview(stream).cast("B")
    n, pos, frame = len(data), 2, False
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return "no JPEG start-of-image marker"
    while True:
        if pos >= n or data[pos] != 0xFF:
            return f"invalid marker at byte {pos}" if pos < n else "it ends inside its headers"
        while pos < n and data[pos] == 0xFF:  # fill bytes before the code
            pos += 1
        if pos >= n:
            return "it ends inside its headers"
        code, pos = data[pos], pos + 1
        if code == 0x01 or 0xD0 <= code <= 0xD7:  # standalone: TEM, RSTn
            continue
        if code in (0x00, 0xD8, 0xD9):
            return f"invalid marker at byte {pos - 2}"
        if pos + 2 > n:
            return "it ends inside its headers"
        length = data[pos] << 8 | data[pos + 1]
        if length < 2:  # it counts its own two bytes
            return f"the segment at byte {pos - 2} has length {length}"
        if pos + length > n:
            return f"the segment at byte {pos - 2} runs past the end of the stream"
        if code in _SOF or code == 0xDA:  # what the parser reads inside: the components
            # (frame: precision, height, width, count, 3 bytes each; scan: count, 2 bytes each,
            # then 3 bytes of spectral selection and approximation)
            count_at, size, fixed = (pos + 7, 3, 8) if code in _SOF else (pos + 2, 2, 6)
            count = data[count_at] if count_at < n else 0
            if not 1 <= count <= 4 or length != fixed + size * count:
                return (f"the {'frame' if code in _SOF else 'scan'} header at byte {pos - 2} "
                        f"does not hold its {count} components")
        if code == 0xDA:
            return None if frame else "no frame header before the scan"
        frame |= code in _SOF
        pos += length


def _die_with_parent(parent: int) -> None:
    """In a reader worker: end when the process that owns the pipeline ends, however it ends.
    DALI's workers otherwise outlive a SIGKILLed trainer, holding memory and its pipes."""
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


@dataclass
class BatchSource:
    """`fn.external_source(source=..., batch=True, batch_info=True)` callback, run by DALI's
    reader processes (parallel=True, JPEG shards), by reader threads (reading.ReadAhead, raw
    shards) or in the pipeline's own thread (0 readers). Returns a contract.SourceBatch per
    batch: raw images as one array; JPEG as a list of streams, or `packed` as one zero-padded
    array (read_batch). Batches are always full: the train remainder is dropped, the last val
    batch is padded with its last sample and valid=0.
    """
    split: SplitInfo
    batch_size: int
    train: bool
    crop: int
    flip: bool = True
    lighting_std: float = 0.0
    lighting_basis: np.ndarray | None = None
    seed: int = 0
    start_epoch: int = 0   # the epoch of DALI's epoch_idx 0: resume counts from the checkpoint
    start_batch: int = 0   # batches of start_epoch already done (resume after an interrupt)
    epochs: int = 1        # epochs one DALI epoch streams through: no drain at their boundaries
    rank: int = 0
    world: int = 1
    channel_mean: np.ndarray = field(default_factory=lambda: np.zeros(3))  # 0 for the pixel mean
    max_open_files: int = 32  # shard files a reader process (or all reader threads) keeps open
    packed: bool = False   # JPEG batches as one padded array: for a GPU decoder (read_batch)
    group: int = 1         # batches per call, one after another: one DALI iteration prepares
    #                        them all (LoaderConfig.dali_batches); at most an epoch's, and never
    #                        across an epoch's end
    check_jpeg: bool = False  # each JPEG stream's markers checked before DALI sees it
    #                           (jpeg_header_problem): where the shards were not verified

    def __post_init__(self):
        self._parent = os.getpid()  # the process that owns the pipeline
        self._armed = False         # set in a worker once it dies with its parent
        self._shard_starts = np.concatenate([[0], np.cumsum(self.split.counts)])
        self._files = None      # reading.ShardFiles, opened lazily in each process
        self._epoch = (None, None)  # (epoch, samples): one permutation per epoch, not per batch
        if not self.train:  # val pads its one batch: beyond the share, padding is all it adds
            self.batch_size = max(1, min(self.batch_size, self.share()))
        self.group = max(1, min(self.group, self.num_batches()))  # more would be memory idle

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = None  # open descriptors stay behind: each worker opens its own
        return state

    def share(self) -> int:
        return share(self.split.total, train=self.train, rank=self.rank, world=self.world)

    def num_batches(self) -> int:
        return batches_per_epoch(self.split.total, self.batch_size, train=self.train,
                                 rank=self.rank, world=self.world)

    def samples(self, epoch: int) -> np.ndarray:
        if self._epoch[0] != epoch:
            self._epoch = (epoch, epoch_samples(self.split.total, train=self.train, seed=self.seed,
                                                epoch=epoch, rank=self.rank, world=self.world))
        return self._epoch[1]

    def params(self, epoch: int, batch: int, n: int) -> dict:
        """The augmentation draws of one batch: a pure function of (seed, epoch, rank, batch)."""
        if not self.train:
            centre = (self.split.size - self.crop) // 2
            return {"x": np.full(n, centre), "y": np.full(n, centre), "flip": np.zeros(n, bool),
                    "alpha": np.zeros((n, 3))}
        rng = np.random.default_rng([self.seed, epoch, self.rank, batch, 1])
        return augment.random_params(rng, n, size=self.split.size, crop=self.crop,
                                     flip=self.flip, lighting_std=self.lighting_std)

    def lighting_shifts(self, params: dict) -> np.ndarray:
        """(n, 3) PCA lighting offsets of a batch's draws, 0-255 scale (zeros without lighting)."""
        if self.lighting_basis is None:
            return np.zeros((len(params["alpha"]), 3))
        return augment.lighting_offsets(params["alpha"], self.lighting_basis)

    def batch_indices(self, epoch: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(global indices, valid mask) of one full batch."""
        samples = self.samples(epoch)
        idx = samples[batch * self.batch_size:(batch + 1) * self.batch_size]
        valid = np.ones(self.batch_size, np.int32)
        if len(idx) < self.batch_size:  # val only: pad with the last sample, masked out
            valid[len(idx):] = 0
            idx = np.concatenate([idx, np.full(self.batch_size - len(idx), idx[-1])])
        return idx, valid

    def _by_shard(self, indices: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(shard, batch rows, indices within the shard) for global `indices`, each shard's in
        file order (sequential reads where possible). Opens the shards lazily, per process:
        descriptors neither pickle nor survive a fork."""
        if self._files is None:
            self._files = ShardFiles(self.split.files, self.max_open_files)
        shard_of = np.searchsorted(self._shard_starts, indices, side="right") - 1
        groups = []
        for s in np.unique(shard_of):
            where = np.flatnonzero(shard_of == s)
            local = indices[where] - self._shard_starts[s]
            order = np.argsort(local, kind="stable")
            groups.append((int(s), where[order], local[order]))
        return groups

    def read(self, indices: np.ndarray) -> tuple[list | np.ndarray, np.ndarray]:
        """Images and labels of global `indices` (reading.ShardFiles): raw, one (n, size, size, 3)
        array that one pread per image fills in place; JPEG, a list of each image's bytes as
        read-only views of the mapped shards (a pipeline that keeps them copies them first)."""
        if self.split.encoding == "raw":
            return self.read_batch(indices)[:2]
        images, labels = [None] * len(indices), np.empty(len(indices), np.int32)
        for s, rows, local in self._by_shard(indices):
            for w, data in zip(rows, self._files.read(s, local)):
                images[w] = data
            labels[rows] = self._files.index(s).labels[local]
        return images, labels

    def read_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(images, labels, lengths) of global `indices`, one pread per image into one array
        allocated per batch. raw: (n, size, size, 3). JPEG: (n, longest) uint8, row i holding
        image i's `lengths[i]` bytes from its start, zeros after: what a GPU decoder is fed
        (`packed`), one buffer for DALI to hand over instead of n streams (the pipeline cuts
        each stream back out). A CPU decoder is fed the list, which costs it less there."""
        groups, n, size = self._by_shard(indices), len(indices), self.split.size
        labels = np.empty(n, np.int32)
        if self.split.encoding == "raw":
            images = np.empty((n, size, size, 3), np.uint8)
            lengths = np.full(n, size * size * 3, np.int64)
        else:
            lengths = np.empty(n, np.int64)
            for s, rows, local in groups:
                o = self._files.index(s).jpeg_offsets
                lengths[rows] = o[local + 1] - o[local]
            images = np.zeros((n, int(lengths.max(initial=0))), np.uint8)
        for s, rows, local in groups:
            out = [images[w, :lengths[w]] if images.ndim == 2 else images[w] for w in rows]
            self._files.read(s, local, out=out)
            labels[rows] = self._files.index(s).labels[local]
        return images, labels, lengths

    def _check_streams(self, indices: np.ndarray, images, lengths: np.ndarray) -> None:
        """Raises the damaged-image error for the first stream whose markers do not parse."""
        for i, index in enumerate(indices):
            row = images[i] if isinstance(images, list) else images[i, :lengths[i]]
            problem = jpeg_header_problem(row)
            if problem is not None:
                raise damaged_image(*self.locate(int(index)), problem)

    def locate(self, index: int) -> tuple[str, str]:
        """(shard file, key) of global sample `index`."""
        s = int(np.searchsorted(self._shard_starts, index, side="right") - 1)
        with shards.open_shard(self.split.files[s]) as f:
            return self.split.files[s], f[shards.KEYS][index - self._shard_starts[s]].decode()

    def undecodable(self, epoch: int, batch: int) -> tuple[str, str, str] | None:
        """(shard file, key, reason) of the first image of a batch that cannot be decoded."""
        if self.split.encoding != "jpeg":
            return None
        from preprocessing.resize import decode_jpeg
        idx, _ = self.batch_indices(epoch, batch)
        images, _ = self.read(idx)
        for i, data in zip(idx, images):
            problem = jpeg_header_problem(data)
            if problem is None:
                try:
                    decode_jpeg(data.tobytes())
                except Exception as e:  # PIL raises several types for damaged bytes
                    problem = str(e)
            if problem is not None:
                return (*self.locate(int(i)), problem)
        return None

    def skipped(self, epoch: int) -> int:
        return self.start_batch if epoch == self.start_epoch else 0

    def position(self, epoch_idx: int, iteration: int) -> tuple[int, int, int] | None:
        """(epoch, first batch, batches) of DALI's call `iteration` in its epoch `epoch_idx`, or
        None past the stream's end. One DALI epoch streams `epochs` of ours back to back (every
        epoch has the same number of batches), so DALI's prefetch runs on into the next epoch
        instead of draining at each boundary; the first stream starts at (start_epoch,
        start_batch). Each call takes `group` batches, fewer at an epoch's end."""
        per_epoch = self.num_batches()
        epoch = self.start_epoch + epoch_idx * self.epochs
        first = self.start_batch if epoch_idx == 0 else 0
        head = -(-(per_epoch - first) // self.group)  # calls of the stream's first epoch
        if iteration >= head:
            later, iteration = divmod(iteration - head, -(-per_epoch // self.group))
            epoch, first = epoch + 1 + later, 0
        if epoch >= self.start_epoch + (epoch_idx + 1) * self.epochs:
            return None
        batch = first + iteration * self.group
        return epoch, batch, min(self.group, per_epoch - batch)

    def __call__(self, info):
        if not self._armed:
            self._armed = True
            if os.getpid() != self._parent:
                _die_with_parent(self._parent)
        where = self.position(info.epoch_idx, info.iteration)
        if where is None:
            raise StopIteration  # also for every prefetched call past the end
        return self.batch(*where)

    def batch(self, epoch: int, batch: int, count: int = 1) -> SourceBatch:
        """Batches `batch` to `batch + count - 1` of `epoch`, one after another."""
        batches = range(batch, batch + count)
        idx, valid = (np.concatenate(part) for part in
                      zip(*(self.batch_indices(epoch, b) for b in batches)))
        if self.packed or self.split.encoding == "raw":
            images, labels, lengths = self.read_batch(idx)
        else:
            images, labels = self.read(idx)
            lengths = np.array([len(data) for data in images], np.int64)
        if self.check_jpeg and self.split.encoding == "jpeg":
            self._check_streams(idx, images, lengths)
        drawn = [self.params(epoch, b, self.batch_size) for b in batches]
        p = {k: np.concatenate([d[k] for d in drawn]) for k in drawn[0]}
        span = max(self.split.size - self.crop, 1)
        columns = {"label": labels, "valid": valid, "index": idx, "nbytes": lengths,
                   "x": p["x"], "y": p["y"], "mirror": p["flip"]}
        meta = np.stack([columns[name] for name in META._fields], axis=1).astype(np.int64)
        # whole arrays are batches to DALI (first axis = sample), as is a list of JPEG streams
        return SourceBatch(images=images, crop_x=(p["x"] / span).astype(np.float32),
                           crop_y=(p["y"] / span).astype(np.float32),
                           mirror=p["flip"].astype(np.int32),
                           norm_mean=(self.channel_mean - self.lighting_shifts(p)).astype(
                               np.float32), meta=meta)
