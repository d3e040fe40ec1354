"""`alexnet-pipe train`: the paper's recipe, fed by the DALI pipelines, safe to interrupt.

SGD with momentum 0.9 and weight decay 5e-4, global batch 128, lr 0.01 divided by 10 when the
centre-crop validation error stops improving (at most 3 times), 90 epochs; biases with twice the
learning rate and no decay (the author's rule, `--bias-rule`). The update is torch's SGD
(v = m*v + g; w -= lr*v): the paper's (v = m*v - lr*g; w += v) differs only right after a drop.

The run, top to bottom: `set_up` (options, data, model, optimiser, log: a frozen `Setup`),
`runs.restore` (a `Progress`: all that carries from step to step), then each epoch
`train_one_epoch` (around runtime.train_step, the one training step the benchmarks time too),
`runs.evaluate_run` and `runs.Saver`; `runs.finish` at the end. The parallel mode is
parallel.py's, how the model runs runtime.py's, the instruments meters.py's. A run directory
describes itself:
    RUN/config.json        the resolved options and the version
    RUN/metrics.jsonl      one JSON line every --log-every steps ("step") and per epoch ("epoch")
    RUN/train.log          the same, for people
    RUN/events.out.tfevents.*  the same numbers and the run's pictures for TensorBoard (board.py)
    RUN/checkpoints/       see checkpoint.py
"""
from __future__ import annotations

import math
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from alexnet_base.config import TrainConfig
from alexnet_base.errors import UserError
from alexnet_pipe import __version__, checkpoint, distributed, optim, runs
from alexnet_pipe.checkpoint import Progress
from alexnet_pipe.meters import Interval, Log, StepTimer, StopRequest, progress_bar
from alexnet_pipe.parallel import Parallel
from alexnet_pipe.prepared import Shards, open_shards
from alexnet_pipe.plan import batches_per_epoch
from alexnet_pipe.runtime import Runtime, train_step


# --- set up ------------------------------------------------------------------------------------------

class Setup(NamedTuple):
    """What a training process holds for the whole run, fixed once set up."""
    config: TrainConfig
    parallel: Parallel           # the mode, this process's place among the ranks, its device
    runtime: Runtime             # how the model runs: autocast, memory layout, cuDNN
    data: Shards               # the prepared folder, opened and checked once
    model: torch.nn.Module       # the unwrapped network (model_without_ddp): checkpointed
    optimizer: torch.optim.Optimizer
    scheduler: object
    log: Log
    card: checkpoint.ModelCard   # what every checkpoint says of the model and its input


def set_up(config: TrainConfig) -> tuple[Setup, Path | None]:
    """Check the options and the data, then build model, optimiser and log. Nothing is written
    before every check has passed. Returns the run and the checkpoint to resume from."""
    config.validate()
    env = distributed.from_environment()
    device = distributed.device(config.loader.device, env)
    parallel = Parallel.decide(config, env, device)
    if config.loader.batch_size % env.world:
        raise UserError(runs.unsplittable(config.loader.batch_size, env.world))
    resume_from = runs.resume_point(config)
    distributed.init(env, device, config.dist_timeout)
    # each node checks its own copy, its ranks sharing the hashing; every rank stops together
    data = open_shards(config.loader.data, ("train", "val"), verify=config.loader.verify,
                         share=(env.local_rank, env.local_world),
                         gather=distributed.gather_objects)
    aug, train = config.loader.augment, data.split("train")
    aug.validate(train.size)
    runtime = Runtime.for_device(parallel.device, amp=config.amp,
                                 channels_last=config.loader.channels_last,
                                 deterministic=config.deterministic)
    runtime.configure()
    if env.is_main:  # resolved: parallel is never "auto"; the data named by its manifest
        runs.start_run_dir(Path(config.out), {**runs.plain(config), "version": __version__,
                                              "parallel": parallel.mode, "world_size": env.world,
                                              "data_manifest": data.digest})
    distributed.barrier()
    torch.manual_seed(config.loader.seed)  # the weight initialisation
    model = parallel.build(config, train.num_classes, runtime)
    optimizer = optim.sgd(model, config)
    card = checkpoint.ModelCard(arch=config.arch, num_classes=train.num_classes,
                                size=train.size, crop=aug.crop, class_names=train.class_names,
                                wnids=train.wnids,
                                norm=data.normalization(aug))
    setup = Setup(config=config, parallel=parallel, runtime=runtime, data=data, model=model,
                  optimizer=optimizer, scheduler=optim.scheduler(optimizer, config),
                  log=Log(Path(config.out), env.is_main), card=card)
    n = parallel.parameter_count(model)
    setup.log.line(f"{config.arch}: {n:,} parameters ({n + (1000 - train.num_classes) * 4097:,} "
                   f"at 1000 classes), {train.num_classes} classes, parallel={parallel.mode}, "
                   f"world={env.world}, device={device.type}")
    return setup, resume_from


