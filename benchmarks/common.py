"""Shared benchmark data: synthetic databases under bench-data/ (git-ignored), made once."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_DATA = ROOT / "bench-data"
sys.path.insert(0, str(ROOT))

from hakubooru.synth.demo import make_folder  # noqa: E402


def synth_db(posts: int = 1_000_000, data: Path = BENCH_DATA) -> Path:
    """Path of a synthetic database of ``posts`` posts (no images); generated unless a complete
    one made with the same arguments and generator version is already there."""
    name = f"synth-{posts // 1_000_000}m" if posts % 1_000_000 == 0 else f"synth-{posts}"
    db_path, _ = make_folder(Path(data) / name, posts, images=False)
    return db_path
