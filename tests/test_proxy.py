"""End to end through a real router process: forwarding, keys, retries, streaming, stats."""

from __future__ import annotations

import json
import os
import socket
import struct

import pytest

from backends import RecordingBackend, connect, fd_count, request, uwsgi_packet
from support import busy_unix_node, sock_path, start_router, wait_until

HOST = [(b"HTTP_HOST", b"example.com"), (b"PATH_INFO", b"/")]


@pytest.fixture
def backend():
    with RecordingBackend("b1") as b:
        yield b


def test_forwards_head_byte_identical_but_for_the_modifiers(backend):
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", backend.address])
    pairs = [(b"HTTP_HOST", b"h1"), (b"PATH_INFO", b"/x"), (b"CONTENT_LENGTH", b"5")]
    answer = request(router.addresses[0], pairs, body=b"hello" + b"extra", modifier1=5, modifier2=3)
    assert answer.startswith(b"HTTP/1.0 200 OK")
    got = backend.requests[0]
    sent = uwsgi_packet(pairs, 5, 3)
    assert (got.modifier1, got.modifier2) == (0, 0)
    assert got.raw[1:3] == sent[1:3] and got.raw[4:] == sent[4:]
    assert got.body == b"hello"


def test_round_robin_over_static_nodes(tmp_path):
    with RecordingBackend("a") as a, RecordingBackend("b", unix_path=str(tmp_path / "b.sock")) as b:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", a.address,
                               "--fastrouter-to", b.address])
        seen = [request(router.addresses[0], HOST).split(b"node=")[1].split(b" ")[0] for _ in range(4)]
        assert seen == [b"a", b"b", b"a", b"b"]


@pytest.mark.parametrize("pairs,key", [
    ([(b"HTTP_HOST", b"h1")], b"h1"),
    ([(b"SERVER_NAME", b"s1")], b"s1"),
    ([(b"SERVER_NAME", b"s1"), (b"HTTP_HOST", b"h1")], b"h1"),
    ([(b"HTTP_HOST", b"h1"), (b"SERVER_NAME", b"s1")], b"h1"),
    ([(b"HTTP_HOST", b"h1"), (b"UWSGI_FASTROUTER_KEY", b"k1"), (b"SERVER_NAME", b"s1")], b"k1"),
    ([(b"UWSGI_FASTROUTER_KEY", b"k1"), (b"HTTP_HOST", b"h1")], b"k1"),
    ([(b"HTTP_HOST", b"example.com:8000")], b"example.com:8000"),
])
def test_key_precedence_picks_the_unix_socket(tmp_path, pairs, key):
    sockets = tmp_path / "s"
    sockets.mkdir()
    with RecordingBackend("n", unix_path=str(sockets / key.decode())) as node:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-use-base", str(sockets) + "/"])
        assert request(router.addresses[0], pairs).startswith(b"HTTP/1.0 200")
        assert node.count == 1


def test_use_pattern_and_force_key(tmp_path):
    (tmp_path / "forced").mkdir()
    with RecordingBackend("n", unix_path=str(tmp_path / "forced" / "uwsgi.sock")) as node:
        router = start_router(["--fastrouter", str(tmp_path / "fr.sock"),
                               "--fastrouter-use-pattern", str(tmp_path) + "/%s/uwsgi.sock",
                               "--fastrouter-force-key", "forced"])
        assert request(router.addresses[0], HOST).startswith(b"HTTP/1.0 200")
        assert node.count == 1


def test_requests_without_a_usable_key_are_closed_without_a_byte(backend):
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", backend.address])
    for pairs in ([], [(b"PATH_INFO", b"/")], [(b"HTTP_HOST", b"x" * 256)], [(b"HTTP_HOST", b"")]):
        assert request(router.addresses[0], pairs) == b""
    assert backend.count == 0
    assert request(router.addresses[0], [(b"HTTP_HOST", b"x" * 255)]).startswith(b"HTTP/1.0 200")


def test_dead_node_then_fallback_with_log_lines(backend):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_addr = "127.0.0.1:%d" % dead.getsockname()[1]
    dead.close()
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", dead_addr,
                           "--fastrouter-fallback", backend.address])
    assert request(router.addresses[0], HOST).startswith(b"HTTP/1.0 200")
    router.wait_for_log(r'unable to connect\(\) to node "%s" \(0 retries\)' % dead_addr)
    router.wait_for_log(r"example.com => marking %s as failed" % dead_addr)
    # within the grace time the dead node is "no route": closed (uWSGI's behaviour) ...
    assert request(router.addresses[0], HOST) == b""


