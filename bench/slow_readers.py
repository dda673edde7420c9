#!/usr/bin/env python3
"""Router memory per client that stops reading a large response.

Usage::

    python3 bench/slow_readers.py [--clients 1000] [--size 1048576] [--tree DIR]
                                  [--uwsgi PATH | --no-uwsgi] [--keep-logs]

About 30 s per router.  Prints the exact command lines and one table; nothing here
asserts a figure.

Theory of operation
-------------------
``bench/build/backend`` (built with ``make -C bench``) answers ``PATH_INFO=/bytes/N``
with N bytes.  The router under test forwards to it: ``ours`` is
``python3 -m uwsgi_fastrouter`` with ``PYTHONPATH`` set to ``--tree`` (default: the
repository this script is in, so an older checkout can be measured with the same
script), ``uwsgi`` the real FastRouter when a binary is found (``--uwsgi``,
``$UWSGI_BIN``).

The script opens ``--clients`` connections, sends each a request for ``--size`` bytes
and never reads a byte.  Each response fills the client's receive buffer, then the
router's send buffer to that client; what the router then still holds in its own
memory is what this measures.  Once the router's RSS and CPU time have not moved for
two seconds (every session is stuck), ``(RSS now - RSS before) / clients`` is the cost
of one slow reader.  The bytes the clients' kernels hold (``FIONREAD``) are shown too:
they are the same for every router and are not router memory.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
from typing import Dict, List, Optional

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
sys.path.insert(0, BENCH_DIR)

import processes  # noqa: E402  (siblings in bench/)
import proctree  # noqa: E402

BACKEND_BIN = os.path.join(BENCH_DIR, "build", "backend")
HOST = "slow.bench"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=1000, help="clients that never read (1000)")
    p.add_argument("--size", type=int, default=1 << 20, help="response size in bytes (1 MiB)")
    p.add_argument("--tree", default=REPO_DIR, help="source tree whose uwsgi_fastrouter is run as 'ours'")
    p.add_argument("--uwsgi", default=None, help="uWSGI binary for the reference row ($UWSGI_BIN)")
    p.add_argument("--no-uwsgi", action="store_true", help="measure ours only")
    p.add_argument("--small-window", action="store_true",
                   help="clients advertise a small receive window and an Internet MSS (SO_RCVBUF "
                        "4096, TCP_MAXSEG 1448), as a client that never reads does on purpose")
    p.add_argument("--settle", type=float, default=2.0, help="seconds without change that count as stuck")
    p.add_argument("--keep-logs", action="store_true")
    return p.parse_args(argv)


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))


def request(size: int) -> bytes:
    return processes.uwsgi_request(HOST, "/bytes/%d" % size)


def wait_stuck(pid: int, settle: float, limit: float = 120.0) -> None:
    """Until the router's RSS and CPU time have not changed for *settle* seconds."""
    deadline = time.monotonic() + limit
    last = None
    since = time.monotonic()
    while time.monotonic() < deadline:
        now = (proctree.tree_rss_kib(pid), proctree.tree_sched_seconds(pid) // 0.01)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= settle:
            return
        time.sleep(0.1)


def measure(name: str, argv: List[str], port: int, a: argparse.Namespace, workdir: str,
            env: Dict[str, str]) -> dict:
    log_path = os.path.join(workdir, name + ".log")
    router = processes.spawn(name, argv, log_path, cwd=workdir, env=env)
    clients: List[socket.socket] = []
    try:
        if not processes.wait_serving(router, port, 20.0, host=HOST):
            raise RuntimeError("%s did not serve:\n%s" % (name, router.log_tail()))
        # a few complete big responses first: buffers the router keeps anyway are counted out
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(request(a.size))
                while s.recv(1 << 20):
                    pass
        wait_stuck(router.pid, a.settle)
        rss_before = proctree.tree_rss_kib(router.pid)
        cpu_before = proctree.tree_cpu_seconds(router.pid)
        for _ in range(a.clients):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if a.small_window:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1448)
            s.settimeout(10)
            s.connect(("127.0.0.1", port))
            s.sendall(request(a.size))
            clients.append(s)
        t0 = time.monotonic()
        wait_stuck(router.pid, a.settle)
        settled = time.monotonic() - t0
        rss_after = proctree.tree_rss_kib(router.pid)
        queued = 0
        buf = bytearray(4)
        for s in clients:
            fcntl.ioctl(s.fileno(), termios.FIONREAD, buf)
            queued += struct.unpack("i", buf)[0]
        return {
            "rss_before": rss_before, "rss_after": rss_after,
            "per_client": (rss_after - rss_before) / a.clients,
            "client_queues": queued / a.clients / 1024,
            "cpu": proctree.tree_cpu_seconds(router.pid) - cpu_before,
            "settled": settled, "alive": router.alive(),
        }
    finally:
        for s in clients:
            s.close()
        processes.stop(router, signal.SIGINT)


def main(argv: Optional[List[str]] = None) -> int:
    a = parse_args(argv)
    if not os.access(BACKEND_BIN, os.X_OK):
        subprocess.run(["make", "-C", BENCH_DIR], check=True, stdout=subprocess.DEVNULL)
    raise_fd_limit(3 * a.clients + 200)
    uwsgi = None if a.no_uwsgi else (a.uwsgi or os.environ.get("UWSGI_BIN") or shutil.which("uwsgi"))
    workdir = tempfile.mkdtemp(prefix="slow-readers-")
    backend, backend_addr = processes.spawn_listening(
        "backend", [BACKEND_BIN, "-p", "0", "-b", "4096"], os.path.join(workdir, "backend.log"))
    results = {}
    commands = {"backend": backend.argv}
    try:
        env = dict(os.environ, PYTHONPATH=os.path.abspath(a.tree))
        targets = [("ours", [sys.executable, "-m", "uwsgi_fastrouter", "--listen", "1024",
                             "--fastrouter-timeout", "600", "--fastrouter-to", backend_addr])]
        if uwsgi:
            # at its default buffer size (4 KiB): what its users run, and its smallest
            targets.append(("uwsgi", [uwsgi, "--master", "--die-on-term", "--listen", "1024",
                                      "--fastrouter-timeout", "600", "--fastrouter-to", backend_addr]))
        for name, base in targets:
            port = processes.free_port()
            argv_ = base + ["--fastrouter", "127.0.0.1:%d" % port]
            commands[name] = argv_
            results[name] = measure(name, argv_, port, a, workdir, env)
    finally:
        processes.stop(backend, signal.SIGINT)
        if not a.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print("logs in", workdir)
    print("commands:")
    for name, cmd in commands.items():
        print("  %-8s %s" % (name, " ".join(cmd)))
    print("ours = %s" % os.path.abspath(a.tree))
    print("%d clients, each asking for %d bytes and reading none%s\n"
          % (a.clients, a.size, " (SO_RCVBUF 4096, TCP_MAXSEG 1448)" if a.small_window else ""))
    print("%-6s %12s %12s %14s %16s %10s %9s" % ("router", "RSS before", "RSS after", "KiB per client",
                                              "KiB in client q", "CPU s", "settled s"))
    for name, r in results.items():
        print("%-6s %9.1f MiB %8.1f MiB %14.1f %16.1f %10.2f %9.1f" % (
            name, r["rss_before"] / 1024, r["rss_after"] / 1024, r["per_client"], r["client_queues"],
            r["cpu"], r["settled"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
