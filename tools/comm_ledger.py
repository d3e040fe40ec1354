#!/usr/bin/env python3
"""The communication ledger as a table: megabytes each rank sends per training step under ddp,
towers and hybrid (alexnet_pipe/ledger.py, from the model's shapes), and the time that takes
on a link of each kind, for K ranks at a batch per rank. Markdown on stdout.

Usage: comm_ledger.py [--batch 128] [--worlds 2 4 8] [--classes 1000] [--act-bytes 2]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alexnet_pipe.ledger import sent_per_step  # noqa: E402

LINKS = {"PCIe 5 x16 (64 GB/s each way)": 64e9, "NVLink 4 (450 GB/s each way)": 450e9,
         "100 Gb/s between nodes (12.5 GB/s)": 12.5e9}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128, help="images per rank")
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--act-bytes", type=int, default=2, help="2: bf16 activations")
    a = ap.parse_args()
    print("| mode | K | MB sent per rank per step | " + " | ".join(f"ms on {n}" for n in LINKS)
          + " |")
    print("| --- | ---: | ---: |" + " ---: |" * len(LINKS))
    for k in a.worlds:
        for mode in ("ddp", "towers", "hybrid"):
            if mode == "towers" and k != 2:
                continue
            b = sent_per_step(mode, world=k, batch=a.batch, num_classes=a.classes,
                              act_bytes=a.act_bytes)
            times = " | ".join(f"{1e3 * b / bw:.2f}" for bw in LINKS.values())
            print(f"| {mode} | {k} | {b / 1e6:.1f} | {times} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
