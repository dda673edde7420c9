"""The stats and metrics endpoints: ``--fastrouter-stats`` and ``--fastrouter-metrics``.

Both accept on the shared accept path (:mod:`uwsgi_fastrouter.acceptor`) and serve
one answer per connection, with non-blocking writes resumed on writability, every
wait bounded by the socket time-out.

The stats server sends the document of :mod:`uwsgi_fastrouter.stats` (after reading
the HTTP request first with ``--stats-http``), rendered a slice at a time within
the pass's budget (see that module's theory of operation).

The metrics server reads one HTTP/1.x request head (at most :data:`MAX_REQUEST`
bytes), answers ``GET /metrics`` with the text exposition of
:mod:`uwsgi_fastrouter.metrics` (format version 0.0.4) and anything else with 404
(405 for a method other than GET/HEAD, 400 for a request that is not HTTP), then
closes.
"""

from __future__ import annotations

import socket
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

from . import UWSGI_COMPAT_VERSION
from .acceptor import ConnectionServer
from .log import RateLimitedLog, log
from .reactor import Reactor
from .stats import CHUNK, HTTP_HEADER, render, render_pieces, slice_deadline

#: the largest request head a metrics client may send
MAX_REQUEST = 8192


# ``--socket-timeout 0`` turns TCP_DEFER_ACCEPT off on the listeners; it must not let one
# stats or metrics client hold an endpoint for ever, so these servers keep a bound then.
ZERO_TIMEOUT_BOUND = 4.0

class StatsServer(ConnectionServer):
    """Serves the stats document to every client of *listener*.

    *document* returns the document; or *gather*, for a document that takes a while to
    collect (the master's, from its router processes), is called with a ``deliver``
    function to call once with the document, now or later.

    *render_elsewhere*, when given, is offered each client whose document is ready:
    ``render_elsewhere(sock, pieces, timeout, error_payload)`` returns True when it took
    the client (another process writes the answer; see statsfork.py), False when the
    answer is to be written here, in slices.
    """

    def __init__(self, reactor: Reactor, listener, document: Optional[Callable[[], Dict[str, Any]]] = None,
                 *, gather: Optional[Callable[[Callable[[Dict[str, Any]], None]], None]] = None,
                 minified: bool = False, http: bool = False,
                 timeout: float = ZERO_TIMEOUT_BOUND, render_elsewhere: Optional[Callable[..., bool]] = None
                 ) -> None:
        if (document is None) == (gather is None):
            raise TypeError("StatsServer needs document or gather")
        super().__init__(reactor, listener, "stats server")
        self.document = document
        self.gather = gather if gather is not None else self._gather_now
        self.minified = minified
        self.http = http
        self.timeout = timeout if timeout > 0 else ZERO_TIMEOUT_BOUND
        self.render_elsewhere = render_elsewhere
        self._pass = None           # the loop pass (its loop time) the budget below is for
        self._pass_deadline = 0.0

    def new_client(self, sock: socket.socket) -> "_StatsClient":
        client = _StatsClient(self, sock)
        client.start()
        return client

    def _gather_now(self, deliver: Callable[[Dict[str, Any]], None]) -> None:
        deliver(self.document())

    def pieces(self, document: Dict[str, Any]) -> Iterator[bytes]:
        """What one client is sent, in pieces: the HTTP header if asked for, the document."""
        if self.http:
            yield HTTP_HEADER
        for piece in render_pieces(document, self.minified):
            yield piece.encode("utf-8")

    def error_payload(self, exc: BaseException) -> bytes:
        log("[uwsgi-fastrouter] unable to build the stats document: %r" % (exc,))
        body = render({"version": UWSGI_COMPAT_VERSION, "error": str(exc)}, self.minified)
        return (HTTP_HEADER + body) if self.http else body

    def slice_deadline(self) -> float:
        """When this pass's stats work must stop: one budget per pass for every client,
        none in a pass that also has other work (then each client renders one piece)."""
        reactor = self.reactor
        if self._pass != reactor.now:
            self._pass = reactor.now
            self._pass_deadline = slice_deadline(reactor, len(self.clients))
        return self._pass_deadline


class _EndpointClient:
    """What both endpoints' connections share: sending what the socket takes now, and
    closing (idempotent; the server forgets the client)."""

    __slots__ = ()

    def send_now(self, data) -> int:
        """Bytes of *data* the socket took (0: try again later); -1 when the client is
        gone (then closed)."""
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError:
            self.close()
            return -1

    def close(self) -> None:
        if self.sock is None:
            return
        self.timer.cancel()
        self.server.drop(self)
        self.sock = None


