"""The image archives: where each post's image lies, and reading it by byte offset.

Three layouts are read, and may be mixed in one folder (formats.md):

- danbooru2023-webp-4Mpixel: ``images/data-0NNN.tar``, ``images/data-1NNN.tar``,
  ``updates/<name>/*.tar``;
- nyanko7/danbooru2023: ``original/data-0NNN.tar``, ``recent/data-1NNN.tar``;
- a plain folder of ``<id>.<ext>`` files (and ``*.tar`` directly in the folder).

Each tar's members are indexed once (name -> data offset and size) and the index is
cached outside the source folder, keyed by the tar's absolute path, size and mtime.
When several containers hold the same id, the one latest in this order wins: loose
files, tars in the folder itself, ``images/``, ``original/``, ``recent/`` (each sorted
by file name, so ``data-1NNN`` after ``data-0NNN``), then ``updates/<name>/`` sorted by
``<name>`` and file name; within one tar the last member of that id wins.
"""
from __future__ import annotations

import hashlib
import os
import re
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import HakubooruError

MEMBER_NAME = re.compile(r"^(\d{1,18})\.([A-Za-z0-9]+)$")  # 18 digits: always an int64
BUCKETED_TAR = re.compile(r"^data-\d(\d{3})\.tar$")
BASE_FOLDERS = ("images", "original", "recent")
# what `fetch` writes beside the images it fetches into a folder (not members, not counted)
NOT_IN_INDEX_FILE = "not-in-index.txt"
FAILED_FILE = "fetch-failed.tsv"
FETCH_REPORTS = (NOT_IN_INDEX_FILE, FAILED_FILE)
CACHE_ENV = "HAKUBOORU_TARINDEX_CACHE"
INDEX_VERSION = 2


def container_order(relpath: str) -> tuple | None:
    """The sort key of a tar at ``relpath`` (relative to the images folder, ``/``-separated) in
    the override order of the module doc; None for a tar that is not read (other folders)."""
    parts = relpath.split("/")
    if len(parts) == 1:
        return (0, "", parts[0])
    if len(parts) == 2 and parts[0] in BASE_FOLDERS:
        return (1 + BASE_FOLDERS.index(parts[0]), "", parts[1])
    if len(parts) == 3 and parts[0] == "updates":
        return (1 + len(BASE_FOLDERS), parts[1], parts[2])
    return None


