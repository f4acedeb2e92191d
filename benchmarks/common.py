"""Shared benchmark data: synthetic databases under bench-data/ (git-ignored), made once."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_DATA = ROOT / "bench-data"


def synth_db(posts: int = 1_000_000, data: Path = BENCH_DATA) -> Path:
    """Path of a synthetic database of ``posts`` posts (no images), generated if absent."""
    name = f"synth-{posts // 1_000_000}m" if posts % 1_000_000 == 0 else f"synth-{posts}"
    db = Path(data) / name / "danbooru2023.db"
    if not db.exists():
        subprocess.run([sys.executable, "-m", "hakubooru.synth", "--posts", str(posts),
                        "--no-images", "--out", str(db.parent)], check=True, cwd=ROOT)
    return db
