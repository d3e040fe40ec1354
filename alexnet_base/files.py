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


def write_output(out: Path, write, *, option: str = "--out", what: str = "file") -> Path:
    """write(temporary path) under `out`'s final name only when complete, its folder made
    first: what a command writes where its user said. An OS error is one line naming the option,
    the path and the errno."""
    from alexnet_base.errors import UserError, os_error
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.filename: the folder that could not be made (a file there?)
        raise UserError(f"{option} {out}: "
                        f"{os_error(e.filename or out.parent, e, 'make the folder')}") from None
    try:
        with atomic_path(out) as tmp:
            write(tmp)
    except OSError as e:
        raise UserError(f"{option} {os_error(out, e, f'write the {what}')}") from None
    return out


def write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
