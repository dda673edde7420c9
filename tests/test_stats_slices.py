"""Stats documents in slices: the same bytes as a full render, routing never waits for them.

In-process parts run the stats server on a real loopback socket with the reactor in a
thread; the reference for "the same bytes" is today's straightforward renderer, kept
here verbatim (``reference_*``) so that a change to the production emitters cannot
move both sides at once.  End-to-end parts run the router, alone and under
``--master``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import types
from typing import Any, Dict, List

import pytest

from backends import RecordingBackend, request
from support import fetch_stats, start_router, wait_until
from test_master import children
from uwsgi_fastrouter.metrics import Counters
from uwsgi_fastrouter.runtime import RouterRuntime
from uwsgi_fastrouter.reactor import Reactor
from uwsgi_fastrouter.sockets import bind_stream_server
from uwsgi_fastrouter.endpoints import StatsServer
from uwsgi_fastrouter.stats import (HTTP_HEADER, RouterReport, Streamed, Unindented, build_document,
                                    master_document, render, render_pieces, subscription_stream)
from uwsgi_fastrouter.subscription import (STATS_SORT_STEP, Pool, SubscriptionTable, build_announcement,
                                           parse_announcement)

NOW = 1_700_000_000.0

# --------------------------------------------------------------------------
# The reference: the renderer and the subscription list as they were, verbatim


def reference_render(document: Dict[str, Any], minified: bool = False) -> bytes:
    out: List[str] = []
    nl, tab = ("", "") if minified else ("\n", "\t")
    _ref_object(document, 0, out, nl, tab)
    return "".join(out).encode("utf-8")


def _ref_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value))
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return json.dumps(value, ensure_ascii=False)


def _ref_value(value, depth, out, nl, tab) -> None:
    if isinstance(value, dict):
        _ref_object(value, depth, out, nl, tab)
    elif isinstance(value, list):
        _ref_list(value, depth, out, nl, tab)
    else:
        out.append(_ref_scalar(value))


def _ref_object(obj, depth, out, nl, tab) -> None:
    out.append("{")
    out.append(nl)
    inner = tab * (depth + 1)
    first = True
    for key, value in obj.items():
        if not first:
            out.append(",")
            out.append(nl)
        first = False
        out.append(inner)
        out.append(json.dumps(key))
        out.append(":")
        _ref_value(value, depth + 1, out, nl, tab)
    out.append(nl)
    out.append(tab * depth)
    out.append("}")


def _ref_list(items, depth, out, nl, tab) -> None:
    out.append("[")
    out.append(nl)
    inner = "" if isinstance(items, Unindented) else tab * (depth + 1)
    first = True
    for item in items:
        if not first:
            out.append(",")
            out.append(nl)
        first = False
        out.append(inner)
        _ref_value(item, depth + 1, out, nl, tab)
    out.append(nl)
    out.append(tab * depth)
    out.append("]")


_NODE_FIELDS = ("name", "modifier1", "modifier2", "last_check", "pid", "uid", "gid", "requests",
                "last_requests", "tx", "rx", "cores", "load", "weight", "wrr", "ref", "failcnt",
                "death_mark")


def _ref_number(value) -> int:
    return 0 if value is None else int(value)


def reference_subscriptions(table) -> list:
    pools = []
    for pool in table.pools_for_stats():
        pools.append({
            "key": pool.key,
            "hash": pool.hash,
            "hits": pool.hits,
            "sni_enabled": 0,
            "nodes": [{field: _ref_number(getattr(node, field)) if field != "name" else node.name
                       for field in _NODE_FIELDS} for node in pool.nodes],
        })
    return pools


def reference_report(table, sessions: int, static: list, cheap: bool) -> dict:
    """What a router process reported to the master, as a dict, before reports had parts."""
    report = {"sessions": sessions, "static": static, "cheap": 1 if cheap else 0, "pools": {}}
    for pool in table.pools_for_stats():
        report["pools"][pool.key.decode("latin-1")] = [pool.hits, {
            n.name.decode("latin-1"): [n.requests, n.last_requests, n.tx, n.rx, n.ref, n.failcnt]
            for n in pool.nodes}]
    return report


def reference_aggregate(table, reports) -> list:
    pools = reference_subscriptions(table)
    for pool in pools:
        key = pool["key"].decode("latin-1")
        hits = 0
        for report in reports:
            entry = report["pools"].get(key)
            if entry:
                hits += entry[0]
        pool["hits"] = hits
        for node in pool["nodes"]:
            name = node["name"].decode("latin-1")
            totals = [0, 0, 0, 0, 0, 0]
            for report in reports:
                entry = report["pools"].get(key)
                if entry and name in entry[1]:
                    totals = [a + b for a, b in zip(totals, entry[1][name])]
            (node["requests"], node["last_requests"], node["tx"], node["rx"], node["ref"],
             failcnt) = totals
            node["failcnt"] = max(node["failcnt"], failcnt)
    return pools


# --------------------------------------------------------------------------
# Tables and an in-process stats server


def subscribe(table: SubscriptionTable, key: bytes, address: bytes, **fields) -> None:
    table.announce(parse_announcement(build_announcement(key, address, **fields)), NOW)


def unsubscribe(table: SubscriptionTable, key: bytes, address: bytes) -> None:
    table.announce(parse_announcement(build_announcement(key, address, unsubscribe=True)), NOW)


ODD_KEYS = [b'quote"and\\backslash', b"latin-1 \xe9\xff", "unicod\u00e9 \u2603".encode(), b"ctl\x01\x1f"]


def make_table(keys: int, seed: int = 0) -> SubscriptionTable:
    """*keys* pools (a few with odd keys, some with several nodes) with varied counters."""
    table = SubscriptionTable(max_keys=keys + 10)
    names = ODD_KEYS + [b"key-%05d.example.com" % i for i in range(keys - len(ODD_KEYS))]
    for i, key in enumerate(names):
        for n in range(1 + (i % 7 == 0) + (i % 31 == 0) * 3):
            subscribe(table, key, b"127.0.0.1:%d" % (3000 + n), weight=1 + (i + n) % 4, cores=n,
                      modifier1=(i * 3) % 256)
        pool = table.pool(key)
        pool.hits = (i * 7 + seed) % 1000
        for n, node in enumerate(pool.nodes):
            node.requests = i + n + seed
            node.last_requests = (i + seed) % 5
            node.tx = i * 1000 + n
            node.rx = i * 10 + n
            node.failcnt = (i + n) % 3
            node.death_mark = 1 if i % 97 == 5 else 0
    return table


class _Server:
    """A stats server on 127.0.0.1:0 and a reactor running it in a thread."""

    def __init__(self, sndbuf: int = 0, **kwargs) -> None:
        self.reactor = Reactor()
        self.listener = bind_stream_server("127.0.0.1:0")
        if sndbuf:
            # Accepted sockets inherit it: the document waits for its reader.
            self.listener.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.address = self.listener.sock.getsockname()
        self.stats = StatsServer(self.reactor, self.listener, **kwargs)
        self.stats.start()
        self.thread = threading.Thread(target=self.reactor.run, name="stats-reactor", daemon=True)
        self.thread.start()

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the reactor's thread and return its result."""
        done = threading.Event()
        result: list = []

        def run() -> None:
            try:
                result.append(fn(*args))
            finally:
                done.set()

        self.reactor.call_soon(run)
        self.reactor.wakeup()
        assert done.wait(10), "the reactor did not run a callback within 10 s"
        return result[0] if result else None

    def connect(self, rcvbuf: int = 0) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(10)
        sock.connect(self.address)
        return sock

    def fetch(self, request: bytes = b"") -> bytes:
        with self.connect() as sock:
            if request:
                sock.sendall(request)
            return read_to_eof(sock)

    def close(self) -> None:
        self.call(self.stats.stop)
        self.reactor.stop()
        self.thread.join(10)
        self.reactor.close()
        self.listener.close(unlink=True)


