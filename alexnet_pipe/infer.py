"""Using a checkpoint: `evaluate` on the val shards, `predict` single image files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from alexnet_pipe import augment, checkpoint
from alexnet_pipe.model import build_model
from alexnet_pipe.pipeline import LoaderConfig, make_loader, resolve_device
from preprocessing import resize
from preprocessing.errors import UserError


def model_from_checkpoint(path: Path, device) -> tuple[torch.nn.Module, dict]:
    state = checkpoint.load(path)
    model = build_model(state["arch"], state["num_classes"], state["crop"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def _augment_from(state: dict) -> augment.AugmentConfig:
    a = state["config"]["loader"]["augment"]
    return augment.AugmentConfig(crop=a["crop"], mean=a["mean"], std=a["std"])


def evaluate_checkpoint(path: Path, data: Path, *, ten_crop: bool, device: str = "auto",
                        batch_size: int = 64, threads: int = 2, workers: int = 2) -> dict:
    from alexnet_pipe.reader import load_split
    from alexnet_pipe.train import evaluate
    gpu = resolve_device(device) == "gpu"
    dev = torch.device("cuda" if gpu else "cpu")
    model, state = model_from_checkpoint(path, dev)
    checkpoint.check_compatible(state, path, arch=state["arch"],
                                num_classes=load_split(data, "val").num_classes)
    cfg = LoaderConfig(data=data, batch_size=batch_size, device="gpu" if gpu else "cpu",
                       threads=threads, workers=workers, augment=_augment_from(state))
    loader = make_loader(cfg, split="val", ten_crop=ten_crop)
    return evaluate(model, loader, device=dev, amp=gpu, ten_crop=ten_crop)


@torch.no_grad()
def predict(images: list[Path], path: Path, top: int = 5) -> list[dict]:
    """Each image as `prepare` would store it (256x256), centre crop, the run's mean; top-k."""
    model, state = model_from_checkpoint(path, torch.device("cpu"))
    crop = state["crop"]
    mean = state["normalization"]["mean"].double().numpy()
    std = state["normalization"]["std"].double().numpy()
    results = []
    for image_path in images:
        try:
            pixels = resize.load_image(Path(image_path), 256)
        except (resize.SkipImage, FileNotFoundError) as e:
            raise UserError(f"{image_path}: {e}") from None
        c = (256 - crop) // 2
        x = augment.reference(pixels, x=c, y=c, flip=False, offset=np.zeros(3), mean=mean,
                              std=std, crop=crop)
        probs = torch.softmax(model(torch.from_numpy(x).float()[None]), 1)[0]
        p, idx = probs.topk(min(top, len(probs)))
        results.append({"image": str(image_path), "top": [
            {"class": int(i), "name": state["class_names"][int(i)], "p": float(q)}
            for q, i in zip(p, idx)]})
    return results
