"""The engine in-process: a real reactor and real sockets (socketpairs and loopback),
no subprocess, and a clock the test moves.

The harness creates sessions of a recording subclass that notes every state change,
and each test ends by checking what it saw against ``session.TRANSITIONS``.
"""

from __future__ import annotations

import ast
import fcntl
import io
import socket
import struct
import termios
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

from backends import recv_exact, uwsgi_packet
from support import busy_unix_node, free_dead_tcp_address, sock_path, wait_until

from uwsgi_fastrouter import log, router as router_module, session as session_module, wsgiserver
from uwsgi_fastrouter.accesslog import AccessLog
from uwsgi_fastrouter.metrics import OUTCOMES, Counters
from uwsgi_fastrouter.protocol import RequestInfo, scan_request
from uwsgi_fastrouter.record import FAILED
from uwsgi_fastrouter.reactor import Reactor
from uwsgi_fastrouter.router import BUSY_FIRST_DELAY, BUSY_MAX_DELAY, BUSY_TICK, Router
from uwsgi_fastrouter.server import Server
from uwsgi_fastrouter.context import FIRST_READ
from uwsgi_fastrouter.session import (CLOSED, CONNECTING, RECV_BODY, RECV_HEAD, RELAY, TRANSITIONS,
                                      Session)

GET = [(b"HTTP_HOST", b"example.com"), (b"PATH_INFO", b"/"), (b"CONTENT_LENGTH", b"")]
TIMEOUT = 5


# --------------------------------------------------------------------------- harness

_STATE_SLOT = Session.__dict__["state"]


class RecordingSession(Session):
    """A Session that notes each state change in ``changes`` (old, new)."""

    __slots__ = ()
    changes: List[Tuple[int, int]] = []

    @property
    def state(self) -> int:
        return _STATE_SLOT.__get__(self, Session)

    @state.setter
    def state(self, new: int) -> None:
        try:
            old = _STATE_SLOT.__get__(self, Session)
        except AttributeError:       # set for the first time, in __init__
            old = None
        if old is not None:
            RecordingSession.changes.append((old, new))
        _STATE_SLOT.__set__(self, new)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _nothing() -> None:
    pass


class Engine:
    """One Server on a reactor whose clock only moves when the test says."""

    def __init__(self, router: Router, **server_options) -> None:
        self.clock = FakeClock()
        self.reactor = Reactor(clock=self.clock)
        self.server = Server(self.reactor, router, [], timeout=TIMEOUT, **server_options)
        self.server.start()            # arms the once-a-second sweep (on the fake clock)
        self.peers: List[socket.socket] = []

    def client(self, first: bytes = b"") -> Tuple[socket.socket, RecordingSession]:
        """A client on a socketpair and its session, started as the server starts one."""
        client, ours = socket.socketpair()
        self.peers.append(client)
        if first:
            client.sendall(first)
        session = RecordingSession(self.server.context, ours, "")
        self.server.sessions.add(session)
        session.start()
        return client, session

    def one_pass(self) -> None:
        """Handle what is ready now (and timers that are due), without waiting."""
        self.reactor.call_soon(_nothing)
        self.reactor.stop()
        self.reactor.run()

    def until(self, predicate, what: str):
        def step():
            self.one_pass()
            return predicate()
        return wait_until(step, what=what)

    def advance(self, seconds: float) -> None:
        """Move the loop time forward and run the pass in which it is seen."""
        self.clock.now += seconds
        self.one_pass()

    def close(self) -> None:
        self.server.stop()
        self.reactor.close()
        for peer in self.peers:
            peer.close()


@pytest.fixture
def log_lines():
    stream = io.StringIO()
    log.set_stream(stream)
    yield stream
    log.set_stream(None)


@pytest.fixture
def engines():
    made: List[Engine] = []
    RecordingSession.changes = []

    def make(router: Router, **options) -> Engine:
        engine = Engine(router, **options)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()
    unknown = [(session_module.STATE_NAMES[a], session_module.STATE_NAMES[b])
               for a, b in RecordingSession.changes if b not in TRANSITIONS[a]]
    assert not unknown, "state changes missing from session.TRANSITIONS: %r" % unknown


def tcp_listener(backlog: int = 8) -> Tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    sock.settimeout(10)
    return sock, "127.0.0.1:%d" % sock.getsockname()[1]


