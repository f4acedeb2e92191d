"""Caption augmentation over many draws, pinned by counts derived by hand: the card's rule
(recipe §2: only the general tags move, 15 % of them dropped), sd-scripts' shuffle_caption
("all", and a .txt split by its keep_tokens_separator), determinism per (seed, epoch, post id)."""
import itertools
import math

import pytest

from hakubooru.errors import HakubooruError
from trainers.lokr.data.augment import augment_caption, augment_text

RECORD = {
    "id": 4242,
    "keep": ["1girl", "hatsune miku", "vocaloid", "ask (askzy)"],
    "general": [f"tag {i}" for i in range(14)],
    "meta": ["highres"],
    "quality": ["masterpiece"],
    "year": ["newest"],
    "rating_tags": ["nsfw", "explicit"],
}
# the card's order after the general tags: quality, year, meta, rating
TAIL = ["masterpiece", "newest", "highres", "nsfw", "explicit"]
REST = RECORD["general"] + TAIL
EPOCHS = 2000


def draws(record=RECORD, epochs=EPOCHS, **options):
    return [augment_caption(record, seed=7, epoch=e, **options).split(", ") for e in range(epochs)]


def within_4_sigma(count: int, trials: int, p: float) -> bool:
    return abs(count - p * trials) < 4 * math.sqrt(trials * p * (1 - p))


def test_card_rule_keep_and_tail_fixed_general_dropped_fifteen_percent():
    caps = draws()
    for tags in caps:
        assert tags[:4] == RECORD["keep"]          # the keep group, in its order, every time
        assert tags[-5:] == TAIL                   # quality, year, meta, rating: never moved or dropped
        general = tags[4:-5]
        assert len(set(general)) == len(general) and set(general) <= set(RECORD["general"])
    # each general tag: 2,000 Bernoulli(0.15) absences, mean 300, sigma = sqrt(2000 · 0.15 · 0.85)
    # = 15.97; accept 300 ± 63.9
    for tag in RECORD["general"]:
        absent = sum(tag not in tags for tags in caps)
        assert within_4_sigma(absent, EPOCHS, 0.15), (tag, absent)


def test_card_rule_general_order_differs_between_epochs():
    orders = [tuple(tags[4:-5]) for tags in draws()]
    # 14 tags shuffled (and some dropped): two epochs agree with probability well under 1e-6,
    # so 2,000 epochs give 2,000 distinct orders, and consecutive epochs always differ
    assert len(set(orders)) == EPOCHS
    assert all(a != b for a, b in zip(orders, orders[1:]))
    # each tag leads the general tags in some epoch (1/14 of the kept draws, about 120 each)
    assert {o[0] for o in orders if o} == set(RECORD["general"])
    # no shuffle: the record's order, some dropped
    for tags in draws(epochs=200, shuffle=False):
        assert tags[4:-5] == [t for t in RECORD["general"] if t in tags]


SMALL = {"id": 9, "keep": ["a", "b"], "general": ["c", "d"], "quality": ["q"], "year": ["y"],
         "meta": [], "rating_tags": ["r"]}


def test_all_scope_is_sd_scripts_shuffle_caption_after_keep_tokens():
    """Hand-worked sd-scripts example: caption "a, b, c, d, q, y, r", --shuffle_caption
    --keep_tokens 2, --caption_tag_dropout_rate 0: the first 2 tokens stay, the other 5 are
    random.shuffle'd; so the captions are "a, b" + each of the 5! = 120 orders of c, d, q, y, r,
    each with probability 1/120 (2,000 draws miss one with probability < 120 · e^{-16.7} < 1e-5)."""
    want = {", ".join(["a", "b", *p]) for p in itertools.permutations(["c", "d", "q", "y", "r"])}
    got = [augment_caption(SMALL, seed=1, epoch=e, drop=0.0, scope="all") for e in range(EPOCHS)]
    assert set(got) == want
    # and the same example in the card's scope: only c, d move; "q, y, r" is the fixed tail
    got = {augment_caption(SMALL, seed=1, epoch=e, drop=0.0) for e in range(200)}
    assert got == {"a, b, c, d, q, y, r", "a, b, d, c, q, y, r"}


def test_all_scope_drops_every_tag_after_the_keep_group():
    caps = draws(scope="all")
    for tags in caps:
        assert tags[:4] == RECORD["keep"]
    for tag in REST:  # the tail tags are dropped too, each 15 % ± 4 sigma
        assert within_4_sigma(sum(tag not in tags for tags in caps), EPOCHS, 0.15), tag
    assert len({tags[-1] for tags in caps}) > 10  # and moved: many tags end the caption


