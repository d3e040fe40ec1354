"""The DALI pipelines on the CPU, on real shards, against their numpy twins (alexnet_pipe.augment)."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace

import h5py
import numpy as np
import pytest

import torch

from alexnet_base.config import AugmentConfig, LoaderConfig
from alexnet_base.errors import UserError
from alexnet_pipe import reading
from alexnet_pipe.pipeline import Placement
from conftest import ROOT, cli, folder_loader, readme_snippet, source_of, tool
from preprocessing import resize
from preprocessing.shards import load_split

CPU = Placement.for_device(torch.device("cpu"))


def config(data, **aug) -> LoaderConfig:
    return LoaderConfig(data=data, batch_size=8, device="cpu", threads=1, readers=1,
                        augment=AugmentConfig(**aug))


def first_batch(loader):
    for b in loader:
        return b.images.numpy().astype(np.float64), b.labels.numpy(), b.valid.numpy()


def shard_images(data, split="train"):
    """(images, labels) of every image of a split in manifest order, read with h5py; JPEG
    decoded with PIL."""
    images, labels = [], []
    for path in load_split(data, split).files:
        with h5py.File(path, "r") as f:
            labels += list(f["labels"][...])
            if f.attrs["encoding"] == "raw":
                images += list(f["images"][...])
            else:
                o, data_ = f["offsets"][...], f["images"][...]
                images += [resize.decode_jpeg(data_[o[i]:o[i + 1]].tobytes())
                           for i in range(len(o) - 1)]
    return images, np.array(labels)


def crop_window(a, x, y, crop, flip):
    """HWC: the crop at (x, y), mirrored left-right with the crop if `flip`."""
    out = a[y:y + crop, x:x + crop]
    return out[:, ::-1] if flip else out


PAPER = dict(crop=224, mean="pixel", sigma=0.1, scale="stdev", divide_std=False)  # the defaults


def twin(data, *, crop, mean, sigma, scale, divide_std, seed=0, epoch=0, batch=0, size=8):
    """The numpy reference of one train batch, from what the README documents: the samples are
    a permutation of the split seeded by (seed, epoch), cut into batches; each batch's draws come
    from a generator seeded by (seed, epoch, batch, 1): crop x, then y, uniform over every
    position, then the flips (p = 0.5), then the lighting alphas ~ N(0, sigma); the lighting
    offset is P (alpha * w), w = sqrt(eigenvalue) (stdev) or eigenvalue / 255 (eigval); then
    (crop(image) + offset - crop(mean)) / std on the 0-255 scale, CHW."""
    images, labels = shard_images(data)
    with h5py.File(data / "stats.h5", "r") as f:
        st = {k: f[k][...] for k in ("pixel_mean", "channel_mean", "channel_std", "eigval",
                                     "eigvec")}
    order = np.random.default_rng([seed, epoch]).permutation(len(images))
    idx = order[batch * size:(batch + 1) * size]
    span = 256 - crop
    rng = np.random.default_rng([seed, epoch, batch, 1])
    xs, ys = rng.integers(0, span + 1, size), rng.integers(0, span + 1, size)
    flips = rng.random(size) < 0.5
    alphas = rng.normal(0, sigma, (size, 3))
    w = np.sqrt(st["eigval"]) if scale == "stdev" else st["eigval"] / 255
    std = st["channel_std"] if divide_std else np.ones(3)
    out = []
    for k, i in enumerate(idx):
        x, y, flip = int(xs[k]), int(ys[k]), bool(flips[k])
        offset = st["eigvec"] @ (alphas[k] * w)
        m = (crop_window(st["pixel_mean"], x, y, crop, flip) if mean == "pixel"
             else st["channel_mean"])
        pixels = crop_window(images[i].astype(np.float64), x, y, crop, flip) + offset
        out.append(((pixels - m) / std).transpose(2, 0, 1))
    return np.stack(out), labels[idx]


@pytest.mark.parametrize("aug, terms", [
    (AugmentConfig(), PAPER),  # every default is the paper's value, written out here
    (AugmentConfig(mean="channel", divide_std=True, crop=227, lighting_scale="eigval"),
     dict(crop=227, mean="channel", sigma=0.1, scale="eigval", divide_std=True))])
def test_train_batch_matches_numpy_twin_raw(shards_raw, aug, terms):
    got, labels, valid = first_batch(folder_loader(replace(config(shards_raw), augment=aug)))
    want, want_labels = twin(shards_raw, **terms)
    assert got.shape == (8, 3, terms["crop"], terms["crop"]) and valid.all()
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_train_batch_jpeg_within_decoder_error(shards_jpeg):
    got, _, _ = first_batch(folder_loader(config(shards_jpeg)))
    want, _ = twin(shards_jpeg, **PAPER)  # PIL decode vs DALI's libjpeg-turbo decode
    assert np.abs(got - want).mean() < 1.0 and np.percentile(np.abs(got - want), 99) <= 3


@pytest.mark.parametrize("mean", ["channel", "pixel"])
def test_val_centre_and_ten_crops_exact(shards_raw, mean):
    """The paper's test crops of 224 from 256: the four corners and the centre, then the same
    five mirrored; with the pixel mean, each crop (mirrored ones too) has its own window of the
    mean image subtracted."""
    got, _, valid = first_batch(folder_loader(config(shards_raw, mean=mean), name="val"))
    ten, _, _ = first_batch(folder_loader(config(shards_raw, mean=mean), name="val",
                                        ten_crop=True))
    images, _ = shard_images(shards_raw, "val")
    with h5py.File(shards_raw / "stats.h5", "r") as f:
        mean_image = f["channel_mean"][...] if mean == "channel" else f["pixel_mean"][...]
    corners = [(0, 0), (32, 0), (0, 32), (32, 32), (16, 16)]  # TL, TR, BL, BR, centre
    positions = [(x, y, False) for x, y in corners] + [(x, y, True) for x, y in corners]

    def expected(image, x, y, flip):
        m = crop_window(mean_image, x, y, 224, flip) if mean == "pixel" else mean_image
        return (crop_window(image.astype(np.float64), x, y, 224, flip) - m).transpose(2, 0, 1)
    assert ten.shape[1:] == (10, 3, 224, 224) and valid.all()
    for i, image in enumerate(images[:8]):
        np.testing.assert_allclose(got[i], expected(image, 16, 16, False), atol=1e-3)
        for k, (x, y, flip) in enumerate(positions):
            np.testing.assert_allclose(ten[i, k], expected(image, x, y, flip), atol=1e-3)


def test_seed_reproduces_a_batch_and_resume_epoch(shards_raw):
    a, _, _ = first_batch(folder_loader(config(shards_raw)))
    b, _, _ = first_batch(folder_loader(config(shards_raw)))
    c, _, _ = first_batch(folder_loader(replace(config(shards_raw), seed=1)))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1
    fresh = folder_loader(config(shards_raw))
    for _ in fresh:  # epoch 0
        pass
    second, _, _ = first_batch(fresh)
    resumed, _, _ = first_batch(folder_loader(config(shards_raw), start_epoch=1))
    np.testing.assert_array_equal(second, resumed)


def test_raw_and_jpeg_val_images_agree(shards_raw, shards_jpeg):
    raw, _, _ = first_batch(folder_loader(config(shards_raw), name="val"))
    jpeg, _, _ = first_batch(folder_loader(config(shards_jpeg), name="val"))
    assert np.abs(raw - jpeg).mean() < 2.0


def _damaged_copy(src, dst, damage):
    shutil.copytree(src, dst)
    damage(dst)
    return dst


def _set_attr(path, name, value):
    with h5py.File(path, "a") as f:
        f.attrs[name] = value


def test_bad_inputs_give_clear_errors(tmp_path, shards_raw):
    cases = [
        (lambda d: (d / "train-00001.h5").unlink(), "train-00001.h5: shard not found"),
        (lambda d: _set_attr(d / "train-00000.h5", "format_version", 99), "format version 99"),
        (lambda d: _set_attr(d / "stats.h5", "count", 7), "do not match the shards"),
    ]
    for i, (damage, message) in enumerate(cases):
        data = _damaged_copy(shards_raw, tmp_path / str(i), damage)
        with pytest.raises(UserError, match=message):
            folder_loader(config(data))
    with pytest.raises(UserError, match="--crop 300"):
        folder_loader(config(shards_raw, crop=300))


@pytest.mark.parametrize("cores, local, gpu, want", [
    (2, 1, True, (1, 1)),    # feeding a GPU: half the cores decode, half read
    (16, 1, True, (8, 8)),
    (16, 8, True, (1, 1)),   # 8 GPUs on a 16-core node: 2 cores per process
    (2, 1, False, (2, 0)),   # CPU: every core decodes, read in the pipeline's own process
    (16, 2, False, (8, 0)),
])
def test_default_readers_follow_the_cores_and_the_device(monkeypatch, cores, local, gpu, want):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    cfg = LoaderConfig(data="unused")
    assert cfg.reader_counts(gpu, local) == want
    assert replace(cfg, threads=3, readers=0).reader_counts(gpu, local) == (3, 0)  # as given


def test_cpu_defaults_read_in_process(shards_raw, shards_jpeg):
    import multiprocessing
    for data in (shards_raw, shards_jpeg):
        before = set(multiprocessing.active_children())
        loader = folder_loader(LoaderConfig(data=data, batch_size=8, device="cpu", threads=1))
        assert next(iter(loader)).images.shape == (8, 3, 224, 224)
        assert set(multiprocessing.active_children()) == before and loader.workers == (1, 0)
        del loader


@pytest.mark.slow
@pytest.mark.parametrize("readers", [0, 1])
def test_packed_jpeg_batches_give_the_batches_of_the_list(shards_jpeg, readers):
    """nvJPEG is fed each JPEG batch as one padded array that the graph cuts back into streams;
    built on the CPU, that path gives exactly the images, labels and order of the list of
    streams a CPU decoder is fed (the same decoder on the same bytes), over two epochs."""
    import torch
    cfg = replace(config(shards_jpeg, mean="pixel"), readers=readers)
    runs = []
    for packed in (False, True):
        loader = folder_loader(cfg, epochs=2, placement=replace(CPU, packed=packed))
        assert loader.source.packed == packed
        runs.append([b for _ in range(2) for b in loader])
        del loader
    assert len(runs[0]) == len(runs[1]) == 2 * (load_split(shards_jpeg, "train").total // 8)
    for a, b in zip(*runs):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.index, b.index)


def children() -> set[int]:
    """This process's child processes, from /proc."""
    found = set()
    for stat in os.listdir("/proc"):
        try:
            with open(f"/proc/{stat}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError, ValueError):
            continue
        if int(fields[1]) == os.getpid():
            found.add(int(stat))
    return found


@pytest.mark.slow
def test_reader_processes_read_on_through_a_schedulers_sigusr1(shards_jpeg):
    """Slurm signals every process of a job step (docs/slurm): SIGUSR1 must reach the trainer
    (which stops at a step) and must not kill its reader processes (the default action).
    Each reader gets SIGUSR1 after the first batch, and the epoch reads on to its end; the
    readers hold it blocked (SigBlk, bit 10) while this process takes it as before."""
    import signal
    before = children()
    loader = folder_loader(replace(config(shards_jpeg), readers=2))
    batches = iter(loader)
    next(batches)
    readers = children() - before
    assert len(readers) == 2, readers
    for pid in readers:
        with open(f"/proc/{pid}/status") as f:
            blocked = int(next(line for line in f if line.startswith("SigBlk:")).split()[1], 16)
        assert blocked >> (signal.SIGUSR1 - 1) & 1, hex(blocked)
        os.kill(pid, signal.SIGUSR1)
    assert len(list(batches)) == load_split(shards_jpeg, "train").total // 8 - 1
    assert children() - before == readers  # all alive
    assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    del loader


def test_shared_memory_need_counts_every_local_rank(monkeypatch, shards_jpeg):
    """Reader processes (JPEG shards) hand batches over in /dev/shm: DALI keeps 2 (prefetch) + 2
    (queue) buffers of a DALI batch (here 2 batches of 8), each taken at twice the split's file
    bytes per image for each of its streams, + 1 MiB for DALI's growth. (The real /dev/shm:
    tests/test_errors.py.)"""
    from alexnet_base import resources

    def per_rank(split):
        files = list(shards_jpeg.glob(f"{split}-*.h5"))
        per_image = sum(f.stat().st_size for f in files) / load_split(shards_jpeg, split).total
        return 4 * (2 * 8 * 2 * per_image + 2**20)
    train_need, val_need = per_rank("train"), per_rank("val")
    monkeypatch.setattr(resources, "shm_free",
                        lambda path=resources.SHM_DIR: int(1.5 * train_need))
    cfg = LoaderConfig(data=shards_jpeg, batch_size=8, device="cpu", threads=1, readers=1,
                       dali_batches=2)
    mib = 2**20
    with pytest.raises(UserError, match=rf"{1.5 * train_need / mib:.0f} MiB free, but 1 reader "
                                        rf"process needs about {2 * train_need / mib:.0f} MiB "
                                        rf"\({train_need / mib:.0f} MiB x 2 local ranks\)"):
        folder_loader(cfg, local_world=2)  # torchrun's second rank on this machine
    train = folder_loader(cfg)
    assert train.workers == (1, 1) and train.shm == pytest.approx(train_need, abs=1)
    # train builds its val loader before either has run: both count
    with pytest.raises(UserError, match=f"needs about {(train_need + val_need) / mib:.0f} MiB"):
        folder_loader(cfg, name="val", shm_reserved=train.shm)


@pytest.mark.slow
@pytest.mark.parametrize("encoding, readers", [("raw", 2), ("jpeg", 0)])
def test_a_shard_cut_short_under_a_running_loader(tmp_path, shards_raw, shards_jpeg, encoding,
                                                  readers):
    """A shard cut short under a running loader: the read's error comes out of the loader as
    the one-line error naming the file, not a hang, a DALI traceback or, for JPEG streams read
    from a map of the shard, a SIGBUS that would kill the process."""
    data = tmp_path / "d"
    shutil.copytree(shards_raw if encoding == "raw" else shards_jpeg, data)
    # one batch a DALI iteration: the readers' lead (a few iterations) stays inside epoch 1
    loader = folder_loader(replace(config(data), readers=readers, dali_batches=1), epochs=3)
    batches = iter(loader)
    next(batches)  # running: every shard of the first batches read (JPEG: mapped)
    shard = load_split(data, "train").files[0]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(UserError, match=rf"{shard}: cannot read the shard .*short read"):
        for _ in batches:  # the rest of the first epoch may be read already
            pass
        for _ in range(2):
            for _ in loader:
                pass


def test_default_reader_processes_that_do_not_fit_read_in_this_process(monkeypatch, capsys,
                                                                        shards_jpeg):
    """A GPU's default reader processes (JPEG) where /dev/shm is too small for their batches:
    the pipeline reads in its own process instead and says so, with the room to give (a chosen
    --readers is refused instead: tests/test_errors.py)."""
    from alexnet_base import resources
    monkeypatch.setattr(resources, "shm_free", lambda path=resources.SHM_DIR: 2**20)
    source = source_of(load_split(shards_jpeg, "train"), batch_size=32, packed=True)
    assert reading.fit_shared_memory(source, 2, 4, default=True, local_world=1, note=True) == 0
    err = capsys.readouterr().err
    assert "/dev/shm: 1 MiB free, but 4 reader processes need about" in err
    assert "reading in this process instead" in err and "--shm-size=1g" in err


def test_raw_shards_are_read_in_threads_without_shared_memory(monkeypatch, shards_raw):
    """Raw shards: the readers are threads of the pipeline's process, so no reader process
    starts and /dev/shm is not needed, however little is free."""
    import multiprocessing
    import threading
    from alexnet_base import resources
    monkeypatch.setattr(resources, "shm_free", lambda path=resources.SHM_DIR: 0)
    before = set(multiprocessing.active_children())
    cfg = LoaderConfig(data=shards_raw, batch_size=8, device="cpu", threads=1, readers=2)
    loader = folder_loader(cfg)
    assert next(iter(loader)).images.shape == (8, 3, 224, 224)
    assert loader.workers == (1, 2) and loader.shm == 0
    assert not set(multiprocessing.active_children()) - before  # no reader process started
    assert any(t.name.startswith("shard-reader") for t in threading.enumerate())


def assert_preview_shows_the_batch(out, data, images: int) -> None:
    """The preview (2 columns, 8 px apart: each 256 px original, then its 224 px crop as the
    model sees it, the normalisation undone; no lighting): the first train batch of epoch 0 is
    the first images of the seeded permutation (seed 0, epoch 0); each original is that shard
    image (PIL's decoding), its crop's red frame is where the shown crop came from."""
    import io
    from PIL import Image
    size, crop, pad = 256, 224, 8
    grid = np.asarray(Image.open(out).convert("RGB")).astype(int)
    rows = -(-images // 2)
    assert grid.shape == (rows * (size + pad) + pad, 2 * (size + crop + 3 * pad), 3)
    info = load_split(data, "train")
    starts = np.cumsum([0, *info.counts])
    for i, index in enumerate(np.random.default_rng([0, 0]).permutation(info.total)[:images]):
        s = int(np.searchsorted(starts, index, side="right") - 1)
        with h5py.File(info.files[s], "r") as f:
            o = f["offsets"][index - starts[s]:index - starts[s] + 2]
            stored = bytes(f["images"][o[0]:o[1]])
        original = np.asarray(Image.open(io.BytesIO(stored)).convert("RGB")).astype(int)
        r, c = divmod(i, 2)
        left, top = c * (size + crop + 3 * pad) + pad, r * (size + pad) + pad
        shown = grid[top:top + size, left:left + size]
        red = np.argwhere((shown == [255, 0, 0]).all(-1))
        y, x = red.min(0)  # the frame's top-left corner; the frame is drawn over the original
        inside = original[y + 1:y + crop, x + 1:x + crop]
        assert np.abs(shown[y + 1:y + crop, x + 1:x + crop] - inside).max() == 0, i
        seen = grid[top + (size - crop) // 2:top + (size - crop) // 2 + crop,
                    left + size + pad:left + size + pad + crop]
        window = original[y:y + crop, x:x + crop]
        error = min(np.abs(seen - window).mean(), np.abs(seen - window[:, ::-1]).mean())
        assert error < 2, (i, error)  # flipped or not; DALI's decoding against PIL's


@pytest.mark.slow
def test_bench_loader_and_preview_cli(tmp_path, shards_jpeg):
    proc = cli("bench-loader", "--data", shards_jpeg, "--device", "cpu", "--batch-size", "8",
               "--batches", "2", "--repeats", "1", "--warmup", "1", "--baseline", "--json")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["images_per_s"] > 0 and r["baseline_images_per_s"] > 0 and r["encoding"] == "jpeg"
    out = tmp_path / "grid.png"
    cli("preview", "--data", shards_jpeg, "--out", out, "--device", "cpu", "--images", "4",
        "--lighting-std", "0")
    assert_preview_shows_the_batch(out, shards_jpeg, images=4)
    bad = cli("bench-loader", "--data", tmp_path, "--device", "cpu", check=False)
    assert bad.returncode == 1 and "run `alexnet-pipe prepare` first" in bad.stderr
    bad = cli("bench-loader", "--data", shards_jpeg, "--device", "cpu", "--repeats", "0",
              check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert "--repeats 0: must be at least 1" in bad.stderr.strip().splitlines()[-1]
    from alexnet_base.config import BenchConfig
    for field, value, message in (("batches", 0, "--batches 0"), ("seconds", -1.0, "--seconds -1"),
                                  ("warmup", -1, "--warmup -1")):
        with pytest.raises(UserError, match=message):
            BenchConfig(loader=config(shards_jpeg), **{field: value}).validate()


def test_placement_is_decided_once_from_the_device():
    """What runs where, from the device alone: on a GPU (no CUDA call is needed to decide it)
    nvJPEG, the mean image in the graph, packed JPEG batches, channels_last unless turned off
    (--no-channels-last), spawned reader processes; on the CPU, none of those."""
    gpu = Placement.for_device(torch.device("cuda", 1))
    assert (gpu.device_id, gpu.dali_device, gpu.decoder, gpu.mean_image_in_graph, gpu.packed,
            gpu.channels_last, gpu.reader_start) == (1, "gpu", "mixed", True, True, True, "spawn")
    assert not Placement.for_device(torch.device("cuda", 0), channels_last=False).channels_last
    assert (CPU.device_id, CPU.dali_device, CPU.decoder, CPU.mean_image_in_graph, CPU.packed,
            CPU.channels_last) == (None, "cpu", "cpu", False, False, False)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_loader_benchmark_times_each_pipeline_in_its_own_process(tmp_path, shards_jpeg):
    """tools/bench_loader.py: DALI's file reader on the shard images extracted to files, and our
    loader, each timed in a spawned process of its own (an instance keeps its own speed), with
    the CPU time per image of each, reader processes included; and with `step`, each feeding
    the training step."""
    bench_loader = tool("bench_loader")
    files = tmp_path / "files"
    bench_loader.extract(shards_jpeg, files, raw=False)
    info = load_split(shards_jpeg, "train")
    assert len(list(files.rglob("*.jpg"))) == info.total
    cfg = LoaderConfig(data=shards_jpeg, batch_size=8, device="cpu", threads=1, readers=1,
                       augment=AugmentConfig(mean="channel"))
    spec = dict(gpu=False, files=files, batch=8, threads=1, config=cfg)
    rates, cpu = bench_loader.alternate({"native": "native", "jpeg": "jpeg"}, spec, 1, 0.5)
    assert set(rates) == set(cpu) == {"native", "jpeg"}
    assert all(len(r) == 1 and r[0] > 0 for r in rates.values())
    (native,), (ours,) = cpu["native"], cpu["jpeg"]
    assert native["DALI threads"] > 0 and ours["DALI threads"] > 0
    assert "readers" not in native and ours["readers"] > 0  # our one reader process's reads
    # --step: each batch trains the paper model, a step far dearer than a batch's loading
    # (about 1 ms of CPU an image here; the step tens of ms); DALI's own pipeline, whose labels
    # come as (B, 1) on the CPU
    rates, cpu = bench_loader.alternate({"native": "native"}, {**spec, "step": True}, 1, 0.5)
    assert all(r[0] > 0 for r in rates.values())
    assert all(sum(c[0].values()) > 5000 for c in cpu.values())
    # a pipeline that cannot run says why (the GPU report's row of that figure is this line)
    big = replace(cfg, batch_size=10 * info.total)
    with pytest.raises(RuntimeError, match=rf"the jpeg pipeline failed: UserError: "
                                           rf"--batch-size {10 * info.total}: larger than"):
        bench_loader.alternate({"jpeg": "jpeg"}, {**spec, "config": big}, 1, 0.5)


@pytest.mark.gpu
def test_gpu_pipeline_matches_cpu(shards_jpeg, shards_raw):
    """--hw-decoder-load 1: every JPEG to the GPU's decode engines, where it has them."""
    for data, hw in ((shards_raw, 0.65), (shards_jpeg, 0.65), (shards_jpeg, 1.0)):
        cpu, _, _ = first_batch(folder_loader(config(data)))
        gpu_loader = folder_loader(replace(config(data), device="gpu", hw_decoder_load=hw))
        for images, _, _, _ in gpu_loader:
            assert images.is_cuda
            gpu = images.cpu().numpy().astype(np.float64)
            break
        if data == shards_raw:  # the same float arithmetic on the same pixels
            np.testing.assert_allclose(gpu, cpu, atol=1e-3)
        else:  # nvJPEG vs libjpeg-turbo: the IDCTs differ by a level or two
            assert np.abs(cpu - gpu).mean() < 1.0


def test_dali_iterations_take_whole_batches_within_an_epoch():
    """Plan.position with 6 batches an epoch, 4 a DALI iteration, two epochs a stream,
    resumed at batch 3 of epoch 0: the table written out by hand. A plan reads no file."""
    from alexnet_pipe.plan import Plan
    plan = Plan(total=48, size=256, batch_size=8, train=True, augment=AugmentConfig(),
                start_batch=3, epochs=2, dali_batches=4)
    stream0 = [plan.position(0, i) for i in range(4)]
    assert stream0 == [(0, 3, 3), (1, 0, 4), (1, 4, 2), None]
    stream1 = [plan.position(1, i) for i in range(5)]
    assert stream1 == [(2, 0, 4), (2, 4, 2), (3, 0, 4), (3, 4, 2), None]


@pytest.mark.parametrize("split, batch, group, encoding", [
    ("train", 8, 4, "raw"), ("val", 5, 2, "raw"), ("train", 8, 4, "jpeg")])
@pytest.mark.slow
def test_batches_prepared_together_are_the_batches_prepared_one_by_one(shards_raw, shards_jpeg,
                                                                       split, batch, group,
                                                                       encoding):
    """--dali-batches K hands out the very batches of K = 1, resumed mid-epoch and across an
    epoch's end where K does not divide it (train: 6 batches an epoch, from batch 3, so DALI
    iterations of 3, 4 and 2 batches; val: 12 images in 3 batches of 5, the last padded); raw
    shards read by a reader thread, JPEG shards by a reader process."""
    def batches(k):
        data = shards_raw if encoding == "raw" else shards_jpeg
        cfg = replace(config(data, crop=112), batch_size=batch, dali_batches=k)
        loader = folder_loader(cfg, name=split, epochs=2, start_batch=3 if split == "train" else 0)
        return [[t.clone() for t in (b.images, b.labels, b.valid, b.index)]
                for _ in range(2) for b in loader]
    one, grouped = batches(1), batches(group)
    assert len(one) == len(grouped) == (3 + 6 if split == "train" else 3 + 3)
    for a, b in zip(one, grouped):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_the_readmes_own_model_snippet_runs_as_written(tmp_path, shards_jpeg):
    """README, "Your own model": the snippet, as the README has it, run where `make demo` left
    its shards (demo/shards: here the JPEG fixture, 48 train images, batches of 16): two epochs
    of 3 steps, a finite loss, and the position after each epoch the start of the next."""
    import subprocess
    import sys
    code = readme_snippet("## Your own model")
    assert len(code.strip().splitlines()) <= 15
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "shards").symlink_to(shards_jpeg)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=180, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split(", next ")[1] for line in lines] == ["(1, 0)", "(2, 0)"], lines
    assert all(np.isfinite(float(line.split("loss ")[1].split(",")[0])) for line in lines)


def test_the_library_loader_takes_its_place_from_torchrun_and_goes_on_from_a_position(
        monkeypatch, shards_raw):
    """open_shards + Shards.loader as a user calls them: under torchrun's RANK=1 of
    WORLD_SIZE=2 with batch_size=4, step s gives the second 4 of the s-th 8 of the epoch's
    permutation seeded by (seed, epoch) (README); a loader started at another's `position`
    (epoch 0, batch 2) gives the batches it would have given next, pixel for pixel."""
    from alexnet_pipe import open_shards
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    shards = open_shards(shards_raw, verify=False)
    assert set(shards.splits) == {"train", "val"} and shards.num_classes == 4
    total = shards.split("train").total
    order = np.random.default_rng([0, 0]).permutation(total)
    first = shards.loader("train", batch_size=4, device="cpu", threads=1, readers=0)
    got = []
    for images, labels in first:
        got.append(images.clone())
        if len(got) == 3:
            break
    assert first.position == (0, 3)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")  # and not from the environment: given
    from alexnet_pipe.distributed import DistEnv
    again = shards.loader("train", batch_size=4, device="cpu", threads=1, readers=0,
                          start_batch=2, ranks=DistEnv(rank=1, world=2))
    batch = next(iter(again))
    assert torch.equal(batch.images, got[2])
    assert batch.index.tolist() == order[2 * 8 + 4:3 * 8].tolist()
    with pytest.raises(TypeError, match="beside a config"):
        shards.loader("train", LoaderConfig(data=shards_raw), batch_size=4)
