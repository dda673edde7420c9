#!/usr/bin/env python3
"""How many requests fail while one of three nodes is killed under load.

Usage::

    python3 bench/node_failure.py [--uwsgi PATH] [--clients 16] [--duration 6] [--rounds 1]
                                  [--health-args "--fastrouter-health-check-interval 1 ..."]
                                  [--router-args "..."] [--tree DIR]

About 10 s per row and round.  Prints the command lines and one table; nothing here
asserts a figure.

Theory of operation
-------------------
Three real uWSGI application servers (``--master --processes 2``, TCP on loopback,
an app that answers ``ok`` at once) sit behind the router under test, listed with
``--fastrouter-to``.  ``--clients`` threads send bodyless uwsgi requests in a closed
loop through the router for ``--duration`` seconds; after a third of it, the first node
(its master and its workers) gets SIGKILL.  A request fails when its answer is not a
whole ``200`` (an empty answer: the router closed the client; a reset or no answer
within 10 s).  The rows:

* ``uWSGI``: the uWSGI 2.0.31 FastRouter itself (``--master --fastrouter``);
* ``ours``: ``python3 -m uwsgi_fastrouter`` (``PYTHONPATH`` = ``--tree``, default this
  repository), nothing added;
* ``ours + retry``: with ``--fastrouter-retry-after-connect``;
* ``ours + health + retry``: the same plus ``--health-args`` (the active health-check
  options; the row says so when the router does not know them).

``--router-args`` is added to every row of ours.  Failures are counted in total and,
of those, after the kill; the requests of the killed node that were in flight when it
died are what a router without retry loses.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import List, Optional, Sequence

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
sys.path.insert(0, BENCH_DIR)

import processes  # noqa: E402  (siblings in bench/)

APP = """\
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
"""


def packet(pairs: Sequence[tuple]) -> bytes:
    body = b"".join(struct.pack("<H", len(k)) + k + struct.pack("<H", len(v)) + v for k, v in pairs)
    return struct.pack("<BHB", 0, len(body), 0) + body


REQUEST = packet([(b"REQUEST_METHOD", b"GET"), (b"PATH_INFO", b"/"), (b"REQUEST_URI", b"/"),
                  (b"QUERY_STRING", b""), (b"SERVER_PROTOCOL", b"HTTP/1.1"),
                  (b"SERVER_NAME", b"bench"), (b"SERVER_PORT", b"80"), (b"HTTP_HOST", b"bench")])


def one_request(port: int) -> bool:
    try:
        data = processes.exchange(port, REQUEST)
    except OSError:
        return False
    return data.startswith(b"HTTP/1.1 200") and data.endswith(b"ok")


def wait_serving(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("%s exited (%s)" % (what, proc.returncode))
        if one_request(port):
            return
        time.sleep(0.05)
    raise RuntimeError("%s does not answer on port %d" % (what, port))


def children(pid: int) -> List[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry, "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rfind(b")") + 2:].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Nodes:
    def __init__(self, uwsgi: str, directory: str) -> None:
        app = os.path.join(directory, "app.py")
        with open(app, "w") as f:
            f.write(APP)
        self.ports = [processes.free_port() for _ in range(3)]
        self.procs = [subprocess.Popen([uwsgi, "--master", "--processes", "2", "--die-on-term",
                                        "--socket", "127.0.0.1:%d" % port, "--wsgi-file", app,
                                        "--disable-logging"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                      for port in self.ports]
        for port, proc in zip(self.ports, self.procs):
            wait_serving(port, proc, "node %d" % port)

    def kill_first(self) -> None:
        master = self.procs[0].pid
        for pid in [master] + children(master):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        for proc in self.procs:
            stop(proc)


class Load:
    def __init__(self, port: int, clients: int) -> None:
        self.port = port
        self.ok = 0
        self.failed = 0
        self.failed_after_kill = 0
        self.killed = False
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            good = one_request(self.port)
            with self.lock:
                if good:
                    self.ok += 1
                else:
                    self.failed += 1
                    if self.killed:
                        self.failed_after_kill += 1

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)


def run_row(router_argv: List[str], env: dict, nodes: Nodes, port: int, args) -> Optional[Load]:
    print("  $ " + " ".join(shlex.quote(a) for a in router_argv), flush=True)
    router = subprocess.Popen(router_argv, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        try:
            wait_serving(port, router, "router")
        except RuntimeError as exc:
            print("    not run: %s" % exc)
            return None
        load = Load(port, args.clients)
        time.sleep(args.duration / 3)
        with load.lock:
            load.killed = True
        nodes.kill_first()
        time.sleep(args.duration * 2 / 3)
        load.stop()
        return load
    finally:
        stop(router)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uwsgi", default=os.environ.get("UWSGI_BIN", "uwsgi"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--health-args", default="--fastrouter-health-check-interval 1")
    parser.add_argument("--router-args", default="")
    parser.add_argument("--tree", default=REPO_DIR)
    args = parser.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=os.path.abspath(args.tree))
    extra = shlex.split(args.router_args)
    rows = [("uWSGI 2.0.31 FastRouter", "uwsgi", []),
            ("ours", "ours", extra),
            ("ours + retry", "ours", extra + ["--fastrouter-retry-after-connect"]),
            ("ours + health + retry", "ours",
             extra + ["--fastrouter-retry-after-connect"] + shlex.split(args.health_args))]
    results = []
    for name, kind, row_args in rows:
        for _ in range(args.rounds):
            print("%s:" % name, flush=True)
            with tempfile.TemporaryDirectory() as directory:
                nodes = Nodes(args.uwsgi, directory)
                try:
                    port = processes.free_port()
                    targets = []
                    for node_port in nodes.ports:
                        targets += ["--fastrouter-to", "127.0.0.1:%d" % node_port]
                    if kind == "uwsgi":
                        argv_ = [args.uwsgi, "--master", "--die-on-term", "--fastrouter",
                                 "127.0.0.1:%d" % port] + targets
                    else:
                        argv_ = [sys.executable, "-m", "uwsgi_fastrouter", "--fastrouter",
                                 "127.0.0.1:%d" % port] + targets + row_args
                    load = run_row(argv_, env, nodes, port, args)
                finally:
                    nodes.stop()
            results.append((name, load))
    print()
    print("| router | requests | failed | failed after the kill |")
    print("|---|---|---|---|")
    for name, load in results:
        if load is None:
            print("| %s | not run | | |" % name)
        else:
            print("| %s | %d | %d | %d |" % (name, load.ok + load.failed, load.failed,
                                           load.failed_after_kill))
    return 0


if __name__ == "__main__":
    sys.exit(main())
