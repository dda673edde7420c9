#!/usr/bin/env python3
"""What clients waiting for a busy UNIX node cost the router and the other keys.

Usage::

    python3 bench/busy_node.py [--waiters 500] [--duration 3] [--rounds 3] [--tree DIR]
                               [--keep-logs]

About 30 s.  Prints the exact command lines and one table; nothing here asserts a
figure.

Theory of operation
-------------------
Two keys, routed by a code-string mapper (``--fastrouter-use-code-string``):

* ``busy`` goes to a UNIX socket with a listen backlog of 1 that never accepts, so
  once its queue is full every connect to it gives EAGAIN: the node is busy;
* ``healthy`` goes to ``bench/build/backend`` (built with ``make -C bench``).

The router under test is ``python3 -m uwsgi_fastrouter`` with ``PYTHONPATH`` set to
``--tree`` (default: the repository this script is in, so an older checkout is
measured with the same script), ``--fastrouter-timeout 60`` so that nobody gives up
during the run.

The healthy key is measured with the C load generator (one client in a closed loop,
``loadgen -c 1 -k healthy``), ``--rounds`` times with nobody waiting, then
``--rounds`` times while ``--waiters`` clients have each sent a request for ``busy``
and wait for it.  Before each of the latter, the router's CPU is measured with the
waiters alone and no load: that is what the waiting costs (from ``--warmup`` s after
the waiters connected: their first attempts, 5 ms to 640 ms apart, are mostly over by
then).  The router's CPU time over each window is
its run time in ``/proc/PID/task/*/schedstat`` (ns, where ``/proc/PID/stat`` counts
10 ms ticks); the latencies are the load generator's p50/p99.  The table shows the
median of the rounds.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
sys.path.insert(0, BENCH_DIR)

import processes  # noqa: E402  (siblings in bench/)
import proctree  # noqa: E402

BACKEND_BIN = os.path.join(BENCH_DIR, "build", "backend")
LOADGEN_BIN = os.path.join(BENCH_DIR, "build", "loadgen")

MAPPER = '''NODES = {"healthy": %r, "busy": %r}


def route(key):
    return NODES.get(key)
'''


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--waiters", type=int, default=500, help="clients waiting for the busy node (500)")
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds per window (3)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each window (1)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the table shows medians (3)")
    p.add_argument("--tree", default=REPO_DIR, help="source tree whose uwsgi_fastrouter is run")
    p.add_argument("--keep-logs", action="store_true")
    return p.parse_args(argv)


def measure(router: processes.Child, port: int, a: argparse.Namespace, workdir: str) -> Dict[str, float]:
    """One loadgen window on the healthy key: router CPU and the latencies."""
    argv = [LOADGEN_BIN, "-p", str(port), "-k", "healthy", "-c", "1", "-d", str(a.duration),
            "-w", str(a.warmup), "-t", "10000"]
    lg = processes.spawn("loadgen", argv, os.path.join(workdir, "loadgen.log"), stdout_pipe=True,
                         death_signal=signal.SIGKILL)
    reader = processes.LineReader(lg)
    try:
        if not reader.wait_for("START", a.warmup + 15):
            raise RuntimeError("loadgen did not start: " + lg.log_tail())
        t0, cpu0 = time.monotonic(), proctree.tree_sched_seconds(router.pid)
        if not reader.wait_for("END", a.duration + 15):
            raise RuntimeError("loadgen did not finish: " + lg.log_tail())
        t1, cpu1 = time.monotonic(), proctree.tree_sched_seconds(router.pid)
        line = reader.wait_for("RESULT", 15)
        if not line:
            raise RuntimeError("loadgen gave no result: " + lg.log_tail())
    finally:
        processes.stop(lg, signal.SIGTERM, grace=5)
    r = processes.parse_kv(line)
    return {"cpu_pct": 100.0 * (cpu1 - cpu0) / (t1 - t0), "p50_us": float(r["p50_us"]),
            "p99_us": float(r["p99_us"]), "rps": float(r["rps"]),
            "errors": int(r["errors"])}


def measure_idle(router: processes.Child, seconds: float) -> Dict[str, float]:
    """The router's CPU over *seconds* with no load at all (only the waiting clients)."""
    t0, cpu0 = time.monotonic(), proctree.tree_sched_seconds(router.pid)
    time.sleep(seconds)
    t1, cpu1 = time.monotonic(), proctree.tree_sched_seconds(router.pid)
    return {"cpu_pct": 100.0 * (cpu1 - cpu0) / (t1 - t0)}


