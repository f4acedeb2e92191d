"""--images hf://...: the Hub's indexed tars read by Range, against a local stand-in of the Hub
(tests/helpers/hubserver.py). Nothing here talks to the real Hub."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from hakubooru import Selector, build_shards, open_db
from hakubooru.errors import HakubooruError
from hakubooru.hub import HubRepo, parse_index
from hakubooru.hubfetch import FAILED_FILE, NOT_IN_INDEX_FILE, fetch_selection
from hakubooru import rangefetch
from hakubooru.rangefetch import TAR_HEADER, RangeFetcher, Want, plan_spans
from hakubooru.sources import ImageSource
from tests.helpers import REPO
from tests.helpers.archives import archive_members, folder_bytes
from tests.helpers.hubserver import FakeHub, archive_repos, tar_index

DATA, INDEX = "KBlueLeaf/danbooru2023-webp-4Mpixel", "deepghs/danbooru2023-webp-4Mpixel_index"
HF = f"hf://datasets/{DATA}"


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    """One huggingface_hub cache for the module: the index files of the demo's commit are
    downloaded once (tests that count index downloads use their own)."""
    return tmp_path_factory.mktemp("hf-cache")


@pytest.fixture
def hub(monkeypatch, tmp_path, hf_cache):
    """A FakeHub that huggingface_hub in this process talks to (as HF_ENDPOINT set at import
    would make it), with no token."""
    from huggingface_hub import constants
    with FakeHub() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_cache))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(rangefetch, "BACKOFF", 0.01)
        yield server


def serve_demo(server: FakeHub, images: Path, prefix: str = "images/") -> None:
    """The demo's tars as the public webp-4Mpixel pair lays them out (images/data-0NNN.tar)."""
    data, index = archive_repos(images)
    server.add_repo(DATA, {prefix + k: v for k, v in data.items()})
    server.add_repo(INDEX, {prefix + k: v for k, v in index.items()})


@pytest.fixture(scope="module")
def demo_all(synth_demo, tmp_path_factory):
    """(db, images, selection of every post, local build of it)."""
    db, images = synth_demo
    tmp = tmp_path_factory.mktemp("hub_local")
    Selector.all().save(tmp / "all.parquet", open_db(db))
    build_shards(db, images, tmp / "all.parquet", tmp / "local", shard_size=100,
                 cache_dir=tmp / "cache", progress=False)
    return db, images, tmp / "all.parquet", tmp / "local"


def same_build(local: Path, remote: Path) -> None:
    """Every file byte for byte, but the plan and manifest, which name the Hub commits."""
    a, b = folder_bytes(local), folder_bytes(remote)
    assert set(a) == set(b)
    differ = sorted(k for k in a if a[k] != b[k])
    assert differ == [".hakubooru-build.json", "manifest.json"]
    ma, mb = json.loads(a["manifest.json"]), json.loads(b["manifest.json"])
    assert mb.pop("images_source") == {"data": f"{HF}@{commit_of(b)}", "index": mb_index(b)}
    assert ma == mb  # the fingerprint too: the same content


def commit_of(files) -> str:
    return json.loads(files["manifest.json"])["images_source"]["data"].rsplit("@", 1)[1]


def mb_index(files) -> str:
    return json.loads(files["manifest.json"])["images_source"]["index"]


# ---- hf:// URLs and the index format ---------------------------------------------------

def test_hub_urls_parse_and_bad_ones_are_one_line():
    assert HubRepo.parse("hf://datasets/a/b") == HubRepo("a/b", None)
    assert HubRepo.parse("hf://datasets/a-1/b.c_d@v1.0") == HubRepo("a-1/b.c_d", "v1.0")
    assert HubRepo.parse("hf://datasets/a/b@refs/pr/3") == HubRepo("a/b", "refs/pr/3")
    for bad in ("hf://a/b", "hf://datasets/a", "hf://models/a/b", "hf://datasets/a/b/c"):
        with pytest.raises(HakubooruError, match="expected hf://datasets/OWNER/NAME"):
            HubRepo.parse(bad)


