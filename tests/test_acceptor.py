"""The one accept path: batches, the spare descriptor, the back-off, and every
accepting socket of a running router out of descriptors (router, stats server)."""

from __future__ import annotations

import errno
import io
import os
import resource
import select
import socket
import time

import pytest

from backends import RecordingBackend, fd_count, request
from support import _exchange, connect, start_router, wait_until
from uwsgi_fastrouter import acceptor as acceptor_mod
from uwsgi_fastrouter import log as logmod
from uwsgi_fastrouter.acceptor import BACKOFF, Acceptor
from uwsgi_fastrouter.reactor import Reactor

HOST = [(b"HTTP_HOST", b"example.com"), (b"PATH_INFO", b"/")]
ACCEPT_LINE = r"accept\(\)"


class ExhaustedListener(socket.socket):
    """A real listening socket whose next *failures* accepts fail with EMFILE."""

    failures = 0
    attempts = 0

    def _accept(self):
        self.attempts += 1
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return super()._accept()


@pytest.fixture
def captured_log():
    stream = io.StringIO()
    previous = logmod._stream
    logmod.set_stream(stream)
    # a fresh per-process rate limit, so an earlier test's line does not silence this one
    previous_limit = acceptor_mod._failure_log
    acceptor_mod._failure_log = logmod.RateLimitedLog(time.monotonic, burst=1,
                                                      what="accept() failure lines")
    yield stream
    acceptor_mod._failure_log = previous_limit
    logmod.set_stream(previous)


@pytest.fixture
def reactor():
    r = Reactor()
    yield r
    r.close()


