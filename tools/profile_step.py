#!/usr/bin/env python3
"""Where a training step's time goes: one profiled step split into LRN, grouped convolutions,
dense convolutions, fully connected layers, the optimizer, casts and pads, the rest, and (on a
GPU) the GPU's idle time, for the eager and the compiled model.

    profile_step.py [--device gpu] [--batch-size 256] [--arch alexnet] [--compile] [--steps 3]
                    [--json OUT]

Each kernel (GPU) or operator's own time (CPU) is counted once, under the innermost operator
that ran it; an operator inside the optimizer's step is the optimizer's; a convolution is grouped
when its input has more channels than its weight. Inductor's fused kernels are classed by the
operators their names list. The GPU's idle time is the step's wall time (CUDA events) less the
time its kernels ran. Prints one JSON line per variant: milliseconds per step by category.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alexnet_pipe.model import build_model, input_dtype  # noqa: E402
from alexnet_pipe.train import train_step  # noqa: E402

CATEGORIES = ("lrn", "conv_grouped", "conv_dense", "fc", "optimizer", "cast_pad", "other")
_LRN = ("avg_pool2d", "pow", "aten::mul", "aten::add", "aten::div")  # GroupLRN's operators
_FC = ("addmm", "aten::mm", "aten::linear", "gemm")
_CAST = ("aten::to", "_to_copy", "aten::copy_", "constant_pad", "aten::pad")


def _groups(event) -> int | None:
    """Groups of a convolution event, from its recorded shapes: forward (input, weight, ...),
    backward (grad_output, input, weight, ...)."""
    shapes = [s for s in (event.input_shapes or []) if isinstance(s, list) and len(s) == 4]
    if len(shapes) >= 2:
        inp, weight = (shapes[1], shapes[2]) if "backward" in event.name and len(shapes) >= 3 \
            else (shapes[0], shapes[1])
        if weight[1]:
            return max(1, inp[1] // weight[1])
    return None


def category(event) -> str:
    """The category of an event's own time, from it and its ancestors."""
    chain, e = [], event
    while e is not None:
        chain.append(e)
        e = e.cpu_parent
    names = [c.name for c in chain]
    if any(n.startswith("Optimizer.step") or "_foreach_" in n or "sgd" in n.lower()
           for n in names):
        return "optimizer"
    for c in chain:  # the innermost convolution around it decides grouped or dense
        if "convolution" in c.name:
            g = _groups(c)
            if g is not None:
                return "conv_grouped" if g > 1 else "conv_dense"
    name = names[0].lower()
    if name.startswith("triton") or "fused" in name:  # inductor: the operators it fused
        if "avg_pool" in name or "pow" in name:
            return "lrn"
        if "constant_pad" in name or "_to_copy" in name or "convert" in name:
            return "cast_pad"
        return "other"
    if any(k in names[0] for k in _FC):
        return "fc"
    if any(names[0].startswith(k) or k in names[0] for k in _LRN):
        return "lrn"
    if any(k in names[0] for k in _CAST):
        return "cast_pad"
    return "other"


def split(prof, gpu: bool) -> dict:
    """Milliseconds by category over the profiled steps: kernels' time on a GPU, operators'
    own CPU time otherwise."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for e in prof.events():
        own = e.self_device_time_total if gpu else e.self_cpu_time_total
        if own > 0:
            out[category(e)] += own / 1000
    return out


def profile(model, opt, x, y, *, gpu: bool, amp: bool, steps: int, warmup: int) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    for _ in range(warmup):  # compile, autotune, allocate
        train_step(model, opt, x, y, amp=amp)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with torch_profile(activities=activities, record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(model, opt, x, y, amp=amp)
        sync()
        wall = (time.perf_counter() - t0) * 1000
    ms = {k: round(v / steps, 3) for k, v in split(prof, gpu).items()}
    busy = sum(ms.values())
    result = {"step_ms": round(wall / steps, 3), **ms}
    if gpu:  # the profiler's own cost inflates the wall time a little: an upper bound
        result["gpu_idle"] = round(max(wall / steps - busy, 0.0), 3)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--arch", default="alexnet")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--compile", action="store_true", help="also the compiled model")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", type=Path, help="append the JSON lines to this file")
    a = ap.parse_args()
    gpu = a.device == "gpu"
    device = torch.device("cuda" if gpu else "cpu")
    if gpu:
        torch.backends.cudnn.benchmark = True
    x = torch.randn(a.batch_size, 3, 224, 224, device=device) * 50
    y = torch.randint(0, a.classes, (a.batch_size,), device=device)
    if gpu:  # as the loader delivers it
        x = x.contiguous(memory_format=torch.channels_last)
    for compiled in ([False, True] if a.compile else [False]):
        torch.manual_seed(0)
        model = build_model(a.arch, a.classes).to(device)
        if gpu:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        run = torch.compile(model) if compiled else model
        r = profile(run, opt, input_dtype(x, gpu), y, gpu=gpu, amp=gpu, steps=a.steps,
                    warmup=a.warmup + (2 if compiled else 0))
        line = json.dumps({"arch": a.arch, "device": a.device, "batch": a.batch_size,
                           "compiled": compiled, **r})
        print(line, flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
