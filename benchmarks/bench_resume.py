"""Resume start-up on a 5,000,000-sample index, next to a fresh start on the same index.

Start-up = from calling the trainer's ``setup`` (read the index, plan the epoch, build the model
and its LoKr and optimizer — the tiny model — and, when resuming, find, check and load the newest
state) until the row indices of the first batch to train are known. The index alone is enough:
``index.parquet`` with fake offsets, empty shard files and a manifest; no image is read.

    python benchmarks/bench_resume.py [--rows 5000000] [--repeat 7]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hakubooru.rng import generator  # noqa: E402
from trainers.lokr.config import load_config  # noqa: E402
from trainers.lokr.state import save_state, state_dir  # noqa: E402
from trainers.lokr.train import setup, state_payload  # noqa: E402

# Stored image sizes as the webp-4Mpixel archive has them (about 4 MP, assorted aspect ratios).
SIZES = np.array([(2048, 2048), (1664, 2432), (2432, 1664), (1536, 2560), (2560, 1536), (1792, 2304),
                  (1408, 2816), (2816, 1408), (2304, 1792), (1200, 3200)], dtype=np.int32)


def write_index(folder: Path, rows: int, shards: int = 1000) -> None:
    """A synthetic shard folder: index.parquet of ``rows`` samples, empty shard files, a manifest."""
    folder.mkdir(parents=True)
    rng = generator(0, rows)
    ids = np.arange(1, rows + 1, dtype=np.int64) * 3
    size = SIZES[rng.integers(0, len(SIZES), rows)]
    shard_of = np.arange(rows) * shards // rows
    names = [f"shard-{i:06d}.tar" for i in range(shards)]
    for name in names:
        (folder / name).touch()
    offset = (np.arange(rows) % (rows // shards + 1)) * 1_000_000
    table = pa.table({
        "id": ids,
        "shard": pa.DictionaryArray.from_arrays(pa.array(shard_of, pa.int32()), pa.array(names)).cast(pa.string()),
        "image_offset": offset + 512, "image_size": np.full(rows, 900_000, np.int64),
        "txt_offset": offset + 901_024, "txt_size": np.full(rows, 400, np.int64),
        "json_offset": offset + 902_048, "json_size": np.full(rows, 900, np.int64),
        "width": size[:, 0], "height": size[:, 1], "ext": pa.array(["webp"] * rows)})
    pq.write_table(table, folder / "index.parquet")
    (folder / "manifest.json").write_text(json.dumps({"fingerprint": f"bench-{rows}"}))


def start_up(cfg, shards, output, resume) -> tuple[float, np.ndarray]:
    """Seconds from setup() to knowing the first batch's rows, and those rows."""
    t = time.perf_counter()
    run = setup(cfg, shards, output, resume=resume)
    p = run.progress
    rows = run.plan(p.epoch)[p.cursor]
    return time.perf_counter() - t, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    # The recipe's buckets and batch on the tiny model (CPU).
    cfg = load_config("tiny", ["data.resolution=1024", "data.bucket_min=256", "data.bucket_max=4096",
                               "data.bucket_step=64", "train.batch_size=4", "train.grad_accum=16"])
    tmp = Path(tempfile.mkdtemp(prefix="bench_resume_"))
    try:
        shards, output = tmp / "shards", tmp / "run"
        t = time.perf_counter()
        write_index(shards, args.rows)
        print(f"index: {args.rows:,} rows written in {time.perf_counter() - t:.1f} s")
        # A state in the middle of the epoch, as a crash at step 13,600 would leave it.
        run = setup(cfg, shards, output)
        run.progress.step = run.steps_per_epoch * 2 // 3
        run.progress.cursor = run.progress.step * cfg["train"]["grad_accum"]
        save_state(state_dir(output), run.progress.step, state_payload(run), keep=3)
        print(f"state at step {run.progress.step:,} of {run.steps_per_epoch:,} (batch {run.progress.cursor:,})")
        fresh, resumed = [], []
        for _ in range(args.repeat):  # alternate, so load on the machine hits both alike
            seconds, rows = start_up(cfg, shards, tmp / "fresh", None)
            fresh.append(seconds)
            seconds, rows_resumed = start_up(cfg, shards, output, output)
            resumed.append(seconds)
        assert np.array_equal(rows_resumed, run.plan(0)[run.progress.cursor])
        f, r = statistics.median(fresh), statistics.median(resumed)
        print(f"fresh start:  median {f:.3f} s, best {min(fresh):.3f} s")
        print(f"resume:       median {r:.3f} s, best {min(resumed):.3f} s")
        print(f"resume / fresh = {r / f:.3f}  (resume adds {100 * (r / f - 1):+.1f} %; target < +10 %)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
