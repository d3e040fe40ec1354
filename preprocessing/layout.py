"""Find the images and labels of an ImageNet tree, in the layouts that ImageNet is distributed in.

    ROOT/train/<wnid>/*.JPEG                      always (the class list is its sorted wnids)
    ROOT/val/<wnid>/*.JPEG                        val in class folders, or
    ROOT/val/*.JPEG + LOC_val_solution.csv        Kaggle's flat val (CSV in ROOT or in ROOT/val), or
    ROOT/val/*.JPEG + --val-labels FILE           flat val with "filename wnid" lines
    ROOT/ILSVRC/Data/CLS-LOC/{train,val}          Kaggle's archive unpacked as is (CSV in ROOT)

Class names come from LOC_synset_mapping.txt or synset_words.txt ("wnid name, name") if found.
Every regular file under train/ and val/ becomes an input: a file that cannot be labelled is kept in
`unlabelled` with the reason, so that the manifest accounts for every file.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from alexnet_base.config import SPLITS
from alexnet_base.errors import UserError

KAGGLE_SOLUTION = "LOC_val_solution.csv"
MAPPING_FILES = ("LOC_synset_mapping.txt", "synset_words.txt")


@dataclass(frozen=True, slots=True)  # 1.28 M of them: no per-instance dict
class Sample:
    key: str          # path relative to the image root, with '/' separators
    label: int        # index into Tree.classes
    src: int = -1     # archives: index into Tree.sources (-1: a file under Tree.image_root)
    offset: int = 0   # tar: the member's bytes in the archive
    size: int = 0


@dataclass
class Tree:
    image_root: Path
    classes: list[str]                      # sorted wnids, index = label
    names: dict[str, str]                   # wnid -> human-readable name (wnid when unknown)
    samples: dict[str, list[Sample]]        # split -> labelled inputs, sorted by key
    unlabelled: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    left_out: dict[str, int] = field(default_factory=dict)  # split -> inputs over the limit
    val_layout: str = ""                    # "folders" | "kaggle" | "labels-file" | "devkit"
    sources: list = field(default_factory=list)  # archives read by Sample.src: (kind, path, prefix)


def _files(folder: Path) -> list[str]:
    """Every regular file below `folder`, as sorted '/'-separated paths relative to it. os.scandir
    and strings, not Path objects and a stat per file: ImageNet's 1.28 M files in seconds."""
    out, todo = [], [("", str(folder))]
    while todo:
        rel, path = todo.pop()
        with os.scandir(path) as it:
            for entry in it:
                name = f"{rel}{entry.name}"
                if entry.is_dir(follow_symlinks=True):
                    todo.append((name + "/", entry.path))
                elif entry.is_file(follow_symlinks=True):
                    out.append(name)
    out.sort(key=lambda rel: rel.split("/"))  # component-wise, as paths sort
    return out


def _find(names, folders) -> Path | None:
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def parse_names(text: str) -> dict[str, str]:
    """LOC_synset_mapping.txt / synset_words.txt: "wnid name, name" lines."""
    names = {}
    for line in text.splitlines():
        wnid, _, name = line.strip().partition(" ")
        if wnid:
            names[wnid] = name.strip() or wnid
    return names


def _read_names(path: Path | None) -> dict[str, str]:
    return parse_names(path.read_text(errors="replace")) if path is not None else {}


def parse_kaggle_labels(text: str, path) -> dict[str, str]:
    """LOC_val_solution.csv: ImageId,PredictionString where the first token is the wnid."""
    labels = {}
    for row in csv.DictReader(io.StringIO(text)):
        try:
            labels[row["ImageId"]] = row["PredictionString"].split()[0]
        except (KeyError, IndexError, AttributeError):
            raise UserError(f"{path}: expected columns ImageId,PredictionString with a wnid "
                            f"first, got {row}") from None
    return labels


def _read_kaggle_labels(path: Path) -> dict[str, str]:
    return parse_kaggle_labels(path.read_text(), path)


def _read_labels_file(path: Path) -> dict[str, str]:
    """--val-labels: one "filename wnid" pair a line; the file name may carry an extension."""
    labels = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise UserError(f"{path}:{n}: expected 'filename wnid', got {line!r}")
        labels[Path(parts[0]).name] = parts[1]
        labels[Path(parts[0]).stem] = parts[1]
    return labels


