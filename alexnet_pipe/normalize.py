"""The normalisation, decided once: what is subtracted from every pixel and what it is divided
by. Built from the training statistics and the augment options (`from_stats`) or read back from
a checkpoint (`from_state`); the pipeline, train, evaluate, predict, preview and the benchmarks
all take this one value, and the checkpoint stores it once.

    out = (crop(pixels) + lighting offset - crop(mean)) / std      (0-255 scale, CHW float)

where `mean` is the 256x256 mean image (the paper; the crop cuts the same window of image and
mean) or the RGB mean. How it is applied depends on the device (pipeline.Placement): the channel
part always rides in crop_mirror_normalize's per-sample mean, the mean image is subtracted in the
DALI graph on a GPU and by `MeanWindows` after DALI on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alexnet_base.config import AugmentConfig
from alexnet_pipe.augment import ten_crop_positions


@dataclass(frozen=True)
class Normalization:
    mean: np.ndarray  # (size, size, 3) HWC mean image, or (3,) RGB mean; float64, 0-255
    std: np.ndarray   # (3,) RGB divisors (ones unless --divide-std)

    @classmethod
    def from_stats(cls, stats, augment: AugmentConfig) -> "Normalization":
        """From stats.h5 (shards.ImageStats) and the --mean / --divide-std options."""
        if augment.mean == "pixel":
            return cls(stats.pixel_mean, np.ones(3))
        return cls(stats.channel_mean, stats.channel_std if augment.divide_std else np.ones(3))

    @property
    def per_pixel(self) -> bool:
        """True for the paper's mean image, False for the RGB mean."""
        return np.ndim(self.mean) == 3

    def channel_mean(self) -> np.ndarray:
        """(3,) what the source's per-sample mean carries: the RGB mean, or zeros where the mean
        image is subtracted instead."""
        return np.zeros(3) if self.per_pixel else np.asarray(self.mean, np.float64)

    def to_state(self) -> dict:
        """The checkpoint's entry: float32 tensors."""
        import torch
        return {"mean": torch.as_tensor(np.asarray(self.mean), dtype=torch.float32),
                "std": torch.as_tensor(np.asarray(self.std), dtype=torch.float32)}

    @classmethod
    def from_state(cls, state: dict) -> "Normalization":
        return cls(state["mean"].double().numpy(), state["std"].double().numpy())


class MeanWindows:
    """The mean image subtracted from a CPU batch after DALI: from each image, the window of the
    mean that its crop cut (mirrored with it), one in-place torch subtraction per image; ten
    crops subtract their ten fixed windows in one broadcast. Not in the graph as on GPUs, since
    DALI's CPU arithmetic costs more than torch's vectorised subtraction (BENCHMARKS.md). Outputs
    differ from the graph's by float32 rounding only: (x - mean_i) - window instead of
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
                                     ten_crop_positions(m.shape[width], crop)])

    def window(self, x: int, y: int, mirror: bool):
        """The mean under the crop at (x, y), mirrored if `mirror`: a view, (c, c, 3) or
        (3, c, c). Mirrored, output column j is column x + c - 1 - j: column span - x + j of the
        mirrored mean."""
        src, c = self._means[int(mirror)], self._crop
        x = self._span - x if mirror else x
        return src[y:y + c, x:x + c] if self._hwc else src[:, y:y + c, x:x + c]

    def subtract(self, images, crops) -> None:
        """In place: images (B, ...) as DALI gives them; crops (B, 3) int64 CPU tensor of each
        crop's x, y, mirror. On one torch thread: torch's pool would wait on the cores that
        DALI's threads keep busy."""
        import torch
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if self._ten is not None:
                images.sub_(self._ten)
                return
            # a CPU tensor (MeanWindows serves CPU loaders only): this list is no device sync
            for image, (x, y, mirror) in zip(images, crops.tolist()):
                image.sub_(self.window(x, y, mirror))
        finally:
            torch.set_num_threads(threads)
