"""``python -m hakubooru select``: evaluate a Selector expression and save it as Parquet.

    python -m hakubooru select --db danbooru2023.db --out sel.parquet \\
        --expr 'Selector.id_range(5_000_000).rating("general").exclude_deleted().images_only()'
"""
from __future__ import annotations

from pathlib import Path

from ..db import Post, open_db
from ..errors import HakubooruError
from ..selector import Selector


def add_arguments(parser) -> None:
    parser.add_argument("--db", required=True, help="danbooru2023.db")
    parser.add_argument("--expr", required=True,
                        help="a Python expression building a Selector (names: Selector, Post)")
    parser.add_argument("--out", help="write the selection here (Parquet; default: only print "
                                      "the count)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--explain", action="store_true", help="print the tree with counts")


def parse_expression(text: str) -> Selector:
    """Evaluate a selector expression with only ``Selector`` and ``Post`` in scope."""
    try:
        sel = eval(text, {"__builtins__": {}, "Selector": Selector, "Post": Post})  # noqa: S307
    except HakubooruError:
        raise
    except Exception as e:  # a typo in the user's expression: say where, in one line
        raise HakubooruError(f"cannot evaluate --expr: {type(e).__name__}: {e}") from None
    if not isinstance(sel, Selector):
        raise HakubooruError(f"--expr must build a Selector, got {type(sel).__name__}")
    return sel


def run(args) -> int:
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise HakubooruError(f"{args.out} exists; pass --overwrite to replace it")
    db = open_db(args.db)
    sel = parse_expression(args.expr)
    if args.explain:
        print(sel.explain(db))
    if args.out:
        saved = sel.save(args.out, db)
        print(f"saved {len(saved.ids):,} post ids to {args.out}")
    elif not args.explain:
        print(sel.count(db))
    return 0
