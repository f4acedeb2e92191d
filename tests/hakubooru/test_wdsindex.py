"""`python -m hakubooru index`: webdataset folders written by webdataset.TarWriter itself
(img2dataset-like numeric keys, and free-form keys with .txt only) become trainable."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import xxhash
from PIL import Image

from hakubooru.errors import HakubooruError
from hakubooru.wdsindex import index_webdataset
from tests.helpers.shards import CLASSES, _caption, _image, make_test_shards
from trainers.lokr.data.augment import augment_text
from trainers.lokr.data.bucketing import make_buckets
from trainers.lokr.data.batches import BatchDataset, BatchPlan
from trainers.lokr.data.index import load_index

SIZES = [(64, 64), (96, 64), (64, 96)]


def _jpeg(i: int) -> tuple[bytes, tuple[int, int]]:
    w, h = SIZES[i % 3]
    buf = io.BytesIO()
    _image(list(CLASSES)[i % 4], w, h, True, np.random.default_rng(i)).save(buf, "JPEG", quality=90)
    return buf.getvalue(), (w, h)


def caption_of(i: int) -> str:
    return f"{list(CLASSES)[i % 4]}, tag{i % 5}, tag{i % 7}, sky"


@pytest.fixture(scope="module")
def img2dataset_like(tmp_path_factory):
    """2 shards of numeric keys: jpg + txt + json (img2dataset's own metadata, no caption
    record); one sample without image, one with a broken image."""
    root = tmp_path_factory.mktemp("wds") / "numeric"
    root.mkdir()
    expected = {}
    for s in range(2):
        with wds.TarWriter(str(root / f"{s:05d}.tar")) as sink:
            for j in range(12):
                i = s * 12 + j
                key = f"{s:04d}{j:05d}"
                data, size = _jpeg(i)
                meta = {"url": f"https://example.com/{i}.jpg", "caption": caption_of(i),
                        "width": size[0], "height": size[1], "status": "success"}
                sample = {"__key__": key, "jpg": data, "txt": caption_of(i),
                          "json": json.dumps(meta)}
                if i == 5:
                    del sample["jpg"]
                if i == 7:
                    sample["jpg"] = b"not a jpeg at all"
                sink.write(sample)
                if i not in (5, 7):
                    expected[int(key)] = (key, size, caption_of(i))
    return root, expected


def _digests(root):
    return {p.name: xxhash.xxh3_128(p.read_bytes()).hexdigest() for p in root.glob("*.tar")}


def test_index_reads_tarwriter_shards_without_touching_them(img2dataset_like):
    root, expected = img2dataset_like
    before = _digests(root)
    done = subprocess.run([sys.executable, "-m", "hakubooru", "index", str(root)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (f"{root}: indexed 2 shards; 22 samples (22 with .txt, 22 with .json), 2 skipped "
            "(corrupt 1, no_image 1); ids from keys") in done.stderr
    assert _digests(root) == before
    index = pq.read_table(root / "index.parquet").to_pydict()
    assert index["id"] == sorted(expected)
    members = {}
    for shard in sorted(root.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                members[(shard.name, m.name)] = tar.extractfile(m).read()
    for row in range(len(index["id"])):
        key, size, caption = expected[index["id"][row]]
        assert index["key"][row] == key and index["ext"][row] == "jpg"
        assert (index["width"][row], index["height"][row]) == size
        with open(root / index["shard"][row], "rb") as f:
            for ext in ("jpg", "txt", "json"):
                f.seek(index[f"{'image' if ext == 'jpg' else ext}_offset"][row])
                got = f.read(index[f"{'image' if ext == 'jpg' else ext}_size"][row])
                assert got == members[(index["shard"][row], f"{key}.{ext}")]
    skipped = pq.read_table(root / "skipped.parquet").to_pylist()
    assert skipped == [{"key": "000000005", "shard": "00000.tar", "reason": "no_image"},
                       {"key": "000000007", "shard": "00000.tar", "reason": "corrupt"}]
    manifest = json.loads((root / "manifest.json").read_text())
    assert [(s["name"], s["samples"], s["size"], s["xxh3_128"]) for s in manifest["shards"]] == [
        (n, c, (root / n).stat().st_size, before[n]) for n, c in (("00000.tar", 10), ("00001.tar", 12))]
    # a second run gives the same files, and so do 2 processes reading the shards
    written = ("index.parquet", "manifest.json", "skipped.parquet", "tag_counts.parquet")
    first = {n: (root / n).read_bytes() for n in written}
    index_webdataset(root, progress=False)
    assert first == {n: (root / n).read_bytes() for n in written}
    index_webdataset(root, progress=False, workers=2)
    assert first == {n: (root / n).read_bytes() for n in written}


def test_trainer_captions_come_from_the_txt(img2dataset_like):
    root, expected = img2dataset_like
    index_webdataset(root, progress=False)
    index = load_index(root)
    plan = BatchPlan(index, 2, seed=3, epoch=0, buckets=make_buckets(64 * 64, 32, 128, 32))
    ds = BatchDataset(root, index, plan, shuffle_tags=False, tag_dropout=0.0)
    shuffled = BatchDataset(root, index, plan, shuffle_tags=True, tag_dropout=0.0, keep_tokens=1)
    seen = 0
    for i in range(len(plan)):
        batch, other = ds[i], shuffled[i]
        for post_id, text, mixed in zip(batch["ids"].tolist(), batch["captions"], other["captions"]):
            _, _, caption = expected[post_id]
            assert text == caption
            assert mixed.split(", ")[0] == caption.split(", ")[0]  # the keep count: 1 tag
            assert sorted(mixed.split(", ")) == sorted(caption.split(", "))
            seen += 1
    assert seen == len(plan) * 2 >= 16


def test_shards_with_caption_records_keep_them(tmp_path):
    made = make_test_shards(tmp_path / "made", n=20, per_shard=8)
    bare = tmp_path / "bare"
    bare.mkdir()
    for tar in made.dir.glob("*.tar"):
        (bare / tar.name).write_bytes(tar.read_bytes())
    index_webdataset(bare, progress=False)
    index = load_index(bare)
    assert index.ids.tolist() == made.ids.tolist()
    plan = BatchPlan(index, 2, seed=1, epoch=0, buckets=make_buckets(64 * 64, 32, 128, 32))
    # shuffled with no keep count: only the record's keep group can stay in front
    ds = BatchDataset(bare, index, plan, shuffle_tags=True, tag_dropout=0.0, keep_tokens=0,
                      keep_separator=None)
    for i in range(len(plan)):
        batch = ds[i]
        for post_id, text in zip(batch["ids"].tolist(), batch["captions"]):
            record = made.records[post_id]
            assert text.split(", ")[:len(record["keep"])] == record["keep"]
            assert sorted(text.split(", ")) == sorted(_caption(record).split(", "))


def test_augment_text_keep_rules_by_hand():
    text = "1girl, solo ||| smile, sky, tree ||| masterpiece"
    assert augment_text(text, seed=0, epoch=0, sample_id=1, shuffle=False, drop=0.0) == \
        "1girl, solo, smile, sky, tree, masterpiece"
    for epoch in range(20):
        tags = augment_text(text, seed=0, epoch=epoch, sample_id=1, drop=0.5).split(", ")
        assert tags[:2] == ["1girl", "solo"] and tags[-1] == "masterpiece"
        assert set(tags[2:-1]) <= {"smile", "sky", "tree"}
    plain = "a, b, c, d, e"
    assert augment_text(plain, seed=0, epoch=0, sample_id=1, shuffle=False, drop=0.0,
                        keep_tokens=2) == "a, b, c, d, e"
    orders = {augment_text(plain, seed=0, epoch=e, sample_id=1, drop=0.0, keep_tokens=2)
              for e in range(30)}
    assert all(o.startswith("a, b, ") for o in orders) and len(orders) == 6  # 3! orders of c, d, e


@pytest.mark.slow
def test_free_form_keys_train_on_the_tiny_model(tmp_path):
    root = tmp_path / "named"
    root.mkdir()
    with wds.TarWriter(str(root / "part-a.tar")) as sink:
        for i in range(16):
            data, _ = _jpeg(i)
            png = io.BytesIO()
            Image.open(io.BytesIO(data)).save(png, "PNG")
            sink.write({"__key__": f"cat_{i:02d}", "png": png.getvalue(), "txt": caption_of(i)})
    index_webdataset(root, progress=False)
    index = pq.read_table(root / "index.parquet").to_pydict()
    assert index["id"] == list(range(16)) and index["key"][3] == "cat_03"
    assert index["json_size"] == [-1] * 16
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "trainers.lokr", "--config", "tiny", "--shards",
                           str(root), "--output", str(out), "--max-steps", "2",
                           "--set", "data.keep_tokens=1"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "lokr.safetensors").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m][-1] == 2


def test_refusals(img2dataset_like, tmp_path, synth_demo):
    root, _ = img2dataset_like
    with pytest.raises(HakubooruError, match="is one shard; pass the folder"):
        index_webdataset(root / "00000.tar")
    done = subprocess.run([sys.executable, "-m", "hakubooru", "index", str(root), "--workers", "0"],
                          capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (2, "error: --workers must be ≥ 1, got 0\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.tar.gz").write_bytes(b"x")
    with pytest.raises(HakubooruError, match="holds no .tar shards \\(a.tar.gz is compressed"):
        index_webdataset(empty)
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text("{}")
    (other / "x.tar").write_bytes(b"")
    with pytest.raises(HakubooruError, match="was not written by `python -m hakubooru index`"):
        index_webdataset(other)


def _vp8x_header(width: int, height: int) -> bytes:
    """The first 30 bytes of an extended WebP (RIFF container spec): "RIFF", the RIFF size,
    "WEBP", then the VP8X chunk (size 10: flags, 3 reserved bytes, canvas width - 1 and
    height - 1 as 24-bit little-endian numbers)."""
    chunk = b"VP8X" + (10).to_bytes(4, "little") + bytes(4) + \
        (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + (4 + len(chunk)).to_bytes(4, "little") + b"WEBP" + chunk


def test_webp_size_from_its_header_and_absent_members_as_minus_one(tmp_path):
    """A WebP's size is read from its first chunk header, not by decoding it (the docstring of
    wdsindex._image_size): a bare 30-byte VP8X header declaring 300×200 is indexed as 300×200.
    An absent .txt or .json member has offset and size -1 (docs/architecture.md)."""
    root = tmp_path / "webp"
    root.mkdir()
    with wds.TarWriter(str(root / "00000.tar")) as sink:
        sink.write({"__key__": "1", "webp": _vp8x_header(300, 200), "json": b"{}"})
        sink.write({"__key__": "2", "webp": _vp8x_header(17, 4000), "txt": b"sky"})
    manifest = index_webdataset(root, progress=False)
    assert manifest["counts"] == {"written": 2, "skipped": 0, "skipped_by_reason": {},
                                  "with_txt": 1, "with_json": 1}
    index = pq.read_table(root / "index.parquet").to_pydict()
    assert index["id"] == [1, 2] and index["ext"] == ["webp", "webp"]
    assert (index["width"], index["height"]) == ([300, 17], [200, 4000])
    assert index["image_size"] == [30, 30]
    assert (index["txt_offset"][0], index["txt_size"][0]) == (-1, -1)
    assert (index["json_offset"][1], index["json_size"][1]) == (-1, -1)
    assert index["txt_size"][1] == 3 and index["json_size"][0] == 2


def test_index_command_shows_progress_unless_quiet(tmp_path, capsys):
    """`index` draws the "indexing shards" progress bar on stderr; --quiet leaves only the
    summary line. Exit status 0."""
    from hakubooru.cli import main

    root = tmp_path / "wds"
    root.mkdir()
    with wds.TarWriter(str(root / "00000.tar")) as sink:
        sink.write({"__key__": "1", "webp": _vp8x_header(8, 8), "txt": b"sky"})
    assert main(["index", str(root)]) == 0
    err = capsys.readouterr().err
    assert "indexing shards" in err and f"{root}: indexed 1 shards; 1 samples" in err
    assert main(["index", str(root), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "indexing shards" not in err and err.startswith(f"{root}: indexed 1 shards; 1 samples")
    assert err.count("\n") == 1
