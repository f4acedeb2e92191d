"""The caption options shared by ``caption`` and ``build``: how the Captioner writes text."""
from __future__ import annotations

import json
from pathlib import Path

from ..captioner import CAPTION_GROUPS, Captioner
from ..errors import HakubooruError
from ..quality import NO_QUALITY_ABOVE_ID
from ..tagrules import UNDERSCORE_RULES


def add_caption_arguments(parser) -> None:
    """Add the captioner's options (tag/group separators, escaping, groups, keep separator,
    underscore rule, quality) to an argparse parser."""
    group = parser.add_argument_group("caption style")
    group.add_argument("--separator", default=", ", help="between tags (default: %(default)r)")
    group.add_argument("--group-separator", default=None,
                       help="between groups (default: --separator)")
    group.add_argument("--escape-parentheses", action="store_true",
                       help=r"write ( ) as \( \) for sd-webui prompts (default: off)")
    group.add_argument("--groups", default=",".join(CAPTION_GROUPS),
                       help="comma-separated groups to emit, in order (default: %(default)s)")
    group.add_argument("--keep-separator", default=None, metavar="SEP",
                       help="write 'keep SEP general SEP quality, year, meta, rating' (e.g. '|||', "
                            "sd-scripts' --keep_tokens_separator: only the general tags move; default: none)")
    group.add_argument("--underscores", choices=UNDERSCORE_RULES, default="spaces",
                       help="spaces: tag underscores become spaces except in names of 3 "
                            "characters or fewer; keep: danbooru names as they are "
                            "(default: %(default)s)")
    group.add_argument("--no-quality-above-id", default=str(NO_QUALITY_ABOVE_ID),
                       help="posts above this id get no quality tag and stay out of the "
                            "statistics; 'none' for no limit (default: %(default)s)")
    group.add_argument("--quality-table", default=None,
                       help="JSON file {rating: {percentile: threshold}} instead of percentiles "
                            "from --db (default: computed)")


def caption_options(args) -> dict:
    """Captioner keyword arguments from the parsed options of add_caption_arguments."""
    return {
        "quality": _read_quality_table(args.quality_table),
        "separator": args.separator,
        "group_separator": args.group_separator,
        "escape_parentheses": args.escape_parentheses,
        "groups": [g.strip() for g in args.groups.split(",") if g.strip()],
        "keep_separator": args.keep_separator,
        "underscores": args.underscores,
        "no_quality_above_id": _parse_limit(args.no_quality_above_id),
    }


def make_captioner(db, args) -> Captioner:
    """The Captioner the parsed options describe."""
    return Captioner(db, **caption_options(args))


def _parse_limit(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise HakubooruError(f"--no-quality-above-id must be an integer or 'none', got {text!r}") from None


def _read_quality_table(path) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise HakubooruError(f"cannot read quality table {path}: {e}") from None
