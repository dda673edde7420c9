#!/usr/bin/env python3
"""What host names cost the request path and the subscription server.

Usage::

    python3 bench/names_cost.py [--number 200000] [--repeat 7]

Per request the router does ``Router.route(key)`` and the session
``sockets.node_sockaddr(route.address)``; both are timed for ``--fastrouter-to``
given as three IP literals and as one host name that resolved to the same three
addresses (the nodes are then literals: the same work).  Per subscription datagram
``SubscriptionServer.handle`` is timed for a literal address with
``--subscription-resolve-names`` off and on (on adds one ``host_name`` test), and for
a resolved name (one node per address).  Prints the best of ``--repeat`` runs in
nanoseconds per call; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import os
import sys
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from uwsgi_fastrouter.names import NameTable  # noqa: E402
from uwsgi_fastrouter.reactor import Reactor  # noqa: E402
from uwsgi_fastrouter.resolver import Resolver  # noqa: E402
from uwsgi_fastrouter.router import Router  # noqa: E402
from uwsgi_fastrouter.sockets import node_sockaddr  # noqa: E402
from uwsgi_fastrouter.subscription import SubscriptionTable, build_announcement  # noqa: E402
from uwsgi_fastrouter.subserver import SubscriptionServer  # noqa: E402

IPS = ("10.0.0.1", "10.0.0.2", "10.0.0.3")


def request_path(router: Router):
    def one() -> None:
        node_sockaddr(router.route(b"www.example.com").address)
    return one


def subscription_path(names, address: bytes):
    server = SubscriptionServer(Reactor(), SubscriptionTable(), [], wall_clock=lambda: 1000.0,
                                names=names)
    packet = build_announcement(b"www.example.com", address)
    return lambda: server.handle(packet)


def resolved_names() -> Resolver:
    table = NameTable(interval=60)
    table.add("web.example", 0.0)
    table.due(0.0)
    table.resolved("web.example", IPS, 0.0)
    return Resolver(Reactor(), table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    literal = Router(to=["%s:3031" % ip for ip in IPS])
    named = Router(to=["web.example:3031"])
    named.resolve_names({"web.example": IPS}.get)
    names = resolved_names()
    cases = [
        ("request: --fastrouter-to 3 IP literals", request_path(literal)),
        ("request: --fastrouter-to a name with 3 IPs", request_path(named)),
        ("announce literal, resolve-names off", subscription_path(None, b"10.0.0.1:3031")),
        ("announce literal, resolve-names on", subscription_path(names, b"10.0.0.1:3031")),
        ("announce name (3 IPs), resolve-names on", subscription_path(names, b"web.example:3031")),
    ]
    print("best of %d x %d calls, the cases interleaved" % (args.repeat, args.number))
    best = [float("inf")] * len(cases)
    for _ in range(args.repeat):
        for i, (_, call) in enumerate(cases):
            best[i] = min(best[i], timeit.timeit(call, number=args.number))
    for (name, _), seconds in zip(cases, best):
        print("%-45s %8.1f ns" % (name, seconds / args.number * 1e9))
    return 0


if __name__ == "__main__":
    sys.exit(main())
