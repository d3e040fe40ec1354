"""At scale, as users run it: torchrun with several ranks and "nodes" on loopback, a signal or a
kill reaching one rank, more shards than the open-file limit, ImageNet's 1,000 classes."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (COMPILE_CHECK, ROOT, SMALL_CROP, SMALL_SIZE, TWO, assert_compiled_like_eager,
                      cli, free_port, launch, overwrite_image, records, run_group, shared,
                      train_args, weights)

pytestmark = pytest.mark.slow  # the full tier: torchrun, prepare runs, damaged copies


def test_torchrun_two_processes_gloo(ddp_run):
    run, rec = ddp_run
    epochs = records(run, "epoch")
    assert [(e["train_images"], e["images"]) for e in epochs] == [(16, 12)] * 2
    done, = records(run, "done")
    assert done["ranks_in_sync"] is True
    assert json.loads((run / "config.json").read_text())["parallel"] == "ddp"
    # What each rank's loader delivered: batches of 8 / 2 = 4, rank r's the r-th half of each
    # global batch of 8, step s's global batch the s-th 8 of one seeded permutation of the 16
    # train images per epoch (the documented order), all of it read.
    got = {r: [json.loads(line) for line in (rec / f"rank-{r}.jsonl").read_text().splitlines()]
           for r in range(2)}
    for epoch in range(2):
        order = np.random.default_rng([0, epoch]).permutation(16).tolist()
        for r in range(2):
            batches = [b["index"] for b in got[r] if b["epoch"] == epoch]
            assert batches == [order[s * 8 + r * 4:s * 8 + (r + 1) * 4] for s in range(2)]


@pytest.mark.parametrize("rank, sig", [(0, signal.SIGTERM), (1, signal.SIGUSR1)])
def test_a_signal_to_one_rank_stops_every_rank_at_one_step(tmp_path, shards_small, ddp_run, rank,
                                                           sig):
    """SIGTERM (torchrun's, a scheduler's) or SIGUSR1 (Slurm's warning, --signal=USR1@120) to
    one rank: every rank stops after the same step, with a checkpoint. The SIGUSR1 case runs
    the command a requeued Slurm job runs (--resume auto) twice, as is: the second launch
    continues and ends with the weights of the uninterrupted run."""
    run = tmp_path / "run"
    args = train_args(shards_small, run, "--epochs", "2", "--keep", "2",
                      *(["--resume", "auto"] if sig == signal.SIGUSR1 else []))
    t0 = time.monotonic()
    # Only `rank` gets the signal, after its step 1 of epoch 1; the others must stop there too.
    proc = launch(TWO, args, env={"HARNESS_FAULT": f"{sig.name.lower()}@1",
                                  "HARNESS_FAULT_RANK": str(rank),
                                  "HARNESS_SYNC_DEBUG": "1"},  # and no host read outside log points
                  timeout=120)
    # SIGUSR1's stop exits 0: torchrun ends as asked, instead of restarting the workers
    assert (proc.returncode == 0) == (sig == signal.SIGUSR1), proc.stderr[-3000:]
    assert time.monotonic() - t0 < 90
    state = torch.load(run / "checkpoints/interrupt.pt", weights_only=True)
    assert (state["epoch"], state["batch"], state["step"]) == (0, 1, 1)
    assert (f"signal {int(sig)}: saved interrupt.pt at epoch 1, batch 1"
            in (run / "train.log").read_text())
    if sig == signal.SIGUSR1:  # the same command again: it continues, to the very same weights
        proc = launch(TWO, args, env={"HARNESS_SYNC_DEBUG": "1"})
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


def two_nodes(args_of, logs: Path | None = None, timeout: float = 240) -> list:
    """torchrun on two "nodes" over loopback, one process each, node N running the harness with
    args_of(N) (its own --data: a node-local copy). logs: each worker's output in
    logs/node-N/.../stderr.log, apart from its torchrun agent's."""
    port = free_port()
    with ThreadPoolExecutor(2) as pool:  # each node's torchrun in a process group of its own
        nodes = [pool.submit(launch, ["--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
                                      str(node), "--master_addr", "127.0.0.1", "--master_port",
                                      str(port), *(["--log-dir", str(logs / f"node-{node}"),
                                                    "--redirects", "3"] if logs else [])],
                                     args_of(node), timeout=timeout) for node in range(2)]
        return [n.result() for n in nodes]


def worker_stderr(logs: Path, node: int) -> str:
    path, = (logs / f"node-{node}").rglob("stderr.log")
    return path.read_text()


def test_two_nodes_on_loopback(tmp_path, shards_small):
    """Each node reads a copy of its own (node-local NVMe, as clusters set it up)."""
    run, copies = tmp_path / "run", [shards_small, tmp_path / "node1"]
    shutil.copytree(shards_small, copies[1])
    procs = two_nodes(lambda node: train_args(copies[node], run, "--epochs", "1"))
    assert [p.returncode for p in procs] == [0, 0], procs[0].stderr[-2000:] + procs[1].stderr[-2000:]
    epoch, = records(run, "epoch")
    assert (epoch["train_images"], epoch["images"]) == (16, 12)
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2 and config["parallel"] == "ddp"


@pytest.mark.timeout(400)
def test_each_node_checks_its_own_copy_and_one_ranks_error_ends_every_rank(tmp_path,
                                                                          shards_jpeg):
    """Two nodes, each with its own copy, node 1's damaged. Its val shard (read only after an
    epoch): the start-of-run check, every node hashing all of its own copy, stops both ranks
    before anything is written, rank 0 naming what rank 1 found. Every train image of it
    (--no-verify: read as it is): rank 1 stops on its first batch, and rank 0, whose gradient
    all-reduce then fails in gloo, ends with one line naming rank 1 and the damaged shard,
    not gloo's traceback."""
    copies = [shards_jpeg, tmp_path / "node1"]
    shutil.copytree(shards_jpeg, copies[1])
    val = copies[1] / "val-00000.h5"
    data = bytearray(val.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 200):
        data[i] ^= 0xA5
    val.write_bytes(bytes(data))
    run, logs = tmp_path / "run", tmp_path / "logs"
    fast = ["--crop", str(SMALL_CROP), "--epochs", "1"]
    procs = two_nodes(lambda node: train_args(copies[node], run, *fast), logs / "verify")
    assert [p.returncode for p in procs] != [0, 0] and not run.exists()
    errors = [worker_stderr(logs / "verify", node).strip().splitlines()[-1] for node in (0, 1)]
    assert errors[0] == errors[1]  # the same line on every rank
    assert errors[0].startswith(f"Error: rank 1: {val}: damaged"), errors[0]
    assert "verify" in errors[0] and str(shards_jpeg) not in errors[0]  # node 0's copy: intact
    shutil.copy(shards_jpeg / "val-00000.h5", val)
    junk = (b"\xff\xd8\xff\xe0 this is no JPEG " * 4000)
    for shard in sorted(copies[1].glob("train-*.h5")):
        with h5py.File(shard, "r") as f:
            n = len(f["keys"])
        for i in range(n):
            overwrite_image(shard, i, lambda stream: junk[:len(stream)])
    procs = two_nodes(lambda node: train_args(copies[node], run, *fast, "--no-verify"),
                      logs / "midrun")
    assert [p.returncode for p in procs] == [1, 1]
    rank1, rank0 = (worker_stderr(logs / "midrun", node) for node in (1, 0))
    assert "Traceback" not in rank0 and "Traceback" not in rank1, rank0[-3000:]
    line1, line0 = rank1.strip().splitlines()[-1], rank0.strip().splitlines()[-1]
    assert line1.startswith("Error: ") and str(copies[1] / "train-") in line1, line1
    cause = line1.removeprefix("Error: ")
    assert line0.startswith(f"Error: stopped because rank 1 on {socket.gethostname()}: "
                            f"{cause}"), (line0, line1)


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


@pytest.mark.timeout(900)
def test_one_to_four_ranks_and_the_hybrid_train_the_same_model(tmp_path, shards_small):
    """The same command with a global batch of 12 (dropout on, 2 epochs) on one process, on 2 and
    4 DDP ranks and on 2, 3 and 4 hybrid ranks (3 does not divide fc6's 4,096 outputs: uneven
    slices, padded in the gathers): the same weights. Tolerance: absolute 1e-6. The ranks
    compute the same sums in another order (float32: a relative 6e-8 a rounding; measured here
    7e-9 absolute after the 2 steps), while another set of dropout masks moves the weights by
    4e-5 (conv1) to 1e-3 (fc8): 1e-6 tells the two apart with room on both sides."""
    args = ["--epochs", "2", "--batch-size", "12"]
    one = tmp_path / "one"
    cli(*train_args(shards_small, one, *args))
    want = weights(one / "checkpoints/epoch-0002.pt")
    for ranks, mode in ((2, "ddp"), (4, "ddp"), (2, "hybrid"), (3, "hybrid"), (4, "hybrid")):
        run = tmp_path / f"{mode}-{ranks}"
        proc = launch(["--standalone", "--nproc_per_node", str(ranks)],
                      train_args(shards_small, run, *args, "--parallel", mode), timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = weights(run / "checkpoints/epoch-0002.pt")
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6,
                                       msg=lambda m: f"{mode} on {ranks} ranks, {k}: {m}")
