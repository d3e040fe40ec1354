"""Shared fixtures: one generated ImageNet-layout tree and its shards, built once per session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from make_sample_imagenet import make_sample  # noqa: E402

from preprocessing.prepare import PrepareConfig, run as prepare_run  # noqa: E402

CLASSES, PER_CLASS, VAL_PER_CLASS = 4, 12, 3


def cli(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    """Run `alexnet-pipe ARGS` as a user would, in a fresh process."""
    proc = subprocess.run([sys.executable, "-m", "alexnet_pipe", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"alexnet-pipe {' '.join(map(str, args))} failed "
                             f"({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def sample_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    make_sample(root, CLASSES, PER_CLASS, VAL_PER_CLASS, seed=0, val_layout="kaggle", large=1)
    return root


def _prepare(tmp_path_factory, tree, name, **options) -> Path:
    out = tmp_path_factory.mktemp(name)
    prepare_run(PrepareConfig(imagenet_root=tree, out=out, workers=2, progress=False, **options))
    return out


@pytest.fixture(scope="session")
def shards_jpeg(tmp_path_factory, sample_tree) -> Path:
    return _prepare(tmp_path_factory, sample_tree, "shards_jpeg", shard_size=16)


@pytest.fixture(scope="session")
def shards_raw(tmp_path_factory, sample_tree) -> Path:
    return _prepare(tmp_path_factory, sample_tree, "shards_raw", shard_size=16, encoding="raw")


def has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("PYTHONUNBUFFERED", "1")


@pytest.fixture(scope="session")
def shards_small(tmp_path_factory, sample_tree) -> Path:
    """16 train images (4 a class) and the 12 val images, raw: for training tests."""
    return _prepare(tmp_path_factory, sample_tree, "shards_small", shard_size=16, encoding="raw",
                    limit_per_class=4)
