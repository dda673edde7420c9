"""The master's decisions in-process: respawn, giving up on a child that cannot start,
the signal mask around a fork and a reload's re-exec.  A fake ProcessOps stands in for
fork/waitpid/kill/execv, so no process is made; a small loop double records timers."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

import pytest

from uwsgi_fastrouter import master as master_mod
from uwsgi_fastrouter.master import READY, REPORT, Child, Master, encode_frame
from uwsgi_fastrouter.options import load_config
from uwsgi_fastrouter.proccontrol import ProcessOps, describe_status, exit_status

HELD = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT}


def exited(code: int) -> int:
    """A waitpid() status for a process that exited with *code*."""
    return code << 8


def killed(signum: int, core: bool = False) -> int:
    return signum | (0x80 if core else 0)


class Exec(Exception):
    """Raised by the fake execv: a real one never returns."""


class FakeOps(ProcessOps):
    def __init__(self) -> None:
        self.calls: list = []
        self.next_pid = 1000
        self.deaths: list = []      # (pid, status) for the next waitpid() calls

    def fork(self) -> int:
        self.next_pid += 1
        self.calls.append(("fork", self.next_pid))
        return self.next_pid

    def waitpid(self, pid: int, options: int):
        assert (pid, options) == (-1, os.WNOHANG)
        return self.deaths.pop(0) if self.deaths else (0, 0)

    def kill(self, pid: int, signum: int) -> None:
        self.calls.append(("kill", pid, signum))

    def execv(self, path: str, argv: list) -> None:
        self.calls.append(("execv", path, list(argv)))
        raise Exec()

    def sigmask(self, how: int, signals) -> None:
        self.calls.append(("sigmask", how, frozenset(signals)))

    def kills(self) -> list:
        return [call[1:] for call in self.calls if call[0] == "kill"]

    def forks(self) -> int:
        return sum(1 for call in self.calls if call[0] == "fork")


class _Timer:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class LoopDouble:
    """What the master asks of its reactor, recorded; timers fire when the test says."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list = []
        self.readers: dict = {}
        self.stopped = False
        self.abandoned = False

    def call_later(self, delay, callback, *args):
        self.timers.append((delay, callback, args))
        return _Timer()

    def add_reader(self, fd, callback) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd) -> bool:
        return self.readers.pop(fd, None) is not None

    def add_writer(self, fd, callback) -> None:
        pass

    def remove_writer(self, fd) -> bool:
        return False

    def unregister(self, fd) -> None:
        self.readers.pop(fd, None)

    def stop(self) -> None:
        self.stopped = True

    def abandon(self) -> None:
        self.abandoned = True

    def delays(self, callback_name: str) -> list:
        return [delay for delay, callback, _ in self.timers if callback.__name__ == callback_name]

    def fire(self) -> None:
        due, self.timers = self.timers, []
        for _delay, callback, args in due:
            callback(*args)


class SocketsDouble:
    def before_reload(self, graceful: bool) -> None:
        pass

    def inheritable_state(self) -> dict:
        return {"listeners": []}


@pytest.fixture
def kept_ends(monkeypatch):
    """The child ends of the channels the master makes (dups: the master closes its copy)."""
    kept = []
    real = socket.socketpair

    def keeping(*args):
        parent, child = real(*args)
        kept.append(child.dup())
        return parent, child

    monkeypatch.setattr(master_mod.socket, "socketpair", keeping)
    yield kept
    for sock in kept:
        sock.close()


@pytest.fixture
def make_master(monkeypatch, kept_ends):
    made = []

    def make(routers: int = 2, workers: int = 0) -> Master:
        cfg = load_config(["--master", "--fastrouter", "127.0.0.1:0"], {})
        master = Master(cfg, ["--master"], bind=None, wire=None, ops=FakeOps())
        master.reactor = LoopDouble()
        master.sockets = SocketsDouble()
        master.notifier = None
        for index in range(1, routers + 1):
            master.routers.append(Child("router", index))
            master._spawn(master.routers[-1])
        for index in range(1, workers + 1):
            master.workers.append(Child("worker", index))
            master._spawn(master.workers[-1])
        made.append(master)
        return master

    yield make
    for master in made:
        for child in master.children.values():
            if child.channel is not None:
                child.channel.close()


def die(master: Master, pid: int, status: int) -> None:
    master.ops.deaths.append((pid, status))
    master._on_child(signal.SIGCHLD)


# ------------------------------------------------------------------ statuses

def test_statuses_in_words():
    assert describe_status(exited(0)) == "exited with status 0"
    assert describe_status(exited(1)) == "exited with status 1"
    assert describe_status(killed(signal.SIGKILL)) == "killed by signal SIGKILL"
    assert describe_status(killed(signal.SIGSEGV, core=True)) == "killed by signal SIGSEGV (core dumped)"
    assert exit_status(exited(3)) == 3 and exit_status(killed(signal.SIGTERM)) is None


# --------------------------------------------------------------------- forks

def test_signals_are_held_across_every_fork(make_master):
    master = make_master(routers=1)
    calls = master.ops.calls
    fork = calls.index(("fork", 1001))
    assert calls[fork - 1][:2] == ("sigmask", signal.SIG_BLOCK) and HELD <= calls[fork - 1][2]
    assert calls[fork + 1][:2] == ("sigmask", signal.SIG_UNBLOCK) and HELD <= calls[fork + 1][2]
    assert master.routers[0].ready is False


