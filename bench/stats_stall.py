#!/usr/bin/env python3
"""Does a stats request stall routing?  Request latency with and without stats fetches.

Usage::

    python3 bench/stats_stall.py [--tree PATH ...] [--keys 7000,10000] [--modes single,master]
                                 [--rounds 2] [--duration 4] [--interval 0.002] [--fetch-interval 0]
                                 [--keep-logs]

``--tree`` (repeatable) names source trees to compare, e.g. an unmodified checkout and
this one (default: this repository); each router runs with ``PYTHONPATH`` = that tree.
About 30 s per tree, mode and key count with the defaults.  Nothing here asserts a
timing: it prints a table.

Theory of operation
-------------------
For each tree, mode (``single``: one process; ``master``: ``--master
--fastrouter-processes 2``) and key count N, a router is started under
``bench/loopstall.py`` (which logs every pass of any of its event loops that is busier
than 2 ms) with a UNIX datagram subscription server, a stats server and a long
``--subscription-tolerance``.  N keys are subscribed with announce datagrams (one hot
key, ``hot.bench``, for the backend ``bench/build/backend``, and N-1 more for the same
address), and the stats are polled until they show N pools.

Then ``--rounds`` times two windows of ``--duration`` seconds each, in which this
process sends one request for the hot key every ``--interval`` seconds (a new
connection each, the latency is connect to EOF):

* ``quiet``: nothing else happens;
* ``hog`` (with ``--hog``, the control): no stats; a process at nice 10 keeps a CPU
  busy as a stats renderer would (walking a heap, writing JSON), so what a busy CPU
  alone costs the probe shows apart from what the router does for the stats;
* ``stats``: a second process (this script with ``--fetch-stats``) fetches the whole
  stats document back to back (or one every ``--fetch-interval`` seconds); it parses
  every ``--check-every``-th one (default 5), and any whose length differs from the
  last one parsed, and checks that it is valid JSON with N pools.  The requests that started while a
  fetch was under way are also summed up on their own ("during a fetch").

Reported per kind of window (all rounds together): requests, errors, latency p50 /
p99 / max, the ratio of each stats window's p99 to that of the quiet window just
before it (the median over the rounds, and the range: two windows a few seconds
apart share most of the machine's other load, so this ratio is steadier than one
of p99s pooled over all rounds), and the longest busy pass of the router's loops seen by ``loopstall.py``,
in wall-clock time and in CPU time (the master's, or the single process's, and the
router processes' apart), plus the stats fetches (count, mean time, size), and the CPU
the router used per second of window: the process started (the master, or the single
process) and its children (the router processes; not the stats renderers, which are
nobody's children: see statsfork.py).  That last figure is what competes with routing
for the CPUs, and the load of other work moves it little.  On a
loaded machine the wall time of a pass includes waiting for a CPU; its CPU time is
what the pass itself cost.  Two more columns per window: the collections of the cyclic
garbage collector (loopstall.py's ``gcN`` lines; per window, by generation, their
total and longest time), and the passes that used 1 ms of CPU or more, per second
(``loopstall.py`` is started with ``LOOPSTALL_MIN_MS=1`` unless it is set).  ``--keep-logs`` keeps every pass and every request's
latency (``stall-*.txt``, ``latency-*.txt``) for a closer look.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
for _path in (BENCH_DIR, REPO_DIR):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import processes  # noqa: E402  (siblings in bench/)
from uwsgi_fastrouter.subscription import build_announcement  # noqa: E402

BACKEND_BIN = os.path.join(BENCH_DIR, "build", "backend")
LOOPSTALL = os.path.join(BENCH_DIR, "loopstall.py")
HOT_KEY = b"hot.bench"
#: a pass of a loop that used this much CPU or more is counted (a count load moves less
#: than the longest pass's wall time); loopstall.py logs passes from 1 ms of wall time
LONG_PASS_CPU = 0.001


class BenchError(Exception):
    pass


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Clients


def fetch_stats(port: int, timeout: float = 60.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        chunks = []
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def pool_count(raw: bytes) -> int:
    return len(json.loads(raw.decode("utf-8")).get("subscriptions", []))


def fetcher_main(port: int, expect: int, check_every: int, interval: float) -> int:
    """``--fetch-stats``: fetch the document every *interval* seconds (or right after
    the previous one, if that took longer) until SIGTERM, a line per fetch.

    Every *check_every*-th document (and the first) is parsed and its pools counted;
    the others are only read and compared in length with the last parsed one (parsing
    megabytes of JSON costs this process a CPU the router under test would miss on a
    small machine)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    checked_length = None
    n = 0
    due = time.monotonic()
    while True:
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)  # pacing of the fetches, not synchronisation
        due = max(due + interval, time.monotonic())
        t0 = time.monotonic()
        try:
            raw = fetch_stats(port)
            elapsed = time.monotonic() - t0
            if checked_length is None or n % check_every == 0 or len(raw) != checked_length:
                # parsed: every Nth, and one whose length differs from the last parsed
                # (counters that gained a digit, or a broken document)
                pools = pool_count(raw)
                ok = pools == expect
                checked_length = len(raw)
            else:
                pools = expect
                ok = True
        except (OSError, ValueError):
            raw, pools, ok, elapsed = b"", -1, False, time.monotonic() - t0
        n += 1
        print("FETCH start=%.6f seconds=%.6f bytes=%d pools=%d ok=%d" % (t0, elapsed, len(raw), pools, ok),
              flush=True)


