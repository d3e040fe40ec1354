"""Everything distributed in one place: rank and world size from torchrun's environment, the
process group (NCCL on GPUs, gloo on the CPU), and the few collectives training needs."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def from_environment() -> DistEnv:
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain run is rank 0 of 1."""
    return DistEnv(rank=int(os.environ.get("RANK", 0)), world=int(os.environ.get("WORLD_SIZE", 1)),
                   local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def init(env: DistEnv, gpu: bool) -> None:
    if env.enabled and not dist.is_initialized():
        if gpu:
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group("nccl" if gpu else "gloo")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], device) -> list[float]:
    """Sum numbers over ranks (a sync point)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def same_on_all_ranks(value: float, device) -> bool:
    """True when every rank holds the same number (for example a parameter checksum)."""
    if not dist.is_initialized():
        return True
    t = torch.tensor([value, -value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t[0].item() == value and -t[1].item() == value


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
