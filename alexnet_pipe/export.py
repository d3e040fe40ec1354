"""`alexnet-pipe export`: a trained checkpoint as a file that leaves the project.

onnx: one self-contained graph, uint8 RGB images of the run's shard size, NHWC, any batch
size (N x 256 x 256 x 3 for the paper's runs: what `prepare` stores, an image resized to 256 on
its shorter side and centre-cropped) -> class probabilities (N x classes). The crop (the centre,
or with --ten-crop the paper's ten: four corners and the centre, each mirrored, their softmax
outputs averaged), the checkpoint's normalisation (the mean image cut with the crop, or the RGB
mean; the std) and the softmax are in the graph: nothing to get wrong outside it. The model's
metadata (metadata_props) says what it is: the class ids (wnids) and names in the output's
order as JSON lists, the input size, the crop, whether ten crops, the arch, the checkpoint's
epoch and step.

torchvision (--arch alexnet-owt only): the weights as a state dict that
torchvision.models.alexnet(num_classes=...) loads as it is (its nn.Sequential's keys).

Every file is written whole under its final name or not at all."""
from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from alexnet_base.config import ExportConfig
from alexnet_base.errors import UserError
from alexnet_base.files import write_output
from alexnet_pipe import augment, checkpoint
from alexnet_pipe.model import TORCHVISION_KEYS

INPUT, OUTPUT = "images", "probabilities"  # the graph's names
OPSET = 18


class Served(nn.Module):
    """The model as a user calls it: (N, size, size, 3) uint8 RGB -> (N, classes) float32
    probabilities; what predict (centre crop) and evaluate --ten-crop compute, in float32."""

    def __init__(self, net: nn.Module, card: checkpoint.ModelCard, *, ten_crop: bool):
        super().__init__()
        self.net, self.crop = net, card.crop
        c = (card.size - card.crop) // 2
        self.windows = (augment.ten_crop_positions(card.size, card.crop) if ten_crop
                        else [(c, c, False)])
        mean = torch.as_tensor(card.norm.mean, dtype=torch.float32)
        # (3, size, size) mean image or (3, 1, 1) RGB mean; subtracted before the crops, which
        # cut it with the image (predict cuts both, then subtracts: the same numbers)
        self.register_buffer("mean", mean.permute(2, 0, 1) if card.norm.per_pixel
                             else mean.view(3, 1, 1))
        self.register_buffer("std", torch.as_tensor(card.norm.std,
                                                    dtype=torch.float32).view(3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.permute(0, 3, 1, 2).float() - self.mean) / self.std
        k = self.crop
        crops = []
        for left, top, flip in self.windows:
            window = x[:, :, top:top + k, left:left + k]
            crops.append(window.flip(3) if flip else window)
        probs = torch.softmax(self.net(torch.cat(crops, 0)), 1)  # crop-major: (K * N, classes)
        return probs.view(len(self.windows), images.shape[0], -1).mean(0)


def metadata(card: checkpoint.ModelCard, state: dict, *, ten_crop: bool) -> dict[str, str]:
    """The ONNX model's metadata_props (strings)."""
    return {"arch": card.arch, "input": f"uint8 RGB, N x {card.size} x {card.size} x 3 (NHWC)",
            "size": str(card.size), "crop": str(card.crop), "ten_crop": json.dumps(ten_crop),
            "wnids": json.dumps(list(card.wnids)), "class_names": json.dumps(list(card.class_names)),
            "epoch": str(state.get("epoch")), "step": str(state.get("step"))}


def export(config: ExportConfig) -> Path:
    """Write config.out from config.checkpoint; returns the path written."""
    config.validate()
    out = Path(config.out)
    if out.is_dir():
        raise UserError(f"--out {out}: a folder; name the file to write in it "
                        f"({out / ('model.onnx' if config.format == 'onnx' else 'alexnet.pth')})")
    state = checkpoint.load(config.checkpoint)
    card = checkpoint.card_of(state)
    if config.format == "torchvision":
        if config.ten_crop:
            raise UserError("--ten-crop: an ONNX export's option; a torchvision state dict "
                            "holds the weights alone")
        if card.arch != "alexnet-owt":
            raise UserError(f"{config.checkpoint}: --arch {card.arch}; torchvision's alexnet() "
                            f"is the one-tower model: --format torchvision takes a run of "
                            f"--arch alexnet-owt (use --format onnx)")
        weights = {TORCHVISION_KEYS[k]: v for k, v in state["model"].items()}
        return write_output(out, lambda tmp: torch.save(weights, tmp), what="model")
    try:
        import onnx  # noqa: F401  torch's exporter builds the graph with onnxscript, in onnx
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UserError(f"--format onnx needs the onnx and onnxscript packages ({e.name} is "
                        f"missing): pip install 'alexnet-pipe[export]'") from None
    net, _ = checkpoint.model_of(state, torch.device("cpu"))
    served = Served(net, card, ten_crop=config.ten_crop).eval()
    example = torch.zeros(2, card.size, card.size, 3, dtype=torch.uint8)
    with _quiet():
        program = torch.onnx.export(
            served, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT],
            output_names=[OUTPUT], dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False)
    for key, value in metadata(card, state, ten_crop=config.ten_crop).items():
        program.model.metadata_props[key] = value
    return write_output(out, lambda tmp: program.save(str(tmp)), what="model")


@contextlib.contextmanager
def _quiet():
    """The exporter's notes that concern it, not the user: torchvision's operators it skips
    registering where torchvision is not installed, deprecations inside torch."""
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        log.setLevel(level)
