"""Stats with many keys: the router processes' reports leave idle pools out, and under
``--master`` a low-priority process of its own writes each document (statsfork.py),
while routing goes on."""

from __future__ import annotations

import json
import os
import resource
import socket
import types

import pytest

from backends import RecordingBackend, request
from support import fetch_stats, start_router, wait_until
from test_master import children, zombies
from test_stats_slices import (_announce_many, _router_parts, _Static, make_table, read_to_eof,
                               reference_aggregate, reference_render, reference_report)
from uwsgi_fastrouter.reactor import Reactor
from uwsgi_fastrouter import statsfork
from uwsgi_fastrouter.statsfork import MAX_RENDERERS, RENDERER_NICE, ForkedRenderers
from uwsgi_fastrouter.stats import RouterReport, build_document, master_document, render_pieces


# --------------------------------------------------------------------------
# Reports: idle pools left out, the document unchanged


def _idle_but(table, busy_every: int):
    """Zero the counters of every pool but one in *busy_every* (a process that routed
    to a few keys only); a failure count alone keeps a pool busy."""
    for i, pool in enumerate(table.pools_for_stats()):
        if i % busy_every == 0:
            continue
        pool.hits = 0
        for node in pool.nodes:
            node.requests = node.last_requests = node.tx = node.rx = node.ref = node.failcnt = 0
        if i % (busy_every * 7) == 1:
            pool.nodes[0].failcnt = 2        # told by another process: no hits here


def _parts_as_sent(parts) -> list:
    return [json.dumps(part, separators=(",", ":")).encode() for part in parts.report_parts()]


def test_idle_pools_are_left_out_of_the_reports_and_the_document_is_unchanged():
    master_table = make_table(3000)
    one, two = make_table(3000, seed=1), make_table(3000, seed=2)
    _idle_but(one, 50)
    _idle_but(two, 3)
    sent = _parts_as_sent(_router_parts(one, 2, [[5, 0]], True))
    pools_sent = sum(len(json.loads(p).get("pools", [])) for p in sent)
    assert pools_sent < 3000 * 3 // 10                     # far fewer than the 3000 pools' worth
    reports = []
    for table in (one, two):
        report = RouterReport()
        for data in _parts_as_sent(_router_parts(table, 1, [[5, 0]], False)):
            report.add(data)
        reports.append(report)
    doc = master_document(reports, master_table, ["127.0.0.1:3017"], ["127.0.0.1:3131"])
    got = "".join(render_pieces(doc)).encode()

    full = [reference_report(one, 1, [[5, 0]], False), reference_report(two, 1, [[5, 0]], False)]
    expected = build_document(types.SimpleNamespace(active_sessions=2), ["127.0.0.1:3017"],
                              static_nodes=[_Static("127.0.0.1:3131", 10, 0)],
                              extra=lambda d: d.__setitem__("subscriptions",
                                                            reference_aggregate(master_table, full)))
    assert got == reference_render(expected)


def test_a_walk_over_idle_pools_is_sliced_too():
    """Parts come at least every 256 pools looked at, empty ones (nothing to send)
    when none of them had counters."""
    table = make_table(3000)
    _idle_but(table, 1000)
    parts = list(_router_parts(table, 0, [], False).report_parts())
    assert parts[0]["sessions"] == 0
    pauses = [part for part in parts[1:] if part == {}]
    assert len(pauses) >= 3000 // 256 - 1
    assert sum(len(part.get("pools", ())) for part in parts[1:]) > 0


# --------------------------------------------------------------------------
# End to end


def _stats_connection(address: str) -> socket.socket:
    """A stats client with a small receive buffer: the document waits for its reads."""
    host, port = address.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect((host, int(port)))
    return sock