def default_cache_dir() -> Path:
    """Where tar indexes are cached: $HAKUBOORU_TARINDEX_CACHE, else
    $XDG_CACHE_HOME/hakubooru/tarindex, else ~/.cache/hakubooru/tarindex."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hakubooru" / "tarindex"


@dataclass
class MemberIndex:
    """The image members of one container: ids, data offsets, sizes, extensions (lowercase)."""

    ids: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    exts: np.ndarray
    ignored: int = 0  # members whose name is not <id>.<ext> (id of 1-18 digits), and folders
    cut_short: bool = False  # the tar ends in the middle of a member
    sha256: np.ndarray | None = None  # hex digests ("U64"), where an index gives them (Hub)


def _scan_tar(path: Path) -> MemberIndex:
    ids, offsets, sizes, exts, ignored, cut_short = [], [], [], [], 0, False
    try:
        tar = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as e:
        raise HakubooruError(f"{path}: cannot read as a tar archive ({e})") from None
    with tar:
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, OSError):
                cut_short = True  # keep what precedes; a member cut off reads back short
                break
            if member is None:
                break
            match = MEMBER_NAME.match(member.name.rsplit("/", 1)[-1])
            if not member.isfile() or match is None:
                ignored += 1
                continue
            ids.append(int(match.group(1)))
            offsets.append(member.offset_data)
            sizes.append(member.size)
            exts.append(match.group(2).lower())
    return MemberIndex(np.array(ids, np.int64), np.array(offsets, np.int64),
                       np.array(sizes, np.int64), np.array(exts, dtype="U16"), ignored, cut_short)


def _cache_file(path: Path, cache_dir: Path) -> Path:
    st = path.stat()
    key = f"{INDEX_VERSION}\0{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    return cache_dir / (hashlib.sha256(key.encode()).hexdigest()[:40] + ".npz")


def index_tar(path, cache_dir=None) -> MemberIndex:
    """The member index of one tar, from the cache or by scanning its headers once."""
    path = Path(path)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = _cache_file(path, cache_dir)
    try:
        with np.load(cached, allow_pickle=False) as z:
            return MemberIndex(z["ids"], z["offsets"], z["sizes"], z["exts"], int(z["ignored"]),
                               bool(z["cut_short"]))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        pass  # absent or damaged cache entry: scan again
    index = _scan_tar(path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, ids=index.ids, offsets=index.offsets, sizes=index.sizes, exts=index.exts,
                 ignored=np.int64(index.ignored), cut_short=np.bool_(index.cut_short))
    os.replace(tmp, cached)
    return index


def _scan_folder(folder: Path) -> tuple[list[Path], MemberIndex]:
    files, ids, sizes, exts, ignored = [], [], [], [], 0
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.endswith(".tar") or entry.name in BASE_FOLDERS + ("updates",) + FETCH_REPORTS:
            continue
        match = MEMBER_NAME.match(entry.name)
        if match is None or not entry.is_file():
            ignored += 1
            continue
        files.append(Path(entry.path))
        ids.append(int(match.group(1)))
        sizes.append(entry.stat().st_size)
        exts.append(match.group(2).lower())
    n = len(files)
    return files, MemberIndex(np.array(ids, np.int64), np.zeros(n, np.int64),
                              np.array(sizes, np.int64), np.array(exts, dtype="U16"), ignored)


@dataclass(frozen=True)
class Member:
    """Where one post's image lies: a file (tar or loose), byte offset and size, extension."""

    path: str
    offset: int
    size: int
    ext: str
    sha256: str | None = None  # the member's expected sha256 (hex), where an index gives it


@dataclass(frozen=True)
class Unavailable:
    """An image that an index lists but that could not be had (a fetch that failed past its
    retries): the shard skips it with this reason and detail."""

    reason: str
    detail: str


@dataclass
class Located:
    """Where each of an array of ids lies (arrays aligned with the ids): ``found[i]`` is
    False where no archive holds ids[i]; ``member(i)`` gives the Member (or None)."""

    found: np.ndarray
    paths: list
    where: np.ndarray  # index into paths
    offsets: np.ndarray
    sizes: np.ndarray
    exts: np.ndarray
    sha256: np.ndarray | None = None

    def member(self, i: int) -> Member | None:
        """Where ids[i]'s image lies, or None if no archive has it."""
        if not self.found[i]:
            return None
        return Member(self.paths[self.where[i]], int(self.offsets[i]), int(self.sizes[i]),
                      str(self.exts[i]), None if self.sha256 is None else str(self.sha256[i]))


def combine(ids: np.ndarray, indexes: list[MemberIndex], paths: list[str],
            containers: list[np.ndarray]) -> Located:
    """Locate ``ids`` in ``indexes`` (given in override order; ``containers[j][m]``: the index
    into ``paths`` of member m of indexes[j]): the last container holding an id wins, and
    within one container its last member."""
    all_ids = np.concatenate([p.ids for p in indexes]) if indexes else np.zeros(0, np.int64)
    if len(all_ids) == 0:  # archives without a single image member
        zeros = np.zeros(len(ids), np.int64)
        return Located(zeros.astype(bool), paths, zeros, zeros, zeros,
                       np.full(len(ids), "", "U16"))
    order = np.argsort(all_ids, kind="stable")  # stable: equal ids keep container order
    sorted_ids = all_ids[order]
    # the last occurrence of an id wins
    pos = np.clip(np.searchsorted(sorted_ids, ids, side="right") - 1, 0, None)
    pick = order[pos]

    def gather(name):
        return np.concatenate([getattr(p, name) for p in indexes])[pick]
    sha = gather("sha256") if all(p.sha256 is not None for p in indexes) else None
    return Located(sorted_ids[pos] == ids, paths, np.concatenate(containers)[pick],
                   gather("offsets"), gather("sizes"), gather("exts"), sha)


