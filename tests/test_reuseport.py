"""--fastrouter-reuse-port: a listening socket per router process (SO_REUSEPORT), and
uWSGI's --reuse-port.

The end-to-end tests read the kernel's view of the listening sockets from
/proc/net/tcp: a LISTEN row per socket, whose rx_queue column is the number of
connections waiting in its accept queue.  A router process stopped with SIGSTOP
leaves the connections the kernel gives its socket waiting there, which is how a
queue is built without timing anything.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
from typing import Dict, List

import pytest

from backends import RecordingBackend, request
from support import fetch_stats, start_router, tcp_table_rows, wait_applied_everywhere, wait_until
from test_master import HOST, children, reload_under_load
from test_sockets import ipv6_available
from test_subscriptions import announce

from uwsgi_fastrouter.binding import Bindings
from uwsgi_fastrouter.options import StartupError, load_config
from uwsgi_fastrouter.validation import validate

REUSE = ["--fastrouter-reuse-port"]
_LISTEN = "0A"


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def listening_queues(port: int) -> List[int]:
    """The accept queue length of every TCP socket listening on *port* (IPv4 and IPv6)."""
    return [int(cols[4].split(":")[1], 16) for cols in tcp_table_rows()
            if cols[3] == _LISTEN and int(cols[1].rsplit(":", 1)[1], 16) == port]


def listening_inodes(port: int) -> set:
    """The socket inodes of the TCP sockets listening on *port*."""
    return {cols[9] for cols in tcp_table_rows()
            if cols[3] == _LISTEN and int(cols[1].rsplit(":", 1)[1], 16) == port}


def held_sockets(pid: int) -> set:
    """The socket inodes *pid* holds a descriptor for."""
    held = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if link.startswith("socket:["):
            held.add(link[8:-1])
    return held


def spawned_pids(router) -> Dict[int, int]:
    """Router process number -> pid of the newest process spawned in that slot."""
    pids = {}
    for number, pid in re.findall(r"spawned uWSGI fastrouter (\d+) \(pid: (\d+)\)", router.log()):
        pids[int(number)] = int(pid)
    return pids


class Clients:
    """*count* clients, each on its own connection, sending one request at once and
    waiting for the answer (up to *timeout*)."""

    def __init__(self, address: str, count: int, timeout: float = 30.0) -> None:
        self.answers: List[bytes] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._one, args=(address, timeout)) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _one(self, address: str, timeout: float) -> None:
        try:
            answer = request(address, HOST, timeout=timeout)
        except OSError as exc:
            answer = repr(exc).encode()
        with self.lock:
            self.answers.append(answer)

    @property
    def done(self) -> int:
        with self.lock:
            return len(self.answers)

    def join(self) -> List[bytes]:
        for thread in self.threads:
            thread.join(60)
        return self.answers


def _ok(answer: bytes) -> bool:
    return answer.startswith(b"HTTP/1.0 200")


# ---------------------------------------------------------------- start-up checks


def _config(*args: str):
    return load_config(list(args), {})


@pytest.mark.parametrize("listener", ["/tmp/some.sock", "@abstract", "=0", "fd://3"])
def test_the_option_refuses_a_listener_that_is_not_tcp(listener):
    cfg = _config("--fastrouter", listener, "--shared-socket", "127.0.0.1:0", "--fastrouter-reuse-port")
    with pytest.raises(StartupError) as info:
        validate(cfg)
    assert "--fastrouter-reuse-port" in str(info.value) and listener in str(info.value)


def test_the_option_refuses_the_sockets_of_a_zerg_server():
    cfg = _config("--fastrouter-zerg", "/tmp/zerg.sock", "--fastrouter-reuse-port")
    with pytest.raises(StartupError, match="--fastrouter-reuse-port.*--fastrouter-zerg"):
        validate(cfg)


@pytest.mark.parametrize("listener", ["127.0.0.1:0", "[::1]:0", "localhost:0", ":0"])
def test_the_option_takes_tcp_listeners(listener):
    validate(_config("--fastrouter", listener, "--fastrouter-to", "127.0.0.1:9", "--fastrouter-reuse-port"))


def test_a_unix_listener_with_the_option_stops_the_start_naming_it(sock_dir):
    path = str(sock_dir / "r.sock")
    router = start_router(["--master", "--fastrouter", path, "--fastrouter-to", "127.0.0.1:9",
                           "--fastrouter-processes", "2"] + REUSE, listeners=0)
    router.wait_for_log(r'option "--fastrouter-reuse-port": --fastrouter %s is not a TCP address'
                        % re.escape(path))
    wait_until(lambda: not router.alive(), what="the router to exit")
    assert router.returncode == 1
    assert not os.path.exists(path)


# ---------------------------------------------------------------- binding


def _bind(*args: str, listener: str = "127.0.0.1:0") -> Bindings:
    cfg = _config("--fastrouter", listener, "--fastrouter-to", "127.0.0.1:9", *args)
    validate(cfg)
    return Bindings.bind(cfg, None)


def _reuse_port(listener) -> bool:
    return listener.sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) != 0


@pytest.mark.parametrize("listener", ["127.0.0.1:0", "[::1]:0"])
def test_one_socket_per_router_process_on_the_same_port(listener):
    if listener.startswith("[") and not ipv6_available():
        pytest.skip("no IPv6 loopback")
    bindings = _bind("--fastrouter-processes", "3", *REUSE, listener=listener)
    try:
        groups = [bindings.listeners] + bindings.per_process
        assert [len(g) for g in groups] == [1, 1, 1]
        socks = [g[0] for g in groups]
        assert len({s.sock.getsockname() for s in socks}) == 1
        assert len({s.fileno() for s in socks}) == 3
        assert len({s.name for s in socks}) == 1          # reported once, under one name
        assert all(_reuse_port(s) for s in socks)
        assert listening_queues(socks[0].sock.getsockname()[1]) == [0, 0, 0]
    finally:
        bindings.close_all()


def test_without_the_option_one_socket_is_shared_and_has_no_reuse_port():
    bindings = _bind("--fastrouter-processes", "3")
    try:
        assert len(bindings.listeners) == 1 and bindings.per_process == []
        assert not _reuse_port(bindings.listeners[0])
        assert bindings.for_process(2, 3) == bindings.listeners
    finally:
        bindings.close_all()


def test_the_per_process_sockets_cross_a_reexec_in_their_groups():
    bindings = _bind("--fastrouter-processes", "2", *REUSE)
    try:
        state = bindings.inheritable_state()
        assert len(state["per_process"]) == 1
        adopted = Bindings.adopt(state)
        assert [l.fileno() for l in adopted.listeners] == [l.fileno() for l in bindings.listeners]
        assert [[l.fileno() for l in g] for g in adopted.per_process] == \
            [[l.fileno() for l in g] for g in bindings.per_process]
        for group in adopted.per_process:     # the same sockets under two objects: forget one
            for listener in group:
                listener.sock.detach()
        for listener in adopted.listeners:
            listener.sock.detach()
    finally:
        bindings.close_all()


def _groups(n: int) -> Bindings:
    bindings = Bindings()
    bindings.listeners = ["g1"]
    bindings.per_process = [["g%d" % i] for i in range(2, n + 1)]
    return bindings


def test_each_process_polls_its_own_group_and_a_changed_count_strands_none():
    assert [_groups(3).for_process(i, 3) for i in (1, 2, 3)] == [["g1"], ["g2"], ["g3"]]
    # More inherited groups than processes (fewer processes after a reload): each
    # group is polled by exactly one process.
    assert [_groups(5).for_process(i, 2) for i in (1, 2)] == [["g1", "g3", "g5"], ["g2", "g4"]]
    # Fewer groups than processes: the processes share them.
    assert [_groups(2).for_process(i, 4) for i in (1, 2, 3, 4)] == [["g1"], ["g2"], ["g1"], ["g2"]]


# ---------------------------------------------------------------- end to end


def _router(node, *extra: str, processes: int = 2):
    router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address,
                           "--fastrouter-processes", str(processes)] + list(extra))
    for number in range(1, processes + 1):
        router.wait_for_log(r"spawned uWSGI fastrouter %d " % number)
    return router


def test_every_router_process_accepts_on_its_own_socket(tmp_path):
    log_path = tmp_path / "access.log"
    with RecordingBackend("a") as node:
        router = _router(node, "--fastrouter-access-log=%s" % log_path,
                         "--fastrouter-access-log-format", "%(pid) %(status)",
                         "--fastrouter-stats", "127.0.0.1:0", *REUSE)
        port = _port(router.addresses[0])
        assert listening_queues(port) == [0, 0]
        answers = Clients(router.addresses[0], 64).join()
        assert len(answers) == 64 and all(_ok(a) for a in answers)
        workers = set(children(router.pid))

        def served_by() -> set:
            return {int(line.split()[0]) for line in log_path.read_text().splitlines() if line}

        wait_until(lambda: len(log_path.read_text().splitlines()) == 64, what="64 access log lines")
        assert served_by() == workers and len(workers) == 2    # the kernel spread them
        stats = fetch_stats(router.stats_address)
        assert len([name for name in stats["fastrouter"] if name.endswith(":%d" % port)]) == 1
        assert stats["static_nodes"][0]["hits"] == 64
        assert router.stop() == 0


@pytest.mark.parametrize("processes", [2, 3])
def test_each_router_process_holds_its_own_socket_only(processes):
    """Every router process holds exactly one of the address's listening sockets, each a
    different one (a process holding two would take the connections of both), while
    the master holds them all."""
    with RecordingBackend("a") as node:
        router = _router(node, *REUSE, processes=processes)
        sockets = listening_inodes(_port(router.addresses[0]))
        assert len(sockets) == processes
        assert held_sockets(router.pid) & sockets == sockets
        pids = spawned_pids(router)
        mine = [held_sockets(pids[number]) & sockets for number in range(1, processes + 1)]
        assert [len(held) for held in mine] == [1] * processes
        assert set.union(*mine) == sockets
        assert router.stop() == 0


def test_without_the_option_the_processes_share_one_socket():
    with RecordingBackend("a") as node:
        router = _router(node)
        assert listening_queues(_port(router.addresses[0])) == [0]
        assert _ok(request(router.addresses[0], HOST))
        assert router.stop() == 0


@pytest.mark.parametrize("master", [False, True])
def test_one_process_has_one_socket(master):
    with RecordingBackend("a") as node:
        args = ["--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address] + REUSE
        router = start_router((["--master"] if master else []) + args)
        if master:
            router.wait_for_log(r"spawned uWSGI fastrouter 1 ")
        assert listening_queues(_port(router.addresses[0])) == [0]
        assert all(_ok(request(router.addresses[0], HOST)) for _ in range(5))
        assert router.stop() == 0


def _queue_on_a_stopped_process(router, clients: int = 48):
    """Stop router process 1 (SIGSTOP) and send *clients* requests at once: the ones
    the kernel gives process 2's socket are answered, the others wait in process 1's
    socket.  Returns (the stopped pid, the clients, the most seen waiting)."""
    victim = spawned_pids(router)[1]
    os.kill(victim, signal.SIGSTOP)
    port = _port(router.addresses[0])
    load = Clients(router.addresses[0], clients)
    most = [0]

    def settled() -> bool:
        """Everything is answered or queued: the kernel's count and ours add up."""
        queued = sum(listening_queues(port))
        most[0] = max(most[0], queued)
        return load.done + queued == clients

    wait_until(settled, timeout=30, what="every request answered or waiting in an accept queue")
    return victim, load, most[0]


