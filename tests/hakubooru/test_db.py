"""open_db: read-only access, schema checks and clear errors for bad files."""
import sqlite3

import peewee
import pytest

from hakubooru import HakubooruError, open_db
from hakubooru.db import Post, PostTagRelation, Tag, fingerprint
from hakubooru.shardwriter import file_checksum
from tests.helpers.handdb import post, write_db


@pytest.fixture
def dbfile(tmp_path):
    return write_db(tmp_path / "d.db", [post(1, rating=3, fav=7), post(2, gold=True)],
                    [(1, "1girl", 0, 10), (2, "ask_(askzy)", 1, 3)], [(1, 1), (1, 2)])


def test_models_read_plain_sql_database(dbfile):
    open_db(dbfile)  # binds the models
    p = Post.get_by_id(1)
    assert (p.rating, p.fav_count, p.file_ext, p.is_deleted) == ("explicit", 7, "jpg", False)
    assert Post.get_by_id(2).md5 is None
    tags = [(r.tag.name, r.tag.type) for r in PostTagRelation.select().where(PostTagRelation.post == 1)]
    assert tags == [("1girl", "general"), ("ask_(askzy)", "artist")]
    assert Tag.select().where(Tag.type == "artist").count() == 1  # enum names work in queries
    with pytest.raises(HakubooruError, match="unknown rating 'nsfw'"):
        Post.select().where(Post.rating == "nsfw").count()


def test_read_only(dbfile):
    before = file_checksum(dbfile)
    open_db(dbfile)
    with pytest.raises(peewee.OperationalError, match="readonly|read-only|query_only"):
        Post.delete().execute()
    with pytest.raises(peewee.OperationalError):
        Post.update(score=0).execute()
    assert file_checksum(dbfile) == before


def test_missing_file(tmp_path):
    with pytest.raises(HakubooruError, match=r"^database not found: .*nope\.db$"):
        open_db(tmp_path / "nope.db")


def test_not_sqlite(tmp_path):
    (tmp_path / "x.db").write_bytes(b"PK\x03\x04 this is a zip, not a database" * 20)
    with pytest.raises(HakubooruError, match="not an SQLite database file"):
        open_db(tmp_path / "x.db")


def test_old_tag_list_schema(tmp_path):
    conn = sqlite3.connect(tmp_path / "old.db")
    conn.execute("CREATE TABLE post (id INTEGER PRIMARY KEY, tag_list TEXT, tag_list_general TEXT)")
    conn.execute("CREATE TABLE tag (id INTEGER PRIMARY KEY, name TEXT, type INT, popularity INT)")
    conn.commit()
    conn.close()
    with pytest.raises(HakubooruError, match="old danbooru2023.db schema"):
        open_db(tmp_path / "old.db")


