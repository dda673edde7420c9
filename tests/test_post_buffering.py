"""--fastrouter-post-buffering: bodies are read whole before any node is contacted."""

from __future__ import annotations

import hashlib
import os
import socket
import threading

from backends import RecordingBackend, connect, uwsgi_packet
from support import start_router, wait_until


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


import pytest


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
