"""`train` as users run it: real subprocesses, real DALI pipelines on the CPU, torchrun with gloo."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from alexnet_pipe.model import build_model
from conftest import (COMPILE_CHECK, HARNESS, ROOT, SMALL_CROP, SMALL_SIZE,
                      assert_board_filters, assert_compiled_like_eager, cli, records, run_group,
                      small_tmpfs, train_args, weights)



def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.slow
def test_learning_loss_falls(tmp_path, shards_paper):
    run = tmp_path / "run"
    # Overfitting two batches: no dropout, no flips or lighting, a constant learning rate. The
    # paper's geometry: from the paper's N(0, 0.01) start, the small crop's model (a ninth of
    # fc6's inputs) leaves its plateau too late and too erratically for this.
    cli(*train_args(shards_paper, run, "--crop", "224", "--epochs", "12", "--no-flip",
                    "--lighting-std", "0", "--max-lr-drops", "0", "--dropout", "0", "--lr",
                    "0.008"))
    losses = [r["loss"] for r in records(run, "step")]
    assert len(losses) == 24
    start = sum(losses[:4]) / 4  # about ln(4) = 1.39
    assert min(losses[12:]) < 0.6 * start, losses


def harness(*args, env: dict, check=True, timeout=300) -> subprocess.CompletedProcess:
    """`alexnet-pipe ARGS` through tests/harness.py, with the faults that `env` names."""
    proc = run_group([sys.executable, str(HARNESS), *map(str, args)], cwd=ROOT,
                     env={**os.environ, **env}, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"harness {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_is_exact(tmp_path, shards_small, straight_run):
    """Interrupted and resumed with the reads in the trainer's own process (--readers 0, the
    CPU default for raw shards); the straight run read them in a reader process: the same
    weights, wherever the batches were read."""
    run = tmp_path / "run"
    # The signal arrives after step 1 of 2 in epoch 1: deterministically mid-epoch.
    proc = harness(*train_args(shards_small, run, "--epochs", "2", "--readers", "0"),
                   env={"HARNESS_FAULT": "sigterm@1"}, check=False)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert "continue with --resume" in proc.stdout
    state = torch.load(run / "checkpoints/interrupt.pt", weights_only=True)
    assert (state["epoch"], state["batch"], state["step"]) == (0, 1, 1)
    assert state["torch"] == torch.__version__  # what wrote it
    assert not list((run / "checkpoints").glob("epoch-*.pt"))
    # resumed with every host read of a tensor refused outside log points (a GPU sync there)
    harness(*train_args(shards_small, run, "--epochs", "2", "--resume", "--readers", "0"),
            env={"HARNESS_SYNC_DEBUG": "1"})
    assert_same_weights(run / "checkpoints/epoch-0002.pt", straight_run / "checkpoints/epoch-0002.pt")
    assert not (run / "checkpoints/interrupt.pt").exists()


@pytest.mark.slow
def test_nan_after_a_good_epoch_keeps_that_epoch(tmp_path, shards_small, straight_run):
    run = tmp_path / "run"
    # Step 3 (the first of epoch 2) turns the weights into NaN: the loss of step 4 is NaN.
    proc = harness(*train_args(shards_small, run, "--epochs", "2"), env={"HARNESS_FAULT": "nan@3"},
                   check=False)
    assert proc.returncode == 1 and "non-finite loss at step" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert [p.name for p in (run / "checkpoints").glob("epoch-*.pt")] == ["epoch-0001.pt"]
    assert_same_weights(run / "checkpoints/epoch-0001.pt", straight_run / "checkpoints/epoch-0001.pt")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["raise", "sigkill"])
def test_crash_inside_a_checkpoint_save_keeps_the_previous_one(tmp_path, shards_small,
                                                              straight_run, how):
    run = tmp_path / "run"
    # The second save (epoch 2) writes half a file, then fails with ENOSPC or dies.
    proc = harness(*train_args(shards_small, run, "--epochs", "2"),
                   env={"HARNESS_SAVE_FAULT": f"{how}@2"}, check=False)
    ckpts = run / "checkpoints"
    if how == "raise":
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        err = proc.stderr.strip().splitlines()[-1]
        assert "epoch-0002.pt" in err and "No space left on device" in err, err
        assert not list(ckpts.glob("*.tmp*"))
    else:
        assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in ckpts.glob("*.pt")) == ["best.pt", "epoch-0001.pt"]
    saved = [line.split()[2:] for line in proc.stderr.splitlines() if line.startswith("HARNESS saved")]
    assert saved == [["epoch-0001.pt", hashlib.sha256((ckpts / "epoch-0001.pt").read_bytes()).hexdigest()]]
    cli(*train_args(shards_small, run, "--epochs", "2", "--resume"))
    assert not list(ckpts.glob("*.tmp*"))  # a killed save's leftovers are cleared on resume
    assert_same_weights(ckpts / "epoch-0002.pt", straight_run / "checkpoints/epoch-0002.pt")


@pytest.mark.slow
def test_keep_best_and_resume_across_a_learning_rate_drop(tmp_path, shards_small):
    """A tiny rate keeps the val error flat: with patience 2 the rate drops after epoch 3, the
    second epoch in a row without a better error. The run resumed after epoch 2 drops it at the
    same point only if the count of epochs without improvement (1 then) came back with it."""
    args = ["--lr", "1e-5", "--lr-patience", "2", "--keep", "1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    cli(*train_args(shards_small, straight, "--epochs", "4", *args))
    cli(*train_args(shards_small, split, "--epochs", "2", *args))
    cli(*train_args(shards_small, split, "--epochs", "4", "--resume", *args))
    epochs = records(straight, "epoch")
    lrs = [r["lr"] for r in epochs]
    assert lrs[:3] == [1e-5] * 3 and lrs[3] == pytest.approx(1e-6), lrs  # the premise: a drop
    assert [r["lr"] for r in records(split, "epoch")] == lrs
    assert "resumed from" in (split / "train.log").read_text()
    for r in records(split, "epoch"):  # what every epoch record holds
        assert {"train_loss", "lr", "top1_err", "top5_err", "images_per_s", "data_wait"} <= r.keys()
        assert 0 <= r["data_wait"] < 1 and r["train_loss"] > 0
    assert [r["step"] for r in records(split, "epoch")] == [2, 4, 6, 8]
    assert_same_weights(split / "checkpoints/epoch-0004.pt", straight / "checkpoints/epoch-0004.pt")
    names = sorted(p.name for p in (straight / "checkpoints").glob("*.pt"))
    assert names == ["best.pt", "epoch-0004.pt"]  # --keep 1
    errors = [r["top1_err"] for r in epochs]
    best = torch.load(straight / "checkpoints/best.pt", weights_only=True)
    assert best["epoch"] == errors.index(min(errors)) + 1  # the first epoch with the least error
    r = json.loads(cli("evaluate", "--checkpoint", straight / "checkpoints/best.pt", "--data",
                       shards_small, "--device", "cpu", "--json").stdout)
    assert r["top1_err"] == min(errors)


def test_evaluate_and_ten_crop_against_an_independent_loop(tmp_path, shards_small, straight_run):
    ckpt = straight_run / "checkpoints/epoch-0002.pt"
    state = torch.load(ckpt, weights_only=True)
    model = build_model("alexnet", 4, SMALL_CROP).double().eval()
    model.load_state_dict({k: v.double() for k, v in state["model"].items()})
    c, e = (SMALL_SIZE - SMALL_CROP) // 2, SMALL_SIZE - SMALL_CROP  # centre, far edge
    images, labels = [], []
    for path in sorted(shards_small.glob("val-*.h5")):
        with h5py.File(path, "r") as f:
            images.append(f["images"][...])
            labels.append(f["labels"][...])
    images, labels = np.concatenate(images), torch.from_numpy(np.concatenate(labels)).long()
    with h5py.File(shards_small / "stats.h5", "r") as f:
        mean = f["channel_mean"][...]  # the run used --mean channel

    def logits_at(x, y, flip):
        crop = images[:, y:y + SMALL_CROP, x:x + SMALL_CROP]
        crop = crop[:, :, ::-1] if flip else crop
        batch = torch.from_numpy(np.ascontiguousarray((crop - mean).transpose(0, 3, 1, 2)))
        with torch.no_grad():
            return model(batch)

    def errors(logits):
        top5 = logits.topk(4, 1).indices  # 4 classes: top-5 is every class
        return (1 - (top5[:, 0] == labels).double().mean().item(),
                1 - (top5 == labels[:, None]).any(1).double().mean().item())

    def loss(log_probs):  # the mean cross-entropy, from log-probabilities
        return -log_probs.gather(1, labels[:, None]).mean().item()

    centre_logits = logits_at(c, c, False)
    centre = (*errors(centre_logits), loss(torch.log_softmax(centre_logits, 1)))
    crops = [(0, 0), (e, 0), (0, e), (e, e), (c, c)]  # the corners and the centre
    probs = torch.stack([torch.softmax(logits_at(x, y, f), 1) for x, y in crops
                         for f in (False, True)]).mean(0)  # the ten softmax outputs averaged
    ten = (*errors(probs), loss(probs.log()))
    # Batch 5 over 12 images: the last batch holds 2 images and 3 masked paddings. A batch
    # far beyond the split is one batch of the split (padding it would need 600 GB).
    for batch, extra, want in (("5", [], centre), ("5", ["--ten-crop"], ten),
                               ("1000000", [], centre)):
        proc = cli("evaluate", "--checkpoint", ckpt, "--data", shards_small, "--device", "cpu",
                   "--batch-size", batch, "--json", *extra)
        r = json.loads(proc.stdout)
        assert "Warning" not in proc.stderr, proc.stderr  # ten crops leave draws unused: quiet
        assert r["images"] == 12
        assert (r["top1_err"], r["top5_err"], r["val_loss"]) == pytest.approx(
            want, rel=1e-4, abs=1e-9), extra
    logged = records(straight_run, "epoch")[1]
    assert logged["top1_err"] == pytest.approx(centre[0], abs=1e-9)

    # predict on the original val file: prepare's resize, then the same centre crop and mean.
    keys = []
    for path in sorted(shards_small.glob("val-*.h5")):
        with h5py.File(path, "r") as f:
            keys += [k.decode() for k in f["keys"][...]]
    want = torch.softmax(logits_at(c, c, False), 1)
    tree = json.loads((shards_small / "manifest.json").read_text())["options"]["imagenet_root"]
    files = [Path(tree) / keys[i] for i in (0, 5)]
    out = json.loads(cli("predict", *files, "--checkpoint", ckpt, "--top", "4", "--json").stdout)
    manifest = json.loads((shards_small / "manifest.json").read_text())
    names = {c["index"]: c["name"] for c in manifest["classes"]}  # class index -> its name
    for i, r in zip((0, 5), out):
        got = {t["class"]: t["p"] for t in r["top"]}
        assert sorted(got) == [0, 1, 2, 3]
        assert all(t["name"] == names[t["class"]] for t in r["top"])
        for c in range(4):
            assert got[c] == pytest.approx(float(want[i, c]), abs=1e-4)

    # a folder prepared with the val split alone: evaluate needs nothing else from it
    val_only = tmp_path / "val_only"
    cli("prepare", "--imagenet-root", tree, "--out", val_only, "--splits", "val", "--size",
        SMALL_SIZE, "--encoding", "raw", "--shard-size", "16", "--workers", "1")
    assert not (val_only / "stats.h5").exists()
    r = json.loads(cli("evaluate", "--checkpoint", ckpt, "--data", val_only, "--device", "cpu",
                       "--batch-size", "5", "--json").stdout)
    assert (r["images"], r["top1_err"], r["top5_err"], r["val_loss"]) == pytest.approx(
        (12, *centre), rel=1e-4, abs=1e-9)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_towers_on_the_cpu_compiled(tmp_path, shards_small, compile_eager):
    """--parallel towers with --compile (dynamo traces both towers and their crossings as one
    graph): the one-process eager run's losses and weights over a few steps, through an
    evaluation into the next epoch without compiling again (conftest.assert_compiled_like_eager;
    the towers are the grouped model's halves). evaluate reads its checkpoint (the one-model
    layout) and gives the figures the run logged."""
    towers = ["--parallel", "towers", "--tower-devices", "cpu,cpu"]
    compiled = tmp_path / "compiled"
    cli(*train_args(shards_small, compiled, *COMPILE_CHECK, *towers, "--compile"), timeout=280)
    assert_compiled_like_eager(compile_eager, compiled)
    assert_board_filters(compiled, tmp_path)  # TensorBoard's conv1: both towers' halves
    ckpt = compiled / "checkpoints/epoch-0001.pt"
    r = json.loads(cli("evaluate", "--checkpoint", ckpt, "--data", shards_small, "--device", "cpu",
                       "--batch-size", "6", "--json").stdout)
    assert r["top1_err"] == records(compiled, "epoch")[0]["top1_err"]
    image = next(Path(ROOT).glob("tests/*.py"))  # not an image: a clear error
    bad = cli("predict", image, "--checkpoint", ckpt, check=False)
    assert bad.returncode == 1 and "not an image" in bad.stderr


@pytest.mark.slow
def test_plot_and_filters_draw_what_they_show(tmp_path, straight_run):
    """plot: an 11 x 4 in figure at 100 dpi (1,100 x 400 px), the loss per step on the left in
    matplotlib's first colour, the top-1 (first colour) and top-5 (second colour) errors on the
    right. filters: the paper's Figure 3, conv1's 96 kernels as 11 x 11 tiles enlarged 4 times
    (nearest), 2 px apart, 16 a row, tower A's 48 in the upper block and tower B's 48 in the
    lower, 6 px between the blocks; each kernel scaled to its own range, 0-255. The expected
    pixels are computed here from the checkpoint's weights by that description."""
    from PIL import Image
    cli("plot", straight_run, "--out", tmp_path / "curves.png")
    curves = np.asarray(Image.open(tmp_path / "curves.png").convert("RGB")).astype(int)
    assert curves.shape == (400, 1100, 3)

    def near(rgb, part):  # pixels within 40 of a colour (antialiased lines blend at the edges)
        return int((np.abs(part - np.array(rgb)).sum(-1) < 40).sum())
    blue, orange = (31, 119, 180), (255, 127, 14)  # matplotlib's C0, C1
    left, right = curves[:, :550], curves[:, 550:]
    assert near(blue, left) > 50 and near(blue, right) > 20  # loss; top-1
    assert near(orange, left) == 0 and near(orange, right) > 20  # top-5, right only
    ckpt = straight_run / "checkpoints/epoch-0002.pt"
    cli("filters", "--checkpoint", ckpt, "--out", tmp_path / "conv1.png")
    picture = np.asarray(Image.open(tmp_path / "conv1.png").convert("RGB")).astype(int)
    k, gap = 11 * 4, 2
    assert picture.shape == (2 * (3 * (k + gap) + 3 * gap), 16 * (k + gap) + gap, 3)
    weight = weights(ckpt)["features.conv1.weight"].numpy()  # (96, 3, 11, 11) float32
    for i in (0, 17, 47, 48, 95):
        w = weight[i].transpose(1, 2, 0)
        want = ((w - w.min()) / (w.max() - w.min()) * 255).astype(int)
        tower, j = divmod(i, 48)
        row, col = divmod(j, 16)
        x0 = gap + col * (k + gap)
        y0 = tower * (3 * (k + gap) + 3 * gap) + gap + row * (k + gap)
        tile = picture[y0:y0 + k, x0:x0 + k]
        assert np.abs(tile[1::4, 1::4] - want).max() <= 1, i  # each weight a 4 x 4 block
        assert np.array_equal(tile[::4, ::4], tile[3::4, 3::4]), i


