"""Pictures: a train batch as the model sees it (`preview`), training curves (`plot`), and the
conv1 kernels as the paper's Figure 3 (`filters`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from alexnet_pipe import augment


def preview_grid(config, out: Path, n: int = 8) -> Path:
    """PNG: each original 256x256 shard image beside its augmented crop, the mean added back."""
    from dataclasses import replace
    from alexnet_pipe.pipeline import make_loader
    from alexnet_pipe.reader import load_stats
    loader = make_loader(replace(config, batch_size=n, dtype="float32"), split="train")
    images, _, _ = next(iter(loader))
    src = loader.source
    idx, _ = src.batch_indices(0, 0)
    originals, _ = src.read(idx)
    p = src.params(0, 0, n)
    stats = load_stats(config.data, src.split)
    mean, std = augment.mean_terms(stats, config.augment)
    size, crop, pad = src.split.size, config.augment.crop, 8
    cols = 2
    canvas = Image.new("RGB", (cols * (size + crop + 3 * pad), -(-n // cols) * (size + pad) + pad),
                       (255, 255, 255))
    for i in range(n):
        original = originals[i]
        if original.ndim == 1:
            from preprocessing.resize import decode_jpeg
            original = decode_jpeg(original.tobytes())
        x, y, flip = int(p["x"][i]), int(p["y"][i]), bool(p["flip"][i])
        m = augment.crop_flip(mean, x, y, crop, flip) if np.ndim(mean) == 3 else mean
        seen = images[i].float().cpu().numpy().transpose(1, 2, 0) * std + m
        seen = np.clip(seen, 0, 255).astype(np.uint8)
        r, c = divmod(i, cols)
        left, top = c * (size + crop + 3 * pad) + pad, r * (size + pad) + pad
        canvas.paste(Image.fromarray(original), (left, top))
        canvas.paste(Image.fromarray(seen), (left + size + pad, top + (size - crop) // 2))
        ImageDraw.Draw(canvas).rectangle((left + x, top + y, left + x + crop, top + y + crop),
                                         outline=(255, 0, 0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
