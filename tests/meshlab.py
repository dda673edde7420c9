"""A multi-host router mesh built from network namespaces, and the scenarios run on it.

Used by ``tests/test_mesh.py`` (short runs, assertions) and ``bench/mesh.py`` (longer
runs, a table).

Theory of operation
-------------------
Every host is a network namespace named ``fm<PID>-<host>``; a further namespace, the
switch, holds a bridge.  Each host gets one veth pair: ``eth0`` inside the host with an
address of the private subnet ``10.77.0.0/24``, its peer enslaved to the bridge inside
the switch.  Those interfaces exist only inside namespaces this module created, so no
packet ever leaves them; :meth:`Mesh.destroy` deletes every namespace (which deletes
the veths with them).

Hosts (last octet of the address):

* ``r1`` .1, ``r2`` .2, ``r3`` .3: routers (``--fastrouter HOST:3017``, subscription
  server on UDP ``HOST:7000``, statistics on a UNIX socket in a temporary directory, so
  the test process reads them without entering a namespace).  ``r1`` forwards every
  subscription to ``r3`` (``--fastrouter-resubscribe``); ``r3`` only runs in the
  chaining scenario.
* ``n1`` .11, ``n2`` .12, ``n3`` .13: real uWSGI application servers that subscribe to
  ``r1`` and ``r2`` for the key :data:`KEY`; the app answers with its node name.
* ``ngx`` .20: nginx with ``r1`` and ``r2`` in one ``upstream`` and
  ``uwsgi_next_upstream error timeout``.
* ``cli`` .30: the client.  It is not a process: a thread of the calling process enters
  the namespace with ``setns(2)`` (a network namespace belongs to a thread), so the
  sockets it opens live there.

Processes run as ``ip netns exec NS PROGRAM ...``; ``ip`` execs the program, so the PID
of the :class:`support.Proc` is the program's own and it is stopped by that PID (and its
process group, which is its own session).

A scenario starts a fresh set of processes on the mesh, waits until both routers
list the three nodes, starts the steady load, causes its event and then waits (bounded)
until every running router's table is right: it lists exactly the nodes that can
answer.  It reports the failed requests, the longest time without a successful answer
and the time from the event until the tables were right (the convergence time).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import support
from support import (APP_SOCKET_RE, BIND_RE, STATS_RE, UWSGI_PARAMS, Proc, fetch_stats,
                     http_request, node_app_source, nginx_bin, uwsgi_bin, wait_until)

KEY = "mesh.test"
SUBNET = "10.77.0"
ROUTER_PORT = 3017
SUBSCRIPTION_PORT = 7000
NODE_PORT = 3031
NGINX_PORT = 8080
HOSTS = {"r1": 1, "r2": 2, "r3": 3, "n1": 11, "n2": 12, "n3": 13, "ngx": 20, "cli": 30}
ROUTERS = ("r1", "r2")
NODES = ("n1", "n2", "n3")
CLONE_NEWNET = 0x40000000


# ---------------------------------------------------------------------------
# Namespaces

class MeshUnavailable(Exception):
    """Network namespaces cannot be made here (not root, no ``ip``, no netns support)."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip"] + list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=20)
    if done.returncode != 0:
        raise MeshUnavailable("ip %s: %s" % (" ".join(args), done.stdout.decode(errors="replace").strip()))


_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(name: str) -> None:
    """Move the calling thread into the network namespace *name* (setns(2))."""
    fd = os.open("/run/netns/%s" % name, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, "setns(%s): %s" % (name, os.strerror(err)))
    finally:
        os.close(fd)


