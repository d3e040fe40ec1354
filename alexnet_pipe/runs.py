"""What a training run does at its edges, apart from the loop: where it starts (a new run
folder, or the newest intact checkpoint of its own), when it saves (rank 0 writes, every rank
agrees it worked), where it stops early (--max-steps), and its end-of-run checks (the ranks'
weights in step, the ten-crop evaluation). Every collective here is entered by every rank at
the same place of the run.
"""
from __future__ import annotations

import dataclasses
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from alexnet_base.config import TrainConfig
from alexnet_base.errors import UserError, os_error
from alexnet_base.files import write_json
from alexnet_pipe import checkpoint, distributed
from alexnet_pipe.checkpoint import Progress
from alexnet_pipe.evaluate import evaluate

if TYPE_CHECKING:
    from alexnet_pipe.train import Setup


def plain(config) -> dict:
    """A config dataclass as JSON-ready values (paths as strings)."""
    def value(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, dict):
            return {k: value(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [value(x) for x in v]
        return v
    return value(dataclasses.asdict(config))


def resume_point(config: TrainConfig) -> Path | None:
    """The checkpoint --resume continues from, None for a new run; a UserError where the run
    folder and --resume disagree."""
    run_dir = Path(config.out)
    latest = checkpoint.latest(run_dir)
    if config.resume and latest is None:
        raise UserError(f"--resume: no checkpoint in {run_dir / checkpoint.CHECKPOINT_DIR}")
    if not config.resume and latest is not None:
        raise UserError(f"--out {run_dir}: holds checkpoints of an earlier run; add --resume to "
                        f"continue it, or choose another --out")
    return latest


def start_run_dir(run_dir: Path, resolved: dict) -> None:
    """The run folder and its config.json (replaced whole or not at all); an OS error as one
    line naming the path and the errno."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {os_error(run_dir, e, 'make the run folder')}") from None
    try:
        write_json(run_dir / "config.json", resolved)
    except OSError as e:
        raise UserError(f"--out {os_error(run_dir / 'config.json', e, 'write')}") from None


def restore(setup: Setup) -> Progress:
    """The run's newest intact checkpoint put back (a damaged newer one is named and kept)."""
    path, state = checkpoint.load_latest(Path(setup.config.out), setup.log.line)
    checkpoint.check_compatible(state, path, arch=setup.config.arch,
                                num_classes=setup.card.num_classes)
    progress = setup.parallel.restore(state, setup.model, setup.optimizer, setup.scheduler)
    setup.log.line(f"resumed from {path} at epoch {progress.epoch + 1}, batch {progress.batch}, "
                   f"step {progress.step}")
    return progress


def save(setup: Setup, progress: Progress, name: str) -> Path:
    """Rank 0 writes the checkpoint; the ranks agree on whether it worked (a full disk on rank 0
    must not leave the others waiting in the next collective). The hybrid's ranks all send
    their slices (a collective); only rank 0 copies the whole to its host."""
    main = setup.parallel.env.is_main
    state = setup.parallel.weights_state(setup.model, setup.optimizer, keep=main)
    path, error = None, None
    if main:
        weights, optimizer = state
        built = checkpoint.build(card=setup.card, weights=weights, optimizer=optimizer,
                                 scheduler=setup.scheduler, progress=progress,
                                 config=plain(setup.config),
                                 devices=setup.parallel.devices(setup.model))
        try:
            path = checkpoint.save(Path(setup.config.out), built, name=name,
                                   keep=setup.config.keep)
        except UserError as e:
            error = e
    if distributed.max_over_ranks(int(error is not None), setup.parallel.device):
        raise error or UserError(f"rank 0 could not write {name}; see its message")
    return path


def evaluate_run(setup: Setup, model, loader, *, ten_crop: bool = False) -> dict:
    """The validation figures of the model being trained (every rank: the hybrid first gathers
    its classifier, a collective)."""
    setup.parallel.before_evaluation(setup.model)
    return evaluate(model, loader, runtime=setup.runtime, ten_crop=ten_crop)


def stop_at_max_steps(setup: Setup, progress: Progress, model, val_loader) -> dict:
    """--max-steps reached inside an epoch: evaluate, save a resumable interrupt.pt, end."""
    metrics = evaluate_run(setup, model, val_loader)
    save(setup, progress, "interrupt.pt")
    setup.log.record(kind="max_steps", epoch=progress.epoch + 1, step=progress.step, **metrics,
                     **compiled_graphs(setup.config))
    setup.log.line(f"--max-steps {setup.config.max_steps} reached at epoch {progress.epoch + 1}, "
                   f"batch {progress.batch}: centre-crop top-1 err {metrics['top1_err']:.4f}; "
                   f"saved interrupt.pt (continue with --resume)")
    return {"kind": "max_steps", "step": progress.step, **metrics}


def compiled_graphs(config: TrainConfig) -> dict:
    """With --compile, the graphs torch.compile has made in this process so far (training and
    evaluation each have theirs): a count that grows after the first epoch means a recompile
    per epoch, and past dynamo's cache limit a silent fall back to eager."""
    if not config.compile:
        return {}
    from torch._dynamo.utils import counters
    return {"compiled_graphs": int(counters["stats"]["unique_graphs"])}


def finish(setup: Setup, progress: Progress, model, per_rank, result: dict,
           shm_reserved: int) -> dict:
    """The end-of-run checks: the ranks' replicated weights equal (a checksum, one collective),
    then the ten-crop evaluation where asked."""
    parallel = setup.parallel
    checksum = float(sum(p.detach().double().sum().item()
                         for p in parallel.replicated(setup.model)))
    result["ranks_in_sync"] = distributed.same_on_all_ranks(checksum, parallel.device)
    if not result["ranks_in_sync"]:
        raise UserError("the ranks' weights differ after training: a DDP fault; do not use this run")
    if setup.config.ten_crop:
        # the ten-crop readers' shared memory comes on top of the train and val readers'
        ten = setup.data.loader(per_rank, "val", ranks=parallel.env, ten_crop=True,
                                device=parallel.device, norm=setup.card.norm,
                                shm_reserved=shm_reserved)
        tc = evaluate_run(setup, model, ten, ten_crop=True)
        result.update({f"ten_crop_{k}": v for k, v in tc.items()})
        setup.log.record(kind="ten_crop", **tc)
        setup.log.line(f"ten-crop: top-1 err {tc['top1_err']:.4f} top-5 err {tc['top5_err']:.4f}")
    setup.log.record(kind="done", ranks_in_sync=result["ranks_in_sync"], step=progress.step)
    return result


def per_rank_loader(config: TrainConfig, world: int):
    """The loader options of one rank: its share of the global batch."""
    return replace(config.loader, batch_size=config.loader.batch_size // world)
