"""What the shard reader (reader.py) hands the DALI pipeline (pipeline.py), declared once by name:
the external source's outputs, in order, and the columns of its `meta` array. Both sides import
these; no other file indexes a source output or a meta column by number.
"""
from __future__ import annotations

from typing import NamedTuple


class SourceBatch(NamedTuple):
    """One batch of the external source: every field has the batch's B samples first."""
    images: object     # raw: (B, size, size, 3) uint8 HWC; JPEG: B uint8 streams, or (packed,
    #                    for nvJPEG) one (B, longest) uint8 array, zero-padded, lengths in meta
    crop_x: object     # (B,) float32, the crop's left edge as a fraction of (size - crop)
    crop_y: object     # (B,) float32, its top edge, likewise (DALI's crop_pos_x / crop_pos_y)
    mirror: object     # (B,) int32, 1: flip left-right
    norm_mean: object  # (B, 3) float32, 0-255: channel mean - PCA lighting offset, per sample
    meta: object       # (B, len(META)) int64, the columns below


class Output(NamedTuple):
    dtype: str   # DALI's types.<dtype>
    ndim: int    # dimensions of one sample
    layout: str


def source_outputs(encoding: str) -> list[Output]:
    """What `fn.external_source` declares for each SourceBatch field, in field order."""
    jpeg = encoding == "jpeg"
    spec = {"images": Output("UINT8", 1 if jpeg else 3, "" if jpeg else "HWC"),
            "crop_x": Output("FLOAT", 0, ""), "crop_y": Output("FLOAT", 0, ""),
            "mirror": Output("INT32", 0, ""), "norm_mean": Output("FLOAT", 1, ""),
            "meta": Output("INT64", 1, "")}
    return [spec[name] for name in SourceBatch._fields]


class MetaColumns(NamedTuple):
    label: int    # class index
    valid: int    # 1, or 0 for the padding of the last val batch
    index: int    # global sample index: shards in manifest order, then position in the shard
    nbytes: int   # the image's stored bytes (a packed JPEG row's stream length)
    x: int        # crop left edge, px
    y: int        # crop top edge, px
    mirror: int   # 1: flipped (the CPU's mean-image windows follow the crop and the flip)


META = MetaColumns(*range(len(MetaColumns._fields)))
