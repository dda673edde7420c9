"""--fastrouter-http-errors in-process: which failure gets which answer, and when the
client gets none (off, after a response byte, after a handoff)."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios

import pytest

from backends import uwsgi_packet
from support import free_dead_tcp_address, parse_http_response, sock_path
from test_engine import (GET, TIMEOUT, RecordingSession, engines, log_lines,  # noqa: F401
                         read_packet, tcp_listener)

from uwsgi_fastrouter.record import FAILED, NO_ROUTE
from uwsgi_fastrouter.httperrors import RESPONSES
from uwsgi_fastrouter.router import Router
from uwsgi_fastrouter.session import CLOSED, RELAY

NO_KEY = [(b"PATH_INFO", b"/")]


def read_all(client: socket.socket) -> bytes:
    client.settimeout(10)
    out = b""
    while True:
        try:
            chunk = client.recv(65536)
        except ConnectionResetError:
            raise AssertionError("reset after %r" % out)
        if not chunk:
            return out
        out += chunk


def test_the_answers_are_complete_http_1_0_responses():
    for status, raw in RESPONSES.items():
        got, headers, body = parse_http_response(raw)
        assert got == status and raw.startswith(b"HTTP/1.0 %d " % status)
        assert headers["connection"] == "close" and int(headers["content-length"]) == len(body)
        assert body.startswith(b"%d " % status) and len(raw) < 200


def test_no_key_is_a_503_logged_as_before(engines, log_lines):
    engine = engines(Router(to=["127.0.0.1:1"]), http_errors=True)
    client, session = engine.client(uwsgi_packet(NO_KEY))
    assert session.state == CLOSED and session.outcome == NO_ROUTE
    assert read_all(client) == RESPONSES[503]
    assert "the request carries no key" in log_lines.getvalue()


def test_an_unknown_key_is_a_503(engines, sock_dir):
    engine = engines(Router(use_base=sock_path(sock_dir, "")), http_errors=True)
    client, session = engine.client(uwsgi_packet([(b"HTTP_HOST", b"../x")]))
    assert session.state == CLOSED and session.outcome == NO_ROUTE
    assert read_all(client) == RESPONSES[503]


def test_every_connect_failing_is_a_502(engines, log_lines):
    dead1, reserve1 = free_dead_tcp_address()
    dead2, reserve2 = free_dead_tcp_address()
    with reserve1, reserve2:
        engine = engines(Router(to=[dead1, dead2]), http_errors=True)
        client, session = engine.client(uwsgi_packet(GET))
        engine.until(lambda: session.state == CLOSED, "the session closed")
        assert session.outcome == FAILED
        assert read_all(client) == RESPONSES[502]
        assert "all nodes failed (2 retries)" in log_lines.getvalue()


def tcp_client(engine, first: bytes):
    """Like Engine.client, on a loopback TCP connection (a close with unread bytes
    is a reset there)."""
    listener, address = tcp_listener()
    with listener:
        client = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    ours.settimeout(None)
    engine.peers.append(client)
    client.sendall(first)
    session = RecordingSession(engine.server.context, ours, ("127.0.0.1", 1))
    engine.server.sessions.add(session)
    engine.until(lambda: unread(ours) >= len(first), "the request in the router's socket")
    session.start()
    return client, session


def unread(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def test_a_refused_request_with_an_unread_body_still_gets_its_answer(engines):
    dead, reserve = free_dead_tcp_address()
    with reserve:
        engine = engines(Router(to=[dead], max_retries=0), http_errors=True)
        head = uwsgi_packet(GET[:2] + [(b"CONTENT_LENGTH", b"200000")])
        client, session = tcp_client(engine, head + b"x" * 50000)
        engine.until(lambda: session.state == CLOSED, "the session closed")
        engine.until(lambda: session.state == CLOSED, "the session closed")
        assert read_all(client) == RESPONSES[502]


def test_a_node_that_says_nothing_until_the_timeout_is_a_504(engines, log_lines):
    node, address = tcp_listener()
    with node:
        engine = engines(Router(to=[address]), http_errors=True)
        client, session = engine.client(uwsgi_packet(GET))
        conn, _ = node.accept()
        with conn:
            read_packet(conn)
            engine.until(lambda: session.state == RELAY, "relaying")
            engine.advance(TIMEOUT + 1)
            assert session.state == CLOSED
            assert read_all(client) == RESPONSES[504]
            assert "timeout in state RELAY" in log_lines.getvalue()


def test_a_node_that_closes_without_a_byte_is_a_502(engines):
    node, address = tcp_listener()
    with node:
        engine = engines(Router(to=[address]), http_errors=True)
        client, session = engine.client(uwsgi_packet(GET))
        conn, _ = node.accept()
        read_packet(conn)
        engine.until(lambda: session.state == RELAY, "relaying")
        conn.close()
        engine.until(lambda: session.state == CLOSED, "the session closed")
        assert read_all(client) == RESPONSES[502]


def test_after_the_first_response_byte_a_timeout_is_a_bare_close(engines):
    node, address = tcp_listener()
    with node:
        engine = engines(Router(to=[address]), http_errors=True)
        client, session = engine.client(uwsgi_packet(GET))
        conn, _ = node.accept()
        with conn:
            read_packet(conn)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            engine.until(lambda: session.down_peek, "the first response bytes relayed")
            engine.advance(TIMEOUT + 1)
            assert session.state == CLOSED
            assert read_all(client) == b"HTTP/1.1 200 OK\r\n"


def test_off_by_default_every_failure_is_a_bare_close(engines):
    dead, reserve = free_dead_tcp_address()
    node, address = tcp_listener()
    with reserve, node:
        engine = engines(Router(to=[address], fallback=[]))
        client, session = engine.client(uwsgi_packet(NO_KEY))
        assert read_all(client) == b""
        client, session = engine.client(uwsgi_packet(GET))
        conn, _ = node.accept()
        with conn:
            read_packet(conn)
            engine.until(lambda: session.state == RELAY, "relaying")
            engine.advance(TIMEOUT + 1)
            assert read_all(client) == b""
        failing = engines(Router(to=[dead]))
        client, session = failing.client(uwsgi_packet(GET))
        failing.until(lambda: session.state == CLOSED, "the session closed")
        assert read_all(client) == b""


def test_no_answer_once_the_client_may_be_in_a_nodes_hands(engines, sock_dir):
    path = sock_path(sock_dir, "node.sock")
    node = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    node.bind(path)
    node.listen(8)
    with node:
        engine = engines(Router(to=[path]), http_errors=True)
        client, session = engine.client(uwsgi_packet(GET))
        conn, _ = node.accept()
        with conn:
            engine.until(lambda: session.state == RELAY, "relaying")
            assert session.fd_passed
            conn.close()                # the node took the client (or dropped it): not ours
            engine.until(lambda: session.state == CLOSED, "the session closed")
        assert read_all(client) == b""
