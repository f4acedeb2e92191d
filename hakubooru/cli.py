"""``python -m hakubooru <command>``: dispatch to hakubooru.commands.<command>.

Every HakubooruError becomes one line on stderr (``error: ...``) and exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import run_command

COMMANDS = {
    "synth": "generate a synthetic danbooru-like database and image archives (to try things out)",
    "select": "choose posts with a Selector expression and save their ids (selection.parquet)",
    "caption": "caption a selection into a Parquet table (to inspect or reuse the captions)",
    "build": "build captioned webdataset shards from a selection and the image archives",
    "fetch": "download only the selected images from the Hub's archives into an <id>.<ext> folder",
    "export": "write a shard folder as kohya-ss/sd-scripts training folders (.txt captions)",
    "index": "index a webdataset folder from another tool so the LoKr trainer can read it",
    "report": "write an HTML report about a built shard folder (what is in it, buckets, caption lengths)",
}

DESCRIPTION = """\
Turn the danbooru2023 database and image archives into captioned webdataset shards.

A dataset is made in two steps: `select` saves which posts to take, `build` writes the
shards (images, .txt captions, .json records), a manifest, an index and a dataset card,
so that `datasets.load_dataset("out/")` reads the folder. Train on it with
`python -m trainers.lokr --shards out/`, or `export` it for kohya-ss/sd-scripts.
"""

EPILOG = """\
example:
  python -m hakubooru select --db danbooru2023.db --out sel.parquet \\
      --expr 'Selector.id_range(5_000_000).rating("general").exclude_deleted().images_only()'
  python -m hakubooru build --db danbooru2023.db --images /data/danbooru2023-webp-4Mpixel \\
      --selection sel.parquet --out out/ --workers 8
  python -m hakubooru export out/ --to kohya train/ --repeats 1 --name danbooru

`python -m hakubooru COMMAND --help` lists a command's options and their defaults.
"""


def make_parser() -> tuple[argparse.ArgumentParser, dict]:
    """The command-line parser and the command modules by name."""
    parser = argparse.ArgumentParser(prog="python -m hakubooru", description=DESCRIPTION,
                                     epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands")
    modules = {}
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"hakubooru.commands.{name}")
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser, modules


def main(argv=None) -> int:
    parser, modules = make_parser()
    args = parser.parse_args(argv)
    return run_command(modules[args.command].run, args)


if __name__ == "__main__":
    sys.exit(main())
