"""Image archives on the Hugging Face Hub: ``--images hf://datasets/OWNER/NAME[@REVISION]``.

A data repository holds the tars (the layouts of hakubooru.sources); an index repository
holds one JSON per tar at the same path with ``.json`` for ``.tar`` (hfutils'
``tar_create_index``: ``{"filesize", "hash", "hash_lfs", "files": {member: {"offset",
"size", "sha256"}}}``), so one image is one HTTP Range read. Both revisions are resolved
once to commits; every later read names the commit. The index repository of the two
public pairs is known; ``--images-index`` names it for any other. Only the index files
that can hold a selected id are downloaded (``data-?NNN`` by id % 1000; every other tar,
e.g. ``updates/…``), through huggingface_hub into its cache. Containers override each
other in the order of local archives (hakubooru.sources).
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import re
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from .errors import HakubooruError
from .sources import BUCKETED_TAR, MEMBER_NAME, Located, MemberIndex, combine, container_order

PREFIX = "hf://"
HUB_URL = re.compile(r"^hf://datasets/([A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@([^\s@]+))?/?$")
KNOWN_INDEXES = {
    "KBlueLeaf/danbooru2023-webp-4Mpixel": "deepghs/danbooru2023-webp-4Mpixel_index",
    "nyanko7/danbooru2023": "deepghs/danbooru2023_index",
}
INDEX_DOWNLOADS = 16  # index files downloaded at once
INDEX_RETRIES = 5  # tries again of an index file after a 429, a 5xx or a cut connection


def is_hub(images) -> bool:
    """True for an ``hf://`` images argument."""
    return isinstance(images, str) and images.startswith(PREFIX)


@dataclass(frozen=True)
class HubRepo:
    """A dataset repository and a revision (None: the default branch)."""

    repo_id: str
    revision: str | None = None

    @classmethod
    def parse(cls, spec: str, what: str = "--images") -> "HubRepo":
        """``hf://datasets/OWNER/NAME[@REVISION]`` -> HubRepo (one line if malformed)."""
        m = HUB_URL.match(spec)
        if m is None:
            raise HakubooruError(f"{what} {spec!r}: expected hf://datasets/OWNER/NAME[@REVISION] "
                                 "(a dataset repository on the Hugging Face Hub)")
        return cls(m.group(1), m.group(2))

    def __str__(self) -> str:
        return f"{PREFIX}datasets/{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


HUB_CLIENT = (2, 4)  # huggingface_hub with the httpx client this module uses


def check_hub_client(installed: str | None) -> None:
    """One line unless ``installed`` (huggingface_hub's version, None: not installed) is at
    least ``HUB_CLIENT``."""
    numbers = tuple(int(n) for n in re.findall(r"\d+", installed or "")[:2])
    if installed is None or numbers < HUB_CLIENT:
        raise HakubooruError(f"hf:// sources need huggingface_hub >= {'.'.join(map(str, HUB_CLIENT))} (found "
                             f"{installed or 'none'}): pip install 'hakubooru[hub]' (docs/hub.md; "
                             "transformers 4.x pins huggingface_hub < 1, use transformers 5 beside it)")


def _installed_hub_client() -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("huggingface_hub")
    except PackageNotFoundError:
        return None


def _endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants
    return (endpoint or constants.ENDPOINT).rstrip("/")


