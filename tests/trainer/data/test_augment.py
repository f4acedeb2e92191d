"""Caption augmentation over many draws: ~15% dropped, order varies, keep group intact and
first, protected tags kept, deterministic per (seed, epoch, post id)."""
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
REST = RECORD["general"] + RECORD["quality"] + RECORD["year"] + RECORD["meta"] + RECORD["rating_tags"]
DRAWS = 500


def draws(**options):
    return [augment_caption(RECORD, seed=7, epoch=e, **options).split(", ") for e in range(DRAWS)]


def test_about_fifteen_percent_dropped_keep_group_first():
    caps = draws()
    kept = 0
    for tags in caps:
        assert tags[:4] == RECORD["keep"]
        rest = tags[4:]
        assert len(set(rest)) == len(rest) and set(rest) <= set(REST)
        kept += len(rest)
    # 500 draws x 19 droppable tags = 9,500 Bernoulli(0.15) trials: mean 1,425 dropped,
    # sigma = sqrt(9500 · 0.15 · 0.85) = 34.8; accept within 4 sigma.
    trials = DRAWS * len(REST)
    dropped = trials - kept
    sigma = math.sqrt(trials * 0.15 * 0.85)
    assert abs(dropped - 0.15 * trials) < 4 * sigma
    # every tag is dropped sometimes and kept sometimes
    for tag in REST:
        present = sum(tag in tags for tags in caps)
        assert 0 < present < DRAWS


def test_order_varies_but_not_without_shuffle():
    caps = draws()
    # the tag following the keep group changes from draw to draw: with 19 candidates in
    # random order, far more than 10 distinct ones appear in 500 draws.
    assert len({tags[4] for tags in caps if len(tags) > 4}) > 10
    for tags in draws(shuffle=False):
        rest = tags[4:]
        assert rest == [t for t in REST if t in rest]  # record order, some dropped


def test_no_shuffle_no_drop_is_the_stored_caption():
    caption = augment_caption(RECORD, seed=0, epoch=0, shuffle=False, drop=0.0)
    assert caption == ", ".join(RECORD["keep"] + REST)
    assert augment_caption(RECORD, seed=0, epoch=0, shuffle=False, drop=0.0,
                           separator=" | ") == " | ".join(RECORD["keep"] + REST)


def test_protected_quality_year_rating_tags_always_kept():
    protected = ["masterpiece", "newest", "nsfw", "explicit"]
    caps = draws(protect_quality_year_rating=True)
    for tags in caps:
        assert tags[:4] == RECORD["keep"]
        assert all(t in tags for t in protected)
    # the 15 unprotected tags are still dropped at ~15%: 7,500 trials, mean 1,125,
    # sigma = sqrt(7500 · 0.15 · 0.85) = 30.9.
    dropped = sum(15 - sum(t not in protected for t in tags[4:]) for tags in caps)
    assert abs(dropped - 1125) < 4 * math.sqrt(7500 * 0.15 * 0.85)


def test_deterministic_per_seed_epoch_and_id():
    a = augment_caption(RECORD, seed=3, epoch=5)
    assert augment_caption(dict(RECORD), seed=3, epoch=5) == a
    # other epochs, seeds or ids give other captions (19 tags shuffled: a repeat is ~1/19!)
    assert augment_caption(RECORD, seed=3, epoch=6) != a
    assert augment_caption(RECORD, seed=4, epoch=5) != a
    assert augment_caption(dict(RECORD, id=4243), seed=3, epoch=5) != a


def test_bad_input_is_a_clear_error():
    with pytest.raises(HakubooruError, match="lacks general"):
        augment_caption({k: v for k, v in RECORD.items() if k != "general"}, seed=0, epoch=0)
    with pytest.raises(HakubooruError, match="dropout"):
        augment_caption(RECORD, seed=0, epoch=0, drop=1.5)


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
    for e in range(DRAWS):
        tags = augment_text(text, seed=7, epoch=e, sample_id=4242).split(", ")
        assert len(set(tags)) == len(tags) and set(tags) <= set(REST)
        dropped += len(REST) - len(tags)
    # 500 x 19 = 9,500 Bernoulli(0.15) trials: mean 1,425, sigma 34.8 (as above); 4 sigma.
    trials = DRAWS * len(REST)
    assert abs(dropped - 0.15 * trials) < 4 * math.sqrt(trials * 0.15 * 0.85)


def test_negative_keep_tokens_keep_nothing_in_front():
    """A keep count below 0 means none kept in front (like 0): every tag once, in order."""
    assert augment_text("a, b, c", seed=0, epoch=0, sample_id=1, shuffle=False, drop=0.0,
                        keep_tokens=-1) == "a, b, c"
    assert augment_text("a, b, c", seed=0, epoch=0, sample_id=1, shuffle=False, drop=0.0,
                        keep_tokens=-5) == "a, b, c"
