"""The synthetic danbooru generator: determinism, schema, proportions, archives, CLI.

Expected values come from the generator's documented rules (docs/synth.md), worked out in
the comments, not from its output.
"""
from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import subprocess
import sys
import tarfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest
from PIL import Image

from hakubooru.db import Post, PostTagRelation, Tag, open_db
from hakubooru.shardwriter import file_checksum
from hakubooru.errors import HakubooruError
from hakubooru.synth import make_archives, make_database, make_demo, make_folder
from hakubooru.synth.tags import SUBSET_PATH

REPO = Path(__file__).resolve().parents[1]
NON_IMAGE_EXTS = {"gif", "mp4", "webm", "zip", "swf"}
PEOPLE_COUNT = {"1girl", "2girls", "3girls", "4girls", "5girls", "6+girls", "multiple_girls", "1boy",
                "2boys", "3boys", "4boys", "5boys", "6+boys", "multiple_boys", "male_focus", "1other",
                "2others", "3others", "4others", "5others", "6+others", "multiple_others"}
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$")


def rows(db_path, sql, *params):
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def tar_members(images_dir: Path) -> dict[int, tuple[str, str, bytes]]:
    """post id -> (tar path relative to images_dir, member name, bytes)."""
    out = {}
    for tar_path in sorted(images_dir.rglob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                out[int(m.name.split(".")[0])] = (tar_path.relative_to(images_dir).as_posix(), m.name,
                                                  tar.extractfile(m).read())
    return out


# --- determinism -----------------------------------------------------------------------

def test_same_arguments_give_byte_identical_database_other_seed_differs(tmp_path):
    a = make_database(tmp_path / "a.db", 300, seed=5, progress=False)
    b = make_database(tmp_path / "b.db", 300, seed=5, progress=False)
    c = make_database(tmp_path / "c.db", 300, seed=6, progress=False)
    assert file_checksum(a) == file_checksum(b)
    assert file_checksum(a) != file_checksum(c)


def test_same_arguments_give_byte_identical_archives(tmp_path, synth_db):
    make_archives(synth_db, tmp_path / "a", seed=0, max_side=32, limit=40, progress=False)
    make_archives(synth_db, tmp_path / "b", seed=0, max_side=32, limit=40, progress=False)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.tar"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.tar"))
    assert files_a == files_b and files_a
    assert all(file_checksum(tmp_path / "a" / f) == file_checksum(tmp_path / "b" / f) for f in files_a)


# --- schema and tags -------------------------------------------------------------------

def test_schema_reads_through_open_db_and_peewee_models(synth_db):
    db = open_db(synth_db)
    try:
        assert Post.select().count() == 1500
        post = Post.select().order_by(Post.id).first()
        assert post.rating in {"general", "sensitive", "questionable", "explicit"}
        names = [t.name for t in Tag.select().join(PostTagRelation).where(PostTagRelation.post == post.id)]
        assert names
        # Danbooru category -> database type: 0 general, 1 artist, 4 -> 2 character,
        # 3 copyright, 5 -> 4 meta (the subset CSV lists hatsune_miku as 4, touhou as 3, ...).
        expected = {"1girl": "general", "^_^": "general", "ask_(askzy)": "artist",
                    "hatsune_miku": "character", "touhou": "copyright", "highres": "meta",
                    "banned_artist": "artist"}
        assert {t.name: t.type for t in Tag.select().where(Tag.name.in_(list(expected)))} == expected
    finally:
        db.close()
    indexes = {r[0]: r[1] for r in rows(synth_db, "SELECT name, sql FROM sqlite_master WHERE type='index'")}
    assert "ON \"posttagrelation\" (\"post_id\")" in indexes["posttagrelation_post_id"]
    assert "ON \"posttagrelation\" (\"tag_id\")" in indexes["posttagrelation_tag_id"]
    assert indexes["tag_name"].startswith("CREATE UNIQUE INDEX")


def test_bundled_tag_subset_is_small_licensed_and_has_the_tags_captions_need():
    assert SUBSET_PATH.stat().st_size < 300_000
    licence = SUBSET_PATH.with_name("danbooru_tags.LICENSE").read_text()
    assert "MIT License" in licence and "Dominik Reh" in licence
    with open(SUBSET_PATH, newline="") as f:
        tags = {r["name"]: int(r["category"]) for r in csv.DictReader(f)}
    assert PEOPLE_COUNT <= tags.keys()
    assert {"^_^", ">_<", "o_o", "ask_(askzy)"} <= tags.keys()
    meta = [n for n, c in tags.items() if c == 5]
    for word in ("commentary", "translat", "request", "(medium)", "bad"):
        assert any(word in n for n in meta), word


