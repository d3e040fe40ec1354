"""A prepared folder (the --out of `prepare`), opened once per command: its splits' shards
checked against the manifest, their bytes against its sha256 (unless --no-verify), the
training statistics, and what follows from them for the loaders: the normalisation and the PCA
lighting basis. train, evaluate, preview and the benchmarks take this one value; the loader
reads neither the folder nor the environment.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alexnet_base import resources
from alexnet_base.config import AugmentConfig, LoaderConfig
from alexnet_pipe import augment
from alexnet_pipe.normalize import Normalization
from preprocessing import verify as integrity
from preprocessing.shards import (ImageStats, SplitInfo, content_digest, load_split,
                                  load_stats)


@dataclass(frozen=True)
class Prepared:
    path: Path
    splits: dict = field(default_factory=dict)  # {"train": SplitInfo, "val": ...} as opened
    stats: ImageStats | None = None             # the train split's statistics, opened with it
    digest: str = ""                            # the manifest's: names the content, not the path

    def split(self, name: str) -> SplitInfo:
        """The SplitInfo of split `name` ("train", "val"): a split is a SplitInfo everywhere,
        its name a string named so."""
        return self.splits[name]

    def normalization(self, aug: AugmentConfig) -> Normalization:
        """What is subtracted and divided, from the statistics and --mean / --divide-std."""
        return Normalization.from_stats(self.stats, aug)

    def lighting(self, aug: AugmentConfig) -> np.ndarray | None:
        """(3, 3) PCA lighting basis (augment.lighting_basis), None where lighting is off."""
        if aug.lighting_std <= 0:
            return None
        return augment.lighting_basis(self.stats.eigval, self.stats.eigvec, aug.lighting_scale)

    def loader(self, config: LoaderConfig, name: str = "train", *, device, norm=None, **kw):
        """pipeline.make_loader over its split `name` with its normalisation (or `norm`: a
        checkpoint's) and, for train, its lighting basis; `kw` as make_loader takes them."""
        from alexnet_pipe.pipeline import make_loader
        lighting = self.lighting(config.augment) if name == "train" else None
        return make_loader(config, self.split(name), device=device, lighting=lighting,
                           norm=norm or self.normalization(config.augment), **kw)


def open_prepared(data: Path, splits=("train",), *, verify: bool = True,
                  share: tuple[int, int] = (0, 1), gather=lambda lines: [lines]) -> Prepared:
    """The splits' shards (a missing, cut or foreign one is a UserError naming it) and, with
    train, stats.h5. verify: every file reading `splits` touches hashed against the manifest,
    this process's share of them (share = (i, n): the n processes on this machine split the
    files and the cores); gather(lines): every rank's findings (a collective, so that all
    stop together; see preprocessing.verify.check_inputs)."""
    data = Path(data)
    infos = {name: load_split(data, name) for name in splits}
    stats = load_stats(data, infos["train"]) if "train" in infos else None
    if verify:
        integrity.check_inputs(data, tuple(splits), share=share, gather=gather,
                               workers=max(1, resources.usable_cores() // share[1]))
    return Prepared(data, infos, stats, content_digest(data))