def test_fallback_on_no_key_walks_at_most_three_fallbacks(backend):
    dead = []
    for _ in range(3):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        dead.append("127.0.0.1:%d" % s.getsockname()[1])
        s.close()
    # all static nodes dead -> "no route", which on-no-key sends down the fallback list
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", dead[2],
                           "--fastrouter-fallback-on-no-key",
                           "--fastrouter-fallback", dead[0], "--fastrouter-fallback", dead[1],
                           "--fastrouter-fallback", backend.address])
    # first request: dead[2] fails, then dead[0], dead[1], backend: served
    assert request(router.addresses[0], HOST).startswith(b"HTTP/1.0 200")
    # second: no route (dead[2] in grace) -> fallbacks from (1 retries): still served by the third
    assert request(router.addresses[0], HOST).startswith(b"HTTP/1.0 200")
    assert backend.count == 2


def test_missing_unix_socket_is_a_failed_connect_that_falls_back(tmp_path, backend):
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", str(tmp_path / "nobody.sock"),
                           "--fastrouter-fallback", backend.address])
    assert request(router.addresses[0], HOST).startswith(b"HTTP/1.0 200")
    router.wait_for_log(r"marking .*nobody.sock as failed")


def test_upload_and_download_are_streamed_intact(backend):
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", backend.address])
    body = os.urandom(3 * 1024 * 1024 + 17)
    answer = request(router.addresses[0], HOST + [(b"CONTENT_LENGTH", str(len(body)).encode())], body)
    import hashlib
    assert b"sha1=" + hashlib.sha1(body).hexdigest().encode() in answer
    size = 8 * 1024 * 1024 + 3
    answer = request(router.addresses[0], [(b"HTTP_HOST", b"h"), (b"PATH_INFO", b"/bytes/%d" % size)])
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert len(payload) == size
    assert payload[:256] == bytes(range(256))


def big_response_pattern(size: int) -> bytes:
    """What RecordingBackend sends as the body of PATH_INFO=/bytes/SIZE."""
    block = bytes(range(256)) * 256
    return (block * (size // len(block) + 1))[:size]


@pytest.mark.parametrize("node_family", ["tcp", "unix"])
def test_a_client_that_reads_slowly_gets_the_whole_response_intact(sock_dir, node_family):
    """Partial sends to a client with a small window: the bytes it could not take wait in
    the node's socket and are peeked again, never lost or sent twice."""
    unix_path = sock_path(sock_dir, "big.sock") if node_family == "unix" else None
    with RecordingBackend("big", unix_path=unix_path) as node:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address])
        size = 3 * 1024 * 1024 + 5
        host, port = router.addresses[0].rsplit(":", 1)
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(20)
            sock.connect((host, int(port)))
            sock.sendall(uwsgi_packet([(b"HTTP_HOST", b"h"), (b"PATH_INFO", b"/bytes/%d" % size)]))
            answer = bytearray()
            while True:
                chunk = sock.recv(1000)
                if not chunk:
                    break
                answer += chunk
        head, _, payload = bytes(answer).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") and len(payload) == size
        assert payload == big_response_pattern(size)


def test_client_half_close_still_gets_the_response(tmp_path):
    with RecordingBackend("eof", read_to_eof=True) as node:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address])
        answer = request(router.addresses[0], HOST, body=b"streamed body", half_close=True)
        assert answer.startswith(b"HTTP/1.0 200")
        assert node.requests[0].body == b"streamed body" and node.requests[0].half_closed


def test_timeout_closes_a_silent_backend_and_a_partial_head(backend):
    with RecordingBackend("hang", mode="hang") as hang:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", hang.address,
                               "--fastrouter-timeout", "1"])
        with connect(router.addresses[0], timeout=10) as sock:
            sock.sendall(uwsgi_packet(HOST))
            assert sock.recv(10) == b""          # closed by the router after ~1 s
        with connect(router.addresses[0], timeout=10) as sock:
            sock.sendall(uwsgi_packet(HOST)[:7])
            assert sock.recv(10) == b""
        router.wait_for_log(r"timeout")


