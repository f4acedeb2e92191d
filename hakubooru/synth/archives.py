"""make_archives(): image archives for a synthetic database, in the layouts real data comes in.

Layouts (docs/formats.md):
- ``webp4m`` (danbooru2023-webp-4Mpixel): ``data-0NNN.tar`` (ids < 5,000,000) and
  ``data-1NNN.tar`` (ids >= 5,000,000), NNN = id % 1000, members ``<id>.webp``;
- ``nyanko`` (nyanko7/danbooru2023): ``original/data-0NNN.tar`` and ``recent/data-1NNN.tar``,
  members ``<id>.<file_ext>`` encoded as the post's own type (jpg, png, webp);
- ``folder``: ``<id>.<file_ext>`` files in one folder.

Posts without an image (gif, video, ugoira zip, flash), Gold-only posts (no md5) and about
3% of the others ("not in the archives") get no file. Tars are written deterministically:
members sorted by id, fixed mtime/uid/gid/mode/owner names, so the bytes depend only on
the database and the arguments.
"""
from __future__ import annotations

import io
import os
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..db import open_db
from ..errors import HakubooruError
from ..rng import hash64, hash64_array
from .images import HAIR_TAGS, SHAPE_TAGS, encode, render

LAYOUTS = ("webp4m", "nyanko", "folder")
IMAGE_EXTS = ("jpg", "png", "webp")
LEFT_OUT_SHARE = 0.03
LEFT_OUT_STREAM = 7
RECENT_FROM_ID = 5_000_000
TAR_MTIME = 1_704_067_200  # 2024-01-01T00:00:00Z, for every member


def member_path(layout: str, post_id: int, file_ext: str) -> tuple[str | None, str]:
    """(tar file relative to images_dir or None for a plain file, member name) of a post."""
    bucket = f"{1 if post_id >= RECENT_FROM_ID else 0}{post_id % 1000:03d}"
    if layout == "webp4m":
        return f"data-{bucket}.tar", f"{post_id}.webp"
    if layout == "nyanko":
        folder = "recent" if post_id >= RECENT_FROM_ID else "original"
        return f"{folder}/data-{bucket}.tar", f"{post_id}.{file_ext}"
    return None, f"{post_id}.{file_ext}"


def _spread(ids: np.ndarray, limit: int) -> np.ndarray:
    """limit ids spread evenly over the sorted ids (so every id window keeps some)."""
    if limit >= len(ids):
        return ids
    return ids[np.unique(np.linspace(0, len(ids) - 1, limit).round().astype(np.int64))]


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def make_archives(db_path, images_dir, seed: int = 0, max_side: int = 128, limit: int | None = None,
                  layout: str = "webp4m", progress: bool = True) -> dict:
    """Write one small picture per image post of the database into images_dir; return counts.

    ``limit`` keeps at most that many pictures, spread evenly over the ids (a 1M-post
    database with a few thousand images). Counts: ``images`` written, ``tars`` written,
    and the posts without a file and why: ``non_image``, ``gold``, ``left_out``, ``over_limit``.
    """
    if layout not in LAYOUTS:
        raise HakubooruError(f"unknown archive layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if max_side < 8:
        raise HakubooruError(f"image side must be at least 8 pixels, got {max_side}")
    if limit is not None and limit < 0:
        raise HakubooruError(f"images limit must be >= 0, got {limit}")
    db = open_db(db_path)
    try:
        rows = db.execute_sql("SELECT id, image_width, image_height, file_ext, md5 IS NULL FROM post "
                              "ORDER BY id").fetchall()
        by_id = {r[0]: r for r in rows}
        non_image = sum(1 for r in rows if r[3] not in IMAGE_EXTS)
        gold = sum(1 for r in rows if r[3] in IMAGE_EXTS and r[4])
        candidates = [r[0] for r in rows if r[3] in IMAGE_EXTS and not r[4]]
        candidates = np.array(candidates, np.int64)
        # uniform(hash64(seed, LEFT_OUT_STREAM), id), vectorised: the same post is always left out
        draw = (hash64_array(hash64(seed, LEFT_OUT_STREAM), candidates) >> np.uint64(11)) / float(1 << 53)
        kept = candidates[draw >= LEFT_OUT_SHARE]
        chosen = _spread(kept, len(kept) if limit is None else limit).tolist()
        wanted = sorted(HAIR_TAGS.keys() | SHAPE_TAGS)
        chosen_set = set(chosen)
        tags = defaultdict(set)
        cursor = db.execute_sql(
            "SELECT r.post_id, t.name FROM posttagrelation r JOIN tag t ON t.id = r.tag_id "
            f"WHERE t.name IN ({','.join('?' * len(wanted))})", wanted)
        for post_id, name in cursor:
            if post_id in chosen_set:
                tags[post_id].add(name)
    finally:
        db.close()

    images_dir = Path(images_dir)
    groups = defaultdict(list)  # tar file (None: plain files) -> [(post id, member name)]
    for post_id in chosen:
        tar_name, member = member_path(layout, post_id, by_id[post_id][3])
        groups[tar_name].append((post_id, member))
    bar = tqdm(total=len(chosen), desc=f"synth images ({layout})", unit="img", disable=not progress)
    for tar_name, posts in sorted(groups.items(), key=lambda g: g[0] or ""):
        members = []
        for post_id, member in posts:
            _, width, height, _, _ = by_id[post_id]
            img = render(post_id, width, height, tags[post_id], seed, max_side)
            members.append((member, encode(img, member.rsplit(".", 1)[1])))
            bar.update()
        target = images_dir if tar_name is None else (images_dir / tar_name).parent
        target.mkdir(parents=True, exist_ok=True)
        if tar_name is None:
            for member, data in members:
                (images_dir / member).write_bytes(data)
        else:
            _write_tar(images_dir / tar_name, members)
    bar.close()
    n_tars = sum(1 for name in groups if name is not None)
    counts = {"images": len(chosen), "tars": n_tars, "non_image": non_image, "gold": gold,
              "left_out": len(candidates) - len(kept), "over_limit": len(kept) - len(chosen)}
    if progress:
        print("synth images: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + f" -> {images_dir}")
    return counts
