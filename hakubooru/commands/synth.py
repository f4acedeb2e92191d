"""``python -m hakubooru synth``: generate a synthetic danbooru2023.db and image archives."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..synth import make_folder
from ..synth.archives import LAYOUTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--posts", type=int, required=True, help="number of posts")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder: gets danbooru2023.db, images/ and synth.json")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--image-side", type=int, default=128, metavar="PX",
                        help="longest side of the pictures in pixels (default: 128)")
    parser.add_argument("--no-images", action="store_true", help="write the database only")
    parser.add_argument("--images-limit", type=int, default=None, metavar="N",
                        help="write at most N pictures, spread evenly over the ids (default: all)")
    parser.add_argument("--layout", choices=LAYOUTS, default="webp4m",
                        help="archive layout (default: webp4m, images/data-0NNN.tar, data-1NNN.tar)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if OUT is already complete for these arguments")


def run(args: argparse.Namespace) -> int:
    make_folder(args.out, args.posts, args.seed, args.image_side, images=not args.no_images,
                images_limit=args.images_limit, layout=args.layout, force=args.force)
    return 0