def hub_error(e: Exception, what: str) -> HakubooruError:
    """One line for a huggingface_hub / HTTP failure about ``what`` (a repository or a file)."""
    import httpx2
    from huggingface_hub import errors, get_token

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, errors.GatedRepoError) or status in (401, 403):
        if get_token() is None:
            return HakubooruError(f"{what}: the Hub refused access (gated or private repository) "
                                  "and no token is set: accept its terms on the Hub, then set "
                                  "HF_TOKEN to an access token of that account")
        return HakubooruError(f"{what}: the Hub refused the token in HF_TOKEN (gated or private "
                              "repository): accept its terms on the Hub with that account, or "
                              "set HF_TOKEN to a token that can read it")
    if isinstance(e, errors.RevisionNotFoundError):
        return HakubooruError(f"{what}: revision not found on the Hub")
    if isinstance(e, (errors.RepositoryNotFoundError, errors.EntryNotFoundError)) or status == 404:
        return HakubooruError(f"{what}: not found on the Hub (check the name; a private "
                              "repository also needs HF_TOKEN)")
    if isinstance(e, (httpx2.TransportError, ConnectionError)):
        return HakubooruError(f"{what}: cannot reach the Hub ({type(e).__name__}: {e}); check the "
                              "connection or HF_ENDPOINT")
    if isinstance(e, OSError):  # the cache: a full disk, no permission
        return HakubooruError(f"{what}: {type(e).__name__}: {e} (the huggingface_hub cache: "
                              "HF_HOME / HF_HUB_CACHE)")
    return HakubooruError(f"{what}: the Hub answered {status or type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}")


def _hub_call(what: str, fn, *args, **kwargs):
    from huggingface_hub import errors
    import httpx2
    try:
        return fn(*args, **kwargs)
    except (errors.HfHubHTTPError, httpx2.HTTPError, OSError) as e:
        raise hub_error(e, what) from None


def _resolve(api, repo: HubRepo) -> tuple[str, list[str]]:
    """(commit, file paths) of a repository at its revision."""
    info = _hub_call(str(repo), api.dataset_info, repo.repo_id, revision=repo.revision)
    if not info.sha:
        raise HakubooruError(f"{repo}: the Hub gave no commit for this revision")
    return info.sha, [s.rfilename for s in info.siblings or []]


def parse_index(data: bytes, where: str) -> MemberIndex:
    """A tar's JSON index (hfutils format) as a MemberIndex with sha256 digests; members in the
    file's order (a later one of the same id wins, as in a tar)."""
    try:
        files = json.loads(data)["files"]
        ids, offsets, sizes, exts, shas, ignored = [], [], [], [], [], 0
        for name, entry in files.items():
            m = MEMBER_NAME.match(name.rsplit("/", 1)[-1])
            if m is None:
                ignored += 1
                continue
            ids.append(int(m.group(1)))
            offsets.append(int(entry["offset"]))
            sizes.append(int(entry["size"]))
            exts.append(m.group(2).lower())
            shas.append(str(entry["sha256"]).lower())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise HakubooruError(f"{where}: not a tar index JSON ({type(e).__name__}: {e})") from None
    return MemberIndex(np.array(ids, np.int64), np.array(offsets, np.int64),
                       np.array(sizes, np.int64), np.array(exts, dtype="U16"), ignored,
                       sha256=np.array(shas, dtype="U64"))