def read_to_eof(sock: socket.socket, data: bytes = b"") -> bytes:
    chunks = [data]
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


class _Static:
    def __init__(self, name: str, hits: int, dead_since: float) -> None:
        self.name, self.hits, self.dead_since = name, hits, dead_since


def single_document(table, names, static, minified: bool = False, streamed: bool = True):
    """What the single-process router serves (streamed) or served (the reference)."""
    server = types.SimpleNamespace(active_sessions=3)
    subscriptions = subscription_stream(table) if streamed else reference_subscriptions(table)
    return build_document(server, names, static_nodes=static,
                          extra=lambda doc: doc.__setitem__("subscriptions", subscriptions))


# --------------------------------------------------------------------------
# The renderer


def test_pieces_join_into_the_full_render():
    table = make_table(300)
    static = [_Static("127.0.0.1:3131", 5, 0), _Static("/tmp/x.sock", 0, 17.9)]
    for minified in (False, True):
        streamed = single_document(table, Unindented(["127.0.0.1:1", "/tmp/a.sock"]), static)
        plain = single_document(table, Unindented(["127.0.0.1:1", "/tmp/a.sock"]), static, streamed=False)
        pieces = list(render_pieces(streamed, minified))
        assert len(pieces) > 300                      # a piece per pool at least
        expected = reference_render(plain, minified)
        assert "".join(pieces).encode("utf-8") == expected
        assert render(streamed, minified) == expected
        json.loads(expected)