# --- one epoch ---------------------------------------------------------------------------------------

@dataclass
class EpochResult:
    stopped: int         # 0, or the signal that stopped the epoch before its end (every rank)
    images: int = 0      # images trained on by this rank
    seconds: float = 0.0
    loss_sum: object = 0.0  # a tensor on the device: read after the epoch, not in its loop
    data_wait: float = 0.0  # fraction of the epoch the host was blocked in the loader (on a GPU
    # this includes waiting for the GPU's queue: an upper bound, see BENCHMARKS.md)
    gpu_wait: float | None = None    # StepTimer.wait(): GPU time between steps (CUDA only)
    gpu_step_ms: float | None = None  # StepTimer.step_ms(): GPU time per step (CUDA only)


def train_one_epoch(model, optimizer, loader, progress: Progress, config: TrainConfig, *,
                    runtime: Runtime, log: Log, stop: StopRequest, num_classes: int,
                    ranks: bool, bar=None, devices=None, after_backward=None,
                    save_step=None, first_batch=None) -> EpochResult:
    """Train `model` over the rest of epoch `progress.epoch`; `progress.step` and
    `progress.batch` advance. ranks: several processes, which agree on a stop. devices: those
    a step runs on (the towers: two), timed on each; default the runtime's. save_step(): the
    mid-epoch checkpoint of every --save-every steps (every rank reaches the same steps).
    first_batch(images, epoch, batch): shown the epoch's first batch (the loader's output)."""
    model.train()
    device = runtime.device
    lr = optimizer.param_groups[0]["lr"]
    interval = Interval(progress.step, device)
    epoch_loss = torch.zeros((), device=device)
    n_batches, done, wait = loader.plan.num_batches(), 0, 0.0
    t_epoch = interval.t0
    timer = StepTimer(devices or [device])
    it = iter(loader)
    while True:
        if config.max_steps and progress.step >= config.max_steps and progress.batch < n_batches:
            return EpochResult(stopped=0, images=done, seconds=time.perf_counter() - t_epoch)
        t0 = time.perf_counter()
        try:
            images, labels = next(it)
        except StopIteration:
            break
        waited = time.perf_counter() - t0
        wait += waited
        interval.wait += waited
        if first_batch is not None:
            first_batch(images, progress.epoch, progress.batch)
            first_batch = None
        timer.mark()
        images, labels = runtime.batch(images, labels)
        loss = train_step(model, optimizer, images, labels, runtime=runtime,
                          after_backward=after_backward)
        interval.add(loss)
        epoch_loss += loss
        timer.mark()
        progress.step, progress.batch, done = progress.step + 1, progress.batch + 1, done + len(labels)
        if bar is not None:
            bar.update(1)
        log_point = progress.step % config.log_every == 0 or progress.batch == n_batches
        if log_point:
            _log_point(log, progress, config, num_classes, interval, len(labels), lr, bar, timer)
        if progress.batch < n_batches:  # at the epoch's end: finish it, then checkpoint
            if save_step is not None and config.save_every and (
                    progress.step % config.save_every == 0):
                save_step()
            signum = _agreed_stop(stop, log_point, ranks, device)
            if signum:
                return EpochResult(stopped=signum, images=done)
    seconds = time.perf_counter() - t_epoch
    return EpochResult(stopped=0, images=done, seconds=seconds,
                       loss_sum=epoch_loss, data_wait=wait / seconds if seconds else 0.0,
                       gpu_wait=timer.wait(), gpu_step_ms=timer.step_ms())


def _agreed_stop(stop: StopRequest, log_point: bool, ranks: bool, device) -> int:
    """The signal that stops every rank at this step, or 0. One process checks its own flag every
    step; ranks agree through one small all-reduce at log points only (a signal to one rank stops
    them all at the same step, within --log-every steps, without a sync per step)."""
    if not ranks:
        return stop.signal or 0
    return distributed.max_over_ranks(stop.signal or 0, device) if log_point else 0


