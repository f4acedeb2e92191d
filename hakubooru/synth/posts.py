"""The post table of the synthetic database: every column, vectorised with numpy.

Shapes follow Danbooru: ids with gaps up to ~7.9M, upload times rising with id from 2005
to 2024 (written in varied UTC offsets), four ratings, heavy-tailed favourites that are
lower for newer posts, a few percent of deleted / Gold-only / banned / non-image posts,
and image sizes with Danbooru-like aspect ratios.
"""
from __future__ import annotations

import numpy as np

MAX_ID = 7_900_000
# The recipe's id windows; each gets its proportional share of the posts (at least one).
ID_WINDOWS = ((1, 2_000_000), (2_000_000, 5_000_000), (5_000_000, MAX_ID))

# (post id, UTC upload time) knots; created_at is interpolated between them.
TIME_KNOTS = (
    (0, "2005-05-24T00:00:00"),
    (1_000_000, "2011-09-01T00:00:00"),
    (2_000_000, "2015-07-01T00:00:00"),
    (3_000_000, "2018-03-01T00:00:00"),
    (4_000_000, "2020-08-01T00:00:00"),
    (5_000_000, "2021-12-01T00:00:00"),
    (6_000_000, "2023-02-01T00:00:00"),
    (7_000_000, "2023-12-15T00:00:00"),
    (MAX_ID, "2024-08-31T00:00:00"),
)
UTC_OFFSETS = {"-05:00": 0.28, "-04:00": 0.28, "+00:00": 0.16, "+09:00": 0.12, "+08:00": 0.05,
               "-08:00": 0.04, "-07:00": 0.03, "+01:00": 0.02, "+05:30": 0.02}

RATING_SHARES = (0.36, 0.31, 0.15, 0.18)  # general, sensitive, questionable, explicit
RATING_FAV_BONUS = np.array([0.0, 0.25, 0.5, 0.7])  # log-scale favourites by rating

DELETED_SHARE, GOLD_SHARE, BANNED_SHARE, NON_IMAGE_SHARE = 0.04, 0.025, 0.015, 0.05
IMAGE_EXTS = {"jpg": 0.68, "png": 0.27, "webp": 0.05}
NON_IMAGE_EXTS = {"gif": 0.45, "mp4": 0.3, "webm": 0.1, "zip": 0.1, "swf": 0.05}
BYTES_PER_PIXEL = {"jpg": 0.35, "png": 1.4, "webp": 0.25, "gif": 0.6, "mp4": 2.0, "webm": 1.5,
                   "zip": 3.0, "swf": 0.5}
# Aspect classes: share, and the range of long side / short side.
ASPECTS = {"portrait": (0.55, 1.2, 1.8), "landscape": (0.25, 1.2, 1.9), "square": (0.15, 1.0, 1.0),
           "tall": (0.025, 3.0, 4.0), "wide": (0.025, 3.0, 4.0)}
SAMPLE_WIDTH = 850  # Danbooru makes a "large" sample above this width
CDN = "https://cdn.donmai.us"

# Column order of the insert; matches hakubooru.db.Post.
COLUMNS = (
    "id", "created_at", "uploader_id", "source", "md5", "parent_id", "has_children",
    "is_deleted", "is_banned", "pixiv_id", "has_active_children", "bit_flags", "has_large",
    "has_visible_children", "image_width", "image_height", "file_size", "file_ext", "rating",
    "score", "up_score", "down_score", "fav_count", "file_url", "large_file_url",
    "preview_file_url", "updated_at",
)


def _pick(rng: np.random.Generator, shares: dict, n: int) -> np.ndarray:
    keys = np.array(list(shares))
    p = np.array(list(shares.values()), float)
    return keys[rng.choice(len(keys), size=n, p=p / p.sum())]


