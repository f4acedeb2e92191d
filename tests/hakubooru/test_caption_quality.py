"""Quality thresholds: fav_count percentiles per rating, checked against hand computation.

Percentile definition (docs/captions.md): NumPy's default "linear" method: sorted values
x[0..n-1] read at position p/100 * (n-1), interpolated between neighbours.
"""
import numpy as np
import pytest

from hakubooru import HakubooruError, open_db
from hakubooru.captioner import Captioner
from hakubooru.quality import QualityThresholds
from tests.helpers.handdb import post, write_db

# general: ids 1..11 with fav 0, 10, ..., 100; sensitive: ids 12..16 with fav 5, 1, 3, 2, 4;
# questionable: id 17 with fav 7; explicit: id 18 with no fav_count;
# id 5000: general with fav 1,000,000, above the cut-off used below (1000).
POSTS = (
    [post(i, rating=0, fav=10 * (i - 1)) for i in range(1, 12)]
    + [post(12 + k, rating=1, fav=f) for k, f in enumerate([5, 1, 3, 2, 4])]
    + [post(17, rating=2, fav=7), post(18, rating=3, fav=None), post(5000, rating=0, fav=1_000_000)]
)
TAGS = [(1, "1girl", 0, 10)]


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return open_db(write_db(tmp_path_factory.mktemp("qdb") / "danbooru2023.db", POSTS, TAGS, [(1, 1)]))


def test_thresholds_by_hand(db):
    q = QualityThresholds.from_db(db, no_quality_above_id=1000)
    # general, n = 11, x = 0, 10, ..., 100: position p/100 * 10 -> value = p exactly,
    # except 75 -> position 7.5 -> halfway between 70 and 80 = 75, and 45 -> 4.5 -> 45.
    assert q.table["general"] == {90: 90, 75: 75, 60: 60, 45: 45, 30: 30, 10: 10}
    # sensitive, n = 5, sorted 1..5: position p/100 * 4
    #   p90 -> 3.6 -> 4 + 0.6 = 4.6; p75 -> 3.0 -> 4; p60 -> 2.4 -> 3.4;
    #   p45 -> 1.8 -> 2.8; p30 -> 1.2 -> 2.2; p10 -> 0.4 -> 1.4
    assert q.table["sensitive"] == pytest.approx({90: 4.6, 75: 4.0, 60: 3.4, 45: 2.8, 30: 2.2, 10: 1.4})
    # questionable: a single value, every percentile is 7
    assert q.table["questionable"] == {90: 7, 75: 7, 60: 7, 45: 7, 30: 7, 10: 7}
    # explicit: no post with a fav_count -> no thresholds
    assert "explicit" not in q.table


def test_cutoff_left_out_of_statistics(db):
    q = QualityThresholds.from_db(db, no_quality_above_id=None)
    # general now has 12 values 0..100 and 1,000,000: position p/100 * 11
    #   p90 -> 9.9 -> 90 + 0.9 * 10 = 99; p10 -> 1.1 -> 10 + 0.1 * 10 = 11
    assert q.table["general"][90] == pytest.approx(99)
    assert q.table["general"][10] == pytest.approx(11)


def test_ties_fall_to_the_lower_tag(db):
    cap = Captioner(db, no_quality_above_id=1000)  # thresholds computed from db itself
    quality = {i: cap.record(i)["quality"] for i in (2, 3, 10, 11, 12, 13, 15, 16, 17, 18, 5000)}
    assert quality == {
        2: ["worst quality"],    # fav 10 == p10 threshold 10: not above
        3: ["low quality"],      # fav 20 > 10, not > 30
        10: ["best quality"],    # fav 90 == p90 threshold 90: not above, but > 75
        11: ["masterpiece"],     # fav 100 > 90
        12: ["masterpiece"],     # sensitive fav 5 > 4.6
        13: ["worst quality"],   # sensitive fav 1, not > 1.4
        15: ["low quality"],     # sensitive fav 2 > 1.4, not > 2.2
        16: ["great quality"],   # sensitive fav 4 == p75 threshold 4: not above, but > 3.4
        17: ["worst quality"],   # questionable fav 7 == every threshold
        18: [],                  # explicit without fav_count: no quality tag
        5000: [],                # above the cut-off: no quality tag
    }


def test_fixed_table_accepts_json_keys():
    q = QualityThresholds({"general": {"90": 27, "75": 16, "60": 10, "45": 7, "30": 4, "10": 1}})
    # 27 is not above 27 -> best quality; 28 -> masterpiece; 1 -> worst quality
    assert [q.tag("general", f) for f in (28, 27, 1, 2)] == \
        ["masterpiece", "best quality", "worst quality", "low quality"]
    assert q.tag("explicit", 100) is None  # no table for explicit


def test_fixed_table_rejects_non_finite_thresholds():
    row = {90: 10, 75: 8, 60: 6, 45: 4, 30: 2, 10: float("nan")}
    with pytest.raises(HakubooruError, match="finite"):
        QualityThresholds({"general": row})


def test_tag_of_no_fav_count_or_unknown_rating_is_none(db):
    q = QualityThresholds.from_db(db, no_quality_above_id=1000)
    assert q.tag("general", None) is None and q.tag("nsfw", 5) is None
    assert q.tag("general", 100) == "masterpiece"  # 100 > the 90th percentile, 91


def test_database_without_fav_counts_has_no_table(tmp_path):
    empty = open_db(write_db(tmp_path / "e.db", [post(1, fav=None)], TAGS, []))
    q = QualityThresholds.from_db(empty)
    assert q.table == {} and q.tag("general", 10) is None


def test_default_cutoff_is_id_7_500_000(tmp_path):
    # recipe.md: posts with id > 7,500,000 get no quality tag and stay out of the statistics
    posts = [post(7_500_000, fav=10), post(7_500_001, fav=1000)]
    hand = open_db(write_db(tmp_path / "c.db", posts, TAGS, [(7_500_000, 1), (7_500_001, 1)]))
    assert QualityThresholds.from_db(hand).table["general"] == {p: 10.0 for p in (90, 75, 60, 45, 30, 10)}
    records = {pid: rec for pid, _, rec in Captioner(hand).captions(np.array([7_500_000, 7_500_001]))}
    assert records[7_500_000]["quality"] == ["worst quality"]  # 10 is not above any threshold (10)
    assert records[7_500_001]["quality"] == []


def test_fixed_table_rejects_non_numbers_and_one_adjacent_decrease():
    with pytest.raises(HakubooruError, match="must be numbers"):
        QualityThresholds({"general": {90: None, 75: 8, 60: 6, 45: 4, 30: 2, 10: 1}})
    # ascending by percentile 10..90: 1, 3, 2, 4, 5, 6 -- only 30 -> 45 decreases
    with pytest.raises(HakubooruError, match="must not decrease"):
        QualityThresholds({"general": {10: 1, 30: 3, 45: 2, 60: 4, 75: 5, 90: 6}})
    QualityThresholds({"general": {10: 1, 30: 2, 45: 2, 60: 4, 75: 5, 90: 6}})  # equal is fine
