#!/usr/bin/env python3
"""What drawing the dropout masks for the whole global batch costs a step (model.GlobalDropout,
the price of a run that does not depend on the number of ranks): each rank draws the masks of
the global batch's K x B rows and keeps its B, where a per-rank mask would draw B. Both layers
(fc6's and fc7's 4,096 outputs), the mask scaled as the model does, per step, for K = 1 .. 8.

Usage: python -m tools.bench_masks [--device cpu|gpu] [--batch-size 128] [--repeats 20] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alexnet_pipe.model import FC_WIDTH, keep_mask  # noqa: E402


def mask_ms(rows: int, keep: int, device: str, repeats: int) -> float:
    """Milliseconds a step for both layers' masks drawn for `rows` rows, `keep` of them kept."""
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()  # around the timed region only
    times = []
    for step in range(repeats + 2):
        sync()
        t0 = time.perf_counter()
        for layer in (6, 7):
            m = keep_mask(0, step, layer, rows, FC_WIDTH, 0.5, device)[:keep]
            m * 2.0
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times[2:])[len(times[2:]) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--batch-size", type=int, default=128, help="per rank")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    device = "cuda" if a.device == "gpu" else "cpu"
    b = a.batch_size
    own = mask_ms(b, b, device, a.repeats)
    r = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "batch": b,
         "own_rows_ms": round(own, 2),
         "global_ms": {k: round(mask_ms(k * b, b, device, a.repeats), 2) for k in (1, 2, 4, 8)}}
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{r['device']}, {b} rows a rank: its own masks {own:.2f} ms a step; the global "
              f"batch's, K ranks: " + ", ".join(f"K={k} {v:.2f} ms"
                                                for k, v in r["global_ms"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
