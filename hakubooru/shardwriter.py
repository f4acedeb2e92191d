"""One shard = one tar, written under a temporary name and renamed when complete.

Members get fixed metadata (mtime 0, uid/gid 0, user/group ``hakubooru``, mode 0444,
USTAR format), so the same samples give the same bytes. The writer records each
member's data offset and size (for the index) and a checksum of the whole tar
(xxh3-128: a shard is hashed as it is written and again whenever a re-run verifies it, and
sha256 alone would cost more than copying the bytes; ``xxhsum -H2`` checks it from a shell).

``tarfile`` is used directly rather than webdataset's ``TarWriter``: TarWriter does fix
mtime, but always opens tarfile in stream mode (``w|``), which pushes every member through
a 10 KB record buffer, and it starts by importing torch (2-3 s per process). The
members are named and ordered as TarWriter would (``<key>.<ext>``, extensions sorted).
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import xxhash

COPY_BUFSIZE = 64 << 20  # one read/write per member (images are far below this)
CHECKSUM = "xxh3_128"  # the name of the checksum field in sidecars and the manifest


def shard_checksum(path, chunk: int = 8 << 20) -> str:
    """The xxh3-128 hex digest of a file (what ``ShardWriter.finish`` returns for it)."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class _HashingFile:
    """A write-only file that counts its length and hashes what goes through it."""

    def __init__(self, path: Path):
        self._f = open(path, "wb")
        self.hash = xxhash.xxh3_128()
        self.length = 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.length += len(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self.length

    def close(self) -> None:
        """Flush the file to disk and close it."""
        if self._f.closed:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


def temporary_path(path: Path) -> Path:
    """The name a shard is written under until it is complete."""
    return path.with_name(f".{path.name}.tmp")


class ShardWriter:
    """Writes samples (a key and ``{ext: bytes}``) into ``path``; it appears only on ``publish``.

    ``write`` returns ``{ext: (data_offset, size)}`` for the sample's members.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._tmp = temporary_path(self.path)
        self._file = _HashingFile(self._tmp)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT,
                                 copybufsize=COPY_BUFSIZE)
        self.count = 0

    def write(self, key: str, members: dict[str, bytes]) -> dict[str, tuple[int, int]]:
        """Add one sample; members are written in sorted extension order (webdataset's order)."""
        spans = {}
        for ext in sorted(members):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = "hakubooru"
            header_at = self._tar.offset
            self._tar.addfile(info, io.BytesIO(data))
            spans[ext] = (header_at + tarfile.BLOCKSIZE, len(data))  # USTAR: one header block
        self.count += 1
        return spans

    def finish(self) -> tuple[str, int]:
        """Complete the tar under its temporary name and flush it to disk: (checksum hex, bytes)."""
        self._tar.close()
        self._file.close()
        return self._file.hash.hexdigest(), self._file.length

    def publish(self) -> None:
        """Rename the finished tar into place (atomic: the shard appears whole or not at all)."""
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the unfinished tar."""
        self._tar.close()
        self._file.close()
        self._tmp.unlink(missing_ok=True)
