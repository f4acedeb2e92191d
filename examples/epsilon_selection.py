"""The Kohaku XL epsilon dataset, reproduced (recipe §1), then captioned into shards.

    python examples/epsilon_selection.py                        # on the built-in demo data
    python examples/epsilon_selection.py --db danbooru2023.db --images /data/danbooru2023-webp-4Mpixel --out out/

Three id windows sampled without replacement with a fixed seed (1M of ids 0–1,999,999;
2M of ids 2,000,000–4,999,999; every post from 5,000,000 on), then deleted, Gold-only and
non-image posts removed. Prints the count at every stage, saves the selection as
Parquet, and builds webdataset shards with the epsilon captions. Every option of
`python -m hakubooru build` (--format, --shard-size, --part, --max-pixels, the caption
style, ...) is accepted and passed on, e.g. for the nyanko7 archives (mixed jpg/png):

    python examples/epsilon_selection.py --db danbooru2023.db --images /data/nyanko7 --out out/ --format webp
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hakubooru import HakubooruError, Selector, build_shards, open_db
from hakubooru.commands.build import add_build_arguments, build_options
from hakubooru.commands.caption_style import add_caption_arguments, caption_options
from hakubooru.errors import run_command

# (lo, hi, posts to sample) — recipe §1; None = take every post in the window
WINDOWS = [(0, 2_000_000, 1_000_000), (2_000_000, 5_000_000, 2_000_000), (5_000_000, None, None)]
SEED = 2023
# Ids of the real danbooru2023 database reach about this far; the demo database spreads its
# ids the same way, so on it the sample sizes shrink by (demo posts / this).
REAL_ID_SPAN = 7_900_000


def epsilon_selector(seed: int = SEED, scale: float = 1.0) -> Selector:
    """The epsilon selection as a Selector (scale < 1 shrinks the sample sizes for small data)."""
    windows = []
    for lo, hi, n in WINDOWS:
        window = Selector.id_range(lo, hi)
        windows.append(window if n is None else window.sample(round(n * scale), seed=seed))
    union = windows[0] | windows[1] | windows[2]
    return union.exclude_deleted().exclude_gold().images_only()


def main(argv=None) -> int:
    return run_command(_main, argv)


def _main(argv) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="The build and caption style options are those of "
                                        "`python -m hakubooru build --help`; e.g. --format webp "
                                        "for the nyanko7 archives (mixed jpg/png).")
    ap.add_argument("--db", help="danbooru2023.db (default: the demo database, created if absent)")
    ap.add_argument("--images", help="image archives folder, or hf://datasets/OWNER/NAME[@REVISION] "
                                     "(docs/hub.md) (default: the demo archives)")
    ap.add_argument("--workdir", default="demo", help="where the demo data and the selection go")
    ap.add_argument("--out", default="out", help="output folder for the shards (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=SEED, help="sampling seed (default: %(default)s)")
    ap.add_argument("--scale", type=float, help="multiply the sample sizes (default 1, or the "
                                                "demo database's size relative to the real one)")
    ap.add_argument("--demo-posts", type=int, default=3000,
                    help="size of the demo database (default: %(default)s)")
    ap.add_argument("--no-shards", action="store_true", help="stop after saving the selection")
    add_build_arguments(ap.add_argument_group("build (as python -m hakubooru build)"))
    add_caption_arguments(ap)
    args = ap.parse_args(argv)

    workdir = Path(args.workdir)
    if args.db is None:
        from hakubooru.synth import make_demo
        db_path, images = make_demo(workdir, n_posts=args.demo_posts)
        scale = args.scale or args.demo_posts / REAL_ID_SPAN
    else:
        db_path, images, scale = Path(args.db), args.images, args.scale or 1.0
    db = open_db(db_path)
    selector = epsilon_selector(args.seed, scale)
    print(f"epsilon selection from {db_path} (seed {args.seed}, sample scale {scale:.6g}):")
    print(selector.explain(db))
    selection_path = workdir / "epsilon_selection.parquet"
    selection = selector.save(selection_path, db)
    print(f"saved {len(selection.ids):,} post ids to {selection_path}")
    if args.no_shards:
        return 0
    if images is None:
        raise HakubooruError("--images is required with --db (the image archives folder)")
    build_shards(db_path, images, selection_path, args.out, **build_options(args),
                 caption_options=caption_options(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
