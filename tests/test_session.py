"""The session state machine in-process: a real reactor and real sockets, the clock and
the timers driven by the test."""

from __future__ import annotations

import io
import select
import socket

import pytest

from backends import RecordingBackend, uwsgi_packet
from support import busy_unix_node, sock_path, start_router, uwsgi_request, wait_until

from uwsgi_fastrouter import log, router as router_module
from uwsgi_fastrouter.reactor import Reactor
from uwsgi_fastrouter.router import Router
from uwsgi_fastrouter.server import Server
from uwsgi_fastrouter.router import BUSY_FIRST_DELAY, BUSY_MAX_DELAY, BUSY_TICK
from uwsgi_fastrouter.record import OK
from uwsgi_fastrouter.context import FIRST_READ
from uwsgi_fastrouter.session import CLOSED, CONNECTING, RELAY, Session

GET = [(b"HTTP_HOST", b"example.com"), (b"PATH_INFO", b"/"), (b"CONTENT_LENGTH", b"")]


class ScheduledTimer:
    """Stands in for a reactor timer: the test runs it (see ``TimerLog``)."""

    def __init__(self, delay: float, callback, args) -> None:
        self.delay, self.callback, self.args = delay, callback, args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class TimerLog:
    """Replaces ``reactor.call_later`` and ``call_at``: records each timer and lets the
    test fire it after moving the loop time forward by its delay."""

    def __init__(self, reactor: Reactor) -> None:
        self.reactor = reactor
        self.timers = []
        reactor.call_later = self.call_later
        reactor.call_at = self.call_at

    def call_later(self, delay, callback, *args):
        timer = ScheduledTimer(delay, callback, args)
        self.timers.append(timer)
        return timer

    def call_at(self, when, callback, *args):
        return self.call_later(when - self.reactor.now, callback, *args)

    def fire_last(self) -> None:
        timer = self.timers[-1]
        assert not timer.cancelled
        self.reactor.now += timer.delay
        timer.callback(*timer.args)


@pytest.fixture
def log_lines():
    stream = io.StringIO()
    log.set_stream(stream)
    yield stream
    log.set_stream(None)


@pytest.mark.parametrize("draw", [0.0, 1.0])
def test_a_busy_unix_node_is_retried_with_doubling_delays_then_falls_back(sock_dir, log_lines,
                                                                         monkeypatch, draw):
    monkeypatch.setattr(router_module, "_random", lambda: draw)
    jitter = 1.0 - router_module.BUSY_JITTER * draw           # the random part of each wait
    busy_path = sock_path(sock_dir, "busy.sock")
    lsock, fillers = busy_unix_node(busy_path)
    fallback = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fallback_path = sock_path(sock_dir, "fallback.sock")
    fallback.bind(fallback_path)
    fallback.listen(8)
    fallback.settimeout(10)
    reactor = Reactor()
    timers = TimerLog(reactor)
    router = Router(to=[busy_path], fallback=[fallback_path])
    server = Server(reactor, router, [], timeout=3)
    client, ours = socket.socketpair()
    try:
        client.sendall(uwsgi_packet(GET))
        session = Session(server.context, ours, "")
        server.sessions.add(session)
        session.start()
        for _ in range(50):                         # bounded: each pass is one attempt
            if session.state != CONNECTING or session.bsock is not None:
                break
            timers.fire_last()
        delays = [t.delay for t in timers.timers]
        nominal = [BUSY_FIRST_DELAY * 2 ** i for i in range(7)]          # 10 ms .. 640 ms
        assert nominal[-1] * 2 > BUSY_MAX_DELAY
        nominal += [BUSY_MAX_DELAY] * len(delays)                       # capped at 1 s
        for i, delay in enumerate(delays):
            # each wait: the nominal delay less its random part, cut at the 3 s deadline,
            # then rounded up to the next tick of the loop
            wanted = min(nominal[i] * jitter, 3 - sum(delays[:i]))
            # (1e-9: the delays are differences of float loop times)
            assert wanted - 1e-9 < delay <= wanted + BUSY_TICK + 1e-9, (i, delays)
        assert 3 <= sum(delays) <= 3 + BUSY_TICK + 1e-9
        assert len(delays) == (9 if draw == 0.0 else 12)
        assert 'unable to connect() to node "%s"' % busy_path in log_lines.getvalue()
        assert "listen queue full for 3 seconds" in log_lines.getvalue()
        assert router.static_nodes[0].dead_since, "the busy node counts as failed: it is marked"
        conn, _ = fallback.accept()                 # the fallback node got the request
        with conn:
            head = conn.recv(4)
            assert conn.recv(head[1] | head[2] << 8) == uwsgi_packet(GET)[4:]
    finally:
        server.stop()
        reactor.close()
        for sock in [client, lsock, fallback] + fillers:
            sock.close()


