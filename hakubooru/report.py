"""The numbers of a dataset report on a built shard folder (see docs/report.md).

Reads ``manifest.json``, ``index.parquet``, ``skipped.parquet``, ``tag_counts.parquet`` and
every sample's ``.json`` record (one positioned read each, at the offset the index gives); never
an image. The general tags are not counted again: their counts are the build's tag counts less
the other groups' tags, which are few (a folder without stored counts counts them too). The
training-bucket section is the trainer's to add (``python -m trainers.lokr report --dataset``,
docs/architecture.md): this library never imports its trainer.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from .captioner import CAPTION_GROUPS
from .errors import HakubooruError
from .manifest import INDEX_FILE, MANIFEST_FILE, SKIPPED_FILE
from .shardfolder import shard_runs
from .tagcounts import add_tags, read_tag_counts
from .db import RATINGS
from .quality import LOWEST_QUALITY, QUALITY_LEVELS
from .tagrules import PEOPLE_COUNT_TAGS, TAG_GROUPS, YEAR_TAGS, format_tag

TOP_TAGS = 50
THRESHOLDS = (1000, 100)  # model card: ≥ 1000 posts "should work", ≥ 100 "may work with emphasis"
WINDOW = 75               # CLIP tokens per window (SDXL: BOS + 75 + EOS)
SEPARATOR = ", "          # the trainer rebuilds captions from the record with this separator
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


class _TokenLengths:
    """CLIP token counts of captions, from per-tag counts: CLIP's pre-tokenizer splits at
    whitespace, so ``"a, b"`` tokenizes as ``"a,"`` then ``"b"`` and a caption's tokens are
    its tags' tokens (each with its separating comma, the last without), in order.

    ``frozen``: the tags learnt so far are the folder's stored tag counts; a caption with any
    other tag is reported as not ``clean`` (its tags are learnt apart, never mixed in)."""

    def __init__(self, with_comma: dict | None = None, alone: dict | None = None, frozen: bool = False):
        self._tok = None
        self.with_comma: dict[str, int] = {} if with_comma is None else with_comma
        self.alone: dict[str, int] = {} if alone is None else alone
        self.frozen = frozen
        self._new = (self.with_comma, self.alone) if not frozen else ({}, {})

    def _tokenizer(self):
        if self._tok is None:
            try:
                from .clip_tokenizer import sdxl_tokenizer
                self._tok = sdxl_tokenizer(1).backend_tokenizer
            except ImportError:
                raise HakubooruError("caption token lengths need transformers (the train extra): "
                                     "pip install 'hakubooru[train]'") from None
            self._tok.no_truncation()
            self._tok.no_padding()
        return self._tok

    def learn(self, tags) -> None:
        """Tokenize the tags not known yet (in one batch). A tag ending in a letter or digit
        is followed by the comma as a pre-token of its own (one more token); one ending in
        punctuation may merge with it (``"),"``), so that form is tokenized too."""
        with_comma, alone = self._new
        new = [t for t in set(tags) if t not in self.alone and t not in alone]
        if not new:
            return
        tok = self._tokenizer()
        for tag, enc in zip(new, tok.encode_batch(new, add_special_tokens=False)):
            alone[tag] = len(enc.ids)
        odd = []
        for tag in new:
            if tag[-1:].isalnum():
                with_comma[tag] = alone[tag] + 1
            else:
                odd.append(tag)
        comma = SEPARATOR.strip()
        for tag, enc in zip(odd, tok.encode_batch([t + comma for t in odd], add_special_tokens=False)):
            with_comma[tag] = len(enc.ids)

    def lengths(self, groups: list[list[str]], per: int) -> tuple[np.ndarray, bool]:
        """Tokens of each caption ``", ".join(tags)``, the captions given as their groups' tag
        lists (``per`` consecutive lists a caption, in caption order), and whether every tag
        was known before (else the new ones are tokenized first, in one batch)."""
        sizes = np.array(list(map(len, groups)), dtype=np.int64).reshape(-1, per).sum(axis=1)
        flat = list(chain.from_iterable(groups))
        try:
            return _caption_lengths(flat, sizes, self.with_comma, self.alone), True
        except KeyError:
            pass
        self.learn(flat)
        if not self.frozen:
            return _caption_lengths(flat, sizes, self.with_comma, self.alone), False
        with_comma, alone = self._new
        local = set(flat)
        return _caption_lengths(flat, sizes, {t: self.with_comma.get(t) or with_comma[t] for t in local},
                                {t: self.alone.get(t) or alone[t] for t in local}), False

    def ends(self, tags: list[str]) -> list[int]:
        """For each tag, the caption's tokens up to the end of its own text (its comma left out)."""
        out, before = [], 0
        for t in tags:
            alone = self.alone[t] if t in self.alone else self._new[1][t]
            out.append(before + alone)
            before += self.with_comma[t] if t in self.with_comma else self._new[0][t]
        return out


