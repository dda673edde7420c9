"""The per-request routing work of two source trees, side by side, without sockets.

    python3 bench/balancing_cost.py [--old DIR] [--new DIR] [--repeat N] [--number N]

Times what a session does for one bodyless request between reading its head and
connecting: scanning the vars and asking the router for a route (and, for a
subscribed key, giving the node back).  Each case runs in a fresh interpreter per
tree, the trees alternating, and the best of the repeats is kept, so the figure is
the cost of the code, not of whatever else the machine was doing.  A tree whose
``Router.route`` takes no request (before the 2.1 balancing work) is called the old
way.  Cases: ``static`` (``--fastrouter-to``), ``wrr`` (a subscribed key, two
nodes), and, for the new tree only, ``iphash``, ``backup`` and ``mount``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r'''
import inspect, json, sys, timeit
from uwsgi_fastrouter.protocol import scan_request, encode_vars
from uwsgi_fastrouter.router import Router, SubscriptionMapper
from uwsgi_fastrouter.subscription import SubscriptionTable, build_announcement, parse_announcement

case, repeat, number = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
new = len(inspect.signature(Router.route).parameters) > 2
block = encode_vars([(b"REQUEST_METHOD", b"GET"), (b"REQUEST_URI", b"/app1/x"),
                     (b"PATH_INFO", b"/app1/x"), (b"QUERY_STRING", b""),
                     (b"SERVER_PROTOCOL", b"HTTP/1.1"), (b"SERVER_NAME", b"localhost"),
                     (b"SERVER_PORT", b"80"), (b"REMOTE_ADDR", b"198.51.100.7"),
                     (b"REMOTE_PORT", b"40000"), (b"HTTP_HOST", b"example.com")])
scan = scan_request
mount = 1 if case == "mount" else 0
if case == "static":
    router = Router(to=["127.0.0.1:1", "127.0.0.1:2"])
else:
    table = SubscriptionTable(algo="iphash" if case == "iphash" else "wrr")
    for i, key in enumerate([b"example.com", b"example.com", b"example.com/app1"]):
        extra = {"backup": i} if case == "backup" else {}
        table.announce(parse_announcement(build_announcement(key, b"127.0.0.1:%d" % (i + 1), **extra)), 1e9)
    kw = {}
    if new:
        from uwsgi_fastrouter.balancing import make_client_of, make_scanner
        kw = {"mountpoints": mount, "client_of": make_client_of(None)}
        scan = make_scanner(mount, None) or scan_request
    router = Router(subscriptions=SubscriptionMapper(table, clock=lambda: 1e9, **kw))

class Session:
    caddr = ("127.0.0.1", 5000)
    info = None

session = Session()

def old_request():
    info = scan(block, None)
    route = router.route(info.key)
    router.release(route)

def new_request():
    info = session.info = scan(block, None)
    route = router.route(info.key, session)
    router.release(route)

run = new_request if new else old_request
best = min(timeit.repeat(run, repeat=repeat, number=number)) / number
print(json.dumps({"ns": best * 1e9, "new": new}))
'''


def measure(tree: str, case: str, repeat: int, number: int) -> float:
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run([sys.executable, "-c", CHILD, case, str(repeat), str(number)], env=env,
                         cwd=tree, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["ns"]


def main() -> None:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", help="the tree before (a checkout or git archive)")
    parser.add_argument("--new", default=here, help="the tree after (default: this one)")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--number", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trees = [("old", args.old)] if args.old else []
    trees.append(("new", args.new))
    print("ns per request (best of %d x %d, min over %d alternating rounds)"
          % (args.repeat, args.number, args.rounds))
    for case in ("static", "wrr", "iphash", "backup", "mount"):
        best = {}
        for _ in range(args.rounds):
            for name, tree in trees:
                if name == "old" and case not in ("static", "wrr"):
                    continue
                ns = measure(tree, case, args.repeat, args.number)
                best[name] = min(best.get(name, ns), ns)
        line = "%-7s" % case + "".join("  %s %7.0f" % (name, ns) for name, ns in best.items())
        if "old" in best:
            line += "  new/old %.3f" % (best["new"] / best["old"])
        print(line)


if __name__ == "__main__":
    main()