def test_hub_client_version_is_checked_by_hand():
    # hf:// needs huggingface_hub 2.4 or later (its httpx client); 0.x and 1.x, which
    # transformers 4.x installs, or none at all, are one line naming the extra
    from hakubooru.hub import check_hub_client

    for ok in ("2.4.0", "2.10.1", "3.0.0rc1", "10.0"):
        check_hub_client(ok)
    for bad in ("0.36.0", "1.9.9", "2.3.99", None):
        with pytest.raises(HakubooruError) as e:
            check_hub_client(bad)
        assert str(e.value).startswith(f"hf:// sources need huggingface_hub >= 2.4 (found {bad or 'none'}): "
                                       "pip install 'hakubooru[hub]'")


def test_index_json_members_with_folders_and_dot_slash(tmp_path):
    tar_path = tmp_path / "t.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, data in (("./12.PNG", b"a" * 700), ("x/13.webp", b"b" * 10), ("notes.txt", b"c"),
                           ("./12.jpg", b"d" * 3)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    published = tar_index(tar_path)
    index = parse_index(json.dumps(published).encode(), "t.json")
    assert index.ids.tolist() == [12, 13, 12] and index.ignored == 1
    assert index.exts.tolist() == ["png", "webp", "jpg"]
    raw = tar_path.read_bytes()
    for off, size, sha in zip(index.offsets, index.sizes, index.sha256):
        assert hashlib.sha256(raw[off:off + size]).hexdigest() == sha
    assert index.sizes.tolist() == [700, 10, 3]


# ---- request planning ------------------------------------------------------------------

def test_neighbours_share_a_request_only_when_the_gap_is_small():
    w = [Want(0, "a.tar", 512, 10_000, ""), Want(1, "a.tar", 11_264, 10_000, ""),  # gap 752
         Want(2, "a.tar", 21_776, 100, ""),  # gap 512 > 0.1 * (100 + 512): own request
         Want(3, "b.tar", 21_876, 5_000, "")]  # another tar, though adjacent in offsets
    spans = plan_spans(w)
    assert [(s.path, s.start, s.end, [x.key for x in s.wants]) for s in spans] == [
        ("a.tar", 512, 21_264, [0, 1]), ("a.tar", 21_776, 21_876, [2]), ("b.tar", 21_876, 26_876, [3])]
    assert [len(s.wants) for s in plan_spans(w[:2], max_span=15_000)] == [1, 1]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_updates_tars_come_from_the_file_list_and_override_as_on_disk(hub, tmp_path):
    root = tmp_path / "archive"
    write_tar(root / "original/data-0001.tar", [("./1001.jpg", b"A" * 900), ("./2001.png", b"B" * 800)])
    write_tar(root / "original/data-0002.tar", [("./1002.jpg", b"D" * 700)])
    write_tar(root / "updates/20240101/dataset-0.tar", [("./1001.jpg", b"C" * 600)])
    write_tar(root / "updates/20240202/dataset-0.tar", [("./2001.png", b"E" * 500),
                                                         ("./2001.png", b"F" * 400)])
    data, index = archive_repos(root)
    hub.add_repo("nyanko7/danbooru2023", data)
    hub.add_repo("deepghs/danbooru2023_index", index)
    from hakubooru.hub import HubSource
    from hakubooru.hubfetch import fetch_located
    source = HubSource.open("hf://datasets/nyanko7/danbooru2023")
    ids = np.array([1001, 2001, 3001], np.int64)
    located = source.locate(ids)
    assert located.found.tolist() == [True, True, False]
    # bucket 001 and both updates tars; not data-0002 (no selected id ends in 002)
    assert sorted(p for _, _, p, _, _ in hub.data_requests(".json")) == [
        "original/data-0001.json", "updates/20240101/dataset-0.json", "updates/20240202/dataset-0.json"]
    result = fetch_located(source, ids, located, tmp_path / "got", progress=False)
    assert result.fetched == 2 and result.not_in_index == 1
    got = {p.name: p.read_bytes() for p in (tmp_path / "got").iterdir() if p.suffix != ".txt"}
    assert got == {"1001.jpg": b"C" * 600, "2001.png": b"F" * 400}  # the last update, its last member
    local = ImageSource.open(root, tmp_path / "cache").locate(ids)  # the same choice on disk
    assert [Path(local.member(i).path).relative_to(root).as_posix() for i in (0, 1)] == [
        located.member(0).path, located.member(1).path]


