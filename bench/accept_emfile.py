#!/usr/bin/env python3
"""A router out of file descriptors: what a waiting stats client costs.

Usage::

    python3 bench/accept_emfile.py [--tree PATH] [--seconds 3] [--master]

Starts ``python -m uwsgi_fastrouter`` from *PATH* (default: this checkout) with a TCP
listener and a TCP stats server (``--stats-http``, so idle stats clients hold a
descriptor), lowers its ``RLIMIT_NOFILE`` to what it uses plus 8 with ``prlimit``,
opens 30 idle stats connections (the first few fill the table), then for *seconds*
keeps one more stats client waiting at all times and counts: log lines mentioning
``accept``, CPU seconds of the process serving the stats (from ``/proc/PID/stat``),
and waiting clients closed by the router.  Nothing here asserts anything; run it on
two trees (``git worktree add /tmp/old COMMIT``) to compare.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_seconds(pid: int) -> float:
    with open("/proc/%d/stat" % pid, "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fd_count(pid: int) -> int:
    return len(os.listdir("/proc/%d/fd" % pid))


def wait_for(path: str, pattern: str, timeout: float = 20.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, errors="replace") as f:
            m = re.search(pattern, f.read())
        if m:
            return m
        time.sleep(0.05)
    raise SystemExit("timed out waiting for %r in %s" % (pattern, path))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", default=HERE)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--master", action="store_true")
    args = ap.parse_args()

    backend = socket.socket()
    backend.bind(("127.0.0.1", 0))
    backend.listen(8)
    with tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False) as logf:
        log_path = logf.name
    argv = [sys.executable, "-m", "uwsgi_fastrouter", "--fastrouter", "127.0.0.1:0",
            "--fastrouter-to", "127.0.0.1:%d" % backend.getsockname()[1],
            "--fastrouter-stats", "127.0.0.1:0", "--stats-http", "--socket-timeout", "60"]
    if args.master:
        argv.append("--master")
    env = dict(os.environ, PYTHONPATH=args.tree)
    with open(log_path, "w") as out:
        proc = subprocess.Popen(argv, cwd=args.tree, env=env, stdout=out, stderr=subprocess.STDOUT)
    held = []
    try:
        m = wait_for(log_path, r"stats server enabled on 127\.0\.0\.1:(\d+)")
        stats = ("127.0.0.1", int(m.group(1)))
        time.sleep(0.5)  # let a master spawn its router before its descriptors are counted
        pid = proc.pid
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (fd_count(pid) + 8, hard))
        for _ in range(30):
            held.append(socket.create_connection(stats, timeout=5))
        with open(log_path, errors="replace") as f:
            lines0 = sum(1 for line in f if "accept" in line)
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        closed = 0
        waiting = socket.create_connection(stats, timeout=5)
        while time.monotonic() - t0 < args.seconds:
            readable, _, _ = select.select([waiting], [], [], 0.05)
            if readable:
                try:
                    gone = waiting.recv(1) == b""
                except ConnectionResetError:
                    gone = True
                if gone:
                    closed += 1
                    waiting.close()
                    waiting = socket.create_connection(stats, timeout=5)
        wall = time.monotonic() - t0
        cpu = cpu_seconds(pid) - cpu0
        waiting.close()
        with open(log_path, errors="replace") as f:
            lines = sum(1 for line in f if "accept" in line) - lines0
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        print("tree %s%s: %.1f s out of descriptors: %d accept log lines, %.2f s CPU (%.0f %%), "
              "%d waiting clients closed by the router"
              % (args.tree, " --master" if args.master else "", wall, lines, cpu,
                 100 * cpu / wall, closed))
    finally:
        for s in held:
            s.close()
        proc.send_signal(signal.SIGINT)  # a brutal shutdown, with or without a master
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        backend.close()
        os.unlink(log_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
