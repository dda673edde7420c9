"""One client connection and the backend connection it is relayed to.

Theory of operation
-------------------
A session carries exactly one uwsgi request.  Its states, named after what it waits for:

``RECV_HEAD``
    Waiting for the 4-byte header and ``datasize`` bytes of vars.  The first read
    takes up to one relay chunk or the largest head, whichever is smaller, as a bytes
    object that becomes the head sent to the node, so a request that arrived whole
    (the usual case: nginx writes header, vars and a small body in one go) costs one
    ``recv`` and no copy; the usual bodyless request goes on to its node in the same
    frame (:meth:`Session.start`).  Bytes past the vars are body and are forwarded with
    the head.  A head that arrives in pieces is collected by the protocol's
    :class:`~uwsgi_fastrouter.protocol.HeadReader`, which reads exactly what completes
    it, so nothing past the vars is read in that case.
``RECV_BODY``
    Only with ``--fastrouter-post-buffering``: the body is read whole before any node
    is contacted (bodybuffer.py).
``CONNECTING``
    The mapper gave a node; a non-blocking connect is in progress and the head
    (modifier bytes already rewritten) waits in ``up_buf``.  Right after ``connect()``
    the head is sent optimistically: on loopback and UNIX sockets the connection is
    usually established by then, which saves a poll round trip.  A failed connect,
    immediate or not, is reported with :meth:`Router.connect_failed` and the router
    says what comes next (:meth:`Router.next_route`: retry, fallback or give up).  A
    UNIX node whose listen queue is full is busy, not dead: it is tried again when
    :meth:`Router.busy_backoff` says, and counts as a failed connect once
    ``--fastrouter-timeout`` has passed since the first attempt.  Whether the client's
    descriptor goes with the head is the business of
    :class:`~uwsgi_fastrouter.handoff.Handoffs` (decisions.md D2).
``RELAY``
    Bytes flow both ways.  Each direction has at most one pending buffer; while a
    buffer for peer X is pending the peer that produced it is not read
    (backpressure).  A client EOF is relayed as ``shutdown(SHUT_WR)`` to the backend
    and the response is still delivered (decisions.md D4).  The session ends when the
    backend has closed and everything it sent reached the client.

    A client that stops reading costs the router at most ``context.FIRST_READ`` (16
    KiB) of its own memory: only the first read of a response takes bytes out of the
    node's socket before the client took them.  Every later read peeks (``MSG_PEEK``, full
    relay chunks), sends, and then removes from the node's socket exactly what the
    client took (``MSG_TRUNC``: no copy on TCP); what the client did not take stays in
    the kernel, and is peeked again once the client is writable.

    A TLS node (tlsnode.py) is reached through a :class:`~uwsgi_fastrouter.tlsnode.TlsLink`
    in ``bsock`` (and ``tls``): ``CONNECTING`` then also covers the handshake
    (:meth:`_finish_tls`), the head waits for it, no descriptor is ever passed, and
    the relay is unchanged: the link emulates the peek with real reads of at most
    64 KiB, so a client that stops reading costs about 80 KiB there.
``CLOSED``
    Both sockets closed and unregistered; :meth:`close` is idempotent.  A request
    for which no node could be found ends in :meth:`_no_route`: closed as uWSGI
    closes it, with a rate-limited "no route" line saying why (decisions.md D19).
    :meth:`close` sets the request's outcome and end time: the session is its own
    request record (record.py), read by the metrics and, when it is on, the access log.
    With ``--fastrouter-http-errors`` a client that got no response byte yet is sent
    a short 502, 503 or 504 first (:meth:`_answer_error`, httperrors.py); a policy that
    turns a request away calls :meth:`refuse`.

With ``--fastrouter-strip-vars`` or ``--fastrouter-strip-magic-vars`` the head is
rewritten without the named vars once the node is chosen (:meth:`_strip_vars`,
stripvars.py); with neither, the head is not looked at again.

Selector interest is derived from the state and the pending buffers in
``_update_interest`` and the reactor is only called when it changes.  Time-outs are
enforced by the server's once-a-second sweep over ``last`` (the loop time of the last
event), so per-event work stays at one attribute store.

The client socket stays in blocking mode and every call on it passes
``MSG_DONTWAIT``: that saves the ``fcntl`` that making an accepted socket non-blocking
would cost on every request.

A session sees its router process only through the
:class:`~uwsgi_fastrouter.context.SessionContext` the server made (the loop, the
router, the scratch buffer, the counters, the policies and the hooks); it never
imports the server.
"""

from __future__ import annotations

import _socket
import errno
import os
import re
import socket
from typing import TYPE_CHECKING, Optional

from .protocol import HeadReader, ProtocolError, request_info, scan_route
from .reactor import HANGUP, READ, WRITE
from .fdpass import send_fd
from .httperrors import BAD_GATEWAY, GATEWAY_TIMEOUT, SERVICE_UNAVAILABLE, response
from .record import (ABORTED, CLIENT_ERROR, FAILED, HANDOFF, NODE_ERROR, NO_ROUTE, OK,
                     TIMEOUT)
from .log import printable
from .sockets import AddressError, node_sockaddr
from .tlsnode import failure_reason as tls_failure

if TYPE_CHECKING:  # pragma: no cover
    from .context import SessionContext
    from .router import Route

