"""Files that appear under their final name only when complete."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


def temporary_path(path: Path) -> Path:
    """Where a file is written before `os.replace` gives it its final name."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path; on success rename it to `path`, on any failure remove it."""
    tmp = temporary_path(Path(path))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
