"""The pre-fork master: several router processes, respawn, reloads without loss (D1, D8)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from backends import RecordingBackend, request
from support import (fetch_stats, free_dead_tcp_address, start_router, wait_applied_everywhere,
                     wait_until)
from test_subscriptions import announce

HOST = [(b"HTTP_HOST", b"example.com")]


def children(pid: int) -> list:
    with open("/proc/%d/task/%d/children" % (pid, pid)) as handle:
        return [int(p) for p in handle.read().split()]


def zombies(pid: int) -> list:
    out = []
    for child in children(pid):
        try:
            with open("/proc/%d/stat" % child) as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    out.append(child)
        except OSError:
            pass
    return out


def fds(pid: int) -> int:
    return len(os.listdir("/proc/%d/fd" % pid))


class Load:
    """Clients sending requests back to back until stopped; counts failures."""

    def __init__(self, address: str, clients: int = 4):
        self.address = address
        self.ok = 0
        self.failed = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def _run(self):
        while not self.stop.is_set():
            try:
                answer = request(self.address, HOST, timeout=10)
            except OSError:
                answer = b""
            if answer[:16].startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")):
                self.ok += 1
            else:
                self.failed += 1

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(20)


def reload_under_load(router, reloads: int, clients: int = 4) -> Load:
    """Reload *router* (SIGHUP) *reloads* times, each after the previous one forked its
    generation, while *clients* send requests back to back; the finished load."""
    load = Load(router.addresses[0], clients)
    try:
        for i in range(1, reloads + 1):
            os.kill(router.pid, signal.SIGHUP)
            router.wait_for_log(r"graceful reload: \d+ old process", count=i, timeout=30)
            wait_until(lambda: load.ok > 0, what="requests flowing")
    finally:
        load.finish()
    return load


def test_several_processes_serve_and_a_killed_one_is_respawned(tmp_path):
    with RecordingBackend("m") as node:
        router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address,
                               "--fastrouter-processes", "2", "--pidfile", str(tmp_path / "m.pid"),
                               "--fastrouter-stats", "127.0.0.1:0"])
        first = router.wait_for_log(r"spawned uWSGI fastrouter 1 \(pid: (\d+)\)")
        router.wait_for_log(r"spawned uWSGI fastrouter 2 \(pid: \d+\)")
        assert int((tmp_path / "m.pid").read_text()) == router.pid
        for _ in range(20):
            assert request(router.addresses[0], HOST).startswith(b"HTTP/1.0 200")
        stats = fetch_stats(router.stats_address)
        assert stats["static_nodes"][0]["hits"] == 20 and stats["pid"] == router.pid
        victim = int(first.group(1))       # a router process (a stats fetch forks briefly too)
        os.kill(victim, signal.SIGKILL)
        router.wait_for_log(r"DAMN ! fastrouter \d \(pid: %d\) died" % victim)
        wait_until(lambda: len(children(router.pid)) == 2 and victim not in children(router.pid),
                   what="respawned router process")
        for _ in range(10):
            assert request(router.addresses[0], HOST).startswith(b"HTTP/1.0 200")
        assert router.stop() == 0
        assert not (tmp_path / "m.pid").exists()


def test_every_process_sees_every_subscription(tmp_path):
    sub = str(tmp_path / "sub.sock")
    with RecordingBackend("a") as a:
        router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-processes", "2",
                               "--fastrouter-subscription-server", sub, "--fastrouter-stats", "127.0.0.1:0"])
        router.wait_for_log(r"spawned uWSGI fastrouter 2")
        announce(sub, b"example.com", a.address.encode())
        wait_applied_everywhere(router, r"example.com => new node")
        for _ in range(30):
            assert b"node=a" in request(router.addresses[0], HOST)
        doc = fetch_stats(router.stats_address)
        (pool,) = doc["subscriptions"]
        assert pool["hits"] == 30 and pool["nodes"][0]["requests"] == 30


def test_each_subscription_event_is_logged_once(tmp_path):
    """The master logs what it accepts; its router processes apply their copies
    silently, and a failure is logged by the process that saw it, not repeated by
    the master and the other processes."""
    sub = str(tmp_path / "sub.sock")
    dead, reserved = free_dead_tcp_address()
    with reserved, RecordingBackend("a") as a:
        router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-processes", "2",
                               "--fastrouter-subscription-server", sub, "--fastrouter-stats", "127.0.0.1:0"])
        router.wait_for_log(r"spawned uWSGI fastrouter 2")
        announce(sub, b"example.com", a.address.encode())
        announce(sub, b"dead.example", dead.encode())
        wait_applied_everywhere(router, r"dead.example => new node")
        assert b"node=a" in request(router.addresses[0], HOST)
        assert request(router.addresses[0], [(b"HTTP_HOST", b"dead.example")]) == b""
        router.wait_for_log(r"dead.example => marking %s as failed" % dead)
        # the failing process told the master, which told the other one: after two
        # rounds of reports every copy has it
        fetch_stats(router.stats_address)
        fetch_stats(router.stats_address)
        assert router.count(r"new pool: example.com") == 1
        assert router.count(r"example.com => new node: %s" % a.address) == 1
        assert router.count(r"new pool: dead.example") == 1
        assert router.count(r"dead.example => new node") == 1
        assert router.count(r"marking %s as failed" % dead) == 1


def test_graceful_reloads_under_load_lose_nothing_and_keep_the_table(tmp_path):
    sub = str(tmp_path / "sub.sock")
    with RecordingBackend("a") as a:
        router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-processes", "2",
                               "--fastrouter-subscription-server", sub, "--fastrouter-stats", "127.0.0.1:0"])
        router.wait_for_log(r"spawned uWSGI fastrouter 2")
        announce(sub, b"example.com", a.address.encode())
        wait_applied_everywhere(router, r"example.com => new node")
        load = reload_under_load(router, 5)
        assert load.failed == 0 and load.ok > 50
        # the subscription survived five reloads without a new announce
        assert router.count(r"subscribed node\(s\) carried over") >= 5
        assert b"node=a" in request(router.addresses[0], HOST)


@pytest.mark.slow
def test_no_zombies_and_no_leaked_fds_after_many_reloads():
    with RecordingBackend("r") as node:
        router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address])
        router.wait_for_log(r"spawned uWSGI fastrouter 1")
        wait_until(lambda: len(children(router.pid)) == 1)
        before = fds(router.pid)
        for i in range(1, 101):
            os.kill(router.pid, signal.SIGHUP)
            router.wait_for_log(r"graceful reload: \d+ old process", count=i, timeout=20)
        wait_until(lambda: len(children(router.pid)) == 1 and not zombies(router.pid), timeout=30,
                   what="old generations reaped")
        assert fds(router.pid) == before
        assert request(router.addresses[0], HOST).startswith(b"HTTP/1.0 200")


def test_sigterm_is_a_reload_unless_die_on_term():
    with RecordingBackend("t") as node:
        router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address])
        os.kill(router.pid, signal.SIGTERM)
        router.wait_for_log(r"brutally reloading")
        router.wait_for_log(r"spawned uWSGI fastrouter 1", count=2)
        assert request(router.addresses[0], HOST).startswith(b"HTTP/1.0 200")
        dying = start_router(["--master", "--die-on-term", "--fastrouter", "127.0.0.1:0",
                              "--fastrouter-to", node.address])
        assert dying.stop(signal.SIGTERM) == 0


def test_router_harakiri_kills_a_stuck_router_process_and_respawns_it(tmp_path):
    with RecordingBackend("h") as node:
        mapper = tmp_path / "slow.py"
        mapper.write_text("import time\ndef get(key):\n    if key == 'stuck':\n        time.sleep(30)\n"
                          "    return '%s'\n" % node.address)
        router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-harakiri", "1",
                               "--fastrouter-use-code-string", "0:%s:get" % mapper])
        router.wait_for_log(r"spawned uWSGI fastrouter 1")
        started = time.monotonic()
        assert request(router.addresses[0], [(b"HTTP_HOST", b"stuck")], timeout=20) == b""
        assert time.monotonic() - started < 10
        router.wait_for_log(r"\*\*\* HARAKIRI ON GATEWAY uWSGI fastrouter 1 \(pid: \d+\) \*\*\*")
        router.wait_for_log(r"spawned uWSGI fastrouter 1", count=2)
        assert b"node=h" in request(router.addresses[0], HOST)


def test_logto_and_privileges(tmp_path):
    if os.getuid() != 0:
        pytest.skip("needs root to switch users")
    logfile = tmp_path / "router.log"
    os.chmod(tmp_path, 0o777)
    with RecordingBackend("l") as node:
        router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address,
                               "--logto", str(logfile), "--fastrouter-uid", "nobody"], listeners=0)
        wait_until(lambda: logfile.exists() and "spawned uWSGI fastrouter 1" in logfile.read_text(),
                   what="log lines in the --logto file")
        address = __import__("re").search(r"bound on (\S+) fd", logfile.read_text()).group(1)
        assert b"node=l" in request(address, HOST)
        (child,) = children(router.pid)
        with open("/proc/%d/status" % child) as handle:
            uid_line = [line for line in handle if line.startswith("Uid:")][0]
        assert uid_line.split()[1] == str(__import__("pwd").getpwnam("nobody").pw_uid)


def test_daemonize_detaches_and_writes_the_pidfile(tmp_path):
    from support import Proc, router_argv
    logfile = tmp_path / "daemon.log"
    pidfile = tmp_path / "daemon.pid"
    launcher = Proc(router_argv(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-to", "127.0.0.1:9",
                                 "--daemonize", str(logfile), "--pidfile", str(pidfile)]))
    wait_until(lambda: not launcher.alive(), what="the launcher to return")
    assert launcher.returncode == 0
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the daemon's pidfile")
    daemon = int(pidfile.read_text())
    try:
        assert daemon != launcher.pid
        wait_until(lambda: "spawned uWSGI fastrouter 1" in logfile.read_text(), what="daemon log")
    finally:
        os.kill(daemon, signal.SIGINT)
        wait_until(lambda: not os.path.exists("/proc/%d" % daemon) or
                   open("/proc/%d/stat" % daemon).read().rsplit(")", 1)[1].split()[0] == "Z",
                   timeout=15, what="the daemon to stop")


def test_resubscribe_from_a_bound_port_under_a_master(tmp_path):
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.bind(("127.0.0.1", 0))
    upstream.settimeout(10)
    bind_port = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    bind_port.bind(("127.0.0.1", 0))
    bind_addr = "127.0.0.1:%d" % bind_port.getsockname()[1]
    bind_port.close()
    sub = str(tmp_path / "sub.sock")
    router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-processes", "2",
                           "--fastrouter-subscription-server", sub,
                           "--fastrouter-resubscribe", "127.0.0.1:%d" % upstream.getsockname()[1],
                           "--fastrouter-resubscribe-bind", bind_addr])
    router.wait_for_log(r"spawned uWSGI fastrouter 2")
    announce(sub, b"example.com", b"127.0.0.1:9")
    data, sender = upstream.recvfrom(65536)
    upstream.close()
    assert b"example.com" in data and "%s:%d" % sender == bind_addr
    assert router.addresses[0].encode() in data          # upstream routes to this router
    assert router.count(r"DAMN") == 0                     # no child died on the bound port


def test_reload_and_stop_from_the_command_line(tmp_path):
    from support import Proc, router_argv
    pidfile = tmp_path / "r.pid"
    with RecordingBackend("c") as node:
        router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address,
                               "--pidfile", str(pidfile)])
        wait_until(lambda: pidfile.exists())
        reload = Proc(router_argv(["--reload", str(pidfile)]))
        wait_until(lambda: not reload.alive(), what="--reload to return")
        assert reload.returncode == 0
        router.wait_for_log(r"gracefully reloading")
        router.wait_for_log(r"graceful reload: \d+ old process")
        assert b"node=c" in request(router.addresses[0], HOST)
        stop = Proc(router_argv(["--stop", str(pidfile)]))
        wait_until(lambda: not stop.alive() and not router.alive(), timeout=20, what="--stop to end the master")
        assert stop.returncode == 0 and router.returncode == 0
        bad = Proc(router_argv(["--reload", str(tmp_path / "missing.pid")]))
        wait_until(lambda: not bad.alive())
        assert bad.returncode == 1


def test_master_fifo_and_start_unsubscribed(tmp_path):
    from test_subscriptions import sub_router
    router, sub = sub_router(tmp_path)
    fifo = str(tmp_path / "master.fifo")
    with RecordingBackend("f") as node:
        instance = start_router(["--master", "--master-fifo", fifo, "--start-unsubscribed",
                                 "--subscribe-to", "%s=%s:example.com" % (node.address, sub),
                                 "--subscribe-freq", "1"], listeners=0)
        wait_until(lambda: os.path.exists(fifo), what="the master FIFO")
        # Nothing is announced while the subscriptions are blocked.  That absence means
        # something only past a point where an announce would have been seen: two
        # commands the master's loop answers (the second in a later pass than the one
        # that would have started the subscriber: it announces at once), then a
        # datagram of our own, which the subscription server reads after anything
        # queued before it.
        for sent in (1, 2):
            with open(fifo, "w") as handle:
                handle.write("?")
            instance.wait_for_log(r"\[master-fifo\] unknown command '\?'", count=sent)
        announce(sub, b"barrier.example", node.address.encode())
        router.wait_for_log(r"barrier.example => new node")
        assert router.count(r"example.com => new node") == 0
        assert instance.count(r"subscribing to") == 0
        assert request(router.addresses[0], HOST) == b""
        with open(fifo, "w") as handle:
            handle.write("S")
        instance.wait_for_log(r"subscriptions unblocked")
        router.wait_for_log(r"example.com => new node: %s" % node.address)
        assert b"node=f" in request(router.addresses[0], HOST)
        with open(fifo, "w") as handle:
            handle.write("S")
        instance.wait_for_log(r"subscriptions blocked")
        router.wait_for_log(r"example.com => marking %s as failed" % node.address)
        with open(fifo, "w") as handle:
            handle.write("q")
        wait_until(lambda: not instance.alive(), timeout=20, what="q to shut the master down")
