"""The router's log: plain lines on stderr, in uWSGI's wording.

uWSGI writes its log lines unprefixed to stderr (or to ``--logto``); users grep for
them, so the texts of the lines are part of the interface.  Everything that logs
goes through :func:`log` so that a later redirection (``--logto``, ``--daemonize``)
has one place to change.
"""

from __future__ import annotations

import sys
from typing import Optional, TextIO

_stream: Optional[TextIO] = None   # None: whatever sys.stderr is at the time


def log(line: str) -> None:
    """Write one log line (a newline is added) and flush it."""
    try:
        stream = _stream if _stream is not None else sys.stderr
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):
        # A closed or broken log stream must never take the router down.
        pass


def set_stream(stream: Optional[TextIO]) -> None:
    """Send every further log line to *stream*."""
    global _stream
    _stream = stream
