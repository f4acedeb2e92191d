"""Selected images from the Hub: into a ``<id>.<ext>`` folder (``fetch``), or per shard for
a build (``ShardStager``).

``fetch_selection`` writes each selected image as ``OUT/<id>.<ext>`` (under a temporary name,
then renamed), skipping files already there whose sha256 matches the index; ids that no index
lists go to ``OUT/not-in-index.txt``, images given up on to ``OUT/fetch-failed.tsv``.
``ShardStager`` fetches the images of one pending shard into ``OUT/.hub-staging/`` while the
previous shard is written, hands the builder local members, and removes the file once the
shard is done: a resumed build fetches only the shards still missing.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import HakubooruError
from .hub import HubSource
from .rangefetch import Failure, RangeFetcher, Want, plan_spans
from .sources import FAILED_FILE, NOT_IN_INDEX_FILE, Member, Unavailable

STAGING_DIR = ".hub-staging"
DEFAULT_CONNECTIONS = 16
DEFAULT_RETRIES = 5


class _Rate:
    """A tqdm bar over images with MB/s in its postfix."""

    def __init__(self, total: int, desc: str, progress: bool):
        self.bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, smoothing=0.1)
        self.bytes, self.start, self.shown = 0, time.perf_counter(), 0.0

    def add_bytes(self, n: int) -> None:
        self.bytes += n

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        now = time.perf_counter()
        if now - self.shown > 0.5:
            self.shown = now
            self.bar.set_postfix_str(f"{self.bytes / 1e6 / max(now - self.start, 1e-9):.1f} MB/s")

    def close(self) -> None:
        self.bar.close()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class FetchResult:
    """Counts of one ``fetch`` run."""

    out: Path
    selected: int = 0
    fetched: int = 0
    present: int = 0
    not_in_index: int = 0
    failed: dict = field(default_factory=dict)  # reason -> count
    bytes: int = 0
    requests: int = 0
    retries: int = 0
    index_files: int = 0
    index_bytes: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        """One line of counts."""
        failed = sum(self.failed.values())
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.failed.items()))
        return (f"{self.out}: {self.selected} selected; {self.fetched} fetched, {self.present} "
                f"already present, {self.not_in_index} in no index"
                + (f" (ids in {self.out / NOT_IN_INDEX_FILE})" if self.not_in_index else "")
                + f", {failed} failed" + (f" ({reasons}; ids in {self.out / FAILED_FILE})"
                                          if failed else "")
                + f"; {self.bytes / 1e6:.1f} MB in {self.requests} requests ({self.retries} "
                  f"retried), {self.index_files} index files ({self.index_bytes / 1e6:.1f} MB); "
                  f"in {self.seconds:.1f} s")


def fetch_selection(db, selection, images: str, out, *, images_index: str | None = None,
                    connections: int = DEFAULT_CONNECTIONS, retries: int = DEFAULT_RETRIES,
                    backoff: float | None = None, progress: bool = True) -> FetchResult:
    """Write the selected images of the Hub archives ``images`` (``hf://datasets/...``) into
    the folder ``out`` as ``<id>.<ext>``; a rerun fetches only what is missing or differs."""
    from .db import open_db
    from .selector import Selection, load_selection

    started = time.perf_counter()
    db = open_db(db) if isinstance(db, (str, Path)) else db
    if not isinstance(selection, Selection):
        selection = load_selection(selection)
    selection.check(db)
    source = HubSource.open(images, images_index)
    ids = np.asarray(selection.ids, np.int64)
    located = source.locate(ids, progress=progress)
    result = fetch_located(source, ids, located, out, connections=connections, retries=retries,
                           backoff=backoff, progress=progress)
    result.seconds = time.perf_counter() - started
    print(result.summary(), file=sys.stderr)
    return result


def fetch_located(source: HubSource, ids: np.ndarray, located, out, *,
                  connections: int = DEFAULT_CONNECTIONS, retries: int = DEFAULT_RETRIES,
                  backoff: float | None = None, progress: bool = True) -> FetchResult:
    """The part of fetch_selection after the ids are located: write them into ``out``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HakubooruError(f"--out {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.fetch.tmp"):  # left by a killed run
        stale.unlink()
    result = FetchResult(out, selected=len(ids), index_files=source.indexed_tars,
                         index_bytes=source.index_bytes)
    missing = ids[~located.found]
    result.not_in_index = len(missing)
    _write_lines(out / NOT_IN_INDEX_FILE, [str(i) for i in missing.tolist()])
    wants = []
    for i in np.flatnonzero(located.found).tolist():
        m = located.member(i)
        target = out / f"{int(ids[i])}.{m.ext}"
        if target.is_file() and target.stat().st_size == m.size and _sha256_file(target) == m.sha256:
            result.present += 1
            continue
        wants.append(Want(target, m.path, m.offset, m.size, m.sha256))
    bar = _Rate(len(wants), "fetching", progress)
    fetcher = RangeFetcher(source.url, connections, retries, backoff, on_bytes=bar.add_bytes)
    failed_lines = []
    try:
        for want, got in fetcher.fetch(plan_spans(wants)):
            if isinstance(got, Failure):
                result.failed[got.reason] = result.failed.get(got.reason, 0) + 1
                failed_lines.append(f"{want.key.stem}\t{got.reason}\t{got.detail}")
            else:
                tmp = want.key.with_name(f".{want.key.name}.fetch.tmp")
                try:
                    tmp.write_bytes(got)
                    os.replace(tmp, want.key)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
                result.fetched += 1
            bar.update()
    finally:
        bar.close()
    _write_lines(out / FAILED_FILE, sorted(failed_lines, key=lambda s: int(s.split("\t")[0])))
    result.bytes, result.requests = fetcher.stats.bytes, fetcher.stats.requests
    result.retries = fetcher.stats.retries
    return result


def _write_lines(path: Path, lines: list[str]) -> None:
    if lines:
        path.write_text("".join(f"{line}\n" for line in lines))
    else:
        path.unlink(missing_ok=True)


class ShardStager:
    """Fetches each pending shard's images into one local file before the shard is written."""

    def __init__(self, source: HubSource, out: Path, shards: list[str], connections: int,
                 retries: int = DEFAULT_RETRIES, backoff: float | None = None, progress: bool = True,
                 total: int = 0):
        self.dir = Path(out) / STAGING_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in shards:  # left by a killed run of these shards (other parts keep theirs)
            self._path(name).unlink(missing_ok=True)
        self.bar = _Rate(total, "fetching", progress)
        self.fetcher = RangeFetcher(source.url, connections, retries, backoff,
                                    on_bytes=self.bar.add_bytes)

    def _path(self, name: str) -> Path:
        return self.dir / (name + ".staged")

    def stage(self, tasks, shard_name):
        """``tasks`` ((k, entries) as the builder makes them) with each fetched member read from
        the staging file, and each one given up on as ``Unavailable("fetch_failed", ...)``;
        the next shard is fetched while the caller writes this one."""
        with cf.ThreadPoolExecutor(1, thread_name_prefix="stager") as ahead:
            waiting = None  # (k, future) fetched or being fetched, not handed over yet
            try:
                for k, entries in tasks:
                    previous, waiting = waiting, (k, ahead.submit(self._stage, shard_name(k), entries))
                    if previous is not None:
                        yield previous[0], previous[1].result()
                if waiting is not None:
                    last, waiting = waiting, None
                    yield last[0], last[1].result()
            finally:
                self.fetcher.stop()
                if waiting is not None:  # a stopped build: the shard fetched ahead is not built
                    cf.wait([waiting[1]])
                    self.done(shard_name(waiting[0]))
                self.bar.close()

    def _stage(self, name: str, entries: list) -> list:
        wants = [Want(j, m.path, m.offset, m.size, m.sha256)
                 for j, (_, _, _, m) in enumerate(entries) if m is not None]
        path = self._path(name)
        self.dir.mkdir(exist_ok=True)  # another part may have removed it
        got = {}
        try:
            with open(path, "wb") as f:
                for want, data in self.fetcher.fetch(plan_spans(wants)):
                    if isinstance(data, Failure):
                        got[want.key] = Unavailable("fetch_failed", f"{data.reason}: {data.detail}")
                    else:
                        got[want.key] = Member(str(path), f.tell(), len(data),
                                               entries[want.key][3].ext, want.sha256)
                        f.write(data)
                    self.bar.update()
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return [(i, c, r, got.get(j, m)) for j, (i, c, r, m) in enumerate(entries)]

    def done(self, name: str) -> None:
        """Remove a finished shard's staging file."""
        self._path(name).unlink(missing_ok=True)

    def close(self) -> None:
        """Remove the staging folder if no shard (of any part) uses it any more."""
        try:
            self.dir.rmdir()
        except OSError:
            pass
