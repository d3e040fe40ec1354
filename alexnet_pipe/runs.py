"""What a training run does at its edges, apart from the loop: where it starts (a new run
folder, or the newest intact checkpoint of its own), when it saves (rank 0 writes, every rank
agrees it worked), where it stops early (--max-steps), and its end-of-run checks (the ranks'
weights in step, the ten-crop evaluation). Every collective here is entered by every rank at
the same place of the run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from alexnet_base.config import RELAUNCH_MAY_CHANGE, TrainConfig
from alexnet_base.errors import UserError, os_error
from alexnet_base.files import write_json
from alexnet_pipe import checkpoint, distributed
from alexnet_pipe.checkpoint import Progress
from alexnet_pipe.evaluate import evaluate
from preprocessing import shards

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
    """The checkpoint the run continues from, None for a new run; a UserError where the run
    folder and --resume disagree: --resume needs a checkpoint, a new run none, and --resume
    auto continues only the same run (same_run)."""
    run_dir = Path(config.out)
    latest = checkpoint.latest(run_dir)
    if config.resume == "yes" and latest is None:
        raise UserError(f"--resume: no checkpoint in {run_dir / checkpoint.CHECKPOINT_DIR}")
    if config.resume == "no" and latest is not None:
        raise UserError(f"--out {run_dir}: holds checkpoints of an earlier run; add --resume (or "
                        f"--resume auto) to continue it, or choose another --out")
    if config.resume == "auto" and latest is not None:
        same_run(config, run_dir)
    return latest


def unsplittable(batch: int, world: int) -> str:
    """The line for a global batch that `world` ranks cannot split evenly: the batches near it
    that they can, and the numbers of ranks that can split it (a run that continues keeps its
    batch)."""
    below, above = batch // world * world, -(-batch // world) * world
    near = " or ".join(str(b) for b in dict.fromkeys((below, above)) if b > 0)
    ranks = [k for k in range(1, batch + 1) if batch % k == 0 and k <= 64]
    return (f"--batch-size {batch}: the global batch does not divide by the {world} processes; "
            f"--batch-size {near} would, or keep {batch} (a run that continues keeps its batch) "
            f"on {', '.join(map(str, ranks))} processes")


def same_run(config: TrainConfig, run_dir: Path) -> None:
    """A UserError in one line, naming each option, where this launch asks for another run than
    the one RUN/config.json describes: any option but those config.RELAUNCH_MAY_CHANGE lists,
    or other data (by its manifest)."""
    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except OSError as e:
        raise UserError(f"--resume auto: {os_error(path, e, 'read the run configuration')}; "
                        f"nothing was changed") from None
    except ValueError as e:
        raise UserError(f"--resume auto: {path}: damaged ({e}); it says which run the "
                        f"checkpoints belong to: restore it, or continue with --resume") from None
    ours, theirs = _flat(plain(config)), _flat(saved)
    changed = [f"--{k.split('.')[-1].replace('_', '-')} {theirs.get(k)!r} (now {v!r})"
               for k, v in ours.items() if k not in RELAUNCH_MAY_CHANGE and theirs.get(k) != v]
    if saved.get("data_manifest") not in (None, shards.content_digest(config.loader.data)):
        changed.append(f"--data {config.loader.data}: other data than the run's (its manifest "
                       f"differs)")
    if changed:
        raise UserError(f"--resume auto: {run_dir} holds a run with other options: "
                        f"{'; '.join(changed)}; give the run's options, or another --out")


def _flat(d: dict, prefix: str = "") -> dict:
    """{"loader": {"seed": 0}} -> {"loader.seed": 0}; the augment options under loader."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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


def begin(setup: Setup, progress: Progress, resumed: bool) -> None:
    """The run's records from where it stands: metrics.jsonl and TensorBoard's curves keep each
    step's record once (records of steps a relaunch trains again are dropped: it writes them
    anew), and a
    relaunch records which one it is in the run (1, 2, ...; torchrun's own count besides,
    which a change of membership does not advance), the step it continues from and its
    number of ranks."""
    log, env = setup.log, setup.parallel.env
    kept = log.replay_from(progress.step)
    if setup.config.tensorboard:  # its curves, like metrics.jsonl, from the step after this one
        log.open_board(progress.step + 1)
        if log.board is not None:
            log.board.text("config", {**plain(setup.config), "parallel": setup.parallel.mode,
                                      "world_size": env.world}, progress.step + 1)
    if resumed:
        restart = 1 + sum(rec.get("kind") == "restart" for rec in kept)
        torchrun = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        log.record(kind="restart", restart=restart, epoch=progress.epoch + 1,
                   step=progress.step, world_size=env.world,
                   **({"torchrun_restart": int(torchrun)} if torchrun is not None else {}))
        log.line(f"relaunch {restart} of the run: from step {progress.step} on {env.world} "
                 f"rank(s)")


