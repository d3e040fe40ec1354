"""One checkpoint dict, written atomically by rank 0, read back with weights_only=True.

    RUN/checkpoints/epoch-0003.pt   after each epoch (the last `keep` are kept)
    RUN/checkpoints/interrupt.pt    on SIGTERM/SIGINT, mid-epoch
    RUN/checkpoints/best.pt         the lowest validation top-1 error so far

Each holds: model (the grouped AlexNet layout, whatever the parallel mode), optimizer, scheduler,
epoch (completed epochs), batch (batches done of the next epoch), step, rng, config, arch,
num_classes, size (px of the shards), crop, class_names, normalisation (mean, std) and the best
centre-crop error so far.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from alexnet_base.errors import UserError, os_error
from alexnet_base.files import atomic_path

CHECKPOINT_DIR = "checkpoints"
_EPOCH = re.compile(r"epoch-(\d{4,})\.pt$")


def save(run_dir: Path, state: dict, *, name: str, keep: int = 3) -> Path:
    folder = Path(run_dir) / CHECKPOINT_DIR
    path = folder / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.tmp-*"):  # left by a save that was killed: never complete
            stale.unlink()
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            # through a Python file: a full disk is then an OSError (ENOSPC), where torch's own
            # writer for a path says only "unexpected pos" (a RuntimeError)
            torch.save(state, f)
    except (OSError, RuntimeError) as e:
        # torch's zip writer, closing after a failed write, raises its own RuntimeError over
        # the OSError that caused it
        cause = e if isinstance(e, OSError) else e.__context__
        if not isinstance(cause, OSError):
            raise
        raise UserError(f"{os_error(path, cause, 'write the checkpoint')}; the earlier "
                        f"checkpoints in {folder} are intact") from None
    if _EPOCH.search(name):
        (folder / "interrupt.pt").unlink(missing_ok=True)  # superseded by a complete epoch
        for old in epoch_checkpoints(run_dir)[:-keep]:
            old.unlink()
    return path


def mark_best(run_dir: Path, path: Path) -> None:
    best = Path(run_dir) / CHECKPOINT_DIR / "best.pt"
    with atomic_path(best) as tmp:
        shutil.copyfile(path, tmp)


def epoch_checkpoints(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / CHECKPOINT_DIR
    return sorted(folder.glob("epoch-*.pt"), key=lambda p: int(_EPOCH.search(p.name).group(1)))


def latest(run_dir: Path) -> Path | None:
    """The checkpoint to resume from: an interrupt (newer than any epoch) or the last epoch."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    candidates = epoch_checkpoints(run_dir) + [p for p in [folder / "interrupt.pt"] if p.exists()]
    return max(candidates, key=os.path.getmtime) if candidates else None


def load(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--checkpoint {path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, never a traceback
        raise UserError(f"{path}: not a readable alexnet-pipe checkpoint ({e})") from None
    if not isinstance(state, dict) or "model" not in state or "arch" not in state:
        raise UserError(f"{path}: not an alexnet-pipe checkpoint")
    return state


def check_compatible(state: dict, path: Path, *, arch: str, num_classes: int) -> None:
    if state["arch"] != arch:
        raise UserError(f"{path}: a checkpoint of --arch {state['arch']}, not {arch}")
    if state["num_classes"] != num_classes:
        raise UserError(f"{path}: a checkpoint for {state['num_classes']} classes; the data has "
                        f"{num_classes}")
