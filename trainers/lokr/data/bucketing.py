"""Aspect-ratio buckets (recipe §3): which bucket sizes exist, which bucket an image goes to,
and how it is scaled and cropped into it."""
from __future__ import annotations

import math

import numpy as np

from hakubooru.errors import HakubooruError


def make_buckets(area: int = 1024 * 1024, min_side: int = 256, max_side: int = 4096,
                 step: int = 64) -> list[tuple[int, int]]:
    """The bucket sizes (w, h) by the reference trainer's rule: the square, then for every
    width w = min_side, min_side+step, …, max_side the height
    h = min(max_side, ⌊⌊area / w⌋ / step⌋ · step), adding (w, h) and (h, w) where h ≥ min_side.
    Duplicates dropped; sorted by aspect ratio w/h, then width."""
    if step <= 0 or min_side <= 0 or min_side > max_side or area <= 0:
        raise HakubooruError(f"impossible buckets: area={area}, sides {min_side}-{max_side}, "
                             f"step {step}")
    side = math.isqrt(area) // step * step
    found = {(side, side)}
    for w in range(min_side, max_side + 1, step):
        h = min(max_side, area // w // step * step)
        if h >= min_side:
            found.update({(w, h), (h, w)})
    return sorted(found, key=lambda b: (b[0] / b[1], b[0]))


def assign_buckets(widths, heights, buckets) -> np.ndarray:
    """For each image, the index into ``buckets`` of the bucket whose aspect ratio is nearest
    its own, measured as |log(w/h) − log(bw/bh)| so that an image and its transpose go to
    transposed buckets. Ties go to the bucket of smaller aspect ratio (the taller one); among
    buckets of equal aspect ratio the first listed wins. Vectorised (int64 result)."""
    w = np.asarray(widths, dtype=np.float64)
    h = np.asarray(heights, dtype=np.float64)
    if w.shape != h.shape:
        raise HakubooruError("assign_buckets: widths and heights differ in length")
    if w.size and (w.min() <= 0 or h.min() <= 0):
        raise HakubooruError("assign_buckets: image sizes must be positive")
    if not buckets:
        raise HakubooruError("assign_buckets: no buckets")
    b = np.asarray(buckets, dtype=np.float64)
    ratios = np.log(b[:, 0] / b[:, 1])
    order = np.argsort(ratios, kind="stable")
    sorted_ratios, first = np.unique(ratios[order], return_index=True)
    # Bucket k wins between the midpoints to its neighbours; a midpoint itself goes left.
    midpoints = (sorted_ratios[1:] + sorted_ratios[:-1]) / 2
    nearest = np.searchsorted(midpoints, np.log(w / h), side="left")
    return order[first][nearest].astype(np.int64)


def crop_box(w: int, h: int, bucket_w: int, bucket_h: int, *, random_crop: bool = False,
             u: float = 0.5) -> tuple[int, int, int, int]:
    """How an image of size (w, h) fills a bucket: ``(resized_w, resized_h, crop_top, crop_left)``.

    The image is scaled to cover the bucket — by bucket_h / h when it is relatively wider than
    the bucket, else by bucket_w / w — with the other side rounded half up, and the overhang
    cropped: centred, or with ``random_crop`` at offset ⌊u · (overhang + 1)⌋ for the caller's
    deterministic ``u`` in [0, 1). Offsets are in the resized image's pixels (SDXL time ids)."""
    if min(w, h, bucket_w, bucket_h) <= 0:
        raise HakubooruError(f"crop_box: sizes must be positive, got image {w}x{h}, "
                             f"bucket {bucket_w}x{bucket_h}")
    if w * bucket_h > bucket_w * h:  # relatively wider: height fits, width overhangs
        rw, rh = (2 * w * bucket_h + h) // (2 * h), bucket_h
    else:
        rw, rh = bucket_w, (2 * h * bucket_w + w) // (2 * w)
    over_x, over_y = rw - bucket_w, rh - bucket_h
    if random_crop:
        left, top = int(u * (over_x + 1)), int(u * (over_y + 1))
    else:
        left, top = over_x // 2, over_y // 2
    return rw, rh, top, left


def assign_no_upscale(widths, heights, buckets, *, area: int, min_side: int, max_side: int,
                      step: int) -> tuple[list[tuple[int, int]], np.ndarray]:
    """``data.bucket_no_upscale`` (sd-scripts' ``--bucket_no_upscale``): an image of fewer pixels
    than ``area`` whose bucket would enlarge it gets a smaller bucket that fits inside it
    (``bw ≤ w`` and ``bh ≤ h``: scaled down or not at all, then cropped). The smaller buckets
    come from a ladder of bucket sets, ``make_buckets(s², ...)`` for s = the largest multiple of
    ``step`` below √area, then each ``step`` less down to ``min_side``: an image tries the set of
    its own size first (s ≤ √(w·h)), the nearest aspect ratio there, then the sets below, so
    images of similar size share buckets. An image too small for every set takes the nearest
    bucket of the smallest. Returns the buckets (``buckets``, then the smaller ones used, by
    aspect ratio then width) and each image's index into them."""
    w = np.asarray(widths, dtype=np.int64)
    h = np.asarray(heights, dtype=np.int64)
    chosen = assign_buckets(w, h, buckets)
    b = np.asarray(buckets, dtype=np.int64).reshape(-1, 2)
    pending = (w * h < area) & ((b[chosen, 0] > w) | (b[chosen, 1] > h))
    level = np.sqrt((w * h).astype(np.float64)).astype(np.int64) // step * step
    top = math.isqrt(area) // step * step
    new: dict[tuple[int, int], np.ndarray] = {}
    ladder = list(range(top - step if top * top >= area else top, min_side - 1, -step)) or [min_side]
    for s in ladder:
        last = s == ladder[-1]
        rows = np.flatnonzero(pending & ((level >= s) | last))
        if rows.size == 0:
            continue
        cand = make_buckets(area=s * s, min_side=min_side, max_side=max_side, step=step)
        k = assign_buckets(w[rows], h[rows], cand)
        cb = np.asarray(cand, dtype=np.int64)[k]
        fit = ((cb[:, 0] <= w[rows]) & (cb[:, 1] <= h[rows])) | last
        for (bw, bh), r in zip(map(tuple, cb[fit]), rows[fit]):
            new.setdefault((int(bw), int(bh)), []).append(r)
        pending[rows[fit]] = False
    out = [tuple(map(int, x)) for x in buckets]
    known = {x: i for i, x in enumerate(out)}
    for bucket in sorted(new, key=lambda x: (x[0] / x[1], x[0])):
        if bucket not in known:
            known[bucket] = len(out)
            out.append(bucket)
        chosen[np.asarray(new[bucket], dtype=np.int64)] = known[bucket]
    return out, chosen.astype(np.int64)


def config_buckets(dc: dict, widths, heights) -> tuple[list[tuple[int, int]], np.ndarray]:
    """The buckets of a ``[data]`` config and each image's bucket index: ``make_buckets`` and the
    nearest aspect ratio, or with ``bucket_no_upscale`` ``assign_no_upscale``."""
    area = dc["resolution"] ** 2
    buckets = make_buckets(area=area, min_side=dc["bucket_min"], max_side=dc["bucket_max"], step=dc["bucket_step"])
    if not dc.get("bucket_no_upscale", False):
        return buckets, assign_buckets(widths, heights, buckets)
    return assign_no_upscale(widths, heights, buckets, area=area, min_side=dc["bucket_min"],
                             max_side=dc["bucket_max"], step=dc["bucket_step"])
