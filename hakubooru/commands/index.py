"""``python -m hakubooru index``: make any webdataset folder trainable (index + manifest)."""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("folder", help="folder of webdataset .tar shards (image + .txt and/or "
                                       ".json per sample); the tars are only read")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes reading the shards (default: %(default)s; the files do not depend on it)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from ..wdsindex import index_webdataset

    index_webdataset(args.folder, progress=not args.quiet, workers=args.workers)
    return 0
