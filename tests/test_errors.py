"""Bad input on the command line, as a user meets it: exit status 1, one line that names the file
or option, no traceback, and nothing written that was not there."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import ROOT, SMALL_CROP, cli

CPU = ["--device", "cpu", "--threads", "1", "--readers", "1"]


def assert_one_line_error(proc, *needles, decoder_log=False):
    """decoder_log: DALI's JPEG decoder logs its own line ("[jpeg_parser] Invalid marker") to
    stderr from C++ before ours; only that one may precede the message."""
    err = proc.stderr.strip()
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = err.splitlines()
    if decoder_log:
        lines = [line for line in lines if "[jpeg_parser]" not in line]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    err = lines[0]
    for needle in needles:
        assert needle in err, (needle, err)


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def train(data, out, *extra, env=None):
    return cli("train", "--data", data, "--out", out, "--batch-size", "8", *CPU, "--epochs", "1",
               "--crop", SMALL_CROP, *extra, check=False, env=env)


def test_truncated_shard(tmp_path, shards_small):
    data = copy(shards_small, tmp_path / "d")
    shard = data / "train-00000.h5"
    shard.write_bytes(shard.read_bytes()[:5000])
    proc = train(data, tmp_path / "run")
    assert_one_line_error(proc, str(shard))
    assert not (tmp_path / "run").exists()


def test_missing_stats(tmp_path, shards_small):
    data = copy(shards_small, tmp_path / "d")
    (data / "stats.h5").unlink()
    assert_one_line_error(train(data, tmp_path / "run"), str(data / "stats.h5"), "not found")


def test_manifest_count_mismatch(tmp_path, shards_small):
    data = copy(shards_small, tmp_path / "d")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["shards"][0]["images"] += 1
    manifest.pop("digest")  # as an older version wrote it: the count is what disagrees
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(train(data, tmp_path / "run"), manifest["shards"][0]["file"],
                          "the manifest says")


def test_truncated_checkpoint_and_class_count_mismatch(tmp_path, shards_small, straight_run,
                                                       coord_shards):
    good = straight_run / "checkpoints/epoch-0001.pt"
    bad = tmp_path / "cut.pt"
    bad.write_bytes(good.read_bytes()[:100_000])
    proc = cli("evaluate", "--checkpoint", bad, "--data", shards_small, "--device", "cpu",
               check=False)
    assert_one_line_error(proc, str(bad), "not a readable alexnet-pipe checkpoint")
    proc = cli("evaluate", "--checkpoint", good, "--data", coord_shards[0], "--device", "cpu",
               check=False)
    assert_one_line_error(proc, "4 classes", "3")


@pytest.mark.parametrize("extra, env, needles", [
    (["--device", "gpu"], None, ["--device gpu", "no CUDA GPU"]),
    (["--batch-size", "7"], {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"},
     ["--batch-size 7", "2 processes"]),
    (["--parallel", "ddp"], None, ["--parallel ddp", "torchrun"]),
    (["--divide-std"], None, ["--divide-std", "--mean channel"]),
    (["--hw-decoder-load", "1.5"], None, ["--hw-decoder-load 1.5", "between 0 and 1"]),
])
def test_bad_train_options(tmp_path, shards_small, extra, env, needles):
    proc = train(shards_small, tmp_path / "run", *extra,
                 env={**os.environ, **env} if env else None)
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_malformed_val_labels(tmp_path, sample_tree):
    labels = tmp_path / "labels.txt"
    labels.write_text("ILSVRC2012_val_00000001.JPEG n01440764\nthree words here\n")
    proc = cli("prepare", "--imagenet-root", sample_tree, "--out", tmp_path / "o",
               "--val-labels", labels, check=False)
    assert_one_line_error(proc, f"{labels}:2", "filename wnid")


def test_corrupt_jpeg_inside_a_shard(tmp_path, shards_jpeg):
    data = copy(shards_jpeg, tmp_path / "d")
    shard = data / "train-00001.h5"
    with h5py.File(shard, "a") as f:  # image 3's bytes overwritten in place, same length
        key = f["keys"][3].decode()
        start, end = int(f["offsets"][3]), int(f["offsets"][4])
        junk = (b"\xff\xd8\xff\xe0 this is no JPEG " * 4000)[:end - start]
        f["images"][start:end] = np.frombuffer(junk, np.uint8)
    # read as it is (--no-verify): the decoder meets it mid-run, and the loader names it
    proc = cli("bench-loader", "--data", data, *CPU, "--batch-size", "8", "--batches", "8",
               "--repeats", "1", "--warmup", "0", "--no-verify", check=False)
    assert_one_line_error(proc, str(shard), key, decoder_log=True)
    # by default its digest names it before anything is read
    proc = cli("bench-loader", "--data", data, *CPU, "--batch-size", "8", "--batches", "8",
               "--repeats", "1", "--warmup", "0", check=False)
    assert_one_line_error(proc, str(shard), "damaged")


def cli_with_small_shm(size: str, *args) -> subprocess.CompletedProcess:
    """`alexnet-pipe ARGS` in a private mount namespace whose /dev/shm is a tmpfs of `size`, as
    in a container (Docker's default is 64 MiB). Skips where that is not allowed (needs root)."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a private mount namespace here (needs root)")
    script = f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$@"'
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", sys.executable, "-m",
                           "alexnet_pipe", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=180)


