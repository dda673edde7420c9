"""The master end to end: signals across the reload's re-exec, children that cannot
start, the decoded status of every child death."""

from __future__ import annotations

import os
import signal

import pytest

from backends import RecordingBackend, request
from support import start_router, wait_until
from test_master import HOST, Load, children, zombies


def _stat_fields(pid: int) -> list:
    with open("/proc/%d/stat" % pid, "rb") as handle:
        data = handle.read()
    return data[data.rfind(b")") + 2:].split()


def group_members(pgid: int) -> dict:
    """pid -> parent pid of every live process in process group *pgid*.

    A router under test runs in its own session, so everything it forks stays in its
    group: a member whose parent is not the master is an orphan."""
    members = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == pgid:
            continue
        try:
            fields = _stat_fields(int(entry))
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            members[int(entry)] = int(fields[1])
    return members


def _idle(router) -> int:
    """The number of reloads so far plus one, once the last one has forked its
    generation (else 0)."""
    assert router.alive(), "the master died:\n%s" % router.log()
    started = router.count(r"gracefully reloading")
    done = router.count(r"graceful reload: \d+ old process")
    return started + 1 if started == done else 0


def _task_name(pid: int) -> str:
    try:
        with open("/proc/%d/comm" % pid) as handle:
            return handle.read().strip()
    except OSError:
        return ""


@pytest.mark.slow
def test_bursts_of_sighups_never_kill_the_master():
    with RecordingBackend("b") as node:
        router = start_router(["--master", "--auto-procname", "--fastrouter", "127.0.0.1:0",
                               "--fastrouter-to", node.address, "--fastrouter-processes", "2"])
        router.wait_for_log(r"spawned uWSGI fastrouter 2")
        load = Load(router.addresses[0])
        try:
            wait_until(lambda: load.ok > 0, what="requests flowing")
            # Ten at once.
            for _ in range(10):
                os.kill(router.pid, signal.SIGHUP)
            router.wait_for_log(r"gracefully reloading", timeout=20)
            # Then pairs, the second of each sent while the first one's reload is under
            # way: as soon as the master says it is reloading, or once the new image
            # runs but has not named itself yet (the name goes back to the
            # interpreter's at the exec).  Where exactly it lands does not matter:
            # every point of the reload must be safe.  One that comes before the exec
            # is part of the reload under way, one after it is one more reload.
            for i in range(6):
                seen = wait_until(lambda: _idle(router), timeout=20, what="a reload to finish") - 1
                os.kill(router.pid, signal.SIGHUP)
                if i % 2:
                    router.wait_for_log(r"gracefully reloading", count=seen + 1, timeout=20)
                else:
                    wait_until(lambda: _task_name(router.pid) != "uWSGI master"
                               or _idle(router) > seen + 1, timeout=20, what="the re-exec")
                os.kill(router.pid, signal.SIGHUP)
            wait_until(lambda: _idle(router) and len(children(router.pid)) == 2 and not zombies(router.pid),
                       timeout=40, what="the last generation alone")
            served = load.ok
            wait_until(lambda: load.ok > served, what="requests flowing")
        finally:
            load.finish()
        assert router.alive()
        assert load.failed == 0, router.log()
        assert len(children(router.pid)) == 2
        members = group_members(router.pid)
        assert set(members.values()) == {router.pid}, "orphaned router processes: %r" % members
        assert sorted(members) == sorted(children(router.pid))
        for _ in range(10):
            assert request(router.addresses[0], HOST).startswith(b"HTTP/1.0 200")
        assert router.stop() == 0


@pytest.mark.parametrize("master", [True, False], ids=["master", "single"])
def test_a_router_process_that_cannot_start_stops_everything_with_status_1(master):
    args = ["--fastrouter", "127.0.0.1:0", "--fastrouter-to", "127.0.0.1:9",
            "--fastrouter-uid", "no-such-user-for-this-test"]
    if master:
        args = ["--master", "--fastrouter-processes", "2"] + args
    router = start_router(args)
    wait_until(lambda: not router.alive(), timeout=20, what="the router to give up")
    assert router.returncode == 1
    output = router.log()
    assert "user no-such-user-for-this-test not found." in output
    if master:
        assert router.count(r"spawned uWSGI fastrouter 1 ") == 1, output   # never respawned
        assert router.count(r"DAMN") == 0
        assert router.count(r"fastrouter \d \(pid: \d+\) could not start \(exited with status 1\)") >= 1
    assert group_members(router.pid) == {}


def test_a_router_process_killed_after_serving_is_respawned_with_its_status_logged():
    with RecordingBackend("k") as node:
        router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address])
        router.wait_for_log(r"spawned uWSGI fastrouter 1")
        assert b"node=k" in request(router.addresses[0], HOST)
        (victim,) = children(router.pid)
        os.kill(victim, signal.SIGKILL)
        router.wait_for_log(r"DAMN ! fastrouter 1 \(pid: %d\) died, killed by signal SIGKILL" % victim)
        router.wait_for_log(r"spawned uWSGI fastrouter 1", count=2)
        wait_until(lambda: len(children(router.pid)) == 1 and victim not in children(router.pid),
                   what="the respawned router process")
        assert b"node=k" in request(router.addresses[0], HOST)
        (second,) = children(router.pid)
        os.kill(second, signal.SIGKILL)       # died again, and young: respawned after the back-off
        router.wait_for_log(r"spawned uWSGI fastrouter 1", count=3)
        assert router.alive()
        assert b"node=k" in request(router.addresses[0], HOST)
