"""peewee models of the danbooru2023 metadata database, and opening it safely.

The schema is the one HakuBooru's models describe (see docs/formats.md). The
user's file is only ever opened read-only: SQLite URI ``mode=ro`` plus
``PRAGMA query_only``, so nothing in this library can write to it.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from urllib.parse import quote

import peewee

from peewee import (
    BooleanField,
    ForeignKeyField,
    IntegerField,
    Model,
    SqliteDatabase,
    TextField,
)

from .errors import HakubooruError

RATINGS = ("general", "sensitive", "questionable", "explicit")
TAG_TYPES = ("general", "artist", "character", "copyright", "meta")


class _EnumField(IntegerField):
    """An INTEGER column decoded to a name (``Post.rating == "explicit"`` works)."""

    names: tuple[str, ...] = ()

    def db_value(self, value):
        if isinstance(value, str):
            try:
                return self.names.index(value)
            except ValueError:
                raise HakubooruError(
                    f"unknown {self.name} {value!r}; expected one of {', '.join(self.names)}"
                ) from None
        return value

    def python_value(self, value):
        if value is None or not 0 <= value < len(self.names):
            return value
        return self.names[value]


class RatingField(_EnumField):
    names = RATINGS


class TagTypeField(_EnumField):
    names = TAG_TYPES


class BaseModel(Model):
    class Meta:
        database = None  # bound by open_db()


class Post(BaseModel):
    id = IntegerField(primary_key=True)
    created_at = TextField(null=True)
    uploader_id = IntegerField(null=True)
    source = TextField(null=True)
    md5 = TextField(null=True)
    parent_id = IntegerField(null=True)
    has_children = BooleanField(null=True)
    is_deleted = BooleanField(null=True)
    is_banned = BooleanField(null=True)
    pixiv_id = IntegerField(null=True)
    has_active_children = BooleanField(null=True)
    bit_flags = IntegerField(null=True)
    has_large = BooleanField(null=True)
    has_visible_children = BooleanField(null=True)
    image_width = IntegerField(null=True)
    image_height = IntegerField(null=True)
    file_size = IntegerField(null=True)
    file_ext = TextField(null=True)
    rating = RatingField(null=True)
    score = IntegerField(null=True)
    up_score = IntegerField(null=True)
    down_score = IntegerField(null=True)
    fav_count = IntegerField(null=True)
    file_url = TextField(null=True)
    large_file_url = TextField(null=True)
    preview_file_url = TextField(null=True)
    updated_at = TextField(null=True)

    class Meta:
        table_name = "post"


class Tag(BaseModel):
    id = IntegerField(primary_key=True)
    name = TextField(unique=True)
    type = TagTypeField()
    popularity = IntegerField(null=True)

    class Meta:
        table_name = "tag"


class PostTagRelation(BaseModel):
    id = IntegerField(primary_key=True)
    post = ForeignKeyField(Post, column_name="post_id", backref="tag_relations", index=True)
    tag = ForeignKeyField(Tag, column_name="tag_id", backref="post_relations", index=True)

    class Meta:
        table_name = "posttagrelation"


class LocalPost(BaseModel):
    id = IntegerField(primary_key=True)
    filepath = TextField(null=True)
    latentpath = TextField(null=True)
    post = ForeignKeyField(Post, column_name="post_id", null=True)

    class Meta:
        table_name = "localpost"


MODELS = (Post, Tag, PostTagRelation, LocalPost)
REQUIRED_TABLES = (Post, Tag, PostTagRelation)  # localpost may be absent
SQLITE_MAGIC = b"SQLite format 3\x00"


def required_columns(model) -> list[str]:
    """Column names a table must have, from the model (the single source of truth)."""
    return [f.column_name for f in model._meta.sorted_fields]


def create_schema_sql() -> list[str]:
    """CREATE TABLE / INDEX statements for the schema (used by the synthetic generator)."""
    db = SqliteDatabase(":memory:")
    with db.bind_ctx(MODELS):
        stmts = []
        for model in MODELS:
            ctx = model._schema._create_table(safe=False)
            stmts.append(db.get_sql_context().sql(ctx).query()[0])
    return stmts


def _check_schema(conn: sqlite3.Connection, path: Path) -> None:
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "post" in tables:
        post_cols = {r[1] for r in conn.execute("PRAGMA table_info(post)")}
        if "posttagrelation" not in tables and any(c.startswith("tag_list") for c in post_cols):
            raise HakubooruError(
                f"{path}: old danbooru2023.db schema (tags as tag_list text columns, no "
                "posttagrelation table); download the current (2024+) danbooru2023.db"
            )
    for model in REQUIRED_TABLES:
        table = model._meta.table_name
        if table not in tables:
            raise HakubooruError(f"{path}: not a danbooru2023 database (no table {table!r})")
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        missing = [c for c in required_columns(model) if c not in have]
        if missing:
            raise HakubooruError(
                f"{path}: table {table!r} lacks column(s) {', '.join(missing)}; "
                "not the danbooru2023.db schema this library reads"
            )


BUSY_TIMEOUT_S = 10.0  # how long a query waits for another program's lock on the file


def locked_error(path) -> HakubooruError:
    """The one line for a database another program holds locked past BUSY_TIMEOUT_S."""
    return HakubooruError(f"{path}: the database is locked by another program (waited "
                          f"{BUSY_TIMEOUT_S:g} s); close the program writing to it, then retry")


def _is_lock(e: Exception) -> bool:
    return "locked" in str(e) or "busy" in str(e)


class _ReadOnlySqlite(SqliteDatabase):
    """SqliteDatabase whose every query (models' and plain SQL) turns a lock held past the busy
    timeout into locked_error."""

    def execute_sql(self, sql, params=None, *args, **kwargs):
        try:
            return super().execute_sql(sql, params, *args, **kwargs)
        except peewee.OperationalError as e:
            if _is_lock(e):
                raise locked_error(getattr(self, "hakubooru_path", self.database)) from None
            raise


def open_db(path) -> SqliteDatabase:
    """Open a danbooru2023 SQLite file read-only, check its schema, bind the models.

    Fails with one clear line (HakubooruError) for a missing file, a file that is
    not SQLite, the old ``tag_list`` schema, or missing tables/columns.
    """
    path = Path(path)
    if not path.exists():
        raise HakubooruError(f"database not found: {path}")
    if not path.is_file():
        raise HakubooruError(f"database path is not a file: {path}")
    with open(path, "rb") as f:
        if f.read(16) != SQLITE_MAGIC:
            raise HakubooruError(f"{path}: not an SQLite database file")
    uri = f"file:{quote(path.resolve().as_posix())}?mode=ro"  # '#', '?', '%' in names stay literal
    db = _ReadOnlySqlite(uri, uri=True, pragmas={"query_only": 1}, check_same_thread=False,
                         timeout=BUSY_TIMEOUT_S)
    try:
        db.connect()
        _check_schema(db.connection(), path)
    except (sqlite3.DatabaseError, peewee.DatabaseError) as e:
        db.close()
        if _is_lock(e):
            raise locked_error(path) from None
        raise HakubooruError(f"{path}: cannot read as SQLite ({e})") from None
    except HakubooruError:
        db.close()
        raise
    db.hakubooru_path = path
    db.bind(MODELS, bind_refs=False, bind_backrefs=False)
    return db


# "IN" operand for many post ids: bound as ONE JSON parameter, so SQLite's limit on the
# number of parameters never applies; pass ids_param(ids) as its value
IDS_SUBQUERY = "(SELECT value FROM json_each(?))"


def ids_param(ids) -> str:
    """The parameter for IDS_SUBQUERY: the ids (a numpy int array) as a JSON list."""
    return json.dumps(ids.tolist())


def db_path(db: SqliteDatabase) -> Path:
    """The file an open_db() handle reads."""
    return db.hakubooru_path


def fingerprint(db: SqliteDatabase) -> str:
    """A cheap identity of the database's contents (size, head/tail bytes, post count, max id).

    Hashing a 19 GB file whole would take minutes; this changes whenever the file does
    in practice, and is what selections, manifests and shard folders are checked against.
    """
    cached = getattr(db, "hakubooru_fingerprint", None)
    if cached:
        return cached
    path = db_path(db)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    count, max_id = db.execute_sql("SELECT count(*), max(id) FROM post").fetchone()
    h.update(f"{size}:{count}:{max_id}".encode())
    db.hakubooru_fingerprint = f"sha256:{h.hexdigest()[:32]}:posts={count}"
    return db.hakubooru_fingerprint


__all__ = [
    "Post", "Tag", "PostTagRelation", "LocalPost", "MODELS", "RATINGS", "TAG_TYPES",
    "open_db", "fingerprint", "db_path", "create_schema_sql", "required_columns",
]