# --- proportions -----------------------------------------------------------------------

def test_ids_have_gaps_and_cover_the_three_windows_proportionally(synth_db):
    ids = [r[0] for r in rows(synth_db, "SELECT id FROM post ORDER BY id")]
    assert ids[0] >= 1 and ids[-1] <= 7_900_000
    # Windows 1..2M, 2M..5M, 5M..7.9M span 1,999,999 / 3,000,000 / 2,900,000 of 7,899,999 ids:
    # 1500 posts -> about 379.7, 569.6, 550.6 each.
    counts = [sum(lo <= i < hi for i in ids) for lo, hi in ((0, 2_000_000), (2_000_000, 5_000_000),
                                                              (5_000_000, 8_000_000))]
    for got, want in zip(counts, (379.7, 569.6, 550.6)):
        assert abs(got - want) <= 1
    assert max(b - a for a, b in zip(ids, ids[1:])) > 1


def test_a_three_post_database_still_has_one_post_per_window(tmp_path):
    path = make_database(tmp_path / "tiny.db", 3, seed=0, progress=False)
    ids = [r[0] for r in rows(path, "SELECT id FROM post ORDER BY id")]
    assert ids[0] < 2_000_000 <= ids[1] < 5_000_000 <= ids[2]


def test_created_at_rises_with_id_in_varied_utc_offsets(synth_db):
    data = rows(synth_db, "SELECT id, created_at, updated_at FROM post ORDER BY id")
    assert all(ISO_MS.match(c) and ISO_MS.match(u) for _, c, u in data)
    utc = [datetime.fromisoformat(c).astimezone(timezone.utc) for _, c, _ in data]
    assert utc == sorted(utc)  # ids are upload order
    years = [int(c[:4]) for _, c, _ in data]
    assert min(years) == 2005 and max(years) == 2024
    assert len(set(years)) == 20  # every year 2005..2024 has uploads
    offsets = Counter(c[-6:] for _, c, _ in data)
    assert {"-05:00", "+09:00", "+00:00"} <= offsets.keys() and len(offsets) >= 5
    assert all(datetime.fromisoformat(u) >= datetime.fromisoformat(c) for _, c, u in data)


def test_ratings_flags_and_file_types_in_realistic_shares(synth_db):
    n = 1500
    ratings = dict(rows(synth_db, "SELECT rating, count(*) FROM post GROUP BY rating"))
    assert set(ratings) == {0, 1, 2, 3} and min(ratings.values()) > 0.05 * n
    (deleted, banned, gold, non_image, gold_urls), = rows(
        synth_db, "SELECT sum(is_deleted), sum(is_banned), sum(md5 IS NULL), "
        "sum(file_ext IN ('gif','mp4','webm','zip','swf')), sum(md5 IS NULL AND file_url IS NULL) FROM post")
    for count in (deleted, banned, gold, non_image):  # "a few percent" each
        assert 0.005 * n < count < 0.10 * n
    assert gold_urls == gold  # Gold-only posts have neither md5 nor file_url
    exts = Counter(e for e, in rows(synth_db, "SELECT file_ext FROM post"))
    assert exts["jpg"] + exts["png"] + exts["webp"] > 0.85 * n


def test_favourites_depend_on_rating_and_age(synth_db):
    by_rating = dict(rows(synth_db, "SELECT rating, avg(fav_count) FROM post GROUP BY rating"))
    assert by_rating[3] > by_rating[0]  # explicit gets more favourites than general
    old, = rows(synth_db, "SELECT avg(fav_count) FROM post WHERE id < 6000000")[0]
    new, = rows(synth_db, "SELECT avg(fav_count) FROM post WHERE id >= 7500000")[0]
    assert new < old / 2  # the newest posts have not gathered their favourites yet
    top, median = rows(synth_db, "SELECT max(fav_count), (SELECT fav_count FROM post ORDER BY fav_count "
                                 "LIMIT 1 OFFSET 750) FROM post")[0]
    assert top > 10 * median  # heavy tail
    assert rows(synth_db, "SELECT count(*) FROM post WHERE score != up_score + down_score "
                          "OR down_score > 0")[0][0] == 0


def test_image_sizes_have_danbooru_like_aspect_ratios(synth_db):
    sizes = rows(synth_db, "SELECT image_width, image_height FROM post")
    portrait = sum(h > w for w, h in sizes)
    landscape = sum(w > h for w, h in sizes)
    square = sum(w == h for w, h in sizes)
    assert portrait > landscape > square > 0
    assert any(h >= 3 * w for w, h in sizes) and any(w >= 3 * h for w, h in sizes)
    assert all(600 <= max(w, h) <= 6000 for w, h in sizes)


