#!/usr/bin/env python3
"""Instructions per subscription datagram and per stats document, in-process, under callgrind.

Usage::

    python3 bench/inprocess_instructions.py [--tree DIR ...] [--cases refresh,new,single,master]

Theory of operation
-------------------
Wall-clock figures are noise on a shared machine; instruction counts are not.  Each case
runs twice in a fresh interpreter under ``valgrind --tool=callgrind`` (no I/O, no
sockets), once doing the set-up only and once doing the set-up and the work; the
difference over the amount of work is the figure, so start-up and set-up cancel out.

* ``refresh``: ``SubscriptionServer.handle()`` of 5,000 announces of keys already in
  the table (a new weight each), after 5,000 that created them: per datagram.
* ``new``: 5,000 announces of new keys (pool and node created, two log lines each, to
  a memory stream): per datagram.
* ``read_refresh``, ``read_new``: the same datagrams read from a UNIX datagram socket
  pair by the server's readiness callback, 40 queued per readiness (as many as a
  router under load finds); the sends are part of the set-up that cancels out only
  in part, so compare these between trees, not with ``refresh``/``new``.
* ``read_copied``: ``read_refresh`` by a master's server, which copies each accepted
  announce for its router processes (to a list here).
* ``single``: the stats document of one process holding 10,000 keys, rendered whole
  through ``render_pieces``: per document.
* ``master``: the master's document for the same table with the reports of two router
  processes (their parts JSON-encoded as a router sends them) merged in: per document.
  Every key has counters (a router process routed to each).
* ``merge``: of ``master``, the reception of the two reports only (what stays in the
  master's loop when a renderer process writes the document, see statsfork.py).
* ``report``: one router process's report (its parts built and JSON-encoded), every
  key routed to; ``report_idle``: the same with one key in a hundred routed to.
* ``expire``: the once-a-second expiry sweep over the same 10,000 keys, none of them
  stale (the steady state), in one go (the router runs it a step per pass of its loop).

``--tree`` (repeatable) names source trees to compare (default: this repository); each
run imports ``uwsgi_fastrouter`` from that tree.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKER = r'''
import io, json, sys, time
sys.path.insert(0, sys.argv[1])
from uwsgi_fastrouter import log as logmod
from uwsgi_fastrouter.subscription import SubscriptionTable, build_announcement, parse_announcement
logmod.set_stream(io.StringIO())
case, n = sys.argv[2], int(sys.argv[3])
table = SubscriptionTable(tolerance=3600, algo="wrr", max_keys=10**6, max_nodes=64, log=logmod.log,
                          pid=1, verifier=None)
if case in ("refresh", "new", "read_refresh", "read_new", "read_copied"):
    from uwsgi_fastrouter.reactor import Reactor
    from uwsgi_fastrouter.subserver import SubscriptionServer
    server = SubscriptionServer(Reactor(), table, [], wall_clock=time.time)
    if case == "read_copied":   # a master's server: what it accepts is queued for its routers
        copies = []
        server.on_accepted = lambda a, pid, uid, gid: copies.append((pid, uid, gid, tuple(a)))
    keys = [b"k-%05d.bench" % i for i in range(5000)]
    created = [build_announcement(k, b"127.0.0.1:9", cores=1, weight=1) for k in keys]
    refreshed = [build_announcement(k, b"127.0.0.1:9", cores=1, weight=2) for k in keys]
    if case in ("refresh", "read_refresh", "read_copied"):
        for packet in created:
            server.handle(packet, None)
        work = refreshed[:n]
    else:
        work = created[:n]
    if case.startswith("read_"):
        # through the socket: a UNIX datagram pair, BATCH datagrams queued per readiness
        import socket
        from uwsgi_fastrouter.subserver import DatagramListener
        sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.setblocking(False)
        listener = DatagramListener(receiver, "pair", None)
        BATCH = 40
        for i in range(0, len(work), BATCH):
            for packet in work[i:i + BATCH]:
                sender.send(packet)
            server._readable(listener)
    else:
        for packet in work:
            server.handle(packet, None)
else:
    import types
    from uwsgi_fastrouter import stats
    from uwsgi_fastrouter.metrics import Counters
    for i in range(10000):
        table.announce(parse_announcement(build_announcement(b"k-%05d.bench" % i, b"127.0.0.1:9",
                                                             cores=1, weight=1)), 1700000000.0)
    # the keys a router process routed to: every one, or one in a hundred (report_idle)
    for i, pool in enumerate(table.pools_for_stats()):
        if case != "report_idle" or i % 100 == 0:
            pool.hits = pool.nodes[0].requests = 1 + i % 50
    server = types.SimpleNamespace(sessions=[], cheap=False, counters=Counters(), fd_handoffs=0,
                                   router=types.SimpleNamespace(static_nodes=[]))

    def report() -> list:
        """A router process's report, its parts as they go on the channel."""
        return [json.dumps(part, separators=(",", ":")).encode()
                for part in stats.report_parts(server, table) if part]

    def merged(parts: list) -> list:
        """The master's reception of two such reports."""
        reports = []
        for _ in range(2):
            report_ = stats.RouterReport()
            for part in parts:
                report_.add(part)
            reports.append(report_)
        return reports

    parts = report() if case in ("merge", "master") else None
    for _ in range(n):
        if case == "expire":
            table.expire(1700000000.0)      # the steady state: every node fresh
            continue
        if case in ("report", "report_idle"):
            report()
            continue
        if case == "merge":
            merged(parts)
            continue
        if case == "single":
            document = {"version": "x", "subscriptions": stats.subscription_stream(table)}
        else:
            document = stats.master_document(merged(parts), table, ["127.0.0.1:1"], [])
        "".join(stats.render_pieces(document))
'''

CASES = {"refresh": (5000, "datagram"), "new": (5000, "datagram"),
         "read_refresh": (5000, "datagram"), "read_new": (5000, "datagram"),
         "read_copied": (5000, "datagram"), "single": (1, "document"),
         "master": (1, "document"), "report": (1, "report"), "report_idle": (1, "report"),
         "merge": (1, "document"), "expire": (1, "sweep")}


def collected(tree: str, case: str, n: int) -> int:
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                          os.path.realpath(sys.executable), "-c", _WORKER, tree, case, str(n)],
                         capture_output=True, text=True, timeout=900)
    match = re.search(r"Collected : (\d+)", out.stderr)
    if not match:
        raise RuntimeError("valgrind failed: %s" % out.stderr[-500:])
    return int(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", help="source tree (repeatable; default: this one)")
    parser.add_argument("--cases", default="refresh,new,single,master")
    args = parser.parse_args()
    trees = args.tree or [REPO_DIR]
    for case in args.cases.split(","):
        n, unit = CASES[case]
        for tree in trees:
            per = (collected(tree, case, n) - collected(tree, case, 0)) / n
            print("%-8s %-40s %14s instructions/%s" % (case, tree, "{:,.0f}".format(per), unit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
