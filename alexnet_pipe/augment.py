"""The augmentation math as pure numpy: what the DALI pipelines compute, written so it can be read
and tested on its own. Every DALI stage in pipeline.py has its twin here (the normalisation's
values are normalize.py's).

Each augmentation is declared here once: its per-image draw (random_params), what the DALI graph
takes of the draws, one value per image (GRAPH_INPUTS, graph_inputs: the external source's
outputs, by name), and its twin (reference). Adding one touches this file, its option in
config.py (AugmentConfig) and its operator in pipeline.py, nothing else.

Pixel scale everywhere: 0-255. Images are HWC uint8 on input, CHW float on output.
"""
from __future__ import annotations

from typing import NamedTuple

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


def random_params(rng: np.random.Generator, n: int, *, size: int, aug) -> dict:
    """Per-image augmentation draws (aug: an AugmentConfig): crop offsets uniform over every
    position, flip, lighting alphas."""
    span = size - aug.crop
    return {
        "x": rng.integers(0, span + 1, n),       # crop left edge, px
        "y": rng.integers(0, span + 1, n),       # crop top edge, px
        "flip": rng.random(n) < 0.5 if aug.flip else np.zeros(n, bool),
        "alpha": (rng.normal(0.0, aug.lighting_std, (n, 3)) if aug.lighting_std > 0
                  else np.zeros((n, 3))),
    }


def centre_params(n: int, *, size: int, crop: int) -> dict:
    """What random_params gives for validation: the centre crop, no flip, no lighting."""
    centre = (size - crop) // 2
    return {"x": np.full(n, centre), "y": np.full(n, centre), "flip": np.zeros(n, bool),
            "alpha": np.zeros((n, 3))}


class GraphInput(NamedTuple):
    dtype: str   # DALI's types.<dtype>
    ndim: int    # dimensions of one image's value


# What the graph takes of the draws, one value an image, in the external source's order
GRAPH_INPUTS = {
    "crop_x": GraphInput("FLOAT", 0),     # the crop's left edge as a fraction of (size - crop)
    "crop_y": GraphInput("FLOAT", 0),     # its top edge, likewise (DALI's crop_pos_x / _y)
    "mirror": GraphInput("INT32", 0),     # 1: flip left-right
    "norm_mean": GraphInput("FLOAT", 1),  # (3,) 0-255: channel mean - PCA lighting offset
}


def graph_inputs(params: dict, *, size: int, crop: int, channel_mean: np.ndarray,
                 lighting_basis: np.ndarray | None) -> dict:
    """The draws of a batch as the graph takes them: {GRAPH_INPUTS name: (n, ...) array}.
    The lighting rides in the per-image mean (crop_mirror_normalize's), so it costs nothing."""
    span = max(size - crop, 1)
    shifts = (lighting_offsets(params["alpha"], lighting_basis) if lighting_basis is not None
              else np.zeros((len(params["alpha"]), 3)))
    return {"crop_x": (params["x"] / span).astype(np.float32),
            "crop_y": (params["y"] / span).astype(np.float32),
            "mirror": params["flip"].astype(np.int32),
            "norm_mean": (channel_mean - shifts).astype(np.float32)}


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
