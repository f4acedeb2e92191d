"""Who may write what in a shard folder, and the temporary files a killed build leaves behind.

``.hakubooru-build.lock`` carries POSIX record locks (``fcntl.lockf``, which NFS's lock manager
also honours): byte ``k`` is shard ``k``, held by the build writing it, so a second build of the
same shards (the same part, or overlapping parts) stops at once with one line while parts with
other shards run side by side; byte ``SHARED_FILES`` is held while manifest.json, index.parquet
and skipped.parquet are assembled; byte ``WRITERS + k`` is held by the process writing shard k
(a Ray task: a task of a killed driver still finishing on the cluster makes its successor wait
rather than write the same temporary file). A holder may delete the temporary files of what it holds:
no one else can be writing them.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from .errors import HakubooruError

LOCK_FILE = ".hakubooru-build.lock"
SHARED_FILES = 1 << 40  # lock offset of the folder-wide files (above any shard number)
WRITERS = 1 << 41  # WRITERS + k: the process writing shard k's files (Ray tasks)


class BuildLock:
    """The lock file of shard folder ``out`` (which must exist), open for this process until
    ``close`` (or the end of a ``with`` block)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / LOCK_FILE
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def take_shards(self, shards, name) -> None:
        """Hold the lock of every shard number in ``shards`` (until close); refuse with one line
        if another build holds one (``name(k)`` names shard k)."""
        for k in shards:
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, k)
            except OSError:  # EAGAIN / EACCES: held by another process
                raise HakubooruError(f"another build is writing {self.out} (it holds {name(k)}; lock "
                                     f"{self.path}); wait for it to finish, or build other shards "
                                     "with --part") from None

    @contextlib.contextmanager
    def shared_files(self):
        """Hold the folder-wide files' lock (waits for another build assembling them)."""
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, SHARED_FILES)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, SHARED_FILES)

    @contextlib.contextmanager
    def writing(self, k: int):
        """Hold shard ``k``'s writer lock (waits for another process writing it)."""
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, WRITERS + k)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, WRITERS + k)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release every lock of this process on the folder."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def remove_temporaries(folder: Path, names) -> int:
    """Delete the temporary files (``.<name>.tmp``, ``.<name>.<hex>.tmp``) of the files ``names``
    in ``folder``, listing it once; returns how many. Call only while holding their locks."""
    names, removed = set(names), 0
    if not Path(folder).is_dir():
        return 0
    for entry in os.scandir(folder):
        if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            continue
        target = entry.name[1:-4]
        if target in names or target.rsplit(".", 1)[0] in names:
            os.unlink(entry.path)
            removed += 1
    return removed
