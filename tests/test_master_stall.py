"""A master that never stalls: a router process that stops reading its channel delays
no subscription update, stats round or harakiri for the others, and one that leaves
a full outbox unread is replaced (master.py, "Subscriptions").

The in-process tests drive the master with the fake process calls and loop double of
test_master_decisions; the others run real processes and stop one with SIGSTOP.
Which process serves a request cannot be chosen, so a check that concerns one router
process stops the others first: only it can take the connection then."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import types

from backends import RecordingBackend, request
from support import fetch_stats, start_router, uwsgi_packet, wait_until
from test_master_decisions import die, exited, kept_ends, make_master  # noqa: F401 (fixtures)
from uwsgi_fastrouter.master import (_OUTBOX_LIMIT, FAILED, REPORT, FrameReader, RouterLink,
                                     encode_frame)

SPAWNED = r"spawned uWSGI fastrouter (\d+) \(pid: (\d+)\)"


# ------------------------------------------------------------------ in-process

def _read_available(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


class _Report:
    def __init__(self) -> None:
        self.parts: list = []

    def add(self, data: bytes) -> None:
        self.parts.append(data)


def _flood_until_replaced(master, lagging, reading, reading_end) -> tuple:
    """Broadcast 60 KB frames until *lagging* is replaced (twice the outbox's worth at
    most), *reading_end* read as it comes; returns how many frames were broadcast and
    how many the reading process got."""
    reader = FrameReader()
    sent = 0
    frames = []
    while master.routers[0] is lagging and sent < 2 * _OUTBOX_LIMIT // 60000:
        master.broadcast(FAILED, b"x" * 60000)
        sent += 1
        frames += reader.feed(_read_available(reading_end))
        master._flush(reading)                  # its channel is writable again
    while reading.outbox:
        frames += reader.feed(_read_available(reading_end))
        master._flush(reading)
    frames += reader.feed(_read_available(reading_end))
    return sent, sum(1 for kind, _payload in frames if kind == FAILED)


def test_a_process_that_leaves_its_channel_unread_is_replaced(make_master, kept_ends, capsys):
    master = make_master(routers=2)
    lagging, reading = master.routers
    old_pid = lagging.pid
    lagging.started = reading.started = time.monotonic() - 60
    kept_ends[1].setblocking(False)
    rounds = []
    master.collect_reports(_Report, rounds.append)       # under way while the flood comes
    forks = master.ops.forks()

    sent, got = _flood_until_replaced(master, lagging, reading, kept_ends[1])

    assert master.routers[0] is not lagging and got == sent > _OUTBOX_LIMIT // 60000
    # the lagging process: channel closed, outbox freed, asked to finish, still supervised
    assert lagging.channel is None and lagging.outbox == bytearray() and lagging.draining
    assert (old_pid, signal.SIGTERM) in master.ops.kills()
    assert master.children[old_pid] is lagging
    err = capsys.readouterr().err
    assert len(re.findall(r"fastrouter 1 \(pid: %d\) left \d+ bytes of its channel unread: "
                          r"replacing it" % old_pid, err)) == 1
    # the other process missed nothing, and the stats round no longer waits for the lagging one
    assert master.ops.forks() == forks
    (rnd,) = master._rounds.values()
    assert list(rnd.waiting) == [reading.pid]
    kept_ends[1].sendall(encode_frame(REPORT, b"%s\x01" % rnd.ident.to_bytes(4, "big")))
    master.reactor.readers[reading.channel.fileno()]()
    assert len(rounds) == 1 and len(rounds[0]) == 1
    # the replacement: at once (the lagging one was not young), in the same slot
    assert master.reactor.delays("_respawn") == [0]
    master.reactor.fire()
    replacement = master.routers[0]
    assert replacement is not lagging and replacement.index == 1
    assert master.ops.forks() == forks + 1 and replacement.pid not in (0, old_pid)
    assert replacement.channel is not None
    # the old one ends whenever it runs again: logged, not respawned
    die(master, old_pid, exited(0))
    assert master.ops.forks() == forks + 1 and old_pid not in master.children
    assert "fastrouter 1 (pid: %d) exited with status 0" % old_pid in capsys.readouterr().err
    # what reached the old process before the cut is followed by its channel's end
    kept_ends[0].setblocking(False)
    wait_until(lambda: kept_ends[0].recv(1 << 20) == b"", what="the old channel's end")


def test_a_young_lagging_process_is_replaced_after_the_back_off(make_master, kept_ends):
    """A flood no process could keep up with must not make the master fork in a loop."""
    master = make_master(routers=2)
    lagging, reading = master.routers
    kept_ends[1].setblocking(False)
    _flood_until_replaced(master, lagging, reading, kept_ends[1])
    assert master.reactor.delays("_respawn") == [1.0]


class _LinkLoop:
    """What a RouterLink asks of its loop, recorded (timers never run)."""

    def __init__(self) -> None:
        self.later: list = []

    def add_reader(self, fd, callback) -> None:
        pass

    def unregister(self, fd) -> None:
        pass

    def call_later(self, delay, callback, *args):
        self.later.append((delay, callback, args))


def test_a_process_the_master_lets_go_stops_beating():
    """At its channel's end a router process stops stamping its harakiri slot (the
    hook _run_router gives the heartbeat's cancel): the slot is its replacement's."""
    master_end, child_end = socket.socketpair()
    loop = _LinkLoop()
    link = RouterLink(loop, child_end, types.SimpleNamespace())
    gone = []
    link.on_master_gone = lambda: gone.append(True)
    master_end.close()
    link._readable()
    assert gone == [True] and link.on_master_gone is None
    assert [(delay, callback) for delay, callback, _args in loop.later] == [(10.0, os.kill)]
    child_end.close()


# ------------------------------------------------------------- real processes

UPDATES = 1500


def key(i: int) -> bytes:
    return b"k%04d.example" % i


LAST = key(UPDATES - 1)
SAMPLE = [key(i) for i in range(0, UPDATES, 50)] + [LAST]


def router_pids(router, count: int) -> dict:
    """Router process index -> pid, from the master's latest "spawned" lines."""
    router.wait_for_log(SPAWNED, count=count)
    return {int(index): int(pid) for index, pid in re.findall(SPAWNED, router.log())}


