"""How the model runs, decided once from its device (nanoGPT's `device_type` and its one
autocast context): bf16 autocast, channels_last memory and cuDNN's settings on GPUs, float32
NCHW on the CPU. The loader's own placement (pipeline.Placement) is decided beside it, from the
same device. train, evaluate, predict and the benchmarks all take this one value.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Runtime:
    device: torch.device    # where the model takes its input
    amp: bool               # bf16 autocast (GPUs only)
    channels_last: bool     # the model and its input in channels_last memory (GPUs only: the
    #                         loader then hands over an NCHW view of DALI's HWC, no copy)
    deterministic: bool = False  # cuDNN's deterministic algorithms instead of its fastest

    @classmethod
    def for_device(cls, device, *, amp: bool = True, channels_last: bool = True,
                   deterministic: bool = False) -> "Runtime":
        gpu = torch.device(device).type == "cuda"
        return cls(torch.device(device), amp=amp and gpu, channels_last=channels_last and gpu,
                   deterministic=deterministic)

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    def configure(self) -> None:
        """cuDNN: fixed shapes, so it times its algorithms once (benchmark mode), unless the
        run must repeat exactly (deterministic). Global: called once a process."""
        if self.gpu:
            torch.backends.cudnn.benchmark = not self.deterministic
            torch.backends.cudnn.deterministic = self.deterministic

    def autocast(self):
        """The forward's context: bf16 autocast on GPUs, nothing on the CPU."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model's memory layout (its device is the caller's: the towers have two)."""
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def batch(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        """A loader's batch on the input device, in the dtype and layout the model takes:
        without autocast the float32 weights take float32 (a --dtype bfloat16 batch is cast
        back; autocast casts it itself). No sync: the copies are non-blocking."""
        images = images.to(self.device, non_blocking=True)
        if not self.amp and images.dtype != torch.float32:
            images = images.float()
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        if labels is None:
            return images
        return images, labels.to(self.device, non_blocking=True)


def train_step(model, optimizer, images, labels, *, runtime: Runtime,
               after_backward=None) -> torch.Tensor:
    """One SGD step: what train runs and the benchmarks time. images (B, 3, H, W) as
    runtime.batch hands them on. after_backward: what the parallel mode runs before the
    optimiser (parallel.Parallel.after_backward). Returns the loss, detached, on the device:
    reading it is a CPU-GPU sync point, so callers read it at log points only."""
    with runtime.autocast():
        loss = F.cross_entropy(model(images).float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if after_backward is not None:
        after_backward()
    optimizer.step()
    return loss.detach()
