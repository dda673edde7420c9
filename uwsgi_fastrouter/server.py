"""One router process: listeners, the accept loop, live sessions and their time-outs.

Theory of operation
-------------------
Every listening socket has an :class:`~uwsgi_fastrouter.acceptor.Acceptor`: on
readiness it accepts in a loop (up to ``events`` connections per readiness, so one
busy listener cannot starve the others) and starts one
:class:`~uwsgi_fastrouter.session.Session` per client.  The accepted socket is left
in blocking mode: sessions use ``MSG_DONTWAIT`` on it (one ``fcntl`` saved per
request).  Running out of file descriptors is the acceptor's business: it sheds
the waiting client with a spare descriptor, pauses that listener for a short
back-off and logs at most once a second, so the loop never spins.

Time-outs: every session records the loop time of its last event; a sweep once a
second closes those idle for longer than ``--fastrouter-timeout``.  This keeps the
per-event cost at one attribute store instead of a timer heap operation.
"""

from __future__ import annotations

import _socket
import os
from typing import Any, Callable, List, Optional, Set

from .acceptor import Acceptor
from .bodybuffer import BodyBuffering
from .context import SessionContext
from .handoff import Handoffs
from .log import RateLimitedLog, log, printable
from .metrics import Counters
from .protocol import scan_request
from .reactor import Reactor
from .router import Router
from .session import Session
from .stripvars import VarStripper

# Relay read size when --fastrouter-buffer-size is not given.  uWSGI reads one page
# at a time; one process-wide buffer costs nothing per connection, and 256 KiB
# reads move bulk bodies with a quarter of the system calls of 64 KiB ones.
DEFAULT_CHUNK = 256 * 1024


