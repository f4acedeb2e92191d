"""``python -m hakubooru.synth``: the same command as ``python -m hakubooru synth``."""
import argparse
import sys

from ..cli import COMMANDS
from ..commands import synth
from ..errors import HakubooruError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hakubooru.synth", description=COMMANDS["synth"])
    synth.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return synth.run(args)
    except HakubooruError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


sys.exit(main())
