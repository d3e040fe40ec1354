"""The shards' bytes: global sample indices in, images and labels out. Which indices a rank reads
is plan.py's business; what the files are (names, manifest, statistics), preprocessing/
shards.py's; how their bytes are read (maps, preads, open-file budget), reading.py's.

`ShardReader` opens its shard files lazily in whichever process reads (open files neither
pickle nor survive a fork), so the DALI callback that holds it can be sent to reader processes.
"""
from __future__ import annotations

import numpy as np

from alexnet_pipe.jpeg import header_problem
from alexnet_pipe.reading import ShardFiles
from preprocessing import shards
from preprocessing.shards import SplitInfo


class ShardReader:
    """The images and labels of a split's global sample indices (0 .. split.total - 1: the
    shards' images one after another, in the manifest's order)."""

    def __init__(self, split: SplitInfo, max_open_files: int = 32):
        self.split = split
        self.max_open_files = max_open_files  # shard files a reader process (or all reader
        #                                       threads) keeps open
        self._starts = np.concatenate([[0], np.cumsum(split.counts)])
        self._files = None  # reading.ShardFiles, opened lazily in each process

    def __getstate__(self):
        return {**self.__dict__, "_files": None}  # each process opens its own descriptors

    def _by_shard(self, indices: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(shard, batch rows, indices within the shard) for global `indices`, each shard's in
        file order (sequential reads where possible)."""
        if self._files is None:
            self._files = ShardFiles(self.split.files, self.max_open_files)
        shard_of = np.searchsorted(self._starts, indices, side="right") - 1
        groups = []
        for s in np.unique(shard_of):
            where = np.flatnonzero(shard_of == s)
            local = indices[where] - self._starts[s]
            order = np.argsort(local, kind="stable")
            groups.append((int(s), where[order], local[order]))
        return groups

    def read(self, indices: np.ndarray) -> tuple[list | np.ndarray, np.ndarray]:
        """Images and labels of global `indices`: raw, one (n, size, size, 3) array that one
        pread per image fills in place; JPEG, a list of each image's bytes as read-only views
        of the mapped shards (a pipeline that keeps them copies them first)."""
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

    def locate(self, index: int) -> tuple[str, str]:
        """(shard file, key) of global sample `index`."""
        s = int(np.searchsorted(self._starts, index, side="right") - 1)
        with shards.open_shard(self.split.files[s]) as f:
            return self.split.files[s], f[shards.KEYS][index - self._starts[s]].decode()

    def undecodable(self, indices: np.ndarray) -> tuple[str, str, str] | None:
        """(shard file, key, reason) of the first of `indices` whose image cannot be decoded
        (its markers, then PIL's decoder), or None; raw images always decode."""
        if self.split.encoding != "jpeg":
            return None
        from preprocessing.resize import decode_jpeg
        images, _ = self.read(indices)
        for i, data in zip(indices, images):
            problem = header_problem(data)
            if problem is None:
                try:
                    decode_jpeg(data.tobytes())
                except Exception as e:  # PIL raises several types for damaged bytes
                    problem = str(e)
            if problem is not None:
                return (*self.locate(int(i)), problem)
        return None
