"""TensorBoard while a run trains: event files in the run folder (`tensorboard --logdir runs/`
shows each run folder as one run), written by rank 0 through torch's SummaryWriter.

What it shows is what the log records, nothing measured apart: every number of a `step`,
`epoch` or `max_steps` record of metrics.jsonl becomes the scalar `KIND/FIELD` at the record's
step (step/loss, step/lr, step/images_per_s, step/data_wait; epoch/top1_err, epoch/top5_err,
epoch/val_loss, ...). Pictures: `preview`'s picture of the launch's first train batch as the
model sees it, at the first step it trains; `filters`' picture of conv1 at each epoch's end.
The resolved options as text at each launch.

A relaunch purges the steps after the one it resumes from (the SummaryWriter's purge_step,
which TensorBoard's reader applies), as metrics.jsonl drops their records: the curves read as
one run, each step once. The values are host numbers the log point has read already: the
board adds no CPU-GPU sync to a step; its writer thread does the file writes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SCALAR_KINDS = ("step", "epoch", "max_steps")  # the records whose numbers are curves
BATCH_IMAGES = 8   # of the launch's first batch shown, as `preview` shows by default
FLUSH_SECONDS = 30  # a curve shows the run within this many seconds, one write a flush


class Board:
    def __init__(self, run_dir: Path, first_step: int):
        """Event files in `run_dir`, steps from `first_step` on (those at and after it that an
        earlier launch wrote are purged)."""
        from torch.utils.tensorboard import SummaryWriter
        self.first_step = first_step
        self.writer = SummaryWriter(str(run_dir), purge_step=first_step,
                                    flush_secs=FLUSH_SECONDS)

    def record(self, rec: dict) -> None:
        """A log record's numbers as scalars at its step (other kinds: nothing)."""
        if rec.get("kind") not in SCALAR_KINDS:
            return
        for field, value in rec.items():
            if field in ("kind", "step", "epoch") or isinstance(value, bool) or not isinstance(
                    value, (int, float)):
                continue
            self.writer.add_scalar(f"{rec['kind']}/{field}", value, rec["step"])

    def picture(self, tag: str, image, step: int) -> None:
        """A PIL image (RGB)."""
        self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def batch(self, loader, images, norm, epoch: int, batch: int, step: int) -> None:
        """`preview`'s picture of this rank's batch `batch` of `epoch` (its first BATCH_IMAGES
        images), at the step that trains it."""
        from alexnet_pipe.viz import batch_picture
        self.picture("train/batch", batch_picture(loader, images, norm, epoch, batch,
                                                  n=BATCH_IMAGES), step)

    def filters(self, weight, step: int) -> None:
        """`filters`' picture of conv1's kernels (a tensor, whole: the towers' halves joined)."""
        from alexnet_pipe.viz import filters_picture
        self.picture("conv1/filters", filters_picture(weight.detach().float().cpu().numpy()),
                     step)

    def text(self, tag: str, value: dict, step: int) -> None:
        """A JSON object, shown as a code block (TensorBoard renders text as Markdown)."""
        block = "\n".join("    " + line for line in json.dumps(value, indent=2).splitlines())
        self.writer.add_text(tag, block, step)

    def close(self) -> None:
        self.writer.close()
