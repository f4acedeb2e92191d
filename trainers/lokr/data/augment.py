"""Per-step caption rebuild (recipe §2). From a sample's structured record (augment_caption):
the keep group stays in front as it is; with the card's scope ``"general"`` only the general
tags are shuffled and some dropped, and the quality, year, meta and rating tags follow them in
that order, never moved or dropped; with ``"all"`` every tag after the keep group moves and drops
(sd-scripts' ``shuffle_caption`` after its keep tokens). For shards with only a caption text,
from its comma-separated tags as sd-scripts reads them (augment_text)."""
from __future__ import annotations

from hakubooru.errors import HakubooruError
from hakubooru.rng import generator

# Separates this stream from other randomness drawn from the same (seed, epoch, post id).
CAPTION_STREAM = 0xCA7
GROUPS = ("keep", "general", "quality", "year", "meta", "rating_tags")
TAIL = ("quality", "year", "meta", "rating_tags")  # after the general tags, in the card's order
SHUFFLE_SCOPES = ("general", "all")


def augment_caption(record: dict, *, seed: int, epoch: int, shuffle: bool = True,
                    drop: float = 0.15, scope: str = "general", separator: str = ", ") -> str:
    """The caption for one sample in one epoch: ``keep`` tags first in their order; then, with
    ``scope="general"`` (the card's rule), the ``general`` tags, each dropped with probability
    ``drop`` and, with ``shuffle``, in random order, followed by the ``quality``, ``year``,
    ``meta`` and ``rating_tags`` tags as they are; with ``scope="all"``, the general and those
    tags all dropped and shuffled together. Randomness comes from (seed, epoch, post id) only,
    so the same sample gets the same caption in the same epoch on any worker or rank.
    With ``shuffle=False`` and ``drop=0`` the result is the stored ``.txt`` caption."""
    _check_drop(drop)
    if scope not in SHUFFLE_SCOPES:
        raise HakubooruError(f"shuffle scope must be one of {', '.join(SHUFFLE_SCOPES)}, got {scope!r}")
    missing = [g for g in ("id",) + GROUPS if g not in record]
    if missing:
        raise HakubooruError(f"caption record of post {record.get('id', '?')} lacks "
                             f"{', '.join(missing)}")
    tail = [tag for g in TAIL for tag in record[g]]
    flexible = list(record["general"]) + (tail if scope == "all" else [])
    fixed_tail = [] if scope == "all" else tail
    kept = _shuffle_drop(flexible, seed, epoch, int(record["id"]), shuffle, drop)
    return separator.join(list(record["keep"]) + kept + fixed_tail)


def augment_text(text: str, *, seed: int, epoch: int, sample_id: int, shuffle: bool = True,
                 drop: float = 0.15, keep_tokens: int = 0, keep_separator: str | None = "|||",
                 separator: str = ", ") -> str:
    """The caption for one sample in one epoch from its caption text, as sd-scripts treats one:
    comma-separated tags; the part before ``keep_separator`` (when the text holds it; a second
    one starts a fixed tail), else the first ``keep_tokens`` tags, stay in front in their order;
    the others are dropped with probability ``drop`` and, with ``shuffle``, reordered. A ``.txt``
    written with ``--keep-separator SEP`` (``keep SEP general SEP quality, year, meta, rating``)
    so gives the card's rule, with the same draws as the record. Randomness from (seed, epoch,
    sample id) only."""
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
    kept = _shuffle_drop(flexible, seed, epoch, int(sample_id), shuffle, drop)
    return separator.join(fixed + kept + tail)


def _tags(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _check_drop(drop: float) -> None:
    if not 0.0 <= drop < 1.0:
        raise HakubooruError(f"tag dropout must be in [0, 1), got {drop}")


def _shuffle_drop(tags: list, seed: int, epoch: int, sample_id: int, shuffle: bool, drop: float) -> list:
    """``tags`` each kept with probability 1 - drop, in random order with ``shuffle``: draws
    from generator(seed, epoch, sample id, CAPTION_STREAM), so a record and its ``.txt`` with
    the same flexible tags get the same caption."""
    rng = generator(seed, epoch, sample_id, CAPTION_STREAM)
    keep_draw = rng.random(len(tags)) >= drop
    order = rng.permutation(len(tags)) if shuffle else range(len(tags))
    return [tags[i] for i in order if keep_draw[i]]