def stalled_tcp_node() -> Tuple[str, List[socket.socket]]:
    """A loopback address where a connect stays in progress: the listener's queue
    (backlog 0) holds one connection already, and it never accepts, so later SYNs are
    dropped.  Returns the address and the sockets to close."""
    listener, address = tcp_listener(0)
    filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    filler.connect(listener.getsockname())
    return address, [listener, filler]


def read_packet(conn: socket.socket) -> bytes:
    head = recv_exact(conn, 4)
    return head + recv_exact(conn, head[1] | head[2] << 8)


def unix_pending(sock) -> int:
    """Bytes waiting in the kernel to be read from *sock*."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


# --------------------------------------------------------------------------- layering


def test_the_session_module_never_imports_the_server():
    source = Path(session_module.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert not {name for name in imported if name.split(".")[-1] == "server"}, imported


# --------------------------------------------------------------------------- the head


@pytest.mark.parametrize("piece", [1, 2, 3])
def test_a_head_in_small_pieces_reaches_the_node_whole_with_its_body(engines, piece):
    node, address = tcp_listener()
    with node:
        engine = engines(Router(to=[address]))
        packet = uwsgi_packet([(b"HTTP_HOST", b"example.com"), (b"CONTENT_LENGTH", b"4")])
        client, session = engine.client()
        for i in range(0, len(packet), piece):
            assert session.state == RECV_HEAD
            client.send(packet[i:i + piece])
            engine.one_pass()
        client.send(b"BODY")
        conn, _ = node.accept()
        with conn:
            assert read_packet(conn) == packet
            engine.until(lambda: session.up_buf is None and unix_pending(session.bsock) == 0
                         and unix_pending(session.csock) == 0, "the body relayed")
            assert recv_exact(conn, 4) == b"BODY"
            conn.sendall(b"answer")
            conn.shutdown(socket.SHUT_WR)
            engine.until(lambda: session.state == CLOSED, "the session over")
        assert client.recv(100) == b"answer"
        assert (RECV_HEAD, CONNECTING) in RecordingSession.changes


@pytest.mark.parametrize("piece", [1, 2, 3])
def test_a_head_that_stops_in_the_middle_is_closed_with_a_line(engines, log_lines, piece):
    engine = engines(Router(to=["127.0.0.1:1"]))
    packet = uwsgi_packet(GET)
    client, session = engine.client()
    for i in range(0, 6, piece):
        client.send(packet[i:i + piece])
        engine.one_pass()
    client.shutdown(socket.SHUT_WR)
    engine.until(lambda: session.state == CLOSED, "the session closed")
    assert "connection closed in the middle of the request vars" in log_lines.getvalue()


class TrickleSocket:
    """Stands in for the app worker's connection: each ``recvmsg`` returns at most
    *piece* bytes of *data*, and the sizes asked for are recorded."""

    def __init__(self, data: bytes, piece: int) -> None:
        self.data, self.piece, self.asked = data, piece, []

    def recvmsg(self, bufsize: int, ancbufsize: int = 0, flags: int = 0):
        self.asked.append(bufsize)
        chunk, self.data = self.data[:min(bufsize, self.piece)], self.data[min(bufsize, self.piece):]
        return chunk, [], 0, None


@pytest.mark.parametrize("piece", [1, 2, 3])
def test_the_app_workers_reader_takes_a_head_in_pieces_and_leaves_the_body(piece):
    packet = uwsgi_packet(GET, modifier1=0)
    conn = TrickleSocket(packet + b"BODY", piece)
    lines = []
    assert wsgiserver._read_head(conn, 4096, lines.append) == (0, packet[4:], None)
    assert conn.data == b"BODY" and not lines
    assert sum(min(n, piece) for n in conn.asked) == len(packet)


def test_the_app_workers_reader_refuses_a_head_over_its_buffer_and_says_so():
    conn = TrickleSocket(uwsgi_packet([(b"K", b"v" * 200)]), 2)
    lines = []
    assert wsgiserver._read_head(conn, 100, lines.append) is None
    assert lines == ["invalid request block size: 205 (max 100)...skip"]


# --------------------------------------------------------------------------- time-outs


def test_a_head_that_never_completes_times_out_on_the_sweep(engines, log_lines):
    engine = engines(Router(to=["127.0.0.1:1"]))
    client, session = engine.client(b"\x00\x10")
    engine.one_pass()
    engine.advance(TIMEOUT - 1)
    assert session.state == RECV_HEAD
    engine.advance(2)
    assert session.state == CLOSED
    assert "timeout in state RECV_HEAD" in log_lines.getvalue()
    assert client.recv(10) == b""


def test_a_buffered_body_that_stops_times_out_on_the_sweep(engines, log_lines):
    engine = engines(Router(to=["127.0.0.1:1"]), post_buffering=64)
    head = uwsgi_packet([(b"HTTP_HOST", b"h"), (b"CONTENT_LENGTH", b"10")])
    client, session = engine.client(head + b"abc")
    assert session.state == RECV_BODY and session.body.left == 7
    engine.advance(TIMEOUT + 1)
    assert session.state == CLOSED
    assert "timeout in state RECV_BODY" in log_lines.getvalue()


def test_a_connect_that_never_completes_is_a_failed_connect_on_the_sweep(engines, log_lines):
    address, keep = stalled_tcp_node()
    try:
        engine = engines(Router(to=[address]))
        client, session = engine.client(uwsgi_packet(GET))
        assert session.state == CONNECTING and session.bsock is not None
        engine.advance(TIMEOUT + 1)
        assert session.state == CLOSED and session.outcome == FAILED
        text = log_lines.getvalue()
        assert 'unable to connect() to node "%s" (0 retries): timeout' % address in text
        assert "all nodes failed" in text
    finally:
        for sock in keep:
            sock.close()


def test_a_node_that_never_answers_times_out_in_relay(engines, log_lines):
    node, address = tcp_listener()
    with node:
        engine = engines(Router(to=[address]))
        client, session = engine.client(uwsgi_packet(GET))
        conn, _ = node.accept()
        with conn:
            read_packet(conn)
            engine.until(lambda: session.state == RELAY, "relaying")
            engine.advance(TIMEOUT - 1)
            assert session.state == RELAY
            engine.advance(2)
            assert session.state == CLOSED
            assert "timeout in state RELAY" in log_lines.getvalue()


def test_a_bodyless_request_reads_the_client_address_from_its_vars_when_asked(engines, log_lines):
    # The usual request goes to its node from Session.start: its RequestInfo is made
    # only when a log line (here the time-out's) asks for it, and says what
    # scan_request says.
    node, address = tcp_listener()
    pairs = GET + [(b"REMOTE_ADDR", b"10.9.8.7"), (b"REMOTE_PORT", b"4242")]
    with node:
        engine = engines(Router(to=[address]))
        head = uwsgi_packet(pairs, 5, 3)
        client, session = engine.client(head)
        conn, _ = node.accept()
        with conn:
            got = read_packet(conn)
            # the modifiers are the node's (0, 0), every other byte is the client's
            assert got[0] == 0 and got[3] == 0 and got[1:3] == head[1:3] and got[4:] == head[4:]
            engine.until(lambda: session.state == RELAY, "relaying")
            assert session.info == scan_request(head[4:])
            engine.advance(TIMEOUT + 1)
            assert session.state == CLOSED
            assert ("[uwsgi-fastrouter key: example.com client_addr: 10.9.8.7 client_port: 4242 "
                    "node: %s] timeout in state RELAY" % address) in log_lines.getvalue()


def test_a_large_head_does_not_stay_whole_for_the_session_s_life(engines):
    # The usual path keeps the scan's match (and so the whole head) until the info is
    # asked for; a head over session._LAZY_INFO_HEAD bytes has its info made at once.
    node, address = tcp_listener()
    filler = [(b"HTTP_X_%d" % i, b"v" * 200) for i in range(25)]
    with node:
        engine = engines(Router(to=[address]))
        for pairs, lazy in ((GET, True), (GET + filler, False)):
            head = uwsgi_packet(pairs)
            assert (len(head) <= session_module._LAZY_INFO_HEAD) == lazy
            client, session = engine.client(head)
            conn, _ = node.accept()
            with conn:
                assert read_packet(conn) == head
                engine.until(lambda: session.state == RELAY, "relaying")
                assert (type(session._info) is not RequestInfo) == lazy
                assert session.info == scan_request(head[4:])


def test_the_idle_callback_comes_when_the_last_session_closes(engines):
    # A closing session leaves the server's set; with on_idle set (a graceful stop),
    # the callback comes once the set is empty, and not before.
    engine = engines(Router(to=["127.0.0.1:1"]))
    server = engine.server
    first_client, first = engine.client()
    second_client, second = engine.client()
    idle = []
    server.on_idle = lambda: idle.append(len(server.sessions))
    first_client.close()
    engine.until(lambda: first.state == CLOSED, "the first session closed")
    assert idle == [] and server.sessions == {second}
    second_client.close()
    engine.until(lambda: second.state == CLOSED, "the second session closed")
    assert idle == [0]
    server.on_idle = None
    third_client, third = engine.client()
    third_client.close()
    engine.until(lambda: third.state == CLOSED, "the third session closed")
    assert idle == [0] and not server.sessions


@pytest.mark.parametrize("vars_, why", [
    (GET + [(b"CONTENT_LENGTH", b"3")], "a body"),
    ([(b"PATH_INFO", b"/")], "no key"),
    (GET + [(b"HTTP_USER_AGENT", b"u" * 300)], "a value too long for the pattern"),
    ([(b"HTTP_HOST", b"example.com"), (b"HTTP_HOST", b"")], "an empty last key var"),
])
def test_requests_off_the_usual_path_take_the_general_one(engines, log_lines, vars_, why):
    node, address = tcp_listener()
    with node:
        engine = engines(Router(to=[address]))
        body = b"abc" if why == "a body" else b""
        client, session = engine.client(uwsgi_packet(vars_) + body)
        if why == "no key":
            engine.until(lambda: session.state == CLOSED, "closed")
            assert "the request carries no key" in log_lines.getvalue()
            return
        conn, _ = node.accept()
        with conn:
            assert read_packet(conn) == uwsgi_packet(vars_)
            if body:
                assert recv_exact(conn, 3) == body
            engine.until(lambda: session.state == RELAY, "relaying")
            assert session.key == b"example.com"
            assert session.watch_client == bool(body)
            assert session.info == scan_request(uwsgi_packet(vars_)[4:])


def test_the_body_min_rate_deadline_is_a_timer_on_the_loop_clock(engines, log_lines):
    engine = engines(Router(to=["127.0.0.1:1"]), post_buffering=64, post_buffering_min_rate=10)
    head = uwsgi_packet([(b"HTTP_HOST", b"h"), (b"CONTENT_LENGTH", b"20")])
    client, session = engine.client(head)
    allowed = TIMEOUT + 20 / 10
    client.send(b"x")
    engine.advance(allowed - 0.5)      # bytes keep the idle time-out away...
    client.send(b"y")
    engine.advance(0.6)                # ...but not the whole-body deadline
    assert session.state == CLOSED
    assert "request body not complete after %.1f seconds (18 of 20 bytes missing" % allowed \
        in log_lines.getvalue()


@pytest.mark.parametrize("limit", [64, 4], ids=["in-memory", "temp-file"])
def test_a_buffered_body_goes_to_the_node_once_complete(engines, tmp_path, limit):
    node, address = tcp_listener()
    with node:
        engine = engines(Router(to=[address]), post_buffering=limit,
                         post_buffering_dir=str(tmp_path))
        head = uwsgi_packet([(b"HTTP_HOST", b"h"), (b"CONTENT_LENGTH", b"10")])
        client, session = engine.client(head + b"abc")
        assert session.state == RECV_BODY
        for piece in (b"de", b"fgh", b"ij"):
            client.send(piece)
            engine.one_pass()
        engine.until(lambda: session.state == RELAY and session.body is None, "the body sent")
        conn, _ = node.accept()
        with conn:
            assert read_packet(conn) == head
            assert recv_exact(conn, 10) == b"abcdefghij"
        assert (RECV_BODY, CONNECTING) in RecordingSession.changes


# --------------------------------------------------------------------------- retry and fallback


def test_a_dead_node_is_marked_and_the_next_one_serves(engines, log_lines):
    dead, reserve = free_dead_tcp_address()
    node, live = tcp_listener()
    with node, reserve:
        router = Router(to=[dead, live])
        engine = engines(router)
        client, session = engine.client(uwsgi_packet(GET))
        engine.until(lambda: session.state == RELAY, "connected to the live node")
        conn, _ = node.accept()
        with conn:
            assert read_packet(conn) == uwsgi_packet(GET)
        assert session.retries == 1 and session.fallback_index == 0
        assert router.static_nodes[0].dead_since and not router.static_nodes[1].dead_since
        assert 'unable to connect() to node "%s" (0 retries)' % dead in log_lines.getvalue()


def test_when_every_node_is_dead_the_fallback_serves(engines):
    dead, reserve = free_dead_tcp_address()
    node, live = tcp_listener()
    with node, reserve:
        engine = engines(Router(to=[dead], fallback=[live]))
        client, session = engine.client(uwsgi_packet(GET, modifier1=5))
        engine.until(lambda: session.state == RELAY, "connected to the fallback")
        conn, _ = node.accept()
        with conn:
            got = read_packet(conn)
        assert got[0] == 0, "the fallback route's modifiers (those of the route that failed)"
        assert (session.retries, session.fallback_index) == (1, 1)


def test_when_nothing_is_left_the_client_is_closed_as_failed(engines, log_lines):
    dead1, reserve1 = free_dead_tcp_address()
    dead2, reserve2 = free_dead_tcp_address()
    with reserve1, reserve2:
        engine = engines(Router(to=[dead1, dead2]))
        client, session = engine.client(uwsgi_packet(GET))
        engine.until(lambda: session.state == CLOSED, "the session closed")
        assert session.outcome == FAILED
        assert "all nodes failed (2 retries)" in log_lines.getvalue()
        assert client.recv(10) == b""


def test_the_router_decides_retries_up_to_max_retries():
    router = Router(to=["127.0.0.1:1"], max_retries=2)
    first = router.route(b"k")
    assert router.next_route(b"k", first, 1, 0)[1:] == (2, 0)
    assert router.next_route(b"k", first, 2, 0) == (None, 2, 0)
    with_fallback = Router(to=["127.0.0.1:1"], fallback=["127.0.0.1:2"])
    route, retries, index = with_fallback.next_route(b"k", first, 0, 0)
    assert (route.address, retries, index) == (b"127.0.0.1:2", 1, 1)
    assert with_fallback.next_route(b"k", route, 1, 1) == (None, 2, 1)


def test_an_unknown_key_goes_to_the_fallbacks_only_when_asked():
    assert Router(fallback=["127.0.0.1:2"]).route_unknown_key(b"k") == (None, 0, 0)
    route, retries, index = Router(fallback=["127.0.0.1:2"],
                                   fallback_on_no_key=True).route_unknown_key(b"k")
    assert (route.address, retries, index) == (b"127.0.0.1:2", 1, 1)


def test_the_busy_node_back_off_doubles_up_to_its_cap_then_gives_up(monkeypatch):
    monkeypatch.setattr(router_module, "_random", lambda: 0.0)
    now, busy, waits = 100.0, None, []
    while True:
        step = Router.busy_backoff(now, busy, 3)
        if step is None:
            break
        when, busy = step
        assert when > now and abs(when / BUSY_TICK - round(when / BUSY_TICK)) < 1e-6
        waits.append(busy[1])
        now = when
    assert waits[:3] == [BUSY_FIRST_DELAY, BUSY_FIRST_DELAY * 2, BUSY_FIRST_DELAY * 4]
    assert max(waits) == BUSY_MAX_DELAY
    assert now >= 103.0, "no give-up before the time-out from the first attempt"


# --------------------------------------------------------------------------- back-pressure


def test_a_client_that_does_not_read_leaves_the_rest_in_the_nodes_socket(engines):
    node, address = tcp_listener()
    with node:
        engine = engines(Router(to=[address]))
        client, session = engine.client()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.sendall(uwsgi_packet(GET))
        engine.one_pass()
        conn, _ = node.accept()
        with conn:
            read_packet(conn)
            conn.setblocking(False)
            sent = 0
            try:
                while sent < 64 * 1024 * 1024:
                    sent += conn.send(b"r" * 65536)
            except BlockingIOError:
                pass
            engine.until(lambda: session.down_buf is not None, "the client full")
            for _ in range(20):
                engine.one_pass()
            assert session.state == RELAY
            assert len(session.down_buf) <= FIRST_READ
            assert unix_pending(session.bsock) > 0, "the rest waits in the node's socket"
            assert session.route.node.tx < sent


# --------------------------------------------------------------------------- the request record

RECORD_FORMAT = "%(key)|%(status)|%(rx)|%(tx)|%(ttfb)|%(msecs)|%(outcome)"


def recording_engine(engines, tmp_path, router: Router, **options):
    """An engine with the detailed metrics and an access log (file, batched on its loop):
    both read the sessions' request records."""
    engine = engines(router, **options)
    engine.server.counters = Counters(detailed=True)
    path = str(tmp_path / "access.log")
    access_log = AccessLog(RECORD_FORMAT, path, engine.reactor)
    engine.server.context.access_log = access_log

    def lines() -> List[List[str]]:
        access_log.flush()
        with open(path) as handle:
            return [line.split("|") for line in handle.read().splitlines()]
    return engine, lines