@pytest.mark.slow
def test_resume_with_another_arch_is_refused(tmp_path, shards_small, straight_run):
    run = copy_run(straight_run, tmp_path / "run")
    proc = cli(*train_args(shards_small, run, "--epochs", "3", "--resume", "--arch",
                           "alexnet-owt"), check=False)
    assert proc.returncode == 1 and "a checkpoint of --arch alexnet, not alexnet-owt" in proc.stderr
    again = cli(*train_args(shards_small, run, "--epochs", "3"), check=False)
    assert again.returncode == 1 and "--resume" in again.stderr


@pytest.mark.gpu
def test_gpu_training_bf16_and_towers_on_one_gpu(tmp_path, shards_small):
    gpu = ["--device", "gpu", "--batch-size", "8", "--crop", SMALL_CROP, "--log-every", "1",
           "--bias-init", "caffe"]
    run = tmp_path / "gpu"
    cli("train", "--data", shards_small, "--out", run, "--epochs", "1", *gpu)
    assert records(run, "epoch")[0]["train_images"] == 16
    towers = tmp_path / "towers"
    cli("train", "--data", shards_small, "--out", towers, "--epochs", "1", *gpu,
        "--parallel", "towers", "--tower-devices", "cuda:0,cuda:0")
    assert (towers / "checkpoints/epoch-0001.pt").exists()


