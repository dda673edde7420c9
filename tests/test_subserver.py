"""The subscription server in-process: which announces get their notify line, the order of the
checks, and packets mirrored from the master.  (End to end: test_subscriptions.py.)"""

from __future__ import annotations

import io
import os
import socket
from typing import Optional

import pytest

from support import sock_path
from uwsgi_fastrouter import log
from uwsgi_fastrouter.subscription import (Announcement, SubscriptionTable, build_announcement,
                                           parse_announcement)
from uwsgi_fastrouter.subserver import SubscriptionServer

T0 = 1_700_000_000


class Clock:
    """The reactor as far as the server uses it (its log's clock)."""

    now = 0.0


class Verifier:
    """Accepts the signature b"good"."""

    def check(self, a: Announcement) -> bool:
        return a.sign == b"good"


def server(table: SubscriptionTable, **kw) -> SubscriptionServer:
    return SubscriptionServer(Clock, table, [], wall_clock=lambda: float(T0), **kw)


def packet(key: bytes = b"k", address: bytes = b"a:1", notify: Optional[str] = None,
           signed: bool = False) -> bytes:
    return build_announcement(key, address, notify=None if notify is None else notify.encode(),
                              unix=T0 if signed else None,
                              signer=(lambda data: b"good") if signed else None)


