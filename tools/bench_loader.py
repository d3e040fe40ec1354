#!/usr/bin/env python3
"""The loader goals in one run, on one machine, on the same 256x256 images:

  native   DALI's own file reader on the 256x256 JPEGs (decode, random crop, flip): the reference
  source   the same pipeline fed by a bare external source of the same JPEG bytes held in memory
           (--source): what any loader that feeds DALI its own bytes can reach at best
  jpeg     bench-loader on JPEG shards, full augmentation (crop, flip, lighting, pixel mean)
  bare     DALI's numpy reader on the raw uint8 images (crop and normalise): the raw reference
  raw      bench-loader on raw shards, full augmentation
  baseline torch DataLoader + PIL/numpy on the JPEG shards, same work as `jpeg`

Each reference and our loader are timed in alternating rounds (the order flipped every round),
so a shared machine's load shifts both alike, each in a fresh process every round: one DALI
pipeline instance keeps its own speed for as long as it lives, up to 20% off another instance
of the same pipeline (--control measures this A/A spread). Each ratio is the median over rounds
of ours / reference in the same round. Each pipeline's CPU time per image (from /proc, by
group: DALI's threads, the main thread, reader processes, the rest) comes with it: less noisy
than a rate on a shared machine, and on a GPU host the cores a GPU's reading needs.

With --step each batch also trains the paper model (the step `train` runs), so the ratio is
`train` fed by our loader / `train` fed by DALI's own pipeline. On a GPU every pipeline hands
the model the layout it runs in (channels_last: DALI's pipelines emit HWC, as ours does).

Usage: bench_loader.py [--images 1024] [--batch-size 128] [--device cpu] [--seconds 3] [--rounds 5]
       [--mean channel|pixel] [--encodings jpeg raw] [--control] [--source] [--step] [--no-baseline]
       [--dali-batches K]
       [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.bench_memory import family  # noqa: E402
from preprocessing.sample import make_sample  # noqa: E402

from alexnet_base.config import AugmentConfig, BenchConfig, LoaderConfig, PrepareConfig  # noqa: E402
from alexnet_pipe.bench import (STREAM, baseline_rate, endless, model_step_rate,  # noqa: E402
                                timed_rate)
from alexnet_pipe.normalize import Normalization  # noqa: E402
from alexnet_pipe.prepared import open_shards  # noqa: E402
from alexnet_pipe.runtime import Runtime, train_step  # noqa: E402
from alexnet_pipe.reading import ShardFiles  # noqa: E402
from preprocessing import shards  # noqa: E402
from preprocessing.prepare import run as prepare_run  # noqa: E402


def extract(shard_dir: Path, out: Path, raw: bool) -> None:
    """Write each shard image as a file (JPEG, or .npy for raw) in class folders."""
    for path in shards.list_shards(shard_dir, "train"):
        files = ShardFiles([path])
        labels = files.index(0).labels
        for i, (img, label) in enumerate(zip(files.read(0, np.arange(len(labels))), labels)):
            folder = out / f"{label:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            if raw:
                np.save(folder / f"{path.stem}_{i}.npy", img)
            else:
                (folder / f"{path.stem}_{i}.jpg").write_bytes(img.tobytes())
        files.close()


def native_loader(files: Path, raw: bool, batch: int, threads: int, gpu: bool,
                  source: bool = False, hwc: bool = False, crop: int = 224):
    """DALI's own reader over one file per image, with the same crop, flip and channel mean: an
    endless iterator. source: the JPEG files' bytes read into memory first and fed by an
    external source (random order, labels from the folders) instead of DALI's reader, the
    rest the same: the plain form of what our loader does, without shards or draws of its own.
    hwc: the images come out HWC (what a channels_last model takes as an NCHW view)."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
    feed = None
    if source:
        paths = sorted(files.rglob("*.jpg"))
        streams = [np.frombuffer(p.read_bytes(), np.uint8) for p in paths]
        labels_of = np.array([int(p.parent.name) for p in paths], np.int32)
        rng = np.random.default_rng(0)

        def feed():
            pick = rng.integers(0, len(streams), batch)
            return [streams[i] for i in pick], [labels_of[i:i + 1] for i in pick]

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=0 if gpu else None, seed=0)
    def pipe():
        if feed is not None:
            jpegs, labels = fn.external_source(source=feed, num_outputs=2, batch=True,
                                               dtype=[types.UINT8, types.INT32])
            images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu",
                                       output_type=types.RGB)
        elif raw:
            images = fn.readers.numpy(files=sorted(map(str, files.rglob("*.npy"))),
                                      random_shuffle=True, name="r")
            labels = fn.constant(idata=[0], shape=[1])
            if gpu:
                images = images.gpu()
        else:
            jpegs, labels = fn.readers.file(file_root=str(files), random_shuffle=True, name="r")
            images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu",
                                       output_type=types.RGB)
        if gpu:
            labels = labels.gpu()
        out = fn.crop_mirror_normalize(images, crop=(crop, crop),
                                       crop_pos_x=fn.random.uniform(range=(0, 1)),
                                       crop_pos_y=fn.random.uniform(range=(0, 1)),
                                       mirror=fn.random.coin_flip(), dtype=types.FLOAT,
                                       mean=[123.0, 117.0, 104.0],
                                       output_layout="HWC" if hwc else "CHW")
        return out, labels

    if feed is not None:  # no reader, no epochs: the source never ends
        return endless(DALIGenericIterator([pipe()], ["images", "labels"]))
    return endless(DALIGenericIterator([pipe()], ["images", "labels"], reader_name="r",
                                       auto_reset=True))


