"""Per-tag counts of a shard folder, ``tag_counts.parquet``: data of the build, so that a trainer
reads them in O(number of tags) and never every record (``ss_tag_frequency`` of a LoKr file).

Counted as sd-scripts counts a caption folder: each tag of a sample's caption, stripped and
lower-cased, once per occurrence. The tags come from the sample's ``.json`` record (its caption
groups, in caption order) or, where there is no record (webdataset folders of other tools), from
its ``.txt`` caption split at commas.

The file (columns ``tag`` string, ``count`` int64; by count descending, then tag) carries the
dataset fingerprint of ``manifest.json`` in its schema metadata (key ``hakubooru``), so counts
of another build of the folder are never taken for this one. ``build`` and ``index`` write it;
for a folder without it (built by an older hakubooru) ``ensure_tag_counts`` counts once, in
parallel, and stores it.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from .captioner import CAPTION_GROUPS
from .errors import HakubooruError
from .manifest import INDEX_FILE, TAG_COUNTS_FILE, write_parquet
from .procs import ordered_map
from .shardfolder import shard_runs

SCHEMA = pa.schema([("tag", pa.string()), ("count", pa.int64())])


def record_tags(record) -> list[str] | None:
    """The tags of a caption record in caption order, or None if it is not one."""
    if not isinstance(record, dict) or "keep" not in record:
        return None
    return [t for group in CAPTION_GROUPS for t in record.get(group, ())]


def add_tags(counts: dict[str, int], tags) -> None:
    """Count ``tags`` into ``counts`` the sd-scripts way (stripped, lower-cased, empty ones left out)."""
    for tag in tags:
        tag = tag.strip().lower()
        if tag:
            counts[tag] = counts.get(tag, 0) + 1


def json_tags(json_bytes: bytes | None, where: str) -> list[str] | None:
    """The tags of a sample's ``.json`` member, or None when it has none or it is no caption
    record (then its ``.txt`` caption counts)."""
    if json_bytes is None:
        return None
    try:
        return record_tags(json.loads(json_bytes))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HakubooruError(f"{where}: its .json record is not valid JSON") from None


def caption_tags(txt_bytes: bytes) -> list[str]:
    """The tags of a ``.txt`` caption: split at commas."""
    return txt_bytes.decode("utf-8", "replace").split(",")


def merge_counts(parts) -> dict[str, int]:
    """The sum of several count dicts."""
    total: dict[str, int] = {}
    for part in parts:
        add_counts(total, part)
    return total


def add_counts(total: dict[str, int], part: dict[str, int]) -> None:
    """Add the counts of ``part`` into ``total`` (so that parts need not be held until the end)."""
    for tag, n in part.items():
        total[tag] = total.get(tag, 0) + n


def write_tag_counts(root, counts: dict[str, int], fingerprint: str) -> None:
    """Write ``tag_counts.parquet`` (atomically) for the dataset ``fingerprint``."""
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    table = pa.table({"tag": [t for t, _ in ordered], "count": [n for _, n in ordered]}, schema=SCHEMA)
    meta = json.dumps({"fingerprint": fingerprint, "tags": len(ordered)}).encode()
    write_parquet(Path(root) / TAG_COUNTS_FILE, table.replace_schema_metadata({"hakubooru": meta}))


def read_tag_counts(root, fingerprint: str) -> dict[str, int] | None:
    """The stored counts of the dataset ``fingerprint`` (most frequent first), or None when the
    file is missing, unreadable or of another build."""
    path = Path(root) / TAG_COUNTS_FILE
    try:
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {}).get(b"hakubooru", b"{}"))
    except (OSError, pa.ArrowException, ValueError):
        return None
    if meta.get("fingerprint") != fingerprint or table.schema.names != SCHEMA.names:
        return None
    return dict(zip(table.column("tag").to_pylist(), table.column("count").to_pylist()))


def ensure_tag_counts(root, fingerprint: str, *, workers: int = 4, progress: bool = True) -> dict[str, int]:
    """The folder's tag counts: read from ``tag_counts.parquet``, or counted from the records
    (``workers`` processes, at most one per core; shard by shard, each read front to back) and
    stored for next time. A folder that cannot be written to gets one line saying the counts are
    not kept."""
    root = Path(root)
    counts = read_tag_counts(root, fingerprint)
    if counts is not None:
        return counts
    tasks = _shard_tasks(root)
    workers = min(workers, os.cpu_count() or 1)  # more processes than cores only add merging
    print(f"counting the tags of {root} once ({sum(len(t[1]) for t in tasks):,} samples in {len(tasks)} "
          f"shards; stored in {TAG_COUNTS_FILE} for next time)", file=sys.stderr)
    bar = tqdm(total=sum(len(t[1]) for t in tasks), desc="counting tags", unit="sample", disable=not progress)
    counts: dict[str, int] = {}
    try:
        for part, n in ordered_map(_count_shard, tasks, workers, chunksize=4):
            add_counts(counts, part)
            bar.update(n)
    finally:
        bar.close()
    try:
        write_tag_counts(root, counts, fingerprint)
    except OSError as e:
        print(f"warning: cannot store {root / TAG_COUNTS_FILE} ({e.strerror or e}); the tags are counted "
              f"again at the next start", file=sys.stderr)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _shard_tasks(root: Path) -> list[tuple]:
    """Per shard: (path, ids, json spans, txt spans), rows in file order."""
    path = root / INDEX_FILE
    try:
        names = set(pq.read_schema(path).names)
        columns = ["id", "shard", "json_offset", "json_size"] + [c for c in ("txt_offset", "txt_size") if c in names]
        table = pq.read_table(path, columns=columns, read_dictionary=["shard"])
    except (OSError, pa.ArrowException) as e:
        raise HakubooruError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    shard = table.column("shard").combine_chunks()
    shard_names = [str(s) for s in shard.dictionary.to_pylist()]
    codes = shard.indices.to_numpy()
    col = {c: table.column(c).to_numpy() for c in columns if c != "shard"}
    if "txt_offset" not in col:
        col["txt_offset"] = col["txt_size"] = np.full(len(codes), -1, dtype=np.int64)
    return [(str(root / shard_names[codes[rows[0]]]), col["id"][rows],
             np.stack([col["json_offset"][rows], col["json_size"][rows]], 1),
             np.stack([col["txt_offset"][rows], col["txt_size"][rows]], 1))
            for rows in shard_runs(codes, col["json_offset"])]


def _count_shard(task) -> tuple[dict[str, int], int]:
    path, ids, json_spans, txt_spans = task
    counts: dict[str, int] = {}
    try:
        with open(path, "rb") as f:
            def read(offset, size):
                if size < 0:
                    return None
                f.seek(offset)
                return f.read(size)

            for post_id, (jo, js), (to, ts) in zip(ids, json_spans, txt_spans):
                tags = json_tags(read(jo, js), f"post {post_id} in {Path(path).name}")
                if tags is None and ts >= 0:
                    tags = caption_tags(read(to, ts))
                add_tags(counts, tags or ())
    except OSError as e:
        raise HakubooruError(f"cannot read {path}: {e.strerror or e}") from None
    return counts, len(ids)
