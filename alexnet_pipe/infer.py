"""Using a checkpoint: `evaluate` on val shards, `predict` single image files. Both take the
input's preprocessing (shard size, crop, normalisation) and the class names from the checkpoint
alone; evaluate reads nothing from the data folder but its val shards (and the manifest)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from alexnet_base.config import AugmentConfig, EvalConfig
from alexnet_base.errors import UserError
from alexnet_base.files import write_output
from alexnet_pipe import augment, checkpoint, distributed
from alexnet_pipe.evaluate import evaluate
from alexnet_pipe.prepared import open_shards
from alexnet_pipe.runtime import Runtime
from preprocessing import resize


def evaluate_checkpoint(config: EvalConfig) -> dict:
    runtime = Runtime.for_device(distributed.device(config.loader.device),
                                 channels_last=config.loader.channels_last)
    runtime.configure()  # the loader's layout, and cuDNN's fastest algorithms for it
    model, card = checkpoint.load_model(config.checkpoint, runtime.device)
    model = runtime.place(model)
    if config.compile:
        model = torch.compile(model, dynamic=False)
    data = open_shards(config.loader.data, ("val",), verify=config.loader.verify)
    info = data.split("val")
    if info.num_classes != card.num_classes:
        raise UserError(f"{config.checkpoint}: a checkpoint for {card.num_classes} classes; "
                        f"{config.loader.data} has {info.num_classes}")
    if info.size != card.size:
        raise UserError(f"{config.checkpoint}: trained on {card.size} px shards; "
                        f"{config.loader.data} holds {info.size} px")
    loader = data.loader("val", replace(config.loader, augment=AugmentConfig(crop=card.crop)),
                         norm=card.norm, ten_crop=config.ten_crop, device=runtime.device)
    probabilities = [] if config.probabilities is not None else None
    result = evaluate(model, loader, runtime=runtime, ten_crop=config.ten_crop,
                      probabilities=probabilities)
    if probabilities is not None:
        keep = torch.cat([v for _, v, _ in probabilities]).cpu()
        index = torch.cat([i for i, _, _ in probabilities]).cpu()[keep].numpy()
        probs = torch.cat([p for _, _, p in probabilities]).float().cpu()[keep].numpy()
        order = np.argsort(index, kind="stable")

        def write(tmp: Path):  # a file object: np.savez would add .npz to the temporary name
            with open(tmp, "wb") as f:
                np.savez(f, index=index[order], probs=probs[order])
        write_output(config.probabilities, write, option="--probabilities")
    return result


@torch.no_grad()
def predict(images: list[Path], path: Path, top: int = 5) -> list[dict]:
    """Each image as `prepare` stored the run's data (its size), the centre crop, the run's
    normalisation."""
    if top < 1:
        raise UserError(f"--top {top}: must be at least 1")
    model, card = checkpoint.load_model(path, torch.device("cpu"))
    size, crop, norm = card.size, card.crop, card.norm
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
            {"class": int(i), "name": card.class_names[int(i)], "p": float(q)}
            for q, i in zip(p, idx)]})
    return results
