"""Selector operations against ids worked out by hand on a small hand-written database."""
import subprocess
import sys

import numpy as np
import pytest

from hakubooru import HakubooruError, Selector, load_selection, open_db
from hakubooru.db import Post
from hakubooru.shardwriter import file_checksum
from hakubooru.rng import hash64, splitmix64
from tests.helpers.handdb import post, write_db

# id, and what is special about it (see POSTS below)
#   1 general jpg, tags 1girl long_hair highres      2 deleted png
#   3 Gold-only (no md5/url)                         4 explicit gif (not an image)
#   5 banned webp                                    10 mp4 (not an image)
#  20 sensitive png, tags 1girl solo miku vocaloid   2_000_000 tags 1girl miku
#  2_000_001 explicit webp                           4_999_999 png, tag highres
#  5_000_000 sensitive, tags long_hair solo          7_000_000 avif, created 2010-12-31T23:30-05:00
POSTS = [
    post(1, created="2006-01-01T00:00:00.000+09:00", fav=50, score=30, w=3000, h=1000),
    post(2, rating=1, deleted=1, ext="png"),
    post(3, rating=2, gold=True),
    post(4, rating=3, ext="gif"),
    post(5, banned=1, ext="webp"),
    post(10, ext="mp4"),
    post(20, rating=1, ext="png", score=11),
    post(2_000_000),
    post(2_000_001, rating=3, ext="webp"),
    post(4_999_999, ext="png", w=500, h=500),
    post(5_000_000, rating=1),
    post(7_000_000, ext="avif", created="2010-12-31T23:30:00.000-05:00"),
]
ALL = [1, 2, 3, 4, 5, 10, 20, 2_000_000, 2_000_001, 4_999_999, 5_000_000, 7_000_000]
TAGS = [(1, "1girl", 0, 100), (2, "long_hair", 0, 50), (3, "solo", 0, 80),
        (4, "hatsune_miku", 2, 30), (5, "vocaloid", 3, 40), (6, "highres", 4, 90)]
RELATIONS = [(1, 1), (1, 2), (1, 6), (20, 1), (20, 3), (20, 4), (20, 5),
             (2_000_000, 1), (2_000_000, 4), (5_000_000, 2), (5_000_000, 3), (4_999_999, 6)]


@pytest.fixture(scope="module")
def dbfile(tmp_path_factory):
    return write_db(tmp_path_factory.mktemp("hand") / "hand.db", POSTS, TAGS, RELATIONS)


@pytest.fixture(scope="module")
def db(dbfile):
    return open_db(dbfile)


def ids(sel, db):
    out = sel.ids(db)
    assert out.dtype == np.int64 and np.all(np.diff(out) > 0), "ids must be sorted int64, unique"
    assert sel.count(db) == len(out)
    return out.tolist()


def test_sources(db):
    assert ids(Selector.all(), db) == ALL
    assert ids(Selector.id_range(0, 2_000_000), db) == [1, 2, 3, 4, 5, 10, 20]
    assert ids(Selector.id_range(2_000_000, 5_000_000), db) == [2_000_000, 2_000_001, 4_999_999]
    assert ids(Selector.id_range(5_000_000), db) == [5_000_000, 7_000_000]
    # explicit ids: duplicates merged, non-existent 999 dropped, result sorted
    assert ids(Selector.ids([20, 1, 999, 20]), db) == [1, 20]


def test_filters(db):
    a = Selector.all()
    assert ids(a.exclude_deleted(), db) == [i for i in ALL if i != 2]
    assert ids(a.exclude_gold(), db) == [i for i in ALL if i != 3]
    assert ids(a.exclude_banned(), db) == [i for i in ALL if i != 5]
    assert ids(a.images_only(), db) == [i for i in ALL if i not in (4, 10)]  # gif, mp4
    assert ids(a.images_only(exts=("png",)), db) == [2, 20, 4_999_999]
    assert ids(a.rating("explicit"), db) == [4, 2_000_001]
    assert ids(a.rating("sensitive", "questionable"), db) == [2, 3, 20, 5_000_000]
    assert ids(a.where(Post.score > 10), db) == [1, 20]  # scores 30 and 11; others 5
    assert ids(a.size(min_width=2000), db) == [1]
    assert ids(a.size(max_pixels=500 * 500), db) == [4_999_999]
    # 7_000_000 was uploaded 2010-12-31T23:30-05:00 = 2011-01-01T04:30Z: "after 2011" in UTC
    assert 7_000_000 in ids(a.created(after="2011-01-01"), db)
    assert ids(a.created(before="2007-01-01"), db) == [1]


