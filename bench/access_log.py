#!/usr/bin/env python3
"""What the access log (--fastrouter-access-log) costs in requests per second.

Usage::

    python3 bench/access_log.py [--concurrency 16] [--duration 5] [--warmup 1] [--rounds 5]
                                [--tree DIR] [--keep-logs]

About a minute with the defaults.  Prints the exact command lines and one table;
nothing here asserts a figure.

Theory of operation
-------------------
One backend (``bench/build/backend``, built with ``make -C bench``) and three
routers (``python3 -m uwsgi_fastrouter`` with ``PYTHONPATH`` = ``--tree``, default
this repository, so an older checkout is measured with the same script), all
``--fastrouter-to`` the backend, one router process each:

* ``off``: no access log (the default);
* ``file``: ``--fastrouter-access-log=FILE`` with the default format;
* ``main log``: ``--fastrouter-access-log`` bare: the lines go to the main log,
  which is the router's stderr, redirected to a file.

The C load generator runs a closed loop of ``--concurrency`` clients against each
router in turn, ``--rounds`` times, the order rotated every round so that no router
always runs first.  The table shows the median requests/s over the rounds, the
router's CPU time per request (from ``/proc/PID/task/*/schedstat``) and the change
against ``off``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
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


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=16, help="loadgen connections (16)")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per window (5)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each (1)")
    p.add_argument("--rounds", type=int, default=5, help="rounds; the table shows medians (5)")
    p.add_argument("--tree", default=REPO_DIR, help="source tree whose uwsgi_fastrouter is run")
    p.add_argument("--keep-logs", action="store_true")
    return p.parse_args(argv)


def measure(router: processes.Child, port: int, a: argparse.Namespace, workdir: str) -> Dict[str, float]:
    """One loadgen window: requests/s and the router's CPU per request."""
    argv = [LOADGEN_BIN, "-p", str(port), "-c", str(a.concurrency), "-d", str(a.duration),
            "-w", str(a.warmup), "-t", "10000"]
    lg = processes.spawn("loadgen", argv, os.path.join(workdir, "loadgen.log"), stdout_pipe=True,
                         death_signal=signal.SIGKILL)
    reader = processes.LineReader(lg)
    try:
        if not reader.wait_for("START", a.warmup + 15):
            raise RuntimeError("loadgen did not start: " + lg.log_tail())
        cpu0 = proctree.tree_sched_seconds(router.pid)
        if not reader.wait_for("END", a.duration + 15):
            raise RuntimeError("loadgen did not finish: " + lg.log_tail())
        cpu1 = proctree.tree_sched_seconds(router.pid)
        line = reader.wait_for("RESULT", 15)
        if not line:
            raise RuntimeError("loadgen gave no result: " + lg.log_tail())
    finally:
        processes.stop(lg, signal.SIGTERM, grace=5)
    r = processes.parse_kv(line)
    requests = max(int(r["requests"]), 1)
    return {"rps": float(r["rps"]), "cpu_us": (cpu1 - cpu0) / requests * 1e6,
            "p99_us": float(r["p99_us"]), "errors": int(r["errors"])}


def main(argv: Optional[List[str]] = None) -> int:
    a = parse_args(argv)
    if not (os.access(BACKEND_BIN, os.X_OK) and os.access(LOADGEN_BIN, os.X_OK)):
        subprocess.run(["make", "-C", BENCH_DIR], check=True, stdout=subprocess.DEVNULL)
    workdir = tempfile.mkdtemp(prefix="access-log-")
    backend, backend_addr = processes.spawn_listening(
        "backend", [BACKEND_BIN, "-p", "0"], os.path.join(workdir, "backend.log"))
    env = dict(os.environ, PYTHONPATH=os.path.abspath(a.tree))
    variants = {
        "off": [],
        "file": ["--fastrouter-access-log=" + os.path.join(workdir, "access.log")],
        "main log": ["--fastrouter-access-log"],
    }
    routers: Dict[str, processes.Child] = {}
    ports: Dict[str, int] = {}
    commands: Dict[str, List[str]] = {}
    rows: Dict[str, List[Dict[str, float]]] = {name: [] for name in variants}
    try:
        for index, (name, extra) in enumerate(variants.items()):
            port = processes.free_port()
            cmd = [sys.executable, "-m", "uwsgi_fastrouter", "--fastrouter", "127.0.0.1:%d" % port,
                   "--fastrouter-to", backend_addr, "--listen", "1024"] + extra
            child = processes.spawn("router-%d" % index, cmd,
                                    os.path.join(workdir, "router-%d.log" % index),
                                    cwd=workdir, env=env)
            routers[name], ports[name], commands[name] = child, port, cmd
            if not processes.wait_serving(child, port, 20.0):
                raise RuntimeError("router %r did not serve:\n%s" % (name, child.log_tail()))
        names = list(variants)
        for round_ in range(a.rounds):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                rows[name].append(measure(routers[name], ports[name], a, workdir))
        alive = all(child.alive() for child in routers.values())
        lines = sum(1 for _ in open(os.path.join(workdir, "access.log"), "rb"))
    finally:
        for child in routers.values():
            processes.stop(child, signal.SIGINT)
        processes.stop(backend, signal.SIGINT)
        if a.keep_logs:
            print("logs in", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("commands:")
    print("  backend  %s" % " ".join(backend.argv))
    for name, cmd in commands.items():
        print("  %-8s %s" % (name, " ".join(cmd)))
    print("  loadgen  %s -p PORT -c %d -d %s -w %s -t 10000"
          % (LOADGEN_BIN, a.concurrency, a.duration, a.warmup))
    print("PYTHONPATH=%s; %d rounds, medians; %s; %d lines in the access log file; routers alive: %s\n"
          % (os.path.abspath(a.tree), a.rounds, time.strftime("%Y-%m-%d %H:%M:%S"), lines,
             "yes" if alive else "NO"))
    base_rps = statistics.median(x["rps"] for x in rows["off"])
    base_cpu = statistics.median(x["cpu_us"] for x in rows["off"])
    print("%-10s %10s %8s %18s %8s %10s %7s" % ("access log", "req/s", "vs off", "router CPU us/req",
                                              "vs off", "p99 us", "errors"))
    for name in variants:
        r = rows[name]
        rps = statistics.median(x["rps"] for x in r)
        cpu = statistics.median(x["cpu_us"] for x in r)
        print("%-10s %10.0f %+7.1f%% %18.1f %+7.1f%% %10.0f %7d"
              % (name, rps, 100.0 * (rps / base_rps - 1), cpu, 100.0 * (cpu / base_cpu - 1),
                 statistics.median(x["p99_us"] for x in r), sum(x["errors"] for x in r)))
    print("\nall rounds (req/s): " + "; ".join(
        "%s %s" % (name, " ".join("%.0f" % x["rps"] for x in rows[name])) for name in variants))
    return 0


if __name__ == "__main__":
    sys.exit(main())
