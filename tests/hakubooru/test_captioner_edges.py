"""Captioner on odd tag tables and post sets, each against a hand-written expectation."""
import numpy as np
import pytest

from hakubooru import HakubooruError, open_db
from hakubooru.captioner import Captioner
from tests.helpers.handdb import post, write_db

G, M = 0, 4  # tag types: general, meta


def caption_map(captioner, ids):
    return {pid: text for pid, text, _ in captioner.captions(np.array(ids))}


def test_unknown_type_codes_and_null_names_are_dropped(tmp_path):
    tags = [(1, "smile", G, 5), (2, "weird", 9, 5), (3, None, G, 5), (4, "odd", None, 5)]
    db = open_db(write_db(tmp_path / "t.db", [post(1, fav=None)], tags, [(1, 1), (1, 2), (1, 3), (1, 4)]))
    captioner = Captioner(db)
    assert caption_map(captioner, [1]) == {1: "smile, mid, safe"}  # handdb posts: 2015 upload (mid), general (safe)
    assert captioner.stats["unknown_tag_type"] == 2


def test_tags_of_a_post_missing_from_the_post_table(tmp_path):
    # post 99 has relations but no post row: counted missing, and post 1 is unaffected
    db = open_db(write_db(tmp_path / "m.db", [post(1, fav=None)], [(1, "smile", G, 5)], [(1, 1), (99, 1)]))
    captioner = Captioner(db)
    assert caption_map(captioner, [1, 99]) == {1: "smile, mid, safe"}
    assert captioner.stats["missing_post"] == 1


def test_database_without_usable_tags(tmp_path):
    db = open_db(write_db(tmp_path / "e.db", [post(1, fav=None)], [(1, "commentary", M, 5)], [(1, 1)]))
    assert caption_map(Captioner(db), [1]) == {1: "mid, safe"}


def test_chunk_size_one_gives_the_same_captions(tmp_path):
    posts = [post(i, fav=None) for i in (1, 2, 5)]
    db = open_db(write_db(tmp_path / "c.db", posts, [(1, "smile", G, 5), (2, "hat", G, 9)],
                          [(1, 1), (2, 2), (5, 1), (5, 2)]))
    expected = {1: "smile, mid, safe", 2: "hat, mid, safe", 5: "hat, smile, mid, safe"}
    assert caption_map(Captioner(db, chunk_size=1), [1, 2, 5]) == expected
    assert caption_map(Captioner(db), [1, 2, 5]) == expected
    with pytest.raises(HakubooruError, match="chunk_size must be at least 1, got 0"):
        Captioner(db, chunk_size=0)


def test_non_integer_relation_names_the_posts(tmp_path):
    db = open_db(write_db(tmp_path / "r.db", [post(1, fav=None), post(2, fav=None)],
                          [(1, "smile", G, 5)], [(1, 1), (2, "x")]))
    with pytest.raises(HakubooruError, match=r"not integers \(posts 1\.\.2\)"):
        list(Captioner(db).captions(np.array([1, 2])))


def test_unknown_rating_and_negative_tag_id(tmp_path):
    # rating code 7 is no rating: counted, no quality tag (not taken for "general");
    # a relation to tag id -1 is a missing tag, not the table's last tag
    posts = [post(1, fav=5), post(2, rating=7, fav=5)]
    db = open_db(write_db(tmp_path / "u.db", posts, [(1, "smile", G, 5), (2, "hat", G, 9)],
                          [(1, 1), (2, 1), (2, -1)]))
    captioner = Captioner(db)
    records = {pid: rec for pid, _, rec in captioner.captions(np.array([1, 2]))}
    assert records[1]["quality"] == ["worst quality"]  # fav 5 is not above general's thresholds (5)
    assert records[2]["quality"] == [] and records[2]["general"] == ["smile"]
    assert captioner.stats["unknown_rating"] == 1 and captioner.stats["missing_tag"] == 1
