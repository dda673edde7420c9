"""Host name lookups off the event loop.

Theory of operation
-------------------
``getaddrinfo`` blocks (for seconds when a DNS server is slow), and the event loop
must never wait for it.  A :class:`Resolver` runs each lookup in a short-lived
thread that does nothing else: it calls the lookup function, appends its answer to
a list under a lock and writes one byte to a socket pair.  The other end of the
pair is a reader on the reactor; it takes the answers and applies them to the
:class:`~uwsgi_fastrouter.names.NameTable` on the loop's thread, which is the only
thread that touches the table, the router or any socket of the data path
(docs/decisions.md explains why threads and not a child process).

Bounds: one lookup per name at a time (the table's ``started`` mark), at most
``max_threads`` threads alive (a name whose turn comes while all are busy waits for
the next free one), and a lookup still running after the table's ``timeout``
counts as failed (its thread keeps its slot until the lookup returns, so stuck
lookups cannot pile up threads).  Threads exist only while a lookup runs: a
process without host names never starts one, and a fork between lookups copies
none.

After answers changed some name's addresses, every callback in
:attr:`Resolver.on_change` is called once (on the loop's thread); the router and
the subscription server rebuild what they built from names then.
"""

from __future__ import annotations

import socket
import threading
from typing import Callable, List, Optional, Sequence, Tuple

from .names import NameTable
from .reactor import Reactor

__all__ = ["Resolver", "lookup_host"]

#: threads looking names up at the same time, at most
DEFAULT_MAX_THREADS = 4

# (name, when the lookup started, addresses or None, why it failed)
_Answer = Tuple[str, float, Optional[Sequence[str]], str]


def lookup_host(name: str) -> List[str]:
    """The IPv4 and IPv6 addresses of *name*, in the system resolver's order (blocks)."""
    infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]


class Resolver:
    """Looks up the names of *table* on schedule, off *reactor*'s thread.

    *lookup* (default :func:`lookup_host`) takes a name and returns its addresses
    or raises ``OSError``; tests pass their own."""

    def __init__(self, reactor: Reactor, table: NameTable, *,
                 lookup: Callable[[str], Sequence[str]] = lookup_host,
                 max_threads: int = DEFAULT_MAX_THREADS) -> None:
        self.reactor = reactor
        self.table = table
        self.lookup = lookup
        self.max_threads = max_threads
        self.on_change: List[Callable[[], None]] = []
        self.busy = 0                 # threads alive
        self.lookups = 0              # lookups started
        self._answers: List[_Answer] = []
        self._lock = threading.Lock()
        self._timer = None
        self._pipe: Optional[Tuple[socket.socket, socket.socket]] = None

    # -- lifecycle

    def start(self) -> None:
        if self._pipe is not None:
            return
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self._pipe = (reader, writer)
        self.reactor.add_reader(reader.fileno(), self._answered)
        self._schedule()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pipe is not None:
            reader, writer = self._pipe
            self._pipe = None
            self.reactor.remove_reader(reader.fileno())
            reader.close()
            with self._lock:       # a thread still running writes nothing after this
                writer.close()

    def abandon(self) -> None:
        """In a forked child: close the pair without touching the (parent's) loop."""
        self._timer = None
        if self._pipe is not None:
            for end in self._pipe:
                end.close()
            self._pipe = None

    # -- what users call (on the loop's thread)

    def watch(self, name: str, *, pinned: bool = True) -> bool:
        """Look *name* up from now on; False when the table is full."""
        now = self.reactor.now
        entry = self.table.add(name, now, pinned=pinned)
        if entry is None:
            return False
        if entry.due <= now and entry.started is None and self._pipe is not None:
            self._schedule()
        return True

    def addresses(self, name: str) -> Optional[Tuple[str, ...]]:
        return self.table.addresses(name)

    # -- the schedule

    def _schedule(self) -> None:
        if self._pipe is None:
            return
        when = self.table.next_due()
        if self._timer is not None:
            if when is not None and self._timer.when <= when:
                return
            self._timer.cancel()
            self._timer = None
        if when is not None:
            self._timer = self.reactor.call_at(max(when, self.reactor.now), self._run)

    def _run(self) -> None:
        self._timer = None
        now = self.reactor.now
        self.table.time_out(now)
        self.table.forget_idle(now)
        for name in self.table.due(now):
            if self.busy >= self.max_threads:
                self.table.entries[name].started = None    # its turn comes again
                self.table.entries[name].due = now + 1.0
                continue
            self._start_lookup(name, now)
        self._schedule()

    def _start_lookup(self, name: str, started: float) -> None:
        self.busy += 1
        self.lookups += 1
        thread = threading.Thread(target=self._look_up, args=(name, started),
                                  name="uwsgi-fastrouter resolver", daemon=True)
        thread.start()

    # -- in the lookup thread

    def _look_up(self, name: str, started: float) -> None:
        try:
            answer: _Answer = (name, started, list(self.lookup(name)), "")
        except (OSError, UnicodeError, ValueError) as exc:
            answer = (name, started, None, getattr(exc, "strerror", None) or str(exc))
        with self._lock:
            self._answers.append(answer)
            if self._pipe is not None:
                try:
                    self._pipe[1].send(b"!")
                except OSError:   # full: a wake-up is pending anyway
                    pass

    # -- back on the loop

    def _answered(self) -> None:
        reader = self._pipe[0] if self._pipe is not None else None
        try:
            while reader is not None and reader.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        with self._lock:
            answers, self._answers = self._answers, []
        now = self.reactor.now
        changed = False
        for name, started, addresses, why in answers:
            self.busy -= 1
            if addresses is None:
                self.table.failed(name, why, now, started)
            elif self.table.resolved(name, addresses, now, started):
                changed = True
        if changed:
            for callback in list(self.on_change):
                callback()
        self._schedule()