def test_the_access_log_and_the_metrics_read_one_record(engines, tmp_path):
    """Bytes, times (the loop clock) and outcomes are the same facts for both readers."""
    node, address = tcp_listener()
    answer = b"HTTP/1.0 200 OK\r\n\r\nhello"
    with node:
        engine, lines = recording_engine(engines, tmp_path, Router(to=[address]))
        packet = uwsgi_packet(GET)
        client, session = engine.client(packet)
        conn, _ = node.accept()
        with conn:
            read_packet(conn)
            engine.advance(0.25)          # the node answers a quarter of a second later
            conn.sendall(answer)
        engine.until(lambda: session.state == CLOSED, "the session closed")
        assert recv_exact(client, len(answer)) == answer
        keyless = uwsgi_packet([(b"PATH_INFO", b"/")])
        engine.client(keyless)            # no key: closed at once
        counters = engine.server.counters
        assert lines() == [
            ["example.com", "200", str(len(packet)), str(len(answer)), "250.0", "250.0", "ok"],
            ["-", "-", str(len(keyless)), "0", "-", "0.0", "noroute"]]
        assert (counters.bytes_in, counters.bytes_out) == (len(packet) + len(keyless), len(answer))
        assert (counters.first_byte_sum, counters.total_sum) == (0.25, 0.25)
        outcomes = dict(zip(OUTCOMES, counters.outcomes))
        assert (outcomes["ok"], outcomes["no_route"]) == (1, 1)