def test_retry_after_is_honoured_and_backoff_doubles(hub, tmp_path):
    tar_path = write_tar(tmp_path / "data-0001.tar", [("1001.webp", b"x" * 3000)])
    hub.add_repo("me/data", {"data-0001.tar": tar_path})
    entry = tar_index(tar_path)["files"]["1001.webp"]
    want = Want(1001, "data-0001.tar", entry["offset"], entry["size"], entry["sha256"])

    class Waits:
        def __init__(self):
            self.asked = []

        def wait(self, seconds):
            self.asked.append(seconds)
            return False

        def set(self):
            pass

        def clear(self):
            pass

        def is_set(self):
            return False
    hub.retry_after = "7"
    hub.inject("429", times=1)
    hub.inject("503", times=2)
    fetcher = RangeFetcher(lambda p: f"{hub.url}/datasets/me/data/resolve/main/{p}",
                           connections=1, backoff=0.5)
    fetcher._stop = Waits()
    assert list(fetcher.fetch(plan_spans([want]))) == [(want, b"x" * 3000)]
    assert fetcher._stop.asked == [7.0, 1.0, 2.0]  # Retry-After, then 0.5 x 2^1, 0.5 x 2^2
    assert fetcher.stats.retries == 3 and fetcher.stats.requests == 4


# ---- build from hf:// ------------------------------------------------------------------

def test_build_from_the_hub_gives_the_local_shards(hub, demo_all, tmp_path):
    db, images, selection, local = demo_all
    serve_demo(hub, images)
    out = tmp_path / "hub"
    result = build_shards(db, HF, selection, out, shard_size=100, progress=False, connections=4)
    assert result.complete and not (out / ".hub-staging").exists()
    same_build(local, out)
    members = archive_members(images)
    fetched = hub.data_requests()
    selected_bytes = sum(len(v) for v in members.values())
    assert selected_bytes <= hub.sent[DATA] <= 1.1 * (selected_bytes + TAR_HEADER * len(members))
    assert len(fetched) <= len(members)


def test_only_the_selected_images_and_their_buckets_indexes_cross_the_network(hub, synth_demo,
                                                                             tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "own-cache"))
    db, images = synth_demo
    selection = Selector.all().sample(60, seed=1).save(tmp_path / "some.parquet", open_db(db))
    serve_demo(hub, images)
    members = archive_members(images)
    chosen = {int(i) for i in selection.ids} & set(members)
    result = fetch_selection(db, tmp_path / "some.parquet", HF, tmp_path / "got", progress=False)
    assert result.fetched == len(chosen) > 10
    chosen_bytes = sum(len(members[i]) for i in chosen)
    assert chosen_bytes <= hub.sent[DATA] <= 1.1 * (chosen_bytes + TAR_HEADER * len(chosen))
    buckets = {int(i) % 1000 for i in selection.ids}
    tars = [t.relative_to(images).as_posix() for t in images.glob("*.tar")]
    expected = sorted(f"images/{t[:-4]}.json" for t in tars if int(t[6:9]) in buckets)
    assert sorted(p for _, _, p, _, _ in hub.data_requests(".json")) == expected
    # a second run reads the index files from the huggingface_hub cache
    gets = len(hub.data_requests(".json"))
    fetch_selection(db, tmp_path / "some.parquet", HF, tmp_path / "got", progress=False)
    assert len(hub.data_requests(".json")) == gets