def _log_point(log: Log, progress: Progress, config: TrainConfig, num_classes: int,
               interval: Interval, batch: int, lr: float, bar, timer: StepTimer) -> None:
    """The per-interval record; reading the device values is the interval's one sync point."""
    bad = int(interval.first_bad.item())
    gpu = timer.read()  # CUDA: the interval's GPU idle share and step time
    if bad >= 0:
        raise UserError(f"non-finite loss at step {bad + 1} (epoch {progress.epoch + 1}); "
                        f"training stopped, the last good checkpoint is kept. Try a lower --lr")
    loss = interval.loss.item() / interval.steps
    now = time.perf_counter()
    log.record(kind="step", epoch=progress.epoch + 1, step=progress.step, loss=loss, lr=lr,
               images_per_s=interval.steps * batch / (now - interval.t0),
               data_wait=interval.wait / (now - interval.t0), **gpu)
    if bar is not None:
        bar.set_postfix(loss=f"{loss:.3f}")
    _warn_if_flat(log, progress.step, config, num_classes, loss)
    interval.restart(now)


def _warn_if_flat(log: Log, step: int, config: TrainConfig, n: int, loss: float) -> None:
    if step >= config.flat_check_steps and step - config.log_every < config.flat_check_steps:
        chance = math.log(n)
        if abs(loss - chance) < 0.02 * chance:
            log.line(f"WARNING: after {step} steps the loss ({loss:.4f}) has not moved "
                     f"from ln({n}) = {chance:.4f}; the paper's bias initialisation is known "
                     f"to stall like this: try --bias-init caffe (biases 0.1)")


# --- the run -----------------------------------------------------------------------------------------

def run(config: TrainConfig) -> dict:
    try:
        with distributed.failures_shared():  # a rank's error is every rank's one line
            setup, resume_from = set_up(config)
            progress = runs.restore(setup) if resume_from is not None else Progress()
            runs.begin(setup, progress, resumed=resume_from is not None)
            try:
                return _epochs(setup, progress)
            finally:
                setup.log.close()
    except BaseException as e:  # sys.exit after a stop too
        # The frames it unwound hold the DDP model, whose reducer holds the process group:
        # freed now, while the group is registered, the group ends in destroy_process_group
        # (distributed.shutdown). Left to the interpreter's exit, the reducer ends the group
        # holding the GIL that a gloo thread still releasing a collective's tensors waits
        # for: the process hung at exit (about 1 stop in 5 under torchrun).
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        distributed.shutdown()


def _loaders(setup: Setup, progress: Progress):
    """(per-rank loader config, train loader, val loader)."""
    cfg, env, data = setup.config, setup.parallel.env, setup.data
    per_rank = runs.per_rank_loader(cfg, env.world)
    common = dict(ranks=env, device=setup.parallel.device, norm=setup.card.norm)
    train = data.loader("train", per_rank, start_epoch=progress.epoch,
                        start_batch=progress.batch,
                        epochs=_stream_epochs(setup, progress, per_rank.batch_size), **common)
    # the val readers' shared memory comes on top of the train readers' (neither has run yet)
    return per_rank, train, data.loader("val", per_rank, shm_reserved=train.shm, **common)


