"""One accept path for every listening socket, with a back-off when descriptors run out.

Theory of operation
-------------------
An :class:`Acceptor` watches one listening socket on the reactor.  On readiness it
accepts in a loop -- at most *batch* connections, so one busy listener cannot starve
the others -- and hands each new descriptor and peer address to its owner's
``on_accept(fd, addr)``.  When the listener is the only descriptor ready in the
reactor's pass (a lightly loaded process), it accepts just one: the loop would end
with an ``accept()`` failing with EAGAIN, a system call plus an exception object on
every connection, while a client still waiting makes the (level-triggered) listener
ready again in the next pass at the price of one poll.  The descriptor is the bare number ``accept(2)`` returned:
no socket object is built here and the new socket is in blocking mode (the router
keeps it so and uses ``MSG_DONTWAIT``, saving one ``fcntl`` per connection; other
owners wrap it with :func:`adopt`).  That is the whole cost per connection: one
system call and one call of the owner's function.

Running out of descriptors (EMFILE, ENFILE, and ENOBUFS/ENOMEM for kernel memory)
is the dangerous case: the listener stays readable, so an accept loop that merely
gives up until the next readiness spins at full CPU, and the waiting clients hang
until they time out.  Each process therefore keeps one spare descriptor, opened
when the first acceptor is made (a forked child has its own copy).  When accept
fails for want of descriptors, the acceptor

1. closes the spare, accepts the waiting client and closes it at once (it sees a
   plain close, as for any other refusal), and takes the spare again;
2. stops watching its listener for :data:`BACKOFF` seconds, then watches it again
   -- unless its owner stopped it in the meantime;
3. logs one line, at most once a second in the whole process (the lines it did
   not write are counted in the next one).

So a process out of descriptors spends one failed accept, one shed client and one
timer per listener per :data:`BACKOFF`, whatever the number of waiting clients.
Any other unexpected accept error gets the same pause and log line (without the
shedding): nothing that stays readable can make a loop spin.

:func:`shed_waiting_client` is the reactor-free part, for the pre-forked
application worker, which pauses by sleeping.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import Any, Callable, Optional

from .log import RateLimitedLog
from .reactor import READ, Reactor, Timer

__all__ = ["Acceptor", "BACKOFF", "EXHAUSTED", "adopt", "shed_waiting_client"]

#: accept() failed for want of descriptors or kernel memory
EXHAUSTED = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
#: the client went away (or a firewall said no) between SYN and accept: try the next one
_CLIENT_GONE = frozenset((errno.ECONNABORTED, errno.EPROTO, errno.EPERM))
#: seconds a listener is left alone after a failed accept
BACKOFF = 0.1

# One line a second for every accept failure of the process, whichever listener.
_failure_log = RateLimitedLog(time.monotonic, burst=1, what="accept() failure lines")


class _Spare:
    """The process's spare descriptor (``/dev/null``), freed to shed a client."""

    fd: Optional[int] = None

    @classmethod
    def take(cls) -> None:
        if cls.fd is None:
            try:
                cls.fd = os.open(os.devnull, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                cls.fd = None

    @classmethod
    def release(cls) -> bool:
        fd, cls.fd = cls.fd, None
        if fd is None:
            return False
        os.close(fd)
        return True


def shed_waiting_client(sock: socket.socket, name: str, exc: OSError) -> None:
    """Descriptors ran out while accepting on *sock*: close one waiting client with the
    help of the spare descriptor, and log it (rate-limited).  The caller pauses."""
    shed = False
    if _Spare.release():
        try:
            fd, _addr = sock._accept()  # type: ignore[attr-defined]
        except OSError:
            pass
        else:
            os.close(fd)
            shed = True
        _Spare.take()
    _failure_log("[uwsgi-fastrouter] accept(): %s on %s; %s, pausing accepts for %d ms"
                 % (exc.strerror or exc, name,
                    "closed the waiting client" if shed else "no spare descriptor",
                    BACKOFF * 1000))


def adopt(sock: socket.socket, fd: int) -> socket.socket:
    """A non-blocking socket object for *fd*, accepted on the listening socket *sock*."""
    conn = socket.socket(sock.family, sock.type, sock.proto, fileno=fd)
    conn.setblocking(False)
    return conn


class Acceptor:
    """Accepts on *sock* while started; ``on_accept(fd, addr)`` owns each new descriptor.

    *name* names the listener in log lines; *batch* bounds the accepts per readiness.
    """

    __slots__ = ("reactor", "sock", "name", "on_accept", "batch", "_fd", "_started",
                 "_watching", "_timer", "_accept")

    def __init__(self, reactor: Reactor, sock: socket.socket,
                 on_accept: Callable[[int, Any], None], *, name: str, batch: int = 16) -> None:
        self.reactor = reactor
        self.sock = sock
        self.name = name
        self.on_accept = on_accept
        self.batch = max(int(batch), 1)
        self._fd = sock.fileno()
        self._accept = sock._accept  # type: ignore[attr-defined]  # bound once
        self._started = False       # the owner's wish
        self._watching = False      # registered with the reactor
        self._timer: Optional[Timer] = None   # set while backing off
        _Spare.take()

    @property
    def backing_off(self) -> bool:
        return self._timer is not None

    def start(self) -> None:
        """Accept from now on (after the current back-off, if there is one)."""
        self._started = True
        if self._timer is None:
            self._watch(True)

    def stop(self) -> None:
        """Accept no more; a pending back-off is forgotten."""
        self._started = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._watch(False)

    def _watch(self, on: bool) -> None:
        if on == self._watching:
            return
        self._watching = on
        if on:
            # register(), not add_reader(): the callback is called with no wrapper frame.
            self.reactor.register(self._fd, READ, self._ready)
        else:
            self.reactor.unregister(self._fd)

    def _ready(self, mask: int = READ) -> None:
        accept = self._accept
        on_accept = self.on_accept
        if self.reactor.ready_count == 1:
            # The listener is the only ready descriptor: take one connection and let the
            # next pass (one cheap poll, level-triggered) say whether more are waiting,
            # rather than pay the accept() that fails with EAGAIN, and its exception, on
            # every connection of a lightly loaded router.
            try:
                fd, addr = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in _CLIENT_GONE:
                    self._failed(exc)
                return
            on_accept(fd, addr)
            return
        for _ in range(self.batch):
            try:
                fd, addr = accept()
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno in _CLIENT_GONE:
                    continue
                self._failed(exc)
                return
            on_accept(fd, addr)

    def _failed(self, exc: OSError) -> None:
        if exc.errno in EXHAUSTED:
            shed_waiting_client(self.sock, self.name, exc)
        else:
            _failure_log("[uwsgi-fastrouter] accept() on %s: %s; pausing accepts for %d ms"
                         % (self.name, exc.strerror or exc, BACKOFF * 1000))
        self._watch(False)
        self._timer = self.reactor.call_later(BACKOFF, self._resume)

    def _resume(self) -> None:
        self._timer = None
        if self._started:
            self._watch(True)


class ConnectionServer:
    """A listener whose every connection is one short-lived client object (the stats
    and metrics endpoints): accepts through an :class:`Acceptor`, keeps the live
    clients by descriptor, closes them all on :meth:`stop`.

    A subclass sets :meth:`new_client` (given the non-blocking socket, returns an
    object with ``fd``, ``sock`` and ``close()``, which ends with :meth:`drop`).
    """

    def __init__(self, reactor: Reactor, listener, what: str) -> None:
        self.reactor = reactor
        self.listener = listener
        self.clients: dict = {}
        self.acceptor = Acceptor(reactor, listener.sock, self._accept,
                                 name="%s %s" % (what, listener.name))

    def start(self) -> None:
        self.acceptor.start()

    def stop(self) -> None:
        self.acceptor.stop()
        for client in list(self.clients.values()):
            client.close()

    def _accept(self, fd: int, _addr) -> None:
        client = self.new_client(adopt(self.listener.sock, fd))
        self.clients[client.fd] = client

    def new_client(self, sock: socket.socket) -> Any:
        raise NotImplementedError

    def drop(self, client: Any) -> None:
        """Unregister *client*'s socket, forget the client and close the socket."""
        reactor = self.reactor
        reactor.remove_reader(client.fd)
        reactor.remove_writer(client.fd)
        self.clients.pop(client.fd, None)
        client.sock.close()
