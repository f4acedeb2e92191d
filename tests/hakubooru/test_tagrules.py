"""Tag rules of recipe.md §2, one keyword and one boundary at a time."""
import pytest

from hakubooru.tagrules import TagRules, format_tag, year_tag

RULES = TagRules()

# recipe.md §2: meta tags containing any of these are left out (one real tag name for each)
META_DROPPED = {
    "(medium)": "traditional_media_(medium)", "commentary": "commentary_request",
    "bad": "bad_id", "translat": "translated", "request": "check_request",
    "mismatch": "md5_mismatch", "revision": "revision", "audio": "has_audio",
    "video": "video_with_sound",
}


@pytest.mark.parametrize("keyword, name", sorted(META_DROPPED.items()))
def test_each_meta_keyword_drops_its_tag(keyword, name):
    assert keyword in name
    assert RULES.group(name, "meta") is None
    # the keyword only drops meta tags: the same name as a general tag is kept
    assert RULES.group(name, "general") == "general"


@pytest.mark.parametrize("name", ["highres", "absurdres", "lowres", "monochrome", "greyscale", "4koma"])
def test_other_meta_tags_are_kept(name):
    assert RULES.group(name, "meta") == "meta"


def test_banned_artists_dropped_others_kept():
    assert RULES.group("banned_artist", "artist") is None
    assert RULES.group("ask_(askzy)", "artist") == "artist"
    assert RULES.group("bad_artist_name", "artist") == "artist"  # meta keywords do not apply


def test_groups_by_type():
    assert [RULES.group(n, "general") for n in ("1girl", "male_focus", "multiple_others", "smile")] == \
        ["people", "people", "people", "general"]
    assert RULES.group("hatsune_miku", "character") == "character"
    assert RULES.group("vocaloid", "copyright") == "copyright"
    assert RULES.group("   ", "general") is None
    assert RULES.group("x", "unknown type") is None


def test_people_order_is_the_recipes():
    order = ["1girl", "2girls", "3girls", "4girls", "5girls", "6+girls", "multiple_girls", "1boy",
             "2boys", "3boys", "4boys", "5boys", "6+boys", "multiple_boys", "male_focus", "1other",
             "2others", "3others", "4others", "5others", "6+others", "multiple_others"]
    assert sorted(order[::-1], key=lambda n: RULES.sort_key("people", n, 0)) == order
    # other groups: most popular first, then by name
    names = [("b", 5), ("a", 5), ("c", 9)]
    assert [n for n, p in sorted(names, key=lambda t: RULES.sort_key("general", *t))] == ["c", "a", "b"]


def test_format_keeps_underscores_up_to_three_characters():
    assert [format_tag(t) for t in ("^_^", "o_o", "a_b_", "long_hair")] == ["^_^", "o_o", "a b ", "long hair"]


@pytest.mark.parametrize("year, tag", [(2004, "old"), (2010, "old"), (2011, "early"), (2014, "early"),
                                       (2015, "mid"), (2017, "mid"), (2018, "recent"), (2020, "recent"),
                                       (2021, "newest"), (2024, "newest"), (2030, "newest")])
def test_year_boundaries(year, tag):
    assert year_tag(year) == tag


def test_year_table_covers_every_four_digit_year():
    from hakubooru.tagrules import year_tag_table
    table = year_tag_table()
    assert len(table) == 10000 and table["0000"] == "old" and table["9999"] == "newest"
    assert table["2011"] == "early" and table["2010"] == "old"


def test_people_order_only_inside_the_people_group():
    # a people-count name sorted in another group (a subclass may put it there) goes by popularity
    assert RULES.sort_key("general", "1girl", 5) == (-5, "1girl")
    assert RULES.sort_key("people", "1boy", 5) == (7, "")
