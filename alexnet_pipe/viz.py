"""Pictures: a train batch as the model sees it (`preview`), training curves (`plot`), and the
conv1 kernels as the paper's Figure 3 (`filters`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from alexnet_base.errors import UserError
from alexnet_base.files import write_output
from alexnet_pipe import augment

PIL_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
PLOT_FORMATS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".pdf": "pdf", ".svg": "svg"}


def save_picture(out: Path, formats: dict, write) -> Path:
    """write(temporary path, format) under `out`'s final name only when complete. A suffix
    outside `formats` ({suffix: format}) or an OS error is one line naming --out."""
    out = Path(out)
    fmt = formats.get(out.suffix.lower())
    if fmt is None:
        raise UserError(f"--out {out}: a picture is written as {', '.join(sorted(formats))}; "
                        f"end the name with one of them")
    return write_output(out, lambda tmp: write(tmp, fmt), what="picture")


def preview_grid(config, out: Path) -> Path:
    """PNG: each original shard image of a train batch (config.batch_size of them) beside its
    augmented crop, the normalisation undone."""
    from alexnet_pipe import distributed
    from alexnet_pipe.prepared import open_shards
    data = open_shards(config.data, ("train",), verify=config.verify)
    loader = data.loader("train", config, device=distributed.device(config.device))
    picture = batch_picture(loader, next(iter(loader)).images, data.normalization(config.augment))
    return save_picture(out, PIL_FORMATS, lambda tmp, fmt: picture.save(tmp, format=fmt))


def batch_picture(loader, images, norm, epoch: int = 0, batch: int = 0,
                  n: int | None = None) -> Image.Image:
    """The first n (default all) images of this rank's train batch `batch` of `epoch` as the
    model sees them (`images`, the loader's output for it; normalised with `norm`), each
    beside its shard original with the crop's window framed in red."""
    n = len(images) if n is None else min(n, len(images))
    plan, reader = loader.plan, loader.source.reader
    idx, _ = plan.batch_indices(epoch, batch)
    originals, _ = reader.read(idx[:n])
    p = plan.params(epoch, batch, len(images))
    seen_all = images[:n].float().cpu().numpy().transpose(0, 2, 3, 1)  # one copy to the host
    mean, std = norm.mean, norm.std
    size, crop, pad = plan.size, plan.augment.crop, 8
    cols = 2
    canvas = Image.new("RGB", (cols * (size + crop + 3 * pad), -(-n // cols) * (size + pad) + pad),
                       (255, 255, 255))
    for i in range(n):
        original = originals[i]
        if original.ndim == 1:
            from preprocessing.resize import decode_jpeg
            original = decode_jpeg(original.tobytes())
        x, y, flip = int(p["x"][i]), int(p["y"][i]), bool(p["flip"][i])
        m = augment.crop_flip(mean, x, y, crop, flip) if norm.per_pixel else mean
        seen = np.clip(seen_all[i] * std + m, 0, 255).astype(np.uint8)
        r, c = divmod(i, cols)
        left, top = c * (size + crop + 3 * pad) + pad, r * (size + pad) + pad
        canvas.paste(Image.fromarray(original), (left, top))
        canvas.paste(Image.fromarray(seen), (left + size + pad, top + (size - crop) // 2))
        ImageDraw.Draw(canvas).rectangle((left + x, top + y, left + x + crop, top + y + crop),
                                         outline=(255, 0, 0))
    return canvas


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """PNG of a run's curves: train loss per logged step; top-1/top-5 error and lr per epoch."""
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: not found; is {run_dir} a run directory of `alexnet-pipe train`?")
    records, n = [], 0
    try:
        for n, line in enumerate(path.read_bytes().decode(errors="strict").splitlines(), 1):
            if line.strip():
                records.append(json.loads(line))
                if not isinstance(records[-1], dict):
                    raise ValueError("not a record")
    except ValueError as e:  # not UTF-8 (then n is 0: the file as a whole), not JSON
        raise UserError(f"{path}: {f'line {n}' if n else 'its text'} is damaged ({e}); train "
                        f"writes one JSON record a line") from None
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    fields = {"step": ("step", "loss"), "epoch": ("epoch", "top1_err", "top5_err", "lr")}
    for r in steps + epochs:
        if not all(isinstance(r.get(k), (int, float)) for k in fields[r["kind"]]):
            raise UserError(f"{path}: a {r['kind']} record without its numbers ({r}); the file "
                            f"is damaged")
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1)
    a.set(xlabel="step", ylabel="train loss", title="training loss")
    e = [r["epoch"] for r in epochs]
    b.plot(e, [r["top1_err"] for r in epochs], "o-", label="top-1 error")
    b.plot(e, [r["top5_err"] for r in epochs], "s-", label="top-5 error")
    b.set(xlabel="epoch", ylabel="validation error", ylim=(0, 1), title="validation (centre crop)")
    b.legend(loc="upper right")
    if epochs:
        lr = b.twinx()
        lr.step(e, [r["lr"] for r in epochs], where="post", color="grey", ls=":")
        lr.set_yscale("log")
        lr.set_ylabel("learning rate")
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    try:
        return save_picture(out, PLOT_FORMATS,
                            lambda tmp, fmt: fig.savefig(tmp, format=fmt, dpi=100))
    finally:
        plt.close(fig)


def draw_checkpoint_filters(checkpoint_path: Path, out: Path) -> Path:
    """conv1_filters of a checkpoint's first layer (either architecture)."""
    import torch

    from alexnet_pipe import checkpoint
    model, _ = checkpoint.load_model(checkpoint_path, torch.device("cpu"))
    conv1 = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    return conv1_filters(conv1.weight.detach().float().numpy(), out)


def conv1_filters(weight: np.ndarray, out: Path, scale: int = 4) -> Path:
    """filters_picture written to `out`."""
    picture = filters_picture(weight, scale)
    return save_picture(out, PIL_FORMATS, lambda tmp, fmt: picture.save(tmp, format=fmt))


def filters_picture(weight: np.ndarray, scale: int = 4) -> Image.Image:
    """The paper's Figure 3: conv1's 96 kernels (96, 3, 11, 11), 48 a row block per tower."""
    n = weight.shape[0]
    towers = 2 if n == 96 else 1
    per_tower = n // towers
    cols = 16 if per_tower % 16 == 0 else 8
    rows = -(-per_tower // cols)
    k, gap = weight.shape[-1] * scale, 2
    canvas = Image.new("RGB", (cols * (k + gap) + gap,
                               towers * (rows * (k + gap) + 3 * gap)), (255, 255, 255))
    for i in range(n):
        t, j = divmod(i, per_tower)
        r, c = divmod(j, cols)
        w = weight[i].transpose(1, 2, 0)
        w = (w - w.min()) / max(float(np.ptp(w)), 1e-12) * 255  # each kernel on its own range
        tile = Image.fromarray(w.astype(np.uint8)).resize((k, k), Image.Resampling.NEAREST)
        canvas.paste(tile, (gap + c * (k + gap), t * (rows * (k + gap) + 3 * gap) + gap + r * (k + gap)))
    return canvas