def _state(pid: int) -> str:
    with open("/proc/%d/stat" % pid) as handle:
        return handle.read().rsplit(")", 1)[1].split()[0]


def stop(*pids: int) -> None:
    """SIGSTOP *pids* and wait until each is stopped (the signal is asynchronous)."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    for pid in pids:
        wait_until(lambda: _state(pid) == "T", what="process %d stopped" % pid)


def resume(*pids: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def announce_all(sub: str, address: bytes, indexes=range(UPDATES), pad: bytes = b"",
                 until=None) -> int:
    """One subscription datagram per key of *indexes*, *pad* in an extra var, until
    ``until()`` is true (asked every 8 datagrams); returns how many were sent.  A UNIX
    datagram socket: a full queue makes the sender wait (nothing is lost), a bounded
    while."""
    sent = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.settimeout(20)
        for i in indexes:
            if until is not None and sent % 8 == 0 and until():
                break
            pairs = [(b"key", key(i)), (b"address", address), (b"modifier1", b"0"),
                     (b"modifier2", b"0")] + ([(b"pad", pad)] if pad else [])
            try:
                sock.sendto(uwsgi_packet(pairs, 224, 0), sub)
            except socket.timeout:
                raise AssertionError("the master stopped reading its subscription socket "
                                     "(datagram %d)" % i) from None
            sent += 1
    return sent


def served(router, host: bytes) -> bool:
    return b"node=" in request(router.addresses[0], [(b"HTTP_HOST", host)], timeout=5)


def only_process_serves(router, pid: int, running: list, timeout: float) -> None:
    """With the other processes of *running* stopped (so *pid* takes every
    connection), wait until it routes the last key, then check a sample of the keys.
    Frames arrive in order, so having the last update means having every one."""
    others = [p for p in running if p != pid]
    stop(*others)
    try:
        wait_until(lambda: served(router, LAST), timeout=timeout,
                   what="process %d to route the last key" % pid)
        missing = [host for host in SAMPLE if not served(router, host)]
        assert missing == []
    finally:
        resume(*others)


def test_a_stopped_process_delays_no_update_and_no_stats_answer(tmp_path):
    sub = str(tmp_path / "sub.sock")
    with RecordingBackend("s") as node:
        router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-processes", "3",
                               "--fastrouter-subscription-server", sub,
                               "--fastrouter-stats", "127.0.0.1:0"])
        pids = router_pids(router, 3)
        stopped, running = pids[1], [pids[2], pids[3]]
        try:
            stop(stopped)
            announce_all(sub, node.address.encode())
            router.wait_for_log(r"%s => new node" % LAST.decode(), timeout=30)
            # the master accepted (and sent) the last update: the others have them all within 1 s
            deadline = time.monotonic() + 1.0
            for pid in running:
                only_process_serves(router, pid, running, timeout=max(deadline - time.monotonic(), 0.01))
            # stats: the round leaves the stopped process out and answers
            doc = fetch_stats(router.stats_address)
            assert len(doc["subscriptions"]) == UPDATES
            left_out = r"stats: fastrouter (\d) \(pid: (\d+)\) did not send its counters in time"
            assert re.findall(left_out, router.log()) == [("1", str(stopped))]
            # resumed, the stopped process reads what waited for it and is consistent again
            resume(stopped)
            only_process_serves(router, stopped, list(pids.values()), timeout=20)
            fetch_stats(router.stats_address)
            assert re.findall(left_out, router.log()) == [("1", str(stopped))]
            assert "unread: replacing it" not in router.log()
        finally:
            resume(*pids.values())
        assert router.stop() == 0


STALL_SCRIPT = """\
import signal
import time

