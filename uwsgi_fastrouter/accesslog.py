"""The access log (``--fastrouter-access-log``): one line per request, off by default.

Theory of operation
-------------------
Cost is paid only when the log is on.  The server then accepts clients into a
:class:`CountingSocket` instead of the plain C socket type: the same object, whose
``send``/``recv``/``recv_into`` also count the bytes, keep the first bytes of the
response (for the HTTP status) and the time of the first one.  With the log off,
nothing of this exists and a session pays one attribute check when it closes.

The format (``--fastrouter-access-log-format``) uses uWSGI's ``%(name)`` variables.
It is compiled once, at start-up, into a ``%``-string and a tuple of getters; a line
is then one tuple of calls and one ``%``.  An unknown variable is a start-up error.

Every field a peer can influence (the key, the client address the front end passed,
the node address, which may come from a subscription datagram) goes through
:func:`~uwsgi_fastrouter.log.printable`, so a line can never be split or forged.

Where lines go: the main log (``log``) when the option is given bare, else a file
opened in append mode, written with one ``write`` per line (so the router
processes under a master can share it), and reopened on ``--touch-logreopen``.
"""

from __future__ import annotations

import _socket
import os
import re
import time
from typing import Callable, Dict, List, Optional, Tuple

from .log import log, printable
from .options import ACCESS_LOG_FORMAT

_monotonic = time.monotonic

# What happened to a request (the %(outcome) variable).
OK = "ok"                # relayed: the node answered through the router
HANDOFF = "handoff"      # the client was passed to the node (fd passing)
NO_ROUTE = "noroute"     # no node for its key
FAILED = "failed"        # every node tried failed to connect
ERROR = "error"          # closed early: a bad or vanished client, a time-out, an I/O error

DEFAULT_FORMAT = ACCESS_LOG_FORMAT


class CountingSocket(_socket.socket):
    """A client socket that counts what it moves (only used when the access log is on)."""

    __slots__ = ("rx", "tx", "t0", "t_first", "first")

    def __init__(self, family: int, type_: int, proto: int, fileno: int) -> None:
        super().__init__(family, type_, proto, fileno)
        self.rx = 0             # bytes read from the client
        self.tx = 0             # bytes sent to the client
        self.t0 = _monotonic()  # accepted
        self.t_first = 0.0      # first response byte sent
        self.first = b""        # the first response bytes (for the status)

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
        n = super().recv_into(buffer, nbytes, flags)
        self.rx += n
        return n

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        self.rx += len(data)
        return data

    def send(self, data, flags: int = 0) -> int:
        n = super().send(data, flags)
        if n and not self.tx:
            self.t_first = _monotonic()
            self.first = bytes(data[:16])
        self.tx += n
        return n


def http_status(first: bytes) -> str:
    """The status code of a response that starts with ``HTTP/x.y NNN``, else ``-``."""
    if first.startswith(b"HTTP/"):
        parts = first.split(b" ", 2)
        if len(parts) >= 2 and len(parts[1]) == 3 and parts[1].isdigit():
            return parts[1].decode("ascii")
    return "-"


class Entry:
    """What one finished session tells the access log (built only when the log is on)."""

    __slots__ = ("session", "sock", "outcome", "end")

    def __init__(self, session, outcome: str, end: float) -> None:
        self.session = session
        self.sock = session.csock
        self.outcome = outcome
        self.end = end


def _client_addr(e: Entry) -> str:
    info = e.session.info
    if info is not None and info.remote_addr:
        return printable(info.remote_addr)
    addr = e.session.caddr
    if isinstance(addr, tuple) and addr:
        return str(addr[0])
    return printable(addr) if addr else "-"


def _client_port(e: Entry) -> str:
    info = e.session.info
    if info is not None and info.remote_port:
        return printable(info.remote_port)
    addr = e.session.caddr
    if isinstance(addr, tuple) and len(addr) >= 2:
        return str(addr[1])
    return "-"


def _key(e: Entry) -> str:
    key = e.session.key
    return printable(key) if key else "-"


