"""Rebuild ``danbooru_tags_subset.csv`` (the tags the generator draws from) from the full list.

The full list is ``danbooru_tags.csv`` (name, Danbooru category, post count, aliases; MIT,
see danbooru_tags.LICENSE). The subset keeps the most used tags of each category, every
meta tag, and a few tags the captioning rules need to meet (people-count tags, emoticons,
a parenthesised artist name)::

    python -m hakubooru.synth.subset path/to/danbooru_tags.csv
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from .tags import DANBOORU_CATEGORY_TO_DB, PEOPLE_COUNT_TAGS, SUBSET_PATH

# Danbooru category -> how many of its most used tags to keep (None: all).
TOP = {0: 3000, 1: 1500, 3: 600, 4: 1500, 5: None}
ALWAYS = set(PEOPLE_COUNT_TAGS) | {"^_^", ">_<", "o_o", "0_0", "ask_(askzy)", "no_humans"}


def write_subset(full_csv: Path, out: Path = SUBSET_PATH) -> int:
    """Write the subset (header ``name,category,post_count``; Danbooru categories); return rows."""
    with open(full_csv, newline="", encoding="utf-8") as f:
        rows = [(r[0], int(r[1]), int(r[2])) for r in csv.reader(f)
                if len(r) >= 3 and int(r[1]) in DANBOORU_CATEGORY_TO_DB]
    rows.sort(key=lambda r: (r[1], -r[2], r[0]))
    keep, seen = [], {c: 0 for c in TOP}
    for name, cat, count in rows:
        if TOP[cat] is None or seen[cat] < TOP[cat] or name in ALWAYS:
            keep.append((name, cat, count))
            seen[cat] += 1
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["name", "category", "post_count"])
        w.writerows(keep)
    return len(keep)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("full_csv", type=Path)
    parser.add_argument("--out", type=Path, default=SUBSET_PATH)
    args = parser.parse_args(argv)
    print(f"wrote {write_subset(args.full_csv, args.out)} tags to {args.out}")


if __name__ == "__main__":
    main()
