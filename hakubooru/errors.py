"""The one exception type users see: a clear, one-line message about bad input."""


class HakubooruError(Exception):
    """Raised for bad input (missing file, wrong schema, unknown tag, ...).

    The message is a single line meant for the user; command-line entry points
    print it as ``error: <message>`` and exit with status 2 instead of a traceback.
    """