def open_waiters(port: int, n: int) -> List[socket.socket]:
    waiters = []
    request = processes.uwsgi_request("busy")
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(request)
        waiters.append(s)
    return waiters


def main(argv: Optional[List[str]] = None) -> int:
    a = parse_args(argv)
    if not (os.access(BACKEND_BIN, os.X_OK) and os.access(LOADGEN_BIN, os.X_OK)):
        subprocess.run(["make", "-C", BENCH_DIR], check=True, stdout=subprocess.DEVNULL)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < a.waiters * 2 + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, a.waiters * 2 + 200), hard))
    workdir = tempfile.mkdtemp(prefix="busy-node-")
    busy_path = os.path.join(workdir, "busy.sock")
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.bind(busy_path)
    busy.listen(1)                                   # and never accepts
    backend, backend_addr = processes.spawn_listening(
        "backend", [BACKEND_BIN, "-p", "0"], os.path.join(workdir, "backend.log"))
    mapper = os.path.join(workdir, "mapper.py")
    with open(mapper, "w") as f:
        f.write(MAPPER % (backend_addr, busy_path))
    port = processes.free_port()
    argv_ = [sys.executable, "-m", "uwsgi_fastrouter", "--fastrouter", "127.0.0.1:%d" % port,
             "--fastrouter-use-code-string", "0:%s:route" % mapper, "--fastrouter-timeout", "60",
             "--listen", "1024"]
    env = dict(os.environ, PYTHONPATH=os.path.abspath(a.tree))
    router = processes.spawn("router", argv_, os.path.join(workdir, "router.log"), cwd=workdir, env=env)
    rows: Dict[str, List[Dict[str, float]]] = {"alone": [], "waiting": [], "idle": []}
    try:
        if not processes.wait_serving(router, port, 20.0, host="healthy"):
            raise RuntimeError("router did not serve:\n" + router.log_tail())
        for _ in range(a.rounds):
            rows["alone"].append(measure(router, port, a, workdir))
        # Once connected, the waiters stay: the router does not read a client while it
        # connects for it, so one that left is still tried for until the time-out.
        waiters = open_waiters(port, a.waiters)
        try:
            time.sleep(a.warmup)
            for _ in range(a.rounds):
                rows["idle"].append(measure_idle(router, a.duration))
                rows["waiting"].append(measure(router, port, a, workdir))
        finally:
            for s in waiters:
                s.close()
        alive = router.alive()
    finally:
        processes.stop(router, signal.SIGINT)
        processes.stop(backend, signal.SIGINT)
        busy.close()
        if a.keep_logs:
            print("logs in", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("commands:")
    print("  backend  %s" % " ".join(backend.argv))
    print("  router   %s" % " ".join(argv_))
    print("  loadgen  %s -p PORT -k healthy -c 1 -d %s -w %s -t 10000" % (LOADGEN_BIN, a.duration, a.warmup))
    print("PYTHONPATH=%s; %d rounds, medians; router alive at the end: %s\n"
          % (os.path.abspath(a.tree), a.rounds, "yes" if alive else "NO"))
    print("%-26s %16s %14s %14s %10s %7s" % ("healthy key measured", "router CPU %", "p50 us",
                                               "p99 us", "req/s", "errors"))
    for name, label in (("alone", "with nobody waiting"), ("waiting", "with %d waiting" % a.waiters)):
        r = rows[name]

        def med(k):
            return statistics.median(x[k] for x in r)
        print("%-26s %16.1f %14.0f %14.0f %10.0f %7d" % (label, med("cpu_pct"), med("p50_us"),
                                                          med("p99_us"), med("rps"),
                                                          sum(x["errors"] for x in r)))
    print("%-26s %16.1f %14s %14s %10s %7s" % ("no load, %d waiting" % a.waiters,
                                              statistics.median(x["cpu_pct"] for x in rows["idle"]),
                                              "-", "-", "-", "-"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
