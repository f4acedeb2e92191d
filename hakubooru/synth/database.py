"""make_database(): write a synthetic danbooru2023.db with the schema of hakubooru/db.py.

Everything is drawn from numpy Generators seeded by (seed, stream), so the file is a pure
function of (n_posts, seed): same arguments, byte-identical file. Rows go in with bulk
``executemany`` in one transaction (journal off), indexes are built after loading.
"""
from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..db import create_schema_sql
from ..errors import HakubooruError
from .posts import COLUMNS, ID_WINDOWS, MAX_ID, make_posts
from .tags import draw_tags, load_vocabulary

INDEXES = (
    'CREATE UNIQUE INDEX "tag_name" ON "tag" ("name")',
    'CREATE INDEX "posttagrelation_post_id" ON "posttagrelation" ("post_id")',
    'CREATE INDEX "posttagrelation_tag_id" ON "posttagrelation" ("tag_id")',
)
# Bump whenever the files made for the same arguments change, so that complete folders made
# by an older generator (synth.json) are rebuilt rather than reused.
GENERATOR_VERSION = 2
MAX_POSTS = sum(hi - lo for lo, hi in ID_WINDOWS)
CHUNK = 200_000
REL_CHUNK = 1_000_000
# Independent random streams: numpy Generator(PCG64([seed, stream])).
POST_STREAM, TAG_STREAM = 2, 3


def _rows(columns: list, start: int, stop: int):
    parts = [c[start:stop] for c in columns]
    return zip(*(p.tolist() if isinstance(p, np.ndarray) else p for p in parts))


def check_args(n_posts, seed) -> None:
    """One clear error for a post count or seed the generator cannot use."""
    if isinstance(n_posts, bool) or not isinstance(n_posts, (int, np.integer)) or n_posts < 1:
        raise HakubooruError(f"number of posts must be a positive integer, got {n_posts!r}")
    if n_posts > MAX_POSTS:
        raise HakubooruError(f"at most {MAX_POSTS:,} posts fit the id range 1..{MAX_ID:,}, got {n_posts:,}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise HakubooruError(f"seed must be a non-negative integer, got {seed!r}")


def make_database(path, n_posts: int, seed: int = 0, overwrite: bool = False,
                  progress: bool = True) -> Path:
    """Write a deterministic danbooru-like database of n_posts posts to path; return path.

    Refuses to replace an existing file unless overwrite=True. The file is written under a
    temporary name and renamed when complete, so an interrupted run leaves nothing that
    looks like a database.
    """
    check_args(n_posts, seed)
    path = Path(path)
    if path.exists() and not overwrite:
        raise HakubooruError(f"{path} already exists (pass overwrite=True / --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    start = time.perf_counter()

    bar = tqdm(total=n_posts, unit="row", unit_scale=True, desc="synth db", disable=not progress)
    bar.set_postfix_str("drawing posts")
    vocab = load_vocabulary(seed)
    posts = make_posts(np.random.Generator(np.random.PCG64([seed, POST_STREAM])), n_posts)
    bar.set_postfix_str("drawing tags")
    rel_post, rel_tag = draw_tags(vocab, n_posts, np.random.Generator(np.random.PCG64([seed, TAG_STREAM])))
    rel_post_id = np.asarray(posts["id"])[rel_post]
    rel_tag_id = vocab.ids[rel_tag]
    n_rel = len(rel_post_id)
    bar.reset(total=n_posts + n_rel)  # the rate and ETA of the inserts alone
    bar.set_postfix_str("inserting")

    conn = sqlite3.connect(tmp, isolation_level=None)
    try:
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-262144", "temp_store=MEMORY",
                       "threads=2"):
            conn.execute(f"PRAGMA {pragma}")
        conn.execute("BEGIN")
        for sql in create_schema_sql():
            conn.execute(sql)
        conn.executemany('INSERT INTO "tag" VALUES (?,?,?,?)', zip(
            vocab.ids.tolist(), vocab.names, vocab.types.tolist(), vocab.popularity.tolist()))
        post_cols = [posts[c] for c in COLUMNS]
        insert_post = f'INSERT INTO "post" VALUES ({",".join("?" * len(COLUMNS))})'
        for a in range(0, n_posts, CHUNK):
            conn.executemany(insert_post, _rows(post_cols, a, a + CHUNK))
            bar.update(min(CHUNK, n_posts - a))
        insert_rel = 'INSERT INTO "posttagrelation" ("post_id", "tag_id") VALUES (?,?)'
        for a in range(0, n_rel, REL_CHUNK):
            conn.executemany(insert_rel, _rows([rel_post_id, rel_tag_id], a, a + REL_CHUNK))
            bar.update(min(REL_CHUNK, n_rel - a))
        for i, sql in enumerate(INDEXES, 1):
            bar.set_postfix_str(f"index {i}/{len(INDEXES)}")
            conn.execute(sql)
        conn.execute("COMMIT")
    except BaseException:
        conn.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    conn.close()
    os.replace(tmp, path)
    if progress:
        size = path.stat().st_size
        print(f"synth: {n_posts:,} posts, {n_rel:,} tag relations, {len(vocab.names):,} tags "
              f"-> {path} ({size / 2**20:,.1f} MiB) in {time.perf_counter() - start:.1f} s")
    return path
