"""train.log_with = "tensorboard": the metrics.jsonl scalars in TensorBoard event files."""
from __future__ import annotations

import json

import pytest

from hakubooru.errors import HakubooruError
from tests.shardfactory import make_test_shards
from tests.torch_threads import one_torch_thread  # noqa: F401  (autouse)
from trainers.lokr.config import load_config
from trainers.lokr.train import train

pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (test extra)")


def test_scalars_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shards = make_test_shards(tmp_path / "shards", n=12).dir
    out = tmp_path / "run"
    train(load_config("tiny", ["train.max_steps=3", "train.log_with=tensorboard"]), shards, out)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == sorted(
        f"train/{k}" for k in ("loss", "lr_unet", "lr_text", "grad_norm", "images_per_s", "skipped"))
    for key in ("loss", "lr_unet", "grad_norm", "skipped"):
        logged = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert logged == [(x["step"], pytest.approx(x[key], rel=1e-6)) for x in lines]  # float32 in the file


def test_unknown_logger_is_refused():
    with pytest.raises(HakubooruError, match="train.log_with"):
        load_config("tiny", ["train.log_with=wandb"])