class Server:
    def __init__(self, reactor: Reactor, router: Router, listeners: list, *,
                 timeout: int = 60, chunk: int = DEFAULT_CHUNK, events: int = 64,
                 force_key: Optional[bytes] = None, cheap: bool = False,
                 fd_passing: bool = True, trust_fd_passing: bool = False, post_buffering: int = 0,
                 post_buffering_dir: Optional[str] = None, post_buffering_max: int = 0,
                 post_buffering_min_rate: int = 0, access_log=None,
                 strip_vars: Optional[VarStripper] = None, http_errors: bool = False,
                 tls=None, retry_after_connect: bool = False) -> None:
        self.reactor = reactor
        self.router = router
        self.listeners = list(listeners)
        self.timeout = timeout if timeout > 0 else 60
        self.chunk = max(int(chunk), 512)
        self.events = max(int(events), 1)
        self.sessions: Set[Session] = set()
        body = None
        if post_buffering:
            body = BodyBuffering(post_buffering, post_buffering_dir, post_buffering_max,
                                 post_buffering_min_rate, self.timeout)
        # What every session gets of this process (context.py).  The request scan is
        # protocol.scan_request, or balancing.make_scanner's when mountpoints or a hash
        # var need more of the vars; the counters are metrics.py's (detailed with
        # --fastrouter-metrics); with --fastrouter-access-log every session is handed
        # to access_log as it closes.  Both read the session's request record
        # (record.py).
        self.context = SessionContext(
            reactor, router, chunk=self.chunk, timeout=self.timeout, scan_request=scan_request,
            counters=Counters(), handoffs=Handoffs(fd_passing, trust_fd_passing), body=body,
            force_key=force_key, access_log=access_log, cheap_enabled=cheap, tls=tls,
            resend=retry_after_connect,
            closed=self.sessions.discard, log=self.log_session, strip_vars=strip_vars,
            http_errors=http_errors)
        self.accepting = False
        self.stopping = False
        self.cheap_enabled = cheap
        self.cheap = False            # listeners unpolled until a node subscribes
        self.periodic: List[Callable[[float], None]] = []   # run by the 1 s sweep
        self.acceptors = [Acceptor(reactor, listener.sock, self._session_starter(listener.sock),
                                   name=listener.name, batch=self.events)
                          for listener in self.listeners]
        self._sweep_timer = None
        self._on_idle: Optional[Callable[[], None]] = None
        # Per-session problems (bad requests, time-outs, vanished peers) are logged,
        # but at most 50 lines a second.
        self.session_log = RateLimitedLog(lambda: reactor.now, burst=50, what="session log lines")

    # ------------------------------------------------- what sessions share

    @property
    def counters(self) -> Counters:
        return self.context.counters

    @counters.setter
    def counters(self, counters: Counters) -> None:
        self.context.counters = counters

    @property
    def scan_request(self) -> Callable:
        return self.context.scan_request

    @scan_request.setter
    def scan_request(self, scan: Callable) -> None:
        self.context.set_scan(scan)

    @property
    def access_log(self) -> Optional[Callable]:
        return self.context.access_log

    @property
    def fd_handoffs(self) -> int:
        """Clients a node took over."""
        return self.context.handoffs.count

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self.cheap_enabled:
            self.cheap = True
            log("starting uWSGI fastrouter in cheap mode")
        else:
            self.resume_accepting()
        self._sweep_timer = self.reactor.call_later(1.0, self._sweep)

    def go_cheap(self) -> None:
        """No node left: stop polling the listeners (clients wait in the backlog).

        Sessions in progress are not touched."""
        if not self.cheap_enabled or self.cheap or self.stopping:
            return
        self.cheap = True
        self.pause_accepting()
        log("[uWSGI fastrouter pid %d] no more nodes available. Going cheap..." % os.getpid())

    def leave_cheap(self) -> None:
        """A node subscribed: poll the listeners again."""
        if not self.cheap:
            return
        self.cheap = False
        self.resume_accepting()
        log("[uWSGI fastrouter pid %d] leaving cheap mode..." % os.getpid())

    def resume_accepting(self) -> None:
        if self.accepting or self.stopping or self.cheap:
            return
        for acceptor in self.acceptors:
            acceptor.start()
        self.accepting = True

    def pause_accepting(self) -> None:
        if not self.accepting:
            return
        for acceptor in self.acceptors:
            acceptor.stop()
        self.accepting = False

    def stop(self) -> None:
        """Stop accepting and drop every session (shutdown)."""
        self.pause_accepting()
        self.stopping = True
        for session in list(self.sessions):
            session.close()
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None

    # --------------------------------------------------------------- accept

    def _session_starter(self, lsock) -> Callable[[int, Any], None]:
        """The acceptor's callback for *lsock*: one session per accepted descriptor."""
        family, type_, proto = lsock.family, lsock.type, lsock.proto
        new_socket = _socket.socket
        sessions = self.sessions
        context = self.context

        def start_session(fd: int, addr: Any) -> None:
            session = Session(context, new_socket(family, type_, proto, fd), addr, fd)
            sessions.add(session)
            session.start()

        return start_session

    # ------------------------------------------------------------- sessions

    @property
    def on_idle(self) -> Optional[Callable[[], None]]:
        """Called when the last live session closes (a graceful stop waits for it)."""
        return self._on_idle

    @on_idle.setter
    def on_idle(self, callback: Optional[Callable[[], None]]) -> None:
        # Without it a closing session only leaves the set: the context's hook is the
        # set's own discard, no Python frame on every request.
        self._on_idle = callback
        self.context.closed = self.sessions.discard if callback is None else self.session_closed

    def session_closed(self, session: Session) -> None:
        self.sessions.discard(session)
        if self._on_idle is not None and not self.sessions:
            self._on_idle()

    def log_session(self, session: Session, reason: str) -> None:
        info = session.info
        addr = session.caddr
        client_ip = client_port = ""
        if isinstance(addr, tuple) and len(addr) >= 2:
            client_ip, client_port = str(addr[0]), str(addr[1])
        elif addr:
            client_ip = printable(addr)
        if info is not None:
            if info.remote_addr:
                client_ip = printable(info.remote_addr)
            if info.remote_port:
                client_port = printable(info.remote_port)
        key = printable(session.key)
        node = ""
        if session.route is not None:
            node = " node: %s" % printable(session.route.address)
        self.session_log("[uwsgi-fastrouter key: %s client_addr: %s client_port: %s%s] %s"
                         % (key, client_ip, client_port, node, reason))

    def _sweep(self) -> None:
        now = self.reactor.now
        limit = now - self.timeout
        expired: List[Session] = [s for s in self.sessions if s.last <= limit]
        for session in expired:
            session.timed_out()
        for task in self.periodic:
            task(now)
        self._sweep_timer = self.reactor.call_later(1.0, self._sweep)

    @property
    def active_sessions(self) -> int:
        return len(self.sessions)


__all__ = ["Server"]
