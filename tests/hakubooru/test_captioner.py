"""Captioner: captions and records of hand-made posts, worked out by hand from recipe.md §2."""
import json

import pyarrow.parquet as pq
import pytest

from hakubooru import HakubooruError, open_db
from hakubooru.captioner import Captioner
from hakubooru.shardwriter import file_checksum
from hakubooru.tagrules import escape_parentheses, format_tag
from tests.helpers import REPO
from tests.helpers.handdb import post, write_db

G, A, C, S, M = 0, 1, 2, 3, 4  # tag types: general, artist, character, copyright, meta
TAGS = [  # (id, name, type, popularity)
    (1, "1girl", G, 1000), (2, "solo", G, 900), (3, "^_^", G, 50), (4, ">_<", G, 40),
    (5, "o_o", G, 30), (6, "long_hair", G, 800), (7, "ask_(askzy)", A, 20),
    (8, "banned_artist", A, 5), (9, "hatsune_miku", C, 500), (10, "vocaloid", S, 600),
    (11, "highres", M, 700), (12, "commentary_request", M, 300), (13, "translated", M, 100),
    (14, "2boys", G, 200), (15, "multiple_girls", G, 300), (16, "2girls", G, 400),
    (17, "absurdres", M, 650), (18, "smile", G, 850), (19, "kagamine_rin", C, 300),
    (20, "some_artist", A, 50),
]
POSTS = [
    post(1, rating=0, fav=95, created="2010-12-31T23:30:00.000-05:00"),
    post(2, rating=1, fav=75, created="2011-01-01T00:30:00.000+09:00"),
    post(3, rating=3, fav=10, created="2016-05-05T12:00:00.000-04:00"),
    post(4, rating=2, fav=31, created="2019-03-03T03:03:03.000-05:00"),
    post(5, rating=0, fav=0, created="2004-06-01T10:00:00.000-04:00"),
    post(6, rating=0, fav=46, created="2025-02-01T10:00:00.000-05:00"),
    post(7, rating=1, fav=61, created=None),
    post(8_000_000, rating=0, fav=100, created="2023-07-07T07:07:07.000+09:00"),
]
RELATIONS = (
    [(1, t) for t in (2, 1, 6, 9, 10, 7, 8, 11, 12, 3, 18, 2)]  # 'solo' twice
    + [(2, t) for t in (14, 15, 16, 19, 9, 10, 4, 5, 13, 17)]
    + [(3, t) for t in (9, 20, 11)]
    + [(4, t) for t in (1, 999, 5)]  # tag 999 is not in the tag table
    + [(8_000_000, 1)]
)
# Fixed thresholds, the same for every rating; a post gets the highest level whose
# threshold its fav_count is strictly above.
TABLE = {r: {90: 90, 75: 75, 60: 60, 45: 45, 30: 30, 10: 10}
         for r in ("general", "sensitive", "questionable", "explicit")}

# Expected captions, from the rules:
# keep = people-count tags (fixed order), characters, copyrights, artists (each by popularity);
# then general (by popularity), quality, year, meta, rating; '_' -> ' ' unless <= 3 characters.
EXPECTED = {
    # banned_artist and commentary_request dropped; 'solo' listed twice in the relations -> once;
    # general by popularity: solo 900, smile 850, long_hair 800, ^_^ 50; fav 95 > 90: masterpiece;
    # 2010 as written (it is 2011 in UTC): old.
    1: "1girl, hatsune miku, vocaloid, ask (askzy), solo, smile, long hair, ^_^, masterpiece, old, "
       "highres, safe",
    # people order 2girls, multiple_girls, 2boys; characters hatsune_miku 500 > kagamine_rin 300;
    # fav 75 is not above 75 but above 60: great quality; 2011 as written (2010 in UTC): early;
    # 'translated' dropped (contains 'translat').
    2: "2girls, multiple girls, 2boys, hatsune miku, kagamine rin, vocaloid, >_<, o_o, great quality, "
       "early, absurdres, sensitive",
    # no general tags; fav 10 is not above 10: worst quality; 2016: mid; explicit: nsfw, explicit
    3: "hatsune miku, some artist, worst quality, mid, highres, nsfw, explicit",
    # tag 999 missing: skipped (counted); fav 31 > 30: normal quality; 2019: recent
    4: "1girl, o_o, normal quality, recent, nsfw",
    # no tags; fav 0: worst quality; 2004 is before 2005: old
    5: "worst quality, old, safe",
    # fav 46 > 45: good quality; 2025 is after 2024: newest
    6: "good quality, newest, safe",
    # fav 61 > 60: great quality; created_at missing: no year tag
    7: "great quality, sensitive",
    # id above 7,500,000: no quality tag
    8_000_000: "1girl, newest, safe",
}


@pytest.fixture(scope="module")
def db_path(tmp_path_factory):
    return write_db(tmp_path_factory.mktemp("capdb") / "danbooru2023.db", POSTS, TAGS, RELATIONS)


