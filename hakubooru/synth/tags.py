"""The tag vocabulary of the synthetic database: real Danbooru tags and how posts draw them.

``danbooru_tags_subset.csv`` holds the most used tags of each Danbooru category (name,
Danbooru category, post count; MIT, see danbooru_tags.LICENSE). Each post gets a
people-count group, then general, character, copyright, artist and meta tags drawn by
popularity, so the tag frequencies look like Danbooru's.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..tagrules import PEOPLE_COUNT_TAGS

SUBSET_PATH = Path(__file__).with_name("danbooru_tags_subset.csv")

# Danbooru's category numbers -> the database's (0 general, 1 artist, 2 character,
# 3 copyright, 4 meta).
DANBOORU_CATEGORY_TO_DB = {0: 0, 1: 1, 4: 2, 3: 3, 5: 4}
GENERAL, ARTIST, CHARACTER, COPYRIGHT, META = range(5)


# The group of people-count tags a post gets, with its share of posts (roughly Danbooru's).
PEOPLE_GROUPS = (
    (("1girl", "solo"), 0.45),
    (("1girl",), 0.07),
    (("2girls", "multiple_girls"), 0.09),
    (("3girls", "multiple_girls"), 0.025),
    (("4girls", "multiple_girls"), 0.01),
    (("5girls", "multiple_girls"), 0.005),
    (("6+girls", "multiple_girls"), 0.008),
    (("1girl", "1boy"), 0.09),
    (("2girls", "multiple_girls", "1boy"), 0.02),
    (("1girl", "2boys", "multiple_boys"), 0.008),
    (("1boy", "male_focus", "solo"), 0.05),
    (("1boy", "male_focus"), 0.02),
    (("2boys", "multiple_boys", "male_focus"), 0.02),
    (("3boys", "multiple_boys", "male_focus"), 0.006),
    (("6+boys", "multiple_boys"), 0.003),
    (("1other", "solo"), 0.01),
    (("1other",), 0.004),
    (("2others", "multiple_others"), 0.002),
    (("no_humans",), 0.04),
    ((), 0.06),
)

# Tags the people groups use: kept out of the general pool so they only come as a group.
GROUP_TAGS = frozenset(t for group, _ in PEOPLE_GROUPS for t in group) | frozenset(PEOPLE_COUNT_TAGS)

# Real Danbooru tag missing from the source list, added so the "artist tags containing
# banned are left out" rule has something to act on: (name, db type, popularity).
EXTRA_TAGS = (("banned_artist", ARTIST, 12000),)

# How many tags of a category a post gets: {count: share of posts}.
CHARACTERS_PER_POST = {0: 0.35, 1: 0.50, 2: 0.10, 3: 0.05}
COPYRIGHTS_PER_POST = {0: 0.25, 1: 0.65, 2: 0.10}
ARTISTS_PER_POST = {0: 0.08, 1: 0.89, 2: 0.03}
GENERAL_MEAN = 25.0  # Poisson mean of general draws (a few repeat and are merged)
META_MEAN = 1.4


@dataclass(frozen=True)
class Vocabulary:
    """The tag table: names, database types, popularity (Danbooru post counts), ids."""

    names: list[str]
    types: np.ndarray       # int64, database numbering
    popularity: np.ndarray  # int64
    ids: np.ndarray         # int64, the tag ids written to the database


def load_vocabulary(seed: int) -> Vocabulary:
    """Read the bundled tag subset (plus EXTRA_TAGS); tag ids are a seeded permutation of
    1..T so that no code can rely on ids following popularity or category."""
    names, types, pops = [], [], []
    with open(SUBSET_PATH, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            names.append(row["name"])
            types.append(DANBOORU_CATEGORY_TO_DB[int(row["category"])])
            pops.append(int(row["post_count"]))
    for name, tag_type, pop in EXTRA_TAGS:
        names.append(name)
        types.append(tag_type)
        pops.append(pop)
    rng = np.random.Generator(np.random.PCG64([seed, 1]))
    ids = rng.permutation(len(names)).astype(np.int64) + 1
    return Vocabulary(names, np.array(types, np.int64), np.array(pops, np.int64), ids)


def _counts(rng: np.random.Generator, n: int, shares: dict[int, float]) -> np.ndarray:
    return rng.choice(np.array(list(shares)), size=n, p=np.array(list(shares.values())))


def _weighted_draws(rng, counts: np.ndarray, pool: np.ndarray, weights: np.ndarray):
    """For post i, counts[i] draws from pool by weight: (post index, tag index) arrays."""
    posts = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    cum = np.cumsum(weights / weights.sum())
    picks = np.minimum(np.searchsorted(cum, rng.random(len(posts)), side="right"), len(pool) - 1)
    return posts, pool[picks]


def draw_tags(vocab: Vocabulary, n_posts: int, rng: np.random.Generator):
    """Tags of n_posts posts: (post index, tag index) pairs, unique, sorted by post then tag
    (post index into the post list, tag index into ``vocab``)."""
    name_to_index = {name: i for i, name in enumerate(vocab.names)}
    group_p = np.array([p for _, p in PEOPLE_GROUPS])
    groups = rng.choice(len(PEOPLE_GROUPS), size=n_posts, p=group_p / group_p.sum())
    parts_post, parts_tag = [], []
    for g, (group, _) in enumerate(PEOPLE_GROUPS):
        members = np.flatnonzero(groups == g)
        for tag in group:
            parts_post.append(members)
            parts_tag.append(np.full(len(members), name_to_index[tag], np.int64))

    is_group_tag = np.array([n in GROUP_TAGS for n in vocab.names])
    for tag_type, counts in (
        (GENERAL, 1 + rng.poisson(GENERAL_MEAN - 1, n_posts)),  # at least one general tag
        (CHARACTER, _counts(rng, n_posts, CHARACTERS_PER_POST)),
        (COPYRIGHT, _counts(rng, n_posts, COPYRIGHTS_PER_POST)),
        (ARTIST, _counts(rng, n_posts, ARTISTS_PER_POST)),
        (META, rng.poisson(META_MEAN, n_posts)),
    ):
        pool = np.flatnonzero((vocab.types == tag_type) & ~is_group_tag)
        posts, tags = _weighted_draws(rng, counts, pool, vocab.popularity[pool].astype(float))
        parts_post.append(posts)
        parts_tag.append(tags)

    keys = np.sort(np.concatenate(parts_post) * len(vocab.names) + np.concatenate(parts_tag))
    keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]  # drop repeated draws
    return keys // len(vocab.names), keys % len(vocab.names)
