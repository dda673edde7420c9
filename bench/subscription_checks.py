#!/usr/bin/env python3
"""What the subscription checks cost: datagrams per second through the subscription server.

Usage::

    python3 bench/subscription_checks.py [--base REV] [--rounds 5] [--packets 20000]
                                         [--signed 400]

Without ``--base`` it measures this tree; with ``--base REV`` (any git revision, e.g.
``HEAD~3``) it measures that revision and this tree in the same run, alternating
round by round, and prints both with their ratio.  About a minute with the defaults
(most of it signing the packets up front).  Nothing here asserts a timing.

Theory of operation
-------------------
The unit measured is one call of ``SubscriptionServer.handle(datagram)``: strict
parsing, the credential and signature checks, the table update and the decision
about ``notify`` -- everything a router does with a datagram after ``recvfrom``, and
nothing of the reactor or the kernel (``bench/subscriptions.py`` measures the whole
router).  Log lines go to ``/dev/null`` (they are written, so their cost counts).
Packets per second are per CPU second of the worker (``time.process_time``), so other
processes on a busy machine disturb the figures less than a wall clock would.

The parent builds every datagram once, with this tree's
:func:`~uwsgi_fastrouter.subscription.build_announcement` and an RSA key made by
``openssl genrsa 2048`` (public key files, one per signed key, in a temporary
directory), and pickles them.  Each round starts one child process per tree
(``--worker``, ``PYTHONPATH`` = that tree) that runs every scenario once on fresh
tables and prints packets/s as JSON; the parent reports the median of the rounds
and half their min-max range.  Scenarios:

``refresh``         1,000 subscribed keys re-announced (the steady state)
``new``             fresh keys into a table with room (a pool and a node each)
``full``            fresh keys thrown at a full table (``--subscription-max-keys``
                    1,000): each is refused
``signed-refresh``  signed re-announces of one node, each newer than the last
``signed-new``      signed announces of new keys (one key file each)
``signed-flood``    unsigned fresh keys at a signing router: each is refused
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
T0 = 1_700_000_000
SCENARIOS = ("refresh", "new", "full", "signed-refresh", "signed-new", "signed-flood")
FULL_KEYS = 1000
ADDRESS = b"127.0.0.1:9"


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# the parent: packets, trees, rounds


def make_packets(workdir: str, n: int, signed: int) -> Dict[str, object]:
    """Every datagram of every scenario, built with this tree's code."""
    sys.path.insert(0, REPO_DIR)
    from uwsgi_fastrouter.signing import load_private_key, sign
    from uwsgi_fastrouter.subscription import build_announcement

    keydir = os.path.join(workdir, "keys")
    os.mkdir(keydir)
    private_path = os.path.join(workdir, "private.pem")
    subprocess.run(["openssl", "genrsa", "-out", private_path, "2048"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    public = subprocess.run(["openssl", "rsa", "-in", private_path, "-pubout"], check=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=60).stdout
    with open(private_path, "rb") as f:
        private = load_private_key(f.read())

    def signer(data: bytes) -> bytes:
        return sign(private, "SHA1", data)

    def write_key(key: bytes) -> None:
        with open(os.path.join(keydir, key.decode() + ".pem"), "wb") as f:
            f.write(public)

    write_key(b"signed.bench")
    new_keys = [b"sig%05d.bench" % i for i in range(signed)]
    for key in new_keys:
        write_key(key)
    base = [build_announcement(b"k%05d.bench" % i, ADDRESS, cores=1) for i in range(FULL_KEYS)]
    return {
        "keydir": keydir,
        "base": base,
        "refresh": [base[i % FULL_KEYS] for i in range(n)],
        "new": [build_announcement(b"new%06d.bench" % i, ADDRESS, cores=1) for i in range(n)],
        "full": [build_announcement(b"flood%06d.bench" % i, ADDRESS, cores=1) for i in range(n)],
        "signed-refresh": [build_announcement(b"signed.bench", ADDRESS, unix=T0 + i, signer=signer)
                           for i in range(signed)],
        "signed-new": [build_announcement(key, ADDRESS, unix=T0, signer=signer) for key in new_keys],
        "signed-flood": [build_announcement(b"flood%06d.bench" % i, ADDRESS, cores=1, unix=T0)
                         for i in range(n)],
    }


def export_tree(rev: str, workdir: str) -> str:
    tree = os.path.join(workdir, "base")
    os.mkdir(tree)
    archive = subprocess.run(["git", "-C", REPO_DIR, "archive", rev, "uwsgi_fastrouter"],
                             check=True, stdout=subprocess.PIPE).stdout
    subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
    return tree


def run_worker(tree: str, data_path: str) -> Dict[str, float]:
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", tree, data_path],
                         check=True, stdout=subprocess.PIPE, env=env, cwd=tree, timeout=600).stdout
    return json.loads(out)


def report(results: Dict[str, List[Dict[str, float]]], names: List[str]) -> str:
    header = ["scenario"] + ["%s pkt/s" % name for name in names]
    if len(names) == 2:
        header.append("%s/%s" % (names[1], names[0]))
    rows = [header]
    for scenario in SCENARIOS:
        row = [scenario]
        medians = []
        for name in names:
            values = [r[scenario] for r in results[name]]
            med = statistics.median(values)
            medians.append(med)
            row.append("%.0f ± %.0f" % (med, (max(values) - min(values)) / 2))
        if len(names) == 2:
            row.append("%.2f" % (medians[1] / medians[0]))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", help="git revision to measure next to this tree")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--packets", type=int, default=20000, help="datagrams per unsigned scenario")
    p.add_argument("--signed", type=int, default=400, help="datagrams per signed scenario")
    p.add_argument("--worker", nargs=2, metavar=("TREE", "DATA"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(*a.worker)))
        return 0
    if shutil.which("openssl") is None:
        log("the openssl command is needed to make the signing key")
        return 2
    workdir = tempfile.mkdtemp(prefix="frsubchecks.")
    try:
        log("signing %d packets ..." % (2 * a.signed))
        data_path = os.path.join(workdir, "packets.pickle")
        with open(data_path, "wb") as f:
            pickle.dump(make_packets(workdir, a.packets, a.signed), f)
        trees = {}
        if a.base:
            trees["base"] = export_tree(a.base, workdir)
        trees["this"] = REPO_DIR
        results: Dict[str, List[Dict[str, float]]] = {name: [] for name in trees}
        for r in range(a.rounds):
            for name, tree in (trees.items() if r % 2 == 0 else reversed(list(trees.items()))):
                log("round %d: %s" % (r + 1, name))
                results[name].append(run_worker(tree, data_path))
        print("datagrams through SubscriptionServer.handle(), median of %d rounds ± half the "
              "min-max range%s" % (a.rounds, " (base = %s)" % a.base if a.base else ""))
        print(report(results, list(trees)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


# ---------------------------------------------------------------------------
# the worker: runs in a child with PYTHONPATH = the tree under test


def worker(tree: str, data_path: str) -> Dict[str, float]:
    sys.path.insert(0, tree)
    from uwsgi_fastrouter import log as logmod
    from uwsgi_fastrouter.signing import SignatureChecker
    from uwsgi_fastrouter.subscription import SubscriptionTable
    from uwsgi_fastrouter.subserver import SubscriptionServer

    logmod.set_stream(open(os.devnull, "w"))
    with open(data_path, "rb") as f:
        packets = pickle.load(f)

    class Clock:
        now = float(T0)

    def read(path: str):
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError:
            return None

    def server(*, max_keys: int = 10 ** 7, signed: bool = False) -> SubscriptionServer:
        verifier = SignatureChecker("SHA1:%s" % packets["keydir"], read) if signed else None
        table = SubscriptionTable(tolerance=3600, max_keys=max_keys, max_nodes=64,
                                  verifier=verifier, sign_tolerance=86400, log=logmod.log)
        return SubscriptionServer(Clock, table, [], wall_clock=lambda: Clock.now)

    def timed(srv: SubscriptionServer, datagrams) -> float:
        # CPU time of this process: another process taking the CPU does not count
        handle = srv.handle
        start = time.process_time()
        for datagram in datagrams:
            handle(datagram, "/bench.sock")
        return len(datagrams) / (time.process_time() - start)

    out = {}
    srv = server()
    for datagram in packets["base"]:
        srv.handle(datagram)
    out["refresh"] = timed(srv, packets["refresh"])
    out["new"] = timed(server(), packets["new"])
    srv = server(max_keys=FULL_KEYS)
    for datagram in packets["base"]:
        srv.handle(datagram)
    out["full"] = timed(srv, packets["full"])
    out["signed-refresh"] = timed(server(signed=True), packets["signed-refresh"])
    out["signed-new"] = timed(server(signed=True), packets["signed-new"])
    out["signed-flood"] = timed(server(signed=True), packets["signed-flood"])
    return out


if __name__ == "__main__":
    sys.exit(main())
