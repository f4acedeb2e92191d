"""Several --shards folders with weights: parsing, the per-epoch copies by hand, the plan drawing
in proportion, a tiny run's per-folder counts, and the resume guard knowing the set."""
from __future__ import annotations

import math

import numpy as np
import pytest

from hakubooru.errors import HakubooruError
from hakubooru.rng import hash64
from tests.helpers.shards import make_test_shards
from trainers.lokr.config import load_config
from trainers.lokr.data.batches import BatchPlan
from trainers.lokr.data.index import load_index
from trainers.lokr.data.mixing import Source, load_mixture, parse_sources
from trainers.lokr.train import train


def test_parse_sources(tmp_path):
    assert parse_sources(["a", "b:3", "c:0.5"]) == [Source(tmp_path.__class__("a"), 1.0),
                                                   Source(tmp_path.__class__("b"), 3.0),
                                                   Source(tmp_path.__class__("c"), 0.5)]
    assert parse_sources("x:y")[0].path.name == "x:y"  # not a number: part of the path
    for bad in ("a:0", "a:-1", "a:nan"):
        with pytest.raises(HakubooruError, match="must be a number > 0"):
            parse_sources([bad])
    with pytest.raises(HakubooruError, match="same folder twice"):
        parse_sources(["a", "a:2"])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    big = make_test_shards(root / "big", n=12, seed=1).dir
    small = make_test_shards(root / "small", n=8, seed=2).dir
    return big, small


def test_copies_by_hand_and_the_plan_draws_in_proportion(folders):
    big, small = folders
    mix = load_mixture([str(big), f"{small}:2.5"])
    assert len(mix.index) == 20 and mix.source_of.tolist() == [0] * 12 + [1] * 8
    assert mix.index.shard_names[0].startswith("/")  # shard files by absolute path
    counts = mix.counts(seed=0, epoch=3)
    # big: weight 1, one copy each; small: 2 each, and a third for the round(0.5 · 8) = 4 ids with
    # the smallest hash64(hash64(seed, epoch, 0x313C, folder 1), id)
    small_ids = load_index(small).ids
    key = hash64(0, 3, 0x313C, 1)
    third = set(sorted(small_ids.tolist(), key=lambda i: hash64(key, i))[:4])
    assert counts[:12].tolist() == [1] * 12
    assert counts[12:].tolist() == [3 if i in third else 2 for i in small_ids.tolist()]
    assert sorted(mix.counts(seed=0, epoch=4)[12:].tolist()) == [2] * 4 + [3] * 4  # same share every epoch
    plan = BatchPlan(mix.index, 2, 0, 3, [(64, 64), (96, 64), (64, 96)], counts=counts)
    planned = np.bincount(plan.batches.reshape(-1), minlength=20)
    assert (planned <= counts).all() and planned.sum() == counts.sum() - plan.dropped == 32 - plan.dropped
    # one folder of weight 1 is the recipe's index and plan
    one = load_mixture([str(big)])
    assert not one.mixed and one.counts(0, 0) is None and one.index.fingerprint == load_index(big).fingerprint


@pytest.mark.slow
def test_a_mixed_run_counts_its_samples_and_the_resume_guard_knows_the_set(folders, tmp_path, capsys):
    big, small = folders
    out = tmp_path / "run"
    cfg = load_config("tiny", ["train.max_steps=3", "train.save_every=3"])
    summary = train(cfg, [str(big), f"{small}:2"], out)
    per = summary["samples_per_source"]
    assert sum(per.values()) == 3 * 4 and set(per) == {str(big), str(small)}
    assert "samples per --shards folder: big " in capsys.readouterr().err
    with pytest.raises(HakubooruError, match="another dataset"):
        train(load_config("tiny", ["train.max_steps=4"]), [str(big), f"{small}:3"], out, resume=out,
              allow_config_change=True)
    assert math.isfinite(summary["loss"])


@pytest.mark.slow
def test_the_command_takes_repeated_shards(folders, tmp_path):
    from tests.helpers.trainer_cli import run_cli

    big, small = folders
    done = run_cli(["--config", "tiny", "--shards", str(big), "--shards", f"{small}:0.5", "--max-steps", "1",
                    "--output", str(tmp_path / "cli")])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "samples per --shards folder: big " in done.stderr and ", small " in done.stderr
