"""[validation]: the seeded pick and the spread timesteps by hand; the held-out samples never
in a batch plan; the loss the same in two runs; val_loss rows in metrics.jsonl, TensorBoard and
the training report; validation.parquet."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from hakubooru.errors import HakubooruError
from hakubooru.rng import hash64
from tests.helpers.shards import make_test_shards
from trainers.lokr.config import load_config
from trainers.lokr.observe.validation import pick, timesteps
from trainers.lokr.train import setup, train, validation_loss


def test_pick_and_timesteps_by_hand():
    ids = np.array([3, 10, 11, 40, 41, 77, 100])
    # the 3 ids with the smallest hash64(hash64(seed, 0x7A11D), id), as index rows in order
    key = hash64(5, 0x7A11D)
    expected = sorted(sorted(range(len(ids)), key=lambda r: hash64(key, int(ids[r])))[:3])
    assert pick(ids, 3, seed=5).tolist() == expected
    assert pick(ids, 3, seed=6).tolist() != expected or pick(ids, 3, seed=7).tolist() != expected
    assert pick(ids, 0, seed=5).tolist() == []
    # sample j of 4 at ⌊(2j + 1)·1000 / 8⌋: 125, 375, 625, 875 — the middle of each quarter
    assert timesteps(4, 1000).tolist() == [125, 375, 625, 875]
    assert timesteps(1, 1000).tolist() == [500]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_test_shards(tmp_path_factory.mktemp("val_shards"), n=16).dir


VAL = ["validation.samples=4", "validation.every=2"]


def test_held_out_samples_stay_out_and_score_the_same(shards, tmp_path):
    run = setup(load_config("tiny", VAL), shards, tmp_path / "a")
    held = set(run.index.ids[run.validation.rows].tolist())
    assert len(held) == 4
    for epoch in (0, 1, 2):
        planned = {int(i) for batch in run.plan(epoch).batches for i in run.index.ids[batch]}
        assert not planned & held
    first = validation_loss(run)
    assert first == validation_loss(run) and np.isfinite(first)  # fixed draws: the same number again
    again = setup(load_config("tiny", VAL), shards, tmp_path / "b")
    assert validation_loss(again) == first
    with pytest.raises(HakubooruError, match="leaves nothing to train on"):
        setup(load_config("tiny", ["validation.samples=16"]), shards, tmp_path / "c")


@pytest.mark.slow
def test_val_loss_in_metrics_tensorboard_and_report(shards, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainers.lokr.observe.report import render

    out = tmp_path / "run"
    summary = train(load_config("tiny", VAL + ["train.max_steps=3", "train.log_with=tensorboard"]), shards, out)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # every 2 steps and after the last (step 3)
    assert [x["step"] for x in lines if "val_loss" in x] == [2, 3]
    assert summary["val_loss"] == lines[-1]["val_loss"]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/val_loss")] == [
        (x["step"], pytest.approx(x["val_loss"], rel=1e-6)) for x in lines if "val_loss" in x]
    table = pq.read_table(out / "validation.parquet").to_pydict()
    assert table["timestep"] == [125, 375, 625, 875] and len(set(table["id"])) == 4
    assert "validation loss (fixed noise and timesteps)" in render(out, lines)
