"""``python -m hakubooru fetch``: the selected images from the Hub's archives into a folder."""
from __future__ import annotations

from ..errors import HakubooruError
from .build import add_hub_arguments


def add_arguments(parser) -> None:
    parser.add_argument("--db", help="danbooru2023.db (opened read-only)")
    parser.add_argument("--selection", help="selection.parquet from `python -m hakubooru select`")
    parser.add_argument("--images", help="the archives on the Hub: hf://datasets/OWNER/NAME[@REVISION]")
    parser.add_argument("--out", help="folder for <id>.<ext> files (created; a rerun fetches "
                                      "only what is missing)")
    add_hub_arguments(parser)
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (the end-of-run line is still printed)")


def run(args) -> int:
    from ..hub import is_hub
    from ..hubfetch import fetch_selection

    missing = [f"--{n}" for n in ("db", "selection", "images", "out") if not getattr(args, n)]
    if missing:
        raise HakubooruError(f"fetch needs {', '.join(missing)}")
    if not is_hub(args.images):
        raise HakubooruError(f"--images {args.images}: fetch reads archives on the Hub "
                             "(hf://datasets/OWNER/NAME[@REVISION]); a local folder is read by "
                             "build directly")
    fetch_selection(args.db, args.selection, args.images, args.out, images_index=args.images_index,
                    connections=args.connections, retries=args.fetch_retries, progress=not args.quiet)
    return 0