@pytest.mark.parametrize("master", [False, True], ids=["single", "master"])
def test_ten_thousand_keys_whole_documents_and_routing_meanwhile(tmp_path, master):
    """Every key and node in the document, the counters of both router processes
    summed; a request for another key made while a document is being written (its
    reader stalled) is served."""
    sub = str(tmp_path / "sub.sock")
    extra = ["--master", "--fastrouter-processes", "2"] if master else []
    with RecordingBackend("a") as node:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-subscription-server", sub,
                               "--fastrouter-stats", "127.0.0.1:0", "--subscription-max-keys", "12000",
                               "--subscription-tolerance", "3600"] + extra)
        router.wait_for_log(r"subscription server bound on")
        _announce_many(sub, 10000, node.address.encode())
        wait_until(lambda: len(fetch_stats(router.stats_address, timeout=30)["subscriptions"]) == 10000,
                   timeout=90, interval=0.2, what="10000 pools in the stats")
        hot = [(b"HTTP_HOST", b"k00042.example.com")]
        wait_until(lambda: b"node=a" in request(router.addresses[0], hot), what="routing to a new key")
        for _ in range(9):
            assert b"node=a" in request(router.addresses[0], hot)

        with _stats_connection(router.stats_address) as stalled:
            head = stalled.recv(4096)
            assert head.startswith(b"{")
            # the rest waits for this reader; routing does not
            other = [(b"HTTP_HOST", b"k09999.example.com")]
            for _ in range(5):
                assert b"node=a" in request(router.addresses[0], other, timeout=10)
            doc = json.loads(read_to_eof(stalled, head))

        pools = {pool["key"]: pool for pool in doc["subscriptions"]}
        assert set(pools) == {"k%05d.example.com" % i for i in range(10000)}
        for pool in pools.values():
            assert [n["name"] for n in pool["nodes"]] == [node.address]
        assert pools["k00042.example.com"]["hits"] == 10
        assert pools["k00042.example.com"]["nodes"][0]["requests"] == 10
        assert pools["k00007.example.com"]["hits"] == 0
        after = fetch_stats(router.stats_address, timeout=30)
        assert {p["key"]: p["hits"] for p in after["subscriptions"]}["k09999.example.com"] == 5
        if master:      # the intermediate processes were reaped by the master
            wait_until(lambda: not zombies(router.pid), what="no zombie child of the master")
            assert len(children(router.pid)) == 2


# --------------------------------------------------------------------------
# The renderer processes, in process


def _holders(inode: int) -> list:
    """The pids of the processes holding the socket of *inode*."""
    target = "socket:[%d]" % inode
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fds = os.listdir("/proc/%s/fd" % entry)
                if any(os.readlink("/proc/%s/fd/%s" % (entry, fd)) == target for fd in fds):
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def _sockets_of(pid: int) -> int:
    count = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            count += os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith("socket:")
        except OSError:
            pass
    return count


def _big_answer(pieces: int = 2000, size: int = 4096):
    """An answer far larger than a socket buffer: its writer blocks until it is read."""
    for i in range(pieces):
        yield b"%07d" % i + b"x" * (size - 7)


def _run_until(reactor: Reactor, predicate, what: str) -> None:
    """Run *reactor* in short turns until *predicate()* holds (at most 20 s)."""
    def turn():
        if predicate():
            reactor.stop()
        else:
            reactor.call_later(0.01, turn)
    stopper = reactor.call_later(20, reactor.stop)
    reactor.call_soon(turn)
    reactor.run()
    stopper.cancel()
    assert predicate(), what


def _renderer_of(inode: int):
    """The renderer holding the socket of *inode*, once it is the only holder (the
    intermediate process that forked it holds a copy for a moment) and is not our
    child; None before."""
    holders = _holders(inode)
    alone = len(holders) == 1 and holders[0] not in children(os.getpid())
    return holders[0] if alone else None


_IDLE = getattr(os, "SCHED_IDLE", None)


def test_a_renderer_is_nobodys_child_at_low_priority_with_only_the_clients_socket(monkeypatch):
    monkeypatch.setattr(statsfork, "IDLE_FOR", 3600.0)    # it stays idle throughout
    reactor = Reactor()
    renderers = ForkedRenderers(reactor)
    ours, reader = socket.socketpair()
    listener = socket.create_server(("127.0.0.1", 0))     # a socket of "the master's"
    try:
        inode = os.fstat(ours.fileno()).st_ino
        assert renderers(ours, _big_answer(), 10.0, lambda exc: b"error")
        ours.close()                                       # as the stats server does
        renderer = wait_until(lambda: _renderer_of(inode), what="the renderer alone with the socket")
        assert renderer != os.getpid()
        assert _sockets_of(renderer) == 1
        assert os.getpriority(os.PRIO_PROCESS, renderer) == \
            min(19, os.getpriority(os.PRIO_PROCESS, 0) + RENDERER_NICE)
        if _IDLE is not None:
            assert os.sched_getscheduler(renderer) == _IDLE
        assert renderers.alive == 1
        reader.settimeout(20)
        data = read_to_eof(reader)
        assert len(data) == 2000 * 4096 and data[-4096:].startswith(b"0001999")
        _run_until(reactor, lambda: renderers.alive == 0, "the renderer's exit seen")
    finally:
        reader.close()
        listener.close()
        reactor.close()


