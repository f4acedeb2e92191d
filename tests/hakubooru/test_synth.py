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
from tests.helpers import REPO

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


def test_command_line_defaults_and_required_options(capsys):
    """docs/synth.md: --seed defaults to 0, --image-side to 128, pictures are written unless
    --no-images, layout webp4m; --posts and --out are required (argparse's exit 2)."""
    from hakubooru.cli import make_parser

    parser, _ = make_parser()
    args = parser.parse_args(["synth", "--posts", "5", "--out", "o"])
    assert (args.posts, args.out, args.seed, args.image_side, args.no_images, args.images_limit,
            args.layout, args.force) == (5, Path("o"), 0, 128, False, None, "webp4m", False)
    for argv, missing in ((["--out", "o"], "--posts"), (["--posts", "5"], "--out")):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["synth", *argv])
        assert e.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1].endswith(
            f"error: the following arguments are required: {missing}")


def test_bad_arguments_seed_post_count_and_image_side(tmp_path, synth_db):
    """One-line errors: a negative seed; more posts than ids 1..7,899,999 (docs/synth.md);
    an image side below 8 px. 8 px itself is fine, and missing parent folders are created."""
    with pytest.raises(HakubooruError, match=r"^seed must be a non-negative integer, got -1$"):
        make_database(tmp_path / "x.db", 5, seed=-1, progress=False)
    with pytest.raises(HakubooruError) as e:
        make_database(tmp_path / "x.db", 7_900_001, progress=False)
    assert str(e.value) == "at most 7,899,999 posts fit the id range 1..7,900,000, got 7,900,001"
    assert not (tmp_path / "x.db").exists()
    with pytest.raises(HakubooruError, match=r"^image side must be at least 8 pixels, got 7$"):
        make_archives(synth_db, tmp_path / "img", max_side=7, progress=False)
    deep = tmp_path / "a" / "b" / "images"
    counts = make_archives(synth_db, deep, seed=0, max_side=8, limit=2, progress=False)
    members = tar_members(deep)
    assert counts["images"] == len(members) == 2
    assert all(max(Image.open(io.BytesIO(data)).size) == 8 for _, _, data in members.values())


def _n_tags() -> int:
    """docs/synth.md: the tag table is the bundled subset's rows plus banned_artist."""
    with open(SUBSET_PATH, newline="") as f:
        return sum(1 for _ in csv.DictReader(f)) + 1


def test_database_summary_line_counts_and_mib(tmp_path, capsys):
    """With progress, make_database prints what it wrote: posts, tag relations, tags (the
    subset + banned_artist) and the file size in MiB (2**20 bytes)."""
    path = make_database(tmp_path / "s.db", 3, seed=0, progress=True)
    n_rel = rows(path, "SELECT count(*) FROM posttagrelation")[0][0]
    out = capsys.readouterr().out
    assert out.startswith(f"synth: 3 posts, {n_rel:,} tag relations, {_n_tags():,} tags -> {path} "
                          f"({path.stat().st_size / 2**20:,.1f} MiB) in ")


def test_tag_ids_are_a_permutation_of_one_to_t(synth_db):
    # docs/synth.md: tag ids are a seeded permutation of 1…T, not in popularity order
    ids = [r[0] for r in rows(synth_db, "SELECT id FROM tag ORDER BY popularity DESC, name")]
    assert sorted(ids) == list(range(1, _n_tags() + 1))
    assert ids != sorted(ids)


def test_people_count_groups_in_their_documented_shares(synth_db):
    # docs/synth.md: "1girl, solo" 45 % of posts (solo only comes with a people group, and
    # 1girl + solo only as that group), no_humans 4 %; 1,500 posts: a binomial sd of about 1.3
    # and 0.5 points, so ±5 and ±2.5 points are wide margins
    tagged = rows(synth_db, "SELECT r.post_id, group_concat(t.name) FROM posttagrelation r "
                            "JOIN tag t ON t.id = r.tag_id WHERE t.name IN ('1girl', 'solo', "
                            "'no_humans') GROUP BY r.post_id")
    names = [set(n.split(",")) for _, n in tagged]
    assert abs(sum(n >= {"1girl", "solo"} for n in names) / 1500 - 0.45) < 0.05
    assert abs(sum("no_humans" in n for n in names) / 1500 - 0.04) < 0.025


