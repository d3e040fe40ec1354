"""Every option of every command, declared once: one frozen dataclass per stage, the choice lists,
and for each field its default (the paper's value unless said), unit and help text.

The command line (alexnet_pipe/cli.py) builds its options from these fields, so a default or a
help text is never typed twice. `opt(...)` attaches the help; `cli=False` keeps a field off the
command line; `csv=True` reads a comma-separated list.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from alexnet_base import resources
from alexnet_base.errors import UserError

ENCODINGS = ("jpeg", "raw")
SPLITS = ("train", "val")
DEVICES = ("auto", "cpu", "gpu")
DTYPES = ("float32", "float16", "bfloat16")
MEAN_MODES = ("pixel", "channel")
LIGHTING_SCALES = ("stdev", "eigval")
ARCHS = ("alexnet", "alexnet-owt")
BIAS_INITS = ("paper", "caffe")
BIAS_RULES = ("author", "uniform")
PARALLEL = ("auto", "none", "ddp", "towers", "hybrid")
EXPORT_FORMATS = ("onnx", "torchvision")
DALI_IMAGES = 128  # images per DALI iteration by default: where its per-iteration costs fade
MIN_CROP = 67  # the smallest crop to train on: both models' pool5 map is empty below it
COMPILE_MODES = ("default", "reduce-overhead")
RESUME = ("no", "yes", "auto")
# What a relaunch of a run may change (train --resume): how long it runs, how often it saves
# and logs, where and how fast it runs (devices, ranks, readers, the parallel mode, compiling).
# Every other option of train is the recipe, the data, the seed or the global batch: another
# run, which --resume auto refuses. The data is compared by its manifest, not its path (each
# node may read a copy of its own).
RELAUNCH_MAY_CHANGE = frozenset({
    "out", "epochs", "save_every", "keep", "log_every", "tensorboard", "max_steps", "ten_crop",
    "resume", "flat_check_steps", "dist_timeout", "progress", "parallel", "tower_devices", "amp",
    "compile", "compile_mode", "deterministic", "loader.data", "loader.device",
    "loader.threads", "loader.readers", "loader.prefetch", "loader.dali_batches",
    "loader.hw_decoder_load", "loader.verify", "loader.channels_last", "loader.dtype"})


def opt(default=None, help: str = "", *, choices=None, cli: bool = True, csv: bool = False,
        required: bool = False, metavar: str | None = None, flag: tuple | None = None):
    """flag=(bare, off): an option given bare means `bare` (--resume: "yes"), a value one of
    `choices` (--resume auto), --no-NAME means `off`."""
    meta = {"help": help, "choices": choices, "cli": cli, "csv": csv, "metavar": metavar,
            "flag": flag}
    if required:
        return field(metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


def _choose(option: str, value, choices) -> None:
    if value not in choices:
        raise UserError(f"--{option} {value}: choose one of {', '.join(choices)}")


def _at_least(option: str, value, low) -> None:
    if value is not None and value < low:
        raise UserError(f"--{option} {value}: must be at least {low}")


def _fraction(option: str, value: float) -> None:
    """0 <= value < 1: a probability that must leave something (dropout), a momentum."""
    if not 0 <= value < 1:
        raise UserError(f"--{option} {value}: must be at least 0 and below 1")


# --- prepare ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrepareConfig:
    imagenet_root: Path = opt(required=True, help="ImageNet as downloaded: a folder holding "
                              "ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and "
                              "ILSVRC2012_devkit_t12.tar.gz (read in place), or Kaggle's "
                              "imagenet-object-localization-challenge.zip; or an extracted tree: "
                              "train/<wnid>/*.JPEG and val/ (class folders, or flat with "
                              "LOC_val_solution.csv or --val-labels).")
    out: Path = opt(required=True, help="Output folder of shards, stats.h5 and manifest.json.")
    size: int = opt(256, "Shorter side and square crop, px (the paper: 256).")
    encoding: str = opt("jpeg", "Shard images as re-encoded JPEG bytes or raw uint8 pixels.",
                        choices=ENCODINGS)
    quality: int = opt(95, "JPEG quality of re-encoded images (jpeg encoding), 1-100.")
    shard_size: int = opt(1024, "Images per shard (about 25 MB of JPEG at 256 px).")
    workers: int = opt(os.cpu_count() or 1, "Worker processes (default: all cores).")
    splits: tuple[str, ...] = opt(SPLITS, "Comma-separated splits to prepare.", csv=True)
    val_labels: Path | None = opt(None, "Flat val/: a file of 'filename wnid' lines.")
    limit_per_class: int | None = opt(None, "Keep at most N images per class (subsets); what "
                                      "is left out is counted in the manifest, not listed.")
    seed: int = opt(0, "Seed of the train shuffle across shards.")
    overwrite: bool = opt(False, "Replace the shards of another run in --out.")
    progress: bool | None = opt(None, cli=False)  # None: a bar only when stderr is a terminal

    def validate(self) -> None:
        _choose("encoding", self.encoding, ENCODINGS)
        if not 1 <= self.quality <= 100:
            raise UserError(f"--quality {self.quality}: must be 1..100")
        _at_least("size", self.size, 8)
        _at_least("shard-size", self.shard_size, 1)
        _at_least("workers", self.workers, 1)
        _at_least("limit-per-class", self.limit_per_class, 1)
        _at_least("seed", self.seed, 0)
        if not self.splits or any(s not in SPLITS for s in self.splits):
            raise UserError(f"--splits {','.join(self.splits)}: choose from {','.join(SPLITS)}")
        if self.val_labels is not None and not Path(self.val_labels).is_file():
            raise UserError(f"--val-labels {self.val_labels}: file not found")


# --- the pipelines ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class AugmentConfig:
    crop: int = opt(224, "Crop size, px: the paper's 224 (conv1 pads 3 px right/bottom) or 227.")
    mean: str = opt("pixel", "Subtract the 256x256 mean image, the same window as the crop "
                    "(the paper), or the RGB mean.", choices=MEAN_MODES)
    divide_std: bool = opt(False, "With --mean channel: also divide by the RGB std.")
    lighting_std: float = opt(0.1, "Sigma of the PCA lighting alphas (the paper); 0 turns it off.")
    lighting_scale: str = opt("stdev", "stdev: sqrt(eigenvalue) on 0-255 (the author's code); "
                              "eigval: eigenvalue of [0,1] pixels (the widely copied form).",
                              choices=LIGHTING_SCALES)
    flip: bool = opt(True, "Random horizontal flips with probability 0.5.")

    def validate(self, size: int) -> None:
        if not 1 <= self.crop <= size:
            raise UserError(f"--crop {self.crop}: must be between 1 and the shard size {size}")
        _choose("mean", self.mean, MEAN_MODES)
        _choose("lighting-scale", self.lighting_scale, LIGHTING_SCALES)
        if self.lighting_std < 0:
            raise UserError(f"--lighting-std {self.lighting_std}: must be >= 0")
        if self.divide_std and self.mean != "channel":
            raise UserError("--divide-std needs --mean channel (the paper's pixel mean has no std)")


def default_readers(gpu: bool, local_world: int = 1) -> tuple[int, int]:
    """(DALI threads, shard readers) per process, from the cores this process may use, shared
    by the `local_world` processes torchrun starts on this machine. Feeding a GPU: about half
    to each, so the training loop's thread never reads. On the CPU every core decodes and
    crops, and the shards are read in the pipeline's own thread (0 readers), which costs that
    thread less than a reader's hand-off would (BENCHMARKS.md)."""
    share = max(2, resources.usable_cores() // max(local_world, 1))
    if gpu:
        return max(1, share // 2), max(1, share - share // 2)
    return share, 0


@dataclass(frozen=True)
class LoaderConfig:
    data: Path = opt(required=True, help="Shard folder (the --out of prepare).")
    batch_size: int = opt(128, "Images per batch. train: the global batch, split evenly over the "
                          "torchrun processes (the paper's 128); other commands: one process.")
    device: str = opt("auto", "Where the pipeline and the model run (auto: GPU when visible).",
                      choices=DEVICES)
    threads: int | None = opt(None, "DALI CPU threads per process (default: half the cores "
                              "available to each local process when it feeds a GPU, all of "
                              "them on the CPU).")
    readers: int | None = opt(None, "Shard readers per pipeline: processes for JPEG shards "
                              "(they hand batches over in /dev/shm: 2 + 2 x readers batches), "
                              "threads for raw shards; 0 reads in the pipeline's own thread "
                              "(default: the other half of those cores when it feeds a GPU; "
                              "0 on the CPU).")
    dtype: str = opt("float32", "Image dtype handed to the model.", choices=DTYPES)
    channels_last: bool = opt(True, "On GPUs: images in channels_last memory (DALI emits HWC; "
                              "no copy), the layout the model then runs in.")
    seed: int = opt(0, "Seed of the data order and the augmentation draws (train also seeds "
                    "the weight initialisation with it).")
    prefetch: int = opt(2, "DALI iterations each pipeline prepares ahead (--dali-batches "
                        "batches each).")
    dali_batches: int | None = opt(None, "Batches DALI prepares in one iteration, handed out "
                                   "one at a time: DALI's cost per iteration (feeding it, "
                                   "waking its threads) weighs on a small batch (default: as "
                                   f"many as make {DALI_IMAGES} images, at least 1).")
    hw_decoder_load: float = opt(0.65, "On GPUs with JPEG decode engines (A100, H100, H200): "
                                 "the share of each batch's JPEGs nvJPEG sends to them, the rest "
                                 "to the CUDA cores (DALI's default); 1 keeps decoding off the "
                                 "cores the training step uses.")
    verify: bool = opt(True, "Before reading: the shards and stats.h5 this command reads "
                       "hashed against the manifest's sha256, at disk speed (a changed byte "
                       "in a raw shard would otherwise be read as pixels); --no-verify where "
                       "`alexnet-pipe verify` just checked the folder.")
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> None:
        _at_least("batch-size", self.batch_size, 1)
        _at_least("seed", self.seed, 0)
        _choose("device", self.device, DEVICES)
        _at_least("threads", self.threads, 1)
        _at_least("readers", self.readers, 0)
        _at_least("prefetch", self.prefetch, 1)
        _at_least("dali-batches", self.dali_batches, 1)
        _choose("dtype", self.dtype, DTYPES)
        if not 0 <= self.hw_decoder_load <= 1:
            raise UserError(f"--hw-decoder-load {self.hw_decoder_load}: must be between 0 and 1")

    def dali_batches_for(self, batch: int) -> int:
        """Batches of `batch` images (this process's) per DALI iteration."""
        return self.dali_batches or max(1, -(-DALI_IMAGES // batch))

    def reader_counts(self, gpu: bool, local_world: int = 1) -> tuple[int, int]:
        """(DALI threads, shard readers) of a pipeline feeding a GPU or not, defaults filled in."""
        threads, readers = default_readers(gpu, local_world)
        return (self.threads or threads), (readers if self.readers is None else self.readers)


# --- train -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    loader: LoaderConfig
    out: Path = opt(required=True, help="Run directory (config, logs, checkpoints).")
    epochs: int = opt(90, "Passes over the train split (the paper: about 90).")
    lr: float = opt(0.01, "Initial learning rate (the paper).")
    momentum: float = opt(0.9, "SGD momentum (the paper).")
    weight_decay: float = opt(5e-4, "Weight decay of the weights (the paper).")
    bias_rule: str = opt("author", "author: biases get twice the learning rate and no weight "
                         "decay (cuda-convnet2, Caffe); uniform: biases are treated as weights.",
                         choices=BIAS_RULES)
    lr_factor: float = opt(0.1, "Learning-rate multiplier at each drop (the paper: /10).")
    lr_patience: int = opt(2, "Drop the learning rate after this many epochs in a row whose "
                           "centre-crop val top-1 error did not improve.")
    max_lr_drops: int = opt(3, "Drops at most (the paper: 3).")
    arch: str = opt("alexnet", "The paper's two towers, or torchvision's one tower.",
                    choices=ARCHS)
    bias_init: str = opt("paper", "Biases of conv2/4/5 and fc6/7: 1 (paper) or 0.1 (Caffe).",
                         choices=BIAS_INITS)
    dropout: float = opt(0.5, "Dropout of fc6 and fc7 (the paper).")
    parallel: str = opt("auto", "auto: ddp under torchrun with several processes, else none; "
                        "towers: the paper's model parallelism over --tower-devices; hybrid "
                        "(under torchrun): convolutions data-parallel, fc6/fc7 split across "
                        "the ranks (Krizhevsky 2014).",
                        choices=PARALLEL)
    tower_devices: tuple[str, ...] = opt(("cuda:0", "cuda:1"), "Devices of tower A and tower B "
                                         "with --parallel towers.", csv=True)
    amp: bool = opt(True, "bf16 autocast on GPUs.")
    compile: bool = opt(False, "torch.compile the model (a one-off compile at the start, one "
                        "graph per batch shape).")
    compile_mode: str = opt("default", "With --compile: default, or reduce-overhead (CUDA "
                            "graphs: each step one launch, for small batches on GPUs).",
                            choices=COMPILE_MODES)
    deterministic: bool = opt(False, "Deterministic cuDNN algorithms: a resumed GPU run repeats "
                              "an uninterrupted one exactly, at some speed; by default cuDNN "
                              "picks the fastest (benchmark mode, not bit-reproducible).")
    resume: str = opt("no", "--resume: continue the run in --out from its newest intact "
                      "checkpoint. --resume auto: continue it if it has one, start it if not "
                      "(the same command after any restart: torchrun --max-restarts, a "
                      "requeued job); it refuses a run folder whose run had other options. A "
                      "relaunch may change " + ", ".join(sorted(
                          "--" + name.split(".")[-1].replace("_", "-")
                          for name in RELAUNCH_MAY_CHANGE if name not in ("resume", "out")))
                      + " and the number of ranks; the recipe, the data (its manifest), the "
                      "seed and the global batch stay.",
                      choices=RESUME, flag=("yes", "no"), metavar="[auto]")
    save_every: int | None = opt(None, "Also a resumable checkpoint every N optimiser steps, "
                                 "mid-epoch (step-NNNNNNNN.pt, the last --keep kept): the step "
                                 "waits for the state's copy off the device only, the file is "
                                 "written in the background.")
    keep: int = opt(3, "Epoch checkpoints kept (best.pt is kept besides).")
    log_every: int = opt(10, "Steps between log records (each is a CPU-GPU sync point).")
    tensorboard: bool = opt(True, "TensorBoard's event files in --out (tensorboard --logdir "
                            "OUT/..): the log's numbers at its records, the first train batch "
                            "as the model sees it, conv1's filters at each epoch's end, the "
                            "options.")
    flat_check_steps: int = opt(300, "Warn if the loss is still ln(classes) after this many steps.")
    ten_crop: bool = opt(False, "A ten-crop evaluation after the last epoch.")
    max_steps: int | None = opt(None, "Stop after this many steps in all (smoke runs): evaluate, "
                                "save a resumable interrupt.pt, exit 0.")
    dist_timeout: float = opt(600.0, "Seconds a collective may wait for the other ranks before "
                              "the process ends with an error (a rank that died).")
    progress: bool | None = opt(None, cli=False)  # None: a bar when stderr is a terminal

    def validate(self) -> None:
        self.loader.validate()
        _at_least("epochs", self.epochs, 1)
        if self.lr <= 0:
            raise UserError(f"--lr {self.lr}: must be positive")
        _fraction("momentum", self.momentum)
        _at_least("weight-decay", self.weight_decay, 0)
        _fraction("dropout", self.dropout)
        if not 0 < self.lr_factor <= 1:
            raise UserError(f"--lr-factor {self.lr_factor}: must be above 0 and at most 1 "
                            f"(each drop multiplies the learning rate by it)")
        _at_least("flat-check-steps", self.flat_check_steps, 1)
        _choose("arch", self.arch, ARCHS)
        _choose("bias-init", self.bias_init, BIAS_INITS)
        _choose("bias-rule", self.bias_rule, BIAS_RULES)
        _choose("parallel", self.parallel, PARALLEL)
        _choose("compile-mode", self.compile_mode, COMPILE_MODES)
        if self.loader.augment.crop < MIN_CROP:
            raise UserError(f"--crop {self.loader.augment.crop}: the model needs at least "
                            f"{MIN_CROP} px (smaller crops leave its pool5 map empty)")
        if self.parallel in ("towers", "hybrid") and self.arch != "alexnet":
            raise UserError(f"--parallel {self.parallel} needs --arch alexnet (the paper's "
                            f"network)")
        if len(self.tower_devices) != 2:
            raise UserError(f"--tower-devices {','.join(self.tower_devices)}: give two devices")
        _at_least("lr-patience", self.lr_patience, 1)
        _at_least("max-lr-drops", self.max_lr_drops, 0)
        _at_least("keep", self.keep, 1)
        _at_least("log-every", self.log_every, 1)
        _at_least("max-steps", self.max_steps, 1)
        _at_least("save-every", self.save_every, 1)
        _choose("resume", self.resume, RESUME)
        if self.dist_timeout <= 0:
            raise UserError(f"--dist-timeout {self.dist_timeout}: must be positive")


# --- benchmarks and checkpoints ----------------------------------------------------------------------

@dataclass(frozen=True)
class BenchConfig:
    loader: LoaderConfig
    batches: int = opt(20, "Timed batches per repeat.")
    seconds: float | None = opt(None, "Time each repeat for this many seconds instead.")
    repeats: int = opt(3, "Timed repeats; the median is reported.")
    warmup: int = opt(5, "Untimed batches first (worker start, first decode, allocations).")
    compare_model: bool = opt(False, "Also time AlexNet train steps on synthetic input.")
    baseline: bool = opt(False, "Also time a torch DataLoader doing the same work.")

    def validate(self) -> None:
        self.loader.validate()
        _at_least("batches", self.batches, 1)
        if self.seconds is not None and self.seconds <= 0:
            raise UserError(f"--seconds {self.seconds}: must be positive")
        _at_least("repeats", self.repeats, 1)
        _at_least("warmup", self.warmup, 0)


@dataclass(frozen=True)
class EvalConfig:
    loader: LoaderConfig
    checkpoint: Path = opt(required=True, help="A checkpoint written by train.")
    ten_crop: bool = opt(False, "The paper's ten-crop test-time augmentation.")
    compile: bool = opt(False, "torch.compile the model (one graph per batch shape).")
    probabilities: Path | None = opt(None, "Also write each val image's class probabilities "
                                     "to this .npz: index (the image's position in the val "
                                     "split), probs (images x classes, float32; ten crops: "
                                     "their mean).")


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: Path = opt(required=True, help="A checkpoint written by train.")
    out: Path = opt(required=True, help="The file to write (model.onnx, alexnet.pth).")
    format: str = opt("onnx", "onnx: one graph, uint8 NHWC images of the shard size in, class "
                      "probabilities out, the crop and normalisation inside; torchvision: "
                      "a state dict for torchvision.models.alexnet (--arch alexnet-owt runs).",
                      choices=EXPORT_FORMATS)
    ten_crop: bool = opt(False, "onnx: the paper's ten crops averaged, instead of the centre "
                         "crop.")

    def validate(self) -> None:
        if self.format not in EXPORT_FORMATS:
            raise UserError(f"--format {self.format}: one of {', '.join(EXPORT_FORMATS)}")
