"""The numbers of a dataset report on a built shard folder (see docs/report.md).

Reads ``manifest.json``, ``index.parquet``, ``skipped.parquet``, ``tag_counts.parquet`` and
every sample's ``.json`` record (one positioned read each, at the offset the index gives, parsed
and counted column by column in :mod:`hakubooru.report_scan`); never an image. The general tags
are not counted again: their counts are the build's tag counts less the other groups' tags,
which are few (a folder without stored counts counts them too). The training-bucket section is
the trainer's to add (``python -m trainers.lokr report --dataset``, docs/architecture.md): this
library never imports its trainer.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from .captioner import CAPTION_GROUPS
from .errors import HakubooruError
from .manifest import INDEX_FILE, MANIFEST_FILE, SKIPPED_FILE
from .procs import worker_pool
from .report_scan import RecordCounts, init_worker, scan, tokenize
from .shardfolder import shard_runs
from .tagcounts import read_tag_counts
from .db import RATINGS
from .quality import LOWEST_QUALITY, QUALITY_LEVELS
from .tagrules import PEOPLE_COUNT_TAGS, TAG_GROUPS, YEAR_TAGS, format_tag

TOP_TAGS = 50
THRESHOLDS = (1000, 100)  # model card: ≥ 1000 posts "should work", ≥ 100 "may work with emphasis"
WINDOW = 75               # CLIP tokens per window (SDXL: BOS + 75 + EOS)
_KEEP_REST = "character/copyright/artist"
_PEOPLE = frozenset(format_tag(t) for t in PEOPLE_COUNT_TAGS)


def load_tag_types(db) -> dict[str, str]:
    """Formatted tag name -> tag group (character, copyright, artist, ...) from the database's
    tag table, to split the record's ``keep`` list by category."""
    from .db import Tag, open_db

    if not hasattr(db, "execute_sql"):
        db = open_db(db)
    types = {}
    for name, kind in Tag.select(Tag.name, Tag.type).tuples().iterator():
        types.setdefault(format_tag(name), kind)
    return types


