"""The dataset card: `datasets.load_dataset("out/")` (the Hub's way) reads a build with no
arguments, also one whose first samples have empty tag groups; provenance and licence."""
from __future__ import annotations

import io
import json
import shutil

import datasets
import numpy as np
import pytest
import yaml
from PIL import Image

from hakubooru.builder import build_shards
from hakubooru.card import dataset_card, size_category
from hakubooru.captioner import Captioner
from hakubooru.db import open_db
from hakubooru.hf import hf_features
from hakubooru.selector import Selector

from tests.helpers.archives import archive_members


@pytest.fixture(scope="module")
def empty_first(synth_demo, tmp_path_factory):
    """A build whose first shard starts with 6 posts with no meta tag (datasets would type the
    column null from its first 5 samples), then posts with meta tags."""
    db, images = synth_demo
    tmp = tmp_path_factory.mktemp("card")
    sources = archive_members(images)
    records = {i: (c, r) for i, c, r in Captioner(db).captions(np.array(sorted(sources)))}
    empty = [i for i in sorted(records) if not records[i][1]["meta"]][:6]
    tagged = [i for i in sorted(records) if i > empty[-1] and records[i][1]["meta"]][:4]
    assert len(empty) == 6 and len(tagged) == 4
    ids = empty + tagged
    Selector.ids(ids).save(tmp / "sel.parquet", open_db(db))
    out = tmp / "out"
    build_shards(db, images, tmp / "sel.parquet", out, shard_size=8, cache_dir=tmp / "cache",
                 progress=False)
    return {"db": db, "images": images, "tmp": tmp, "out": out, "ids": ids, "records": records,
            "sources": sources}


def _expected_row(b, post_id):
    caption, record = b["records"][post_id]
    w, h = Image.open(io.BytesIO(b["sources"][post_id])).size
    return caption, {**record, "width": w, "height": h}


def test_load_dataset_on_the_folder_needs_no_arguments(empty_first, tmp_path):
    b = empty_first
    ds = datasets.load_dataset(str(b["out"]), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.features == hf_features("webp")
    assert [int(k) for k in ds["__key__"]] == b["ids"]
    for row in ds:
        caption, record = _expected_row(b, int(row["__key__"]))
        assert row["txt"] == caption
        assert row["json"] == record
        assert row["webp"].size == (record["width"], record["height"])
    assert [r["meta"] for r in ds["json"][:6]] == [[]] * 6
    # index.parquet and skipped.parquet are no data files: one split, the shards' 10 samples
    assert list(datasets.load_dataset(str(b["out"]), cache_dir=str(tmp_path / "hf"))) == ["train"]


def test_streaming_load_dataset_on_the_folder(empty_first):
    b = empty_first
    rows = list(datasets.load_dataset(str(b["out"]), split="train", streaming=True))
    assert [int(r["__key__"]) for r in rows] == b["ids"]
    for row in rows:
        caption, record = _expected_row(b, int(row["__key__"]))
        assert (row["txt"], row["json"]) == (caption, record)
        assert row["webp"].size == (record["width"], record["height"])


def test_without_the_card_the_loader_mixes_up_the_parquet_files(empty_first, tmp_path):
    # what the card prevents (datasets picks the Parquet builder for index + skipped)
    bare = tmp_path / "bare"
    shutil.copytree(empty_first["out"], bare, ignore=shutil.ignore_patterns("README.md"))
    with pytest.raises(Exception):
        datasets.load_dataset(str(bare), split="train", cache_dir=str(tmp_path / "hf"))


def test_card_front_matter_provenance_and_licence(empty_first):
    out = empty_first["out"]
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["configs"] == [{"config_name": "default",
                                "data_files": [{"split": "train", "path": "shard-*.tar"}]}]
    assert datasets.Features._from_yaml_list(meta["dataset_info"]["features"]) == \
        hf_features("webp")
    assert meta["license"] == "other"
    assert meta["size_categories"] == ["n<1K"]  # 10 samples
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["card"] == "README.md"
    body = text.split("---\n", 2)[2]
    for fact in (manifest["fingerprint"], manifest["db_fingerprint"],
                 manifest["selection"]["sha256"], "posts selected 10, written 10, skipped 0",
                 "2 webdataset shards", "remain the property of their artists"):
        assert fact in body


def test_card_bytes_are_the_same_on_a_rebuild_and_a_resume(empty_first, tmp_path):
    b = empty_first
    card = (b["out"] / "README.md").read_bytes()
    again = tmp_path / "again"
    build_shards(b["db"], b["images"], b["tmp"] / "sel.parquet", again, shard_size=8,
                 cache_dir=b["tmp"] / "cache", progress=False, workers=2)
    assert (again / "README.md").read_bytes() == card
    (again / "README.md").unlink()
    (again / "shard-000001.tar").unlink()
    build_shards(b["db"], b["images"], b["tmp"] / "sel.parquet", again, shard_size=8,
                 cache_dir=b["tmp"] / "cache", progress=False)
    assert (again / "README.md").read_bytes() == card
    assert not [p.name for p in again.iterdir() if p.name.endswith(".tmp")]


def test_size_categories_by_hand():
    assert [size_category(n) for n in (0, 999, 1000, 99_999, 100_000, 5_200_000)] == [
        "n<1K", "n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M"]


def test_size_categories_at_every_bound():
    """The Hub's buckets are n<1K, 1K<n<10K, ..., 100M<n<1B: n = 10**k - 1 is in the bucket
    below 10**k, n = 10**k in the one from it."""
    names = ["n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M", "100M<n<1B"]
    for k, (below, above) in enumerate(zip(names, names[1:]), start=3):
        assert (size_category(10 ** k - 1), size_category(10 ** k)) == (below, above)


def test_card_writes_non_ascii_captioner_settings_as_they_are():
    """The card is a function of the manifest; a captioner setting outside ASCII (a Japanese
    comma as separator) appears as typed, not as a JSON \\u escape."""
    manifest = {
        "fingerprint": "xxh3_128:00", "db_fingerprint": "db", "shard_count": 1, "shard_size": 10,
        "selection": {"expression": {"all": True}, "seeds": [], "sha256": "ab"},
        "counts": {"selected": 3, "written": 3, "skipped": 0, "skipped_by_reason": {}},
        "captioner": {"captioner": "hakubooru.captioner.Captioner", "separator": "、",
                      "quality": {"ignored": 1}},
        "image_policy": {"image_format": None},
    }
    text = dataset_card(manifest, "webp").decode()
    # json.dumps with sorted keys, the quality entry left out
    assert '- captioner: `hakubooru.captioner.Captioner`, settings `{"captioner": ' \
           '"hakubooru.captioner.Captioner", "separator": "、"}`\n' in text
    assert "\\u3001" not in text
