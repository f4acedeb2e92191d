"""tag_counts.parquet: written by the build from its shards' own counts, equal to a count made
here from the tar members (read with tarfile, counted by the rule written out below); read
back only for its own dataset fingerprint; counted once and stored for a folder without it."""
from __future__ import annotations

import json
import shutil
import tarfile
from collections import Counter

import pyarrow.parquet as pq
import pytest

from hakubooru.tagcounts import TAG_COUNTS_FILE, ensure_tag_counts, read_tag_counts
from tests.helpers.builds import build_every_post
from tests.helpers.shards import make_test_shards, write_shard_folder

GROUPS = ("keep", "general", "quality", "year", "meta", "rating_tags")


def count_from_tars(folder) -> Counter:
    """sd-scripts' rule on each sample's caption: the record's groups in caption order, each
    tag stripped and lower-cased, once per occurrence; the .txt split at commas if no record."""
    counts = Counter()
    for path in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name, data in members.items():
            if name.endswith(".json"):
                record = json.loads(data)
                counts.update(t.strip().lower() for g in GROUPS for t in record[g] if t.strip())
    return counts


@pytest.fixture(scope="module")
def built(synth_demo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tagcounts")
    return build_every_post(synth_demo, tmp, tmp / "out", shard_size=200, workers=2)


def test_the_build_writes_the_counts_of_its_records(built):
    manifest = json.loads((built / "manifest.json").read_text())
    table = pq.read_table(built / TAG_COUNTS_FILE)
    assert json.loads(table.schema.metadata[b"hakubooru"])["fingerprint"] == manifest["fingerprint"]
    stored = dict(zip(table.column("tag").to_pylist(), table.column("count").to_pylist()))
    expected = count_from_tars(built)
    assert len(expected) > 100 and stored == dict(expected)
    # most frequent first, ties by name
    assert list(stored) == sorted(expected, key=lambda t: (-expected[t], t))


def test_counts_of_another_build_are_not_read(built, tmp_path):
    manifest = json.loads((built / "manifest.json").read_text())
    assert read_tag_counts(built, manifest["fingerprint"]) is not None
    assert read_tag_counts(built, "xxh3_128:" + "0" * 32) is None
    assert read_tag_counts(tmp_path, manifest["fingerprint"]) is None  # no file


def test_a_folder_without_counts_is_counted_once_and_stored(built, tmp_path, capsys):
    folder = tmp_path / "old"
    shutil.copytree(built, folder)
    (folder / TAG_COUNTS_FILE).unlink()  # as an older hakubooru left it
    fingerprint = json.loads((folder / "manifest.json").read_text())["fingerprint"]
    counts = ensure_tag_counts(folder, fingerprint, workers=2, progress=False)
    assert counts == dict(count_from_tars(built))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"counting the tags of {folder} once (")
    assert read_tag_counts(folder, fingerprint) == counts
    assert ensure_tag_counts(folder, fingerprint, workers=2, progress=False) == counts
    assert capsys.readouterr().err == ""  # read, not counted again


def test_one_and_two_workers_count_the_same(tmp_path):
    shards = make_test_shards(tmp_path / "out", n=40, learnable=False)
    fp = json.loads((shards.dir / "manifest.json").read_text())["fingerprint"]
    one = ensure_tag_counts(shards.dir, fp, workers=1, progress=False)
    (shards.dir / TAG_COUNTS_FILE).unlink()
    assert ensure_tag_counts(shards.dir, fp, workers=2, progress=False) == one
    assert sum(one.values()) == sum(count_from_tars(shards.dir).values()) > 40


def test_an_unwritable_place_is_one_warning_and_the_counts_still_come(tmp_path, capsys):
    shards = make_test_shards(tmp_path / "out", n=8, learnable=False)
    (shards.dir / TAG_COUNTS_FILE).mkdir()  # a directory where the file would go: the write fails
    fp = json.loads((shards.dir / "manifest.json").read_text())["fingerprint"]
    counts = ensure_tag_counts(shards.dir, fp, workers=1, progress=False)
    assert counts == dict(count_from_tars(shards.dir))
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"warning: cannot store {shards.dir / TAG_COUNTS_FILE} (")
    assert err[-1].endswith("the tags are counted again at the next start")
    assert [p.name for p in shards.dir.iterdir() if p.name.startswith(".")] == []  # no temporaries


def test_a_damaged_record_is_one_line_naming_post_and_shard(tmp_path):
    from hakubooru.errors import HakubooruError

    record = {"id": 7, "width": 8, "height": 8, "keep": ["a"], "general": [], "quality": [], "year": [],
              "meta": [], "rating_tags": []}
    folder = write_shard_folder(tmp_path / "out", [(record, b"x")])
    with tarfile.open(folder / "shard-000000.tar") as tar:
        assert any(m.name == "7.json" for m in tar)
    index = pq.read_table(folder / "index.parquet").to_pydict()
    with open(folder / "shard-000000.tar", "r+b") as f:  # break the record's first byte
        f.seek(index["json_offset"][0])
        f.write(b"}")
    fp = json.loads((folder / "manifest.json").read_text())["fingerprint"]
    with pytest.raises(HakubooruError, match=r"^post 7 in shard-000000.tar: its .json record is not valid JSON$"):
        ensure_tag_counts(folder, fp, workers=1, progress=False)
