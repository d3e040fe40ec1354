"""Using a checkpoint: `evaluate` on val shards, `predict` single image files. Both take the
input's preprocessing (shard size, crop, normalisation) and the class names from the checkpoint
alone; evaluate reads nothing from the data folder but its val shards (and the manifest)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from alexnet_base import resources
from alexnet_base.config import AugmentConfig, EvalConfig
from alexnet_base.errors import UserError
from alexnet_pipe import augment, checkpoint, distributed
from alexnet_pipe.evaluate import evaluate
from alexnet_pipe.pipeline import make_loader
from preprocessing import resize, verify
from preprocessing.shards import load_split


def evaluate_checkpoint(config: EvalConfig) -> dict:
    dev = distributed.device(config.loader.device)
    model, about = checkpoint.load_model(config.checkpoint, dev)
    if dev.type == "cuda":  # the loader's layout, and cuDNN's fastest algorithms for it
        torch.backends.cudnn.benchmark = True
        if config.loader.channels_last:
            model = model.to(memory_format=torch.channels_last)
    if config.compile:
        model = torch.compile(model, dynamic=False)
    info = load_split(config.loader.data, "val")
    if config.loader.verify:
        verify.check_inputs(config.loader.data, ("val",), workers=resources.usable_cores())
    if info.num_classes != about.num_classes:
        raise UserError(f"{config.checkpoint}: a checkpoint for {about.num_classes} classes; "
                        f"{config.loader.data} has {info.num_classes}")
    if info.size != about.size:
        raise UserError(f"{config.checkpoint}: trained on {about.size} px shards; "
                        f"{config.loader.data} holds {info.size} px")
    loader = make_loader(replace(config.loader, augment=AugmentConfig(crop=about.crop)),
                         split="val", info=info, norm=about.norm, ten_crop=config.ten_crop,
                         device=dev)
    return evaluate(model, loader, device=dev, amp=dev.type == "cuda", ten_crop=config.ten_crop)


@torch.no_grad()
def predict(images: list[Path], path: Path, top: int = 5) -> list[dict]:
    """Each image as `prepare` stored the run's data (its size), the centre crop, the run's
    normalisation."""
    if top < 1:
        raise UserError(f"--top {top}: must be at least 1")
    model, about = checkpoint.load_model(path, torch.device("cpu"))
    size, crop, norm = about.size, about.crop, about.norm
    results = []
    for image_path in images:
        if Path(image_path).is_dir():
            raise UserError(f"{image_path}: a folder; give image files (in a shell: "
                            f"{Path(image_path) / '*'})")
        try:
            pixels = resize.load_image(Path(image_path), size)
        except (resize.SkipImage, FileNotFoundError) as e:
            raise UserError(f"{image_path}: {e}") from None
        c = (size - crop) // 2
        x = augment.reference(pixels, x=c, y=c, flip=False, offset=np.zeros(3), mean=norm.mean,
                              std=norm.std, crop=crop)
        probs = torch.softmax(model(torch.from_numpy(x).float()[None]), 1)[0]
        p, idx = probs.topk(min(top, len(probs)))
        results.append({"image": str(image_path), "top": [
            {"class": int(i), "name": about.class_names[int(i)], "p": float(q)}
            for q, i in zip(p, idx)]})
    return results
