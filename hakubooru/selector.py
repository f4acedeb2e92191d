"""Composable, lazily evaluated selections of posts.

A ``Selector`` is an expression tree: sources (all posts, an id range, explicit
ids, tag queries), filters, set algebra and seeded sampling. Nothing touches the
database until a terminal (``.ids(db)``, ``.count(db)``, ``.explain(db)``,
``.query(db)``, ``.save(path, db)``) is called. Sub-trees made only of sources,
filters and set algebra compile to one SQL ``WHERE`` clause; explicit ids and
samples are materialised as sorted int64 arrays, and filters above them run in
SQL over id chunks. Memory grows with the number of selected ids, never with
the database.

    from hakubooru import Selector, open_db
    db = open_db("danbooru2023.db")
    sel = (Selector.id_range(0, 2_000_000).sample(1_000_000, seed=42)
           | Selector.id_range(5_000_000)).exclude_deleted().images_only()
    print(sel.explain(db))
    ids = sel.ids(db)
"""
from __future__ import annotations

import hashlib
import json
import operator
from contextvars import ContextVar
from datetime import datetime
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from peewee import SQL, Expression, Node, SqliteDatabase, fn

from .db import IDS_SUBQUERY, RATINGS, Post, PostTagRelation, Tag, fingerprint, ids_param
from .errors import HakubooruError
from .rng import hash64_array

STILL_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "avif", "bmp")
_CHUNK = 20_000  # ids per SQL query when filtering a materialised set
_SPARSE = 20  # above this id-span / id-count ratio, filter with IN (...) instead of a range scan
_META_KEY = b"hakubooru"
_RENDER_DB = SqliteDatabase(":memory:")  # only renders expressions to SQL text
_MEMO: ContextVar[dict | None] = ContextVar("hakubooru_selector_memo", default=None)


class _hybrid:
    """A name that is a constructor on the class and a terminal on an instance.

    ``Selector.ids([1, 2])`` makes a selector from ids; ``sel.ids(db)`` evaluates one.
    """

    def __init__(self, on_class, on_instance):
        self.on_class, self.on_instance = on_class, on_instance

    def __get__(self, obj, owner):
        if obj is None:
            return self.on_class.__get__(owner, owner)
        return self.on_instance.__get__(obj, owner)


