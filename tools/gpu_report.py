#!/usr/bin/env python3
"""The GPU table, measured in one run, the owed figures first (a figure that fails or is cut
off by the time limit is one line; the table is on disk after each):

  owed    the paper model's bf16 train step on synthetic input at batch B (256): eager,
          compiled, and the one-tower model for scale; loader img/s on JPEG shards (pixel
          mean), nvidia-smi dmon beside it (is the hardware JPEG decoder used?); `train` with
          the real pipeline / synthetic step; our loader / DALI's own GPU pipeline
          (fn.readers.file + nvJPEG + crop_mirror_normalize on the same JPEGs, channel mean,
          the model's layout, fresh processes alternating), alone and each batch training the
          model (train fed by ours / by DALI's); then the same at B/2 (128); CUDA graphs
          (reduce-overhead) at B/2 and B;
  then    torch's LocalResponseNorm, raw shards (loader and train), the peers at B/4 and B/8,
          `train --compile` against eager train (graphs made by each epoch's end: a recompile
          shows), the compiled step at B/2, exact variants (bf16 input, the towers as dense
          convolutions on one GPU, a zero 4th input channel), reader-only img/s with one reader
          and with all, train with the hardware decoder only.

A train figure is the rate of its timed steps: 2 epochs of `--warmup-steps + --timed-steps`
steps each, rated from the step records after each epoch's first `--warmup-steps` (its first
record: the compile, or queues the readers filled during the last evaluation), with the GPU's
idle share and step time of the same steps (train.StepTimer). The hours 90 epochs of
ImageNet's training images take follow from the rates at B and B/2.

The data (8 classes, the train images repeated to fill the steps) is prepared in a process of
its own, niced, while the first figures, which need none, run; a timed window waits for it.
Each figure's cost on an H200 is estimated in COST; the run first prints which figures it
expects to reach within --budget seconds. Writes WORK/report.json, WORK/report.md (the table
gpu_check.sh prints) and WORK/dmon.log; figures the time limit cut off are listed as not reached, and `--only` those,
in a later check, measures them with the figures their ratios are measured against.

Usage: gpu_report.py --work DIR [--device gpu|cpu] [--batch-size 256] [--budget 345]
                     [--only FIGURE ...] [--plan]
       (a CPU rehearsal: --device cpu --batch-size 8 --size 128 --crop 112 --timed-steps 4
        --warmup-steps 2 --seconds 0.5 --rounds 1)
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

IMAGENET_TRAIN_IMAGES = 1_281_167  # ILSVRC-2012's training set: the 90-epoch projection
CLASSES = 8  # of the generated data: the synthetic step takes the train runs' number too

# Seconds each figure is expected to take on an H200 host (16 cores), its process starts,
# compiles and captures included, in the order measured. From the first H200 check
# (2026-11-28): a fresh process ready for CUDA and DALI about 8 s; the paper model's first
# compile 48 s; the fused LRN's two kernels about 15 s cold, again for a new batch shape; a
# 3-epoch train run of 4,096 images with its 3 checkpoints about 30 s. Scaled by the CPU
# rehearsal's proportions between figures (each figure's real cost lands in report.json's
# "seconds": the next check's plan).
COST = {
    # owed: the figures this project exists for
    "model_synthetic": 25,      # the fused LRN's compile, cuDNN's autotuning, 30 steps
    "model_compiled": 50,       # a whole-model compile
    "model_one_tower": 5,
    "loader_jpeg": 12,          # the pipeline's start, 3 timed rounds
    "train_real": 22,           # a train process, 2 epochs, 2 checkpoints
    "peer_ours_256": 50,        # 2 rounds x 2 fresh processes, each: loader alone, then train
    "model_synthetic_128": 20,  # the fused LRN compiled again for the new shape
    "train_real_128": 22,
    "peer_ours_128": 50,
    "model_graphed_128": 45,    # a compile and the graphs' capture
    "model_graphed": 45,
    # then the rest
    "save_step": 10,            # train --save-every: the state's copy off the GPU, the write
    "model_torch_lrn": 6,
    "loader_raw": 10,
    "train_real_raw": 22,
    "peer_ours_64": 25,         # loader alone
    "peer_ours_32": 25,
    "train_real_compiled": 70,  # train --compile: training's and evaluation's compiles
    "model_compiled_128": 30,
    "train_real_raw_128": 22,
    "model_bf16_input": 6,
    "model_split_groups": 8,
    "model_4_channels": 6,
    "reader_1": 8,
    "reader_all": 8,
    "train_real_hw": 22,
}
FIGURES = tuple(COST)
OWED = FIGURES[:FIGURES.index("model_graphed") + 1]
PREPARE_COST = 30  # the data, in the background of the first figures (not on the clock)
PEERS = {256: 1, 128: 2, 64: 4, 32: 8}  # the peers' batches: B / divisor (256 at B = 256)
TRAIN_PEERS = (256, 128)                # those also timed training the model

RATIOS = (  # (ratio, figure, the figure it is measured against)
    ("compiled_over_eager", "model_compiled", "model_synthetic"),
    ("paper_over_one_tower", "model_synthetic", "model_one_tower"),
    ("loader_over_model", "loader_jpeg", "model_synthetic"),
    ("real_over_synthetic", "train_real", "model_synthetic"),
    ("real_128_over_synthetic", "train_real_128", "model_synthetic_128"),
    ("graphed_128_over_eager", "model_graphed_128", "model_synthetic_128"),
    ("graphed_over_eager", "model_graphed", "model_synthetic"),
    ("eager_over_torch_lrn", "model_synthetic", "model_torch_lrn"),
    ("real_raw_over_synthetic", "train_real_raw", "model_synthetic"),
    ("compiled_real_over_eager_real", "train_real_compiled", "train_real"),
    ("compiled_128_over_eager", "model_compiled_128", "model_synthetic_128"),
    ("real_raw_128_over_synthetic", "train_real_raw_128", "model_synthetic_128"),
    ("bf16_input_over_fp32", "model_bf16_input", "model_synthetic"),
    ("split_groups_over_grouped", "model_split_groups", "model_synthetic"),
    ("four_channels_over_three", "model_4_channels", "model_synthetic"),
    ("real_hw_over_synthetic", "train_real_hw", "model_synthetic"),
    *((f"ours_over_dali_{b}", f"peer_ours_{b}", f"peer_dali_{b}") for b in PEERS),
    *((f"train_ours_over_dali_{b}", f"train_peer_ours_{b}", f"train_peer_dali_{b}")
      for b in TRAIN_PEERS),
)

# the table's rows after card and cores, in this order: each figure, then what it gave
ROWS = ("dev_shm_free_mib", "model_synthetic", "synthetic_step_ms", "model_compiled",
        "compiled_over_eager", "model_one_tower", "paper_over_one_tower", "loader_jpeg",
        "loader_over_model", "train_real", "real_over_synthetic", "timed_steps", "data_wait",
        "gpu_wait", "gpu_step_ms", "projected_90_epochs_h", "train_seconds",
        *(f"{k}_{b}" for b in TRAIN_PEERS for k in (
            "peer_ours", "peer_dali", "ours_over_dali", "train_peer_ours", "train_peer_dali",
            "train_ours_over_dali")),
        "model_synthetic_128", "train_real_128", "real_128_over_synthetic", "gpu_wait_128",
        "gpu_step_ms_128", "projected_90_epochs_h_128", "model_graphed_128",
        "graphed_128_over_eager", "model_graphed", "graphed_over_eager", "save_step",
        "save_write_s", "save_writing_over_alone", "model_torch_lrn",
        "eager_over_torch_lrn", "loader_raw", "train_real_raw", "real_raw_over_synthetic",
        "gpu_wait_raw", "gpu_step_ms_raw",
        *(f"{k}_{b}" for b in (64, 32) for k in ("peer_ours", "peer_dali", "ours_over_dali")),
        "train_real_compiled", "compiled_real_over_eager_real", "gpu_wait_compiled",
        "gpu_step_ms_compiled", "compiled_graphs_compiled", "model_compiled_128",
        "compiled_128_over_eager", "train_real_raw_128", "real_raw_128_over_synthetic",
        "model_bf16_input", "bf16_input_over_fp32", "model_split_groups",
        "split_groups_over_grouped", "model_4_channels", "four_channels_over_three",
        "reader_1", "reader_all", "train_real_hw", "real_hw_over_synthetic", "gpu_wait_hw",
        "gpu_step_ms_hw", "limiting_stage")


def plan(only=None) -> list[str]:
    """The figures to measure, in FIGURES' order: all, or `only` with the figures their ratios
    are measured against (RATIOS: a figure over its baseline), so that each ratio of theirs is
    of one run."""
    if not only:
        return list(FIGURES)
    want = set(only) | {bottom for _, top, bottom in RATIOS if top in only and bottom in COST}
    return [f for f in FIGURES if f in want]


def reach(todo: list[str], budget: float) -> tuple[list[str], list[str]]:
    """(the figures expected within `budget` seconds at COST's estimates, the rest)."""
    spent, n = 0.0, 0
    for name in todo:
        if spent + COST[name] > budget:
            break
        spent, n = spent + COST[name], n + 1
    return todo[:n], todo[n:]


def plan_lines(todo: list[str], budget: float) -> list[str]:
    expected, beyond = reach(todo, budget)
    lines = [f"plan: {len(todo)} figures, about {sum(COST[f] for f in todo)} s at the H200 "
             f"estimates, against a budget of {budget:.0f} s"]
    lines.append(f"plan: expected to reach {len(expected)} ({sum(COST[f] for f in expected)} "
                 f"s): {' '.join(expected)}")
    if beyond:
        lines.append(f"plan: expected beyond the budget, for a later check's --only: "
                     f"{' '.join(beyond)}")
    owed = [f for f in OWED if f in todo]
    if owed and not set(owed) <= set(expected):
        lines.append("plan: WARNING: owed figures beyond the budget: "
                     + " ".join(f for f in owed if f not in expected))
    return lines


def measure(r: dict, name: str, fn) -> None:
    """r[name] = fn(), or the error in one line: one failed figure leaves the others standing.
    r["seconds"][name]: what the figure cost, compiles and process starts included (the next
    check's COST)."""
    t0 = time.perf_counter()
    try:
        r[name] = float(fn())
    except Exception as e:  # noqa: BLE001 - any failure is a result to report
        first = (str(e).strip().splitlines() or [""])[0]
        r[name] = f"failed: {type(e).__name__}: {first[:200]}"
        print(f"{name}: {r[name]}", file=sys.stderr, flush=True)
    seconds = r.setdefault("seconds", {})
    seconds[name] = round(time.perf_counter() - t0, 1)
    print(f"{name}: {seconds[name]} s (estimated {COST.get(name, '?')}), "
          f"{sum(seconds.values()):.0f} s so far", file=sys.stderr, flush=True)


def ratio(r: dict, name: str, top: str, bottom: str) -> None:
    """r[name] = top / bottom; "n/a" where one of them failed or is missing; no row before
    `top` is measured (not reached, or not asked for: --only)."""
    if top not in r:
        r.pop(name, None)
        return
    t, b = r.get(top), r.get(bottom)
    r[name] = t / b if isinstance(t, float) and isinstance(b, float) and b > 0 else "n/a"


def timed_steps(records: list[dict], warmup: int) -> list[dict]:
    """The step records of a train run (metrics.jsonl's "step" lines, in order) whose interval
    starts `warmup` steps or more into its epoch, each with its "steps": the interval's
    length. An interval runs from the previous record's step (the run's start: 0) to its own;
    an epoch starts where the first of its records' intervals does."""
    out, prev, start = [], 0, {}
    for rec in records:
        start.setdefault(rec["epoch"], prev)
        if prev - start[rec["epoch"]] >= warmup:
            out.append({**rec, "steps": rec["step"] - prev})
        prev = rec["step"]
    return out


def rate_of(timed: list[dict], batch: int) -> dict:
    """img/s over the timed steps, and the GPU's idle share (weighted by time) and step time
    (by steps) where the records hold them."""
    images = sum(t["steps"] * batch for t in timed)
    seconds = [t["steps"] * batch / t["images_per_s"] for t in timed]
    out = {"images_per_s": images / sum(seconds), "steps": sum(t["steps"] for t in timed)}
    if timed and all("gpu_wait" in t for t in timed):
        out["gpu_wait"] = sum(t["gpu_wait"] * s for t, s in zip(timed, seconds)) / sum(seconds)
        out["gpu_step_ms"] = sum(t["gpu_step_ms"] * t["steps"] for t in timed) / out["steps"]
    return out


def publish(a, r: dict, pending=()) -> None:
    """The ratios and the limiting stage of what is measured so far, into WORK/report.json and
    WORK/report.md (printed by the caller at the end); `pending`: the figures still to come,
    listed as not reached (what a time limit leaves of the table)."""
    for name, top, bottom in RATIOS:
        ratio(r, name, top, bottom)
    for key, rate, batch in (("projected_90_epochs_h", "train_real", a.batch_size),
                             ("projected_90_epochs_h_128", "train_real_128", a.batch_size // 2)):
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


# --- the data: prepared while the first figures run ---------------------------------------------

def train_images(a) -> int:
    """Train images: one epoch is warmup + timed steps at batch B."""
    return a.batch_size * (a.warmup_steps + a.timed_steps)


def prepare_data(a) -> None:
    """WORK/jpeg and WORK/raw shards of CLASSES classes (the train images a few distinct ones
    repeated under other names: decoding costs the same), and WORK/files_jpeg (one file per
    image, for DALI's own reader)."""
    from tools import bench_loader as bl
    from alexnet_base.config import PrepareConfig
    from preprocessing.prepare import run as prepare_run
    from preprocessing.sample import make_sample
    tree = a.work / "imagenet"
    total = train_images(a)
    copies = max(1, total // (CLASSES * 160))  # 160 distinct images a class at most
    per_class = total // CLASSES // copies
    if not tree.exists():
        make_sample(tree, CLASSES, per_class, max(4, a.batch_size // CLASSES), seed=0,
                    quirks=False, large=0)  # val: at least one full batch
        for path in sorted((tree / "train").rglob("*.JPEG")):
            for c in range(1, copies):
                os.link(path, path.with_name(f"{path.stem}_copy{c}.JPEG"))
    for enc in ("jpeg", "raw"):
        prepare_run(PrepareConfig(imagenet_root=tree, out=a.work / enc, encoding=enc,
                                  size=a.size, progress=False))
    files = a.work / "files_jpeg"
    if not files.exists():
        bl.extract(a.work / "jpeg", files, raw=False)


class Data:
    """The data's preparation in a niced process of its own; ready() waits for it (a figure
    that reads the data, or a timed window that must not share the cores with it)."""

    def __init__(self, a):
        self.proc = None
        if not (a.work / "files_jpeg").exists():
            cmd = [sys.executable, __file__, *sys.argv[1:], "--prepare-only"]
            self.proc = subprocess.Popen(["nice", "-n", "10", *cmd], cwd=ROOT)

    def ready(self) -> None:
        if self.proc is not None:
            if self.proc.wait() != 0:
                raise RuntimeError(f"preparing the data failed (exit status "
                                   f"{self.proc.returncode}); see its output above")


# --- the figures -------------------------------------------------------------------------------

def train_rate(a, r: dict, data: Data, enc: str = "jpeg", tag: str = "", *extra: str) -> float:
    """A 2-epoch train run on `enc` shards in its own process: img/s over its timed steps (the
    default run also puts train_seconds, data_wait (the last epoch's) and timed_steps in r;
    each run its gpu_wait and gpu_step_ms). Raw shards leave nvJPEG out: if their real /
    synthetic is near 1 where JPEG's is not, the decoder's GPU work is what the step loses;
    if not, the training process's own share of the loader. JPEG with --hw-decoder-load 1
    keeps the decoding on the decode engines, off the step's SMs."""
    data.ready()
    run = a.work / f"run{tag}"
    shutil.rmtree(run, ignore_errors=True)
    batch = a.batch_size // 2 if "_128" in tag else a.batch_size
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "alexnet_pipe", "train", "--data",
                           str(a.work / enc), "--out", str(run), "--epochs", "2",
                           "--batch-size", str(batch), "--device", a.device, "--crop",
                           str(a.crop), "--bias-init", "caffe", "--log-every",
                           str(a.warmup_steps), "--keep", "1", *extra], cwd=ROOT,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip()
                           else f"exit status {proc.returncode}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [rec for rec in records if rec["kind"] == "step"]
    epochs = [rec for rec in records if rec["kind"] == "epoch"]
    got = rate_of(timed_steps(steps, a.warmup_steps), batch)
    if got["steps"] < 2 * a.timed_steps:
        raise RuntimeError(f"{got['steps']} timed steps, fewer than 2 x {a.timed_steps}")
    if not tag:
        r.update(train_seconds=seconds, data_wait=epochs[-1]["data_wait"],
                 timed_steps=float(got["steps"]))
    for key in ("gpu_wait", "gpu_step_ms"):  # the GPU's own view: starved, or slowed
        if key in got:
            r[key + tag] = got[key]
    if all("compiled_graphs" in e for e in epochs):  # --compile: the same after each epoch
        r["compiled_graphs" + tag] = " / ".join(str(e["compiled_graphs"]) for e in epochs)
    return got["images_per_s"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    ap.add_argument("--batch-size", type=int, default=256, help="B; the second batch is B/2")
    ap.add_argument("--size", type=int, default=256, help="the shards' side, px")
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--seconds", type=float, default=2.0, help="a loader's timed window")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of each peer")
    ap.add_argument("--timed-steps", type=int, default=32, help="a train run's, each epoch")
    ap.add_argument("--warmup-steps", type=int, default=8, help="left out of each epoch")
    ap.add_argument("--budget", type=float, default=360,
                    help="seconds the plan expects to have (the check's limit for the report)")
    ap.add_argument("--plan", action="store_true", help="print the plan and stop")
    ap.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--only", nargs="+", choices=FIGURES, metavar="FIGURE",
                    help="measure these figures and those their ratios are measured against "
                         "(a later check of what an earlier one did not reach)")
    a = ap.parse_args()
    todo = plan(a.only)
    if a.plan:
        print("\n".join(plan_lines(todo, a.budget)))
        return 0
    a.work.mkdir(parents=True, exist_ok=True)
    if a.prepare_only:
        prepare_data(a)
        return 0
    print("\n".join(plan_lines(todo, a.budget)), flush=True)
    data = Data(a)  # first: it runs beside the figures that need no data
    return report(a, todo, data)


def report(a, todo: list[str], data: Data) -> int:
    import torch

    from alexnet_base import resources
    from alexnet_base.config import AugmentConfig, BenchConfig, LoaderConfig
    from alexnet_pipe.bench import bench_loader, model_step_rate
    from alexnet_pipe.runtime import Runtime
    gpu = a.device == "gpu"
    runtime = Runtime.for_device(torch.device("cuda" if gpu else "cpu"))
    free = resources.shm_free()
    r = {"card": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
         "cores": len(os.sched_getaffinity(0)),
         "dev_shm_free_mib": round(free / 2**20) if free is not None else "n/a"}
    cfg = LoaderConfig(data=a.work / "jpeg", batch_size=a.batch_size, device=a.device,
                       augment=AugmentConfig(mean="pixel", crop=a.crop))
    threads, readers = cfg.reader_counts(gpu)
    r.update(threads=threads, readers=readers)
    half = a.batch_size // 2

    def loader_rate(enc):
        data.ready()
        loader = LoaderConfig(**{**cfg.__dict__, "data": a.work / enc})
        return bench_loader(BenchConfig(loader=loader, seconds=a.seconds,
                                        repeats=3))["images_per_s"]

    def step(batch: int, mode=None, arch="alexnet", model=None, dtype="float32", channels=3):
        c = LoaderConfig(**{**cfg.__dict__, "batch_size": batch, "dtype": dtype})
        return model_step_rate(c, runtime, CLASSES, steps=30, warmup=5, arch=arch,
                               compile_mode=mode, model=model, in_channels=channels,
                               settle=data.ready)

    def build(arch="alexnet"):
        from alexnet_pipe.model import build_model
        return build_model(arch, CLASSES, a.crop)

    def torch_lrn_model():  # the paper model with torch's LocalResponseNorm, per tower
        from tools.bench_lrn import TorchLRN
        m = build()
        for name in ("lrn1", "lrn2"):
            setattr(m.features, name, TorchLRN(getattr(m.features, name).groups))
        return m

    def towers_on_one_device():  # grouped convolutions as dense ones on each tower's own
        # tensors: no copies but the paper's crossings (into conv3 and the FC layers)
        from alexnet_pipe.model import TowerAlexNet
        d = "cuda:0" if gpu else "cpu"
        m = TowerAlexNet(CLASSES, a.crop, devices=(d, d))
        m.load_grouped_state_dict(build().state_dict())
        return m

    def four_channel_model():  # conv1 over RGB and a zero 4th channel (DALI's pad_output)
        m = build()
        conv1 = m.features.conv1
        wide = torch.nn.Conv2d(4, conv1.out_channels, conv1.kernel_size, conv1.stride)
        with torch.no_grad():
            wide.weight.zero_()
            wide.weight[:, :3] = conv1.weight
            wide.bias.copy_(conv1.bias)
        m.features.conv1 = wide
        return m

    def with_dmon(fn):  # the decode engines' use (jpg column) beside the JPEG loader's run
        dmon = None
        if gpu and shutil.which("nvidia-smi"):
            dmon = subprocess.Popen(["nvidia-smi", "dmon", "-s", "u", "-d", "1"],
                                    stdout=open(a.work / "dmon.log", "w"),
                                    stderr=subprocess.STDOUT)
        try:
            return fn()
        finally:
            if dmon is not None:
                dmon.terminate()

    def peers(b: int) -> float:  # ours and DALI's own pipeline, alternating fresh processes;
        # at 256 and 128 each process also trains the model on its batches (train fed by each)
        from tools import bench_loader as bl
        data.ready()
        batch = a.batch_size // PEERS[b]
        c = LoaderConfig(**{**cfg.__dict__, "batch_size": batch,
                            "augment": AugmentConfig(mean="channel", crop=a.crop)})
        spec = dict(gpu=gpu, files=a.work / "files_jpeg", batch=batch, threads=threads,
                    config=c, phases=("loader", "train") if b in TRAIN_PEERS else ("loader",))
        rates, _ = bl.alternate({"dali": "native", "ours": "jpeg"}, spec, a.rounds, a.seconds)

        def median(v):
            return sorted(v)[len(v) // 2]
        r[f"peer_dali_{b}"] = median(rates["dali"])
        if b in TRAIN_PEERS:
            r[f"train_peer_dali_{b}"] = median(rates["dali train"])
            r[f"train_peer_ours_{b}"] = median(rates["ours train"])
        return median(rates["ours"])

    def reader(n):
        from tools.bench_reader import reader_rate
        data.ready()
        return reader_rate(a.work / "jpeg", n, a.batch_size, a.seconds, None, crop=a.crop)

    def save_step():  # what train --save-every costs a step of the paper model at 1,000
        # classes: the state's copy to the host (ms, the step waits for it); the write beside
        # the steps (s) and their time meanwhile over their time alone
        from tools.bench_save import save_cost
        s = save_cost(a.device, classes=1000, crop=a.crop, batch=a.batch_size, steps=8)
        r.update(save_write_s=s["write_s"], save_writing_over_alone=s["writing_over_alone"])
        return s["copy_ms"]

    figures = {
        "model_synthetic": lambda: step(a.batch_size),
        "model_compiled": lambda: step(a.batch_size, "default"),
        "model_one_tower": lambda: step(a.batch_size, arch="alexnet-owt"),
        "loader_jpeg": lambda: with_dmon(lambda: loader_rate("jpeg")),
        "train_real": lambda: train_rate(a, r, data),
        "peer_ours_256": lambda: peers(256),
        "model_synthetic_128": lambda: step(half),
        "train_real_128": lambda: train_rate(a, r, data, "jpeg", "_128"),
        "peer_ours_128": lambda: peers(128),
        "model_graphed_128": lambda: step(half, "reduce-overhead"),
        "model_graphed": lambda: step(a.batch_size, "reduce-overhead"),
        "save_step": save_step,
        "model_torch_lrn": lambda: step(a.batch_size, model=torch_lrn_model()),
        "loader_raw": lambda: loader_rate("raw"),
        "train_real_raw": lambda: train_rate(a, r, data, "raw", "_raw"),
        "peer_ours_64": lambda: peers(64),
        "peer_ours_32": lambda: peers(32),
        # --compile with the real pipeline, its compile in the first epoch's warm-up steps
        "train_real_compiled": lambda: train_rate(a, r, data, "jpeg", "_compiled", "--compile"),
        "model_compiled_128": lambda: step(half, "default"),
        "train_real_raw_128": lambda: train_rate(a, r, data, "raw", "_raw_128"),
        "model_bf16_input": lambda: step(a.batch_size, dtype="bfloat16"),
        "model_split_groups": lambda: step(a.batch_size, model=towers_on_one_device()),
        "model_4_channels": lambda: step(a.batch_size, model=four_channel_model(), channels=4),
        "reader_1": lambda: reader(1),
        "reader_all": lambda: reader(readers),
        "train_real_hw": lambda: train_rate(a, r, data, "jpeg", "_hw", "--hw-decoder-load", "1"),
    }
    assert list(figures) == list(FIGURES)
    for i, name in enumerate(todo):
        # the table is rewritten before each: a kill leaves what was measured, and the rest
        # listed as not reached
        publish(a, r, todo[i:])
        try:
            measure(r, name, figures[name])
        except KeyboardInterrupt:  # the check's time limit (SIGINT): the table stands as is
            print(f"report: stopped at {name} by the time limit; not reached: "
                  f"{' '.join(todo[i:])}", file=sys.stderr, flush=True)
            return 124
    publish(a, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
