"""The benchmark's rule for single-character samples, its prompts and seeds, on hand-written
keep lists and tag types (the whole command: test_eval.py)."""
from __future__ import annotations

import hashlib

from hakubooru.rng import splitmix64
from trainers.lokr.observe.eval_characters import Character, single_character

TYPES = {"hatsune miku": "character", "hatsune_miku": "character", "kagamine rin": "character",
         "vocaloid": "copyright", "project diva": "copyright", "wlop": "artist"}


def test_the_rule_takes_one_people_tag_of_one_and_one_character():
    assert single_character(["1girl", "hatsune miku", "vocaloid", "wlop"], TYPES) == ("1girl", "hatsune miku",
                                                                                     ["vocaloid"])
    assert single_character(["1other", "hatsune_miku"], TYPES) == ("1other", "hatsune_miku", [])  # underscores kept
    assert single_character(["2girls", "hatsune miku"], TYPES) is None            # two people
    assert single_character(["1girl", "1boy", "hatsune miku"], TYPES) is None     # two people-count tags
    assert single_character(["1girl", "hatsune miku", "kagamine rin"], TYPES) is None  # two characters
    assert single_character(["1girl", "vocaloid"], TYPES) is None                # no character
    assert single_character(["hatsune miku"], TYPES) is None                     # no people tag
    assert single_character(["male focus", "1boy", "hatsune miku"], TYPES) is None


def test_prompt_order_and_seeds_by_hand():
    c = Character(0, "hatsune miku", 5, "1girl", "vocaloid", ())
    assert c.prompt == "1girl, hatsune miku, vocaloid, masterpiece, newest, safe"
    assert Character(0, "x", 5, "1boy", "", ()).prompt == "1boy, x, masterpiece, newest, safe"
    key = int.from_bytes(hashlib.sha256(b"hatsune miku").digest()[:8], "big")
    assert c.key == key
    expected = splitmix64(splitmix64(splitmix64(0 ^ 7) ^ key) ^ 3) >> 1   # hash64(7, key, 3) >> 1, by hand
    assert c.seed(7, 3) == expected < 1 << 63
    # the seed is the character's own: another character's list position does not enter it
    assert Character(41, "hatsune miku", 1, "1other", "", ()).seed(7, 3) == expected
    assert c.slug != Character(0, "hatsune_miku", 5, "1girl", "", ()).slug
