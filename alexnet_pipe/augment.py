"""The augmentation math as pure numpy: what the DALI pipelines compute, written so it can be read
and tested on its own. Every DALI stage in pipeline.py has its twin here (the normalisation's
values are normalize.py's).

Pixel scale everywhere: 0-255. Images are HWC uint8 on input, CHW float on output.
"""
from __future__ import annotations

import numpy as np

def lighting_basis(eigval: np.ndarray, eigvec: np.ndarray, scale: str) -> np.ndarray:
    """(3, 3) matrix B with offset = B @ alpha, on the 0-255 scale.

    stdev:  offset = sum_i p_i * alpha_i * sqrt(l_i)        (l_i eigenvalues on 0-255)
    eigval: offset = 255 * sum_i p_i * alpha_i * l_i/255^2  (l_i/255^2 eigenvalues on [0,1])
    The two differ by sqrt(l_i)/255, about 2x for ImageNet's first component.
    """
    weights = np.sqrt(eigval) if scale == "stdev" else eigval / 255.0
    return (eigvec * weights[None, :]).astype(np.float64)


def lighting_offsets(alphas: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """(B, 3) alphas ~ N(0, sigma) -> (B, 3) RGB offsets, one per image, added to every pixel."""
    return alphas @ basis.T


def random_params(rng: np.random.Generator, n: int, *, size: int, crop: int, flip: bool,
                  lighting_std: float) -> dict:
    """Per-image augmentation draws: crop offsets uniform over every position, flip, alphas."""
    span = size - crop
    return {
        "x": rng.integers(0, span + 1, n),       # crop left edge, px
        "y": rng.integers(0, span + 1, n),       # crop top edge, px
        "flip": rng.random(n) < 0.5 if flip else np.zeros(n, bool),
        "alpha": rng.normal(0.0, lighting_std, (n, 3)) if lighting_std > 0 else np.zeros((n, 3)),
    }


def ten_crop_positions(size: int, crop: int) -> list[tuple[int, int, bool]]:
    """The paper's test-time crops: 4 corners and the centre, then the same mirrored."""
    span, c = size - crop, (size - crop) // 2
    corners = [(0, 0), (span, 0), (0, span), (span, span), (c, c)]
    return [(x, y, False) for x, y in corners] + [(x, y, True) for x, y in corners]


def crop_flip(image: np.ndarray, x: int, y: int, crop: int, flip: bool) -> np.ndarray:
    """HWC -> HWC crop at (x, y), mirrored left-right if `flip`."""
    out = image[y:y + crop, x:x + crop]
    return out[:, ::-1] if flip else out


def reference(image: np.ndarray, *, x: int, y: int, flip: bool, offset: np.ndarray, mean, std,
              crop: int) -> np.ndarray:
    """The numpy twin of one train (or val, with zero offset) sample: HWC uint8 -> CHW float64.

    out = (crop(image) + offset - crop(mean)) / std, with the same crop and flip for the mean
    image, so the crop of the mean matches the crop of the image.
    """
    pixels = crop_flip(image, x, y, crop, flip).astype(np.float64) + offset
    m = crop_flip(mean, x, y, crop, flip) if np.ndim(mean) == 3 else mean
    return ((pixels - m) / std).transpose(2, 0, 1)
