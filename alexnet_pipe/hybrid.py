"""--parallel hybrid: data-parallel convolutions, model-parallel fully connected layers
(Krizhevsky, "One weird trick for parallelizing convolutional neural networks", arXiv:1404.5997,
scheme (a): every rank's pooled features go to every rank, which runs its slice of the fully
connected layers on the whole K x B batch).

Each of K ranks holds:
    features        the whole convolution trunk (replicated: its gradients are all-reduced)
    fc6             rows P_k of the paper's fc6 (its output neurons P_k), bias included
    fc7             columns P_k of fc7's weight: the partial sums of fc7 over the inputs it owns
    fc7_bias, fc8   replicated, applied to the rank's own B examples
One training step's collectives, in this order on every rank:
    forward   all-gather of the pooled features      (B, 9216) -> (K*B, 9216)
              reduce-scatter of fc7's partial sums   (K*B, 4096) -> own (B, 4096)
    backward  all-gather of fc7's output gradients   (B, 4096) -> (K*B, 4096)
              reduce-scatter of the feature gradients (K*B, 9216) -> own (B, 9216)
    during    all-reduces of the replicated gradients (about 6.4 M values at 1000 classes), in
              buckets started as their gradients are ready (overlapping the backward)
against DDP's all-reduce of all 61 M. Half-precision partial sums are reduced in float32. The
checkpoint holds the one-model (grouped) layout.

Dropout masks are drawn for the whole K*B batch from a generator seeded by (seed, step, layer),
the same on every rank, and each rank uses its part: the result does not depend on K.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from alexnet_pipe.model import FC_WIDTH as WIDTH, AlexNet, keep_mask, layer, param_name


def _all_gather(out: torch.Tensor, x: torch.Tensor, group) -> None:
    """x (n, ...) of every rank into out (K*n, ...), in rank order (torch >= 2.13 renamed it)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)


