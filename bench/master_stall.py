#!/usr/bin/env python3
"""A stopped router process under the master: what the others and the master pay.

Usage::

    python3 bench/master_stall.py [--tree PATH] [--updates 1500] [--flood-mib 32]

Starts ``python -m uwsgi_fastrouter --master`` from *PATH* (default: this checkout)
with three router processes and a UNIX subscription server, SIGSTOPs router process
1, then:

1. sends *updates* subscription datagrams (one key each) and prints how long the
   master took to accept them all, and then how long until each running process
   routes the last key (checked with the other running process stopped, so the
   one checked takes the connection);
2. sends *flood-mib* MiB more in 60 KB datagrams and prints the master's resident
   memory before and after (``VmRSS``) and whether it replaced process 1.

Nothing here asserts anything; run it on two trees (``git worktree add /tmp/old
COMMIT``) to compare.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def packet(pairs) -> bytes:
    body = b"".join(len(k).to_bytes(2, "little") + k + len(v).to_bytes(2, "little") + v
                    for k, v in pairs)
    return bytes([224]) + len(body).to_bytes(2, "little") + b"\0" + body


def key(i: int) -> bytes:
    return b"k%05d.example" % i


class Router:
    def __init__(self, tree: str, sub: str) -> None:
        env = dict(os.environ, PYTHONPATH=tree)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uwsgi_fastrouter", "--master", "--fastrouter", "127.0.0.1:0",
             "--fastrouter-processes", "3", "--fastrouter-subscription-server", sub],
            cwd=tree, env=env, stderr=subprocess.PIPE, text=True, errors="replace")
        self.lines: list = []
        self.port = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait(self, regex: str, timeout: float = 60.0) -> "re.Match":
        deadline = time.monotonic() + timeout
        pattern = re.compile(regex)
        while time.monotonic() < deadline:
            for line in list(self.lines):
                found = pattern.search(line)
                if found:
                    return found
            time.sleep(0.005)
        raise SystemExit("timed out waiting for %r" % regex)

    def pids(self) -> dict:
        return {int(i): int(p) for i, p in
                re.findall(r"spawned uWSGI fastrouter (\d+) \(pid: (\d+)\)", "".join(self.lines))}


def listening_port(pid: int) -> int:
    out = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "pid=%d," % pid in line:
            return int(line.split()[3].rsplit(":", 1)[1])
    raise SystemExit("no listener found for pid %d" % pid)


def routes(port: int, host: bytes) -> bool:
    vars_ = packet([(b"HTTP_HOST", host), (b"REQUEST_METHOD", b"GET"), (b"PATH_INFO", b"/")])
    vars_ = bytes([0]) + vars_[1:]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(vars_)
            return bool(sock.recv(64))
    except OSError:
        return False


def rss_kib(pid: int) -> int:
    with open("/proc/%d/status" % pid) as handle:
        return int(re.search(r"VmRSS:\s+(\d+)", handle.read()).group(1))


def backend() -> tuple:
    """A node that answers every connection with a few bytes."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nok")

    threading.Thread(target=serve, daemon=True).start()
    return server, b"127.0.0.1:%d" % server.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default=os.path.dirname(HERE))
    parser.add_argument("--updates", type=int, default=1500)
    parser.add_argument("--flood-mib", type=int, default=32)
    args = parser.parse_args()
    _server, address = backend()
    with tempfile.TemporaryDirectory() as tmp:
        sub = os.path.join(tmp, "sub.sock")
        router = Router(args.tree, sub)
        pids = {}
        try:
            router.wait(r"spawned uWSGI fastrouter 3")
            pids = router.pids()
            port = listening_port(router.proc.pid)
            os.kill(pids[1], signal.SIGSTOP)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            started = time.monotonic()
            for i in range(args.updates):
                sock.sendto(packet([(b"key", key(i)), (b"address", address)]), sub)
            router.wait(r"%s => new node" % key(args.updates - 1).decode())
            accepted = time.monotonic() - started
            print("%d updates accepted by the master in %.3f s (process 1 stopped)"
                  % (args.updates, accepted))
            for pid, other in ((pids[2], pids[3]), (pids[3], pids[2])):
                os.kill(other, signal.SIGSTOP)
                while not routes(port, key(args.updates - 1)):
                    pass
                print("  process %d routes the last key %.3f s after the first datagram"
                      % (pid, time.monotonic() - started))
                os.kill(other, signal.SIGCONT)
            before = rss_kib(router.proc.pid)
            pad = b"p" * 60000
            for i in range(args.flood_mib * (1 << 20) // len(pad)):
                sock.sendto(packet([(b"key", key(args.updates + i)), (b"address", address),
                                    (b"pad", pad)]), sub)
            router.wait(r"%s => new node" % key(args.updates + i).decode())
            after = rss_kib(router.proc.pid)
            replaced = any("unread: replacing it" in line for line in router.lines)
            dropped = sum("frame dropped" in line for line in router.lines)
            print("flood of %d MiB: master VmRSS %d -> %d KiB; process 1 replaced: %s; "
                  "'frame dropped' lines: %d" % (args.flood_mib, before, after, replaced, dropped))
        finally:
            for pid in pids.values():
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            router.proc.send_signal(signal.SIGINT)
            router.proc.wait(30)


if __name__ == "__main__":
    main()
