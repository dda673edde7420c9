#!/usr/bin/env python3
"""What the shared-key check and the sender allow list cost per subscription datagram.

Usage::

    python3 bench/hmac_cost.py [--rounds 7] [--packets 20000]

Nothing here asserts a timing; it prints CPU nanoseconds per datagram and the
difference to the matching scenario without the check.

Theory of operation
-------------------
The unit measured is one call of ``SubscriptionServer.handle(datagram, sender)``: the
allow check, strict parsing, the proof, the table update -- everything a router does
with a datagram after ``recvfrom``, nothing of the kernel (``bench/subscriptions.py``
measures the whole router).  Log lines go to ``/dev/null`` (written, so they count).
Times are CPU time of this process (``time.process_time``); the scenarios run
interleaved, round after round, and the best round is reported (on a shared machine
the fastest round is the one least disturbed) with the median next to it.
Every datagram is built before the clock starts.  Pairs (check vs none):

``plain-refresh`` / ``hmac-refresh``
    one node re-announcing; the HMAC packets carry ``unix`` (each newer) and ``hmac``
``plain-new`` / ``hmac-new``
    fresh keys, each a new pool and node
``hmac-wrong``
    packets under another key at an HMAC router: each refused (to set against
    ``plain-refresh``: the cost of a refusal)
``plain-refresh`` / ``allow-udp``, ``allow-unix``
    the same refreshes from a sender the allow list admits (three networks, or a
    path prefix among three rules)
``allow-refused``
    the same datagrams from a sender the list does not admit (never parsed)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)

from uwsgi_fastrouter import log as logmod  # noqa: E402
from uwsgi_fastrouter.allowlist import SourceAllowList  # noqa: E402
from uwsgi_fastrouter.signing import HmacChecker, hmac_tag  # noqa: E402
from uwsgi_fastrouter.subscription import SubscriptionTable, build_announcement  # noqa: E402
from uwsgi_fastrouter.subserver import SubscriptionServer  # noqa: E402

T0 = 1_700_000_000
SECRET = b"a-shared-secret-of-32-bytes-long"
ADDRESS = b"127.0.0.1:3031"
UDP_SENDER = ("10.1.2.3", 40000)
UNIX_SENDER = "/run/subscribers/app-17.sock"
RULES = ["192.168.0.0/16", "fd00::/8", "10.0.0.0/8", "/run/other.sock", "@pool-*",
         "/run/subscribers/"]


class Clock:
    now = float(T0)


def packets(n: int) -> Dict[str, List[bytes]]:
    def shared(block: bytes) -> bytes:
        return hmac_tag(SECRET, block)

    def wrong(block: bytes) -> bytes:
        return hmac_tag(b"another-key-of-32-bytes-length!!", block)

    one = build_announcement(b"example.com", ADDRESS)
    return {
        "plain-refresh": [one] * n,
        "hmac-refresh": [build_announcement(b"example.com", ADDRESS, unix=T0 + i,
                                            hmac_signer=shared) for i in range(1, n + 1)],
        "plain-new": [build_announcement(b"k%d.example" % i, ADDRESS) for i in range(n)],
        "hmac-new": [build_announcement(b"k%d.example" % i, ADDRESS, unix=T0, hmac_signer=shared)
                     for i in range(n)],
        "hmac-wrong": [build_announcement(b"example.com", ADDRESS, unix=T0 + i,
                                          hmac_signer=wrong) for i in range(1, n + 1)],
    }


def server(*, hmac: bool = False, allow: bool = False) -> SubscriptionServer:
    table = SubscriptionTable(tolerance=3600, max_keys=10 ** 7,
                              verifier=HmacChecker(SECRET) if hmac else None,
                              sign_tolerance=86400, log=logmod.log)
    return SubscriptionServer(Clock, table, [], wall_clock=lambda: Clock.now,
                              allow=SourceAllowList(RULES) if allow else None)


def timed(srv: SubscriptionServer, datagrams: List[bytes], sender) -> float:
    """CPU nanoseconds per datagram."""
    handle = srv.handle
    start = time.process_time()
    for datagram in datagrams:
        handle(datagram, sender)
    return (time.process_time() - start) * 1e9 / len(datagrams)


def scenarios(p: Dict[str, List[bytes]]) -> Dict[str, Callable[[], float]]:
    def primed(srv: SubscriptionServer) -> SubscriptionServer:
        first = p["hmac-refresh"][0] if srv.table.verifier is not None else p["plain-refresh"][0]
        srv.handle(first, UDP_SENDER)
        return srv

    return {
        "plain-refresh": lambda: timed(primed(server()), p["plain-refresh"], UDP_SENDER),
        "hmac-refresh": lambda: timed(server(hmac=True), p["hmac-refresh"], UDP_SENDER),
        "plain-new": lambda: timed(server(), p["plain-new"], UDP_SENDER),
        "hmac-new": lambda: timed(server(hmac=True), p["hmac-new"], UDP_SENDER),
        "hmac-wrong": lambda: timed(primed(server(hmac=True)), p["hmac-wrong"], UDP_SENDER),
        "allow-udp": lambda: timed(primed(server(allow=True)), p["plain-refresh"], UDP_SENDER),
        "allow-unix": lambda: timed(primed(server(allow=True)), p["plain-refresh"], UNIX_SENDER),
        "allow-refused": lambda: timed(server(allow=True), p["plain-refresh"], ("192.0.2.1", 1)),
    }


BASELINE = {"hmac-refresh": "plain-refresh", "hmac-new": "plain-new",
            "hmac-wrong": "plain-refresh", "allow-udp": "plain-refresh",
            "allow-unix": "plain-refresh", "allow-refused": "plain-refresh"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--packets", type=int, default=20000)
    a = ap.parse_args(argv)
    logmod.set_stream(open(os.devnull, "w"))
    runs = scenarios(packets(a.packets))
    results: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(a.rounds):
        for name, run in runs.items():
            results[name].append(run())
    print("CPU ns per datagram through SubscriptionServer.handle(), best and median of %d "
          "rounds of %d" % (a.rounds, a.packets))
    print("%-15s %8s %8s  %s" % ("scenario", "best", "median", "best vs"))
    for name, values in results.items():
        best = min(values)
        versus = ""
        base = BASELINE.get(name)
        if base is not None:
            base_ns = min(results[base])
            versus = "%+.0f ns (%+.1f %%) vs %s" % (best - base_ns,
                                                    100 * (best - base_ns) / base_ns, base)
        print("%-15s %8.0f %8.0f  %s" % (name, best, statistics.median(values), versus))
    return 0


if __name__ == "__main__":
    sys.exit(main())
