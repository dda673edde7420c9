"""The quick path of a plain re-announce (SubscriptionTable.refresh_usual, taken by the
server's readiness callback): the same table, log and counters as the general path
(SubscriptionServer.handle) for any sequence of datagrams, and the general path whenever
something about the sender or the packet must be looked at."""

from __future__ import annotations

import io
import socket
from typing import List, Optional

import pytest
from hypothesis import given
from hypothesis import strategies as st

from property_support import PROPERTY, mutated
from support import sock_path
from uwsgi_fastrouter import log, subserver
from uwsgi_fastrouter.allowlist import SourceAllowList
from uwsgi_fastrouter.subscription import Node, SubscriptionTable, build_announcement
from uwsgi_fastrouter.subserver import DatagramListener, SubscriptionServer

T0 = 1_700_000_000


class Clock:
    """The reactor as far as the server uses it (its log's clock)."""

    now = 0.0


class Verifier:
    """Accepts the signature b"good"."""

    def check(self, a) -> bool:
        return a.sign == b"good"


def make_server(table: SubscriptionTable, when: List[float], **kw) -> SubscriptionServer:
    return SubscriptionServer(Clock, table, [], wall_clock=lambda: when[0], **kw)


class Pair:
    """A UNIX datagram socket pair whose receiving end the server reads."""

    def __init__(self) -> None:
        self.sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.setblocking(False)
        self.listener = DatagramListener(receiver, "pair", None)

    def deliver(self, srv: SubscriptionServer, datagrams: List[bytes]) -> None:
        """Queue *datagrams*, then one readiness of the server's socket."""
        for datagram in datagrams:
            self.sender.send(datagram)
        srv._readable(self.listener)

    def close(self) -> None:
        self.sender.close()
        self.listener.close()


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


def state(table: SubscriptionTable) -> list:
    """Everything a refresh may change, pool by pool and node by node."""
    fields = [name for name in Node.__slots__ if name != "pool"]
    return [(pool.key, pool.hits, pool.refreshed, pool.last_announce, pool.algo, pool.levels,
             pool.v21, pool.ramping, pool.draining,
             [tuple(getattr(node, name) for name in fields) for node in pool.nodes])
            for pool in table.pools_for_stats()]


def outcome(batches: List[List[bytes]], general: bool, pair: Optional[Pair] = None,
            master: bool = False, **table_args) -> tuple:
    """Apply *batches* (a clock second apart) one datagram at a time through handle(),
    or a readiness per batch through the socket; the table, its log, the server's
    log and counters, and with *master* what a master copies to its router
    processes."""
    table_lines: List[str] = []
    table = SubscriptionTable(log=table_lines.append, pid=1, **table_args)
    when = [float(T0)]
    srv = make_server(table, when)
    copies: list = []
    if master:
        srv.on_accepted = lambda a, pid, uid, gid: copies.append((a, pid, uid, gid))
    lines = io.StringIO()
    log.set_stream(lines)
    try:
        for batch in batches:
            if general:
                for datagram in batch:
                    srv.handle(datagram, None)
            else:
                pair.deliver(srv, batch)
            when[0] += 1.0
    finally:
        log.set_stream(None)
    return (state(table), table_lines, lines.getvalue(), srv.received if not general else None,
            srv.dropped, table.refused_keys, table.refused_nodes, copies)


plain = st.builds(
    lambda key, address, cores, load, weight, unsubscribe, drain, backup: build_announcement(
        key, address, cores=cores, load=load, weight=weight, unsubscribe=unsubscribe,
        drain=drain, backup=backup),
    st.sampled_from([b"k0", b"k1", b"k2"]), st.sampled_from([b"a:1", b"a:2", b"a:3"]),
    st.integers(0, 3), st.integers(0, 3), st.integers(0, 4),
    st.sampled_from([False, False, False, True]), st.sampled_from([False, False, False, True]),
    st.sampled_from([None, None, None, 0, 1]))
datagrams = st.one_of(plain, plain, mutated(plain))


@PROPERTY
@given(st.lists(st.lists(datagrams, min_size=1, max_size=12), min_size=1, max_size=6),
       st.sampled_from([dict(), dict(slow_start=5.0), dict(max_keys=2, max_nodes=2)]),
       st.booleans())
def test_the_quick_path_leaves_what_the_general_path_leaves(batches, table_args, master):
    """For any sequence of announces, unsubscribes, drains, 2.1 fields and damaged
    packets, reading them from the socket (plain refreshes take the quick path) leaves
    the table, the log lines and the counters exactly as handle() does, and gives a
    master the same copies."""
    p = Pair()
    try:
        quick = outcome(batches, False, p, master, **table_args)
    finally:
        p.close()
    general = outcome(batches, True, None, master, **table_args)
    assert quick[0] == general[0]
    assert quick[1:3] == general[1:3]
    assert quick[3] == sum(len(batch) for batch in batches)
    assert quick[4:] == general[4:]