def stepped(pairs, config: LoaderConfig, device: torch.device):
    """One training step of the paper model (what `train` runs: bf16 autocast on a GPU with
    cuDNN's autotuning, the loader's layout) on each (images, labels) batch of `pairs`, as an
    endless iterator. Labels are taken modulo 8 classes: the references label by folder."""
    from alexnet_pipe import optim
    from alexnet_pipe.model import build_model
    runtime = Runtime.for_device(device, channels_last=config.channels_last)
    runtime.configure()  # as train sets it: fixed shapes, each algorithm timed once
    model = runtime.place(build_model("alexnet", num_classes=8,
                                      crop=config.augment.crop).to(device))
    opt = optim.sgd(model)
    for images, labels in pairs:
        images, labels = runtime.batch(images, labels)
        train_step(model, opt, images, labels.long() % 8, runtime=runtime)
        yield


def cpu_seconds(pid: int) -> dict:
    """CPU seconds so far of process `pid` and its descendants, by group: "DALI threads"
    (decoding and augmenting), "main thread", "readers" (reader processes and threads),
    "other" (DALI's executor, file-reading threads...), from each thread's /proc schedstat
    (nanoseconds on a CPU; `stat` counts 10 ms ticks)."""
    out = {}
    for p in family(pid):
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                name = (task / "comm").read_text().strip()
                ns = int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):  # ended meanwhile
                continue
            group = ("readers" if p != pid or name.startswith("shard-reader")
                     else "main thread" if task.name == str(pid)
                     else "DALI threads" if name.startswith("[DALI][TP") else "other")
            out[group] = out.get(group, 0.0) + ns / 1e9
    return out


def _measure(kind: str, spec: dict, seconds: float, conn) -> None:
    """In a fresh process: [(img/s, CPU us per image by group) of each phase] of one pipeline,
    sent back on `conn`; or (None, the error in one line), the traceback on stderr."""
    try:
        conn.send(_rate_and_cpu(kind, spec, seconds))
    except Exception as e:
        conn.send((None, f"{type(e).__name__}: {_cause(str(e))[:300]}"))
        raise