def discover(root: Path, splits=SPLITS, val_labels: Path | None = None,
             limit_per_class: int | None = None) -> Tree:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--imagenet-root {root}: not a folder")
    image_root = root
    if (root / "ILSVRC" / "Data" / "CLS-LOC").is_dir():
        image_root = root / "ILSVRC" / "Data" / "CLS-LOC"
    train_dir, val_dir = image_root / "train", image_root / "val"
    if not train_dir.is_dir() and not val_dir.is_dir():
        raise UserError(f"--imagenet-root {root}: found neither train/ nor val/; expected "
                        f"ROOT/train/<wnid>/*.JPEG and ROOT/val/ (class folders, or flat with "
                        f"LOC_val_solution.csv or --val-labels)")
    class_dirs = sorted(p for p in train_dir.iterdir() if p.is_dir()) if train_dir.is_dir() else []
    if "train" in splits and not class_dirs:
        raise UserError(f"{train_dir}: no class folders (expected train/<wnid>/*.JPEG)")
    val_class_dirs = sorted(p for p in val_dir.iterdir() if p.is_dir()) if val_dir.is_dir() else []
    classes = [p.name for p in class_dirs] or [p.name for p in val_class_dirs]
    names = _read_names(_find(MAPPING_FILES, [root, image_root, val_dir]))
    tree = Tree(image_root=image_root, classes=classes,
                names={w: names.get(w, w) for w in classes}, samples={})

    train_files = _files(train_dir) if "train" in splits else None
    val_files = None
    labels = None
    if "val" in splits:
        if not val_dir.is_dir():
            raise UserError(f"{val_dir}: no val/ folder; drop 'val' from --splits")
        if val_labels is not None:
            labels, tree.val_layout = _read_labels_file(Path(val_labels)), "labels-file"
        elif val_class_dirs:
            labels, tree.val_layout = None, "folders"
        else:
            solution = _find([KAGGLE_SOLUTION], [root, val_dir, image_root])
            if solution is None:
                raise UserError(f"{val_dir}: flat val/ without labels; put {KAGGLE_SOLUTION} beside "
                                f"it or pass --val-labels FILE ('filename wnid' lines)")
            labels, tree.val_layout = _read_kaggle_labels(solution), "kaggle"
        val_files = _files(val_dir)
    return fill(tree, train_files, val_files, labels, limit_per_class)


def fill(tree: Tree, train_files: list[str] | None, val_files: list[str] | None,
         val_labels: dict[str, str] | None, limit_per_class: int | None,
         locations: dict | None = None, source: int = -1) -> Tree:
    """Label the listed files the same way whatever holds them (folders, tars, a zip): train
    files (relative to train/) by their class folder; val files (relative to val/) by their class
    folder or, with `val_labels` (file name or stem -> wnid), by name. `locations`: key ->
    (source, offset, size) for tar members; `source`: the Tree.sources index of every other
    file (-1: a file under the image root). Every file is either a sample or unlabelled."""
    index = {wnid: i for i, wnid in enumerate(tree.classes)}
    locations, default = locations or {}, (source,)

    def add(split: str, key: str, wnid: str | None, missing: str) -> None:
        if wnid is None:
            tree.unlabelled.append((key, missing))
        elif wnid not in index:
            tree.unlabelled.append((key, f"class {wnid} is not among the train classes"))
        else:
            tree.samples[split].append(Sample(key, index[wnid], *locations.get(key, default)))

    if train_files is not None:
        tree.samples["train"] = []
        for rel in train_files:
            parts = rel.split("/")
            wnid = parts[0] if len(parts) == 2 else None
            add("train", f"train/{rel}", wnid, "not inside a class folder train/<wnid>/")
    if val_files is not None:
        tree.samples["val"] = []
        for rel in val_files:
            parts = rel.split("/")
            name, key = parts[-1], f"val/{rel}"
            if val_labels is None:
                wnid = parts[0] if len(parts) == 2 else None
                add("val", key, wnid, "not inside a class folder val/<wnid>/")
            else:
                wnid = val_labels.get(name, val_labels.get(name.rpartition(".")[0] or name))
                add("val", key, wnid, "no label for this file in the val labels")
    if limit_per_class is not None:
        for split, samples in tree.samples.items():
            kept, seen = [], {}
            for s in samples:
                seen[s.label] = seen.get(s.label, 0) + 1
                if seen[s.label] <= limit_per_class:
                    kept.append(s)
            tree.samples[split] = kept
            tree.left_out[split] = len(samples) - len(kept)  # counted, not listed
    return tree
