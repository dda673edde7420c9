"""The router's log: plain lines on stderr, in uWSGI's wording.

uWSGI writes its log lines unprefixed to stderr (or to ``--logto``); users grep for
them, so the texts of the lines are part of the interface.  Everything that logs
goes through :func:`log` so that a later redirection (``--logto``, ``--daemonize``)
has one place to change.

``--log-date`` puts a date in front of every line, as uWSGI does: by default the 24
characters of C's ``ctime()`` (``Thu Dec  3 02:02:03 2026``), or a ``strftime`` format,
then `` - ``.  The prefix is formatted at most once a second and reused: a line costs
one ``time.time()`` and an integer compare more.
"""

from __future__ import annotations

import sys
import time
from typing import List, Optional, TextIO, Union

_stream: Optional[TextIO] = None   # None: whatever sys.stderr is at the time

# --log-date: None is off, "" is ctime's layout, anything else a strftime format.
_date_format: Optional[str] = None
_date_second = -1        # the second _date_prefix was made for
_date_prefix = ""

# Control characters (C0, DEL and C1) shown as \xNN: a peer that sends a newline or a
# terminal escape in a key, a Host header or a datagram cannot forge or hide a log line
# (docs/decisions.md D18).
_CONTROLS = {code: "\\x%02x" % code for code in (*range(0x20), *range(0x7f, 0xa0))}


def printable(value: Union[bytes, bytearray, memoryview, str]) -> str:
    """Peer-supplied bytes (or text decoded with ``surrogateescape``) as a safe log field.

    Valid UTF-8 is kept, every other byte and every control character becomes ``\\xNN``.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = value.encode("utf-8", "surrogateescape")
    if not isinstance(value, str):
        value = bytes(value).decode("utf-8", "backslashreplace")
    return value.translate(_CONTROLS)


def log(line: str) -> None:
    """Write one log line (a newline is added) and flush it."""
    try:
        stream = _stream if _stream is not None else sys.stderr
        if _date_format is not None:
            second = int(time.time())
            line = (_date_prefix if second == _date_second else _date_for(second)) + line
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):
        # A closed or broken log stream must never take the router down.
        pass


def set_stream(stream: Optional[TextIO]) -> None:
    """Send every further log line to *stream*."""
    global _stream
    _stream = stream


def set_date_format(date_format: Optional[str]) -> None:
    """Prefix every further line with the date: None is off, "" uWSGI's default
    (``ctime()`` layout), any other text a ``strftime`` format."""
    global _date_format, _date_second
    _date_format = date_format
    _date_second = -1


def _date_for(second: int) -> str:
    global _date_second, _date_prefix
    if second != _date_second:
        if _date_format:
            stamp = time.strftime(_date_format, time.localtime(second))
        else:
            stamp = time.ctime(second)
        _date_prefix = stamp + " - "
        _date_second = second
    return _date_prefix


class RateLimitedLog:
    """A log that writes at most *burst* lines per second.

    Lines beyond the burst are counted; the next line after the second is over is
    preceded by one summary line, so a flood of bad clients or bad datagrams cannot
    flood the log (or cost the router its time writing it).
    """

    __slots__ = ("clock", "burst", "what", "window", "count", "suppressed")

    def __init__(self, clock, burst: int = 20, what: str = "log lines") -> None:
        self.clock = clock
        self.burst = burst
        self.what = what
        self.window = float("-inf")
        self.count = 0
        self.suppressed = 0

    def __call__(self, line: str) -> None:
        now = self.clock()
        if now - self.window >= 1.0:
            if self.suppressed:
                log("... %d more %s not written (at most %d a second)"
                    % (self.suppressed, self.what, self.burst))
            self.window = now
            self.count = 0
            self.suppressed = 0
        if self.count < self.burst:
            self.count += 1
            log(line)
        else:
            self.suppressed += 1


def log_lines(lines: List[str]) -> None:
    """Write several lines with one write and one flush, each with the date prefix
    if ``--log-date`` is on (the access log's batches)."""
    try:
        stream = _stream if _stream is not None else sys.stderr
        if _date_format is not None:
            second = int(time.time())
            prefix = _date_prefix if second == _date_second else _date_for(second)
            text = "".join([prefix + line + "\n" for line in lines])
        else:
            text = "\n".join(lines) + "\n"
        stream.write(text)
        stream.flush()
    except (OSError, ValueError):
        pass
