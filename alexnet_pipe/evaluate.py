"""Validation error of a model over a loader: top-1 and top-5, centre crop or ten crops."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from alexnet_pipe import distributed
from alexnet_pipe.runtime import Runtime


@torch.no_grad()
def evaluate(model, loader, *, runtime: Runtime, ten_crop: bool = False,
             probabilities: list | None = None) -> dict:
    """Top-1 and top-5 error over this rank's share, summed over ranks; padding masked out.
    Counts stay on the device; the one sync is the sum at the end. `probabilities`: a list to
    which each batch's (sample indices, valid mask, class probabilities) are appended, on the
    device (`evaluate --probabilities` copies them to the host once, at the end)."""
    model.eval()
    device = runtime.device
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # images, top-1, top-5, loss
    for batch in loader:
        images, labels = runtime.batch(batch.images, batch.labels)
        valid = batch.valid.to(device, non_blocking=True)
        with runtime.autocast():
            if ten_crop:  # (B, 10, C, H, W): the paper averages the ten softmax outputs
                b = images.shape[0]
                probs = F.softmax(model(images.flatten(0, 1)).float(), 1).view(b, 10, -1).mean(1)
                logits = probs.log()
            else:
                logits = model(images).float()
        if probabilities is not None:  # kept on the device; the caller copies them once
            probabilities.append((batch.index, valid.bool(), F.softmax(logits, 1)))
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        loss = F.cross_entropy(logits, labels, reduction="none")
        counts += torch.stack([valid.sum(), (hit[:, 0] & valid).sum(), (hit.any(1) & valid).sum(),
                               (loss * valid).sum()]).double()
    n, top1, top5, loss = distributed.all_sum(counts.tolist(), device)
    return {"images": int(n), "top1_err": 1 - top1 / n, "top5_err": 1 - top5 / n,
            "val_loss": loss / n}
