"""`alexnet-pipe train`: the paper's recipe, fed by the DALI pipelines, safe to interrupt.

SGD with momentum 0.9 and weight decay 5e-4, global batch 128, lr 0.01 divided by 10 when the
centre-crop validation error stops improving (at most 3 times), 90 epochs; biases with twice the
learning rate and no decay (the author's rule, `--bias-rule`). The update is torch's SGD
(v = m*v + g; w -= lr*v): the paper's (v = m*v - lr*g; w += v) differs only right after a drop.

The run in named steps: `set_up` (options, data, model, optimiser, log: a frozen `Setup`),
`checkpoint.restore` (a `Progress`: all that carries from step to step), `train_one_epoch`
(around `train_step`, the one training step that the benchmarks time too), `evaluate`
(evaluate.py) and `checkpoint.build` (the checkpoint dict). A run directory describes itself:
    RUN/config.json        the resolved options and the version
    RUN/metrics.jsonl      one JSON line every --log-every steps ("step") and per epoch ("epoch")
    RUN/train.log          the same, for people
    RUN/checkpoints/       see checkpoint.py
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from alexnet_base import resources
from alexnet_base.config import TrainConfig
from alexnet_base.errors import UserError, os_error
from alexnet_base.files import write_json
from alexnet_pipe import __version__, augment, checkpoint, distributed
from alexnet_pipe.checkpoint import Progress
from alexnet_pipe.evaluate import evaluate
from alexnet_pipe.hybrid import HybridAlexNet
from alexnet_pipe.model import TowerAlexNet, build_model, count_parameters, input_dtype
from alexnet_pipe.normalize import Normalization
from alexnet_pipe.pipeline import make_loader
from alexnet_pipe.reader import batches_per_epoch
from preprocessing import verify
from preprocessing.shards import SplitInfo, load_split, load_stats


# --- the training step -----------------------------------------------------------------------------

def train_step(model, optimizer, images, labels, *, amp: bool) -> torch.Tensor:
    """One SGD step. images (B, 3, H, W) on the model's input device. Returns the loss, detached,
    on the device: reading it is a CPU-GPU sync point, so callers read it at log points only."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = F.cross_entropy(model(images).float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    reduce = getattr(model, "reduce_gradients", None)  # hybrid: its gradients' collectives
    if reduce is not None:
        reduce()
    optimizer.step()
    return loss.detach()


def param_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict]:
    """SGD parameter groups. author: biases at twice the learning rate and without weight decay
    (cuda-convnet2's epsB/wcB, Caffe's reference AlexNet); uniform: every parameter alike."""
    if config.bias_rule == "uniform":
        return [{"params": list(model.parameters()), "weight_decay": config.weight_decay}]
    weights = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights, "weight_decay": config.weight_decay},
            {"params": biases, "weight_decay": 0.0, "lr": 2 * config.lr}]


# --- set up ------------------------------------------------------------------------------------------

class Setup(NamedTuple):
    """What a training process holds for the whole run, fixed once set up."""
    config: TrainConfig
    env: distributed.DistEnv
    mode: str                   # none | ddp | towers | hybrid (never auto)
    device: torch.device        # where the loaders deliver and the model takes its input
    core: torch.nn.Module       # the model whose grouped state dict is checkpointed
    optimizer: torch.optim.Optimizer
    scheduler: object
    log: "Log"
    split: SplitInfo            # the train split, read once
    model: checkpoint.Model     # what every checkpoint says of the model and its input
    lighting: np.ndarray | None  # (3, 3) PCA lighting basis (augment.lighting_basis)


def _parallel_mode(config: TrainConfig, env: distributed.DistEnv) -> str:
    mode = config.parallel
    if mode == "auto":
        mode = "ddp" if env.enabled else "none"
    if mode == "towers" and env.enabled:
        raise UserError("--parallel towers runs in one process; launch it without torchrun")
    if mode in ("ddp", "hybrid") and not env.enabled:
        raise UserError(f"--parallel {mode}: launch with torchrun --nproc_per_node N (one "
                        f"process per GPU)" + (", or leave --parallel at auto" if mode == "ddp"
                                                 else ""))
    return mode


