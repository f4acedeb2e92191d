"""The trainer refuses what it cannot trust: unfinished builds, shards whose size is not the
manifest's, members whose bytes differ from their build-time hash (or skips and counts them)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from hakubooru.errors import HakubooruError
from tests.helpers.shards import make_test_shards
from trainers.lokr.data.bucketing import make_buckets
from trainers.lokr.config import load_config
from trainers.lokr.data.batches import BatchDataset, BatchPlan, make_loader
from trainers.lokr.data.index import load_index
from trainers.lokr.data.integrity import CorruptMember
from trainers.lokr.train import train

BUCKETS = [(48, 80), (64, 64), (80, 48)]  # test_data.py: the three test sizes' buckets


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_test_shards(tmp_path_factory.mktemp("shards"), n=48, seed=0)


@pytest.fixture
def folder(shards, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(shards.dir, out)
    return out


def flip(path, offset: int, n: int = 4) -> None:
    """Invert ``n`` bytes of ``path`` at ``offset`` (in place, size unchanged)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def test_folder_without_manifest_is_an_unfinished_build(folder):
    (folder / "manifest.json").unlink()
    with pytest.raises(HakubooruError, match=r"has no manifest.json: the build did not finish; rerun"):
        load_index(folder)


def test_truncated_or_grown_shard_is_refused_at_start(folder):
    shard = folder / "shard-000001.tar"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(HakubooruError, match=rf"shard-000001.tar is {size - 1000} bytes but "
                                             rf"manifest.json records {size} \(cut short"):
        load_index(folder)
    with open(shard, "ab") as f:
        f.write(b"\0" * 1001)
    with pytest.raises(HakubooruError, match=rf"is {size + 1} bytes but manifest.json records {size}"):
        load_index(folder)


def test_index_and_manifest_of_different_builds_are_refused(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][2:]  # two unlisted: the first is named
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HakubooruError, match="names shard-000000.tar, which manifest.json does not list"):
        load_index(folder)
    (folder / "manifest.json").write_text("{")
    with pytest.raises(HakubooruError, match="manifest.json is not a hakubooru manifest"):
        load_index(folder)


def test_row_count_must_match_the_manifest(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["counts"]["written"] = 47
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HakubooruError, match="index.parquet has 48 rows but manifest.json counts 47"):
        load_index(folder)


def test_index_without_member_hashes_is_refused(folder):
    table = pq.read_table(folder / "index.parquet")
    pq.write_table(table.drop_columns(["image_xxh3", "txt_xxh3", "json_xxh3"]), folder / "index.parquet")
    with pytest.raises(HakubooruError, match="has no member hashes .*older hakubooru.*rerun the same"):
        load_index(folder)


def _first_batch_row(folder):
    ix = load_index(folder)
    plan = BatchPlan(ix, 4, seed=0, epoch=0, buckets=BUCKETS)
    return ix, plan, int(plan[0][2])


