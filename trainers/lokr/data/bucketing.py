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
