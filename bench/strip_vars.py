#!/usr/bin/env python3
"""What --fastrouter-strip-magic-vars (and --fastrouter-http-errors) cost per request.

Usage::

    python3 bench/strip_vars.py [--rounds 5] [--duration 4] [--concurrency 16] [--number 200000]
                                [--tree DIR] [--skip-e2e]

Nothing here asserts a figure; it prints two tables.

Theory of operation
-------------------
1. **In isolation** (``timeit``, best of 7): ``VarStripper.strip`` on the head nginx
   sends for a plain GET (its stock ``uwsgi_params`` plus a few headers, 16 vars), for
   the magic list and for a mixed rule set (``HTTP_X_*`` plus two names, no common
   beginning so several substring searches), without any var to strip (the usual case:
   one substring search, no copy) and with two of them (the walk and the rebuilt
   head); next to ``protocol.scan_request`` on the same head, the one pass every
   request already pays.
2. **End to end** (like ``bench/access_log.py``, whose ``measure`` it reuses): one
   backend (``bench/build/backend``) and one router process per variant, the C load
   generator in a closed loop of ``--concurrency`` clients against each in turn,
   ``--rounds`` times with the order rotated; medians of requests/s and of the
   router's CPU per request.  Variants: ``off``; ``strip-magic``
   (``--fastrouter-strip-magic-vars``: the load generator's requests carry no magic
   var, which is what nginx sends); ``http-errors`` (``--fastrouter-http-errors``:
   never triggered by these requests, so this shows the option costs the served path
   nothing).
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
import timeit
from typing import Dict, List, Optional

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
sys.path.insert(0, BENCH_DIR)

import access_log  # noqa: E402  (siblings in bench/)
import processes  # noqa: E402

NGINX_VARS = [
    (b"QUERY_STRING", b"page=2&sort=name"), (b"REQUEST_METHOD", b"GET"), (b"CONTENT_TYPE", b""),
    (b"CONTENT_LENGTH", b""), (b"REQUEST_URI", b"/catalogue/items?page=2&sort=name"),
    (b"PATH_INFO", b"/catalogue/items"), (b"DOCUMENT_ROOT", b"/usr/share/nginx/html"),
    (b"SERVER_PROTOCOL", b"HTTP/1.1"), (b"REQUEST_SCHEME", b"http"),
    (b"REMOTE_ADDR", b"198.51.100.7"), (b"REMOTE_PORT", b"51234"), (b"SERVER_PORT", b"80"),
    (b"SERVER_NAME", b"example.com"), (b"HTTP_HOST", b"example.com"),
    (b"HTTP_USER_AGENT", b"Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"),
    (b"HTTP_ACCEPT", b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
]
MAGIC_EXTRA = [(b"UWSGI_FILE", b"/tmp/evil.py"), (b"UWSGI_APPID", b"evil")]


def isolation(number: int) -> None:
    from uwsgi_fastrouter.protocol import encode_packet, scan_request
    from uwsgi_fastrouter.stripvars import make_stripper

    plain = encode_packet(NGINX_VARS)
    magic = encode_packet(NGINX_VARS[:8] + MAGIC_EXTRA + NGINX_VARS[8:])
    magic_rules = make_stripper([], magic=True)
    mixed_rules = make_stripper(["HTTP_X_*", "SECRET_TOKEN", "PROXY_AUTH"], magic=False)
    mixed_head = encode_packet(NGINX_VARS + [(b"HTTP_X_INTERNAL", b"1"), (b"SECRET_TOKEN", b"t")])
    plain_view = memoryview(bytearray(plain))
    cases = [
        ("scan_request (paid by every request)", lambda: scan_request(plain[4:])),
        ("magic list, nothing to strip", lambda: magic_rules.strip(plain_view[:len(plain)])),
        ("magic list, 2 vars stripped", lambda: magic_rules.strip(magic)),
        ("mixed rules, nothing to strip", lambda: mixed_rules.strip(plain_view[:len(plain)])),
        ("mixed rules, 2 vars stripped", lambda: mixed_rules.strip(mixed_head)),
    ]
    print("In isolation: head of %d vars, %d bytes; best of 7 x %d calls" % (
        len(NGINX_VARS), len(plain), number))
    for name, call in cases:
        best = min(timeit.repeat(call, number=number, repeat=7))
        print("  %-40s %8.0f ns" % (name, best / number * 1e9))
    print()


def end_to_end(a: argparse.Namespace) -> None:
    if not (os.access(access_log.BACKEND_BIN, os.X_OK) and os.access(access_log.LOADGEN_BIN, os.X_OK)):
        subprocess.run(["make", "-C", BENCH_DIR], check=True, stdout=subprocess.DEVNULL)
    workdir = tempfile.mkdtemp(prefix="strip-vars-")
    backend, backend_addr = processes.spawn_listening(
        "backend", [access_log.BACKEND_BIN, "-p", "0"], os.path.join(workdir, "backend.log"))
    env = dict(os.environ, PYTHONPATH=os.path.abspath(a.tree))
    variants = {"off": [], "strip-magic": ["--fastrouter-strip-magic-vars"],
                "http-errors": ["--fastrouter-http-errors"]}
    routers: Dict[str, processes.Child] = {}
    ports: Dict[str, int] = {}
    rows: Dict[str, List[Dict[str, float]]] = {name: [] for name in variants}
    try:
        for index, (name, extra) in enumerate(variants.items()):
            port = processes.free_port()
            cmd = [sys.executable, "-m", "uwsgi_fastrouter", "--fastrouter", "127.0.0.1:%d" % port,
                   "--fastrouter-to", backend_addr, "--listen", "1024"] + extra
            child = processes.spawn("router-%d" % index, cmd,
                                    os.path.join(workdir, "router-%d.log" % index), cwd=workdir, env=env)
            routers[name], ports[name] = child, port
            print("  %-12s %s" % (name, " ".join(cmd)))
            if not processes.wait_serving(child, port, 20.0):
                raise RuntimeError("router %r did not serve:\n%s" % (name, child.log_tail()))
        names = list(variants)
        for round_ in range(a.rounds):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                rows[name].append(access_log.measure(routers[name], ports[name], a, workdir))
    finally:
        for child in routers.values():
            processes.stop(child, signal.SIGINT)
        processes.stop(backend, signal.SIGINT)
        shutil.rmtree(workdir, ignore_errors=True)
    print("End to end: c=%d, %d rounds x %s s, medians; %s\n"
          % (a.concurrency, a.rounds, a.duration, time.strftime("%Y-%m-%d %H:%M:%S")))
    base_rps = statistics.median(x["rps"] for x in rows["off"])
    base_cpu = statistics.median(x["cpu_us"] for x in rows["off"])
    print("%-12s %10s %8s %18s %8s %7s" % ("variant", "req/s", "vs off", "router CPU us/req",
                                         "vs off", "errors"))
    for name in variants:
        r = rows[name]
        rps = statistics.median(x["rps"] for x in r)
        cpu = statistics.median(x["cpu_us"] for x in r)
        print("%-12s %10.0f %+7.1f%% %18.1f %+7.1f%% %7d"
              % (name, rps, 100.0 * (rps / base_rps - 1), cpu, 100.0 * (cpu / base_cpu - 1),
                 sum(x["errors"] for x in r)))
    print("\nall rounds (CPU us/req): " + "; ".join(
        "%s %s" % (name, " ".join("%.1f" % x["cpu_us"] for x in rows[name])) for name in variants))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--number", type=int, default=200_000, help="calls per timeit run (200000)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tree", default=REPO_DIR, help="source tree whose uwsgi_fastrouter is run")
    p.add_argument("--skip-e2e", action="store_true", help="only the in-isolation table")
    a = p.parse_args(argv)
    sys.path.insert(0, os.path.abspath(a.tree))
    isolation(a.number)
    if not a.skip_e2e:
        end_to_end(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
