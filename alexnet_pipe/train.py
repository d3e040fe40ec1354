"""`alexnet-pipe train`: the paper's recipe, fed by the DALI pipelines, safe to interrupt.

SGD with momentum 0.9 and weight decay 5e-4, global batch 128, lr 0.01 divided by 10 when the
validation error stops improving (at most 3 times), 90 epochs. The update is torch's SGD
(v = m*v + g; w -= lr*v), not the paper's (v = m*v - lr*g; w += v): the two are the same while
the learning rate is constant and differ only in the steps right after a drop.

A run directory describes itself:
    RUN/config.json        the resolved options and the version
    RUN/metrics.jsonl      one JSON line every --log-every steps ("step") and per epoch ("epoch")
    RUN/train.log          the same, for people
    RUN/checkpoints/       see checkpoint.py
"""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from alexnet_pipe import __version__, augment, checkpoint, distributed
from alexnet_pipe.model import ARCHS, BIAS_INITS, TowerAlexNet, build_model, count_parameters
from alexnet_pipe.pipeline import LoaderConfig, make_loader, resolve_device
from alexnet_pipe.reader import load_split, load_stats
from preprocessing.errors import UserError

PARALLEL = ("auto", "none", "ddp", "towers")


@dataclass(frozen=True)
class TrainConfig:
    loader: LoaderConfig            # batch_size here is the global batch
    out: Path
    epochs: int = 90                # the paper: about 90 passes
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_factor: float = 0.1          # divide by 10 ...
    lr_patience: int = 1            # ... when val top-1 error has not improved for this many epochs
    max_lr_drops: int = 3           # ... at most 3 times (the paper)
    arch: str = "alexnet"
    bias_init: str = "paper"        # "caffe": 0.1 instead of 1 (when the loss stays at ln(C))
    dropout: float = 0.5
    parallel: str = "auto"          # auto: ddp under torchrun with several processes, else none
    tower_devices: tuple[str, str] = ("cuda:0", "cuda:1")
    amp: bool = True                # bf16 autocast on GPUs
    channels_last: bool = True      # on GPUs
    compile: bool = False           # torch.compile the model
    resume: bool = False
    keep: int = 3                   # epoch checkpoints kept
    log_every: int = 10             # steps between step records (each is a CPU-GPU sync point)
    flat_check_steps: int = 300     # warn if the loss is still ln(C) after this many steps
    ten_crop: bool = False          # a ten-crop evaluation after the last epoch
    progress: bool | None = None    # None: a bar when stderr is a terminal (rank 0)

    def validate(self) -> None:
        if self.epochs < 1:
            raise UserError(f"--epochs {self.epochs}: must be at least 1")
        if self.lr <= 0:
            raise UserError(f"--lr {self.lr}: must be positive")
        if self.arch not in ARCHS:
            raise UserError(f"--arch {self.arch}: choose one of {', '.join(ARCHS)}")
        if self.bias_init not in BIAS_INITS:
            raise UserError(f"--bias-init {self.bias_init}: choose one of {', '.join(BIAS_INITS)}")
        if self.parallel not in PARALLEL:
            raise UserError(f"--parallel {self.parallel}: choose one of {', '.join(PARALLEL)}")
        if self.parallel == "towers" and self.arch != "alexnet":
            raise UserError("--parallel towers needs --arch alexnet (the two-tower network)")
        if self.keep < 1 or self.log_every < 1:
            raise UserError("--keep and --log-every must be at least 1")


# --- setup ---------------------------------------------------------------------------------------

def _parallel_mode(config: TrainConfig, env: distributed.DistEnv) -> str:
    mode = config.parallel
    if mode == "auto":
        mode = "ddp" if env.enabled else "none"
    if mode == "towers" and env.enabled:
        raise UserError("--parallel towers runs in one process; launch it without torchrun")
    if mode == "ddp" and not env.enabled:
        raise UserError("--parallel ddp: launch with torchrun --nproc_per_node N (one process "
                        "per GPU), or leave --parallel at auto")
    return mode


def build_training_model(config: TrainConfig, num_classes: int, mode: str, device):
    """(model to train, module whose grouped state dict is checkpointed, its input device)."""
    crop = config.loader.augment.crop
    model = build_model(config.arch, num_classes, crop, config.bias_init, config.dropout)
    if mode == "towers":
        towers = TowerAlexNet(num_classes, crop, config.dropout, config.tower_devices)
        towers.load_grouped_state_dict(model.state_dict())
        return towers, towers, towers.devices[0]
    model = model.to(device)
    if device.type == "cuda" and config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, model, device


