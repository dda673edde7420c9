#!/usr/bin/env python3
"""User-space instructions and system calls per request of one router, c=1.

Usage::

    python3 bench/instructions.py [--requests 2000] [--warmup 300] [--strace] [--no-callgrind]
                                  [--router-arg ARG ...] [--profile FILE.prof]
                                  [--vars nginx] [--fd-node] [--floor plain|scan]

Theory of operation
-------------------
Wall-clock figures are noise on a shared machine; instruction counts are not.  The
router (``python -m uwsgi_fastrouter``, forwarding to ``bench/build/backend`` over TCP)
runs under ``valgrind --tool=callgrind``.  After *warmup* requests the counters are
zeroed (``callgrind_control -z``), *requests* more are sent one after the other (one
connection each, read to EOF, as the load generator does at c=1) and the counters are
dumped (``callgrind_control -d``): the dump's total over the number of requests is the
figure.  The client and the backend are not under valgrind and do not count.

``--strace`` starts the router again without valgrind, attaches ``strace -c -f`` after
the warm-up and detaches it after *requests* more: system calls per request (the floor
that a change must not raise).  ``--profile`` runs the router under cProfile instead
(written when the router exits) for a per-function view.

Each request carries the vars a web server sends for a GET (11 vars, as ``loadgen.c``
does); ``--vars nginx`` sends the 16 vars of nginx's stock ``uwsgi_params`` instead
(empty ``CONTENT_LENGTH`` and ``CONTENT_TYPE``, ``REMOTE_PORT``, ``DOCUMENT_URI``,
``REQUEST_SCHEME``...), the request the shared harness's load generator sends.

``--floor plain`` measures ``bench/floor_proxy.py`` instead of the router: the same
system calls from the fewest bytecodes (no features); ``--floor scan`` adds the router's
strict vars walk.  What the router costs above them is what its features cost.

``--fd-node`` measures the descriptor-passing path instead: the node is
``backend -u SOCK -F`` (a UNIX socket; it takes the client's descriptor and answers
on it) and the router runs with ``--fastrouter-trust-fd-passing``, so after the
warm-up every request is handed over without waiting for the node's verdict (but
for the periodic check, one in 64).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from typing import List

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
sys.path.insert(0, BENCH_DIR)

import processes  # noqa: E402
import proctree  # noqa: E402

BACKEND_BIN = os.path.join(BENCH_DIR, "build", "backend")


_PLAIN_VARS = [("REQUEST_METHOD", "GET"), ("REQUEST_URI", "/"), ("PATH_INFO", "/"),
               ("QUERY_STRING", ""), ("SERVER_PROTOCOL", "HTTP/1.1"), ("SERVER_NAME", "{host}"),
               ("SERVER_PORT", "80"), ("REMOTE_ADDR", "127.0.0.1"), ("HTTP_HOST", "{host}"),
               ("HTTP_USER_AGENT", "bench"), ("HTTP_ACCEPT", "*/*")]
# nginx's stock uwsgi_params for a GET, in its order (the harness's load generator).
_NGINX_VARS = [("QUERY_STRING", ""), ("REQUEST_METHOD", "GET"), ("CONTENT_TYPE", ""),
               ("CONTENT_LENGTH", ""), ("REQUEST_URI", "/"), ("PATH_INFO", "/"),
               ("DOCUMENT_URI", "/"), ("SERVER_PROTOCOL", "HTTP/1.1"), ("REQUEST_SCHEME", "http"),
               ("REMOTE_ADDR", "127.0.0.1"), ("REMOTE_PORT", "40000"), ("SERVER_PORT", "80"),
               ("SERVER_NAME", "{host}"), ("HTTP_HOST", "{host}"),
               ("HTTP_USER_AGENT", "loadgen/1.0"), ("HTTP_ACCEPT", "*/*")]
VAR_SETS = {"plain": _PLAIN_VARS, "nginx": _NGINX_VARS}


def _request(host: str = "bench.local", var_set: str = "plain") -> bytes:
    pairs = [(k, v.format(host=host)) for k, v in VAR_SETS[var_set]]
    body = b"".join(struct.pack("<H", len(k)) + k.encode() + struct.pack("<H", len(v)) + v.encode()
                    for k, v in pairs)
    return struct.pack("<BHB", 0, len(body), 0) + body


REQUEST = _request()


def send_requests(port: int, count: int) -> int:
    """*count* sequential requests; returns how many got an HTTP 200."""
    return sum(processes.is_http_200(processes.exchange(port, REQUEST, timeout=30))
               for _ in range(count))


UWSGI_BIN: List[str] = []    # --uwsgi: measure the uWSGI FastRouter instead
FLOOR: List[str] = []        # --floor: measure bench/floor_proxy.py instead


def start_router(work: str, backend: str, wrap: List[str], extra: List[str]) -> tuple:
    port = processes.free_port()
    router = [sys.executable, "-m", "uwsgi_fastrouter"]
    if FLOOR:
        router = [sys.executable, os.path.join(BENCH_DIR, "floor_proxy.py")] + FLOOR
    elif UWSGI_BIN:
        # as bench.py runs it (its master and its fastrouter process are both counted)
        router = UWSGI_BIN + ["--master", "--die-on-term", "--fastrouter-buffer-size", "65536"]
    argv = wrap + router + ["--fastrouter", "127.0.0.1:%d" % port,
                            "--fastrouter-to", backend, "--listen", "1024"] + extra
    env = dict(os.environ, PYTHONPATH=REPO_DIR)
    child = processes.spawn("router", argv, os.path.join(work, "router.log"), cwd=REPO_DIR, env=env)
    if not processes.wait_serving(child, port, timeout=180):
        processes.stop(child)
        raise RuntimeError("router did not serve:\n" + child.log_tail())
    return child, port


def read_callgrind_total(path: str) -> int:
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith(("totals:", "summary:")):
                return int(line.split()[1])
    return 0


def measure_callgrind(args, work: str, backend: str) -> float:
    out = os.path.join(work, "cg.%p")
    wrap = ["valgrind", "--tool=callgrind", "--trace-children=yes", "--callgrind-out-file=" + out]
    child, port = start_router(work, backend, wrap, args.router_arg)
    try:
        send_requests(port, args.warmup)
        pids = [str(pid) for pid, _ in proctree.snapshot_pids(child.pid)]
        for pid in pids:
            subprocess.run(["callgrind_control", "-z", pid], capture_output=True, timeout=60)
        ok = send_requests(port, args.requests)
        before = set(os.listdir(work))
        for pid in pids:
            subprocess.run(["callgrind_control", "-d", pid], capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        dumps: List[str] = []
        while time.monotonic() < deadline and len(dumps) < len(pids):
            dumps = [fn for fn in set(os.listdir(work)) - before if fn.startswith("cg.")]
            time.sleep(0.2)
        time.sleep(0.5)
        total = sum(read_callgrind_total(os.path.join(work, fn)) for fn in dumps)
        if args.keep_dump:
            for fn in dumps:
                shutil.copy(os.path.join(work, fn), args.keep_dump)
    finally:
        processes.stop(child)
    print("callgrind: %d requests (%d ok), %d instructions, %.0f instructions/request"
          % (args.requests, ok, total, total / args.requests))
    return total / args.requests


def measure_strace(args, work: str, backend: str) -> float:
    child, port = start_router(work, backend, [], args.router_arg)
    out = os.path.join(work, "strace.txt")
    try:
        send_requests(port, args.warmup)
        attach = []
        for pid, _ in proctree.snapshot_pids(child.pid):
            attach += ["-p", str(pid)]
        tracer = subprocess.Popen(["strace", "-c", "-f", "-o", out] + attach,
                                  stderr=subprocess.DEVNULL)
        time.sleep(1.0)   # strace attaches asynchronously; requests before that are not counted
        send_requests(port, args.requests)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=30)
    finally:
        processes.stop(child)
    with open(out) as f:
        text = f.read()
    total = 0
    for line in text.splitlines():
        if line.rstrip().endswith(" total"):
            fields = line.split()
            total = int(fields[3]) if len(fields) >= 5 else 0
    print(text)
    print("strace: %.2f system calls/request" % (total / args.requests))
    return total / args.requests


def measure_profile(args, work: str, backend: str) -> None:
    wrap_env_argv = ["-m", "cProfile", "-o", args.profile]
    port = processes.free_port()
    argv = [sys.executable] + wrap_env_argv + ["-m", "uwsgi_fastrouter", "--fastrouter",
                                               "127.0.0.1:%d" % port, "--fastrouter-to", backend,
                                               "--listen", "1024"] + args.router_arg
    child = processes.spawn("router", argv, os.path.join(work, "router.log"), cwd=REPO_DIR,
                            env=dict(os.environ, PYTHONPATH=REPO_DIR))
    try:
        if not processes.wait_serving(child, port, timeout=60):
            raise RuntimeError("router did not serve:\n" + child.log_tail())
        send_requests(port, args.requests)
    finally:
        processes.stop(child)
    print("profile written to", args.profile)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--strace", action="store_true")
    parser.add_argument("--no-callgrind", action="store_true")
    parser.add_argument("--profile", help="run under cProfile, write the stats here")
    parser.add_argument("--keep-dump", help="copy the callgrind dump into this directory")
    parser.add_argument("--router-arg", action="append", default=[])
    parser.add_argument("--vars", choices=sorted(VAR_SETS), default="plain",
                        help="the request's vars: plain (11) or nginx (16, as the harness sends)")
    parser.add_argument("--uwsgi", metavar="BIN",
                        help="measure this uWSGI binary's FastRouter instead of ours "
                             "(--fd-node then runs it without the trust option)")
    parser.add_argument("--floor", choices=["plain", "scan"],
                        help="measure bench/floor_proxy.py (the least Python a request can "
                             "cost with the router's system calls) instead; scan: with the "
                             "router's vars walk")
    parser.add_argument("--fd-node", action="store_true",
                        help="a UNIX node that takes the client's descriptor, with "
                             "--fastrouter-trust-fd-passing")
    args = parser.parse_args()
    global REQUEST
    REQUEST = _request(var_set=args.vars)
    subprocess.run(["make", "-s", "-C", BENCH_DIR], check=True)
    work = tempfile.mkdtemp(prefix="instr.")
    if args.uwsgi:
        UWSGI_BIN.append(args.uwsgi)
    if args.floor and (args.fd_node or args.uwsgi):
        parser.error("--floor measures the floor proxy with a TCP node: not with --fd-node or --uwsgi")
    if args.floor:
        FLOOR.append("--scan" if args.floor == "scan" else "--listen=1024")
    if args.fd_node:
        node_argv = [BACKEND_BIN, "-u", os.path.join(work, "node.sock"), "-F"]
        if not args.uwsgi:
            args.router_arg = ["--fastrouter-trust-fd-passing"] + args.router_arg
    else:
        node_argv = [BACKEND_BIN, "-p", "0"]
    backend_child, backend = processes.spawn_listening(
        "backend", node_argv, os.path.join(work, "backend.log"))
    if backend.startswith("unix:"):
        backend = backend[len("unix:"):]
    try:
        if args.profile:
            measure_profile(args, work, backend)
            return 0
        if not args.no_callgrind:
            measure_callgrind(args, work, backend)
        if args.strace:
            measure_strace(args, work, backend)
    finally:
        processes.stop(backend_child, signal.SIGTERM)
        if not args.keep_dump:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