@pytest.fixture(scope="module")
def db(db_path):
    return open_db(db_path)


def test_tag_formatting_rules():
    # 3 characters or fewer keep their underscores (emoticons); longer names get spaces
    assert [format_tag(t) for t in ("^_^", ">_<", "o_o", "0_0", "a_bc", "ask_(askzy)")] == \
        ["^_^", ">_<", "o_o", "0_0", "a bc", "ask (askzy)"]
    assert escape_parentheses("ask (askzy)") == "ask \\(askzy\\)"


@pytest.mark.parametrize("post_id", sorted(EXPECTED))
def test_caption_of_each_tricky_post(db, post_id):
    assert Captioner(db, quality=TABLE).caption(post_id) == EXPECTED[post_id]


def test_record_keeps_groups_apart(db):
    assert Captioner(db, quality=TABLE).record(1) == {
        "id": 1, "width": 1000, "height": 800, "rating": "general", "score": 5, "fav_count": 95,
        "created_at": "2010-12-31T23:30:00.000-05:00",
        "keep": ["1girl", "hatsune miku", "vocaloid", "ask (askzy)"],
        "general": ["solo", "smile", "long hair", "^_^"],
        "meta": ["highres"], "quality": ["masterpiece"], "year": ["old"], "rating_tags": ["safe"],
    }
    assert Captioner(db, quality=TABLE).record(3)["rating_tags"] == ["nsfw", "explicit"]


def test_bulk_captions_in_id_order_with_counts(db):
    cap = Captioner(db, quality=TABLE, chunk_size=3)  # small chunks: ranges and sparse IN lists
    wanted = [8_000_000, 4, 1, 2, 3, 5, 6, 7, 4, 123]  # 4 twice, 123 does not exist
    out = list(cap.captions(wanted))
    assert [i for i, _, _ in out] == [1, 2, 3, 4, 5, 6, 7, 8_000_000]
    assert {i: c for i, c, _ in out} == EXPECTED
    assert all(c == cap.text(r) for _, c, r in out)
    assert cap.stats["posts"] == 8
    assert cap.stats["missing_post"] == 1
    assert cap.stats["duplicate_id"] == 1
    assert cap.stats["missing_tag"] == 1  # post 4 -> tag 999
    assert cap.stats["duplicate_relation"] == 1  # post 1 -> 'solo' twice
    assert cap.stats["no_year"] == 1  # post 7
    assert cap.stats["no_quality"] == 1  # post 8,000,000
    assert "missing tag: 1" in cap.summary()

    # ids 1, 3, 5, 7 in one chunk: read as the range 1..7, the even ids filtered out
    odd = Captioner(db, quality=TABLE, chunk_size=4)
    assert [(i, c) for i, c, _ in odd.captions([7, 5, 3, 1])] == [(i, EXPECTED[i]) for i in (1, 3, 5, 7)]


def test_options_separators_groups_escaping(db):
    cap = Captioner(db, quality=TABLE, separator=",", group_separator=" ||| ",
                    groups=("keep", "general", "rating_tags"))
    assert cap.caption(2) == "2girls,multiple girls,2boys,hatsune miku,kagamine rin,vocaloid ||| >_<,o_o ||| sensitive"
    rec = cap.record(2)
    assert rec["quality"] == rec["year"] == rec["meta"] == []  # left out of the caption, so emptied

    esc = Captioner(db, quality=TABLE, escape_parentheses=True)
    assert esc.caption(1).startswith("1girl, hatsune miku, vocaloid, ask \\(askzy\\), solo")
    assert esc.record(1)["keep"][3] == "ask (askzy)"  # records stay unescaped


def test_keep_separator_and_underscore_rule(db):
    # sd-scripts style: keep ||| general ||| quality, year, meta, rating — sd-scripts'
    # keep_tokens_separator split (fixed, flexible, fixed tail): only the general tags move
    kohya = Captioner(db, quality=TABLE, keep_separator="|||")
    assert kohya.caption(1) == ("1girl, hatsune miku, vocaloid, ask (askzy) ||| solo, smile, "
                                "long hair, ^_^ ||| masterpiece, old, highres, safe")
    # no keep and no general tags: both separators still, or sd-scripts would shuffle the tail
    assert kohya.caption(5) == "||| ||| worst quality, old, safe"
    raw = Captioner(db, quality=TABLE, underscores="keep", escape_parentheses=True,
                    keep_separator="|||", groups=("keep", "general"))
    assert raw.caption(1) == "1girl, hatsune_miku, vocaloid, ask_\\(askzy\\) ||| solo, smile, long_hair, ^_^"
    assert raw.record(1)["keep"] == ["1girl", "hatsune_miku", "vocaloid", "ask_(askzy)"]
    assert raw.settings()["underscores"] == "keep" and raw.settings()["keep_separator"] == "|||"
    for groups in (("general", "keep"), ("keep", "quality", "general"), ("keep",)):
        with pytest.raises(HakubooruError, match="keep_separator needs groups to begin with keep, general"):
            Captioner(db, quality=TABLE, keep_separator="|||", groups=groups)
    with pytest.raises(HakubooruError, match="underscores must be one of spaces, keep"):
        Captioner(db, quality=TABLE, underscores="dashes")


