#!/usr/bin/env python3
"""Where a training step's time goes: one profiled step split into LRN, grouped convolutions,
dense convolutions, fully connected layers, the optimizer, casts and pads, the rest, and (on a
GPU) the GPU's idle time, for the eager and the compiled model.

    profile_step.py [--device gpu] [--batch-size 256] [--arch alexnet] [--compile] [--steps 3]
                    [--json OUT]

On a GPU each kernel (and device copy) is counted once, from the device's timeline: under the
innermost operator that launched it (its category from that operator and its ancestors), or,
launched outside any operator, by its own name (a convolution's cuDNN kernels, whose names say
"implicit_gemm", are convolutions, never "fc"). On the CPU each operator's own time is counted
once. An operator inside the optimizer's step is the optimizer's; a convolution is grouped
when its input has more channels than its weight. The eager model's LRN is what its LRN modules
run, forward (a profiler range around each) and backward (the autograd nodes those ranges made,
matched by sequence number): not a guess from operator names, which dropout's multiply and
adaptive pooling share. Inductor's fused kernels are classed by the operators their names list.
The GPU's idle time is the step's wall time less the time the device's timeline shows kernels
running, so that on a GPU the categories and the idle time add up to the step.
Prints one JSON line per variant: milliseconds per step by category.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alexnet_pipe import optim  # noqa: E402
from alexnet_pipe.model import GroupLRN, build_model  # noqa: E402
from alexnet_pipe.runtime import Runtime, train_step  # noqa: E402

CATEGORIES = ("lrn", "conv_grouped", "conv_dense", "fc", "optimizer", "cast_pad", "other")
LRN_RANGE = "profile_step::lrn"  # the profiler range around each LRN module's forward
_BACKWARD = "autograd::engine::evaluate_function: "  # an autograd node's backward, run
_FC = ("addmm", "aten::mm", "aten::linear", "gemm")
_CAST = ("aten::to", "_to_copy", "aten::copy_", "constant_pad", "aten::pad")


def _groups(event) -> int | None:
    """Groups of a convolution event, from its recorded shapes: forward (input, weight, ...),
    backward (grad_output, input, weight, ...)."""
    shapes = [s for s in (event.input_shapes or []) if isinstance(s, list) and len(s) == 4]
    if len(shapes) >= 2:
        backward = "backward" in event.name and len(shapes) >= 3
        inp, weight = (shapes[1], shapes[2]) if backward else (shapes[0], shapes[1])
        if weight[1]:
            return max(1, inp[1] // weight[1])
    return None


def mark_lrn(model: torch.nn.Module) -> None:
    """A profiler range (LRN_RANGE) around the forward of each of the model's LRN modules
    (eager only: a compiled graph has no modules left to mark)."""
    for m in model.modules():
        if isinstance(m, GroupLRN):
            m.register_forward_pre_hook(_enter_lrn)
            m.register_forward_hook(_exit_lrn)


def _enter_lrn(module, args):
    module._profile_range = torch.autograd.profiler.record_function(LRN_RANGE)
    module._profile_range.__enter__()


def _exit_lrn(module, args, output):
    module._profile_range.__exit__(None, None, None)


def _chain(event) -> list:
    chain = []
    while event is not None:
        chain.append(event)
        event = event.cpu_parent
    return chain


def lrn_nodes(events) -> set[int]:
    """The sequence numbers of the autograd nodes made inside LRN_RANGE: those no forward
    operator outside it shares (an operator that makes no node carries the next node's number,
    which may be made after the range)."""
    inside, outside = set(), set()
    for e in events:
        if e.sequence_nr < 0 or e.name == LRN_RANGE:
            continue
        names = [c.name for c in _chain(e)]
        if any(n.startswith(_BACKWARD) for n in names):
            continue  # the backward pass's own operators
        (inside if LRN_RANGE in names else outside).add(e.sequence_nr)
    return inside - outside


def category(event, lrn: set[int] = frozenset()) -> str:
    """The category of an event's own time, from it and its ancestors; `lrn`: lrn_nodes()."""
    chain = _chain(event)
    names = [c.name for c in chain]
    if any(n.startswith("Optimizer.step") or "_foreach_" in n or "sgd" in n.lower()
           for n in names):
        return "optimizer"
    if any(c.name == LRN_RANGE or (c.name.startswith(_BACKWARD) and c.sequence_nr in lrn)
           for c in chain):
        return "lrn"
    for c in chain:  # the innermost convolution around it decides grouped or dense
        if "convolution" in c.name:
            g = _groups(c)
            if g is not None:
                return "conv_grouped" if g > 1 else "conv_dense"
    name = names[0].lower()
    if name.startswith("triton") or "fused" in name:  # inductor: the operators it fused
        return _fused(name)
    if any(k in names[0] for k in _FC):
        return "fc"
    if any(k in names[0] for k in _CAST):
        return "cast_pad"
    return "other"