def test_bytes_read_stay_within_a_tenth_of_the_selected_members_and_their_headers(hub, tmp_path):
    rng = np.random.default_rng(3)
    tar_path = tmp_path / "data-0001.tar"
    blobs = [rng.bytes(int(n)) for n in rng.integers(1, 40_000, 60)]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, data in enumerate(blobs):
            info = tarfile.TarInfo(f"{1001 + 1000 * i}.webp")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    hub.add_repo("me/data", {"data-0001.tar": tar_path})
    files = tar_index(tar_path)["files"]
    chosen = [i for i in range(60) if i % 7 != 3]  # runs of neighbours with holes
    wants = [Want(i, "data-0001.tar", files[f"{1001 + 1000 * i}.webp"]["offset"], len(blobs[i]),
                  files[f"{1001 + 1000 * i}.webp"]["sha256"]) for i in chosen]
    fetcher = RangeFetcher(lambda p: f"{hub.url}/datasets/me/data/resolve/main/{p}", connections=4)
    got = dict((w.key, data) for w, data in fetcher.fetch(plan_spans(wants)))
    assert got == {i: blobs[i] for i in chosen}
    assert hub.sent["me/data"] <= 1.1 * sum(len(blobs[i]) + TAR_HEADER for i in chosen)
    assert hub.sent["me/data"] == fetcher.stats.bytes
    assert len(hub.data_requests()) == fetcher.stats.requests < len(chosen) / 2


def test_parts_and_workers_from_the_hub_give_the_same_bytes(hub, demo_all, tmp_path):
    db, images, selection, local = demo_all
    serve_demo(hub, images)
    out = tmp_path / "parts"
    for part in ("1/2", "0/2"):
        build_shards(db, HF, selection, out, shard_size=100, progress=False, workers=2, part=part)
    same_build(local, out)


def test_a_resumed_build_fetches_only_the_missing_shards(hub, demo_all, tmp_path):
    db, images, selection, local = demo_all
    serve_demo(hub, images)
    out = tmp_path / "resume"
    build_shards(db, HF, selection, out, shard_size=100, progress=False, part="0/3")
    (out / ".hub-staging").mkdir()
    (out / ".hub-staging" / "shard-000001.tar.staged").write_bytes(b"left by a killed run")
    first = len(hub.data_requests())
    build_shards(db, HF, selection, out, shard_size=100, progress=False)
    again = hub.data_requests()[first:]
    same_build(local, out)
    # the rerun read no member of the shards part 0/3 had finished (0 and 3)
    index = pq.read_table(out / "index.parquet").to_pydict()
    ids_done = {i for i, s in zip(index["id"], index["shard"]) if s in ("shard-000000.tar", "shard-000003.tar")}
    offsets = json_offsets(images)
    read_again = {offsets[(p.removeprefix("images/"), int(r.split("=")[1].split("-")[0]))]
                  for _, _, p, r, _ in again}
    assert read_again and not read_again & ids_done


def json_offsets(images: Path) -> dict:
    """{(tar, data offset): id} of every member, from the tars themselves."""
    out = {}
    for tar_path in images.rglob("*.tar"):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                out[(tar_path.relative_to(images).as_posix(), m.offset_data)] = int(m.name.split(".")[0])
    return out


def test_a_resumed_build_reads_the_recorded_commit(hub, demo_all, tmp_path):
    db, images, selection, local = demo_all
    serve_demo(hub, images)
    out = tmp_path / "pinned"
    build_shards(db, HF, selection, out, shard_size=100, progress=False, part="0/2")
    recorded = json.loads((out / ".hakubooru-build.json").read_text())["images_source"]
    # a new commit on main: every image of the data repository changed
    hub.add_repo(DATA, {f"images/{k}": b"x" * 1024 for k in archive_repos(images)[0]})
    build_shards(db, HF, selection, out, shard_size=100, progress=False)
    same_build(local, out)
    with pytest.raises(HakubooruError, match="images_source"):  # naming main now is another input
        build_shards(db, f"{HF}@main", selection, out, shard_size=100, progress=False)
    assert json.loads((out / "manifest.json").read_text())["images_source"] == recorded


