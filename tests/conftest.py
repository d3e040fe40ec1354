"""Shared fixtures: one generated ImageNet-layout tree and its shards, built once per session."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alexnet_base.config import PrepareConfig
from preprocessing.prepare import run as prepare_run
from preprocessing.sample import make_sample

ROOT = Path(__file__).resolve().parents[1]


def tool(name: str):
    """tools/NAME.py, the module tools.NAME, for the tests of a benchmark tool (the project's
    root on sys.path, as the tools put it there themselves when run as scripts)."""
    import importlib
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"tools.{name}")

CLASSES, PER_CLASS, VAL_PER_CLASS = 4, 12, 3


def run_group(cmd: list, *, timeout: float = 280, **kwargs) -> subprocess.CompletedProcess:
    """Run `cmd` (output captured) in a process group of its own. On its timeout, or when the
    test is stopped around it (pytest-timeout), the whole group is killed: no rank or reader
    process of a hung job outlives its test."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


HARNESS = ROOT / "tests" / "harness.py"


def launch(launcher: list, args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """torchrun LAUNCHER tests/harness.py ARGS (the harness injects what `env` asks for)."""
    return run_group([sys.executable, "-m", "torch.distributed.run", *launcher, str(HARNESS),
                      *map(str, args)], cwd=ROOT, timeout=timeout,
                     env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


TWO = ["--standalone", "--nproc_per_node", "2"]


def cli(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    """Run `alexnet-pipe ARGS` as a user would, in a fresh process."""
    proc = run_group([sys.executable, "-m", "alexnet_pipe", *map(str, args)], cwd=ROOT,
                     **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"alexnet-pipe {' '.join(map(str, args))} failed "
                             f"({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def shared(tmp_path_factory, name: str, build) -> Path:
    """Folder `name`, made once for the whole run by build(folder) and shared by every test and
    every pytest-xdist worker (a file lock: the first builds it, the others wait and take it).
    Read-only: a test that writes into it copies it first."""
    from filelock import FileLock
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's own is <run's>/popen-gwN
        base = base.parent
    folder, done = base / "shared" / name, base / "shared" / f"{name}.done"
    folder.parent.mkdir(exist_ok=True)
    with FileLock(str(base / "shared" / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def sample_tree(tmp_path_factory) -> Path:
    return shared(tmp_path_factory, "imagenet", lambda root: make_sample(
        root, CLASSES, PER_CLASS, VAL_PER_CLASS, seed=0, val_layout="kaggle", large=1))


def _prepare(tmp_path_factory, tree, name, **options) -> Path:
    return shared(tmp_path_factory, name, lambda out: prepare_run(PrepareConfig(
        imagenet_root=tree, out=out, workers=2, progress=False, overwrite=True, **options)))


@pytest.fixture(scope="session")
def shards_jpeg(tmp_path_factory, sample_tree) -> Path:
    return _prepare(tmp_path_factory, sample_tree, "shards_jpeg", shard_size=16)


@pytest.fixture(scope="session")
def shards_raw(tmp_path_factory, sample_tree) -> Path:
    return _prepare(tmp_path_factory, sample_tree, "shards_raw", shard_size=16, encoding="raw")


# The training tests' images: 128 px shards and 112 px crops, a quarter of the paper's pixels
# and a pool5 of 2x2 (fc6 9.2x smaller): every code path, at less than half the cost a step.
SMALL_SIZE, SMALL_CROP = 128, 112

# Small and quick: 16 train images in batches of 8, no flips or lighting noise in the way.
FAST = ["--batch-size", "8", "--crop", str(SMALL_CROP), "--device", "cpu", "--threads", "1",
        "--readers", "1", "--log-every", "1", "--bias-init", "caffe", "--lr", "0.005", "--mean",
        "channel"]


def train_args(data, out, *extra):
    return ["train", "--data", data, "--out", out, *FAST, *extra]


# a few steps with and without --compile: dropout off (inductor draws its own masks), across
# an epoch's end (2 batches an epoch) and its evaluation
COMPILE_CHECK = ["--epochs", "2", "--max-steps", "3", "--dropout", "0", "--lr", "0.001"]


def folder_loader(config, name: str = "train", *, rank: int = 0, world: int = 1,
                  local_world: int = 1, device=None, **kw):
    """pipeline.make_loader over split `name` of config.data, opened as the commands open it
    (prepared.open_shards, without the integrity check: the fixtures are fresh), as rank
    `rank` of `world` (`local_world` of them on this machine), delivering to `device`
    (default: --device)."""
    from alexnet_pipe import distributed
    from alexnet_pipe.prepared import open_shards
    data = open_shards(config.data, tuple(dict.fromkeys(("train", name))), verify=False)
    device = device or distributed.device(config.device)
    return data.loader(name, config, device=device,
                       ranks=distributed.DistEnv(rank=rank, world=world,
                                                 local_world=local_world), **kw)


def source_of(split, *, batch_size: int, crop: int = 224, train: bool = True,
              max_open_files: int = 32, cls=None, lighting_basis=None, packed: bool = False,
              check_jpeg: bool = False, **plan):
    """A source.BatchSource (or `cls`, a subclass) over `split` (a SplitInfo): its plan
    (plan.Plan: `plan` as its fields) and its byte reader, as make_loader puts them together."""
    from alexnet_pipe.plan import Plan
    from alexnet_pipe.reader import ShardReader
    from alexnet_pipe.source import BatchSource
    from alexnet_base.config import AugmentConfig
    return (cls or BatchSource)(
        Plan(total=split.total, size=split.size, batch_size=batch_size, train=train,
             augment=AugmentConfig(crop=crop), **plan),
        ShardReader(split, max_open_files), lighting_basis=lighting_basis, packed=packed,
        check_jpeg=check_jpeg)


def overwrite_image(shard: Path, i: int, damage) -> str:
    """Image i's bytes in `shard` replaced in place by damage(bytes) (same length); its key."""
    import h5py
    import numpy as np
    with h5py.File(shard, "a") as f:
        start, end = int(f["offsets"][i]), int(f["offsets"][i + 1])
        stream = bytes(f["images"][start:end])
        f["images"][start:end] = np.frombuffer(damage(stream), np.uint8)
        return f["keys"][i].decode()


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def readme_snippet(heading: str) -> str:
    """The first ```python block after README's `heading`: what a user copies."""
    text = (ROOT / "README.md").read_text()
    part = text[text.index(heading):]
    start = part.index("```python\n") + len("```python\n")
    return part[start:part.index("```", start)]


def board(run: Path) -> dict:
    """A run folder's TensorBoard events as TensorBoard's own reader gives them (purges of
    relaunches applied): {"scalars": {tag: [(step, value)]}, "images": {tag: [(step, RGB
    array)]}, "text": {tag: [step]}}."""
    import io

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    return {
        "scalars": {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]},
        "images": {t: [(e.step, np.asarray(Image.open(io.BytesIO(e.encoded_image_string))
                                           .convert("RGB"))) for e in acc.Images(t)]
                   for t in tags["images"]},
        "text": {t: [e.step for e in acc.Tensors(t)] for t in tags["tensors"]}}


def assert_board_filters(run: Path, tmp: Path) -> None:
    """TensorBoard's conv1 picture at each epoch's end is `filters`' of that epoch's checkpoint
    (a split model's halves joined), pixel for pixel."""
    shown = board(run)["images"]["conv1/filters"]
    ends = [r["step"] for r in records(run, "epoch")]
    assert [s for s, _ in shown] == ends and ends
    for epoch, (_, image) in enumerate(shown, 1):
        out = tmp / f"conv1-{epoch}.png"
        cli("filters", "--checkpoint", run / f"checkpoints/epoch-{epoch:04d}.pt", "--out", out)
        assert (image == picture(out)).all(), epoch


def picture(path: Path) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(path).convert("RGB"))


def weights(path: Path) -> dict:
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_compiled_like_eager(eager: Path, compiled: Path) -> None:
    """Runs of COMPILE_CHECK without and with --compile: the same losses and weights to
    float32's reordering of sums, the same evaluation, and nothing compiled again in the
    second epoch (its step and evaluation reuse the first epoch's graphs)."""
    import torch
    a, b = records(eager, "step"), records(compiled, "step")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-3)
    assert records(compiled, "max_steps")[0]["top1_err"] == records(eager, "max_steps")[0]["top1_err"]
    graphs = [records(compiled, kind)[0]["compiled_graphs"] for kind in ("epoch", "max_steps")]
    assert graphs[0] == graphs[1] >= 2, graphs  # training's graph and evaluation's
    assert "compiled_graphs" not in records(eager, "epoch")[0]
    wa, wb = (weights(run / "checkpoints/interrupt.pt") for run in (eager, compiled))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-5)


@pytest.fixture(scope="session")
def compile_eager(tmp_path_factory, shards_small) -> Path:
    """The eager run of COMPILE_CHECK: the one baseline of the compiled runs, one-process and
    towers (the towers' eager model is the grouped one's to float32's reordering of sums:
    test_model.test_towers_equal_grouped_outputs_and_gradients). Read-only: copy it first."""
    return shared(tmp_path_factory, "compile_eager",
                  lambda run: cli(*train_args(shards_small, run, *COMPILE_CHECK)))


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory, shards_small) -> tuple[Path, Path]:
    """straight_run's command on two ranks (torchrun), every rank's delivered indices recorded:
    (the run, the records). Read-only."""
    def build(base):
        proc = launch(TWO, train_args(shards_small, base / "run", "--epochs", "2", "--keep", "2"),
                      env={"HARNESS_RECORD": str(base / "record")})
        assert proc.returncode == 0, proc.stderr[-3000:]
    base = shared(tmp_path_factory, "ddp_run", build)
    return base / "run", base / "record"


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory, shards_small) -> Path:
    """Two epochs on shards_small. Read-only: a test that writes into it copies it first."""
    return shared(tmp_path_factory, "straight_run",
                  lambda run: cli(*train_args(shards_small, run, "--epochs", "2")))


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str):
    """A real file system of `size` (tmpfs) mounted at `where` for the block: a disk that
    fills up. Skips the test where mounting is not allowed (needs root)."""
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)])


