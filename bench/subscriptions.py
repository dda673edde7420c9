#!/usr/bin/env python3
"""Subscriptions under load: datagrams per second, and routing among 10,000 keys.

Usage::

    python3 bench/subscriptions.py [--quick] [--keys 10000] [--rounds 3] [--duration 5]
                                   [--concurrency 16] [--uwsgi PATH | --no-uwsgi] [--keep-logs]
                                   [--phases datagrams,routing] [--python-load]
                                   [--python-sender] [--ours-args ARGS]

About two minutes with the defaults (``--quick``: about 30 s).  Prints the exact command
lines and two tables; nothing here asserts a timing.

Theory of operation
-------------------
Each router under test (``ours``: ``python -m uwsgi_fastrouter``; ``uwsgi``: the real
FastRouter, when a binary is found) gets two subscription servers, UDP and a UNIX
datagram socket, a stats server and a generous ``--subscription-tolerance`` so nothing
expires while it is measured.

1. Datagrams processed per second.  N announce packets for N distinct keys are built
   up front (:func:`uwsgi_fastrouter.subscription.build_announcement`), then sent as
   fast as the router takes them, followed by one *marker* packet for a new key.
   Packets on one socket are processed in order, so when the router logs
   ``marker => new node`` it has handled everything before it: packets/s = N / (time
   from the first send until that line is in the router's log).  The stats then
   confirm how many were applied.  The routers under test run side by side, one
   transport at a time, and their refresh rounds alternate, so that a change in the
   machine's load falls on both.  ``new`` creates N pools (and two log lines each);
   ``refresh`` re-announces the same N keys with a new weight, the steady state of a
   busy router (10,000 keys announced every 10 s are 1,000 packets/s), and the stats
   must show every node with that weight.  Router CPU per packet comes from the
   schedstat run time of its process tree (ns resolution) over the same window.

   The sender is ``bench/build/dgramsend`` (C, built with ``make -C bench``; it
   reads the packets from a file written before the clock starts): a Python sender
   spends several microseconds per datagram, about what uWSGI spends on one, so it
   capped uWSGI's rate (``--python-sender`` still measures that way).

   * unix: a blocking sender on a UNIX datagram socket; the kernel makes it wait
     while the router's queue is full, so nothing is lost.
   * udp: the sender watches the router socket's receive queue in ``/proc/net/udp``
     and pauses while it is more than half of ``rmem_default``; the ``drops`` column
     of the same file shows whether the kernel dropped any (it should not).

2. Routing cost with many keys.  The C load generator (``bench/build/loadgen``, built
   with ``make -C bench``; a Python fallback is used if that fails) runs closed-loop
   requests for one key, ``hot.bench``, at concurrency C against ``bench/build/backend``
   while the router holds 1 key, then 10,000 keys (9,999 more for the same backend),
   alternating for each round.  Router CPU is the ``/proc`` CPU time of its whole
   process tree between the load generator's START and END lines, per request.  A
   hash-table lookup does not grow with the number of keys: the 10,000/1 ratio of
   both figures should be about 1.00.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
for _path in (BENCH_DIR, REPO_DIR):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import processes  # noqa: E402  (siblings in bench/)
import proctree  # noqa: E402
from uwsgi_fastrouter.subscription import build_announcement  # noqa: E402

BACKEND_BIN = os.path.join(BENCH_DIR, "build", "backend")
LOADGEN_BIN = os.path.join(BENCH_DIR, "build", "loadgen")
SENDER_BIN = os.path.join(BENCH_DIR, "build", "dgramsend")
#: whether the datagrams go through SENDER_BIN (set in main)
SENDER = {"c": False}
HOT_KEY = "hot.bench"
#: the first command line each router was started with (printed with the results)
COMMANDS: Dict[str, List[str]] = {}


class BenchError(Exception):
    pass


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Utilities


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def udp_socket_state(port: int) -> Optional[Tuple[int, int]]:
    """(rx_queue bytes, drops) of the IPv4 UDP socket bound to *port*, from /proc/net/udp."""
    try:
        with open("/proc/net/udp") as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return None
    suffix = ":%04X" % port
    for row in rows:
        cols = row.split()
        if len(cols) >= 13 and cols[1].endswith(suffix):
            return int(cols[4].split(":")[1], 16), int(cols[12])
    return None


def rmem_default() -> int:
    try:
        with open("/proc/sys/net/core/rmem_default") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 212992


class LogTail:
    """Follows a log file that a router writes, from the current end."""

    def __init__(self, path: str):
        self.path = path
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0
        self.buf = b""

    def wait_for(self, needle: str, timeout: float, poke: Optional[Callable[[], None]] = None) -> bool:
        target = needle.encode()
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self.offset)
                    data = f.read()
            except OSError:
                data = b""
            self.offset += len(data)
            self.buf = (self.buf + data)[-65536:]
            if target in self.buf:
                self.buf = self.buf[self.buf.index(target) + len(target):]
                return True
            if time.monotonic() >= deadline:
                return False
            if poke is not None:
                poke()
            time.sleep(0.001)  # polling interval of a bounded wait


def keys_for(n: int, prefix: str) -> List[bytes]:
    return [b"%s%05d.bench" % (prefix.encode(), i) for i in range(n)]


# ---------------------------------------------------------------------------
# Routers


class Router:
    """One router under test: its process, addresses and log."""

    def __init__(self, name: str, argv: List[str], child: processes.Child, listen_port: int,
                 udp_port: int, unix_path: str, stats_port: int):
        self.name = name
        self.argv = argv
        self.child = child
        self.listen_port = listen_port
        self.udp_port = udp_port
        self.unix_path = unix_path
        self.stats_port = stats_port
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._unix = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # blocking: waits when full

    def stats(self) -> dict:
        import json
        with socket.create_connection(("127.0.0.1", self.stats_port), timeout=30) as s:
            chunks = []
            while True:
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
        raw = b"".join(chunks)
        if raw.startswith(b"HTTP/"):
            raw = raw.split(b"\r\n\r\n", 1)[1]
        return json.loads(raw.decode("utf-8"))

    def send(self, transport: str, packet: bytes) -> None:
        if transport == "unix":
            self._unix.sendto(packet, self.unix_path)
        else:
            self._udp.sendto(packet, ("127.0.0.1", self.udp_port))

    def close(self) -> None:
        self._udp.close()
        self._unix.close()
        if processes.stop(self.child, signal.SIGINT):
            log("!! router %s did not stop within 6 s of SIGINT: leftovers killed by PID" % self.name)


#: extra arguments for ``ours`` (``--ours-args``), e.g. ``--master --fastrouter-processes 2``
OURS_ARGS: List[str] = []
#: consecutive marker requests that must be served before every router process counts
#: as having applied the batch (several processes share the accept queue)
MARKER_PROBES = 6


def start_router(name: str, uwsgi: Optional[str], workdir: str, seq: int, timeout: float) -> Router:
    listen_port = processes.free_port()
    stats_port = processes.free_port()
    udp_port = free_udp_port()
    unix_path = os.path.join(workdir, "sub-%s-%d.sock" % (name, seq))
    common = ["--fastrouter", "127.0.0.1:%d" % listen_port,
              "--fastrouter-subscription-server", "127.0.0.1:%d" % udp_port,
              "--fastrouter-subscription-server", unix_path,
              "--fastrouter-stats", "127.0.0.1:%d" % stats_port,
              "--subscription-tolerance", "3600", "--listen", "1024"]
    if name == "ours":
        argv = ([sys.executable, "-m", "uwsgi_fastrouter"] + common + ["--subscription-max-keys", "1000000"]
                + OURS_ARGS)
    else:
        argv = [uwsgi, "--master", "--die-on-term"] + common + ["--fastrouter-buffer-size", "65536"]
    COMMANDS.setdefault(name, argv)
    logfile = os.path.join(workdir, "%s-%d.log" % (name, seq))
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_DIR + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("UWSGI_BIN", None)
    child = processes.spawn(name, argv, logfile, cwd=REPO_DIR, env=env)
    router = Router(name, argv, child, listen_port, udp_port, unix_path, stats_port)
    deadline = time.monotonic() + timeout
    while True:
        if not child.alive():
            raise BenchError("router %s exited at start:\n%s" % (name, child.log_tail()))
        try:
            router.stats()
            if os.path.exists(unix_path) and udp_socket_state(udp_port) is not None:
                return router
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            router.close()
            raise BenchError("router %s did not start within %.0f s:\n%s" % (name, timeout, child.log_tail()))
        time.sleep(0.05)  # polling interval of a bounded wait


# ---------------------------------------------------------------------------
# Phase 1: datagrams per second


def pump(router: Router, transport: str, packets: Sequence[bytes]) -> None:
    """Send *packets* as fast as the router takes them, without losing any: through
    ``bench/build/dgramsend`` (C) when it was built, else from this process."""
    if SENDER["c"]:
        send_file(router, transport, packets_file(router, packets))
    else:
        python_pump(router, transport, packets)


def packets_file(router: Router, packets: Sequence[bytes]) -> str:
    """The file ``dgramsend`` reads: each packet as a 4-byte little-endian length and its bytes."""
    path = router.unix_path + ".packets"
    with open(path, "wb") as f:
        f.write(b"".join(struct.pack("<I", len(p)) + p for p in packets))
    return path


def send_file(router: Router, transport: str, path: str) -> None:
    target = ["-x", router.unix_path] if transport == "unix" else [
        "-u", str(router.udp_port), "-q", str(rmem_default() // 2)]
    done = subprocess.run([SENDER_BIN, "-f", path] + target, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not done.stdout.startswith("SENT "):
        raise BenchError("dgramsend failed: %s%s" % (done.stdout, done.stderr))


def python_pump(router: Router, transport: str, packets: Sequence[bytes]) -> None:
    if transport == "unix":
        for packet in packets:
            router.send("unix", packet)
        return
    limit = rmem_default() // 2
    port = router.udp_port
    for i, packet in enumerate(packets):
        if i % 32 == 0:
            while True:
                state = udp_socket_state(port)
                if state is None or state[0] < limit:
                    break
                time.sleep(0.0002)  # back-pressure: the router's queue is half full
        router.send("udp", packet)


def measure_datagrams(router: Router, transport: str, kind: str, keys: List[bytes], weight: int,
                      marker: bytes, address: bytes, marker_address: bytes) -> dict:
    """The packets, then the marker (whose node is the bench backend): the time until the
    process that reads the subscription sockets logs the marker, and until requests for
    the marker key are routed (every router process has applied what came before it)."""
    packets = [build_announcement(k, address, cores=1, weight=weight) for k in keys]
    marker_packet = build_announcement(marker, marker_address, cores=1)
    prepared = packets_file(router, packets) if SENDER["c"] else None
    tail = LogTail(router.child.log_path)
    drops0 = udp_socket_state(router.udp_port)
    cpu0 = proctree.tree_sched_seconds(router.child.pid)
    t0 = time.monotonic()
    if prepared is not None:
        send_file(router, transport, prepared)
    else:
        python_pump(router, transport, packets)
    router.send(transport, marker_packet)
    last_poke = [time.monotonic()]

    def resend_marker() -> None:  # (only matters if a UDP marker was lost)
        now = time.monotonic()
        if now - last_poke[0] > 0.5:
            last_poke[0] = now
            router.send(transport, marker_packet)

    if not tail.wait_for("] %s => new node: " % marker.decode(), 300, resend_marker):
        raise BenchError("router %s never applied the marker:\n%s" % (router.name, router.child.log_tail()))
    logged = time.monotonic() - t0
    deadline = time.monotonic() + 300
    served = 0
    while served < MARKER_PROBES:
        if processes.probe(router.listen_port, timeout=5.0, host=marker.decode()):
            served += 1
        else:
            served = 0
            if time.monotonic() > deadline:
                raise BenchError("router %s never routed the marker key" % router.name)
            time.sleep(0.001)  # polling interval of a bounded wait
    elapsed = time.monotonic() - t0
    cpu = proctree.tree_sched_seconds(router.child.pid) - cpu0
    drops1 = udp_socket_state(router.udp_port)
    wanted = set(k.decode() for k in keys)
    applied = 0
    for pool in router.stats().get("subscriptions", []):
        if pool["key"] in wanted:
            applied += sum(1 for node in pool["nodes"] if node["weight"] == max(1, weight))
    return {"router": router.name, "transport": transport, "kind": kind, "sent": len(keys),
            "applied": applied, "seconds": elapsed, "pps": len(keys) / elapsed,
            "logged_pps": len(keys) / logged,
            "cpu_us": cpu / len(keys) * 1e6,
            "drops": (drops1[1] - drops0[1]) if transport == "udp" and drops0 and drops1 else None}


def phase_datagrams(a, routers_wanted: List[str], uwsgi: Optional[str], workdir: str) -> List[dict]:
    rows = []
    address = b"127.0.0.1:9"  # never connected to in this phase
    backend, backend_port = start_backend(workdir)
    marker_address = b"127.0.0.1:%d" % backend_port
    try:
        for seq, transport in enumerate(("unix", "udp")):
            rows += _datagrams_over(a, transport, routers_wanted, uwsgi, workdir, 10 * seq, address,
                                    marker_address)
    finally:
        processes.stop(backend, signal.SIGINT)
    order = {name: i for i, name in enumerate(routers_wanted)}
    return sorted(rows, key=lambda row: (order[row["router"]], row["transport"] != "unix",
                                         row["kind"] != "new"))


def _datagrams_over(a, transport: str, names: List[str], uwsgi: Optional[str], workdir: str,
                    seq: int, address: bytes, marker_address: bytes) -> List[dict]:
    """The routers side by side on one transport: each creates the keys, then the refresh
    rounds alternate between them (ours, uwsgi, uwsgi, ours, ...), so that a change in
    the machine's load falls on both; the median round of each is kept."""
    rows = []
    routers: Dict[str, Router] = {}
    try:
        for i, name in enumerate(names):
            routers[name] = start_router(name, uwsgi, workdir, seq + i + 1, a.start_timeout)
        keys = keys_for(a.keys, "k-")
        for name in names:
            log("%s %s: %d new keys" % (name, transport, a.keys))
            rows.append(measure_datagrams(routers[name], transport, "new", keys, 1,
                                          b"marker-0.bench", address, marker_address))
        refreshes: Dict[str, List[dict]] = {name: [] for name in names}
        for r in range(a.rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                refreshes[name].append(measure_datagrams(routers[name], transport, "refresh", keys,
                                                         2 + r, b"marker-%d.bench" % (r + 1),
                                                         address, marker_address))
        for name in names:
            rounds = refreshes[name]
            best = sorted(rounds, key=lambda row: row["pps"])[len(rounds) // 2]
            rows.append(dict(best, spread=spread([row["pps"] for row in rounds]),
                             applied=min(row["applied"] for row in rounds),
                             drops=(sum(row["drops"] for row in rounds) if transport == "udp"
                                    and all(row["drops"] is not None for row in rounds) else None)))
    finally:
        for router in routers.values():
            router.close()
    return rows


# ---------------------------------------------------------------------------
# Phase 2: routing with 1 key and with 10,000


def start_backend(workdir: str) -> Tuple[processes.Child, int]:
    child = processes.spawn("backend", [BACKEND_BIN, "-p", "0"], os.path.join(workdir, "backend.log"),
                            stdout_pipe=True, death_signal=signal.SIGKILL)
    line = processes.LineReader(child).wait_for("LISTEN ", 10)
    if not line:
        processes.stop(child)
        raise BenchError("backend did not start:\n" + child.log_tail())
    return child, int(line.rsplit(":", 1)[1])


def set_keys(router: Router, hot: bytes, cold: List[bytes], present: bool, address: bytes) -> None:
    packets = [build_announcement(k, address, cores=1, unsubscribe=not present) for k in cold]
    pump(router, "unix", [build_announcement(hot, address, cores=1)] + packets)
    wanted = 1 + (len(cold) if present else 0)
    deadline = time.monotonic() + 120
    while len(router.stats().get("subscriptions", [])) != wanted:
        if time.monotonic() > deadline:
            raise BenchError("router %s did not reach %d keys" % (router.name, wanted))
        time.sleep(0.05)  # polling interval of a bounded wait


def python_load(port: int, conc: int, warmup: float, duration: float, host: str) -> dict:
    """Fallback load generator: C threads, closed loop, one request per connection."""
    request = processes.uwsgi_request(host)
    counts = [0] * conc
    errors = [0] * conc
    state = {"measuring": False, "stop": False}

    def worker(i: int) -> None:
        while not state["stop"]:
            try:
                ok = processes.is_http_200(processes.exchange(port, request))
            except OSError:
                ok = False
            if state["measuring"]:
                if ok:
                    counts[i] += 1
                else:
                    errors[i] += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(conc)]
    for t in threads:
        t.start()
    time.sleep(warmup)  # the unmeasured warm-up window
    return {"threads": threads, "counts": counts, "errors": errors, "state": state}


def measure_routing(a, router: Router, keys: int, use_c: bool) -> dict:
    pid = router.child.pid
    if use_c:
        argv = [LOADGEN_BIN, "-p", str(router.listen_port), "-c", str(a.concurrency), "-d", str(a.duration),
                "-w", str(a.warmup), "-t", "10000", "-k", HOT_KEY]
        lg = processes.spawn("loadgen", argv, None, stdout_pipe=True, death_signal=signal.SIGKILL)
        reader = processes.LineReader(lg)
        try:
            if not reader.wait_for("START", a.warmup + 15):
                raise BenchError("loadgen did not start measuring")
            c0, t0 = proctree.tree_cpu_seconds(pid), time.monotonic()
            if not reader.wait_for("END", a.duration + 15):
                raise BenchError("loadgen did not finish measuring")
            c1, t1 = proctree.tree_cpu_seconds(pid), time.monotonic()
            line = reader.wait_for("RESULT", 15)
            if not line:
                raise BenchError("loadgen gave no result")
        finally:
            processes.stop(lg, signal.SIGTERM, grace=5)
        r = processes.parse_kv(line)
        requests, rps, errors, p99 = int(r["requests"]), float(r["rps"]), int(r["errors"]), int(r["p99_us"])
    else:
        run = python_load(router.listen_port, a.concurrency, a.warmup, a.duration, HOT_KEY)
        c0, t0 = proctree.tree_cpu_seconds(pid), time.monotonic()
        run["state"]["measuring"] = True
        time.sleep(a.duration)  # the measured window
        run["state"]["measuring"] = False
        c1, t1 = proctree.tree_cpu_seconds(pid), time.monotonic()
        run["state"]["stop"] = True
        for t in run["threads"]:
            t.join(15)
        requests, errors, p99 = sum(run["counts"]), sum(run["errors"]), None
        rps = requests / (t1 - t0)
    return {"router": router.name, "keys": keys, "rps": rps, "requests": requests, "errors": errors,
            "p99_us": p99, "cpu_us": (c1 - c0) / requests * 1e6 if requests else None}


def phase_routing(a, routers_wanted: List[str], uwsgi: Optional[str], workdir: str,
                  use_c: bool) -> Tuple[List[dict], List[str]]:
    backend, backend_port = start_backend(workdir)
    address = b"127.0.0.1:%d" % backend_port
    routers: Dict[str, Router] = {}
    results: Dict[Tuple[str, int], List[dict]] = {}
    commands = ["backend: %s -p 0" % BACKEND_BIN]
    try:
        for i, name in enumerate(routers_wanted):
            routers[name] = start_router(name, uwsgi, workdir, 100 + i, a.start_timeout)
        cold = keys_for(a.keys - 1, "cold-")
        for r in range(a.rounds):
            for name in routers_wanted[r % len(routers_wanted):] + routers_wanted[:r % len(routers_wanted)]:
                router = routers[name]
                for present in ((False, True) if r % 2 == 0 else (True, False)):
                    set_keys(router, HOT_KEY.encode(), cold, present, address)
                    nkeys = a.keys if present else 1
                    log("%s: round %d, %d key(s)" % (name, r + 1, nkeys))
                    results.setdefault((name, nkeys), []).append(measure_routing(a, router, nkeys, use_c))
        if use_c:
            commands.append("loadgen: %s -p PORT -c %d -d %s -w %s -t 10000 -k %s"
                            % (LOADGEN_BIN, a.concurrency, a.duration, a.warmup, HOT_KEY))
    finally:
        for router in routers.values():
            router.close()
        processes.stop(backend, signal.SIGINT)
    rows = []
    for (name, nkeys), runs in results.items():
        rps = [run["rps"] for run in runs]
        cpu = [run["cpu_us"] for run in runs if run["cpu_us"] is not None]
        p99 = [run["p99_us"] for run in runs if run["p99_us"] is not None]
        rows.append({"router": name, "keys": nkeys, "rps": statistics.median(rps), "rps_spread": spread(rps),
                     "cpu_us": statistics.median(cpu) if cpu else None, "cpu_spread": spread(cpu),
                     "p99_us": statistics.median(p99) if p99 else None,
                     "errors": sum(run["errors"] for run in runs)})
    rows.sort(key=lambda row: (routers_wanted.index(row["router"]), row["keys"]))
    return rows, commands


# ---------------------------------------------------------------------------
# Report


def spread(values: Sequence[float]) -> Optional[float]:
    """Half the min-max range, in % of the median."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None
    mid = statistics.median(values)
    return (max(values) - min(values)) / 2 / mid * 100 if mid else None


def fmt(value, pattern: str = "%.0f", none: str = "-") -> str:
    return none if value is None else pattern % value


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths)))
             for row in [header] + list(rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(a, dgram_rows: List[dict], routing_rows: List[dict], commands: List[str], use_c: bool) -> str:
    out = ["commands:"] + ["  " + c for c in commands]
    if dgram_rows:
        out += ["", "1. subscription datagrams processed (N = %d keys; refresh: median of %d rounds, "
                "± half the min-max range; sent by %s)"
                % (a.keys, a.rounds, "bench/build/dgramsend" if SENDER["c"] else "Python"), ""]
        out.append(table(
            ["router", "transport", "kind", "sent", "applied", "kernel drops", "seconds", "packets/s",
             "logged packets/s", "router CPU µs/packet"],
            [[r["router"], r["transport"], r["kind"], str(r["sent"]), str(r["applied"]), fmt(r["drops"], "%d"),
              "%.3f" % r["seconds"], fmt(r["pps"]) + (" ±%.0f%%" % r["spread"] if r.get("spread") else ""),
              fmt(r["logged_pps"]), fmt(r["cpu_us"], "%.1f")] for r in dgram_rows]))
        by_row = {(r["router"], r["transport"], r["kind"]): r for r in dgram_rows}
        ratios = []
        for transport in ("unix", "udp"):
            for kind in ("refresh", "new"):
                ours, theirs = by_row.get(("ours", transport, kind)), by_row.get(("uwsgi", transport, kind))
                if ours and theirs and theirs["pps"] and ours["cpu_us"]:
                    ratios.append("%s %s: packets/s x%.2f, CPU per packet x%.2f"
                                  % (transport, kind, ours["pps"] / theirs["pps"],
                                     ours["cpu_us"] / theirs["cpu_us"]))
        if ratios:
            out += ["", "ours / uwsgi (%s):" % ("refresh: median rounds, the rounds interleaved"
                                                if a.rounds > 1 else "one round")]
            out += ["  " + line for line in ratios]
    if routing_rows:
        out += ["", "2. routing key %s among 1 and %d subscribed keys (c=%d, %s s x %d rounds, %s)"
                % (HOT_KEY, a.keys, a.concurrency, a.duration, a.rounds,
                   "bench/build/loadgen" if use_c else "Python fallback load generator"), ""]
        out.append(table(
            ["router", "keys", "requests/s", "router CPU µs/request", "p99 µs", "errors"],
            [[r["router"], str(r["keys"]), fmt(r["rps"]) + (" ±%.0f%%" % r["rps_spread"] if r["rps_spread"] else ""),
              fmt(r["cpu_us"], "%.1f") + (" ±%.0f%%" % r["cpu_spread"] if r["cpu_spread"] else ""),
              fmt(r["p99_us"], "%d"), str(r["errors"])] for r in routing_rows]))
        by = {(r["router"], r["keys"]): r for r in routing_rows}
        out.append("")
        for name in sorted({r["router"] for r in routing_rows}):
            one, many = by.get((name, 1)), by.get((name, a.keys))
            if one and many and one["rps"] and one["cpu_us"] and many["cpu_us"]:
                out.append("%s: %d keys / 1 key: requests/s x%.2f, router CPU per request x%.2f"
                           % (name, a.keys, many["rps"] / one["rps"], many["cpu_us"] / one["cpu_us"]))
    return "\n".join(out)


# ---------------------------------------------------------------------------
# Main


def find_uwsgi(explicit: Optional[str]) -> Optional[str]:
    for candidate in (explicit, os.environ.get("UWSGI_BIN"), shutil.which("uwsgi")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round of 2 s per measurement (about 30 s in all)")
    p.add_argument("--keys", type=int, default=10000, help="keys announced / subscribed (default 10000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per measurement (default 3)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per routing measurement (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each (default 1)")
    p.add_argument("--concurrency", type=int, default=16, help="load generator connections (default 16)")
    p.add_argument("--uwsgi", help="uWSGI binary to compare with (default: $UWSGI_BIN, else uwsgi on PATH)")
    p.add_argument("--no-uwsgi", action="store_true", help="measure our router only")
    p.add_argument("--phases", default="datagrams,routing", help="datagrams,routing (default both)")
    p.add_argument("--python-load", action="store_true",
                   help="use the Python load generator even when bench/build/loadgen builds")
    p.add_argument("--python-sender", action="store_true",
                   help="send the datagrams from Python even when bench/build/dgramsend builds")
    p.add_argument("--start-timeout", type=float, default=30.0)
    p.add_argument("--keep-logs", action="store_true", help="keep the directory with every process's log")
    p.add_argument("--ours-args", default="",
                   help="extra arguments for ours, e.g. '--master --fastrouter-processes 2'")
    a = p.parse_args(argv)
    OURS_ARGS[:] = shlex.split(a.ours_args)
    if a.quick:
        a.rounds, a.duration, a.warmup = 1, 2.0, 0.5
    if a.keys < 2 or a.rounds < 1 or a.duration <= 0 or a.concurrency < 1:
        p.error("--keys must be at least 2, --rounds and --concurrency at least 1, --duration positive")
    a.phases = [x for x in a.phases.split(",") if x]
    if not set(a.phases) <= {"datagrams", "routing"}:
        p.error("--phases takes datagrams and/or routing")
    return a


def main(argv: Optional[List[str]] = None) -> int:
    a = parse_args(argv)
    uwsgi = None if a.no_uwsgi else find_uwsgi(a.uwsgi)
    routers_wanted = ["ours"] + (["uwsgi"] if uwsgi else [])
    if not uwsgi and not a.no_uwsgi:
        log("no uWSGI binary found (--uwsgi PATH, $UWSGI_BIN or uwsgi on PATH): measuring ours only")
    build = subprocess.run(["make", "-s", "-C", BENCH_DIR], capture_output=True, text=True)
    use_c = (not a.python_load and build.returncode == 0 and os.access(LOADGEN_BIN, os.X_OK)
             and os.access(BACKEND_BIN, os.X_OK))
    if "routing" in a.phases and not os.access(BACKEND_BIN, os.X_OK):
        log("building bench/build/backend failed (it is needed for the routing phase):\n"
            + build.stdout + build.stderr)
        return 2
    if not use_c:
        log("bench/build/loadgen unavailable: using the Python load generator")
    SENDER["c"] = not a.python_sender and build.returncode == 0 and os.access(SENDER_BIN, os.X_OK)
    if not SENDER["c"]:
        log("datagrams sent from Python (slower than a C router takes them: uWSGI's rate is capped)")
    workdir = tempfile.mkdtemp(prefix="frsubbench.")
    log("logs in %s" % workdir)
    commands: List[str] = []
    status = 0
    dgram_rows: List[dict] = []
    routing_rows: List[dict] = []
    try:
        if "datagrams" in a.phases:
            log("== phase datagrams")
            dgram_rows = phase_datagrams(a, routers_wanted, uwsgi, workdir)
        if "routing" in a.phases:
            log("== phase routing")
            routing_rows, commands = phase_routing(a, routers_wanted, uwsgi, workdir, use_c)
    except BenchError as exc:
        log("!! %s" % exc)
        status = 1
    except KeyboardInterrupt:
        log("!! interrupted")
        status = 130
    commands += ["%s: %s" % (name, " ".join(COMMANDS[name])) for name in routers_wanted if name in COMMANDS]
    print(report(a, dgram_rows, routing_rows, commands, use_c))
    if a.keep_logs or status:
        log("logs kept in %s" % workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
