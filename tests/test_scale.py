"""At scale, as users run it: torchrun with several ranks and "nodes" on loopback, a signal or a
kill reaching one rank, more shards than the open-file limit, ImageNet's 1,000 classes."""
from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (COMPILE_CHECK, ROOT, SMALL_CROP, SMALL_SIZE, assert_compiled_like_eager, cli,
                      records, run_group, train_args, weights)

HARNESS = ROOT / "tests" / "harness.py"


def launch(launcher: list, args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """torchrun LAUNCHER tests/harness.py ARGS (the harness injects what `env` asks for)."""
    return run_group([sys.executable, "-m", "torch.distributed.run", *launcher, str(HARNESS),
                      *map(str, args)], cwd=ROOT, timeout=timeout,
                     env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


TWO = ["--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, shards_small):
    """Two ranks, two epochs, every rank's delivered indices recorded."""
    base = tmp_path_factory.mktemp("ddp")
    run, rec = base / "run", base / "record"
    proc = launch(TWO, train_args(shards_small, run, "--epochs", "2", "--keep", "2"),
                  env={"HARNESS_RECORD": str(rec)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, rec


def test_torchrun_two_processes_gloo(ddp_run):
    run, rec = ddp_run
    epochs = records(run, "epoch")
    assert [(e["train_images"], e["images"]) for e in epochs] == [(16, 12)] * 2
    done, = records(run, "done")
    assert done["ranks_in_sync"] is True
    assert json.loads((run / "config.json").read_text())["parallel"] == "ddp"
    # What each rank's loader delivered: batches of 8 / 2 = 4, disjoint shares of one seeded
    # permutation of the 16 train images per epoch (the documented order), all of it read.
    got = {r: [json.loads(line) for line in (rec / f"rank-{r}.jsonl").read_text().splitlines()]
           for r in range(2)}
    for epoch in range(2):
        order = np.random.default_rng([0, epoch]).permutation(16).tolist()
        for r in range(2):
            batches = [b["index"] for b in got[r] if b["epoch"] == epoch]
            assert [len(b) for b in batches] == [4, 4]
            assert sum(batches, []) == order[r * 8:(r + 1) * 8]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_signal_to_one_rank_stops_every_rank_at_one_step(tmp_path, shards_small, ddp_run, rank):
    run = tmp_path / "run"
    t0 = time.monotonic()
    # Only `rank` gets SIGTERM, after its step 1 of epoch 1; the others must stop there too.
    proc = launch(TWO, train_args(shards_small, run, "--epochs", "2", "--keep", "2"),
                  env={"HARNESS_FAULT": "sigterm@1", "HARNESS_FAULT_RANK": str(rank),
                       "HARNESS_SYNC_DEBUG": "1"},  # and no host read outside log points
                  timeout=120)
    assert proc.returncode != 0 and time.monotonic() - t0 < 90, proc.stderr[-3000:]
    state = torch.load(run / "checkpoints/interrupt.pt", weights_only=True)
    assert (state["epoch"], state["batch"], state["step"]) == (0, 1, 1)
    assert "signal 15: saved interrupt.pt at epoch 1, batch 1" in (run / "train.log").read_text()
    if rank == 1:  # resumed, it ends with the weights of the uninterrupted run
        proc = launch(TWO, train_args(shards_small, run, "--epochs", "2", "--keep", "2",
                                      "--resume"), env={"HARNESS_SYNC_DEBUG": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        a, b = weights(run / "checkpoints/epoch-0002.pt"), weights(ddp_run[0] / "checkpoints/epoch-0002.pt")
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(500)
def test_compiled_ddp_equals_eager_ddp_within_tolerance(tmp_path, shards_small):
    """torchrun, 2 gloo ranks, --compile (dynamo splits the DDP model's graph at its gradient
    buckets): eager DDP's losses and weights over a few steps, through an evaluation into the
    next epoch without compiling again (conftest.assert_compiled_like_eager)."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    for run, extra in ((eager, []), (compiled, ["--compile"])):
        proc = launch(TWO, train_args(shards_small, run, *COMPILE_CHECK, *extra), timeout=420)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert_compiled_like_eager(eager, compiled)


def test_a_killed_rank_ends_the_job_and_the_last_checkpoint_stays(tmp_path, shards_small):
    run = tmp_path / "run"
    t0 = time.monotonic()
    proc = launch(TWO, train_args(shards_small, run, "--epochs", "3", "--dist-timeout", "30"),
                  env={"HARNESS_FAULT": "sigkill@3", "HARNESS_FAULT_RANK": "1"}, timeout=150)
    assert proc.returncode != 0 and time.monotonic() - t0 < 120
    state = torch.load(run / "checkpoints/epoch-0001.pt", weights_only=True)
    assert state["epoch"] == 1 and not list((run / "checkpoints").glob("*.tmp-*"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback(tmp_path, shards_small):
    run, port = tmp_path / "run", _free_port()
    args = train_args(shards_small, run, "--epochs", "1")
    with ThreadPoolExecutor(2) as pool:  # each node's torchrun in a process group of its own
        nodes = [pool.submit(launch, ["--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
                                      str(node), "--master_addr", "127.0.0.1", "--master_port",
                                      str(port)], args, timeout=240) for node in range(2)]
        procs = [n.result() for n in nodes]
    assert [p.returncode for p in procs] == [0, 0], procs[0].stderr[-2000:] + procs[1].stderr[-2000:]
    epoch, = records(run, "epoch")
    assert (epoch["train_images"], epoch["images"]) == (16, 12)
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2 and config["parallel"] == "ddp"


def _limit_open_files(n: int):
    def apply():  # soft and hard: the tool cannot raise it, it has to live within it
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    return apply


def test_imagenet_shape_smoke_run_under_a_low_open_file_limit(tmp_path):
    """ImageNet's 1,000 classes (their real wnids), 526 HDF5 files, a limit of 256 open files:
    prepare -> inspect -> bench-loader -> a few training steps -> evaluate."""
    tree, rng = tmp_path / "tree", np.random.default_rng(0)
    # The ILSVRC 2012 wnids, one a line (the list timm ships as data/_info/imagenet_synsets.txt).
    wnids = (ROOT / "tests" / "imagenet_wnids.txt").read_text().split()
    assert len(wnids) == 1000 and wnids[0] == "n01440764"
    for k, w in enumerate(wnids):
        for split, n in (("train", 2), ("val", 1 if k % 10 == 0 else 0)):
            if n:
                (tree / split / w).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).resize((SMALL_SIZE, SMALL_SIZE)).save(
                    tree / split / w / f"{w}_{i}.JPEG", quality=80)
    data = tmp_path / "shards"
    limit = {"preexec_fn": _limit_open_files(256)}
    cli("prepare", "--imagenet-root", tree, "--out", data, "--size", SMALL_SIZE, "--shard-size",
        "4", "--workers", "2", **limit)
    assert len(list(data.glob("*.h5"))) == 500 + 25 + 1 > 256  # train + val shards + stats
    assert "1000 classes" in cli("inspect", data, **limit).stdout
    r = json.loads(cli("bench-loader", "--data", data, "--device", "cpu", "--crop", SMALL_CROP,
                       "--batch-size", "32", "--batches", "8", "--repeats", "1", "--warmup", "1",
                       "--json", **limit).stdout)
    assert r["images_per_s"] > 0
    run = tmp_path / "run"
    cli("train", "--data", data, "--out", run, "--device", "cpu", "--batch-size", "8", "--crop",
        SMALL_CROP, "--max-steps", "3", "--log-every", "1", "--mean", "channel", **limit)
    done, = records(run, "max_steps")
    assert done["step"] == 3 and done["images"] == 100
    ev = json.loads(cli("evaluate", "--checkpoint", run / "checkpoints/interrupt.pt", "--data",
                        data, "--device", "cpu", "--batch-size", "25", "--json", **limit).stdout)
    assert ev["images"] == 100 and ev["top1_err"] == pytest.approx(done["top1_err"])


def test_a_job_that_outlives_its_timeout_is_killed_with_all_its_processes(tmp_path):
    """What every test's torchrun gets: on a timeout the whole process group goes, as a rank
    hung in a collective would need (here a child that would sleep on past its parent)."""
    pid_file = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {pid_file}; wait"
    with pytest.raises(subprocess.TimeoutExpired):
        run_group(["sh", "-c", script], timeout=2)
    child = int(pid_file.read_text())
    for _ in range(50):  # killed: gone, or a zombie until init reaps it, within moments
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.1)
    raise AssertionError(f"process {child} outlived the timeout")