def test_reader_processes_that_do_not_fit_in_dev_shm(shards_raw, shards_jpeg):
    """DALI's reader processes (JPEG shards) hand batches over in /dev/shm. Where they do not
    fit, DALI's worker dies of SIGBUS and the loader says only "Worker data receiving
    interrupted". Raw shards are read in threads and need none."""
    bench = ["bench-loader", "--device", "cpu", "--threads", "1", "--batch-size", "32",
             "--batches", "2", "--repeats", "1", "--warmup", "1", "--json"]
    # chosen --readers: refused in one line, with what to do (4 buffers of 1 MiB and more)
    proc = cli_with_small_shm("2m", *bench, "--data", shards_jpeg, "--readers", "1")
    assert_one_line_error(proc, "--readers 1", "/dev/shm: 2 MiB free", "--readers 0",
                          "--shm-size")
    # the CPU's default reads in this process: no /dev/shm needed, nothing to say
    proc = cli_with_small_shm("1m", *bench, "--data", shards_jpeg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "/dev/shm" not in proc.stderr and json.loads(proc.stdout)["readers"] == 0
    # with just the room the loader estimates (4 buffers, each 2x the mean file bytes of 32
    # images + 1 MiB), the reader process runs: the estimate is not optimistic
    files = sorted(shards_jpeg.glob("train-*.h5"))
    images = 0
    for f in files:
        with h5py.File(f, "r") as h:
            images += len(h["labels"])
    need = 4 * (32 * 2 * sum(f.stat().st_size for f in files) / images + 2**20)
    proc = cli_with_small_shm(f"{int(need / 2**20) + 1}m", *bench, "--data", shards_jpeg,
                              "--readers", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["readers"] == 1
    # raw shards: 2 reader threads, whatever /dev/shm holds
    proc = cli_with_small_shm("1m", *bench, "--data", shards_raw, "--readers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["readers"] == 2 and "/dev/shm" not in proc.stderr


def test_ten_crop_readers_count_the_readers_already_running(tmp_path, shards_jpeg):
    """train --ten-crop builds its ten-crop loader while the train and val readers still hold
    their /dev/shm: with room for those two but not for a third, the ten-crop loader is
    refused in one line (readers chosen) instead of dying of SIGBUS."""
    files = sorted(shards_jpeg.glob("*-*.h5"))
    per_image = sum(f.stat().st_size for f in files) / 60  # 48 train + 12 val images
    each = 4 * (4 * 2 * per_image + 2**20)  # one pipeline's buffers at batch 4 (see the above)
    proc = cli_with_small_shm(f"{int(2.5 * each / 2**20) + 1}m", "train", "--data", shards_jpeg,
                              "--out", tmp_path / "run", *CPU, "--batch-size", "4",
                              "--epochs", "1", "--ten-crop",
                              "--bias-init", "caffe")
    assert_one_line_error(proc, "--readers 1", "/dev/shm", "needs about")

