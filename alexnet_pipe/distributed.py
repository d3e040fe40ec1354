"""Everything distributed and device-related in one place: rank and world size from torchrun's
environment, the device each process uses, the process group (NCCL on GPUs, gloo on the CPU),
and the few collectives training needs."""
from __future__ import annotations

import contextlib
import os
import socket
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from alexnet_base.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # processes on this machine (they share its cores and /dev/shm)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def from_environment() -> DistEnv:
    """torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; a plain run is rank 0
    of 1. The only place that reads them."""
    env = os.environ
    return DistEnv(rank=int(env.get("RANK", 0)), world=int(env.get("WORLD_SIZE", 1)),
                   local_rank=int(env.get("LOCAL_RANK", 0)),
                   local_world=int(env.get("LOCAL_WORLD_SIZE", 1)))


def device(choice: str, env: DistEnv | None = None) -> torch.device:
    """--device auto|cpu|gpu -> this process's torch device: the GPU of its LOCAL_RANK. gpu
    without CUDA is an error, never a silent CPU run."""
    env = env or from_environment()
    if choice == "auto":
        choice = "gpu" if torch.cuda.is_available() else "cpu"
    if choice == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--device gpu: no CUDA GPU is visible; use --device cpu")
    check_devices([f"cuda:{env.local_rank}"])
    return torch.device("cuda", env.local_rank)


def check_devices(names) -> None:
    """Every named device exists (cuda:1 on a one-GPU machine is a clear error)."""
    for name in names:
        try:
            d = torch.device(name)
        except RuntimeError:
            raise UserError(f"device {name!r}: not a torch device (cpu, cuda:0, ...)") from None
        if d.type == "cuda":
            count = torch.cuda.device_count()
            if (d.index or 0) >= count:
                raise UserError(f"device {name}: this machine has {count} CUDA GPU(s)")


def init(env: DistEnv, dev: torch.device, timeout_s: float = 600) -> None:
    """The process group. A collective that waits longer than `timeout_s` (a rank died without
    torchrun noticing) ends the process with an error instead of hanging.

    Under torchrun's c10d rendezvous the workers share the agent's store, which outlives a
    restart: the addresses the previous attempt's ranks published there would be read again
    (gloo: "connection refused"; NCCL: an old unique id). The group's keys are kept apart per
    attempt (TORCHELASTIC_RESTART_COUNT, the same for every worker that restarts together);
    where agents restarted a different number of times rejoin one group, torchrun needs
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store a round: README, "On a cluster")."""
    if env.enabled and not dist.is_initialized():
        from datetime import timedelta
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        timeout = timedelta(seconds=timeout_s)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        environ = os.environ
        if environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            store = dist.TCPStore(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]),
                                  env.world, is_master=False, timeout=timeout)
            attempt = environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(backend, store=dist.PrefixStore(
                f"alexnet-pipe/attempt-{attempt}", store), rank=env.rank,
                world_size=env.world, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], dev) -> list[float]:
    """Sum numbers over ranks (a sync point)."""
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def same_on_all_ranks(value: float, dev) -> bool:
    """True when every rank holds the same number (for example a parameter checksum)."""
    if not dist.is_initialized():
        return True
    t = torch.tensor([value, -value], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t[0].item() == value and -t[1].item() == value


def max_over_ranks(value: int, dev) -> int:
    """The largest of every rank's `value` (a sync point; 0 rank-local without a group)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gather_objects(value) -> list:
    """Every rank's `value` (picklable), in rank order (a sync point; [value] without a group)."""
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# --- one rank's error, told to the others --------------------------------------------------------

WAIT_FOR_CAUSE_S = 5.0  # how long a rank whose collective failed waits for another's reason


def _failure_key() -> str:
    """The store key of the first rank's error in this launch (torchrun restarts keep the store)."""
    return f"alexnet-pipe/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):  # no group, or a torch without it
        return None


def describe(e: BaseException) -> str:
    """An error in one line: a UserError's message (it names the file or option), else its type,
    its first line and the innermost place of ours it was raised from (file:line in function)."""
    if isinstance(e, UserError):
        return " ".join(str(e).split())
    first = (str(e).strip().splitlines() or [""])[0][:300]
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/alexnet_pipe/" in f.filename or "/preprocessing/" in f.filename
            or "/alexnet_base/" in f.filename] or frames
    if not ours:
        return f"{type(e).__name__}: {first}"
    where = ours[-1]
    return (f"{type(e).__name__}: {first} (at {os.path.basename(where.filename)}:"
            f"{where.lineno} in {where.name})")


@contextlib.contextmanager
def failures_shared():
    """Around a distributed run: a rank that stops with an error of its own puts it in the
    rendezvous store (the first such rank only) before its connections close; a rank whose
    collective then fails (gloo: "Connection closed by peer", NCCL: an error of its own) waits
    up to WAIT_FOR_CAUSE_S for that line and stops with one line naming the rank, its host and
    its error, instead of the backend's traceback. A rank that died without a word (SIGKILL)
    leaves nothing to read: the collective's own error then stands."""
    try:
        yield
    except Exception as e:
        store = _store() if dist.is_initialized() else None
        if store is None or dist.get_world_size() == 1:
            raise
        me, key = dist.get_rank(), _failure_key()
        line = f"rank {me} on {socket.gethostname()}: {describe(e)}"
        if isinstance(e, UserError):  # its own: say it first, then stop
            _post(store, key, line)
            raise
        cause = _wait_for(store, key, WAIT_FOR_CAUSE_S)
        if cause is not None and not cause.startswith(f"rank {me} on "):
            raise UserError(f"stopped because {cause}") from None
        _post(store, key, line)  # nobody said why: this may be the cause (a bug, out of memory)
        raise


def _post(store, key: str, line: str) -> None:
    """The first poster's line stays; the round trip of compare_set returns once it is stored."""
    try:
        store.compare_set(key, "", line)
    except Exception:  # noqa: BLE001 - the store gone too: nothing more to tell
        pass


def _wait_for(store, key: str, seconds: float) -> str | None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if store.check([key]):
                return store.get(key).decode()
        except Exception:  # noqa: BLE001 - the store is gone: no cause to read
            return None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)
