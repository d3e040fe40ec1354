#!/usr/bin/env python3
"""The GPU table, measured in one run, the most wanted figures first (a figure that fails or is
cut off by the time limit is one line; the table is on disk after each):
- the paper model's bf16 train step on synthetic input at batch 256 and 128: eager, compiled,
  compiled with CUDA graphs (reduce-overhead); the same network with torch's LocalResponseNorm
  (what a user writes first) and the one-tower model without LRN, for scale; and exact variants
  to decide by: bf16 input from the loader, grouped convolutions as two dense ones, conv1 over
  a zero 4th channel;
- loader img/s (JPEG and raw shards, pixel mean), nvidia-smi dmon beside the JPEG run (is the
  hardware JPEG decoder used?); loader / step;
- `train` with the real pipeline / synthetic step, JPEG and raw, at 256 and 128, with data-wait
  and the GPU's idle share and time per step (train.StepTimer) of each run; the hours 90
  epochs of ImageNet's training images take at the JPEG runs' rates;
- our loader / DALI's own GPU pipeline (fn.readers.file + nvJPEG + crop_mirror_normalize on the
  same JPEGs, channel mean, fresh processes alternating) at batch 256, 128, 64 and 32; the
  same with each batch training the model (train fed by ours / by DALI's) at 256 and 128;
- `train --compile` with the real pipeline against eager `train` (the compile in the first
  epoch, left out), and the graphs made by the end of each epoch (a recompile shows there);
- reader-only img/s with one reader and with all; which stage limits.
Writes WORK/report.json, WORK/report.md and WORK/dmon.log. Figures the time limit cut off are
listed in the table as not reached; `--only` those, in a later check, measures them with the
figures their ratios are measured against.

Usage: gpu_report.py --work DIR [--device gpu|cpu] [--images 4096] [--batch-size 256]
                     [--only FIGURE ...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402

from alexnet_base import resources  # noqa: E402
from alexnet_base.config import AugmentConfig, BenchConfig, LoaderConfig, PrepareConfig  # noqa: E402
from alexnet_pipe.bench import bench_loader, model_step_rate  # noqa: E402
from bench_reader import reader_rate  # noqa: E402
from preprocessing.sample import make_sample  # noqa: E402
from preprocessing.prepare import run as prepare_run  # noqa: E402


IMAGENET_TRAIN_IMAGES = 1_281_167  # ILSVRC-2012's training set: the 90-epoch projection

# the table's rows after card and cores, in this order
PEER_BATCHES = (256, 128, 64, 32)
TRAIN_PEER_BATCHES = (256, 128)  # the same, each batch training the paper model
ROWS = ("dev_shm_free_mib", "model_synthetic", "model_synthetic_128", "model_compiled",
        "compiled_over_eager", "model_compiled_128", "model_graphed", "graphed_over_eager",
        "model_graphed_128", "graphed_128_over_eager", "model_torch_lrn",
        "eager_over_torch_lrn", "model_one_tower", "paper_over_one_tower", "model_bf16_input",
        "bf16_input_over_fp32", "model_split_groups", "split_groups_over_grouped",
        "model_4_channels", "four_channels_over_three", "synthetic_step_ms", "loader_jpeg",
        "loader_raw", "loader_over_model", "train_real", "real_over_synthetic", "data_wait",
        "gpu_wait", "gpu_step_ms", "projected_90_epochs_h", "train_seconds", "train_real_raw",
        "real_raw_over_synthetic", "gpu_wait_raw", "gpu_step_ms_raw", "train_real_128",
        "real_128_over_synthetic", "gpu_wait_128", "gpu_step_ms_128",
        "projected_90_epochs_h_128", "train_real_raw_128", "real_raw_128_over_synthetic",
        *(f"{k}_{b}" for b in PEER_BATCHES for k in ("peer_ours", "peer_dali", "ours_over_dali")),
        *(f"{k}_{b}" for b in TRAIN_PEER_BATCHES
          for k in ("train_peer_ours", "train_peer_dali", "train_ours_over_dali")),
        "train_real_compiled", "compiled_real_over_eager_real", "gpu_wait_compiled",
        "gpu_step_ms_compiled", "compiled_graphs_compiled", "reader_1", "reader_all",
        "train_real_hw", "real_hw_over_synthetic", "gpu_wait_hw", "gpu_step_ms_hw",
        "limiting_stage")


class SplitGroups(torch.nn.Module):
    """A groups=2 convolution as two dense convolutions on the halves of its channels."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        c, w, b = self.conv, self.conv.weight, self.conv.bias
        xs, ws, bs = x.chunk(2, 1), w.chunk(2, 0), b.chunk(2, 0)
        return torch.cat([torch.nn.functional.conv2d(xi, wi, bi, c.stride, c.padding)
                          for xi, wi, bi in zip(xs, ws, bs)], 1)