@pytest.mark.slow
def test_predict_takes_size_crop_and_mean_from_the_checkpoint(tmp_path, sample_tree):
    data = tmp_path / "shards240"
    cli("prepare", "--imagenet-root", sample_tree, "--out", data, "--size", "240", "--encoding",
        "raw", "--limit-per-class", "2", "--shard-size", "16", "--workers", "1")
    run = tmp_path / "run"
    # bfloat16 images on the CPU (no autocast there): the step takes them as float32.
    cli(*train_args(data, run, "--epochs", "1", "--crop", "227", "--batch-size", "4",
                    "--dtype", "bfloat16"))
    ckpt = run / "checkpoints/epoch-0001.pt"
    state = torch.load(ckpt, weights_only=True)
    model = build_model("alexnet", 4, crop=227).double().eval()
    model.load_state_dict({k: v.double() for k, v in state["model"].items()})
    with h5py.File(data / "val-00000.h5", "r") as f:
        image, key = f["images"][0], f["keys"][0].decode()
    with h5py.File(data / "stats.h5", "r") as f:
        mean = f["channel_mean"][...]
    c = (240 - 227) // 2  # the centre crop of a 240 px image
    x = torch.from_numpy(np.ascontiguousarray((image[c:c + 227, c:c + 227] - mean).transpose(2, 0, 1)))
    with torch.no_grad():
        want = torch.softmax(model(x[None]), 1)[0]
    tree = json.loads((data / "manifest.json").read_text())["options"]["imagenet_root"]
    out = json.loads(cli("predict", Path(tree) / key, "--checkpoint", ckpt, "--top", "4",
                         "--json").stdout)
    got = {t["class"]: t["p"] for t in out[0]["top"]}
    for k in range(4):
        assert got[k] == pytest.approx(float(want[k]), abs=1e-4)


