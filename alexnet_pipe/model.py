"""AlexNet as in Krizhevsky, Sutskever & Hinton (2012), and torchvision's one-tower variant.

`AlexNet` holds both towers on one device as grouped convolutions (groups=2 in conv2, conv4,
conv5; LRN within a tower). `TowerAlexNet` is the paper's model parallelism: tower A and tower B
on two devices, activations crossing where the paper's network crosses (into conv3 and into each
fully connected layer). Both share one parameter layout (`state_dict` of AlexNet), so a checkpoint
of either loads into the other.

Input: (B, 3, 224, 224) or (B, 3, 227, 227), NCHW float on the 0-255 scale minus the mean.
With 224, conv1 pads 3 px of zeros on the right and bottom, as the author's cuda-convnet2 does,
so its output is 55x55 as in the paper (227 needs no padding). Other crops of at least
MIN_CROP px work too, fc6 taking the pooled map they give (`pooled_side`): the paper's 6x6
from 224 and from 227 to 258 px.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from alexnet_base.config import MIN_CROP

LRN = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)  # alpha divided by n, as torch and cuda-convnet2
FC_WIDTH = 4096  # fc6's and fc7's outputs (the paper)


def _window_mean(v: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, H, W) -> the mean of `v` over the n = LRN["size"] channels around each channel
    within its group, zeros beyond a group's edge counted (torch's alpha is over n). One average
    pool over a view in which each group's channels are the rows: channels_last memory gives
    (N*H*W*G, 1, 1, C/G) rows, NCHW (N*G, 1, C/G, H*W) columns; neither view copies."""
    n, c, h, w = v.shape
    size, half, per = LRN["size"], LRN["size"] // 2, c // groups
    if torch.compiler.is_compiling():  # a sum of shifted slices: one fused pass for inductor,
        # which also fails to lower the column pool on CPUs (torch 2.13: "vr must not be None")
        padded = F.pad(v.unflatten(1, (groups, per)), (0, 0, 0, 0, half, half))
        window = sum(padded[:, :, i:i + per] for i in range(size))
        return (window / size).flatten(1, 2)
    if v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous():
        rows = v.permute(0, 2, 3, 1).reshape(-1, 1, 1, per)  # a view: HWC memory
        window = F.avg_pool2d(rows, (1, size), stride=1, padding=(0, half))
        return window.view(n, h, w, c).permute(0, 3, 1, 2)
    cols = v.reshape(n * groups, 1, per, h * w)
    window = F.avg_pool2d(cols, (size, 1), stride=1, padding=(half, 0))
    return window.view(n, c, h, w)


class GroupLRN(nn.Module):
    """Local response normalisation within each of `groups` channel groups (towers):
    b_c = a_c / (k + alpha/n * sum of a_c'^2 over the n channels around c in its group) ** beta.

    The window sum is `_window_mean`'s one pool (torch's own module pads and pools in 3-D per
    group, with a copy of each group). On a GPU, `fused` runs `LRNFunction`: forward and
    backward each one compiled pass; the CPU keeps this reference."""

    def __init__(self, groups: int = 2, fused: bool = True):
        super().__init__()
        self.groups, self.fused = groups, fused

    def forward(self, x):
        if self.fused and x.is_cuda:
            return LRNFunction.apply(x, self.groups)
        # Computed in float32 (the sum of squares; autocast runs its pow in float32 anyway) and
        # handed on in the input's dtype: under autocast the pool and conv2 then read bf16,
        # not a float32 copy twice the size.
        a = x.to(torch.promote_types(x.dtype, torch.float32))
        scale = _window_mean(a * a, self.groups).mul(LRN["alpha"]).add_(LRN["k"]).pow(-LRN["beta"])
        return (a * scale).to(x.dtype)


def _lrn_scale(a, groups: int):
    """s = k + alpha * the window mean of a^2 (a in float32 or wider): the denominator's base."""
    return _window_mean(a * a, groups) * LRN["alpha"] + LRN["k"]


def _lrn_forward(x, groups: int):
    """b in x's dtype; the arithmetic in float32 or wider."""
    a = x.to(torch.promote_types(x.dtype, torch.float32))
    return (a * _lrn_scale(a, groups).pow(-LRN["beta"])).to(x.dtype)


