#!/usr/bin/env python3
"""What the cyclic garbage collector costs a router holding many keys, in-process.

Usage::

    python3 bench/gc_cost.py [--tree DIR] [--keys 10000] [--documents 3]

Theory of operation
-------------------
A full collection walks every container object alive; a table of N keys keeps a few
objects per pool and node alive, so its cost grows with N.  A collection runs when
the objects allocated minus those freed since the last one pass a threshold, so
work that allocates and frees (a document rendered a pool at a time) may trigger
none, and work that keeps what it allocates (a table growing) does.

This script fills a ``SubscriptionTable`` with ``--keys`` keys (every one routed to,
so a router process's report lists them all), then prints:

* the objects the collector tracks, and the time of an explicit collection of each
  generation (the worst case of one collection that the interpreter starts itself);
* for each piece of stats work, done ``--documents`` times with a callback on
  ``gc.callbacks``: the collections it triggered (generation, count, total and
  longest time).  The work: the single process's document rendered whole through
  ``render_pieces`` (as its loop does in slices), a router process's report
  (``report_parts``, each part JSON-encoded), and the master's reception of two such
  reports (``RouterReport.add``);
* the time of a full collection after ``gc.freeze()`` (what a policy that freezes
  the long-lived objects would leave).

Wall-clock times: run on a quiet CPU, compare between interpreters and trees, not
across machines.  Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import sys
import time
import types
from typing import Callable, Dict, List, Tuple

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fill_table(keys: int):
    from uwsgi_fastrouter import log as logmod
    from uwsgi_fastrouter.subscription import SubscriptionTable, build_announcement, parse_announcement
    logmod.set_stream(io.StringIO())
    table = SubscriptionTable(tolerance=3600, algo="wrr", max_keys=keys * 2, max_nodes=64, log=logmod.log,
                              pid=1, verifier=None)
    for i in range(keys):
        announcement = build_announcement(b"k-%05d.bench" % i, b"127.0.0.1:9", cores=1, weight=1)
        table.announce(parse_announcement(announcement), 1700000000.0)
    for i, pool in enumerate(table.pools_now()):
        pool.hits = pool.nodes[0].requests = 1 + i % 50
    return table


def timed_collection(generation: int) -> float:
    started = time.perf_counter()
    gc.collect(generation)
    return time.perf_counter() - started


class Recorder:
    """The collections the interpreter starts, as (generation, seconds)."""

    def __init__(self) -> None:
        self.seen: List[Tuple[int, float]] = []
        self._started = 0.0

    def __call__(self, phase: str, info: Dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seen.append((info["generation"], time.perf_counter() - self._started))

    def summary(self) -> str:
        if not self.seen:
            return "no collection"
        by_generation = {}
        for generation, took in self.seen:
            count, total, longest = by_generation.get(generation, (0, 0.0, 0.0))
            by_generation[generation] = (count + 1, total + took, max(longest, took))
        return ", ".join("gen%d: %d, %.2f ms total, %.2f ms longest" % (g, c, t * 1000, m * 1000)
                         for g, (c, t, m) in sorted(by_generation.items()))


def stats_work(table) -> List[Tuple[str, Callable[[], None]]]:
    from uwsgi_fastrouter import stats
    from uwsgi_fastrouter.metrics import Counters
    server = types.SimpleNamespace(sessions=[], cheap=False, counters=Counters(), fd_handoffs=0,
                                   router=types.SimpleNamespace(static_nodes=[]))

    def report() -> list:
        return [json.dumps(part, separators=(",", ":")).encode()
                for part in stats.report_parts(server, table) if part]

    parts = report()

    def document() -> None:
        doc = {"version": "x", "subscriptions": stats.subscription_stream(table)}
        for _piece in stats.render_pieces(doc):
            pass

    def merge() -> None:
        for _ in range(2):
            received = stats.RouterReport()
            for part in parts:
                received.add(part)

    return [("single-process document", document), ("router process's report", report),
            ("master's reception of 2 reports", merge)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tree", default=REPO_DIR, help="source tree to import (default: this repository)")
    p.add_argument("--keys", type=int, default=10000)
    p.add_argument("--documents", type=int, default=3, help="times each piece of stats work is done")
    a = p.parse_args(argv)
    sys.path.insert(0, os.path.abspath(a.tree))
    table = fill_table(a.keys)
    print("Python %s, %d keys, thresholds %s" % (sys.version.split()[0], a.keys, gc.get_threshold()))
    print("objects tracked: %d" % len(gc.get_objects()))
    for generation in (0, 1, 2):
        print("explicit collection of generation %d: %.2f ms" % (generation, timed_collection(generation) * 1000))
    work = stats_work(table)
    gc.collect()
    for name, run in work:
        recorder = Recorder()
        gc.callbacks.append(recorder)
        try:
            for _ in range(a.documents):
                run()
        finally:
            gc.callbacks.remove(recorder)
        print("%s x%d: %s" % (name, a.documents, recorder.summary()))
    gc.freeze()
    print("full collection after gc.freeze() (%d objects frozen): %.2f ms"
          % (gc.get_freeze_count(), timed_collection(2) * 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