def test_a_plain_refresh_is_applied_without_parsing_an_announcement(pair, monkeypatch):
    """The steady state of a busy router: a re-announce of a known node is applied
    from the datagram's bytes; only the new node went through the parser."""
    table = SubscriptionTable(slow_start=5.0)
    when = [float(T0)]
    srv = make_server(table, when)
    pair.deliver(srv, [build_announcement(b"k", b"a:1", cores=1, weight=1)])
    node = table.pool(b"k").nodes[0]
    node.death_mark = 1          # e.g. a failed connect: an announce brings it back
    node.last_requests = 7

    def no_parse(data):
        raise AssertionError("a plain refresh was parsed")

    monkeypatch.setattr(subserver, "parse_announcement", no_parse)
    when[0] = T0 + 3.0
    pair.deliver(srv, [build_announcement(b"k", b"a:1", cores=4, load=2, weight=3)])
    assert (node.death_mark, node.last_check, node.cores, node.load, node.weight,
            node.last_requests, node.ramp_from) == (0, T0 + 3, 4, 2, 3, 0, T0 + 3.0)
    assert table.pool(b"k").refreshed and table.pool(b"k").last_announce == T0 + 3
    assert srv.received == 2 and srv.dropped == 0


def test_a_signing_table_checks_every_refresh_read_from_the_socket(pair):
    table = SubscriptionTable(verifier=Verifier())
    when = [float(T0)]
    srv = make_server(table, when)
    signed = build_announcement(b"k", b"a:1", weight=1, unix=T0, signer=lambda data: b"good")
    pair.deliver(srv, [signed])
    node = table.pool(b"k").nodes[0]
    lines = io.StringIO()
    log.set_stream(lines)
    try:
        pair.deliver(srv, [build_announcement(b"k", b"a:1", weight=5),   # unsigned
                           signed])                                       # replayed
    finally:
        log.set_stream(None)
    assert node.weight == 1 and srv.dropped == 2
    assert "unsigned subscription packet for k" in lines.getvalue()
    assert "invalid (sniffed ?) packet sent for slot: k node: a:1" in lines.getvalue()


def test_an_allow_list_is_applied_to_every_refresh_read_from_the_socket(pair):
    """The pair's sender is an unbound socket, which no allow list names."""
    table = SubscriptionTable()
    srv = make_server(table, [float(T0)])
    srv.handle(build_announcement(b"k", b"a:1", weight=1), "/run/subs/a.sock")
    log.set_stream(io.StringIO())
    try:
        srv.allow = SourceAllowList(["/run/subs/"])
        pair.deliver(srv, [build_announcement(b"k", b"a:1", weight=5)])
    finally:
        log.set_stream(None)
    assert table.pool(b"k").nodes[0].weight == 1
    assert srv.refused_sources == 1 and srv.dropped == 1


def test_an_allowed_sender_takes_the_quick_path(sock_dir, monkeypatch):
    """With an allow list, a refresh from a listed sender is applied from its bytes;
    one from an unlisted sender is refused, counted and logged as before."""
    table = SubscriptionTable()
    srv = make_server(table, [float(T0)],
                      allow=SourceAllowList([sock_path(sock_dir, "ok-a.sock")]))
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(sock_path(sock_dir, "router.sock"))
    receiver.setblocking(False)
    listener = DatagramListener(receiver, "router", None)
    senders = {}
    for name in ("ok-a.sock", "evil.sock"):
        senders[name] = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        senders[name].bind(sock_path(sock_dir, name))
    try:
        senders["ok-a.sock"].sendto(build_announcement(b"k", b"a:1", weight=1),
                                    receiver.getsockname())
        srv._readable(listener)
        monkeypatch.setattr(subserver, "parse_announcement", lambda data: pytest.fail("parsed"))
        for name, weight in (("ok-a.sock", 4), ("evil.sock", 9)):
            senders[name].sendto(build_announcement(b"k", b"a:1", weight=weight),
                                 receiver.getsockname())
        log.set_stream(io.StringIO())
        try:
            srv._readable(listener)
        finally:
            log.set_stream(None)
    finally:
        for sock in senders.values():
            sock.close()
        listener.close()
    assert table.pool(b"k").nodes[0].weight == 4
    assert srv.received == 3 and srv.refused_sources == 1 and srv.dropped == 1


def test_under_a_master_every_refresh_is_copied_to_the_router_processes(pair):
    table = SubscriptionTable()
    srv = make_server(table, [float(T0)])
    copied = []
    srv.on_accepted = lambda a, pid, uid, gid: copied.append((a.key, a.weight))
    pair.deliver(srv, [build_announcement(b"k", b"a:1", weight=1),
                       build_announcement(b"k", b"a:1", weight=5)])
    assert copied == [(b"k", 1), (b"k", 5)] and table.pool(b"k").nodes[0].weight == 5
