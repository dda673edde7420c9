#!/usr/bin/env python3
"""Our router next to the real uWSGI FastRouter, measured in one interleaved run.

Theory of operation
-------------------
One backend (build/backend) serves everything.  Two routers forward to it:
``ours`` (``python -m uwsgi_fastrouter`` from the repository, or any
``--candidate-cmd``) and ``uwsgi`` (the real FastRouter at its best settings).
``direct`` is the load generator talking to the backend itself: the limit of
the machine.  With ``--floor`` the rps phase also measures ``floor`` and
``floor+scan``: bench/floor_proxy.py (without and with ``--scan``), a
featureless Python proxy making our router's system calls, so the run shows
what any Python router making them costs next to uWSGI.  Phases:

* rps: for every round and every concurrency, each target in turn (the order
  rotates so nobody is always first) gets a warm-up and then a measured
  window of closed-loop load.  The driver samples the router's process tree
  CPU (utime+stime incl. reaped children, /proc) when the load generator
  prints START and END, so CPU is charged to exactly the requests counted.
* bulk: 64 MiB uploads and downloads, one connection at a time, several
  repetitions; MiB/s per repetition, router CPU per GiB from schedstat.
* idle: each router is restarted fresh, its RSS taken, then N connections that
  each sent only a 4-byte uwsgi header are held open; RSS again once the
  router's descriptor count shows it accepted them.
* fdpass, procs, reload: see extra_phases.py (fd passing to a UNIX node,
  one against two router processes, SIGHUP reloads under load).

Noise: for each measurement the machine's busy CPU (/proc/stat) minus the CPU
of our own processes is "background"; above --noise-max the measurement is
repeated while the retry budget lasts, keeping the quieter one.  Nothing here
asserts a timing: the table reports, the reader judges.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

import extra_phases  # noqa: E402  (siblings in bench/)
import processes  # noqa: E402
import proctree  # noqa: E402
import report  # noqa: E402

OURS_CMD = "{python} -m uwsgi_fastrouter --fastrouter {listen} --fastrouter-to {backend} --listen 1024"
UWSGI_CMD = ("{uwsgi} --master --die-on-term --listen 1024 --fastrouter {listen} --fastrouter-to {backend}"
             " --fastrouter-buffer-size 65536")
FLOOR_CMD = "{python} bench/floor_proxy.py --fastrouter {listen} --fastrouter-to {backend}"
ROUTERS = ("uwsgi", "ours")
TARGETS = ("direct",) + ROUTERS
# --floor: yardsticks measured in the rps phase only, next to ROUTERS
FLOOR_TEMPLATES = {"floor": FLOOR_CMD, "floor+scan": FLOOR_CMD + " --scan"}
BUILD_DIR = os.path.join(BENCH_DIR, "build")
BACKEND_BIN = os.path.join(BUILD_DIR, "backend")
LOADGEN_BIN = os.path.join(BUILD_DIR, "loadgen")


class BenchError(Exception):
    """Something the run cannot go on without (a router that does not start, a missing binary)."""


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def rotate(seq, n: int) -> list:
    seq = list(seq)
    n %= len(seq)
    return seq[n:] + seq[:n]


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    elif hard == resource.RLIM_INFINITY and soft < 1 << 20:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 20, hard))
            soft = 1 << 20
        except (ValueError, OSError):
            pass
    return soft


def find_uwsgi(explicit: Optional[str]) -> Optional[str]:
    for cand in (explicit, os.environ.get("UWSGI_BIN")):
        if cand:
            return cand if os.path.sep in cand else shutil.which(cand)
    return shutil.which("uwsgi")


class Bench:
    def __init__(self, args: argparse.Namespace, uwsgi_bin: str, workdir: str):
        self.a = args
        self.uwsgi_bin = uwsgi_bin
        self.workdir = workdir
        self.templates = {"uwsgi": UWSGI_CMD, "ours": args.candidate_cmd or OURS_CMD}
        self.floors = tuple(FLOOR_TEMPLATES) if args.floor else ()
        self.templates.update((name, FLOOR_TEMPLATES[name]) for name in self.floors)
        self.rps_routers = ROUTERS + self.floors     # the routers of the rps phase, in column order
        self.backend: Optional[processes.Child] = None
        self.backend_port = 0
        self.routers: Dict[str, processes.Child] = {}
        self.ports: Dict[str, int] = {}
        self.commands: Dict[str, List[str]] = {}
        self.starts = 0
        self.retries_left = args.noise_retries
        self.retried = 0
        self.bg: List[float] = []
        self.bg_before: Optional[float] = None
        self.steal: List[float] = []
        self.discarded: List[dict] = []
        self.rps: Dict[tuple, List[dict]] = {}
        self.bulk: Dict[tuple, List[dict]] = {}
        self.idle: Dict[str, dict] = {}
        self.hwm: Dict[str, dict] = {}
        self.notes: List[str] = []
        self.loadgen_cmds: Dict[str, List[str]] = {}
        self.extra_backends: List[processes.Child] = []  # counted with the backend (fdpass)
        self.extra_tables: List[str] = []                # rendered by the extra phases
        self.extra_raw: Dict[str, object] = {}

    # ------------------------------------------------------------ processes

    def env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO_DIR + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def start_backend(self) -> None:
        argv = [BACKEND_BIN, "-p", "0"]
        child = processes.spawn("backend", argv, os.path.join(self.workdir, "backend.log"),
                                stdout_pipe=True, death_signal=signal.SIGKILL)
        line = processes.LineReader(child).wait_for("LISTEN ", 10)
        if not line:
            processes.stop(child)
            raise BenchError("backend did not start:\n" + child.log_tail())
        self.backend = child
        self.backend_port = int(line.rsplit(":", 1)[1])
        self.commands["backend"] = argv

    def start_router(self, name: str, backend: Optional[str] = None) -> None:
        port = processes.free_port()
        values = {
            "listen": "127.0.0.1:%d" % port,
            "backend": backend or "127.0.0.1:%d" % self.backend_port,
            "python": sys.executable,
            "uwsgi": self.uwsgi_bin,
        }
        argv = processes.expand(self.templates[name], values)
        self.starts += 1
        logfile = os.path.join(self.workdir, "%s-%d.log" % (name, self.starts))
        child = processes.spawn(name, argv, logfile, cwd=REPO_DIR, env=self.env())
        if not processes.wait_serving(child, port, self.a.start_timeout):
            tail = child.log_tail()
            processes.stop(child)
            hint = "\n(--candidate-cmd TEMPLATE runs another command as 'ours')" if name == "ours" else ""
            raise BenchError("router %r did not serve a request within %.0f s.\ncommand: %s\nlog tail:\n%s%s"
                             % (name, self.a.start_timeout, " ".join(argv), tail, hint))
        self.routers[name] = child
        self.ports[name] = port
        self.commands.setdefault(name, argv)

    def stop_router(self, name: str) -> None:
        child = self.routers.pop(name, None)
        if child and processes.stop(child, signal.SIGINT):
            note = "router %s did not stop within 6 s of SIGINT: leftovers killed by PID" % name
            log("!! %s; log tail:\n%s" % (note, child.log_tail(5)))
            self.notes.append(note)

    def restart_router(self, name: str) -> None:
        self.stop_router(name)
        self.start_router(name)

    def ensure_alive(self, name: str) -> None:
        child = self.routers.get(name)
        if child is not None and not child.alive():
            note = "router %s exited (code %s) during the run and was restarted; log tail:\n%s" % (
                name, child.popen.returncode, child.log_tail(8))
            log("!! " + note)
            self.notes.append(note.splitlines()[0])
            self.routers.pop(name)
            self.start_router(name)

    def stop_all(self) -> None:
        for name in list(self.routers):
            self.stop_router(name)
        for child in self.extra_backends:
            processes.stop(child, signal.SIGINT)
        self.extra_backends = []
        if self.backend:
            processes.stop(self.backend, signal.SIGINT)
            self.backend = None

    def port_of(self, target: str) -> int:
        return self.backend_port if target == "direct" else self.ports[target]

    def run_loadgen(self, argv: List[str], kind: str) -> processes.Child:
        self.loadgen_cmds.setdefault(kind, argv)
        return processes.spawn("loadgen", argv, os.path.join(self.workdir, "loadgen.log"),
                               stdout_pipe=True, death_signal=signal.SIGKILL)

    # ------------------------------------------------------------ sampling

    def sample(self, target: str) -> dict:
        router = self.routers.get(target)
        return {
            "t": time.monotonic(),
            "router": proctree.tree_cpu_seconds(router.pid) if router else 0.0,
            "router_sched": proctree.tree_sched_seconds(router.pid) if router else 0.0,
            "backend": proctree.cpu_seconds([self.backend.pid] + [b.pid for b in self.extra_backends]),
            "machine": proctree.machine_busy_seconds(),
            "steal": proctree.machine_steal_seconds(),
            "self": sum(os.times()[:2]),
        }

    # ------------------------------------------------------------ phases

    def measure_rps_once(self, target: str, conc: int, extra_args: tuple = ()) -> dict:
        a = self.a
        argv = [LOADGEN_BIN, "-p", str(self.port_of(target)), "-c", str(conc), "-d", str(a.duration),
                "-w", str(a.warmup), "-t", "10000"] + list(extra_args)
        return self.measure_loadgen(target, conc, argv)

    def measure_loadgen(self, target: str, conc: int, argv: List[str], during=None,
                        duration: Optional[float] = None) -> dict:
        """Run one closed-loop loadgen; ``during(reader)`` runs between START and END (reload)."""
        a = self.a
        lg = self.run_loadgen(argv, "rps")
        reader = processes.LineReader(lg)
        try:
            if not reader.wait_for("START", a.warmup + 15):
                raise BenchError("loadgen did not start measuring: " + lg.log_tail())
            s0 = self.sample(target)
            if during is not None:
                during()
            if not reader.wait_for("END", (duration or a.duration) + 15):
                raise BenchError("loadgen did not finish measuring: " + lg.log_tail())
            s1 = self.sample(target)
            line = reader.wait_for("RESULT", 15)
            if not line:
                raise BenchError("loadgen gave no result: " + lg.log_tail())
        finally:
            processes.stop(lg, signal.SIGTERM, grace=5)
        r = processes.parse_kv(line)
        wall = s1["t"] - s0["t"]
        reqs = int(r["requests"])
        router_cpu = s1["router"] - s0["router"]
        backend_cpu = s1["backend"] - s0["backend"]
        loadgen_cpu = float(r["cpu_s"])
        ours = router_cpu + backend_cpu + loadgen_cpu + (s1["self"] - s0["self"])
        bg = max(0.0, (s1["machine"] - s0["machine"] - ours) / wall) if wall > 0 else 0.0
        per10k = (lambda x: x / reqs * 1e4 if reqs else None)
        return {
            "target": target, "conc": conc, "rps": float(r["rps"]), "requests": reqs,
            "p50_us": int(r["p50_us"]), "p90_us": int(r["p90_us"]), "p99_us": int(r["p99_us"]),
            "max_us": int(r["max_us"]), "errors": int(r["errors"]), "slow_1s": int(r["slow_1s"]),
            "max_gap_us": int(r.get("max_gap_us", 0)),
            "err_detail": {k: int(v) for k, v in r.items() if k.startswith("err_")},
            "router_cpu_s": router_cpu,
            "router_cpu10k": per10k(router_cpu) if target != "direct" else None,
            "router_sched10k": per10k(s1["router_sched"] - s0["router_sched"]) if target != "direct" else None,
            "router_util": router_cpu / wall if target != "direct" and wall > 0 else None,
            "backend_cpu10k": per10k(backend_cpu), "loadgen_cpu10k": per10k(loadgen_cpu),
            "wall_s": wall, "bg_cpu": bg,
            "steal_cpu": (s1["steal"] - s0["steal"]) / wall if wall > 0 else 0.0,
        }

    def idle_background(self, seconds: float = 1.0) -> float:
        """Busy CPU of the machine over ``seconds`` while we generate no load (share of one CPU)."""
        m0, t0 = proctree.machine_busy_seconds(), time.monotonic()
        time.sleep(seconds)
        return max(0.0, (proctree.machine_busy_seconds() - m0) / (time.monotonic() - t0))

    def noise_threshold(self) -> float:
        """A measurement is "noisy" when its background is --noise-max above the usual one.

        The usual one is the median of the run so far (seeded by a quiet sample
        before the first phase), so a steady neighbour does not make every
        measurement repeat, while a burst does.
        """
        return self.a.noise_max + (report.median(self.bg) or 0.0)

    def with_noise_retry(self, fn, label: str) -> dict:
        """Run ``fn``; repeat it (at most twice, within the run's budget) while it was noisy; keep the quietest."""
        best = last = fn()
        tries = 0
        while last["bg_cpu"] > self.noise_threshold() and self.retries_left > 0 and tries < 2:
            self.retries_left -= 1
            self.retried += 1
            tries += 1
            log("   background CPU %.0f%% during %s: measuring again" % (last["bg_cpu"] * 100, label))
            last = fn()
            if last["bg_cpu"] < best["bg_cpu"]:
                best, dropped = last, best
            else:
                dropped = last
            self.discarded.append(dropped)
        self.bg.append(best["bg_cpu"])
        self.steal.append(best["steal_cpu"])
        return best

    def phase_rps(self) -> None:
        """Every round x concurrency x target (rotating order); the floor proxies live for this phase only."""
        a = self.a
        for name in self.floors:
            if name not in self.routers:
                self.start_router(name)
        for rnd in range(a.rounds):
            for ci, conc in enumerate(a.concurrency):
                for target in rotate(("direct",) + self.rps_routers, rnd + ci):
                    if target != "direct":
                        self.ensure_alive(target)
                    label = "rps round %d c=%d %s" % (rnd + 1, conc, target)
                    m = self.with_noise_retry(lambda: self.measure_rps_once(target, conc), label)
                    self.rps.setdefault((target, conc), []).append(m)
                    cpu = "" if m["router_cpu10k"] is None else ", router %.3f CPU s/10k" % m["router_cpu10k"]
                    log("   %-28s %9.0f req/s, p50 %6d us, p99 %6d us%s, errors %d, bg %.0f%%, steal %.0f%%"
                        % (label, m["rps"], m["p50_us"], m["p99_us"], cpu, m["errors"], m["bg_cpu"] * 100,
                           m["steal_cpu"] * 100))
        for name in self.rps_routers:
            if name in self.routers:
                self.hwm.setdefault(name, {})["rps"] = proctree.tree_hwm_kib(self.routers[name].pid)
        for name in self.floors:
            self.stop_router(name)

    def measure_bulk_once(self, target: str, direction: str) -> dict:
        a = self.a
        nbytes = a.bulk_mib * 1024 * 1024
        flag = "-u" if direction == "upload" else "-g"
        argv = [LOADGEN_BIN, "-p", str(self.port_of(target)), flag, str(nbytes), "-n", str(a.bulk_count)]
        s0 = self.sample(target)
        lg = self.run_loadgen(argv, direction)
        reader = processes.LineReader(lg)
        try:
            line = reader.wait_for("RESULT", a.bulk_count * 20 + 30)
        finally:
            processes.stop(lg, signal.SIGTERM, grace=5)
        s1 = self.sample(target)
        if not line:
            raise BenchError("loadgen gave no transfer result: " + lg.log_tail())
        r = processes.parse_kv(line)
        wall = s1["t"] - s0["t"]
        gib = nbytes * a.bulk_count / float(1 << 30)
        router_cpu = s1["router_sched"] - s0["router_sched"]
        ours = (s1["router"] - s0["router"]) + (s1["backend"] - s0["backend"]) + float(r["cpu_s"]) + \
            (s1["self"] - s0["self"])
        return {
            "target": target, "direction": direction, "mibps": float(r["mibps"]) if int(r["errors"]) == 0 else None,
            "errors": int(r["errors"]), "secs": float(r["secs"]),
            "router_cpu_gib": router_cpu / gib if target != "direct" else None,
            "bg_cpu": max(0.0, (s1["machine"] - s0["machine"] - ours) / wall) if wall > 0 else 0.0,
        }

    def phase_bulk(self) -> None:
        a = self.a
        for rnd in range(a.rounds):
            for direction in ("upload", "download"):
                for target in rotate(TARGETS, rnd):
                    if target != "direct":
                        self.ensure_alive(target)
                    for rep in range(a.bulk_reps):
                        m = self.measure_bulk_once(target, direction)
                        self.bulk.setdefault((target, direction), []).append(m)
                    got = [s["mibps"] for s in self.bulk[(target, direction)][-a.bulk_reps:]]
                    log("   bulk round %d %-8s %-6s MiB/s per repetition: %s" % (
                        rnd + 1, direction, target, ", ".join("-" if g is None else "%.0f" % g for g in got)))
        for name in ROUTERS:
            if name in self.routers:
                self.hwm.setdefault(name, {})["bulk"] = proctree.tree_hwm_kib(self.routers[name].pid)

    def settle_rss(self, pid: int, timeout: float) -> int:
        """RSS of the tree once two samples 200 ms apart agree within 64 KiB (bounded)."""
        deadline = time.monotonic() + timeout
        last = proctree.tree_rss_kib(pid)
        while time.monotonic() < deadline:
            time.sleep(0.2)
            now = proctree.tree_rss_kib(pid)
            if abs(now - last) <= 64:
                return now
            last = now
        return last

    def measure_idle(self, name: str, nconn: int) -> dict:
        a = self.a
        self.restart_router(name)
        pid = self.routers[name].pid
        rss_fresh = self.settle_rss(pid, 3)
        fds_fresh = proctree.tree_fd_count(pid)
        argv = [LOADGEN_BIN, "-p", str(self.ports[name]), "-i", str(nconn), "-d", str(int(a.idle_hold + 90))]
        lg = processes.spawn("loadgen", argv, os.path.join(self.workdir, "loadgen.log"), stdout_pipe=True,
                             stdin_pipe=True, death_signal=signal.SIGKILL)
        self.loadgen_cmds.setdefault("idle", argv)
        reader = processes.LineReader(lg)
        result = None
        try:
            line = reader.wait_for("HOLDING", 60)
            if not line:
                raise BenchError("loadgen did not open the idle connections: " + lg.log_tail())
            opened = int(processes.parse_kv(line)["open"])
            # wait (bounded) until the router's descriptors show the connections accepted
            deadline = time.monotonic() + 20
            accepted = False
            while time.monotonic() < deadline:
                if proctree.tree_fd_count(pid) >= fds_fresh + opened * 0.99:
                    accepted = True
                    break
                time.sleep(0.1)
            rss_idle = self.settle_rss(pid, 5)
            cpu0 = proctree.tree_cpu_seconds(pid)
            hold_end = time.monotonic() + a.idle_hold
            while time.monotonic() < hold_end:
                time.sleep(0.1)
                rss_idle = max(rss_idle, proctree.tree_rss_kib(pid))
            hold_cpu = proctree.tree_cpu_seconds(pid) - cpu0
            pss_idle = proctree.tree_pss_kib(pid)
            fds_idle = proctree.tree_fd_count(pid)
            lg.popen.stdin.close()
            result = reader.wait_for("RESULT", 15)
        finally:
            processes.stop(lg, signal.SIGTERM, grace=5)
        if not result:
            raise BenchError("loadgen gave no idle result: " + lg.log_tail())
        r = processes.parse_kv(result)
        if not accepted:
            self.notes.append("idle %s: the router's descriptor count did not reach the %d connections "
                              "within 20 s (RSS taken anyway)" % (name, opened))
        serves_after = processes.probe(self.ports[name], timeout=5.0)
        return {
            "requested": nconn, "open": int(r["open"]), "opened": opened, "failed": int(r["failed"]),
            "closed_by_peer": int(r["closed_by_peer"]), "accepted_by_fd_count": accepted,
            "fds_fresh": fds_fresh, "fds_idle": fds_idle,
            "rss_fresh_kib": rss_fresh, "rss_idle_kib": rss_idle, "pss_idle_kib": pss_idle,
            "kib_per_conn": (rss_idle - rss_fresh) / opened if opened else None,
            "hold_cpu_s": hold_cpu, "serves_after": serves_after,
        }

    def phase_idle(self) -> None:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        nconn = self.a.idle_conns
        if nconn + 256 > limit:
            nconn = max(0, limit - 256)
            note = "idle connections reduced to %d (RLIMIT_NOFILE %d)" % (nconn, limit)
            log("!! " + note)
            self.notes.append(note)
        if nconn <= 0:
            return
        for name in rotate(ROUTERS, self.a.rounds):
            m = self.measure_idle(name, nconn)
            self.idle[name] = m
            log("   idle %-6s held %d/%d, RSS %.1f -> %.1f MiB, %.2f KiB/conn, closed by router %d, serves after: %s"
                % (name, m["open"], nconn, m["rss_fresh_kib"] / 1024, m["rss_idle_kib"] / 1024,
                   m["kib_per_conn"] or 0, m["closed_by_peer"], m["serves_after"]))

    # ------------------------------------------------------------ output

    def summary(self) -> dict:
        return {"rps": self.rps, "bulk": self.bulk, "idle": self.idle, "hwm": self.hwm,
                "bulk_mib": self.a.bulk_mib}

    def command_lines(self) -> List[str]:
        def short(x: str) -> str:
            # paths inside the repository are shown relative to its root (the routers' cwd)
            if x.startswith(REPO_DIR + os.sep):
                return os.path.relpath(x, REPO_DIR)
            return x

        def q(argv: List[str]) -> str:
            return " ".join(shlex.quote(short(x)) for x in argv)

        out = ["run (from the repository root): " + q(["python3", "bench/bench.py"] + sys.argv[1:])]
        out.append("backend: " + q(self.commands.get("backend", [])))
        for name in self.rps_routers:
            if name in self.commands:
                out.append("%s (cwd and PYTHONPATH = repo root): %s" % (name, q(self.commands[name])))
        for name, argv in self.commands.items():
            if name not in self.rps_routers and name != "backend":
                out.append("%s: %s" % (name, q(argv)))
        for kind in ("rps", "upload", "download", "idle", "reload"):
            if kind in self.loadgen_cmds:
                out.append("loadgen %s (e.g.): %s" % (kind, q(self.loadgen_cmds[kind])))
        return out


def machine_line(uwsgi_bin: str) -> str:
    try:
        uv = subprocess.run([uwsgi_bin, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        uv = "?"
    return "machine: %d CPUs, Linux %s, Python %s, uWSGI %s" % (
        os.cpu_count() or 0, platform.release(), platform.python_version(), uv)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Measure our router next to the real uWSGI FastRouter (and the backend directly).")
    p.add_argument("--quick", action="store_true", help="about one minute: 1 round x 3 s, fewer repetitions")
    p.add_argument("--uwsgi", help="uWSGI binary (default: $UWSGI_BIN, then uwsgi on PATH)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    p.add_argument("--duration", type=float, help="seconds per rps measurement (default 5, quick 3)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds before each (default 1, quick 0.5)")
    p.add_argument("--phases", default="rps,bulk,idle",
                   help="comma list of rps, bulk, idle, fdpass, procs, reload (default rps,bulk,idle)")
    p.add_argument("--extra-concurrency", default="16,128",
                   help="loadgen connections for the fdpass and procs phases (default 16,128)")
    p.add_argument("--reload-duration", type=float, default=20.0,
                   help="seconds of c=16 load per target in the reload phase (default 20)")
    p.add_argument("--reloads", type=int, default=10, help="SIGHUPs per target in the reload phase (default 10)")
    p.add_argument("--concurrency", default="1,16,128", help="loadgen connections for rps (default 1,16,128)")
    p.add_argument("--floor", action="store_true",
                   help="the rps phase also measures bench/floor_proxy.py as 'floor' and with --scan as "
                        "'floor+scan' (featureless Python proxies making our router's system calls)")
    p.add_argument("--candidate-cmd", metavar="TEMPLATE",
                   help="command for 'ours' instead of python -m uwsgi_fastrouter; placeholders "
                        "{listen} {backend} {python} {uwsgi}")
    p.add_argument("--bulk-mib", type=int, default=64, help="transfer size in MiB (default 64)")
    p.add_argument("--bulk-reps", type=int, help="repetitions per round and direction (default 5, quick 3)")
    p.add_argument("--bulk-count", type=int, default=3, help="sequential transfers per repetition (default 3)")
    p.add_argument("--idle-conns", type=int, default=5000, help="idle connections (default 5000)")
    p.add_argument("--idle-hold", type=float, default=2.0, help="seconds the idle connections are held")
    p.add_argument("--noise-max", type=float, default=0.25,
                   help="repeat a measurement whose background CPU exceeds the run's median by this "
                        "share of one CPU (0.25)")
    p.add_argument("--noise-retries", type=int, help="budget of repeated measurements (default 6, quick 0)")
    p.add_argument("--start-timeout", type=float, default=30.0,
                   help="seconds a router gets to serve its first request")
    p.add_argument("--results-dir", default=os.path.join(BENCH_DIR, "results"))
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the process logs")
    p.add_argument("--pin", action="store_true",
                   help="routers on the last CPU, load generator and backend on the others (as PIN=1)")
    a = p.parse_args(argv)
    if a.pin:
        os.environ["PIN"] = "1"     # read by processes.spawn
    quick = a.quick
    a.rounds = a.rounds or (1 if quick else 3)
    a.duration = a.duration or (3.0 if quick else 5.0)
    a.warmup = a.warmup if a.warmup is not None else (0.5 if quick else 1.0)
    a.bulk_reps = a.bulk_reps or (3 if quick else 5)
    a.noise_retries = a.noise_retries if a.noise_retries is not None else (0 if quick else 6)
    a.phases = [x.strip() for x in a.phases.split(",") if x.strip()]
    a.concurrency = [int(x) for x in a.concurrency.split(",") if x.strip()]
    a.extra_concurrency = [int(x) for x in a.extra_concurrency.split(",") if x.strip()]
    bad = [x for x in a.phases if x not in ("rps", "bulk", "idle") + extra_phases.PHASES]
    if bad:
        p.error("unknown phase(s): %s" % ", ".join(bad))
    if a.floor and "rps" not in a.phases:
        p.error("--floor adds targets to the rps phase, which is not among --phases")
    if a.rounds < 1 or a.duration <= 0 or a.bulk_reps < 1 or a.bulk_count < 1 or not a.concurrency:
        p.error("rounds, duration, bulk-reps, bulk-count and concurrency must be positive")
    return a


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt()


def main(argv: Optional[List[str]] = None) -> int:
    a = parse_args(argv)
    limit = raise_fd_limit()
    uwsgi_bin = find_uwsgi(a.uwsgi)
    if not uwsgi_bin or not os.access(uwsgi_bin, os.X_OK):
        log("no uWSGI binary: pass --uwsgi PATH, set UWSGI_BIN, or put uwsgi on PATH")
        return 2
    build = subprocess.run(["make", "-s", "-C", BENCH_DIR], capture_output=True, text=True)
    if build.returncode != 0:
        log("building the C programs failed:\n" + build.stdout + build.stderr)
        return 2
    # a stop request from the terminal becomes an exception, so the cleanup below runs
    signal.signal(signal.SIGTERM, _interrupt)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = tempfile.mkdtemp(prefix="frbench.")
    bench = Bench(a, uwsgi_bin, workdir)
    t0 = time.monotonic()
    log("fd limit %d; logs in %s" % (limit, workdir))
    status = 0
    try:
        bench.start_backend()
        if any(ph in ("rps", "bulk", "idle") for ph in a.phases):
            for name in ROUTERS:
                bench.start_router(name)
        bench.bg_before = bench.idle_background()
        bench.bg.append(bench.bg_before)
        log("background CPU before the run: %.0f%% of one CPU" % (bench.bg_before * 100))
        for phase in a.phases:
            log("== phase %s" % phase)
            if phase in extra_phases.PHASES:
                extra_phases.run(bench, phase, sys.modules[__name__])
            else:
                getattr(bench, "phase_" + phase)()
    except BenchError as e:
        log("!! " + str(e))
        status = 1
    except KeyboardInterrupt:
        log("!! interrupted")
        status = 130
    finally:
        bench.stop_all()
    elapsed = time.monotonic() - t0

    rows = report.build_rows(bench.summary(), a.concurrency)
    ok, graded = report.goal_summary(rows)
    text = "\n".join([
        "uwsgi-fastrouter benchmark, %s" % datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        machine_line(uwsgi_bin),
        "settings: %d round(s) x %g s (+%g s warm-up), concurrency %s, %d MiB x %d transfers x %d reps, "
        "%d idle conns; took %.0f s" % (a.rounds, a.duration, a.warmup, ",".join(map(str, a.concurrency)),
                                         a.bulk_mib, a.bulk_count, a.bulk_reps, a.idle_conns, elapsed)
        + ("; phases %s, extra concurrency %s, reload %g s x %d SIGHUPs" % (
            ",".join(a.phases), ",".join(map(str, a.extra_concurrency)), a.reload_duration, a.reloads)
           if any(ph in extra_phases.PHASES for ph in a.phases) else ""),
        "",
        "commands:",
    ] + ["  " + c for c in bench.command_lines()] + [
        "",
        report.render(rows) if rows else "",
        "",
    ] + [t + "\n" for t in bench.extra_tables] + [
        report.background_line(bench.bg, bench.retried, bench.bg_before),
        report.steal_line(bench.steal),
    ] + (["goals met: %d of %d graded rows" % (ok, graded)] if graded else []) + ["note: " + n for n in bench.notes] + (["run incomplete (status %d)" % status] if status else []))
    print(text)
    os.makedirs(a.results_dir, exist_ok=True)
    base = os.path.join(a.results_dir, stamp)
    with open(base + ".txt", "w") as f:
        f.write(text + "\n")
    raw = {
        "rps": [m for v in bench.rps.values() for m in v],
        "bulk": [m for v in bench.bulk.values() for m in v],
        "idle": bench.idle, "hwm": bench.hwm, "extra": bench.extra_raw, "discarded": bench.discarded, "bg": bench.bg, "steal": bench.steal,
        "commands": bench.commands, "settings": {k: v for k, v in vars(a).items()},
    }
    with open(base + ".json", "w") as f:
        json.dump(raw, f, indent=1, default=str)
    log("written %s.txt and %s.json" % (base, base))
    if a.keep_logs or status:
        log("process logs kept in %s" % workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
