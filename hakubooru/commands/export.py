"""``python -m hakubooru export``: a shard folder as kohya-ss/sd-scripts training folders."""
from __future__ import annotations

from ..export import LINK_MODES


def add_arguments(parser) -> None:
    parser.add_argument("shards", help="shard folder (from build or index)")
    parser.add_argument("--to", nargs=2, metavar=("FORMAT", "DIR"), required=True,
                        help="kohya DIR: write DIR/<repeats>_<name>/<id>.<ext> + <id>.txt "
                             "(sd-scripts --train_data_dir DIR)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="sd-scripts repeats, the folder's number prefix (default: %(default)s)")
    parser.add_argument("--name", default="hakubooru",
                        help="folder name after the repeats; sd-scripts' class tokens, the caption "
                             "of an image without one (default: %(default)s)")
    parser.add_argument("--link", choices=LINK_MODES, default="copy",
                        help="copy the image bytes out of the tars; hard links are impossible for "
                             "tar members and refused (default: %(default)s)")
    parser.add_argument("--metadata-json", metavar="FILE",
                        help="also write sd-scripts' fine-tuning metadata JSON (for --in_json; "
                             "default: none)")
    parser.add_argument("--keep-separator", metavar="SEP",
                        help="rebuild captions as 'keep SEP general SEP quality, year, meta, rating' "
                             "(e.g. '|||'), for sd-scripts --keep_tokens_separator: only the general "
                             "tags move (default: the .txt as built)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from ..errors import HakubooruError
    from ..export import export_kohya

    kind, dest = args.to
    if kind != "kohya":
        raise HakubooruError(f"--to {kind}: the only export format is kohya (sd-scripts folders)")
    export_kohya(args.shards, dest, repeats=args.repeats, name=args.name, link=args.link,
                 metadata_json=args.metadata_json, keep_separator=args.keep_separator,
                 progress=not args.quiet)
    return 0