# A router process that gets SIGUSR2 is stuck in a long call from then on, as one
# running a blocking mapper would be (the handler is inherited across the fork).
signal.signal(signal.SIGUSR2, lambda signum, frame: time.sleep(60))
"""


def test_harakiri_fires_on_time_while_a_process_is_stopped(tmp_path):
    sub = str(tmp_path / "sub.sock")
    script = tmp_path / "stall.py"
    script.write_text(STALL_SCRIPT)
    harakiri = 2
    with RecordingBackend("h") as node:
        router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-processes", "3",
                               "--fastrouter-subscription-server", sub,
                               "--fastrouter-harakiri", harakiri, "--file", script])
        pids = router_pids(router, 3)
        try:
            stop(pids[1])
            announce_all(sub, node.address.encode())
            router.wait_for_log(r"%s => new node" % LAST.decode(), timeout=30)
            os.kill(pids[2], signal.SIGUSR2)
            # the limit, a beat period and the master's one-second check
            router.wait_for_log(r"\*\*\* HARAKIRI ON GATEWAY uWSGI fastrouter 2 \(pid: %d\) \*\*\*"
                                % pids[2], timeout=harakiri + 1 + 1 + 1)
            # a stopped process does not beat either: it is killed the same way
            router.wait_for_log(r"HARAKIRI ON GATEWAY uWSGI fastrouter 1 \(pid: %d\)" % pids[1])
            router.wait_for_log(SPAWNED, count=5)
            respawned = router_pids(router, 5)
            assert respawned[3] == pids[3] and {respawned[1], respawned[2]}.isdisjoint(pids.values())
            # the respawned processes start from the master's table
            only_process_serves(router, respawned[2], list(respawned.values()), timeout=10)
        finally:
            resume(*pids.values())
        assert router.stop() == 0


def test_a_process_stopped_past_its_outbox_is_replaced_and_ends_when_resumed(tmp_path):
    """The master stops holding frames for it (one line), a new process with the
    master's table takes its slot, and the old one, resumed, finishes and exits
    without being respawned."""
    sub = str(tmp_path / "sub.sock")
    pad = b"p" * 60000              # big datagrams fill the outbox in a few hundred
    replaced = r"fastrouter 1 \(pid: %d\) left \d+ bytes of its channel unread: replacing it"
    with RecordingBackend("r") as node:
        router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-processes", "2",
                               "--fastrouter-subscription-server", sub,
                               "--fastrouter-stats", "127.0.0.1:0"])
        pids = router_pids(router, 2)
        lagging = pids[1]
        try:
            stop(lagging)
            address = node.address.encode()
            count = announce_all(sub, address, range(2 * _OUTBOX_LIMIT // len(pad)), pad=pad,
                                 until=lambda: router.count(replaced % lagging))
            router.wait_for_log(replaced % lagging)
            # and one update more, once the replacement is there
            replacement = router_pids(router, 3)[1]
            assert replacement != lagging
            count += announce_all(sub, address, [count])
            last = key(count - 1)
            router.wait_for_log(r"%s => new node" % last.decode(), timeout=60)
            # both running processes have every update (the lagging one is stopped).
            # On a loaded machine the flood can leave process 2 behind by more than
            # the limit too: it is then replaced as well (the same rule), and its
            # replacement is the one to check.
            running = [replacement, router_pids(router, 3)[2]]
            for pid in running:
                stop(*[p for p in running if p != pid])
                try:
                    wait_until(lambda: served(router, last), timeout=10,
                               what="process %d to route the last key" % pid)
                    assert all(served(router, key(i)) for i in range(0, count, 25))
                finally:
                    resume(*running)
            # the stats no longer ask the replaced process
            doc = fetch_stats(router.stats_address)
            assert len(doc["subscriptions"]) == count
            assert "did not send its counters" not in router.log()
            # resumed, the old process finishes (it has nothing to finish) and is not respawned
            resume(lagging)
            router.wait_for_log(r"fastrouter 1 \(pid: %d\) exited with status 0" % lagging)
            others = router.count(r"fastrouter 2 \(pid: \d+\) left \d+ bytes of its channel "
                                  r"unread: replacing it")
            assert "died" not in router.log() and router.count(SPAWNED) == 3 + others
            assert router.count(replaced % lagging) == 1
            assert router.count(r"unread: replacing it") == 1 + others
        finally:
            resume(*pids.values())
        assert router.stop() == 0