@pytest.mark.slow
def test_a_really_full_disk_in_a_checkpoint_is_one_clear_error(tmp_path):
    """A real full file system (a 2 MB tmpfs), not a simulated error: torch's own writer for a
    path reports it only as "unexpected pos"; the save must say ENOSPC, name the file, remove
    its temporary and leave the earlier checkpoint as it was."""
    from alexnet_base.errors import UserError
    from alexnet_pipe import checkpoint
    with small_tmpfs(tmp_path / "small", "2m") as mnt:
        first = checkpoint.save(mnt, {"w": torch.ones(100_000)}, name="epoch-0001.pt")  # 400 KB
        before = hashlib.sha256(first.read_bytes()).hexdigest()
        with pytest.raises(UserError) as e:
            checkpoint.save(mnt, {"w": torch.ones(1_000_000)}, name="epoch-0002.pt")  # 4 MB
        msg = str(e.value)
        assert "epoch-0002.pt" in msg and "ENOSPC" in msg and "\n" not in msg, msg
        assert hashlib.sha256(first.read_bytes()).hexdigest() == before
        assert sorted(p.name for p in first.parent.iterdir()) == ["epoch-0001.pt"]


@pytest.mark.gpu
@pytest.mark.parametrize("devices", ["cuda:0,cuda:0", "cuda:0,cuda:1"])
def test_towers_on_gpus_resume_exactly(tmp_path, shards_small, devices):
    """Each tower draws its dropout masks on its own GPU: a resumed run repeats an uninterrupted
    one only if every GPU's generator comes back with the checkpoint."""
    if torch.cuda.device_count() < len(set(devices.split(","))):
        pytest.skip("needs two GPUs")
    gpu = ["--device", "gpu", "--deterministic", "--parallel", "towers", "--tower-devices",
           devices]
    straight, split = tmp_path / "straight", tmp_path / "split"
    cli(*train_args(shards_small, straight, "--epochs", "2", *gpu))
    cli(*train_args(shards_small, split, "--epochs", "1", *gpu))
    rng = torch.load(split / "checkpoints/epoch-0001.pt", weights_only=True)["rng"]["cuda"]
    assert sorted(rng) == sorted(set(devices.split(",")))
    cli(*train_args(shards_small, split, "--epochs", "2", "--resume", *gpu))
    assert_same_weights(split / "checkpoints/epoch-0002.pt", straight / "checkpoints/epoch-0002.pt")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_compiled_training_equals_eager_within_tolerance(tmp_path, shards_small, compile_eager):
    """train --compile (inductor on the CPU): the same losses and weights as eager training over
    a few steps, through an evaluation (a second graph) to a resumable checkpoint, compiling
    nothing again in its second epoch (conftest.assert_compiled_like_eager); evaluate
    --compile --ten-crop gives eager's figures; resumed with --compile, it ends where the eager
    run resumed ends."""
    eager, compiled = copy_run(compile_eager, tmp_path / "eager"), tmp_path / "compiled"
    cli(*train_args(shards_small, compiled, *COMPILE_CHECK, "--compile"), timeout=380)
    assert_compiled_like_eager(eager, compiled)
    # evaluate --compile --ten-crop (one graph of 10x the batch): eager's figures. (train's
    # compiled centre-crop evaluation is the max_steps record assert_compiled_like_eager checks)
    ckpt = eager / "checkpoints/interrupt.pt"
    got, want = (json.loads(cli("evaluate", "--checkpoint", ckpt, "--data", shards_small,
                                "--device", "cpu", "--batch-size", "8", "--json", "--ten-crop",
                                *extra).stdout)
                 for extra in (["--compile"], []))
    assert got["top1_err"] == want["top1_err"]
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-4)
    # the rest of epoch 2 and its evaluation, each run resumed as it was trained
    cut = COMPILE_CHECK.index("--max-steps")
    rest = [*COMPILE_CHECK[:cut], *COMPILE_CHECK[cut + 2:], "--resume"]
    cli(*train_args(shards_small, eager, *rest))
    cli(*train_args(shards_small, compiled, *rest, "--compile"), timeout=380)
    end = [records(run, "epoch")[-1] for run in (eager, compiled)]
    assert [e["epoch"] for e in end] == [2, 2] and end[1]["compiled_graphs"] == 2
    wa, wb = (weights(run / "checkpoints/epoch-0002.pt") for run in (eager, compiled))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-5)