class _StatsClient(_EndpointClient):
    """One stats connection: (the HTTP request,) the document, in slices, then close.

    *timeout* bounds every wait: for the request, for the document, for the socket to
    take more; each write that makes progress starts it again.
    """

    __slots__ = ("server", "sock", "fd", "pieces", "pending", "offset", "sent_any", "timer", "deadline")

    def __init__(self, server: StatsServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.pieces: Optional[Iterator[bytes]] = None
        self.pending = b""          # rendered, not yet sent from *offset* on
        self.offset = 0
        self.sent_any = False
        self.deadline = server.reactor.now + server.timeout
        self.timer = server.reactor.call_at(self.deadline, self._expire)

    def start(self) -> None:
        if self.server.http:
            self.server.reactor.add_reader(self.fd, self._read_request)
        else:
            self._request_document()

    def _read_request(self) -> None:
        try:
            chunk = self.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        self.server.reactor.remove_reader(self.fd)
        if not chunk:
            self.close()
            return
        self._request_document()

    def _request_document(self) -> None:
        try:
            self.server.gather(self._deliver)
        except Exception as exc:  # never let a stats bug hurt routing
            self._deliver_error(exc)

    def _deliver(self, document: Dict[str, Any]) -> None:
        if self.sock is None:       # timed out meanwhile
            return
        server = self.server
        elsewhere = server.render_elsewhere
        if elsewhere is not None and elsewhere(self.sock, server.pieces(document), server.timeout,
                                               server.error_payload):
            self.close()            # the other process has its own copy of the socket
            return
        self.pieces = server.pieces(document)
        self._write()

    def _deliver_error(self, exc: BaseException) -> None:
        if self.sock is None:
            return
        self.pieces = None
        self.pending, self.offset = self.server.error_payload(exc), 0
        self._write()

    def _fill(self) -> None:
        """Render the next slice: up to CHUNK bytes, within this pass's budget."""
        deadline = self.server.slice_deadline()
        clock = time.monotonic
        pieces = self.pieces
        taken: List[bytes] = []
        size = 0
        while True:
            try:
                piece = next(pieces)
            except StopIteration:
                self.pieces = None
                break
            taken.append(piece)
            size += len(piece)
            if size >= CHUNK or clock() >= deadline:
                break
        self.pending, self.offset = b"".join(taken), 0

    def _write(self) -> None:
        if self.offset >= len(self.pending):
            if self.pieces is None:
                self.close()
                return
            try:
                self._fill()
            except Exception as exc:  # a stats bug: an error document if nothing went out yet
                if self.sent_any:
                    log("[uwsgi-fastrouter] stats document cut short: %r" % (exc,))
                    self.close()
                    return
                self._deliver_error(exc)
                return
        if self.pending:
            sent = self.send_now(memoryview(self.pending)[self.offset:])
            if sent < 0:
                return
            if sent:
                self.offset += sent
                self.sent_any = True
                self.deadline = self.server.reactor.now + self.server.timeout
        if self.offset >= len(self.pending) and self.pieces is None:
            self.close()
            return
        # More to send or to render: on the next writability event, which is the next
        # pass of the loop unless the client is slow (re-adding a writer just keeps it).
        self.server.reactor.add_writer(self.fd, self._write)

    def _expire(self) -> None:
        if self.sock is None:
            return
        if self.server.reactor.now >= self.deadline:
            self.close()
        else:
            self.timer = self.server.reactor.call_at(self.deadline, self._expire)
        self.pieces = None
        self.pending = b""


_TEXT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def http_response(status: str, body: bytes, content_type: bytes = b"text/plain; charset=utf-8",
                  head_only: bool = False) -> bytes:
    head = (b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (status.encode("ascii"), content_type, len(body)))
    return head if head_only else head + body


class MetricsServer(ConnectionServer):
    """Serves ``GET /metrics`` on *listener*.  *gather* is called with a ``deliver``
    function to call once with the exposition text, now or later."""

    def __init__(self, reactor: Reactor, listener, gather: Callable[[Callable[[bytes], None]], None],
                 *, timeout: float = ZERO_TIMEOUT_BOUND) -> None:
        super().__init__(reactor, listener, "metrics server")
        self.gather = gather
        self.timeout = timeout if timeout > 0 else ZERO_TIMEOUT_BOUND
        self.log = RateLimitedLog(lambda: reactor.now, burst=5, what="metrics log lines")

    def new_client(self, sock: socket.socket) -> "_MetricsClient":
        client = _MetricsClient(self, sock)
        self.reactor.add_reader(client.fd, client.read)
        return client


class _MetricsClient(_EndpointClient):
    """One connection: the request head, the answer, close."""

    __slots__ = ("server", "sock", "fd", "request", "out", "timer", "head_only")

    def __init__(self, server: MetricsServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.request = bytearray()
        self.out = memoryview(b"")
        self.head_only = False
        self.timer = server.reactor.call_later(server.timeout, self.close)

    def read(self) -> None:
        try:
            chunk = self.sock.recv(MAX_REQUEST + 1 - len(self.request))
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        if not chunk:
            self.close()
            return
        self.request += chunk
        end = self.request.find(b"\r\n\r\n")
        if end < 0:
            end = self.request.find(b"\n\n")
        if end < 0:
            if len(self.request) > MAX_REQUEST:
                self.server.reactor.remove_reader(self.fd)
                self.answer(http_response("431 Request Header Fields Too Large", b"request too large\n"))
            return
        self.server.reactor.remove_reader(self.fd)
        self.route(bytes(self.request[:end]))

    def route(self, head: bytes) -> None:
        parts = head.split(b"\n", 1)[0].strip().split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self.answer(http_response("400 Bad Request", b"bad request\n"))
            return
        method, target = parts[0], parts[1]
        if target.split(b"?", 1)[0] != b"/metrics":
            self.answer(http_response("404 Not Found", b"not found: try /metrics\n"))
            return
        if method not in (b"GET", b"HEAD"):
            self.answer(http_response("405 Method Not Allowed", b"GET /metrics\n"))
            return
        self.head_only = method == b"HEAD"
        try:
            self.server.gather(self.deliver)
        except Exception as exc:  # never let a metrics bug hurt routing
            self.server.log("[uwsgi-fastrouter] unable to collect the metrics: %r" % (exc,))
            self.answer(http_response("500 Internal Server Error", b"metrics unavailable\n"))

    def deliver(self, text: bytes) -> None:
        self.answer(http_response("200 OK", text, _TEXT_TYPE, self.head_only))

    def answer(self, data: bytes) -> None:
        if self.sock is None:
            return
        self.out = memoryview(data)
        self.write()

    def write(self) -> None:
        if self.sock is None:
            return
        sent = self.send_now(self.out)
        if sent < 0:
            return
        self.out = self.out[sent:]
        if not self.out:
            self.close()
            return
        self.server.reactor.add_writer(self.fd, self.write)