@pytest.fixture
def listener():
    sock = ExhaustedListener(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    yield sock
    sock.close()


def clients(sock, n):
    made = [socket.create_connection(sock.getsockname(), timeout=5) for _ in range(n)]
    wait_until(lambda: select.select([sock], [], [], 0)[0], what="a waiting client")
    return made


def closed_by_peer(sock, timeout=10.0) -> bool:
    readable, _, _ = select.select([sock], [], [], timeout)
    if not readable:
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def run_for(reactor, seconds):
    reactor.call_later(seconds, reactor.stop)
    reactor.run()


# --------------------------------------------------------------------------- unit


def test_accepts_at_most_a_batch_per_readiness(reactor, listener):
    got = []
    acceptor = Acceptor(reactor, listener, lambda fd, addr: got.append(fd), name="t", batch=3)
    waiting = clients(listener, 5)
    acceptor._ready()
    assert len(got) == 3
    acceptor._ready()
    assert len(got) == 5
    acceptor._ready()           # nothing left: BlockingIOError ends the loop
    assert len(got) == 5
    for fd in got:
        os.close(fd)
    for c in waiting:
        c.close()


def test_accepted_descriptors_stay_blocking_and_close_on_exec(reactor, listener):
    got = []
    waiting = clients(listener, 1)
    Acceptor(reactor, listener, lambda fd, addr: got.append((fd, addr)), name="t")._ready()
    fd, addr = got[0]
    try:
        assert os.get_blocking(fd) is True
        assert os.get_inheritable(fd) is False
        assert addr[0] == "127.0.0.1"
    finally:
        os.close(fd)
        waiting[0].close()


def test_out_of_descriptors_sheds_the_client_pauses_and_resumes(reactor, listener, captured_log):
    got = []
    acceptor = Acceptor(reactor, listener, lambda fd, addr: got.append(fd), name="L")
    acceptor.start()
    assert reactor.is_registered(listener.fileno())
    [shed, kept] = clients(listener, 2)
    listener.failures = 1
    acceptor._ready()
    # the first waiting client was accepted with the spare descriptor and closed
    assert closed_by_peer(shed)
    assert got == []
    assert acceptor.backing_off and not reactor.is_registered(listener.fileno())
    line = captured_log.getvalue()
    assert "accept(): Too many open files on L; closed the waiting client" in line
    run_for(reactor, BACKOFF * 3)
    # back after the pause: the other client is served
    assert not acceptor.backing_off and reactor.is_registered(listener.fileno())
    assert len(got) == 1
    os.close(got[0])
    kept.close()
    shed.close()


def test_a_stop_during_the_back_off_is_not_undone(reactor, listener, captured_log):
    acceptor = Acceptor(reactor, listener, lambda fd, addr: os.close(fd), name="L")
    acceptor.start()
    waiting = clients(listener, 1)
    listener.failures = 1
    acceptor._ready()
    acceptor.stop()
    run_for(reactor, BACKOFF * 3)
    assert not reactor.is_registered(listener.fileno())
    acceptor.start()
    assert reactor.is_registered(listener.fileno())
    waiting[0].close()


def test_one_spare_descriptor_per_process(reactor, listener):
    acceptor_mod._Spare.take()
    before = fd_count(os.getpid())
    spare = acceptor_mod._Spare.fd
    for _ in range(5):
        Acceptor(reactor, listener, lambda fd, addr: None, name="x")
    assert acceptor_mod._Spare.fd == spare
    assert fd_count(os.getpid()) == before


def test_a_listener_that_keeps_failing_costs_one_attempt_per_back_off(reactor, listener,
                                                                       captured_log):
    """The stats server's old loop retried on every pass of the loop: thousands a second."""
    acceptor = Acceptor(reactor, listener, lambda fd, addr: os.close(fd), name="L")
    acceptor.start()
    waiting = clients(listener, 40)
    listener.failures = 10 ** 9
    started = time.monotonic()
    run_for(reactor, BACKOFF * 5)
    elapsed = time.monotonic() - started
    # one failed accept and one shed accept per back-off (a generous bound, not a timing)
    assert 2 <= listener.attempts <= 2 * (elapsed / BACKOFF + 2)
    lines = captured_log.getvalue().splitlines()
    assert 1 <= len(lines) <= 2 * (elapsed + 1)
    for c in waiting:
        c.close()


def test_other_accept_errors_pause_too(reactor, captured_log):
    class Broken(socket.socket):
        attempts = 0

        def _accept(self):
            self.attempts += 1
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    sock = Broken(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    sock.setblocking(False)
    waiting = clients(sock, 1)
    acceptor = Acceptor(reactor, sock, lambda fd, addr: None, name="B")
    acceptor.start()
    run_for(reactor, BACKOFF * 2.5)
    assert 1 <= sock.attempts <= 4
    assert "accept() on B: Invalid argument; pausing accepts for 100 ms" in captured_log.getvalue()
    waiting[0].close()
    sock.close()


# --------------------------------------------------------------------------- end to end


def cpu_seconds(pid: int) -> float:
    with open("/proc/%d/stat" % pid, "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stats_over_http(address: str) -> bytes:
    return _exchange(address, b"GET / HTTP/1.0\r\n\r\n", 10.0)


@pytest.fixture
def backend():
    with RecordingBackend("b1") as b:
        yield b


@pytest.mark.parametrize("master", [False, True], ids=["single", "master"])
def test_a_stats_server_out_of_descriptors_sheds_its_clients_and_does_not_spin(backend, master):
    # --stats-http makes every stats client that sends nothing hold a descriptor of the
    # process serving the stats (the master, under --master) for --socket-timeout.
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", backend.address,
                           "--fastrouter-stats", "127.0.0.1:0", "--stats-http",
                           "--socket-timeout", "60"] + (["--master"] if master else []))
    pid = router.pid
    stats = router.stats_address
    assert stats_over_http(stats).startswith(b"HTTP/1.0 200 OK")
    wait_until(lambda: request(router.addresses[0], HOST).startswith(b"HTTP/1.0 200"),
               what="the router serving")
    lines_before = router.count(ACCEPT_LINE)
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    held = []
    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (fd_count(pid) + 8, hard))
        cpu_before, wall_before = cpu_seconds(pid), time.monotonic()
        for _ in range(30):                 # the first few fill the table, the rest are shed
            held.append(connect(stats))
        router.wait_for_log(r"Too many open files")
        # and every later client, one after the other, is closed rather than left hanging
        shed = 0
        for _ in range(15):
            late = connect(stats)
            shed += closed_by_peer(late)
            late.close()
        cpu = cpu_seconds(pid) - cpu_before
        wall = time.monotonic() - wall_before
        assert shed == 15
        lines = router.count(ACCEPT_LINE) - lines_before
        # at most one line (plus one summary line) a second: bounded by the clients, not
        # by the loop's passes (the old stats server wrote tens of thousands a second)
        assert lines <= 2 * (30 + 15)
        assert lines <= 2 * (wall + 1)
        assert cpu < 0.5 * wall, "%.2f s of CPU in %.2f s" % (cpu, wall)
    finally:
        for s in held:
            s.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    wait_until(lambda: stats_over_http(stats).startswith(b"HTTP/1.0 200 OK"), timeout=15,
               what="the stats server answering again")
    assert request(router.addresses[0], HOST).startswith(b"HTTP/1.0 200")
    assert router.alive()


def test_the_only_ready_listener_takes_one_connection_without_a_failing_accept(reactor, listener):
    """When the listener is the only ready descriptor of the pass, one accept() and no
    second one that fails with EAGAIN; the clients still waiting are taken in the next
    passes, as the listener stays ready."""
    got = []

    def on_accept(fd, addr):
        got.append(fd)
        if len(got) == 3:
            reactor.stop()
    acceptor = Acceptor(reactor, listener, on_accept, name="t", batch=8)
    waiting = clients(listener, 3)
    reactor.ready_count = 1
    acceptor._ready()
    assert len(got) == 1 and listener.attempts == 1
    acceptor.start()
    reactor.call_later(5.0, reactor.stop)      # a bound, not a timing
    reactor.run()
    assert len(got) == 3
    assert listener.attempts == 3              # three connections, three accept() calls
    for fd in got:
        os.close(fd)
    for c in waiting:
        c.close()