def measure(r: dict, name: str, fn) -> None:
    """r[name] = fn(), or the error in one line: one failed figure leaves the others standing.
    r["seconds"][name]: what the figure cost, compiles and process starts included (the next
    check's plan: the table is cut where the time limit falls)."""
    t0 = time.perf_counter()
    try:
        r[name] = float(fn())
    except Exception as e:  # noqa: BLE001 - any failure is a result to report
        first = (str(e).strip().splitlines() or [""])[0]
        r[name] = f"failed: {type(e).__name__}: {first[:200]}"
        print(f"{name}: {r[name]}", file=sys.stderr, flush=True)
    seconds = r.setdefault("seconds", {})
    seconds[name] = round(time.perf_counter() - t0, 1)
    print(f"{name}: {seconds[name]} s, {sum(seconds.values()):.0f} s so far", file=sys.stderr,
          flush=True)


def ratio(r: dict, name: str, top: str, bottom: str) -> None:
    """r[name] = top / bottom; "n/a" where one of them failed or is missing; no row before
    `top` is measured (not reached, or not asked for: --only)."""
    if top not in r:
        r.pop(name, None)
        return
    t, b = r.get(top), r.get(bottom)
    r[name] = t / b if isinstance(t, float) and isinstance(b, float) and b > 0 else "n/a"


def train_rate(a, r: dict, enc: str = "jpeg", tag: str = "", *extra: str) -> float:
    """A 3-epoch train run on `enc` shards in its own process: img/s over the epochs after the
    first (the default run also puts train_seconds and data_wait in r). Raw shards leave nvJPEG
    out: if their real / synthetic is near 1 where JPEG's is not, the decoder's GPU work is
    what the step loses; if not, the training process's own share of the loader. JPEG with
    `--hw-decoder-load 1` keeps the decoding on the decode engines, off the step's cores."""
    default = not tag
    run = a.work / f"run{tag}"
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "alexnet_pipe", "train", "--data",
                           str(a.work / enc), "--out", str(run), "--epochs", "3",
                           "--batch-size", str(a.batch_size), "--device", a.device,
                           "--bias-init", "caffe", "--log-every", "20", *extra], cwd=ROOT,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip()
                           else f"exit status {proc.returncode}")
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    epochs = [e for e in records if e["kind"] == "epoch"]
    steady = epochs[1:] or epochs
    if default:
        r["train_seconds"] = seconds
        r["data_wait"] = sum(e["data_wait"] for e in steady) / len(steady)
    # the GPU's own view: idle between steps (starved) or a step slower than synthetic (slowed)
    for key in ("gpu_wait", "gpu_step_ms"):
        if all(key in e for e in steady):
            r[key + tag] = sum(e[key] for e in steady) / len(steady)
    if all("compiled_graphs" in e for e in epochs):  # --compile: the same after each epoch
        r["compiled_graphs" + tag] = " / ".join(str(e["compiled_graphs"]) for e in epochs)
    return sum(e["images_per_s"] for e in steady) / len(steady)


