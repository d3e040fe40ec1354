#!/usr/bin/env python3
"""What a mid-run checkpoint (train --save-every) costs the training step. The paper's SGD steps
on synthetic device-resident input; then, as runs.Saver does it, the state (weights and momentum)
copied to the host (checkpoint.host_copy: what the step waits for) and written by a thread
(checkpoint.save: atomic, fsynced) while the steps go on. Reports the copy's milliseconds, the
write's seconds and size, and the steps' time while the write is in flight over their time
without one (1.0: the write costs the step nothing), all in one process on one machine.

Usage: python -m tools.bench_save [--device cpu|gpu] [--classes 1000] [--crop 224]
       [--batch-size 32] [--steps 4] [--out DIR] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alexnet_pipe import checkpoint, optim  # noqa: E402
from alexnet_pipe.model import build_model  # noqa: E402
from alexnet_pipe.runtime import Runtime, train_step  # noqa: E402


def save_cost(device: str = "cpu", *, classes: int = 1000, crop: int = 224, batch: int = 32,
              steps: int = 4, out: Path | None = None) -> dict:
    runtime = Runtime.for_device(torch.device("cuda" if device == "gpu" else "cpu"))
    runtime.configure()
    model = runtime.place(build_model("alexnet", num_classes=classes, crop=crop)
                          .to(runtime.device))
    opt = optim.sgd(model)
    x = runtime.batch(torch.randn(batch, 3, crop, crop, device=runtime.device))
    y = torch.randint(0, classes, (batch,), device=runtime.device)

    def sync():
        if runtime.gpu:
            torch.cuda.synchronize()  # a CPU-GPU sync point: only around the timed regions

    def step():
        train_step(model, opt, x, y, runtime=runtime)

    def timed(n: int, until=None) -> tuple[float, int]:
        """Seconds a step over n steps, or until until() is true (at least one step)."""
        sync()
        t0, done = time.perf_counter(), 0
        while done < n if until is None else (done == 0 or not until()):
            step()
            done += 1
        sync()
        return (time.perf_counter() - t0) / done, done

    for _ in range(2):  # warm-up: allocations, cuDNN's autotuning, the momentum buffers
        step()
    alone, _ = timed(steps)
    sync()
    t0 = time.perf_counter()
    state = checkpoint.host_copy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    sync()
    copy_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(dir=out) as run:
        written = {}

        def write():
            t = time.perf_counter()
            written["path"] = checkpoint.save(Path(run), state, name=checkpoint.step_name(1),
                                              keep=1)
            written["seconds"] = time.perf_counter() - t
        writer = threading.Thread(target=write)
        writer.start()
        during, n_during = timed(steps, until=lambda: not writer.is_alive())
        writer.join()
        size = written["path"].stat().st_size
    return {"device": torch.cuda.get_device_name() if runtime.gpu else "cpu",
            "classes": classes, "crop": crop, "batch": batch,
            "copy_ms": round(copy_s * 1e3, 1), "write_s": round(written["seconds"], 2),
            "file_mb": round(size / 1e6, 1), "step_ms": round(alone * 1e3, 1),
            "step_ms_while_writing": round(during * 1e3, 1), "steps_while_writing": n_during,
            "writing_over_alone": round(during / alone, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None, help="where to write (default: /tmp)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    r = save_cost(a.device, classes=a.classes, crop=a.crop, batch=a.batch_size, steps=a.steps,
                  out=a.out)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{r['device']}: the state's copy to the host {r['copy_ms']} ms (the step waits "
              f"for it); the write {r['write_s']} s in the background ({r['file_mb']} MB); "
              f"a step {r['step_ms']} ms alone, {r['step_ms_while_writing']} ms while writing "
              f"({r['writing_over_alone']}x, {r['steps_while_writing']} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
