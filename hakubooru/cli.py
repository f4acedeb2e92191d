"""``python -m hakubooru <command>``: dispatch to hakubooru.commands.<command>.

Every HakubooruError becomes one line on stderr (``error: ...``) and exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import run_command

COMMANDS = {
    "synth": "generate a synthetic danbooru-like database and image archives",
    "select": "evaluate a selection and save it as Parquet",
    "caption": "caption a selection into a Parquet table",
    "build": "build webdataset shards from a selection and image archives",
    "report": "write an HTML report about a built shard folder",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hakubooru", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"hakubooru.commands.{name}")
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return run_command(modules[args.command].run, args)


if __name__ == "__main__":
    sys.exit(main())
