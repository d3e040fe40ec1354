"""The parallel mode, decided once (`Parallel.decide`), and everything that depends on it: which
model is built, how it is wrapped and compiled, the devices a step runs on, what its gradients
need after the backward, and the collectives that gather a split model's parameters, which this
owner runs where every rank reaches them together (before an evaluation, when a checkpoint is
taken), never inside `.eval()` or a save helper.

    none    one process, one device
    ddp     torchrun, one process per GPU (or gloo on CPUs); DDP all-reduces the gradients
    towers  one process, the paper's two towers on two devices (model.TowerAlexNet)
    hybrid  torchrun; convolutions data-parallel, fc6/fc7 split over the ranks (hybrid.py)

The unwrapped model (torchvision's `model_without_ddp`) is what checkpoints and restores use;
the wrapped one is what is called.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from alexnet_base.config import TrainConfig
from alexnet_base.errors import UserError
from alexnet_pipe import checkpoint, distributed
from alexnet_pipe.hybrid import HybridAlexNet
from alexnet_pipe.model import GlobalDropout, TowerAlexNet, build_model, layer, param_name
from alexnet_pipe.runtime import Runtime

MODES = ("none", "ddp", "towers", "hybrid")


@runtime_checkable
class SplitModel(Protocol):
    """A model split into parts (the towers, the hybrid's slices) that keeps the grouped
    AlexNet's state dict (model.param_name keys) as the one layout on disk: a run resumes in any
    mode. `values` map this model's own parameters to tensors shaped like them (the parameters,
    their gradients, their momenta)."""

    def grouped_names(self) -> list[str]:
        """The grouped parameters this model holds (a part of), in the grouped model's order."""

    def grouped_layout(self) -> dict:
        """{own parameter: the grouped parameter it is (a part of)}."""

    def gather_grouped(self, values: dict, *, keep: bool = True) -> dict:
        """{own parameter: tensor} -> {grouped name: whole tensor, on the CPU}; the hybrid's is a
        collective (every rank, same order): keep=False takes part and returns {}."""

    def cut_grouped(self, full: dict) -> dict:
        """{grouped name: whole tensor} -> {own parameter: its part} (no communication)."""

    def load_grouped_state_dict(self, state: dict) -> None:
        """Its parts of a grouped state dict, copied in."""