def restore(setup: Setup) -> Progress:
    """The run's newest intact checkpoint put back (a damaged newer one is named and kept)."""
    path, state = checkpoint.load_latest(Path(setup.config.out), setup.log.line)
    checkpoint.check_compatible(state, path, arch=setup.config.arch,
                                num_classes=setup.card.num_classes)
    progress = setup.parallel.restore(state, setup.model, setup.optimizer, setup.scheduler)
    setup.log.line(f"resumed from {path} at epoch {progress.epoch + 1}, batch {progress.batch}, "
                   f"step {progress.step}")
    return progress


class Saver:
    """Rank 0 writes the run's checkpoints, now or in the background (--save-every: the step
    waits for the state's copy to the host only). At every save the ranks agree, in one
    collective, on whether the writes so far worked (a full disk on rank 0 must not leave the
    others waiting in the next collective); `finish` waits for the last background write and
    agrees on it. The hybrid's ranks all send their slices (a collective); only rank 0 copies
    the whole to its host."""

    def __init__(self, setup: Setup):
        self.setup = setup
        self._writing = None  # (thread, [error]) of the background write in flight

    def save(self, progress: Progress, name: str, *, background: bool = False) -> Path | None:
        setup = self.setup
        main = setup.parallel.env.is_main
        state = setup.parallel.weights_state(setup.model, setup.optimizer, keep=main)
        error, path, built = self._wait(), None, None
        if main and error is None:
            weights, optimizer = state
            built = checkpoint.build(card=setup.card, weights=weights, optimizer=optimizer,
                                     scheduler=setup.scheduler, progress=progress,
                                     config=plain(setup.config),
                                     devices=setup.parallel.devices(setup.model))
            if background:  # the write goes on beside the next steps: a copy they cannot change
                self._start(checkpoint.host_copy(built), name)
            else:
                try:
                    path = self._write(built, name)
                except UserError as e:
                    error = e
        self._agree(error, name)
        return path

    def finish(self) -> None:
        """The last background write waited for and agreed on (every rank, at the run's end
        or stop)."""
        self._agree(self._wait(), "the last checkpoint")

    def _write(self, state: dict, name: str) -> Path:
        return checkpoint.save(Path(self.setup.config.out), state, name=name,
                               keep=self.setup.config.keep)

    def _start(self, state: dict, name: str) -> None:
        outcome = [None]

        def write():
            try:
                self._write(state, name)
            except UserError as e:
                outcome[0] = e
        thread = threading.Thread(target=write, name="checkpoint-writer")
        thread.start()
        self._writing = (thread, outcome)

    def _wait(self) -> UserError | None:
        if self._writing is None:
            return None
        thread, outcome = self._writing
        thread.join()
        self._writing = None
        return outcome[0]

    def _agree(self, error: UserError | None, name: str) -> None:
        if distributed.max_over_ranks(int(error is not None), self.setup.parallel.device):
            raise error or UserError(f"rank 0 could not write {name}; see its message")


def evaluate_run(setup: Setup, model, loader, *, ten_crop: bool = False) -> dict:
    """The validation figures of the model being trained (every rank: the hybrid first gathers
    its classifier, a collective)."""
    setup.parallel.before_evaluation(setup.model)
    return evaluate(model, loader, runtime=setup.runtime, ten_crop=ten_crop)


def stop_at_max_steps(setup: Setup, saver: Saver, progress: Progress, model,
                      val_loader) -> dict:
    """--max-steps reached inside an epoch: evaluate, save a resumable interrupt.pt, end."""
    metrics = evaluate_run(setup, model, val_loader)
    saver.save(progress, "interrupt.pt")
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
        ten = setup.data.loader("val", per_rank, ranks=parallel.env, ten_crop=True,
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
