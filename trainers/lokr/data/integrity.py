"""Trust what the trainer reads: the shard folder is a finished build, every shard has the size
its manifest records, and every member read has the hash index.parquet recorded at build time.

The checks at start cost one ``stat`` per shard (a truncated or grown shard is refused before
the first step); the per-member check costs one xxh3-64 of the bytes read (see
docs/benchmarks.md). Whole-shard checksums (xxh3-128 in the manifest) are left to the builder's
re-run, which verifies and rebuilds damaged shards: reading every shard whole before training
would cost as much as an epoch of reading.
"""
from __future__ import annotations

import json
from pathlib import Path

from hakubooru.errors import HakubooruError
from hakubooru.manifest import MANIFEST_FILE
from hakubooru.shardwriter import member_hash

REBUILD = "rerun the same `python -m hakubooru build` command (it verifies the shards and rebuilds damaged ones)"
ON_CORRUPT = ("error", "skip")  # data.on_corrupt


class CorruptMember(HakubooruError):
    """A member's bytes differ from the hash recorded at build time."""


def check_shard_folder(root: Path, shard_names: list[str], rows: int) -> str:
    """Refuse an unfinished build (no manifest.json), shards missing from it or whose size is not
    the one it records, and an index whose row count is not the manifest's; returns the
    manifest's fingerprint."""
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        raise HakubooruError(f"{root} has no {MANIFEST_FILE}: the build did not finish; {REBUILD} "
                             "(or `--merge` for a build in parts)")
    try:
        manifest = json.loads(path.read_text())
        sizes = {s["name"]: int(s["size"]) for s in manifest["shards"]}
        fingerprint = str(manifest["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise HakubooruError(f"{path} is not a hakubooru manifest (damaged?); {REBUILD}") from None
    unlisted = [n for n in shard_names if n not in sizes]
    if unlisted:
        raise HakubooruError(f"{root}: index.parquet names {unlisted[0]}, which {MANIFEST_FILE} does "
                             f"not list (files of two builds?); {REBUILD} into a new folder")
    for name, size in sizes.items():
        shard = Path(root) / name
        if not shard.is_file():
            raise HakubooruError(f"{shard} is missing; {REBUILD}")
        actual = shard.stat().st_size
        if actual != size:
            raise HakubooruError(f"{shard} is {actual} bytes but {MANIFEST_FILE} records {size} (cut short "
                                 f"or altered); {REBUILD}")
    written = (manifest.get("counts") or {}).get("written")
    if written is not None and written != rows:
        raise HakubooruError(f"{root}: index.parquet has {rows} rows but {MANIFEST_FILE} counts {written} "
                             f"samples; {REBUILD}")
    return fingerprint


def check_member(data: bytes, expected: int, shard: str, post_id: int, member: str) -> None:
    """Raise CorruptMember (one line naming shard, post and member) when ``data`` does not hash
    to ``expected``."""
    if member_hash(data) != expected:
        raise CorruptMember(f"{shard}: post {post_id}, member {member}: its bytes differ from the "
                            f"hash recorded at build time (the shard was altered or damaged); {REBUILD}, "
                            "or set data.on_corrupt = \"skip\" to train without such samples")