MSG_DONTWAIT = socket.MSG_DONTWAIT
_write = os.write
_read = os.read
_Match = re.Match
# The largest head that start() carries on the usual path: its RequestInfo waits until
# something asks for it (Session.info), so the match keeps the head for the session's
# life.  A larger head goes the general way, whose info keeps only a few fields.
_LAZY_INFO_HEAD = 4096
# The C socket type: per-request sockets skip the Python-level wrapper of
# socket.socket (its __init__ and close() bookkeeping serve makefile(), unused here).
_new_socket = _socket.socket
_SOCK_FLAGS = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0) | getattr(socket, "SOCK_CLOEXEC", 0)
_IN_PROGRESS = (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK)
_AF_UNIX = socket.AF_UNIX

# States (ints for speed; names for humans via STATE_NAMES).
RECV_HEAD = 0
CONNECTING = 1
RELAY = 2
CLOSED = 3
RECV_BODY = 4
WAIT_NODE = 5
STATE_NAMES = {RECV_HEAD: "RECV_HEAD", CONNECTING: "CONNECTING", RELAY: "RELAY", CLOSED: "CLOSED",
               RECV_BODY: "RECV_BODY", WAIT_NODE: "WAIT_NODE"}

# Every state change a session may make.  The state is a plain slot (no setter on the
# hot path); tests/test_engine.py walks real sessions through every state with a
# recording subclass and checks each change it sees against this table.
TRANSITIONS = {
    RECV_HEAD: (RECV_BODY, CONNECTING, WAIT_NODE, CLOSED),
    WAIT_NODE: (RECV_BODY, CONNECTING, CLOSED),
    RECV_BODY: (CONNECTING, CLOSED),
    CONNECTING: (CONNECTING, RELAY, CLOSED),
    RELAY: (CONNECTING, CLOSED),
    CLOSED: (),
}

# How many reads one readiness event may do on a streaming side before yielding.
_READS_PER_EVENT = 8

_MSG_PEEK = socket.MSG_PEEK
_MSG_TRUNC = getattr(socket, "MSG_TRUNC", 0)   # without it the consumed bytes are copied
# down_buf while the response bytes the client could not take yet wait in the node's
# socket (they were only peeked): the client is polled for writing, the node not read.
_IN_NODE_SOCKET = memoryview(b"")


def _with_modifiers(head, route: "Route"):
    """*head* (a bytes-like uwsgi head) with the modifiers of *route*: *head* itself when
    they are already its own, else a copy."""
    if head[0] == route.modifier1 and head[3] == route.modifier2:
        return head
    head = bytearray(head)
    head[0] = route.modifier1
    head[3] = route.modifier2
    return bytes(head)


