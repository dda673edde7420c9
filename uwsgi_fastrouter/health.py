"""Active health checks: the uwsgi PING packet, sent to every node on the reactor.

Theory of operation
-------------------
With ``--fastrouter-health-check-interval SECS`` (0, the default, is off) the router
probes every node it knows (static ``--fastrouter-to`` nodes, ``--fastrouter-fallback``
nodes and every subscribed address) once per interval.  A probe is one non-blocking
connection: connect, send the 4-byte uwsgi PING header (modifier1 100, datasize 0,
modifier2 0), read a 4-byte answer.  A stock uWSGI node answers every PING with a
header whose modifier1 is 100 (uWSGI 2.0.31 sends ``64 00 00 01``, logs ``PING`` and
closes); anything else is a failed check: a refused or failed connect, a connection
closed before the four bytes, another answer, or no answer within
``--fastrouter-health-check-deadline`` seconds (a stopped process whose listen queue
still accepts connections is caught here).

Per address the checker counts consecutive results: ``--fastrouter-health-check-fails``
failures in a row mark an up node down, ``--fastrouter-health-check-passes`` successes
in a row mark a down node up.  Every address starts up.  A transition is logged once
(address escaped) and handed to ``on_change(address, up)``; the router then skips the
node before any client request is sent to it (see ``Router.node_health_changed``).

Bounds: an address has at most one probe in flight; at most ``max_probes`` probes run
at a time, the others wait in a queue in the order of the round; an address still
probing or queued when the next round starts is not queued again.  The addresses come
from ``targets()`` at every round, and the state of an address no longer listed is
dropped, so the memory follows the (bounded) node tables.

Under ``--master`` each router process runs its own checker against its own copy of
the tables: simplest, with no new messages between processes, at the price of one
probe per node and interval from each process (and of one transition line from each).
"""

from __future__ import annotations

import errno
import os
import socket
from collections import deque
from typing import Callable, Deque, Dict, Iterable, List, Optional

from .log import log as _default_log, printable
from .reactor import Reactor
from .sockets import AddressError, node_sockaddr

__all__ = ["PING", "HealthState", "HealthChecker", "is_pong"]

#: the uwsgi PING packet: modifier1 100, datasize 0, modifier2 0
PING = b"\x64\x00\x00\x00"
_PONG_MODIFIER1 = 100
_IN_PROGRESS = (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK, errno.EALREADY)


def is_pong(header: bytes) -> bool:
    """True when the 4-byte *header* answers a PING."""
    return len(header) == 4 and header[0] == _PONG_MODIFIER1


class HealthState:
    """What the checker knows of one address."""

    __slots__ = ("address", "up", "fails", "passes", "busy", "checks", "failures",
                 "went_down", "went_up", "last_error")

    def __init__(self, address: bytes) -> None:
        self.address = address
        self.up = True
        self.fails = 0          # consecutive failed checks
        self.passes = 0         # consecutive successful checks
        self.busy = False       # queued or probing
        self.checks = 0
        self.failures = 0
        self.went_down = 0
        self.went_up = 0
        self.last_error = ""


class _Probe:
    """One PING exchange with one address."""

    __slots__ = ("checker", "state", "sock", "fd", "answer", "timer", "done")

    def __init__(self, checker: "HealthChecker", state: HealthState) -> None:
        self.checker = checker
        self.state = state
        self.sock: Optional[socket.socket] = None
        self.fd = -1
        self.answer = b""
        self.timer = None
        self.done = False

    def start(self) -> None:
        reactor = self.checker.reactor
        try:
            family, sockaddr = node_sockaddr(self.state.address)
            self.sock = socket.socket(family, socket.SOCK_STREAM)
        except (AddressError, OSError) as exc:
            self.finish("cannot probe: %s" % exc)
            return
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        err = self.sock.connect_ex(sockaddr)
        if err and err not in _IN_PROGRESS:
            self.finish(os.strerror(err))
            return
        if err == errno.EAGAIN and family == socket.AF_UNIX:
            self.finish("listen queue full")
            return
        self.timer = reactor.call_later(self.checker.timeout, self.finish, "timed out")
        reactor.add_writer(self.fd, self._writable)

    def _writable(self) -> None:
        reactor = self.checker.reactor
        reactor.remove_writer(self.fd)
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.finish(os.strerror(err))
            return
        try:
            self.sock.send(PING)   # 4 bytes into an empty send buffer
        except OSError as exc:
            self.finish(exc.strerror or str(exc))
            return
        reactor.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(4 - len(self.answer))
        except BlockingIOError:
            return
        except OSError as exc:
            self.finish(exc.strerror or str(exc))
            return
        if not data:
            self.finish("closed without answering")
            return
        self.answer += data
        if len(self.answer) == 4:
            self.finish(None if is_pong(self.answer) else "not a PONG: %s" % self.answer.hex())

    def finish(self, error: Optional[str]) -> None:
        """End the probe: *error* None is a passed check."""
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        if self.sock is not None:
            reactor = self.checker.reactor
            if reactor.is_registered(self.fd):
                reactor.unregister(self.fd)
            self.sock.close()
        self.checker._probe_done(self, error)


