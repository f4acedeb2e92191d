"""Shared pytest fixtures: small synthetic danbooru databases and image archives.

- ``synth_db``: path of a 1,500-post danbooru2023.db (seed 0), no images.
- ``synth_demo``: ``(db_path, images_dir)`` of a 600-post database (seed 0) with its
  webp-4Mpixel archives (``images/data-0NNN.tar`` and ``data-1NNN.tar``), 64 px pictures.

Both are session-scoped and made once per test run under pytest's tmp_path_factory.
"""
from __future__ import annotations

import pytest

from hakubooru.synth import make_database, make_demo

SYNTH_DB_POSTS = 1500
SYNTH_DEMO_POSTS = 600


@pytest.fixture(scope="session")
def synth_db(tmp_path_factory):
    return make_database(tmp_path_factory.mktemp("synth_db") / "danbooru2023.db", SYNTH_DB_POSTS,
                         seed=0, progress=False)


@pytest.fixture(scope="session")
def synth_demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("synth_demo"), n_posts=SYNTH_DEMO_POSTS, seed=0, max_side=64,
                     progress=False)
