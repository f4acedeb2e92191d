"""Fetching selected images from the Hub's indexed tars, against reading them from local tars.

Data: ``--tars`` tars of ``--members`` members (random bytes, sizes uniform in 0.5-1.5 x
``--member-kb``), at ``images/part-NNN.tar`` (names without a bucket: every tar is indexed),
with their index JSONs in deepghs' format, made once under bench-data/hub-*/. Selection: a
``--share`` of the members drawn at random (seed 0). The stand-in Hub
(tests/helpers/hubserver.py) runs in a child process and waits ``--rtt`` seconds before every
answer (a real link's round trip).

Measured:
  1. baseline: the selected members read by offset from the local tars (MemberReader), their
     sha256 checked and each written as ``<id>.webp`` (what ``fetch`` writes);
  2. ours: ``fetch`` (HubSource + fetch_located: coalesced Range requests, sha256 check,
     ``<id>.webp`` files) at each of ``--connections``, index files already in the cache;
     images/s, bytes transferred / selected bytes, requests per image;
  3. the index files' download (cold cache) once;
and, from the model (uniform random selections over tars of real sizes, the requests
planned by ``plan_spans``), an estimate for a 10k selection and for the epsilon's 5.2M:
index bytes, data bytes, requests, hours at 100 MB/s.

    python benchmarks/bench_hub.py                     # 8 tars x 250 members of ~100 KB, 30%
    python benchmarks/bench_hub.py --rtt 0.05 --connections 1 4 16 64
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hakubooru.hub import HubSource  # noqa: E402
from hakubooru.hubfetch import fetch_located  # noqa: E402
from hakubooru.rangefetch import TAR_HEADER, Want, plan_spans  # noqa: E402
from hakubooru.sources import MemberReader  # noqa: E402
from tests.helpers.hubserver import FakeHub, archive_repos  # noqa: E402

DATA, INDEX = "bench/data", "bench/index"


def make_tars(folder: Path, tars: int, members: int, member_kb: int) -> Path:
    """The benchmark's tars under folder/images (made once)."""
    images = folder / "images"
    done = folder / "done.json"
    spec = {"tars": tars, "members": members, "member_kb": member_kb, "version": 1}
    if done.is_file() and json.loads(done.read_text()) == spec:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for t in range(tars):
        with tarfile.open(images / f"part-{t:03d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for m in range(members):
                data = rng.bytes(int(member_kb * 1024 * rng.uniform(0.5, 1.5)))
                info = tarfile.TarInfo(f"{t * members + m + 1}.webp")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    done.write_text(json.dumps(spec))
    return folder


def serve(folder: Path, rtt: float, conn) -> None:
    """The child process: a FakeHub over the benchmark's tars until told to stop."""
    data, index = archive_repos(folder)
    with FakeHub() as hub:
        hub.add_repo(DATA, data)
        hub.add_repo(INDEX, index)
        hub.delay = rtt
        conn.send(hub.url)
        conn.recv()


def baseline(folder: Path, source: HubSource, ids, located, out: Path) -> float:
    """Seconds to read, check and write the selected members from the local tars."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    with MemberReader() as reader:
        for i in np.flatnonzero(located.found).tolist():
            m = located.member(i)
            data = reader.read(dataclasses.replace(m, path=str(folder / m.path)))
            assert hashlib.sha256(data).hexdigest() == m.sha256
            tmp = out / f".{ids[i]}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, out / f"{ids[i]}.{m.ext}")
    return time.perf_counter() - start


def entry_bytes() -> int:
    """Bytes of one member in an index JSON at real sizes (7-digit id, 10-digit offset)."""
    entry = {"7654321.webp": {"offset": 2_345_678_901, "size": 654_321, "sha256": "0" * 64}}
    return len(json.dumps(entry))  # the outer braces stand for the ", " between entries


def model_requests(share: float, members: int, member_mb: float, seed: int = 0) -> float:
    """Requests per image for a uniform random ``share`` of one real-sized tar."""
    rng = np.random.default_rng(seed)
    sizes = (member_mb * 1e6 * rng.uniform(0.5, 1.5, members)).astype(np.int64)
    starts = np.cumsum(sizes + 2 * TAR_HEADER) - sizes  # a header and ~half a block of padding
    chosen = np.flatnonzero(rng.random(members) < share)
    wants = [Want(int(i), "t", int(starts[i]), int(sizes[i]), "") for i in chosen]
    return len(plan_spans(wants)) / max(1, len(chosen))


def estimate(n: int, archive: int, tars: int, member_mb: float, rtt: float, connections: int) -> dict:
    """Index bytes, data bytes, requests, hours at 100 MB/s, and hours of round trips alone
    (requests x rtt / connections) for n random images."""
    per_tar = archive / tars
    touched = tars * (1 - (1 - 1 / tars) ** n)  # tars holding at least one selected image
    index = touched * per_tar * entry_bytes()
    data = n * (member_mb * 1e6 + TAR_HEADER)  # at most 1.1x this: the bound on coalesced reads
    requests = n * model_requests(n / archive, int(per_tar), member_mb) + 2 * touched + 2
    return {"images": n, "index_GB": index / 1e9, "data_GB": data / 1e9, "requests": requests,
            "hours_at_100MBps": (index + data) / 100e6 / 3600,
            "hours_of_round_trips": requests * rtt / connections / 3600}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tars", type=int, default=8)
    ap.add_argument("--members", type=int, default=250)
    ap.add_argument("--member-kb", type=int, default=100)
    ap.add_argument("--share", type=float, default=0.3, help="share of the members selected")
    ap.add_argument("--rtt", type=float, default=0.05, help="seconds added to every request")
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--work", default=str(ROOT / "bench-data" / "hub"))
    ap.add_argument("--archive-images", type=int, default=8_000_000,
                    help="images in the real archive, for the estimate (assumed)")
    ap.add_argument("--archive-tars", type=int, default=2000,
                    help="tars in the real archive (data-0NNN and data-1NNN)")
    ap.add_argument("--image-mb", type=float, nargs="+", default=[0.5, 1.0],
                    help="mean image sizes in the real archive, for the estimate (assumed)")
    args = ap.parse_args()

    work = Path(args.work)
    folder = make_tars(work / f"tars-{args.tars}x{args.members}x{args.member_kb}k", args.tars,
                       args.members, args.member_kb)
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=serve, args=(folder, args.rtt, child), daemon=True)
    proc.start()
    url = parent.recv()
    from huggingface_hub import constants
    constants.ENDPOINT = url
    constants.HUGGINGFACE_CO_URL_TEMPLATE = url + "/{repo_id}/resolve/{revision}/{filename}"
    cache = work / "hf-cache"
    shutil.rmtree(cache, ignore_errors=True)
    constants.HF_HUB_CACHE = str(cache)
    try:
        rng = np.random.default_rng(0)
        all_ids = np.arange(1, args.tars * args.members + 1, dtype=np.int64)
        ids = np.sort(all_ids[rng.random(len(all_ids)) < args.share])
        t0 = time.perf_counter()
        source = HubSource.open(f"hf://datasets/{DATA}", f"hf://datasets/{INDEX}")
        located = source.locate(ids)
        index_s = time.perf_counter() - t0
        selected_bytes = int(located.sizes[located.found].sum())
        print(f"data: {args.tars} tars x {args.members} members of ~{args.member_kb} KB; selected "
              f"{len(ids)} ({args.share:.0%}), {selected_bytes / 1e6:.1f} MB; {args.rtt * 1000:.0f} ms "
              f"added per request; {os.cpu_count()} CPUs")
        print(f"index files: {source.indexed_tars} ({source.index_bytes / 1e6:.2f} MB, "
              f"{source.index_bytes / (args.tars * args.members):.0f} B per member) in {index_s:.1f} s "
              "(cold cache)")
        base_s = baseline(folder, source, ids, located, work / "out-local")
        print("| source | connections | images/s | MB/s | bytes / selected | requests / image |")
        print("|---|---|---|---|---|---|")
        print(f"| local tars (baseline) | - | {len(ids) / base_s:.0f} | "
              f"{selected_bytes / 1e6 / base_s:.0f} | 1.000 | - |")
        for c in args.connections:
            out = work / f"out-{c}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            r = fetch_located(source, ids, located, out, connections=c, progress=False)
            s = time.perf_counter() - start
            assert r.fetched == len(ids) and not r.failed
            print(f"| hf:// ({args.rtt * 1000:.0f} ms) | {c} | {r.fetched / s:.0f} | "
                  f"{r.bytes / 1e6 / s:.1f} | {r.bytes / selected_bytes:.3f} | "
                  f"{r.requests / r.fetched:.2f} |")
    finally:
        parent.send("stop")
        proc.join(10)
    print(f"\nestimate (assumed: {args.archive_images:,} images in {args.archive_tars} tars, "
          f"uniform random selection; {entry_bytes()} B of index per member; round trips: "
          f"{args.rtt * 1000:.0f} ms, 16 connections):")
    print("| images | MB per image | index GB | data GB | requests | hours at 100 MB/s | "
          "hours of round trips |")
    print("|---|---|---|---|---|---|---|")
    for mb in args.image_mb:
        for n in (10_000, 5_200_000):
            e = estimate(n, args.archive_images, args.archive_tars, mb, args.rtt, 16)
            print(f"| {n:,} | {mb} | {e['index_GB']:.2f} | {e['data_GB']:,.1f} | "
                  f"{e['requests']:,.0f} | {e['hours_at_100MBps']:.2f} | "
                  f"{e['hours_of_round_trips']:.2f} |")


if __name__ == "__main__":
    main()
