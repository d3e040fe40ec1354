"""`train` as users run it: real subprocesses, real DALI pipelines on the CPU, torchrun with gloo."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, cli

# Small and quick: 16 train images in batches of 8, no flips or lighting noise in the way.
FAST = ["--batch-size", "8", "--device", "cpu", "--threads", "1", "--workers", "1",
        "--log-every", "1", "--bias-init", "caffe", "--lr", "0.005", "--mean", "channel"]


def train_args(data, out, *extra):
    return ["train", "--data", data, "--out", out, *FAST, *extra]


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory, shards_small) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    cli(*train_args(shards_small, run, "--epochs", "2"))
    return run


def test_learning_loss_falls(tmp_path, shards_small):
    run = tmp_path / "run"
    # Overfitting two batches: no dropout, no flips or lighting, a constant learning rate.
    cli(*train_args(shards_small, run, "--epochs", "12", "--no-flip", "--lighting-std", "0",
                    "--max-lr-drops", "0", "--dropout", "0", "--lr", "0.008"))
    losses = [r["loss"] for r in records(run, "step")]
    assert len(losses) == 24
    start = sum(losses[:4]) / 4  # about ln(4) = 1.39
    assert min(losses[12:]) < 0.6 * start, losses


def test_resume_continues_exactly(tmp_path, shards_small, straight_run):
    run = tmp_path / "run"
    cli(*train_args(shards_small, run, "--epochs", "1"))
    resumed = cli(*train_args(shards_small, run, "--epochs", "2", "--resume"))
    assert "resumed from" in resumed.stdout
    assert_same_weights(run / "checkpoints/epoch-0002.pt", straight_run / "checkpoints/epoch-0002.pt")
    epochs = records(run, "epoch")
    assert [r["step"] for r in epochs] == [2, 4]
    for r in epochs:  # what every epoch record holds
        assert {"train_loss", "lr", "top1_err", "top5_err", "images_per_s", "data_wait"} <= r.keys()
        assert 0 <= r["data_wait"] < 1 and r["train_loss"] > 0


def test_sigterm_checkpoints_and_resume_is_exact(tmp_path, shards_small, straight_run):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "alexnet_pipe",
                             *map(str, train_args(shards_small, run, "--epochs", "2"))],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (
            (run / "metrics.jsonl").exists() and records(run, "step")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "continue with --resume" in out
    interrupt = run / "checkpoints/interrupt.pt"
    if interrupt.exists():  # stopped mid-epoch: the checkpoint says where
        state = torch.load(interrupt, weights_only=True)
        assert state["step"] >= 1 and 0 < state["batch"] < 2
    else:  # the signal came in an epoch's last step: that epoch was finished and saved
        assert (run / "checkpoints/epoch-0001.pt").exists()
    cli(*train_args(shards_small, run, "--epochs", "2", "--resume"))
    assert_same_weights(run / "checkpoints/epoch-0002.pt", straight_run / "checkpoints/epoch-0002.pt")
    assert not (run / "checkpoints/interrupt.pt").exists()


def test_nan_guard_names_the_step(tmp_path, shards_small):
    run = tmp_path / "run"
    proc = cli(*train_args(shards_small, run, "--epochs", "1", "--lr", "1e6"), check=False)
    assert proc.returncode == 1 and "non-finite loss at step" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((run / "checkpoints").glob("epoch-*.pt")) if (run / "checkpoints").exists() \
        else True


def test_torchrun_two_processes_gloo(tmp_path, shards_small):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", "29517", "-m", "alexnet_pipe",
         *map(str, train_args(shards_small, run, "--epochs", "1"))],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    epoch, = records(run, "epoch")
    assert epoch["train_images"] == 16 and epoch["images"] == 12  # disjoint shares, all of val
    done, = records(run, "done")
    assert done["ranks_in_sync"] is True
    assert json.loads((run / "config.json").read_text())["parallel"] == "ddp"


def test_towers_on_the_cpu_and_checkpoint_tools(tmp_path, shards_small, straight_run):
    run = tmp_path / "towers"
    cli(*train_args(shards_small, run, "--epochs", "1", "--parallel", "towers",
                    "--tower-devices", "cpu,cpu"))
    ckpt = run / "checkpoints/epoch-0001.pt"
    r = json.loads(cli("evaluate", "--checkpoint", ckpt, "--data", shards_small, "--device", "cpu",
                       "--batch-size", "6", "--json").stdout)
    assert r["images"] == 12 and 0 <= r["top1_err"] <= 1
    ten = cli("evaluate", "--checkpoint", straight_run / "checkpoints/best.pt", "--data",
              shards_small, "--device", "cpu", "--ten-crop", "--batch-size", "6")
    assert "12 images" in ten.stdout and "ten crops" in ten.stdout
    image = next(Path(ROOT).glob("tests/*.py"))  # not an image: a clear error
    bad = cli("predict", image, "--checkpoint", ckpt, check=False)
    assert bad.returncode == 1 and "not an image" in bad.stderr


def test_predict_plot_filters(tmp_path, sample_tree, straight_run):
    ckpt = straight_run / "checkpoints/epoch-0002.pt"
    images = sorted((sample_tree / "val").glob("*.JPEG"))[:2]
    out = json.loads(cli("predict", *images, "--checkpoint", ckpt, "--json").stdout)
    assert len(out) == 2 and len(out[0]["top"]) == 4  # 4 classes
    assert abs(sum(t["p"] for t in out[0]["top"]) - 1) < 1e-4
    assert out[0]["top"][0]["name"]
    cli("plot", straight_run)
    assert (straight_run / "curves.png").stat().st_size > 1000
    cli("filters", "--checkpoint", ckpt, "--out", tmp_path / "conv1.png")
    from PIL import Image
    assert Image.open(tmp_path / "conv1.png").size[0] > 16 * 44


def test_resume_with_another_arch_is_refused(tmp_path, shards_small, straight_run):
    proc = cli(*train_args(shards_small, straight_run, "--epochs", "3", "--resume", "--arch",
                           "alexnet-owt"), check=False)
    assert proc.returncode == 1 and "a checkpoint of --arch alexnet, not alexnet-owt" in proc.stderr
    again = cli(*train_args(shards_small, straight_run, "--epochs", "3"), check=False)
    assert again.returncode == 1 and "--resume" in again.stderr


@pytest.mark.gpu
def test_gpu_training_bf16_and_towers_on_one_gpu(tmp_path, shards_small):
    gpu = ["--device", "gpu", "--batch-size", "8", "--log-every", "1", "--bias-init", "caffe"]
    run = tmp_path / "gpu"
    cli("train", "--data", shards_small, "--out", run, "--epochs", "1", *gpu)
    assert records(run, "epoch")[0]["train_images"] == 16
    towers = tmp_path / "towers"
    cli("train", "--data", shards_small, "--out", towers, "--epochs", "1", *gpu,
        "--parallel", "towers", "--tower-devices", "cuda:0,cuda:0")
    assert (towers / "checkpoints/epoch-0001.pt").exists()
