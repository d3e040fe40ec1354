#!/usr/bin/env python3
"""Does a JPEG that passes the reader's marker check (jpeg.header_problem) ever crash
DALI's decoder? DALI 2.4's CPU decoder dies with a segmentation fault when its parser rejects a
stream while other streams of the batch are still queued (BENCHMARKS.md), which is why the
reader checks unverified shards. This draws damaged copies of one JPEG (1-3 random bytes of
its headers overwritten), keeps those the check passes, and feeds each, 4th in a batch of 128,
to a bare DALI pipeline in a process of its own: a crash there is a hole in the check.

Usage: fuzz_jpeg_check.py [--copies 150] [--seed 2]
"""
from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH, POSITION = 128, 3  # where the crash is likeliest: many streams queued behind it


def decode_in_a_batch(path: str) -> int:
    """Exit status: 0 decoded, 1 DALI's error (a Python exception); a crash kills the process."""
    from nvidia.dali import fn, pipeline_def, types
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, "JPEG")
    good = np.frombuffer(buf.getvalue(), np.uint8)
    bad = np.frombuffer(Path(path).read_bytes(), np.uint8)
    batch = [good] * BATCH
    batch[POSITION] = bad

    @pipeline_def(batch_size=BATCH, num_threads=1, device_id=None, prefetch_queue_depth=2)
    def pipe():
        images = fn.external_source(source=lambda: batch, batch=True)
        return fn.decoders.image(images, device="cpu", output_type=types.RGB)
    p = pipe()
    p.build()
    try:
        p.run()
    except Exception:  # noqa: BLE001 - DALI's error, whichever class
        return 1
    return 0


def damaged_copies(copies: int, seed: int):
    """(drawn, [damaged streams the check passes]) for one 64x64 JPEG."""
    from PIL import Image

    from alexnet_pipe.jpeg import header_problem
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG",
                                                                             quality=90)
    good = buf.getvalue()
    headers = good.index(b"\xff\xda") + 14
    drawn, kept = 0, []
    while len(kept) < copies:
        d = bytearray(good)
        for _ in range(int(rng.integers(1, 4))):
            d[int(rng.integers(0, headers))] = int(rng.integers(0, 256))
        if bytes(d) == good:
            continue
        drawn += 1
        if header_problem(bytes(d)) is None:
            kept.append(bytes(d))
    return drawn, kept


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=150)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the child: decode this file
    a = ap.parse_args()
    if a.one:
        return decode_in_a_batch(a.one)
    drawn, kept = damaged_copies(a.copies, a.seed)
    outcome = {"decoded": 0, "DALI's error": 0, "crashed": 0}
    with tempfile.TemporaryDirectory() as tmp:
        for i, stream in enumerate(kept):
            path = Path(tmp) / f"copy-{i:04d}.jpg"
            path.write_bytes(stream)
            rc = subprocess.run([sys.executable, __file__, "--one", str(path)],
                                capture_output=True, timeout=120).returncode
            kind = {0: "decoded", 1: "DALI's error"}.get(rc, "crashed")
            outcome[kind] += 1
            if kind == "crashed":
                kept_at = ROOT / f"crash-{a.seed}-{i:04d}.jpg"
                kept_at.write_bytes(stream)
                print(f"crash (exit status {rc}): kept as {kept_at}", flush=True)
    print(f"{drawn} damaged copies drawn, {len(kept)} passed the check: " +
          ", ".join(f"{v} {k}" for k, v in outcome.items()))
    return 1 if outcome["crashed"] else 0


if __name__ == "__main__":
    sys.exit(main())
