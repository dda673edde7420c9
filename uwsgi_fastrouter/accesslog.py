"""The access log (``--fastrouter-access-log``): one line per request, off by default.

Theory of operation
-------------------
A line is made from the request record (record.py): the closed session itself,
whose slots the session filled on its way (times, bytes each way, key, node,
retries, outcome).  The log only keeps the first response bytes for the HTTP status,
which the session copies when the log is on; with the log off a session pays one
attribute check at its first response byte and one when it closes.

Lines are made lazily: a closing session is only appended to a list, and the lines
of all waiting sessions are formatted and written together (see :class:`AccessLog`).
The format (``--fastrouter-access-log-format``) uses uWSGI's ``%(name)`` variables.
It is compiled once, at start-up, into a ``%``-string and one small function that
builds the tuple of values from fixed expressions (see :func:`compile_format`); a
line is then one call and one ``%``.  An unknown variable is a start-up error.
Times are loop times (record.py); ``%(time)`` turns the end of the request into
unix time with one offset read per batch.

Every field a peer can influence (the key, the client address the front end passed,
the node address, which may come from a subscription datagram) goes through
:func:`~uwsgi_fastrouter.log.printable`, so a line can never be split or forged.

Where lines go: the main log when the option is given bare, else a file opened in
append mode (so the router processes under a master can share it) and reopened on
``--touch-logreopen``.  Either way the lines are written in batches, at most 0.2 s
after they were made (see :class:`AccessLog`); a router process that is killed
loses at most that much.
"""

from __future__ import annotations

import os
import re
import time
from typing import Callable, Dict, List, Optional, Tuple

from .log import log, log_lines, printable
from .options import ACCESS_LOG_FORMAT
from .record import ACCESS_LOG_NAMES, HANDOFF

_monotonic = time.monotonic

DEFAULT_FORMAT = ACCESS_LOG_FORMAT
_HANDOFF_NAME = ACCESS_LOG_NAMES[HANDOFF]


_texts: Dict[bytes, str] = {}
_TEXTS_MAX = 4096
_TEXT_MAX_LEN = 255


def _text(value: bytes) -> str:
    """printable(value), remembered: keys and node addresses repeat from request to
    request.  The memory is bounded: only short values are kept, and it is emptied
    when full."""
    if len(value) > _TEXT_MAX_LEN:
        return printable(value)
    text = _texts.get(value)
    if text is None:
        if len(_texts) >= _TEXTS_MAX:
            _texts.clear()
        text = _texts[value] = printable(value)
    return text


# The hot lookups inline this before calling _text: a known value costs one dict get.
_known = _texts.get


def http_status(first: bytes) -> str:
    """The status code of a response that starts with ``HTTP/x.y NNN``, else ``-``."""
    if first.startswith(b"HTTP/"):
        parts = first.split(b" ", 2)
        if len(parts) >= 2 and len(parts[1]) == 3 and parts[1].isdigit():
            return parts[1].decode("ascii")
    return "-"


# The first response bytes repeat from response to response ("HTTP/1.1 200 OK\r"):
# their status is remembered, in a table as bounded as _texts.
_statuses: Dict[bytes, str] = {}
_known_status = _statuses.get


def _status(first: bytes) -> str:
    """http_status(first), remembered."""
    if len(_statuses) >= _TEXTS_MAX:
        _statuses.clear()
    status = _statuses[first] = http_status(first)
    return status


def _client_addr(session) -> str:
    info = session.info
    if info is not None and info.remote_addr:
        return _known(info.remote_addr) or _text(info.remote_addr)
    addr = session.caddr
    if isinstance(addr, tuple) and addr:
        return str(addr[0])
    return printable(addr) if addr else "-"


def _client_port(session) -> str:
    info = session.info
    if info is not None and info.remote_port:
        return _known(info.remote_port) or _text(info.remote_port)
    addr = session.caddr
    if isinstance(addr, tuple) and len(addr) >= 2:
        return str(addr[1])
    return "-"


def _node(session) -> str:
    route = session.route
    if route is not None:
        return _known(route.address) or _text(route.address)
    if session.failed_address is not None:
        return _text(session.failed_address)
    return "-"


#: variable name -> the Python expression that gives its text, over ``s`` (the
#: request record: a closed session, record.py), ``o`` (its outcome's name),
#: ``pid`` and ``unix`` (unix time minus loop time).  The names and their
#: descriptions are options.ACCESS_LOG_VARIABLES (they feed --help, the man page
#: and README).
VARIABLES: Dict[str, str] = {
    "addr": "_client_addr(s)",
    "port": "_client_port(s)",
    "key": '(_known(s.key) or _text(s.key) if s.key else "-")',
    "node": "_node(s)",
    "modifier1": '(str(s.route.modifier1) if s.route is not None else "-")',
    "status": '("-" if o == HANDOFF or not s.first_byte '
              'else _known_status(s.first) or _status(s.first))',
    "rx": "str(s.rx)",
    "tx": '("-" if o == HANDOFF else str(s.tx))',
    "ttfb": '("%.1f" % ((s.first_byte - s.started) * 1000.0) if s.first_byte else "-")',
    "msecs": '"%.1f" % ((s.ended - s.started) * 1000.0)',
    "retries": "str(s.retries)",
    "outcome": "o",
    "pid": "pid",
    "time": "str(int(unix + s.ended))",
}

