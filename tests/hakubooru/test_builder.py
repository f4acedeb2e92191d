"""build_shards end to end on the synthetic demo (600 posts, webp-4Mpixel tars, 64 px images).

Expected values come from the inputs read independently of the builder: the source tars
read with ``tarfile``, captions from the Captioner, image sizes decoded with PIL.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import xxhash
from PIL import Image

from hakubooru import manifest as mf
from hakubooru.builder import build_shards, merge
from hakubooru.captioner import Captioner
from hakubooru.cli import main as cli_main
from hakubooru.db import open_db
from hakubooru.hf import hf_features
from hakubooru.shardwriter import file_checksum
from hakubooru.errors import HakubooruError
from hakubooru.selector import Selection, Selector

from tests.helpers import REPO
from tests.helpers.archives import archive_members, folder_bytes

SHARD_SIZE = 100


def source_digests(db_path, images_dir) -> dict:
    files = [Path(db_path)] + sorted(Path(images_dir).rglob("*"))
    return {str(p): file_checksum(p) for p in files if p.is_file()}


@pytest.fixture(scope="module")
def demo(synth_demo, tmp_path_factory):
    """The demo inputs, a selection of every post, and a reference build (1 worker)."""
    db_path, images = synth_demo
    tmp = tmp_path_factory.mktemp("builder")
    selection = Selector.all().save(tmp / "all.parquet", open_db(db_path))
    before = source_digests(db_path, images)
    out = tmp / "reference"
    result = build_shards(db_path, images, tmp / "all.parquet", out, shard_size=SHARD_SIZE,
                          cache_dir=tmp / "cache", progress=False)
    return {"db": db_path, "images": images, "tmp": tmp, "selection": selection,
            "sel_path": tmp / "all.parquet", "out": out, "result": result,
            "before": before, "after": source_digests(db_path, images)}


def build(demo, out, **kw):
    kw.setdefault("shard_size", SHARD_SIZE)
    return build_shards(demo["db"], demo["images"], demo["sel_path"], out,
                        cache_dir=demo["tmp"] / "cache", progress=False, **kw)


def test_every_sample_matches_its_source(demo):
    ids = demo["selection"].ids
    sources = archive_members(demo["images"])
    expected_ids = sorted(set(ids.tolist()) & set(sources))  # selected and in the archives
    captions = {i: (c, r) for i, c, r in Captioner(demo["db"]).captions(ids)}
    urls = [str(p) for p in sorted(demo["out"].glob("shard-*.tar"))]
    assert len(urls) == -(-len(ids) // SHARD_SIZE)  # 600 ids / 100 per shard

    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [int(s["__key__"]) for s in samples] == expected_ids
    for s in samples:
        post_id = int(s["__key__"])
        assert set(s) >= {"webp", "txt", "json"}
        assert s["webp"] == sources[post_id]  # pass-through: the source bytes
        caption, record = captions[post_id]
        size = Image.open(io.BytesIO(sources[post_id])).size
        assert s["txt"].decode() == caption
        assert json.loads(s["json"]) == {**record, "width": size[0], "height": size[1]}

    ds = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train",
                               cache_dir=str(demo["tmp"] / "hf"))
    ds = ds.cast_column("webp", datasets.Image(decode=False))
    assert [int(k) for k in ds["__key__"]] == expected_ids
    for row in ds:
        post_id = int(row["__key__"])
        assert row["webp"]["bytes"] == sources[post_id]
        caption, record = captions[post_id]
        size = Image.open(io.BytesIO(sources[post_id])).size
        assert row["txt"] == caption
        assert row["json"] == {**record, "width": size[0], "height": size[1]}


def test_manifest_counts_and_checksums(demo):
    out = demo["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    ids = demo["selection"].ids
    in_archives = set(archive_members(demo["images"])) & set(ids.tolist())
    missing = len(ids) - len(in_archives)  # posts with no image anywhere
    assert manifest["counts"] == {"selected": len(ids), "written": len(in_archives),
                                  "skipped": missing, "skipped_by_reason": {"missing": missing}}
    assert manifest["db_fingerprint"] == demo["selection"].db_fingerprint
    # the dataset fingerprint is the xxh3-128 of the manifest's canonical JSON without it
    body = {k: v for k, v in manifest.items() if k != "fingerprint"}
    canonical = json.dumps(body, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert manifest["fingerprint"] == "xxh3_128:" + xxhash.xxh3_128(canonical.encode()).hexdigest()
    assert manifest["selection"]["sha256"] == demo["selection"].digest
    assert manifest["captioner"] == Captioner(demo["db"]).settings()
    assert manifest["image_policy"]["image_format"] is None
    for k, shard in enumerate(manifest["shards"]):
        path = out / f"shard-{k:06d}.tar"
        assert shard["name"] == path.name
        assert shard["xxh3_128"] == xxhash.xxh3_128(path.read_bytes()).hexdigest()
        # shard k was given ids[100k:100k+100]; it holds those with an image
        block = set(ids[k * SHARD_SIZE:(k + 1) * SHARD_SIZE].tolist())
        assert shard["samples"] == len(block & in_archives)
    skipped = pq.read_table(out / "skipped.parquet").to_pydict()
    assert skipped["id"] == sorted(set(ids.tolist()) - in_archives)
    assert set(skipped["reason"]) == {"missing"}
    r = demo["result"]
    assert (r.written, r.skipped, r.complete, r.shards_built) == (
        len(in_archives), {"missing": missing}, True, 6)


def test_index_offsets_read_back_exactly(demo):
    out = demo["out"]
    index = pq.read_table(out / "index.parquet")
    assert index.schema.names == ["id", "shard", "image_offset", "image_size", "txt_offset",
                                  "txt_size", "json_offset", "json_size", "width", "height", "ext",
                                  "image_xxh3", "txt_xxh3", "json_xxh3"]
    assert str(index.schema.field("width").type) == "int32"
    rows = index.to_pylist()
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    members = {}
    for path in out.glob("shard-*.tar"):
        with tarfile.open(path) as tar:
            for m in tar:
                members[(path.name, m.name)] = tar.extractfile(m).read()
    assert len(rows) * 3 == len(members)
    for r in rows:
        data = (out / r["shard"]).read_bytes()
        for part, ext in (("image", r["ext"]), ("txt", "txt"), ("json", "json")):
            got = data[r[f"{part}_offset"]:r[f"{part}_offset"] + r[f"{part}_size"]]
            assert got == members[(r["shard"], f"{r['id']}.{ext}")]
            assert r[f"{part}_xxh3"] == xxhash.xxh3_64_intdigest(got)  # the trainer checks it
        record = json.loads(members[(r["shard"], f"{r['id']}.json")])
        assert (record["width"], record["height"]) == (r["width"], r["height"])


def test_sources_and_database_are_unchanged(demo):
    assert demo["before"] == demo["after"]
    assert not list(Path(demo["images"]).rglob("*.npz"))  # the tar index is cached elsewhere


def test_two_workers_give_identical_bytes(demo, tmp_path):
    build(demo, tmp_path / "w2", workers=2)
    assert folder_bytes(tmp_path / "w2") == folder_bytes(demo["out"])


def test_parts_merge_into_the_same_folder(demo, tmp_path, capsys):
    out = tmp_path / "parts"
    first = build(demo, out, part="0/3")
    # shards k % 3 == 0 of 6: 0 and 3
    assert first.shards_built == 2 and not first.complete
    assert not (out / "manifest.json").exists()
    with pytest.raises(HakubooruError, match="4 of 6 shards not finished"):
        merge(out)
    build(demo, out, part="2/3")
    last = build(demo, out, part=(1, 3))
    assert last.complete  # the last part to finish writes the manifest and index
    assert folder_bytes(out) == folder_bytes(demo["out"])
    (out / "manifest.json").unlink()
    inodes = {name: (out / name).stat().st_ino for name in ("index.parquet", "skipped.parquet")}
    capsys.readouterr()
    assert cli_main(["build", "--merge", str(out), "--quiet"]) == 0
    # 6 shards; 600 selected minus the missing ones written
    written = demo["result"].written
    assert capsys.readouterr().err.strip() == (
        f"{out}: merged 6 shards; {written} written, {600 - written} skipped")
    assert folder_bytes(out) == folder_bytes(demo["out"])
    # rewritten under a temporary name and renamed, never in place (a reader sees old or new)
    assert all((out / name).stat().st_ino != ino for name, ino in inodes.items())


def test_rerun_verifies_and_rebuilds_a_damaged_shard(demo, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(demo["out"], out)
    shard = out / "shard-000002.tar"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0xFF
    shard.write_bytes(bytes(data))
    (out / "manifest.json").unlink()
    result = build(demo, out, workers=2)  # verification and rebuild in 2 processes
    assert (result.shards_verified, result.shards_built) == (5, 1)
    assert folder_bytes(out) == folder_bytes(demo["out"])


@pytest.mark.slow
def test_killed_build_resumes_to_identical_bytes(demo, tmp_path):
    common = ["--db", str(demo["db"]), "--images", str(demo["images"]),
              "--selection", str(demo["sel_path"]), "--shard-size", "10", "--format", "webp",
              "--cache-dir", str(demo["tmp"] / "cache"), "--quiet"]
    build(demo, tmp_path / "whole", shard_size=10, image_format="webp")
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "hakubooru", "build", *common, "--out", str(out)],
                            cwd=REPO)
    deadline = time.monotonic() + 120
    while not list(out.glob("shard-*.tar")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the build finished before it could be killed"
    assert len(list(out.glob("shard-*.tar"))) < 60
    rerun = subprocess.run([sys.executable, "-m", "hakubooru", "build", *common, "--out", str(out)],
                           cwd=REPO)
    assert rerun.returncode == 0
    assert not list(out.glob(".shard-*.tmp"))  # the killed shard's temporary file was rebuilt
    assert folder_bytes(out) == folder_bytes(tmp_path / "whole")


def test_reencode_and_downscale_record_the_stored_size(demo, tmp_path):
    out = tmp_path / "png"
    build(demo, out, image_format="png", max_pixels=1000)
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert {r["ext"] for r in index} == {"png"}
    for r in index[:60]:
        data = (out / r["shard"]).read_bytes()
        im = Image.open(io.BytesIO(data[r["image_offset"]:r["image_offset"] + r["image_size"]]))
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == (r["width"], r["height"])
        assert r["width"] * r["height"] <= 1000
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image_policy"]["image_format"] == "png"
    assert manifest["image_policy"]["max_pixels"] == 1000


# ---- bad input -------------------------------------------------------------------------

def png_bomb_header() -> bytes:
    """A PNG claiming 100000 x 100000 pixels (1e10 > Pillow's 178,956,970 limit)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_bad_members_are_skipped_counted_and_reported(demo, tmp_path, capsys):
    sources = archive_members(demo["images"])
    a, b, c, d, e, f, g, h = sorted(sources)[:8]
    png = io.BytesIO()
    Image.open(io.BytesIO(sources[f])).save(png, "PNG")
    members = [
        (f"{a}.webp", sources[a]),                          # good
        (f"{b}.webp", sources[b][: len(sources[b]) // 2]),  # truncated
        (f"{c}.webp", np.random.default_rng(0).bytes(3000)),  # garbage
        (f"{d}.webp", b""),                                 # zero bytes
        ("readme.txt", b"not an image"),                    # ignored member
        (f"{e}.webp", png_bomb_header()),                   # decompression bomb
        (f"{f}.webp", png.getvalue()),                      # PNG bytes under .webp
        (f"extra/{g}.webp", sources[g]),                    # good, under a folder
    ]                                                       # h: in no archive
    images = tmp_path / "images"
    images.mkdir()
    with tarfile.open(images / "handmade.tar", "w") as tar:
        tar.addfile(_dir("extra"))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    before = file_checksum(images / "handmade.tar")
    db = open_db(demo["db"])
    Selector.ids([a, b, c, d, e, f, g, h]).save(tmp_path / "sel.parquet", db)
    out = tmp_path / "out"
    result = build_shards(demo["db"], images, tmp_path / "sel.parquet", out,
                          cache_dir=tmp_path / "cache")
    expected = {"truncated": 1, "not_image": 1, "empty": 1, "too_large": 1, "wrong_format": 1,
                "missing": 1}
    assert result.written == 2 and result.skipped == expected
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["skipped_by_reason"] == expected
    skipped = pq.read_table(out / "skipped.parquet").to_pydict()
    assert dict(zip(skipped["id"], skipped["reason"])) == {
        b: "truncated", c: "not_image", d: "empty", e: "too_large", f: "wrong_format", h: "missing"}
    assert pq.read_table(out / "index.parquet").column("id").to_pylist() == [a, g]
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert "2 written, 6 skipped (empty 1, missing 1, not_image 1, too_large 1, truncated 1, " \
           "wrong_format 1), 2 archive members ignored" in summary  # readme.txt, extra/
    assert file_checksum(images / "handmade.tar") == before


def _dir(name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_mixed_extensions_need_a_format(demo, tmp_path):
    sources = archive_members(demo["images"])
    a, b = sorted(sources)[:2]
    images = tmp_path / "mixed"
    images.mkdir()
    (images / f"{a}.webp").write_bytes(sources[a])
    png = io.BytesIO()
    Image.open(io.BytesIO(sources[b])).save(png, "PNG")
    (images / f"{b}.png").write_bytes(png.getvalue())
    Selector.ids([a, b]).save(tmp_path / "sel.parquet", open_db(demo["db"]))
    args = (demo["db"], images, tmp_path / "sel.parquet")
    with pytest.raises(HakubooruError, match=r"mixed formats \(png 1, webp 1\).*--format"):
        build_shards(*args, tmp_path / "out", cache_dir=tmp_path / "c", progress=False)
    assert not (tmp_path / "out").exists()
    result = build_shards(*args, tmp_path / "out", image_format="webp", cache_dir=tmp_path / "c",
                          progress=False)
    assert result.written == 2
    assert pq.read_table(tmp_path / "out/index.parquet").column("ext").to_pylist() == ["webp"] * 2


def test_refusals_write_nothing(demo, synth_db, tmp_path):
    other = Selector.all().save(tmp_path / "other_db.parquet", open_db(synth_db))
    assert other.db_fingerprint != demo["selection"].db_fingerprint
    with pytest.raises(HakubooruError, match="another database"):
        build_shards(demo["db"], demo["images"], tmp_path / "other_db.parquet", tmp_path / "o1",
                     cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(HakubooruError, match="images folder not found"):
        build_shards(demo["db"], tmp_path / "nope", demo["sel_path"], tmp_path / "o2",
                     progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # CLI: one line, exit status 2
    proc = subprocess.run([sys.executable, "-m", "hakubooru", "build", "--db", str(demo["db"]),
                           "--images", str(tmp_path / "nope"), "--selection", str(demo["sel_path"]),
                           "--out", str(tmp_path / "o3")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: images folder not found: {tmp_path / 'nope'}"


def test_folder_from_other_inputs_is_refused(demo, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(demo["out"], out)
    Selector.id_range(0, 10**9).sample(50, seed=1).save(tmp_path / "few.parquet",
                                                        open_db(demo["db"]))
    before = folder_bytes(out)
    with pytest.raises(HakubooruError, match=r"built from other inputs \(different selection"):
        build_shards(demo["db"], demo["images"], tmp_path / "few.parquet", out,
                     shard_size=SHARD_SIZE, cache_dir=demo["tmp"] / "cache", progress=False)
    with pytest.raises(HakubooruError, match="different image_policy"):
        build(demo, out, image_format="jpeg")
    assert folder_bytes(out) == before
    (tmp_path / "unrelated").mkdir()
    (tmp_path / "unrelated/notes.txt").write_text("mine")
    with pytest.raises(HakubooruError, match="not a hakubooru shard folder"):
        build(demo, tmp_path / "unrelated")


def test_part_must_be_i_of_n():
    from hakubooru.builder import parse_part
    assert parse_part("2/4") == (2, 4) and parse_part((0, 1)) == (0, 1)
    for bad in ("4/4", "-1/3", "1/0", "a/b", "3"):
        with pytest.raises(HakubooruError, match="part"):
            parse_part(bad)


def test_source_tar_cut_short_skips_the_cut_member(demo, tmp_path, capsys):
    sources = archive_members(demo["images"])
    a, b = sorted(sources)[:2]
    images = tmp_path / "images"
    images.mkdir()
    with tarfile.open(images / "part.tar", "w") as tar:
        for post_id in (a, b):
            info = tarfile.TarInfo(f"{post_id}.webp")
            info.size = len(sources[post_id])
            tar.addfile(info, io.BytesIO(sources[post_id]))
        b_data_at = tar.offset - (-(-len(sources[b]) // 512) * 512)  # end minus b's padded data
    cut = images / "part.tar"
    cut.write_bytes(cut.read_bytes()[:b_data_at + len(sources[b]) // 2])  # half of b remains
    Selector.ids([a, b]).save(tmp_path / "sel.parquet", open_db(demo["db"]))
    result = build_shards(demo["db"], images, tmp_path / "sel.parquet", tmp_path / "out",
                          cache_dir=tmp_path / "c")
    assert result.written == 1 and result.skipped == {"truncated": 1}
    assert result.cut_short_tars == [str(cut)]
    assert "1 source tars cut short" in capsys.readouterr().err


def test_quiet_still_prints_the_summary_line(demo, tmp_path, capsys):
    out = tmp_path / "quiet"
    assert cli_main(["build", "--db", str(demo["db"]), "--images", str(demo["images"]),
                     "--selection", str(demo["sel_path"]), "--out", str(out), "--shard-size",
                     "300", "--cache-dir", str(demo["tmp"] / "cache"), "--quiet"]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    # no progress bar, one line: 600 posts / 300 per shard = 2 shards
    assert len(lines) == 1
    assert lines[0].startswith(f"{out}: 2 shards built, 0 verified (of 2); 600 posts, ")
    assert lines[0].endswith("complete: manifest.json written")


# ---- reading back with Hugging Face datasets --------------------------------------------

def test_datasets_reads_shards_that_start_with_empty_tag_groups(demo, tmp_path):
    sources = archive_members(demo["images"])
    records = {i: (c, r) for i, c, r in Captioner(demo["db"]).captions(np.array(sorted(sources)))}
    # datasets guesses column types from the first 5 samples of the first shard: start it
    # with 6 posts whose meta list is empty, then posts where it is not
    empty = [i for i in sorted(records) if not records[i][1]["meta"]][:6]
    tagged = [i for i in sorted(records) if i > empty[-1] and records[i][1]["meta"]][:4]
    assert len(empty) == 6 and len(tagged) == 4
    Selector.ids(empty + tagged).save(tmp_path / "sel.parquet", open_db(demo["db"]))
    out = tmp_path / "out"
    build_shards(demo["db"], demo["images"], tmp_path / "sel.parquet", out, shard_size=8,
                 cache_dir=demo["tmp"] / "cache", progress=False)
    urls = [str(p) for p in sorted(out.glob("shard-*.tar"))]
    assert len(urls) == 2  # 10 posts, 8 per shard

    ds = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train",
                               features=hf_features("webp"), cache_dir=str(tmp_path / "hf"))
    assert ds.column_names == ["__key__", "__url__", "json", "txt", "webp"]
    assert [int(k) for k in ds["__key__"]] == empty + tagged
    for row in ds:
        post_id = int(row["__key__"])
        caption, record = records[post_id]
        size = Image.open(io.BytesIO(sources[post_id])).size
        assert row["__url__"] == urls[(empty + tagged).index(post_id) // 8]
        assert row["txt"] == caption
        assert row["json"] == {**record, "width": size[0], "height": size[1]}
        assert row["webp"].size == size  # decoded by datasets' Image feature
    assert [row["meta"] for row in ds["json"][:6]] == [[]] * 6
    with pytest.raises(HakubooruError, match="unknown image extension 'gif'"):
        hf_features("gif")


# ---- selections, output folders, plans ---------------------------------------------------

def test_unsorted_or_repeated_selection_ids_lose_no_post(demo, tmp_path):
    a, b, c = sorted(archive_members(demo["images"]))[:3]
    selection = Selection(np.array([c, a, c, b]), {"op": "ids"}, demo["selection"].db_fingerprint)
    assert selection.ids.tolist() == [a, b, c]  # sorted, duplicates dropped
    result = build_shards(demo["db"], demo["images"], selection, tmp_path / "out", shard_size=2,
                          cache_dir=demo["tmp"] / "cache", progress=False)
    # 3 distinct posts, 2 per shard -> 2 shards holding all 3
    assert (result.shard_count, result.written) == (2, 3)
    assert pq.read_table(tmp_path / "out/index.parquet").column("id").to_pylist() == [a, b, c]
    selection.ids = np.array([c, a, b])  # set behind the constructor's back
    with pytest.raises(HakubooruError, match="not sorted and unique"):
        build_shards(demo["db"], demo["images"], selection, tmp_path / "out2",
                     cache_dir=demo["tmp"] / "cache", progress=False)
    assert not (tmp_path / "out2").exists()


def test_max_pixels_on_avif_without_format_is_refused_up_front(demo, tmp_path):
    post_id = sorted(archive_members(demo["images"]))[0]
    images = tmp_path / "avif"
    images.mkdir()
    avif = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(avif, "AVIF")
    (images / f"{post_id}.avif").write_bytes(avif.getvalue())
    Selector.ids([post_id]).save(tmp_path / "sel.parquet", open_db(demo["db"]))
    args = (demo["db"], images, tmp_path / "sel.parquet")
    # 40x30 = 1200 px > 1000 would need a downscale, and AVIF is no output format
    with pytest.raises(HakubooruError, match=r"--max-pixels cannot downscale \.avif.*--format"):
        build_shards(*args, tmp_path / "out", max_pixels=1000, cache_dir=tmp_path / "c",
                     progress=False)
    assert not (tmp_path / "out").exists()
    # pass-through keeps it as .avif (accepted like jpg/png/webp)
    result = build_shards(*args, tmp_path / "out", cache_dir=tmp_path / "c", progress=False)
    assert result.written == 1
    assert pq.read_table(tmp_path / "out/index.parquet").column("ext").to_pylist() == ["avif"]


def test_output_path_that_is_a_file_is_one_clear_error(demo, tmp_path):
    (tmp_path / "out").write_text("mine")
    with pytest.raises(HakubooruError, match="is a file, not a folder"):
        build(demo, tmp_path / "out")
    assert (tmp_path / "out").read_text() == "mine"


def test_parts_starting_together_agree_on_one_plan(tmp_path):
    plan = {"format": mf.FORMAT, "shard_count": 3}
    other = {**plan, "shard_count": 4}
    out = tmp_path / "out"
    out.mkdir()
    # part A writes the plan; part B, which found none a moment earlier, must not replace it
    assert mf.create_once(out / mf.PLAN_FILE, mf.dump_json(plan))
    assert not mf.create_once(out / mf.PLAN_FILE, mf.dump_json(other))
    assert json.loads((out / mf.PLAN_FILE).read_text()) == plan
    # a folder holding only the plan is accepted when the plan matches
    mf.check_or_write_plan(out, plan)
    with pytest.raises(HakubooruError, match="different shard_count"):
        mf.check_or_write_plan(out, other)
    assert sorted(p.name for p in out.iterdir()) == [mf.PLAN_FILE, mf.PARTS_DIR]  # no temp files

    # a plan file that cannot be read is named as such (not taken for a foreign folder)
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / mf.PLAN_FILE).write_text("{cut sh")
    with pytest.raises(HakubooruError, match="is damaged"):
        mf.check_or_write_plan(tmp_path / "damaged", plan)


def test_upper_case_member_extensions_reach_the_shards(demo, tmp_path):
    # an archive naming its members 123.WEBP: matched case-insensitively, stored as .webp
    sources = archive_members(demo["images"])
    a, b = sorted(sources)[:2]
    images = tmp_path / "images"
    images.mkdir()
    with tarfile.open(images / "upper.tar", "w") as tar:  # not data-NNNN: always read
        for post_id, name in ((a, f"{a}.WEBP"), (b, f"{b}.Webp")):
            info = tarfile.TarInfo(name)
            info.size = len(sources[post_id])
            tar.addfile(info, io.BytesIO(sources[post_id]))
    Selector.ids([a, b]).save(tmp_path / "sel.parquet", open_db(demo["db"]))
    result = build_shards(demo["db"], images, tmp_path / "sel.parquet", tmp_path / "out",
                          cache_dir=tmp_path / "c", progress=False)
    assert result.written == 2 and result.skipped == {}
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        names = tar.getnames()
        assert tar.extractfile(f"{a}.webp").read() == sources[a]
    assert names == [f"{a}.json", f"{a}.txt", f"{a}.webp", f"{b}.json", f"{b}.txt", f"{b}.webp"]
    assert pq.read_table(tmp_path / "out" / "index.parquet").column("ext").to_pylist() == ["webp", "webp"]


def test_parts_sidecars_have_the_documented_names(demo):
    """docs/shards.md: one sidecar per shard at .parts/shard-NNNNNN.json (the shard's name with
    .json for .tar), recording that shard's name, size and checksum."""
    out = demo["out"]
    # 600 ids / 100 per shard = 6 shards, 6 sidecars
    assert sorted(p.name for p in (out / ".parts").iterdir()) == [
        f"shard-{k:06d}.json" for k in range(6)]
    for k in range(6):
        sidecar = json.loads((out / ".parts" / f"shard-{k:06d}.json").read_text())
        tar = out / f"shard-{k:06d}.tar"
        assert sidecar["name"] == tar.name and sidecar["size"] == tar.stat().st_size
        assert sidecar["xxh3_128"] == xxhash.xxh3_128(tar.read_bytes()).hexdigest()