def _cause(message: str) -> str:
    """The line of an error message that says what went wrong: DALI's pipeline errors open with
    "Critical error in pipeline:" and say it after their traceback, below "encountered:"."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if "encountered:" in lines and lines.index("encountered:") + 1 < len(lines):
        return lines[lines.index("encountered:") + 1]
    return lines[0] if lines else ""


def phases(spec: dict) -> tuple[str, ...]:
    """What a pipeline's process times, in order: "loader" (its batches alone), "train" (each
    batch training the paper model: train fed by it); by default the one --step says."""
    return spec.get("phases") or (("train",) if spec.get("step") else ("loader",))


def _rate_and_cpu(kind: str, spec: dict, seconds: float) -> list[tuple[float, dict]]:
    """Build one pipeline (`kind`: a reference or ours); for each phase, 5 untimed batches (the
    model's compile and autotuning), then img/s over `seconds` and the CPU time per image
    ({group: us}, see cpu_seconds)."""
    gpu = spec["gpu"]
    device = torch.device("cuda" if gpu else "cpu")
    if kind in ("native", "bare", "source"):
        hwc = gpu and spec["config"].channels_last  # the layout ours hands a GPU model
        it = native_loader(spec["files"], kind == "bare", spec["batch"], spec["threads"], gpu,
                           source=kind == "source", hwc=hwc, crop=spec["config"].augment.crop)
        pairs = ((b[0]["images"].permute(0, 3, 1, 2) if hwc else b[0]["images"],
                  b[0]["labels"].reshape(-1)) for b in it)
    else:
        cfg = spec["config"]
        data = open_shards(cfg.data, ("train",), verify=False)
        it = endless(data.loader("train", cfg, device=device, epochs=STREAM))
        pairs = ((b.images, b.labels) for b in it)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    out = []
    for phase in phases(spec):
        run = stepped(pairs, spec["config"], device) if phase == "train" else pairs
        timed_rate(run, 0, None, 5, spec["batch"], sync)
        before, t0 = cpu_seconds(os.getpid()), time.perf_counter()
        rate = timed_rate(run, None, seconds, 0, spec["batch"], sync)
        images = rate * (time.perf_counter() - t0)
        after = cpu_seconds(os.getpid())
        out.append((rate, {g: (after[g] - before.get(g, 0.0)) / images * 1e6 for g in after}))
    return out


def alternate(pipelines: dict, spec: dict, rounds: int, seconds: float) -> tuple[dict, dict]:
    """({label: [img/s per round]}, {label: [CPU us per image by group, per round]}) of
    `pipelines` ({label: kind}; two labels may name one kind: an A/A control), each timed in a
    fresh process every round, the order reversed every other round; the phases after the
    first (phases()) under "LABEL PHASE". Fresh processes, because one instance keeps its own
    speed: two instances of the same DALI pipeline timed in alternation differ by up to 20%
    for as long as they live (see BENCHMARKS.md), more than the differences measured here."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")  # a clean process each time: no fork of this one's state
    names = [lambda label: label] + [lambda label, p=p: f"{label} {p}" for p in phases(spec)[1:]]
    rates = {name(label): [] for label in pipelines for name in names}
    cpu = {name(label): [] for label in pipelines for name in names}
    for r in range(rounds):
        for label in (list(pipelines) if r % 2 == 0 else list(pipelines)[::-1]):
            ours, theirs = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_measure, args=(pipelines[label], spec, seconds, theirs))
            proc.start()
            theirs.close()
            try:
                got = ours.recv()
            except EOFError:  # it died (a signal): what it printed is on stderr
                proc.join()
                raise RuntimeError(f"the {label} pipeline's process ended with exit code "
                                   f"{proc.exitcode} and no rate") from None
            proc.join()
            if isinstance(got, tuple) and got[0] is None:  # it failed: got[1] is its error
                raise RuntimeError(f"the {label} pipeline failed: {got[1]}")
            for name, (rate, per_image) in zip(names, got):
                rates[name(label)].append(rate)
                cpu[name(label)].append(per_image)
    return rates, cpu


def cpu_line(rounds: list[dict]) -> str:
    """Median CPU us per image of each group over rounds, and their sum."""
    groups = sorted({g for r in rounds for g in r})
    med = {g: statistics.median(r.get(g, 0.0) for r in rounds) for g in groups}
    return (f"{sum(med.values()):.0f} us (" +
            ", ".join(f"{g} {v:.0f}" for g, v in med.items()) + ")")


def ratio(rates: dict, ours: str, ref: str) -> tuple[float, float, float]:
    """(median, min, max) over rounds of ours / ref in the same round."""
    r = [a / b for a, b in zip(rates[ours], rates[ref])]
    return statistics.median(r), min(r), max(r)