@pytest.fixture
def notify(sock_dir):
    path = sock_path(sock_dir, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    yield path, sock
    sock.close()


def received(sock: socket.socket) -> list:
    got = []
    while True:
        try:
            got.append(sock.recv(4096))
        except BlockingIOError:
            return got


def test_no_check_configured_no_notify(notify):
    path, sock = notify
    srv = server(SubscriptionTable())
    assert srv.handle(packet(notify=path)) is not None        # subscribed all the same
    assert received(sock) == [] and srv.notify_ignored == 1


def test_a_verified_signature_gets_its_notify_and_only_for_a_new_node(notify):
    path, sock = notify
    srv = server(SubscriptionTable(verifier=Verifier()))
    assert srv.handle(packet(notify=path, signed=True)) is not None
    assert received(sock) == [b"[subscription ack] k => new node: a:1"]
    srv.wall_clock = lambda: float(T0 + 1)
    srv.handle(build_announcement(b"k", b"a:1", notify=path.encode(), unix=T0 + 1,
                                  signer=lambda data: b"good"))   # a refresh
    assert received(sock) == [] and srv.notify_ignored == 0


def test_a_sender_skipping_the_signature_gets_no_notify(notify):
    path, sock = notify
    srv = server(SubscriptionTable(verifier=Verifier()), skip_uids=[1000])
    assert srv.handle(packet(notify=path), uid=1000, gid=1000, pid=1) is not None
    assert received(sock) == [] and srv.notify_ignored == 1


def test_a_credentials_checked_sender_gets_its_notify(notify, tmp_path):
    path, sock = notify
    (tmp_path / "k").write_bytes(b"")
    srv = server(SubscriptionTable(), use_credentials=True, credentials_check=["%s/" % tmp_path])
    owner = os.stat(tmp_path / "k")
    assert srv.handle(packet(notify=path), uid=owner.st_uid + 1, gid=owner.st_gid, pid=1,
                      require_credentials=True) is None                 # not the owner
    assert srv.handle(packet(notify=path), uid=owner.st_uid, gid=owner.st_gid, pid=1,
                      require_credentials=True) is not None
    assert received(sock) == [b"[subscription ack] k => new node: a:1"]


def test_an_unusable_notify_path_is_harmless(tmp_path):
    srv = server(SubscriptionTable(verifier=Verifier()))
    for i, path in enumerate([str(tmp_path / "missing.sock"), "x" * 200, "\0" * 3]):
        assert srv.handle(packet(address=b"a:%d" % i, notify=path, signed=True)) is not None


def test_a_full_table_refuses_after_the_signature_check_with_a_log_of_its_own():
    table = SubscriptionTable(verifier=Verifier(), max_keys=1)
    srv = server(table)
    assert srv.handle(packet(b"k1", signed=True)) is not None
    assert srv.handle(packet(b"flood")) is None                         # unsigned
    assert table.refused_keys == 0
    assert srv.handle(packet(b"k2", signed=True)) is None               # signed, no room
    assert table.refused_keys == 1 and len(table) == 1
    assert srv.dropped == 2


def test_packets_the_master_accepted_are_mirrored_beyond_the_local_key_limit():
    # This process's expiry may run a moment after the master's: a key the master made
    # room for must not be refused here, or this process would never route it.
    table = SubscriptionTable(max_keys=2)
    srv = server(table)
    def mirror(key: bytes) -> None:              # as the master sends them (frames.py)
        srv.apply_mirrored([(None, None, None, tuple(parse_announcement(packet(key))))])

    for key in (b"k1", b"k2", b"k3", b"k4"):
        mirror(key)
    assert len(table) == 4
    mirror(b"k5")                                                       # twice the limit at most
    assert len(table) == 4 and table.refused_keys == 1


def test_refusals_for_room_are_logged_once_a_second_with_a_count():
    lines = io.StringIO()
    log.set_stream(lines)
    try:
        table = SubscriptionTable(max_keys=1)
        srv = server(table)
        srv.handle(packet(b"k"))
        Clock.now = 100.0
        for i in range(5):
            assert srv.handle(packet(b"flood\n%d" % i), ("127.0.0.1", 4000)) is None
        Clock.now = 101.0
        srv.handle(packet(b"flood5"))
    finally:
        log.set_stream(None)
        Clock.now = 0.0
    full = [line for line in lines.getvalue().splitlines() if "table full" in line]
    pid = os.getpid()
    assert full == [
        "[uwsgi-subscription for pid %d] subscription table full: too many keys (1): flood\\x0a0 "
        "refused from 127.0.0.1:4000" % pid,
        "[uwsgi-subscription for pid %d] subscription table full: too many keys (1): flood5 "
        "refused (and 4 more since the last such line)" % pid]
    assert table.refused_keys == 6 and srv.dropped == 6


def test_a_sender_outside_the_allow_list_is_refused_counted_and_logged_escaped():
    from uwsgi_fastrouter.allowlist import SourceAllowList
    from uwsgi_fastrouter.metrics import subscription_counters
    lines = io.StringIO()
    log.set_stream(lines)
    try:
        table = SubscriptionTable()
        srv = server(table, allow=SourceAllowList(["10.0.0.0/8", "/run/subs/"]))
        assert srv.handle(packet(b"bad"), ("192.0.2.1", 4000)) is None
        assert srv.handle(packet(b"bad"), "/tmp/evil\x1b[2J.sock") is None
        assert srv.handle(packet(b"bad"), None) is None
        assert srv.handle(b"garbage, not even parsed", ("192.0.2.1", 4000)) is None
        assert srv.handle(packet(b"good"), ("10.1.2.3", 4000)) is not None
        assert srv.handle(packet(b"good", b"b:1"), "/run/subs/b.sock") is not None
    finally:
        log.set_stream(None)
    assert table.pool(b"bad") is None and len(table.pool(b"good").nodes) == 2
    assert srv.refused_sources == 4 and srv.dropped == 4
    counters = subscription_counters(srv, table)
    assert counters["source"] == 4 and counters["other"] == 0
    text = lines.getvalue()
    assert "dropped subscription datagram from 192.0.2.1:4000: the sender is not in " \
           "--subscription-allow" in text
    assert "from /tmp/evil\\x1b[2J.sock: the sender" in text and "\x1b" not in text
    assert "the sender (an unbound unix socket) is not in --subscription-allow" in text
    assert "garbage" not in text


def test_without_an_allow_list_every_sender_is_looked_at():
    srv = server(SubscriptionTable())
    assert srv.handle(packet(), ("192.0.2.1", 4000)) is not None
    assert srv.handle(packet(b"k2"), None) is not None and srv.refused_sources == 0


def test_a_flood_of_bad_tails_is_refused_and_announces_after_it_still_apply():
    """Announces with the usual head and ever new faulty tails (numbers that are not
    decimals) are each refused with the strict parser's reason; the memo of tails stays
    bounded and good announces around the flood are applied."""
    from uwsgi_fastrouter import subscription
    lines = io.StringIO()
    log.set_stream(lines)
    try:
        table = SubscriptionTable()
        srv = server(table)
        assert srv.handle(packet(b"before"), None) is not None
        flood = subscription._TAILS_MAX + 20
        for i in range(flood):
            bad = build_announcement(b"k%d" % i, b"a:1", cores=i).replace(
                b"\x06\x00weight\x01\x000", b"\x06\x00weight\x01\x00x")
            assert srv.handle(bad, None) is None
            assert len(subscription._TAILS) <= subscription._TAILS_MAX
        assert srv.handle(packet(b"after"), None) is not None
    finally:
        log.set_stream(None)
    assert srv.dropped == flood and table.pool(b"before") and table.pool(b"after")
    assert len(table) == 2
    assert "invalid weight value b'x'" in lines.getvalue()
