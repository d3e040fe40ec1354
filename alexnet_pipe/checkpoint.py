"""The checkpoint: its schema, written atomically by rank 0, read back with weights_only=True.

    RUN/checkpoints/epoch-0003.pt   after each epoch (the last `keep` are kept)
    RUN/checkpoints/step-00001200.pt  every --save-every steps, mid-epoch (the last `keep` of
                                    them, until an epoch's checkpoint supersedes them)
    RUN/checkpoints/interrupt.pt    on SIGTERM/SIGINT/SIGUSR1 or --max-steps, mid-epoch
    RUN/checkpoints/best.pt         the lowest validation top-1 error so far

This module alone builds the dict (`build`) and reads it (`restore`, `load_model`): a new field
is one line in each. What it holds:
    model           the grouped AlexNet layout, whatever the parallel mode
    optimizer       its state dict in the grouped model's layout too (optimizer_layout: grouped;
                    towers written before it hold their own)
    scheduler       its state dict
    epoch, batch, step, best_top1_err      Progress: where the run stands
    rng             torch's CPU generator, and the CUDA one of every device the model runs on
    arch, num_classes, size (px of the shards), crop, class_names, wnids, normalization
                    ModelCard: what evaluate, predict and filters need, nothing from the
                    data folder
    config, version, torch      the options of the run and what wrote it, for people
    digest          sha256 of all of the above (content_digest), checked at every load
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from alexnet_base.errors import UserError, os_error
from alexnet_base.files import atomic_path
from alexnet_pipe import __version__
from alexnet_pipe.model import build_model, named_state
from alexnet_pipe.normalize import Normalization

CHECKPOINT_DIR = "checkpoints"
_EPOCH = re.compile(r"epoch-(\d{4,})\.pt$")
_STEP = re.compile(r"step-(\d{8,})\.pt$")


def step_name(step: int) -> str:
    return f"step-{step:08d}.pt"


@dataclass
class Progress:
    """Where a run stands: all that training carries from one step to the next."""
    epoch: int = 0              # epochs completed
    batch: int = 0              # batches of the next epoch already done (after an interrupt)
    step: int = 0               # optimizer steps in all
    best: float = math.inf      # lowest centre-crop val top-1 error so far


@dataclass(frozen=True)
class ModelCard:
    """What a checkpoint says of its network and its input: enough to use it on images."""
    arch: str
    num_classes: int
    size: int                   # px, the side of the shards it was trained on
    crop: int                   # px, its input
    class_names: tuple[str, ...]
    norm: Normalization
    wnids: tuple[str, ...] = ()  # the classes' WordNet ids (checkpoints before 2026-12-07: none)


def rng_state(devices: list[torch.device]) -> dict:
    """torch's CPU generator, and the CUDA one of each device a step runs on (the towers: two)."""
    rng = {"torch": torch.get_rng_state()}
    cuda = {str(d): torch.cuda.get_rng_state(d) for d in devices if d.type == "cuda"}
    if cuda:
        rng["cuda"] = cuda
    return rng


def build(*, card: ModelCard, weights: dict, optimizer: dict, scheduler, progress: Progress,
          config: dict, devices: list[torch.device]) -> dict:
    """The checkpoint dict of a run: `weights` the grouped state dict and `optimizer` the
    optimiser's state in the grouped layout, gathered already (parallel.weights_state: no
    collective here); `devices`: those a step runs on, whose generators it keeps."""
    return {"arch": card.arch, "num_classes": card.num_classes, "size": card.size,
            "crop": card.crop, "class_names": list(card.class_names),
            "wnids": list(card.wnids), "normalization": card.norm.to_state(), "config": config, "version": __version__,
            "torch": str(torch.__version__),
            "epoch": progress.epoch, "batch": progress.batch, "step": progress.step,
            "best_top1_err": progress.best, "rng": rng_state(devices),
            "model": weights, "optimizer": optimizer, "optimizer_layout": "grouped",
            "scheduler": scheduler.state_dict()}


def sealed(state: dict) -> dict:
    """`state` with its content digest, which every load checks."""
    return {**state, "digest": content_digest(state)}


