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

from conftest import (ROOT, SMALL_CROP, cli, overwrite_image, small_tmpfs, source_of,
                      train_args)

CPU = ["--device", "cpu", "--threads", "1", "--readers", "1"]


def assert_one_line_error(proc, *needles, decoder_log=None):
    """decoder_log: what DALI's JPEG decoder logs to stderr from C++ beside ours (libjpeg's
    message, "Bogus Huffman table definition"); only lines holding it may come with ours."""
    err = proc.stderr.strip()
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = err.splitlines()
    if decoder_log:
        lines = [line for line in lines if decoder_log not in line]
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


@pytest.mark.slow
def test_truncated_shard(tmp_path, shards_small):
    data = copy(shards_small, tmp_path / "d")
    shard = data / "train-00000.h5"
    shard.write_bytes(shard.read_bytes()[:5000])
    proc = train(data, tmp_path / "run")
    assert_one_line_error(proc, str(shard))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_missing_stats(tmp_path, shards_small):
    data = copy(shards_small, tmp_path / "d")
    (data / "stats.h5").unlink()
    assert_one_line_error(train(data, tmp_path / "run"), str(data / "stats.h5"), "not found")


@pytest.mark.slow
def test_manifest_count_mismatch(tmp_path, shards_small):
    data = copy(shards_small, tmp_path / "d")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["shards"][0]["images"] += 1
    manifest.pop("digest")  # as an older version wrote it: the count is what disagrees
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(train(data, tmp_path / "run"), manifest["shards"][0]["file"],
                          "the manifest says")


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_train_split_of_unreadable_files_names_them(tmp_path):
    """Every training file undecodable (say, another format under .JPEG names): no statistics
    can be made, and the error says how many files were tried and why the first failed."""
    folder = tmp_path / "tree" / "train" / "n01440764"
    folder.mkdir(parents=True)
    for name in ("a.JPEG", "b.JPEG"):
        (folder / name).write_text("not a picture\n")
    proc = cli("prepare", "--imagenet-root", tmp_path / "tree", "--out", tmp_path / "out",
               "--splits", "train", "--workers", "1", check=False)
    assert_one_line_error(proc, str(tmp_path / "tree" / "train"), "no readable training image",
                          "none of its 2 could be read", "train/n01440764/a.JPEG",
                          "not an image")


@pytest.mark.slow
def test_a_batch_larger_than_memory_allows_is_one_line_and_a_smaller_one_runs(tmp_path):
    """Under a 2 GB address-space limit (ulimit -v), a batch of 512 cannot be held by DALI
    (3 x 512 x 224 x 224 x 3 float32 outputs alone are 924 MB, besides the images): one line
    naming the batch and what to lower, no traceback; the advice works (batch 16 runs)."""
    import resource
    from preprocessing.prepare import run as prepare_run
    from preprocessing.sample import make_sample
    from alexnet_base.config import PrepareConfig
    make_sample(tmp_path / "tree", 4, 128, 1, seed=0, quirks=False, large=0)
    prepare_run(PrepareConfig(imagenet_root=tmp_path / "tree", out=tmp_path / "raw",
                              encoding="raw", workers=1, progress=False))

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (2 * 10**9, 2 * 10**9))

    def bench(batch):
        return cli("bench-loader", "--data", tmp_path / "raw", "--batch-size", batch,
                   "--seconds", "0.5", "--threads", "1", check=False, preexec_fn=limit,
                   timeout=120)
    assert_one_line_error(bench(512), "ran out of memory", "batches of 512 images",
                          "--batch-size")
    ok = bench(16)
    assert ok.returncode == 0 and "images/s" in ok.stdout, ok.stderr[-2000:]


