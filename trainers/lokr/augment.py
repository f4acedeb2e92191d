"""Per-step caption rebuild from a sample's structured record (recipe §2): the keep group stays
in front as it is; the other tags are shuffled and some dropped."""
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
    if not 0.0 <= drop < 1.0:
        raise HakubooruError(f"tag dropout must be in [0, 1), got {drop}")
    missing = [g for g in ("id",) + GROUPS if g not in record]
    if missing:
        raise HakubooruError(f"caption record of post {record.get('id', '?')} lacks "
                             f"{', '.join(missing)}")
    rest = [(tag, g in PROTECTABLE) for g in GROUPS[1:] for tag in record[g]]
    rng = generator(seed, epoch, int(record["id"]), CAPTION_STREAM)
    keep_draw = rng.random(len(rest)) >= drop
    order = rng.permutation(len(rest)) if shuffle else range(len(rest))
    kept = [rest[i][0] for i in order
            if keep_draw[i] or (protect_quality_year_rating and rest[i][1])]
    return separator.join(list(record["keep"]) + kept)
