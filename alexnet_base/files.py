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


def raise_open_file_limit(want: int = 65536) -> int:
    """Raise the soft RLIMIT_NOFILE towards `want`, as far as the hard limit allows. Nothing
    relies on it (readers keep a bounded number of files open); it leaves headroom for DALI,
    torch and the process group. Returns the soft limit in force."""
    try:
        import resource
    except ImportError:  # not on this platform
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            pass
    return soft