def content_digest(state: dict) -> str:
    """sha256 of everything in a checkpoint dict but its digest: every tensor's dtype, shape
    and bytes, every other value's repr, in sorted key order. Independent of the zip container,
    whose reader does not notice a flipped byte inside a tensor."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "digest"})
    return h.hexdigest()


def _feed(h, value) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        h.update(b"{")
        for key in sorted(value, key=repr):
            h.update(repr(key).encode())
            _feed(h, value[key])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[" if isinstance(value, list) else b"(")
        for item in value:
            _feed(h, item)
        h.update(b"]")
    else:
        h.update(repr(value).encode())


def restore(state: dict, *, weights: torch.nn.Module, optimizer, scheduler,
            devices: list[torch.device], split: bool) -> Progress:
    """Puts a checkpoint back into a run's module, optimiser, scheduler and generators. split:
    `weights` is a parallel.SplitModel (its parts of the grouped layout)."""
    if split:
        weights.load_grouped_state_dict(state["model"])
    else:
        weights.load_state_dict(state["model"])
    if split and state.get("optimizer_layout") == "grouped":
        load_grouped_optimizer_state(optimizer, weights, state["optimizer"])
    else:  # one model, or towers written before the grouped layout (their own)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    cuda = state["rng"].get("cuda")
    if isinstance(cuda, torch.Tensor):  # written before every device's state was kept
        cuda = {str(devices[0]): cuda}
    for d in devices:  # GPU dropout masks
        if d.type == "cuda" and cuda is not None and str(d) in cuda:
            torch.cuda.set_rng_state(cuda[str(d)], d)
    return Progress(epoch=state["epoch"], batch=state["batch"], step=state["step"],
                    best=state["best_top1_err"])


def _grouped_index(optimizer, weights) -> dict:
    """{grouped name: its index in the one-model optimiser's state dict}: the parameters
    numbered group by group in the grouped model's order, as its optimiser numbers them."""
    name_of = weights.grouped_layout()
    order = {n: i for i, n in enumerate(weights.grouped_names())}
    index = {}
    for group in optimizer.param_groups:
        for name in sorted({name_of[p] for p in group["params"]}, key=order.get):
            index[name] = len(index)
    return index


def grouped_optimizer_state(optimizer, weights: torch.nn.Module, *, keep: bool = True) -> dict:
    """The optimiser's state dict of a split model (parallel.SplitModel) as the one (grouped)
    model's optimiser would hold it: a run resumes in any parallel mode. For hybrid a
    collective (every rank); keep=False: this rank's part of it only, returning {}."""
    momenta = {p: s["momentum_buffer"] for p, s in optimizer.state.items()
               if s.get("momentum_buffer") is not None}
    if not keep:
        weights.gather_grouped(momenta, keep=False)
        return {}
    state = optimizer.state_dict()
    index, name_of = _grouped_index(optimizer, weights), weights.grouped_layout()
    groups = [{**saved, "params": sorted({index[name_of[p]] for p in group["params"]})}
              for group, saved in zip(optimizer.param_groups, state["param_groups"])]
    buffers = weights.gather_grouped(momenta)
    return {"state": {index[n]: {"momentum_buffer": b} for n, b in buffers.items()},
            "param_groups": groups}


def load_grouped_optimizer_state(optimizer, weights: torch.nn.Module, state: dict) -> None:
    """The inverse of grouped_optimizer_state: each part's slice of the one model's state."""
    index = _grouped_index(optimizer, weights)
    full = {n: state["state"][i]["momentum_buffer"] for n, i in index.items()
            if i in state["state"]}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    local = {p: i for i, p in enumerate(params)}
    parts = weights.cut_grouped(full)
    optimizer.load_state_dict({
        "state": {local[p]: {"momentum_buffer": part.clone()} for p, part in parts.items()},
        "param_groups": [{**saved, "params": [local[p] for p in group["params"]]}
                         for group, saved in zip(optimizer.param_groups,
                                                 state["param_groups"])]})


def card_of(state: dict) -> ModelCard:
    return ModelCard(arch=state["arch"], num_classes=state["num_classes"], size=state["size"],
                 crop=state["crop"], class_names=tuple(state["class_names"]),
                 norm=Normalization.from_state(state["normalization"]),
                 wnids=tuple(state.get("wnids", ())))


def load_model(path: Path, device) -> tuple[torch.nn.Module, ModelCard]:
    """The trained network of a checkpoint on `device`, in eval mode, and what it expects."""
    return model_of(load(path), device)


def model_of(state: dict, device) -> tuple[torch.nn.Module, ModelCard]:
    """load_model's, from a checkpoint dict already loaded."""
    card = card_of(state)
    net = build_model(card.arch, card.num_classes, card.crop)
    net.load_state_dict(state["model"])
    return net.to(device).eval(), card


# --- files -----------------------------------------------------------------------------------------


def save(run_dir: Path, state: dict, *, name: str, keep: int = 3) -> Path:
    folder = Path(run_dir) / CHECKPOINT_DIR
    path = folder / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.tmp-*"):  # left by a save that was killed: never complete
            stale.unlink()
        with atomic_path(path) as tmp, open(tmp, "wb") as f, _without_zip_crc32():
            # through a Python file: a full disk is then an OSError (ENOSPC), where torch's own
            # writer for a path says only "unexpected pos" (a RuntimeError)
            torch.save(sealed(state), f)
    except (OSError, RuntimeError) as e:
        # torch's zip writer, closing after a failed write, raises its own RuntimeError over
        # the OSError that caused it
        cause = e if isinstance(e, OSError) else e.__context__
        if not isinstance(cause, OSError):
            raise
        raise UserError(f"{os_error(path, cause, 'write the checkpoint')}; the earlier "
                        f"checkpoints in {folder} are intact") from None
    if _EPOCH.search(name):  # superseded by a complete epoch: the interrupt, the steps
        (folder / "interrupt.pt").unlink(missing_ok=True)
        for old in epoch_checkpoints(run_dir)[:-keep] + _numbered(folder, "step-*.pt", _STEP):
            old.unlink()
    elif _STEP.search(name):
        for old in _numbered(folder, "step-*.pt", _STEP)[:-keep]:
            old.unlink()
    return path


def host_copy(state):
    """`state` with every tensor copied to the host: what a background write may hold while
    training changes the weights in place (on a GPU the step waits for this copy only)."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: host_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(host_copy(v) for v in state)
    return state


@contextlib.contextmanager
def _without_zip_crc32():
    """torch.save without the zip records' CRC-32: the sealed digest (sha256 of every tensor's
    bytes, checked at every load) already proves the content, and computing the CRC took 80% of
    a save (1.7 s of 2.1 s for 480 MB on the 2-core machine, 0.35 s without). Loading does not
    need it."""
    get_crc32 = getattr(torch.serialization, "get_crc32_options", None)
    set_crc32 = getattr(torch.serialization, "set_crc32_options", None)
    if get_crc32 is None or set_crc32 is None:
        yield  # an older torch (before 2.6): the CRCs are computed
        return
    before = get_crc32()
    set_crc32(False)
    try:
        yield
    finally:
        set_crc32(before)


def mark_best(run_dir: Path, path: Path) -> None:
    best = Path(run_dir) / CHECKPOINT_DIR / "best.pt"
    with atomic_path(best) as tmp:
        shutil.copyfile(path, tmp)


def _numbered(folder: Path, pattern: str, number: re.Pattern) -> list[Path]:
    return sorted(folder.glob(pattern), key=lambda p: int(number.search(p.name).group(1)))


def epoch_checkpoints(run_dir: Path) -> list[Path]:
    return _numbered(Path(run_dir) / CHECKPOINT_DIR, "epoch-*.pt", _EPOCH)


def _resumable(run_dir: Path) -> list[Path]:
    """Every checkpoint a run may continue from: the epochs', the steps', an interrupt."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    return (epoch_checkpoints(run_dir) + _numbered(folder, "step-*.pt", _STEP)
            + [p for p in [folder / "interrupt.pt"] if p.exists()])


