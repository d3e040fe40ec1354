"""Damaged files, as copies and disks make them: found by `verify`, mended by `prepare`, refused by
every command that reads them with one line naming the file, never read as data.

The references: the bytes of an intact run, sha256 computed here with hashlib, and the files'
modification times."""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from pathlib import Path

import pytest
import torch

from conftest import SMALL_CROP, SMALL_SIZE, cli, tool, train_args

pytestmark = pytest.mark.slow  # the full tier: torchrun, prepare runs, damaged copies


def flip(path: Path, where: str, n: int = 200, seed: int = 0) -> None:
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    lo, hi = {"middle": (len(data) // 3, 2 * len(data) // 3),
              "tail": (len(data) - 8192, len(data))}[where]
    for _ in range(n):
        data[rng.randrange(lo, hi)] ^= 0xA5
    path.write_bytes(bytes(data))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.timeout(240)
def test_verify_names_each_damaged_file_and_prepare_rewrites_exactly_those(tmp_path,
                                                                           sample_tree):
    out = tmp_path / "out"
    prepare = ["prepare", "--imagenet-root", sample_tree, "--out", out, "--shard-size", "16",
               "--limit-per-class", "4"]
    cli(*prepare)
    intact = {p.name: sha(p) for p in out.glob("*.h5")}
    manifest = json.loads((out / "manifest.json").read_text())
    assert ({e["file"]: e["sha256"] for e in manifest["shards"]}
            == {k: v for k, v in intact.items() if k != "stats.h5"})
    assert manifest["stats"]["sha256"] == intact["stats.h5"]
    assert all(e["bytes"] == (out / e["file"]).stat().st_size for e in manifest["shards"])
    ok = json.loads(cli("verify", out, "--json").stdout)
    assert ok["files"] == len(intact) and not (ok["damaged"] or ok["missing"])
    flip(out / "train-00000.h5", "middle")        # 200 bytes: the images, not the metadata
    (out / "val-00000.h5").unlink()
    (out / "train-00099.h5").write_bytes(b"not ours")
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    bad = cli("verify", out, check=False)
    assert bad.returncode == 1
    assert f"DAMAGED {out / 'train-00000.h5'}" in bad.stdout
    assert f"MISSING {out / 'val-00000.h5'}" in bad.stdout
    assert f"unexpected {out / 'train-00099.h5'}" in bad.stdout
    assert len(bad.stderr.strip().splitlines()) == 1 and "prepare" in bad.stderr
    # the inspect's quick check (sizes, metadata) does not hash: the flipped images pass it,
    # the missing shard does not
    assert cli("inspect", out, check=False).returncode == 1
    time.sleep(0.01)
    repaired = cli(*prepare)
    assert "writing them again: train-00000.h5" in repaired.stdout
    assert {p.name: sha(p) for p in out.glob("*.h5") if p.name != "train-00099.h5"} == intact
    for name, t in mtimes.items():  # no intact shard was touched
        if name not in ("train-00000.h5", "stats.h5", "train-00099.h5", "val-00000.h5"):
            assert (out / name).stat().st_mtime_ns == t, name
    assert (out / "train-00099.h5").read_bytes() == b"not ours"
    ok = json.loads(cli("verify", out, "--json").stdout)
    assert not (ok["damaged"] or ok["missing"]) and ok["unexpected"] == ["train-00099.h5"]


def test_prepare_refuses_to_mend_shards_from_another_tree(tmp_path, sample_tree):
    tree, out = tmp_path / "tree", tmp_path / "out"
    shutil.copytree(sample_tree, tree)
    prepare = ["prepare", "--imagenet-root", tree, "--out", out, "--shard-size", "16",
               "--limit-per-class", "4", "--splits", "train"]
    cli(*prepare)
    victim = sorted((tree / "train").rglob("*.JPEG"))[0]
    victim.rename(victim.with_name("renamed_" + victim.name))
    proc = cli(*prepare, check=False)
    assert proc.returncode == 1
    assert "not the images the shards" in proc.stderr and str(tree) in proc.stderr


@pytest.mark.timeout(240)
def test_a_damaged_shard_or_checkpoint_is_named_before_anything_reads_it(tmp_path, shards_small,
                                                                         straight_run):
    data = tmp_path / "data"
    shutil.copytree(shards_small, data)
    flip(data / "train-00000.h5", "middle", n=20)  # raw pixels: they would decode as pixels
    proc = cli(*train_args(data, tmp_path / "run", "--epochs", "1"), check=False)
    assert proc.returncode == 1 and not (tmp_path / "run" / "checkpoints").exists()
    line, = proc.stderr.strip().splitlines()
    assert f"{data / 'train-00000.h5'}: damaged" in line and "verify" in line
    # --no-verify reads what is there, as the user asked
    cli("preview", "--data", data, "--out", tmp_path / "p.png", "--device", "cpu", "--crop",
        SMALL_CROP, "--images", "4", "--no-verify")
    # a checkpoint's weights: one flipped byte changes a number, and its digest says so
    run = tmp_path / "straight"
    shutil.copytree(straight_run, run)
    newest = run / "checkpoints" / "epoch-0002.pt"
    flip(newest, "middle", n=1)
    for args in (["evaluate", "--checkpoint", newest, "--data", shards_small, "--device", "cpu"],
                 ["filters", "--checkpoint", newest, "--out", tmp_path / "f.png"]):
        proc = cli(*args, check=False)
        assert proc.returncode == 1, args
        line, = proc.stderr.strip().splitlines()
        assert f"{newest}: damaged" in line
    # --resume takes the newest intact one, says so loudly, and keeps the damaged file aside
    damaged = newest.read_bytes()
    proc = cli(*train_args(shards_small, run, "--epochs", "2", "--resume"))
    assert f"WARNING: {newest}: damaged" in proc.stdout
    assert f"resuming from {run / 'checkpoints' / 'epoch-0001.pt'}" in proc.stdout
    assert (run / "checkpoints" / "epoch-0002.pt.damaged").read_bytes() == damaged
    state = torch.load(newest, weights_only=True)  # written again by the resumed epoch 2
    assert state["epoch"] == 2


@pytest.mark.timeout(300)
def test_fuzzed_inputs_end_in_the_intact_result_or_one_line(tmp_path, shards_small,
                                                            straight_run, sample_tree):
    """A seeded sample of tools/fuzz_integrity.py's campaign, one case a target, each a file
    damaged at random (the whole campaign: BENCHMARKS.md)."""
    fuzz = tool("fuzz_integrity")
    assert (fuzz.SIZE, fuzz.CROP) == (str(SMALL_SIZE), str(SMALL_CROP))  # its commands' crop
    rng = random.Random(25)
    # the commands that start fast (train's and resume's cases: the tests above)
    quick = [c for c in fuzz.all_cases(1) if c[2] not in ("train", "resume", "bench")]
    cases = [rng.choice([c for c in quick if c[0] == target]) for target in fuzz.TARGETS]
    image = sorted(sample_tree.rglob("*.JPEG"))[0]
    lines = []
    counts = fuzz.campaign(tmp_path, cases, timeout=120, report=lines.append,
                           fixture=(shards_small, straight_run, image))
    fails = [line for line in lines if "FAIL" in line]
    assert not fails, "\n".join(fails)
    assert sum(counts.values()) == len(fuzz.TARGETS)
