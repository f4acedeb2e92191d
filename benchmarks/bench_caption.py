"""Captioning speed on a synthetic database, against its floor and against HakuBooru.

All in one run, over every post of the database:
  1. raw scan: ``SELECT post_id, tag_id FROM posttagrelation`` over the posts' id range,
     each row fetched into Python (the floor: nothing is done with the rows);
  2. ours: ``Captioner(db)`` (thresholds from the database, tag table) + ``captions(ids)``;
  3. HakuBooru 0.0.3's ``KohakuCaptioner`` (PyPI), in a subprocess with its own package
     directory first on sys.path, over an evenly spread sample of the posts, scaled up.
Targets: ours <= 3x the raw scan, and >= 20x faster than HakuBooru.

    python benchmarks/bench_caption.py                    # bench-data/synth-1m, made if absent
    python benchmarks/bench_caption.py --db other.db --hakubooru-sample 5000
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import synth_db  # noqa: E402

from hakubooru.captioner import Captioner  # noqa: E402
from hakubooru.db import open_db  # noqa: E402
from hakubooru.quality import LOWEST_QUALITY, QUALITY_LEVELS  # noqa: E402
from hakubooru.tagrules import RATING_TAGS, YEAR_TAGS  # noqa: E402

HAKUBOORU_DIR = ROOT / "bench-data" / "hakubooru-0.0.3"
# Tags both captioners add from post fields; left out when comparing content tags.
POST_FIELD_TAGS = ({LOWEST_QUALITY} | {t for _, t in QUALITY_LEVELS} | {t for _, t in YEAR_TAGS}
                   | {t for tags in RATING_TAGS.values() for t in tags})

# Runs HakuBooru 0.0.3 as its own code does: peewee Post objects, KohakuCaptioner.caption(post, img)
# (tags fetched per post through its many-to-many relation). Bound to a read-only connection.
HAKUBOORU_SCRIPT = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from peewee import SqliteDatabase
from hakubooru.dataset.db import Post, Tag, PostTagRelation, LocalPost
from hakubooru.caption import KohakuCaptioner
db = SqliteDatabase(f"file:{sys.argv[2]}?mode=ro", uri=True, pragmas={"query_only": 1})
for model in (Post, Tag, PostTagRelation, LocalPost):
    model._meta.database = db
ids = json.load(open(sys.argv[3]))
captioner = KohakuCaptioner()
wall, cpu = time.perf_counter(), time.process_time()
out = {}
for lo in range(0, len(ids), 500):
    for post in Post.select().where(Post.id.in_(ids[lo:lo + 500])):
        out[post.id] = captioner.caption(post, None)
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
json.dump({"wall": wall, "cpu": cpu, "captions": out}, open(sys.argv[4], "w"))
"""


class Timer:
    """Wall-clock and CPU time (this process) of a block; CPU time is the steadier figure
    on a machine shared with other jobs."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def raw_scan(db, lo: int, hi: int) -> int:
    rows = 0
    for _ in db.execute_sql("SELECT post_id, tag_id FROM posttagrelation WHERE post_id BETWEEN ? AND ?", (lo, hi)):
        rows += 1
    return rows


def ours(db, ids, keep_ids: set) -> tuple[dict, Captioner]:
    cap = Captioner(db)
    kept = {}
    for post_id, _, record in cap.captions(ids, progress=True):
        if post_id in keep_ids:
            kept[post_id] = record
    return kept, cap


def ensure_hakubooru() -> None:
    if (HAKUBOORU_DIR / "hakubooru" / "caption.py").exists():
        return
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(HAKUBOORU_DIR),
                    "--no-deps", "hakubooru==0.0.3"], check=True)


def content_tags(tags) -> set[str]:
    return {t for t in tags if t} - POST_FIELD_TAGS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, help="database to use (default: a synthetic one of --posts posts)")
    parser.add_argument("--posts", type=int, default=1_000_000, help="size of the synthetic database if made")
    parser.add_argument("--hakubooru-sample", type=int, default=10_000, help="posts HakuBooru captions")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of 1. and 2.; the best is kept")
    args = parser.parse_args()

    args.db = args.db or synth_db(args.posts)
    ensure_hakubooru()
    db = open_db(args.db)
    ids = np.fromiter((r[0] for r in db.execute_sql("SELECT id FROM post ORDER BY id")), dtype=np.int64)
    n_tags = db.execute_sql("SELECT count(*) FROM tag").fetchone()[0]
    print(f"data: {args.db} — {len(ids):,} posts, {n_tags:,} tags; machine: {len(os.sched_getaffinity(0))} cores (shared)")

    sample = ids[np.linspace(0, len(ids) - 1, min(args.hakubooru_sample, len(ids))).astype(np.int64)]
    scans, runs = [], []
    for round_ in range(1, args.rounds + 1):  # interleaved, best of each kept
        with Timer() as scan:
            rows = raw_scan(db, int(ids[0]), int(ids[-1]))
        with Timer() as run:
            ours_records, cap = ours(db, ids, set(sample.tolist()))
        scans.append(scan)
        runs.append(run)
        print(f"round {round_}: 1. raw scan {scan.wall:6.2f} s wall {scan.cpu:6.2f} s cpu ({rows:,} post-tag rows); "
              f"2. ours {run.wall:6.2f} s wall {run.cpu:6.2f} s cpu", flush=True)
    floor = min(scans, key=lambda t: t.cpu)
    best = min(runs, key=lambda t: t.cpu)
    print(f"1. raw scan (floor): {floor.wall:7.2f} s wall {floor.cpu:7.2f} s cpu, {len(ids) / floor.cpu:,.0f} posts/cpu-s")
    print(f"2. ours            : {best.wall:7.2f} s wall {best.cpu:7.2f} s cpu, {len(ids) / best.cpu:,.0f} posts/cpu-s "
          f"(incl. thresholds + tag table); {cap.summary()}")

    with tempfile.TemporaryDirectory() as tmp:
        ids_file, out_file = Path(tmp) / "ids.json", Path(tmp) / "out.json"
        ids_file.write_text(json.dumps(sample.tolist()))
        subprocess.run([sys.executable, "-c", HAKUBOORU_SCRIPT, str(HAKUBOORU_DIR), str(args.db.resolve()),
                        str(ids_file), str(out_file)], check=True, cwd=tmp)
        result = json.loads(out_file.read_text())
    scale = len(ids) / len(sample)
    print(f"3. HakuBooru       : {result['wall']:7.2f} s wall {result['cpu']:7.2f} s cpu for a sample of "
          f"{len(sample):,} posts ({len(sample) / result['cpu']:,.0f} posts/cpu-s) -> scaled x{scale:,.1f} to all "
          f"{len(ids):,} posts: {result['wall'] * scale:,.0f} s wall {result['cpu'] * scale:,.0f} s cpu")

    agree = 0
    for post_id, caption in result["captions"].items():
        record = ours_records[int(post_id)]
        theirs_tags = content_tags(t.strip() for t in caption.replace("|||", "").split(","))
        agree += theirs_tags == content_tags(record["keep"] + record["general"] + record["meta"])
    print(f"   same content tags as HakuBooru (quality/year/rating tags aside): {agree:,} / {len(sample):,} posts")

    print(f"ratio ours / raw scan : {best.cpu / floor.cpu:.2f}x cpu, {best.wall / floor.wall:.2f}x wall   (target <= 3x)")
    print(f"speed-up vs HakuBooru : {result['cpu'] * scale / best.cpu:.1f}x cpu, "
          f"{result['wall'] * scale / best.wall:.1f}x wall   (target >= 20x)")


if __name__ == "__main__":
    main()
