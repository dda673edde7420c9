#!/usr/bin/env python3
"""Soak: mixed load through two ``--master --fastrouter-processes 2`` routers for N minutes.

Usage::

    python3 soak/soak.py [--minutes 10] [--small-threads 6] [--keep-going]

See soak/README.md for what runs and what the printed table means.

Theory of operation
-------------------
Router A (no post-buffering; a UNIX and a TCP listener) and router B (post-buffering
above 64 KiB, to temporary files) share four nodes that subscribe to both: two Python
nodes inside this process (datagrams), this package's own ``--socket`` workers and a
real uWSGI 2.0 server.  Threads run the clients (see clients.py) in loops until the
time is up.  Other threads, each on its own timetable:

* reloads: SIGHUP to A's master at 60 s, 120 s, ...; to B's at 30 s, 90 s, ...;
* chaos: every 35 s one node (in turn) dies (SIGKILL / every connection reset, or a
  graceful stop, alternately) and comes back 12 s later (Python nodes on a new port);
* hostile bytes: a bad request every 0.5 s and a bad subscription datagram every 0.5 s;
* stats: each router's stats document every 3 s;
* sampler: every 10 s, VmRSS and the number of descriptors of every process of each
  router: the master (its pid never changes, a reload re-executes it) and its
  children from /proc, whose role (``router 1``, ``router 2``) comes from the
  master's ``spawned uWSGI fastrouter N (pid: P)`` lines; a child that is no longer
  the newest of its index is ``draining`` (the old generation of a reload).

Every event (node died / came back, reload) has a timestamp, so each failed request
is judged: it failed while a node that served it (or, if unknown, any node) died or
left during the request -> unavoidable; otherwise it is avoidable, and labelled
"during a reload" when a reload of its router fell within the request.

At the end the load stops, the routers are left to go idle (old generations gone),
their descriptors are sampled once more, and every process is stopped by its PID.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import nodes  # noqa: E402
import clients  # noqa: E402
import support  # noqa: E402  (tests/support.py, put on sys.path by nodes)

SPAWN_RE = re.compile(r"spawned uWSGI fastrouter (\d+) \(pid: (\d+)\)")
BIG = 64 << 20
SAMPLE_EVERY = 10.0
RELOAD_EVERY = 60.0
CHAOS_EVERY = 35.0
CHAOS_DOWN = 12.0


def now() -> float:
    return time.monotonic()


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stop = threading.Event()
        self.t0 = now()
        self.lock = threading.Lock()
        self.results: List[clients.Result] = []
        self.events: List[Tuple[float, str, str, float]] = []   # (began, what, who, ended)
        self.samples: List[Tuple[float, str, str, int, int, int]] = []   # t, router, role, pid, rss, fds
        self.bad: Counter = Counter()
        self.datagrams: Counter = Counter()
        self.stats: Dict[str, Counter] = defaultdict(Counter)
        self.stats_errors: List[str] = []
        self.stats_nodes: Dict[str, List[int]] = defaultdict(list)
        self.idle: Dict[str, Dict[str, Tuple[int, int]]] = {}
        self.threads: List[threading.Thread] = []
        self.routers: Dict[str, support.RouterProc] = {}
        self.addresses: Dict[str, List[str]] = {}
        self.nodes: List = []
        self.directory = Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp"))
        self.subs: Dict[str, Tuple[str, int]] = {}
        print("soak: working directory %s" % self.directory, flush=True)
        self.data = nodes.payload(BIG)
        self.digest = {n: hashlib.sha256(self.data[:n]).hexdigest()
                       for n in (BIG, 4096, 8192, 4 << 20)}

    # ------------------------------------------------------------ set-up

    def event(self, what: str, who: str, began: Optional[float] = None) -> None:
        """Record *what* happened to *who*, from *began* (default: now) until now."""
        ended = now()
        began = ended if began is None else began
        with self.lock:
            self.events.append((began, what, who, ended))
        print("[%6.1f s] %s %s%s" % (began - self.t0, what, who,
                                      " (took %.1f s)" % (ended - began) if ended - began > 0.1 else ""),
              flush=True)

    def record(self, result: clients.Result) -> None:
        with self.lock:
            self.results.append(result)

    @staticmethod
    def free_udp_port() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def start_routers(self) -> None:
        d = self.directory
        pb_dir = d / "postbuf"
        pb_dir.mkdir()
        for name in ("A", "B"):
            self.subs[name] = ("127.0.0.1", self.free_udp_port())
        common = ["--master", "--fastrouter-processes", "2", "--auto-procname", "--listen", "1024"]
        a_args = common + ["--fastrouter", str(d / "a.sock"), "--fastrouter", "127.0.0.1:0",
                           "--fastrouter-subscription-server", "%s:%d" % self.subs["A"],
                           "--fastrouter-stats", str(d / "a-stats.sock")]
        b_args = common + ["--fastrouter", str(d / "b.sock"),
                           "--fastrouter-subscription-server", "%s:%d" % self.subs["B"],
                           "--fastrouter-stats", str(d / "b-stats.sock"),
                           "--fastrouter-post-buffering", "65536",
                           "--fastrouter-post-buffering-dir", str(pb_dir)]
        for name, args in (("A", a_args), ("B", b_args)):
            proc = support.start_router(args, cwd=support.REPO_ROOT)
            self.routers[name] = proc
            self.addresses[name] = proc.addresses
            print("router %s: pid %d, listeners %s, stats %s\n  %s" % (
                name, proc.pid, " ".join(proc.addresses), proc.stats_address,
                " ".join(proc.argv)), flush=True)

    def start_nodes(self) -> None:
        servers = [self.subs["A"], self.subs["B"]]
        self.nodes = [nodes.PyNode("py1", servers, self.data), nodes.PyNode("py2", servers, self.data),
                      nodes.ProcNode("own1", "own", self.directory, servers),
                      nodes.ProcNode("uwsgi1", "uwsgi", self.directory, servers)]
        for node in self.nodes:
            node.start()
            self.event("node up", node.name)
        # every router has every node before the load starts
        for name in ("A", "B"):
            support.wait_until(lambda n=name: clients.stats_ok(self.routers[n].stats_address)[1] == 4,
                               timeout=60, interval=0.5, what="router %s to list 4 nodes" % name)

    # ------------------------------------------------------------ loops

    def spawn(self, name: str, target, *args) -> None:
        t = threading.Thread(target=self._guard, args=(name, target) + args, name=name, daemon=True)
        self.threads.append(t)
        t.start()

    def _guard(self, name: str, target, *args) -> None:
        try:
            target(*args)
        except Exception as exc:   # a bug of the soak itself: say so, keep the rest running
            print("soak thread %s crashed: %r" % (name, exc), flush=True)
            import traceback
            traceback.print_exc()

    def pause(self, seconds: float) -> bool:
        """Wait *seconds* or until the end; True if the soak goes on."""
        return not self.stop.wait(seconds)

    def small_loop(self, index: int) -> None:
        rng = random.Random(index)
        while not self.stop.is_set():
            router = "A" if rng.random() < 0.75 else "B"
            address = rng.choice(self.addresses[router])
            self.record(clients.small(router, address))
            self.pause(rng.uniform(0.0, 0.02))

    def bulk_loop(self) -> None:
        plan = [("A", "upload"), ("A", "download"), ("B", "upload"), ("B", "download")]
        i = 0
        while not self.stop.is_set():
            router, what = plan[i % len(plan)]
            i += 1
            address = self.addresses[router][0]
            if what == "upload":
                kind = "upload 64M" + (" post-buffered" if router == "B" else "")
                self.record(clients.upload(router, address, self.data, self.digest[BIG], kind=kind))
            else:
                self.record(clients.download(router, address, BIG, self.digest[BIG]))
            self.pause(3)

    def stream_loop(self, index: int) -> None:
        rng = random.Random(100 + index)
        while not self.stop.is_set():
            router = "AB"[index % 2]
            self.record(clients.stream(router, self.addresses[router][0], rng.randint(20, 40)))
            self.pause(1)

    def slow_loop(self) -> None:
        i = 0
        while not self.stop.is_set():
            router = "AB"[i % 2]
            address = self.addresses[router][0]
            step = i % 3
            i += 1
            if step == 0:
                self.record(clients.download(router, address, 8192, self.digest[8192],
                                             kind="slow reader 1 B/recv", slow_bytes=8192))
            elif step == 1:
                self.record(clients.download(router, address, 4 << 20, self.digest[4 << 20],
                                             kind="stalled reader 15 s", stall=15))
            else:
                self.record(clients.upload(router, address, self.data[:4096], self.digest[4096],
                                           kind="trickled body 1 B/2 ms", pace=(1, 0.002)))
            self.pause(1)

    def bad_loop(self) -> None:
        rng = random.Random(7)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        i = 0
        try:
            while not self.stop.is_set():
                router = "AB"[i % 2]
                kind = clients.BAD_KINDS[(i // 2) % len(clients.BAD_KINDS)]
                dkind = clients.DGRAM_KINDS[i % len(clients.DGRAM_KINDS)]
                i += 1
                outcome = clients.bad_packet(rng.choice(self.addresses[router]), kind, rng)
                with self.lock:
                    self.bad[(kind, outcome)] += 1
                clients.bad_datagram(self.subs[router], dkind, rng, udp)
                with self.lock:
                    self.datagrams[dkind] += 1
                self.pause(0.5)
        finally:
            udp.close()

    def stats_loop(self) -> None:
        while self.pause(3):
            for name, proc in self.routers.items():
                ok, count, error = clients.stats_ok(proc.stats_address)
                with self.lock:
                    self.stats[name]["ok" if ok else "failed"] += 1
                    if ok:
                        self.stats_nodes[name].append(count)
                    else:
                        self.stats_errors.append("%.1f s %s: %s" % (now() - self.t0, name, error))

    def reload_loop(self) -> None:
        every = self.args.reload_every
        if every <= 0:
            return
        order = []
        k = 1
        while k * every / 2 < self.args.minutes * 60:
            order.append((k * every / 2, "B" if k % 2 else "A"))
            k += 1
        for at, name in order:
            if not self.pause(max(0.0, self.t0 + at - now())):
                return
            proc = self.routers[name]
            os.kill(proc.pid, signal.SIGHUP)
            self.event("reload (SIGHUP)", name)

    def chaos_loop(self) -> None:
        i = 0
        while self.pause(CHAOS_EVERY - CHAOS_DOWN):
            node = self.nodes[i % len(self.nodes)]
            graceful = (i // len(self.nodes)) % 2 == 1
            i += 1
            began = now()    # a node's death starts with the signal, not when it is over
            if graceful:
                node.stop()
                self.event("node left (graceful)", node.name, began)
            else:
                node.kill()
                self.event("node killed", node.name, began)
            self.stop.wait(CHAOS_DOWN)
            try:
                node.start()
            except Exception as exc:
                print("node %s did not come back: %r" % (node.name, exc), flush=True)
                continue
            self.event("node back", node.name)

    def sample_loop(self) -> None:
        while True:
            self.sample_once()
            if not self.pause(SAMPLE_EVERY):
                return

    # ------------------------------------------------------------ /proc

    @staticmethod
    def children(pid: int) -> List[int]:
        try:
            with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return support._children(pid)

    @staticmethod
    def rss_fds(pid: int) -> Optional[Tuple[int, int]]:
        try:
            with open("/proc/%d/status" % pid) as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            fds = len(os.listdir("/proc/%d/fd" % pid))
        except (OSError, StopIteration, ValueError):
            return None
        return rss, fds

    def roles(self, name: str) -> Dict[int, str]:
        proc = self.routers[name]
        newest: Dict[str, int] = {}
        for m in SPAWN_RE.finditer(proc.log()):
            newest[m.group(1)] = int(m.group(2))
        current = {pid: "router %s" % index for index, pid in newest.items()}
        out = {proc.pid: "master"}
        for child in self.children(proc.pid):
            out[child] = current.get(child, "draining")
        return out

    def sample_once(self) -> Dict[str, Dict[str, Tuple[int, int]]]:
        t = now() - self.t0
        snapshot: Dict[str, Dict[str, Tuple[int, int]]] = {}
        for name in self.routers:
            snapshot[name] = {}
            for pid, role in self.roles(name).items():
                figures = self.rss_fds(pid)
                if figures is None:
                    continue
                with self.lock:
                    self.samples.append((t, name, role, pid, figures[0], figures[1]))
                snapshot[name]["%s %d" % (role, pid)] = figures
        return snapshot

    def wait_idle(self, timeout: float = 90.0) -> None:
        """Until no router has a draining child (old generations gone), bounded."""
        def idle() -> bool:
            return all("draining" not in self.roles(n).values() for n in self.routers)
        try:
            support.wait_until(idle, timeout=timeout, interval=1.0, what="old router generations to exit")
        except AssertionError as exc:
            print("soak: %s" % exc, flush=True)

    def idle_snapshot(self, label: str) -> None:
        self.idle[label] = {}
        for name in self.routers:
            for pid, role in self.roles(name).items():
                figures = self.rss_fds(pid)
                if figures is not None:
                    self.idle[label]["%s %s" % (name, role)] = figures

    # ------------------------------------------------------------ run

    def run(self) -> None:
        self.start_routers()
        self.start_nodes()
        self.idle_snapshot("before load")
        self.t0 = now()
        self.event("load starts", "(%d min)" % self.args.minutes)
        self.spawn("sampler", self.sample_loop)
        for i in range(self.args.small_threads):
            self.spawn("small-%d" % i, self.small_loop, i)
        self.spawn("bulk", self.bulk_loop)
        for i in range(2):
            self.spawn("stream-%d" % i, self.stream_loop, i)
        self.spawn("slow", self.slow_loop)
        self.spawn("bad", self.bad_loop)
        self.spawn("stats", self.stats_loop)
        self.spawn("reload", self.reload_loop)
        self.spawn("chaos", self.chaos_loop)
        end = self.t0 + self.args.minutes * 60
        while now() < end and not self.stop.is_set():
            self.stop.wait(min(5.0, end - now()))
            for name, proc in self.routers.items():
                if not proc.alive():
                    print("soak: router %s master exited (code %s)" % (name, proc.returncode), flush=True)
                    self.stop.set()
        self.finish_load()

    def finish_load(self) -> None:
        self.stop.set()
        self.event("load stops", "")
        deadline = now() + 120
        for t in self.threads:
            t.join(max(0.1, deadline - now()))
        stuck = [t.name for t in self.threads if t.is_alive()]
        if stuck:
            print("soak: threads still running after 120 s: %s" % stuck, flush=True)
        for node in self.nodes:
            if not node.alive():
                try:
                    node.start()
                    self.event("node back", node.name)
                except Exception as exc:
                    print("node %s did not come back: %r" % (node.name, exc), flush=True)
        self.wait_idle()
        self.sample_once()
        self.idle_snapshot("after load")

    def shutdown(self) -> None:
        self.stop.set()
        for node in self.nodes:
            try:
                node.kill() if isinstance(node, nodes.PyNode) else node.stop()
            except Exception as exc:
                print("stopping node %s: %r" % (node.name, exc), flush=True)
        for name, proc in self.routers.items():
            log = proc.log()
            (self.directory / ("router-%s.log" % name)).write_text(log)
            code = proc.stop(signal.SIGINT, timeout=20)
            print("router %s stopped (exit code %s); log: %s" % (
                name, code, self.directory / ("router-%s.log" % name)), flush=True)
        with open(self.directory / "samples.csv", "w") as f:
            f.write("seconds,router,role,pid,rss_kib,fds\n")
            for row in self.samples:
                f.write("%.1f,%s,%s,%d,%d,%d\n" % row)
        for node in self.nodes:
            if isinstance(node, nodes.ProcNode):
                (self.directory / ("node-%s.log" % node.name)).write_text("\n".join(node.logs))
        support.stop_all()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="minutes of load (10)")
    p.add_argument("--small-threads", type=int, default=6, help="threads of small requests (6)")
    p.add_argument("--reload-every", type=float, default=RELOAD_EVERY,
                   help="seconds between two graceful reloads of one router (60; 0: none)")
    args = p.parse_args(argv)
    if not os.environ.get("UWSGI_BIN"):
        print("soak: set UWSGI_BIN to the uWSGI 2.0 binary (a real uWSGI node is part of the mix)",
              file=sys.stderr)
        return 2
    soak = Soak(args)

    def on_term(signum, frame):
        raise KeyboardInterrupt
    # Set explicitly: a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    interrupted = False
    try:
        soak.run()
    except KeyboardInterrupt:
        interrupted = True
        print("soak: interrupted; stopping everything", flush=True)
    finally:
        soak.stop.set()
        try:
            soak.shutdown()
        except KeyboardInterrupt:
            support.stop_all()
    import report
    report.print_report(soak, interrupted)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
