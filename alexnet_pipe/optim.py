"""The paper's optimiser and schedule, for train and the benchmarks that time its step: SGD
with momentum 0.9 and weight decay 5e-4 (biases at twice the learning rate and without decay:
the author's rule), the learning rate divided by 10 when the validation error stops improving."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from alexnet_base.config import TrainConfig


def param_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict]:
    """SGD parameter groups. author: biases at twice the learning rate and without weight decay
    (cuda-convnet2's epsB/wcB, Caffe's reference AlexNet); uniform: every parameter alike."""
    if config.bias_rule == "uniform":
        return [{"params": list(model.parameters()), "weight_decay": config.weight_decay}]
    weights = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights, "weight_decay": config.weight_decay},
            {"params": biases, "weight_decay": 0.0, "lr": 2 * config.lr}]


# The paper's recipe: TrainConfig's defaults, for a step timed outside a run
PAPER = SimpleNamespace(lr=TrainConfig.lr, momentum=TrainConfig.momentum,
                        weight_decay=TrainConfig.weight_decay, bias_rule=TrainConfig.bias_rule)


def sgd(model: torch.nn.Module, config=PAPER) -> torch.optim.SGD:
    """The run's SGD (a TrainConfig), or the paper's."""
    return torch.optim.SGD(param_groups(model, config), lr=config.lr, momentum=config.momentum)


def scheduler(optimizer, config: TrainConfig):
    """ReduceLROnPlateau on the centre-crop top-1 error: x lr_factor after lr_patience epochs
    without a better one, at most max_lr_drops times."""
    floor = config.lr_factor ** config.max_lr_drops
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=config.lr_factor,
        patience=config.lr_patience - 1,  # torch drops after patience + 1 epochs without gain
        threshold=1e-4, min_lr=[g["lr"] * floor for g in optimizer.param_groups])
