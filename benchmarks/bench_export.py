"""kohya export and webdataset indexing throughput against their floors, in one run.

Data: ``--images`` photo-like ~1 Mpixel webp pictures (the same pool as bench_shards.py,
cycled; distinct keys) in webdataset shards of 500 written by ``webdataset.TarWriter``, with a
``.txt`` caption each, under bench-data/export-<images>/ (made once, reused).

Measured, alternating for ``--rounds`` rounds (page cache warm for all):
  1. floor for the export: ``tar -xf`` of every shard into one folder (what users do by hand:
     all members, no renaming, no index);
  2. ours: ``export_kohya`` (index offsets, one read per member, image + .txt per sample,
     each written to a temporary name and renamed) into a fresh folder;
  3. ours, resumed: the same export again over the finished folder (nothing to write);
  4. ``index_webdataset`` (tar headers, image headers, xxh3-128 of every shard), against the
     floor of reading every shard's bytes once (``cat > /dev/null``).

    python benchmarks/bench_export.py                 # 2000 images, 3 rounds
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import webdataset as wds  # noqa: E402

from benchmarks.bench_shards import POOL, picture  # noqa: E402
from hakubooru.export import export_kohya  # noqa: E402
from hakubooru.wdsindex import index_webdataset  # noqa: E402

PER_TAR = 500


def make_data(folder: Path, images: int) -> Path:
    """Shards of ``images`` samples (webp + txt), made once."""
    done = folder / "complete"
    if done.is_file():
        return folder / "wds"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "wds").mkdir(parents=True)
    pool = [picture(k) for k in range(POOL)]
    for s in range(0, images, PER_TAR):
        with wds.TarWriter(str(folder / "wds" / f"{s // PER_TAR:05d}.tar")) as sink:
            for i in range(s, min(images, s + PER_TAR)):
                sink.write({"__key__": f"{i:09d}", "webp": pool[i % POOL],
                            "txt": f"1girl, tag{i % 13}, tag{i % 7}, sky"})
    done.write_text("ok")
    return folder / "wds"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default=str(ROOT / "bench-data"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    shards = make_data(work / f"export-{args.images}", args.images)
    tars = sorted(shards.glob("*.tar"))
    total = sum(p.stat().st_size for p in tars)
    index_webdataset(shards, progress=False)
    out = work / "export-out"
    best = {}

    def note(name, seconds):
        best[name] = min(best.get(name, float("inf")), seconds)

    for _ in range(args.rounds):
        shutil.rmtree(out, ignore_errors=True)
        (out / "untar").mkdir(parents=True)
        note("floor: tar -xf", timed(lambda: [subprocess.run(["tar", "-xf", str(t), "-C",
                                                               str(out / "untar")], check=True)
                                              for t in tars]))
        note("ours: export --to kohya", timed(lambda: export_kohya(shards, out / "kohya",
                                                                    progress=False)))
        note("ours: export, resumed (all there)",
             timed(lambda: export_kohya(shards, out / "kohya", progress=False)))
        note("floor: read every shard once", timed(lambda: [subprocess.run(
            f"cat '{t}' > /dev/null", shell=True, check=True) for t in tars]))
        note("ours: index", timed(lambda: index_webdataset(shards, progress=False)))
    shutil.rmtree(out, ignore_errors=True)
    print(f"\n{args.images} images, {total / 1e9:.2f} GB in {len(tars)} shards; best of "
          f"{args.rounds} rounds")
    print(f"{'':36} {'img/s':>8} {'MB/s':>8}")
    for name, seconds in best.items():
        print(f"{name:36} {args.images / seconds:8.0f} {total / seconds / 1e6:8.0f}")
    print(f"export / tar -xf: {best['floor: tar -xf'] / best['ours: export --to kohya']:.2f}; "
          f"index / read: {best['floor: read every shard once'] / best['ours: index']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
