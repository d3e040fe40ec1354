"""ImageNet as it is downloaded, read in place: no extraction.

    ROOT/ILSVRC2012_img_train.tar        a tar of 1,000 per-class tars (n01440764.tar, ...)
    ROOT/ILSVRC2012_img_val.tar          50,000 flat JPEGs (ILSVRC2012_val_00000001.JPEG, ...)
    ROOT/ILSVRC2012_devkit_t12.tar.gz    data/meta.mat (MATLAB v5: synsets with ILSVRC2012_ID,
                                         WNID, words, num_children) and
                                         data/ILSVRC2012_validation_ground_truth.txt (one
                                         1-based ILSVRC2012_ID a line, in val file order)
    or ROOT/imagenet-object-localization-challenge.zip (Kaggle: ILSVRC/Data/CLS-LOC/...,
    LOC_val_solution.csv, LOC_synset_mapping.txt), or that zip given as --imagenet-root.

Keys, labels and order are those of the same images extracted to a folder tree (train/<wnid>/...,
val/<name>), so the shards are the very same bytes. One scan of the outer train tar finds the
inner tars; the worker processes index the inner tars in parallel; each sample then records its
bytes' offset and size in the outer tar, and the shard writers read them with one pread.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import re
import tarfile
import zipfile
from pathlib import Path

from alexnet_base import resources
from alexnet_base.errors import UserError, os_error
from preprocessing import layout

TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
KAGGLE_ZIP = "imagenet-object-localization-challenge.zip"
KAGGLE_PREFIX = "ILSVRC/Data/CLS-LOC/"
_VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d{8})\.")


def kind(root: Path) -> str | None:
    """"ilsvrc" (the three official files), "kaggle-zip", or None (a folder tree)."""
    root = Path(root)
    if root.is_file() and root.suffix == ".zip":
        return "kaggle-zip"
    if root.is_dir():
        if any((root / n).is_file() for n in (TRAIN_TAR, VAL_TAR)):
            return "ilsvrc"
        if (root / KAGGLE_ZIP).is_file():
            return "kaggle-zip"
    return None


def discover(root: Path, splits, limit_per_class, workers: int) -> layout.Tree:
    root = Path(root)
    return (_ilsvrc if kind(root) == "ilsvrc" else _kaggle_zip)(root, splits, limit_per_class,
                                                                 workers)


# --- reading a member's bytes, in a shard writer --------------------------------------------------

_open: dict = {}  # per process: source index -> open file descriptor or ZipFile


def read_member(sources: list, sample: layout.Sample) -> bytes:
    kind_, path, prefix = sources[sample.src]
    try:
        if kind_ == "tar":
            if sample.src not in _open:
                _open[sample.src] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            data = os.pread(_open[sample.src], sample.size, sample.offset)
            if len(data) != sample.size:
                raise OSError(0, f"short read: the archive ends inside {sample.key}")
            return data
        if sample.src not in _open:
            _open[sample.src] = zipfile.ZipFile(path)
        return _open[sample.src].read(prefix + sample.key)
    except OSError as e:
        raise os_error(path, e, f"read {sample.key} from the archive") from None


# --- the official ILSVRC 2012 files ---------------------------------------------------------------

class _Window(io.RawIOBase):
    """A read-only view of bytes [start, start + size) of an open file: an inner tar in place."""

    def __init__(self, f, start: int, size: int):
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, min(self.size, base + offset))
        return self.pos

    def readinto(self, b):
        n = min(len(b), self.size - self.pos)
        if n <= 0:
            return 0
        data = os.pread(self.f.fileno(), n, self.start + self.pos)
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


def _index_inner(args) -> tuple[str, list, str | None]:
    """(wnid, [(name, offset, size)], problem) of one inner class tar, offsets in the outer tar.
    A damaged tar keeps the members read before the damage and says what went wrong."""
    path, name, start, size = args
    members, problem = [], None
    with open(path, "rb") as f:
        window = _Window(f, start, size)
        try:
            with tarfile.open(fileobj=window, mode="r:") as t:
                while True:
                    m = t.next()
                    if m is None:
                        break
                    if m.isfile():
                        members.append((m.name, start + m.offset_data, m.size))
                end = t.offset
            # tarfile ends quietly at a bad header after the first: only zeros may follow
            window.seek(end)
            while problem is None and (block := window.read(1 << 20)):
                if block.count(0) != len(block):
                    problem = (f"damaged archive member {name} (an unreadable tar header at byte "
                               f"{end}); the {len(members)} file(s) before it are kept")
        except (tarfile.TarError, EOFError) as e:
            problem = f"damaged archive member {name} ({e}); the images read before it are kept"
    return name[:-len(".tar")], members, problem


def _outer_members(path: Path) -> list[tarfile.TarInfo]:
    try:
        with tarfile.open(path, mode="r:") as t:
            return [m for m in t if m.isfile()]
    except tarfile.TarError as e:
        raise UserError(f"{path}: not a readable tar ({e}); download it again") from None
    except OSError as e:
        raise os_error(path, e, "read the archive") from None


def _ilsvrc(root: Path, splits, limit_per_class, workers: int) -> layout.Tree:
    train, val = root / TRAIN_TAR, root / VAL_TAR
    for split, path in (("train", train), ("val", val)):
        if split in splits and not path.is_file():
            raise UserError(f"{path}: not found; it is needed for --splits {','.join(splits)}")
    tree = layout.Tree(image_root=root, classes=[], names={}, samples={},
                       sources=[("tar", str(train), ""), ("tar", str(val), "")])
    locations: dict[str, tuple[int, int, int]] = {}
    train_files, val_files, val_labels = None, None, None
    if train.is_file():
        outer = _outer_members(train)
        is_class = [m.name.endswith(".tar") and "/" not in m.name for m in outer]
        inner = [m for m, ok in zip(outer, is_class) if ok]
        tree.unlabelled += [(f"train/{m.name}", "not a class archive (expected <wnid>.tar)")
                            for m, ok in zip(outer, is_class) if not ok]
        tree.classes = sorted(m.name[:-4] for m in inner)
        if "train" in splits:
            train_files = []
            jobs = [(str(train), m.name, m.offset_data, m.size) for m in inner]
            ctx = mp.get_context(resources.start_method())
            with ctx.Pool(max(1, min(workers, len(jobs)))) as pool:
                for wnid, members, problem in pool.imap(_index_inner, jobs, chunksize=8):
                    if problem:
                        tree.unlabelled.append((f"train/{wnid}.tar", problem))
                    for name, offset, size in members:
                        rel = f"{wnid}/{name}"
                        train_files.append(rel)
                        locations[f"train/{rel}"] = (0, offset, size)
            train_files.sort(key=lambda rel: rel.split("/"))
    meta = _devkit(root / DEVKIT) if (root / DEVKIT).is_file() else None
    if not tree.classes and meta is not None:
        tree.classes = sorted(meta["wnids"].values())
    tree.names = {w: (meta["names"].get(w, w) if meta else w) for w in tree.classes}
    if "val" in splits:
        if meta is None:
            raise UserError(f"{root / DEVKIT}: not found; the val labels come from its "
                            f"ground truth (or drop 'val' from --splits)")
        tree.val_layout = "devkit"
        val_files, val_labels = [], {}
        for m in _outer_members(val):
            val_files.append(m.name)
            locations[f"val/{m.name}"] = (1, m.offset_data, m.size)
            number = _VAL_NUMBER.match(m.name.rsplit("/", 1)[-1])
            if number and 0 < int(number.group(1)) <= len(meta["truth"]):
                val_labels[m.name.rsplit("/", 1)[-1]] = meta["truth"][int(number.group(1)) - 1]
        val_files.sort(key=lambda rel: rel.split("/"))
    return layout.fill(tree, train_files, val_files, val_labels, limit_per_class, locations)


def _devkit(path: Path) -> dict:
    """{"wnids": ILSVRC2012_ID -> wnid (the 1,000 leaf synsets), "names": wnid -> words,
    "truth": [wnid of val image 1, 2, ...]} from the devkit tarball, read in memory."""
    from scipy.io import loadmat
    try:
        with tarfile.open(path) as t:
            files = {m.name.rsplit("/data/", 1)[-1]: m for m in t if m.isfile() and "/data/" in m.name}
            if "meta.mat" not in files or "ILSVRC2012_validation_ground_truth.txt" not in files:
                raise UserError(f"{path}: no data/meta.mat and data/ILSVRC2012_validation_ground_"
                                f"truth.txt inside; is this ILSVRC2012_devkit_t12.tar.gz?")
            meta_bytes = t.extractfile(files["meta.mat"]).read()
            truth_text = t.extractfile(files["ILSVRC2012_validation_ground_truth.txt"]).read()
    except (tarfile.TarError, EOFError) as e:
        raise UserError(f"{path}: not a readable tar.gz ({e}); download it again") from None
    try:
        synsets = loadmat(io.BytesIO(meta_bytes), squeeze_me=True)["synsets"]
        leaves = [s for s in synsets if int(s["num_children"]) == 0]
        wnids = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
        names = {str(s["WNID"]): str(s["words"]) for s in leaves}
    except Exception as e:  # scipy raises several types for a file that is not this layout
        raise UserError(f"{path}: data/meta.mat is not the devkit's synsets table ({e})") from None
    truth = []
    for n, line in enumerate(truth_text.decode(errors="replace").split(), 1):
        if not line.isdigit() or int(line) not in wnids:
            raise UserError(f"{path}: data/ILSVRC2012_validation_ground_truth.txt line {n}: "
                            f"{line!r} is not an ILSVRC2012_ID of data/meta.mat")
        truth.append(wnids[int(line)])
    return {"wnids": wnids, "names": names, "truth": truth}


# --- Kaggle's zip -----------------------------------------------------------------------------------

def _kaggle_zip(root: Path, splits, limit_per_class, workers: int) -> layout.Tree:
    path = root if root.is_file() else root / KAGGLE_ZIP
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{path}: not a readable zip ({e}); download it again") from None
    with zf:
        names = zf.namelist()
        train_files = sorted((n[len(KAGGLE_PREFIX) + 6:] for n in names
                              if n.startswith(KAGGLE_PREFIX + "train/") and not n.endswith("/")),
                             key=lambda rel: rel.split("/"))
        val_files = sorted((n[len(KAGGLE_PREFIX) + 4:] for n in names
                            if n.startswith(KAGGLE_PREFIX + "val/") and not n.endswith("/")),
                           key=lambda rel: rel.split("/"))
        extra = {n.rsplit("/", 1)[-1]: n for n in names if not n.startswith("ILSVRC/")}
        mapping = (zf.read(extra["LOC_synset_mapping.txt"]).decode()
                   if "LOC_synset_mapping.txt" in extra else "")
        solution = (zf.read(extra[layout.KAGGLE_SOLUTION]).decode()
                    if layout.KAGGLE_SOLUTION in extra else None)
    classes = sorted({rel.split("/")[0] for rel in train_files if "/" in rel})
    if "train" in splits and not classes:
        raise UserError(f"{path}: no {KAGGLE_PREFIX}train/<wnid>/ images inside")
    names_map = layout.parse_names(mapping)
    tree = layout.Tree(image_root=path, classes=classes,
                       names={w: names_map.get(w, w) for w in classes}, samples={},
                       sources=[("zip", str(path), KAGGLE_PREFIX)])
    val_labels = None
    if "val" in splits:
        if solution is None:
            raise UserError(f"{path}: no {layout.KAGGLE_SOLUTION} inside for the val labels "
                            f"(or drop 'val' from --splits)")
        val_labels, tree.val_layout = layout.parse_kaggle_labels(solution, path), "kaggle"
    return layout.fill(tree, train_files if "train" in splits else None,
                       val_files if "val" in splits else None, val_labels, limit_per_class,
                       source=0)  # every member is read from the zip by name