def _lrn_backward(x, grad, groups: int):
    """dL/da_j = g_j s_j^-beta - 2 alpha beta a_j * window mean of (g_c a_c s_c^(-beta-1)):
    the window is symmetric, so the channels c whose window holds j are j's own window. s is
    recomputed from x, which this pass reads anyway: keeping it from the forward would cost a
    float32 tensor twice the size of a bf16 input, written and read once each a step."""
    a = x.to(torch.promote_types(x.dtype, torch.float32))
    g = grad.to(a.dtype)
    s = _lrn_scale(a, groups)
    scale = s.pow(-LRN["beta"])
    t = g * a * scale / s
    out = g * scale - (2 * LRN["alpha"] * LRN["beta"]) * a * _window_mean(t, groups)
    return out.to(x.dtype)


_COMPILED: dict = {}


def _compiled(fn):
    """fn compiled once per process (on GPUs), or as it is inside a graph being compiled. If
    the first compiled call fails (no working compiler or Triton here), the same math runs
    eager from then on, said once on stderr: a run is never lost to the LRN's speed-up."""
    if torch.compiler.is_compiling():
        return fn
    if fn not in _COMPILED:
        compiled = torch.compile(fn, dynamic=False)

        def first_call(*args):
            try:
                out = compiled(*args)
            except Exception as e:  # noqa: BLE001 - any compiler failure: keep training
                import sys
                first = (str(e).strip().splitlines() or [""])[0][:200]
                print(f"warning: the fused LRN could not be compiled ({type(e).__name__}: "
                      f"{first}); it runs eager, slower", file=sys.stderr, flush=True)
                _COMPILED[fn] = fn
                return fn(*args)
            _COMPILED[fn] = compiled
            return out
        _COMPILED[fn] = first_call
    return _COMPILED[fn]


class LRNFunction(torch.autograd.Function):
    """GroupLRN's formula with its gradient written out: forward and backward each one fused
    pass, keeping only the input for the backward (bf16 in and out, float32 arithmetic under
    autocast). `compile`: torch.compile the two passes (GPUs); off, the same math eager (the
    CPU's tests compare it with the formula in float64)."""

    @staticmethod
    def forward(ctx, x, groups: int, compile: bool = True):
        fwd = _compiled(_lrn_forward) if compile else _lrn_forward
        ctx.save_for_backward(x)
        ctx.groups, ctx.compile = groups, compile
        return fwd(x, groups)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        bwd = _compiled(_lrn_backward) if ctx.compile else _lrn_backward
        return bwd(x, grad, ctx.groups), None, None


