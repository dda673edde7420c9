"""Passing file descriptors over UNIX sockets (SCM_RIGHTS).

Two users: the router hands a client's connection to a UNIX-socket node together
with the request head (docs/decisions.md D2), and the zerg exchange hands listening
sockets from one process tree to another.  Both go through :func:`send_fds` and
:func:`recv_fds`.  The messages of both are laid out in docs/wire.md ("Descriptor
passing", "The zerg exchange").

Receiving is where descriptors leak: a control message can carry more descriptors
than asked for (the kernel truncates it and sets ``MSG_CTRUNC``; the ones that did
arrive are still installed in this process), or arrive on a read that did not
expect any.  :func:`recv_fds` always returns every descriptor that arrived, and
closes the surplus itself when a *max_fds* is given.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from typing import List, Sequence, Tuple

_INT_SIZE = array.array("i").itemsize
# Looked up once: send_fds runs for every client handed to a node.
_SOL_SOCKET = socket.SOL_SOCKET
_SCM_RIGHTS = socket.SCM_RIGHTS
_int_array = array.array


class FdPassError(OSError):
    """Descriptors could not be passed or were received damaged."""


def send_fds(sock: socket.socket, data: bytes, fds: Sequence[int], flags: int = 0) -> int:
    """Send *data* with *fds* attached in one ``sendmsg``; returns the bytes sent.

    The descriptors go with the first byte: if only part of *data* is sent, the
    rest must be sent with plain ``send`` (the descriptors are already across).
    Raises BlockingIOError when nothing could be sent (nothing was passed then).
    """
    ancillary = [(_SOL_SOCKET, _SCM_RIGHTS, _int_array("i", fds))] if fds else []
    return sock.sendmsg([data], ancillary, flags)


_fd_bytes = struct.Struct("i").pack


def send_fd(sock: socket.socket, data: bytes, fd: int) -> int:
    """:func:`send_fds` for one descriptor (a client handed to a node), without the
    sequence and the array."""
    return sock.sendmsg([data], [(_SOL_SOCKET, _SCM_RIGHTS, _fd_bytes(fd))])


def recv_fds(sock: socket.socket, bufsize: int, max_fds: int, flags: int = 0
             ) -> Tuple[bytes, List[int], int]:
    """Receive up to *bufsize* bytes and up to *max_fds* descriptors.

    Returns ``(data, fds, msg_flags)``.  Descriptors beyond *max_fds* (possible when
    the sender attached more) are closed here.  A truncated control message
    (``MSG_CTRUNC``) raises :class:`FdPassError` after closing what did arrive.
    """
    data, ancdata, msg_flags, _addr = sock.recvmsg(bufsize, socket.CMSG_SPACE(max_fds * _INT_SIZE), flags)
    fds: List[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - (len(payload) % _INT_SIZE)
            fds.extend(array.array("i", payload[:usable]))
    if msg_flags & getattr(socket, "MSG_CTRUNC", 0):
        for fd in fds:
            _close_quietly(fd)
        raise FdPassError("control message truncated: more descriptors were sent than room was made for")
    if len(fds) > max_fds:
        for fd in fds[max_fds:]:
            _close_quietly(fd)
        del fds[max_fds:]
    return data, fds, msg_flags


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