def post_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """n sorted distinct ids with random gaps, each recipe window getting its share."""
    spans = np.array([hi - lo for lo, hi in ID_WINDOWS], float)
    counts = np.floor(n * spans / spans.sum()).astype(int)
    counts[np.argsort(-(n * spans / spans.sum() - counts))[: n - counts.sum()]] += 1
    if n >= len(ID_WINDOWS):
        while (counts == 0).any():
            counts[np.argmin(counts)] += 1
            counts[np.argmax(counts)] -= 1
    ids = [lo + rng.choice(hi - lo, size=k, replace=False) for (lo, hi), k in zip(ID_WINDOWS, counts)]
    return np.sort(np.concatenate(ids)).astype(np.int64)


def _timestamps(ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """UTC upload times in ms, strictly following the id order (ids are upload order)."""
    knot_ids = np.array([k for k, _ in TIME_KNOTS], float)
    knot_ms = np.array([np.datetime64(t, "ms").astype(np.int64) for _, t in TIME_KNOTS], float)
    return np.interp(ids + rng.random(len(ids)), knot_ids, knot_ms).astype(np.int64)


def _iso(ms: np.ndarray, offsets: np.ndarray) -> list[str]:
    """``2010-12-31T23:30:00.000-05:00``: the local time in each post's UTC offset."""
    minutes = np.array([(1 if o[0] == "+" else -1) * (int(o[1:3]) * 60 + int(o[4:6])) for o in offsets])
    local = np.datetime_as_string((ms + minutes * 60_000).astype("datetime64[ms]"), unit="ms")
    return [t + o for t, o in zip(local.tolist(), offsets.tolist())]


def _sizes(rng: np.random.Generator, ids: np.ndarray):
    n = len(ids)
    names = list(ASPECTS)
    share, lo, hi = (np.array(col, float) for col in zip(*ASPECTS.values()))
    k = rng.choice(len(names), size=n, p=share / share.sum())
    ratio = lo[k] + (hi[k] - lo[k]) * rng.random(n)  # long side / short side
    extreme = np.isin(k, [names.index("tall"), names.index("wide")])
    ratio = np.where(extreme, np.round(ratio), ratio)  # exactly 1:3 or 1:4 (or 3:1, 4:1)
    # Newer uploads are bigger: median long side ~1000 px in 2005, ~2600 px in 2024.
    long_side = np.round(np.clip((1000 + 1600 * ids / MAX_ID) * rng.lognormal(0.0, 0.35, n), 600, 6000))
    short_side = np.maximum(np.round(long_side / ratio), 1)
    tallish = np.isin(k, [names.index("portrait"), names.index("tall")])
    width = np.where(tallish, short_side, long_side).astype(np.int64)
    height = np.where(tallish, long_side, short_side).astype(np.int64)
    return width, height


def _hex32(rng: np.random.Generator, n: int) -> list[str]:
    a = rng.integers(0, 1 << 64, n, dtype=np.uint64).tolist()
    b = rng.integers(0, 1 << 64, n, dtype=np.uint64).tolist()
    return [f"{x:016x}{y:016x}" for x, y in zip(a, b)]


def make_posts(rng: np.random.Generator, n: int) -> dict:
    """All columns of n posts, in COLUMNS order: int64 arrays, or lists where a column
    holds text or NULLs (numpy keeps the memory low for a million posts)."""
    ids = post_ids(rng, n)
    created_ms = _timestamps(ids, rng)
    offsets = _pick(rng, UTC_OFFSETS, n)
    updated_ms = np.minimum(created_ms + (rng.exponential(200.0, n) * 86_400_000).astype(np.int64),
                            np.datetime64("2024-11-30T00:00:00", "ms").astype(np.int64))

    rating = rng.choice(4, size=n, p=RATING_SHARES)
    # Favourites: lognormal, higher for nsfw ratings, much lower for the newest posts.
    newness = np.clip((ids - 6_000_000) / (MAX_ID - 6_000_000), 0.0, 1.0)
    fav = np.floor(rng.lognormal(3.0 + RATING_FAV_BONUS[rating] - 2.5 * newness, 1.1)).astype(np.int64)
    up = np.round(fav * (0.4 + 0.5 * rng.random(n))).astype(np.int64) + rng.poisson(1.0, n)
    down = -rng.poisson(0.3 + 0.05 * np.sqrt(fav), n)

    is_deleted = rng.random(n) < DELETED_SHARE
    is_gold = rng.random(n) < GOLD_SHARE
    is_banned = rng.random(n) < BANNED_SHARE
    non_image = rng.random(n) < NON_IMAGE_SHARE
    ext = np.where(non_image, _pick(rng, NON_IMAGE_EXTS, n), _pick(rng, IMAGE_EXTS, n))
    width, height = _sizes(rng, ids)
    bpp = np.array([BYTES_PER_PIXEL[e] for e in ext.tolist()])
    file_size = np.round(width * height * bpp * rng.lognormal(0.0, 0.3, n)).astype(np.int64)
    has_large = ~non_image & (width > SAMPLE_WIDTH)

    # About 6% of posts are children of one of the ten posts before them.
    is_child = (rng.random(n) < 0.06) & (np.arange(n) > 0)
    parent_pos = np.maximum(np.arange(n) - rng.integers(1, 11, n), 0)
    parent_id = np.where(is_child, ids[parent_pos], -1)
    has_children = np.isin(ids, parent_id[is_child])

    source_kind = rng.choice(4, size=n, p=(0.4, 0.3, 0.1, 0.2))  # pixiv, twitter, other, none
    pixiv_id = rng.integers(20_000, 120_000_000, n)
    status_id = rng.integers(10**15, 10**18, n)
    md5 = _hex32(rng, n)

    ext_l, kind_l, gold_l = ext.tolist(), source_kind.tolist(), is_gold.tolist()
    large_l = has_large.tolist()
    source, file_url, large_url, preview_url, md5_col = [], [], [], [], []
    for i, (m, e) in enumerate(zip(md5, ext_l)):
        k = kind_l[i]
        source.append(f"https://www.pixiv.net/artworks/{pixiv_id[i]}" if k == 0 else
                      f"https://twitter.com/i/web/status/{status_id[i]}" if k == 1 else
                      f"https://www.deviantart.com/art/{pixiv_id[i]}" if k == 2 else "")
        if gold_l[i]:  # Gold-only posts come without md5 and urls in the public dump
            md5_col.append(None), file_url.append(None), large_url.append(None), preview_url.append(None)
            continue
        d = f"{m[:2]}/{m[2:4]}"
        md5_col.append(m)
        file_url.append(f"{CDN}/original/{d}/{m}.{e}")
        large_url.append(f"{CDN}/sample/{d}/sample-{m}.jpg" if large_l[i] else file_url[-1])
        preview_url.append(f"{CDN}/180x180/{d}/{m}.jpg")

    ints = lambda a: a.astype(np.int64)  # noqa: E731
    return {
        "id": ints(ids),
        "created_at": _iso(created_ms, offsets),
        "uploader_id": ints(rng.integers(1, 1_000_000, n)),
        "source": source,
        "md5": md5_col,
        "parent_id": [p if p >= 0 else None for p in parent_id.tolist()],
        "has_children": ints(has_children),
        "is_deleted": ints(is_deleted),
        "is_banned": ints(is_banned),
        "pixiv_id": [p if k == 0 else None for p, k in zip(pixiv_id.tolist(), kind_l)],
        "has_active_children": ints(has_children),
        "bit_flags": np.zeros(n, np.int64),
        "has_large": ints(has_large),
        "has_visible_children": ints(has_children),
        "image_width": ints(width),
        "image_height": ints(height),
        "file_size": ints(file_size),
        "file_ext": ext_l,
        "rating": ints(rating),
        "score": ints(up + down),
        "up_score": ints(up),
        "down_score": ints(down),
        "fav_count": ints(fav),
        "file_url": file_url,
        "large_file_url": large_url,
        "preview_file_url": preview_url,
        "updated_at": _iso(updated_ms, offsets),
    }
