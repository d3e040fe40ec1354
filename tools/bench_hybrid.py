#!/usr/bin/env python3
"""Training-step time of --parallel hybrid against DDP, K ranks, the same synthetic batches,
in one run: rounds alternate hybrid and DDP (the order flipped every round), each round a few
timed steps after one untimed, on models built from the same weights. Launches itself under
torchrun (gloo on the CPU; NCCL with --device gpu, one GPU per rank). Rank 0 prints JSON.

Usage: bench_hybrid.py [--nproc 2] [--batch 16] [--steps 3] [--rounds 3] [--device cpu|gpu]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed_steps(model, opt, x, y, steps: int, runtime, after_backward, sync) -> float:
    """ms per step over `steps` steps, after one untimed step."""
    from alexnet_pipe.runtime import train_step
    for i in range(steps + 1):
        if i == 1:  # after the untimed step
            sync()
            t0 = time.perf_counter()
        train_step(model, opt, x, y, runtime=runtime, after_backward=after_backward)
    sync()
    return 1e3 * (time.perf_counter() - t0) / steps


def rank_main(a) -> int:
    import torch
    import torch.distributed as dist
    from alexnet_pipe.hybrid import HybridAlexNet
    from alexnet_pipe.model import build_model
    from alexnet_pipe.runtime import Runtime
    gpu = a.device == "gpu"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if gpu else "cpu")
    if gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if gpu else "gloo")
    torch.manual_seed(0)
    grouped = build_model("alexnet", 1000).to(device)
    models = {"hybrid": HybridAlexNet(copy.deepcopy(grouped), rank=rank, world=world),
              "ddp": torch.nn.parallel.DistributedDataParallel(
                  grouped, device_ids=[device.index] if gpu else None)}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for k, m in models.items()}
    after = {"hybrid": models["hybrid"].reduce_gradients, "ddp": None}
    runtime = Runtime.for_device(device, channels_last=False)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(a.batch, 3, 224, 224, generator=g).to(device)
    y = torch.randint(0, 1000, (a.batch,), generator=g).to(device)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    ms = {k: [] for k in models}
    for r in range(a.rounds):
        for k in (list(models) if r % 2 == 0 else list(models)[::-1]):
            dist.barrier()
            ms[k].append(timed_steps(models[k], opts[k], x, y, a.steps, runtime, after[k], sync))
    if rank == 0:
        med = {k: statistics.median(v) for k, v in ms.items()}
        print(json.dumps({"device": a.device, "ranks": world, "batch_per_rank": a.batch,
                          "ms_per_step": {k: [round(t, 1) for t in v] for k, v in ms.items()},
                          "median_ms": {k: round(v, 1) for k, v in med.items()},
                          "hybrid_over_ddp_time": round(med["hybrid"] / med["ddp"], 3)}))
    dist.destroy_process_group()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="images per rank")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    a = ap.parse_args()
    if "RANK" in os.environ:
        return rank_main(a)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node", str(a.nproc), __file__, *sys.argv[1:]], env=env)


if __name__ == "__main__":
    sys.exit(main())