def _read_json_file(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise HakubooruError(f"cannot read {path}: {e}") from None


def _read_index(root: Path) -> pa.Table:
    path = root / INDEX_FILE
    if not root.is_dir():
        raise HakubooruError(f"shard folder {root} does not exist")
    if not path.is_file():
        raise HakubooruError(f"{root} has no {INDEX_FILE}: is it a shard folder written by "
                             "`python -m hakubooru build`?")
    try:
        return pq.read_table(path, columns=["id", "shard", "json_offset", "json_size", "width",
                                            "height"], read_dictionary=["shard"])
    except (pa.ArrowException, OSError) as e:
        raise HakubooruError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def collect(shards_dir, *, max_windows: int = 3, db=None, workers: int = 1,
            progress: bool = True) -> dict:
    """The report's numbers for a shard folder, as a JSON-able dict. ``max_windows``: the
    training's caption windows of 75 tokens (captions past them are counted as cut);
    ``db``: the database (path or handle) to split the keep tags into character, copyright
    and artist; ``workers``: processes reading the records (the result does not depend on it)."""
    root = Path(shards_dir)
    if workers < 1:
        raise HakubooruError(f"--workers must be ≥ 1, got {workers}")
    table = _read_index(root)
    if table.num_rows == 0:
        raise HakubooruError(f"{root / INDEX_FILE} has no samples")
    manifest = _read_json_file(root / MANIFEST_FILE) or {}
    tag_types = load_tag_types(db) if db is not None else None
    totals = read_tag_counts(root, manifest["fingerprint"]) if manifest.get("fingerprint") else None
    stored = list(totals or ())  # every stored tag tokenized once, not once in each worker

    shard = table.column("shard").combine_chunks()
    names = [str(n) for n in shard.dictionary.to_pylist()]
    codes = shard.indices.to_numpy()
    offsets = table.column("json_offset").to_numpy()
    sizes = table.column("json_size").to_numpy()
    ids = table.column("id").to_numpy()
    tasks = [(str(root / names[codes[rows[0]]]), offsets[rows], sizes[rows], ids[rows])
             for rows in shard_runs(codes, offsets)]
    counts = _scan_all(tasks, stored, max_windows, totals is not None, workers, progress)
    tags = _tag_counters(counts, stored, tag_types, totals)

    width = table.column("width").to_numpy().astype(np.int64)
    height = table.column("height").to_numpy().astype(np.int64)
    out = {
        "folder": str(root), "samples": table.num_rows, "shards": len(tasks),
        **_numbers(counts, tags, max_windows),
        "images": _image_stats(width, height),
        "skipped": _skipped(root, manifest),
        "provenance": _provenance(manifest),
        "tag_categories": "database" if tag_types is not None else "record",
    }
    return out


_TASKS_PER_WORKER = 8


def _scan_all(tasks: list, stored: list[str], max_windows: int, derive: bool, workers: int,
              progress: bool) -> RecordCounts:
    """The counts of every shard run, in ``workers`` processes (spawned) or in this one; the
    stored tags are tokenized once, split among the same processes."""
    per_task = -(-len(tasks) // (workers * _TASKS_PER_WORKER))  # few merges, a bar that still moves
    chunks = [tasks[i:i + per_task] for i in range(0, len(tasks), per_task)]
    total = RecordCounts(WINDOW * max_windows, derive, len(stored))
    setup = (stored, WINDOW * max_windows, derive)
    if workers == 1 or len(chunks) == 1:
        init_worker(*setup, threads=True)
        tokens = tokenize(stored)
        pool, parts = None, map(scan, [(chunk, tokens) for chunk in chunks])
    else:
        pool = worker_pool(min(workers, len(chunks)), init_worker, setup, method="spawn")
    bar = tqdm(total=sum(len(t[2]) for t in tasks), unit="rec", disable=not progress, desc="records")
    try:
        if pool is not None:
            step = -(-len(stored) // (workers * 4)) or 1
            tokens = tuple(map(np.concatenate, zip(*pool.map(tokenize, [stored[i:i + step] for i in
                                                                       range(0, len(stored), step)] or [[]]))))
            parts = pool.imap(scan, [(chunk, tokens) for chunk in chunks])  # in order (the sums do not depend on it)
        for part in parts:
            total.merge(part)
            bar.update(part.samples)
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    return total


def _tag_counters(counts: RecordCounts, names: list[str], tag_types, totals) -> dict[str, Counter]:
    """Tag group -> Counter of its tags: the keep tags split into people and (by ``tag_types``,
    else together) character, copyright and artist; the general tags counted, plus (with the
    stored counts ``totals``, in the order of ``names``) the stored counts less ``counted``."""
    cats = TAG_GROUPS + ("unknown",) if tag_types is not None else ("people", _KEEP_REST, "general", "meta")
    tags = {c: Counter() for c in cats}
    tags["meta"].update(counts.named("meta", names))
    tags["general"].update(counts.named("general", names))
    if totals is not None:
        stored = np.fromiter(totals.values(), dtype=np.int64, count=len(totals))
        left = stored - np.pad(counts.counted, (0, len(stored) - len(counts.counted)))
        more = np.flatnonzero(left > 0)
        tags["general"].update(dict(zip(map(names.__getitem__, more.tolist()), left[more].tolist())))
    for t, n in counts.named("keep", names).items():
        if t in _PEOPLE:
            kind = "people"
        elif tag_types is None:
            kind = _KEEP_REST
        else:
            kind = tag_types.get(t, "unknown")
        tags.get(kind, tags.get("unknown"))[t] += n
    return tags


def _numbers(counts: RecordCounts, tags: dict[str, Counter], max_windows: int) -> dict:
    """The report's record sections: ratings, years, quality, tag tables and caption tokens."""
    lengths = np.repeat(np.arange(len(counts.lengths)), counts.lengths)
    tables = {}
    for cat, counter in tags.items():
        found = np.fromiter(counter.values(), dtype=np.int64, count=len(counter))
        tables[cat] = {"distinct": len(counter), "occurrences": int(found.sum()),
                       **{f"at_least_{t}": int((found >= t).sum()) for t in THRESHOLDS},
                       "top": [[t, c] for t, c in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_TAGS]]}
    all_counts = Counter()
    for counter in tags.values():
        all_counts.update(counter)
    found = np.fromiter(all_counts.values(), dtype=np.int64, count=len(all_counts))
    limit = WINDOW * max_windows
    return {
        "rating": _in_order(counts.rating, RATINGS + ("unknown",)),
        "year": _in_order(counts.year, tuple(tag for _, tag in YEAR_TAGS) + ("none",)),
        "quality": _in_order(counts.quality, tuple(t for _, t in QUALITY_LEVELS) + (LOWEST_QUALITY, "none")),
        "tags": tables,
        "tags_all": {"distinct": len(all_counts),
                     **{f"at_least_{t}": int((found >= t).sum()) for t in THRESHOLDS}},
        "tokens": {
            "max_windows": max_windows, "limit": limit,
            "over": {str(k * WINDOW): int((lengths > k * WINDOW).sum()) for k in (1, 2, 3)},
            "percentiles": {str(p): float(np.percentile(lengths, p)) for p in (50, 90, 99, 100)},
            "mean": float(lengths.mean()), "cut_captions": counts.cut_captions,
            "cut_tokens": counts.cut_tokens,
            "cut_tags": {g: counts.cut_tags.get(g, 0) for g in CAPTION_GROUPS},
            "histogram": counts.lengths.tolist(),
        },
    }


def _in_order(counter: Counter, order) -> list:
    """[[key, count]] in the given order (keys not in it last, by count); absent keys left out."""
    rank = {k: i for i, k in enumerate(order)}
    return [[k, v] for k, v in sorted(counter.items(), key=lambda kv: (rank.get(kv[0], len(rank)), -kv[1], str(kv[0])))]


def _sorted(counter: Counter) -> list:
    return [[k, v] for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))]