def test_python_api_defaults_are_the_documented_ones():
    # docs/synth.md: make_demo("demo", n_posts=2000, seed=0, max_side=128); the CLI's defaults
    # (seed 0, side 128, pictures, webp4m, no --force) are make_folder's
    import inspect

    def defaults(f):
        return {k: p.default for k, p in inspect.signature(f).parameters.items()
                if p.default is not inspect.Parameter.empty}

    assert defaults(make_demo) == {"n_posts": 2000, "seed": 0, "max_side": 128, "progress": True}
    assert defaults(make_folder) == {"seed": 0, "max_side": 128, "images": True, "images_limit": None,
                                     "layout": "webp4m", "force": False, "progress": True}


def test_created_at_is_the_id_interpolated_between_the_time_knots(synth_db):
    # docs/synth.md: created_at follows the id, interpolated between knots (posts.TIME_KNOTS,
    # UTC); the draw is id + U[0, 1), so each post's UTC time lies between the times of id and
    # id + 1 — whatever UTC offset (also +05:30) it is written in
    import numpy as np

    from hakubooru.synth.posts import TIME_KNOTS
    knot_ids = [k for k, _ in TIME_KNOTS]
    knot_ms = [datetime.fromisoformat(t).replace(tzinfo=timezone.utc).timestamp() * 1000
               for _, t in TIME_KNOTS]
    data = rows(synth_db, "SELECT id, created_at FROM post")
    assert any(c.endswith("+05:30") for _, c in data)
    for post_id, created in data:
        utc_ms = datetime.fromisoformat(created).timestamp() * 1000
        lo, hi = np.interp([post_id, post_id + 1], knot_ids, knot_ms)
        assert lo - 1 <= utc_ms <= hi + 1, (post_id, created)


