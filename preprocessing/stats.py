"""Streamed statistics of training pixels: pure numpy, mergeable across workers and resumed runs.

Sums are exact int64 (a pixel is at most 255, a product at most 65025; over 1.28 M images of
256x256 pixels the largest sum is 5.4e15 < 2**63), so the result does not depend on the order in
which shards are merged: a resumed run gives the very same statistics. Integer products also keep
BLAS threads out of the worker processes.
"""
from __future__ import annotations

import numpy as np

from preprocessing.shards import ImageStats


class PixelSums:
    """Running sums over (size, size, 3) uint8 HWC images."""

    def __init__(self, size: int):
        self.count = 0                                         # images
        self.pixel_sum = np.zeros((size, size, 3), np.int64)   # per-pixel sum, 0-255 scale
        self.rgb_outer = np.zeros((3, 3), np.int64)            # sum of x x^T over all pixels

    def update(self, image: np.ndarray) -> None:
        """Add one (size, size, 3) uint8 HWC image."""
        x = image.reshape(-1, 3).astype(np.int64)
        self.count += 1
        self.pixel_sum += image
        self.rgb_outer += x.T @ x

    def merge(self, other: "PixelSums") -> None:
        self.count += other.count
        self.pixel_sum += other.pixel_sum
        self.rgb_outer += other.rgb_outer

    def to_arrays(self) -> dict:
        return {"count": np.int64(self.count), "pixel_sum": self.pixel_sum,
                "rgb_outer": self.rgb_outer}

    @classmethod
    def from_arrays(cls, arrays) -> "PixelSums":
        sums = cls(arrays["pixel_sum"].shape[0])
        sums.count = int(arrays["count"])
        sums.pixel_sum = np.array(arrays["pixel_sum"], np.int64)
        sums.rgb_outer = np.array(arrays["rgb_outer"], np.int64)
        return sums

    def finalize(self) -> ImageStats:
        if self.count == 0:
            raise ValueError("no training images: statistics are undefined")
        n_pixels = self.count * self.pixel_sum.shape[0] * self.pixel_sum.shape[1]
        mean = self.pixel_sum.sum(axis=(0, 1)) / n_pixels
        cov = self.rgb_outer / n_pixels - np.outer(mean, mean)  # population covariance
        cov = (cov + cov.T) / 2
        eigval, eigvec = eigen_sorted(cov)
        return ImageStats(count=self.count, channel_mean=mean, channel_std=np.sqrt(np.diag(cov)),
                          pixel_mean=self.pixel_sum / self.count, rgb_cov=cov,
                          eigval=eigval, eigvec=eigvec)


def eigen_sorted(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues descending and unit eigenvectors as columns, each signed so its sum is >= 0."""
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = np.clip(eigval[order], 0.0, None), eigvec[:, order]
    signs = np.where(eigvec.sum(axis=0) < 0, -1.0, 1.0)  # a fixed sign makes files comparable
    return eigval, eigvec * signs
