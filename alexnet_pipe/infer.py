"""Using a checkpoint: `evaluate` on the val shards, `predict` single image files. Both take the
preprocessing (shard size, crop, mean) from the checkpoint alone."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from alexnet_base.config import AugmentConfig, EvalConfig
from alexnet_base.errors import UserError
from alexnet_pipe import augment, checkpoint, distributed
from alexnet_pipe.evaluate import evaluate
from alexnet_pipe.model import build_model
from alexnet_pipe.pipeline import make_loader
from preprocessing import resize
from preprocessing.shards import load_split


def model_from_checkpoint(path: Path, device) -> tuple[torch.nn.Module, dict]:
    state = checkpoint.load(path)
    model = build_model(state["arch"], state["num_classes"], state["crop"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def _augment_from(state: dict) -> AugmentConfig:
    a = state["config"]["loader"]["augment"]
    return AugmentConfig(crop=a["crop"], mean=a["mean"], divide_std=a["divide_std"])


def evaluate_checkpoint(config: EvalConfig) -> dict:
    dev = distributed.device(config.loader.device)
    model, state = model_from_checkpoint(config.checkpoint, dev)
    info = load_split(config.loader.data, "val")
    checkpoint.check_compatible(state, config.checkpoint, arch=state["arch"],
                                num_classes=info.num_classes)
    if info.size != state["size"]:
        raise UserError(f"{config.checkpoint}: trained on {state['size']} px shards; "
                        f"{config.loader.data} holds {info.size} px")
    loader = make_loader(replace(config.loader, augment=_augment_from(state)), split="val",
                         ten_crop=config.ten_crop, device=dev, info=info)
    return evaluate(model, loader, device=dev, amp=dev.type == "cuda", ten_crop=config.ten_crop)


@torch.no_grad()
def predict(images: list[Path], path: Path, top: int = 5) -> list[dict]:
    """Each image as `prepare` stored the run's data (its size), the centre crop, the run's mean."""
    model, state = model_from_checkpoint(path, torch.device("cpu"))
    size, crop = state["size"], state["crop"]
    mean = state["normalization"]["mean"].double().numpy()
    std = state["normalization"]["std"].double().numpy()
    results = []
    for image_path in images:
        try:
            pixels = resize.load_image(Path(image_path), size)
        except (resize.SkipImage, FileNotFoundError) as e:
            raise UserError(f"{image_path}: {e}") from None
        c = (size - crop) // 2
        x = augment.reference(pixels, x=c, y=c, flip=False, offset=np.zeros(3), mean=mean,
                              std=std, crop=crop)
        probs = torch.softmax(model(torch.from_numpy(x).float()[None]), 1)[0]
        p, idx = probs.topk(min(top, len(probs)))
        results.append({"image": str(image_path), "top": [
            {"class": int(i), "name": state["class_names"][int(i)], "p": float(q)}
            for q, i in zip(p, idx)]})
    return results
