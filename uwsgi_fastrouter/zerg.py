"""Zerg mode: lending listening sockets to another process tree over a UNIX socket.

The exchange is uWSGI's (docs/wire.md, "The zerg exchange"): the zerg server accepts a
connection and sends one message, the 10 bytes ``uwsgi-zerg`` and a native 32-bit
count, with that many listening descriptors attached (SCM_RIGHTS), then closes.  A
router started with ``--fastrouter-zerg PATH`` connects at start-up and accepts on
every descriptor it receives, next to (or instead of) its own ``--fastrouter``
addresses: both process trees then share the same listening sockets.

Our ``--zerg-server PATH`` lends this process's ``--fastrouter`` listeners.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import List, Sequence

from .acceptor import Acceptor, adopt
from .fdpass import FdPassError, recv_fds, send_fds
from .log import log
from .sockets import AddressError, Listener, connect_sockaddr, sockname

MAGIC = b"uwsgi-zerg"
_COUNT = struct.Struct("=i")
_FIRST_ROOM = 8
_CONNECT_TIMEOUT = 30.0


class ZergError(OSError):
    """The zerg server could not be reached or sent something else."""


def attach(path: str, timeout: float = _CONNECT_TIMEOUT) -> List[Listener]:
    """Receive the listening sockets a zerg server at *path* lends (blocking, start-up only)."""
    try:
        family, target = connect_sockaddr(path)
    except AddressError as exc:
        raise ZergError("--- unable to connect to zerg server --- (%s)" % exc) from None
    if family != socket.AF_UNIX:
        raise ZergError("--- unable to connect to zerg server --- (%s: descriptors only travel "
                        "over a UNIX socket)" % path)
    room = _FIRST_ROOM
    for _attempt in range(2):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(target)
            data, fds, _flags = recv_fds(sock, len(MAGIC) + _COUNT.size, room)
        except (OSError, FdPassError) as exc:
            sock.close()
            raise ZergError("--- unable to connect to zerg server --- (%s: %s)"
                            % (path, getattr(exc, "strerror", None) or exc))
        sock.close()
        if len(data) < len(MAGIC) + _COUNT.size or not data.startswith(MAGIC):
            for fd in fds:
                os.close(fd)
            raise ZergError("--- invalid data received from zerg-server --- (%s)" % path)
        (count,) = _COUNT.unpack_from(data, len(MAGIC))
        if count > room and len(fds) < count:
            for fd in fds:
                os.close(fd)
            room = count
            continue
        return [_adopt(fd) for fd in fds]
    raise ZergError("--- invalid data received from zerg-server --- (%s)" % path)


def _adopt(fd: int) -> Listener:
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return Listener(sock, sockname(sock), None)


class ZergServer:
    """Lends *listeners* to every process that connects to *path*."""

    def __init__(self, reactor, listener: Listener, lent: Sequence[Listener]) -> None:
        self.reactor = reactor
        self.listener = listener
        self.lent = list(lent)
        self.served = 0
        self.acceptor = Acceptor(reactor, listener.sock, self._accept,
                                 name="zerg server %s" % listener.name)

    def start(self) -> None:
        self.acceptor.start()

    def stop(self) -> None:
        self.acceptor.stop()

    def _accept(self, fd: int, _addr) -> None:
        conn = adopt(self.listener.sock, fd)
        fds = [l.sock.fileno() for l in self.lent]
        try:
            conn.settimeout(1.0)
            send_fds(conn, MAGIC + _COUNT.pack(len(fds)), fds)
            self.served += 1
        except OSError as exc:
            log("[uwsgi-fastrouter] zerg server: unable to send the sockets: %s" % (exc.strerror or exc))
        finally:
            conn.close()
