"""--fastrouter-post-buffering: bodies are read whole before any node is contacted."""

from __future__ import annotations

import hashlib
import os
import select
import socket
import threading
import time

import pytest

from backends import RecordingBackend, connect, uwsgi_packet
from support import files_open_under, start_router, wait_until

MASTER = pytest.mark.parametrize("master", [[], ["--master"]], ids=["single", "master"])


def body_request(length: int):
    return [(b"HTTP_HOST", b"example.com"), (b"CONTENT_LENGTH", str(length).encode())]


def read_all(sock) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_node_sees_the_head_only_after_the_whole_body(tmp_path):
    with RecordingBackend("pb") as node:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address,
                               "--fastrouter-post-buffering", "8192"])
        for size in (5000, 8192, 8193, 300 * 1024):
            body = os.urandom(size)
            with connect(router.addresses[0]) as sock:
                sock.sendall(uwsgi_packet(body_request(size)) + body[:size // 2])
                # A bodyless request on another connection is a barrier: once it is
                # answered the router has read the first one's head; with the body still
                # incomplete the node must not have seen that first request.
                accepted = len(node.accept_times)
                with connect(router.addresses[0]) as other:
                    other.sendall(uwsgi_packet([(b"HTTP_HOST", b"h")]))
                    assert read_all(other).startswith(b"HTTP/1.0 200")
                assert len(node.accept_times) == accepted + 1
                sock.sendall(body[size // 2:])
                answer = read_all(sock)
            assert hashlib.sha1(body).hexdigest().encode() in answer, size
            assert node.requests[-1].body == body


def test_large_body_goes_through_a_temporary_file_in_the_given_dir(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    with RecordingBackend("pb") as node:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address,
                               "--fastrouter-post-buffering", "4096",
                               "--fastrouter-post-buffering-dir", str(spool)])
        body = os.urandom(3 * 1024 * 1024)
        with connect(router.addresses[0]) as sock:
            sock.sendall(uwsgi_packet(body_request(len(body))) + body[:1000])
            # while buffering, the router holds an (unlinked) temp file in that dir
            wait_until(lambda: any(os.readlink("/proc/%d/fd/%s" % (router.pid, fd)).startswith(str(spool))
                                   for fd in os.listdir("/proc/%d/fd" % router.pid)),
                       what="a temp file under the post-buffering dir")
            assert os.listdir(spool) == []          # unlinked
            sock.sendall(body[1000:])
            sock.shutdown(socket.SHUT_WR)           # half-close does not hurt
            answer = read_all(sock)
        assert hashlib.sha1(body).hexdigest().encode() in answer


def test_a_stalled_body_is_timed_out_and_its_file_removed(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    with RecordingBackend("pb") as node:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address,
                               "--fastrouter-post-buffering", "10", "--fastrouter-timeout", "1",
                               "--fastrouter-post-buffering-dir", str(spool)])
        with connect(router.addresses[0]) as sock:
            sock.sendall(uwsgi_packet(body_request(100000)) + b"x" * 5000)
            assert read_all(sock) == b""             # closed after the time-out
        router.wait_for_log("timeout in state RECV_BODY")
        wait_until(lambda: not any(os.readlink("/proc/%d/fd/%s" % (router.pid, fd)).startswith(str(spool))
                                   for fd in os.listdir("/proc/%d/fd" % router.pid)),
                   what="temp file released")
        assert node.count == 0


def test_requests_without_a_body_stream_as_usual():
    with RecordingBackend("pb") as node:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address,
                               "--fastrouter-post-buffering", "8192"])
        with connect(router.addresses[0]) as sock:
            sock.sendall(uwsgi_packet([(b"HTTP_HOST", b"h")]))
            assert read_all(sock).startswith(b"HTTP/1.0 200")


@pytest.mark.parametrize("limit", ["8192", "2"])   # memory, temp file
def test_bytes_past_content_length_in_the_same_packet_are_still_forwarded(limit):
    with RecordingBackend("pb", read_to_eof=True) as node:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address,
                               "--fastrouter-post-buffering", limit])
        with connect(router.addresses[0]) as sock:
            sock.sendall(uwsgi_packet(body_request(5)) + b"hello" + b"extra")
            sock.shutdown(socket.SHUT_WR)
            assert read_all(sock).startswith(b"HTTP/1.0 200")
        assert node.requests[0].body == b"helloextra"


def trickle_until_closed(sock, bound: float = 20.0) -> bool:
    """Send one body byte every 0.2 s (a client too slow for the minimum rate, but never
    idle for a whole time-out) until the router closes; False if it is still open after
    *bound* seconds."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        try:
            sock.send(b"x")
        except OSError:              # reset: closed with our bytes unread
            return True
        readable, _, _ = select.select([sock], [], [], 0.2)   # paces the bytes, sees the close
        if readable:
            try:
                return sock.recv(1) == b""
            except ConnectionResetError:
                return True
    return False


@MASTER
def test_a_body_slower_than_the_minimum_rate_is_closed_and_its_file_removed(tmp_path, master):
    spool = tmp_path / "spool"
    spool.mkdir()
    with RecordingBackend("pb") as node:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address,
                               "--fastrouter-post-buffering", "10", "--fastrouter-timeout", "1",
                               "--fastrouter-post-buffering-min-rate", "100000",
                               "--fastrouter-post-buffering-dir", str(spool)] + master)
        with connect(router.addresses[0]) as sock:
            sock.sendall(uwsgi_packet(body_request(100000)) + b"x" * 100)
            wait_until(lambda: files_open_under(router.pid, spool), what="a temp file for the body")
            # allowed: 1 s + 100000 bytes / 100000 bytes/s; the idle time-out never strikes
            assert trickle_until_closed(sock), "the trickled body still holds the session"
        router.wait_for_log(r"request body not complete after 2\.0 seconds \(\d+ of 100000 bytes missing")
        wait_until(lambda: not files_open_under(router.pid, spool), what="temp file released")
        assert os.listdir(spool) == []
        # the router still serves, and a body that keeps the rate goes through
        body = os.urandom(50000)
        with connect(router.addresses[0]) as sock:
            sock.sendall(uwsgi_packet(body_request(len(body))) + body)
            assert hashlib.sha1(body).hexdigest().encode() in read_all(sock)
        assert node.count == 1


@MASTER
def test_a_body_over_the_maximum_is_refused_while_others_are_served(tmp_path, master):
    spool = tmp_path / "spool"
    spool.mkdir()
    with RecordingBackend("pb") as node:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address,
                               "--fastrouter-post-buffering", "4096",
                               "--fastrouter-post-buffering-max", "100000",
                               "--fastrouter-post-buffering-dir", str(spool)] + master)
        with connect(router.addresses[0]) as other:
            other.sendall(uwsgi_packet(body_request(100000)) + b"y" * 1000)   # at the cap: fine
            with connect(router.addresses[0]) as sock:
                sock.sendall(uwsgi_packet(body_request(100001)) + b"x" * 1000)
                assert read_all(sock) == b""                       # closed without a byte
            router.wait_for_log(r"request body of 100001 bytes refused: over "
                                r"--fastrouter-post-buffering-max 100000")
            other.sendall(b"y" * 99000)
            answer = read_all(other)
        assert hashlib.sha1(b"y" * 100000).hexdigest().encode() in answer
        assert node.count == 1
        wait_until(lambda: not files_open_under(router.pid, spool), what="temp files released")
        assert os.listdir(spool) == []
