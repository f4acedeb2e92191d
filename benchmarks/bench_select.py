"""The epsilon selection on a 1M-post synthetic database: ours vs the HakuBooru way, one run.

    python benchmarks/bench_select.py [--posts 1000000] [--data bench-data]

HakuBooru's way (its delta-model script): load peewee ``Post`` objects of each window into a
list, ``random.choices`` from it after a global seed (with replacement), then filter the
chosen objects in Python. Ours: ``examples/epsilon_selection.epsilon_selector`` evaluated
with ``.ids(db)`` (SQL for the windows and filters, hashing for the sample).
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import BENCH_DATA, synth_db  # noqa: E402
from epsilon_selection import REAL_ID_SPAN, SEED, WINDOWS, epsilon_selector  # noqa: E402

from hakubooru import open_db  # noqa: E402
from hakubooru.db import Post  # noqa: E402
from hakubooru.selector import STILL_IMAGE_EXTS  # noqa: E402


def hakubooru_way(scale: float) -> tuple[int, int]:
    random.seed(SEED)
    chosen = []
    for lo, hi, n in WINDOWS:
        query = Post.select().where(Post.id >= lo)
        if hi is not None:
            query = query.where(Post.id < hi)
        posts = list(query)
        chosen += posts if n is None else random.choices(posts, k=round(n * scale))
    kept = [p for p in chosen
            if not p.is_deleted and p.md5 and p.file_url and p.file_ext in STILL_IMAGE_EXTS]
    return len(kept), len({p.id for p in kept})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--posts", type=int, default=1_000_000)
    ap.add_argument("--data", default=str(BENCH_DATA))
    args = ap.parse_args()
    db_path = synth_db(args.posts, Path(args.data))
    db = open_db(db_path)
    scale = args.posts / REAL_ID_SPAN
    print(f"database: {db_path} ({args.posts:,} posts); sample scale {scale:.4f}")

    t0 = time.perf_counter()
    ours = epsilon_selector(SEED, scale).ids(db)
    t_ours = time.perf_counter() - t0
    print(f"ours:            {t_ours:8.2f} s  -> {len(ours):,} distinct posts")

    t0 = time.perf_counter()
    theirs, distinct = hakubooru_way(scale)
    t_theirs = time.perf_counter() - t0
    print(f"HakuBooru way:   {t_theirs:8.2f} s  -> {theirs:,} posts, of which {distinct:,} distinct")
    print(f"ratio: ours is {t_theirs / t_ours:.1f}x faster")


if __name__ == "__main__":
    main()