def run_in_netns(name: str, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Call *fn* in a new thread that has entered the namespace *name*; return its result."""
    box: Dict[str, Any] = {}

    def body() -> None:
        try:
            enter_netns(name)
            box["result"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=body, name="netns-%s" % name, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError("call in namespace %s did not return within %.0f s" % (name, timeout))
    if "error" in box:
        raise box["error"]
    return box.get("result")


class Mesh:
    """The namespaces, the switch and the links.  Use as a context manager."""

    def __init__(self, tag: Optional[str] = None) -> None:
        self.tag = tag or "fm%d" % os.getpid()
        self.switch = "%s-sw" % self.tag
        self.created: List[str] = []

    def ns(self, host: str) -> str:
        return "%s-%s" % (self.tag, host)

    @staticmethod
    def addr(host: str, port: Optional[int] = None) -> str:
        ip = "%s.%d" % (SUBNET, HOSTS[host])
        return ip if port is None else "%s:%d" % (ip, port)

    def create(self) -> "Mesh":
        if os.geteuid() != 0:
            raise MeshUnavailable("network namespaces need root (euid %d)" % os.geteuid())
        if shutil.which("ip") is None:
            raise MeshUnavailable("the ip command (iproute2) is not installed")
        try:
            self._add_ns(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for host in HOSTS:
                self._add_host(host)
        except BaseException:
            self.destroy()
            raise
        return self

    def _add_ns(self, name: str) -> None:
        if not self.created:
            atexit.register(self.destroy)  # also when the caller never reaches its cleanup
        _ip("netns", "add", name)
        self.created.append(name)

    def _add_host(self, host: str) -> None:
        ns, peer = self.ns(host), "p%s" % host
        self._add_ns(ns)
        _ip("-n", self.switch, "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", self.switch, "link", "set", peer, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", "%s/24" % self.addr(host), "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")

    def destroy(self) -> None:
        """Delete every namespace this mesh created (their veths go with them)."""
        for name in reversed(self.created):
            subprocess.run(["ip", "netns", "del", name], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=20)
        self.created = []

    def link(self, host: str, up: bool) -> None:
        _ip("-n", self.ns(host), "link", "set", "eth0", "up" if up else "down")

    def argv(self, host: str, argv: Sequence[Any]) -> List[str]:
        return ["ip", "netns", "exec", self.ns(host)] + [str(a) for a in argv]

    def run_in(self, host: str, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
        return run_in_netns(self.ns(host), fn, timeout)

    def __enter__(self) -> "Mesh":
        return self.create()

    def __exit__(self, *exc: Any) -> None:
        self.destroy()


def namespaces_available() -> Optional[str]:
    """None when a mesh can be built here, else the reason it cannot."""
    probe = Mesh(tag="fm%dprobe" % os.getpid())
    try:
        if os.geteuid() != 0:
            return "network namespaces need root (euid %d)" % os.geteuid()
        if shutil.which("ip") is None:
            return "the ip command (iproute2) is not installed"
        probe._add_ns(probe.switch)
        run_in_netns(probe.switch, lambda: None, timeout=10)
    except (MeshUnavailable, OSError, subprocess.SubprocessError) as exc:
        return "cannot make a network namespace: %s" % exc
    finally:
        probe.destroy()
    return None


# ---------------------------------------------------------------------------
# Processes on the mesh

@dataclass
class Settings:
    """Knobs of one mesh run; the defaults keep a scenario to a few seconds."""

    router_kind: str = "ours"          # "ours" or "uwsgi" (uWSGI 2.0 routers with --master)
    router_master: bool = False        # ours under --master (uWSGI routers always have one)
    subscribe_freq: int = 1            # the nodes' --subscribe-freq
    tolerance: int = 3                 # the routers' --subscription-tolerance
    router_timeout: int = 2            # the routers' --fastrouter-timeout
    nginx_connect_timeout: str = "1s"
    nginx_read_timeout: str = "4s"
    nginx_fail_timeout: str = "2s"
    # nginx's max_fails per router.  0: never take a router out of the upstream.  With 1
    # (nginx's default) a request that times out on a frozen node counts against the
    # healthy router that carried it, and two such requests take both routers out for
    # fail_timeout: every request in that window fails with "no live upstreams".
    nginx_max_fails: int = 0
    rate: float = 100.0                # requests per second of the client (all threads)
    threads: int = 2
    request_timeout: float = 10.0
    hold: float = 2.0                  # seconds of load after the tables converged
    converge_bound: float = 30.0
    # more options for our routers (e.g. --fastrouter-retry-after-connect); not given
    # to uWSGI's
    router_args: Tuple[str, ...] = ()


def _stop_group(proc: Proc, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Lab:
    """The processes of one scenario on a :class:`Mesh`; :meth:`stop` stops them all."""

    def __init__(self, mesh: Mesh, workdir: Path, settings: Settings) -> None:
        self.mesh = mesh
        self.dir = Path(workdir)
        self.cfg = settings
        self.routers: Dict[str, Proc] = {}
        self.nodes: Dict[str, Proc] = {}
        self.node_port: Dict[str, int] = {}
        self.stopped: Set[str] = set()
        self.nginx: Optional[Proc] = None
        self._count = 0

    # -- routers --------------------------------------------------------------

    def stats_path(self, host: str) -> str:
        return str(self.dir / ("%s.stats" % host))

    def router_argv(self, host: str) -> List[str]:
        args = ["--fastrouter", self.mesh.addr(host, ROUTER_PORT),
                "--fastrouter-subscription-server", self.mesh.addr(host, SUBSCRIPTION_PORT),
                "--fastrouter-stats", self.stats_path(host),
                "--fastrouter-timeout", str(self.cfg.router_timeout),
                "--subscription-tolerance", str(self.cfg.tolerance)]
        if host == "r1":
            args += ["--fastrouter-resubscribe", self.mesh.addr("r3", SUBSCRIPTION_PORT)]
        if self.cfg.router_kind == "uwsgi":
            return [uwsgi_bin(), "--master", "--die-on-term"] + args
        master = ["--master"] if self.cfg.router_master else []
        return [sys.executable, "-m", "uwsgi_fastrouter"] + master + args + list(self.cfg.router_args)

    def start_router(self, host: str) -> Proc:
        path = self.stats_path(host)
        if os.path.exists(path):
            os.unlink(path)
        env = support._child_env(None, pythonpath=self.cfg.router_kind == "ours")
        proc = Proc(self.mesh.argv(host, self.router_argv(host)), cwd=support.REPO_ROOT, env=env,
                    name="router-%s" % host)
        self.routers[host] = proc
        return proc

    def wait_router(self, host: str, timeout: float = 20.0) -> None:
        proc = self.routers[host]
        proc.wait_for_log(BIND_RE.pattern, timeout=timeout)
        proc.wait_for_log(STATS_RE.pattern, timeout=timeout)
        if self.cfg.router_kind == "uwsgi" or self.cfg.router_master:
            proc.wait_for_log(r"spawned uWSGI fastrouter 1 ", timeout=timeout)

    def kill_router(self, host: str) -> None:
        proc = self.routers.pop(host)
        _stop_group(proc, signal.SIGKILL)
        proc.stop()

    # -- nodes ----------------------------------------------------------------

    def node_address(self, host: str) -> str:
        return self.mesh.addr(host, self.node_port[host])

    def start_node(self, host: str, port: int = NODE_PORT) -> Proc:
        self._count += 1
        directory = self.dir / ("%s-%d" % (host, self._count))
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "app.py").write_text(node_app_source(host))
        argv = [uwsgi_bin(), "--master", "--socket", self.mesh.addr(host, port),
                "--wsgi-file", directory / "app.py", "--processes", "1", "--die-on-term",
                "--need-app", "--subscribe-freq", self.cfg.subscribe_freq]
        for router in ROUTERS:
            argv += ["--subscribe-to", "%s:%s" % (self.mesh.addr(router, SUBSCRIPTION_PORT), KEY)]
        proc = Proc(self.mesh.argv(host, argv), cwd=directory, env=support._child_env(None),
                    name="node-%s" % host)
        self.nodes[host] = proc
        self.node_port[host] = port
        return proc

    def wait_node(self, host: str, timeout: float = 30.0) -> None:
        proc = self.nodes[host]
        proc.wait_for_log(APP_SOCKET_RE.pattern, timeout=timeout)
        proc.wait_for_log(r"spawned uWSGI worker 1 ", timeout=timeout)

    def freeze_node(self, host: str) -> None:
        """SIGSTOP the node (master and worker): the kernel still accepts, nobody answers."""
        _stop_group(self.nodes[host], signal.SIGSTOP)
        self.stopped.add(host)

    def kill_node(self, host: str) -> None:
        proc = self.nodes.pop(host)
        _stop_group(proc, signal.SIGKILL)
        proc.stop()

    def stop_node(self, host: str) -> None:
        """A graceful stop (SIGTERM with --die-on-term: the node unsubscribes)."""
        proc = self.nodes.pop(host)
        proc.stop(signal.SIGTERM, timeout=15)

    # -- nginx ----------------------------------------------------------------

    def start_nginx(self) -> Proc:
        directory = self.dir / "nginx"
        (directory / "tmp").mkdir(parents=True, exist_ok=True)
        (directory / "uwsgi_params").write_text(UWSGI_PARAMS)
        conf = directory / "nginx.conf"
        conf.write_text(NGINX_CONF.format(
            dir=directory, listen=self.mesh.addr("ngx", NGINX_PORT),
            servers="".join("        server %s max_fails=%d fail_timeout=%s;\n"
                            % (self.mesh.addr(r, ROUTER_PORT), self.cfg.nginx_max_fails,
                               self.cfg.nginx_fail_timeout)
                            for r in ROUTERS),
            connect=self.cfg.nginx_connect_timeout, read=self.cfg.nginx_read_timeout))
        argv = [nginx_bin(), "-p", str(directory) + "/", "-c", conf, "-e", "stderr"]
        self.nginx = Proc(self.mesh.argv("ngx", argv), cwd=directory, env=support._child_env(None),
                          name="nginx-mesh")
        return self.nginx

    def nginx_listening(self) -> bool:
        assert self.nginx is not None and self.nginx.alive(), self.nginx and self.nginx.log()
        return self.mesh.run_in("cli", lambda: _connects(self.mesh.addr("ngx", NGINX_PORT)))

    # -- tables ---------------------------------------------------------------

    def table(self, host: str) -> Optional[Set[str]]:
        """The node names router *host* lists for :data:`KEY` (None: stats unreadable)."""
        try:
            doc = fetch_stats(self.stats_path(host), timeout=2.0)
        except (OSError, ValueError, AssertionError):
            return None
        for pool in doc.get("subscriptions", []):
            if pool.get("key") == KEY:
                return {node["name"] for node in pool.get("nodes", [])}
        return set()

    def expected(self, router: str = "r1") -> Set[str]:
        """What *router* must list: the nodes that can answer (running and not frozen);
        for ``r3``, fed by r1's ``--fastrouter-resubscribe``, r1's own listener (a
        resubscribing router announces itself, so r3 reaches the nodes through r1)."""
        if router == "r3":
            return {self.mesh.addr("r1", ROUTER_PORT)} if "r1" in self.routers else set()
        return {self.node_address(h) for h, p in self.nodes.items() if h not in self.stopped and p.alive()}

    def tables_right(self, hosts: Optional[Sequence[str]] = None) -> bool:
        return all(self.table(h) == self.expected(h) for h in (hosts or list(self.routers)))

    # -- whole lab ------------------------------------------------------------

    def start(self) -> "Lab":
        for host in NODES:
            self.start_node(host)
        for host in ROUTERS:
            self.start_router(host)
        self.start_nginx()
        for host in ROUTERS:
            self.wait_router(host)
        for host in NODES:
            self.wait_node(host)
        wait_until(self.nginx_listening, timeout=20, what="nginx to listen in its namespace")
        wait_until(self.tables_right, timeout=20, what="both routers to list the three nodes")
        return self

    def stop(self) -> None:
        for host in self.stopped:
            if host in self.nodes:
                _stop_group(self.nodes[host], signal.SIGCONT)
        procs = list(self.routers.values()) + list(self.nodes.values()) + [self.nginx]
        for proc in procs:
            if proc is not None:
                proc.send_stop_signal()
        for proc in procs:
            if proc is not None:
                proc.stop()


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log stderr notice;

events {{
    worker_connections 512;
}}

http {{
    access_log off;
    client_body_temp_path {dir}/tmp/client_body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;

    upstream routers {{
{servers}    }}

    server {{
        listen {listen};
        location / {{
            include uwsgi_params;
            uwsgi_pass routers;
            uwsgi_next_upstream error timeout;
            uwsgi_connect_timeout {connect};
            uwsgi_read_timeout {read};
            uwsgi_send_timeout {read};
        }}
    }}
}}
"""


def _connects(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------
# The steady load

@dataclass
class Outcome:
    start: float
    end: float
    ok: bool
    detail: str


class Load:
    """Client threads in the ``cli`` namespace sending bodyless GETs through nginx at a
    bounded rate until :meth:`stop`; every request is recorded as an :class:`Outcome`."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.outcomes: List[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []

    def start(self) -> "Load":
        for i in range(self.lab.cfg.threads):
            thread = threading.Thread(target=self._run, name="mesh-load-%d" % i, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _run(self) -> None:
        enter_netns(self.lab.mesh.ns("cli"))
        target = self.lab.mesh.addr("ngx", NGINX_PORT)
        interval = self.lab.cfg.threads / self.lab.cfg.rate
        timeout = self.lab.cfg.request_timeout
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                status, _headers, body = http_request(target, "GET", "/", KEY, timeout=timeout)
                ok = status == 200 and b'"node"' in body
                detail = body.decode("utf-8", "replace")[:120] if ok else "HTTP %d" % status
            except (OSError, AssertionError, ValueError) as exc:
                ok, detail = False, "%s: %s" % (type(exc).__name__, exc)
            end = time.monotonic()
            with self._lock:
                self.outcomes.append(Outcome(start, end, ok, detail))
            self._stop.wait(max(0.0, interval - (end - start)))  # pacing, not synchronisation

    def successes_since(self, moment: float) -> int:
        with self._lock:
            return sum(1 for o in self.outcomes if o.ok and o.start >= moment)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.lab.cfg.request_timeout + 5)

    def snapshot(self) -> List[Outcome]:
        with self._lock:
            return list(self.outcomes)


def longest_gap(outcomes: Sequence[Outcome], start: float, end: float) -> float:
    """The longest time in [start, end] without a successful answer arriving."""
    marks = [start] + sorted(o.end for o in outcomes if o.ok and start <= o.end <= end) + [end]
    return max(b - a for a, b in zip(marks, marks[1:]))


# ---------------------------------------------------------------------------
# Scenarios

@dataclass
class Result:
    scenario: str
    kind: str
    requests: int = 0
    failed: int = 0
    longest_gap: float = 0.0
    convergence: Optional[float] = None   # None: the tables were not right within the bound
    failed_after: int = 0                 # failed requests started once the scenario had settled
    notes: List[str] = field(default_factory=list)
    failures: List[str] = field(default_factory=list)


def _converge(lab: Lab, since: float, hosts: Optional[Sequence[str]] = None) -> Optional[float]:
    try:
        wait_until(lambda: lab.tables_right(hosts), timeout=lab.cfg.converge_bound, interval=0.05,
                   what="every router's table to be right")
    except AssertionError:
        return None
    return time.monotonic() - since


def _hold(load: Load, lab: Lab, since: float) -> None:
    """Keep the load on until it has answered for ``hold`` seconds' worth of requests."""
    wanted = max(1, int(lab.cfg.hold * lab.cfg.rate))
    try:
        wait_until(lambda: load.successes_since(since) >= wanted, timeout=lab.cfg.hold * 5 + 10,
                   interval=0.05, what="%d answers after the event" % wanted)
    except AssertionError:
        pass  # the result shows the gap and the failures


def scenario_kill_router(lab: Lab, load: Load) -> Tuple[float, Optional[float], List[str]]:
    """(a) SIGKILL r1; once the mesh answered through r2, start r1 again and wait for its table."""
    event = time.monotonic()
    lab.kill_router("r1")
    _hold(load, lab, time.monotonic())
    restart = time.monotonic()
    lab.start_router("r1")
    lab.wait_router("r1")
    conv = _converge(lab, restart)
    return event, conv, ["convergence: from the restart of r1 until its table is full"]


def scenario_freeze_and_kill_nodes(lab: Lab, load: Load) -> Tuple[float, Optional[float], List[str]]:
    """(b) SIGSTOP n1 and SIGKILL n2 at once; n3 alone must end up in every table."""
    event = time.monotonic()
    lab.freeze_node("n1")
    lab.kill_node("n2")
    conv = _converge(lab, event)
    return event, conv, ["n1 frozen: requests routed to it wait for --fastrouter-timeout "
                         "or nginx's read timeout"]


def scenario_link_down_up(lab: Lab, load: Load) -> Tuple[float, Optional[float], List[str]]:
    """(c) r2's link down until r2's table has expired the nodes, then up again."""
    event = time.monotonic()
    lab.mesh.link("r2", up=False)
    notes = []
    try:
        wait_until(lambda: lab.table("r2") == set(), timeout=lab.cfg.tolerance + 10, interval=0.05,
                   what="r2 to expire its nodes while cut off")
        notes.append("r2 expired its nodes after %.1f s cut off" % (time.monotonic() - event))
    except AssertionError:
        notes.append("r2 kept its nodes while cut off")
    up = time.monotonic()
    lab.mesh.link("r2", up=True)
    conv = _converge(lab, up)
    notes.append("convergence: from link up until r2's table is full")
    return event, conv, notes


def scenario_node_new_port(lab: Lab, load: Load) -> Tuple[float, Optional[float], List[str]]:
    """(d) stop n3 gracefully and start it again on a new port."""
    event = time.monotonic()
    lab.stop_node("n3")
    lab.start_node("n3", port=NODE_PORT + 1)
    lab.wait_node("n3")
    conv = _converge(lab, event)
    return event, conv, ["convergence: from the stop until both tables show the new port only"]


def scenario_chained_router(lab: Lab, load: Load) -> Tuple[float, Optional[float], List[str]]:
    """(e) start r3, which r1 feeds with --fastrouter-resubscribe; r3 must list r1 (the
    resubscribing router announces its own listener) and reach the nodes through it."""
    event = time.monotonic()
    lab.start_router("r3")
    lab.wait_router("r3")
    conv = _converge(lab, event)
    notes = ["convergence: from the start of r3 until its table is full"]
    answer = lab.mesh.run_in("cli", lambda: support.uwsgi_request(
        lab.mesh.addr("r3", ROUTER_PORT), support.request_vars(KEY), timeout=10))
    served = b'"node"' in answer
    notes.append("r3 served a request directly: %s" % ("yes" if served else "NO"))
    if not served:
        notes.append("r3 answer: %r" % answer[:200])
    return event, conv, notes


SCENARIOS: Dict[str, Callable[[Lab, Load], Tuple[float, Optional[float], List[str]]]] = {
    "a-kill-router": scenario_kill_router,
    "b-stop-and-kill-nodes": scenario_freeze_and_kill_nodes,
    "c-router-link-down-up": scenario_link_down_up,
    "d-node-new-port": scenario_node_new_port,
    "e-chained-router": scenario_chained_router,
}


def run_scenario(mesh: Mesh, workdir: Path, name: str, settings: Settings) -> Result:
    """Start a lab on *mesh*, put the load on, run scenario *name*, measure, stop the lab."""
    lab = Lab(mesh, workdir, settings)
    master = settings.router_master and settings.router_kind == "ours"
    label = settings.router_kind + ("+master" if master else "")
    result = Result(name, label)
    load: Optional[Load] = None
    try:
        lab.start()
        load = Load(lab).start()
        begin = time.monotonic()
        wait_until(lambda: load.successes_since(begin) >= 10, timeout=20, interval=0.05,
                   what="the load to be answered before the event")
        _event, conv, notes = SCENARIOS[name](lab, load)
        result.convergence, result.notes = conv, notes
        settled = time.monotonic()
        _hold(load, lab, settled)
        load.stop()
        end = time.monotonic()
        outcomes = load.snapshot()
        result.requests = len(outcomes)
        bad = [o for o in outcomes if not o.ok]
        result.failed = len(bad)
        result.failed_after = sum(1 for o in bad if o.start >= settled)
        result.failures = ["%.2fs: %s" % (o.start - begin, o.detail) for o in bad[:10]]
        result.longest_gap = longest_gap(outcomes, begin, end)
    finally:
        if load is not None:
            load.stop()
        lab.stop()
    return result


def format_table(results: Sequence[Result]) -> str:
    """One row per result; "failed after" counts the failed requests that started once the
    scenario had settled (the tables were right)."""
    rows = [("scenario", "routers", "requests", "failed", "failed after", "longest gap s", "convergence s")]
    for r in results:
        rows.append((r.scenario, r.kind, str(r.requests), str(r.failed), str(r.failed_after),
                     "%.2f" % r.longest_gap,
                     "%.2f" % r.convergence if r.convergence is not None else "not within bound"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