def _build_model(config: TrainConfig, num_classes: int, mode: str, device,
                 env: distributed.DistEnv):
    """(model whose grouped state dict is checkpointed, its input device)."""
    crop = config.loader.augment.crop
    channels_last = config.loader.channels_last
    model = build_model(config.arch, num_classes, crop, config.bias_init, config.dropout)
    if mode == "towers":
        distributed.check_devices(config.tower_devices)
        towers = TowerAlexNet(num_classes, crop, config.dropout, config.tower_devices)
        towers.load_grouped_state_dict(model.state_dict())
        if channels_last and any(d.type == "cuda" for d in towers.devices):
            towers = towers.to(memory_format=torch.channels_last)  # on their own devices
        return towers, towers.devices[0]
    model = model.to(device)
    if device.type == "cuda" and channels_last:
        model = model.to(memory_format=torch.channels_last)
    if mode == "hybrid":
        model = HybridAlexNet(model, rank=env.rank, world=env.world, seed=config.loader.seed)
    return model, device


def set_up(config: TrainConfig) -> tuple[Setup, Path | None]:
    """Check the options and the data, then build model, optimiser and log. Nothing is written
    before every check has passed. Returns the run and the checkpoint to resume from."""
    config.validate()
    env = distributed.from_environment()
    device = distributed.device(config.loader.device, env)
    mode = _parallel_mode(config, env)
    if config.loader.batch_size % env.world:
        raise UserError(f"--batch-size {config.loader.batch_size}: the global batch must divide "
                        f"by the {env.world} processes")
    run_dir = Path(config.out)
    resume_from = checkpoint.latest(run_dir) if config.resume else None
    if config.resume and resume_from is None:
        raise UserError(f"--resume: no checkpoint in {run_dir / checkpoint.CHECKPOINT_DIR}")
    if not config.resume and checkpoint.latest(run_dir) is not None:
        raise UserError(f"--out {run_dir}: holds checkpoints of an earlier run; add --resume to "
                        f"continue it, or choose another --out")
    aug = config.loader.augment
    split = load_split(config.loader.data, "train")
    aug.validate(split.size)
    stats = load_stats(config.loader.data, split)
    distributed.init(env, device, config.dist_timeout)
    if config.loader.verify:  # each node checks its own copy, its ranks sharing the hashing;
        # every rank stops together
        verify.check_inputs(config.loader.data, ("train", "val"),
                            share=(env.local_rank, env.local_world),
                            workers=max(1, resources.usable_cores() // env.local_world),
                            gather=distributed.gather_objects)
    if device.type == "cuda":  # fixed shapes: let cuDNN time its algorithms once
        torch.backends.cudnn.benchmark = not config.deterministic
        torch.backends.cudnn.deterministic = config.deterministic
    if env.is_main:  # resolved: parallel is never "auto"
        _start_run_dir(run_dir, {**_plain(config), "version": __version__, "parallel": mode,
                                 "world_size": env.world})
    distributed.barrier()
    torch.manual_seed(config.loader.seed)  # the weight initialisation
    core, in_device = _build_model(config, split.num_classes, mode, device, env)
    optimizer = torch.optim.SGD(param_groups(core, config), lr=config.lr,
                                momentum=config.momentum)
    about = checkpoint.Model(arch=config.arch, num_classes=split.num_classes, size=split.size,
                             crop=aug.crop, class_names=split.class_names,
                             norm=Normalization.from_stats(stats, aug))
    lighting = None
    if aug.lighting_std > 0:
        lighting = augment.lighting_basis(stats.eigval, stats.eigvec, aug.lighting_scale)
    setup = Setup(config=config, env=env, mode=mode, device=in_device, core=core,
                  optimizer=optimizer, scheduler=_scheduler(optimizer, config),
                  log=Log(run_dir, env.is_main), split=split, model=about, lighting=lighting)
    n = getattr(core, "grouped_count", None) or count_parameters(core)  # hybrid: all ranks
    setup.log.line(f"{config.arch}: {n:,} parameters ({n + (1000 - split.num_classes) * 4097:,} "
                   f"at 1000 classes), {split.num_classes} classes, parallel={mode}, "
                   f"world={env.world}, device={device.type}")
    return setup, resume_from


def _start_run_dir(run_dir: Path, resolved: dict) -> None:
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


def _scheduler(optimizer, config: TrainConfig):
    floor = config.lr_factor ** config.max_lr_drops
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=config.lr_factor,
        patience=config.lr_patience - 1,  # torch drops after patience + 1 epochs without gain
        threshold=1e-4, min_lr=[g["lr"] * floor for g in optimizer.param_groups])


