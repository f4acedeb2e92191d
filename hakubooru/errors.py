"""The one exception type users see: a clear, one-line message about bad input."""


class HakubooruError(Exception):
    """Raised for bad input (missing file, wrong schema, unknown tag, ...).

    The message is a single line meant for the user; command-line entry points
    print it as ``error: <message>`` and exit with status 2 instead of a traceback.
    """


def run_command(command, *args) -> int:
    """Run a command-line entry point: its return value is the exit status; a HakubooruError
    (or an OSError about a path) becomes ``error: <message>`` on stderr and status 2, Ctrl-C
    status 130 — never a traceback."""
    import sys

    try:
        return command(*args) or 0
    except HakubooruError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that cannot be read or written: say which, in one line
        print(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
