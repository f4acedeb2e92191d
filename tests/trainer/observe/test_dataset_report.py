"""`python -m trainers.lokr report --dataset`: the dataset report with the trainer's
training-bucket section, against buckets and batch counts derived by hand."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO
from tests.helpers.html_tables import Tables
from tests.helpers.shards import make_test_shards

pytest.importorskip("matplotlib")
pytest.importorskip("transformers")


def run_dataset_report(shards, *args):
    """The trainer's ``report --dataset``: the same page with the training buckets."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "trainers.lokr", "report", "--dataset", str(shards),
                           *map(str, args)], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_buckets_by_hand(tmp_path):
    # tiny config: buckets (area 64², sides 32–128, step 32) 32×128, 32×96, 64×64, 96×32,
    # 128×32. 128×40 (ratio 3.2) is nearest 96×32 (3) in log ratio, 40×128 nearest 32×96.
    # 64 samples cycling 64×64, 128×40, 40×128: 22, 21, 21. Batch 2 (1 GPU): 11, 10, 10 full
    # batches, 0, 1, 1 left over; 31 batches / grad_accum 2 = 15 steps, 1 batch (2 samples) idle.
    shards = make_test_shards(tmp_path / "out", n=64, sizes=((64, 64), (128, 40), (40, 128)),
                              learnable=False)
    proc = run_dataset_report(shards.dir, "--html", tmp_path / "r.html", "--config", "tiny", "--quiet")
    assert proc.returncode == 0, proc.stderr
    page = Tables((tmp_path / "r.html").read_text())
    rows = {r[0]: [int(x) for x in r[3:]] for r in page.tables["buckets"]}
    assert rows == {"64×64": [22, 11, 0], "96×32": [21, 10, 1], "32×96": [21, 10, 1]}
    summary = {r[0]: r[1] for r in page.tables["bucket-summary"]}
    assert summary["optimizer steps per epoch"] == "15"
    assert summary["samples sitting out each epoch (bucket remainders)"] == "2"
    assert summary["samples in full batches past the last whole step"] == "2"


@pytest.mark.slow
def test_buckets_on_two_gpus_by_hand(tmp_path):
    # same 22 / 21 / 21 samples, global batch 2 × 2 = 4: 5 + 5 + 5 full batches, 2 + 1 + 1 left
    # over; 15 batches / grad_accum 2 = 7 steps, 1 batch (4 samples) idle
    shards = make_test_shards(tmp_path / "out", n=64, sizes=((64, 64), (128, 40), (40, 128)),
                              learnable=False)
    proc = run_dataset_report(shards.dir, "--html", tmp_path / "r.html", "--config", "tiny", "--gpus", "2",
                      "--json", tmp_path / "r.json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    rows = {r[0]: [int(x) for x in r[3:]] for r in Tables((tmp_path / "r.html").read_text()).tables["buckets"]}
    assert rows == {"64×64": [22, 5, 2], "96×32": [21, 5, 1], "32×96": [21, 5, 1]}
    b = json.loads((tmp_path / "r.json").read_text())["buckets"]
    assert (b["global_batch"], b["steps_per_epoch"], b["sit_out"], b["sit_out_batches"]) == (4, 7, 4, 4)


@pytest.mark.slow
def test_the_page_is_hakubooru_s_page_plus_the_buckets(tmp_path):
    # the same page, byte for byte, but for the one section the trainer adds
    from hakubooru.report_html import render
    from hakubooru.report import collect
    from trainers.lokr.config import load_config
    from trainers.lokr.observe.captions import caption_examples
    from trainers.lokr.observe.dataset_report import bucket_stats

    shards = make_test_shards(tmp_path / "out", n=12, learnable=False)
    proc = run_dataset_report(shards.dir, "--html", tmp_path / "r.html", "--config", "tiny", "--quiet")
    assert proc.returncode == 0, proc.stderr
    stats = collect(shards.dir, max_windows=load_config("tiny")["data"]["max_windows"], progress=False)
    assert "buckets" not in stats and "captions" not in stats
    stats["buckets"] = bucket_stats(shards.dir, load_config("tiny"), "tiny", 1)
    stats["captions"] = caption_examples(shards.dir, load_config("tiny"), "tiny")
    assert (tmp_path / "r.html").read_text() == render(stats)


def test_zero_gpus_is_one_error_line_before_reading(tmp_path):
    proc = run_dataset_report(tmp_path / "nope", "--gpus", "0")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: --gpus must be ≥ 1, got 0"]


@pytest.mark.slow
def test_one_sample_in_three_epochs(tmp_path):
    """The captions section: the first sample's caption at epochs 0, 1, 2 — its keep group first
    and its quality, year, meta and rating tags last, in every one (the card's rule); the
    general tags between them, a subset of the record's."""
    shards = make_test_shards(tmp_path / "out", n=8, learnable=False)
    proc = run_dataset_report(shards.dir, "--html", tmp_path / "r.html", "--config", "tiny", "--quiet")
    assert proc.returncode == 0, proc.stderr
    rows = Tables((tmp_path / "r.html").read_text()).tables["caption-examples"]
    record = shards.records[int(shards.ids[0])]
    tail = record["quality"] + record["year"] + record["meta"] + record["rating_tags"]
    assert [r[0] for r in rows] == ["0", "1", "2"]
    for _, caption in rows:
        tags = caption.split(", ")
        assert tags[:len(record["keep"])] == record["keep"] and tags[len(tags) - len(tail):] == tail
        assert set(tags[len(record["keep"]):len(tags) - len(tail)]) <= set(record["general"])
