"""TensorBoard while `train` runs: the event files read back with TensorBoard's own reader."""
from __future__ import annotations

import json

import pytest

import torch

from conftest import (SMALL_CROP, assert_board_filters, board, cli, picture, tool, train_args,
                      weights)

# every number of these log records is a curve (board.py); everything else is not
CURVES = ("step", "epoch", "max_steps")
# the numbers that do not depend on the clock: equal to an uninterrupted run's
DETERMINISTIC = ("loss", "lr", "train_loss", "top1_err", "top5_err", "val_loss")


def curves_of(run) -> dict:
    """{KIND/FIELD: [(step, value)]} from metrics.jsonl, the curves the board must show."""
    out: dict = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] in CURVES:
            for field, value in rec.items():
                if field not in ("kind", "step", "epoch") and isinstance(value, (int, float)) \
                        and not isinstance(value, bool):
                    out.setdefault(f"{rec['kind']}/{field}", []).append((rec["step"], value))
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tensorboard_shows_the_log_the_pictures_and_one_run_through_a_relaunch(
        tmp_path, shards_small, straight_run):
    """shards_small: 16 train images in batches of 8, 2 steps an epoch, a log record every
    step. The first launch stops at --max-steps 3 (epoch-0001.pt at step 2, interrupt.pt at
    step 3); interrupt.pt removed, as if that launch had died before writing it, the relaunch
    resumes from step 2 and trains step 3 again: the curves hold steps 1-4 once each (the
    relaunch purged the first launch's step 3 and its max_steps record, as metrics.jsonl
    dropped them), with metrics.jsonl's values (float32: TensorBoard's scalars) and an
    uninterrupted run's (straight_run's log). The pictures are `preview`'s of the launch's first
    batch and `filters`' of each epoch checkpoint, pixel for pixel."""
    run = tmp_path / "run"
    cli(*train_args(shards_small, run, "--epochs", "2", "--max-steps", "3"))
    first = board(run)
    assert [s for s, _ in first["scalars"]["max_steps/top1_err"]] == [3]
    (run / "checkpoints/interrupt.pt").unlink()
    cli(*train_args(shards_small, run, "--epochs", "2", "--resume"))
    seen = board(run)

    want = curves_of(run)
    assert {t for t, v in seen["scalars"].items() if v} == set(want)
    assert sorted(want) == sorted(
        [f"step/{f}" for f in ("loss", "lr", "images_per_s", "data_wait")]
        + [f"epoch/{f}" for f in ("lr", "train_loss", "train_images", "images_per_s",
                                  "data_wait", "seconds", "images", "top1_err", "top5_err",
                                  "val_loss")])
    for tag, points in want.items():
        steps = [s for s, _ in seen["scalars"][tag]]
        assert steps == ([1, 2, 3, 4] if tag.startswith("step/") else [2, 4]), tag
        assert [v for _, v in seen["scalars"][tag]] == pytest.approx(
            [v for _, v in points], rel=1e-6, abs=1e-30), tag
    assert not seen["scalars"].get("max_steps/top1_err")  # purged with the step it was at
    straight = curves_of(straight_run)
    for tag in want:
        if tag.split("/")[1] in DETERMINISTIC:
            assert [v for _, v in seen["scalars"][tag]] == pytest.approx(
                [v for _, v in straight[tag]], rel=1e-6), tag
    assert 0 <= min(v for _, v in seen["scalars"]["step/data_wait"])
    assert max(v for _, v in seen["scalars"]["step/data_wait"]) < 1

    # the first launch's first batch (step 1), the relaunch's (step 3: epoch 2's first)
    batches = seen["images"]["train/batch"]
    assert [s for s, _ in batches] == [1, 3]
    cli("preview", "--data", shards_small, "--out", tmp_path / "preview.png", "--crop",
        str(SMALL_CROP), "--mean", "channel", "--device", "cpu", "--threads", "1",
        "--readers", "1", "--images", "8")
    want_batch = picture(tmp_path / "preview.png")
    assert batches[0][1].shape == want_batch.shape == (4 * (128 + 8) + 8, 2 * (128 + 112 + 24), 3)
    assert (batches[0][1] == want_batch).all()
    assert batches[1][1].shape == want_batch.shape and (batches[1][1] != want_batch).any()

    assert [s for s, _ in seen["images"]["conv1/filters"]] == [2, 4]
    assert_board_filters(run, tmp_path)
    assert seen["text"] == {"config/text_summary": [1, 3]}


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_tensorboard_off_writes_no_events_and_the_same_weights(tmp_path, shards_small,
                                                               straight_run):
    """tools/bench_board.py's pair of launches (the same command with TensorBoard and with
    --no-tensorboard): events in the first folder only, and both end with straight_run's
    weights (the same command, earlier), bit for bit: the board reads what the log has read,
    nothing else. The tool says so too, and reports a rate for each side."""
    args = train_args(shards_small, "unused", "--epochs", "2")[5:]  # the options after --out
    r = tool("bench_board").board_cost(shards_small, args, 1, tmp_path)
    assert list((tmp_path / "on-0").glob("events.out.tfevents.*"))
    assert not list((tmp_path / "off-0").glob("events.out.tfevents.*"))
    want = weights(straight_run / "checkpoints/epoch-0002.pt")
    for side in ("on-0", "off-0"):
        got = weights(tmp_path / side / "checkpoints/epoch-0002.pt")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert r["same_weights"] is True and r["on"][0] > 0 and r["off"][0] > 0
