#!/usr/bin/env python3
"""Reader-only throughput: the external source alone (shard reads and augmentation draws, no
decode, no crop), images/s per reader count: processes for JPEG shards, threads for raw ones
where the loader has them (0: read in the pipeline's process). What the CPU must sustain once
nvJPEG decodes on the GPU.

The pipeline hands on only the images' shapes: in training the decoder (JPEG) or the copy to
the GPU (raw) reads the external source's output in place, so copying the batch out to Python,
which costs as much as a read for raw images, is not part of reading (--copy-out times it too).

Usage: bench_reader.py --data SHARDS [--workers 1 2] [--batch-size 128] [--seconds 4]
       [--depth N]  (the source's prefetch_queue_depth; default: the loader's, 2 x workers)
       [--copy-out]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:  # format 2 keeps split loading with the format; format 1 kept it in the reader
    from preprocessing.shards import load_split
except ImportError:
    from alexnet_pipe.reader import load_split


def make_source(info, batch: int, crop: int):
    """A train source streaming across epochs (as train's readers do), packing JPEG batches as
    a GPU decoder is fed them: the plan and the byte reader apart (this version), or the one
    source class of earlier commits (format 1's ended every epoch and packed nothing)."""
    try:
        from alexnet_pipe.plan import Plan
        from alexnet_pipe.reader import ShardReader
        from alexnet_pipe.source import BatchSource
    except ImportError:
        from alexnet_pipe.reader import BatchSource
        fields = BatchSource.__dataclass_fields__
        stream = {k: v for k, v in (("epochs", 10**6), ("packed", True)) if k in fields}
        return BatchSource(split=info, batch_size=batch, train=True, crop=crop, **stream)
    from alexnet_base.config import AugmentConfig
    plan = Plan(total=info.total, size=info.size, batch_size=batch, train=True,
                augment=AugmentConfig(crop=crop), epochs=10**6)
    return BatchSource(plan, ShardReader(info), packed=True)


def _from_loader(name):
    """`name` from the module that holds it at this commit (the read engine moved into
    alexnet_pipe/reading.py; older commits kept it in pipeline.py, format 1 had none)."""
    import importlib
    for module in ("alexnet_pipe.reading", "alexnet_pipe.pipeline"):
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            pass
    return None


# the loader's depth (format 1 had none of its own: DALI's default of 1, --depth 0)
queue_depth = _from_loader("queue_depth") or (lambda prefetch, workers: max(prefetch, workers))
ReadAhead = _from_loader("ReadAhead")  # raw shards read in threads of the pipeline's process
try:  # fork only while CUDA is down (gpu_report measures this after its GPU work)
    from alexnet_base.resources import start_method
except ImportError:
    def start_method() -> str:
        return "fork"


def reader_rate(data: Path, workers: int, batch: int, seconds: float, depth: int | None,
                copy_out: bool = False, crop: int = 224) -> float:
    from nvidia.dali import fn, pipeline_def
    info = load_split(data, "train")
    source = make_source(info, batch, crop)
    kw = {} if depth == 0 else {"prefetch_queue_depth": depth or queue_depth(2, workers)}
    # workers 0: the reads in the pipeline's own process, as the CPU default for raw shards
    kw = {"parallel": True, **kw} if workers else {"parallel": False, "no_copy": True}
    callback = source
    if ReadAhead is not None and info.encoding == "raw" and workers:  # reader threads
        callback = ReadAhead(source, workers, kw.get("prefetch_queue_depth", 1))
        kw, workers = {"parallel": False, "no_copy": True}, 0

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, py_num_workers=workers,
                  py_start_method=start_method(), prefetch_queue_depth=2)
    def pipe():
        outs = fn.external_source(source=callback, num_outputs=len(source.batch(0, 0)), batch=True,
                                  batch_info=True, **kw)
        return (outs[0] if copy_out else outs[0].shape()), outs[1]
    p = pipe()
    with warnings.catch_warnings():  # "outputs ... not used": all six are read, as in training
        warnings.filterwarnings("ignore", message="The external source node")
        p.build()
    def run():
        try:
            p.run()
        except StopIteration:  # format-1 sources end each epoch: DALI drains and refills
            p.reset()
            p.run()
    for _ in range(3):  # warm-up: workers started, first reads done
        run()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        run()
        n += batch
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--depth", type=int, help="0: DALI's default (1)")
    ap.add_argument("--copy-out", action="store_true",
                    help="copy each batch of images out of the pipeline (the old measure)")
    a = ap.parse_args()
    for w in a.workers:
        rate = reader_rate(a.data, w, a.batch_size, a.seconds, a.depth, a.copy_out)
        print(json.dumps({"workers": w, "images_per_s": round(rate, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
