"""Which images each rank reads at each step of each epoch, and their augmentation draws: the
sampling plan, a pure value (no files, picklable), apart from the code that reads the bytes.

    train  a fresh seeded permutation of all images every epoch, cut into global batches of
           world x batch_size images (the remainder, less than a global batch, sits out this
           epoch); step s's global batch is the permutation's s-th slice, rank r's share of it
           its r-th contiguous slice. The draws of the global batch come from (seed, epoch, s)
           and each rank takes its rows: what step s sees, images and draws, is a function of
           (seed, epoch, s) alone, whatever the number of ranks
    val    the images in order, cut into `world` contiguous shares of nearly equal size (together
           exactly the split); the last batch of a share padded with its last image, masked out

A run resumed at epoch e, step k, on any number of ranks with the same global batch, sees
exactly the batches and draws of an uninterrupted run, whatever DALI's own epoch counter says
(`position` maps DALI's to ours).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from alexnet_base.config import AugmentConfig
from alexnet_pipe import augment


def epoch_samples(total: int, *, train: bool, seed: int, epoch: int, rank: int, world: int,
                  batch_size: int) -> np.ndarray:
    """Global sample indices that `rank` reads in `epoch`, in reading order (train: its slice
    of each global batch, step after step)."""
    if train:
        order = np.random.default_rng([seed, epoch]).permutation(total)
        steps = total // (batch_size * world)
        shares = order[:steps * batch_size * world].reshape(steps, world, batch_size)
        return shares[:, rank].reshape(-1)
    return np.array_split(np.arange(total), world)[rank]


def share(total: int, *, train: bool, rank: int, world: int, batch_size: int) -> int:
    """How many samples `rank` reads each epoch: len(epoch_samples(...)) for any epoch."""
    if train:
        return total // (batch_size * world) * batch_size
    return total // world + (rank < total % world)


def batches_per_epoch(total: int, batch_size: int, *, train: bool, rank: int, world: int) -> int:
    """The same every epoch: train's steps (whole global batches), val's batches of a share
    (the last one padded)."""
    if train:
        return total // (batch_size * world)
    return -(-share(total, train=False, rank=rank, world=world, batch_size=batch_size)
             // batch_size)


@dataclass
class Plan:
    """One rank's reading plan of one split. `batch_size` is this rank's; a val batch larger
    than the share is cut to it (beyond the share, padding is all it would add). `dali_batches`:
    batches one DALI iteration prepares (one call of the source), at most an epoch's."""
    total: int              # images in the split
    size: int               # px, the shards' side
    batch_size: int
    train: bool
    augment: AugmentConfig  # what is drawn (train; val takes its crop only)
    seed: int = 0
    rank: int = 0
    world: int = 1
    start_epoch: int = 0    # the epoch of DALI's epoch_idx 0: resume counts from the checkpoint
    start_batch: int = 0    # batches of start_epoch already done (resume after an interrupt)
    epochs: int = 1         # epochs one DALI epoch streams through: no drain at their boundaries
    dali_batches: int = 1
    _epoch: tuple = field(default=(None, None), init=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.train:
            self.batch_size = max(1, min(self.batch_size, share(
                self.total, train=False, rank=self.rank, world=self.world, batch_size=1)))
        self.dali_batches = max(1, min(self.dali_batches, self.num_batches()))

    def __getstate__(self):  # the cached permutation stays behind: each process draws its own
        return {**self.__dict__, "_epoch": (None, None)}

    def share(self) -> int:
        return share(self.total, train=self.train, rank=self.rank, world=self.world,
                     batch_size=self.batch_size)

    def num_batches(self) -> int:
        return batches_per_epoch(self.total, self.batch_size, train=self.train, rank=self.rank,
                                 world=self.world)

    def skipped(self, epoch: int) -> int:
        """Batches of `epoch` done before this plan started (a resume mid-epoch)."""
        return self.start_batch if epoch == self.start_epoch else 0

    def samples(self, epoch: int) -> np.ndarray:
        """epoch_samples of this rank, one permutation an epoch (cached), not one a batch."""
        if self._epoch[0] != epoch:
            self._epoch = (epoch, epoch_samples(self.total, train=self.train, seed=self.seed,
                                                epoch=epoch, rank=self.rank, world=self.world,
                                                batch_size=self.batch_size))
        return self._epoch[1]

    def batch_indices(self, epoch: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(global indices, valid mask) of one full batch."""
        samples = self.samples(epoch)
        idx = samples[batch * self.batch_size:(batch + 1) * self.batch_size]
        valid = np.ones(self.batch_size, np.int32)
        if len(idx) < self.batch_size:  # val only: pad with the last sample, masked out
            valid[len(idx):] = 0
            idx = np.concatenate([idx, np.full(self.batch_size - len(idx), idx[-1])])
        return idx, valid

    def params(self, epoch: int, batch: int, n: int) -> dict:
        """The augmentation draws of this rank's n images of step `batch`: the global batch's
        (augment.random_params, from (seed, epoch, step)), this rank's rows of them; val: the
        centre crop, no flip, no lighting."""
        if not self.train:
            return augment.centre_params(n, size=self.size, crop=self.augment.crop)
        rng = np.random.default_rng([self.seed, epoch, batch, 1])
        drawn = augment.random_params(rng, n * self.world, size=self.size, aug=self.augment)
        rows = slice(self.rank * n, (self.rank + 1) * n)
        return {k: v[rows] for k, v in drawn.items()}

    def position(self, epoch_idx: int, iteration: int) -> tuple[int, int, int] | None:
        """(epoch, first batch, batches) of DALI's call `iteration` in its epoch `epoch_idx`, or
        None past the stream's end. One DALI epoch streams `epochs` of ours back to back (every
        epoch has the same number of batches), so DALI's prefetch runs on into the next epoch
        instead of draining at each boundary; the first stream starts at (start_epoch,
        start_batch). Each call takes `dali_batches` batches, fewer at an epoch's end."""
        per_epoch = self.num_batches()
        epoch = self.start_epoch + epoch_idx * self.epochs
        first = self.start_batch if epoch_idx == 0 else 0
        head = -(-(per_epoch - first) // self.dali_batches)  # calls of the stream's first epoch
        if iteration >= head:
            later, iteration = divmod(iteration - head, -(-per_epoch // self.dali_batches))
            epoch, first = epoch + 1 + later, 0
        if epoch >= self.start_epoch + (epoch_idx + 1) * self.epochs:
            return None
        batch = first + iteration * self.dali_batches
        return epoch, batch, min(self.dali_batches, per_epoch - batch)
