"""--parallel hybrid (Krizhevsky 2014): data-parallel convolutions, fc6/fc7 split across ranks.

The references are independent of the split: the paper's AlexNet in one process on the whole
batch (float64), the same network on one rank for the dropout masks, torch.distributed's own
collectives counted where they are called, and the one-model checkpoint read by the other modes.
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter

import pytest
import torch

from conftest import (ROOT, SMALL_CROP, TWO, assert_board_filters, cli, launch, records,
                      run_group, train_args, weights)

from alexnet_base.config import LoaderConfig, TrainConfig
from alexnet_pipe import ledger, optim
from alexnet_pipe.model import TowerAlexNet, build_model
from alexnet_pipe.distributed import DistEnv
from alexnet_pipe.parallel import Parallel

WORKER = ROOT / "tests" / "hybrid_worker.py"


def worker(world: int, checks: str, out) -> dict:
    proc = run_group([sys.executable, "-m", "torch.distributed.run", "--standalone",
                      "--nproc_per_node", str(world), str(WORKER), checks, str(out)],
                     cwd=ROOT, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_k_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    """Float64, 4 and 2 ranks: the loss, every gradient, the weights and momenta after 2 SGD
    steps equal the one-process model's on the concatenated batch; with dropout, 4 ranks equal
    one rank; the ledger's payloads are what the collectives carried."""
    r = worker(4, "grads,dropout,ledger", tmp_path / "out.json")
    g = r["grads"]
    assert g["splits"] == [4, 2]
    assert g["moved"] > 1e-4  # the steps moved the trunk: the comparison means something
    assert g["grad_scale"] > 1e-2
    for what in ("loss", "grads", "weights", "momentum"):
        assert g[what] < 1e-12, (what, g[what])
    d = r["dropout"]
    assert d["loss_without_dropout_diff"] > 1e-3  # the masks drop something
    assert d["loss"] < 1e-12 and d["grads"] < 1e-12, d
    counted = r["ledger"]  # fp32 activations on the CPU
    # the replicated gradients' all-reduces start inside the backward, as their buckets fill
    # (overlapping it), none after it; the forward's gather and reduce-scatter come first
    order = counted["order"]
    assert order[:2] == ["all_gather", "reduce_scatter"] and order[-1] == "backward returned"
    assert order.count("all_reduce") >= 2, order
    # under bf16 autocast the features travel in bf16, the sums are reduced in float32 (one
    # process's GEMM rounds its sum once: K roundings of bf16 partial sums would not)
    assert counted["autocast_dtypes"] == [["all_gather", "bfloat16"], ["all_reduce", "float32"],
                                          ["reduce_scatter", "float32"]]
    for mode in ("hybrid", "ddp"):
        want = Counter()
        for c in ledger.collectives(mode, world=4, batch=counted["per_rank_batch"],
                                    num_classes=10, crop=counted["crop"], act_bytes=4):
            want[c.kind] += c.payload
        assert counted[mode] == dict(want), mode


def test_towers_ledger_is_what_crosses_between_the_towers(monkeypatch):
    """Each crossing of TowerAlexNet's forward, counted where it happens (tower A's half of
    conv3's, fc6's, fc7's and fc8's inputs), against the ledger's figure."""
    sent = []
    real = TowerAlexNet._both

    def counting(self, parts, fn):
        sent.append(parts[0].numel() * parts[0].element_size())
        return real(self, parts, fn)
    monkeypatch.setattr(TowerAlexNet, "_both", counting)
    torch.manual_seed(0)
    towers = TowerAlexNet(num_classes=10)
    towers(torch.randn(2, 3, 224, 224))
    halves, = [c for c in ledger.collectives("towers", world=2, batch=2, num_classes=10,
                                              act_bytes=4) if c.what.startswith("its halves")]
    assert len(sent) == 4 and sum(sent) == halves.payload


