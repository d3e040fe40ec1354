"""Decode one image file to RGB and bring it to size x size: shorter side to `size`, centre crop.

This is the paper's preprocessing. Speed comes from two shortcuts on top of the plain
"open, resize, crop" recipe: the JPEG decoder's DCT scaling (`draft`) decodes large JPEGs at 1/2,
1/4 or 1/8 size, never below twice the target so the antialiasing filter still has detail to
work with; and the resize computes only the central square (`box=`), so no pixel that the crop
throws away is ever resampled. Without draft the result equals the plain recipe with the same
filter to within 1 (the box's floating-point rounding; tested).
"""
from __future__ import annotations

import io
import math
import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

RESAMPLE = Image.Resampling.BILINEAR  # antialiased: PIL widens the kernel with the scale factor
DRAFT_FACTOR = 2                     # never decode a JPEG below 2x the target size


class SkipImage(Exception):
    """The file is not a usable image; the message is the reason listed in the manifest."""


def open_rgb(source, size: int) -> Image.Image:
    """Open `source` (path or file object) as an RGB PIL image, decoding JPEGs at reduced size."""
    with warnings.catch_warnings():
        # PIL warns beyond MAX_IMAGE_PIXELS (89 M) and raises beyond twice that: both are refused.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(source)
            short = min(im.size)
            if im.format == "JPEG" and short >= 2 * DRAFT_FACTOR * size:  # else draft can't help
                scale = DRAFT_FACTOR * size / short
                im.draft("RGB", (math.ceil(im.size[0] * scale), math.ceil(im.size[1] * scale)))
            im.load()
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise SkipImage(f"decompression bomb: {e}") from None
        except UnidentifiedImageError:
            raise SkipImage("not an image (unrecognised format)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise SkipImage(f"unreadable image: {e}") from None
    if im.mode != "RGB":
        if im.mode in ("P", "PA", "LA", "RGBA") or "transparency" in im.info:
            im = im.convert("RGBA")  # palette/alpha: flatten on black (RGB drops the alpha)
        im = im.convert("RGB")
    return im


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`, centre crop to size x size, in one resample of the central square.

    The box is the plain recipe's geometry (resize to round(w*s) x round(h*s), integer centre crop)
    mapped back to the source, so the result equals "resize, then crop" pixel for pixel while
    only the kept pixels are computed.
    """
    w, h = im.size
    s = size / min(w, h)
    w2, h2 = max(size, round(w * s)), max(size, round(h * s))
    left, top = (w2 - size) // 2, (h2 - size) // 2
    box = (left * w / w2, top * h / h2, (left + size) * w / w2, (top + size) * h / h2)
    return im.resize((size, size), RESAMPLE, box=box)


def load_image(source, size: int) -> np.ndarray:
    """A file -> (size, size, 3) uint8 HWC RGB. Raises SkipImage with the reason for bad files."""
    if ((isinstance(source, (str, os.PathLike)) and os.path.getsize(source) == 0)
            or (isinstance(source, io.BytesIO) and not source.getbuffer().nbytes)):
        raise SkipImage("empty file (0 bytes)")
    with open_rgb(source, size) as im:
        return np.asarray(resize_center_crop(im, size))


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))
