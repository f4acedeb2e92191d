"""Compose your own captioner from the built-in one, changing only what you need.

Three changes to the Kohaku XL epsilon captioner, each in its own small piece:

1. a tag rule: artist tags read "by <artist>" (override ``TagRules.format``; it runs
   once per tag of the database, so it costs nothing per post);
2. a post rule: the year tag is the year itself, "year 2016" (override ``Captioner.year_tag``);
3. a tag source: tags from outside the database, here "aesthetic" for posts an aesthetic
   scorer rated highly (a callable passed in ``sources=``, called once per chunk of ids).

    python examples/custom_captioner.py danbooru2023.db 5000001 5000002
"""
import argparse
import sys

from hakubooru import Captioner, open_db
from hakubooru.errors import run_command
from hakubooru.tagrules import TagRules


class ByArtistRules(TagRules):
    def format(self, name, type):
        text = super().format(name, type)
        return f"by {text}" if type == "artist" else text


class YearNumberCaptioner(Captioner):
    def year_tag(self, created_at):
        year = created_at[:4] if isinstance(created_at, str) else ""
        return f"year {year}" if year.isdigit() else None


def aesthetic_source(scores: dict[int, float], threshold: float = 0.8):
    """A tag source: adds "aesthetic" to the general tags of posts scoring >= threshold."""
    def source(ids):
        return {int(i): {"general": ["aesthetic"]} for i in ids if scores.get(int(i), 0.0) >= threshold}
    return source


def make_captioner(db, scores: dict[int, float], **options) -> Captioner:
    """The three changes together; ``options`` are Captioner's own (quality=, separator=, ...)."""
    return YearNumberCaptioner(db, rules=ByArtistRules(), sources=[aesthetic_source(scores)], **options)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Caption posts with a customised captioner.")
    ap.add_argument("db", help="danbooru2023.db")
    ap.add_argument("ids", nargs="+", type=int, help="post ids")
    args = ap.parse_args(argv)
    captioner = make_captioner(open_db(args.db), scores={i: 0.9 for i in args.ids[::2]})  # stand-in scores
    for post_id, caption, _record in captioner.captions(args.ids):
        print(post_id, caption)
    print(captioner.summary())
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