def has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    # the slow tier first: run in parallel (pytest-xdist), the quick tests fill the end
    items.sort(key=lambda item: "slow" not in item.keywords)
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("PYTHONUNBUFFERED", "1")


@pytest.fixture(scope="session")
def shards_small(tmp_path_factory, sample_tree) -> Path:
    """16 train images (4 a class) and the 12 val images, raw, SMALL_SIZE px: for training
    tests (FAST crops them to SMALL_CROP)."""
    return _prepare(tmp_path_factory, sample_tree, "shards_small", shard_size=16, encoding="raw",
                    limit_per_class=4, size=SMALL_SIZE)


@pytest.fixture(scope="session")
def shards_paper(tmp_path_factory, sample_tree) -> Path:
    """shards_small's images at the paper's 256 px: for a test that needs the paper's model."""
    return _prepare(tmp_path_factory, sample_tree, "shards_paper", shard_size=16, encoding="raw",
                    limit_per_class=4)


# --- coordinate-coded images: every pixel says where it came from --------------------------------

COORD_CLASSES, COORD_TRAIN, COORD_VAL = 3, 32, 4  # per class


def coord_image(ident: int, size: int):
    """(size, size, 3) uint8: R = column, G = row, B = the image's id. Any crop, flip or shift of
    it can be read back from its pixels, independently of the code that made it."""
    import numpy as np
    cols, rows = np.meshgrid(np.arange(size), np.arange(size))
    return np.stack([cols, rows, np.full((size, size), ident)], -1).astype(np.uint8)


