"""The DALI callback of a batch-mode `fn.external_source`: each call, one or more batches as a
contract.SourceBatch, the images read (reader.ShardReader) for the indices and draws the plan
(plan.Plan) gives, with what the draws mean for the graph (crop positions, mirror, the
per-sample mean carrying the PCA lighting).

`BatchSource` runs in DALI's reader processes (parallel=True, JPEG shards), in reader threads
(reading.ReadAhead, raw shards) or in the pipeline's own thread (0 readers): stateless between
calls and picklable. Batches are always full: the train remainder is dropped, the last val batch
is padded with its last sample and valid=0.
"""
from __future__ import annotations

import copy
import os
import signal
import sys
from dataclasses import dataclass, field

import numpy as np

from alexnet_pipe import augment, jpeg
from alexnet_pipe.contract import META, SourceBatch
from alexnet_pipe.plan import Plan
from alexnet_pipe.reader import ShardReader


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
    plan: Plan
    reader: ShardReader
    lighting_basis: np.ndarray | None = None  # (3, 3) augment.lighting_basis; None: no lighting
    channel_mean: np.ndarray = field(default_factory=lambda: np.zeros(3))  # 0 for the pixel mean
    packed: bool = False   # JPEG batches as one padded array: for a GPU decoder (read_batch)
    check_jpeg: bool = False  # each JPEG stream's markers checked before DALI sees it
    #                           (jpeg.header_problem): where the shards were not verified

    def __post_init__(self):
        self._parent = os.getpid()  # the process that owns the pipeline
        self._armed = False         # set in a worker once it dies with its parent

    @property
    def split(self):
        return self.reader.split

    def with_reader(self, max_open_files: int) -> "BatchSource":
        """This source with a reader of its own (no file open yet, at most `max_open_files`):
        for a reader thread (reading.ReadAhead)."""
        clone = copy.copy(self)
        clone.reader = ShardReader(self.split, max_open_files)
        return clone

    def undecodable(self, epoch: int, batch: int) -> tuple[str, str, str] | None:
        """(shard file, key, reason) of the first image of a batch that cannot be decoded."""
        return self.reader.undecodable(self.plan.batch_indices(epoch, batch)[0])

    def __call__(self, info):
        if not self._armed:
            self._armed = True
            if os.getpid() != self._parent:
                _die_with_parent(self._parent)
        where = self.plan.position(info.epoch_idx, info.iteration)
        if where is None:
            raise StopIteration  # also for every prefetched call past the end
        return self.batch(*where)

    def batch(self, epoch: int, batch: int, count: int = 1) -> SourceBatch:
        """Batches `batch` to `batch + count - 1` of `epoch`, one after another."""
        plan, batches = self.plan, range(batch, batch + count)
        idx, valid = (np.concatenate(part) for part in
                      zip(*(plan.batch_indices(epoch, b) for b in batches)))
        if self.packed or self.split.encoding == "raw":
            images, labels, lengths = self.reader.read_batch(idx)
        else:
            images, labels = self.reader.read(idx)
            lengths = np.array([len(data) for data in images], np.int64)
        if self.check_jpeg and self.split.encoding == "jpeg":
            self._check_streams(idx, images, lengths)
        drawn = [plan.params(epoch, b, plan.batch_size) for b in batches]
        p = {k: np.concatenate([d[k] for d in drawn]) for k in drawn[0]}
        columns = {"label": labels, "valid": valid, "index": idx, "nbytes": lengths,
                   "x": p["x"], "y": p["y"], "mirror": p["flip"]}
        meta = np.stack([columns[name] for name in META._fields], axis=1).astype(np.int64)
        inputs = augment.graph_inputs(p, size=plan.size, crop=plan.augment.crop,
                                      channel_mean=self.channel_mean,
                                      lighting_basis=self.lighting_basis)
        # whole arrays are batches to DALI (first axis = sample), as is a list of JPEG streams
        return SourceBatch(images=images, **inputs, meta=meta)

    def _check_streams(self, indices: np.ndarray, images, lengths: np.ndarray) -> None:
        """Raises the damaged-image error for the first stream whose markers do not parse."""
        for i, index in enumerate(indices):
            row = images[i] if isinstance(images, list) else images[i, :lengths[i]]
            problem = jpeg.header_problem(row)
            if problem is not None:
                raise jpeg.damaged_image(*self.reader.locate(int(index)), problem)