@pytest.mark.parametrize("how", ["killed", "harakiri", "reload", "brutal-reload"])
def test_connections_queued_on_a_replaced_process_are_all_served(how):
    """Process 1 is stopped while connections queue on its socket, then replaced: by
    the master after it is killed, or after the master kills it for not beating
    (--fastrouter-harakiri), by a graceful reload's new generation, or after a
    brutal reload (SIGTERM: every process killed, the master re-executed).  Its socket
    stays open in the master, so the successor accepts every one of them (a socket
    closed with connections in its queue would reset them)."""
    with RecordingBackend("a") as node:
        harakiri = ["--fastrouter-harakiri", "3"] if how == "harakiri" else []
        router = _router(node, *REUSE, *harakiri)
        victim, load, waiting = _queue_on_a_stopped_process(router)
        try:
            assert waiting > 0, "no connection was given to the stopped process's socket"
            if how == "killed":
                os.kill(victim, signal.SIGKILL)
                router.wait_for_log(r"DAMN ! fastrouter 1 \(pid: %d\) died" % victim)
            elif how == "harakiri":
                router.wait_for_log(r"HARAKIRI ON GATEWAY uWSGI fastrouter 1 \(pid: %d\)" % victim,
                                    timeout=30)
            elif how == "reload":
                os.kill(router.pid, signal.SIGHUP)
                router.wait_for_log(r"graceful reload: 2 old process", timeout=30)
            else:
                os.kill(router.pid, signal.SIGTERM)
                router.wait_for_log(r"brutally reloading")
                router.wait_for_log(r"spawned uWSGI fastrouter 1 ", count=2, timeout=30)
            answers = load.join()
        finally:
            if how == "reload":
                os.kill(victim, signal.SIGCONT)    # it has its SIGTERM: it finishes and exits
        assert len(answers) == 48
        assert [a for a in answers if not _ok(a)] == []
        assert listening_queues(_port(router.addresses[0])) == [0, 0]
        assert router.stop() == 0


