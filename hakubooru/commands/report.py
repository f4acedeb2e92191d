"""``python -m hakubooru report``: one self-contained HTML page about a built shard folder.

    python -m hakubooru report out/ --html report.html --config epsilon --gpus 4
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..manifest import write_atomic


def add_arguments(parser) -> None:
    parser.add_argument("shards", help="shard folder written by `python -m hakubooru build`")
    parser.add_argument("--html", default=None, help="output page (default: SHARDS/report.html)")
    parser.add_argument("--config", help="trainer config (bundled name such as epsilon or tiny, or a TOML "
                                         "file): adds the training buckets it fills")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs of that training (global batch = "
                                                            "GPUs × train.batch_size; default 1)")
    parser.add_argument("--db", help="danbooru2023.db, to split keep tags into character, copyright, artist")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes reading the records (default 1; the page does not depend on it)")
    parser.add_argument("--json", dest="json_out", help="also write the numbers as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from ..report import collect
    from ..report_html import render

    start = time.perf_counter()
    stats = collect(args.shards, config=args.config, world_size=args.gpus, db=args.db,
                    workers=args.workers, progress=not args.quiet)
    out = Path(args.html) if args.html else Path(args.shards) / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, render(stats).encode("utf-8"))
    if args.json_out:
        plain = {k: v for k, v in stats.items() if k != "images"}
        plain["images"] = {k: v for k, v in stats["images"].items() if not k.startswith("_")}
        write_atomic(Path(args.json_out), (json.dumps(plain, indent=1, sort_keys=True) + "\n").encode())
    t = stats["tokens"]
    print(f"wrote {out}: {stats['samples']:,} samples in {stats['shards']} shards, "
          f"{stats['tags_all']['distinct']:,} distinct tags, {t['cut_captions']:,} captions over "
          f"{t['limit']} tokens; in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0