def test_no_piece_of_the_document_sorts_the_whole_table(monkeypatch):
    """Between two pieces (where a slice of the single process's loop may stop) the
    walk reads the sort key of a few hundred pools at most, never of the whole table:
    the pools are sorted a run at a time, and the pieces still join into the full
    render."""
    table = make_table(3000)
    names = Unindented(["127.0.0.1:3017"])
    expected = reference_render(single_document(table, names, None, streamed=False))
    reads = [0]
    slot = Pool.hash

    def counted(pool):
        reads[0] += 1
        return slot.__get__(pool, Pool)

    monkeypatch.setattr(Pool, "hash", property(counted))
    per_piece, text = [], []
    for piece in render_pieces(single_document(table, names, None)):
        per_piece.append(reads[0])
        reads[0] = 0
        text.append(piece)
    assert "".join(text).encode("utf-8") == expected
    assert sum(per_piece) >= 3000
    assert max(per_piece) <= STATS_SORT_STEP + 2, "a piece sorted %d pools" % max(per_piece)


@pytest.mark.parametrize("minified", [False, True])
def test_an_empty_or_nested_streamed_member_renders_like_a_list(minified):
    doc = {"a": Streamed(lambda: iter(())), "b": {"c": Streamed(lambda: [1, {"d": b"x"}])},
           "e": Unindented(["p", "q"]), "f": []}
    plain = {"a": [], "b": {"c": [1, {"d": b"x"}]}, "e": Unindented(["p", "q"]), "f": []}
    assert "".join(render_pieces(doc, minified)).encode() == reference_render(plain, minified)


def test_the_reactor_counts_the_fds_ready_in_each_pass():
    """What the stats server reads to let routing go first."""
    reactor = Reactor()
    pairs = [socket.socketpair() for _ in range(3)]
    seen = []
    try:
        for a, _b in pairs:
            reactor.add_reader(a.fileno(), lambda: seen.append(reactor.ready_count))
        pairs[0][1].send(b"x")
        pairs[2][1].send(b"x")
        reactor.call_later(0, reactor.stop)
        reactor.run()
        assert seen == [2, 2]
    finally:
        reactor.close()
        for a, b in pairs:
            a.close()
            b.close()


# --------------------------------------------------------------------------
# The stats server, in process


@pytest.mark.parametrize("minified,http", [(False, False), (True, False), (False, True)])
def test_a_large_table_is_served_byte_for_byte_as_the_full_render(minified, http):
    table = make_table(3000)
    names = Unindented(["127.0.0.1:3017"])
    server = _Server(document=lambda: single_document(table, names, None), minified=minified, http=http)
    try:
        raw = server.fetch(b"GET / HTTP/1.0\r\n\r\n" if http else b"")
        expected = reference_render(single_document(table, names, None, streamed=False), minified)
        assert raw == (HTTP_HEADER + expected if http else expected)
        assert len(json.loads(expected)["subscriptions"]) == 3000
    finally:
        server.close()


def test_a_document_walks_the_table_as_it_goes():
    """The pools are listed when the request comes; each is rendered when its turn
    comes: a pool removed meanwhile is skipped, a node added meanwhile is shown, a key
    added meanwhile waits for the next document.  (Built in one go, the document would
    show the table as it was at the request.)"""
    table = make_table(3000)
    order = table.pools_for_stats()
    removed, grown = order[-1].key, order[-2].key
    names = Unindented(["127.0.0.1:3017"])
    server = _Server(sndbuf=4096, document=lambda: single_document(table, names, None))
    try:
        with server.connect(rcvbuf=4096) as sock:
            # read until the first pool arrived: the pool list was taken by then (the
            # rest of the 1.6 MB document cannot be rendered ahead: small buffers)
            head = b""
            while b'"key"' not in head.partition(b'"subscriptions"')[2]:
                chunk = sock.recv(4096)
                assert chunk, "the document ended before its first pool"
                head += chunk
            assert head.startswith(b"{")

            def change() -> None:
                for node in list(table.pool(removed).nodes):
                    unsubscribe(table, removed, node.name)
                subscribe(table, grown, b"127.0.0.1:9999")
                subscribe(table, b"added.example.com", b"127.0.0.1:3000")

            server.call(change)
            doc = json.loads(read_to_eof(sock, head))
        keys = [pool["key"] for pool in doc["subscriptions"]]
        assert removed.decode() not in keys and "added.example.com" not in keys
        assert len(keys) == 2999
        (pool,) = [p for p in doc["subscriptions"] if p["key"] == grown.decode()]
        assert pool["nodes"][-1]["name"] == "127.0.0.1:9999"
        # the next document shows the table as it is now
        after = json.loads(server.fetch())
        assert len(after["subscriptions"]) == 3000
    finally:
        server.close()


