#!/usr/bin/env python3
"""Damaged inputs through every command that reads them: seeded byte flips (head, middle,
tail) and truncations of shards, stats.h5, manifest.json, checkpoints and metrics.jsonl, each
case on a fresh copy of an intact prepared folder and run. A case passes when the command
either gives the intact run's output (the damage hit bytes nothing reads), recovers with a
WARNING line (train --resume falls back to an intact checkpoint), or exits 1 with one line
naming the damaged file; never a traceback, never a hang.

Usage: fuzz_integrity.py [--seeds 3] [--work DIR] [--timeout 120]   (the whole campaign;
       tests/test_integrity.py runs a sample of it)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ("head", "middle", "tail", "cut")
CPU = ["--device", "cpu", "--threads", "1", "--readers", "0"]
# the fixture's images: small, so that every command reads and trains at a fraction of the cost
SIZE, CROP = "128", "112"

# target: (folder "data" or "run", file, commands reading it)
TARGETS = {
    "shard": ("data", "train-00000.h5", ("inspect", "verify", "train", "preview", "bench")),
    "val_shard": ("data", "val-00000.h5", ("inspect", "verify", "evaluate")),
    "stats": ("data", "stats.h5", ("inspect", "verify", "train")),
    "manifest": ("data", "manifest.json", ("inspect", "verify", "train", "evaluate")),
    "checkpoint": ("run", "checkpoints/epoch-0002.pt", ("evaluate", "predict", "filters",
                                                         "resume")),
    "metrics": ("run", "metrics.jsonl", ("plot",)),
}


def damage(path: Path, kind: str, rng: random.Random) -> str:
    """Flip bytes in the first 4 KB (head), the middle third (middle) or the last 8 KB (tail),
    or cut the file short (cut). Returns what was done."""
    data = bytearray(path.read_bytes())
    n = len(data)
    if kind == "cut":
        keep = int(n * rng.uniform(0.05, 0.95))
        path.write_bytes(bytes(data[:keep]))
        return f"cut to {keep} of {n} bytes"
    lo, hi, flips = {"head": (0, min(n, 4096), 60), "middle": (n // 3, 2 * n // 3, 200),
                     "tail": (max(0, n - 8192), n, 60)}[kind]
    for _ in range(flips):
        i = rng.randrange(lo, hi)
        data[i] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))
    return f"{flips} bytes flipped in [{lo}, {hi}) of {n}"


def command(name: str, data: Path, run: Path, scratch: Path, image: Path) -> list[str]:
    ckpt = run / "checkpoints" / "epoch-0002.pt"
    return {
        "inspect": ["inspect", str(data)],
        "verify": ["verify", str(data), "--json"],
        "train": ["train", "--data", str(data), "--out", str(scratch / "t"), *CPU,
                  "--batch-size", "8", "--crop", CROP, "--epochs", "1", "--max-steps", "1",
                  "--mean", "channel"],
        "preview": ["preview", "--data", str(data), "--out", str(scratch / "p.png"), *CPU,
                    "--crop", CROP, "--images", "4"],
        "bench": ["bench-loader", "--data", str(data), *CPU, "--crop", CROP, "--batch-size",
                  "4", "--batches", "2", "--repeats", "1", "--warmup", "0", "--json"],
        "evaluate": ["evaluate", "--checkpoint", str(ckpt), "--data", str(data), *CPU,
                     "--batch-size", "6", "--json"],
        "predict": ["predict", str(image), "--checkpoint", str(ckpt)],
        "filters": ["filters", "--checkpoint", str(ckpt), "--out", str(scratch / "f.png")],
        "resume": ["train", "--data", str(data), "--out", str(run), *CPU, "--batch-size", "8",
                   "--crop", CROP, "--epochs", "2", "--resume", "--mean", "channel"],
        "plot": ["plot", str(run), "--out", str(scratch / "c.png")],
    }[name]


def outcome(name: str, proc: subprocess.CompletedProcess, scratch: Path) -> str:
    """What a command gave, comparable across runs: its output with the timings left out."""
    if name == "verify":
        r = json.loads(proc.stdout)
        return json.dumps({k: r[k] for k in ("damaged", "missing", "unreadable", "unexpected")})
    if name == "bench":
        return "ran"
    if name in ("preview", "filters", "plot"):
        png = {"preview": "p.png", "filters": "f.png", "plot": "c.png"}[name]
        return (scratch / png).read_bytes().hex()
    if name == "train":
        recs = [json.loads(x) for x in (scratch / "t/metrics.jsonl").read_text().splitlines()]
        return json.dumps([r["loss"] for r in recs if r["kind"] == "step"])
    return proc.stdout


def run_command(name: str, data: Path, run: Path, scratch: Path, image: Path,
                timeout: float) -> subprocess.CompletedProcess:
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    cmd = [sys.executable, "-m", "alexnet_pipe", *command(name, data, run, scratch, image)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=ROOT, start_new_session=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            out, err = p.communicate()
            return subprocess.CompletedProcess(cmd, "hang", out, err)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def verdict(name: str, proc, scratch: Path, intact: str, file: str) -> str:
    """unaffected | recovered | refused, or FAIL: why."""
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode == "hang":
        return "FAIL: no exit within the time limit"
    if "Traceback" in proc.stderr:
        return "FAIL: traceback: " + (err[-1] if err else "")
    if proc.returncode == 0:
        if name == "resume":
            return "recovered" if "WARNING" in proc.stdout else (
                "unaffected" if "damaged" not in proc.stdout else "FAIL: resumed silently")
        try:
            same = outcome(name, proc, scratch) == intact
        except (OSError, ValueError, KeyError) as e:
            return f"FAIL: exit 0 without its output ({e})"
        return "unaffected" if same else "FAIL: exit 0 with output other than the intact run's"
    errors = [line for line in err if line.startswith("Error:")]
    if proc.returncode == 1 and len(errors) == 1 and Path(file).name in errors[0]:
        return "refused"
    return f"FAIL: exit {proc.returncode}: " + " | ".join(err[-3:])


def _link_checkpoints(src: str, dst: str) -> None:
    if src.endswith(".pt"):
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


def prepare_fixture(work: Path) -> tuple[Path, Path, Path]:
    """An intact prepared folder (raw shards: a flipped pixel byte decodes fine) and a run of
    two epochs on it; and one image file for predict."""
    from preprocessing.sample import make_sample
    tree, data, run = work / "imagenet", work / "data", work / "run"
    if not (run / "checkpoints" / "epoch-0002.pt").exists():
        shutil.rmtree(work, ignore_errors=True)
        make_sample(tree, 4, 8, 3, seed=0, quirks=False, large=0)
        subprocess.run([sys.executable, "-m", "alexnet_pipe", "prepare", "--imagenet-root",
                        str(tree), "--out", str(data), "--size", SIZE, "--shard-size", "16",
                        "--encoding", "raw"], cwd=ROOT, check=True, capture_output=True)
        subprocess.run([sys.executable, "-m", "alexnet_pipe", "train", "--data", str(data),
                        "--out", str(run), *CPU, "--batch-size", "8", "--crop", CROP,
                        "--epochs", "2", "--mean", "channel"], cwd=ROOT, check=True,
                       capture_output=True)
    image = next(tree.glob("val/**/*.JPEG"), None) or next(tree.rglob("*.JPEG"))
    return data, run, image


def campaign(work: Path, cases: list[tuple[str, str, str, int]], timeout: float,
             report=print, fixture: tuple[Path, Path, Path] | None = None) -> Counter:
    """Run `cases` ((target, kind, command, seed)); Counter of verdicts (FAIL: lines in full).
    fixture: (raw shard folder of SIZE px, a 2-epoch run on it with batch 8, --crop CROP and
    --mean channel, an image);
    default: made under `work`."""
    data, run, image = fixture or prepare_fixture(work / "fixture")
    # the intact outputs come from copies too: train --resume writes into its run
    shutil.copytree(data, work / "intact" / "data")
    shutil.copytree(run, work / "intact" / "run", copy_function=_link_checkpoints)
    data, run = work / "intact" / "data", work / "intact" / "run"
    intact = {}
    counts = Counter()
    for target, kind, name, seed in cases:
        where, file, _ = TARGETS[target]
        if name not in intact:
            proc = run_command(name, data, run, work / "scratch", image, timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"{name} fails on intact inputs: {proc.stderr[-2000:]}")
            intact[name] = outcome(name, proc, work / "scratch")
        case = work / "case"
        shutil.rmtree(case, ignore_errors=True)
        shutil.copytree(data, case / "data")
        # links for the run's checkpoints (hundreds of MB; replaced, never written in place),
        # copies of the rest (train --resume appends to its logs), a copy of the one damaged
        shutil.copytree(run, case / "run", copy_function=_link_checkpoints)
        victim = case / where / file
        victim.unlink()
        shutil.copyfile((data if where == "data" else run) / file, victim)
        did = damage(victim, kind, random.Random(seed))
        proc = run_command(name, case / "data", case / "run", work / "scratch", image, timeout)
        v = verdict(name, proc, work / "scratch", intact[name], file)
        counts[v] += 1
        report(f"{target:10s} {kind:6s} {name:8s} seed {seed}: {v} ({did})")
    return counts


def all_cases(seeds: int) -> list[tuple[str, str, str, int]]:
    return [(t, k, c, s) for t, (_, _, cmds) in TARGETS.items() for c in cmds for k in KINDS
            for s in range(seeds)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fuzz_integrity"))
    ap.add_argument("--timeout", type=float, default=120)
    a = ap.parse_args()
    counts = campaign(a.work, all_cases(a.seeds), a.timeout)
    print(json.dumps(dict(counts), indent=1))
    return 1 if any(k.startswith("FAIL") for k in counts) else 0


if __name__ == "__main__":
    sys.exit(main())
