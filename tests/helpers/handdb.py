"""A tiny danbooru2023-schema database written by plain SQL from formats.md's column list.

Deliberately not created through hakubooru's own models, so tests check that our
models read the real schema rather than whatever they would create themselves.
"""
import sqlite3

POST_COLUMNS = """
    id INTEGER PRIMARY KEY, created_at TEXT, uploader_id INT, source TEXT, md5 TEXT NULL,
    parent_id INT NULL, has_children INTEGER, is_deleted INTEGER, is_banned INTEGER,
    pixiv_id INT NULL, has_active_children INTEGER, bit_flags INT, has_large INTEGER,
    has_visible_children INTEGER, image_width INT, image_height INT, file_size INT,
    file_ext TEXT, rating INT, score INT, up_score INT, down_score INT, fav_count INT,
    file_url TEXT NULL, large_file_url TEXT NULL, preview_file_url TEXT NULL, updated_at TEXT
"""
SCHEMA = [
    f"CREATE TABLE post ({POST_COLUMNS})",
    "CREATE TABLE tag (id INTEGER PRIMARY KEY, name TEXT UNIQUE, type INT, popularity INT)",
    "CREATE TABLE posttagrelation (id INTEGER PRIMARY KEY, post_id INT, tag_id INT)",
    "CREATE INDEX posttagrelation_post_id ON posttagrelation (post_id)",
    "CREATE INDEX posttagrelation_tag_id ON posttagrelation (tag_id)",
    "CREATE TABLE localpost (id INTEGER PRIMARY KEY, filepath TEXT, latentpath TEXT, post_id INT)",
]


def post(id, *, rating=0, deleted=0, banned=0, gold=False, ext="jpg", w=1000, h=800,
         created="2015-06-01T12:00:00.000+09:00", fav=10, score=5):
    """One post row as a dict of formats.md columns (Gold-only posts have no md5/file_url)."""
    md5 = None if gold else f"{id:032x}"
    url = None if gold else f"https://cdn.example/{id}.{ext}"
    return dict(id=id, created_at=created, uploader_id=1, source="", md5=md5, parent_id=None,
                has_children=0, is_deleted=deleted, is_banned=banned, pixiv_id=None,
                has_active_children=0, bit_flags=0, has_large=0, has_visible_children=0,
                image_width=w, image_height=h, file_size=12345, file_ext=ext, rating=rating,
                score=score, up_score=score, down_score=0, fav_count=fav, file_url=url,
                large_file_url=url, preview_file_url=url, updated_at=created)


def write_db(path, posts, tags, relations):
    """tags: [(id, name, type, popularity)], relations: [(post_id, tag_id)]."""
    conn = sqlite3.connect(path)
    for stmt in SCHEMA:
        conn.execute(stmt)
    cols = list(posts[0])
    conn.executemany(f"INSERT INTO post ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})",
                     [tuple(p[c] for c in cols) for p in posts])
    conn.executemany("INSERT INTO tag VALUES (?,?,?,?)", tags)
    conn.executemany("INSERT INTO posttagrelation (post_id, tag_id) VALUES (?,?)", relations)
    conn.commit()
    conn.close()
    return path
