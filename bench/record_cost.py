#!/usr/bin/env python3
"""What one plain request costs the router's Python code, with the access log and the
metrics off and on: a count of bytecode instructions, which the machine's load does
not change.

Usage::

    python3 bench/record_cost.py [--requests 1024] [--tree DIR]

Prints one table; nothing here asserts a figure.

Theory of operation
-------------------
Everything runs in this process, on loopback: a listening socket for the clients, a
listening socket standing in for the node, and the package's own ``Server`` on a
``Reactor`` (imported from ``--tree``, default this repository, so an older checkout
is measured the same way).  For each request the script connects a client, sends a
bodyless uwsgi request, accepts it and hands the descriptor to the server's own
accept callback (as the acceptor does); then it plays the node (accept, read, answer
a small HTTP response, close) and runs loop passes until the session is gone.  Only
the router's part is traced: ``sys.settrace`` with per-opcode events counts every
bytecode instruction executed from the accept callback to the close (the flushes of
the access log's batches included, amortised over the requests).

Variants: ``off`` (neither), ``access log`` (``--fastrouter-access-log=FILE``,
default format), ``main log`` (the bare option: lines to the main log, here a file),
``metrics`` (the detailed counters of ``--fastrouter-metrics``).
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import tempfile
from typing import Callable, Dict, List, Optional

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def packet(pairs) -> bytes:
    body = b"".join(struct.pack("<H", len(k)) + k + struct.pack("<H", len(v)) + v for k, v in pairs)
    return struct.pack("<BHB", 0, len(body), 0) + body


REQUEST = packet([(b"HTTP_HOST", b"bench.example.com"), (b"PATH_INFO", b"/"),
                  (b"REQUEST_METHOD", b"GET"), (b"CONTENT_LENGTH", b""),
                  (b"REMOTE_ADDR", b"10.0.0.1"), (b"REMOTE_PORT", b"40000")])


class OpcodeCounter:
    """Counts the bytecode instructions executed while it is on."""

    def __init__(self) -> None:
        self.count = 0

    def _local(self, frame, event, arg):
        if event == "opcode":
            self.count += 1
        return self._local

    def _global(self, frame, event, arg):
        frame.f_trace_opcodes = True
        return self._local

    def run(self, func: Callable[[], None]) -> None:
        sys.settrace(self._global)
        try:
            func()
        finally:
            sys.settrace(None)


def measure(variant: str, requests: int, workdir: str) -> float:
    from uwsgi_fastrouter import log
    from uwsgi_fastrouter.accesslog import AccessLog
    from uwsgi_fastrouter.metrics import Counters
    from uwsgi_fastrouter.reactor import Reactor
    from uwsgi_fastrouter.router import Router
    from uwsgi_fastrouter.server import Server

    clients = socket.socket()
    clients.bind(("127.0.0.1", 0))
    clients.listen(64)
    node = socket.socket()
    node.bind(("127.0.0.1", 0))
    node.listen(64)
    node.settimeout(10)
    reactor = Reactor()
    main_log = open(os.path.join(workdir, "main-%s.log" % variant.replace(" ", "-")), "w")
    log.set_stream(main_log)
    access_log = None
    if variant == "access log":
        access_log = AccessLog(None, os.path.join(workdir, "access.log"), reactor)
    elif variant == "main log":
        access_log = AccessLog(None, None, reactor)
    server = Server(reactor, Router(to=["127.0.0.1:%d" % node.getsockname()[1]]), [],
                    access_log=access_log)
    if variant == "metrics":
        server.counters = Counters(detailed=True)
    start_session = server._session_starter(clients)
    counter = OpcodeCounter()

    def one_pass() -> None:
        reactor.call_soon(lambda: None)
        reactor.stop()
        reactor.run()

    def until_closed() -> None:
        while server.sessions:
            one_pass()

    try:
        for _ in range(requests):
            client = socket.create_connection(clients.getsockname())
            client.sendall(REQUEST)
            fd, addr = clients._accept()
            counter.run(lambda: start_session(fd, addr))
            conn, _ = node.accept()
            with conn:
                got = b""
                while len(got) < len(REQUEST):
                    got += conn.recv(65536)
                conn.sendall(ANSWER)
            counter.run(until_closed)
            answer = b""
            while True:
                data = client.recv(65536)
                if not data:
                    break
                answer += data
            client.close()
            assert answer == ANSWER, answer
        if access_log is not None:
            counter.run(access_log.flush)
    finally:
        server.stop()
        if access_log is not None:
            access_log.close()
        reactor.close()
        clients.close()
        node.close()
        log.set_stream(None)
        main_log.close()
    return counter.count / requests


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1024, help="requests per variant (1024)")
    p.add_argument("--tree", default=REPO_DIR, help="source tree whose uwsgi_fastrouter is measured")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    a = parse_args(argv)
    sys.path.insert(0, os.path.abspath(a.tree))
    results: Dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="record-cost-") as workdir:
        for variant in ("off", "access log", "main log", "metrics"):
            results[variant] = measure(variant, a.requests, workdir)
    print("tree %s, %d requests per variant" % (os.path.abspath(a.tree), a.requests))
    print("%-11s %22s %8s" % ("variant", "opcodes per request", "vs off"))
    for variant, count in results.items():
        print("%-11s %22.1f %+7.1f%%" % (variant, count, 100.0 * (count / results["off"] - 1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