def test_graceful_reloads_under_load_lose_nothing_and_keep_the_sockets():
    with RecordingBackend("a") as node:
        router = _router(node, *REUSE)
        port = _port(router.addresses[0])
        load = reload_under_load(router, 3, clients=6)
        assert load.failed == 0 and load.ok > 20
        assert len(listening_queues(port)) == 2            # the same two sockets, no more
        assert "own socket" not in router.log().split("gracefully reloading", 1)[1]
        assert router.stop() == 0


def test_cheap_mode_with_per_process_sockets(sock_dir):
    sub = str(sock_dir / "sub.sock")
    with RecordingBackend("a") as node:
        router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-processes", "2",
                               "--fastrouter-subscription-server", sub, "--fastrouter-cheap",
                               "--fastrouter-stats", "127.0.0.1:0"] + REUSE)
        router.wait_for_log(r"spawned uWSGI fastrouter 2 ")
        announce(sub, b"example.com", node.address.encode())
        wait_applied_everywhere(router, r"example.com => new node")
        answers = Clients(router.addresses[0], 32).join()
        assert all(_ok(a) for a in answers)
        assert router.stop() == 0


# ---------------------------------------------------------------- uWSGI's --reuse-port


def _can_bind_beside(port: int) -> bool:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        probe.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        probe.close()