# ---- faults ----------------------------------------------------------------------------

def test_429_5xx_cut_and_corrupt_answers_are_retried_to_the_same_bytes(hub, demo_all, tmp_path):
    db, images, selection, local = demo_all
    serve_demo(hub, images)
    for kind in ("429", "503", "cut", "corrupt"):
        hub.inject(kind, times=3)
    out = tmp_path / "faults"
    build_shards(db, HF, selection, out, shard_size=100, progress=False, connections=3)
    same_build(local, out)
    statuses = [s for *_, s in hub.data_requests()]
    assert statuses.count(429) == 3 and statuses.count(503) == 3


def test_past_its_retries_an_image_fails_with_its_reason_and_the_build_goes_on(hub, demo_all, tmp_path):
    db, images, selection, local = demo_all
    serve_demo(hub, images)
    first = sorted(archive_members(images))[0]
    hub.inject("corrupt", times=2, suffix=f"data-0{first % 1000:03d}.tar")
    out = tmp_path / "failed"
    result = build_shards(db, HF, selection, out, shard_size=100, progress=False, fetch_retries=1)
    assert result.complete and result.skipped["fetch_failed"] == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["skipped_by_reason"]["fetch_failed"] == 1
    skipped = pq.read_table(out / "skipped.parquet").to_pylist()
    row = [r for r in skipped if r["reason"] == "fetch_failed"]
    assert [r["id"] for r in row] == [first] and row[0]["detail"].startswith("sha256_mismatch")
    index = pq.read_table(out / "index.parquet").to_pydict()
    assert first not in index["id"] and len(index["id"]) == len(archive_members(images)) - 1


def test_a_server_ignoring_range_is_refused_before_any_shard(hub, demo_all, tmp_path):
    db, images, selection, _ = demo_all
    serve_demo(hub, images)
    hub.ignore_range = True
    out = tmp_path / "norange"
    with pytest.raises(HakubooruError, match="ignored the Range request"):
        build_shards(db, HF, selection, out, shard_size=100, progress=False)
    assert not list(out.glob("shard-*.tar")) and not (out / ".hub-staging").exists()


# ---- the fetch command and the CLI (fresh processes, HF_ENDPOINT set) -------------------

def cli(args, server: FakeHub, tmp: Path, cache: Path, **env):
    full = {**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": server.url,
            "HF_HOME": str(tmp / "hf-home"), "HF_HUB_CACHE": str(cache), **env}
    full.pop("HF_TOKEN", None) if "HF_TOKEN" not in env else None
    return subprocess.run([sys.executable, "-m", "hakubooru", *args], cwd=tmp, env=full,
                          capture_output=True, text=True, timeout=300)


def test_fetch_writes_the_selected_images_and_a_rerun_transfers_nothing(synth_demo, tmp_path, hf_cache):
    db, images = synth_demo
    every = Selector.all()
    selected = [int(i) for i in every.save(tmp_path / "all.parquet", open_db(db)).ids]
    members = archive_members(images)
    with FakeHub() as server:
        serve_demo(server, images)
        args = ["fetch", "--db", str(db), "--selection", "all.parquet", "--images", HF, "--out", "got",
                "--connections", "4", "--quiet"]
        done = cli(args, server, tmp_path, hf_cache)
        assert done.returncode == 0, done.stderr
        got = {int(p.stem): p.read_bytes() for p in (tmp_path / "got").glob("*.webp")}
        assert got == members
        missing = sorted(set(selected) - set(members))
        assert (tmp_path / "got" / NOT_IN_INDEX_FILE).read_text().split() == [str(i) for i in missing]
        assert (f"{len(members)} fetched, 0 already present, {len(missing)} in no index"
                in done.stderr) and ", 0 failed" in done.stderr
        before = len(server.data_requests())
        (tmp_path / "got" / f"{min(members)}.webp").write_bytes(b"damaged")
        again = cli(args, server, tmp_path, hf_cache)
        assert again.returncode == 0, again.stderr
        assert f"1 fetched, {len(members) - 1} already present" in again.stderr
        assert len(server.data_requests()) == before + 1
        assert (tmp_path / "got" / f"{min(members)}.webp").read_bytes() == members[min(members)]