def test_missing_table_and_column(tmp_path):
    conn = sqlite3.connect(tmp_path / "a.db")
    conn.execute("CREATE TABLE something (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(HakubooruError, match="no table 'post'"):
        open_db(tmp_path / "a.db")
    conn = sqlite3.connect(tmp_path / "b.db")
    conn.execute("CREATE TABLE post (id INTEGER PRIMARY KEY, created_at TEXT)")
    conn.execute("CREATE TABLE tag (id INTEGER PRIMARY KEY, name TEXT, type INT, popularity INT)")
    conn.execute("CREATE TABLE posttagrelation (id INTEGER PRIMARY KEY, post_id INT, tag_id INT)")
    conn.commit()
    conn.close()
    with pytest.raises(HakubooruError, match="table 'post' lacks column.*fav_count"):
        open_db(tmp_path / "b.db")


def test_fingerprint_changes_with_content(tmp_path):
    a = write_db(tmp_path / "a.db", [post(1)], [], [])
    b = write_db(tmp_path / "b.db", [post(1), post(2)], [], [])
    fa, fb = fingerprint(open_db(a)), fingerprint(open_db(b))
    assert fa != fb and fa.endswith("posts=1") and fb.endswith("posts=2")
    assert fingerprint(open_db(a)) == fa  # stable


@pytest.mark.parametrize("name", ["a#b.db", "c?d.db", "e%41.db"])
def test_uri_special_characters_stay_read_only(tmp_path, name):
    # '#', '?' and '%' mean something in an SQLite URI; unquoted, SQLite would open (and create)
    # another file, and without ?mode=ro
    path = write_db(tmp_path / name, [post(1)], [], [])
    before = sorted(p.name for p in tmp_path.iterdir())
    db = open_db(path)
    assert Post.select().count() == 1
    with pytest.raises(peewee.OperationalError):
        Post.delete().execute()
    db.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_mode_ro_alone_blocks_writes(dbfile):
    # the URI's mode=ro, with PRAGMA query_only turned back off: writing still fails
    db = open_db(dbfile)
    db.execute_sql("PRAGMA query_only = 0")
    with pytest.raises(peewee.OperationalError, match="readonly database"):
        db.execute_sql("DELETE FROM post")
    assert db.execute_sql("SELECT count(*) FROM post").fetchone() == (2,)


def test_query_only_alone_blocks_writes(dbfile):
    # query_only is on, and on its own refuses a write on a connection opened read-write
    db = open_db(dbfile)
    assert db.execute_sql("PRAGMA query_only").fetchone() == (1,)
    conn = sqlite3.connect(dbfile)
    conn.execute("PRAGMA query_only = %d" % db.execute_sql("PRAGMA query_only").fetchone()[0])
    with pytest.raises(sqlite3.OperationalError, match="readonly database"):
        conn.execute("DELETE FROM post")
    conn.close()


def test_null_flags_and_rating_read_as_none(tmp_path):
    row = dict(post(3), is_deleted=None, is_banned=None, has_children=None, rating=None, fav_count=None)
    open_db(write_db(tmp_path / "n.db", [row], [], []))
    p = Post.get_by_id(3)
    assert (p.is_deleted, p.is_banned, p.has_children, p.rating, p.fav_count) == (None,) * 5


@pytest.fixture
def locked(dbfile, monkeypatch):
    """The database with another connection holding an exclusive lock (busy timeout 0.2 s)."""
    import hakubooru.db as hdb
    monkeypatch.setattr(hdb, "BUSY_TIMEOUT_S", 0.2)
    handle = open_db(dbfile)  # opened before the lock is taken
    other = sqlite3.connect(dbfile, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    yield handle
    other.execute("ROLLBACK")
    other.close()


LOCKED = r"^.*d\.db: the database is locked by another program \(waited 0\.2 s\); close the program"


def test_lock_at_open_is_one_line(locked, dbfile):
    with pytest.raises(HakubooruError, match=LOCKED):
        open_db(dbfile)


def test_lock_at_every_query_site_is_the_same_line(locked):
    from hakubooru.captioner import Captioner
    from hakubooru.selector import Selector
    import numpy as np
    with pytest.raises(HakubooruError, match=LOCKED):
        fingerprint(locked)
    with pytest.raises(HakubooruError, match=LOCKED):
        Selector.all().ids(locked)
    with pytest.raises(HakubooruError, match=LOCKED):
        Post.select().count()
    with pytest.raises(HakubooruError, match=LOCKED):
        list(Captioner(locked).captions(np.array([1, 2])))


def test_schema_leaves_every_column_nullable_but_the_keys_and_tag_identity():
    """HakuBooru's models, as the public dump has them: a post may lack any field (Gold posts
    have no md5 or URLs, old posts no source), so only ids, relation ends and a tag's name and
    type are NOT NULL in the schema the synthetic generator writes."""
    from hakubooru.db import create_schema_sql

    conn = sqlite3.connect(":memory:")
    for stmt in create_schema_sql():
        conn.execute(stmt)
    not_null = {(table, row[1]) for table in ("post", "tag", "posttagrelation", "localpost")
                for row in conn.execute(f"PRAGMA table_info({table})") if row[3]}
    assert not_null == {("post", "id"), ("tag", "id"), ("tag", "name"), ("tag", "type"),
                        ("posttagrelation", "id"), ("posttagrelation", "post_id"),
                        ("posttagrelation", "tag_id"), ("localpost", "id")}
    post_columns = [row[1] for row in conn.execute("PRAGMA table_info(post)")]
    assert len(post_columns) == 27  # formats.md: id .. updated_at


@pytest.mark.parametrize("padding", [0, 3 << 20])  # under 1 MiB (head = tail = whole file), over 2 MiB
def test_fingerprint_formula_by_hand(tmp_path, padding):
    """sha256 of the first MiB, the last MiB and "size:count:max_id", first 32 hex digits,
    then the post count: selections and manifests record it, so it must not drift."""
    import hashlib

    path = write_db(tmp_path / "f.db", [post(3), post(9)], [(1, "1girl", 0, 2)], [(3, 1), (9, 1)])
    if padding:
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE pad (b BLOB)")
            conn.execute("INSERT INTO pad VALUES (?)", (bytes(range(256)) * (padding // 256),))
    data = path.read_bytes()
    mib = 1 << 20
    head, tail = data[:mib], data[max(0, len(data) - mib):][:mib]
    assert (head == tail) == (padding == 0)
    digest = hashlib.sha256(head + tail + f"{len(data)}:2:9".encode()).hexdigest()[:32]
    assert fingerprint(open_db(path)) == f"sha256:{digest}:posts=2"