def test_two_concurrent_clients_both_get_whole_documents():
    table = make_table(2000)
    names = Unindented(["127.0.0.1:3017"])
    server = _Server(sndbuf=4096, document=lambda: single_document(table, names, None))
    expected = reference_render(single_document(table, names, None, streamed=False))
    try:
        a, b = server.connect(rcvbuf=4096), server.connect(rcvbuf=4096)
        got = {a: bytearray(), b: bytearray()}
        open_ = [a, b]
        while open_:                          # read them in turns, a little at a time
            for sock in list(open_):
                chunk = sock.recv(4096)
                if chunk:
                    got[sock] += chunk
                else:
                    open_.remove(sock)
                    sock.close()
        assert bytes(got[a]) == expected and bytes(got[b]) == expected
    finally:
        server.close()


def test_a_client_that_goes_away_mid_document_costs_nothing_more():
    table = make_table(2000)
    server = _Server(sndbuf=4096, document=lambda: single_document(table, Unindented([]), None))
    try:
        with server.connect(rcvbuf=4096) as sock:
            assert sock.recv(100)
        wait_until(lambda: not server.call(lambda: len(server.stats.clients)), what="the client dropped")
        assert json.loads(server.fetch())["subscriptions"]
    finally:
        server.close()


def test_a_document_that_fails_to_build_is_an_error_document():
    def broken():
        raise RuntimeError("no table")

    server = _Server(document=broken)
    try:
        assert json.loads(server.fetch())["error"] == "no table"
    finally:
        server.close()


# --------------------------------------------------------------------------
# The master's document from its router processes' reports


def _router_parts(table, sessions: int, static: list, cheap: bool) -> RouterRuntime:
    parts = RouterRuntime()
    parts.table = table
    parts.server = types.SimpleNamespace(
        sessions=[None] * sessions, cheap=cheap, counters=Counters(), fd_handoffs=0,
        router=types.SimpleNamespace(static_nodes=[_Static("", h, g) for h, g in static]))
    return parts


def _received(parts: RouterRuntime) -> RouterReport:
    """The report as the master gets it: every part through JSON, as on the channel."""
    report = RouterReport()
    for part in parts.report_parts():
        data = json.dumps(part, separators=(",", ":")).encode()
        assert len(data) < 64 * 1024
        report.add(data)
    return report


@pytest.mark.parametrize("minified", [False, True])
def test_the_masters_document_is_byte_for_byte_the_full_render(minified):
    master_table = make_table(1500)
    one, two = make_table(1500, seed=1), make_table(1500, seed=2)
    unsubscribe(two, b"key-00100.example.com", b"127.0.0.1:3000")   # one process lost a node
    subscribe(two, b"key-00200.example.com", b"127.0.0.1:7777")     # and has one the master has not
    reports = [_received(_router_parts(one, 2, [[5, 0], [1, 17]], True)),
               _received(_router_parts(two, 1, [[7, 3], [0, 0]], False))]
    doc = master_document(reports, master_table, ["127.0.0.1:3017", "/tmp/sub.sock"],
                          ["127.0.0.1:3131", "127.0.0.1:3132"])
    streamed = "".join(render_pieces(doc, minified)).encode()

    old_reports = [reference_report(one, 2, [[5, 0], [1, 17]], True),
                   reference_report(two, 1, [[7, 3], [0, 0]], False)]
    expected = build_document(types.SimpleNamespace(active_sessions=3), ["127.0.0.1:3017", "/tmp/sub.sock"],
                              static_nodes=[_Static("127.0.0.1:3131", 12, 3), _Static("127.0.0.1:3132", 1, 17)],
                              extra=lambda d: d.__setitem__("subscriptions",
                                                            reference_aggregate(master_table, old_reports)),
                              cheap=False)
    assert streamed == reference_render(expected, minified)


@pytest.mark.parametrize("part", [b"[1]", b"not json", b'{"pools":["k",1,5]}', b'{"pools":{"k":1}}',
                                  b'{"sessions":1}', b'{"pools":[1,2,0]}', b'{"pools":["k","1",0]}'])
def test_a_malformed_report_part_is_refused(part):
    with pytest.raises(ValueError):
        RouterReport().add(part)


# --------------------------------------------------------------------------
# End to end


