#!/usr/bin/env python3
"""Run `alexnet-pipe ARGS` with a fault injected or the samples recorded, as tests need them.

    python tests/harness.py train --data ... (or as torchrun's script)

Configured by environment variables, so that torchrun can pass them to every rank:

    HARNESS_RECORD=DIR      each rank appends {"epoch", "index": [...]} per train batch it received
                            to DIR/rank-R.jsonl (the indices the loader yielded, read on the host)
    HARNESS_FAULT=KIND@N    after optimizer step N (1-based, counted in this process):
                              sigterm / sigint / sigusr1  the process sends itself that signal
                              sigkill           the process kills itself outright
                              sigkill-node      it kills its torchrun agent, then itself (with
                                                one worker an agent: a node lost)
                              nan               every parameter becomes NaN (the next loss is NaN)
    HARNESS_FAULT_RANK=R    only rank R (RANK from torchrun) injects; default every rank
    HARNESS_FAULT_ATTEMPT=A only in torchrun's attempt A (TORCHELASTIC_RESTART_COUNT); default
                            every attempt
    HARNESS_PREPARE_KILL=N  prepare: once a worker has written N shards, SIGKILL the whole process
                            group (run it with start_new_session), as a crash mid-run would
    HARNESS_SYNC_DEBUG=1    train epochs run under torch.cuda.set_sync_debug_mode("error") except
                            at log points: a hidden CPU-GPU sync in the step raises (on the
                            CPU: a tensor's value read on the host, what the sync would be)
    HARNESS_SAVE_FAULT=KIND@N  the N-th torch.save writes half a file, then: raise (an OSError,
                            ENOSPC, as a full disk gives) or sigkill (the process dies mid-write);
                            the saves before it print "HARNESS saved NAME SHA256" to stderr

The faults hook into torch's global optimizer step hook and `torch.save`; nothing in the package
knows about them. The signal is delivered by the OS as an outside one would be, at a known step.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

RANK = int(os.environ.get("RANK", 0))


def _install_step_fault(spec: str) -> None:
    kind, _, at = spec.partition("@")
    at = int(at)
    only = os.environ.get("HARNESS_FAULT_RANK")
    if only is not None and int(only) != RANK:
        return
    attempt = os.environ.get("HARNESS_FAULT_ATTEMPT")
    if attempt is not None and int(attempt) != int(os.environ.get("TORCHELASTIC_RESTART_COUNT",
                                                                    0)):
        return
    count = [0]

    def hook(optimizer, args, kwargs):
        count[0] += 1
        if count[0] != at:
            return
        if kind == "nan":
            with torch.no_grad():
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.fill_(float("nan"))
        elif kind == "sigkill-node":  # torchrun starts each worker in a session of its own
            os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            os.kill(os.getpid(), {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT,
                                  "sigusr1": signal.SIGUSR1, "sigkill": signal.SIGKILL}[kind])
    register_optimizer_step_post_hook(hook)


def _install_save_fault(spec: str) -> None:
    kind, _, at = spec.partition("@")
    real_save = torch.save
    count = [0]

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if hasattr(f, "flush"):  # an open file: what it holds is on disk, by its name
            f.flush()
            f = f.name
        count[0] += 1
        if count[0] != int(at):  # a good save: say what it wrote, for the byte comparison
            digest = hashlib.sha256(Path(f).read_bytes()).hexdigest()
            print(f"HARNESS saved {Path(f).name.split('.tmp-')[0]} {digest}", file=sys.stderr)
            return
        size = os.path.getsize(f)
        with open(f, "r+b") as fh:  # half a file on disk, as a crash mid-write leaves it
            fh.truncate(size // 2)
        if kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
    torch.save = save


def _install_recorder(folder: Path) -> None:
    from alexnet_pipe import pipeline
    real_iter = pipeline.Loader.__iter__
    folder.mkdir(parents=True, exist_ok=True)

    def recording_iter(self):
        epoch = self.epoch
        with open(folder / f"rank-{RANK}.jsonl", "a") as f:
            for batch in real_iter(self):
                if self.plan.train:
                    f.write(json.dumps({"epoch": epoch, "index": batch.index.tolist()}) + "\n")
                    f.flush()
                yield batch
    pipeline.Loader.__iter__ = recording_iter


def _install_sync_debug() -> None:
    """On a GPU: torch's sync debug mode. Without one, its stand-in: reading a tensor's value on
    the host (item, tolist, float, int, bool), which on a GPU is the sync, raises."""
    from alexnet_pipe import train
    cuda = torch.cuda.is_available()
    reads = [False]  # host reads allowed now

    def refuse(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if not reads[0]:
                raise RuntimeError(f"HARNESS: Tensor.{name} in the step loop, outside a log point")
            return real(self, *args, **kwargs)
        setattr(torch.Tensor, name, read)

    def set_mode(mode: str) -> None:
        if cuda:
            torch.cuda.set_sync_debug_mode(mode)
        reads[0] = mode == "default"

    def guarded(fn, inside: str, after: str):
        def wrapper(*args, **kwargs):
            set_mode(inside)
            try:
                return fn(*args, **kwargs)
            finally:
                set_mode(after)
        return wrapper
    set_mode("default")
    if not cuda:
        for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
            refuse(name)
    # log points: the record, and the ranks' agreement on a stop (a collective at log points only)
    train._log_point = guarded(train._log_point, "default", "error")
    train._agreed_stop = guarded(train._agreed_stop, "default", "error")
    train.train_one_epoch = guarded(train.train_one_epoch, "error", "default")


def _install_prepare_kill(after: int) -> None:
    from preprocessing import prepare
    real, count = prepare.write_one_shard, [0]

    def write_one_shard(*args, **kwargs):
        info = real(*args, **kwargs)
        count[0] += 1
        if count[0] >= after:
            os.killpg(0, signal.SIGKILL)
        return info
    prepare.write_one_shard = write_one_shard


def main() -> None:
    if os.environ.get("HARNESS_PREPARE_KILL"):
        _install_prepare_kill(int(os.environ["HARNESS_PREPARE_KILL"]))
    if os.environ.get("HARNESS_SYNC_DEBUG"):
        _install_sync_debug()
    if os.environ.get("HARNESS_FAULT"):
        _install_step_fault(os.environ["HARNESS_FAULT"])
    if os.environ.get("HARNESS_SAVE_FAULT"):
        _install_save_fault(os.environ["HARNESS_SAVE_FAULT"])
    if os.environ.get("HARNESS_RECORD"):
        _install_recorder(Path(os.environ["HARNESS_RECORD"]))
    from alexnet_pipe.cli import main as cli_main
    cli_main(args=sys.argv[1:], prog_name="alexnet-pipe")


if __name__ == "__main__":
    main()