def test_file_sizes_are_bytes_of_a_picture_of_that_size(synth_db):
    # file_size is a compressed file of image_width × image_height pixels: a fraction of a
    # byte to a few bytes per pixel (jpg/webp well under 1, png and video above)
    sizes = rows(synth_db, "SELECT file_size * 1.0 / (image_width * image_height) FROM post")
    per_pixel = sorted(r[0] for r in sizes)
    assert 0.2 < per_pixel[len(per_pixel) // 2] < 1.5
    assert 0.02 < per_pixel[0] and per_pixel[-1] < 10


def test_archive_counts_and_the_left_out_rule(synth_demo):
    # docs/synth.md: no picture for non-image posts, for Gold-only ones (no md5), and for the
    # others whose uniform(hash64(seed, 7), id) is below 3 % ("not in the archives")
    from hakubooru.rng import hash64, uniform
    db_path, images_dir = synth_demo
    posts = rows(db_path, "SELECT id, file_ext, md5 IS NULL FROM post")
    image_ext = {"jpg", "png", "webp"}
    counts = json.loads((images_dir.parent / "synth.json").read_text())["counts"]
    assert counts["non_image"] == sum(e not in image_ext for _, e, _ in posts)
    assert counts["gold"] == sum(e in image_ext and gold for _, e, gold in posts)
    candidates = [i for i, e, gold in posts if e in image_ext and not gold]
    left_out = {i for i in candidates if uniform(hash64(0, 7), i) < 0.03}
    assert set(tar_members(images_dir)) == set(candidates) - left_out
    assert counts["left_out"] == len(left_out) and counts["over_limit"] == 0


def test_picture_shape_in_the_exact_hair_colour_on_a_gradient():
    # docs/synth.md: 1girl is a circle in the middle filled with the *_hair colour (blonde
    # (240, 210, 80)); the background is a gradient: along the diagonal from the top-left to
    # the bottom-right corner every channel changes one way only
    from hakubooru.synth.images import render
    img = render(7, 640, 480, {"1girl", "solo", "blonde_hair"}, seed=0, max_side=64)
    assert img.size == (64, 48) and img.getpixel((32, 24)) == (240, 210, 80)
    for post_id in range(1, 6):
        plain = render(post_id, 100, 100, set(), seed=0, max_side=40)
        diagonal = [plain.getpixel((i, i)) for i in range(40)]
        for channel in range(3):
            values = [p[channel] for p in diagonal]
            assert values == sorted(values) or values == sorted(values, reverse=True), post_id


def test_subset_keeps_the_top_tags_of_each_category(tmp_path, capsys):
    # docs/synth.md: the subset is the top 3,000 general, 1,500 artist, 600 copyright, 1,500
    # character and all meta tags (Danbooru categories 0, 1, 3, 4, 5) by post count, plus tags
    # the captioning rules need (here 1girl, general but below the cut); rows of other
    # categories and short rows are dropped
    from hakubooru.synth.subset import main as subset_main
    full = tmp_path / "danbooru_tags.csv"
    sizes = {0: 3002, 1: 1502, 3: 601, 4: 1502, 5: 3}
    lines = [f"c{cat}_{i:04d},{cat},{10_000 - i},alias" for cat, n in sizes.items() for i in range(n)]
    lines += ["1girl,0,1,", "deprecated_thing,2,99999,", "short_row,0"]
    full.write_text("\n".join(reversed(lines)) + "\n")
    out = tmp_path / "subset.csv"
    subset_main([str(full), "--out", str(out)])
    assert capsys.readouterr().out == f"wrote 6604 tags to {out}\n"  # 3000+1 + 1500 + 600 + 1500 + 3
    with open(out, newline="") as f:
        got = [(r["name"], int(r["category"]), int(r["post_count"])) for r in csv.DictReader(f)]
    want = []
    for cat, top in ((0, 3000), (1, 1500), (3, 600), (4, 1500), (5, 3)):
        want += [(f"c{cat}_{i:04d}", cat, 10_000 - i) for i in range(top)]  # most used first
        if cat == 0:
            want.append(("1girl", 0, 1))
    assert got == want
    with pytest.raises(SystemExit):
        subset_main(["--help"])
    assert "Rebuild ``danbooru_tags_subset.csv`` (the tags the generator draws from) from the " \
           "full list." in " ".join(capsys.readouterr().out.split())


def test_complete_folder_is_left_alone_and_says_so(tmp_path, capsys):
    # docs/synth.md: a folder complete for the same arguments is left alone ("already complete")
    out = tmp_path / "s"
    make_folder(out, 5, images=False, progress=False)
    capsys.readouterr()
    make_folder(out, 5, images=False, progress=False)
    assert capsys.readouterr().out == ""
    make_folder(out, 5, images=False, progress=True)
    assert capsys.readouterr().out == f"synth: {out} is already complete for these arguments; nothing to do\n"


def test_a_one_post_database_is_allowed(tmp_path):
    """The documented lower bound: any positive number of posts (1 is the smallest)."""
    path = make_database(tmp_path / "one.db", 1, seed=0, progress=False)
    assert len(rows(path, "SELECT id FROM post")) == 1


def test_subset_reads_rows_without_the_aliases_column(tmp_path):
    """danbooru_tags.csv rows are name,category,post_count[,aliases]: a row without aliases
    (three fields) is a tag like any other; shorter rows are skipped."""
    from hakubooru.synth.subset import write_subset

    full = tmp_path / "tags.csv"
    full.write_text('1girl,0,100,"1girls"\nsolo,0,90\nbroken,0\n', encoding="utf-8")
    out = tmp_path / "subset.csv"
    write_subset(full, out)
    names = [r["name"] for r in csv.DictReader(out.open(encoding="utf-8"))]
    assert "1girl" in names and "solo" in names and "broken" not in names
