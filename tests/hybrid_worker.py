#!/usr/bin/env python3
"""One rank of the hybrid-parallel checks, run by torchrun (gloo, CPU, float64):

    torchrun --nproc_per_node K tests/hybrid_worker.py CHECK[,CHECK...] OUT.json

grads    HybridAlexNet (dropout 0) on all K ranks and on the first two, each rank on its rows of
         one global batch, against the paper's AlexNet in one process on the whole batch: the
         loss, every parameter's gradient, and the weights and momenta after 2 SGD steps
         (momentum, weight decay, the author's bias rule); each rank compares its own slices.
dropout  the same network with dropout 0.5: K ranks against one rank alone on the same global
         batch: the loss and gradients do not depend on K.
ledger   the bytes every collective of one hybrid step and one DDP step carries, counted by
         wrappers around torch.distributed's collectives and DDP's communication hook; the
         order the hybrid step calls them in (its gradients' all-reduces inside the backward:
         overlapping it); the dtypes a hybrid step under bf16 autocast reduces and gathers in.
Rank 0 writes {"world": K, CHECK: {what: value}, ...} to OUT.json (differences: the largest on
any rank).
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from alexnet_base.config import LoaderConfig, TrainConfig  # noqa: E402
from alexnet_pipe.hybrid import HybridAlexNet  # noqa: E402
from alexnet_pipe.model import build_model  # noqa: E402
from alexnet_pipe import optim  # noqa: E402

CLASSES, GLOBAL_BATCH, STEPS = 10, 4, 2
CROP = 112  # a quarter of the paper's pixels (fc6 takes pool5's 2x2): the same checks, cheaper


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(GLOBAL_BATCH, 3, CROP, CROP, generator=g, dtype=torch.float64)
    return x, torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g)


def sgd(model) -> torch.optim.Optimizer:
    config = TrainConfig(loader=LoaderConfig(data=Path(".")), out=Path("."), lr=0.01,
                         momentum=0.9, weight_decay=5e-4)
    return optim.sgd(model, config)


def grouped_model(dropout: float) -> torch.nn.Module:
    torch.manual_seed(1)
    return build_model("alexnet", CLASSES, CROP, "caffe", dropout).double()


def hybrid_step(model, opt, x, y, rank, world) -> torch.Tensor:
    rows = slice(rank * len(y) // world, (rank + 1) * len(y) // world)
    loss = F.cross_entropy(model(x[rows]), y[rows])
    opt.zero_grad()
    loss.backward()
    model.reduce_gradients()
    opt.step()
    return loss.detach()


def mine(model: HybridAlexNet, full: dict, values: dict) -> float:
    """The largest difference between this rank's parameters' `values` and their slices of the
    one-model tensors `full` ({grouped name: tensor}): compared where they are, no gathering."""
    cut = model.cut_grouped(full)
    return max((values[p] - cut[p]).abs().max().item() for p in cut)


def groups(rank: int, world: int) -> list[tuple[int, int, object]]:
    """(rank in group, group size, group) of the splits this rank runs: all ranks, and the
    first two (every rank creates every group, as torch.distributed requires)."""
    pair = dist.new_group([0, 1])
    out = [(rank, world, None)]
    if world > 2 and rank < 2:
        out.append((rank, 2, pair))
    return out


def check_grads(rank: int, world: int) -> dict:
    """Every rank runs the one-process reference itself and compares its own slices."""
    reference = grouped_model(0.0)
    trunk = {n: p.detach().clone() for n, p in reference.named_parameters()
             if n.startswith("features.")}  # where the weights started
    ref_opt = sgd(reference)
    splits = [(HybridAlexNet(copy.deepcopy(reference), rank=r, world=k, process_group=g), r, k, g)
              for r, k, g in groups(rank, world)]
    opts = [sgd(h) for h, *_ in splits]
    out = {"loss": 0.0, "grads": 0.0}
    for step in range(STEPS):
        x, y = batch(step)
        ref_loss = F.cross_entropy(reference(x), y)  # one process, the mean over all K*B
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_grads = {n: p.grad for n, p in reference.named_parameters()}
        ref_opt.step()
        for (hybrid, r, k, g), opt in zip(splits, opts):
            loss = hybrid_step(hybrid, opt, x, y, r, k)
            dist.all_reduce(loss, group=g)  # the ranks' means over their rows, summed
            out["loss"] = max(out["loss"], abs(loss.item() / k - ref_loss.item()))
            out["grads"] = max(out["grads"], mine(hybrid, ref_grads,
                                                  {p: p.grad for p in hybrid.parameters()}))
    final = {n: p.detach() for n, p in reference.named_parameters()}
    momenta = {n: ref_opt.state[p]["momentum_buffer"] for n, p in reference.named_parameters()}
    out["weights"] = max(mine(h, final, {p: p.detach() for p in h.parameters()})
                         for h, *_ in splits)
    out["momentum"] = max(mine(h, momenta, {p: o.state[p]["momentum_buffer"]
                                            for p in h.parameters()})
                          for (h, *_), o in zip(splits, opts))
    out["grad_scale"] = max(p.grad.abs().max().item() for p in reference.parameters())
    out["moved"] = max((final[n] - p).abs().max().item() for n, p in trunk.items())
    out["splits"] = [k for _, _, k, _ in splits]
    return out


def check_dropout(rank: int, world: int) -> dict:
    """K ranks against one rank alone on the whole batch (every rank runs that one itself, in a
    group of its own, and compares its slices)."""
    grouped = grouped_model(0.5)
    x, y = batch(0)
    alone = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    hybrid = HybridAlexNet(copy.deepcopy(grouped), rank=rank, world=world, seed=7)
    rows = slice(rank * len(y) // world, (rank + 1) * len(y) // world)
    loss = F.cross_entropy(hybrid(x[rows]), y[rows])
    loss.backward()
    hybrid.reduce_gradients()
    loss = loss.detach()
    dist.all_reduce(loss)
    one = HybridAlexNet(copy.deepcopy(grouped), rank=0, world=1, process_group=alone[rank],
                        seed=7)
    one_loss = F.cross_entropy(one(x), y)
    one_loss.backward()
    one.reduce_gradients()
    whole = one.gather_grouped({p: p.grad for p in one.parameters()})  # a group of one: local
    # the masks drop something: without them the loss would be another
    plain = F.cross_entropy(grouped.eval()(x), y).item()  # grouped: not used after this
    return {"loss": abs(loss.item() / world - one_loss.item()),
            "grads": mine(hybrid, whole, {p: p.grad for p in hybrid.parameters()}),
            "loss_without_dropout_diff": abs(plain - one_loss.item())}


def check_ledger(rank: int, world: int) -> dict:
    """Bytes per collective kind in one step, counted where they are sent."""
    counted: dict[str, int] = {}
    order, dtypes = [], set()

    def count(kind, tensor):
        counted[kind] = counted.get(kind, 0) + tensor.numel() * tensor.element_size()
        order.append(kind)
        dtypes.add((kind, str(tensor.dtype).removeprefix("torch.")))

    originals = {}

    def wrap(name, kind, which):
        real = getattr(dist, name, None)
        if real is None:
            return
        originals[name] = real

        def counting(*args, **kwargs):
            count(kind, args[which])
            return real(*args, **kwargs)
        setattr(dist, name, counting)

    # all-gather: what each rank contributes (its input); reduce-scatter: its whole input
    wrap("all_gather_single", "all_gather", 1)
    wrap("all_gather_into_tensor", "all_gather", 1)
    wrap("reduce_scatter_single", "reduce_scatter", 1)
    wrap("reduce_scatter_tensor", "reduce_scatter", 1)
    wrap("all_reduce", "all_reduce", 0)
    torch.manual_seed(1)
    per_rank = GLOBAL_BATCH // world
    x, y = batch(0)
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    hybrid = HybridAlexNet(build_model("alexnet", CLASSES, CROP), rank=rank, world=world)
    opt = sgd(hybrid)
    loss = F.cross_entropy(hybrid(x[rows].float()), y[rows])
    opt.zero_grad()
    loss.backward()
    order.append("backward returned")
    hybrid.reduce_gradients()
    opt.step()
    out = {"hybrid": dict(counted), "order": list(order)}
    counted.clear()
    dtypes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(hybrid(x[rows].float()), y[rows])
    loss.backward()
    hybrid.reduce_gradients()
    out["autocast_dtypes"] = sorted(map(list, dtypes))
    counted.clear()
    for name, real in originals.items():  # DDP's all-reduces are counted by its hook alone
        setattr(dist, name, real)
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    ddp = torch.nn.parallel.DistributedDataParallel(build_model("alexnet", CLASSES, CROP))

    def hook(state, bucket):
        count("all_reduce", bucket.buffer())
        return default_hooks.allreduce_hook(state, bucket)
    ddp.register_comm_hook(None, hook)
    loss = F.cross_entropy(ddp(x[rows].float()), y[rows])
    loss.backward()
    out["ddp"] = dict(counted)
    out["per_rank_batch"], out["crop"] = per_rank, CROP
    return out


def main() -> int:
    checks, out = sys.argv[1].split(","), Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    run = {"grads": check_grads, "dropout": check_dropout, "ledger": check_ledger}
    result = {check: run[check](rank, world) for check in checks}
    for check in ("grads", "dropout"):  # the largest difference on any rank
        for what, value in result.get(check, {}).items():
            if isinstance(value, float) and what not in ("moved", "grad_scale",
                                                         "loss_without_dropout_diff"):
                t = torch.tensor([value], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                result[check][what] = t.item()
    if rank == 0:
        out.write_text(json.dumps({"world": world, **result}))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