class Session:
    __slots__ = (
        "ctx", "csock", "cfd", "caddr", "bsock", "bfd", "state", "last",
        "reader", "key", "route", "retries", "fallback_index",
        "up_buf", "down_buf", "client_eof", "backend_eof", "c_events", "b_events",
        "_info", "watch_client", "timer", "fd_passed", "body", "down_peek", "failed_address",
        "tls", "head",
        # the request record (record.py)
        "started", "first_byte", "ended", "rx", "tx", "outcome", "first",
    )

    def __init__(self, ctx: "SessionContext", csock: socket.socket, caddr, cfd: int = -1) -> None:
        self.ctx = ctx
        self.csock = csock
        self.cfd = cfd if cfd >= 0 else csock.fileno()   # the acceptor knows it
        self.caddr = caddr
        self.bsock: Optional[socket.socket] = None
        self.bfd = -1
        self.state = RECV_HEAD
        self.last = ctx.reactor.now
        self.reader: Optional[HeadReader] = None   # a head that arrives in pieces
        self.key = b""
        self.route: Optional[Route] = None
        self.retries = 0
        self.fallback_index = 0
        self.up_buf = None        # bytes pending towards the backend
        self.down_buf = None      # bytes pending towards the client
        self.client_eof = False
        self.backend_eof = False
        self.c_events = 0         # registered interest, client
        self.b_events = 0         # registered interest, backend
        self._info = None         # RequestInfo, or scan_route's match (see the info property)
        self.watch_client = True  # read the client during RELAY (see _routed)
        self.timer = None         # pending connect re-try (UNIX listen queue full)
        self.fd_passed = False    # the client's descriptor went to the node with the head
        self.body = None          # post-buffering: a BufferedBody (bodybuffer.py)
        self.down_peek = False    # the first response bytes were read: peek from now on
        self.failed_address = None  # the node address of the last failed connect
        # The request record (record.py); "ended" and "first" are set when known.
        self.started = self.last  # loop times: accept, first response byte (0: none yet)
        self.first_byte = 0.0
        self.rx = 0               # bytes read from the client
        self.tx = 0               # bytes sent to the client
        self.outcome = None       # a record code; set early when no node could be found
        self.tls = None           # a TlsLink (tlsnode.py) while connected to a TLS node
        self.head = None          # --fastrouter-retry-after-connect: a bodyless request's head

    # ------------------------------------------------------------------ head

    def start(self) -> None:
        """Called right after accept: the first read, as a bytes object of its own (what
        a head waiting for its node must be copied to anyway), of up to one chunk or the
        largest head, whichever is smaller (SessionContext.first_read).  For a head not
        there yet, or there in part, the client is watched; a request that arrived
        whole goes on from here in the same call.

        The usual request is carried to its node in this frame: a head that came whole
        with nothing after it, on a router with the default scan and no var stripping,
        retry-after-connect or TLS policy (SessionContext.fast_path).  Its vars are
        walked by :func:`~uwsgi_fastrouter.protocol.scan_route` (no RequestInfo is
        built: :attr:`info` makes it if asked), and a bodyless request with a key and a
        node goes straight to :meth:`_connect`.  Anything else continues on the general
        path from where it differs: the Python walk (long values, bad vars), a body,
        no key, no node."""
        ctx = self.ctx
        try:
            head = self.csock.recv(ctx.first_read, MSG_DONTWAIT)
        except BlockingIOError:
            self._watch_head()
            return
        except OSError as exc:
            self.close("error reading the request: %s" % (exc.strerror or exc))
            return
        n = len(head)
        if n == 0:
            self.close()
            return
        self.rx = n
        total = 4 + (head[1] | (head[2] << 8)) if n >= 4 else 5
        if n < total:
            # Only part of the head: all of it is head.
            self.reader = reader = HeadReader()
            reader.feed(head)
            self._watch_head()
            return
        if n > total or n > _LAZY_INFO_HEAD or not ctx.fast_path:
            self._head_complete(memoryview(head), total, n)
            return
        scanned = scan_route(head, ctx.force_key)
        if scanned is None:
            self._head_complete(memoryview(head), n, n)
            return
        key, clen, chunked, self._info = scanned
        if clen or chunked or not key:
            self._route_key(key, clen, chunked, memoryview(head), n, n)
            return
        self.key = key
        route = ctx.router.route(key, self)
        if route is None:
            self._unrouted(key, clen, chunked, memoryview(head), n, n)
            return
        self.watch_client = False     # bodyless: see _routed
        if head[0] != route.modifier1 or head[3] != route.modifier2:
            head = _with_modifiers(head, route)   # checked here first: no call when they match
        self.up_buf = head
        self._connect(route)

    @property
    def info(self):
        """The request's :class:`~uwsgi_fastrouter.protocol.RequestInfo` (None before its
        vars were read); on the fast path it is made only when something asks for it
        (a log line, the access log, a balancing rule)."""
        info = self._info
        if type(info) is _Match:
            info = self._info = request_info(info, self.key or None)
        return info

    def _watch_head(self) -> None:
        """Wait for (the rest of) the head: the client is read when it is readable."""
        if not self.c_events:
            self.c_events = READ
            self.ctx.reactor.register(self.cfd, READ, self._on_client)

    def _read_more(self) -> None:
        """The rest of a head that arrived in pieces: exactly what completes it (first
        of the header, then of the vars), so body bytes stay in the kernel."""
        reader = self.reader
        if reader is None:
            self.start()      # nothing had come at accept
            return
        csock = self.csock
        try:
            while True:
                n = csock.recv_into(reader.space(), reader.needed, MSG_DONTWAIT)
                if n == 0:
                    self.close("connection closed in the middle of the request %s"
                               % ("vars" if reader.header_complete else "header"))
                    return
                self.rx += n
                if reader.advance(n):
                    break
        except BlockingIOError:
            return
        except OSError as exc:
            self.close("error reading the request: %s" % (exc.strerror or exc))
            return
        self.reader = None
        head = reader.head
        self._head_complete(memoryview(head), len(head), len(head))

    def _head_complete(self, buf: memoryview, total: int, have: int) -> None:
        """*buf[:total]* is header + vars; *buf[total:have]* is early body."""
        ctx = self.ctx
        try:
            info = ctx.scan_request(bytes(buf[4:total]), ctx.force_key)
        except ProtocolError as exc:
            self.close("malformed request vars: %s" % exc)
            return
        self._info = info
        self._route_key(info.key, info.content_length, info.chunked, buf, total, have)

    def _route_key(self, key: Optional[bytes], clen: Optional[int], chunked: bool,
                   buf: memoryview, total: int, have: int) -> None:
        """The vars are read: *key*, the CONTENT_LENGTH value *clen* and *chunked* (see
        protocol.scan_request).  Find the node and go on."""
        ctx = self.ctx
        if self.c_events:
            # The client is watched again once the backend is connected.
            ctx.reactor.unregister(self.cfd)
            self.c_events = 0
        if not key:
            # No usable key: closed as uWSGI does, with a line (D19).
            self._no_route(NO_ROUTE, "the request carries no key (UWSGI_FASTROUTER_KEY, "
                                     "HTTP_HOST or SERVER_NAME)")
            return
        self.key = key
        route = ctx.router.route(key, self)
        if route is None:
            self._unrouted(key, clen, chunked, buf, total, have)
            return
        self._routed(route, clen, chunked, buf, total, have)

    def _unrouted(self, key: bytes, clen: Optional[int], chunked: bool,
                  buf: memoryview, total: int, have: int) -> None:
        """The mapper has no node for *key*: wait for a capped node's slot, try the
        router's last resorts (fallbacks, cheap mode's rules), or give up."""
        ctx = self.ctx
        router = ctx.router
        if router.at_cap():
            self._wait_for_slot(buf, have)
            return
        route, self.retries, self.fallback_index = router.route_unknown_key(key)
        if route is None:
            self._no_route(NO_ROUTE, router.no_route_reason(key, ctx.cheap_enabled))
            return
        self._routed(route, clen, chunked, buf, total, have)

    def _routed(self, route: "Route", clen: Optional[int], chunked: bool, buf: memoryview,
                total: int, have: int) -> None:
        """The head in *buf* has a node: send it (or read the body first)."""
        ctx = self.ctx
        # A request without a body (uWSGI's rule, decisions.md D2: CONTENT_LENGTH
        # absent, empty or 0, no Transfer-Encoding; and nothing past the vars) has
        # nothing to relay upstream until the node answers: the client is watched only
        # from the first response bytes on (a websocket's frames follow its 101), which
        # spares two epoll_ctl calls per plain request.
        if not clen and not chunked and have == total:
            self.watch_client = False
        if ctx.strip_vars is not None:
            buf, total, have = self._strip_vars(buf, total, have)
        head = buf if have == len(buf) else buf[:have]
        # The modifiers of the node go into the head before it leaves.
        head = _with_modifiers(head, route)
        self.up_buf = head
        if ctx.resend and not self.watch_client:
            self.head = bytes(head)
        if ctx.body is not None and clen:
            self._start_body(route, clen, total, have)
            return
        self._connect(route)

    def _strip_vars(self, buf: memoryview, total: int, have: int):
        """--fastrouter-strip-vars: the head without the vars the rules name
        (stripvars.py), followed by the early body; unchanged when none matched."""
        head = self.ctx.strip_vars.strip(buf[:total])
        if head is None:
            return buf, total, have
        stripped_total = len(head)
        if have > total:
            head += buf[total:have]
        return memoryview(head), stripped_total, stripped_total + have - total

    # ------------------------------------------------- waiting for a slot

    def _wait_for_slot(self, buf: memoryview, have: int) -> None:
        """Every alive node of the key is at its cap (nodecaps.py): wait for a slot up
        to --fastrouter-node-queue-wait, or close at once without one."""
        ctx = self.ctx
        router = ctx.router
        timeout = router.caps.queue_timeout
        if not timeout:
            ctx.counters.cap_refusals += 1
            self._no_route(NO_ROUTE, "every node is at its connection cap "
                                     "(--fastrouter-node-max-conns)")
            return
        ctx.counters.cap_waits += 1
        self.up_buf = bytearray(buf[:have])      # out of the scratch buffer
        self.state = WAIT_NODE
        router.waiting.add(self)
        reactor = ctx.reactor
        self.last = reactor.now
        self.timer = reactor.call_later(timeout, self._wait_expired, timeout)

    def slot_freed(self) -> bool:
        """A node gave a slot back (nodecaps.Waiting): True when this request took
        one; a key left with no node at all closes the request as "no route"."""
        if self.state != WAIT_NODE:
            return False
        router = self.ctx.router
        route = router.route(self.key, self)
        if route is None:
            if not router.at_cap():
                self._no_route(NO_ROUTE, router.no_route_reason(self.key))
            return False
        router.waiting.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        head = self.up_buf
        self.up_buf = None
        total = 4 + (head[1] | (head[2] << 8))
        self.last = self.ctx.reactor.now
        info = self.info
        self._routed(route, info.content_length, info.chunked, memoryview(head), total, len(head))
        return True

    def _wait_expired(self, timeout: float) -> None:
        self.timer = None
        if self.state == WAIT_NODE:
            self.ctx.counters.cap_refusals += 1
            self._no_route(NO_ROUTE, "every node is at its connection cap: no slot within %g "
                                     "seconds (--fastrouter-node-queue-wait)" % timeout)

    # -------------------------------------------------------- post-buffering

    def _start_body(self, route: "Route", length: int, total: int, have: int) -> None:
        """--fastrouter-post-buffering: read the whole body before any node is contacted
        (the policy and its bounds: bodybuffer.py)."""
        self.route = route
        policy = self.ctx.body
        refusal = policy.refusal(length)
        if refusal is not None:
            self.close(refusal)
            return
        try:
            body = policy.start(self.up_buf, total, have, length)
        except OSError as exc:
            self.close("unable to create a temporary file for the request body: %s"
                       % (exc.strerror or exc))
            return
        self.body = body
        self.up_buf = None
        self.state = RECV_BODY
        reactor = self.ctx.reactor
        self.last = reactor.now
        if body.left:
            self.c_events = READ
            reactor.register(self.cfd, READ, self._on_client)
            allowed = policy.allowed_seconds(length)
            if allowed:
                self.timer = reactor.call_later(allowed, self._body_too_slow, length, allowed)
        else:
            self._body_complete()

    def _body_too_slow(self, length: int, allowed: float) -> None:
        self.timer = None
        if self.state == RECV_BODY:
            self.close(self.ctx.body.too_slow(self.body, length, allowed))

    def _read_body(self) -> None:
        ctx = self.ctx
        body = self.body
        try:
            n = self.csock.recv_into(ctx.scratch, min(ctx.chunk, body.left), MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            self.close("error reading the request body: %s" % (exc.strerror or exc))
            return
        if n == 0:
            self.close("client closed the connection with %d bytes of its body missing" % body.left)
            return
        self.rx += n
        self.last = ctx.reactor.now
        try:
            body.add(ctx.scratch_view[:n])
        except OSError as exc:
            self.close("unable to write the request body to a temporary file: %s"
                       % (exc.strerror or exc))
            return
        if not body.left:
            self._body_complete()

    def _body_complete(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.c_events:
            self.ctx.reactor.unregister(self.cfd)
            self.c_events = 0
        body = self.body
        self.up_buf = body.finish()
        if not body.in_file:
            self.body = None
        self._connect(self.route)

    def _send_file(self) -> bool:
        """Copy the buffered body file to the node; False once the session is closed."""
        body = self.body
        try:
            sent = body.send_to(self.bfd) if self.tls is None else self.tls.send_file(body)
        except BlockingIOError:
            return True
        except OSError as exc:
            self.close("error sending the buffered body to the node: %s" % (exc.strerror or exc))
            return False
        if sent == 0:
            self.close("the buffered body file is shorter than expected")
            return False
        node = self.route.node
        if node is not None:
            node.rx += sent
        if body.all_sent:
            if body.tail is not None:
                self.up_buf = body.tail
            body.close()
            self.body = None
        return True

    # ------------------------------------------------------------- connecting

    def _connect(self, route: "Route", busy: Optional[tuple] = None) -> None:
        """Connect to *route* and send the head; *busy* is the back-off state while the
        node's listen queue stays full (Router.busy_backoff)."""
        self.route = route
        self.state = CONNECTING
        if self.body is not None:
            self.body.sent = 0        # a retry sends the whole body file again
        try:
            family, addr = node_sockaddr(route.address)
        except AddressError as exc:
            self._connect_failed(str(exc))
            return
        tls = self.ctx.tls
        if tls is not None and not tls.wanted(route):
            tls = None
        try:
            # ssl wraps only the Python socket class, not the C type of the plain path
            sock = (socket.socket if tls is not None else _new_socket)(family, _SOCK_FLAGS)
        except OSError as exc:
            self.close("unable to create a socket for node %s: %s"
                       % (printable(route.address), exc.strerror or exc))
            return
        err = sock.connect_ex(addr)
        if err and (err not in _IN_PROGRESS or err == errno.EAGAIN and family == _AF_UNIX):
            sock.close()
            if err == errno.EAGAIN and family == _AF_UNIX:
                self._wait_for_busy_node(route, busy)     # the listen queue is full
            else:
                self._connect_failed(os.strerror(err))
            return
        self.bfd = bfd = sock.fileno()
        if tls is not None:
            # The head waits for the handshake, which starts once the TCP connect is
            # complete (_finish_tls).
            self.bsock = self.tls = tls.link(sock, self.ctx.reactor, self._tls_buffered)
            self.b_events = WRITE
            self.ctx.reactor.register(bfd, WRITE, self._on_backend)
            return
        self.bsock = sock
        head = self.up_buf
        # Optimistic first send: usually the connection is already up.
        try:
            # Handoffs.may_pass(), written out: only bodyless requests are handed over.
            if family == _AF_UNIX and not self.watch_client and self.ctx.handoffs.enabled:
                sent = send_fd(sock, head, self.cfd)
                self.fd_passed = True
                if sent == len(head) and self.ctx.handoffs.unchecked(route.address):
                    self._connected(head, sent, True)
                    return
            else:
                # write(), not send(): the same on a connected socket, without
                # send()'s argument parsing (a plain node, never a TLS link here).
                sent = _write(bfd, head)
        except BlockingIOError:
            self.b_events = WRITE
            self.ctx.reactor.register(bfd, WRITE, self._on_backend)
            return
        except OSError as exc:
            self._drop_backend()
            self._connect_failed(exc.strerror or str(exc))
            return
        self._connected(head, sent)

    def _wait_for_busy_node(self, route: "Route", busy: Optional[tuple]) -> None:
        """The node's listen queue is full: connect again when the router's back-off
        says, or count it as a failed connect (mark, retry, fallback) once
        --fastrouter-timeout has passed since the first attempt."""
        ctx = self.ctx
        reactor = ctx.reactor
        step = ctx.router.busy_backoff(reactor.now, busy, ctx.timeout)
        if step is None:
            self._connect_failed("listen queue full for %d seconds" % ctx.timeout)
            return
        when, busy = step
        self.timer = reactor.call_at(when, self._connect_again, route, busy)

    def _connect_again(self, route: "Route", busy: tuple) -> None:
        self.timer = None
        if self.state == CONNECTING:
            self._connect(route, busy)

    def _finish_connect(self) -> None:
        """The backend socket became writable while CONNECTING."""
        if self.tls is not None:
            self._finish_tls()
            return
        err = self.bsock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._drop_backend()
            self._connect_failed(os.strerror(err))
            return
        try:
            if self.bsock.family == _AF_UNIX and self.ctx.handoffs.may_pass(not self.watch_client):
                sent = send_fd(self.bsock, self.up_buf, self.cfd)
                self.fd_passed = True
            else:
                sent = self.bsock.send(self.up_buf)
        except BlockingIOError:
            return
        except OSError as exc:
            self._drop_backend()
            self._connect_failed(exc.strerror or str(exc))
            return
        self._connected(self.up_buf, sent)

    def _finish_tls(self) -> None:
        """A TLS node: drive the handshake (tlsnode.py), then send the head.  A failed
        handshake or certificate check is a failed connect."""
        link = self.tls
        try:
            wait = link.handshake()
            if not wait:
                try:
                    sent = link.send(self.up_buf)
                except BlockingIOError:
                    sent = 0
        except OSError as exc:
            self._drop_backend()
            self._connect_failed(tls_failure(exc))
            return
        if wait:
            if wait != self.b_events:
                self.ctx.reactor.modify(self.bfd, wait, self._on_backend)
                self.b_events = wait
            return
        self._connected(self.up_buf, sent)

    def _tls_buffered(self) -> None:
        """The TLS node's decrypted bytes wait in the link, where the selector cannot
        see them: relay them as if the node's socket were readable."""
        if self.state == RELAY and self.down_buf is None and not self.backend_eof:
            self._on_backend(READ)

    def _connected(self, data, sent: int, handed_over: bool = False) -> None:
        """The node took the connection and *sent* bytes of the head *data*.  With
        *handed_over* (an unchecked handoff, --fastrouter-trust-fd-passing) the node is
        trusted to take the client, so both our copies are closed at once, with no
        verdict."""
        route = self.route
        owner = route.owner       # Router.connected(), written out (one call a request)
        if owner is not None:
            owner.connected(route)
        node = route.node
        if node is not None:
            node.rx += sent
        if handed_over:
            self.backend_eof = True
            self.outcome = HANDOFF    # what _outcome would say, known here
            self.close()
            return
        self.state = RELAY
        if sent < len(data):
            self.up_buf = bytes(memoryview(data)[sent:])
        else:
            self.up_buf = None
            if not self.watch_client and not self.b_events:
                # A bodyless request whose head is out: only the node's answer is
                # awaited (what _update_interest computes here, without computing it:
                # the client is not watched, nothing is pending either way).
                self.b_events = READ
                self.ctx.reactor.register(self.bfd, READ, self._on_answer)
                return
        self._update_interest()

    def _connect_failed(self, reason: str, log_it: bool = True) -> None:
        """Report the failed attempt and go on as the router says (retry, fallback, or
        give up)."""
        ctx = self.ctx
        router = ctx.router
        route = self.route
        self.route = None            # released by connect_failed
        ctx.handoffs.unreachable(route.address)
        # Retries that go to the same address (a use-base or use-pattern node whose
        # socket is missing) log the failure once per request.
        repeated = route.address == self.failed_address
        self.failed_address = route.address
        router.connect_failed(route, self.key, self.retries, reason, log_it=log_it and not repeated)
        ctx.counters.node_failed(route.address)
        route, self.retries, self.fallback_index = router.next_route(
            self.key, route, self.retries, self.fallback_index, self)
        if route is None:
            self._all_failed()
            return
        self.up_buf = _with_modifiers(self.up_buf, route)
        self.last = ctx.reactor.now
        self._connect(route)

    def _resend(self, what: str) -> bool:
        """--fastrouter-retry-after-connect: the node *what* (closed, reset, went
        silent) before its first response byte.  A bodyless request whose descriptor
        stayed here goes on as after a failed connect: the node is marked and the
        head goes to the next node, within --fastrouter-max-retries.  False when
        the request is not one to send again."""
        head = self.head
        if head is None or self.down_peek or self.fd_passed:
            return False
        ctx = self.ctx
        ctx.counters.resent += 1
        ctx.log(self, "the node %s before its first response byte: request sent again "
                      "(--fastrouter-retry-after-connect)" % what)
        self._drop_backend()
        self.up_buf = head
        self.state = CONNECTING
        self._connect_failed(what, log_it=False)
        return True

    def _all_failed(self) -> None:
        self._no_route(FAILED, "all nodes failed (%d %s)"
                       % (self.retries, "retry" if self.retries == 1 else "retries"))

    def _no_route(self, outcome: int, reason: Optional[str]) -> None:
        """No node for this request: close it as uWSGI does, with a rate-limited line
        (D19) unless *reason* is None (the mapper wrote its own line)."""
        self.refuse(outcome, reason, BAD_GATEWAY if outcome == FAILED else SERVICE_UNAVAILABLE)

    def refuse(self, outcome: int, reason: Optional[str], status: int = SERVICE_UNAVAILABLE) -> None:
        """Turn the request away before any node answered it: *outcome* (a record code,
        record.py), a rate-limited "no route" line when *reason* is given, and with
        --fastrouter-http-errors the HTTP answer *status* (503 "not now" for policies
        that refuse a request, e.g. when every node is over its cap) before the close."""
        self.outcome = outcome
        if reason:
            self.ctx.log(self, 'no route for key "%s": %s' % (printable(self.key), reason))
        self._answer_error(status)
        self.close()

    def _answer_error(self, status: int) -> None:
        """--fastrouter-http-errors: send the short HTTP answer for *status*
        (httperrors.py), unless the client already has response bytes or may be in a
        node's hands (its descriptor was passed).  Best effort: one non-blocking send;
        then the request bytes still unread are drained (boundedly), so that the close
        is a FIN rather than a reset that could destroy the answer."""
        if not self.ctx.http_errors or self.down_peek or self.fd_passed or self.state == CLOSED:
            return
        csock = self.csock
        try:
            csock.send(response(status), MSG_DONTWAIT)
            csock.shutdown(socket.SHUT_WR)
            scratch = self.ctx.scratch
            for _ in range(_READS_PER_EVENT):
                if csock.recv_into(scratch, self.ctx.chunk, MSG_DONTWAIT) <= 0:
                    break
        except OSError:
            pass

    def _drop_backend(self) -> None:
        sock = self.bsock
        if sock is None:
            return
        if self.b_events:
            self.ctx.reactor.forget(self.bfd)
            self.b_events = 0
        sock.close()
        self.bsock = self.tls = None
        self.bfd = -1

    # ------------------------------------------------------------------ relay

    def _on_client(self, mask: int) -> None:
        state = self.state
        if state == RECV_HEAD:
            # Not re-armed here: the whole head must arrive within one time-out
            # from accept, so a client that trickles bytes cannot hold a slot forever.
            self._read_more()
            return
        if state == RECV_BODY:
            self._read_body()
            return
        self.last = self.ctx.reactor.now
        if mask & WRITE and self.down_buf is not None:
            if not self._flush_down():
                return
        if mask & READ and state == RELAY and not self.client_eof and self.up_buf is None:
            self._pump_up()
        if self.state == RELAY:
            self._update_interest()

    def _on_backend(self, mask: int) -> None:
        self.last = self.ctx.reactor.now
        if self.state == CONNECTING:
            self._finish_connect()
            return
        if mask & WRITE:
            if self.up_buf is not None:
                if not self._flush_up():
                    return
            elif self.body is not None:
                if not self._send_file():
                    return
        if mask & READ and not self.backend_eof and self.down_buf is None:
            if not self.down_peek:
                self._on_answer(mask)     # the first response bytes; it ends the event
                return
            self._pump_down()
        if self.state == RELAY:
            self._update_interest()

    def _on_answer(self, mask: int) -> None:
        """The first response bytes: the node's readiness callback of a bodyless request
        whose head went out whole (:meth:`_connected`), and :meth:`_on_backend`'s first
        read otherwise.  The read takes up to FIRST_READ bytes, as a bytes object of its
        own, sent to the client as it is (later reads peek, see :meth:`_pump_down`).
        The HANGUP bit of *mask* says the node had shut down its side when the event
        came: a first read that leaves its socket empty, fully sent on, is then the
        whole response, and the session ends without the read that would return 0."""
        if self.down_peek:
            self._on_backend(mask)        # called again after the first read
            return
        ctx = self.ctx
        first = ctx.answer_read
        try:
            # read() on a plain node: recv() without its argument parsing
            data = _read(self.bfd, first) if self.tls is None else self.bsock.recv(first)
        except BlockingIOError:
            return
        except OSError as exc:
            self._node_failed(exc, True)
            return
        n = len(data)
        if n == 0:
            self._node_closed(True)
            return
        self.down_peek = True
        self.first_byte = ctx.reactor.now
        if ctx.access_log is not None:
            self.first = data[:16]            # for the HTTP status
        if not self.watch_client:
            # After a handoff the first response bytes mean the node ignored the
            # descriptor: its answer is relayed as usual.
            self.watch_client = True
            if self.fd_passed and ctx.handoffs.ignored(self.route.address):
                ctx.log(self, "node ignored a passed descriptor: handing clients "
                              "over to it is verified again (--fastrouter-trust-fd-passing)")
        # The send of _pump_down's loop, written out (one call less a request).
        try:
            sent = self.csock.send(data, MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.close("error writing to client: %s" % (exc.strerror or exc))
            return
        self.tx += sent
        node = self.route.node
        if node is not None:
            node.tx += n
        if sent < n:
            self.down_buf = memoryview(data)[sent:]   # kept whole, no copy
        elif mask & HANGUP and n < first and self.tls is None:
            # The node's FIN came before this read, which left its socket empty: the
            # response is complete (a TLS link may still hold decrypted bytes, so it
            # reads on).
            self.backend_eof = True
            self.close()
            return
        else:
            self._pump_down()
        if self.state == RELAY:
            self.last = ctx.reactor.now   # the session goes on (the time-out sweep's clock)
            self._update_interest()

    def _node_failed(self, exc: OSError, first: bool) -> None:
        """Reading from the node failed (before its *first* response byte, or after)."""
        if self.head is not None and self._resend("failed (%s)" % (exc.strerror or exc)):
            return
        if first:
            self._answer_error(BAD_GATEWAY)
        self.close("error reading from node: %s" % (exc.strerror or exc))

    def _node_closed(self, first: bool) -> None:
        """The node closed its side (before its *first* response byte, or after)."""
        if self.head is not None and self._resend("closed the connection"):
            return
        self.backend_eof = True
        if first:
            # Closed without a byte: taken over (below), or no answer at all.
            self._answer_error(BAD_GATEWAY)
            if self.fd_passed and not self.watch_client:
                # The node took the client over.  Our copy is only closed (never shut
                # down: that would cut the node's).
                self.ctx.handoffs.taken(self.route.address)
        self.close()

    def _pump_down(self) -> None:
        """Backend -> client after the first response bytes (:meth:`_on_answer`), until
        the backend has nothing more or the client is full: each read peeks a whole
        chunk and consumes only what the client took (see the module docstring)."""
        ctx = self.ctx
        scratch = ctx.scratch
        view = ctx.scratch_view
        chunk = ctx.chunk
        bsock = self.bsock
        csock = self.csock
        node = self.route.node
        for _ in range(_READS_PER_EVENT):
            try:
                n = bsock.recv_into(scratch, chunk, _MSG_PEEK)
            except BlockingIOError:
                return
            except OSError as exc:
                self._node_failed(exc, False)
                return
            if n == 0:
                self._node_closed(False)
                return
            try:
                sent = csock.send(view[:n], MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self.close("error writing to client: %s" % (exc.strerror or exc))
                return
            self.tx += sent
            if sent and not self._consume(sent):
                return
            if node is not None:
                node.tx += sent
            if sent < n:
                if not sent and self.tls is not None:
                    self.tls.none_taken()     # a TLS "peek" was a real read (tlsnode.py)
                self.down_buf = _IN_NODE_SOCKET
                return

    def _consume(self, count: int) -> bool:
        """Take *count* peeked bytes, which reached the client, out of the node's socket."""
        bsock = self.bsock
        scratch = self.ctx.scratch
        try:
            while count:
                n = bsock.recv_into(scratch, count, _MSG_TRUNC)
                if n <= 0:
                    raise ConnectionError("the node's socket lost bytes that were peeked")
                count -= n
        except OSError as exc:
            self.close("error reading from node: %s" % (exc.strerror or exc))
            return False
        return True

    def _pump_up(self) -> None:
        """Client -> backend (request body, websocket frames...)."""
        ctx = self.ctx
        scratch = ctx.scratch
        view = ctx.scratch_view
        chunk = ctx.chunk
        bsock = self.bsock
        csock = self.csock
        node = self.route.node
        for _ in range(_READS_PER_EVENT):
            try:
                n = csock.recv_into(scratch, chunk, MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                self.close("error reading from client: %s" % (exc.strerror or exc))
                return
            if n == 0:
                self.client_eof = True
                self._half_close_backend()
                return
            self.rx += n
            try:
                sent = bsock.send(view[:n])
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self.close("error writing to node: %s" % (exc.strerror or exc))
                return
            if node is not None:
                node.rx += sent
            if sent < n:
                self.up_buf = bytes(view[sent:n])
                return

    def _flush_down(self) -> bool:
        """The client is writable: send what is pending for it; False once closed."""
        data = self.down_buf
        if data is _IN_NODE_SOCKET:
            self.down_buf = None
            self._pump_down()
            return self.state != CLOSED
        try:
            sent = self.csock.send(data, MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError as exc:
            self.close("error writing to client: %s" % (exc.strerror or exc))
            return False
        self.tx += sent
        if sent < len(data):
            self.down_buf = memoryview(data)[sent:]
            return True
        self.down_buf = None
        if self.tls is not None and self.tls.buffered():
            # More of the response waits decrypted in the link (tlsnode.py).
            self._pump_down()
            return self.state != CLOSED
        return True

    def _flush_up(self) -> bool:
        data = self.up_buf
        try:
            sent = self.bsock.send(data)
        except BlockingIOError:
            return True
        except OSError as exc:
            if self.head is not None and self._resend("failed (%s)" % (exc.strerror or exc)):
                return False
            self.close("error writing to node: %s" % (exc.strerror or exc))
            return False
        node = self.route.node
        if node is not None:
            node.rx += sent
        if sent < len(data):
            self.up_buf = memoryview(data)[sent:]     # no copy of the unsent tail
        else:
            self.up_buf = None
            if self.client_eof:
                self._half_close_backend()
        return True

    def _half_close_backend(self) -> None:
        if self.up_buf is None and self.bsock is not None:
            try:
                self.bsock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _update_interest(self) -> None:
        # The two sides are written out rather than shared through a helper: this runs
        # on every event of every request, and a call per side costs more than it reads.
        c = 0
        if self.down_buf is not None:
            c = WRITE
        pending_up = self.up_buf is not None or self.body is not None
        if not self.client_eof and not pending_up and self.watch_client:
            c |= READ
        b = 0
        if pending_up:
            b = WRITE
        if not self.backend_eof and self.down_buf is None:
            b |= READ
        reactor = self.ctx.reactor
        if c != self.c_events:
            if not c:
                reactor.unregister(self.cfd)
            elif self.c_events:
                reactor.modify(self.cfd, c, self._on_client)
            else:
                reactor.register(self.cfd, c, self._on_client)
            self.c_events = c
        if b != self.b_events:
            if not b:
                reactor.unregister(self.bfd)
            elif self.b_events:
                reactor.modify(self.bfd, b, self._on_backend)
            else:
                reactor.register(self.bfd, b, self._on_backend)
            self.b_events = b

    # ---------------------------------------------------------------- closing

    def timed_out(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.state == CONNECTING:
            # A connect that never completes counts as a failed connect (retry path).
            self._drop_backend()
            self._connect_failed("timeout")
        elif self.head is not None and self.state == RELAY and self._resend(
                "sent nothing for %d seconds" % self.ctx.timeout):
            return
        else:
            if self.state == RELAY:
                self._answer_error(GATEWAY_TIMEOUT)   # only before the first response byte
            self.close("timeout in state %s" % STATE_NAMES[self.state])

    def close(self, reason: Optional[str] = None) -> None:
        """Tear the session down (idempotent); *reason* is logged when given."""
        state = self.state
        if state == CLOSED:
            return
        self.state = CLOSED
        ctx = self.ctx
        reactor = ctx.reactor
        if state == WAIT_NODE:
            ctx.router.waiting.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        # Both sockets are closed right below and shared with nobody: forget()
        # spares the epoll_ctl(DEL) that the close makes the kernel do anyway.
        if self.c_events:
            if self.fd_passed:
                # The node may hold a copy: the registration would outlive our close.
                reactor.unregister(self.cfd)
            else:
                reactor.forget(self.cfd)
            self.c_events = 0
        if self.b_events:
            reactor.forget(self.bfd)
            self.b_events = 0
        if self.bsock is not None:
            self.bsock.close()
            self.bsock = None
        self.csock.close()
        self.up_buf = self.down_buf = self.reader = None
        if self.body is not None:
            self.body.close()
            self.body = None
        route = self.route
        if route is not None:
            # The mapper that owns the node takes it back and, with caps, tells the
            # requests waiting for a slot (router.py, StaticMapper/SubscriptionMapper).
            owner = route.owner
            if owner is not None:
                owner.release(route)
        # The record is complete: both readers see the same facts (record.py).
        self.ended = reactor.now
        if self.outcome is None:
            if reason is None and state == RELAY and not self.fd_passed:
                self.outcome = OK             # relayed to its end: _outcome's first case
            else:
                self.outcome = self._outcome(state, reason)
        ctx.counters.ended(self)
        ctx.closed(self)
        if reason:
            ctx.log(self, reason)
        if ctx.access_log is not None:
            ctx.access_log(self)

    def _outcome(self, state: int, reason: Optional[str]) -> int:
        """How a request that found a node ended, from the *state* it was closed in
        and the close *reason* (a record code, record.py)."""
        if reason is None:
            if self.fd_passed and self.backend_eof and not self.watch_client:
                return HANDOFF        # the node took the client (checked or trusted)
            if state == RELAY:
                return OK
        elif reason.startswith("timeout"):
            return TIMEOUT
        if state == RELAY:
            return CLIENT_ERROR if reason is None or "client" in reason else NODE_ERROR
        if state == CONNECTING:
            return ABORTED
        return CLIENT_ERROR           # nothing usable read, bad vars, a refused body