def keep_mask(seed: int, step: int, layer: int, rows: int, cols: int, p: float,
              device) -> torch.Tensor:
    """The dropout keep-mask (rows, cols) bool of layer `layer` (6: fc6's outputs, 7: fc7's) at
    optimiser step `step`, for the `rows` rows of the global batch: from a generator on `device`
    seeded by (seed, step, layer), the same on every rank and for any number of ranks."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, step, layer]).generate_state(1, np.uint64)[0]
                      & (2**63 - 1)))
    return torch.rand((rows, cols), generator=g, device=device) >= p


class GlobalDropout(nn.Module):
    """Dropout whose mask is a function of the seed, the step and the row of the global batch
    (keep_mask), not of the rank or the number of ranks: this rank's rows are the rank-th of
    `world` equal slices of the global batch, its columns `cols` of the `width` the mask is
    drawn for (a tower: its half of fc6's or fc7's outputs). `layer` keys the mask (6: before
    fc7 in the paper's model, 7: before fc8; the one-tower model drops fc6's and fc7's inputs).
    Scaled by 1 / (1 - p) in training, the identity in evaluation. `seed`, `rank`, `world` are
    set by the parallel mode (parallel.Parallel.build); `draws` counts the steps drawn, set
    from the step on resume."""

    def __init__(self, p: float, layer: int, width: int = FC_WIDTH, cols: slice = slice(None)):
        super().__init__()
        self.p, self.layer, self.width, self.cols = p, layer, width, cols
        self.seed, self.rank, self.world, self.draws = 0, 0, 1, 0

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        return x * self._scaled_mask(x.shape[0], x.device).to(x.dtype)

    @torch.compiler.disable  # a Python counter and a seeded generator: outside any graph
    def _scaled_mask(self, rows: int, device) -> torch.Tensor:
        mask = keep_mask(self.seed, self.draws, self.layer, rows * self.world, self.width, self.p,
                         device)[self.rank * rows:(self.rank + 1) * rows, self.cols]
        self.draws += 1
        return mask * (1.0 / (1.0 - self.p))


def _conv1_pad(crop: int) -> nn.Module:
    return nn.ZeroPad2d((0, 3, 0, 3)) if crop == 224 else nn.Identity()


def pooled_side(crop: int) -> int:
    """The side of pool5's map for a `crop` px input: conv1 (11, stride 4, after the 224 px
    crop's padding), then three 3x3 stride-2 max pools; the 3x3 and 5x5 convolutions keep the
    size. 6 for the paper's crops."""
    if crop < MIN_CROP:  # train's options refuse it (TrainConfig.validate)
        raise ValueError(f"crop {crop}: pool5 is empty below {MIN_CROP} px")
    side = ((crop + 3 if crop == 224 else crop) - 11) // 4 + 1
    for _ in range(3):
        side = (side - 3) // 2 + 1
    return side


CONVS = ("conv1", "conv2", "conv3", "conv4", "conv5")  # the layers with weights, in order:
FCS = ("fc6", "fc7", "fc8")                             # every model's names for them
LAYERS = CONVS + FCS


def _named(*layers) -> nn.Sequential:
    """nn.Sequential of (name, module) pairs: its parameters are NAME.weight, NAME.bias."""
    return nn.Sequential(OrderedDict(layers))


def relu() -> nn.ReLU:
    return nn.ReLU(inplace=True)


class AlexNet(nn.Module):
    """The paper's network, two towers as groups=2. 60,965,224 parameters at 1000 classes.
    features: conv1 ... pool5, (B, 3, crop, crop) -> (B, 256, side, side); classifier: fc6 ...
    fc8, (B, 256 * side^2) -> (B, classes). Parameters by name: features.conv1.weight, ...,
    classifier.fc8.bias (layer() finds a layer by its name)."""

    def __init__(self, num_classes: int = 1000, crop: int = 224, dropout: float = 0.5):
        super().__init__()
        self.features = _named(
            ("pad", _conv1_pad(crop)),
            ("conv1", nn.Conv2d(3, 96, 11, stride=4)), ("relu1", relu()),
            ("lrn1", GroupLRN(2)),                                              # 96x55x55
            ("pool1", nn.MaxPool2d(3, 2)),                                      # 96x27x27
            ("conv2", nn.Conv2d(96, 256, 5, padding=2, groups=2)), ("relu2", relu()),
            ("lrn2", GroupLRN(2)),
            ("pool2", nn.MaxPool2d(3, 2)),                                      # 256x13x13
            ("conv3", nn.Conv2d(256, 384, 3, padding=1)), ("relu3", relu()),   # both towers
            ("conv4", nn.Conv2d(384, 384, 3, padding=1, groups=2)), ("relu4", relu()),
            ("conv5", nn.Conv2d(384, 256, 3, padding=1, groups=2)), ("relu5", relu()),
            ("pool5", nn.MaxPool2d(3, 2)),                                      # 256x6x6
        )
        self.classifier = _named(
            ("fc6", nn.Linear(256 * pooled_side(crop) ** 2, FC_WIDTH)), ("relu6", relu()),
            ("drop6", GlobalDropout(dropout, 6)),
            ("fc7", nn.Linear(FC_WIDTH, FC_WIDTH)), ("relu7", relu()),
            ("drop7", GlobalDropout(dropout, 7)),
            ("fc8", nn.Linear(FC_WIDTH, num_classes)),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class AlexNetOWT(nn.Module):
    """torchvision's single-tower AlexNet ("One weird trick", Krizhevsky 2014): no LRN. The
    same layer names as AlexNet; torchvision's own keys (features.0, ...) in TORCHVISION_KEYS."""

    def __init__(self, num_classes: int = 1000, crop: int = 224, dropout: float = 0.5):
        super().__init__()
        self.features = _named(
            ("conv1", nn.Conv2d(3, 64, 11, stride=4, padding=2)), ("relu1", relu()),
            ("pool1", nn.MaxPool2d(3, 2)),
            ("conv2", nn.Conv2d(64, 192, 5, padding=2)), ("relu2", relu()),
            ("pool2", nn.MaxPool2d(3, 2)),
            ("conv3", nn.Conv2d(192, 384, 3, padding=1)), ("relu3", relu()),
            ("conv4", nn.Conv2d(384, 256, 3, padding=1)), ("relu4", relu()),
            ("conv5", nn.Conv2d(256, 256, 3, padding=1)), ("relu5", relu()),
            ("pool5", nn.MaxPool2d(3, 2)),
            ("avgpool", nn.AdaptiveAvgPool2d((6, 6))),
        )
        self.classifier = _named(
            ("drop6", GlobalDropout(dropout, 6, 256 * 6 * 6)),
            ("fc6", nn.Linear(256 * 6 * 6, 4096)),
            ("relu6", relu()),
            ("drop7", GlobalDropout(dropout, 7)), ("fc7", nn.Linear(4096, 4096)),
            ("relu7", relu()),
            ("fc8", nn.Linear(4096, num_classes)),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def layer(model: nn.Module, name: str) -> nn.Module:
    """AlexNet's or AlexNetOWT's layer `name` (LAYERS: conv1 ... fc8)."""
    return getattr(model.features if name in CONVS else model.classifier, name)


def param_name(name: str, kind: str = "weight") -> str:
    """The state dict key of layer `name`'s weight or bias: features.conv1.weight, ..."""
    return f"{'features' if name in CONVS else 'classifier'}.{name}.{kind}"


# Checkpoints written before the layers had names (2026-12-07) hold nn.Sequential indices:
INDEX_NAMES = {  # arch: {old "features.N" / "classifier.N": its layer's name}
    "alexnet": dict(zip(("features.1", "features.5", "features.9", "features.11",
                         "features.13", "classifier.0", "classifier.3", "classifier.6"),
                        LAYERS)),
    "alexnet-owt": dict(zip(("features.0", "features.3", "features.6", "features.8",
                             "features.10", "classifier.1", "classifier.4", "classifier.6"),
                            LAYERS)),
}
TORCHVISION_KEYS = {param_name(n, k): f"{old}.{k}" for old, n in INDEX_NAMES["alexnet-owt"].items()
                    for k in ("weight", "bias")}  # ours -> torchvision.models.alexnet's


def named_state(arch: str, state: dict) -> dict:
    """A state dict with the layers' names for keys, whichever the checkpoint was written with
    (INDEX_NAMES); the values as they are."""
    old = INDEX_NAMES[arch]

    def rename(key: str) -> str:
        prefix, _, kind = key.rpartition(".")
        return param_name(old[prefix], kind) if prefix in old else key
    return {rename(k): v for k, v in state.items()}


PAPER_BIAS_ONE = ("conv2", "conv4", "conv5", "fc6", "fc7")  # the paper's biases of 1


def init_paper(model: nn.Module, bias_init: str = "paper") -> None:
    """Weights N(0, 0.01); biases 1 (paper) or 0.1 (Caffe) in conv2, conv4, conv5 and the hidden
    FC layers, 0 elsewhere (conv1, conv3, the last layer). Drawn in the layers' order."""
    for name in LAYERS:
        m = layer(model, name)
        nn.init.normal_(m.weight, 0.0, 0.01)
        one = 1.0 if bias_init == "paper" else 0.1
        nn.init.constant_(m.bias, one if name in PAPER_BIAS_ONE else 0.0)


def build_model(arch: str = "alexnet", num_classes: int = 1000, crop: int = 224,
                bias_init: str = "paper", dropout: float = 0.5) -> nn.Module:
    cls = {"alexnet": AlexNet, "alexnet-owt": AlexNetOWT}[arch]
    model = cls(num_classes=num_classes, crop=crop, dropout=dropout)
    if arch == "alexnet":
        init_paper(model, bias_init)
    return model


def input_dtype(images: torch.Tensor, amp: bool) -> torch.Tensor:
    """Without autocast the float32 weights take float32 input: bfloat16/float16 images from the
    loader (--dtype) are cast back (autocast does this itself)."""
    return images if amp or images.dtype == torch.float32 else images.float()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- the paper's model parallelism ----------------------------------------------------------------

class _Tower(nn.Module):
    """Half of every layer, on one device. conv3 and the FC layers take both towers' inputs."""

    def __init__(self, num_out: int, crop: int, dropout: float, tower: int):
        super().__init__()
        self.lower = _named(   # conv1, conv2: own tower only
            ("pad", _conv1_pad(crop)), ("conv1", nn.Conv2d(3, 48, 11, stride=4)),
            ("relu1", relu()), ("lrn1", GroupLRN(1)), ("pool1", nn.MaxPool2d(3, 2)),
            ("conv2", nn.Conv2d(48, 128, 5, padding=2)), ("relu2", relu()),
            ("lrn2", GroupLRN(1)), ("pool2", nn.MaxPool2d(3, 2)))
        self.conv3 = nn.Conv2d(256, 192, 3, padding=1)  # sees both towers
        self.upper = _named(   # conv4, conv5: own tower only
            ("relu3", relu()), ("conv4", nn.Conv2d(192, 192, 3, padding=1)), ("relu4", relu()),
            ("conv5", nn.Conv2d(192, 128, 3, padding=1)), ("relu5", relu()),
            ("pool5", nn.MaxPool2d(3, 2)))
        self.fc6 = nn.Linear(256 * pooled_side(crop) ** 2, FC_WIDTH // 2)
        self.fc7 = nn.Linear(FC_WIDTH, FC_WIDTH // 2)
        self.fc8 = nn.Linear(FC_WIDTH, num_out)
        half = slice(0, FC_WIDTH // 2) if tower == 0 else slice(FC_WIDTH // 2, FC_WIDTH)
        self.drop6 = GlobalDropout(dropout, 6, cols=half)  # its neurons' columns of the masks
        self.drop7 = GlobalDropout(dropout, 7, cols=half)


class TowerAlexNet(nn.Module):
    """AlexNet with tower A on devices[0] and tower B on devices[1]; output on devices[0]."""

    def __init__(self, num_classes: int = 1000, crop: int = 224, dropout: float = 0.5,
                 devices=("cpu", "cpu")):
        super().__init__()
        self.devices = [torch.device(d) for d in devices]
        self.logits_a = (num_classes + 1) // 2  # tower A computes the first half of the logits
        self.towers = nn.ModuleList([_Tower(self.logits_a, crop, dropout, 0),
                                     _Tower(num_classes - self.logits_a, crop, dropout, 1)])
        for tower, device in zip(self.towers, self.devices):
            tower.to(device)

    def _both(self, parts, fn):
        """Each tower applies fn to the concatenation of both towers' activations (a crossing)."""
        a, b = self.devices
        return [fn(self.towers[0], torch.cat([parts[0], parts[1].to(a)], 1)),
                fn(self.towers[1], torch.cat([parts[0].to(b), parts[1]], 1))]

    def forward(self, x):
        kind = x.device.type
        if torch.is_autocast_enabled(kind):  # conv1 casts it anyway: cross in half the bytes
            x = x.to(torch.get_autocast_dtype(kind))
        h = [t.lower(x.to(d)) for t, d in zip(self.towers, self.devices)]
        h = self._both(h, lambda t, z: t.upper(t.conv3(z)))
        h = [torch.flatten(z, 1) for z in h]
        h = self._both(h, lambda t, z: t.drop6(torch.relu(t.fc6(z))))
        h = self._both(h, lambda t, z: t.drop7(torch.relu(t.fc7(z))))
        out = self._both(h, lambda t, z: t.fc8(z))
        return torch.cat([out[0], out[1].to(self.devices[0])], 1)

    # The grouped AlexNet's state_dict is the one layout on disk: each layer's tower module,
    # and how its parameters are halved (conv: output channels; out: output neurons; logits:
    # tower A takes logits_a of them)
    _MAP = [("conv1", "lower.conv1", "conv"), ("conv2", "lower.conv2", "conv"),
            ("conv3", "conv3", "out"), ("conv4", "upper.conv4", "conv"),
            ("conv5", "upper.conv5", "conv"), ("fc6", "fc6", "out"), ("fc7", "fc7", "out"),
            ("fc8", "fc8", "logits")]

    def _halves(self, n: int, kind: str) -> list[slice]:
        k = self.logits_a if kind == "logits" else n // 2
        return [slice(0, k), slice(k, n)]

    def _pieces(self):
        """(grouped name, [tower A's parameter, tower B's], how it is halved), in the grouped
        model's parameter order."""
        for layer_name, t, kind in self._MAP:
            for name in ("weight", "bias"):
                yield (param_name(layer_name, name),
                       [tw.get_parameter(f"{t}.{name}") for tw in self.towers], kind)

    def grouped_names(self) -> list[str]:
        return [name for name, _, _ in self._pieces()]

    def grouped_layout(self) -> dict:
        """{parameter: the grouped parameter it is half of}."""
        return {p: name for name, params, _ in self._pieces() for p in params}

    def gather_grouped(self, values: dict, *, keep: bool = True) -> dict:
        """{parameter: tensor shaped like it} -> {grouped name: both halves joined, on the CPU}
        (one process: `keep` is always so)."""
        return {name: torch.cat([values[p].detach().cpu() for p in params], 0)
                for name, params, _ in self._pieces() if params[0] in values}

    def cut_grouped(self, full: dict) -> dict:
        """{grouped name: whole tensor} -> {parameter: its half}."""
        return {p: full[name][part] for name, params, kind in self._pieces() if name in full
                for p, part in zip(params, self._halves(full[name].shape[0], kind))}

    def load_grouped_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for p, value in self.cut_grouped(state).items():
                p.copy_(value.to(p.device))

    def grouped_state_dict(self) -> dict:
        return self.gather_grouped({p: p for p in self.parameters()})