def test_stats_json_shape(backend):
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", backend.address,
                           "--fastrouter-stats", "127.0.0.1:0"])
    request(router.addresses[0], HOST)
    host, port = router.stats_address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        raw = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
    assert raw.startswith(b'{\n\t"version":"2.0.31",\n\t"pid":')
    assert not raw.endswith(b"\n")
    doc = json.loads(raw)
    assert list(doc) == ["version", "pid", "uid", "gid", "cwd", "active_sessions", "fastrouter",
                         "static_nodes", "cheap", "uwsgi_fastrouter_version", "requests_ok", "no_route",
                         "connect_failed", "timeouts", "client_errors", "node_errors"]
    assert doc["fastrouter"] == [router.addresses[0]]
    assert doc["static_nodes"] == [{"name": backend.address, "hits": 1, "grace": 0}]
    assert b'\n"%s"\n\t],' % router.addresses[0].encode() in raw
    assert doc["cheap"] == 0


def test_bad_input_never_hurts_other_clients_and_leaks_no_fd(backend):
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", backend.address,
                           "--fastrouter-timeout", "2"])
    addr = router.addresses[0]
    assert request(addr, HOST).startswith(b"HTTP/1.0 200")
    wait_until(lambda: fd_count(router.pid) > 0)
    before = fd_count(router.pid)
    bad = [
        struct.pack("<BHB", 0, 5, 0) + b"\x00\x00abc",              # zero key length
        struct.pack("<BHB", 0, 6, 0) + b"\x01\x00k\x05\x00v",        # truncated value
        struct.pack("<BHB", 0, 2, 0) + b"\x01\x00",                  # 2 stray bytes
        b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",               # HTTP instead of uwsgi
    ]
    socks = []
    for payload in bad:
        s = connect(addr)
        s.sendall(payload)
        socks.append(s)
    # 1,000 idle connections that never send a byte
    idle = [connect(addr) for _ in range(1000)]
    for _ in range(20):
        assert request(addr, HOST).startswith(b"HTTP/1.0 200")
    for s in socks + idle:
        s.close()
    wait_until(lambda: fd_count(router.pid) == before, timeout=10, what="router fds back to %d" % before)
    assert request(addr, HOST).startswith(b"HTTP/1.0 200")


def test_unix_listener_file_is_removed_on_shutdown(tmp_path, backend):
    path = tmp_path / "fr.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))      # a socket file left behind by a dead process
    stale.close()
    router = start_router(["--fastrouter", str(path), "--fastrouter-to", backend.address])
    assert request(str(path), HOST).startswith(b"HTTP/1.0 200")
    assert router.stop() == 0
    assert not path.exists()


def test_fd_exhaustion_closes_the_excess_clients_and_recovers(backend):
    import resource
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", backend.address])
    addr = router.addresses[0]
    assert request(addr, HOST).startswith(b"HTTP/1.0 200")
    base = fd_count(router.pid)
    limit = base + 10
    soft, hard = resource.prlimit(router.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(router.pid, resource.RLIMIT_NOFILE, (limit, hard))
    held = []
    for _ in range(30):
        s = connect(addr)
        s.sendall(uwsgi_packet(HOST)[:6])     # accepted (data arrived), head incomplete
        held.append(s)
    router.wait_for_log(r"accept\(\): Too many open files")
    # the excess clients were closed, not left hanging
    import select
    readable, _, _ = select.select(held, [], [], 10)
    assert readable, "no client was closed by the router"
    closed = 0
    for s in readable:
        try:
            closed += s.recv(1) == b""
        except ConnectionResetError:
            closed += 1
    assert closed >= 1
    for s in held:
        s.close()
    resource.prlimit(router.pid, resource.RLIMIT_NOFILE, (soft, hard))
    wait_until(lambda: request(addr, HOST, timeout=5).startswith(b"HTTP/1.0 200"), timeout=10,
               what="router serving again after fd exhaustion")


def test_unix_node_with_a_full_listen_queue_is_waited_for_not_failed(tmp_path):
    import threading
    path = sock_path(tmp_path, "busy.sock")
    lsock, fillers = busy_unix_node(path)
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", path])
    result = {}

    def client():
        result["answer"] = request(router.addresses[0], HOST, timeout=20)

    t = threading.Thread(target=client)
    t.start()
    # drain the queue: the fillers first, then the router's connection
    lsock.settimeout(10)
    for _ in fillers:
        lsock.accept()[0].close()
    conn, _ = lsock.accept()
    with conn:
        head = conn.recv(4)
        conn.recv(head[1] | head[2] << 8)
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nbusy but fine")
    t.join(20)
    lsock.close()
    for f in fillers:
        f.close()
    assert result["answer"].endswith(b"busy but fine")
    assert "marking" not in router.log()