def test_about_thirty_tags_per_post_with_people_count_and_general_tags(synth_db):
    per_post = rows(synth_db, "SELECT p.id, count(r.id), sum(t.type = 0), "
                              f"sum(t.name IN ({','.join('?' * len(PEOPLE_COUNT))})) "
                              "FROM post p JOIN posttagrelation r ON r.post_id = p.id "
                              "JOIN tag t ON t.id = r.tag_id GROUP BY p.id", *sorted(PEOPLE_COUNT))
    assert len(per_post) == 1500  # every post has tags
    assert 25 <= sum(r[1] for r in per_post) / 1500 <= 35
    assert all(r[2] > 0 for r in per_post)  # always some general tags
    assert sum(r[3] > 0 for r in per_post) > 0.7 * 1500  # usually a people-count tag
    by_type = dict(rows(synth_db, "SELECT t.type, count(DISTINCT r.post_id) FROM posttagrelation r "
                                  "JOIN tag t ON t.id = r.tag_id GROUP BY t.type"))
    for tag_type in (1, 2, 3):  # artist, character, copyright: often
        assert by_type[tag_type] > 0.5 * 1500
    assert 0.2 * 1500 < by_type[4] < 1500  # meta: sometimes
    assert rows(synth_db, "SELECT count(*) FROM (SELECT post_id, tag_id FROM posttagrelation "
                          "GROUP BY 1, 2 HAVING count(*) > 1)")[0][0] == 0


# --- archives ----------------------------------------------------------------------------

def test_webp4m_archives_hold_one_picture_per_image_post(synth_demo):
    db_path, images_dir = synth_demo
    posts = {r[0]: r[1:] for r in rows(db_path, "SELECT id, image_width, image_height, file_ext, md5 "
                                                "FROM post")}
    members = tar_members(images_dir)
    tars = {p.name for p in images_dir.iterdir()}
    assert all(re.fullmatch(r"data-[01]\d{3}\.tar", t) for t in tars)
    assert {t[5] for t in tars} == {"0", "1"}  # both data-0NNN and data-1NNN occur
    for post_id, (tar_name, member, data) in members.items():
        width, height, ext, md5 = posts[post_id]
        # bucket: data-0NNN below id 5,000,000, data-1NNN from it; NNN = id % 1000
        assert tar_name == f"data-{int(post_id >= 5_000_000)}{post_id % 1000:03d}.tar"
        assert member == f"{post_id}.webp"
        assert ext not in NON_IMAGE_EXTS and md5 is not None
        img = Image.open(io.BytesIO(data))
        img.load()
        assert img.format == "WEBP" and max(img.size) == 64
        # aspect kept: each side is the post's side * 64 / longest side, rounded
        assert abs(img.width - width * 64 / max(width, height)) <= 0.5
        assert abs(img.height - height * 64 / max(width, height)) <= 0.5
    image_posts = {i for i, (_, _, ext, md5) in posts.items() if ext not in NON_IMAGE_EXTS and md5}
    assert members.keys() <= image_posts
    missing = image_posts - members.keys()
    assert 0 < len(missing) < 0.1 * len(image_posts)  # a few ordinary posts are "not in archives"
    counts = json.loads((images_dir.parent / "synth.json").read_text())["counts"]
    assert counts["images"] == len(members) and counts["left_out"] == len(missing)