def _announce_many(sub: str, keys: int, address: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        for i in range(keys):
            s.sendto(build_announcement(b"k%05d.example.com" % i, address, cores=1), sub)


@pytest.mark.parametrize("master", [False, True], ids=["single", "master"])
def test_many_keys_complete_documents_for_concurrent_clients(tmp_path, master):
    sub = str(tmp_path / "sub.sock")
    extra = ["--master", "--fastrouter-processes", "2"] if master else []
    with RecordingBackend("a") as node:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-subscription-server", sub,
                               "--fastrouter-stats", "127.0.0.1:0", "--subscription-max-keys", "5000"]
                              + extra)
        router.wait_for_log(r"subscription server bound on")
        _announce_many(sub, 4000, node.address.encode())
        wait_until(lambda: len(fetch_stats(router.stats_address, timeout=30)["subscriptions"]) == 4000,
                   timeout=60, what="4000 pools in the stats")
        host = [(b"HTTP_HOST", b"k00042.example.com")]
        wait_until(lambda: b"node=a" in request(router.addresses[0], host), what="routing to a new key")
        for _ in range(9):
            assert b"node=a" in request(router.addresses[0], host)
        docs: list = [None, None]

        def fetch(i: int) -> None:
            docs[i] = fetch_stats(router.stats_address, timeout=30)

        threads = [threading.Thread(target=fetch, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for doc in docs:
            assert doc is not None
            keys = {pool["key"] for pool in doc["subscriptions"]}
            assert keys == {"k%05d.example.com" % i for i in range(4000)}
            (pool,) = [p for p in doc["subscriptions"] if p["key"] == "k00042.example.com"]
            assert pool["hits"] == 10 and pool["nodes"][0]["requests"] == 10


def test_a_stopped_router_process_is_left_out_of_the_stats_with_a_log_line(tmp_path):
    with RecordingBackend("m") as node:
        router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address,
                               "--fastrouter-processes", "2", "--fastrouter-stats", "127.0.0.1:0"])
        router.wait_for_log(r"spawned uWSGI fastrouter 2 \(pid: \d+\)")
        wait_until(lambda: len(children(router.pid)) == 2, what="two router processes")
        for _ in range(20):
            assert request(router.addresses[0], [(b"HTTP_HOST", b"x")]).startswith(b"HTTP/1.0 200")
        assert fetch_stats(router.stats_address)["static_nodes"][0]["hits"] == 20
        victim = children(router.pid)[0]
        os.kill(victim, signal.SIGSTOP)
        try:
            doc = fetch_stats(router.stats_address, timeout=10)   # answered without it
            router.wait_for_log(r"stats: fastrouter \d \(pid: %d\) did not send its counters in time: "
                                r"left out of this document" % victim)
            assert doc["static_nodes"][0]["name"] == node.address
            # the other process still routes meanwhile
            assert request(router.addresses[0], [(b"HTTP_HOST", b"x")], timeout=10).startswith(b"HTTP/1.0 200")
        finally:
            os.kill(victim, signal.SIGCONT)
        wait_until(lambda: fetch_stats(router.stats_address)["static_nodes"][0]["hits"] == 21,
                   what="the process counted again once it runs")


def test_a_stopped_router_process_does_not_hold_up_the_master(tmp_path):
    """Its channel fills up with subscriptions; the master goes on with the others."""
    sub = str(tmp_path / "sub.sock")
    with RecordingBackend("a") as node:
        router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-processes", "2",
                               "--fastrouter-subscription-server", sub, "--fastrouter-stats", "127.0.0.1:0",
                               "--subscription-max-keys", "5000"])
        router.wait_for_log(r"spawned uWSGI fastrouter 2 \(pid: \d+\)")
        wait_until(lambda: len(children(router.pid)) == 2, what="two router processes")
        victim, other = children(router.pid)[:2]
        os.kill(victim, signal.SIGSTOP)
        try:
            _announce_many(sub, 3000, node.address.encode())
            router.wait_for_log(r"for pid %d\] k02999.example.com => new node" % router.pid, timeout=30)
            doc = fetch_stats(router.stats_address, timeout=10)
            assert len(doc["subscriptions"]) == 3000
            # the other process is stopped now, so that every request goes to the victim
            os.kill(other, signal.SIGSTOP)
        finally:
            os.kill(victim, signal.SIGCONT)
        try:
            # once it runs again it catches up with every subscription it was sent
            # (applied silently: the master logged them)
            wait_until(lambda: b"node=a" in request(router.addresses[0],
                                                    [(b"HTTP_HOST", b"k02999.example.com")]),
                       timeout=30, what="the stopped process caught up")
        finally:
            os.kill(other, signal.SIGCONT)