@dataclass
class HubSource:
    """The tars of a data repository at a commit, and their indexes at the index commit."""

    data: HubRepo  # revision: the commit
    index: HubRepo  # revision: the commit
    endpoint: str
    tars: list[str]  # data paths of the tars that have an index, in override order
    ignored_members: int = 0
    indexed_tars: int = 0
    index_bytes: int = 0
    cut_short_tars: list = field(default_factory=list)  # always empty: kept for build's summary

    @classmethod
    def open(cls, images: str, images_index: str | None = None, pinned: dict | None = None,
             endpoint: str | None = None) -> "HubSource":
        """Resolve ``images`` (and its index repository) to commits and list their tars.
        ``pinned``: a build's recorded ``images_source``; a repository given without a
        revision reads the commit recorded there (a resumed build reads the same files)."""
        check_hub_client(_installed_hub_client())
        from huggingface_hub import HfApi

        data = HubRepo.parse(images)
        if images_index is not None:
            index = HubRepo.parse(images_index, "--images-index")
        elif data.repo_id in KNOWN_INDEXES:
            index = HubRepo(KNOWN_INDEXES[data.repo_id])
        else:
            raise HakubooruError(
                f"--images {data}: no known index repository for {data.repo_id} (known: "
                f"{', '.join(sorted(KNOWN_INDEXES))}); name it with --images-index "
                "hf://datasets/OWNER/NAME")
        data, index = (_pin(r, (pinned or {}).get(key)) for r, key in ((data, "data"), (index, "index")))
        endpoint = _endpoint(endpoint)
        api = HfApi(endpoint=endpoint)
        data_commit, data_files = _resolve(api, data)
        index_commit, index_files = _resolve(api, index)
        data_tars = {p for p in data_files if p.endswith(".tar")}
        tars = [p[:-len(".json")] + ".tar" for p in index_files if p.endswith(".json")]
        tars = sorted((t for t in tars if t in data_tars and container_order(t) is not None),
                      key=container_order)
        if not tars:
            raise HakubooruError(f"{data}: no tar of it has an index JSON in {index} (expected "
                                 "the same paths with .json for .tar)")
        return cls(HubRepo(data.repo_id, data_commit), HubRepo(index.repo_id, index_commit),
                   endpoint, tars)

    def describe(self) -> dict:
        """The repositories at their commits (recorded in a build's plan and manifest)."""
        return {"data": str(self.data), "index": str(self.index)}

    def url(self, path: str) -> str:
        """The resolve URL of a data file at the data commit."""
        from huggingface_hub import hf_hub_url
        return hf_hub_url(self.data.repo_id, path, repo_type="dataset",
                          revision=self.data.revision, endpoint=self.endpoint)

    def _tars_for(self, buckets: set[int]) -> list[str]:
        out = []
        for path in self.tars:
            m = BUCKETED_TAR.match(path.rsplit("/", 1)[-1])
            if m is None or int(m.group(1)) in buckets:
                out.append(path)
        return out

    def _load_index(self, tar: str) -> tuple[MemberIndex, int]:
        import httpx2
        from huggingface_hub import errors, hf_hub_download

        from . import rangefetch
        name = tar[:-len(".tar")] + ".json"
        what = f"{self.index}: {name}"
        for attempt in range(INDEX_RETRIES + 1):
            try:
                local = hf_hub_download(self.index.repo_id, name, repo_type="dataset",
                                        revision=self.index.revision, endpoint=self.endpoint)
                break
            except (errors.HfHubHTTPError, httpx2.HTTPError, OSError) as e:
                response = getattr(e, "response", None)
                status = getattr(response, "status_code", None)
                transient = status == 429 or (status or 0) >= 500 or isinstance(e, httpx2.TransportError)
                if attempt == INDEX_RETRIES or not transient:
                    raise hub_error(e, what) from None
                wait = (rangefetch.retry_after(response.headers.get("Retry-After"))
                        if response is not None else None)
                time.sleep(rangefetch.BACKOFF * 2 ** attempt if wait is None else wait)
        with open(local, "rb") as f:
            data = f.read()
        return parse_index(data, what), len(data)

    def locate(self, ids: np.ndarray, progress: bool = False) -> Located:
        """Find each id's member from the index files of the tars that can hold one of ``ids``
        (downloaded once into the huggingface_hub cache). Located.paths are data paths."""
        ids = np.asarray(ids, np.int64)
        tars = self._tars_for(set((ids % 1000).tolist()))
        indexes, containers = [], []
        with cf.ThreadPoolExecutor(INDEX_DOWNLOADS) as pool:
            loaded = pool.map(self._load_index, tars)
            for j, (index, size) in enumerate(tqdm(loaded, total=len(tars), desc="tar indexes",
                                                  unit="tar", disable=not progress, leave=False)):
                self.indexed_tars += 1
                self.index_bytes += size
                self.ignored_members += index.ignored
                keep = np.isin(index.ids, ids)  # held: the selected ids' members only, in order
                indexes.append(MemberIndex(index.ids[keep], index.offsets[keep], index.sizes[keep],
                                           index.exts[keep], sha256=index.sha256[keep]))
                containers.append(np.full(int(keep.sum()), j, np.int64))
        return combine(ids, indexes, list(tars), containers)


def _pin(repo: HubRepo, recorded: str | None) -> HubRepo:
    if repo.revision is None and recorded is not None:
        rec = HubRepo.parse(recorded)
        if rec.repo_id == repo.repo_id:
            return rec
    return repo