ASPECT_EDGES = (0.0, 0.5, 0.67, 0.8, 0.95, 1.05, 1.25, 1.5, 2.0, float("inf"))


def _image_stats(width: np.ndarray, height: np.ndarray) -> dict:
    pixels = width * height
    aspect = width / height
    bins = np.digitize(aspect, ASPECT_EDGES[1:-1], right=False)
    labels = [f"{a:g}–{b:g}" if b != float("inf") else f"≥ {a:g}" for a, b in
              zip(ASPECT_EDGES[:-1], ASPECT_EDGES[1:])]
    labels[0] = f"< {ASPECT_EDGES[1]:g}"
    counts = np.bincount(bins, minlength=len(labels)).tolist()
    return {
        "megapixels": {str(p): float(np.percentile(pixels, p)) / 1e6 for p in (0, 10, 50, 90, 100)},
        "width": {str(p): float(np.percentile(width, p)) for p in (0, 50, 100)},
        "height": {str(p): float(np.percentile(height, p)) for p in (0, 50, 100)},
        "aspect_bins": [[label, c] for label, c in zip(labels, counts)],
        "landscape": int((width > height).sum()), "portrait": int((width < height).sum()),
        "square": int((width == height).sum()),
        "_pixels": pixels, "_aspect": aspect,  # for the charts; not JSON
    }


def _skipped(root: Path, manifest: dict) -> dict:
    counts = manifest.get("counts", {})
    by_reason = dict(counts.get("skipped_by_reason", {}))
    path = root / SKIPPED_FILE
    if not by_reason and path.is_file():
        reasons = pq.read_table(path, columns=["reason"]).column("reason").to_pylist()
        by_reason = dict(Counter(reasons))
    return {"selected": counts.get("selected"), "written": counts.get("written"),
            "by_reason": _sorted(Counter(by_reason))}


def _provenance(manifest: dict) -> dict:
    selection = manifest.get("selection", {})
    return {
        "format": manifest.get("format"), "fingerprint": manifest.get("fingerprint"),
        "db_fingerprint": manifest.get("db_fingerprint"),
        "selection_expression": selection.get("expression"), "selection_seeds": selection.get("seeds"),
        "selection_count": selection.get("count"), "selection_sha256": selection.get("sha256"),
        "captioner": manifest.get("captioner"), "image_policy": manifest.get("image_policy"),
        "shard_size": manifest.get("shard_size"), "shard_count": manifest.get("shard_count"),
    }
