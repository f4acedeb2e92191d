"""``python -m hakubooru build``: webdataset shards from a selection and the image archives."""
from __future__ import annotations

from ..errors import HakubooruError
from ..images import FORMATS, VALIDATION_LEVELS
from ..raybuild import DEFAULT_RETRIES
from .caption_style import add_caption_arguments, caption_options


def add_arguments(parser) -> None:
    parser.add_argument("--db", help="danbooru2023.db (opened read-only)")
    parser.add_argument("--images", help="image archives folder (webp-4Mpixel, nyanko7 or <id>.<ext>), "
                                         "or hf://datasets/OWNER/NAME[@REVISION] (docs/hub.md)")
    parser.add_argument("--selection", help="selection.parquet from `python -m hakubooru select`")
    parser.add_argument("--out", help="output folder (created; re-running resumes it)")
    parser.add_argument("--merge", metavar="OUT",
                        help="only assemble manifest and index of a folder built in parts")
    add_build_arguments(parser)
    add_caption_arguments(parser)


def add_build_arguments(parser) -> None:
    """The build options beside --db/--images/--selection/--out (also used by examples)."""
    parser.add_argument("--shard-size", type=int, default=1000,
                        help="selected posts per shard (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes building shards (default: %(default)s)")
    parser.add_argument("--part", help="build only part i/N of the shards (0 <= i < N; "
                                       "default: all)")
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                        help="build the shards as tasks on the Ray cluster at ADDRESS (auto, "
                             "host:port, ray://host:port; without ADDRESS: a Ray started here for "
                             "this build); every node must see --out and --images at the same "
                             "paths (default: no Ray)")
    parser.add_argument("--ray-retries", type=int, default=DEFAULT_RETRIES,
                        help="runs of a Ray task again after its worker died (default: %(default)s)")
    parser.add_argument("--ray-tasks", type=int,
                        help="Ray tasks at once (default: the cluster's CPUs; for a Ray started "
                             "here, this machine's)")
    parser.add_argument("--format", choices=sorted(FORMATS), dest="image_format",
                        help="re-encode every image to this format (default: pass through)")
    parser.add_argument("--quality", type=int, default=90,
                        help="webp/jpeg quality when re-encoding (default: %(default)s)")
    parser.add_argument("--max-pixels", type=int,
                        help="downscale images above this many pixels (default: no limit)")
    parser.add_argument("--validate", choices=VALIDATION_LEVELS, default="standard",
                        help="image checks: standard (headers, containers, truncation) or "
                             "full (decode every image) (default: %(default)s)")
    parser.add_argument("--cache-dir", help="tar index cache (default: ~/.cache/hakubooru/tarindex)")
    add_hub_arguments(parser)
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (the end-of-run line is still printed)")


def add_hub_arguments(parser) -> None:
    """The options of --images hf://... (build, fetch)."""
    parser.add_argument("--images-index", metavar="HF_URL",
                        help="the index repository of --images hf://... (hf://datasets/OWNER/NAME"
                             "[@REVISION]; default: the known one of the two public archives)")
    parser.add_argument("--connections", type=int, default=16,
                        help="concurrent Range requests to the Hub (default: %(default)s)")
    parser.add_argument("--fetch-retries", type=int, default=5,
                        help="tries again of a Hub read that failed (429, 5xx, cut connection, "
                             "sha256 mismatch) before the image counts as failed (default: %(default)s)")


def build_options(args) -> dict:
    """build_shards keyword arguments from the options of add_build_arguments."""
    return {"shard_size": args.shard_size, "workers": args.workers, "part": args.part,
            "image_format": args.image_format, "quality": args.quality,
            "max_pixels": args.max_pixels, "validate": args.validate,
            "cache_dir": args.cache_dir, "progress": not args.quiet, "ray": args.ray,
            "ray_retries": args.ray_retries, "ray_tasks": args.ray_tasks,
            "images_index": args.images_index, "connections": args.connections,
            "fetch_retries": args.fetch_retries}


def run(args) -> int:
    from ..builder import build_shards, merge
    from ..shardfolder import shard_folder

    if args.merge:
        merge(shard_folder(args.merge, need_index=False))
        return 0
    missing = [f"--{n}" for n in ("db", "images", "selection", "out") if not getattr(args, n)]
    if missing:
        raise HakubooruError(f"build needs {', '.join(missing)} (or --merge OUT)")
    build_shards(args.db, args.images, args.selection, args.out, **build_options(args),
                 caption_options=caption_options(args))
    return 0