# The keys every checkpoint had before the layers were named (nn.Sequential indices), written
# out: the paper model's and torchvision's one-tower model's (torchvision.models.alexnet).
OLD_KEYS = {"alexnet": {"features.1": "conv1", "features.5": "conv2", "features.9": "conv3",
                        "features.11": "conv4", "features.13": "conv5", "classifier.0": "fc6",
                        "classifier.3": "fc7", "classifier.6": "fc8"},
            "alexnet-owt": {"features.0": "conv1", "features.3": "conv2", "features.6": "conv3",
                            "features.8": "conv4", "features.10": "conv5", "classifier.1": "fc6",
                            "classifier.4": "fc7", "classifier.6": "fc8"}}


def old_keyed(state: dict) -> dict:
    """A checkpoint dict as the code before named layers wrote it: index keys, sealed."""
    from alexnet_pipe import checkpoint
    new = {f"{'features' if n.startswith('conv') else 'classifier'}.{n}": old
           for old, n in OLD_KEYS[state["arch"]].items()}
    model = {}
    for key, value in state["model"].items():
        prefix, _, kind = key.rpartition(".")
        model[f"{new[prefix]}.{kind}"] = value
    return checkpoint.sealed({k: v for k, v in state.items() if k != "digest"} | {"model": model})