def test_text_with_keep_separators_is_sd_scripts_fixed_flexible_fixed_tail():
    """Hand-worked sd-scripts example: "a, b ||| c, d, e ||| q, r" with --shuffle_caption
    --keep_tokens_separator "|||", dropout 0: fixed [a, b], flexible shuffled (3! = 6 orders),
    fixed suffix [q, r]."""
    want = {", ".join(["a", "b", *p, "q", "r"]) for p in itertools.permutations(["c", "d", "e"])}
    got = {augment_text("a, b ||| c, d, e ||| q, r", seed=0, epoch=e, sample_id=3, drop=0.0)
           for e in range(500)}
    assert got == want
    # keep_tokens without a separator: everything after the first 2 moves (4! = 24 orders)
    got = {augment_text("a, b, c, d, q, r", seed=0, epoch=e, sample_id=3, drop=0.0, keep_tokens=2)
           for e in range(2000)}
    assert got == {", ".join(["a", "b", *p]) for p in itertools.permutations(["c", "d", "q", "r"])}


def test_no_shuffle_no_drop_is_the_stored_caption():
    caption = augment_caption(RECORD, seed=0, epoch=0, shuffle=False, drop=0.0)
    assert caption == ", ".join(RECORD["keep"] + REST)
    assert augment_caption(RECORD, seed=0, epoch=0, shuffle=False, drop=0.0, scope="all") == caption
    assert augment_caption(RECORD, seed=0, epoch=0, shuffle=False, drop=0.0,
                           separator=" | ") == " | ".join(RECORD["keep"] + REST)


def test_deterministic_per_seed_epoch_and_id():
    a = augment_caption(RECORD, seed=3, epoch=5)
    assert augment_caption(dict(RECORD), seed=3, epoch=5) == a
    # other epochs, seeds or ids give other captions (14 tags shuffled: a repeat is ~1/14!)
    assert augment_caption(RECORD, seed=3, epoch=6) != a
    assert augment_caption(RECORD, seed=4, epoch=5) != a
    assert augment_caption(dict(RECORD, id=4243), seed=3, epoch=5) != a


def test_bad_input_is_a_clear_error():
    with pytest.raises(HakubooruError, match="lacks general"):
        augment_caption({k: v for k, v in RECORD.items() if k != "general"}, seed=0, epoch=0)
    with pytest.raises(HakubooruError, match="dropout"):
        augment_caption(RECORD, seed=0, epoch=0, drop=1.5)
    with pytest.raises(HakubooruError, match="shuffle scope must be one of general, all, got 'tail'"):
        augment_caption(RECORD, seed=0, epoch=0, scope="tail")


def test_dropout_of_one_is_refused_zero_accepted():
    """The dropout range is [0, 1): 1.0 would drop every tag but the keep group, an error."""
    for call in (lambda d: augment_caption(RECORD, seed=0, epoch=0, drop=d),
                 lambda d: augment_text("a, b", seed=0, epoch=0, sample_id=1, drop=d)):
        with pytest.raises(HakubooruError, match=r"tag dropout must be in \[0, 1\), got 1.0"):
            call(1.0)
        with pytest.raises(HakubooruError, match=r"must be in \[0, 1\), got -0.01"):
            call(-0.01)
    assert augment_text("a, b", seed=0, epoch=0, sample_id=1, shuffle=False, drop=0.0) == "a, b"


def test_caption_text_default_drops_about_fifteen_percent():
    """augment_text's default dropout is the recipe's 15% (recipe §2), and no tag is kept in front."""
    text = ", ".join(REST)
    dropped = 0
    for e in range(500):
        tags = augment_text(text, seed=7, epoch=e, sample_id=4242).split(", ")
        assert len(set(tags)) == len(tags) and set(tags) <= set(REST)
        dropped += len(REST) - len(tags)
    # 500 x 19 = 9,500 Bernoulli(0.15) trials: mean 1,425, sigma 34.8; 4 sigma.
    assert within_4_sigma(dropped, 500 * len(REST), 0.15)


def test_negative_keep_tokens_keep_nothing_in_front():
    """A keep count below 0 means none kept in front (like 0): every tag once, in order."""
    assert augment_text("a, b, c", seed=0, epoch=0, sample_id=1, shuffle=False, drop=0.0,
                        keep_tokens=-1) == "a, b, c"
    assert augment_text("a, b, c", seed=0, epoch=0, sample_id=1, shuffle=False, drop=0.0,
                        keep_tokens=-5) == "a, b, c"