def test_a_refused_body_is_a_client_error_for_both_readers(engines, tmp_path, log_lines):
    node, address = tcp_listener()
    with node:
        engine, lines = recording_engine(engines, tmp_path, Router(to=[address]),
                                          post_buffering=8, post_buffering_max=16)
        head = uwsgi_packet([(b"HTTP_HOST", b"h"), (b"CONTENT_LENGTH", b"20")])
        client, session = engine.client(head)
        assert session.state == CLOSED
        assert "over --fastrouter-post-buffering-max 16" in log_lines.getvalue()
        served, served_session = engine.client(uwsgi_packet(GET))
        conn, _ = node.accept()
        with conn:
            read_packet(conn)
            conn.sendall(b"ok")
        engine.until(lambda: served_session.state == CLOSED, "the other client served")
        assert recv_exact(served, 2) == b"ok"
        assert [line[-1] for line in lines()] == ["error", "ok"]
        outcomes = dict(zip(OUTCOMES, engine.server.counters.outcomes))
        assert (outcomes["client_error"], outcomes["no_route"], outcomes["ok"]) == (1, 0, 1)


# --------------------------------------------------------------------------- the scratch buffer


def test_a_head_waiting_for_a_busy_node_survives_other_sessions_reads(engines, sock_dir):
    """Both heads wait (the node's listen queue is full) while the other session's read
    reuses the process-wide scratch buffer: each must still reach the node intact."""
    path = sock_path(sock_dir, "busy.sock")
    lsock, fillers = busy_unix_node(path)
    try:
        engine = engines(Router(to=[path]), fd_passing=False)
        first = uwsgi_packet([(b"HTTP_HOST", b"first.example"), (b"PATH_INFO", b"/1")])
        second = uwsgi_packet([(b"HTTP_HOST", b"second"), (b"PATH_INFO", b"/" + b"2" * 80)])
        _, one = engine.client(first)
        _, two = engine.client(second)
        assert one.state == two.state == CONNECTING and one.bsock is None and two.bsock is None
        for filler in fillers:            # room in the queue again
            conn, _ = lsock.accept()
            conn.close()
        lsock.listen(8)
        lsock.settimeout(10)
        got = set()
        while len(got) < 2:
            engine.advance(BUSY_MAX_DELAY)
            while len(got) < 2:
                try:
                    lsock.setblocking(False)
                    conn, _ = lsock.accept()
                except BlockingIOError:
                    break
                with conn:
                    conn.settimeout(10)
                    got.add(read_packet(conn))
        assert got == {first, second}
    finally:
        for sock in [lsock] + fillers:
            sock.close()