def hog_main() -> int:
    """``--hog-run``: keep a CPU busy the way a stats renderer does (walk a heap of
    small objects, write JSON) until SIGTERM; the caller sets its nice value."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    heap = [{"key": "k%06d.bench" % i, "hits": i, "nodes": [{"name": "127.0.0.1:%d" % i, "requests": i}]}
            for i in range(100000)]
    print("HOG ready", flush=True)
    while True:
        for start in range(0, len(heap), 1000):
            json.dumps(heap[start:start + 1000])


def one_request(port: int, request: bytes) -> bool:
    return processes.is_http_200(processes.exchange(port, request))


def probe_latency(port: int, duration: float, interval: float,
                  trace: Optional[list] = None) -> Tuple[List[float], int]:
    """One request every *interval* s for *duration* s: (latencies in s, errors).
    *trace* gets a (start, latency) pair per request."""
    request = processes.uwsgi_request(HOT_KEY.decode())
    latencies: List[float] = []
    errors = 0
    start = time.monotonic()
    due = start
    while True:
        now = time.monotonic()
        if now - start >= duration:
            break
        t0 = time.monotonic()
        try:
            ok = one_request(port, request)
        except OSError:
            ok = False
        latencies.append(time.monotonic() - t0)
        if trace is not None:
            trace.append((t0, latencies[-1]))
        if not ok:
            errors += 1
        due += interval
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)  # pacing of the probe, not synchronisation
        else:
            due = time.monotonic()
    return latencies, errors


# ---------------------------------------------------------------------------
# Router and backend


class Router:
    def __init__(self, child: processes.Child, listen_port: int, stats_port: int, sub_path: str,
                 stall_path: str, argv: List[str]):
        self.child = child
        self.listen_port = listen_port
        self.stats_port = stats_port
        self.sub_path = sub_path
        self.stall_path = stall_path
        self.argv = argv

    def stop(self) -> None:
        if processes.stop(self.child, signal.SIGINT):
            log("!! the router did not stop within 6 s of SIGINT: leftovers killed by PID")


def start_router(tree: str, mode: str, workdir: str, tag: str, timeout: float) -> Router:
    listen_port = processes.free_port()
    stats_port = processes.free_port()
    sub_path = os.path.join(workdir, "sub-%s.sock" % tag)
    stall_path = os.path.join(workdir, "stall-%s.txt" % tag)
    argv = [sys.executable, LOOPSTALL, "--fastrouter", "127.0.0.1:%d" % listen_port,
            "--fastrouter-subscription-server", sub_path,
            "--fastrouter-stats", "127.0.0.1:%d" % stats_port,
            "--subscription-tolerance", "3600", "--subscription-max-keys", "100000", "--listen", "1024"]
    if mode == "master":
        argv += ["--master", "--fastrouter-processes", "2"]
    env = dict(os.environ)
    env["PYTHONPATH"] = tree
    env["LOOPSTALL_FILE"] = stall_path
    env.setdefault("LOOPSTALL_MIN_MS", "1")
    child = processes.spawn("router", argv, os.path.join(workdir, "router-%s.log" % tag), cwd=tree, env=env)
    router = Router(child, listen_port, stats_port, sub_path, stall_path, argv)
    deadline = time.monotonic() + timeout
    while True:
        if not child.alive():
            raise BenchError("the router exited at start:\n" + child.log_tail())
        try:
            fetch_stats(stats_port, timeout=5)
            if os.path.exists(sub_path):
                return router
        except OSError:
            pass
        if time.monotonic() > deadline:
            router.stop()
            raise BenchError("the router did not start within %.0f s:\n%s" % (timeout, child.log_tail()))
        time.sleep(0.05)  # polling interval of a bounded wait


def start_backend(workdir: str) -> Tuple[processes.Child, int]:
    child = processes.spawn("backend", [BACKEND_BIN, "-p", "0"], os.path.join(workdir, "backend.log"),
                            stdout_pipe=True, death_signal=signal.SIGKILL)
    line = processes.LineReader(child).wait_for("LISTEN ", 10)
    if not line:
        processes.stop(child)
        raise BenchError("backend did not start:\n" + child.log_tail())
    return child, int(line.rsplit(":", 1)[1])


def subscribe(router: Router, keys: int, address: bytes) -> None:
    """The hot key and keys-1 more, over the UNIX datagram socket (a blocking sender loses none)."""
    packets = [build_announcement(HOT_KEY, address, cores=1)]
    packets += [build_announcement(b"cold-%05d.bench" % i, address, cores=1) for i in range(keys - 1)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        for packet in packets:
            s.sendto(packet, router.sub_path)
    request = processes.uwsgi_request(HOT_KEY.decode())
    deadline = time.monotonic() + 120
    while True:
        try:
            if pool_count(fetch_stats(router.stats_port)) == keys and one_request(router.listen_port, request):
                return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise BenchError("the router did not reach %d keys:\n%s" % (keys, router.child.log_tail()))
        time.sleep(0.2)  # polling interval of a bounded wait


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) *pid* used so far; 0 for a process that is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> Dict[int, float]:
    """CPU seconds of *pid* and of each of its children, by pid."""
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            pids = [pid] + [int(p) for p in f.read().split()]
    except OSError:
        pids = [pid]
    return {p: process_cpu(p) for p in pids}


def stalls(router: Router, t0: float, t1: float) -> Dict[str, float]:
    """The longest busy pass in [t0, t1], for the master (the pid we started) and the
    others, and (``first_long``, ``others_long``) how many passes used
    :data:`LONG_PASS_CPU` or more of CPU."""
    out = {"first": 0.0, "others": 0.0, "first_cpu": 0.0, "others_cpu": 0.0, "first_long": 0, "others_long": 0}
    try:
        with open(router.stall_path) as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            pid, when, busy, cpu = line.split()
            when_f, busy_f, cpu_f = float(when), float(busy), float(cpu)
        except ValueError:
            continue
        if t0 <= when_f - busy_f and when_f <= t1:
            role = "first" if int(pid) == router.child.pid else "others"
            out[role] = max(out[role], busy_f)
            out[role + "_cpu"] = max(out[role + "_cpu"], cpu_f)
            if cpu_f >= LONG_PASS_CPU:
                out[role + "_long"] += 1
    return out


def collections(router: Router, t0: float, t1: float) -> List[Tuple[str, int, float]]:
    """The cyclic GC's collections that ended in [t0, t1] (the ``gcN`` lines of
    loopstall.py): (role, generation, seconds) each, role as in :func:`stalls`."""
    try:
        with open(router.stall_path) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split()
        if len(fields) != 5 or not fields[2].startswith("gc"):
            continue
        try:
            pid, when, generation, took = int(fields[0]), float(fields[1]), int(fields[2][2:]), float(fields[3])
        except ValueError:
            continue
        if t0 <= when <= t1:
            out.append(("first" if pid == router.child.pid else "others", generation, took))
    return out


def gc_summary(items: List[dict], role: str) -> str:
    """Collections per window of *role*: ``n0/n1/n2`` by generation (mean over the
    windows), then their total and the longest one in ms."""
    found = [(g, took) for run in items for r, g, took in run["collections"] if r == role]
    windows = max(1, len(items))
    counts = "/".join("%.1f" % (sum(1 for g, _ in found if g == gen) / windows) for gen in (0, 1, 2))
    total = sum(took for _, took in found) / windows
    longest = max((took for _, took in found), default=0.0)
    return "%s, %.2f, %.2f" % (counts, total * 1000, longest * 1000)


# ---------------------------------------------------------------------------
# Measurement


def run_window(a, router: Router, keys: int, window: str, workdir: str, tag: str) -> dict:
    """One window: latencies, errors, the longest passes, and the stats fetches."""
    fetcher = reader = hog = None
    if window == "hog":
        hog = processes.spawn("hog", [sys.executable, os.path.abspath(__file__), "--hog-run"],
                              None, stdout_pipe=True, death_signal=signal.SIGKILL)
        os.setpriority(os.PRIO_PROCESS, hog.pid, a.hog_nice)
        if not processes.LineReader(hog).wait_for("HOG", 60):
            processes.stop(hog, signal.SIGTERM)
            raise BenchError("the CPU hog did not start within 60 s")
    if window == "stats":
        fetcher = processes.spawn("fetcher", [sys.executable, os.path.abspath(__file__), "--fetch-stats",
                                              str(router.stats_port), "--expect", str(keys),
                                              "--check-every", str(a.check_every),
                                              "--fetch-interval", str(a.fetch_interval)],
                                  None, stdout_pipe=True, death_signal=signal.SIGKILL)
        if a.fetcher_nice:
            os.setpriority(os.PRIO_PROCESS, fetcher.pid, a.fetcher_nice)
        reader = processes.LineReader(fetcher)
        if not reader.wait_for("FETCH", 60):
            processes.stop(fetcher, signal.SIGTERM)
            raise BenchError("no stats fetch finished within 60 s")
    cpu0 = tree_cpu(router.child.pid)
    t0 = time.monotonic()
    trace: list = []
    latencies, errors = probe_latency(router.listen_port, a.duration, a.interval, trace)
    t1 = time.monotonic()
    cpu1 = tree_cpu(router.child.pid)
    master_cpu = cpu1.get(router.child.pid, 0.0) - cpu0.get(router.child.pid, 0.0)
    others_cpu = sum(cpu1[p] - cpu0[p] for p in cpu1 if p in cpu0 and p != router.child.pid)
    with open(os.path.join(workdir, "latency-%s-%s.txt" % (tag, window)), "a") as f:
        f.writelines("%.6f %.6f\n" % pair for pair in trace)
    if hog is not None:
        processes.stop(hog, signal.SIGTERM, grace=5)
    fetches = []
    if fetcher is not None:
        os.kill(fetcher.pid, signal.SIGTERM)
        while reader.next_line(30) is not None:   # to EOF: every finished fetch
            pass
        processes.stop(fetcher, signal.SIGTERM, grace=5)
        fetches = [processes.parse_kv(line) for line in reader.lines if line.startswith("FETCH")]
    spans = [(float(f["start"]), float(f["start"]) + float(f["seconds"])) for f in fetches]
    during = [latency for start, latency in trace if any(a0 <= start < a1 for a0, a1 in spans)]
    return {"latencies": latencies, "during": during, "errors": errors, "busy": stalls(router, t0, t1),
            "collections": collections(router, t0, t1),
            "fetches": fetches, "seconds": t1 - t0, "cpu_master": master_cpu, "cpu_routers": others_cpu}


def measure(a, tree: str, mode: str, keys: int, workdir: str, backend_port: int, tag: str) -> List[dict]:
    """``--rounds`` x (a quiet window, a stats window), summed up per kind of window."""
    router = start_router(tree, mode, workdir, tag, a.start_timeout)
    windows = ("quiet", "stats", "hog") if a.hog else ("quiet", "stats")
    runs: Dict[str, List[dict]] = {window: [] for window in windows}
    try:
        log("%s %s %d keys: subscribing" % (tree, mode, keys))
        subscribe(router, keys, b"127.0.0.1:%d" % backend_port)
        for r in range(a.rounds):
            for window in windows:
                log("%s %s %d keys: round %d, window %s" % (tree, mode, keys, r + 1, window))
                runs[window].append(run_window(a, router, keys, window, workdir, tag))
    finally:
        router.stop()
    ratios = {window: sorted(p99_of(other["latencies"]) / p99_of(quiet["latencies"])
                             for quiet, other in zip(runs["quiet"], items))
              for window, items in runs.items() if window != "quiet"}
    rows = []
    for window, items in runs.items():
        latencies = sorted(x for run in items for x in run["latencies"])
        during = sorted(x for run in items for x in run["during"])
        fetches = [f for run in items for f in run["fetches"]]
        busy = {k: max(run["busy"][k] for run in items) for k in items[0]["busy"]}
        seconds = sum(run["seconds"] for run in items)
        long_passes = {role: sum(run["busy"][role + "_long"] for run in items) / seconds
                       for role in ("first", "others")}
        rows.append({
            "tree": tree, "mode": mode, "keys": keys, "window": window, "requests": len(latencies),
            "errors": sum(run["errors"] for run in items),
            "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
            "max": latencies[-1] if latencies else None,
            "during": len(during), "during_p50": percentile(during, 0.5), "during_p99": percentile(during, 0.99),
            "stall_first": busy["first"], "stall_others": busy["others"],
            "cpu_first": busy["first_cpu"], "cpu_others": busy["others_cpu"],
            "long_first": long_passes["first"], "long_others": long_passes["others"],
            "fetches": len(fetches),
            "fetch_bad": sum(1 for f in fetches if f.get("ok") != "1"),
            "fetch_mean": statistics.mean(float(f["seconds"]) for f in fetches) if fetches else None,
            "fetch_bytes": int(fetches[-1]["bytes"]) if fetches else None,
            # CPU of the process we started and of its children, per second of window
            "load_first": sum(run["cpu_master"] for run in items) / sum(run["seconds"] for run in items),
            "load_others": sum(run["cpu_routers"] for run in items) / sum(run["seconds"] for run in items),
            # p99 of each stats window over that of the quiet window just before it
            "ratios": ratios.get(window),
            "gc_first": gc_summary(items, "first"), "gc_others": gc_summary(items, "others"),
        })
    return rows


def p99_of(latencies: List[float]) -> float:
    return percentile(sorted(latencies), 0.99) or 0.0


def percentile(ordered: List[float], fraction: float) -> Optional[float]:
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] if ordered else None


def ms(value: Optional[float]) -> str:
    return "-" if value is None else "%.2f" % (value * 1000)


def table(rows: List[dict]) -> str:
    header = ["tree", "mode", "keys", "window", "requests", "errors", "p50 ms", "p99 ms", "max ms",
              "during a fetch: requests, p50, p99 ms", "longest pass ms wall (cpu)", "routers: longest pass ms wall (cpu)",
              "stats fetches", "bad", "mean fetch s", "doc bytes", "CPU s/s: first (children)",
              "p99 stats/quiet per round: median (min-max)",
              "GC per window, first: gen0/1/2, ms total, ms longest", "routers: GC per window",
              "passes >= 1 ms CPU per s: first (routers)"]
    body = []
    for r in rows:
        master = r["mode"] == "master"
        body.append([r["tree"], r["mode"], str(r["keys"]), r["window"], str(r["requests"]), str(r["errors"]),
                     ms(r["p50"]), ms(r["p99"]), ms(r["max"]),
                     "%d, %s, %s" % (r["during"], ms(r["during_p50"]), ms(r["during_p99"]))
                     if r["window"] == "stats" else "-",
                     "%s (%s)" % (ms(r["stall_first"]), ms(r["cpu_first"])),
                     "%s (%s)" % (ms(r["stall_others"]), ms(r["cpu_others"])) if master else "-",
                     str(r["fetches"]) if r["window"] == "stats" else "-",
                     str(r["fetch_bad"]) if r["window"] == "stats" else "-",
                     "%.3f" % r["fetch_mean"] if r["fetch_mean"] is not None else "-",
                     str(r["fetch_bytes"]) if r["fetch_bytes"] is not None else "-",
                     "%.2f (%.2f)" % (r["load_first"], r["load_others"]),
                     "%.2f (%.2f-%.2f)" % (statistics.median(r["ratios"]), r["ratios"][0], r["ratios"][-1])
                     if r["ratios"] else "-",
                     r["gc_first"], r["gc_others"] if master else "-",
                     "%.2f (%.2f)" % (r["long_first"], r["long_others"]) if master else "%.2f" % r["long_first"]])
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tree", action="append", help="source tree to run (repeatable; default: this repository)")
    p.add_argument("--keys", default="7000,10000", help="subscribed key counts (default 7000,10000)")
    p.add_argument("--modes", default="single,master", help="single and/or master (default both)")
    p.add_argument("--duration", type=float, default=4.0, help="seconds per window (default 4)")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds of (quiet window, stats window) per router, summed up (default 2)")
    p.add_argument("--interval", type=float, default=0.002, help="seconds between probe requests (default 0.002)")
    p.add_argument("--start-timeout", type=float, default=30.0)
    p.add_argument("--keep-logs", action="store_true", help="keep the directory with every process's log")
    p.add_argument("--fetch-stats", type=int, metavar="PORT", help=argparse.SUPPRESS)
    p.add_argument("--expect", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--fetch-interval", type=float, default=0.0,
                   help="seconds from the start of one stats fetch to the next (default 0: back to back)")
    p.add_argument("--fetcher-nice", type=int, default=0,
                   help="nice value of the stats fetcher (default 0); on a small machine the "
                        "fetcher's own CPU (megabytes of JSON a second) competes with the probe")
    p.add_argument("--hog", action="store_true",
                   help="a third window per round, the control: no stats, a process of ours "
                        "at --hog-nice keeps a CPU busy walking a heap and writing JSON, as a "
                        "renderer does")
    p.add_argument("--hog-nice", type=int, default=10, help="nice value of the --hog process (default 10)")
    p.add_argument("--hog-run", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--check-every", type=int, default=5,
                   help="parse every Nth stats document fetched (default 5; the others are compared "
                        "in length)")
    a = p.parse_args(argv)
    a.trees = [os.path.abspath(t) for t in (a.tree or [REPO_DIR])]
    a.key_counts = [int(k) for k in a.keys.split(",") if k]
    a.mode_list = [m for m in a.modes.split(",") if m]
    if not set(a.mode_list) <= {"single", "master"}:
        p.error("--modes takes single and/or master")
    return a


def main(argv: Optional[List[str]] = None) -> int:
    a = parse_args(argv)
    if a.hog_run:
        return hog_main()
    if a.fetch_stats:
        return fetcher_main(a.fetch_stats, a.expect, max(1, a.check_every), a.fetch_interval)
    build = subprocess.run(["make", "-s", "-C", BENCH_DIR], capture_output=True, text=True)
    if not os.access(BACKEND_BIN, os.X_OK):
        log("building bench/build/backend failed:\n" + build.stdout + build.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="frstatsbench.")
    log("logs in %s" % workdir)
    rows: List[dict] = []
    status = 0
    backend, backend_port = start_backend(workdir)
    try:
        n = 0
        for tree in a.trees:
            for mode in a.mode_list:
                for keys in a.key_counts:
                    n += 1
                    rows += measure(a, tree, mode, keys, workdir, backend_port, "%d" % n)
    except BenchError as exc:
        log("!! %s" % exc)
        status = 1
    except KeyboardInterrupt:
        log("!! interrupted")
        status = 130
    finally:
        processes.stop(backend, signal.SIGINT)
    print("router: python3 bench/loopstall.py --fastrouter ... --fastrouter-subscription-server SOCK "
          "--fastrouter-stats ... --subscription-tolerance 3600 --subscription-max-keys 100000 --listen 1024 "
          "[--master --fastrouter-processes 2]")
    print("probe: one request for %s every %.1f ms; %d rounds of a quiet and a stats window of %.0f s each; "
          "stats fetched %s\n" % (HOT_KEY.decode(), a.interval * 1000, a.rounds, a.duration,
                                  "every %.2f s" % a.fetch_interval if a.fetch_interval else "back to back"))
    print(table(rows))
    if a.keep_logs or status:
        log("logs kept in %s" % workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