@dataclass(frozen=True)
class Parallel:
    """How this process trains: `mode` (never "auto"), its place among the ranks, the device its
    loaders deliver to."""
    mode: str
    env: distributed.DistEnv
    device: torch.device

    @classmethod
    def decide(cls, config: TrainConfig, env: distributed.DistEnv,
               device: torch.device) -> "Parallel":
        """--parallel and the launch (torchrun or not) -> the mode, or a UserError saying how
        to launch it."""
        mode = config.parallel
        if mode == "auto":
            mode = "ddp" if env.enabled else "none"
        if mode == "towers" and env.enabled:
            raise UserError("--parallel towers runs in one process; launch it without torchrun")
        if mode in ("ddp", "hybrid") and not env.enabled:
            raise UserError(f"--parallel {mode}: launch with torchrun --nproc_per_node N (one "
                            f"process per GPU)" + (", or leave --parallel at auto"
                                                     if mode == "ddp" else ""))
        if mode == "towers":  # the loaders deliver to tower A's device
            distributed.check_devices(config.tower_devices)
            device = torch.device(config.tower_devices[0])
        return cls(mode, env, device)

    @property
    def split(self) -> bool:
        """The model is split into parts (a SplitModel) that keep the grouped layout on disk."""
        return self.mode in ("towers", "hybrid")

    # --- the model ------------------------------------------------------------------------------

    def build(self, config: TrainConfig, num_classes: int, runtime: Runtime) -> torch.nn.Module:
        """The unwrapped model on its device(s) in the runtime's layout, initialised from torch's
        generator (seeded by the caller) as the one-process model is, whatever the mode: the
        same weights in all. Its dropout masks are the global batch's (model.GlobalDropout):
        this rank takes its rows."""
        crop, seed = config.loader.augment.crop, config.loader.seed
        model = build_model(config.arch, num_classes, crop, config.bias_init, config.dropout)
        if self.mode == "towers":
            towers = TowerAlexNet(num_classes, crop, config.dropout, config.tower_devices)
            towers.load_grouped_state_dict(model.state_dict())
            model = runtime.place(towers)  # each tower on its own device
        else:
            model = runtime.place(model.to(self.device))
        ranks = (0, 1) if self.mode == "towers" else (self.env.rank, self.env.world)
        for m in model.modules():
            if isinstance(m, GlobalDropout):
                m.seed, (m.rank, m.world) = seed, ranks
        if self.mode == "hybrid":  # its own masks, drawn alike for the whole global batch
            model = HybridAlexNet(model, rank=self.env.rank, world=self.env.world, seed=seed)
        return model

    def devices(self, model: torch.nn.Module) -> list[torch.device]:
        """The devices a step runs on (whose generators draw dropout masks, whose streams are
        timed): each tower's, else the input's."""
        return list(model.devices) if self.mode == "towers" else [self.device]

    def wrap(self, model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
        """What is called: DDP-wrapped and compiled as configured (after a restore: DDP
        broadcasts rank 0's weights when it wraps). The hybrid compiles its convolutions only:
        its collectives stay outside the graph."""
        if self.mode == "hybrid":
            if config.compile:
                model.compile_trunk(config.compile_mode)
            return model
        if self.mode == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.env.local_rank] if self.device.type == "cuda" else None)
        if not config.compile:
            return model
        return torch.compile(model, dynamic=False, mode=config.compile_mode)

    def after_backward(self, model: torch.nn.Module):
        """What a step runs between the backward and the optimiser's step, or None: the hybrid's
        gradients' all-reduces, started during the backward, waited for (DDP's run inside it)."""
        return model.reduce_gradients if self.mode == "hybrid" else None

    def parameter_count(self, model: torch.nn.Module) -> int:
        """The whole model's, whatever part of it this rank holds."""
        if self.mode == "hybrid":
            return model.grouped_count
        return sum(p.numel() for p in model.parameters())

    def replicated(self, model: torch.nn.Module) -> list:
        """The parameters every rank holds whole: equal on every rank after every step."""
        if self.mode == "hybrid":
            return model.replicated_parameters()
        return list(model.parameters())

    def conv1_weight(self, model: torch.nn.Module) -> torch.Tensor:
        """conv1's kernels, whole (the towers: both halves joined on the host); no collective
        (the hybrid holds conv1 whole on every rank)."""
        if not self.split:
            return layer(model, "conv1").weight
        key = param_name("conv1")
        halves = [p for p, name in model.grouped_layout().items() if name == key]
        return model.gather_grouped({p: p for p in halves})[key]

    # --- the collectives a split model needs, where every rank reaches them -----------------------

    def before_evaluation(self, model: torch.nn.Module) -> None:
        """The hybrid's whole classifier on every rank's device (a collective: every rank, at
        the same place), so that its evaluation needs no communication per batch."""
        if self.mode == "hybrid":
            model.gather_classifier()

    def weights_state(self, model: torch.nn.Module, optimizer, keep: bool) -> tuple | None:
        """(the grouped state dict, the optimiser's state in the grouped layout), what a
        checkpoint holds; the hybrid's a collective on every rank: keep=False (a rank that
        writes nothing) takes part and copies nothing to its host, returning None."""
        if not self.split:
            return (model.state_dict(), optimizer.state_dict()) if keep else None
        weights = model.gather_grouped({p: p for p in model.parameters()}, keep=keep)
        opt = checkpoint.grouped_optimizer_state(optimizer, model, keep=keep)
        return (weights, opt) if keep else None

    def restore(self, state: dict, model: torch.nn.Module, optimizer,
                scheduler) -> checkpoint.Progress:
        """A checkpoint (of any mode: the grouped layout) put back into this mode's model,
        optimiser, scheduler and generators."""
        progress = checkpoint.restore(state, weights=model, optimizer=optimizer,
                                      scheduler=scheduler, devices=self.devices(model),
                                      split=self.split)
        for m in model.modules():  # the dropout masks go on from this step
            if isinstance(m, (GlobalDropout, HybridAlexNet)):
                m.draws = progress.step
        return progress