@pytest.mark.parametrize("master", [[], ["--master"]], ids=["single", "master"])
def test_a_node_that_stays_busy_gives_a_failed_connect_and_the_fallback_answers(sock_dir, master):
    busy_path = sock_path(sock_dir, "busy.sock")
    lsock, fillers = busy_unix_node(busy_path)
    try:
        with RecordingBackend("fallback") as node:
            router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", busy_path,
                                   "--fastrouter-fallback", node.address, "--fastrouter-timeout", "1"]
                                  + master)
            answer = uwsgi_request(router.addresses[0], GET, timeout=20)
            assert b"node=fallback" in answer
            router.wait_for_log(r'unable to connect\(\) to node "%s"' % busy_path)
    finally:
        for sock in [lsock] + fillers:
            sock.close()


def one_pass(reactor: Reactor) -> None:
    """Handle whatever is ready now, without waiting for more."""
    reactor.stop()
    reactor.run()


def internet_client(listener: socket.socket):
    """A TCP client with a tiny receive window and an Internet MSS, and the router's
    side of it (accepted, left blocking as the router leaves it)."""
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1448)
    client.connect(listener.getsockname())
    ours, addr = listener.accept()
    return client, ours, addr


def test_a_client_that_never_reads_leaves_at_most_16_kib_in_the_router():
    size = 8 * 1024 * 1024
    reactor = Reactor()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    with RecordingBackend("big", mode="big", size=size) as node:
        server = Server(reactor, Router(to=[node.address]), [])
        client, ours, addr = internet_client(listener)
        try:
            client.sendall(uwsgi_packet([(b"HTTP_HOST", b"h")]))
            session = Session(server.context, ours, addr)
            server.sessions.add(session)
            session.start()

            def client_full():
                one_pass(reactor)
                return session.down_buf is not None
            wait_until(client_full, what="the client's buffers full")
            for _ in range(20):             # and it stays that way
                one_pass(reactor)
            assert session.state == RELAY
            assert len(session.down_buf) <= 16 * 1024
            assert session.route.node.tx < size, "the rest waits in the node's socket"
        finally:
            server.stop()
            reactor.close()
            client.close()
            listener.close()


def _answer_and_close(node: socket.socket, size: int) -> None:
    """Accept the router's connection, read the head, send *size* bytes and close:
    the response and the FIN are both queued before the router looks again."""
    conn, _ = node.accept()
    with conn:
        conn.settimeout(10)
        head = conn.recv(4)
        want = head[1] | head[2] << 8
        while want:
            want -= len(conn.recv(want))
        conn.sendall(bytes(range(256)) * (size // 256) + b"x" * (size % 256))


@pytest.mark.parametrize("size", [100, FIRST_READ - 1, FIRST_READ, FIRST_READ + 100, 300000])
@pytest.mark.parametrize("slow_client", [False, True], ids=["reading", "small-window"])
def test_a_response_sent_with_the_nodes_fin_reaches_the_client_whole(size, slow_client):
    """The node's FIN comes with its answer (the reactor's HANGUP bit): a first read
    that empties the node's socket ends the request without another read; a read that
    filled its buffer (FIRST_READ), or bytes the client could not take yet, must not
    end it early.  The client gets every byte, then EOF, and the request counts as OK."""
    node = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    node.bind(("127.0.0.1", 0))
    node.listen(4)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    reactor = Reactor()
    server = Server(reactor, Router(to=["127.0.0.1:%d" % node.getsockname()[1]]), [])
    if slow_client:
        client, ours, addr = internet_client(listener)
    else:
        client = socket.create_connection(listener.getsockname())
        ours, addr = listener.accept()
    client.setblocking(False)
    try:
        client.sendall(uwsgi_packet(GET))
        wait_until(lambda: select.select([ours], [], [], 0)[0], what="the request")
        session = Session(server.context, ours, addr)
        server.sessions.add(session)
        session.start()
        _answer_and_close(node, size)
        received = []

        def answered():
            reactor.call_soon(lambda: None)     # a pass that does not wait
            one_pass(reactor)
            try:
                data = client.recv(65536)
            except BlockingIOError:
                return False
            received.append(data)
            return not data                     # EOF: the router closed its side
        wait_until(answered, what="the whole response and EOF")
        body = b"".join(received)
        assert len(body) == size
        assert body == bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        assert session.state == CLOSED and session.outcome == OK
        assert server.counters.by_code[OK] == 1
    finally:
        server.stop()
        reactor.close()
        for sock in (client, node, listener):
            sock.close()
