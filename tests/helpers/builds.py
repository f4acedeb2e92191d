"""A shard folder of every post of the synthetic demo database, built by build_shards."""
from pathlib import Path

from hakubooru import Selector, build_shards, open_db


def build_every_post(synth_demo, tmp: Path, out: Path, **kw) -> Path:
    """Select every post of ``synth_demo`` (saved as ``tmp/all.parquet``) and build it into
    ``out`` (``kw``: build_shards options); returns ``out``."""
    db_path, images = synth_demo
    Selector.all().save(tmp / "all.parquet", open_db(db_path))
    build_shards(db_path, images, tmp / "all.parquet", out, cache_dir=tmp / "cache", progress=False, **kw)
    return out
