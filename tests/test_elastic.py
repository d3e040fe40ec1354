"""One run through restarts, lost nodes and relaunches on other ranks and parallel modes: torchrun
--max-restarts, two elastic agents on loopback (c10d rendezvous), train --resume auto and
--save-every, as a cluster job meets them."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import ROOT, HARNESS, TWO, cli, free_port, launch, records, run_group, train_args, weights

pytestmark = pytest.mark.slow

# What the ranks may differ by from one process on the same global batch: float32 sums in
# another order (measured 7e-9 after these steps), where another set of dropout masks moves the
# weights by 4e-5 or more (scale.test_one_to_four_ranks_and_the_hybrid_train_the_same_model).
RANKS_ATOL = 1e-6


def assert_weights(path, want_path, *, atol=0.0):
    got, want = weights(path), weights(want_path)
    assert got.keys() == want.keys()
    for k in want:
        if atol == 0:
            assert torch.equal(got[k], want[k]), k
        else:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=atol)


def steps_once(run, last: int) -> None:
    """metrics.jsonl reads as one run: a record for each step 1..last, each once, in order."""
    assert [r["step"] for r in records(run, "step")] == list(range(1, last + 1))


@pytest.mark.timeout(300)
def test_torchrun_restarts_a_killed_worker_and_the_run_reads_as_one(tmp_path, shards_small,
                                                                     ddp_run):
    """torchrun --max-restarts 1 (c10d, its agent's store shared with the workers) and rank 1
    SIGKILLed after its step 4 of 4, before the epoch's checkpoint: the group restarts, the
    same command continues from step-00000003.pt (every rank agreed on it at step 3) and
    ends with the uninterrupted run's weights, bit for bit. The steps trained twice (4) are
    in the log once; one restart record."""
    run = tmp_path / "run"
    proc = launch([*TWO, "--max-restarts", "1"],
                  train_args(shards_small, run, "--epochs", "2", "--keep", "2", "--save-every",
                             "1", "--resume", "auto"),
                  env={"HARNESS_FAULT": "sigkill@4", "HARNESS_FAULT_RANK": "1",
                       "HARNESS_FAULT_ATTEMPT": "0"}, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in (run / "train.log").read_text()
    assert_weights(run / "checkpoints/epoch-0002.pt", ddp_run[0] / "checkpoints/epoch-0002.pt")
    steps_once(run, 4)
    restart, = records(run, "restart")
    assert (restart["restart"], restart["torchrun_restart"], restart["step"],
            restart["world_size"]) == (1, 1, 3, 2)
    # the epoch's checkpoint superseded the step checkpoints; nothing half-written is left
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["best.pt", "epoch-0001.pt", "epoch-0002.pt"], names


def agent(port: int, host: bool, args, env=None):
    """One elastic torchrun agent of two on loopback (--nnodes 1:2, one worker), the first
    (host) holding the c10d store; each worker with a TCP store of its own every round, as
    README "On a cluster" says elastic jobs run (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc_per_node",
           "1", "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
           f"127.0.0.1:{port}", "--rdzv-id", "elastic-test", "--rdzv-conf",
           f"is_host={int(host)},last_call_timeout=10", str(HARNESS), *map(str, args)]
    return run_group(cmd, cwd=ROOT, timeout=240,
                     env={**os.environ, "OMP_NUM_THREADS": "1",
                          "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **(env or {})})


@pytest.mark.timeout(300)
def test_two_agents_lose_one_and_the_survivor_finishes_on_fewer_ranks(tmp_path, shards_small,
                                                                      ddp_run):
    """Two agents, one worker each; after step 3 the second agent and its worker are SIGKILLed
    (a node lost). The first re-forms the group alone and continues from the newest
    checkpoint on one rank with the same global batch of 8: it ends within RANKS_ATOL of the
    uninterrupted two-rank run."""
    run, port = tmp_path / "run", free_port()
    args = train_args(shards_small, run, "--epochs", "2", "--keep", "2", "--save-every", "1",
                      "--resume", "auto")
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(agent, port, True, args)
        lost = pool.submit(agent, port, False, args, {"HARNESS_FAULT": "sigkill-node@3"})
        first, lost = first.result(), lost.result()
    assert lost.returncode != 0
    assert first.returncode == 0, first.stderr[-3000:]
    assert_weights(run / "checkpoints/epoch-0002.pt", ddp_run[0] / "checkpoints/epoch-0002.pt",
                   atol=RANKS_ATOL)
    restart, = records(run, "restart")
    assert restart["world_size"] == 1 and restart["step"] in (2, 3), restart
    steps_once(run, 4)
    assert json.loads((run / "config.json").read_text())["world_size"] == 1


@pytest.mark.timeout(400)
def test_resume_auto_continues_in_any_mode_on_any_number_of_ranks(tmp_path, shards_small,
                                                                  straight_run):
    """One command line but the mode, the ranks and --max-steps, launched three times with
    --resume auto: the towers in one process start the run (the folder is empty) and stop
    mid-epoch (step 1 of 2); two DDP ranks reading a copy of the data in another folder
    continue to step 3, mid-epoch 2; the hybrid on two ranks finishes. The weights are the
    one-process run's within RANKS_ATOL (the towers sum in another order too)."""
    run, copy = tmp_path / "run", tmp_path / "copy"
    shutil.copytree(shards_small, copy)  # a node-local copy: the same manifest, another path

    def args(data, *extra):
        return train_args(data, run, "--epochs", "2", "--resume", "auto", *extra)
    cli(*args(shards_small, "--parallel", "towers", "--tower-devices", "cpu,cpu", "--max-steps",
             "1"))
    assert torch.load(run / "checkpoints/interrupt.pt", weights_only=True)["step"] == 1
    for data, extra in ((copy, ["--parallel", "ddp", "--max-steps", "3"]),
                        (shards_small, ["--parallel", "hybrid"])):
        proc = launch(TWO, args(data, *extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
        config = json.loads((run / "config.json").read_text())
        assert (config["parallel"], config["world_size"]) == (extra[1], 2)
    assert_weights(run / "checkpoints/epoch-0002.pt", straight_run / "checkpoints/epoch-0002.pt",
                   atol=RANKS_ATOL)
    assert [(r["restart"], r["step"], r["world_size"]) for r in records(run, "restart")] == [
        (1, 1, 2), (2, 3, 2)]
    steps_once(run, 4)


def job_processes(job: str, *, workers: bool) -> list[int]:
    """The processes of a (simulated) Slurm job's steps, by their environment: those started
    under srun (SLURM_STEP_ID); workers=True: torchrun's workers only (LOCAL_RANK)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if (f"SLURM_JOB_ID={job}".encode() in env
                and any(v.startswith(b"SLURM_STEP_ID=") for v in env)
                and (not workers or any(v.startswith(b"LOCAL_RANK=") for v in env))):
            found.append(int(proc.name))
    return found


SHIMS = {  # Slurm's commands as the script uses them, on one machine
    "srun": """import os, sys
args = sys.argv[1:]
while args[0].startswith("-"):
    args.pop(0)
os.execvpe(args[0], args, {**os.environ, "SLURM_STEP_ID": "0", "SLURM_PROCID": "0"})
""",
    "scontrol": """import os, sys
if sys.argv[1:3] == ["show", "hostnames"]:
    print("127.0.0.1")
elif sys.argv[1] == "requeue":
    open(os.path.join(os.environ["SHIM_LOG"], "requeued"), "a").write(sys.argv[2] + "\\n")
""",
    "scancel": """import os, signal, sys
sys.path.insert(0, os.environ["SHIM_TESTS"])
from test_elastic import job_processes
assert sys.argv[1] == "--signal=USR1"
for pid in job_processes(sys.argv[2], workers=False):
    os.kill(pid, signal.SIGUSR1)
open(os.path.join(os.environ["SHIM_LOG"], "signalled"), "a").write(sys.argv[2] + "\\n")
""",
}


@pytest.mark.timeout(300)
def test_the_slurm_script_stops_requeues_and_continues(tmp_path, shards_small, ddp_run):
    """docs/slurm/train.sbatch as a one-node job of 2 workers, Slurm's commands simulated
    (srun, scontrol, scancel): SIGUSR1 to the script (--signal=B:USR1@120) reaches the
    workers and not their agent; every rank stops with a checkpoint, the job exits 0 and
    asks to be requeued; the script run again with the same options finishes the run with the
    uninterrupted two-rank run's weights, bit for bit. The workers are held (SIGSTOP) while
    the signal travels, so that the stop comes before the run's end however slow the machine."""
    import signal
    import subprocess
    import time
    bin_dir, log, run = tmp_path / "bin", tmp_path / "log", tmp_path / "run"
    job = str(os.getpid())  # this test's job: its processes are found by it
    bin_dir.mkdir()
    log.mkdir()
    for name, body in SHIMS.items():
        (bin_dir / name).write_text(f"#!{sys.executable}\n{body}")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_JOB_ID": job, "SLURM_JOB_NODELIST": "node0", "SLURM_JOB_NUM_NODES": "1",
           "GPUS_PER_NODE": "2", "PORT": str(free_port()), "SAVE_EVERY": "1",
           "DATA": str(shards_small), "OUT": str(run), "SHIM_LOG": str(log),
           "SHIM_TESTS": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"}
    script = [str(ROOT / "docs/slurm/train.sbatch"),
              *map(str, train_args(shards_small, run, "--epochs", "2", "--keep", "2")[5:])]
    job_run = subprocess.Popen(["bash", *script], cwd=ROOT, env=env, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").exists() and records(run, "step")):
            assert time.monotonic() < deadline and job_run.poll() is None
            time.sleep(0.05)
        workers = job_processes(job, workers=True)
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        job_run.send_signal(signal.SIGUSR1)
        while not (log / "signalled").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        out, _ = job_run.communicate(timeout=120)
    finally:  # the script's group, and the workers torchrun started in sessions of their own
        for pid in [job_run.pid] * (job_run.poll() is None) + job_processes(job, workers=False):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert job_run.returncode == 0, out[-3000:]
    assert (log / "requeued").read_text() == f"{job}\n"
    assert "signal 10: " in (run / "train.log").read_text()
    assert not (run / "checkpoints/epoch-0002.pt").exists()
    again = run_group(["bash", *script], cwd=ROOT, env=env, timeout=180)  # the requeued job
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert (log / "requeued").read_text() == f"{job}\n"  # finished: not requeued again
    assert_weights(run / "checkpoints/epoch-0002.pt", ddp_run[0] / "checkpoints/epoch-0002.pt")
    steps_once(run, 4)