def test_pictures_show_the_people_tag_shape_in_the_hair_colour(synth_demo):
    db_path, images_dir = synth_demo
    # A solo 1girl post with blonde_hair (and no other hair colour) gets one circle in the
    # middle filled with the blonde colour (240, 210, 80).
    hair = rows(db_path, "SELECT r.post_id, group_concat(t.name) FROM posttagrelation r JOIN tag t "
                         "ON t.id = r.tag_id WHERE t.name LIKE '%\\_hair' ESCAPE '\\' "
                         "OR t.name IN ('1girl', 'solo') GROUP BY r.post_id")
    members = tar_members(images_dir)
    checked = 0
    for post_id, names in hair:
        names = set(names.split(","))
        if post_id in members and names >= {"1girl", "solo", "blonde_hair"} and \
                len([n for n in names if n.endswith("_hair")]) == 1:
            img = Image.open(io.BytesIO(members[post_id][2])).convert("RGB")
            centre = img.getpixel((img.width // 2, img.height // 2))
            assert all(abs(a - b) <= 30 for a, b in zip(centre, (240, 210, 80))), centre
            checked += 1
    assert checked >= 3


def test_nyanko_and_folder_layouts_use_the_posts_own_file_types(tmp_path, synth_db):
    counts = make_archives(synth_db, tmp_path / "nyanko", seed=0, max_side=32, limit=60,
                           layout="nyanko", progress=False)
    members = tar_members(tmp_path / "nyanko")
    assert counts["images"] == len(members) == 60
    exts = dict(rows(synth_db, "SELECT id, file_ext FROM post"))
    pil_format = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
    for post_id, (tar_name, member, data) in members.items():
        folder, prefix = ("recent", 1) if post_id >= 5_000_000 else ("original", 0)
        assert tar_name == f"{folder}/data-{prefix}{post_id % 1000:03d}.tar"
        assert member == f"{post_id}.{exts[post_id]}"
        assert Image.open(io.BytesIO(data)).format == pil_format[exts[post_id]]
    assert {t.split("/")[0] for t, _, _ in members.values()} == {"original", "recent"}

    make_archives(synth_db, tmp_path / "folder", seed=0, max_side=32, limit=20, layout="folder",
                  progress=False)
    files = sorted((tmp_path / "folder").iterdir())
    assert len(files) == 20
    for f in files:
        post_id, ext = f.name.split(".")
        assert ext == exts[int(post_id)] and Image.open(f).format == pil_format[ext]


def test_images_limit_spreads_pictures_over_the_id_range(tmp_path, synth_db):
    counts = make_archives(synth_db, tmp_path / "lim", seed=0, max_side=16, limit=12, progress=False)
    ids = sorted(tar_members(tmp_path / "lim"))
    assert counts["images"] == 12 == len(ids)
    assert ids[0] < 2_000_000 and ids[-1] >= 5_000_000  # evenly spread, not the first 12
    assert counts["over_limit"] > 1000


# --- safety and errors -------------------------------------------------------------------

def test_make_demo_reuses_a_complete_folder_and_never_replaces_a_foreign_database(tmp_path):
    out = tmp_path / "demo"
    db_path, images_dir = make_demo(out, n_posts=40, seed=0, max_side=16, progress=False)
    before = {p: p.stat().st_mtime_ns for p in [db_path, *images_dir.iterdir()]}
    make_demo(out, n_posts=40, seed=0, max_side=16, progress=False)
    assert {p: p.stat().st_mtime_ns for p in [db_path, *images_dir.iterdir()]} == before
    # an interrupted build (synth.json says incomplete) is rebuilt, not refused
    (out / "synth.json").write_text(json.dumps({"args": {}, "complete": False}))
    make_demo(out, n_posts=40, seed=0, max_side=16, progress=False)
    assert json.loads((out / "synth.json").read_text())["complete"] is True
    # other arguments: rebuilt, and no tar of the old folder is left behind
    make_folder(out, 40, seed=1, max_side=16, progress=False)
    assert json.loads((out / "synth.json").read_text())["args"]["seed"] == 1
    ids = {r[0] for r in rows(db_path, "SELECT id FROM post")}
    assert tar_members(images_dir).keys() <= ids

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "danbooru2023.db").write_bytes(b"user data")
    with pytest.raises(HakubooruError, match="not made by the synthetic generator"):
        make_demo(foreign, n_posts=40, progress=False)
    assert (foreign / "danbooru2023.db").read_bytes() == b"user data"


def test_bad_arguments_give_one_line_errors(tmp_path, synth_db):
    with pytest.raises(HakubooruError, match="already exists"):
        make_database(synth_db, 10, progress=False)
    with pytest.raises(HakubooruError, match="positive integer"):
        make_database(tmp_path / "x.db", 0, progress=False)
    with pytest.raises(HakubooruError, match="fit the id range"):  # ids 1..7,899,999 only
        make_database(tmp_path / "x.db", 8_000_000, progress=False)
    assert not (tmp_path / "x.db").exists()
    with pytest.raises(HakubooruError, match="unknown archive layout"):
        make_archives(synth_db, tmp_path / "img", layout="zip")


def test_command_line_writes_the_folder_and_reports_errors_in_one_line(tmp_path):
    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, "-m", "hakubooru.synth", "--posts", "30", "--out", str(out),
                           "--image-side", "16", "--seed", "3"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    marker = json.loads((out / "synth.json").read_text())
    assert marker["args"]["posts"] == 30 and marker["args"]["seed"] == 3
    assert rows(out / "danbooru2023.db", "SELECT count(*) FROM post")[0][0] == 30
    assert any((out / "images").glob("data-*.tar"))

    bad = subprocess.run([sys.executable, "-m", "hakubooru.synth", "--posts", "0",
                          "--out", str(tmp_path / "b")],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: number of posts must be a positive integer, got 0"]
