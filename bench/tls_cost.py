#!/usr/bin/env python3
"""What does TLS to nodes cost?  Requests/s and router CPU per request, TLS path vs plain.

Usage::

    UWSGI_BIN=/path/to/uwsgi python3 bench/tls_cost.py [--rounds 3] [--duration 4]
                                                       [--node-processes 2]

One real uWSGI node (``$UWSGI_BIN``, built with SSL) serves the same small WSGI app on
two sockets: ``--socket`` (plain uwsgi) and ``--suwsgi-socket`` (uwsgi over TLS, an RSA
2048 certificate made here with ``openssl``).  Two routers of this tree, one process
each, forward to it: ``plain`` with ``--fastrouter-to`` the plain socket, ``tls`` with
the TLS socket listed in ``--fastrouter-tls-node`` and the test CA in
``--fastrouter-tls-ca`` (so every request makes a new TCP connection and a full TLS
handshake with the node, as every request makes a new connection).

For each case (c=1 and c=16; a small answer and a 1 MiB one, ``loadgen -r``) and for
``--rounds`` rounds, each router in turn gets a closed-loop ``loadgen`` run of
``--duration`` seconds after a one-second warm-up; the table shows the median
requests/s and the router's CPU milliseconds per request (its process, from /proc).
The node is shared and is often the bottleneck: the router's CPU per request is the
figure that belongs to the router.  Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
sys.path.insert(0, BENCH_DIR)

import processes  # noqa: E402
import proctree  # noqa: E402

BUILD_DIR = os.path.join(BENCH_DIR, "build")

NODE_APP = '''\
BLOCK = b"x" * 65536


def application(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path.startswith("/bytes/"):
        size = int(path[7:])
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(size))])
        full, rest = divmod(size, len(BLOCK))
        return [BLOCK] * full + ([BLOCK[:rest]] if rest else [])
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
'''


def openssl(directory: str, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def make_certificates(directory: str) -> None:
    openssl(directory, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
            "-out", "ca.crt", "-days", "2", "-subj", "/CN=bench ca")
    openssl(directory, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key",
            "-out", "node.csr", "-subj", "/CN=node")
    with open(os.path.join(directory, "node.ext"), "w") as ext:
        ext.write("subjectAltName=IP:127.0.0.1\n")
    openssl(directory, "x509", "-req", "-in", "node.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "node.crt", "-days", "2", "-extfile", "node.ext")


def wait_port(port: int, child: subprocess.Popen, what: str, workdir: str) -> None:
    deadline = time.monotonic() + 30
    while not processes.probe(port, timeout=1.0):
        if child.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("%s did not start (see %s)" % (what, workdir))
        time.sleep(0.05)


def start_router(name: str, extra: List[str], workdir: str) -> Tuple[subprocess.Popen, int]:
    port = processes.free_port()
    argv = [sys.executable, "-m", "uwsgi_fastrouter", "--fastrouter", "127.0.0.1:%d" % port,
            "--listen", "1024"] + extra
    child = subprocess.Popen(argv, cwd=REPO_DIR, env=dict(os.environ, PYTHONPATH=REPO_DIR),
                             stdout=subprocess.DEVNULL,
                             stderr=open(os.path.join(workdir, name + ".log"), "wb"))
    wait_port(port, child, "router " + name, workdir)
    return child, port


def run_load(port: int, conc: int, duration: float, size: int) -> Dict[str, str]:
    argv = [os.path.join(BUILD_DIR, "loadgen"), "-p", str(port), "-c", str(conc),
            "-d", str(duration), "-w", "1", "-k", "bench.example.com"]
    if size:
        argv += ["-r", str(size)]
    out = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith("RESULT"):
            return processes.parse_kv(line)
    raise RuntimeError("loadgen gave no result: " + out[-500:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--node-processes", type=int, default=2)
    a = p.parse_args()
    uwsgi = os.environ.get("UWSGI_BIN") or shutil.which("uwsgi")
    if not uwsgi or shutil.which("openssl") is None:
        print("needs UWSGI_BIN (a uWSGI built with SSL) and the openssl command", file=sys.stderr)
        return 2
    subprocess.run(["make", "-s", "-C", BENCH_DIR], check=True)
    workdir = tempfile.mkdtemp(prefix="tls-cost-")
    make_certificates(workdir)
    with open(os.path.join(workdir, "app.py"), "w") as app:
        app.write(NODE_APP)
    plain_port, tls_port = processes.free_port(), processes.free_port()
    node = subprocess.Popen(
        [uwsgi, "--master", "--socket", "127.0.0.1:%d" % plain_port,
         "--suwsgi-socket", "127.0.0.1:%d,node.crt,node.key" % tls_port, "--wsgi-file", "app.py",
         "--processes", str(a.node_processes), "--disable-logging", "--listen", "1024",
         "--die-on-term"],
        cwd=workdir, stdout=subprocess.DEVNULL, stderr=open(os.path.join(workdir, "node.log"), "wb"))
    routers: Dict[str, Tuple[subprocess.Popen, int]] = {}
    try:
        wait_port(plain_port, node, "the uWSGI node", workdir)
        routers["plain"] = start_router("plain", ["--fastrouter-to", "127.0.0.1:%d" % plain_port], workdir)
        tls_node = "127.0.0.1:%d" % tls_port
        routers["tls"] = start_router("tls", ["--fastrouter-to", tls_node, "--fastrouter-tls-node", tls_node,
                                              "--fastrouter-tls-ca", os.path.join(workdir, "ca.crt")],
                                      workdir)
        cases = [(1, 0), (16, 0), (1, 1 << 20), (16, 1 << 20)]
        table: Dict[Tuple[int, int, str], List[Tuple[float, float, int]]] = {}
        for conc, size in cases:
            for rnd in range(a.rounds):
                names = ["plain", "tls"] if rnd % 2 == 0 else ["tls", "plain"]
                for name in names:
                    child, port = routers[name]
                    cpu0 = proctree.tree_cpu_seconds(child.pid)
                    r = run_load(port, conc, a.duration, size)
                    cpu = proctree.tree_cpu_seconds(child.pid) - cpu0
                    requests = int(r["requests"])
                    row = (float(r["rps"]), cpu * 1000 / max(requests, 1), int(r["errors"]))
                    table.setdefault((conc, size, name), []).append(row)
                    print("c=%-2d %-5s %-5s round %d: %8.0f req/s  %.3f router CPU ms/req  errors %d"
                          % (conc, "1MiB" if size else "small", name, rnd + 1, *row), flush=True)
        print("\n%d rounds x %.0f s, node: uWSGI with %d processes" % (a.rounds, a.duration, a.node_processes))
        print("%-4s %-6s %10s %10s %8s %14s %14s %8s"
              % ("c", "answer", "plain r/s", "tls r/s", "ratio", "plain CPU ms", "tls CPU ms", "ratio"))
        for conc, size in cases:
            med = {name: (statistics.median(x[0] for x in table[(conc, size, name)]),
                          statistics.median(x[1] for x in table[(conc, size, name)]))
                   for name in ("plain", "tls")}
            print("%-4d %-6s %10.0f %10.0f %8.2f %14.3f %14.3f %8.2f"
                  % (conc, "1MiB" if size else "small", med["plain"][0], med["tls"][0],
                     med["tls"][0] / med["plain"][0], med["plain"][1], med["tls"][1],
                     med["tls"][1] / med["plain"][1]))
    finally:
        for child, _port in routers.values():
            child.send_signal(2)
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        node.terminate()
        try:
            node.wait(15)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