def _plain(config) -> dict:
    def plain(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(dataclasses.asdict(config))


def restore(setup: Setup) -> Progress:
    """The run's newest intact checkpoint put back (a damaged newer one is named and kept)."""
    path, state = checkpoint.load_latest(Path(setup.config.out), setup.log.line)
    checkpoint.check_compatible(state, path, arch=setup.config.arch,
                                num_classes=setup.model.num_classes)
    progress = checkpoint.restore(state, weights=setup.core, optimizer=setup.optimizer,
                                  scheduler=setup.scheduler, device=setup.device)
    if isinstance(setup.core, HybridAlexNet):  # its dropout stream goes on from this step
        setup.core.draws = progress.step
    setup.log.line(f"resumed from {path} at epoch {progress.epoch + 1}, batch {progress.batch}, "
                   f"step {progress.step}")
    return progress


def snapshot(setup: Setup, progress: Progress, keep: bool = True) -> dict | None:
    return checkpoint.build(model=setup.model, weights=setup.core, optimizer=setup.optimizer,
                            scheduler=setup.scheduler, progress=progress,
                            config=_plain(setup.config), device=setup.device, keep=keep)


# --- one epoch ---------------------------------------------------------------------------------------

class Log:
    """Human lines to stdout and train.log, JSON lines to metrics.jsonl (rank 0 only)."""

    def __init__(self, run_dir: Path, main: bool):
        self.main = main
        self.text = self._open(run_dir / "train.log") if main else None
        self.jsonl = self._open(run_dir / "metrics.jsonl") if main else None

    @staticmethod
    def _open(path: Path):
        try:
            return open(path, "a")
        except OSError as e:
            raise os_error(path, e, "open the log") from None

    @staticmethod
    def _append(f, text: str) -> None:
        """A full disk or a failing one as one line naming the log: the run stops there."""
        try:
            f.write(text)
            f.flush()
        except OSError as e:
            raise UserError(f"{os_error(f.name, e, 'write the log')}; the run's checkpoints are "
                            f"intact (continue with --resume)") from None

    def line(self, msg: str) -> None:
        if self.main:
            print(msg, flush=True)
            self._append(self.text, msg + "\n")

    def record(self, **rec) -> None:
        if self.main:
            self._append(self.jsonl, json.dumps(rec) + "\n")


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signal = signum


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


class StepTimer:
    """The GPU's time in and between training steps, from CUDA events on the compute stream of
    every device a step uses (the towers: two) at each step's start and end. `wait()`: the share
    of its time the busiest device spent between steps, when its stream had nothing to run:
    waiting for the host to enqueue the step, for the loader's batch or for a log point's sync.
    `step_ms()`: the GPU time of a step on the device where it is longest. Together they tell a
    starved GPU (wait) from a slowed one (step time above the synthetic step's). Recording an
    event does not sync; the events are read at log points, which sync anyway. Off CUDA it
    records nothing and reads None. `event`: the event type (torch.cuda.Event); `streams`:
    where each device's events are recorded (default: its current stream, not the current
    device's)."""

    def __init__(self, devices, event=None, streams=None):
        devices = [devices] if isinstance(devices, torch.device) else list(devices)
        cuda = [d for d in devices if d.type == "cuda"]
        streams = streams or [torch.cuda.current_stream(d) for d in cuda]
        event = event or (lambda: torch.cuda.Event(enable_timing=True))
        self.lanes = [_Lane(stream, event) for stream in streams[:len(cuda)]]

    def mark(self) -> None:
        """At a step's start, then at its end."""
        for lane in self.lanes:
            lane.mark()

    def read(self) -> dict:
        """Sums the steps marked so far (every step ended): waits for the last one's end.
        Returns {"gpu_wait", "gpu_step_ms"} of the steps just read, and of the gap before them
        (what a log record of them says), {} off CUDA."""
        new = [lane.read() for lane in self.lanes]
        return _figures(new) if any(steps for steps, _, _ in new) else {}

    def wait(self) -> float | None:
        return _figures([(lane.steps, lane.busy_ms, lane.gap_ms) for lane in self.lanes]).get(
            "gpu_wait")

    def step_ms(self) -> float | None:
        return _figures([(lane.steps, lane.busy_ms, lane.gap_ms) for lane in self.lanes]).get(
            "gpu_step_ms")


def _figures(lanes: list[tuple[int, float, float]]) -> dict:
    """Each device's (steps, busy ms, gap ms) -> the step's time on the device where it is
    longest and the idle share of the least idle device; {} where nothing was recorded."""
    shares = [gap / (gap + busy) for _, busy, gap in lanes if gap + busy > 0]
    times = [busy / steps for steps, busy, _ in lanes if steps]
    return {"gpu_wait": min(shares), "gpu_step_ms": max(times)} if shares and times else {}


class _Lane:
    """One device's stream: its steps' busy time and the gaps between them (StepTimer)."""

    def __init__(self, stream, event):
        self._stream, self._event = stream, event
        self._pending: list = []  # start, end, start, end, ... of steps not read yet
        self._free: list = []     # events read: recorded again, not created per step
        self._last = None         # the end of the last step read: the next gap starts there
        self.steps, self.busy_ms, self.gap_ms = 0, 0.0, 0.0

    def mark(self) -> None:
        e = self._free.pop() if self._free else self._event()
        e.record(self._stream)  # on this device's stream, whichever device is current
        self._pending.append(e)

    def read(self) -> tuple[int, float, float]:
        """(steps, busy ms, gap ms) read now, added to the totals."""
        p = self._pending
        if not p:
            return 0, 0.0, 0.0
        p[-1].synchronize()  # the stream's events complete in order: all of them are done
        busy = gap = 0.0
        if self._last is not None:
            gap += self._last.elapsed_time(p[0])
            self._free.append(self._last)
        for i in range(0, len(p), 2):
            busy += p[i].elapsed_time(p[i + 1])
            if i + 2 < len(p):
                gap += p[i + 1].elapsed_time(p[i + 2])
        steps = len(p) // 2
        self.steps += steps
        self.busy_ms += busy
        self.gap_ms += gap
        self._last = p[-1]
        self._free += p[:-1]
        p.clear()
        return steps, busy, gap


class _Interval:
    """The steps since the last log point, counted on the device: reading them is a sync."""

    def __init__(self, step: int, device):
        self.step = torch.full((), step, device=device)   # the step count, kept on the device
        self.first_bad = torch.full((), -1, device=device)  # step of the first non-finite loss
        self.loss = torch.zeros((), device=device)        # loss sum since the last log record
        self.steps, self.t0 = 0, time.perf_counter()

    def add(self, loss) -> None:
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), self.step,
                                     self.first_bad)
        self.step += 1
        self.loss += loss
        self.steps += 1

    def restart(self, t0: float) -> None:
        self.loss.zero_()
        self.steps, self.t0 = 0, t0