def test_quality_cutoff_can_be_disabled(db):
    assert Captioner(db, quality=TABLE, no_quality_above_id=None).caption(8_000_000) == \
        "1girl, masterpiece, newest, safe"  # fav 100 > 90


def test_bad_input_is_one_clear_error(db):
    with pytest.raises(HakubooruError, match="post 123 not found"):
        Captioner(db, quality=TABLE).caption(123)
    with pytest.raises(HakubooruError, match="groups"):
        Captioner(db, quality=TABLE, groups=("keep", "colour"))
    with pytest.raises(HakubooruError, match="percentiles"):
        Captioner(db, quality={"general": {90: 5}})
    with pytest.raises(HakubooruError, match="must not decrease"):
        Captioner(db, quality={"general": {90: 1, 75: 2, 60: 3, 45: 4, 30: 5, 10: 6}})
    with pytest.raises(HakubooruError, match="integers"):
        list(Captioner(db, quality=TABLE).captions(["abc"]))


def test_database_bytes_unchanged(db_path):
    before = file_checksum(db_path)
    cap = Captioner(open_db(db_path))  # thresholds from the database, then every post
    assert len(list(cap.captions(sorted(EXPECTED)))) == len(EXPECTED)
    assert file_checksum(db_path) == before


def test_parquet_output_reads_back_with_datasets(db_path, tmp_path):
    from datasets import Dataset

    from hakubooru import Selector
    from hakubooru.cli import main

    db = open_db(db_path)
    Selector.ids([1, 3, 8_000_000]).save(tmp_path / "sel.parquet", db)
    (tmp_path / "table.json").write_text(json.dumps(TABLE))
    out = tmp_path / "captions.parquet"
    argv = ["caption", "--db", str(db_path), "--selection", str(tmp_path / "sel.parquet"),
            "--out", str(out), "--quality-table", str(tmp_path / "table.json")]
    assert main(argv) == 0
    ds = Dataset.from_parquet(str(out))
    assert ds.column_names == ["id", "caption", "record"]
    assert ds["id"] == [1, 3, 8_000_000]
    assert ds["caption"] == [EXPECTED[1], EXPECTED[3], EXPECTED[8_000_000]]
    assert json.loads(ds["record"][1])["keep"] == ["hatsune miku", "some artist"]
    meta = json.loads(pq.read_metadata(out).metadata[b"hakubooru"])
    assert meta["counts"]["posts"] == 3 and meta["settings"]["quality"]["general"]["90"] == 90
    assert main(argv) == 2  # refuses to overwrite without --overwrite


def test_custom_captioner_example(db):
    import importlib.util

    path = REPO / "examples" / "custom_captioner.py"
    spec = importlib.util.spec_from_file_location("custom_captioner", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    cap = example.make_captioner(db, scores={1: 0.9, 3: 0.5}, quality=TABLE)
    # artist written "by ..."; the source's "aesthetic" goes after the database's general
    # tags (post 1 scores 0.9 >= 0.8, post 3 only 0.5); year tags are the year as written
    assert dict((i, c) for i, c, _ in cap.captions([1, 3])) == {
        1: "1girl, hatsune miku, vocaloid, by ask (askzy), solo, smile, long hair, ^_^, aesthetic, "
           "masterpiece, year 2010, highres, safe",
        3: "hatsune miku, by some artist, worst quality, year 2016, highres, nsfw, explicit",
    }


def test_caption_command_writes_records_as_compact_utf8_json(tmp_path):
    """The `caption` command's record column is compact JSON (separators "," and ":") with
    non-ASCII tag names written as they are (é, not \\u00e9)."""
    from hakubooru import Selector
    from hakubooru.cli import main

    db_path = write_db(tmp_path / "db.sqlite", [post(1)],
                       [(1, "1girl", 0, 100), (2, "pokémon", 3, 50)], [(1, 1), (1, 2)])
    Selector.ids([1]).save(tmp_path / "sel.parquet", open_db(db_path))
    out = tmp_path / "captions.parquet"
    assert main(["caption", "--db", str(db_path), "--selection", str(tmp_path / "sel.parquet"),
                 "--out", str(out)]) == 0
    (raw,) = pq.read_table(out).column("record").to_pylist()
    assert '"pokémon"' in raw and "\\u" not in raw
    assert raw == json.dumps(json.loads(raw), ensure_ascii=False, separators=(",", ":"))
    assert "pokémon" in pq.read_table(out).column("caption").to_pylist()[0]