def grouped_state(core) -> dict:
    return core.grouped_state_dict() if isinstance(core, TowerAlexNet) else core.state_dict()


def load_grouped_state(core, state: dict) -> None:
    if isinstance(core, TowerAlexNet):
        core.load_grouped_state_dict(state)
    else:
        core.load_state_dict(state)


class Log:
    """Human lines to stdout and train.log, JSON lines to metrics.jsonl (rank 0 only)."""

    def __init__(self, run_dir: Path, main: bool):
        self.main = main
        self.text = open(run_dir / "train.log", "a") if main else None
        self.jsonl = open(run_dir / "metrics.jsonl", "a") if main else None

    def line(self, msg: str) -> None:
        if self.main:
            print(msg, flush=True)
            self.text.write(msg + "\n")
            self.text.flush()

    def record(self, **rec) -> None:
        if self.main:
            self.jsonl.write(json.dumps(rec) + "\n")
            self.jsonl.flush()


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signal = signum


# --- one epoch -----------------------------------------------------------------------------------

def train_one_epoch(model, loader, optimizer, *, device, amp: bool, epoch: int, step: int,
                    log: Log, config: TrainConfig, stop: StopRequest, num_classes: int,
                    lr: float, bar=None) -> dict:
    model.train()
    use_amp = amp and device.type == "cuda"
    first_bad = torch.tensor(-1, device=device)  # step of the first non-finite loss, on device
    loss_sum = torch.zeros((), device=device)    # since the last log record
    epoch_loss = torch.zeros((), device=device)  # over the epoch
    done = 0
    wait = 0.0
    t_epoch = t_log = time.perf_counter()
    n_log = 0
    it = iter(loader)
    batch_index = loader.source.skipped(epoch)
    n_batches = loader.source.num_batches(epoch)
    while True:
        if stop.signal is not None and batch_index < n_batches:  # else: finish, then checkpoint
            return {"stopped": True, "batch": batch_index, "step": step, "done": done}
        t0 = time.perf_counter()
        try:
            images, labels, _, _ = next(it)
        except StopIteration:
            break
        wait += time.perf_counter() - t0  # time the step waited for the loader
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if device.type == "cuda" and config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = F.cross_entropy(model(images).float(), labels)
        finite = torch.isfinite(loss.detach())
        first_bad = torch.where((first_bad < 0) & ~finite, torch.tensor(step, device=device),
                                first_bad)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
        epoch_loss += loss.detach()
        step += 1
        batch_index += 1
        done += len(labels)
        n_log += 1
        if bar is not None:
            bar.update(1)
        if step % config.log_every == 0 or batch_index == n_batches:
            bad = int(first_bad.item())  # a CPU-GPU sync point, once per log interval
            if bad >= 0:
                raise UserError(f"non-finite loss at step {bad} (epoch {epoch + 1}); training "
                                f"stopped, the last good checkpoint is kept. Try a lower --lr")
            mean_loss = loss_sum.item() / n_log
            now = time.perf_counter()
            log.record(kind="step", epoch=epoch + 1, step=step, loss=mean_loss, lr=lr,
                       images_per_s=n_log * len(labels) / (now - t_log))
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.3f}")
            _warn_if_flat(step, mean_loss, num_classes, config, log)
            loss_sum.zero_()
            t_log, n_log = now, 0
    seconds = time.perf_counter() - t_epoch
    steps = batch_index - loader.source.skipped(epoch)
    return {"stopped": False, "step": step, "done": done, "seconds": seconds,
            "train_loss": epoch_loss.item() / max(steps, 1),
            "data_wait": wait / seconds if seconds > 0 else 0.0}


def _warn_if_flat(step: int, loss: float, num_classes: int, config: TrainConfig, log: Log) -> None:
    if step >= config.flat_check_steps and step - config.log_every < config.flat_check_steps:
        chance = math.log(num_classes)
        if abs(loss - chance) < 0.02 * chance:
            log.line(f"WARNING: after {step} steps the loss ({loss:.4f}) has not moved from "
                     f"ln({num_classes}) = {chance:.4f}; the paper's bias initialisation is known "
                     f"to stall like this: try --bias-init caffe (biases 0.1)")


