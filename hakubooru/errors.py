"""The one exception type users see: a clear, one-line message about bad input."""
from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path


class HakubooruError(Exception):
    """Raised for bad input (missing file, wrong schema, unknown tag, ...).

    The message is a single line meant for the user; command-line entry points
    print it as ``error: <message>`` and exit with status 2 instead of a traceback.
    """


@contextlib.contextmanager
def reporting_full_disk(path, needed: int):
    """Turn "no space left on device" (or over quota) while writing ``path`` into one line naming
    the file, the free space and the space this write needed."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = shutil.disk_usage(Path(path).parent).free
        raise HakubooruError(f"no space left on the device writing {path}: {free / 2**20:.1f} MiB free, "
                             f"at least {needed / 2**20:.1f} MiB more needed; free some space or "
                             "write to another disk") from None


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