def _node(e: Entry) -> str:
    session = e.session
    route = session.route
    if route is not None:
        return printable(route.address)
    if session.failed_address is not None:
        return printable(session.failed_address)
    return "-"


def _modifier1(e: Entry) -> str:
    route = e.session.route
    return str(route.modifier1) if route is not None else "-"


def _status(e: Entry) -> str:
    return "-" if e.outcome == HANDOFF else http_status(e.sock.first)


def _rx(e: Entry) -> str:
    return str(e.sock.rx)


def _tx(e: Entry) -> str:
    return "-" if e.outcome == HANDOFF else str(e.sock.tx)


def _ttfb(e: Entry) -> str:
    sock = e.sock
    if not sock.tx:
        return "-"
    return "%.1f" % ((sock.t_first - sock.t0) * 1000.0)


def _msecs(e: Entry) -> str:
    return "%.1f" % ((e.end - e.sock.t0) * 1000.0)


def _retries(e: Entry) -> str:
    return str(e.session.retries)


def _outcome(e: Entry) -> str:
    return e.outcome


def _pid(e: Entry) -> str:
    return str(os.getpid())


def _time(e: Entry) -> str:
    return str(int(time.time()))


#: variable name -> getter; the names and their descriptions are
#: options.ACCESS_LOG_VARIABLES (they feed --help, the man page and README).
VARIABLES: Dict[str, Callable[[Entry], str]] = {
    "addr": _client_addr, "port": _client_port, "key": _key, "node": _node,
    "modifier1": _modifier1, "status": _status, "rx": _rx, "tx": _tx, "ttfb": _ttfb,
    "msecs": _msecs, "retries": _retries, "outcome": _outcome, "pid": _pid, "time": _time,
}

_VARIABLE = re.compile(r"%\(([^)]*)\)")


def compile_format(fmt: str, option: str = "--fastrouter-access-log-format") -> Tuple[str, tuple]:
    """*fmt* as a ``%``-string with one ``%s`` per variable and the tuple of getters.

    Raises ``ValueError`` naming *option* for an unknown variable."""
    pieces: List[str] = []
    getters = []
    unknown: List[str] = []
    pos = 0
    for match in _VARIABLE.finditer(fmt):
        pieces.append(fmt[pos:match.start()].replace("%", "%%"))
        name = match.group(1)
        getter = VARIABLES.get(name)
        if getter is None:
            unknown.append(name)
        else:
            pieces.append("%s")
            getters.append(getter)
        pos = match.end()
    pieces.append(fmt[pos:].replace("%", "%%"))
    if unknown:
        raise ValueError('option "%s": unknown variable%s %s (known: %s)'
                         % (option, "s" if len(unknown) > 1 else "",
                            ", ".join("%%(%s)" % n for n in unknown), ", ".join(VARIABLES)))
    return "".join(pieces), tuple(getters)


class AccessLog:
    """Writes one line per finished session; *path* None means the main log."""

    def __init__(self, fmt: Optional[str] = None, path: Optional[str] = None) -> None:
        self.template, self.getters = compile_format(fmt or DEFAULT_FORMAT)
        self.path = path or None
        self.fd = -1
        if self.path is not None:
            self.fd = self._open(self.path)

    @staticmethod
    def _open(path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def __call__(self, session, outcome: str) -> None:
        entry = Entry(session, outcome, _monotonic())
        line = self.template % tuple([get(entry) for get in self.getters])
        if self.fd < 0:
            log(line)
            return
        try:
            os.write(self.fd, (line + "\n").encode("utf-8", "backslashreplace"))
        except OSError:
            pass   # a full disk must not take the router down

    def reopen(self) -> None:
        """Reopen the file (logrotate renamed it); keep the old one if that fails."""
        if self.path is None:
            return
        try:
            fd = self._open(self.path)
        except OSError as exc:
            log("*** unable to reopen the access log %s: %s ***" % (self.path, exc.strerror or exc))
            return
        old, self.fd = self.fd, fd
        os.close(old)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
