"""train.log_with = "tensorboard": the metrics.jsonl scalars in TensorBoard event files."""
from __future__ import annotations

import json

import pytest

from hakubooru.errors import HakubooruError
from tests.helpers.shards import make_test_shards
from tests.helpers.trainer_cli import run_cli
from trainers.lokr.config import load_config
from trainers.lokr.train import train

pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (test extra)")


@pytest.mark.slow
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
        load_config("tiny", ["train.log_with=mlflow"])


def test_only_rank_0_of_a_tensorboard_run_writes_events(tmp_path):
    """tblog: events are written only with log_with = "tensorboard" and only by rank 0 (the
    default "" writes metrics.jsonl alone): no tensorboard/ folder otherwise."""
    from trainers.lokr.observe.tblog import ScalarLog

    line = {"step": 1, "loss": 0.5, "lr_unet": 1e-3, "lr_text": 1e-3, "grad_norm": 1.0, "images_per_s": 2.0,
            "skipped": 0}
    for name, cfg, is_main in (("default", load_config("tiny"), True),
                               ("rank1", load_config("tiny", ["train.log_with=tensorboard"]), False)):
        log = ScalarLog(cfg, tmp_path / name, is_main, 0)
        log.write(line)
        log.close()
        assert not (tmp_path / name / "tensorboard").exists(), name


def test_missing_tensorboard_package_is_one_line(tmp_path, monkeypatch):
    """docs/report.md: without the tensorboard package a tensorboard run stops at start with one
    line saying so (HakubooruError naming the pip command), not an ImportError traceback."""
    import sys

    from trainers.lokr.observe.tblog import ScalarLog

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(HakubooruError, match="needs the tensorboard package: pip install tensorboard"):
        ScalarLog(load_config("tiny", ["train.log_with=tensorboard"]), tmp_path, True, 0)


def test_resume_purges_only_the_events_past_the_resumed_state(tmp_path):
    """docs/report.md: on --resume, events past the resumed state are purged. A run logged
    steps 1..3 and was killed with its last state at step 2; the resumed run (first step 2)
    logs step 3 again: steps 1 and 2 stay, step 3 is there once, with the new value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainers.lokr.observe.tblog import ScalarLog

    cfg = load_config("tiny", ["train.log_with=tensorboard"])
    killed = ScalarLog(cfg, tmp_path, True, 0)
    for step in (1, 2, 3):
        killed.write({"step": step, "loss": float(step)})
    killed.close()
    resumed = ScalarLog(cfg, tmp_path, True, 2)
    resumed.write({"step": 3, "loss": 30.0})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


@pytest.mark.slow
def test_scalars_reach_an_offline_wandb_run(tmp_path):
    pytest.importorskip("wandb", reason="the wandb package is not installed (test extra)")
    shards = make_test_shards(tmp_path / "shards", n=12).dir
    out = tmp_path / "run"
    # in a process of its own: wandb leaves threads and its wandb-core child in the process that
    # used it, and a fork of a process with such threads (DataLoader workers, tag counting in later
    # tests) can deadlock
    done = run_cli(["--config", "tiny", "--shards", str(shards), "--output", str(out), "--max-steps", "2",
                    "--set", "train.log_with=wandb"], {"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert done.returncode == 0, done.stderr
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    data = files[0].read_bytes()
    # each history item is stored as its key and its value as JSON text
    for key in ("train/loss", "train/lr_unet", "train/grad_norm"):
        assert key.encode() in data
    for x in lines:
        assert json.dumps(x["loss"]).encode() in data


def test_wandb_without_its_package_is_one_line(tmp_path, monkeypatch):
    import sys

    from trainers.lokr.observe.tblog import ScalarLog

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(HakubooruError, match="needs the wandb package: pip install wandb"):
        ScalarLog(load_config("tiny", ["train.log_with=wandb"]), tmp_path, True, 0)
