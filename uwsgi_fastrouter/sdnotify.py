"""systemd readiness notifications (``sd_notify``) over ``$NOTIFY_SOCKET``.

Theory of operation
-------------------
A service started by systemd with ``Type=notify`` finds the address of the
service manager's notification socket in ``$NOTIFY_SOCKET``: a path, or a name in
Linux's abstract namespace written with a leading ``@``.  Each notification is one
datagram of ``NAME=VALUE`` lines sent to that address from an ``AF_UNIX``
``SOCK_DGRAM`` socket.  The router sends:

* ``STATUS=...`` while it starts;
* ``READY=1`` once every listening socket is bound (single process: the router is
  about to poll them; master: the router processes are forked); after a reload's
  re-exec also ``MAINPID=`` (the pid is the same, systemd is told it again);
* ``RELOADING=1`` with ``MONOTONIC_USEC=`` when a reload starts, followed by the new
  image's ``READY=1``;
* ``STOPPING=1`` when a shutdown starts.

Only the process systemd started (the master, or the single router process)
sends; it opens a socket for each message (there are a handful in a process's
life) so no descriptor lingers in forked children or across a re-exec.  Nothing
is sent when ``$NOTIFY_SOCKET`` is unset, and the variable is left as it is: a
reload's re-exec needs it again.  A failed send is logged once and never stops
the router.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Mapping, Optional

from .log import log

__all__ = ["Notifier", "from_environ", "socket_address"]

ENV_NOTIFY_SOCKET = "NOTIFY_SOCKET"


def socket_address(value: str) -> Optional[str]:
    """The ``AF_UNIX`` address for a ``$NOTIFY_SOCKET`` value, or None if unusable.

    ``@name`` is the abstract name ``\\0name``; a plain value is a file path."""
    if not value or "\0" in value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if not value.startswith("/"):
        return None
    return value


class Notifier:
    """Sends notifications to one service manager socket."""

    __slots__ = ("address", "_failed")

    def __init__(self, address: str) -> None:
        self.address = address
        self._failed = False

    def send(self, *lines: str) -> bool:
        """Send ``NAME=VALUE`` *lines* as one datagram; False when it could not be sent."""
        data = ("\n".join(lines) + "\n").encode("utf-8", "backslashreplace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(data, self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log("*** unable to notify systemd at %s: %s ***"
                    % (self.address.replace("\0", "@"), exc.strerror or exc))
            return False
        return True

    def status(self, text: str) -> bool:
        return self.send("STATUS=" + _one_line(text))

    def ready(self, text: str, main_pid: Optional[int] = None) -> bool:
        lines = ["READY=1", "STATUS=" + _one_line(text)]
        if main_pid is not None:
            lines.append("MAINPID=%d" % main_pid)
        return self.send(*lines)

    def reloading(self, text: str) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", "MONOTONIC_USEC=%d" % usec, "STATUS=" + _one_line(text))

    def stopping(self, text: str) -> bool:
        return self.send("STOPPING=1", "STATUS=" + _one_line(text))


def _one_line(text: str) -> str:
    return text.replace("\n", " ")


def from_environ(environ: Optional[Mapping[str, str]] = None) -> Optional[Notifier]:
    """A :class:`Notifier` for ``$NOTIFY_SOCKET``, or None when it is unset or unusable."""
    if environ is None:
        environ = os.environ
    value = environ.get(ENV_NOTIFY_SOCKET, "")
    if not value:
        return None
    address = socket_address(value)
    if address is None:
        log("*** ignoring NOTIFY_SOCKET=%r: not an absolute path or an @abstract name ***" % value)
        return None
    return Notifier(address)
