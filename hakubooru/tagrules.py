"""The Kohaku XL caption rules for tags, years and ratings (recipe.md §2).

Everything here is decided once per tag (or once per year / rating), never per
post: the Captioner applies these rules to the whole tag table when it starts,
and afterwards only looks results up.
"""
from __future__ import annotations

from .errors import HakubooruError

# People-count tags lead the caption, in this fixed order.
PEOPLE_COUNT_TAGS = (
    "1girl", "2girls", "3girls", "4girls", "5girls", "6+girls", "multiple_girls",
    "1boy", "2boys", "3boys", "4boys", "5boys", "6+boys", "multiple_boys", "male_focus",
    "1other", "2others", "3others", "4others", "5others", "6+others", "multiple_others",
)
# Meta tags whose raw name contains one of these are not about the picture.
META_KEYWORD_BLACKLIST = (
    "(medium)", "commentary", "bad", "translat", "request", "mismatch", "revision",
    "audio", "video",
)
ARTIST_KEYWORD_BLACKLIST = ("banned",)

# Tag groups in caption order; the first four make up the record's "keep" list.
TAG_GROUPS = ("people", "character", "copyright", "artist", "general", "meta")

# (last year of the span, tag); earlier years fall into the first span, later into the last.
YEAR_TAGS = ((2010, "old"), (2014, "early"), (2017, "mid"), (2020, "recent"), (2024, "newest"))

RATING_TAGS = {
    "general": ("safe",),
    "sensitive": ("sensitive",),
    "questionable": ("nsfw",),
    "explicit": ("nsfw", "explicit"),
}


# How tag names' underscores are written: "spaces" (the Kohaku XL rule, format_tag) or
# "keep" (danbooru's own names, as sd-scripts' booru taggers read them with underscores).
UNDERSCORE_RULES = ("spaces", "keep")


def format_tag(name: str, underscores: str = "spaces") -> str:
    """Danbooru tag name -> caption text: underscores become spaces, except in names of
    3 characters or fewer (emoticons such as ``^_^``, ``o_o``, ``>_<`` keep them);
    ``underscores="keep"`` leaves every name as it is."""
    if underscores == "keep" or len(name) <= 3:
        return name
    return name.replace("_", " ")


def escape_parentheses(text: str) -> str:
    """Escape parentheses as sd-webui prompts need (``ask (askzy)`` -> ``ask \\(askzy\\)``)."""
    return text.replace("(", "\\(").replace(")", "\\)")


def year_tag(year: int) -> str:
    """The year tag of an upload year: 2005-2010 old, 2011-2014 early, 2015-2017 mid,
    2018-2020 recent, 2021-2024 newest; before 2005 counts as old, after 2024 as newest."""
    for last, tag in YEAR_TAGS:
        if year <= last:
            return tag
    return YEAR_TAGS[-1][1]


def year_tag_table() -> dict[str, str]:
    """Every 4-digit year string -> its tag, so a post's tag is one lookup of
    ``created_at[:4]`` (the year as written, in the timestamp's own UTC offset)."""
    return {f"{y:04d}": year_tag(y) for y in range(10000)}


class TagRules:
    """Which group a tag goes to, how its text looks, and its order inside the group.

    Subclass and override one method to change one rule (see examples/custom_captioner.py);
    the Captioner calls these once per tag of the database, not once per post.
    """

    people_count_tags = PEOPLE_COUNT_TAGS
    meta_keyword_blacklist = META_KEYWORD_BLACKLIST
    artist_keyword_blacklist = ARTIST_KEYWORD_BLACKLIST

    def __init__(self, underscores: str = "spaces"):
        if underscores not in UNDERSCORE_RULES:
            raise HakubooruError(f"underscores must be one of {', '.join(UNDERSCORE_RULES)}, "
                                 f"not {underscores!r}")
        self.underscores = underscores

    def group(self, name: str, type: str) -> str | None:
        """The group (one of TAG_GROUPS) of a tag given its raw name and type name
        (general / artist / character / copyright / meta), or None to leave it out."""
        if not name.strip():
            return None
        if type == "general":
            return "people" if name in self.people_count_tags else "general"
        if type == "artist":
            return None if _contains_any(name, self.artist_keyword_blacklist) else "artist"
        if type == "meta":
            return None if _contains_any(name, self.meta_keyword_blacklist) else "meta"
        if type in ("character", "copyright"):
            return type
        return None

    def format(self, name: str, type: str) -> str:
        """The text of a tag in captions and records (unescaped)."""
        return format_tag(name, self.underscores)

    def sort_key(self, group: str, name: str, popularity: int) -> tuple:
        """Order inside a group: people-count tags in their fixed order; every other
        group by popularity (posts carrying the tag), most popular first, then name."""
        if group == "people" and name in self.people_count_tags:
            return (self.people_count_tags.index(name), "")
        return (-popularity, name)


def _contains_any(name: str, keywords) -> bool:
    return any(k in name for k in keywords)