def test_filters_over_materialised_sets(db):
    sel = Selector.ids([1, 2, 3, 4, 20]).exclude_deleted().exclude_gold().images_only()
    assert ids(sel, db) == [1, 20]


def test_tags(db):
    assert ids(Selector.tags(all=["1girl"]), db) == [1, 20, 2_000_000]
    assert ids(Selector.tags(all=["1girl", "solo"]), db) == [20]
    assert ids(Selector.tags(any=["long_hair", "hatsune_miku"]), db) == [1, 20, 2_000_000, 5_000_000]
    assert ids(Selector.tags(all=["1girl"], none=["hatsune_miku"]), db) == [1]
    assert ids(Selector.all() - Selector.tags(any=["1girl", "highres"]), db) == \
        [2, 3, 4, 5, 10, 2_000_001, 5_000_000, 7_000_000]


def test_unknown_tags_listed(db):
    with pytest.raises(HakubooruError, match=r"unknown tag\(s\): blue_hiar, nope"):
        Selector.tags(all=["1girl", "nope"], none=["blue_hiar"]).ids(db)
    with pytest.raises(HakubooruError, match="list of tag names"):
        Selector.tags(all="1girl")


def test_set_algebra(db):
    low, high = Selector.id_range(0, 2_000_000), Selector.id_range(5_000_000)
    girls = Selector.tags(all=["1girl"])
    assert ids(low | high, db) == [1, 2, 3, 4, 5, 10, 20, 5_000_000, 7_000_000]
    assert ids(low & girls, db) == [1, 20]
    assert ids(girls - low, db) == [2_000_000]
    # the same algebra over materialised operands (numpy path) gives the same answers
    low_ids = Selector.ids([1, 2, 3, 4, 5, 10, 20])
    assert ids(low_ids | high, db) == [1, 2, 3, 4, 5, 10, 20, 5_000_000, 7_000_000]
    assert ids(low_ids & girls, db) == [1, 20]
    assert ids(girls - low_ids, db) == [2_000_000]


def test_difference_with_null_conditions(db):
    # every hand-made post has parent_id NULL, so `parent_id > 0` is NULL, not false, for all of
    # them: no post is a child, and "all minus children" must be every post (SQL's NOT NULL is
    # NULL, which would drop them all)
    children = Selector.all().where(Post.parent_id > 0)
    assert ids(children, db) == []
    assert ids(Selector.all() - children, db) == ALL
    assert ids(Selector.ids(ALL) - children, db) == ALL  # the numpy path agrees


def test_bad_arguments_are_clear(db):
    for bad in (lambda: Selector.ids([1.5, 2]), lambda: Selector.ids(["x"]),
                lambda: Selector.id_range("a", 5), lambda: Selector.all().sample(5, seed=1.5),
                lambda: Selector.all().images_only(exts="png"),
                lambda: Selector.all().created(after="yesterday")):
        with pytest.raises(HakubooruError):
            bad()


def test_splitmix64_reference_vectors():
    # published splitmix64 outputs for a generator started at state 0
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    assert splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4


def test_sample_is_bottom_n_by_hash(db):
    # by definition: the n candidates with the smallest hash64(seed, id)
    expected = sorted(sorted(ALL, key=lambda i: (hash64(7, i), i))[:5])
    assert ids(Selector.all().sample(5, seed=7), db) == expected
    assert len(set(expected)) == 5


def test_sample_errors_and_allow_fewer(db):
    with pytest.raises(HakubooruError, match="more posts than the 7 available"):
        Selector.id_range(0, 2_000_000).sample(8, seed=1).ids(db)
    assert ids(Selector.id_range(0, 2_000_000).sample(8, seed=1, allow_fewer=True), db) == \
        [1, 2, 3, 4, 5, 10, 20]


BIG = list(range(10, 200_000, 7))


def _big_db(path, order):
    posts = [post(i) for i in order]
    return write_db(path, posts, TAGS, [])


