"""The same build locally (a process pool) and on a local Ray cluster, and Ray's cost per task.

Data: bench_shards.py's synthetic database and ~1 Mpixel smoothed-noise webp pictures (made once
under bench-data/shards-<posts>/), built with ``--format jpeg --max-pixels 262144`` so that each
image costs a decode, a downscale and an encode (CPU work, as a real re-encoding build; a
pass-through build of these archives is bound by the disk).

Measured, in one run, alternating for ``--rounds`` rounds:
  1. local: ``build_shards(..., workers=W)``;
  2. Ray: ``build_shards(..., ray=ADDRESS)`` on a cluster of W CPUs started once with
     ``ray start --head`` on 127.0.0.1 (tests/helpers/raycluster.py, which also ends it) (so Ray's start-up is not counted; a ``--ray`` build
     without an address adds it, printed once below); the outputs are compared byte for byte;
and on the same cluster: ``--noop`` empty tasks (one CPU each), for Ray's cost per task.

    python benchmarks/bench_ray_build.py                  # 2000 posts, shards of 100, 2 CPUs
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_shards import make_data  # noqa: E402

from hakubooru.builder import build_shards  # noqa: E402
from hakubooru.db import open_db  # noqa: E402
from hakubooru.selector import Selector  # noqa: E402
from hakubooru.sources import ImageSource  # noqa: E402
from tests.helpers.archives import folder_bytes  # noqa: E402
from tests.helpers.raycluster import new_mark, ray_env, start_head, stop_marked  # noqa: E402

POLICY = {"image_format": "jpeg", "quality": 90, "max_pixels": 262_144}


def timed_build(out: Path, *args, **kw) -> tuple[float, object]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = build_shards(*args, out, progress=False, **POLICY, **kw)
    return time.perf_counter() - start, result


def noop_tasks(address: str, n: int) -> float:
    """Seconds per empty task (one CPU each) on the cluster at ``address``, after a warm-up."""
    import ray

    ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    try:
        noop = ray.remote(num_cpus=1)(_noop)
        ray.get([noop.remote() for _ in range(20)])
        start = time.perf_counter()
        ray.get([noop.remote() for _ in range(n)])
        return (time.perf_counter() - start) / n
    finally:
        ray.shutdown()


def _noop() -> None:
    return None


def local_ray_start(cpus: int) -> float:
    """Seconds of ``ray.init()`` starting a local Ray (what ``--ray`` alone adds), and its stop."""
    import ray

    start = time.perf_counter()
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    started = time.perf_counter() - start
    ray.shutdown()
    return started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--cpus", type=int, default=2, help="local workers = Ray CPUs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--noop", type=int, default=2000, help="empty tasks timed on the cluster")
    args = parser.parse_args()
    folder = ROOT / "bench-data" / f"shards-{args.posts}"
    db_path, images = make_data(folder, args.posts)
    selection = Selector.all().save(folder / "selection.parquet", open_db(db_path))
    cache, work = folder / "tarindex", folder / "ray-work"
    ImageSource.open(images, cache).locate(selection.ids)  # index once, as a real run would
    inputs = (db_path, images, folder / "selection.parquet")
    common = {"shard_size": args.shard_size, "cache_dir": cache}

    mark = new_mark()  # Ray's processes carry it, and are ended by it (tests/helpers/raycluster.py)
    os.environ.update(ray_env(mark))
    address, _ = start_head(os.environ, cpus=args.cpus)
    try:
        local, on_ray = [], []
        for r in range(args.rounds):
            seconds, result = timed_build(work / "local", *inputs, workers=args.cpus, **common)
            local.append(seconds)
            seconds, _ = timed_build(work / "ray", *inputs, ray=address, **common)
            on_ray.append(seconds)
            same = folder_bytes(work / "local") == folder_bytes(work / "ray")
            print(f"round {r + 1}: local {local[-1]:.2f} s, Ray {on_ray[-1]:.2f} s, same bytes: {same}",
                  flush=True)
            assert same
        per_task = noop_tasks(address, args.noop)
        started = local_ray_start(args.cpus)
    finally:
        stop_marked(mark)
    shutil.rmtree(work, ignore_errors=True)
    tasks = result.shards_built
    lo, ra = min(local), min(on_ray)
    print(f"build: {result.written} images of {len(selection.ids)} posts, {tasks} shards of "
          f"{args.shard_size}, re-encoded to jpeg at <= {POLICY['max_pixels']} pixels")
    print(f"local, {args.cpus} workers:      {lo:6.2f} s  {result.written / lo:6.1f} img/s (best of {args.rounds})")
    print(f"Ray cluster, {args.cpus} CPUs:    {ra:6.2f} s  {result.written / ra:6.1f} img/s (best of {args.rounds})")
    print(f"Ray minus local, per task:  {(ra - lo) / tasks * 1000:6.1f} ms ({tasks} tasks)")
    print(f"empty Ray task:             {per_task * 1000:6.2f} ms each ({args.noop} tasks)")
    print(f"start of a local Ray (--ray alone): {started:.1f} s")


if __name__ == "__main__":
    main()
