"""What a session may use of its router process: one :class:`SessionContext` per server.

Theory of operation
-------------------
A :class:`~uwsgi_fastrouter.session.Session` never sees the server that accepted it.
The server builds one context when it is made and hands it to every session: the loop,
the routing policy, the process-wide scratch buffer, the relay chunk size, the
counters, the descriptor-passing, post-buffering, var-stripping and TLS-to-nodes
policies, whether failures are answered in HTTP, and the hooks through which a session
reports (closed, a log line, the access log).

The context is a slotted record, so a session reads what it needs as cheaply as an
attribute of its own; fields that the process wiring replaces after the server is
built (the counters, the request scan) are forwarded by the server's properties.

The scratch buffer rule: every read of a session goes into ``scratch`` and lives
there only until the callback that made it returns, as the next callback of any
session overwrites it.  Whatever must outlive the callback is copied out first
(the pumps' pending buffers).  The first read of a request is the exception: it
is a bytes object of its own (``Session.start``), since a head that waits for its
node must outlive the callback anyway.

``fast_path`` says whether a session may carry the usual request to its node from
``Session.start``, in one frame: true when the request scan is the default one and
no var stripping, retry-after-connect or TLS policy is set.  It is worked out again
whenever the scan is replaced (:meth:`SessionContext.set_scan`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from .bodybuffer import BodyBuffering
from .handoff import Handoffs
from .protocol import scan_request as default_scan
from .stripvars import VarStripper

# The first read of a response: enough for a whole small response (one recv), and all
# that a client that never reads can leave in the router's memory (session.py).
FIRST_READ = 16 * 1024


class SessionContext:
    __slots__ = ("reactor", "router", "scratch", "scratch_view", "chunk", "timeout", "force_key",
                 "scan_request", "counters", "handoffs", "body", "access_log", "cheap_enabled",
                 "closed", "log", "strip_vars", "http_errors", "tls", "resend", "fast_path",
                 "first_read", "answer_read")

    def __init__(self, reactor, router, *, chunk: int, timeout: float, scan_request: Callable,
                 counters: Any, handoffs: Handoffs, body: Optional[BodyBuffering] = None,
                 force_key: Optional[bytes] = None, access_log: Optional[Callable] = None,
                 cheap_enabled: bool = False, strip_vars: Optional[VarStripper] = None,
                 http_errors: bool = False, tls=None, resend: bool = False,
                 closed: Callable[[Any], None] = lambda session: None,
                 log: Callable[[Any, str], None] = lambda session, line: None) -> None:
        self.reactor = reactor
        self.router = router
        self.chunk = chunk
        # One buffer for every read of the process: room for a whole chunk, and for the
        # largest head (header + 65535 bytes of vars).
        self.scratch = bytearray(max(chunk, 65536 + 4))
        self.scratch_view = memoryview(self.scratch)
        # A request's first read is a bytes object of its own: room for the largest
        # head, no more (an allocation that large would be a mapping of its own, made
        # and unmade by system calls on every request).
        self.first_read = min(chunk, 65536 + 4)
        # A response's first read (Session._on_answer): see FIRST_READ.
        self.answer_read = min(chunk, FIRST_READ)
        self.timeout = timeout
        self.force_key = force_key
        self.scan_request = scan_request
        self.counters = counters
        self.handoffs = handoffs
        self.body = body                  # post-buffering policy; None when off
        self.access_log = access_log      # called with each closing session; None when off
        self.cheap_enabled = cheap_enabled
        self.resend = resend              # --fastrouter-retry-after-connect
        self.closed = closed              # a session is over (after its sockets closed)
        self.log = log                    # a rate-limited line about one session
        self.strip_vars = strip_vars      # vars removed before a head goes out; None when off
        self.http_errors = http_errors    # answer 502/503/504 instead of a bare close
        self.tls = tls                    # which nodes speak TLS (tlsnode.NodeTls); None: none
        self.set_scan(scan_request)

    def set_scan(self, scan_request: Callable) -> None:
        """Use *scan_request* to read the vars of every request from now on."""
        self.scan_request = scan_request
        self.fast_path = (scan_request is default_scan and self.strip_vars is None
                          and not self.resend and self.tls is None)
