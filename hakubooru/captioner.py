"""Captioner: post ids -> Kohaku XL caption text + structured record, in bulk.

Work is split so that nothing is done per post that could be done once:

* at start, the whole tag table is read once; every tag is grouped, filtered,
  formatted and ranked (TagRules), giving a lookup table tag id -> rank, where
  ranks run group by group in caption order;
* per chunk of sorted ids, one query fetches the post rows and one the post–tag
  pairs (``group_concat`` per post, parsed by NumPy); the pairs are mapped to
  ranks and sorted by (post, rank) in NumPy, so each post's groups are slices;
* quality levels come from vectorised thresholds; only the final assembly of
  each record and caption string is a Python loop.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from .db import IDS_SUBQUERY, RATINGS, TAG_TYPES, ids_param, open_db
from .errors import HakubooruError
from .quality import NO_QUALITY_ABOVE_ID, QualityThresholds
from .tagrules import RATING_TAGS, TAG_GROUPS, TagRules, year_tag_table
from .tagrules import escape_parentheses as _escape

# Parts of a record, in the order the caption text joins them by default.
CAPTION_GROUPS = ("keep", "general", "quality", "year", "meta", "rating_tags")
TAG_LISTS = ("keep", "general", "meta")  # the record lists filled from the post's tags
CHUNK_SIZE = 20_000
_DENSE_SPAN = 4  # a chunk whose id span is at most this many times its size is read as one range
_MISSING, _DROPPED = -1, -2  # rank-table values for unknown tag ids and filtered-out tags
_MAX_TAG_ID = 50_000_000  # bound on the rank table's size (4 bytes per id; Danbooru's are < 3M)

# A tag source adds tags from elsewhere: called once per chunk with the chunk's post ids,
# it returns {post_id: {"keep" | "general" | "meta": [formatted tags]}} for the posts it knows.
TagSource = Callable[[np.ndarray], Mapping[int, Mapping[str, Sequence[str]]]]


class Captioner:
    """The Kohaku XL epsilon captioner (recipe.md §2).

    ``db``: an ``open_db()`` handle or a path. ``quality``: None (percentiles computed from
    ``db``), a QualityThresholds, or a table ``{rating: {percentile: threshold}}``.
    ``separator`` joins tags inside a group, ``group_separator`` (default: ``separator``)
    joins groups; ``escape_parentheses`` escapes ``(`` ``)`` in the text for sd-webui;
    ``groups`` lists the record parts the caption shows, in order (parts left out are also
    emptied in the record, so a trainer rebuilding captions agrees with the text).
    ``keep_separator`` (e.g. ``"|||"``, sd-scripts' ``--keep_tokens_separator``) is written
    after the keep group and after the general tags (``groups`` then begin with keep, general):
    ``keep SEP general SEP quality, year, meta, rating``, the card's augmentation for sd-scripts. ``underscores``:
    ``"spaces"`` (default rule) or ``"keep"`` (danbooru names as they are); None: the rules'.
    Posts with id > ``no_quality_above_id`` (None: no limit) get no quality tag and are not
    in the computed statistics. ``rules`` changes tag rules, ``sources`` adds tag sources.
    ``stats`` counts what was captioned, skipped or missing.
    """

    rating_tags = RATING_TAGS

    def __init__(
        self,
        db,
        quality=None,
        separator: str = ", ",
        group_separator: str | None = None,
        escape_parentheses: bool = False,
        groups: Sequence[str] = CAPTION_GROUPS,
        keep_separator: str | None = None,
        underscores: str | None = None,
        no_quality_above_id: int | None = NO_QUALITY_ABOVE_ID,
        rules: TagRules | None = None,
        sources: Sequence[TagSource] = (),
        chunk_size: int = CHUNK_SIZE,
    ):
        self.db = open_db(db) if isinstance(db, (str, bytes)) or hasattr(db, "__fspath__") else db
        self.separator = _check_str("separator", separator)
        self.group_separator = _check_str("group_separator", separator if group_separator is None else group_separator)
        self.escape_parentheses = bool(escape_parentheses)
        self.groups = _check_groups(groups)
        self.keep_separator = None if keep_separator is None else _check_str("keep_separator", keep_separator)
        if self.keep_separator is not None and (not self.keep_separator.strip()
                                                or self.groups[:2] != ("keep", "general")):
            raise HakubooruError("keep_separator needs groups to begin with keep, general and a "
                                 f"visible separator; got {self.keep_separator!r}, groups {list(self.groups)}")
        self._omitted = tuple(g for g in CAPTION_GROUPS if g not in self.groups)
        # the default layout is one join over all parts, done directly (the bulk path's hot spot)
        default_layout = (self.groups == CAPTION_GROUPS and self.group_separator == self.separator
                          and not self.escape_parentheses and self.keep_separator is None
                          and type(self).text is Captioner.text)
        self._text = self._join_all if default_layout else self.text
        self.no_quality_above_id = None if no_quality_above_id is None else int(no_quality_above_id)
        if isinstance(quality, QualityThresholds):
            self.quality = quality
        elif quality is None:
            self.quality = QualityThresholds.from_db(self.db, self.no_quality_above_id)
        else:
            self.quality = QualityThresholds(quality)
        self.rules = rules if rules is not None else TagRules(underscores or "spaces")
        if underscores is not None and getattr(self.rules, "underscores", None) != underscores:
            if rules is not None:
                raise HakubooruError("pass underscores= to your TagRules, not to the Captioner")
        self.sources = tuple(sources)
        if int(chunk_size) < 1:
            raise HakubooruError(f"chunk_size must be at least 1, got {chunk_size}")
        self.chunk_size = int(chunk_size)
        self.stats: Counter = Counter()
        self._years = year_tag_table()
        self._load_tags()

    # ----- public API -------------------------------------------------------------------

    def captions(self, ids: Iterable[int], progress: bool = False) -> Iterator[tuple[int, str, dict]]:
        """``(post_id, caption, record)`` for every post among ``ids``, in id order.

        Duplicate ids are captioned once; ids with no post row are skipped and counted
        in ``stats["missing_post"]``.
        """
        try:
            ids = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).ravel()
        except (TypeError, ValueError, OverflowError):
            raise HakubooruError("post ids must be integers") from None
        unique = np.unique(ids)
        self.stats["duplicate_id"] += len(ids) - len(unique)
        with tqdm(total=len(unique), unit="post", desc="caption", disable=not progress) as bar:
            for start in range(0, len(unique), self.chunk_size):
                chunk = unique[start:start + self.chunk_size]
                yield from self._caption_chunk(chunk)
                bar.update(len(chunk))

    def caption(self, post_id: int) -> str:
        """The caption text (the ``.txt``) of one post."""
        return self._one(post_id)[1]

    def record(self, post_id: int) -> dict:
        """The structured record (the ``.json``) of one post."""
        return self._one(post_id)[2]

    def text(self, record: dict) -> str:
        """The caption text of a record: the chosen groups' tags, joined and escaped."""
        return caption_text(record, **self.style())

    def style(self) -> dict:
        """The options of caption_text() this captioner writes its text with."""
        return {"groups": self.groups, "separator": self.separator,
                "group_separator": self.group_separator,
                "escape_parentheses": self.escape_parentheses,
                "keep_separator": self.keep_separator}

    def _join_all(self, record: dict) -> str:
        return self.separator.join(record["keep"] + record["general"] + record["quality"] + record["year"]
                                   + record["meta"] + record["rating_tags"])

    def year_tag(self, created_at) -> str | None:
        """The year tag from the first 4 characters of created_at (the year as written,
        in the timestamp's own UTC offset); None when they are not a year."""
        return self._years.get(created_at[:4]) if isinstance(created_at, str) else None

    def settings(self) -> dict:
        """The options that determine the output, as JSON-able data (for manifests)."""
        return {
            "captioner": f"{type(self).__module__}.{type(self).__qualname__}",
            "rules": f"{type(self.rules).__module__}.{type(self.rules).__qualname__}",
            "separator": self.separator,
            "group_separator": self.group_separator,
            "escape_parentheses": self.escape_parentheses,
            "groups": list(self.groups),
            "keep_separator": self.keep_separator,
            "underscores": getattr(self.rules, "underscores", None),
            "no_quality_above_id": self.no_quality_above_id,
            "quality": self.quality.to_dict(),
            "sources": [getattr(s, "__qualname__", type(s).__qualname__) for s in self.sources],
        }

    def summary(self) -> str:
        """One line of counts, e.g. for the end of a command."""
        keys = ("posts", "missing_post", "duplicate_id", "missing_tag", "duplicate_relation",
                "unknown_tag_type", "unknown_rating", "no_quality", "no_year")
        return ", ".join(f"{k.replace('_', ' ')}: {self.stats[k]}" for k in keys)

    # ----- tags: once per tag -----------------------------------------------------------

    def _load_tags(self) -> None:
        entries, dropped, max_id = [], [], -1
        group_index = {g: i for i, g in enumerate(TAG_GROUPS)}
        for tag_id, name, type_code, popularity in self.db.execute_sql("SELECT id, name, type, popularity FROM tag"):
            if not isinstance(tag_id, int) or not 0 <= tag_id <= _MAX_TAG_ID:
                raise HakubooruError(f"tag table: id {tag_id!r} is not an integer in 0..{_MAX_TAG_ID}")
            max_id = max(max_id, tag_id)
            known_type = isinstance(type_code, int) and 0 <= type_code < len(TAG_TYPES)
            type_name = TAG_TYPES[type_code] if known_type else None
            group = self.rules.group(name, type_name) if isinstance(name, str) and type_name else None
            if type_name is None:
                self.stats["unknown_tag_type"] += 1
            if group is None:
                dropped.append(tag_id)
                continue
            if group not in group_index:
                raise HakubooruError(f"{type(self.rules).__name__}.group returned {group!r} for tag {name!r}; "
                                     f"expected one of {', '.join(TAG_GROUPS)} or None")
            key = self.rules.sort_key(group, name, popularity or 0)
            entries.append((group_index[group], key, tag_id, self.rules.format(name, type_name)))
        entries.sort(key=lambda e: (e[0], e[1], e[2]))
        self._rank = np.full(max_id + 1, _MISSING, dtype=np.int32)
        self._rank[np.asarray(dropped, dtype=np.int64)] = _DROPPED
        self._rank[np.asarray([e[2] for e in entries], dtype=np.int64)] = np.arange(len(entries), dtype=np.int32)
        self._texts = np.asarray([e[3] for e in entries], dtype=object)
        groups = np.asarray([e[0] for e in entries], dtype=np.int64)
        # rank where the general and meta groups begin: keep = [0, g), general = [g, m), meta = [m, n)
        starts = np.searchsorted(groups, [group_index["general"], group_index["meta"]])
        self._n_ranks = max(len(entries), 1)
        self._bounds = np.asarray([0, starts[0], starts[1], self._n_ranks], dtype=np.int64)

    # ----- posts: in bulk per chunk -----------------------------------------------------

    def _one(self, post_id: int):
        for item in self.captions([post_id]):
            return item
        raise HakubooruError(f"post {post_id} not found in the database")

    def _fetch(self, sql: str, ids: np.ndarray, tail: str = "") -> list[tuple]:
        """Rows of ``sql`` + a condition on the chunk's ids (first column = post id) + ``tail``:
        a range scan when the ids are dense, else an IN list passed as one JSON parameter.
        Only rows of the wanted ids are returned."""
        lo, hi = int(ids[0]), int(ids[-1])
        if hi - lo + 1 <= _DENSE_SPAN * len(ids):
            rows = self.db.execute_sql(f"{sql} BETWEEN ? AND ?{tail}", (lo, hi)).fetchall()
            if hi - lo + 1 != len(ids):
                row_ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
                keep = ids[np.minimum(np.searchsorted(ids, row_ids), len(ids) - 1)] == row_ids
                rows = [r for r, k in zip(rows, keep.tolist()) if k]
            return rows
        return self.db.execute_sql(f"{sql} IN {IDS_SUBQUERY}{tail}", (ids_param(ids),)).fetchall()

    def _tag_pairs(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(post id, tag id) pairs of the chunk, fetched as one comma-joined list per post."""
        rows = self._fetch("SELECT post_id, count(tag_id), group_concat(tag_id) FROM posttagrelation "
                           "WHERE post_id", ids, " GROUP BY post_id ORDER BY post_id")
        post_ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        counts = np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))
        joined = ",".join([r[2] for r in rows if r[1]])
        try:
            tag_ids = np.fromstring(joined, dtype=np.int64, sep=",") if joined else np.empty(0, np.int64)
        except ValueError:  # a tag_id that is text
            tag_ids = None
        if tag_ids is None or len(tag_ids) != counts.sum() or not all(isinstance(r[0], int) for r in rows):
            raise HakubooruError("posttagrelation holds post_id/tag_id values that are not integers "
                                 f"(posts {ids[0]}..{ids[-1]})")
        return np.repeat(post_ids, counts), tag_ids

    def _caption_chunk(self, ids: np.ndarray) -> Iterator[tuple[int, str, dict]]:
        posts = self._fetch("SELECT id, image_width, image_height, rating, score, fav_count, created_at "
                            "FROM post WHERE id", ids, " ORDER BY id")
        n = len(posts)
        self.stats["missing_post"] += len(ids) - n
        if n == 0:
            return
        found = np.fromiter((r[0] for r in posts), dtype=np.int64, count=n)

        # tags: map to ranks, sort by (post, rank), find each post's group slices
        pair_posts, pair_tags = self._tag_pairs(ids)
        post_index = np.minimum(np.searchsorted(found, pair_posts), n - 1)
        known_post = found[post_index] == pair_posts
        in_table = (pair_tags >= 0) & (pair_tags < len(self._rank))
        ranks = np.full(len(pair_tags), _MISSING, dtype=np.int64)
        ranks[in_table] = self._rank[pair_tags[in_table]]
        self.stats["missing_tag"] += int(np.count_nonzero((ranks == _MISSING) & known_post))
        use = known_post & (ranks >= 0)
        keys = np.sort(post_index[use] * self._n_ranks + ranks[use])
        if len(keys) > 1:
            repeated = keys[1:] == keys[:-1]
            self.stats["duplicate_relation"] += int(np.count_nonzero(repeated))
            keys = keys[np.concatenate(([True], ~repeated))]
        texts = self._texts[keys % self._n_ranks].tolist()
        bounds = np.searchsorted(keys, (np.arange(n)[:, None] * self._n_ranks + self._bounds).ravel())
        bounds = bounds.reshape(n, 4).tolist()

        # quality levels, vectorised
        codes = np.fromiter((r[3] if r[3] in (0, 1, 2, 3) else -1 for r in posts), dtype=np.int64, count=n)
        favs = np.fromiter((r[5] if isinstance(r[5], int) else np.nan for r in posts), dtype=np.float64, count=n)
        levels = self.quality.levels(codes, favs)
        if self.no_quality_above_id is not None:
            levels[found > self.no_quality_above_id] = -1
        self.stats["unknown_rating"] += int(np.count_nonzero(codes < 0))
        self.stats["no_quality"] += int(np.count_nonzero(levels < 0))
        levels = levels.tolist()
        codes = codes.tolist()

        extra = [source(found) for source in self.sources]
        quality_tags, year_tag, rating_tags, text = self.quality.tags, self.year_tag, self.rating_tags, self._text
        for (post_id, width, height, _, score, fav_count, created_at), (a, b, c, d), code, level in zip(
                posts, bounds, codes, levels):
            rating = RATINGS[code] if code >= 0 else None
            year = year_tag(created_at)
            if year is None:
                self.stats["no_year"] += 1
            record = {
                "id": post_id, "width": width, "height": height, "rating": rating,
                "score": score, "fav_count": fav_count, "created_at": created_at,
                "keep": texts[a:b], "general": texts[b:c], "meta": texts[c:d],
                "quality": [quality_tags[level]] if level >= 0 else [],
                "year": [year] if year is not None else [],
                "rating_tags": list(rating_tags[rating]) if rating is not None else [],
            }
            for found_tags in extra:
                for part, tags in found_tags.get(post_id, {}).items():
                    if part not in TAG_LISTS:
                        raise HakubooruError(f"tag source gave tags for {part!r}; expected one of {', '.join(TAG_LISTS)}")
                    record[part].extend(tags)
            for part in self._omitted:
                record[part] = []
            self.stats["posts"] += 1
            yield post_id, text(record), record


def caption_text(record: dict, *, groups: Sequence[str] = CAPTION_GROUPS, separator: str = ", ",
                 group_separator: str | None = None, escape_parentheses: bool = False,
                 keep_separator: str | None = None) -> str:
    """A record's caption text: the tags of ``groups`` (in that order; empty ones left out),
    ``separator`` inside a group, ``group_separator`` (default ``separator``) between groups,
    parentheses escaped for sd-webui if asked. With ``keep_separator`` (``groups`` then begin
    with keep, general) the text is ``keep SEP general SEP rest`` — sd-scripts'
    ``--keep_tokens_separator`` split: fixed, flexible, fixed tail — so that only the general
    tags move (recipe §2); the first SEP is always written, the second when a tail follows."""
    parts = []
    for group in groups:
        tags = record[group]
        part = separator.join(tags)
        parts.append(_escape(part) if escape_parentheses else part)
    between = separator if group_separator is None else group_separator
    if keep_separator is not None:
        tail = between.join(p for p in parts[2:] if p)
        pieces = [parts[0], keep_separator, parts[1]] + ([keep_separator, tail] if tail else [])
        return " ".join(p for p in pieces if p)
    rest = between.join(p for p in parts[1:] if p)
    return between.join(p for p in (parts[0], rest) if p)


def _check_str(name: str, value) -> str:
    if not isinstance(value, str):
        raise HakubooruError(f"{name} must be a string, got {value!r}")
    return value


def _check_groups(groups) -> tuple[str, ...]:
    groups = tuple(groups)
    unknown = [g for g in groups if g not in CAPTION_GROUPS]
    if unknown or len(set(groups)) != len(groups) or not groups:
        raise HakubooruError(f"groups must be distinct names among {', '.join(CAPTION_GROUPS)}; got {list(groups)}")
    return groups
