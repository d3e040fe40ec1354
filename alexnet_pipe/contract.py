"""What the DALI callback (source.py) hands the DALI pipeline (pipeline.py), declared once by
name: the external source's outputs, in order, and the columns of its `meta` array. Both sides
import these; no other file indexes a source output or a meta column by number.

    images       raw: (B, size, size, 3) uint8 HWC; JPEG: B uint8 streams, or (packed, for
                 nvJPEG) one (B, longest) uint8 array, zero-padded, lengths in meta
    (the augmentation's graph inputs, augment.GRAPH_INPUTS: each (B, ...), one value an image)
    meta         (B, len(META)) int64, the columns below
"""
from __future__ import annotations

from typing import NamedTuple

from alexnet_pipe.augment import GRAPH_INPUTS

# One batch of the external source: every field has the batch's B samples first
SourceBatch = NamedTuple("SourceBatch", [(name, object) for name in
                                         ("images", *GRAPH_INPUTS, "meta")])


class Output(NamedTuple):
    dtype: str   # DALI's types.<dtype>
    ndim: int    # dimensions of one sample
    layout: str


def source_outputs(encoding: str) -> list[Output]:
    """What `fn.external_source` declares for each SourceBatch field, in field order."""
    jpeg = encoding == "jpeg"
    spec = {"images": Output("UINT8", 1 if jpeg else 3, "" if jpeg else "HWC"),
            **{name: Output(g.dtype, g.ndim, "") for name, g in GRAPH_INPUTS.items()},
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
