"""``python -m hakubooru report``: one self-contained HTML page about a built shard folder.

    python -m hakubooru report out/ --html report.html --db danbooru2023.db

The training-bucket section comes from the trainer, which knows its config:
``python -m trainers.lokr report --dataset out/ --config epsilon --gpus 4`` writes the same page
with that section added.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..errors import HakubooruError
from ..manifest import write_atomic

TRAINER_REPORT = "python -m trainers.lokr report --dataset {shards} --config {config}"


def add_page_arguments(parser) -> None:
    """The options of the page itself, shared with the trainer's ``report --dataset``."""
    parser.add_argument("--html", default=None, help="output page (default: SHARDS/report.html)")
    parser.add_argument("--db", help="danbooru2023.db, to split keep tags into character, copyright, artist")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes reading the records (default 1; the page does not depend on it)")
    parser.add_argument("--json", dest="json_out", help="also write the numbers as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_arguments(parser) -> None:
    parser.add_argument("shards", help="shard folder written by `python -m hakubooru build`")
    add_page_arguments(parser)
    parser.add_argument("--config", help=argparse.SUPPRESS)  # moved to the trainer: one line saying where
    parser.add_argument("--gpus", help=argparse.SUPPRESS)


def run(args) -> int:
    if args.config or args.gpus:
        raise HakubooruError("the training buckets are the trainer's section: run "
                             + TRAINER_REPORT.format(shards=args.shards, config=args.config or "epsilon")
                             + (f" --gpus {args.gpus}" if args.gpus else ""))
    return write_report(args)


def write_report(args, *, max_windows: int = 3, sections=None) -> int:
    """Collect the numbers of ``args.shards``, add ``sections`` (name → function of the folder
    returning that section's dict), write the page (and ``--json``) and print one summary line."""
    from ..report import collect
    from ..report_html import render

    start = time.perf_counter()
    stats = collect(args.shards, max_windows=max_windows, db=args.db, workers=args.workers,
                    progress=not args.quiet)
    for name, make in (sections or {}).items():
        stats[name] = make(Path(args.shards))
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
