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

import pytest

from backends import RecordingBackend, request
from support import fetch_stats, start_router, wait_until
from test_master_decisions import die, exited, kept_ends, make_master  # noqa: F401 (fixtures)
from test_subscriptions import announce
from uwsgi_fastrouter.master import _OUTBOX_LIMIT, REPORT, SUBSCRIPTION, FrameReader, encode_frame

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
        master.broadcast(SUBSCRIPTION, b"x" * 60000)
        sent += 1
        frames += reader.feed(_read_available(reading_end))
        master._flush(reading)                  # its channel is writable again
    while reading.outbox:
        frames += reader.feed(_read_available(reading_end))
        master._flush(reading)
    frames += reader.feed(_read_available(reading_end))
    return sent, sum(1 for kind, _payload in frames if kind == SUBSCRIPTION)


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