def train_one_epoch(model, optimizer, loader, device: torch.device, progress: Progress,
                    config: TrainConfig, *, log: Log, stop: StopRequest, num_classes: int,
                    ranks: bool, bar=None, devices=None) -> EpochResult:
    """Train `model` over the rest of epoch `progress.epoch`; `progress.step` and
    `progress.batch` advance. ranks: several processes, which agree on a stop. devices: those
    a step runs on (the towers: two), timed on each; default `device`."""
    model.train()
    amp = config.amp and device.type == "cuda"
    channels_last = device.type == "cuda" and config.loader.channels_last
    lr = optimizer.param_groups[0]["lr"]
    interval = _Interval(progress.step, device)
    epoch_loss = torch.zeros((), device=device)
    n_batches, done, wait = loader.source.num_batches(), 0, 0.0
    t_epoch = interval.t0
    timer = StepTimer(devices or [device])
    it = iter(loader)
    while True:
        if config.max_steps and progress.step >= config.max_steps and progress.batch < n_batches:
            return EpochResult(stopped=0, images=done, seconds=time.perf_counter() - t_epoch)
        t0 = time.perf_counter()
        try:
            images, labels, _, _ = next(it)
        except StopIteration:
            break
        wait += time.perf_counter() - t0
        timer.mark()
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        images = input_dtype(images, amp)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        loss = train_step(model, optimizer, images, labels, amp=amp)
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
               interval: _Interval, batch: int, lr: float, bar, timer: StepTimer) -> None:
    """The per-interval record; reading the device values is the interval's one sync point."""
    bad = int(interval.first_bad.item())
    gpu = timer.read()  # CUDA: the interval's GPU idle share and step time
    if bad >= 0:
        raise UserError(f"non-finite loss at step {bad + 1} (epoch {progress.epoch + 1}); "
                        f"training stopped, the last good checkpoint is kept. Try a lower --lr")
    loss = interval.loss.item() / interval.steps
    now = time.perf_counter()
    log.record(kind="step", epoch=progress.epoch + 1, step=progress.step, loss=loss, lr=lr,
               images_per_s=interval.steps * batch / (now - interval.t0), **gpu)
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
            progress = restore(setup) if resume_from is not None else Progress()
            return _epochs(setup, progress)
    finally:
        distributed.shutdown()


