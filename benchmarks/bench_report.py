"""Dataset report on a synthetic shard folder of 5.2M samples (the epsilon dataset's size):
the whole `python -m trainers.lokr report --dataset` (with --config epsilon --gpus 4), next to its floor in
the same run: one positioned read + json.loads of every record, nothing counted.

    python benchmarks/bench_report.py [--rows 5200000] [--workers 2] [--skip-report]

The folder is made once in bench-data/report-<rows>/ (git-ignored): shards of 1,000 samples
holding only the `.json` records (the report never reads images or captions; the index points
the image and caption columns at the record), records with danbooru-like tag counts (4 keep,
Poisson(27) general, 1 meta tag, drawn Zipf-like from 400k pseudo-word tag names) and image
sizes of 0.15–5 MP at assorted aspect ratios.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import BENCH_DATA, ROOT  # noqa: E402
from hakubooru.manifest import FORMAT, INDEX_SCHEMA  # noqa: E402
from hakubooru.shardwriter import CHECKSUM, member_hash  # noqa: E402
from hakubooru.tagcounts import add_tags, record_tags, write_tag_counts  # noqa: E402

PER_SHARD = 1000
VERSION = 1
SYLLABLES = [c + v for c in "bdgkmnprstz" for v in "aeiou"]
TINY_PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108020000009077"
                         "53de0000000c4944415408d763f8ffff3f0005fe02fea7d6a4c40000000049454e44ae426082")


def tag_names(n: int, start: int) -> list[str]:
    """n distinct tag-like names: pseudo-words of 2-3 syllables, one or two words, some with a
    parenthesised qualifier, as danbooru's character and artist names often have."""
    names = []
    for i in range(start, start + n):
        digits = []
        while i or not digits:
            i, d = divmod(i, len(SYLLABLES))
            digits.append(SYLLABLES[d])
        word = "".join(digits)
        names.append(word if len(names) % 3 else f"{word[:4]} {word[4:] or 'ko'}")
        if len(names) % 11 == 0:
            names[-1] += " (" + SYLLABLES[len(names) % len(SYLLABLES)] + "ri)"
    return names