def test_fetch_counts_failures_with_reasons_and_writes_their_ids(hub, synth_demo, tmp_path):
    db, images = synth_demo
    Selector.all().save(tmp_path / "all.parquet", open_db(db))
    serve_demo(hub, images)
    members = sorted(archive_members(images))
    hub.inject("503", times=3, suffix=f"data-0{members[0] % 1000:03d}.tar")
    hub.retry_after = "0"
    result = fetch_selection(db, tmp_path / "all.parquet", HF, tmp_path / "got", retries=2,
                             backoff=0.0, progress=False, connections=2)
    assert result.failed == {"http_503": 1} and result.fetched == len(members) - 1
    lines = (tmp_path / "got" / FAILED_FILE).read_text().splitlines()
    assert [line.split("\t")[:2] for line in lines] == [[str(members[0]), "http_503"]]
    (tmp_path / "got" / "notes.txt").write_text("a user's file")
    assert ImageSource.open(tmp_path / "got").ignored_members == 1  # the fetch's own files are not members


@pytest.mark.slow
def test_a_gated_repository_without_a_token_is_one_line_naming_hf_token(synth_demo, tmp_path, hf_cache):
    db, images = synth_demo
    Selector.all().sample(30, seed=2).save(tmp_path / "all.parquet", open_db(db))
    with FakeHub() as server:
        serve_demo(server, images)
        server.token = "hf_secret"
        args = ["fetch", "--db", str(db), "--selection", "all.parquet", "--images", HF, "--out", "got",
                "--quiet"]
        done = cli(args, server, tmp_path, hf_cache)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr.count("\n") == 1 and "HF_TOKEN" in done.stderr, done.stderr
        ok = cli(args, server, tmp_path, hf_cache, HF_TOKEN="hf_secret")
        assert ok.returncode == 0, ok.stderr


def test_unknown_repositories_revisions_and_bad_urls_are_one_line(hub, synth_demo, tmp_path):
    from hakubooru.hub import HubSource
    db, images = synth_demo
    serve_demo(hub, images)
    for images_arg, index_arg, message in (
            ("hf://datasets/someone/else", None, "no known index repository"),
            ("hf://datasets/someone/else", f"hf://datasets/{INDEX}", "someone/else: not found"),
            (HF, "hf://datasets/someone/index", "someone/index: not found"),
            (f"{HF}@v9", None, "@v9: revision not found"),
            ("hf://datasets/x", None, "expected hf://datasets/OWNER/NAME")):
        with pytest.raises(HakubooruError, match=message):
            HubSource.open(images_arg, index_arg)
    with pytest.raises(HakubooruError, match="goes with --images hf://"):
        build_shards(db, images, tmp_path / "none.parquet", tmp_path / "o",
                     images_index=f"hf://datasets/{INDEX}")
    with pytest.raises(HakubooruError, match="no tar of it has an index JSON"):
        hub.add_repo("me/other", {"x/data.tar": b"x" * 512})
        HubSource.open("hf://datasets/me/other", f"hf://datasets/{INDEX}")


