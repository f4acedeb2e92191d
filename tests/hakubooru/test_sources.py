"""Image archives (hakubooru.sources) on tars and folders made by hand here."""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest

from hakubooru.shardwriter import file_checksum
from hakubooru.errors import HakubooruError
from hakubooru.sources import ImageSource, MemberReader, index_tar


def make_tar(path, members):
    """Write a tar of (name, bytes) members; bytes None means a directory entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def read(source, ids):
    """{id: bytes or None} through locate + MemberReader."""
    located = source.locate(np.array(ids, np.int64))
    with MemberReader() as reader:
        members = [located.member(k) for k in range(len(ids))]
        return {i: (reader.read(m) if m is not None else None) for i, m in zip(ids, members)}


@pytest.fixture
def webp4m(tmp_path):
    root = tmp_path / "webp4m"
    make_tar(root / "images/data-0005.tar", [
        ("5.webp", b"five-old"), ("1005.webp", b"thousand-five-old"), ("readme.txt", b"hi"),
        ("sub", None), ("sub/2005.webp", b"two-thousand-five"), ("7005.WEBP", b"upper"),
    ])
    make_tar(root / "images/data-1005.tar", [("1005.webp", b"thousand-five-new")])
    make_tar(root / "images/data-0006.tar", [("6.webp", b"six")])
    make_tar(root / "updates/2024-01/data-1005.tar", [("5.webp", b"five-jan")])
    make_tar(root / "updates/2024-03/extra.tar", [("5.webp", b"five-mar"), ("9.webp", b"nine")])
    return root


def test_webp4m_layout_overrides_and_folders(webp4m, tmp_path):
    source = ImageSource.open(webp4m, cache_dir=tmp_path / "cache")
    got = read(source, [5, 1005, 2005, 3005, 7005, 9])
    # 5: images/data-0005 < updates/2024-01 < updates/2024-03 (later wins)
    assert got[5] == b"five-mar"
    # 1005: images/data-0005.tar then images/data-1005.tar (data-1NNN sorts after data-0NNN)
    assert got[1005] == b"thousand-five-new"
    assert got[2005] == b"two-thousand-five"  # member under a folder inside the tar
    assert got[3005] is None  # in no archive
    assert got[7005] == b"upper"  # extension matched case-insensitively
    assert got[9] == b"nine"  # update tars without a data-NNNN name are always looked in
    # readme.txt and the "sub" folder entry are ignored and counted, not fatal
    assert source.ignored_members == 2
    # ids 5, 1005, ... are all in bucket 5: data-0006.tar is never indexed (4 of 5 tars)
    assert source.indexed_tars == 4


def test_locate_reports_found_flags(webp4m, tmp_path):
    located = ImageSource.open(webp4m, cache_dir=tmp_path / "c").locate(np.array([6, 8, 1005]))
    assert located.found.tolist() == [True, False, True]
    assert located.member(0).ext == "webp" and located.member(1) is None


def test_index_cache_lives_outside_the_sources(webp4m, tmp_path):
    before = {p: file_checksum(p) for p in webp4m.rglob("*") if p.is_file()}
    cache = tmp_path / "cache"
    ImageSource.open(webp4m, cache_dir=cache).locate(np.array([5, 6]))
    after = {p: file_checksum(p) for p in webp4m.rglob("*") if p.is_file()}
    assert before == after  # nothing written into or beside the archives
    assert len(list(cache.glob("*.npz"))) == 5  # one entry per indexed tar


def test_index_cache_follows_changes_and_survives_damage(tmp_path):
    tar = tmp_path / "a/data-0001.tar"
    make_tar(tar, [("1.webp", b"one")])
    cache = tmp_path / "cache"
    assert index_tar(tar, cache).ids.tolist() == [1]
    make_tar(tar, [("1.webp", b"one"), ("1001.webp", b"more")])
    os.utime(tar, ns=(1, 10**18))  # a new mtime and size: a new cache key
    assert index_tar(tar, cache).ids.tolist() == [1, 1001]
    for entry in cache.glob("*.npz"):
        entry.write_bytes(b"garbage")  # a damaged cache entry is rebuilt, not trusted
    index = index_tar(tar, cache)
    assert index.ids.tolist() == [1, 1001] and index.sizes.tolist() == [3, 4]


def test_default_cache_dir_from_environment(tmp_path, monkeypatch):
    tar = tmp_path / "data-0001.tar"
    make_tar(tar, [("1.webp", b"one")])
    monkeypatch.setenv("HAKUBOORU_TARINDEX_CACHE", str(tmp_path / "envcache"))
    index_tar(tar)
    assert len(list((tmp_path / "envcache").glob("*.npz"))) == 1


def test_nyanko_layout(tmp_path):
    root = tmp_path / "nyanko"
    make_tar(root / "original/data-0007.tar", [("7.jpg", b"seven-jpg"), ("1007.png", b"old")])
    make_tar(root / "recent/data-1007.tar", [("1007.png", b"new")])
    source = ImageSource.open(root, cache_dir=tmp_path / "c")
    located = source.locate(np.array([7, 1007]))
    assert [located.member(k).ext for k in range(2)] == ["jpg", "png"]
    assert read(source, [7, 1007]) == {7: b"seven-jpg", 1007: b"new"}  # recent/ after original/


def test_plain_folder(tmp_path):
    root = tmp_path / "folder"
    root.mkdir()
    (root / "12.png").write_bytes(b"twelve")
    (root / "notes.txt").write_bytes(b"not an image")
    (root / "13.jpeg").write_bytes(b"")
    source = ImageSource.open(root, cache_dir=tmp_path / "c")
    assert read(source, [12, 13, 14]) == {12: b"twelve", 13: b"", 14: None}
    assert source.ignored_members == 1


def test_missing_or_empty_images_folder_is_one_clear_error(tmp_path):
    with pytest.raises(HakubooruError, match="images folder not found"):
        ImageSource.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HakubooruError, match="no image archives"):
        ImageSource.open(tmp_path / "empty")
    (tmp_path / "data-0000.tar").write_bytes(b"")
    with pytest.raises(HakubooruError, match=r"^images path .*data-0000.tar is a file, not a folder: give"):
        ImageSource.open(tmp_path / "data-0000.tar")


def test_tar_cut_short_keeps_the_members_before_the_cut(tmp_path):
    tar = tmp_path / "cut/data-0001.tar"
    make_tar(tar, [("1.webp", b"a" * 600), ("1001.webp", b"b" * 3000), ("2001.webp", b"c" * 10)])
    # 512 header + 1024 (600 padded) + 512 header + 3000 data...: cut 1000 bytes into 1001.webp
    tar.write_bytes(tar.read_bytes()[:512 + 1024 + 512 + 1000])
    source = ImageSource.open(tmp_path / "cut", cache_dir=tmp_path / "c")
    got = read(source, [1, 1001, 2001])
    assert got == {1: b"a" * 600, 1001: b"b" * 1000, 2001: None}  # 1001 reads back short
    assert source.cut_short_tars == [str(tar)]


def test_unreadable_tar_is_one_clear_error(tmp_path):
    root = tmp_path / "bad"
    (root / "images").mkdir(parents=True)
    (root / "images/data-0001.tar").write_bytes(b"\x01" * 1000)
    source = ImageSource.open(root, cache_dir=tmp_path / "c")
    with pytest.raises(HakubooruError, match="data-0001.tar: cannot read as a tar"):
        source.locate(np.array([1]))


def test_reader_keeps_few_files_open(webp4m, tmp_path):
    source = ImageSource.open(webp4m, cache_dir=tmp_path / "c")
    located = source.locate(np.array([5, 1005, 2005, 6]))
    reader = MemberReader(max_open=1)
    with reader:
        assert [reader.read(located.member(k)) for k in range(4)] == [
            b"five-mar", b"thousand-five-new", b"two-thousand-five", b"six"]
        assert len(reader._files) == 1


def test_overlong_ids_are_ignored_not_fatal(tmp_path):
    root = tmp_path / "long"
    # 25 digits > int64; 18 digits is the longest id taken (999...9 < 2**63 - 1 = 9.2e18)
    make_tar(root / "extra.tar", [("9999999999999999999999999.webp", b"huge"),
                                  ("999999999999999999.webp", b"eighteen"), ("3.webp", b"three")])
    (root / "1234567890123456789012.png").write_bytes(b"loose, too long")
    source = ImageSource.open(root, cache_dir=tmp_path / "c")
    assert read(source, [3, 999999999999999999]) == {3: b"three", 999999999999999999: b"eighteen"}
    assert source.ignored_members == 2  # the 25-digit member and the 22-digit loose file


@pytest.mark.parametrize("damage", ["cut", "flip"])
def test_damaged_index_cache_is_rebuilt(tmp_path, damage):
    tar = tmp_path / "a/data-0001.tar"
    make_tar(tar, [("1.webp", b"one"), ("1001.webp", b"more")])
    cache = tmp_path / "cache"
    index_tar(tar, cache)
    (entry,) = cache.glob("*.npz")
    data = bytearray(entry.read_bytes())
    if damage == "cut":
        data = data[: len(data) // 2]  # a zip without its central directory
    else:
        data[60:120] = bytes(60)  # inside the first array's member: its CRC no longer matches
    entry.write_bytes(bytes(data))
    index = index_tar(tar, cache)
    assert index.ids.tolist() == [1, 1001] and index.sizes.tolist() == [3, 4]


def test_archives_without_image_members_locate_nothing(tmp_path):
    """Containers that hold no <id>.<ext> member (or none in the ids' buckets) are not an
    error: every id is reported not found."""
    root = tmp_path / "noimages"
    make_tar(root / "images/data-0001.tar", [("readme.txt", b"hi"), ("sub", None)])
    source = ImageSource.open(root, cache_dir=tmp_path / "c")
    located = source.locate(np.array([1, 1001]))  # bucket 1: data-0001.tar is indexed
    assert located.found.tolist() == [False, False]
    assert located.member(0) is None and located.member(1) is None
    assert source.indexed_tars == 1 and source.ignored_members == 2  # readme.txt and sub/
    # ids in bucket 7 only: no tar is indexed at all, and no loose file exists
    assert read(ImageSource.open(root, cache_dir=tmp_path / "c"), [7, 2007]) == {7: None, 2007: None}


def test_repr_names_the_containers_not_the_loose_file_scan(tmp_path):
    """repr(ImageSource) (REPL, logs) shows the root and the tars; the scanned loose files,
    which can be millions in a plain folder, are left out."""
    root = tmp_path / "folder"
    make_tar(root / "extra.tar", [("3.webp", b"three")])
    for i in (12, 13):
        (root / f"{i}.png").write_bytes(b"loose")
    text = repr(ImageSource.open(root, cache_dir=tmp_path / "c"))
    assert "extra.tar" in text and repr(root) in text
    assert "12.png" not in text and "13.png" not in text