_VARIABLE = re.compile(r"%\(([^)]*)\)")


def parse_format(fmt: str, option: str = "--fastrouter-access-log-format") -> Tuple[str, List[str]]:
    """*fmt* as a ``%``-string with one ``%s`` per variable, and the variables' names.

    Raises ``ValueError`` naming *option* for an unknown variable."""
    pieces: List[str] = []
    names: List[str] = []
    unknown: List[str] = []
    pos = 0
    for match in _VARIABLE.finditer(fmt):
        pieces.append(fmt[pos:match.start()].replace("%", "%%"))
        name = match.group(1)
        if name in VARIABLES:
            pieces.append("%s")
            names.append(name)
        else:
            unknown.append(name)
        pos = match.end()
    pieces.append(fmt[pos:].replace("%", "%%"))
    if unknown:
        raise ValueError('option "%s": unknown variable%s %s (known: %s)'
                         % (option, "s" if len(unknown) > 1 else "",
                            ", ".join("%%(%s)" % n for n in unknown), ", ".join(VARIABLES)))
    return "".join(pieces), names


def compile_format(fmt: str, option: str = "--fastrouter-access-log-format"
                   ) -> Callable[[object, str, float], str]:
    """*fmt* compiled, once, into one function ``line(record, pid, unix)`` (*unix*: what
    to add to a loop time to get unix time).

    The function's source is made of the fixed expressions of :data:`VARIABLES`
    only; the format's own text is the ``%``-string, a constant, never code.  A line
    then costs one call and one ``%``.  ``ValueError`` for an unknown variable."""
    template, names = parse_format(fmt, option)
    values = "".join(VARIABLES[name] + ", " for name in names)
    source = ("def line(s, pid, unix):\n"
              "    o = NAMES[s.outcome]\n"
              "    return TEMPLATE %% (%s)\n" % values)
    namespace = {"TEMPLATE": template, "HANDOFF": _HANDOFF_NAME, "NAMES": ACCESS_LOG_NAMES,
                 "_text": _text, "_known": _known, "_known_status": _known_status,
                 "_status": _status, "_client_addr": _client_addr, "_client_port": _client_port,
                 "_node": _node}
    exec(compile(source, "<access log format>", "exec"), namespace)
    return namespace["line"]


# Lines waiting for the file are written this long after the first of them at most,
# or as soon as this many wait.
FLUSH_DELAY = 0.2
FLUSH_LINES = 256


class AccessLog:
    """Writes one line per finished session; *path* None means the main log.

    With a *reactor*, finished sessions are collected and their lines made and
    written together with one ``write``, at most FLUSH_DELAY seconds after the first
    of them or as soon as FLUSH_LINES are waiting, and when the router stops (whole
    lines only, so the router processes sharing a file in append mode never split
    one).  A write per request would cost more than the line itself.  A waiting
    session is closed: it holds no descriptor, only its record."""

    def __init__(self, fmt: Optional[str] = None, path: Optional[str] = None,
                 reactor=None) -> None:
        self.line = compile_format(fmt or DEFAULT_FORMAT)
        self.path = path or None
        self.pid = str(os.getpid())   # made in the router process that writes the lines
        self.fd = -1
        self.reactor = reactor
        self.pending: list = []     # closed sessions whose lines are not made yet
        self.timer = None
        if self.path is not None:
            self.fd = self._open(self.path)

    @staticmethod
    def _open(path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def __call__(self, session) -> None:
        pending = self.pending
        pending.append(session)
        if len(pending) == 1:
            if self.reactor is not None:
                self.timer = self.reactor.call_later(FLUSH_DELAY, self.flush)
            else:
                self.flush()
        elif len(pending) >= FLUSH_LINES:
            self.flush()

    def flush(self) -> None:
        """Write the pending lines (one ``write``)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.pending:
            return
        records = self.pending
        self.pending = []
        now = self.reactor.now if self.reactor is not None else _monotonic()
        unix = time.time() - now
        line = self.line
        pid = self.pid
        lines = [line(record, pid, unix) for record in records]
        if self.fd < 0:
            log_lines(lines)
            return
        lines.append("")
        data = "\n".join(lines).encode("utf-8", "backslashreplace")
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError:
            pass   # a full disk must not take the router down

    def reopen(self) -> None:
        """Reopen the file (logrotate renamed it); keep the old one if that fails."""
        if self.path is None:
            return
        self.flush()
        try:
            fd = self._open(self.path)
        except OSError as exc:
            log("*** unable to reopen the access log %s: %s ***" % (self.path, exc.strerror or exc))
            return
        old, self.fd = self.fd, fd
        os.close(old)

    def close(self) -> None:
        self.flush()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