@pytest.mark.slow
def test_a_build_killed_by_sigkill_resumes_without_fetching_finished_shards(demo_all, tmp_path, hf_cache):
    db, images, selection, _ = demo_all
    with FakeHub() as server:
        serve_demo(server, images)
        server.delay = 0.01
        common = ["build", "--db", str(db), "--images", HF, "--selection", str(selection),
                  "--shard-size", "10", "--quiet", "--out", "out"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": server.url,
               "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_CACHE": str(hf_cache)}
        proc = subprocess.Popen([sys.executable, "-m", "hakubooru", *common], cwd=tmp_path, env=env)
        out = tmp_path / "out"
        deadline = time.monotonic() + 120
        while len(list(out.glob("shard-*.tar"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (out / "manifest.json").exists(), "the build finished before it could be killed"
        finished = {p.name for p in out.glob("shard-*.tar")}
        first = len(server.data_requests())
        server.delay = 0.0
        rerun = subprocess.run([sys.executable, "-m", "hakubooru", *common], cwd=tmp_path, env=env,
                               capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr
        index = pq.read_table(out / "index.parquet").to_pydict()
        done_ids = {i for i, s in zip(index["id"], index["shard"]) if s in finished}
        offsets = json_offsets(images)
        read_again = {offsets[(p.removeprefix("images/"), int(r.split("=")[1].split("-")[0]))]
                      for _, _, p, r, _ in server.data_requests()[first:]}
        assert done_ids and read_again and not read_again & done_ids
        assert not (out / ".hub-staging").exists()
    build_shards(db, images, selection, tmp_path / "local", shard_size=10, progress=False,
                 cache_dir=tmp_path / "cache")
    same_build(tmp_path / "local", out)


@pytest.mark.slow
def test_docs_hub_commands_run_as_written_against_the_stand_in(synth_demo, tmp_path):
    """docs/hub.md's blocks, each line in a fresh process, HF_ENDPOINT at the stand-in serving
    the demo database and archives under the public names."""
    import re
    from tests.test_docs_commands import run_lines

    mark = "<!-- commands: tests/hakubooru/test_hub.py -->"
    text = (REPO / "docs/hub.md").read_text()
    blocks = re.findall(re.escape(mark) + r"\n```sh\n(.*?)```", text, re.S)
    assert len(blocks) == text.count(mark) == 2
    three, fetch = ([line for line in b.replace("\\\n", " ").splitlines() if line.strip()]
                    for b in blocks)
    assert len(three) == 3 and len(fetch) == 1
    db, images = synth_demo
    with FakeHub() as server:
        serve_demo(server, images)
        server.add_repo("KBlueLeaf/danbooru2023-sqlite", {"danbooru2023.db": db})
        env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf-home"),
               "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
        env.pop("HF_TOKEN", None)
        work = tmp_path / "work"
        work.mkdir()
        run_lines(three, work, env)
        run_lines(fetch, work, env)
    assert (work / "danbooru2023.db").read_bytes() == Path(db).read_bytes()
    build_shards(db, images, work / "sel.parquet", tmp_path / "local", cache_dir=tmp_path / "c",
                 progress=False)
    same_build(tmp_path / "local", work / "out")
    selected = {int(i) for i in pq.read_table(work / "sel.parquet").column("id").to_pylist()}
    members = archive_members(images)
    got = {int(p.stem): p.read_bytes() for p in (work / "images").glob("*.webp")}
    assert got == {i: members[i] for i in selected if i in members}


@pytest.mark.slow
def test_a_ray_build_from_the_hub_gives_the_local_shards(hub, demo_all, tmp_path, monkeypatch):
    from tests.helpers.raycluster import new_mark, ray_env, stop_marked
    db, images, selection, local = demo_all
    serve_demo(hub, images)
    mark = new_mark()
    for name, value in ray_env(mark).items():
        monkeypatch.setenv(name, value)
    try:
        result = build_shards(db, HF, selection, tmp_path / "ray", shard_size=100, progress=False,
                              ray="local", ray_tasks=2)
    finally:
        stop_marked(mark)
    assert result.complete and not (tmp_path / "ray" / ".hub-staging").exists()
    same_build(local, tmp_path / "ray")


def test_ctrl_c_stops_a_fetch_in_one_line(synth_demo, tmp_path, hf_cache):
    db, images = synth_demo
    Selector.all().save(tmp_path / "all.parquet", open_db(db))
    with FakeHub() as server:
        serve_demo(server, images)
        server.delay, server.delay_suffix = 0.2, ".tar"  # the index files come at once
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": server.url,
               "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_CACHE": str(hf_cache)}
        proc = subprocess.Popen([sys.executable, "-m", "hakubooru", "fetch", "--db", str(db),
                                 "--selection", "all.parquet", "--images", HF, "--out", "got",
                                 "--quiet", "--connections", "4"], cwd=tmp_path, env=env,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while len(list((tmp_path / "got").glob("*.webp"))) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (130, "interrupted\n"), err
    got = list((tmp_path / "got").glob("*.webp"))
    assert 8 <= len(got) < len(archive_members(images))  # stopped in the middle
    assert not list((tmp_path / "got").glob(".*.tmp"))


def test_redirected_tars_are_read_from_storage_without_the_token(hub, synth_demo, tmp_path,
                                                                  monkeypatch):
    db, images = synth_demo
    selection = Selector.all().sample(40, seed=3).save(tmp_path / "some.parquet", open_db(db))
    serve_demo(hub, images)
    hub.redirect, hub.token = True, "hf_secret"
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    members = archive_members(images)
    chosen = {int(i) for i in selection.ids} & set(members)
    result = fetch_selection(db, tmp_path / "some.parquet", HF, tmp_path / "got", progress=False)
    got = {int(p.stem): p.read_bytes() for p in (tmp_path / "got").glob("*.webp")}
    assert got == {i: members[i] for i in chosen} and result.requests == len(hub.storage_requests)
    assert {r[2] for r in hub.storage_requests} == {206}
    assert not any(r[3] for r in hub.storage_requests)  # the token stays with the Hub


def test_an_expired_storage_url_is_resolved_again(hub, tmp_path):
    tar_path = write_tar(tmp_path / "data-0001.tar", [("1001.webp", b"a" * 5000), ("2001.webp", b"b" * 9000)])
    hub.add_repo("me/data", {"data-0001.tar": tar_path})
    hub.redirect = True
    files = tar_index(tar_path)["files"]
    wants = [Want(name, "data-0001.tar", e["offset"], e["size"], e["sha256"]) for name, e in files.items()]
    fetcher = RangeFetcher(lambda p: f"{hub.url}/datasets/me/data/resolve/main/{p}", connections=1)
    assert [d for _, d in fetcher.fetch(plan_spans(wants[:1]))] == [b"a" * 5000]
    assert [d for _, d in fetcher.fetch(plan_spans(wants[:1]))] == [b"a" * 5000]  # straight to storage
    hub.generation += 1  # the signed URL expires
    assert [d for _, d in fetcher.fetch(plan_spans(wants[1:]))] == [b"b" * 9000]
    assert [r[2] for r in hub.storage_requests] == [206, 206, 403, 206]
    resolves = [r for r in hub.requests if r[2] == "data-0001.tar" and r[4] == 302]
    assert len(resolves) == 2


@pytest.mark.parametrize("kind", ["429", "503"])
def test_index_downloads_are_retried_after_429_and_5xx(hub, tmp_path, monkeypatch, kind):
    from huggingface_hub import constants
    from hakubooru.hub import HubSource
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "own-cache"))
    tar_path = write_tar(tmp_path / "data-0001.tar", [("1001.webp", b"a" * 700)])
    data, index = archive_repos(tmp_path)
    hub.add_repo("me/data", data)
    hub.add_repo("me/index", index)
    hub.inject(kind, times=1, suffix=".json")
    located = HubSource.open("hf://datasets/me/data", "hf://datasets/me/index").locate(np.array([1001]))
    assert located.found.tolist() == [True] and int(located.sizes[0]) == 700
    assert [s for m, _, p, _, s in hub.requests if p == "data-0001.json"].count(int(kind)) == 1
    assert tar_path.is_file()
