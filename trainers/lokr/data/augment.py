"""Per-step caption rebuild (recipe §2): the keep group stays in front as it is; the other tags
are shuffled and some dropped. From a sample's structured record (augment_caption) or, for
shards with only a caption text, from its comma-separated tags (augment_text)."""
from __future__ import annotations

from hakubooru.errors import HakubooruError
from hakubooru.rng import generator

# Separates this stream from other randomness drawn from the same (seed, epoch, post id).
CAPTION_STREAM = 0xCA7
GROUPS = ("keep", "general", "quality", "year", "meta", "rating_tags")
PROTECTABLE = ("quality", "year", "rating_tags")


def augment_caption(record: dict, *, seed: int, epoch: int, shuffle: bool = True,
                    drop: float = 0.15, protect_quality_year_rating: bool = False,
                    separator: str = ", ") -> str:
    """The caption for one sample in one epoch: ``keep`` tags first in their order, then the
    ``general``, ``quality``, ``year``, ``meta`` and ``rating_tags`` tags, each dropped with
    probability ``drop`` (never the quality/year/rating tags when protected) and, with
    ``shuffle``, in random order. Randomness comes from (seed, epoch, post id) only, so the
    same sample gets the same caption in the same epoch on any worker or rank.
    With ``shuffle=False`` and ``drop=0`` the result is the stored ``.txt`` caption."""
    _check_drop(drop)
    missing = [g for g in ("id",) + GROUPS if g not in record]
    if missing:
        raise HakubooruError(f"caption record of post {record.get('id', '?')} lacks "
                             f"{', '.join(missing)}")
    rest = [tag for g in GROUPS[1:] for tag in record[g]]
    protected = [protect_quality_year_rating and g in PROTECTABLE
                 for g in GROUPS[1:] for _ in record[g]]
    kept = _shuffle_drop(rest, protected, seed, epoch, int(record["id"]), shuffle, drop)
    return separator.join(list(record["keep"]) + kept)


def augment_text(text: str, *, seed: int, epoch: int, sample_id: int, shuffle: bool = True,
                 drop: float = 0.15, keep_tokens: int = 0, keep_separator: str | None = "|||",
                 separator: str = ", ") -> str:
    """The caption for one sample in one epoch from its caption text, as sd-scripts treats one:
    comma-separated tags; the part before ``keep_separator`` (when the text holds it; a second
    one starts a fixed tail), else the first ``keep_tokens`` tags, stay in front in their order;
    the others are dropped with probability ``drop`` and, with ``shuffle``, reordered.
    Randomness from (seed, epoch, sample id) only."""
    _check_drop(drop)
    text = text.strip()
    tail: list[str] = []
    if keep_separator and keep_separator in text:
        head, flexible = text.split(keep_separator, 1)
        if keep_separator in flexible:
            flexible, end = flexible.split(keep_separator, 1)
            tail = _tags(end)
        fixed, flexible = _tags(head), _tags(flexible)
    else:
        tags = _tags(text)
        fixed, flexible = tags[:max(0, keep_tokens)], tags[max(0, keep_tokens):]
    kept = _shuffle_drop(flexible, [False] * len(flexible), seed, epoch, int(sample_id),
                         shuffle, drop)
    return separator.join(fixed + kept + tail)


def _tags(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _check_drop(drop: float) -> None:
    if not 0.0 <= drop < 1.0:
        raise HakubooruError(f"tag dropout must be in [0, 1), got {drop}")


def _shuffle_drop(tags: list, protected: list, seed: int, epoch: int, sample_id: int,
                  shuffle: bool, drop: float) -> list:
    """``tags`` each kept with probability 1 - drop (always when protected), in random order
    with ``shuffle``: draws from generator(seed, epoch, sample id, CAPTION_STREAM)."""
    rng = generator(seed, epoch, sample_id, CAPTION_STREAM)
    keep_draw = rng.random(len(tags)) >= drop
    order = rng.permutation(len(tags)) if shuffle else range(len(tags))
    return [tags[i] for i in order if keep_draw[i] or protected[i]]
