"""examples/epsilon_selection.py is the card's selection (recipe §1): three id windows with their
sample sizes and a fixed seed, then deleted, Gold-only and non-image posts removed — checked
against SQL on the database and the scalar reference hash (bottom n by hash64(seed, id))."""
from __future__ import annotations

import importlib.util
import sqlite3

from hakubooru.db import open_db
from hakubooru.rng import hash64
from tests.helpers import REPO


def load_example():
    spec = importlib.util.spec_from_file_location("epsilon_selection", REPO / "examples" / "epsilon_selection.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_windows_sizes_and_filters_are_the_cards(synth_db):
    example = load_example()
    # typed from the card: 1,000,000 posts of ids 0–1,999,999; 2,000,000 of 2,000,000–4,999,999;
    # every post from 5,000,000 on
    assert example.WINDOWS == [(0, 2_000_000, 1_000_000), (2_000_000, 5_000_000, 2_000_000), (5_000_000, None, None)]
    scale, seed = 1e-4, 2023  # 100 and 200 posts of the synthetic database's ~380 and ~570
    got = example.epsilon_selector(seed=seed, scale=scale).ids(open_db(synth_db)).tolist()

    with sqlite3.connect(synth_db) as conn:
        rows = conn.execute("SELECT id, is_deleted, md5, file_url, file_ext FROM post").fetchall()
    window = lambda lo, hi: [r[0] for r in rows if lo <= r[0] < hi]  # noqa: E731
    picked = set(sorted(window(0, 2_000_000), key=lambda i: hash64(seed, i))[:100])
    picked |= set(sorted(window(2_000_000, 5_000_000), key=lambda i: hash64(seed, i))[:200])
    picked |= set(window(5_000_000, 2**62))
    no_image = ("gif", "mp4", "webm", "zip", "swf")  # the card: gif / video / ugoira / flash
    kept = sorted(r[0] for r in rows if r[0] in picked and not r[1] and r[2] and r[3] and r[4] not in no_image)
    assert got == kept
    removed = picked - set(kept)  # the synthetic database has posts of every kind removed
    kinds = {r[0]: ("deleted" if r[1] else "gold" if not (r[2] and r[3]) else r[4]) for r in rows if r[0] in removed}
    assert {"deleted", "gold"} <= set(kinds.values()) and set(kinds.values()) & set(no_image)