def _may_raise_priority() -> bool:
    """Whether this process may leave the idle policy for nice 10 (root, or a
    RLIMIT_NICE that allows it)."""
    if os.geteuid() == 0:
        return True
    soft, _hard = resource.getrlimit(resource.RLIMIT_NICE)
    nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + RENDERER_NICE)
    return soft == resource.RLIM_INFINITY or 20 - nice <= soft


@pytest.mark.skipif(_IDLE is None, reason="no idle scheduling policy here")
def test_a_renderer_at_work_for_long_leaves_the_idle_policy_where_it_may(monkeypatch):
    monkeypatch.setattr(statsfork, "IDLE_FOR", 0.0)       # at once, after its first chunk
    reactor = Reactor()
    renderers = ForkedRenderers(reactor)
    ours, reader = socket.socketpair()
    try:
        inode = os.fstat(ours.fileno()).st_ino
        assert renderers(ours, _big_answer(), 10.0, lambda exc: b"error")
        ours.close()
        renderer = wait_until(lambda: _renderer_of(inode), what="the renderer alone with the socket")
        # Nothing is read yet: the renderer sent its first chunks, then blocks on a full
        # socket, so its policy settles before the document is done.
        want = os.SCHED_OTHER if _may_raise_priority() else _IDLE
        wait_until(lambda: os.sched_getscheduler(renderer) == want,
                   what="the renderer's policy after its first chunk")
        assert os.getpriority(os.PRIO_PROCESS, renderer) == \
            min(19, os.getpriority(os.PRIO_PROCESS, 0) + RENDERER_NICE)
        reader.settimeout(20)
        assert len(read_to_eof(reader)) == 2000 * 4096
        _run_until(reactor, lambda: renderers.alive == 0, "the renderer's exit seen")
    finally:
        reader.close()
        reactor.close()


def test_at_most_so_many_renderers_then_the_caller_serves_the_client():
    reactor = Reactor()
    renderers = ForkedRenderers(reactor, limit=2)
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        taken = [renderers(ours, _big_answer(), 10.0, lambda exc: b"error") for ours, _ in pairs]
        assert taken == [True, True, False]
        for ours, _ in pairs[:2]:
            ours.close()
        for _, reader in pairs[:2]:
            reader.settimeout(20)
            assert len(read_to_eof(reader)) == 2000 * 4096
        _run_until(reactor, lambda: renderers.alive == 0, "both renderers' exits seen")
        assert renderers(pairs[2][0], iter([b"{}"]), 10.0, lambda exc: b"error")
        pairs[2][0].close()
        assert read_to_eof(pairs[2][1]) == b"{}"
        _run_until(reactor, lambda: renderers.alive == 0, "the third renderer's exit seen")
    finally:
        for ours, reader in pairs:
            ours.close()
            reader.close()
        reactor.close()


def test_a_document_that_fails_in_the_renderer_is_an_error_answer():
    def broken():
        yield b""
        raise RuntimeError("no table")

    reactor = Reactor()
    renderers = ForkedRenderers(reactor)
    ours, reader = socket.socketpair()
    try:
        assert renderers(ours, broken(), 10.0, lambda exc: b'{"error":"%s"}' % str(exc).encode())
        ours.close()
        reader.settimeout(20)
        assert read_to_eof(reader) == b'{"error":"no table"}'
        _run_until(reactor, lambda: renderers.alive == 0, "the renderer's exit seen")
    finally:
        reader.close()
        reactor.close()


# --------------------------------------------------------------------------
# End to end, again


def test_under_master_more_concurrent_clients_than_renderers_are_all_served(tmp_path):
    sub = str(tmp_path / "sub.sock")
    with RecordingBackend("a") as node:
        router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-processes", "2",
                               "--fastrouter-subscription-server", sub, "--fastrouter-stats", "127.0.0.1:0",
                               "--subscription-max-keys", "5000", "--subscription-tolerance", "3600"])
        router.wait_for_log(r"spawned uWSGI fastrouter 2 \(pid: \d+\)")
        _announce_many(sub, 2000, node.address.encode())
        wait_until(lambda: len(fetch_stats(router.stats_address, timeout=30)["subscriptions"]) == 2000,
                   timeout=60, interval=0.2, what="2000 pools in the stats")
        clients = [_stats_connection(router.stats_address) for _ in range(MAX_RENDERERS + 2)]
        try:
            heads = [c.recv(4096) for c in clients]
            assert b"node=a" in request(router.addresses[0], [(b"HTTP_HOST", b"k00001.example.com")])
            docs = [json.loads(read_to_eof(c, h)) for c, h in zip(clients, heads)]
        finally:
            for c in clients:
                c.close()
        assert all(len(d["subscriptions"]) == 2000 for d in docs)