@dataclass
class ImageSource:
    """All containers under an images folder, in override order (see module doc)."""

    root: Path
    tars: list[Path]
    cache_dir: Path | None = None
    ignored_members: int = 0
    indexed_tars: int = 0
    cut_short_tars: list = field(default_factory=list)
    _loose: tuple | None = field(default=None, repr=False)

    @classmethod
    def open(cls, images, cache_dir=None) -> "ImageSource":
        """Find the containers under ``images`` (fails clearly if the folder is missing)."""
        root = Path(images)
        if root.is_file():
            raise HakubooruError(f"images path {root} is a file, not a folder: give the folder "
                                 "holding the image archives (data-NNNN.tar) or image files")
        if not root.is_dir():
            raise HakubooruError(f"images folder not found: {root}")
        tars = sorted(p for p in root.glob("*.tar") if p.is_file())
        for sub in BASE_FOLDERS:
            tars += sorted(p for p in (root / sub).glob("*.tar") if p.is_file())
        updates = root / "updates"
        if updates.is_dir():
            for update in sorted(p for p in updates.iterdir() if p.is_dir()):
                tars += sorted(p for p in update.glob("*.tar") if p.is_file())
        files, loose = _scan_folder(root)
        if not tars and not files:
            raise HakubooruError(
                f"{root}: no image archives (data-*.tar under images/, original/, recent/ or "
                "updates/, or <id>.<ext> files)")
        return cls(root, tars, cache_dir, loose.ignored, _loose=(files, loose))

    def _tars_for(self, buckets: set[int]) -> list[Path]:
        out = []
        for path in self.tars:
            m = BUCKETED_TAR.match(path.name)
            if m is None or int(m.group(1)) in buckets:
                out.append(path)
        return out

    def locate(self, ids: np.ndarray, progress: bool = False) -> Located:
        """Find each id's image; only tars whose ``data-?NNN`` bucket (id % 1000) can hold one of
        ``ids`` are indexed. Later containers override earlier ones (module doc)."""
        ids = np.asarray(ids, np.int64)
        files, loose = self._loose
        parts = [(loose, np.arange(len(files), dtype=np.int64))]
        paths = [str(p) for p in files]
        tars = self._tars_for(set((ids % 1000).tolist()))
        for tar in tqdm(tars, desc="indexing archives", unit="tar", disable=not progress,
                        leave=False):
            index = index_tar(tar, self.cache_dir)
            self.indexed_tars += 1
            self.ignored_members += index.ignored
            if index.cut_short:
                self.cut_short_tars.append(str(tar))
            parts.append((index, np.full(len(index.ids), len(paths), np.int64)))
            paths.append(str(tar))
        return combine(ids, [p for p, _ in parts], paths, [w for _, w in parts])


class MemberReader:
    """Reads members by offset, keeping the most recently used containers open."""

    def __init__(self, max_open: int = 64):
        self._files = {}
        self._max_open = max_open

    def read(self, member: Member) -> bytes:
        """The member's bytes (fewer than ``member.size`` if its file ends early)."""
        f = self._files.pop(member.path, None)
        if f is None:
            if len(self._files) >= self._max_open:
                self._files.pop(next(iter(self._files))).close()
            f = open(member.path, "rb")
        self._files[member.path] = f  # re-inserted last: dict order is recency
        f.seek(member.offset)
        return f.read(member.size)

    def close(self) -> None:
        """Close every file still open."""
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
