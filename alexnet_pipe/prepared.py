"""A prepared folder (the --out of `prepare`), opened once per command: its splits' shards
checked against the manifest, their bytes against its sha256 (unless --no-verify), the
training statistics, and what follows from them for the loaders: the normalisation and the PCA
lighting basis. `open_shards` and `Shards.loader` are the loader's public API (the package's
`__all__`): train, evaluate, preview and the benchmarks use them as a user's own model does.

    shards = open_shards("data/")
    loader = shards.loader("train", batch_size=64, device="gpu")
    for images, labels in loader: ...
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alexnet_base import resources
from alexnet_base.config import AugmentConfig, LoaderConfig
from alexnet_pipe import augment
from alexnet_pipe.normalize import Normalization
from preprocessing import verify as integrity
from preprocessing.shards import (ImageStats, SplitInfo, content_digest, load_split,
                                  load_stats, read_manifest)

_LOADER_OPTIONS = {f.name for f in dataclasses.fields(LoaderConfig)} - {"data", "augment"}
_AUGMENT_OPTIONS = {f.name for f in dataclasses.fields(AugmentConfig)}


@dataclass(frozen=True)
class Shards:
    """A prepared folder, opened: its splits, the train split's statistics, its content's
    digest. `loader` makes the loaders."""
    path: Path
    splits: dict = field(default_factory=dict)  # {"train": SplitInfo, "val": ...} as opened
    stats: ImageStats | None = None             # the train split's statistics, opened with it
    digest: str = ""                            # the manifest's: names the content, not the path

    @property
    def num_classes(self) -> int:
        return next(iter(self.splits.values())).num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return next(iter(self.splits.values())).class_names

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

    def loader(self, split: str = "train", config: LoaderConfig | None = None, *,
               device=None, ranks=None, norm: Normalization | None = None, **kw):
        """A pipeline.Loader over split `split`: iterate it once an epoch; each batch unpacks
        as (images, labels) on `device` (images normalised, NCHW).

        Options by name, over the paper's defaults (config.LoaderConfig and AugmentConfig, as
        `train --help` documents them): batch_size (images each process gets a step), crop,
        mean, flip, lighting_std, seed, threads, readers, dtype, ...; or a whole LoaderConfig
        as `config`. device: "cpu", "gpu", "auto" or a torch.device (default: the config's,
        the GPU of this process's LOCAL_RANK). ranks: this process's place (default:
        torchrun's RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE; a plain run is rank 0 of 1):
        a train step's global batch is the ranks' batches, each rank its slice. Where to
        start and how far to stream: start_epoch, start_batch (a position the loader gave,
        `Loader.position`), epochs; ten_crop (val). norm: another normalisation (a
        checkpoint's; default: this folder's statistics as `mean` asks)."""
        import torch

        from alexnet_pipe import distributed
        from alexnet_pipe.pipeline import make_loader
        options = {k: kw.pop(k) for k in list(kw) if k in _LOADER_OPTIONS | _AUGMENT_OPTIONS}
        if config is None:
            config = LoaderConfig(data=self.path, augment=AugmentConfig(**{
                k: v for k, v in options.items() if k in _AUGMENT_OPTIONS}), **{
                k: v for k, v in options.items() if k in _LOADER_OPTIONS})
        elif options:
            raise TypeError(f"loader(): options {sorted(options)} beside a config; give one")
        ranks = ranks or distributed.from_environment()
        if not isinstance(device, torch.device):
            device = distributed.device(device or config.device, ranks)
        lighting = self.lighting(config.augment) if split == "train" else None
        return make_loader(config, self.split(split), device=device, ranks=ranks,
                           lighting=lighting, norm=norm or self.normalization(config.augment),
                           **kw)


def open_shards(data: Path | str, splits=None, *, verify: bool = True,
                share: tuple[int, int] = (0, 1), gather=lambda lines: [lines]) -> Shards:
    """The splits' shards (default: every split the folder holds; a missing, cut or foreign
    one is a UserError naming it) and, with train, stats.h5. verify: every file reading
    `splits` touches hashed against the manifest,
    this process's share of them (share = (i, n): the n processes on this machine split the
    files and the cores); gather(lines): every rank's findings (a collective, so that all
    stop together; see preprocessing.verify.check_inputs)."""
    data = Path(data)
    if splits is None:
        splits = tuple(name for name, n in read_manifest(data)["counts"].items() if n)
    infos = {name: load_split(data, name) for name in splits}
    stats = load_stats(data, infos["train"]) if "train" in infos else None
    if verify:
        integrity.check_inputs(data, tuple(splits), share=share, gather=gather,
                               workers=max(1, resources.usable_cores() // share[1]))
    return Shards(data, infos, stats, content_digest(data))