def _reduce_scatter(x: torch.Tensor, world: int, group) -> torch.Tensor:
    """Rows k*n:(k+1)*n of x (K*n, ...) summed over ranks: rank k's (n, ...), in x's dtype.
    Half-precision values (autocast) are summed in float32, rounded once at the end as one
    process's GEMM rounds its sum once, not once per rank."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32)).contiguous()
    out = wide.new_empty((x.shape[0] // world, *x.shape[1:]))
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, wide, group=group)
    return out.to(x.dtype)


class _GatherBatch(torch.autograd.Function):
    """Forward: every rank's (B, F) -> (K*B, F) in rank order. Backward: the gradient's rows of
    each rank, summed over ranks (the adjoint of an all-gather is a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group, ctx.world = group, world
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _all_gather(out, x.contiguous(), group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.world, ctx.group), None, None


class _ScatterBatch(torch.autograd.Function):
    """Forward: (K*B, F) partial sums -> this rank's rows (B, F) summed over ranks. Backward:
    the rows' gradients of every rank gathered (the adjoint of a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group, ctx.world = group, world
        return _reduce_scatter(x, world, group)

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((ctx.world * grad.shape[0], *grad.shape[1:]))
        _all_gather(out, grad.contiguous(), ctx.group)
        return out, None, None


def slices(width: int, world: int) -> list[slice]:
    """Each rank's neurons of a layer `width` wide: contiguous, sizes differing by at most 1."""
    bounds = [width * k // world for k in range(world + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


# grouped (AlexNet) parameter -> (hybrid parameter, dim it is cut along or None: replicated)
_FC = {param_name("fc6"): ("fc6.weight", 0), param_name("fc6", "bias"): ("fc6.bias", 0),
       param_name("fc7"): ("fc7.weight", 1), param_name("fc7", "bias"): ("fc7_bias", None),
       param_name("fc8"): ("fc8.weight", None), param_name("fc8", "bias"): ("fc8.bias", None)}


BUCKET_VALUES = 1 << 20  # gradient values a bucket holds (4 MB in float32): fc8's bucket is
# sent while the backward goes on through fc7, fc6 and the trunk; conv5, conv4 and conv3 each
# while the layers below them run (DDP's buckets hold 25 MB: its first bucket is all of fc8)


class _Buckets:
    """The replicated parameters' gradients averaged over ranks while the backward goes on, as
    DDP's buckets are: each bucket's all-reduce starts, asynchronously, once the last of its
    gradients is accumulated (a hook), in the order the backward produces them, which is the
    same on every rank; `finish()` waits for each and writes the averages back. The values
    are those of one all-reduce of all of them: each is the sum of the ranks' gradients."""

    def __init__(self, params: list, world: int, process_group):
        self.params, self.world, self.process_group = params, world, process_group
        self.buckets, size = [[]], 0
        for p in reversed(params):  # the backward's order: the last layer's gradients first
            if self.buckets[-1] and size + p.numel() > BUCKET_VALUES:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel()
        self.bucket_of = {p: i for i, bucket in enumerate(self.buckets) for p in bucket}
        self._sent: list = [None] * len(self.buckets)    # (work, flat gradients) once started
        self._waiting = [len(b) for b in self.buckets]  # gradients not accumulated yet
        for p in params:
            p.register_post_accumulate_grad_hook(self._accumulated)

    def _accumulated(self, p) -> None:
        i = self.bucket_of[p]
        self._waiting[i] -= 1
        if self._waiting[i] == 0:
            self._send(i)

    def _send(self, i: int) -> None:
        grads = [p.grad.reshape(-1) for p in self.buckets[i] if p.grad is not None]
        flat = torch.cat(grads) if grads else None
        work = dist.all_reduce(flat, group=self.process_group, async_op=True) if grads else None
        self._sent[i] = (work, flat)

    def finish(self) -> None:
        for i, bucket in enumerate(self.buckets):
            if self._sent[i] is None:  # a gradient set outside a backward: sent now, in order
                self._send(i)
            work, flat = self._sent[i]
            if work is None:
                continue
            work.wait()
            flat /= self.world
            offset = 0
            for p in bucket:
                if p.grad is not None:
                    n = p.grad.numel()
                    p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                    offset += n
        self._sent = [None] * len(self.buckets)
        self._waiting = [len(b) for b in self.buckets]


class HybridAlexNet(nn.Module):
    """The paper's network (`AlexNet`) split across the `world` ranks of `process_group` (None:
    the default group) as the module docstring says. Input: this rank's (B, 3, H, W); output:
    its (B, num_classes) logits. B is the same on every rank. `seed`: the dropout masks'
    stream; `draws`: steps drawn so far."""

    def __init__(self, grouped: AlexNet, *, rank: int, world: int, process_group=None,
                 seed: int = 0):
        super().__init__()
        self.rank, self.world, self.process_group, self.seed = rank, world, process_group, seed
        self.draws = 0
        self.part = slices(WIDTH, world)[rank]
        self.p = grouped.classifier.drop6.p  # the paper's dropout probability, both layers
        width = self.part.stop - self.part.start
        self.features = grouped.features  # the same modules: the same names in the checkpoint
        like = next(grouped.parameters())
        kw = dict(device=like.device, dtype=like.dtype)
        # no initialisation (it would draw from torch's generator): the grouped model's values
        self.fc6 = skip_init(nn.Linear, layer(grouped, "fc6").in_features, width, **kw)
        self.fc7 = skip_init(nn.Linear, width, WIDTH, bias=False, **kw)
        self.fc7_bias = nn.Parameter(torch.empty(WIDTH, **kw))
        self.fc8 = skip_init(nn.Linear, WIDTH, layer(grouped, "fc8").out_features, **kw)
        self.load_grouped_state_dict(grouped.state_dict())
        self.grouped_count = sum(p.numel() for p in grouped.parameters())
        self._trunk = None   # a compiled trunk (compile_trunk), kept out of the state dict
        self._eval = None    # the whole classifier's weights, gathered for evaluation
        self._buckets = _Buckets(self.replicated_parameters(), world, process_group)

    # --- layout: the one-model (grouped) state dict on disk ------------------------------------

    def _owned(self, name: str):
        """(this module's parameter for grouped `name`, dim it is cut along or None)."""
        if name in _FC:
            own, dim = _FC[name]
            return self.get_parameter(own), dim
        return self.get_parameter(name), None

    def _cut(self, full: torch.Tensor, dim) -> torch.Tensor:
        return full if dim is None else full.narrow(dim, self.part.start,
                                                    self.part.stop - self.part.start)

    def grouped_names(self) -> list[str]:
        return [f"features.{n}" for n, _ in self.features.named_parameters()] + list(_FC)

    def grouped_layout(self) -> dict:
        """{parameter: the grouped parameter it is (a slice of)}."""
        return {self._owned(n)[0]: n for n in self.grouped_names()}

    def load_grouped_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name in self.grouped_names():
                own, dim = self._owned(name)
                own.copy_(self._cut(state[name], dim).to(own.device))

    def cut_grouped(self, full: dict) -> dict:
        """{grouped name: whole tensor} -> {this rank's parameter: its part} (no communication)."""
        return {self._owned(n)[0]: self._cut(t, self._owned(n)[1]) for n, t in full.items()}

    def gather_grouped(self, values: dict, *, keep: bool = True) -> dict:
        """{this rank's parameter: tensor shaped like it} -> {grouped name: whole tensor, on the
        CPU}: a collective for every cut parameter, entered by every rank in the same order.
        keep=False: this rank only sends its slices (what a rank that writes nothing does) and
        gets {}: nothing is copied to its host."""
        whole = self._gather_on_device(values)
        return {name: t.cpu() for name, t in whole.items()} if keep else {}

    def _gather_on_device(self, values: dict) -> dict:
        out = {}
        for name in self.grouped_names():
            own, dim = self._owned(name)
            if own not in values:
                continue
            value = values[own].detach()
            out[name] = value if dim is None else self._gather_cut(value, dim)
        return out

    def _gather_cut(self, value: torch.Tensor, dim: int) -> torch.Tensor:
        parts = slices(WIDTH, self.world)
        most = max(p.stop - p.start for p in parts)
        v = value.movedim(dim, 0)
        padded = v.new_zeros((most, *v.shape[1:]))
        padded[:v.shape[0]] = v
        everyone = padded.new_empty((self.world * most, *v.shape[1:]))
        _all_gather(everyone, padded.contiguous(), self.process_group)
        rows = [everyone[k * most:k * most + p.stop - p.start] for k, p in enumerate(parts)]
        return torch.cat(rows).movedim(0, dim)

    def grouped_state_dict(self) -> dict:
        """The grouped model's state dict (a collective: every rank)."""
        return self.gather_grouped({p: p for p in self.parameters()})

    def replicated_parameters(self) -> list[nn.Parameter]:
        """The parameters every rank holds whole (all-reduced): the same on every rank."""
        return [self._owned(n)[0] for n in self.grouped_names() if self._owned(n)[1] is None]

    # --- training ---------------------------------------------------------------------------------

    def compile_trunk(self, mode: str) -> None:
        """torch.compile the convolutions only: the collectives stay outside the graph."""
        # a plain attribute, not a submodule: the state dict keeps its names
        object.__setattr__(self, "_trunk", torch.compile(self.features, dynamic=False, mode=mode))

    def _masks(self, rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Dropout keep-masks (K*rows, 4096) for fc6's and fc7's outputs, the same on every rank
        and for every K: the one-process model's (model.keep_mask: (seed, step, layer))."""
        return tuple(keep_mask(self.seed, self.draws, layer, self.world * rows, WIDTH, self.p,
                               device) for layer in (6, 7))

    def forward(self, x):
        h = torch.flatten((self._trunk or self.features)(x), 1)   # (B, 9216)
        if not self.training:
            return self._evaluate(h)
        b = h.shape[0]
        keep6, keep7 = self._masks(b, h.device)
        self.draws += 1
        scale = 1.0 / (1.0 - self.p) if self.p < 1 else 0.0
        z = _GatherBatch.apply(h, self.process_group, self.world)       # (K*B, 9216)
        z = torch.relu(self.fc6(z))                                     # (K*B, |P_k|)
        z = z * (keep6[:, self.part] * scale).to(z.dtype)
        z = F.linear(z, self.fc7.weight)                                # (K*B, 4096) partial
        z = _ScatterBatch.apply(z, self.process_group, self.world)      # (B, 4096) summed
        z = torch.relu(z + self.fc7_bias)
        rows = slice(self.rank * b, (self.rank + 1) * b)
        z = z * (keep7[rows] * scale).to(z.dtype)
        return self.fc8(z)

    def reduce_gradients(self) -> None:
        """After backward, before the optimiser: every gradient becomes that of the mean loss over
        all K*B examples, as DDP's are. The replicated ones are averaged over ranks by the
        buckets' all-reduces, started during the backward (_Buckets); each rank's own slices
        already hold the sum over all ranks' losses."""
        self._buckets.finish()
        owned = set(map(id, self._buckets.params))
        for p in self.parameters():
            if p.grad is not None and id(p) not in owned:
                p.grad /= self.world

    # --- evaluation: each rank on its own images, with the whole classifier ----------------------

    def train(self, mode: bool = True):
        """Back to training drops the gathered classifier (its weights change from here)."""
        super().train(mode)
        if mode:
            self._eval = None
        return self

    def gather_classifier(self) -> None:
        """The whole classifier on this rank's device, for evaluation without communication per
        batch: a collective, which every rank enters together (parallel.before_evaluation)."""
        with torch.no_grad():
            trunk = set(self.features.parameters())
            whole = self._gather_on_device({p: p for p in self.parameters() if p not in trunk})
        self._eval = [whole[n] for n in _FC]

    def _evaluate(self, h):
        if self._eval is None:
            raise RuntimeError("HybridAlexNet in eval mode needs gather_classifier() first, on "
                               "every rank (parallel.before_evaluation)")
        w6, b6, w7, b7, w8, b8 = self._eval
        z = torch.relu(F.linear(h, w6, b6))
        z = torch.relu(F.linear(z, w7, b7))
        return F.linear(z, w8, b8)