@torch.no_grad()
def evaluate(model, loader, *, device, amp: bool, ten_crop: bool = False) -> dict:
    """Top-1 and top-5 error over the rank's share, summed over ranks; padding masked out."""
    model.eval()
    use_amp = amp and device.type == "cuda"
    counts = [0.0, 0.0, 0.0, 0.0]  # images, top-1 correct, top-5 correct, loss sum
    for images, labels, valid, _ in loader:
        images, labels, valid = (t.to(device) for t in (images, labels, valid))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            if ten_crop:  # (B, 10, C, H, W): the paper averages the ten softmax outputs
                b = images.shape[0]
                probs = F.softmax(model(images.flatten(0, 1)).float(), 1).view(b, 10, -1).mean(1)
                logits = probs.log()
            else:
                logits = model(images).float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top5 == labels[:, None]
        counts[0] += valid.sum().item()
        counts[1] += (hit[:, 0] & valid).sum().item()
        counts[2] += (hit.any(1) & valid).sum().item()
        counts[3] += (F.cross_entropy(logits, labels, reduction="none") * valid).sum().item()
    n, top1, top5, loss = distributed.all_sum(counts, device)
    return {"images": int(n), "top1_err": 1 - top1 / n, "top5_err": 1 - top5 / n,
            "val_loss": loss / n}


# --- the run -------------------------------------------------------------------------------------

def _config_json(config: TrainConfig) -> dict:
    def plain(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(asdict(config))


def _scheduler(optimizer, config: TrainConfig):
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=config.lr_factor, patience=config.lr_patience,
        threshold=1e-4, min_lr=config.lr * config.lr_factor ** config.max_lr_drops)


def run(config: TrainConfig) -> dict:
    config.validate()
    env = distributed.from_environment()
    gpu = resolve_device(config.loader.device) == "gpu"
    mode = _parallel_mode(config, env)
    device = torch.device(f"cuda:{env.local_rank}" if gpu else "cpu")
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
    distributed.init(env, gpu)
    try:
        return _run(config, env, mode, device, run_dir, resume_from)
    finally:
        distributed.shutdown()


