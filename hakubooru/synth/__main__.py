"""``python -m hakubooru.synth``: the same command as ``python -m hakubooru synth``."""
import argparse
import sys

from ..cli import COMMANDS
from ..commands import synth
from ..errors import run_command


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hakubooru.synth", description=COMMANDS["synth"])
    synth.add_arguments(parser)
    args = parser.parse_args(argv)
    return run_command(synth.run, args)


if __name__ == "__main__":
    sys.exit(main())