def test_ledger_orders_the_modes_as_the_paper_says():
    """From first principles at batch 128 per rank, bf16 activations: DDP all-reduces all 61 M
    fp32 gradients (2 (K-1)/K x 244 MB a rank); hybrid's feature traffic grows with K, its
    gradients' is 6.4 M values; what it reduce-scatters (sums) travels in float32, 4 bytes."""
    ddp = ledger.sent_per_step("ddp", world=2, batch=128)
    assert ddp == pytest.approx(2 * 0.5 * 60_965_224 * 4)
    hybrid = ledger.sent_per_step("hybrid", world=2, batch=128)
    # pooled features: gathered forward (K-1 = 1 copy of 128 x 9216), reduce-scattered backward
    # (half of 256 x 9216, float32); fc7's outputs: reduce-scattered forward (float32), gathered
    # backward
    features = 128 * 9216 * 2 + 0.5 * 256 * 9216 * 4
    fc7 = 0.5 * 256 * 4096 * 4 + 128 * 4096 * 2
    reduce = 2 * 0.5 * (2_334_080 + 4096 + 4096 * 1000 + 1000) * 4
    assert hybrid == pytest.approx(features + fc7 + reduce)
    assert hybrid < ddp / 5


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_hybrid_training_resumes_exactly_and_its_checkpoint_serves_every_mode(tmp_path,
                                                                              shards_small):
    """torchrun, 2 ranks, the real pipeline: a run interrupted by --max-steps and resumed
    ends with the straight run's weights, bit for bit (dropout on: its masks come from the
    step); evaluate reads its checkpoint as it is; the one-process model (ddp's layout) and the
    towers read it and write back the same weights and optimiser state."""
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    hybrid = ["--epochs", "1", "--parallel", "hybrid"]
    proc = launch(TWO, train_args(shards_small, straight, *hybrid))
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((straight / "config.json").read_text())
    assert config["parallel"] == "hybrid" and config["world_size"] == 2
    done, = records(straight, "done")
    assert done["ranks_in_sync"] is True
    assert_board_filters(straight, tmp_path)  # rank 0's TensorBoard: conv1, whole
    proc = launch(TWO, train_args(shards_small, cut, *hybrid, "--max-steps", "1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    interrupt = torch.load(cut / "checkpoints/interrupt.pt", weights_only=True)
    assert interrupt["step"] == 1 and interrupt["optimizer_layout"] == "grouped"
    proc = launch(TWO, train_args(shards_small, cut, *hybrid, "--resume"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = weights(straight / "checkpoints/epoch-0001.pt"), weights(cut / "checkpoints/epoch-0001.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # evaluate takes the one-model layout as it is: the figures the run logged
    epoch = records(straight, "epoch")[-1]
    r = json.loads(cli("evaluate", "--checkpoint", straight / "checkpoints/epoch-0001.pt",
                       "--data", shards_small, "--device", "cpu", "--batch-size", "6",
                       "--json").stdout)
    assert r["top1_err"] == epoch["top1_err"]
    assert r["val_loss"] == pytest.approx(epoch["val_loss"], rel=1e-5)
    # the one-model checkpoint read into the one-process model (ddp's too) and into the towers
    # and written back: the same weights and optimiser state, number for number
    config = TrainConfig(loader=LoaderConfig(data=shards_small), out=tmp_path)
    for mode, core in (("none", build_model("alexnet", 4, SMALL_CROP)),
                       ("towers", TowerAlexNet(4, SMALL_CROP))):
        parallel = Parallel(mode, DistEnv(), torch.device("cpu"))
        opt = optim.sgd(core, config)
        parallel.restore(interrupt, core, opt, optim.scheduler(opt, config))
        weights_again, optimizer_again = parallel.weights_state(core, opt, keep=True)
        assert all(torch.equal(interrupt["model"][k], weights_again[k]) for k in
                   interrupt["model"])
        mine, theirs = interrupt["optimizer"], optimizer_again
        assert mine["param_groups"] == theirs["param_groups"]
        assert mine["state"].keys() == theirs["state"].keys()
        assert all(torch.equal(mine["state"][i]["momentum_buffer"],
                               theirs["state"][i]["momentum_buffer"]) for i in mine["state"])


@pytest.mark.slow
def test_hybrid_needs_torchrun_and_the_paper_model(tmp_path, shards_small):
    one = cli(*train_args(shards_small, tmp_path / "a", "--parallel", "hybrid"), check=False)
    assert one.returncode == 1 and "--parallel hybrid: launch with torchrun" in one.stderr
    owt = cli(*train_args(shards_small, tmp_path / "b", "--parallel", "hybrid", "--arch",
                          "alexnet-owt"), check=False)
    assert owt.returncode == 1 and "--parallel hybrid needs --arch alexnet" in owt.stderr