@pytest.mark.parametrize("flag", [False, True])
def test_reuse_port_lets_another_socket_bind_the_shared_address(flag):
    with RecordingBackend("a") as node:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address]
                              + (["--reuse-port"] if flag else []))
        port = _port(router.addresses[0])
        assert _can_bind_beside(port) is flag
        assert listening_queues(port) == [0]
        assert _ok(request(router.addresses[0], HOST))
        assert router.stop() == 0


def test_a_reload_with_another_process_count_keeps_the_sockets_and_strands_no_queue(tmp_path):
    """The sockets cross a reload as they are: with more processes than sockets the
    processes share them, with fewer every socket is still polled by one of them (a
    request given to an unpolled socket would never be answered)."""
    ini = tmp_path / "router.ini"

    def configure(processes: int) -> None:
        ini.write_text("[uwsgi]\nmaster = true\nfastrouter = 127.0.0.1:0\nfastrouter-to = %s\n"
                       "fastrouter-processes = %d\nfastrouter-reuse-port = true\n" % (node.address, processes))

    with RecordingBackend("a") as node:
        configure(2)
        router = start_router(["--ini", str(ini)], listeners=1)
        router.wait_for_log(r"spawned uWSGI fastrouter 2 ")
        port = _port(router.addresses[0])
        for reload, processes in enumerate((3, 1), start=1):
            configure(processes)
            os.kill(router.pid, signal.SIGHUP)
            router.wait_for_log(r"reload: the %d router process\(es\) share the 2 listening "
                                r"socket\(s\) per address" % processes, timeout=30)
            router.wait_for_log(r"graceful reload: \d+ old process", count=reload, timeout=30)
            answers = Clients(router.addresses[0], 48, timeout=15).join()
            assert [a for a in answers if not _ok(a)] == []
            assert listening_queues(port) == [0, 0]
        assert router.stop() == 0
