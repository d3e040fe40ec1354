#!/usr/bin/env python3
"""The paper model's training step with torch's LocalResponseNorm (per tower, in 3-D) against
the model's own GroupLRN (one pool over a view of the squares), and the one-tower model without
LRN for scale: img/s on synthetic input, and the largest difference of the two LRNs' outputs.

Usage: bench_lrn.py [--device cpu|gpu] [--batch-size 256] [--steps 20]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alexnet_base.config import LoaderConfig  # noqa: E402
from alexnet_pipe import model as M  # noqa: E402
from alexnet_pipe.bench import model_step_rate  # noqa: E402
from alexnet_pipe.runtime import Runtime  # noqa: E402


class TorchLRN(nn.Module):
    """What the model used before: torch's module on each tower's channels, in float32."""

    def __init__(self, groups: int = 2):
        super().__init__()
        self.groups, self.lrn = groups, nn.LocalResponseNorm(**M.LRN)

    def forward(self, x):
        wide = torch.promote_types(x.dtype, torch.float32)
        return torch.cat([self.lrn(p.to(wide)) for p in x.chunk(self.groups, 1)], 1).to(x.dtype)


def rate(arch: str, lrn, gpu: bool, batch: int, steps: int) -> float:
    """bench-loader's synthetic step rate, with `lrn` as the model's LRN."""
    M.GroupLRN = lrn  # build_model takes the class at call time
    cfg = LoaderConfig(data=Path("."), batch_size=batch)  # only the batch and crop are read
    runtime = Runtime.for_device(torch.device("cuda" if gpu else "cpu"))
    return model_step_rate(cfg, runtime, 1000, steps=steps, arch=arch)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "gpu"), default="gpu")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    device = torch.device("cuda" if a.device == "gpu" else "cpu")
    ours = M.GroupLRN
    x = torch.rand(a.batch_size, 96, 55, 55, device=device) * 120
    if device.type == "cuda":
        x = x.to(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        want, got = TorchLRN(2)(x.bfloat16()).float(), ours(2)(x.bfloat16()).float()
    r = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
         "batch": a.batch_size,
         "max_rel_diff_bf16": float(((got - want).abs() / want.abs().clamp_min(1e-3)).max())}
    for name, arch, lrn in (("torch_lrn", "alexnet", TorchLRN), ("group_lrn", "alexnet", ours),
                            ("one_tower_no_lrn", "alexnet-owt", ours)):
        r[name] = rate(arch, lrn, device.type == "cuda", a.batch_size, a.steps)
        print(f"{name}: {r[name]:.0f} img/s", flush=True)
    M.GroupLRN = ours
    r["group_over_torch"] = r["group_lrn"] / r["torch_lrn"]
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
