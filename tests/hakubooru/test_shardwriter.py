"""One shard tar (hakubooru.shardwriter): atomic appearance, fixed metadata, offsets, checksum."""
from __future__ import annotations

import errno
import os
import tarfile

import pytest
import xxhash

from hakubooru.errors import HakubooruError
from hakubooru.shardwriter import ShardWriter, member_header, temporary_path


def write_two(path):
    writer = ShardWriter(path)
    spans = [writer.write("12", {"webp": b"image-bytes", "txt": b"1girl, solo", "json": b"{}"}),
             writer.write("345", {"webp": b"x" * 700, "txt": b"", "json": b'{"id":345}'})]
    return writer, spans


def test_shard_appears_only_when_published(tmp_path):
    path = tmp_path / "shard-000000.tar"
    writer, _ = write_two(path)
    checksum, size = writer.finish()
    assert not path.exists() and temporary_path(path).exists()
    writer.publish()
    assert path.exists() and not temporary_path(path).exists()
    assert xxhash.xxh3_128(path.read_bytes()).hexdigest() == checksum and path.stat().st_size == size


def test_members_order_metadata_and_offsets(tmp_path):
    path = tmp_path / "s.tar"
    writer, spans = write_two(path)
    writer.finish()
    writer.publish()
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        # per sample, extensions sorted alphabetically: json, txt, webp
        assert [m.name for m in members] == ["12.json", "12.txt", "12.webp",
                                             "345.json", "345.txt", "345.webp"]
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
            (0, 0, 0, "hakubooru", "hakubooru", 0o444)}
        offsets = {m.name: (m.offset_data, m.size) for m in members}
    assert spans[0]["webp"] == offsets["12.webp"]
    assert spans[1]["webp"] == offsets["345.webp"]
    assert spans[1]["txt"] == offsets["345.txt"] and spans[1]["txt"][1] == 0
    data = path.read_bytes()
    off, size = spans[1]["webp"]
    assert data[off:off + size] == b"x" * 700


def test_same_samples_same_bytes(tmp_path):
    for name in ("a.tar", "b.tar"):
        writer, _ = write_two(tmp_path / name)
        writer.finish()
        writer.publish()
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_abort_leaves_nothing(tmp_path):
    path = tmp_path / "s.tar"
    writer, _ = write_two(path)
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_bytes_equal_tarfiles_own_writer(tmp_path):
    # the reference: the same members through tarfile.addfile with the same fixed metadata
    import io
    import os
    samples = [("12", {"webp": os.urandom(1000), "txt": b"1girl, solo", "json": b"{}"}),
               ("345", {"webp": b"x" * 700, "txt": b"", "json": b'{"id":345}'}),
               ("9", {"png": os.urandom(5120)})]  # a member ending exactly on a block boundary
    writer = ShardWriter(tmp_path / "ours.tar")
    for key, members in samples:
        writer.write(key, members)
    writer.finish()
    writer.publish()
    with tarfile.open(tmp_path / "ref.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(members[ext]), 0, 0o444
                info.uname = info.gname = "hakubooru"
                tar.addfile(info, io.BytesIO(members[ext]))
    assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "ref.tar").read_bytes()


def test_member_size_limit_is_the_ustar_size_field():
    """A USTAR size field is 12 bytes: 11 octal digits and a NUL, so the largest member is
    8**11 - 1 bytes (8 GiB - 1); one byte more does not fit a plain header."""
    header = member_header("1.webp", 8 ** 11 - 1)
    assert len(header) == tarfile.BLOCKSIZE
    assert header[124:136] == b"77777777777\0"
    assert tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape").size == 8 ** 11 - 1
    with pytest.raises(ValueError, match="does not fit a plain USTAR header"):
        member_header("1.webp", 8 ** 11)


def test_full_disk_at_the_final_flush_names_the_file_and_no_negative_need(tmp_path, monkeypatch):
    """A disk that reports no space only when the shard is flushed to it (fsync: NFS, delayed
    allocation) is one HakubooruError naming the temporary file; nothing more is being written
    then, so the message says 0.0 MiB more needed (not a negative amount)."""
    path = tmp_path / "s.tar"
    writer, _ = write_two(path)
    writer.finish()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)  # the full disk is injected at the OS call
    with pytest.raises(HakubooruError) as e:
        writer.sync()
    monkeypatch.undo()
    message = str(e.value)
    assert message.startswith(f"no space left on the device writing {temporary_path(path)}: ")
    assert message.endswith(" MiB free, at least 0.0 MiB more needed; free some space or "
                            "write to another disk")
    writer.abort()
    assert list(tmp_path.iterdir()) == []  # the unfinished shard is dropped