def make_coord_tree(root: Path, size: int, classes: int, per_class: int,
                    val_per_class: int) -> dict[str, tuple[int, int]]:
    """Lossless PNGs of coord_image in train/<wnid>/ and val/<wnid>/. Returns key -> (id, label).
    At the shard size a resize is the identity, so the shards hold these very pixels."""
    from PIL import Image
    from preprocessing.sample import wnid
    truth, ident = {}, 0
    for split, n in (("train", per_class), ("val", val_per_class)):
        for k in range(classes):
            folder = root / split / wnid(k)
            folder.mkdir(parents=True)
            for i in range(n):
                key = f"{split}/{wnid(k)}/{ident:03d}.png"
                Image.fromarray(coord_image(ident, size)).save(root / key)
                truth[key] = (ident, k)
                ident += 1
    (root / "truth.json").write_text(json.dumps(truth))
    return truth


def coord_truth(root: Path) -> dict[str, tuple[int, int]]:
    """make_coord_tree's key -> (id, label), as it wrote it beside the tree."""
    return {k: tuple(v) for k, v in json.loads((root / "truth.json").read_text()).items()}


@pytest.fixture(scope="session")
def coord_shards(tmp_path_factory):
    """(shard folder, key -> (id, label)): 96 train images in 12 raw shards, 12 val in 2."""
    root = shared(tmp_path_factory, "coord_tree", lambda root: make_coord_tree(
        root, 256, COORD_CLASSES, COORD_TRAIN, COORD_VAL))
    return (_prepare(tmp_path_factory, root, "coord_shards", shard_size=8, encoding="raw"),
            coord_truth(root))


@pytest.fixture(scope="session")
def coord_shards_small(tmp_path_factory):
    """32x32 coordinate images (64 train): many augmentation draws at little cost."""
    root = shared(tmp_path_factory, "coord_tree_small",
                  lambda root: make_coord_tree(root, 32, 2, 32, 0))
    return (_prepare(tmp_path_factory, root, "coord_shards_small", shard_size=16,
                     encoding="raw", size=32, splits=("train",)), coord_truth(root))