class HealthChecker:
    """Probes the addresses *targets()* lists, every *interval* seconds."""

    def __init__(self, reactor: Reactor, targets: Callable[[], Iterable[bytes]],
                 on_change: Callable[[bytes, bool], None], *, interval: float,
                 timeout: float, fails: int, passes: int, max_probes: int = 32,
                 log: Callable[[str], None] = _default_log) -> None:
        self.reactor = reactor
        self.targets = targets
        self.on_change = on_change
        self.interval = interval
        self.timeout = timeout
        self.fails = max(1, fails)
        self.passes = max(1, passes)
        self.max_probes = max(1, max_probes)
        self.log = log
        self.states: Dict[bytes, HealthState] = {}
        self.queue: Deque[HealthState] = deque()
        self.probes: Dict[int, _Probe] = {}   # id -> probe in flight
        self._timer = None
        self.stopped = True
        #: totals over the checker's life: probes, failed probes, transitions
        self.checks = 0
        self.failures = 0
        self.went_down = 0
        self.went_up = 0

    # -- queries ------------------------------------------------------------

    def is_up(self, address: bytes) -> bool:
        state = self.states.get(address)
        return state is None or state.up

    def totals(self) -> List[int]:
        """``[checks, failures, went down, went up, down now]`` for the metrics."""
        down = sum(1 for state in self.states.values() if not state.up)
        return [self.checks, self.failures, self.went_down, self.went_up, down]

    def health(self) -> Dict[bytes, bool]:
        """Every checked address with its state (True: up)."""
        return {address: state.up for address, state in self.states.items()}

    # -- running ------------------------------------------------------------

    def start(self) -> None:
        self.stopped = False
        self._timer = self.reactor.call_later(0, self._round)

    def stop(self) -> None:
        self.stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.queue.clear()
        for probe in list(self.probes.values()):
            probe.finish("stopped")

    def _round(self) -> None:
        if self.stopped:
            return
        self._timer = self.reactor.call_later(self.interval, self._round)
        listed = set(self.targets())
        states = self.states
        for address in [a for a in states if a not in listed]:
            if not states.pop(address).up:
                self.on_change(address, True)   # forgotten: a comeback starts up
        for address in listed:
            state = states.get(address)
            if state is None:
                state = states[address] = HealthState(address)
            if not state.busy:
                state.busy = True
                self.queue.append(state)
        self._fill()

    def _fill(self) -> None:
        queue = self.queue
        while queue and len(self.probes) < self.max_probes and not self.stopped:
            probe = _Probe(self, queue.popleft())
            self.probes[id(probe)] = probe
            probe.start()

    def _probe_done(self, probe: _Probe, error: Optional[str]) -> None:
        self.probes.pop(id(probe), None)
        state = probe.state
        state.busy = False
        if self.states.get(state.address) is state and not self.stopped:
            self.record(state, error)
        if not self.stopped:
            self.reactor.call_soon(self._fill)

    def record(self, state: HealthState, error: Optional[str]) -> None:
        """Count one check's result for *state* and act on a transition."""
        state.checks += 1
        self.checks += 1
        if error is None:
            state.fails = 0
            state.passes += 1
            if not state.up and state.passes >= self.passes:
                state.up = True
                state.went_up += 1
                self.went_up += 1
                self.log("[uwsgi-fastrouter pid %d] health check: node %s is up again "
                         "(%d passed checks)" % (os.getpid(), printable(state.address),
                                                 state.passes))
                self.on_change(state.address, True)
            return
        state.failures += 1
        self.failures += 1
        state.last_error = error
        state.passes = 0
        state.fails += 1
        if state.up and state.fails >= self.fails:
            state.up = False
            state.went_down += 1
            self.went_down += 1
            self.log("[uwsgi-fastrouter pid %d] health check: node %s is down "
                     "(%d failed checks, last: %s)" % (os.getpid(), printable(state.address),
                                                       state.fails, error))
            self.on_change(state.address, False)