@pytest.mark.slow
def test_a_picture_that_cannot_be_written_is_one_line(tmp_path, straight_run):
    """plot and filters: --out under a regular file (its folder cannot be made, whoever runs
    the test), in a folder that cannot be written, or with a suffix no picture format has: one
    line naming --out; nothing is left behind."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    ckpt = straight_run / "checkpoints/epoch-0002.pt"
    for cmd in (["plot", straight_run], ["filters", "--checkpoint", ckpt]):
        proc = cli(*cmd, "--out", blocker / "x.png", check=False)
        assert_one_line_error(proc, f"--out {blocker / 'x.png'}: {blocker}: cannot make the "
                              f"folder (EEXIST")
        proc = cli(*cmd, "--out", "/proc/x.png", check=False)  # no file can be made in /proc
        assert_one_line_error(proc, "--out /proc/x.png: cannot write the picture (E")
        proc = cli(*cmd, "--out", tmp_path / "x.gif", check=False)
        assert_one_line_error(proc, f"--out {tmp_path / 'x.gif'}", ".png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    cli("plot", straight_run, "--out", tmp_path / "curves.pdf")  # a format by its suffix
    assert (tmp_path / "curves.pdf").read_bytes()[:5] == b"%PDF-"


@pytest.mark.slow
def test_predict_refuses_a_folder_and_no_classes(tmp_path, straight_run):
    ckpt = straight_run / "checkpoints/epoch-0002.pt"
    assert_one_line_error(cli("predict", tmp_path, "--checkpoint", ckpt, check=False),
                          f"{tmp_path}: a folder; give image files", str(tmp_path / "*"))
    image = tmp_path / "x.png"
    image.write_bytes(b"")  # refused before it is read
    assert_one_line_error(cli("predict", image, "--checkpoint", ckpt, "--top", "0",
                              check=False), "--top 0: must be at least 1")


class NotOurs:
    """An object no checkpoint of alexnet-pipe holds."""


def test_unreadable_checkpoints_say_why_in_one_line(tmp_path):
    """Each kind of file that is not a checkpoint gets its own reason, on one line, and never
    torch's advice to load it with weights_only=False (which would run the code it holds)."""
    import torch
    from alexnet_base.errors import UserError
    from alexnet_pipe import checkpoint
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(1000)}, good)
    torch.save({"model": NotOurs()}, tmp_path / "object.pt")
    files = {"empty.pt": b"", "text.pt": b"hello world\n", "bytes.pt": bytes(range(256)) * 4,
             "cut.pt": good.read_bytes()[:2000]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "run.pt").mkdir()
    want = {"empty.pt": "(the file is empty)",
            "text.pt": "(not a file torch.save wrote: it does not begin as a zip archive)",
            "bytes.pt": "(not a file torch.save wrote: it does not begin as a zip archive)",
            "cut.pt": "(damaged or cut short: failed reading zip archive",
            "object.pt": "(it holds an object of class test_errors.NotOurs, which a checkpoint",
            "run.pt": ": a folder; give a checkpoint file"}
    for name, reason in want.items():
        with pytest.raises(UserError) as e:
            checkpoint.load(tmp_path / name)
        msg = str(e.value)
        assert str(tmp_path / name) in msg and reason in msg, msg
        assert "\n" not in msg and "weights_only" not in msg, msg