def _stream_epochs(setup: Setup, progress: Progress, batch: int) -> int:
    """Epochs the train readers stream without draining: the rest of the run, which
    --max-steps may end early (nothing is then read past the epoch it ends in)."""
    cfg, env = setup.config, setup.parallel.env
    epochs = cfg.epochs - progress.epoch
    if cfg.max_steps:
        per_epoch = batches_per_epoch(setup.data.split("train").total, batch, train=True,
                                      rank=env.rank, world=env.world) or 1
        todo = progress.batch + max(cfg.max_steps - progress.step, 1)
        epochs = min(epochs, -(-todo // per_epoch))
    return max(epochs, 1)


def _epochs(setup: Setup, progress: Progress) -> dict:
    cfg, log, parallel = setup.config, setup.log, setup.parallel
    env, device = parallel.env, parallel.device
    if progress.epoch >= cfg.epochs:
        log.line(f"already trained {progress.epoch} epochs (--epochs {cfg.epochs}): nothing to do")
        return {"epoch": progress.epoch, "step": progress.step}
    model = parallel.wrap(setup.model, cfg)
    per_rank, train_loader, val_loader = _loaders(setup, progress)
    stop, result, saver = StopRequest(), {}, runs.Saver(setup)

    def save_step():
        saver.save(progress, checkpoint.step_name(progress.step), background=True)

    def first_batch(images, epoch: int, batch: int):  # TensorBoard: the launch's first batch
        log.board.batch(train_loader, images, setup.card.norm, epoch, batch, progress.step + 1)
    show = first_batch if log.board is not None else None
    while progress.epoch < cfg.epochs:
        lr = setup.optimizer.param_groups[0]["lr"]
        bar = progress_bar(cfg, env, len(train_loader), progress.epoch)
        out = train_one_epoch(model, setup.optimizer, train_loader, progress, cfg,
                              runtime=setup.runtime, log=log, stop=stop,
                              num_classes=setup.card.num_classes, ranks=env.enabled, bar=bar,
                              devices=parallel.devices(setup.model),
                              after_backward=parallel.after_backward(setup.model),
                              save_step=save_step, first_batch=show)
        show = None
        if bar is not None:
            bar.close()
        if out.stopped:
            saver.save(progress, "interrupt.pt")
            log.line(f"signal {out.stopped}: saved interrupt.pt at epoch {progress.epoch + 1}, "
                     f"batch {progress.batch}; continue with --resume")
            sys.exit(stop.exit_status(out.stopped))
        if progress.batch < train_loader.plan.num_batches():  # --max-steps, mid-epoch
            return runs.stop_at_max_steps(setup, saver, progress, model, val_loader)
        metrics = runs.evaluate_run(setup, model, val_loader)
        setup.scheduler.step(metrics["top1_err"])
        steps = progress.batch - train_loader.plan.skipped(progress.epoch)
        mean_loss = float(out.loss_sum) / max(steps, 1)  # the epoch's one read of it
        images, loss_sum = distributed.all_sum([out.images, mean_loss], device)
        result = {"kind": "epoch", "epoch": progress.epoch + 1, "step": progress.step, "lr": lr,
                  "train_loss": loss_sum / env.world, "train_images": int(images),
                  "images_per_s": images / out.seconds, "data_wait": out.data_wait,
                  "seconds": out.seconds, **metrics}
        if out.gpu_wait is not None:  # CUDA: the GPU's own view of the same epoch
            result.update(gpu_wait=out.gpu_wait, gpu_step_ms=out.gpu_step_ms)
        log.record(**result, **runs.compiled_graphs(cfg))
        log.line(f"epoch {progress.epoch + 1}/{cfg.epochs} step {progress.step}: train loss "
                 f"{result['train_loss']:.4f} centre-crop top-1 err {metrics['top1_err']:.4f} "
                 f"top-5 err {metrics['top5_err']:.4f} val loss {metrics['val_loss']:.4f} "
                 f"lr {lr:g} {result['images_per_s']:.1f} img/s data-wait {out.data_wait:.1%}"
                 + (f" GPU idle between steps {out.gpu_wait:.1%}, {out.gpu_step_ms:.1f} ms a "
                    f"step" if out.gpu_wait is not None else ""))
        is_best = metrics["top1_err"] < progress.best
        progress.best = min(progress.best, metrics["top1_err"])
        progress.epoch, progress.batch = progress.epoch + 1, 0
        path = saver.save(progress, f"epoch-{progress.epoch:04d}.pt")
        if log.board is not None:
            log.board.filters(parallel.conv1_weight(setup.model), progress.step)
        if env.is_main and is_best:
            checkpoint.mark_best(Path(cfg.out), path)
        signum = distributed.max_over_ranks(stop.signal or 0, device)  # every epoch
        if signum:  # arrived during the epoch's last steps or evaluation, on some rank
            log.line(f"signal {signum}: stopped after epoch {progress.epoch}; continue with "
                     f"--resume")
            sys.exit(stop.exit_status(signum))
        if cfg.max_steps and progress.step >= cfg.max_steps:
            break
    saver.finish()
    # the ten-crop readers' shared memory comes on top of the train and val readers' (running)
    return runs.finish(setup, progress, model, per_rank, result,
                       train_loader.shm + val_loader.shm)
