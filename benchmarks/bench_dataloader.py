"""Trainer data loading: images/s of one worker turning ~4 MP webp samples into 1024²-bucket
tensors (read by offset + decode + resize-to-cover + crop + normalise + caption), next to bare
PIL decode of the same files in the same run. Target: ≥ 80% of bare decode.
Also the cost of checking each member read against its build-time hash (xxh3-64 of the image
and .json bytes, part of BatchDataset[i]), next to bare decode. Target: < 3% of decode.
Also the time to plan one epoch of 5,000,000 index rows, next to one bare argsort of as many
random keys (the least any shuffle costs).

    python benchmarks/bench_dataloader.py [--n 40] [--size 2300x1700] [--rounds 3]

The webp files are made once in bench-data/dataloader/ (git-ignored): drawn shapes with
outlines over a smooth colour field plus grain, so they decode like illustrations do, not
like flat colour.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hakubooru.rng import generator  # noqa: E402
from hakubooru.shardwriter import member_hash  # noqa: E402
from tests.helpers.shards import write_shard_folder  # noqa: E402
from trainers.lokr.data.bucketing import make_buckets  # noqa: E402
from trainers.lokr.data.batches import BatchDataset, BatchPlan
from trainers.lokr.data.index import ShardIndex, load_index  # noqa: E402


def illustration(seed: int, i: int, w: int, h: int) -> bytes:
    """A deterministic illustration-like webp: smooth field, outlined shapes, grain."""
    rng = generator(seed, i)
    field = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8))
    img = field.resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(80):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        rx, ry = int(rng.integers(20, w // 5)), int(rng.integers(20, h // 5))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        outline = tuple(int(c) for c in rng.integers(0, 80, 3))
        if rng.random() < 0.5:
            draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=colour, outline=outline, width=4)
        else:
            pts = [(x + int(rng.integers(-rx, rx)), y + int(rng.integers(-ry, ry))) for _ in range(5)]
            draw.polygon(pts, fill=colour, outline=outline, width=3)
    grain = rng.integers(-6, 7, (h, w, 3))
    arr = np.clip(np.asarray(img, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="WEBP", quality=90)
    return buf.getvalue()


def make_data(root: Path, n: int, w: int, h: int) -> Path:
    """The shard folder of ``n`` webp samples (reused when already there)."""
    folder = root / f"dataloader-{n}-{w}x{h}"
    if (folder / "index.parquet").is_file():
        return folder
    samples = []
    for i in tqdm(range(n), desc="making webp", unit="img"):
        record = {"id": i + 1, "width": w, "height": h, "keep": ["1girl"],
                  "general": ["smile", "long hair", "outdoors"], "meta": ["highres"],
                  "quality": ["masterpiece"], "year": ["newest"], "rating_tags": ["safe"]}
        samples.append((record, illustration(0, i, w, h)))
    return write_shard_folder(folder, samples, ext="webp", per_shard=16)


def timed(fn) -> np.ndarray:
    """(wall seconds, CPU seconds of this process) spent in ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return np.array([time.perf_counter() - wall, time.process_time() - cpu])


def measure(blobs: list[bytes], records: list[bytes], dataset: BatchDataset, rounds: int):
    """Total (wall, CPU) seconds of bare decode, of ``dataset[i]`` and of the member-hash check
    over all images and rounds, alternating image by image so all see the same load on a
    shared machine."""
    base, ours, check = np.zeros(2), np.zeros(2), np.zeros(2)
    for _ in tqdm(range(rounds), desc="rounds", unit="round"):
        for i, blob in enumerate(blobs):
            base += timed(lambda: Image.open(io.BytesIO(blob)).load())
            ours += timed(lambda: dataset[i])
            check += timed(lambda: (member_hash(blob), member_hash(records[i])))
    return base, ours, check


def plan_5m(rows: int = 5_000_000) -> tuple[float, float]:
    """Seconds for BatchPlan over ``rows`` synthetic rows, and for one argsort of as many keys."""
    rng = np.random.default_rng(0)
    zeros = np.zeros(rows, np.int64)
    index = ShardIndex(ids=np.arange(rows, dtype=np.int64) * 3, shard=np.zeros(rows, np.int32),
                       shard_names=["shard-000000.tar"], image_offset=zeros, image_size=zeros,
                       json_offset=zeros, json_size=zeros,
                       width=rng.integers(300, 3000, rows).astype(np.int32),
                       height=rng.integers(300, 3000, rows).astype(np.int32), fingerprint="")
    keys = rng.integers(0, 1 << 63, rows, dtype=np.int64).astype(np.uint64)
    start = time.perf_counter()
    np.argsort(keys)
    bare = time.perf_counter() - start
    start = time.perf_counter()
    BatchPlan(index, 16, 0, 0, make_buckets())
    return time.perf_counter() - start, bare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--size", default="2300x1700")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data", type=Path, default=Path("bench-data"))
    args = p.parse_args()
    w, h = map(int, args.size.split("x"))
    torch.set_num_threads(1)  # a DataLoader worker runs with one thread
    folder = make_data(args.data, args.n, w, h)
    index = load_index(folder)
    blobs, records = [], []
    for row in range(len(index)):
        with open(folder / index.shard_names[index.shard[row]], "rb") as f:
            f.seek(index.image_offset[row])
            blobs.append(f.read(index.image_size[row]))
            f.seek(index.json_offset[row])
            records.append(f.read(index.json_size[row]))
    buckets = make_buckets(1024 * 1024, 256, 4096, 64)
    dataset = BatchDataset(folder, index, BatchPlan(index, 1, 0, 0, buckets))
    bucket = dataset.plan.bucket_of(0)
    base, mine, check = measure(blobs, records, dataset, args.rounds)
    count = len(blobs) * args.rounds
    print(f"data: {len(index)} webp of {w}x{h} ({w * h / 1e6:.1f} MP, "
          f"{sum(map(len, blobs)) / len(blobs) / 1e6:.2f} MB each) -> bucket {bucket[0]}x{bucket[1]}, "
          f"{args.rounds} rounds, 1 process, 1 thread")
    for label, k in (("CPU time", 1), ("wall time", 0)):
        print(f"by {label}: bare PIL decode {count / base[k]:6.2f} images/s, BatchDataset "
              f"(decode+resize+crop+normalise+caption) {count / mine[k]:6.2f} images/s, "
              f"ratio {base[k] / mine[k]:.1%} (target >= 80%)")
    for label, k in (("CPU time", 1), ("wall time", 0)):
        print(f"member hash check (xxh3-64 of image + .json, inside BatchDataset[i]) by {label}: "
              f"{check[k] / count * 1e3:.3f} ms/sample = {check[k] / base[k]:.2%} of bare decode "
              f"({base[k] / count * 1e3:.1f} ms/image) (target < 3%)")
    plan, bare = plan_5m()
    print(f"BatchPlan, 5,000,000 rows, global batch 16: {plan:.2f} s; one argsort of 5,000,000 "
          f"keys: {bare:.2f} s; ratio {plan / bare:.1f}x")


if __name__ == "__main__":
    main()