RATIOS = (  # (ratio, figure, the figure it is measured against)
    ("loader_over_model", "loader_jpeg", "model_synthetic"),
    ("real_over_synthetic", "train_real", "model_synthetic"),
    ("real_raw_over_synthetic", "train_real_raw", "model_synthetic"),
    ("real_hw_over_synthetic", "train_real_hw", "model_synthetic"),
    ("compiled_real_over_eager_real", "train_real_compiled", "train_real"),
    ("real_128_over_synthetic", "train_real_128", "model_synthetic_128"),
    ("real_raw_128_over_synthetic", "train_real_raw_128", "model_synthetic_128"),
    ("compiled_over_eager", "model_compiled", "model_synthetic"),
    ("graphed_over_eager", "model_graphed", "model_synthetic"),
    ("graphed_128_over_eager", "model_graphed_128", "model_synthetic_128"),
    ("eager_over_torch_lrn", "model_synthetic", "model_torch_lrn"),
    ("paper_over_one_tower", "model_synthetic", "model_one_tower"),
    ("bf16_input_over_fp32", "model_bf16_input", "model_synthetic"),
    ("split_groups_over_grouped", "model_split_groups", "model_synthetic"),
    ("four_channels_over_three", "model_4_channels", "model_synthetic"),
)


# the figures in the order they are measured (the most wanted first; main() builds each)
FIGURES = ("model_synthetic", "model_synthetic_128", "model_one_tower", "model_torch_lrn",
           "model_bf16_input", "model_split_groups", "model_4_channels", "model_compiled",
           "loader_jpeg", "loader_raw", "train_real", "train_real_raw", "train_real_128",
           "train_real_raw_128", *(f"peer_ours_{b}" for b in PEER_BATCHES[:2]),
           "model_graphed_128", *(f"peer_ours_{b}" for b in PEER_BATCHES[2:]),
           *(f"train_peer_ours_{b}" for b in TRAIN_PEER_BATCHES), "model_compiled_128",
           "model_graphed", "train_real_compiled", "reader_1", "reader_all", "train_real_hw")


def plan(only=None) -> list[str]:
    """The figures to measure, in FIGURES' order: all, or `only` with the figures their ratios
    are measured against (RATIOS: a figure over its baseline), so that each ratio of theirs is
    of one run."""
    if not only:
        return list(FIGURES)
    want = set(only) | {bottom for _, top, bottom in RATIOS if top in only}
    return [f for f in FIGURES if f in want]


