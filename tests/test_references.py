"""The loaders judged by what their pixels say, not by the code that drew them.

The images here are coordinate-coded (conftest.coord_image: R = column, G = row, B = image id),
so every output can be read back: which image it is, where it was cropped, whether it was
mirrored and by how much its colour was shifted. The expected distributions, positions and
constants are written out here from the paper and the docs.
"""
from __future__ import annotations

from dataclasses import replace

import h5py
import numpy as np
import pytest

from alexnet_base.config import AugmentConfig, LoaderConfig
from conftest import folder_loader

SIZE, CROP = 256, 224
SPAN = SIZE - CROP  # 32: offsets 0..32 on both axes


def stats_h5(data) -> dict:
    """stats.h5 read with h5py, as any user of the format would."""
    with h5py.File(data / "stats.h5", "r") as f:
        return {k: f[k][...] for k in ("channel_mean", "rgb_cov", "pixel_mean")}


def shard_keys(data, split: str) -> list[str]:
    """Global index -> key: the manifest's shards in order, then position in the shard."""
    import json
    manifest = json.loads((data / "manifest.json").read_text())
    keys = []
    for entry in manifest["shards"]:
        if entry["split"] == split:
            with h5py.File(data / entry["file"], "r") as f:
                keys += [k.decode() for k in f["keys"][...]]
    return keys


def loader_config(data, batch_size: int, readers: int = 0, **aug) -> LoaderConfig:
    """readers=0 (the CPU default): the reads run in the pipeline's process."""
    return LoaderConfig(data=data, batch_size=batch_size, device="cpu", threads=1,
                        readers=readers, augment=AugmentConfig(mean="channel", **aug))


def decode(out: np.ndarray, mean: np.ndarray) -> dict:
    """One (3, h, w) output of coordinate pixels with the channel mean subtracted -> where it was
    cut from: x, y of the window's top-left corner, mirrored or not, image id."""
    px = np.rint(out.astype(np.float64) + mean[:, None, None]).astype(int)
    flip = px[0, 0, 1] < px[0, 0, 0]
    x = px[0, 0, -1] if flip else px[0, 0, 0]
    h, w = px.shape[1:]
    cols = x + np.arange(w)[::-1] if flip else x + np.arange(w)
    rows = px[1, 0, 0] + np.arange(h)[:, None]
    want = np.stack([np.broadcast_to(cols, (h, w)), np.broadcast_to(rows, (h, w)),
                     np.full((h, w), px[2, 0, 0])])
    assert np.array_equal(px, want), "not a plain crop of one coordinate image"
    return {"x": int(x), "y": int(px[1, 0, 0]), "flip": bool(flip), "id": int(px[2, 0, 0])}


def run_epochs(loader, epochs: int):
    """(epoch, Batch as numpy) for `epochs` passes."""
    for epoch in range(epochs):
        for b in loader:
            yield epoch, b.images.numpy(), b.labels.numpy(), b.valid.numpy(), b.index.numpy()


# --- 1. sharding through the real loaders -----------------------------------------------------

