"""One shard = one tar, written under a temporary name and renamed when complete.

Members get fixed metadata (mtime 0, uid/gid 0, user/group ``hakubooru``, mode 0444,
USTAR format), so the same samples give the same bytes. The writer records each
member's data offset and size (for the index) and a checksum of the whole tar
(xxh3-128: a shard is hashed as it is written and again whenever a re-run verifies it, and
sha256 alone would cost more than copying the bytes; ``xxhsum -H2`` checks it from a shell).

``tarfile`` makes the headers, rather than webdataset's ``TarWriter`` writing the members:
TarWriter does fix mtime, but always opens tarfile in stream mode (``w|``), which pushes every
member through a 10 KB record buffer, and it starts by importing torch (2-3 s per process).
The members are named and ordered as TarWriter would (``<key>.<ext>``, extensions sorted),
and the bytes are those ``tarfile.open(..., "w", format=USTAR_FORMAT).addfile`` writes.
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

import xxhash

from .errors import HakubooruError, reporting_full_disk

CHECKSUM = "xxh3_128"  # the name of the checksum field in sidecars and the manifest


def member_hash(data: bytes) -> int:
    """The per-member hash recorded in index.parquet (xxh3-64, as an unsigned int): a trainer
    checks each member it reads against it, at a fraction of a percent of the decode cost."""
    return xxhash.xxh3_64_intdigest(data)


def file_checksum(path, chunk: int = 8 << 20) -> str:
    """The xxh3-128 hex digest of a file (what ``ShardWriter.finish`` returns for it)."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class _HashingFile:
    """A write-only file that counts its length and hashes what goes through it."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "wb")
        self.hash = xxhash.xxh3_128()
        self.length = 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.length += len(data)
        with reporting_full_disk(self.path, len(data)):
            return self._f.write(data)

    def tell(self) -> int:
        return self.length

    def flush(self) -> None:
        """Hand everything written to the operating system."""
        with reporting_full_disk(self.path, 0):
            self._f.flush()

    def close(self, sync: bool = True) -> None:
        """Flush the file to disk (unless ``sync=False``) and close it."""
        if self._f.closed:
            return
        try:
            with reporting_full_disk(self.path, 0):
                self._f.flush()
                if sync:
                    os.fsync(self._f.fileno())
        finally:
            self._f.close()


def _header_template() -> bytearray:
    info = tarfile.TarInfo("x")
    info.mtime, info.mode = 0, 0o444
    info.uname = info.gname = "hakubooru"
    return bytearray(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))


_TEMPLATE = _header_template()  # tarfile's USTAR header with our fixed metadata


def member_header(name: str, size: int) -> bytes:
    """The USTAR header ``tarfile`` writes for a member with our fixed metadata.

    ``TarInfo.tobuf`` costs ~25 µs a header (three per sample); only the name, the size and
    the checksum differ between members, so they are patched into tarfile's own header.
    """
    encoded = name.encode()
    if len(encoded) > 100 or size >= 8 ** 11:
        raise ValueError(f"member {name!r} of {size} bytes does not fit a plain USTAR header")
    header = _TEMPLATE.copy()
    header[0:100] = encoded.ljust(100, b"\0")
    header[124:136] = b"%011o\0" % size
    header[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def temporary_path(path: Path) -> Path:
    """The name a shard is written under until it is complete."""
    return path.with_name(f".{path.name}.tmp")


class ShardWriter:
    """Writes samples (a key and ``{ext: bytes}``) into ``path``; it appears only on ``publish``.

    ``write`` returns ``{ext: (data_offset, size)}`` for the sample's members. Headers are
    tarfile's (``member_header``) and the archive ends as ``tarfile`` ends one; a sample goes
    out in two writes (headers and small members joined, then the image's bytes), where
    ``TarFile.addfile`` would make three per member.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._tmp = temporary_path(self.path)
        self._file = _HashingFile(self._tmp)
        self._pending = b""  # the previous member's padding, written with the next sample
        self.count = 0

    def write(self, key: str, members: dict[str, bytes]) -> dict[str, tuple[int, int]]:
        """Add one sample; members are written in sorted extension order (webdataset's order)."""
        spans, parts = {}, [self._pending]
        offset = self._file.tell() + len(self._pending)
        names = sorted(members)
        for ext in names:
            data = members[ext]
            header = member_header(f"{key}.{ext}", len(data))
            offset += len(header)
            spans[ext] = (offset, len(data))
            padding = b"\0" * (-len(data) % tarfile.BLOCKSIZE)
            offset += len(data) + len(padding)
            parts.append(header)
            if ext != names[-1]:
                parts += (data, padding)
        self._file.write(b"".join(parts))
        self._file.write(members[names[-1]])
        self._pending = b"\0" * (-len(members[names[-1]]) % tarfile.BLOCKSIZE)
        self.count += 1
        return spans

    def finish(self) -> tuple[str, int]:
        """Complete the tar under its temporary name: (checksum hex, bytes). ``sync`` then makes
        it durable (kept apart, so a caller can overlap the disk flush with other work)."""
        end = self._file.tell() + len(self._pending) + 2 * tarfile.BLOCKSIZE  # two zero blocks
        self._file.write(self._pending + b"\0" * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))
        self._pending = b""
        self._file.flush()
        return self._file.hash.hexdigest(), self._file.length

    def sync(self) -> None:
        """Flush the finished tar to disk and close it (before ``publish``)."""
        self._file.close()

    def publish(self) -> None:
        """Rename the finished tar into place (atomic: the shard appears whole or not at all)."""
        self._file.close()  # no-op after sync()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the unfinished tar (also when the disk is full: what is unwritten is dropped)."""
        try:
            self._file.close(sync=False)
        except (OSError, HakubooruError):
            pass  # the error that made the caller abort is already on its way
        finally:
            self._tmp.unlink(missing_ok=True)
