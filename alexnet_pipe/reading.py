"""The loader's read engine: shard bytes at memory speed, within the process's resource bounds.

    ShardFiles      one split's shards: JPEG streams as views of maps, raw images and padded
                    JPEG rows one pread each, at most `max_open` descriptors
    ReadAhead       the shard readers as threads of the pipeline's process (raw shards)
    FORK_GATE       reads pause around a fork, so no child inherits a lock held mid-read
    reader_shm, fit_shared_memory
                    the /dev/shm that reader processes (JPEG shards) need, and the fallback
    HeapTrim        the C heap's free pages given back once an epoch

The shard format itself (names, attributes, manifest) is preprocessing/shards.py's: this module
only reads what it declares. "Readers" everywhere means the processes or threads that read
shards (`--readers`); DALI's own CPU threads are "DALI threads" (`--threads`).
"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import numpy as np

from alexnet_base import resources
from alexnet_base.errors import UserError, os_error
from preprocessing import shards

# --- shard files ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardIndex:
    """What a reader needs of one shard, read once with h5py: no image is read here."""
    path: str
    encoding: str
    size: int
    labels: np.ndarray              # (N,) int32
    data_offset: int | None         # file offset of the images dataset; None: not contiguous
    jpeg_offsets: np.ndarray | None  # (N + 1,) int64 (jpeg)


def index_shard(path: str) -> ShardIndex:
    with shards.open_shard(path) as f:
        ds = f[shards.IMAGES]
        jpeg = f.attrs["encoding"] == "jpeg"
        return ShardIndex(path=str(path), encoding=str(f.attrs["encoding"]),
                          size=int(f.attrs["size"]), labels=f[shards.LABELS][...].astype(np.int32),
                          data_offset=ds.id.get_offset(),
                          jpeg_offsets=f[shards.OFFSETS][...] if jpeg else None)


class ShardFiles:
    """Images of a split's shards, read at their place in the file (h5py only for a dataset
    that is not contiguous). At most `max_open` descriptors, least recently used closed first,
    and no h5py handle between reads.

    - `read` of JPEG streams: read-only views of the shard's images dataset, mapped once per
      shard and process with no descriptor kept: no system call per image.
    - `read(out=...)`, the batch arrays (raw images, padded JPEG rows): one pread per image into
      the caller's memory. Raw ImageNet outgrows a page cache, and a map would fault each
      image in page by page where a pread is one call.
    A map of a shard cut short after it was mapped would raise SIGBUS where its lost pages are
    touched, so every `read` of views first checks the file's size: a shard truncated under a
    running loader is the same one-line error as a short pread."""

    def __init__(self, files, max_open: int = 32):
        self.files, self.max_open = list(files), max_open
        self._index: dict[int, ShardIndex] = {}
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._maps: dict[int, np.ndarray] = {}  # shard -> its images dataset's bytes, mapped

    def index(self, s: int) -> ShardIndex:
        if s not in self._index:
            self._index[s] = index_shard(self.files[s])
        return self._index[s]

    def open_files(self) -> int:
        """Descriptors held now (between reads)."""
        return len(self._fds)

    def read(self, s: int, local, out: list | None = None) -> list[np.ndarray]:
        """Images `local` (indices within shard s): JPEG bytes (uint8) or HWC uint8 arrays.
        With `out` (writable contiguous uint8 views: (size, size, 3) for raw, exactly each
        stream's length for JPEG) the images go straight into it: one copy from the page
        cache, into memory allocated once per batch."""
        ix = self.index(s)
        if ix.data_offset is None:
            images = self._read_h5py(ix, local)
            if out is not None:
                for o, image in zip(out, images):
                    o[...] = image
            return images if out is None else out
        if ix.encoding == "jpeg" and out is None:
            data, o = self._mapped(s), ix.jpeg_offsets
            return [data[o[i]:o[i + 1]] for i in local]
        fd = self._fd(s)
        try:
            if ix.encoding == "jpeg":
                o = ix.jpeg_offsets
                starts = [ix.data_offset + int(o[i]) for i in local]
            else:
                n = ix.size * ix.size * 3
                if out is None:
                    out = [np.empty((ix.size, ix.size, 3), np.uint8) for _ in local]
                starts = [ix.data_offset + int(i) * n for i in local]
            for buf, start, i in zip(out, starts, local):
                if os.preadv(fd, [buf], start) != buf.nbytes:
                    raise OSError(0, f"short read of image {int(i)}: the file is truncated")
            return out
        except OSError as e:
            raise os_error(ix.path, e, "read the shard") from None

    def _mapped(self, s: int) -> np.ndarray:
        """The JPEG bytes of shard s (its images dataset) as a read-only uint8 array over a map
        of the file, after checking that the file still holds them."""
        ix = self._index[s]
        end = ix.data_offset + int(ix.jpeg_offsets[-1])
        try:
            size = os.stat(ix.path).st_size
            if size < end:  # cut short since it was indexed: touching the map would be SIGBUS
                raise OSError(0, f"short read: the file has {size} bytes, its images end at "
                                 f"{end}: the file is truncated")
            if s not in self._maps:
                start = ix.data_offset - ix.data_offset % mmap.ALLOCATIONGRANULARITY
                fd = os.open(ix.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                try:
                    self._maps[s] = _map_read_only(fd, start, end - start)[ix.data_offset - start:]
                finally:
                    os.close(fd)  # the map stays without it
        except OSError as e:
            raise os_error(ix.path, e, "read the shard") from None
        return self._maps[s]

    def _fd(self, s: int) -> int:
        if s in self._fds:
            self._fds.move_to_end(s)
            return self._fds[s]
        while len(self._fds) >= self.max_open:
            os.close(self._fds.popitem(last=False)[1])
        try:
            fd = os.open(self.files[s], os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise os_error(self.files[s], e, "open the shard") from None
        self._fds[s] = fd
        return fd

    @staticmethod
    def _read_h5py(ix: ShardIndex, local) -> list[np.ndarray]:
        with shards.open_shard(ix.path) as f:
            ds = f[shards.IMAGES]
            if ix.encoding == "jpeg":
                o = ix.jpeg_offsets
                return [ds[int(o[i]):int(o[i + 1])] for i in local]
            return [ds[int(i)] for i in local]

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])
        self._maps.clear()  # each map ends with the last view of it still held elsewhere

    def __del__(self):  # a reader thread's files end with it (ReadAhead)
        self.close()


@cache
def _libc() -> ctypes.CDLL:
    """The C library with mmap and munmap's signatures, set up once per process."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_int64]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def _map_read_only(fd: int, offset: int, length: int) -> np.ndarray:
    """`length` bytes of file `fd` from `offset` (a multiple of the page size) as a read-only
    uint8 array over a shared map, unmapped once no view of it is left. It holds no descriptor:
    Python's own mmap keeps a duplicate of the file's descriptor for the map's life (until
    3.13's trackfd=False), which at one map per shard would spend the open-file limit."""
    if length == 0:  # mmap refuses a length of 0
        return np.zeros(0, np.uint8)
    libc = _libc()
    addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
    if addr in (None, ctypes.c_void_p(-1).value):  # MAP_FAILED
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    pages = (ctypes.c_ubyte * length).from_address(addr)
    # unmapped after the last view, not before; not at interpreter exit, where a view may live on
    weakref.finalize(pages, libc.munmap, addr, length).atexit = False
    return np.frombuffer(memoryview(pages).toreadonly(), np.uint8)  # no view can be made writable


# --- reader threads ------------------------------------------------------------------------------


class _ForkGate:
    """Reads of every ReadAhead in this process pause around a fork: the fork waits until no
    read is running and none starts until it is done. A fork in the middle of a read would copy
    into the child whatever lock the read held (h5py's, malloc's) with no thread left to
    release it, and a forked child that then opened a shard would wait forever."""

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


FORK_GATE = _ForkGate()


class _Call(NamedTuple):  # what a reader thread tells the source: DALI's batch_info, ahead
    epoch_idx: int
    iteration: int


class ReadAhead:
    """The callback of a raw pipeline's external source (not parallel: DALI calls it in its own
    process): each batch read by one of `readers` threads, up to `depth` batches ahead of what
    DALI asks for, and handed over as it is (no copy).

    Threads, not processes, for raw shards: a raw image's pread is kernel time with the GIL
    released, and a reader process would copy every image twice more (into /dev/shm and out).
    JPEG shards keep processes: there per-image Python work holds the GIL. Each thread calls
    its own copy of `source` (a source.BatchSource) with a reader of its own, with its own open
    files (at most max_open_files / readers each), so no descriptor is closed under another
    thread's read."""

    def __init__(self, source, readers: int, depth: int):
        self.source, self.depth = source, max(depth, readers)
        self._budget = max(2, source.reader.max_open_files // readers)
        self._pool = ThreadPoolExecutor(readers, thread_name_prefix="shard-reader")
        self._local = threading.local()
        self._pending = {}  # (DALI epoch, iteration) -> the Future of its batch

    def _read(self, call: _Call) -> tuple:
        mine = getattr(self._local, "source", None)
        if mine is None:
            mine = self._local.source = self.source.with_reader(self._budget)
        with FORK_GATE:
            return mine(call)

    def __call__(self, info):
        key = (info.epoch_idx, info.iteration)
        self._pending = {k: f for k, f in self._pending.items() if k >= key}  # after a reset
        for k in range(info.iteration, info.iteration + self.depth):
            if (info.epoch_idx, k) not in self._pending:
                if self.source.plan.position(info.epoch_idx, k) is None:  # the stream's end
                    break
                self._pending[info.epoch_idx, k] = self._pool.submit(
                    self._read, _Call(info.epoch_idx, k))
        future = self._pending.pop(key, None)
        if future is None:
            raise StopIteration
        return future.result()


def queue_depth(prefetch: int, readers: int) -> int:
    """DALI iterations the readers keep in flight: two per reader, so each has its next read
    queued when it ends one (DALI hands a reader process its next read only when the pipeline
    takes an iteration's batch; with one per reader a reader idles until then)."""
    return max(prefetch, 2 * readers)


# --- shared memory of reader processes -------------------------------------------------------------


def reader_shm(source, prefetch: int, readers: int) -> int:
    """Bytes of /dev/shm the reader processes of one pipeline hold: DALI keeps prefetch +
    queue-depth buffers (shared by its processes) of one iteration's batch (`plan.dali_batches` of
    ours), each the size of the largest so far plus 1 MiB, doubled when one does not fit. Raw
    batches are exact. A packed JPEG batch is one row per image as long as the batch's longest
    stream: taken at four times the split's mean file bytes per image, at most a raw image's
    bytes a row; a list of streams at twice the mean."""
    split, images = source.split, source.plan.batch_size * source.plan.dali_batches  # a DALI batch
    if split.encoding == "raw":
        batch = images * split.size * split.size * 3
    else:
        per = (min(4 * split.bytes_per_image, split.size ** 2 * 3) if source.packed
               else 2 * split.bytes_per_image)
        batch = images * per
    return int((prefetch + queue_depth(prefetch, readers)) * (batch + 2**20))


def fit_shared_memory(source, prefetch: int, readers: int, *, default: bool, local_world: int,
                      note: bool, reserved: int = 0) -> int:
    """`readers` processes, if their batches fit in /dev/shm (all `local_world` ranks of this
    machine together; Docker's default is 64 MiB): where they do not, DALI's reader processes
    die of SIGBUS mid-batch. Then `default` readers fall back to reading in the pipeline's
    process, with a note (`note`: one rank per machine says it); readers the user chose are
    refused in one line. `reserved`: bytes that pipelines built before this one will fill."""
    each = reader_shm(source, prefetch, readers) + reserved
    need, free = local_world * each, resources.shm_free()
    if free is None or need <= free:
        return readers
    procs = "1 reader process needs" if readers == 1 else f"{readers} reader processes need"
    ranks = f" ({each / 2**20:.0f} MiB x {local_world} local ranks)" if local_world > 1 else ""
    what = (f"{resources.SHM_DIR}: {free / 2**20:.0f} MiB free, but {procs} about "
            f"{need / 2**20:.0f} MiB{ranks} for DALI batches of "
            f"{source.plan.batch_size * source.plan.dali_batches} images")
    room = f"give it more room (docker run --shm-size={-(-need // 2**30)}g)"
    if default:
        if note:
            print(f"note: {what}: reading in this process instead; {room} for reader "
                  f"processes", file=sys.stderr, flush=True)
        return 0
    raise UserError(f"--readers {readers}: {what}; use --readers 0 (reads in this process, "
                    f"no shared memory), a smaller --batch-size or --dali-batches, or {room}")


# --- the C heap ----------------------------------------------------------------------------------


class HeapTrim:
    """Gives the C heap's free pages back (resources.release_free_heap) at the first epoch end
    after `after` batches: every epoch at ImageNet's size. On the CPU, DALI's decoders and the
    iterator's per-batch tensors leave freed memory fragmented in glibc's arenas, and the
    loader's memory creeps up over tens of epochs without it; a trim costs tens of ms (freed
    pages are faulted in again), which each epoch of a tiny set would feel."""

    after = 500  # batches; tools/bench_memory.py sets it to measure the policy

    def __init__(self):
        self._since = 0

    def epoch_done(self, batches: int) -> None:
        self._since += batches
        if self._since >= self.after:
            resources.release_free_heap()
            self._since = 0