@pytest.mark.parametrize("extra, env, needles", [
    (["--device", "gpu"], None, ["--device gpu", "no CUDA GPU"]),
    (["--batch-size", "7"], {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"},
     ["--batch-size 7", "2 processes", "--batch-size 6 or 8 would", "on 1, 7 processes"]),
    (["--save-every", "0"], None, ["--save-every 0", "at least 1"]),
    (["--save-every", "-3"], None, ["--save-every -3", "at least 1"]),
    (["--parallel", "ddp"], None, ["--parallel ddp", "torchrun"]),
    (["--divide-std"], None, ["--divide-std", "--mean channel"]),
    (["--hw-decoder-load", "1.5"], None, ["--hw-decoder-load 1.5", "between 0 and 1"]),
    # each used to start training (and diverge, or end in torch's or numpy's traceback)
    (["--dropout", "1.5"], None, ["--dropout 1.5", "at least 0 and below 1"]),
    (["--momentum", "1"], None, ["--momentum 1.0", "at least 0 and below 1"]),
    (["--weight-decay", "-0.1"], None, ["--weight-decay -0.1", "at least 0"]),
    (["--lr-factor", "2"], None, ["--lr-factor 2.0", "at most 1"]),
    (["--seed", "-1"], None, ["--seed -1", "at least 0"]),
])
@pytest.mark.slow
def test_bad_train_options(tmp_path, shards_small, extra, env, needles):
    proc = train(shards_small, tmp_path / "run", *extra,
                 env={**os.environ, **env} if env else None)
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_what_a_relaunch_may_change_is_options_of_train_and_never_the_recipe():
    """config.RELAUNCH_MAY_CHANGE names options of train as runs.same_run compares them
    (a renamed option left there would silently become part of the recipe), and none of the
    recipe, the seed or the global batch, written out here from the paper's and README's."""
    from pathlib import Path
    from alexnet_base.config import RELAUNCH_MAY_CHANGE, LoaderConfig, TrainConfig
    from alexnet_pipe import runs
    options = runs._flat(runs.plain(TrainConfig(loader=LoaderConfig(data=Path("d")),
                                                out=Path("o"))))
    assert RELAUNCH_MAY_CHANGE <= options.keys()
    recipe = {"arch", "bias_init", "bias_rule", "dropout", "lr", "lr_factor", "lr_patience",
              "max_lr_drops", "momentum", "weight_decay", "loader.seed", "loader.batch_size",
              "loader.augment.crop", "loader.augment.mean", "loader.augment.flip",
              "loader.augment.divide_std", "loader.augment.lighting_std",
              "loader.augment.lighting_scale"}
    assert recipe <= options.keys() and not recipe & RELAUNCH_MAY_CHANGE
    assert options.keys() - RELAUNCH_MAY_CHANGE == recipe  # nothing else is the recipe


def contents(folder) -> dict:
    """Every file under `folder`: its bytes' sha256 (what "nothing written over" compares)."""
    import hashlib
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_resume_auto_refuses_another_run_in_one_line(tmp_path, shards_small, shards_raw,
                                                     straight_run):
    """train --resume auto on a run folder whose run had other options (the recipe, the seed,
    the global batch, other data), whose config.json is damaged or cannot be read, or with a
    number of ranks that cannot split its global batch: one line each, naming the options and
    what to do, and the folder as it was, byte for byte."""
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    before = contents(run)

    def resume(*extra, data=shards_small, env=None):
        return cli(*train_args(data, run, "--epochs", "3", "--resume", "auto", *extra),
                   check=False, env={**os.environ, **env} if env else None)
    assert_one_line_error(resume("--lr", "0.01", "--seed", "2"), "--resume auto:",
                          "--lr 0.005 (now 0.01)", "--seed 0 (now 2)", "another --out")
    assert_one_line_error(resume("--batch-size", "4"), "--batch-size 8 (now 4)")
    assert_one_line_error(resume(data=shards_raw), f"--data {shards_raw}: other data")
    assert_one_line_error(resume(env={"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}),
                          "--batch-size 8: the global batch does not divide by the 3 processes",
                          "keep 8 (a run that continues keeps its batch) on 1, 2, 4, 8 processes")
    assert contents(run) == before
    config = run / "config.json"
    config.write_text('{"loader": {"data": ')  # cut short
    assert_one_line_error(resume(), f"{config}: damaged", "--resume")
    config.unlink()
    config.mkdir()  # unreadable whoever runs the test, root included
    assert_one_line_error(resume(), f"{config}: cannot read the run configuration (EISDIR")
    config.rmdir()
    assert contents(run) == {k: v for k, v in before.items() if k.name != "config.json"}


@pytest.mark.slow
def test_a_run_folder_that_cannot_be_made_or_a_full_log_is_one_line(tmp_path, shards_small):
    """train --out under a regular file (whoever runs the test): one line with the errno,
    before anything is written. A log write on a really full file system (a 64 KB tmpfs, root
    only): one line naming the log and ENOSPC, and how to go on."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = train(shards_small, blocker / "run")
    assert_one_line_error(proc, f"--out {blocker / 'run'}: cannot make the run folder (ENOTDIR")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    from alexnet_base.errors import UserError
    from alexnet_pipe.meters import Log
    with small_tmpfs(tmp_path / "small", "64k") as mnt:
        log = Log(mnt, True)
        log.record(kind="step", loss=1.0)
        (mnt / "filler").write_bytes(b"\0" * 40_000)
        with pytest.raises(UserError) as e:
            log.record(kind="step", text="x" * 40_000)
        msg = str(e.value)
        assert f"{mnt / 'metrics.jsonl'}: cannot write the log (ENOSPC" in msg, msg
        assert "--resume" in msg and "\n" not in msg, msg
        (mnt / "filler").unlink()  # room for what is still buffered: the files close
        log.text.close()
        log.jsonl.close()


@pytest.mark.slow
def test_malformed_val_labels(tmp_path, sample_tree):
    labels = tmp_path / "labels.txt"
    labels.write_text("ILSVRC2012_val_00000001.JPEG n01440764\nthree words here\n")
    proc = cli("prepare", "--imagenet-root", sample_tree, "--out", tmp_path / "o",
               "--val-labels", labels, check=False)
    assert_one_line_error(proc, f"{labels}:2", "filename wnid")


def _bogus_huffman(stream: bytes) -> bytes:
    """The first DHT's 16 code counts set to 255: a table of 4,080 codes, where 256 is the most
    there can be. The markers still chain: only decoding fails."""
    at = stream.index(b"\xff\xc4") + 5  # marker, length (2), table class and id
    return stream[:at] + b"\xff" * 16 + stream[at + 16:]


@pytest.mark.slow
def test_jpeg_marker_check_by_hand_and_against_dali():
    """jpeg.header_problem, what stands between an unverified shard and DALI's decoder:
    streams built by hand (expected answers worked out from ISO/IEC 10918-1's marker syntax),
    every kind of stream PIL writes passes, and over 150 damaged copies of one it refuses
    nothing that DALI's own decoder decodes (one image a batch: nothing queued behind it)."""
    import io

    from nvidia.dali import fn, pipeline_def, types
    from PIL import Image

    from alexnet_pipe.jpeg import header_problem as check
    # a frame header: length 17 (counting itself), precision 8, 16 x 16, 3 components of 3
    # bytes; a scan header: length 12, 3 components of 2 bytes, then 3 bytes
    sof = b"\xff\xc0\x00\x11\x08\x00\x10\x00\x10\x03" + bytes(9)
    sos = b"\xff\xda\x00\x0c\x03" + bytes(6) + b"\x00\x3f\x00"
    assert check(b"\xff\xd8" + sof + sos) is None
    assert check(b"\xff\xd8\xff\xff" + sof[1:] + sos) is None  # fill bytes before a code
    assert check(b"\xff\xd8\xff\xd0" + sof + sos) is None  # RST0 stands alone
    assert check(b"GIF89a" + sof + sos) == "no JPEG start-of-image marker"
    assert check(b"\xff\xd8\xff\xfe\x00\x05abc" + sos) == "no frame header before the scan"
    assert check(b"\xff\xd8" + sof[:9]) == "the segment at byte 2 runs past the end of the stream"
    assert check(b"\xff\xd8" + sof + b"\x00" + sos) == "invalid marker at byte 21"
    assert check(b"\xff\xd8" + sof + b"\xff\xd9") == "invalid marker at byte 21"  # EOI first
    assert check(b"\xff\xd8" + sof) == "it ends inside its headers"
    assert check(b"\xff\xd8" + sof[:9] + b"\x47" + sof[10:] + sos) == (
        "the frame header at byte 2 does not hold its 71 components")  # 8 + 3 x 71 != 17
    assert check(b"\xff\xd8" + sof + sos[:4] + b"\x00" + sos[5:]) == (
        "the scan header at byte 21 does not hold its 0 components")
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
    written = []
    for image, options in ((rgb, {}), (rgb, {"progressive": True}), (rgb, {"optimize": True}),
                           (rgb.convert("L"), {}), (rgb, {"restart_marker_blocks": 1}),
                           (rgb, {"comment": b"a comment"}), (rgb, {"exif": b"Exif\x00\x00" +
                                                                    bytes(64)}),
                           (rgb, {"icc_profile": bytes(3000)}), (rgb, {"quality": 20})):
        buf = io.BytesIO()
        image.save(buf, "JPEG", **options)
        written.append(buf.getvalue())
        assert check(written[-1]) is None, options

    def dali_decodes(stream: bytes) -> bool:
        @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
        def one():
            x = fn.external_source(source=lambda: [np.frombuffer(stream, np.uint8)], batch=True)
            return fn.decoders.image(x, device="cpu", output_type=types.RGB)
        pipe = one()
        pipe.build()
        try:
            pipe.run()
            return True
        except Exception:  # noqa: BLE001 - DALI's error, whichever class
            return False

    good = written[0]
    scan = good.index(b"\xff\xda") + 14
    damaged = [good[:cut] for cut in range(1, scan, 7)]
    for at in range(0, scan, 3):
        damaged += [good[:at] + bytes([v]) + good[at + 1:] for v in (0x00, 0x7F, 0xFF)]
    refused = [d for d in damaged if check(d) is not None]
    assert len(damaged) > 150 and len(refused) > 40  # the check does refuse things
    assert not [d for d in refused if dali_decodes(d)]


def test_the_marker_check_reads_packed_batches_too(tmp_path, shards_jpeg):
    """What a GPU decoder is fed (one zero-padded row an image): the damaged row is named, and
    an intact batch passes."""
    from alexnet_base.errors import UserError
    from preprocessing.shards import load_split
    data = copy(shards_jpeg, tmp_path / "d")
    key = overwrite_image(data / "train-00001.h5", 3, lambda s: b"\xff\xd8\xff\xe1" + bytes(len(s) - 4))
    source = source_of(load_split(data, "train"), batch_size=4, train=False, crop=200,
                       packed=True, check_jpeg=True)
    errors = []
    for b in range(source.plan.num_batches()):
        try:
            source.batch(0, b)
        except UserError as e:
            errors.append(str(e))
    assert len(errors) == 1 and key in errors[0] and "train-00001.h5" in errors[0], errors
    assert "(the segment at byte 2 has length 0)" in errors[0]  # APP1's: 2 at the least


@pytest.mark.slow
@pytest.mark.parametrize("readers", ["0", "1"])  # in this process, a reader process
def test_corrupt_jpeg_inside_a_shard(tmp_path, shards_jpeg, readers):
    """Read as it is (--no-verify), a damaged JPEG is named by shard and key, the run ending
    with one line: headers that do not parse are refused by the reader before DALI's decoder
    sees them (its parser's error crashes DALI 2.4 in half the runs at batch 128); a stream
    whose markers parse but whose tables are bogus fails in the decoder, and the loader finds
    it. By default the digests name the shard before anything is read."""
    junk = (b"\xff\xd8\xff\xe0 this is no JPEG " * 4000)
    cpu = ["--device", "cpu", "--threads", "1", "--readers", readers]
    for name, damage, needles in (  # the first APP0's length leads to byte 4 + 0x2074 = 8312
            ("headers", lambda s: junk[:len(s)], ["invalid marker at byte 8312"]),
            ("tables", _bogus_huffman, ["cannot be decoded"])):
        data = copy(shards_jpeg, tmp_path / name)
        shard = data / "train-00001.h5"
        key = overwrite_image(shard, 3, damage)
        args = ["bench-loader", "--data", data, *cpu, "--batch-size", "8", "--batches", "8",
                "--repeats", "1", "--warmup", "0"]
        proc = cli(*args, "--no-verify", check=False)
        assert_one_line_error(proc, str(shard), key, *needles,
                              decoder_log="Bogus Huffman table" if name == "tables" else None)
        if name == "headers":  # refused before DALI: not a word from its decoder
            assert "jpeg_parser" not in proc.stderr
        assert_one_line_error(cli(*args, check=False), str(shard), "damaged")  # by default


def cli_with_small_shm(size: str, *args) -> subprocess.CompletedProcess:
    """`alexnet-pipe ARGS` in a private mount namespace whose /dev/shm is a tmpfs of `size`, as
    in a container (Docker's default is 64 MiB). Skips where that is not allowed (needs root)."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a private mount namespace here (needs root)")
    script = f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$@"'
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", sys.executable, "-m",
                           "alexnet_pipe", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=180)


@pytest.mark.slow
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


@pytest.mark.slow
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



@pytest.mark.slow
@pytest.mark.timeout(200)
def test_export_refuses_in_one_line_and_writes_nothing(tmp_path, straight_run):
    """Not a checkpoint, an --out that cannot be written (a folder; under a file), an unknown
    --format (click's usage error, one line too, exit 2), torchvision's format for the paper's
    arch: one line naming the file or option, and the folder as it was."""
    ckpt = straight_run / "checkpoints/epoch-0002.pt"
    out = tmp_path / "out"
    out.mkdir()
    (out / "a-file").write_text("mine\n")
    cases = [
        (["--checkpoint", straight_run / "metrics.jsonl", "--out", out / "m.onnx"],
         [str(straight_run / "metrics.jsonl"), "not a readable alexnet-pipe checkpoint"]),
        (["--checkpoint", ckpt, "--out", out], ["--out", str(out), "a folder"]),
        (["--checkpoint", ckpt, "--out", out / "a-file" / "m.onnx"], ["--out", "a-file"]),
        (["--checkpoint", ckpt, "--out", out / "m.pth", "--format", "torchvision"],
         [str(ckpt), "alexnet-owt"]),
    ]
    for args, needles in cases:
        assert_one_line_error(cli("export", *args, check=False), *needles)
        assert sorted(p.name for p in out.iterdir()) == ["a-file"], args
    proc = cli("export", "--checkpoint", ckpt, "--out", out / "m.onnx", "--format", "bogus",
               check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert line.startswith("Error: ") and "'--format'" in line and "onnx" in line, line
    assert sorted(p.name for p in out.iterdir()) == ["a-file"]
    assert (out / "a-file").read_text() == "mine\n"