@pytest.mark.slow
def test_checkpoints_with_the_old_index_keys_load_resume_and_evaluate(tmp_path, shards_small,
                                                                      straight_run):
    """A run's first epoch's checkpoint rewritten with the keys of before (OLD_KEYS), the only
    one of the run: evaluate gives the run's own figures of that epoch, and the run resumed
    from it ends with the straight run's weights; the one-tower model's old keys (torchvision's)
    load into it too."""
    run = tmp_path / "old"
    (run / "checkpoints").mkdir(parents=True)
    state = torch.load(straight_run / "checkpoints" / "epoch-0001.pt", weights_only=True)
    assert "features.conv1.weight" in state["model"]
    old = run / "checkpoints" / "epoch-0001.pt"
    torch.save(old_keyed(state), old)
    assert "features.1.weight" in torch.load(old, weights_only=True)["model"]
    r = json.loads(cli("evaluate", "--checkpoint", old, "--data", shards_small, "--device",
                       "cpu", "--json").stdout)
    first = records(straight_run, "epoch")[0]
    assert r["top1_err"] == first["top1_err"]
    assert r["val_loss"] == pytest.approx(first["val_loss"], rel=1e-6)
    cli(*train_args(shards_small, run, "--epochs", "2", "--resume"))
    assert_same_weights(run / "checkpoints/epoch-0002.pt",
                        straight_run / "checkpoints/epoch-0002.pt")
    from alexnet_pipe.model import named_state
    owt = build_model("alexnet-owt", 10)
    old = old_keyed({"arch": "alexnet-owt", "model": owt.state_dict()})["model"]
    assert "features.10.weight" in old and "classifier.1.bias" in old
    owt.load_state_dict(named_state("alexnet-owt", old))  # strict: every key matches