def _wrapped(setup: Setup) -> torch.nn.Module:
    """What is called: the checkpointed model, DDP-wrapped and compiled as configured (after
    restore: DDP broadcasts rank 0's weights when it wraps)."""
    model = setup.core
    if setup.mode == "hybrid":  # its own collectives; only the convolutions compile
        if setup.config.compile:
            model.compile_trunk(setup.config.compile_mode)
        return model
    if setup.mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[setup.env.local_rank] if setup.device.type == "cuda" else None)
    if not setup.config.compile:
        return model
    return torch.compile(model, dynamic=False, mode=setup.config.compile_mode)


def _loaders(setup: Setup, progress: Progress):
    """(per-rank loader config, train loader, val loader), reading the data folder no more."""
    cfg, env = setup.config, setup.env
    per_rank = replace(cfg.loader, batch_size=cfg.loader.batch_size // env.world)
    common = dict(rank=env.rank, world=env.world, device=setup.device, norm=setup.model.norm)
    train = make_loader(per_rank, split="train", info=setup.split, lighting=setup.lighting,
                        start_epoch=progress.epoch, start_batch=progress.batch,
                        epochs=_stream_epochs(setup, progress, per_rank.batch_size), **common)
    # the val readers' shared memory comes on top of the train readers' (neither has run yet)
    return per_rank, train, make_loader(per_rank, split="val", shm_reserved=train.shm, **common)


def _stream_epochs(setup: Setup, progress: Progress, batch: int) -> int:
    """Epochs the train readers stream without draining: the rest of the run, which
    --max-steps may end early (nothing is then read past the epoch it ends in)."""
    cfg = setup.config
    epochs = cfg.epochs - progress.epoch
    if cfg.max_steps:
        per_epoch = batches_per_epoch(setup.split.total, batch, train=True,
                                      rank=setup.env.rank, world=setup.env.world) or 1
        todo = progress.batch + max(cfg.max_steps - progress.step, 1)
        epochs = min(epochs, -(-todo // per_epoch))
    return max(epochs, 1)


def _epochs(setup: Setup, progress: Progress) -> dict:
    cfg, env, log, device = setup.config, setup.env, setup.log, setup.device
    if progress.epoch >= cfg.epochs:
        log.line(f"already trained {progress.epoch} epochs (--epochs {cfg.epochs}): nothing to do")
        return {"epoch": progress.epoch, "step": progress.step}
    model = _wrapped(setup)
    per_rank, train_loader, val_loader = _loaders(setup, progress)
    stop, result = StopRequest(), {}
    while progress.epoch < cfg.epochs:
        lr = setup.optimizer.param_groups[0]["lr"]
        bar = _bar(cfg, env, len(train_loader), progress.epoch)
        out = train_one_epoch(model, setup.optimizer, train_loader, device, progress, cfg,
                              log=log, stop=stop, num_classes=setup.model.num_classes,
                              ranks=env.enabled, bar=bar,
                              devices=checkpoint.devices_of(setup.core, device))
        if bar is not None:
            bar.close()
        if out.stopped:
            _save(setup, progress, "interrupt.pt")
            log.line(f"signal {out.stopped}: saved interrupt.pt at epoch {progress.epoch + 1}, "
                     f"batch {progress.batch}; continue with --resume")
            sys.exit(128 + out.stopped)
        if progress.batch < train_loader.source.num_batches():  # --max-steps, mid-epoch
            return _stop_at_max_steps(setup, progress, model, val_loader)
        metrics = evaluate(model, val_loader, device=device, amp=cfg.amp)
        setup.scheduler.step(metrics["top1_err"])
        steps = progress.batch - train_loader.source.skipped(progress.epoch)
        mean_loss = float(out.loss_sum) / max(steps, 1)  # the epoch's one read of it
        images, loss_sum = distributed.all_sum([out.images, mean_loss], device)
        result = {"kind": "epoch", "epoch": progress.epoch + 1, "step": progress.step, "lr": lr,
                  "train_loss": loss_sum / env.world, "train_images": int(images),
                  "images_per_s": images / out.seconds, "data_wait": out.data_wait,
                  "seconds": out.seconds, **metrics}
        if out.gpu_wait is not None:  # CUDA: the GPU's own view of the same epoch
            result.update(gpu_wait=out.gpu_wait, gpu_step_ms=out.gpu_step_ms)
        log.record(**result, **_compiled_graphs(cfg))
        log.line(f"epoch {progress.epoch + 1}/{cfg.epochs} step {progress.step}: train loss "
                 f"{result['train_loss']:.4f} centre-crop top-1 err {metrics['top1_err']:.4f} "
                 f"top-5 err {metrics['top5_err']:.4f} val loss {metrics['val_loss']:.4f} "
                 f"lr {lr:g} {result['images_per_s']:.1f} img/s data-wait {out.data_wait:.1%}"
                 + (f" GPU idle between steps {out.gpu_wait:.1%}, {out.gpu_step_ms:.1f} ms a "
                    f"step" if out.gpu_wait is not None else ""))
        is_best = metrics["top1_err"] < progress.best
        progress.best = min(progress.best, metrics["top1_err"])
        progress.epoch, progress.batch = progress.epoch + 1, 0
        path = _save(setup, progress, f"epoch-{progress.epoch:04d}.pt")
        if env.is_main and is_best:
            checkpoint.mark_best(Path(cfg.out), path)
        signum = distributed.max_over_ranks(stop.signal or 0, device)  # every epoch
        if signum:  # arrived during the epoch's last steps or evaluation, on some rank
            log.line(f"signal {signum}: stopped after epoch {progress.epoch}; continue with "
                     f"--resume")
            sys.exit(128 + signum)
        if cfg.max_steps and progress.step >= cfg.max_steps:
            break
    # the ten-crop readers' shared memory comes on top of the train and val readers' (running)
    return _finish(setup, progress, model, per_rank, result, train_loader.shm + val_loader.shm)


def _stop_at_max_steps(setup: Setup, progress: Progress, model, val_loader) -> dict:
    """--max-steps reached inside an epoch: evaluate, save a resumable interrupt.pt, end."""
    metrics = evaluate(model, val_loader, device=setup.device, amp=setup.config.amp)
    _save(setup, progress, "interrupt.pt")
    setup.log.record(kind="max_steps", epoch=progress.epoch + 1, step=progress.step, **metrics,
                     **_compiled_graphs(setup.config))
    setup.log.line(f"--max-steps {setup.config.max_steps} reached at epoch {progress.epoch + 1}, "
                   f"batch {progress.batch}: centre-crop top-1 err {metrics['top1_err']:.4f}; "
                   f"saved interrupt.pt (continue with --resume)")
    return {"kind": "max_steps", "step": progress.step, **metrics}


def _compiled_graphs(config: TrainConfig) -> dict:
    """With --compile, the graphs torch.compile has made in this process so far (training and
    evaluation each have theirs): a count that grows after the first epoch means a recompile
    per epoch, and past dynamo's cache limit a silent fall back to eager."""
    if not config.compile:
        return {}
    from torch._dynamo.utils import counters
    return {"compiled_graphs": int(counters["stats"]["unique_graphs"])}


def _save(setup: Setup, progress: Progress, name: str) -> Path:
    """Rank 0 writes the checkpoint; the ranks agree on whether it worked (a full disk on rank 0
    must not leave the others waiting in the next collective)."""
    path, error = None, None
    # hybrid: every rank sends its slices of the classifier (a collective); only rank 0 copies
    # the whole to its host
    state = None
    if setup.env.is_main or setup.mode == "hybrid":
        state = snapshot(setup, progress, keep=setup.env.is_main)
    if setup.env.is_main:
        try:
            path = checkpoint.save(Path(setup.config.out), state, name=name,
                                   keep=setup.config.keep)
        except UserError as e:
            error = e
    if distributed.max_over_ranks(int(error is not None), setup.device):
        raise error or UserError(f"rank 0 could not write {name}; see its message")
    return path


def _finish(setup: Setup, progress: Progress, model, per_rank, result: dict,
            shm_reserved: int) -> dict:
    device, env = setup.device, setup.env
    # hybrid: the parameters every rank holds whole (each rank's slices are its own)
    params = getattr(setup.core, "replicated_parameters", setup.core.parameters)()
    checksum = float(sum(p.detach().double().sum().item() for p in params))
    result["ranks_in_sync"] = distributed.same_on_all_ranks(checksum, device)
    if not result["ranks_in_sync"]:
        raise UserError("the ranks' weights differ after training: a DDP fault; do not use this run")
    if setup.config.ten_crop:
        ten = make_loader(per_rank, split="val", rank=env.rank, world=env.world, ten_crop=True,
                          device=device, norm=setup.model.norm, shm_reserved=shm_reserved)
        tc = evaluate(model, ten, device=device, amp=setup.config.amp, ten_crop=True)
        result.update({f"ten_crop_{k}": v for k, v in tc.items()})
        setup.log.record(kind="ten_crop", **tc)
        setup.log.line(f"ten-crop: top-1 err {tc['top1_err']:.4f} top-5 err {tc['top5_err']:.4f}")
    setup.log.record(kind="done", ranks_in_sync=result["ranks_in_sync"], step=progress.step)
    return result


def _bar(config: TrainConfig, env, total: int, epoch: int):
    show = sys.stderr.isatty() if config.progress is None else config.progress
    if not (show and env.is_main):
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step")
