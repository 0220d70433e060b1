"""The one exception type that reaches the user as a one-line message."""


class OverlayfuseError(Exception):
    """A failure the user can act on: the CLI prints ``overlayfuse: <message>`` and exits non-zero.

    Raise it with a message that names the thing at fault (the path, the option), never with a
    traceback's worth of context; nothing may have been changed on disk when it is raised for bad
    input.
    """
