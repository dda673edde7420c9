"""Subscriptions under a master are copied to the router processes in batches: one
ANNOUNCEMENTS frame per process per pass of the master's loop, parsed once by the
master, applied by a router without parsing (master.py, "Subscriptions"; frames.py).

In-process: the master with the fake process calls and loop double of
test_master_decisions, the channels' child ends read directly; the router side with a
RouterLink on a socketpair.  End to end (a real master and router processes):
test_master.py and test_subscriptions.py."""

from __future__ import annotations

import socket

from test_master_decisions import kept_ends, make_master  # noqa: F401 (fixtures)
from test_master_stall import _read_available
from test_subserver import packet, server
from uwsgi_fastrouter.frames import (ANNOUNCEMENTS, FAILED, FrameReader, decode_announcements,
                                     encode_announcements, encode_frame)
from uwsgi_fastrouter.master import RouterLink
from uwsgi_fastrouter.reactor import Reactor
from uwsgi_fastrouter.subscription import SubscriptionTable, parse_announcement


def _with_call_soon(master) -> list:
    """The loop double runs nothing by itself: collect what the master defers to the end
    of the pass."""
    soon: list = []
    master.reactor.call_soon = lambda callback, *args: soon.append((callback, args))
    return soon


def _frames(sock: socket.socket) -> list:
    sock.setblocking(False)
    return FrameReader().feed(_read_available(sock))


def test_one_frame_per_process_per_pass_in_the_masters_order(make_master, kept_ends):
    master = make_master(routers=2)
    soon = _with_call_soon(master)
    announcements = [parse_announcement(packet(b"k%d" % i, b"a:%d" % i)) for i in range(100)]
    for i, a in enumerate(announcements):
        master.queue_announcement(a, i, None, 7)
    # nothing is written while the pass goes on, and the flush is deferred only once
    assert len(soon) == 1
    assert all(_frames(end) == [] for end in kept_ends)
    callback, args = soon.pop()
    callback(*args)
    expected = [(i, None, 7, tuple(a)) for i, a in enumerate(announcements)]
    for end in kept_ends:
        (kind, payload), = _frames(end)
        assert kind == ANNOUNCEMENTS
        assert decode_announcements(payload) == expected


def test_another_frame_sends_the_pending_batch_first(make_master, kept_ends):
    master = make_master(routers=2)
    soon = _with_call_soon(master)
    master.queue_announcement(parse_announcement(packet(b"k", b"a:1")), None, None, None)
    master.broadcast(FAILED, b"k\0a:1")
    for end in kept_ends:
        assert [kind for kind, _ in _frames(end)] == [ANNOUNCEMENTS, FAILED]
    callback, args = soon.pop()
    callback(*args)                       # the end of the pass: nothing left to send
    assert all(_frames(end) == [] for end in kept_ends)


def test_announcements_payload_round_trip_and_garbage():
    batch = [(1, 2, 3, tuple(parse_announcement(packet(b"k", b"a:1"))))]
    assert decode_announcements(encode_announcements(batch)) == batch
    for junk in (b"", b"\xff\x00junk", encode_announcements({"not": "a list"})):
        assert decode_announcements(junk) is None


class _Parts:
    def __init__(self) -> None:
        self.batches: list = []
        self.report_failure = None

    def apply_announcements(self, batch: list) -> None:
        self.batches.append(batch)


def test_a_router_process_applies_a_batch_without_parsing():
    reactor = Reactor()
    master_end, router_end = socket.socketpair()
    parts = _Parts()
    link = RouterLink(reactor, router_end, parts)
    try:
        batch = [(None, None, None, tuple(parse_announcement(packet(b"k%d" % i)))) for i in range(3)]
        master_end.sendall(encode_frame(ANNOUNCEMENTS, encode_announcements(batch)))
        link._readable()
        assert parts.batches == [batch]
        # the table side: every well-formed item applied quietly, a malformed one skipped
        table = SubscriptionTable()
        srv = server(table)
        srv.apply_mirrored(batch + [("short",), (None, None, None, ("x",)), 5])
        assert len(table) == 3 and all(table.pool(b"k%d" % i) for i in range(3))
    finally:
        link.stop()
        master_end.close()
        reactor.close()
