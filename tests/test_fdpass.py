"""Handing clients over to UNIX-socket nodes (decisions.md D2)."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from backends import FdTakingBackend, RecordingBackend, fd_count, uwsgi_packet
from support import sock_path, start_router, start_uwsgi_app, wait_until

from uwsgi_fastrouter.fdpass import FdPassError, recv_fds, send_fds
from uwsgi_fastrouter.handoff import CHECK_EVERY, TRUST_AFTER

GET = [(b"HTTP_HOST", b"example.com"), (b"PATH_INFO", b"/"), (b"CONTENT_LENGTH", b"")]


def exchange(address: str, pairs, body: bytes = b""):
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(uwsgi_packet(pairs) + body)
        me = sock.getsockname()
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return me, data
            data += chunk


def test_send_and_receive_descriptors():
    a, b = socket.socketpair()
    r, w = socket.socketpair()
    with a, b, r, w:
        assert send_fds(a, b"hello", [r.fileno(), w.fileno()]) == 5
        data, fds, _ = recv_fds(b, 100, 1)            # one more than room: the surplus is closed
        assert data == b"hello" and len(fds) == 1
        received = socket.socket(fileno=fds[0])
        with received:
            w.sendall(b"ping")
            assert received.recv(4) == b"ping"


def test_truncated_control_message_closes_what_arrived():
    a, b = socket.socketpair()
    with a, b:
        many = [socket.socket() for _ in range(8)]
        try:
            send_fds(a, b"x", [s.fileno() for s in many])
            with pytest.raises(FdPassError):
                recv_fds(b, 10, 0)
        finally:
            for s in many:
                s.close()


def test_a_node_that_takes_the_fd_answers_the_client_directly(tmp_path):
    path = sock_path(tmp_path, "fd.sock")
    with FdTakingBackend(path) as node:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", path])
        addr = router.addresses[0]
        me, answer = exchange(addr, GET)
        assert answer == b"HTTP/1.0 200 OK\r\n\r\ntaken peer=%s:%d" % (me[0].encode(), me[1])
        before = fd_count(router.pid)
        for _ in range(20):
            exchange(addr, GET)
        assert node.taken == 21 and node.relayed == 0
        wait_until(lambda: fd_count(router.pid) == before, what="router holds no client fd")


@pytest.mark.parametrize("master", [[], ["--master"]], ids=["single", "master"])
def test_a_request_without_content_length_is_handed_over_unless_chunked(tmp_path, master):
    """uWSGI reads a missing CONTENT_LENGTH as 0: no body, so the client is handed over
    like one with an empty CONTENT_LENGTH (D2); Transfer-Encoding means a body follows."""
    path = sock_path(tmp_path, "fd.sock")
    with FdTakingBackend(path) as node:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", path] + master)
        me, answer = exchange(router.addresses[0], [(b"HTTP_HOST", b"h"), (b"PATH_INFO", b"/")])
        assert answer == b"HTTP/1.0 200 OK\r\n\r\ntaken peer=%s:%d" % (me[0].encode(), me[1])
        assert node.taken == 1 and node.ancillary_seen == 1
        chunked = [(b"HTTP_HOST", b"h"), (b"HTTP_TRANSFER_ENCODING", b"chunked")]
        _, answer = exchange(router.addresses[0], chunked)
        assert answer.endswith(b"relayed")
        assert node.taken == 1 and node.ancillary_seen == 1 and node.relayed == 1


def test_requests_with_a_body_and_no_fd_passing_are_relayed(tmp_path):
    path = sock_path(tmp_path, "fd.sock")
    with FdTakingBackend(path) as node:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", path])
        _, answer = exchange(router.addresses[0], [(b"HTTP_HOST", b"h"), (b"CONTENT_LENGTH", b"4")], b"body")
        assert answer.endswith(b"relayed") and node.ancillary_seen == 0
        off = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", path, "--no-fd-passing"])
        _, answer = exchange(off.addresses[0], GET)
        assert answer.endswith(b"relayed") and node.ancillary_seen == 0


def test_nothing_is_passed_over_tcp():
    seen = []
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    import threading

    def serve():
        conn, _ = lsock.accept()
        with conn:
            data, fds, _ = recv_fds(conn, 4, 4)
            seen.append(len(fds))
            rest = data + conn.recv(4 - len(data))
            conn.recv(rest[1] | rest[2] << 8)
            conn.sendall(b"HTTP/1.0 200 OK\r\n\r\ntcp")

    t = threading.Thread(target=serve)
    t.start()
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to",
                           "127.0.0.1:%d" % lsock.getsockname()[1]])
    _, answer = exchange(router.addresses[0], GET)
    t.join(10)
    lsock.close()
    assert answer.endswith(b"tcp") and seen == [0]


@pytest.mark.interop
@pytest.mark.parametrize("trust", [[], ["--fastrouter-trust-fd-passing"]], ids=["verdict", "trust"])
def test_a_real_uwsgi_node_on_a_unix_socket_still_answers_every_request(tmp_path, trust):
    app = start_uwsgi_app(tmp_path, "def application(e, s):\n    s('200 OK', [])\n    return [b'real uwsgi']\n")
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", app.address] + trust)
    # With the trust option too: a node that never takes a descriptor is never trusted.
    for _ in range(TRUST_AFTER + 12):
        _, answer = exchange(router.addresses[0], GET)
        assert answer.endswith(b"real uwsgi")


def test_trusted_handoffs_do_not_wait_for_the_verdict(tmp_path):
    path = sock_path(tmp_path, "fd.sock")
    with FdTakingBackend(path) as node:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", path,
                               "--fastrouter-trust-fd-passing"])
        addr = router.addresses[0]
        for _ in range(TRUST_AFTER):
            exchange(addr, GET)          # verified: the node's close is the verdict
        before = fd_count(router.pid)
        # The node now keeps the router's connections open.  The client still sees
        # its answer end (EOF) only because the router closed its copy right after
        # handing it over; waiting for a verdict would hang it (10 s socket bound).
        node.hold = True
        for _ in range(20):
            me, answer = exchange(addr, GET)
            assert answer == b"HTTP/1.0 200 OK\r\n\r\ntaken peer=%s:%d" % (me[0].encode(), me[1])
        assert node.taken == TRUST_AFTER + 20 and len(node.held) == 20
        wait_until(lambda: fd_count(router.pid) == before, what="router holds neither socket")


def test_trust_is_withdrawn_from_a_node_that_ignores_descriptors(tmp_path):
    """The documented price of the option: a trusted node replaced by one that ignores
    descriptors loses the unverified requests up to the next check, and no more."""
    path = sock_path(tmp_path, "fd.sock")
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", path,
                           "--fastrouter-trust-fd-passing"])
    addr = router.addresses[0]
    with FdTakingBackend(path) as node:
        for _ in range(TRUST_AFTER + 2):
            exchange(addr, GET)
        assert node.taken == TRUST_AFTER + 2
    os.unlink(path)
    with FdTakingBackend(path, take=False) as node:
        answers = [exchange(addr, GET)[1] for _ in range(CHECK_EVERY)]
    lost = CHECK_EVERY - TRUST_AFTER - 2     # unchecked handoffs before the 64th, the check
    assert answers[:lost] == [b""] * lost
    assert answers[lost:] == [b"HTTP/1.0 200 OK\r\n\r\nrelayed"] * (CHECK_EVERY - lost)
    assert node.ancillary_seen == CHECK_EVERY
    router.wait_for_log("node ignored a passed descriptor")