def _caption_lengths(flat: list[str], sizes: np.ndarray, with_comma: dict, alone: dict) -> np.ndarray:
    """Per caption (``sizes`` consecutive tags of ``flat`` each): its tags' tokens with their
    commas, the last one's without."""
    tokens = np.array(list(map(with_comma.__getitem__, flat)), dtype=np.int64)  # fromiter: twice as slow
    ends = np.cumsum(sizes)
    running = np.concatenate(([0], np.cumsum(tokens)))
    out = running[ends] - running[ends - sizes]
    last = (ends - 1)[sizes > 0]
    out[sizes > 0] += np.array([alone[flat[i]] for i in last.tolist()], dtype=np.int64) - tokens[last]
    return out


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
    known = None
    if totals is not None:  # every tag tokenized once, here, not in each worker
        tokens = _TokenLengths()
        tokens.learn(totals)
        known = (tokens.with_comma, tokens.alone)

    shard = table.column("shard").combine_chunks()
    names = [str(n) for n in shard.dictionary.to_pylist()]
    codes = shard.indices.to_numpy()
    offsets = table.column("json_offset").to_numpy()
    sizes = table.column("json_size").to_numpy()
    ids = table.column("id").to_numpy()
    tasks = [(str(root / names[codes[rows[0]]]), offsets[rows], sizes[rows], ids[rows])
             for rows in shard_runs(codes, offsets)]
    per_task = -(-len(tasks) // (workers * _TASKS_PER_WORKER))  # few merges, a bar that still moves
    chunks = [tasks[i:i + per_task] for i in range(0, len(tasks), per_task)]
    stats = _Accumulator(tag_types, max_windows, derive=known is not None)
    bar = tqdm(total=table.num_rows, unit="rec", disable=not progress, desc="records")
    if workers == 1 or len(chunks) == 1:
        _init_worker(tag_types, max_windows, known)
        parts = map(_scan, chunks)
        pool = None
    else:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(min(workers, len(chunks)), _init_worker,
                                                         (tag_types, max_windows, known))
        parts = pool.imap(_scan, chunks)  # in order: the merged counts do not depend on it anyway
    try:
        for part in parts:
            stats.merge(part)
            bar.update(part.samples)
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    if totals is not None:
        stats.derive_general(totals)

    width = table.column("width").to_numpy().astype(np.int64)
    height = table.column("height").to_numpy().astype(np.int64)
    out = {
        "folder": str(root), "samples": table.num_rows, "shards": len(tasks),
        **stats.result(),
        "images": _image_stats(width, height),
        "skipped": _skipped(root, manifest),
        "provenance": _provenance(manifest),
        "tag_categories": "database" if tag_types is not None else "record",
    }
    return out


_TASKS_PER_WORKER = 8
_WORKER: dict = {}


def _init_worker(tag_types, max_windows: int, known) -> None:
    tokens = _TokenLengths(*known, frozen=True) if known is not None else _TokenLengths()
    _WORKER.update(tag_types=tag_types, max_windows=max_windows, tokens=tokens, derive=known is not None)


def _scan(tasks) -> "_Accumulator":
    """The counts of some shards' records (in a worker process, or in this one)."""
    acc = _Accumulator(_WORKER["tag_types"], _WORKER["max_windows"], _WORKER["derive"])
    for path, offsets, sizes, ids in tasks:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise HakubooruError(f"{path} is named in {INDEX_FILE} but missing") from None
        try:
            records = []
            for offset, size, post_id in zip(offsets.tolist(), sizes.tolist(), ids.tolist()):
                try:
                    records.append(json.loads(os.pread(fd, size, offset).decode()))
                except (ValueError, UnicodeDecodeError):
                    raise HakubooruError(f"post {post_id} in {path}: its .json record is not "
                                         "valid JSON; rebuild the shard") from None
        finally:
            os.close(fd)
        acc.add(records, path, _WORKER["tokens"])
    acc.tag_types = None  # not sent back
    return acc


def _is_caption_record(rec) -> bool:
    return isinstance(rec, dict) and "rating" in rec and all(isinstance(rec.get(g), list) for g in CAPTION_GROUPS)


class _Accumulator:
    """Counts over the records, shard by shard. ``derive``: the general tags are not counted
    but derived at the end from the folder's stored tag counts, less ``counted`` (the other
    groups' tags; every tag of a caption with a tag the stored counts lack, normalized as they
    are, while its general tags are counted)."""

    def __init__(self, tag_types, max_windows: int, derive: bool = False):
        self.tag_types = tag_types
        self.limit = WINDOW * max_windows
        self.max_windows = max_windows
        self.derive = derive
        self.counted: dict[str, int] = Counter()
        self.rating, self.year, self.quality = Counter(), Counter(), Counter()
        cats = TAG_GROUPS + ("unknown",) if tag_types is not None else ("people", _KEEP_REST, "general", "meta")
        self.tags = {c: Counter() for c in cats}
        self.lengths = np.zeros(0, dtype=np.int64)  # samples per caption length
        self.samples = 0
        self.cut_captions = 0
        self.cut_tokens = 0
        self.cut_tags = Counter()  # group -> tags whose text reaches past the limit

    def merge(self, other: "_Accumulator") -> None:
        """Add another accumulator's counts to these."""
        for mine, theirs in ((self.rating, other.rating), (self.year, other.year), (self.quality, other.quality),
                             (self.cut_tags, other.cut_tags), (self.counted, other.counted)):
            mine.update(theirs)
        for cat, counter in other.tags.items():
            self.tags[cat].update(counter)
        n = max(len(self.lengths), len(other.lengths))
        self.lengths = np.pad(self.lengths, (0, n - len(self.lengths))) + np.pad(other.lengths, (0, n - len(other.lengths)))
        self.samples += other.samples
        self.cut_captions += other.cut_captions
        self.cut_tokens += other.cut_tokens

    def derive_general(self, totals: dict[str, int]) -> None:
        """Add the general tags' counts: the stored counts of every tag less ``counted``."""
        counted = self.counted
        self.tags["general"].update({t: n - counted[t] for t, n in totals.items() if n > counted.get(t, 0)})

    def add(self, records: list[dict], where: str, tokens: _TokenLengths) -> None:
        try:
            groups = [rec[g] for rec in records for g in CAPTION_GROUPS]
            lengths, clean = tokens.lengths(groups, len(CAPTION_GROUPS))
            self.rating.update([rec["rating"] or "unknown" for rec in records])
            self.year.update([rec["year"][0] if rec["year"] else "none" for rec in records])
            self.quality.update([rec["quality"][0] if rec["quality"] else "none" for rec in records])
        except (KeyError, TypeError, IndexError, ValueError):
            bad = next((r for r in records if not _is_caption_record(r)), None)
            raise HakubooruError(f"post {bad.get('id', '?') if isinstance(bad, dict) else '?'} in "
                                 f"{where}: its .json record lacks the caption groups "
                                 f"({', '.join(CAPTION_GROUPS)})") from None
        tags_of = self.tags
        keep = Counter(chain.from_iterable(rec["keep"] for rec in records))
        meta = Counter(chain.from_iterable(rec["meta"] for rec in records))
        tags_of["meta"].update(meta)
        if self.derive and clean:  # every tag is one of the stored counts' (stripped, lower-case)
            self.counted.update(keep)
            self.counted.update(meta)
            self.counted.update(chain.from_iterable(rec[g] for rec in records for g in ("quality", "year", "rating_tags")))
        else:
            tags_of["general"].update(chain.from_iterable(rec["general"] for rec in records))
            if self.derive:
                add_tags(self.counted, chain.from_iterable(groups))
        for t, n in keep.items():
            if t in _PEOPLE:
                kind = "people"
            elif self.tag_types is None:
                kind = _KEEP_REST
            else:
                kind = self.tag_types.get(t, "unknown")
            tags_of.get(kind, tags_of.get("unknown"))[t] += n
        self.samples += len(lengths)
        found = np.bincount(lengths, minlength=len(self.lengths))
        self.lengths = np.pad(self.lengths, (0, len(found) - len(self.lengths))) + found
        for i in np.flatnonzero(lengths > self.limit).tolist():
            rec, n = records[i], int(lengths[i])
            self.cut_captions += 1
            self.cut_tokens += n - self.limit
            groups_of = [g for g in CAPTION_GROUPS for _ in rec[g]]
            caption = [t for g in CAPTION_GROUPS for t in rec[g]]
            # a tag is cut when its own text (not just its comma) reaches past the limit
            self.cut_tags.update(g for g, end in zip(groups_of, tokens.ends(caption)) if end > self.limit)

    def result(self) -> dict:
        lengths = np.repeat(np.arange(len(self.lengths)), self.lengths)
        tags = {}
        for cat, counter in self.tags.items():
            counts = np.fromiter(counter.values(), dtype=np.int64, count=len(counter))
            tags[cat] = {"distinct": len(counter), "occurrences": int(counts.sum()),
                         **{f"at_least_{t}": int((counts >= t).sum()) for t in THRESHOLDS},
                         "top": [[t, c] for t, c in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_TAGS]]}
        all_counts = Counter()
        for counter in self.tags.values():
            all_counts.update(counter)
        counts = np.fromiter(all_counts.values(), dtype=np.int64, count=len(all_counts))
        return {
            "rating": _in_order(self.rating, RATINGS + ("unknown",)),
            "year": _in_order(self.year, tuple(tag for _, tag in YEAR_TAGS) + ("none",)),
            "quality": _in_order(self.quality, tuple(t for _, t in QUALITY_LEVELS) + (LOWEST_QUALITY, "none")),
            "tags": tags,
            "tags_all": {"distinct": len(all_counts),
                         **{f"at_least_{t}": int((counts >= t).sum()) for t in THRESHOLDS}},
            "tokens": {
                "max_windows": self.max_windows, "limit": self.limit,
                "over": {str(k * WINDOW): int((lengths > k * WINDOW).sum()) for k in (1, 2, 3)},
                "percentiles": {str(p): float(np.percentile(lengths, p)) for p in (50, 90, 99, 100)},
                "mean": float(lengths.mean()), "cut_captions": self.cut_captions,
                "cut_tokens": self.cut_tokens,
                "cut_tags": {g: self.cut_tags.get(g, 0) for g in CAPTION_GROUPS},
                "histogram": self.lengths.tolist(),
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
