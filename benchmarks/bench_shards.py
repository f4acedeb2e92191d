"""Shard building throughput against its floor, in one run.

Data: a synthetic database (``make_database``) whose image posts get tars of 500 members
(``images/part-NNN.tar``; a few thousand posts would spread over ~1,000 ``data-0NNN`` buckets of
2-3 members each, unlike real tars) holding photo-like ~1 Mpixel webp pictures (smoothed
noise, 0.3-0.5 MB each, so MB/s means something; the generator's own flat pictures are
~13 KB). Made once under bench-data/shards-<posts>/ and reused.

Measured, alternating for ``--rounds`` rounds (page cache warm for both):
  1. floor: read every selected member by offset from the source tars and write it into one
     tar with ``tarfile`` (one read/write per member), then fsync it; nothing else: no
     validation, captions, index or checksums;
  2. xxh3-128 of the floor's tar (ours checksums every shard for the manifest; the floor not);
  3. ours, pass-through: ``build_shards(..., workers=w)`` end to end (captioning, validation,
     shards, checksum, fsync, sidecars, manifest, index), for each w of ``--workers``;
and once, on the first ``--reencode`` selected posts: ours re-encoding to webp (quality 90),
one worker, for the per-worker re-encode rate. Target: pass-through >= 70% of the floor.

    python benchmarks/bench_shards.py                 # 6000 posts, 5 rounds
    python benchmarks/bench_shards.py --posts 20000 --rounds 2 --work /dev/shm/bench-shards
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hakubooru.builder import build_shards  # noqa: E402
from hakubooru.db import open_db  # noqa: E402
from hakubooru.selector import Selection, Selector  # noqa: E402
from hakubooru.shardwriter import file_checksum  # noqa: E402
from hakubooru.sources import ImageSource  # noqa: E402
from hakubooru.synth import make_database  # noqa: E402

POOL = 48  # distinct pictures, cycled over the posts
PER_TAR = 500  # members per source tar (real webp-4Mpixel tars hold ~3,500)
COPY_BUFSIZE = 64 << 20  # the floor copies each member in one read/write


def picture(k: int) -> bytes:
    """A photo-like webp: smoothed colour noise at a danbooru-ish size (about 1 Mpixel)."""
    rng = np.random.default_rng(k)
    w, h = [(1024, 1024), (832, 1216), (1216, 832), (896, 1152)][k % 4]
    noise = Image.fromarray(rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8))
    im = noise.resize((w, h), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(1))
    out = io.BytesIO()
    im.save(out, "WEBP", quality=90)
    return out.getvalue()


def make_data(folder: Path, posts: int) -> tuple[Path, Path]:
    db_path, images = folder / "danbooru2023.db", folder / "images"
    done = folder / "done"
    if done.exists():
        return db_path, images
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    make_database(db_path, posts, seed=0, progress=False)
    db = open_db(db_path)
    ids = [r[0] for r in db.execute_sql(
        "SELECT id FROM post WHERE file_ext IN ('jpg','png','webp') AND md5 IS NOT NULL ORDER BY id")]
    pool = [picture(k) for k in range(POOL)]
    images.mkdir()
    for t, start in enumerate(range(0, len(ids), PER_TAR)):
        with tarfile.open(images / f"part-{t:03d}.tar", "w") as tar:
            for post_id in ids[start:start + PER_TAR]:
                data = pool[post_id % POOL]
                info = tarfile.TarInfo(f"{post_id}.webp")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    done.write_text("ok\n")
    return db_path, images


def floor(images: Path, ids: np.ndarray, cache: Path, out: Path) -> tuple[float, int, int]:
    """Seconds, images and bytes to copy the members into one tar, nothing else."""
    located = ImageSource.open(images, cache).locate(ids)
    members = [located.member(i) for i in np.flatnonzero(located.found)]
    start = time.perf_counter()
    total = 0
    files = {}
    with tarfile.open(out, "w", copybufsize=COPY_BUFSIZE) as tar:
        for post_id, m in zip(ids[located.found], members):
            f = files.get(m.path) or files.setdefault(m.path, open(m.path, "rb"))
            f.seek(m.offset)
            data = f.read(m.size)
            info = tarfile.TarInfo(f"{post_id}.{m.ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            total += len(data)
    with open(out, "rb+") as f:  # on disk, as ours leaves every shard (fsync before the rename)
        os.fsync(f.fileno())
    for f in files.values():
        f.close()
    return time.perf_counter() - start, len(members), total


def ours(db_path, images, selection, cache, out, **kw) -> tuple[float, int, int]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = build_shards(db_path, images, selection, out, cache_dir=cache, progress=False, **kw)
    seconds = time.perf_counter() - start
    stored = sum(p.stat().st_size for p in out.glob("shard-*.tar"))
    shutil.rmtree(out)
    return seconds, result.written, stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reencode", type=int, default=40)
    parser.add_argument("--workers", default="1,2", help="worker counts to measure, e.g. 1,2")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None,
                        help="where outputs go (e.g. /dev/shm/x: measures CPU work, not the disk)")
    args = parser.parse_args()
    folder = args.data or ROOT / "bench-data" / f"shards-{args.posts}"
    t = time.perf_counter()
    db_path, images = make_data(folder, args.posts)
    print(f"data: {folder} ({time.perf_counter() - t:.1f} s to make or find)")
    db = open_db(db_path)
    selection = Selector.all().save(folder / "selection.parquet", db)
    cache, work = folder / "tarindex", args.work or folder / "work"
    work.mkdir(parents=True, exist_ok=True)
    ImageSource.open(images, cache).locate(selection.ids)  # index once, as a real run would

    counts = [int(w) for w in args.workers.split(",")]
    fl, hs, us = [], [], {w: [] for w in counts}
    for r in range(args.rounds):
        fs, n, nbytes = floor(images, selection.ids, cache, work / "floor.tar")
        start = time.perf_counter()
        file_checksum(work / "floor.tar")
        hs.append(time.perf_counter() - start)
        (work / "floor.tar").unlink()
        fl.append(fs)
        line = f"round {r + 1}: floor {fs:.2f} s, checksum of its tar {hs[-1]:.2f} s"
        for w in counts:
            seconds, written, _ = ours(db_path, images, selection, cache, work / "out", workers=w)
            us[w].append(seconds)
            line += f", ours {w} worker(s) {seconds:.2f} s"
        print(line, flush=True)
    fs = min(fl)
    print(f"images: {n} with an image of {len(selection.ids)} posts selected, "
          f"{nbytes / 1e6:.1f} MB, mean {nbytes / n / 1e3:.0f} KB")
    print(f"floor (tar copy):           {n / fs:7.1f} img/s {nbytes / fs / 1e6:7.1f} MB/s  "
          f"(best of {args.rounds})")
    print(f"xxh3-128 of the floor's tar:  {nbytes / min(hs) / 1e6:7.1f} MB/s (ours must do this for "
          "the manifest; the floor does not)")
    for w in counts:
        s = min(us[w])
        print(f"ours pass-through, {w} worker(s): {written / s:7.1f} img/s {nbytes / s / 1e6:7.1f} MB/s  "
              f"(best of {args.rounds}); ratio ours/floor {fs / s:.2f} (target >= 0.70)")

    sub = Selection(selection.ids[:args.reencode], {"op": "bench-head", "n": args.reencode},
                    selection.db_fingerprint, {})
    rs, rw, rbytes = ours(db_path, images, sub, cache, work / "reencode", image_format="webp",
                          quality=90)
    print(f"ours (re-encode webp q90, 1 worker): {rw / rs:.1f} img/s "
          f"({rw} images in {rs:.1f} s, {rbytes / 1e6:.1f} MB out)")
    print(f"total benchmark time: {sum(fl) + sum(map(sum, us.values())) + rs:.1f} s")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
