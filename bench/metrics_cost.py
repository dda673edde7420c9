#!/usr/bin/env python3
"""What do the request counters and --fastrouter-metrics cost?  Requests/s at c=16.

Usage::

    python3 bench/metrics_cost.py [--base REV] [--rounds 5] [--duration 5] [--concurrency 16]
                                  [--scrape-interval 1] [--mode single|master]

Three routers forward to the same backend (``bench/build/backend``) with
``--fastrouter-to``, one router process each (``--mode master``: ``--master
--fastrouter-processes 2`` for all three):

* ``base`` (with ``--base REV``): the source tree of git revision REV (the one before
  the counters came), exported to a temporary directory with ``git archive``;
* ``off``: this tree without ``--fastrouter-metrics`` (the outcome counters only);
* ``on``: this tree with ``--fastrouter-metrics`` (histograms, per-key and per-node
  tables) while a thread scrapes ``GET /metrics`` every ``--scrape-interval`` seconds
  (Prometheus scrapes every 15 to 60 s; once a second is the harsh case).

For ``--rounds`` rounds each router in turn (the order rotates) gets a closed-loop
``loadgen`` run of ``--duration`` seconds after a one-second warm-up; the table shows
the median requests/s, the router's CPU seconds per 10,000 requests (process tree,
from /proc) and the ratios to ``off`` and ``base``.  Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Dict, List

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
sys.path.insert(0, BENCH_DIR)

import processes  # noqa: E402
import proctree  # noqa: E402

BUILD_DIR = os.path.join(BENCH_DIR, "build")


def export_tree(rev: str, into: str) -> str:
    """The package of revision *rev* in *into* (``git archive``)."""
    archive = subprocess.run(["git", "-C", REPO_DIR, "archive", rev, "uwsgi_fastrouter"],
                             check=True, stdout=subprocess.PIPE).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return into


def start_router(name: str, tree: str, backend: str, extra: List[str], mode: str, workdir: str):
    port = processes.free_port()
    argv = [sys.executable, "-m", "uwsgi_fastrouter", "--fastrouter", "127.0.0.1:%d" % port,
            "--fastrouter-to", backend, "--listen", "1024"] + extra
    if mode == "master":
        argv += ["--master", "--fastrouter-processes", "2"]
    env = dict(os.environ, PYTHONPATH=tree)
    child = subprocess.Popen(argv, cwd=tree, env=env, stdout=subprocess.DEVNULL,
                             stderr=open(os.path.join(workdir, name + ".log"), "wb"))
    deadline = time.monotonic() + 20
    while not processes.probe(port, timeout=1.0):
        if child.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("router %s did not start (see %s)" % (name, workdir))
        time.sleep(0.05)
    return child, port


def run_load(port: int, conc: int, duration: float) -> Dict[str, str]:
    out = subprocess.run([os.path.join(BUILD_DIR, "loadgen"), "-p", str(port), "-c", str(conc),
                          "-d", str(duration), "-w", "1", "-k", "bench.example.com"],
                         stdout=subprocess.PIPE, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith("RESULT"):
            return processes.parse_kv(line)
    raise RuntimeError("loadgen gave no result: " + out[-500:])


class Scraper(threading.Thread):
    def __init__(self, address: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.address, self.interval = address, interval
        self.stop_event = threading.Event()
        self.scrapes = self.errors = 0

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            try:
                with urllib.request.urlopen("http://%s/metrics" % self.address, timeout=5) as answer:
                    answer.read()
                self.scrapes += 1
            except OSError:
                self.errors += 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", help="git revision without the metrics (the 'base' router); none: skipped")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--scrape-interval", type=float, default=1.0)
    p.add_argument("--mode", choices=("single", "master"), default="single")
    a = p.parse_args()
    subprocess.run(["make", "-s", "-C", BENCH_DIR], check=True)
    workdir = tempfile.mkdtemp(prefix="metrics-cost-")
    backend = subprocess.Popen([os.path.join(BUILD_DIR, "backend"), "-p", "0", "-b", "1024"],
                               stdout=subprocess.PIPE, text=True)
    line = backend.stdout.readline()
    backend_addr = line.split(None, 1)[1].strip()
    metrics_addr = "127.0.0.1:%d" % processes.free_port()
    targets = {"off": (REPO_DIR, []), "on": (REPO_DIR, ["--fastrouter-metrics", metrics_addr])}
    if a.base:
        targets["base"] = (export_tree(a.base, tempfile.mkdtemp(prefix="metrics-base-")), [])
    routers = {}
    scraper = None
    try:
        for name, (tree, extra) in targets.items():
            routers[name] = start_router(name, tree, backend_addr, extra, a.mode, workdir)
        scraper = Scraper(metrics_addr, a.scrape_interval)
        scraper.start()
        names = list(targets)
        results: Dict[str, List[tuple]] = {name: [] for name in names}
        for rnd in range(a.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for name in order:
                child, port = routers[name]
                cpu0 = proctree.tree_cpu_seconds(child.pid)
                r = run_load(port, a.concurrency, a.duration)
                cpu = proctree.tree_cpu_seconds(child.pid) - cpu0
                requests = int(r["requests"])
                results[name].append((float(r["rps"]), cpu * 10000 / max(requests, 1), int(r["errors"])))
                print("round %d %-4s %9.0f req/s  %.3f CPU s/10k  errors %s"
                      % (rnd + 1, name, float(r["rps"]), cpu * 10000 / max(requests, 1), r["errors"]),
                      flush=True)
        print("\nmode %s, c=%d, %d rounds x %.0f s, scrape every %.1f s (%d scrapes, %d errors)"
              % (a.mode, a.concurrency, a.rounds, a.duration, a.scrape_interval, scraper.scrapes, scraper.errors))
        med = {name: (statistics.median(x[0] for x in rows), statistics.median(x[1] for x in rows))
               for name, rows in results.items()}
        print("%-5s %10s %12s %9s %9s" % ("", "req/s", "CPU s/10k", "vs off", "vs base"))
        for name in names:
            rps, cpu = med[name]
            vs_base = "%.3f" % (rps / med["base"][0]) if "base" in med else "-"
            print("%-5s %10.0f %12.3f %9.3f %9s" % (name, rps, cpu, rps / med["off"][0], vs_base))
    finally:
        if scraper is not None:
            scraper.stop_event.set()
        for child, _port in routers.values():
            child.send_signal(2)
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        backend.terminate()
        backend.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