def test_four_flipped_image_bytes_are_one_clear_error(folder):
    ix, plan, row = _first_batch_row(folder)
    post, shard = int(ix.ids[row]), ix.shard_names[ix.shard[row]]
    flip(folder / shard, int(ix.image_offset[row]) + int(ix.image_size[row]) // 2)
    with pytest.raises(CorruptMember) as e:
        BatchDataset(folder, ix, plan)[0]
    assert str(e.value).startswith(f"{shard}: post {post}, member {post}.png: its bytes differ "
                                   "from the hash recorded at build time")
    assert "\n" not in str(e.value)
    BatchDataset(folder, ix, plan)[1]  # other batches read on


def test_one_changed_letter_of_a_tag_is_one_clear_error(folder):
    ix, plan, row = _first_batch_row(folder)
    post, shard = int(ix.ids[row]), ix.shard_names[ix.shard[row]]
    with open(folder / shard, "r+b") as f:
        f.seek(ix.json_offset[row])
        record = f.read(ix.json_size[row])
        at = record.index(b'"keep": ["') + len(b'"keep": ["')  # first letter of the first keep tag
        f.seek(ix.json_offset[row] + at)
        f.write(b"X")
    with pytest.raises(CorruptMember, match=f"{shard}: post {post}, member {post}.json: "):
        BatchDataset(folder, ix, plan)[0]


def test_skip_leaves_the_sample_out_and_counts_it(folder, shards):
    ix, plan, row = _first_batch_row(folder)
    clean = BatchDataset(shards.dir, load_index(shards.dir), plan)[0]
    flip(folder / ix.shard_names[ix.shard[row]], int(ix.image_offset[row]) + 100)
    skipping = BatchDataset(folder, ix, plan, on_corrupt="skip")
    got = skipping[0]
    keep = [0, 1, 3]  # row 2 of the batch was damaged
    assert got["corrupt"] == 1 and clean["corrupt"] == 0
    assert got["ids"].tolist() == [clean["ids"][j] for j in keep]
    assert got["captions"] == [clean["captions"][j] for j in keep]
    assert (got["pixel_values"] == clean["pixel_values"][keep]).all()
    assert (got["time_ids"] == clean["time_ids"][keep]).all()
    # the same batches whatever the worker count
    one = list(make_loader(skipping, workers=0))
    two = list(make_loader(skipping, workers=2))
    assert [b["ids"].tolist() for b in one] == [b["ids"].tolist() for b in two]
    assert [b["corrupt"] for b in one] == [b["corrupt"] for b in two] == [1] + [0] * (len(plan) - 1)
    # ranks: the damaged sample is on rank 1 of 2 (batch positions 2, 3); rank 0 is untouched
    r0 = BatchDataset(folder, ix, plan, rank=0, world_size=2, on_corrupt="skip")[0]
    r1 = BatchDataset(folder, ix, plan, rank=1, world_size=2, on_corrupt="skip")[0]
    assert r0["ids"].tolist() == clean["ids"][:2].tolist() and r0["corrupt"] == 0
    assert r1["ids"].tolist() == clean["ids"][3:].tolist() and r1["corrupt"] == 1
    with pytest.raises(HakubooruError, match="on_corrupt must be one of error, skip"):
        BatchDataset(folder, ix, plan, on_corrupt="ignore")


def test_training_stops_on_damage_or_skips_and_counts_it(folder, tmp_path, capsys):
    cfg = load_config("tiny", ["train.max_steps=1"])
    ix = load_index(folder)
    plan = BatchPlan(ix, cfg["train"]["batch_size"], 0, 0, _tiny_buckets(cfg))
    both = np.concatenate([plan[0], plan[1]])  # the first step's two micro-batches (grad_accum 2)
    for row in both.tolist():
        flip(folder / ix.shard_names[ix.shard[row]], int(ix.image_offset[row]) + 60)
    with pytest.raises(CorruptMember, match=f"post {ix.ids[plan[0][0]]}, member"):
        train(cfg, folder, tmp_path / "error")
    skip = load_config("tiny", ["train.max_steps=2", "data.on_corrupt=skip"])
    summary = train(skip, folder, tmp_path / "skip")
    assert summary["corrupt_skipped"] == 4 and summary["step"] == 2
    assert np.isfinite(summary["loss"])  # the second step's loss: its micro-batches are whole
    assert "4 damaged samples left out" in capsys.readouterr().err


def _tiny_buckets(cfg):
    dc = cfg["data"]
    return make_buckets(area=dc["resolution"] ** 2, min_side=dc["bucket_min"], max_side=dc["bucket_max"],
                        step=dc["bucket_step"])


def test_damage_found_in_a_dataloader_worker_is_still_one_line(folder):
    ix, plan, row = _first_batch_row(folder)
    post, shard = int(ix.ids[row]), ix.shard_names[ix.shard[row]]
    flip(folder / shard, int(ix.image_offset[row]) + 80)
    with pytest.raises(CorruptMember) as e:
        list(make_loader(BatchDataset(folder, ix, plan), workers=1))
    assert str(e.value).startswith(f"{shard}: post {post}, member {post}.png: its bytes differ")
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