def _fused(name: str) -> str:
    """An inductor kernel (lower-case name), by the operators its name lists."""
    if "avg_pool" in name or "pow" in name:
        return "lrn"
    if "constant_pad" in name or "_to_copy" in name or "convert" in name:
        return "cast_pad"
    return "other"


def kernel_category(name: str) -> str:
    """The category of a device kernel that no operator claims, from its name alone (grouped or
    dense cannot be told from it: dense)."""
    low = name.lower()
    if any(k in low for k in ("conv", "implicit_gemm", "fprop", "dgrad", "wgrad")):
        return "conv_dense"
    if low.startswith("triton") or "fused" in low:
        return _fused(low)
    if "gemm" in low or "matmul" in low:
        return "fc"
    if "memcpy" in low:
        return "cast_pad"
    return "other"


def split(events, gpu: bool) -> tuple[dict, float]:
    """(ms by category, ms busy) over the profiled steps. GPU: each device event once, its
    time under the operator whose `kernels` list it (or by its own name when none does); busy:
    all device events' time. CPU: each operator's own time; busy: their sum."""
    from collections import Counter

    from torch.autograd import DeviceType
    out = dict.fromkeys(CATEGORIES, 0.0)
    lrn = lrn_nodes(events)
    if not gpu:
        for e in events:
            if e.self_cpu_time_total > 0:
                out[category(e, lrn)] += e.self_cpu_time_total / 1000
        return out, sum(out.values())
    claimed = Counter()
    for e in events:
        if e.device_type == DeviceType.CPU and not e.is_async and e.kernels:
            out[category(e, lrn)] += sum(k.duration for k in e.kernels) / 1000
            claimed.update((k.name, k.duration) for k in e.kernels)
    busy = 0.0
    for e in events:
        if e.device_type == DeviceType.CPU:
            continue
        us = e.time_range.elapsed_us()
        busy += us / 1000
        if claimed[(e.name, us)] > 0:
            claimed[(e.name, us)] -= 1
        else:  # launched outside any operator
            out[kernel_category(e.name)] += us / 1000
    return out, busy


def summarise(events, wall_ms: float, steps: int, gpu: bool) -> dict:
    """{"step_ms", category: ms a step, ..., "gpu_idle" (GPU)}: on a GPU the categories and
    gpu_idle add up to step_ms."""
    ms, busy = split(events, gpu)
    result = {"step_ms": round(wall_ms / steps, 3),
              **{k: round(v / steps, 3) for k, v in ms.items()}}
    if gpu:  # the profiler's own cost inflates the wall time a little: an upper bound
        result["gpu_idle"] = round(max(wall_ms - busy, 0.0) / steps, 3)
    return result


def profile(model, opt, x, y, *, runtime: Runtime, steps: int, warmup: int) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    sync = torch.cuda.synchronize if runtime.gpu else (lambda: None)
    for _ in range(warmup):  # compile, autotune, allocate
        train_step(model, opt, x, y, runtime=runtime)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runtime.gpu else [])
    with torch_profile(activities=activities, record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(model, opt, x, y, runtime=runtime)
        sync()
        wall = (time.perf_counter() - t0) * 1000
    return summarise(prof.events(), wall, steps, runtime.gpu)


def variant(arch: str, classes: int, batch: int, *, gpu: bool, compiled: bool, steps: int,
            warmup: int) -> dict:
    """One profiled model: {"step_ms": wall time a step, category: ms a step, ...}."""
    runtime = Runtime.for_device(torch.device("cuda" if gpu else "cpu"))
    runtime.configure()
    torch.manual_seed(0)
    x = runtime.batch(torch.randn(batch, 3, 224, 224, device=runtime.device) * 50)
    y = torch.randint(0, classes, (batch,), device=runtime.device)
    model = runtime.place(build_model(arch, classes).to(runtime.device))  # as the loader
    opt = optim.sgd(model)
    if not compiled:
        mark_lrn(model)
    run = torch.compile(model, dynamic=False) if compiled else model  # as train compiles it
    return profile(run, opt, x, y, runtime=runtime, steps=steps,
                   warmup=warmup + (2 if compiled else 0))


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
    for compiled in ([False, True] if a.compile else [False]):
        r = variant(a.arch, a.classes, a.batch_size, gpu=gpu, compiled=compiled,
                    steps=a.steps, warmup=a.warmup)
        line = json.dumps({"arch": a.arch, "device": a.device, "batch": a.batch_size,
                           "compiled": compiled, **r})
        print(line, flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