@pytest.mark.parametrize("readers", [0, 1], ids=["in-process", "reader-process"])
def test_each_step_is_one_seeded_global_batch_whatever_the_number_of_ranks(coord_shards,
                                                                          readers):
    """A global batch of 12 over 1, 2, 3 and 4 ranks (batches of 12, 6, 4, 3), two epochs. The
    documented order: a permutation of all 96 samples seeded by (seed, epoch), step s's global
    batch its s-th slice of 12 (8 steps), rank r reading the r-th contiguous part of it. Each
    image's crop and flip, read back from its pixels, are the same for every number of ranks:
    what a step sees depends on (seed, epoch, step) alone."""
    data, truth = coord_shards
    keys = shard_keys(data, "train")
    mean = stats_h5(data)["channel_mean"]
    total, batch = len(keys), 12
    assert total == 96
    seen = {}  # world -> epoch -> step -> [(index, x, y, flip)] of the global batch
    for world in (1, 2, 3, 4) if readers == 0 else (2,):
        for rank in range(world):
            cfg = loader_config(data, batch // world, readers, crop=CROP, lighting_std=0)
            loader = folder_loader(cfg, rank=rank, world=world)
            steps = {}
            for epoch, images, labels, valid, index in run_epochs(loader, 2):
                assert images.shape == (batch // world, 3, CROP, CROP) and valid.all()
                rows = []
                for out, label, i in zip(images, labels, index):
                    d = decode(out, mean)
                    assert (d["id"], label) == truth[keys[i]]  # index names its image
                    rows.append((int(i), d["x"], d["y"], d["flip"]))
                step = len(steps.setdefault(epoch, []))
                steps[epoch].append(rows)
            for epoch, batches in steps.items():  # this rank's part of each global batch
                for step, rows in enumerate(batches):
                    seen.setdefault(world, {}).setdefault(epoch, {}).setdefault(
                        step, []).extend(rows)  # ranks in order: the global batch's rows
    for world, epochs in seen.items():
        for epoch in range(2):
            order = np.random.default_rng([0, epoch]).permutation(total)
            assert sorted(epochs[epoch]) == list(range(8))
            for step in range(8):
                got = [i for i, *_ in epochs[epoch][step]]
                assert got == order[step * batch:(step + 1) * batch].tolist(), (world, step)
        if 1 in seen:  # an image's crop and flip do not depend on the number of ranks
            assert epochs == seen[1], world
    draws = [(x, y, f) for e in seen[next(iter(seen))].values() for rows in e.values()
             for _, x, y, f in rows]
    assert len(set(draws)) > 100  # the draws are draws: not one window for all


@pytest.mark.parametrize("world", [2, 5])
def test_val_shares_cover_every_image_once(coord_shards, world):
    """12 val images over 2 ranks, and over 5 (shares of 3, 3, 2, 2, 2: no remainder is
    dropped, each rank's last batch padded and masked)."""
    data, truth = coord_shards
    mean = stats_h5(data)["channel_mean"]
    ids = []
    for rank in range(world):
        loader = folder_loader(loader_config(data, 4), name="val", rank=rank, world=world)
        for _, images, labels, valid, _ in run_epochs(loader, 1):
            for out in images[valid]:
                d = decode(out, mean)
                assert (d["x"], d["y"], d["flip"]) == (16, 16, False)  # the centre crop
                ids.append(d["id"])
    val_ids = sorted(i for k, (i, _) in truth.items() if k.startswith("val/"))
    assert sorted(ids) == val_ids


# --- 2. augmentation draws from first principles -----------------------------------------------

def test_crop_offsets_uniform_on_both_axes_and_flips_half(coord_shards):
    data, _ = coord_shards
    mean = stats_h5(data)["channel_mean"]
    loader = folder_loader(loader_config(data, 32, crop=CROP, lighting_std=0))
    draws = [decode(out, mean) for _, images, *_ in run_epochs(loader, 8) for out in images]
    n = len(draws)
    assert n == 768
    for axis in ("x", "y"):
        values = np.array([d[axis] for d in draws])
        assert values.min() == 0 and values.max() == SPAN, axis
        counts = np.bincount(values, minlength=SPAN + 1)
        expected = n / (SPAN + 1)
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < 70, (axis, chi2)  # 32 degrees of freedom: P(chi2 > 70) ~ 1e-4
    flips = np.mean([d["flip"] for d in draws])
    assert abs(flips - 0.5) < 4 * np.sqrt(0.25 / n), flips


@pytest.mark.parametrize("scale", ["stdev", "eigval"])
def test_lighting_offsets_have_the_documented_covariance(coord_shards_small, scale):
    data, truth = coord_shards_small
    keys = shard_keys(data, "train")
    st = stats_h5(data)
    sigma = 0.1
    cfg = loader_config(data, 64, crop=32, flip=False, lighting_std=sigma, lighting_scale=scale)
    loader = folder_loader(cfg)
    offsets = []
    for _, images, _, _, index in run_epochs(loader, 120):
        for out, i in zip(images.astype(np.float64), index):
            cols, rows = np.meshgrid(np.arange(32), np.arange(32))
            image = np.stack([cols, rows, np.full((32, 32), truth[keys[i]][0])])  # CHW
            delta = out + st["channel_mean"][:, None, None] - image
            assert np.ptp(delta, axis=(1, 2)).max() < 1e-3  # one RGB shift for the whole image
            offsets.append(delta[:, 0, 0])
    offsets = np.array(offsets)
    # The paper: shift = P [a1 w1, a2 w2, a3 w3]^T, a_i ~ N(0, sigma), P and l the eigenvectors
    # and eigenvalues of the RGB covariance on the 0-255 scale. w_i = sqrt(l_i) (stdev), or
    # 255 * l_i / 255^2 (eigval: eigenvalues of [0, 1] pixels, shift rescaled to 0-255).
    l, P = np.linalg.eigh(st["rgb_cov"])
    w = np.sqrt(l) if scale == "stdev" else 255 * l / 255 ** 2
    expected = sigma ** 2 * P @ np.diag(w ** 2) @ P.T
    coords_var = np.diag(P.T @ np.cov(offsets, rowvar=False) @ P)
    assert len(offsets) == 7680
    np.testing.assert_allclose(coords_var, np.diag(P.T @ expected @ P), rtol=0.05)
    assert np.abs(offsets.mean(0)).max() < 4 * np.sqrt(expected.diagonal().max() / len(offsets))


def test_ten_crops_are_the_corners_the_centre_and_their_mirrors(coord_shards):
    data, _ = coord_shards
    mean = stats_h5(data)["channel_mean"]
    loader = folder_loader(loader_config(data, 4), name="val", ten_crop=True)
    batch = next(iter(loader))
    want = [(0, 0), (32, 0), (0, 32), (32, 32), (16, 16)]  # top-left, top-right, bottom-left,
    want = [(x, y, False) for x, y in want] + [(x, y, True) for x, y in want]  # ..., centre
    for crops in batch.images.numpy():
        got = [decode(c, mean) for c in crops]
        assert [(d["x"], d["y"], d["flip"]) for d in got] == want
        assert len({d["id"] for d in got}) == 1


def test_pixel_mean_subtracts_the_crop_window_of_the_mean_image(coord_shards):
    data, _ = coord_shards
    st = stats_h5(data)
    cfg = replace(loader_config(data, 16, crop=CROP, lighting_std=0),
                  augment=AugmentConfig(mean="pixel", crop=CROP, lighting_std=0))
    loader = folder_loader(cfg)
    batch = next(iter(loader))
    # The mean of coordinate images is coordinates too (B: the mean id): image - mean(image's own
    # window) is 0 in R and G, and id - mean id in B, wherever the window was cut.
    mean_id = st["pixel_mean"][0, 0, 2]
    np.testing.assert_allclose(st["pixel_mean"][..., 2], mean_id)
    keys = shard_keys(data, "train")
    for out, i in zip(batch.images.numpy(), batch.index.numpy()):
        ident = int(keys[i].split("/")[-1][:3])
        np.testing.assert_allclose(out[:2], 0, atol=1e-3)
        np.testing.assert_allclose(out[2], ident - mean_id, atol=1e-3)