def latest(run_dir: Path) -> Path | None:
    """The checkpoint to resume from: the newest of the epochs', the steps' and an interrupt."""
    candidates = _resumable(run_dir)
    return max(candidates, key=os.path.getmtime) if candidates else None


class _NotTorch(Exception):
    """A file refused before torch.load: its message is the reason."""


def _unreadable(e: Exception) -> str:
    """torch.load's error as what it says of the file, in one line, decided by its type: an OS
    error as it is; an unpickling error (weights_only refused what the file holds); torch's zip
    reader's RuntimeError (damaged or cut short). The detail comes from the message, which is
    all that carries it. torch's advice to load the file with weights_only=False (running
    whatever code it holds) is left out: a checkpoint of ours holds tensors and plain values
    only, so a file refused for its contents is not one."""
    import pickle
    text = str(e)
    first = (text.strip().splitlines() or [""])[0][:200]
    if isinstance(e, _NotTorch):
        return text
    if isinstance(e, OSError):  # errno and path as they are
        return f"{type(e).__name__}: {text}"
    if isinstance(e, EOFError):
        return "the file is empty or ends early"
    if isinstance(e, pickle.UnpicklingError):
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            return (f"it holds an object of class {found.group(1)}, which a checkpoint of "
                    f"alexnet-pipe never does: a whole model or another tool's file?")
        found = re.search(r"WeightsUnpickler error: ([^.\n]+)", text)
        return f"not a file torch.save wrote, or a damaged one: {found.group(1) if found else first}"
    if isinstance(e, RuntimeError) and "PytorchStreamReader" in text:  # the zip reader's
        return f"damaged or cut short: {first.split('PytorchStreamReader ')[-1].split('.')[0]}"
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def load(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--checkpoint {path}: a folder; give a checkpoint file (a run's "
                        f"checkpoints/best.pt or epoch-NNNN.pt)")
    if not path.is_file():
        raise UserError(f"--checkpoint {path}: file not found")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head != b"PK\x03\x04":  # torch.save writes zip archives (since torch 1.6)
            raise _NotTorch("the file is empty" if not head else
                            "not a file torch.save wrote: it does not begin as a zip archive")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, never a traceback
        why = _unreadable(e)
        raise UserError(f"{path}: not a readable alexnet-pipe checkpoint ({why})") from None
    if not isinstance(state, dict) or "model" not in state or "arch" not in state:
        raise UserError(f"{path}: not an alexnet-pipe checkpoint")
    if "digest" in state and content_digest(state) != state["digest"]:  # older ones have none
        raise UserError(f"{path}: damaged: its content does not match the digest it was saved "
                        f"with (a changed byte, or a bad copy); use an intact copy or another "
                        f"checkpoint of the run")
    # written before the layers had names: their keys as they are now
    return {**state, "model": named_state(state["arch"], state["model"])}


def load_latest(run_dir: Path, warn) -> tuple[Path, dict]:
    """The newest checkpoint of a run that loads intact, and its dict. Each damaged newer one is
    named through warn(line) and kept, renamed NAME.damaged so that training on does not write
    over it; none intact is an error naming each (and renames nothing)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    candidates = _resumable(run_dir)
    damaged = []
    for path in sorted(candidates, key=os.path.getmtime, reverse=True):
        try:
            state = load(path)
        except UserError as e:
            damaged.append((path, str(e)))
            continue
        for bad, why in damaged:
            kept = _set_aside(bad)
            warn(f"WARNING: {why}; kept as {kept}")
        if damaged:
            warn(f"WARNING: resuming from {path}, the newest intact checkpoint")
        return path, state
    raise UserError(f"--resume: no intact checkpoint in {folder}: "
                    + "; ".join(why for _, why in damaged))


def _set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint out of the run's names (NAME.damaged, NAME.damaged-2, ...)."""
    n, target = 1, path.with_name(path.name + ".damaged")
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{n}")
    try:
        path.rename(target)
    except OSError as e:
        raise os_error(path, e, "set the damaged checkpoint aside") from None
    return target


def check_compatible(state: dict, path: Path, *, arch: str, num_classes: int) -> None:
    if state["arch"] != arch:
        raise UserError(f"{path}: a checkpoint of --arch {state['arch']}, not {arch}")
    if state["num_classes"] != num_classes:
        raise UserError(f"{path}: a checkpoint for {state['num_classes']} classes; the data has "
                        f"{num_classes}")
