"""Deterministic danbooru-like test data: a danbooru2023.db and its image archives.

    from hakubooru.synth import make_database, make_archives, make_demo
    db_path, images_dir = make_demo("demo", n_posts=2000, seed=0)

See docs/synth.md.
"""
from .archives import make_archives
from .database import make_database
from .demo import make_demo, make_folder

__all__ = ["make_database", "make_archives", "make_demo", "make_folder"]