def _fmt(r: tuple[float, float, float]) -> str:
    return f"{r[0]:.2f}x ({r[1]:.2f}-{r[2]:.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--readers", type=int, default=None,
                    help="shard readers: processes (JPEG), threads (raw); default: the product's")
    ap.add_argument("--prefetch", type=int, default=LoaderConfig.prefetch,
                    help="batches our pipeline prepares ahead (the product's --prefetch)")
    ap.add_argument("--dali-batches", type=int, default=None,
                    help="batches per DALI iteration of our loader (the product's option)")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--seconds", type=float, default=3.0, help="per round and pipeline")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mean", choices=("channel", "pixel"), default="channel",
                    help="channel: the same work as the native reference; pixel: the paper's")
    ap.add_argument("--work", type=Path, help="keep the generated data here")
    ap.add_argument("--encodings", nargs="+", choices=("jpeg", "raw"), default=["jpeg", "raw"])
    ap.add_argument("--no-baseline", action="store_true", help="skip the torch DataLoader")
    ap.add_argument("--step", action="store_true",
                    help="each batch also trains the paper model: train fed by each pipeline")
    ap.add_argument("--control", action="store_true",
                    help="also time each reference against itself (A/A): the harness's noise")
    ap.add_argument("--source", action="store_true",
                    help="also time DALI's pipeline fed by a bare external source of the same "
                         "JPEG bytes in memory: the best a loader feeding DALI can do (JPEG)")
    a = ap.parse_args()
    gpu = a.device == "gpu"
    work = a.work or Path(tempfile.mkdtemp(prefix="bench_loader_"))
    tree = work / "imagenet"
    if not tree.exists():
        make_sample(tree, 8, a.images // 8, 1, seed=0, quirks=False, large=0)
    rows, ratios, cpu_lines = {}, {}, {}
    for enc in a.encodings:
        out = work / enc
        if not (out / "manifest.json").exists():
            prepare_run(PrepareConfig(imagenet_root=tree, out=out, encoding=enc, shard_size=256,
                                      progress=False))
        files = work / f"files_{enc}"
        if not files.exists():
            extract(out, files, raw=enc == "raw")
        ref = "bare" if enc == "raw" else "native"
        cfg = LoaderConfig(data=out, batch_size=a.batch_size, device=a.device, threads=a.threads,
                           readers=a.readers, prefetch=a.prefetch, dali_batches=a.dali_batches,
                           augment=AugmentConfig(mean=a.mean))
        spec = dict(gpu=gpu, files=files, batch=a.batch_size, threads=a.threads, config=cfg,
                    step=a.step)
        pipelines = ({ref: ref, enc: enc} | ({f"{ref} A/A": ref} if a.control else {})
                     | ({"source": "source"} if a.source and enc == "jpeg" else {}))
        rates, cpu = alternate(pipelines, spec, a.rounds, a.seconds)
        print(json.dumps({"rates": {k: [round(v) for v in r] for k, r in rates.items()}}),
              flush=True)
        cpu_lines.update({k: cpu_line(r) for k, r in cpu.items()})
        rows[ref], rows[enc] = (statistics.median(rates[k]) for k in (ref, enc))
        ratios[enc] = ratio(rates, enc, ref)
        if "source" in rates:
            rows["source"] = statistics.median(rates["source"])
            ratios["source"] = ratio(rates, "source", ref)
            ratios["jpeg over source"] = ratio(rates, enc, "source")
        if a.control:
            ratios[f"{ref} A/A"] = ratio(rates, f"{ref} A/A", ref)
            # against both instances of the reference in each round: half its instance noise
            both = [(x + y) / 2 for x, y in zip(rates[ref], rates[f"{ref} A/A"])]
            ratios[f"{enc} both"] = ratio({enc: rates[enc], "both": both}, enc, "both")
        if enc == "jpeg" and not a.no_baseline:
            bench = BenchConfig(loader=cfg, seconds=a.seconds, repeats=3)
            info = shards.load_split(out, "train")
            stats = shards.load_stats(out, info)
            rows["baseline"] = baseline_rate(bench, info, stats,
                                             Normalization.from_stats(stats, cfg.augment))
    if gpu:
        rows["model"] = model_step_rate(cfg, Runtime.for_device(torch.device("cuda")), 8)
    jpegs = list((work / "files_jpeg").rglob("*.jpg"))
    mean_kb = np.mean([p.stat().st_size for p in jpegs]) / 1024 if jpegs else float("nan")
    print(json.dumps({k: round(v, 1) for k, v in rows.items()}))
    print(f"\n{a.images} images, 256x256 JPEG mean {mean_kb:.0f} KB, batch {a.batch_size}, "
          f"{a.rounds} alternating rounds of {a.seconds:g} s (a fresh process each), "
          f"{a.threads} DALI threads + {'default' if a.readers is None else a.readers} reader "
          f"processes, device {a.device}, --mean {a.mean}")
    print("| pipeline | images/s | ratio (median, range over rounds) |")
    print("| --- | ---: | --- |")
    for enc, ref, what in (("jpeg", "native", "DALI file reader, 256 JPEGs"),
                           ("raw", "bare", "DALI numpy reader, raw uint8")):
        if enc not in a.encodings:
            continue
        print(f"| {what} ({ref}) | {rows[ref]:.0f} | 1.00 |")
        print(f"| bench-loader, {enc} shards, full aug | {rows[enc]:.0f} | "
              f"{_fmt(ratios[enc])} {ref} |")
        if enc == "jpeg" and "source" in rows:
            print(f"| the same DALI pipeline fed by an external source of the JPEG bytes in "
                  f"memory (source) | {rows['source']:.0f} | {_fmt(ratios['source'])} {ref}; "
                  f"jpeg = {_fmt(ratios['jpeg over source'])} source |")
        if a.control:
            print(f"| {what}, another instance (A/A) | | {_fmt(ratios[ref + ' A/A'])} {ref} |")
            print(f"| bench-loader, {enc} shards, vs both instances | | "
                  f"{_fmt(ratios[enc + ' both'])} |")
    if "baseline" in rows:
        print(f"| torch DataLoader + PIL/numpy, JPEG shards | {rows['baseline']:.0f} | "
              f"jpeg = {rows['jpeg'] / rows['baseline']:.2f}x baseline |")
    if gpu:
        k = a.encodings[0]
        print(f"| AlexNet train step, synthetic input | {rows['model']:.0f} | "
              f"{k} = {rows[k] / rows['model']:.2f}x model |")
    print("\nCPU time per image, median over rounds (the pipeline's process and its reader "
          "processes):")
    for k, line in cpu_lines.items():
        print(f"  {k}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