def _run(config, env, mode, device, run_dir, resume_from) -> dict:
    split = load_split(config.loader.data, "train")
    config.loader.validate()
    config.loader.augment.validate(split.size)  # before anything is written
    num_classes = split.num_classes
    stats = load_stats(config.loader.data, split)
    state = None
    if resume_from is not None:
        state = checkpoint.load(resume_from)
        checkpoint.check_compatible(state, resume_from, arch=config.arch, num_classes=num_classes)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(  # resolved: parallel is never "auto"
            {**_config_json(config), "version": __version__, "parallel": mode,
             "world_size": env.world}, indent=2) + "\n")
    distributed.barrier()
    log = Log(run_dir, env.is_main)
    torch.manual_seed(config.loader.seed)
    model, core, in_device = build_training_model(config, num_classes, mode, device)
    n_params = count_parameters(core)
    at_1000 = n_params + (1000 - num_classes) * 4097  # the last layer is 4096 x classes + bias
    log.line(f"{config.arch}: {n_params:,} parameters ({at_1000:,} at 1000 classes), "
             f"{num_classes} classes, parallel={mode}, world={env.world}, device={device.type}")
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = _scheduler(optimizer, config)
    start_epoch, start_batch, step, best = 0, 0, 0, float("inf")
    if state is not None:
        load_grouped_state(core, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, start_batch, step = state["epoch"], state["batch"], state["step"]
        best = state["best_top1_err"]
        torch.set_rng_state(state["rng"]["torch"])
        log.line(f"resumed from {resume_from} at epoch {start_epoch + 1}, batch {start_batch}, "
                 f"step {step}")
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.local_rank] if device.type == "cuda" else None)
    if config.compile:
        model = torch.compile(model)
    per_rank = replace(config.loader, batch_size=config.loader.batch_size // env.world)
    if start_epoch >= config.epochs:
        log.line(f"already trained {start_epoch} epochs (--epochs {config.epochs}): nothing to do")
        return {"epoch": start_epoch, "step": step}
    train_loader = make_loader(per_rank, split="train", rank=env.rank, world=env.world,
                               start_epoch=start_epoch, start_batch=start_batch,
                               device_id=env.local_rank if device.type == "cuda" else None,
                               info=split, stats=stats)  # read once, above
    val_loader = make_loader(per_rank, split="val", rank=env.rank, world=env.world,
                             device_id=env.local_rank if device.type == "cuda" else None,
                             stats=stats)
    mean, std = augment.mean_terms(stats, config.loader.augment)
    common = {"arch": config.arch, "num_classes": num_classes,
              "crop": config.loader.augment.crop, "class_names": list(split.class_names),
              "config": _config_json(config), "version": __version__,
              "normalization": {"mean": torch.as_tensor(np.asarray(mean), dtype=torch.float32),
                                "std": torch.as_tensor(np.asarray(std), dtype=torch.float32)}}

    def snapshot(epoch: int, batch: int) -> dict:
        return {**common, "model": grouped_state(core), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "batch": batch,
                "step": step, "best_top1_err": best, "rng": {"torch": torch.get_rng_state()}}

    stop = StopRequest()
    result = {}
    for epoch in range(start_epoch, config.epochs):
        lr = optimizer.param_groups[0]["lr"]
        bar = _bar(config, env, len(train_loader), epoch)
        out = train_one_epoch(model, train_loader, optimizer, device=in_device, amp=config.amp,
                              epoch=epoch, step=step, log=log, config=config, stop=stop,
                              num_classes=num_classes, lr=lr, bar=bar)
        if bar is not None:
            bar.close()
        step = out["step"]
        if out["stopped"]:
            if env.is_main:
                path = checkpoint.save(run_dir, snapshot(epoch, out["batch"]), name="interrupt.pt")
                log.line(f"signal {stop.signal}: saved {path} at epoch {epoch + 1}, batch "
                         f"{out['batch']}; continue with --resume")
            distributed.barrier()
            sys.exit(128 + stop.signal)
        metrics = evaluate(model, val_loader, device=in_device, amp=config.amp)
        scheduler.step(metrics["top1_err"])
        images, loss_sum = distributed.all_sum([out["done"], out["train_loss"]], device)
        out["train_loss"] = loss_sum / env.world  # the mean over ranks
        result = {"kind": "epoch", "epoch": epoch + 1, "step": step, "lr": lr,
                  "train_loss": out["train_loss"], "train_images": int(images), "images_per_s": images / out["seconds"],
                  "data_wait": out["data_wait"], "seconds": out["seconds"], **metrics}
        log.record(**result)
        log.line(f"epoch {epoch + 1}/{config.epochs} step {step}: train loss "
                 f"{out['train_loss']:.4f} top-1 err "
                 f"{metrics['top1_err']:.4f} top-5 err {metrics['top5_err']:.4f} val loss "
                 f"{metrics['val_loss']:.4f} lr {lr:g} {result['images_per_s']:.1f} img/s "
                 f"data-wait {out['data_wait']:.1%}")
        is_best = metrics["top1_err"] < best
        best = min(best, metrics["top1_err"])
        if env.is_main:
            path = checkpoint.save(run_dir, snapshot(epoch + 1, 0), name=f"epoch-{epoch + 1:04d}.pt",
                                   keep=config.keep)
            if is_best:
                checkpoint.mark_best(run_dir, path)
        distributed.barrier()
        if stop.signal is not None:  # arrived during the epoch's last step or evaluation
            log.line(f"signal {stop.signal}: stopped after epoch {epoch + 1}; continue with "
                     f"--resume")
            sys.exit(128 + stop.signal)
    checksum = float(sum(p.detach().double().sum().item() for p in core.parameters()))
    result["ranks_in_sync"] = distributed.same_on_all_ranks(checksum, device)
    if not result["ranks_in_sync"]:
        raise UserError("the ranks' weights differ after training: a DDP fault; do not use this run")
    if config.ten_crop:
        ten = make_loader(per_rank, split="val", rank=env.rank, world=env.world, ten_crop=True,
                          device_id=env.local_rank if device.type == "cuda" else None)
        tc = evaluate(model, ten, device=in_device, amp=config.amp, ten_crop=True)
        result.update({f"ten_crop_{k}": v for k, v in tc.items()})
        log.record(kind="ten_crop", **tc)
        log.line(f"ten-crop: top-1 err {tc['top1_err']:.4f} top-5 err {tc['top5_err']:.4f}")
    log.record(kind="done", ranks_in_sync=result["ranks_in_sync"], step=step)
    return result


def _bar(config: TrainConfig, env, total: int, epoch: int):
    show = sys.stderr.isatty() if config.progress is None else config.progress
    if not (show and env.is_main):
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step")