# --------------------------------------------------------------- start-up

def test_a_router_that_exits_1_before_ready_stops_the_master(make_master, capsys):
    master = make_master(routers=2)
    first, second = master.routers
    die(master, first.pid, exited(1))
    assert master.stopping and master.exit_code == 1
    assert master.ops.kills() == [(second.pid, signal.SIGINT)]      # the other one is stopped,
    assert master.reactor.delays("_respawn") == [] and master.ops.forks() == 2   # none respawned
    assert not master.reactor.stopped
    die(master, second.pid, exited(0))
    assert master.reactor.stopped
    err = capsys.readouterr().err
    assert "fastrouter 1 (pid: %d) could not start (exited with status 1)" % first.pid in err
    assert "fastrouter 2 (pid: %d) exited with status 0" % second.pid in err
    assert "DAMN" not in err


def test_a_router_that_said_ready_is_respawned_whatever_its_status(make_master, kept_ends, capsys):
    master = make_master(routers=1)
    (child,) = master.routers
    pid = child.pid
    # READY and the status arrive together: the channel is read before the verdict.
    kept_ends[0].sendall(encode_frame(READY, b""))
    kept_ends[0].close()
    die(master, pid, exited(1))
    assert not master.stopping and master.exit_code == 0
    assert master.reactor.delays("_respawn") == [1.0]          # died young: the back-off
    assert "DAMN ! fastrouter 1 (pid: %d) died, exited with status 1 :( trying respawn" % pid \
        in capsys.readouterr().err
    master.reactor.fire()
    assert master.ops.forks() == 2 and child.pid != pid and child.ready is False


def test_a_router_that_dies_of_a_signal_before_ready_is_respawned(make_master, capsys):
    master = make_master(routers=1)
    (child,) = master.routers
    die(master, child.pid, killed(signal.SIGSEGV))
    assert not master.stopping
    assert master.reactor.delays("_respawn") == [1.0]
    assert "died, killed by signal SIGSEGV" in capsys.readouterr().err


def test_a_router_that_exits_with_another_status_before_ready_is_respawned(make_master):
    master = make_master(routers=1)
    (child,) = master.routers
    die(master, child.pid, exited(master_mod._EXIT_CRASH))
    assert not master.stopping and master.reactor.delays("_respawn") == [1.0]


def test_an_old_router_is_respawned_at_once(make_master, kept_ends):
    master = make_master(routers=1)
    (child,) = master.routers
    kept_ends[0].sendall(encode_frame(REPORT, b"\0\0\0\1\1") + encode_frame(READY, b""))
    master.reactor.readers[child.channel.fileno()]()       # the loop reads the channel
    assert child.ready
    child.started = time.monotonic() - 60
    die(master, child.pid, killed(signal.SIGKILL))
    assert master.reactor.delays("_respawn") == [0]


def test_workers_are_never_judged_at_start_up(make_master):
    master = make_master(routers=0, workers=1)
    (worker,) = master.workers
    die(master, worker.pid, exited(1))
    assert not master.stopping and master.reactor.delays("_respawn") == [1.0]


def test_children_dying_during_a_shutdown_are_not_respawned(make_master, capsys):
    master = make_master(routers=2)
    master._on_stop(signal.SIGINT)
    for child in master.routers:
        die(master, child.pid, killed(signal.SIGINT))
    assert master.reactor.stopped and master.exit_code == 0
    assert master.reactor.delays("_respawn") == []
    assert capsys.readouterr().err.count("killed by signal SIGINT") == 2


def test_old_generation_deaths_are_logged_and_not_respawned(make_master, capsys):
    master = make_master(routers=1)
    master.old_pids = [77, 78]
    die(master, 77, exited(0))
    die(master, 78, killed(signal.SIGKILL))
    assert master.old_pids == [] and master.reactor.delays("_respawn") == []
    err = capsys.readouterr().err
    assert "old process (pid: 77) exited with status 0" in err
    assert "old process (pid: 78) killed by signal SIGKILL" in err
    assert "the old processes are gone" in err


# ------------------------------------------------------------------ reload

def test_a_reload_blocks_the_signals_right_before_the_exec(make_master, monkeypatch):
    monkeypatch.setattr(os, "environ", {})      # what the reload hands over stays here
    master = make_master(routers=2)
    pids = [child.pid for child in master.routers]
    with pytest.raises(Exec):
        master._reload(graceful=True)
    calls = master.ops.calls
    assert calls[-1][:2] == ("execv", sys.executable)
    assert calls[-1][2][1:3] == ["-m", "uwsgi_fastrouter"]
    assert calls[-2][:2] == ("sigmask", signal.SIG_BLOCK) and HELD <= calls[-2][2]
    assert master.ops.kills() == []        # graceful: the old children keep serving
    assert sorted(json.loads(os.environ[master_mod.ENV_INHERIT])["children"]) == sorted(pids)


def test_a_brutal_reload_kills_the_children_then_execs(make_master, monkeypatch):
    monkeypatch.setattr(os, "environ", {})      # what the reload hands over stays here
    master = make_master(routers=2)
    pids = [child.pid for child in master.routers]
    with pytest.raises(Exec):
        master._reload(graceful=False)
    assert master.ops.kills() == [(pid, signal.SIGKILL) for pid in pids]
    assert master.ops.calls[-2][:2] == ("sigmask", signal.SIG_BLOCK)