def _int(what: str, value) -> int:
    """An integer argument, or a clear error (no silent truncation of 1.5 or "5")."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise HakubooruError(f"{what} must be an integer, got {value!r}")
    return int(value)


def _iso_date(what: str, value: str) -> str:
    try:
        datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise HakubooruError(f"{what} must be an ISO date such as 2020-01-31 or "
                             f"2020-01-31T12:00:00+09:00, got {value!r}") from None
    return value


def _and(a, b):
    return b if a is None else a if b is None else (a & b)


def _sql_text(db, expr) -> str:
    """Render a peewee expression as SQL with its parameters inlined (for records only)."""
    sql, params = db.get_sql_context().sql(expr).query()
    for p in params:
        sql = sql.replace("?", repr(p), 1)
    return sql


def _fetch_ids(db, query_sql: str, params=()) -> np.ndarray:
    cursor = db.execute_sql(query_sql, params)
    out = []
    while rows := cursor.fetchmany(100_000):
        out.append(np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)))
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def _select_ids(db, cond) -> np.ndarray:
    query = Post.select(Post.id).order_by(Post.id)
    if cond is not None:
        query = query.where(cond)
    sql, params = db.get_sql_context().sql(query).query()
    return _fetch_ids(db, sql, params)


def _in_ids(ids: np.ndarray):
    """``Post.id IN (ids)`` with the ids as one JSON parameter (no limit on their number)."""
    return Post.id.in_(SQL(IDS_SUBQUERY, (ids_param(ids),)))


def _filter_ids(db, ids: np.ndarray, cond) -> np.ndarray:
    """Keep the ids (sorted) that satisfy ``cond``, in bounded chunks."""
    if cond is None or len(ids) == 0:
        return ids
    kept = []
    for start in range(0, len(ids), _CHUNK):
        block = ids[start:start + _CHUNK]
        lo, hi = int(block[0]), int(block[-1])
        if (hi - lo + 1) > _SPARSE * len(block):
            where = _in_ids(block) & cond
        else:
            where = (Post.id >= lo) & (Post.id <= hi) & cond
        found = _select_ids(db, where)
        kept.append(found[np.isin(found, block, assume_unique=True)])
    return np.concatenate(kept)


class Selector:
    """A lazily evaluated set of post ids. Combine with ``|``, ``&``, ``-`` and the filters."""

    label = "selector"

    # ---- evaluation hooks, overridden by the node classes below ----
    def _sql(self, db):
        """A peewee condition on Post selecting exactly this set, or NotImplemented."""
        return NotImplemented

    def _children(self) -> tuple["Selector", ...]:
        return ()

    def _to_dict(self) -> dict:
        raise NotImplementedError

    def _evaluate(self, db) -> np.ndarray:
        """The ids of this node (reusing results within one ``explain``)."""
        memo = _MEMO.get()
        if memo is not None and id(self) in memo:
            return memo[id(self)]
        ids = self._compute(db)
        if memo is not None:
            memo[id(self)] = ids
        return ids

    def _compute(self, db) -> np.ndarray:
        cond = self._sql(db)
        if cond is NotImplemented:
            raise NotImplementedError(type(self).__name__)
        return _select_ids(db, cond)

    # ---- sources ----
    @classmethod
    def all(cls) -> "Selector":
        """Every post in the database."""
        return _All()

    @classmethod
    def id_range(cls, lo: int, hi: int | None = None) -> "Selector":
        """Posts with lo <= id < hi (half-open; ``hi=None`` means no upper bound)."""
        lo, hi = _int("id_range lo", lo), None if hi is None else _int("id_range hi", hi)
        if hi is not None and hi < lo:
            raise HakubooruError(f"id_range: hi ({hi}) is below lo ({lo})")
        return _IdRange(lo, hi)

    @classmethod
    def _from_ids(cls, ids) -> "Selector":
        return _Ids(ids)

    @classmethod
    def tags(cls, all=(), any=(), none=()) -> "Selector":
        """Posts having every tag in ``all``, at least one of ``any`` (if given), none of ``none``.

        Tag names are Danbooru's (``long_hair``); unknown names fail when evaluated,
        with the list of names not found.
        """
        for name, group in (("all", all), ("any", any), ("none", none)):
            if isinstance(group, str):
                raise HakubooruError(f"tags({name}=...) takes a list of tag names, not a string")
        if not (all or any or none):
            raise HakubooruError("tags() needs at least one of all=, any=, none=")
        return _Tags(tuple(all), tuple(any), tuple(none))

    # ---- filters ----
    def where(self, expr: Expression, label: str | None = None) -> "Selector":
        """Keep posts matching a peewee expression on ``Post`` (e.g. ``Post.score > 10``)."""
        if not isinstance(expr, Node):
            raise HakubooruError(f"where() takes a peewee expression on Post, got {type(expr).__name__}")
        return _Filter(self, label or "where", expr)

    def exclude_deleted(self) -> "Selector":
        """Drop posts flagged deleted."""
        return _Filter(self, "exclude_deleted", (Post.is_deleted == 0) | Post.is_deleted.is_null())

    def exclude_banned(self) -> "Selector":
        """Drop posts flagged banned."""
        return _Filter(self, "exclude_banned", (Post.is_banned == 0) | Post.is_banned.is_null())

    def exclude_gold(self) -> "Selector":
        """Drop Gold-only posts: in the public dump they have no md5 or no file_url."""
        cond = (Post.md5.is_null(False) & (Post.md5 != "")
                & Post.file_url.is_null(False) & (Post.file_url != ""))
        return _Filter(self, "exclude_gold", cond)

    def images_only(self, exts=STILL_IMAGE_EXTS) -> "Selector":
        """Keep still images only (drops gif, mp4, webm, zip/ugoira, swf, ...)."""
        if isinstance(exts, str):
            raise HakubooruError(f"images_only(exts=...) takes a list of extensions, not {exts!r}")
        exts = tuple(e.lower().lstrip(".") for e in exts)
        return _Filter(self, f"images_only({','.join(exts)})", Post.file_ext.in_(exts))

    def rating(self, *ratings: str) -> "Selector":
        """Keep posts with one of the given ratings (general, sensitive, questionable, explicit)."""
        bad = [r for r in ratings if r not in RATINGS]
        if bad or not ratings:
            raise HakubooruError(f"rating(): unknown rating(s) {bad or '(none given)'}; "
                                 f"choose from {', '.join(RATINGS)}")
        codes = [RATINGS.index(r) for r in ratings]
        return _Filter(self, f"rating({','.join(ratings)})", Post.rating.in_(codes))

    def size(self, min_width=None, min_height=None, max_width=None, max_height=None,
             min_pixels=None, max_pixels=None) -> "Selector":
        """Keep posts whose original image size is within the given bounds (inclusive)."""
        w, h = Post.image_width, Post.image_height
        parts = [(min_width, w >= min_width), (min_height, h >= min_height),
                 (max_width, w <= max_width), (max_height, h <= max_height),
                 (min_pixels, w * h >= min_pixels), (max_pixels, w * h <= max_pixels)]
        conds = [c for bound, c in parts if bound is not None]
        if not conds:
            raise HakubooruError("size() needs at least one bound")
        args = ",".join(f"{k}={v}" for k, v in locals().items()
                        if k.startswith(("min_", "max_")) and v is not None)
        return _Filter(self, f"size({args})", reduce(operator.and_, conds))

    def created(self, after: str | None = None, before: str | None = None) -> "Selector":
        """Keep posts uploaded at or after ``after`` and before ``before`` (ISO dates, UTC).

        Timestamps with offsets are compared in UTC (SQLite's datetime()).
        """
        if after is None and before is None:
            raise HakubooruError("created() needs after= or before=")
        conds = []
        if after is not None:
            _iso_date("created(after=...)", after)
            conds.append(SQL("datetime(created_at) >= datetime(?)", (after,)))
        if before is not None:
            _iso_date("created(before=...)", before)
            conds.append(SQL("datetime(created_at) < datetime(?)", (before,)))
        label = "created(" + ",".join(f"{k}={v}" for k, v in (("after", after), ("before", before)) if v) + ")"
        return _Filter(self, label, reduce(operator.and_, conds))

    def sample(self, n: int, seed: int, allow_fewer: bool = False) -> "Selector":
        """n distinct posts drawn uniformly without replacement.

        The result is a pure function of (the sorted candidate ids, n, seed): each id gets
        the key splitmix64(seed, id) and the n smallest keys win, so row order, platform
        and Python/NumPy versions do not matter. Asking for more posts than there are is
        an error unless ``allow_fewer=True`` (then all are taken).
        """
        n, seed = _int("sample() n", n), _int("sample() seed", seed)
        if n < 0:
            raise HakubooruError(f"sample(): n must be >= 0, got {n}")
        if not 0 <= seed < 2**64:  # hash64 would wrap it, and the saved selection would not say so
            raise HakubooruError(f"sample(): seed must be in [0, 2**64), got {seed}")
        return _Sample(self, n, seed, bool(allow_fewer))

    # ---- set algebra ----
    def __or__(self, other):
        return _SetOp("union", self, _check(other))

    def __and__(self, other):
        return _SetOp("intersection", self, _check(other))

    def __sub__(self, other):
        return _SetOp("difference", self, _check(other))

    # ---- terminals ----
    def _ids(self, db) -> np.ndarray:
        """Evaluate: the selected post ids as a sorted numpy int64 array."""
        return self._evaluate(db)

    ids = _hybrid(_from_ids, _ids)

    def count(self, db) -> int:
        """Number of selected posts (in SQL when the tree compiles to SQL)."""
        cond = self._sql(db)
        if cond is NotImplemented:
            return int(len(self._evaluate(db)))
        query = Post.select()
        if cond is not None:
            query = query.where(cond)
        return query.bind(db).count()

    def query(self, db):
        """A peewee query over Post for this selection, for ad-hoc use."""
        cond = self._sql(db)
        if cond is NotImplemented:
            cond = _in_ids(self._evaluate(db))
        query = Post.select().order_by(Post.id)
        return (query.where(cond) if cond is not None else query).bind(db)

    def explain(self, db) -> str:
        """The expression tree with the number of posts at every node."""
        lines: list[str] = []
        token = _MEMO.set({})

        def walk(node, prefix, child_prefix):
            lines.append(f"{prefix}{node.label}  [{node.count(db):,}]")
            kids = node._children()
            for i, kid in enumerate(kids):
                last = i == len(kids) - 1
                walk(kid, child_prefix + ("└─ " if last else "├─ "),
                     child_prefix + ("   " if last else "│  "))

        try:
            walk(self, "", "")
        finally:
            _MEMO.reset(token)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """A JSON-able description of the expression (recorded with saved selections)."""
        return self._to_dict()

    def seeds(self) -> list[int]:
        """Every sampling seed in the tree, in tree order."""
        own = [self.seed] if isinstance(self, _Sample) else []
        return own + [s for kid in self._children() for s in kid.seeds()]

    def save(self, path, db) -> "Selection":
        """Evaluate and write the selection (ids, expression, seeds, db fingerprint) as Parquet."""
        sel = Selection(self.ids(db), self.to_dict(), fingerprint(db), {"seeds": self.seeds()})
        sel.save(path)
        return sel

    def __repr__(self):
        return f"<Selector {json.dumps(self.to_dict())}>"


def _check(other):
    if not isinstance(other, Selector):
        raise HakubooruError(f"cannot combine a Selector with {type(other).__name__}")
    return other


class _All(Selector):
    label = "all"

    def _sql(self, db):
        return None

    def _to_dict(self):
        return {"op": "all"}


class _IdRange(Selector):
    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi
        self.label = f"id_range({lo}, {hi})"

    def _sql(self, db):
        cond = Post.id >= self.lo
        return cond if self.hi is None else cond & (Post.id < self.hi)

    def _to_dict(self):
        return {"op": "id_range", "lo": self.lo, "hi": self.hi}


class _Ids(Selector):
    def __init__(self, ids):
        arr = np.asarray(ids if hasattr(ids, "__array__") else list(ids))
        if arr.size and arr.dtype.kind not in "iu":
            values = arr.ravel().tolist() if hasattr(ids, "__array__") else ids
            bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer))),
                       arr.ravel()[0])
            raise HakubooruError(f"Selector.ids() takes integer post ids, got {bad!r}")
        arr = np.unique(arr.astype(np.int64))
        self.array = arr
        self.label = f"ids(<{len(arr):,} ids>)"

    def _compute(self, db):
        # only ids that exist as posts
        return _filter_ids(db, self.array, Post.id.is_null(False))

    def _to_dict(self):
        return {"op": "ids", "count": int(len(self.array)),
                "sha256": _ids_digest(self.array)}


class _Tags(Selector):
    def __init__(self, all_, any_, none_):
        self.all, self.any, self.none = all_, any_, none_
        parts = [f"{k}={list(v)}" for k, v in (("all", all_), ("any", any_), ("none", none_)) if v]
        self.label = f"tags({', '.join(parts)})"

    def _tag_ids(self, db) -> dict[str, int]:
        names = sorted(set(self.all) | set(self.any) | set(self.none))
        found = dict(Tag.select(Tag.name, Tag.id).where(Tag.name.in_(names)).bind(db).tuples())
        missing = [n for n in names if n not in found]
        if missing:
            raise HakubooruError(f"unknown tag(s): {', '.join(missing)} "
                                 "(use Danbooru names with underscores, e.g. long_hair)")
        return found

    def _sql(self, db):
        ids = self._tag_ids(db)

        def having(tag_ids):
            sub = PostTagRelation.select(PostTagRelation.post).where(PostTagRelation.tag.in_(tag_ids))
            return Post.id.in_(sub)

        conds = [having([ids[n]]) for n in self.all]
        if self.any:
            conds.append(having([ids[n] for n in self.any]))
        if self.none:
            conds.append(~having([ids[n] for n in self.none]))
        return reduce(operator.and_, conds)

    def _to_dict(self):
        return {"op": "tags", "all": list(self.all), "any": list(self.any), "none": list(self.none)}


class _Filter(Selector):
    def __init__(self, child, label, expr):
        self.child, self.expr = child, expr
        self.label = label

    def _children(self):
        return (self.child,)

    def _sql(self, db):
        inner = self.child._sql(db)
        return NotImplemented if inner is NotImplemented else _and(inner, self.expr)

    def _compute(self, db):
        if self.child._sql(db) is not NotImplemented:
            return super()._compute(db)
        # a chain of filters over a materialised set: one pass with all conditions
        conds, base = [self.expr], self.child
        while isinstance(base, _Filter):
            conds.append(base.expr)
            base = base.child
        return _filter_ids(db, base._evaluate(db), reduce(operator.and_, conds))

    def _to_dict(self):
        return {"op": "filter", "label": self.label, "child": self.child._to_dict(),
                "sql": _sql_text(_RENDER_DB, self.expr)}


_SET_NP = {"union": np.union1d, "intersection": np.intersect1d, "difference": np.setdiff1d}


class _SetOp(Selector):
    def __init__(self, op, a, b):
        self.op, self.a, self.b = op, a, b
        self.label = op

    def _children(self):
        return (self.a, self.b)

    def _sql(self, db):
        ca, cb = self.a._sql(db), self.b._sql(db)
        if ca is NotImplemented or cb is NotImplemented:
            return NotImplemented
        true = Post.id.is_null(False)
        ca, cb = (true if ca is None else ca), (true if cb is None else cb)
        # SQL's NOT NULL is NULL: a post whose condition in b is NULL is not in b
        return {"union": ca | cb, "intersection": ca & cb,
                "difference": ca & ~fn.COALESCE(cb, 0)}[self.op]

    def _compute(self, db):
        if self._sql(db) is not NotImplemented:
            return super()._compute(db)
        return _SET_NP[self.op](self.a._evaluate(db), self.b._evaluate(db)).astype(np.int64)

    def _to_dict(self):
        return {"op": self.op, "children": [self.a._to_dict(), self.b._to_dict()]}


def sample_ids(candidates: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The n ids with the smallest splitmix64(seed, id) keys, sorted (ties broken by id)."""
    candidates = np.asarray(candidates, dtype=np.int64)
    keys = hash64_array(seed, candidates)
    order = np.lexsort((candidates, keys))[:n]
    return np.sort(candidates[order])


class _Sample(Selector):
    def __init__(self, child, n, seed, allow_fewer):
        self.child, self.n, self.seed, self.allow_fewer = child, n, seed, allow_fewer
        self.label = f"sample(n={n:,}, seed={seed})"

    def _children(self):
        return (self.child,)

    def _compute(self, db):
        candidates = self.child._evaluate(db)
        if self.n > len(candidates) and not self.allow_fewer:
            raise HakubooruError(
                f"sample(n={self.n:,}) asks for more posts than the {len(candidates):,} available "
                f"under {self.child.label}; pass allow_fewer=True to take them all")
        return sample_ids(candidates, self.n, self.seed)

    def _to_dict(self):
        return {"op": "sample", "n": self.n, "seed": self.seed, "allow_fewer": self.allow_fewer,
                "child": self.child._to_dict()}


def _ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()


@dataclass
class Selection:
    """An evaluated selection: sorted ids plus how they were made."""

    ids: np.ndarray
    expression: dict
    db_fingerprint: str
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.ids = np.unique(np.asarray(self.ids, np.int64))  # sorted, no duplicates

    @property
    def digest(self) -> str:
        """sha256 of the ids (little-endian int64), identifying the selection's content."""
        return _ids_digest(self.ids)

    def check(self, db) -> None:
        """Fail clearly if this selection was made from another database."""
        if fingerprint(db) != self.db_fingerprint:
            raise HakubooruError(
                f"selection was made from another database (fingerprint {self.db_fingerprint}, "
                f"this database is {fingerprint(db)})")

    def save(self, path) -> None:
        """Write as Parquet: column ``id`` plus JSON metadata under the key ``hakubooru``."""
        meta = {"expression": self.expression, "db_fingerprint": self.db_fingerprint,
                "count": int(len(self.ids)), "sha256": self.digest, **self.meta}
        table = pa.table({"id": pa.array(self.ids, type=pa.int64())})
        table = table.replace_schema_metadata({_META_KEY: json.dumps(meta, sort_keys=True).encode()})
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)


def load_selection(path) -> Selection:
    """Read a selection written by ``Selector.save`` / ``Selection.save``."""
    path = Path(path)
    if not path.is_file():
        raise HakubooruError(f"selection file not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise HakubooruError(f"{path}: not a Parquet selection file ({e})") from None
    meta_raw = (table.schema.metadata or {}).get(_META_KEY)
    if meta_raw is None or "id" not in table.column_names:
        raise HakubooruError(f"{path}: not a hakubooru selection (no 'id' column or metadata)")
    try:
        meta = json.loads(meta_raw)
        ids = table.column("id").to_numpy().astype(np.int64)
        sel = Selection(ids, meta.pop("expression"), meta.pop("db_fingerprint"), meta)
    except (ValueError, KeyError, TypeError, AttributeError, pa.ArrowException) as e:
        raise HakubooruError(f"{path}: damaged selection metadata ({type(e).__name__}: {e})") from None
    if sel.digest != meta.get("sha256"):
        raise HakubooruError(f"{path}: ids do not match their recorded checksum (file damaged?)")
    return sel
