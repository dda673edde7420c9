"""The router's log: plain lines on stderr, in uWSGI's wording.

uWSGI writes its log lines unprefixed to stderr (or to ``--logto``); users grep for
them, so the texts of the lines are part of the interface.  Everything that logs
goes through :func:`log` so that a later redirection (``--logto``, ``--daemonize``)
has one place to change.
"""

from __future__ import annotations

import sys
from typing import TextIO

_stream: TextIO = sys.stderr


def log(line: str) -> None:
    """Write one log line (a newline is added) and flush it."""
    try:
        _stream.write(line + "\n")
        _stream.flush()
    except (OSError, ValueError):
        # A closed or broken log stream must never take the router down.
        pass


def set_stream(stream: TextIO) -> None:
    """Send every further log line to *stream*."""
    global _stream
    _stream = stream
