"""`python -m trainers.lokr captions`: the captions the model sees, in a fresh process, against
the captions inside the training loader's own batches and against the records (the card's rule:
keep group first, quality/year/meta/rating last, general tags between)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO
from tests.helpers.shards import make_test_shards
from trainers.lokr.config import load_config
from trainers.lokr.data.batches import BatchDataset, BatchPlan, dataset_options, make_loader
from trainers.lokr.data.bucketing import make_buckets
from trainers.lokr.data.index import load_index


def captions_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "trainers.lokr", "captions", *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_test_shards(tmp_path_factory.mktemp("captions") / "out", n=24, learnable=False)


def loader_captions(root, cfg, epoch: int) -> dict[int, str]:
    """{post id: caption} from the batches a one-GPU run of cfg loads in `epoch`."""
    dc, tc = cfg["data"], cfg["train"]
    index = load_index(root)
    buckets = make_buckets(dc["resolution"] ** 2, dc["bucket_min"], dc["bucket_max"], dc["bucket_step"])
    plan = BatchPlan(index, tc["batch_size"], tc["seed"], epoch, buckets)
    data = BatchDataset(root, index, plan, epoch=epoch, **dataset_options(cfg))
    seen = {}
    for batch in make_loader(data):
        seen.update(zip(batch["ids"].tolist(), batch["captions"]))
    return seen


@pytest.mark.slow
def test_jsonl_is_what_the_loader_feeds(shards):
    for epoch in (0, 3):
        proc = captions_cli("--config", "tiny", "--shards", shards.dir, "--epoch", epoch, "--format", "jsonl")
        assert proc.returncode == 0, proc.stderr
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        assert [x["id"] for x in lines] == sorted(shards.ids.tolist())  # one per sample, by id
        assert {x["epoch"] for x in lines} == {epoch}
        fed = loader_captions(shards.dir, load_config("tiny"), epoch)
        assert len(fed) >= 12  # the samples in this epoch's full batches
        assert all(x["caption"] == fed[x["id"]] for x in lines if x["id"] in fed)
        for x in lines:  # the card's rule, from the record
            r = shards.records[x["id"]]
            tags, tail = x["caption"].split(", "), r["quality"] + r["year"] + r["meta"] + r["rating_tags"]
            assert tags[:len(r["keep"])] == r["keep"] and tags[len(tags) - len(tail):] == tail
        assert proc.stderr.strip().splitlines()[-1] == \
            f"24 captions at epoch {epoch} (shuffle scope general, tag dropout 0.15)"


def test_text_format_limit_and_scope(shards):
    proc = captions_cli("--config", "tiny", "--shards", shards.dir, "--epoch", 1, "--limit", 3)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    first = sorted(shards.ids.tolist())[:3]
    assert [(int(i), int(e)) for i, e, _ in rows] == [(i, 1) for i in first]
    # the general tags move from epoch to epoch; with the tail fixed. "all" moves the tail too:
    # over 20 epochs the last tag is not always the record's last
    from trainers.lokr.observe.captions import captions

    r = shards.records[first[0]]
    every = load_config("tiny", ["data.shuffle_scope=all"])
    ends = {next(captions(shards.dir, every, epoch, limit=1))[1].split(", ")[-1] for epoch in range(20)}
    assert len(ends) > 1 and r["rating_tags"][-1] in ends


def test_bad_input_is_one_line(shards, tmp_path, capsys):
    from trainers.lokr.__main__ import main

    for args, message in (
            (("--shards", tmp_path / "nope"), f"error: shard folder {tmp_path / 'nope'} does not exist"),
            (("--shards", shards.dir, "--epoch", -1), "error: --epoch must be ≥ 0, got -1"),
            (("--shards", shards.dir, "--set", "data.protect_quality_year_rating=true"),
             "error: --set: config key 'data.protect_quality_year_rating' was replaced by data.shuffle_scope")):
        assert main(["captions", "--config", "tiny", *map(str, args)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(message), line
