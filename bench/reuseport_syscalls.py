#!/usr/bin/env python3
"""System calls per request of two router processes: one shared listening socket against
a socket per process (``--fastrouter-reuse-port``), and one process for reference.

Usage::

    python3 bench/reuseport_syscalls.py [--concurrency 16] [--duration 4] [--pin]

Theory of operation
-------------------
Wall-clock figures are noise on a shared machine; system call counts are much less so.
Each router forwards to ``bench/build/backend``.  After a warm-up of closed-loop load
(``bench/build/loadgen``), ``strace -c -f`` is attached to the master and to each router
process, the load generator runs for *duration* seconds at *concurrency*, and strace is
detached: its summary over the requests the load generator completed gives calls per
request by system call, and the failed ones.  With one shared socket, every process
polling it is woken for a new connection and all but one find nothing to accept
(``accept4`` failing with EAGAIN); with a socket per process only the owner is woken.
strace slows every call down, which widens the windows in which that happens: read the
figures as a comparison, not as what an untraced router does.

Before the traced window, an untraced one of the same length gives how evenly the
work is spread: the share of the router processes' CPU time (the master's excluded)
taken by the busiest one (0.50 is an even split of two).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
sys.path.insert(0, BENCH_DIR)

import processes  # noqa: E402
import proctree  # noqa: E402

BACKEND_BIN = os.path.join(BENCH_DIR, "build", "backend")
LOADGEN_BIN = os.path.join(BENCH_DIR, "build", "loadgen")
TARGETS = (("ours 1p", []),
           ("ours 2p shared", ["--master", "--fastrouter-processes", "2"]),
           ("ours 2p reuseport", ["--master", "--fastrouter-processes", "2", "--fastrouter-reuse-port"]))


def start_router(work: str, backend: str, extra: List[str]) -> Tuple[processes.Child, int]:
    port = processes.free_port()
    argv = [sys.executable, "-m", "uwsgi_fastrouter", "--fastrouter", "127.0.0.1:%d" % port,
            "--fastrouter-to", backend, "--listen", "1024"] + extra
    child = processes.spawn("router", argv, os.path.join(work, "router.log"), cwd=REPO_DIR,
                            env=dict(os.environ, PYTHONPATH=REPO_DIR))
    if not processes.wait_serving(child, port, timeout=30):
        processes.stop(child)
        raise SystemExit("the router did not start:\n" + child.log_tail())
    return child, port


def loadgen(port: int, conc: int, duration: float, work: str) -> Dict[str, str]:
    argv = [LOADGEN_BIN, "-p", str(port), "-c", str(conc), "-d", str(duration), "-w", "0", "-t", "10000"]
    lg = processes.spawn("loadgen", argv, os.path.join(work, "loadgen.log"), stdout_pipe=True)
    try:
        line = processes.LineReader(lg).wait_for("RESULT", duration + 30)
    finally:
        processes.stop(lg, signal.SIGTERM, grace=5)
    if not line:
        raise SystemExit("the load generator gave no result:\n" + lg.log_tail())
    return processes.parse_kv(line)


def parse_summary(text: str) -> Dict[str, Tuple[int, int]]:
    """strace -c's table: syscall -> (calls, errors)."""
    out = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5 or not fields[3].isdigit() or fields[-1] in ("total", "syscall"):
            continue
        errors = int(fields[4]) if len(fields) == 6 else 0
        out[fields[-1]] = (int(fields[3]), errors)
    return out


def busiest_share(pids: List[int], run) -> float:
    """The busiest of *pids*' share of their CPU time while *run()* runs."""
    before = [proctree.cpu_seconds([pid]) for pid in pids]
    run()
    used = [proctree.cpu_seconds([pid]) - b for pid, b in zip(pids, before)]
    return max(used) / sum(used) if sum(used) > 0 else 0.0


def measure(name: str, extra: List[str], args, work: str, backend: str) -> dict:
    child, port = start_router(work, backend, extra)
    out = os.path.join(work, "strace-%s.txt" % name.replace(" ", "_"))
    try:
        loadgen(port, args.concurrency, 1.0, work)          # warm-up
        pids = [pid for pid, _ in proctree.snapshot_pids(child.pid)]
        busiest = busiest_share([pid for pid in pids if pid != child.pid] or [child.pid],
                                lambda: loadgen(port, args.concurrency, args.duration, work))
        argv = ["strace", "-c", "-f", "-o", out] + [a for pid in pids for a in ("-p", str(pid))]
        tracer = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
        time.sleep(1.0)      # strace attaches asynchronously
        result = loadgen(port, args.concurrency, args.duration, work)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=30)
    finally:
        processes.stop(child)
    with open(out) as handle:
        counts = parse_summary(handle.read())
    requests = int(result["requests"])
    per = lambda n: n / requests if requests else 0.0
    total = sum(calls for calls, _ in counts.values())
    failed = sum(errors for _, errors in counts.values())
    accept = counts.get("accept4", (0, 0))
    waits = sum(counts.get(s, (0, 0))[0] for s in ("epoll_wait", "epoll_pwait", "poll", "select"))
    return {"name": name, "requests": requests, "errors": int(result["errors"]), "busiest": busiest,
            "syscalls": per(total), "failed": per(failed), "accept4": per(accept[0]),
            "accept4_eagain": per(accept[1]), "waits": per(waits)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--pin", action="store_true", help="as PIN=1 (see processes.py)")
    args = parser.parse_args()
    if args.pin:
        os.environ["PIN"] = "1"
    subprocess.run(["make", "-s", "-C", BENCH_DIR], check=True)
    work = tempfile.mkdtemp(prefix="reuseport.")
    backend_child, backend = processes.spawn_listening("backend", [BACKEND_BIN, "-p", "0"],
                                                       os.path.join(work, "backend.log"))
    try:
        rows = [measure(name, extra, args, work, backend) for name, extra in TARGETS]
    finally:
        processes.stop(backend_child)
    print("system calls per request under strace -c -f, c=%d, %g s (%s)"
          % (args.concurrency, args.duration, processes.pin_note()))
    print("%-20s %9s %9s %9s %9s %13s %9s %7s %8s" % ("router", "requests", "syscalls", "failed",
                                                       "accept4", "accept4 EAGAIN", "waits", "errors",
                                                       "busiest"))
    for r in rows:
        print("%-20s %9d %9.2f %9.2f %9.2f %13.2f %9.2f %7d %8.2f" % (
            r["name"], r["requests"], r["syscalls"], r["failed"], r["accept4"], r["accept4_eagain"],
            r["waits"], r["errors"], r["busiest"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