def make_folder(rows: int, trainable: bool = False, data: Path = BENCH_DATA) -> Path:
    """The folder of ``rows`` records, made once. ``trainable``: a folder the trainer accepts
    (bench-data/scale-<rows>/) — every sample also has a ``.txt`` caption and a tiny PNG, the
    index has every member's xxh3-64, the manifest every shard's size and checksum, and
    ``tag_counts.parquet`` is written as the build writes it."""
    out = Path(data) / (f"scale-{rows}" if trainable else f"report-{rows}")
    done = out / "manifest.json"
    if done.is_file() and json.loads(done.read_text()).get("bench_version") == VERSION:
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes_of = {"character": 60_000, "copyright": 20_000, "artist": 120_000, "general": 200_000, "meta": 2_000}
    vocab, start = {}, 3000
    for group, n in sizes_of.items():
        vocab[group] = np.asarray(tag_names(n, start), dtype=object)
        start += n
    people = ["1girl", "2girls", "1boy", "multiple girls", "solo focus"]
    ratings = ["general", "sensitive", "questionable", "explicit"]
    rating_tags = {"general": ["safe"], "sensitive": ["sensitive"], "questionable": ["nsfw"],
                   "explicit": ["nsfw", "explicit"]}
    years = ["old", "early", "mid", "recent", "newest"]
    qualities = ["masterpiece", "best quality", "great quality", "good quality", "normal quality",
                 "low quality", "worst quality"]
    widths = rng.integers(500, 2400, size=rows)
    aspect = np.exp(rng.normal(0, 0.35, size=rows))
    heights = np.clip((widths / aspect).astype(np.int64), 300, 4000)

    def draw(group, size):  # Zipf-like popularity
        return vocab[group][np.minimum(rng.zipf(1.25, size=size) - 1, len(vocab[group]) - 1)].tolist()

    header = tarfile.TarInfo("x")
    spans = {m: (np.zeros(rows, dtype=np.int64), np.zeros(rows, dtype=np.int64), np.zeros(rows, dtype=np.uint64))
             for m in ("image", "txt", "json")}
    tag_counts: dict[str, int] = {}
    shards = []

    def member(buf, name: str, data: bytes, i: int, column: str) -> None:
        header.name, header.size = name, len(data)
        buf.write(header.tobuf(format=tarfile.USTAR_FORMAT))
        spans[column][0][i], spans[column][1][i] = buf.tell(), len(data)
        if trainable:
            spans[column][2][i] = member_hash(data)
        buf.write(data + b"\0" * (-len(data) % 512))

    bar = tqdm(total=rows, unit="rec", desc="writing records")
    for s, start in enumerate(range(0, rows, PER_SHARD)):
        n = min(rows, start + PER_SHARD) - start
        keep = [draw(g, n) for g in ("character", "copyright", "artist")]
        n_general = rng.poisson(27, size=n)
        general = draw("general", int(n_general.sum()))
        ends = np.cumsum(n_general).tolist()
        meta = draw("meta", n)
        buf = io.BytesIO()
        for j in range(n):
            i = start + j
            rating = ratings[i % 4]
            rec = {"id": i + 1, "width": int(widths[i]), "height": int(heights[i]), "rating": rating,
                   "score": i % 97, "fav_count": i % 211, "created_at": "2020-01-01T00:00:00.000+00:00",
                   "keep": [people[i % len(people)], keep[0][j], keep[1][j], keep[2][j]],
                   "general": general[ends[j] - int(n_general[j]):ends[j]], "meta": [meta[j]],
                   "quality": [qualities[i % 7]], "year": [years[i % 5]], "rating_tags": rating_tags[rating]}
            member(buf, f"{i + 1}.json", json.dumps(rec, separators=(",", ":")).encode(), i, "json")
            if trainable:
                tags = record_tags(rec)
                add_tags(tag_counts, tags)
                member(buf, f"{i + 1}.png", TINY_PNG, i, "image")
                member(buf, f"{i + 1}.txt", ", ".join(tags).encode(), i, "txt")
        buf.write(b"\0" * 1024)
        data = buf.getvalue()
        (out / f"shard-{s:06d}.tar").write_bytes(data)
        shards.append({"name": f"shard-{s:06d}.tar", "samples": n, "size": len(data),
                       CHECKSUM: xxhash.xxh3_128(data).hexdigest()})
        bar.update(n)
    bar.close()
    n_shards = -(-rows // PER_SHARD)
    shard = pa.DictionaryArray.from_arrays(np.arange(rows) // PER_SHARD,
                                           [f"shard-{s:06d}.tar" for s in range(n_shards)]).cast(pa.string())
    cols = {"id": np.arange(1, rows + 1), "shard": shard, "width": widths.astype(np.int32),
            "height": heights.astype(np.int32), "ext": pa.array(["png" if trainable else "webp"] * rows)}
    for col in ("image", "txt", "json"):
        # without the other members, the image and caption columns point at the record
        offset, size, xxh = spans[col] if trainable else spans["json"]
        cols[f"{col}_offset"], cols[f"{col}_size"], cols[f"{col}_xxh3"] = offset, size, xxh
    pq.write_table(pa.table({n: cols[n] for n in INDEX_SCHEMA.names}, schema=INDEX_SCHEMA),
                   out / "index.parquet")
    manifest = {"bench_version": VERSION, "format": FORMAT, "fingerprint": f"bench-{rows}",
                "counts": {"selected": rows, "written": rows, "skipped": 0, "skipped_by_reason": {}}}
    if trainable:
        manifest["shards"] = shards
        write_tag_counts(out, tag_counts, manifest["fingerprint"])
    done.write_text(json.dumps(manifest))
    return out


def floor(folder: Path) -> tuple[float, float]:
    """(wall, CPU) seconds to read and parse every record by the index, in file order,
    counting nothing."""
    t = pq.read_table(folder / "index.parquet", columns=["shard", "json_offset", "json_size"])
    shard = t.column("shard").to_numpy(zero_copy_only=False)
    offsets, sizes = t.column("json_offset").to_numpy(), t.column("json_size").to_numpy()
    start, cpu = time.perf_counter(), time.process_time()
    order = np.lexsort((offsets, shard))
    bounds = np.flatnonzero(np.r_[True, shard[order][1:] != shard[order][:-1], True])
    for a, b in tqdm(list(zip(bounds[:-1], bounds[1:])), unit="shard", desc="floor"):
        fd = os.open(folder / str(shard[order[a]]), os.O_RDONLY)
        for r in order[a:b].tolist():
            json.loads(os.pread(fd, int(sizes[r]), int(offsets[r])))
        os.close(fd)
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5_200_000)
    ap.add_argument("--workers", type=int, default=2, help="report --workers (default 2)")
    ap.add_argument("--skip-report", action="store_true", help="only make the folder and time the floor")
    ap.add_argument("--trainable", action="store_true",
                    help="use benchmarks/bench_scale.py's folder (the same records, with images and captions)")
    ap.add_argument("--data", default=str(BENCH_DATA), help="where the folder is made (default: bench-data/)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    folder = make_folder(args.rows, trainable=args.trainable, data=Path(args.data))
    print(f"folder {folder}: {args.rows:,} records ({time.perf_counter() - t0:.0f} s to make or find)")
    base, base_cpu = floor(folder)
    print(f"floor (read + json.loads every record, 1 process): {base:.1f} s wall, {base_cpu:.1f} s CPU, "
          f"{args.rows / base:,.0f} rec/s")
    if args.skip_report:
        return
    cmd = [sys.executable, "-m", "trainers.lokr", "report", "--dataset", str(folder), "--html",
           str(folder / "report.html"), "--config", "epsilon", "--gpus", "4", "--workers", str(args.workers)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)})
    took = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode:
        sys.exit(proc.returncode)
    print(f"report (whole command, imports included, --workers {args.workers}): {took:.1f} s wall, "
          f"{cpu:.1f} s CPU (all its processes), {args.rows / took:,.0f} rec/s; {took / base:.2f}× the floor's "
          f"wall, {cpu / base_cpu:.2f}× its CPU; peak RSS of one process {after.ru_maxrss / 1024:,.0f} MiB; "
          f"page {(folder / 'report.html').stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
