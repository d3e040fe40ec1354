"""The communication ledger: what each rank (or tower) sends per training step under ddp,
towers and hybrid, computed from the paper model's shapes (a forward on the meta device).

Each collective is listed with its payload as the counting test measures it: an all-gather
by what each rank contributes, a reduce-scatter by its whole input, an all-reduce by its tensor.
What one rank then sends is that of the ring algorithms NCCL and gloo use for large messages:
    all-gather      (K-1) x payload
    reduce-scatter  (K-1)/K x payload
    all-reduce      2 (K-1)/K x payload   (a reduce-scatter, then an all-gather)
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from torch import nn

from alexnet_pipe.model import FC_WIDTH as WIDTH, build_model, count_parameters, layer


class Collective(NamedTuple):
    kind: str       # all_gather | reduce_scatter | all_reduce | copy (towers: device to device)
    payload: int    # bytes, as above
    what: str


def _shapes(num_classes: int, crop: int) -> dict:
    """Sizes per image the ledger needs, from the grouped model on the meta device."""
    with torch.device("meta"):
        model = build_model("alexnet", num_classes, crop)
        x = torch.empty(1, 3, crop, crop)
        trunk = list(model.features.named_children())
        at = [n for n, _ in trunk].index("conv3")
        conv2 = nn.Sequential(*[m for _, m in trunk[:at]])(x)  # pooled conv2: conv3's input,
        pooled = nn.Sequential(*[m for _, m in trunk[at:]])(conv2)  # from both towers; pool5
    return {"image": x.numel(), "conv2": conv2.numel(), "pooled": pooled.numel(),
            "trunk": count_parameters(model.features), "all": count_parameters(model),
            "fc8": count_parameters(layer(model, "fc8"))}


def collectives(mode: str, *, world: int, batch: int, num_classes: int = 1000, crop: int = 224,
                act_bytes: int = 2, grad_bytes: int = 4) -> list[Collective]:
    """One training step's transfers for one rank (towers: the device holding the input).
    batch: images per rank; act_bytes: an activation's bytes (2: bf16 autocast);
    grad_bytes: a parameter gradient's (4: fp32 weights)."""
    s = _shapes(num_classes, crop)
    if mode == "ddp":
        return [Collective("all_reduce", s["all"] * grad_bytes, "every gradient")]
    if mode == "hybrid":
        b, k = batch, world
        sums = max(act_bytes, 4)  # partial sums are reduced in float32 (hybrid._reduce_scatter)
        return [
            Collective("all_gather", b * s["pooled"] * act_bytes, "pooled features, forward"),
            Collective("reduce_scatter", k * b * WIDTH * sums, "fc7 partial sums, forward"),
            Collective("all_gather", b * WIDTH * act_bytes, "fc7 output gradients, backward"),
            Collective("reduce_scatter", k * b * s["pooled"] * sums,
                       "pooled feature gradients, backward"),
            Collective("all_reduce", (s["trunk"] + WIDTH + s["fc8"]) * grad_bytes,
                       "convolution, fc7 bias and fc8 gradients"),
        ]
    if mode == "towers":  # tower A's device: it holds the input and receives the logits
        if world != 2:
            raise ValueError("towers: exactly two devices")
        half = [s["conv2"] // 2, s["pooled"] // 2, WIDTH // 2, WIDTH // 2]  # its crossing halves
        b = batch
        return [Collective("copy", b * s["image"] * act_bytes, "the input to tower B"),
                Collective("copy", b * sum(half) * act_bytes, "its halves at conv3, fc6, fc7, fc8"),
                Collective("copy", b * sum(half) * act_bytes, "their gradients, backward"),
                Collective("copy", b * (num_classes // 2) * act_bytes,
                           "the gradient of tower B's logits, backward")]
    raise ValueError(f"no ledger for mode {mode!r}")


def sent(c: Collective, world: int) -> float:
    """Bytes one rank sends for collective `c` (ring algorithms)."""
    k = world
    return {"all_gather": (k - 1) * c.payload, "reduce_scatter": (k - 1) / k * c.payload,
            "all_reduce": 2 * (k - 1) / k * c.payload, "copy": c.payload}[c.kind]


def sent_per_step(mode: str, *, world: int, batch: int, **kw) -> float:
    return sum(sent(c, world) for c in collectives(mode, world=world, batch=batch, **kw))
