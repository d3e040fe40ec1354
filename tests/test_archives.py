"""`prepare` straight from ImageNet's official archives and Kaggle's zip, built here with the
real structure (a tar of per-class tars, a flat val tar, a devkit tar.gz whose meta.mat is written
with scipy in the devkit's field layout), against the shards of the same images extracted."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from scipy.io import savemat

from conftest import ROOT, cli
from preprocessing import shards

pytestmark = pytest.mark.slow  # the full tier: torchrun, prepare runs, damaged copies


def _add_bytes(t: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    t.addfile(info, io.BytesIO(data))


def _inner_tar(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for f in sorted(folder.iterdir(), reverse=True):  # not in name order: order must not matter
            _add_bytes(t, f.name, f.read_bytes())
    return buf.getvalue()


def make_ilsvrc(tree: Path, out: Path, damage: str | None = None) -> None:
    """ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz of the
    images of `tree` (train/<wnid>/, flat val/ with LOC_val_solution.csv)."""
    out.mkdir(parents=True)
    wnids = sorted(p.name for p in (tree / "train").iterdir())
    with tarfile.open(out / "ILSVRC2012_img_train.tar", "w") as t:
        for w in reversed(wnids):
            data = _inner_tar(tree / "train" / w)
            if w == damage:  # the second member's header overwritten: the rest is lost
                with tarfile.open(fileobj=io.BytesIO(data)) as inner:
                    second = inner.getmembers()[1].offset
                data = data[:second] + b"\x01" * 512 + data[second + 512:]
            _add_bytes(t, f"{w}.tar", data)
    val = sorted((tree / "val").glob("*.JPEG"))
    with tarfile.open(out / "ILSVRC2012_img_val.tar", "w") as t:
        for f in val:
            _add_bytes(t, f.name, f.read_bytes())
    # meta.mat: leaf synsets get ILSVRC2012_IDs in an order that is not the wnids' order, plus
    # one inner node (num_children > 0) that must be ignored.
    ids = {w: i + 1 for i, w in enumerate(reversed(wnids))}
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
              "wordnet_height", "num_train_images"]
    rows = [(ids[w], w, f"words of {w}", "gloss", 0, np.zeros(0), 0, 10) for w in wnids]
    rows.append((len(wnids) + 1, "n00001740", "entity", "gloss", 2, np.array([1, 2]), 18, 0))
    synsets = np.zeros((len(rows),), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows):
        synsets[i] = row
    meta = io.BytesIO()
    savemat(meta, {"synsets": synsets})
    solution = {line.split(",")[0]: line.split(",")[1].split()[0]
                for line in (tree / "LOC_val_solution.csv").read_text().splitlines()[1:]}
    truth = "".join(f"{ids[solution[f.stem]]}\n" for f in val)
    with tarfile.open(out / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as t:
        _add_bytes(t, "ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue())
        _add_bytes(t, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
                   truth.encode())


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.h5"))}


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_official_archives_give_the_extracted_trees_shards(tmp_path, sample_tree, shards_jpeg):
    archives = tmp_path / "ILSVRC2012"
    make_ilsvrc(sample_tree, archives)
    out = tmp_path / "out"
    cli("prepare", "--imagenet-root", archives, "--out", out, "--shard-size", "16",
        "--workers", "2")
    assert shard_bytes(out) == shard_bytes(shards_jpeg)  # same keys, labels, order, bytes
    got, want = manifest(out), manifest(shards_jpeg)
    for k in ("counts", "counts_per_class", "shards", "skipped", "stats"):
        assert got[k] == want[k], k
    assert got["val_layout"] == "devkit"
    assert [c["name"] for c in got["classes"]] == [f"words of {c['wnid']}" for c in want["classes"]]
    assert (out / "stats.h5").read_bytes() == (shards_jpeg / "stats.h5").read_bytes()


def test_kaggle_zip_gives_the_same_shards(tmp_path, sample_tree, shards_jpeg):
    path = tmp_path / "imagenet-object-localization-challenge.zip"
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(sample_tree.rglob("*")):
            rel = f.relative_to(sample_tree).as_posix()
            if f.is_file():
                top = rel.split("/")[0] in ("train", "val")
                z.write(f, f"ILSVRC/Data/CLS-LOC/{rel}" if top else rel)
    out = tmp_path / "out"
    cli("prepare", "--imagenet-root", path, "--out", out, "--shard-size", "16", "--workers", "2")
    assert shard_bytes(out) == shard_bytes(shards_jpeg)
    assert manifest(out)["skipped"] == manifest(shards_jpeg)["skipped"]


def test_a_damaged_class_tar_is_listed_and_the_rest_kept(tmp_path, sample_tree):
    archives = tmp_path / "ILSVRC2012"
    wnids = sorted(p.name for p in (sample_tree / "train").iterdir())
    make_ilsvrc(sample_tree, archives, damage=wnids[1])
    out = tmp_path / "out"
    cli("prepare", "--imagenet-root", archives, "--out", out, "--splits", "train",
        "--workers", "1")
    m = manifest(out)
    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    assert "damaged archive member" in reasons[f"train/{wnids[1]}.tar"]
    assert "the 1 file(s) before it are kept" in reasons[f"train/{wnids[1]}.tar"]
    per_class = m["counts_per_class"]["train"]
    assert per_class[1] <= 1 and per_class[0] == per_class[3] == 12  # the other classes whole


@pytest.mark.parametrize("breakage, needle", [
    ("no-devkit", "ILSVRC2012_devkit_t12.tar.gz: not found"),
    ("bad-truth", "ILSVRC2012_validation_ground_truth.txt line 2"),
])
def test_devkit_problems_name_the_file(tmp_path, sample_tree, breakage, needle):
    archives = tmp_path / "ILSVRC2012"
    make_ilsvrc(sample_tree, archives)
    devkit = archives / "ILSVRC2012_devkit_t12.tar.gz"
    if breakage == "no-devkit":
        devkit.unlink()
    else:
        with tarfile.open(devkit) as t:
            meta = t.extractfile("ILSVRC2012_devkit_t12/data/meta.mat").read()
        with tarfile.open(devkit, "w:gz") as t:
            _add_bytes(t, "ILSVRC2012_devkit_t12/data/meta.mat", meta)
            _add_bytes(t, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
                       b"1\n9999\n")
    proc = cli("prepare", "--imagenet-root", archives, "--out", tmp_path / "o", check=False)
    assert proc.returncode == 1 and needle in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_archive_prepare_resumes_after_sigkill_with_the_same_bytes(tmp_path, sample_tree,
                                                                 shards_jpeg):
    archives = tmp_path / "ILSVRC2012"
    make_ilsvrc(sample_tree, archives)
    out = tmp_path / "out"
    args = ["--imagenet-root", str(archives), "--out", str(out), "--shard-size", "16",
            "--workers", "1"]
    # The worker kills the whole run right after its second shard: deterministically mid-run.
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "harness.py"), "prepare", *args],
                          cwd=ROOT, start_new_session=True, capture_output=True, timeout=120,
                          env={**os.environ, "HARNESS_PREPARE_KILL": "2"})
    assert proc.returncode == -signal.SIGKILL
    assert len(shards.list_shards(out, "train")) == 2
    assert not (out / "manifest.json").exists()
    cli("prepare", *args)
    assert shard_bytes(out) == shard_bytes(shards_jpeg)
