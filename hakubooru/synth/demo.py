"""A complete synthetic data folder (database + image archives), built once and reused.

``OUT/danbooru2023.db`` and ``OUT/images/`` plus ``OUT/synth.json``, which records the
arguments, whether the folder is complete, and the counts. A folder whose synth.json says
complete for the same arguments is left alone; one made with other arguments, or left
incomplete by an interrupted run, is rebuilt; a folder holding a database this generator
did not make (no synth.json) is never touched.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import HakubooruError
from .archives import make_archives
from .database import GENERATOR_VERSION, check_args, make_database

DB_NAME = "danbooru2023.db"
IMAGES_NAME = "images"
MARKER_NAME = "synth.json"


def make_folder(out_dir, n_posts: int, seed: int = 0, max_side: int = 128, images: bool = True,
                images_limit: int | None = None, layout: str = "webp4m", force: bool = False,
                progress: bool = True) -> tuple[Path, Path]:
    """Write OUT/danbooru2023.db and (unless images=False) OUT/images/; return both paths.

    Skips the work when OUT already holds a complete folder made with the same arguments
    (force=True rebuilds it anyway).
    """
    check_args(n_posts, seed)
    out_dir = Path(out_dir)
    db_path, images_dir, marker = out_dir / DB_NAME, out_dir / IMAGES_NAME, out_dir / MARKER_NAME
    args = {"generator": GENERATOR_VERSION, "posts": int(n_posts), "seed": int(seed),
            "images": bool(images), "image_side": int(max_side), "images_limit": images_limit,
            "layout": layout}
    previous = json.loads(marker.read_text()) if marker.is_file() else None
    if previous is None and (db_path.exists() or images_dir.exists()):
        raise HakubooruError(f"{out_dir} holds a {DB_NAME} or {IMAGES_NAME}/ not made by the synthetic "
                             "generator (no synth.json); refusing to replace it")
    complete = previous is not None and previous.get("args") == args and previous.get("complete")
    if complete and db_path.is_file() and not force:
        if progress:
            print(f"synth: {out_dir} is already complete for these arguments; nothing to do")
        return db_path, images_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_marker(marker, {"args": args, "complete": False})  # ours from now on, even if interrupted
    if images_dir.exists():
        shutil.rmtree(images_dir)
    make_database(db_path, n_posts, seed, overwrite=True, progress=progress)
    counts = {}
    if images:
        counts = make_archives(db_path, images_dir, seed, max_side, images_limit, layout, progress)
    _write_marker(marker, {"args": args, "complete": True, "counts": counts})
    return db_path, images_dir


def _write_marker(marker: Path, content: dict) -> None:
    marker.write_text(json.dumps(content, indent=1, sort_keys=True) + "\n")


def make_demo(out_dir, n_posts: int = 2000, seed: int = 0, max_side: int = 128,
              progress: bool = True) -> tuple[Path, Path]:
    """Database + webp-4Mpixel archives for demos and tests: (db_path, images_dir).

    Reuses the folder when it is already complete for these arguments.
    """
    return make_folder(out_dir, n_posts, seed, max_side, progress=progress)