def test_sample_independent_of_row_order_and_process(tmp_path):
    fwd = open_db(_big_db(tmp_path / "fwd.db", BIG))
    rev = open_db(_big_db(tmp_path / "rev.db", BIG[::-1]))
    sel = Selector.id_range(1000, 150_000).sample(2_000, seed=123)
    a = sel.ids(fwd)
    assert np.array_equal(a, sel.ids(rev))
    assert len(np.unique(a)) == 2_000  # without replacement
    assert not np.array_equal(a, Selector.id_range(1000, 150_000).sample(2_000, seed=124).ids(fwd))
    code = ("import sys; from hakubooru import Selector, open_db; "
            "sys.stdout.write(','.join(map(str, Selector.id_range(1000, 150_000)"
            f".sample(2_000, seed=123).ids(open_db(r'{tmp_path / 'rev.db'}')).tolist())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == ",".join(map(str, a.tolist()))


def test_explain_counts_every_node(db):
    sel = (Selector.id_range(0, 2_000_000).sample(4, seed=3) | Selector.id_range(5_000_000)) \
        .exclude_deleted()
    text = sel.explain(db)
    lines = text.splitlines()
    assert lines[0].startswith("exclude_deleted")
    assert "id_range(0, 2000000)  [7]" in text and "sample(n=4, seed=3)  [4]" in text
    assert "id_range(5000000, None)  [2]" in text and "union  [6]" in text


def test_query_is_peewee(db):
    q = Selector.all().rating("explicit").query(db)
    assert [p.id for p in q] == [4, 2_000_001]
    assert [p.rating for p in q] == ["explicit", "explicit"]
    q2 = Selector.ids([20, 1]).query(db)
    assert [p.id for p in q2] == [1, 20]


def test_save_load_roundtrip(db, tmp_path):
    sel = Selector.all().sample(6, seed=9).images_only()
    saved = sel.save(tmp_path / "sel.parquet", db)
    back = load_selection(tmp_path / "sel.parquet")
    assert np.array_equal(back.ids, saved.ids)
    assert back.expression == sel.to_dict()
    assert back.meta["seeds"] == [9]
    back.check(db)  # same database: fine


def test_bad_selection_files(db, tmp_path):
    with pytest.raises(HakubooruError, match="selection file not found"):
        load_selection(tmp_path / "missing.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(HakubooruError, match="not a Parquet selection"):
        load_selection(tmp_path / "junk.parquet")
    other = open_db(_big_db(tmp_path / "other.db", [1, 2, 3]))
    saved = Selector.all().save(tmp_path / "sel.parquet", db)
    with pytest.raises(HakubooruError, match="another database"):
        saved.check(other)


def test_selection_leaves_database_untouched(dbfile):
    before = file_checksum(dbfile)
    db = open_db(dbfile)
    (Selector.all().sample(5, seed=1) | Selector.tags(any=["solo"])).exclude_deleted().ids(db)
    db.close()
    assert file_checksum(dbfile) == before


def test_select_command(dbfile, tmp_path, capsys):
    from hakubooru.cli import main
    out = tmp_path / "s.parquet"
    rc = main(["select", "--db", str(dbfile), "--out", str(out),
               "--expr", 'Selector.all().rating("explicit").exclude_deleted()'])
    assert rc == 0 and load_selection(out).ids.tolist() == [4, 2_000_001]
    rc = main(["select", "--db", str(dbfile), "--expr", "Selector.al()"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: cannot evaluate --expr: AttributeError")
    assert len(err.strip().splitlines()) == 1


def test_unwritable_output_is_one_line(dbfile, capsys):
    from hakubooru.cli import main
    rc = main(["select", "--db", str(dbfile), "--expr", "Selector.all()",
               "--out", "/proc/no-such-dir/sel.parquet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "/proc/no-such-dir" in err


def test_ids_error_names_the_bad_value():
    with pytest.raises(HakubooruError, match=r"integer post ids, got 'x'$"):
        Selector.ids([1, 2, "x"])
    with pytest.raises(HakubooruError, match=r"got 2\.5$"):
        Selector.ids([1, 2.5])
    with pytest.raises(HakubooruError, match=r"got True$"):
        Selector.ids([True])


def test_seeds_outside_64_bits_are_refused(db):
    for seed in (2**64, 2**70, -1):
        with pytest.raises(HakubooruError, match=rf"seed must be in \[0, 2\*\*64\), got {seed}"):
            Selector.all().sample(3, seed=seed)
    # the top of the range is a seed of its own: hash64 by hand, not the ids of seed 0
    top = sorted(sorted(ALL, key=lambda i: (hash64(2**64 - 1, i), i))[:3])
    assert ids(Selector.all().sample(3, seed=2**64 - 1), db) == top


def test_tags_none_with_several_tags(db):
    # 1girl: posts 1 (also long_hair), 20 (also vocaloid), 2_000_000; each none tag drops its own
    assert ids(Selector.tags(all=["1girl"], none=["long_hair", "vocaloid"]), db) == [2_000_000]
    assert ids(Selector.tags(all=["1girl"], none=["long_hair"]), db) == [20, 2_000_000]
    assert ids(Selector.tags(all=["1girl"], none=["vocaloid"]), db) == [1, 2_000_000]
    # none= alone: every post without 1girl and without highres (1, 20, 2_000_000, 4_999_999 go)
    assert ids(Selector.tags(none=["1girl", "highres"]), db) == \
        [2, 3, 4, 5, 10, 2_000_001, 5_000_000, 7_000_000]


def test_sample_of_exactly_all_candidates(db):
    # 7 posts below id 2_000_000: n = 7 takes them all, without allow_fewer
    assert ids(Selector.id_range(0, 2_000_000).sample(7, seed=1), db) == [1, 2, 3, 4, 5, 10, 20]
    assert ids(Selector.id_range(0, 2_000_000).sample(0, seed=1), db) == []


def test_null_flags_are_not_flags(tmp_path):
    # posts whose is_deleted / is_banned are NULL are neither deleted nor banned; a NULL rating
    # or file_ext matches no rating and no image extension
    rows = [post(1), dict(post(2), is_deleted=None, is_banned=None), post(3, deleted=1, banned=1),
            dict(post(4), rating=None, file_ext=None)]
    nulls = open_db(write_db(tmp_path / "nulls.db", rows, TAGS, []))
    for source in (Selector.all(), Selector.ids([1, 2, 3, 4])):  # SQL and materialised paths
        assert ids(source.exclude_deleted(), nulls) == [1, 2, 4]
        assert ids(source.exclude_banned(), nulls) == [1, 2, 4]
        assert ids(source.rating("general"), nulls) == [1, 2, 3]
        assert ids(source.images_only(), nulls) == [1, 2, 3]


def test_size_bounds_are_inclusive(db):
    # post 1 is 3000x1000, 4_999_999 is 500x500, every other post 1000x800
    assert 1 in ids(Selector.all().size(max_width=3000), db)
    assert 1 not in ids(Selector.all().size(max_width=2999), db)
    assert ids(Selector.all().size(min_width=3000, min_height=1000, max_height=1000), db) == [1]
    assert 4_999_999 in ids(Selector.all().size(min_pixels=500 * 500, max_pixels=500 * 500), db)


def test_ids_from_any_iterable(db):
    assert ids(Selector.ids(i for i in (20, 1)), db) == [1, 20]
    assert ids(Selector.ids(range(1, 4)), db) == [1, 2, 3]


def test_explain_draws_the_tree(db):
    sel = (Selector.id_range(0, 2_000_000).sample(4, seed=3) | Selector.id_range(5_000_000)) \
        .exclude_deleted()
    # the union's 6 posts less post 2 (deleted), which seed 3's sample of 4 holds
    assert 2 in ids(Selector.id_range(0, 2_000_000).sample(4, seed=3), db)
    assert sel.explain(db).splitlines() == [
        "exclude_deleted  [5]",
        "└─ union  [6]",
        "   ├─ sample(n=4, seed=3)  [4]",
        "   │  └─ id_range(0, 2000000)  [7]",
        "   └─ id_range(5000000, None)  [2]",
    ]


def test_seed_zero_is_a_seed(db):
    expected = sorted(sorted(ALL, key=lambda i: (hash64(0, i), i))[:3])
    assert ids(Selector.all().sample(3, seed=0), db) == expected


def test_filters_of_an_empty_set(db):
    assert ids(Selector.ids([]).exclude_deleted(), db) == []
    assert ids(Selector.ids([999]).images_only(), db) == []  # no such post


def test_selection_with_unreadable_metadata(db, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({"id": pa.array([1, 20], pa.int64())}).replace_schema_metadata({"hakubooru": "{not json"})
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(HakubooruError, match=r"bad.parquet: damaged selection metadata \(JSONDecodeError"):
        load_selection(tmp_path / "bad.parquet")