def publish(a, r: dict, pending=()) -> None:
    """The ratios and the limiting stage of what is measured so far, into WORK/report.json and
    WORK/report.md (printed by the caller at the end); `pending`: the figures still to come,
    listed as not reached (what a time limit leaves of the table)."""
    for name, top, bottom in RATIOS:
        ratio(r, name, top, bottom)
    for b in PEER_BATCHES:
        ratio(r, f"ours_over_dali_{b}", f"peer_ours_{b}", f"peer_dali_{b}")
    for b in TRAIN_PEER_BATCHES:
        ratio(r, f"train_ours_over_dali_{b}", f"train_peer_ours_{b}", f"train_peer_dali_{b}")
    for key, rate in (("projected_90_epochs_h", "train_real"),
                      ("projected_90_epochs_h_128", "train_real_128")):
        if isinstance(r.get(rate), float) and r[rate] > 0:  # training images only
            r[key] = IMAGENET_TRAIN_IMAGES * 90 / r[rate] / 3600
    if isinstance(r.get("model_synthetic"), float) and r["model_synthetic"] > 0:
        r["synthetic_step_ms"] = 1000 * a.batch_size / r["model_synthetic"]
    stages = {k: r.get(v) for k, v in (("reader", "reader_all"),
                                       ("loader", "loader_jpeg"), ("model", "model_synthetic"))}
    stages = {k: v for k, v in stages.items() if isinstance(v, float)}
    r["limiting_stage"] = min(stages, key=stages.get) if stages else "unknown"
    r["not_reached"] = list(pending)
    (a.out or a.work / "report.json").write_text(json.dumps(r, indent=2))
    rows = [("card", r["card"]), ("cores / DALI threads / shard readers",
                                  f"{r['cores']} / {r['threads']} / {r['readers']}")]
    rows += [(k.replace("_", " "), f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]))
             for k in ROWS if k in r]
    if pending:  # the next check's arguments: --only these
        rows.append(("not reached (--only these next)", " ".join(pending)))
    md = "| what | value |\n| --- | --- |\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    (a.work / "report.md").write_text(md)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--only", nargs="+", choices=FIGURES, metavar="FIGURE",
                    help="measure these figures and those their ratios are measured against "
                         "(a later check of what an earlier one did not reach)")
    a = ap.parse_args()
    gpu = a.device == "gpu"
    free = resources.shm_free()
    r = {"card": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
         "cores": len(os.sched_getaffinity(0)),
         "dev_shm_free_mib": round(free / 2**20) if free is not None else "n/a"}
    tree = a.work / "imagenet"
    if not tree.exists():
        make_sample(tree, 8, a.images // 8, max(4, a.batch_size // 8), seed=0, quirks=False,
                    large=0)  # val: at least one full batch
    for enc in ("jpeg", "raw"):
        prepare_run(PrepareConfig(imagenet_root=tree, out=a.work / enc, encoding=enc,
                                  progress=False))
    cfg = LoaderConfig(data=a.work / "jpeg", batch_size=a.batch_size, device=a.device,
                       augment=AugmentConfig(mean="pixel"))
    threads, readers = cfg.reader_counts(gpu)
    r.update(threads=threads, readers=readers)

    def loader_rate(enc):
        loader = LoaderConfig(**{**cfg.__dict__, "data": a.work / enc})
        return bench_loader(BenchConfig(loader=loader, seconds=a.seconds,
                                        repeats=3))["images_per_s"]

    def step(batch: int, mode=None, arch="alexnet", model=None, dtype="float32", channels=3):
        c = LoaderConfig(**{**cfg.__dict__, "batch_size": batch, "dtype": dtype})
        return model_step_rate(c, gpu, 1000, steps=30, warmup=5, arch=arch, compile_mode=mode,
                               model=model, in_channels=channels)

    def torch_lrn_model():  # the paper model with torch's LocalResponseNorm, per tower
        from bench_lrn import TorchLRN
        from alexnet_pipe.model import GroupLRN, build_model
        m = build_model("alexnet", 1000)
        for i, layer in enumerate(m.features):
            if isinstance(layer, GroupLRN):
                m.features[i] = TorchLRN(layer.groups)
        return m

    def split_groups_model():  # grouped convolutions as two dense ones each: the same math
        from alexnet_pipe.model import build_model
        m = build_model("alexnet", 1000)
        for i, layer in enumerate(m.features):
            if isinstance(layer, torch.nn.Conv2d) and layer.groups == 2:
                m.features[i] = SplitGroups(layer)
        return m

    def four_channel_model():  # conv1 over RGB and a zero 4th channel (DALI's pad_output)
        from alexnet_pipe.model import build_model
        m = build_model("alexnet", 1000)
        conv1 = m.features[1]
        wide = torch.nn.Conv2d(4, conv1.out_channels, conv1.kernel_size, conv1.stride)
        with torch.no_grad():
            wide.weight.zero_()
            wide.weight[:, :3] = conv1.weight
            wide.bias.copy_(conv1.bias)
        m.features[1] = wide
        return m

    def with_dmon(fn):  # the decode engines' use (jpg column) beside the JPEG loader's run
        dmon = subprocess.Popen(["nvidia-smi", "dmon", "-s", "u", "-d", "1"],
                                stdout=open(a.work / "dmon.log", "w"),
                                stderr=subprocess.STDOUT) if gpu and shutil.which("nvidia-smi") \
            else None
        try:
            return fn()
        finally:
            if dmon is not None:
                dmon.terminate()

    def peers(batch: int, step: bool = False) -> float:  # ours and DALI's own pipeline,
        # alternating fresh processes; step: each batch trains the model (train fed by each)
        import bench_loader as bl
        files = a.work / "files_jpeg"
        if not files.exists():
            bl.extract(a.work / "jpeg", files, raw=False)
        c = LoaderConfig(**{**cfg.__dict__, "batch_size": batch,
                            "augment": AugmentConfig(mean="channel")})
        spec = dict(gpu=gpu, files=files, batch=batch, threads=threads, config=c, step=step)
        rates, _ = bl.alternate({"dali": "native", "ours": "jpeg"}, spec, 2, 2.0)
        r[f"{'train_' if step else ''}peer_dali_{batch}"] = sorted(rates["dali"])[
            len(rates["dali"]) // 2]
        return sorted(rates["ours"])[len(rates["ours"]) // 2]

    half = a.batch_size // 2
    figures = [
        ("model_synthetic", lambda: step(a.batch_size)),
        ("model_synthetic_128", lambda: step(half)),
        ("model_one_tower", lambda: step(a.batch_size, arch="alexnet-owt")),
        ("model_torch_lrn", lambda: step(a.batch_size, model=torch_lrn_model())),
        # the exact variants are cheap: before the first compile (tens of seconds)
        ("model_bf16_input", lambda: step(a.batch_size, dtype="bfloat16")),
        ("model_split_groups", lambda: step(a.batch_size, model=split_groups_model())),
        ("model_4_channels", lambda: step(a.batch_size, model=four_channel_model(), channels=4)),
        ("model_compiled", lambda: step(a.batch_size, "default")),
        ("loader_jpeg", lambda: with_dmon(lambda: loader_rate("jpeg"))),
        ("loader_raw", lambda: loader_rate("raw")),
        ("train_real", lambda: train_rate(a, r)),
        ("train_real_raw", lambda: train_rate(a, r, "raw", "_raw")),
        ("train_real_128", lambda: train_rate(a, r, "jpeg", "_128", "--batch-size", str(half))),
        ("train_real_raw_128", lambda: train_rate(a, r, "raw", "_raw_128", "--batch-size",
                                                  str(half))),
        *((f"peer_ours_{b}", lambda b=b: peers(b)) for b in PEER_BATCHES[:2]),
        # a second compile and the graphs' capture: after the figures never measured on a GPU
        ("model_graphed_128", lambda: step(half, "reduce-overhead")),
        *((f"peer_ours_{b}", lambda b=b: peers(b)) for b in PEER_BATCHES[2:]),
        *((f"train_peer_ours_{b}", lambda b=b: peers(b, step=True))
          for b in TRAIN_PEER_BATCHES),
        ("model_compiled_128", lambda: step(half, "default")),
        ("model_graphed", lambda: step(a.batch_size, "reduce-overhead")),
        # --compile with the real pipeline, its compile in the first epoch (left out)
        ("train_real_compiled", lambda: train_rate(a, r, "jpeg", "_compiled", "--compile")),
        ("reader_1", lambda: reader_rate(a.work / "jpeg", 1, a.batch_size, a.seconds, None)),
        ("reader_all", lambda: reader_rate(a.work / "jpeg", readers, a.batch_size, a.seconds,
                                           None)),
        ("train_real_hw", lambda: train_rate(a, r, "jpeg", "_hw", "--hw-decoder-load", "1")),
    ]
    assert [name for name, _ in figures] == list(FIGURES)
    todo = plan(a.only)
    for i, (name, fn) in enumerate(f for f in figures if f[0] in todo):
        # the table is rewritten after each: a timeout leaves what was measured, and the rest
        # listed as not reached
        publish(a, r, todo[i:])
        measure(r, name, fn)
    publish(a, r)
    print((a.work / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
