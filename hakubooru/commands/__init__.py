"""Subcommands of ``python -m hakubooru``: each module has add_arguments(parser) and run(args)."""
