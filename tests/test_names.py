"""Host names as node and server addresses: the pure bookkeeping (names.py), the
lookups off the loop (resolver.py), and what the router, the subscription server and
the subscriber build from them.  Lookups are injected functions; the loop's clock is
the fake one of tests/test_engine.py."""

from __future__ import annotations

import socket
import threading
import time
from typing import Dict, List, Sequence

import pytest

from backends import uwsgi_packet
from test_engine import GET, RELAY, engines, log_lines, read_packet, tcp_listener  # noqa: F401
from test_subscriber import Receiver, announcement_vars, subscriber
from support import free_dead_tcp_address

from uwsgi_fastrouter import names as names_module
from uwsgi_fastrouter.addresses import AddressError, address_text, host_name, parse_connect
from uwsgi_fastrouter.names import NameTable, RETRY_DELAY, expand, names_in
from uwsgi_fastrouter.reactor import Reactor
from uwsgi_fastrouter.resolver import Resolver
from uwsgi_fastrouter.router import Router
from uwsgi_fastrouter.subscription import SubscriptionTable, build_announcement
from uwsgi_fastrouter.subserver import SubscriptionServer


# --------------------------------------------------------------------------- addresses

@pytest.mark.parametrize("text, expected", [
    ("localhost:3031", ("localhost", 3031)),
    ("web.default.svc.cluster.local.:80", ("web.default.svc.cluster.local.", 80)),
    ("node_1.internal:9", ("node_1.internal", 9)),
    ("Web-2:65535", ("Web-2", 65535)),
])
def test_a_host_name_is_told_from_a_literal(text, expected):
    assert host_name(text) == expected
    assert host_name(text.encode()) == expected


@pytest.mark.parametrize("text", [
    "127.0.0.1:80", "127.1:80", "0x7f.1:80", ":80", "[::1]:80",      # literals
    "/run/node.sock", "sock/x:1", "@abstract", "node.sock",          # UNIX
    "300.1.1.1:80", "1.2.3.4 x:80", "a..b:80", "a b:80", ".x:80",
    "x:0", "x:65536", "x:80a", "x:", "é.example:80", "a." + "b" * 64 + ":80",
    "x" * 250 + ".com:80",
])
def test_what_is_no_host_name_keeps_the_literal_rules(text):
    assert host_name(text) is None


def test_parse_connect_still_refuses_names_and_says_which_kind_of_fault():
    with pytest.raises(AddressError, match="host name 'web' has no known address"):
        parse_connect("web:3031")
    with pytest.raises(AddressError, match="neither an IPv4 address nor a host name"):
        parse_connect("300.1.1.1:3031")


def test_address_text_of_both_families():
    assert address_text("10.0.0.1", 3031) == "10.0.0.1:3031"
    assert address_text("fd00::1", 3031) == "[fd00::1]:3031"
    assert parse_connect(address_text("fd00::1", 3031)).sockaddr[:2] == ("fd00::1", 3031)


def test_expand_makes_one_node_per_address_and_keeps_the_rest():
    known = {"web": ("10.0.0.1", "10.0.0.2", "fd00::3")}
    got = expand(["web:3031", "127.0.0.1:1", "/run/n.sock", "other:80", "web:3031"], known.get)
    assert got == ["10.0.0.1:3031", "10.0.0.2:3031", "[fd00::3]:3031", "127.0.0.1:1",
                   "/run/n.sock", "other:80",
                   "10.0.0.1:3031", "10.0.0.2:3031", "[fd00::3]:3031"]
    assert names_in(["Web:1", "web:2", "127.0.0.1:3", "x:4"]) == ["web", "x"]


# --------------------------------------------------------------------------- the table

def table(**kw) -> NameTable:
    lines: List[str] = []
    kw.setdefault("interval", 60)
    t = NameTable(log=lines.append, **kw)
    t.lines = lines
    return t


def test_a_name_is_looked_up_at_once_then_every_interval_one_lookup_at_a_time():
    t = table()
    t.add("web", 100.0)
    assert t.addresses("web") is None
    assert t.due(100.0) == ["web"]
    assert t.due(100.0) == [], "one lookup per name at a time"
    assert t.resolved("web", ["10.0.0.1", "10.0.0.2", "10.0.0.1"], 101.0, 100.0) is True
    assert t.addresses("WEB") == ("10.0.0.1", "10.0.0.2")
    assert t.next_due() == 161.0 and t.due(160.9) == [] and t.due(161.0) == ["web"]
    version = t.version
    assert t.resolved("web", ["10.0.0.1", "10.0.0.2"], 162.0, 161.0) is False
    assert t.version == version
    assert t.lines == ["[uwsgi-fastrouter] host name web resolves to 10.0.0.1 10.0.0.2"]


def test_a_name_that_stops_resolving_keeps_its_addresses_with_one_line_until_it_recovers():
    t = table()
    t.add("web", 0.0)
    t.due(0.0)
    t.resolved("web", ["10.0.0.1"], 0.0)
    for now in (60.0, 65.0, 70.0):
        assert t.due(now) == ["web"]
        t.failed("web", "Name or service not known", now)
        assert t.addresses("web") == ("10.0.0.1",)
        assert t.next_due() == now + RETRY_DELAY
    assert t.lines[1:] == ["[uwsgi-fastrouter] unable to resolve host name web: Name or "
                           "service not known (keeping 10.0.0.1)"]
    t.due(75.0)
    assert t.resolved("web", ["10.0.0.9"], 75.0) is True
    assert t.lines[2:] == ["[uwsgi-fastrouter] host name web resolves again",
                           "[uwsgi-fastrouter] host name web now resolves to 10.0.0.9"]


def test_an_empty_answer_is_a_failure_and_peer_bytes_in_reasons_are_escaped():
    t = table()
    t.add("web", 0.0)
    t.due(0.0)
    assert t.resolved("web", [], 0.0) is False
    t.due(10.0)
    t.failed("web", "odd\x1b[2Jreason\n", 10.0)
    assert t.addresses("web") is None
    assert len(t.lines) == 1 and "no address found" in t.lines[0]
    assert "its nodes count as failed until it resolves" in t.lines[0]


def test_interval_zero_resolves_once_but_keeps_trying_until_the_first_success():
    t = table(interval=0)
    t.add("web", 0.0)
    t.due(0.0)
    t.failed("web", "timeout", 0.0)
    assert t.next_due() == RETRY_DELAY
    t.due(RETRY_DELAY)
    t.resolved("web", ["10.0.0.1"], RETRY_DELAY)
    assert t.next_due() is None and t.due(1e9) == []


def test_a_lookup_that_does_not_answer_times_out_and_its_late_answer_is_ignored():
    t = table(timeout=30)
    t.add("web", 0.0)
    t.due(0.0)
    assert t.next_due() == 30.0
    assert t.time_out(29.9) == [] and t.time_out(30.0) == ["web"]
    assert "no answer within 30 seconds" in t.lines[0] and len(t.lines) == 1
    assert t.resolved("web", ["10.0.0.1"], 31.0, started=0.0) is False
    assert t.addresses("web") is None
    assert t.due(35.0) == ["web"]
    assert t.resolved("web", ["10.0.0.1"], 36.0, started=0.0) is False, "an older lookup's answer"
    assert t.resolved("web", ["10.0.0.1"], 36.0, started=35.0) is True


def test_the_table_is_bounded_and_forgets_announced_names_nobody_asks_for():
    t = table(max_names=2, idle=100)
    assert t.add("pinned", 0.0) is not None
    assert t.add("announced", 0.0, pinned=False) is not None
    assert t.add("third", 50.0, pinned=False) is None and t.refused == 1
    assert t.add("announced", 60.0, pinned=False) is not None      # asked for again
    assert t.add("third", 150.0, pinned=False) is None
    assert t.add("third", 160.0, pinned=False) is not None, "announced went idle at 160"
    assert set(t.entries) == {"pinned", "third"}
    assert t.forget_idle(1e9) == 1 and set(t.entries) == {"pinned"}


# --------------------------------------------------------------------------- the router

def test_every_address_of_a_name_is_a_static_node_balanced_round_robin():
    router = Router(to=["web:3031", "127.0.0.1:9"])
    assert [n.name for n in router.static_nodes] == ["web:3031", "127.0.0.1:9"]
    router.resolve_names({"web": ("10.0.0.1", "10.0.0.2", "10.0.0.3")}.get)
    picks = [router.route(b"k").address for _ in range(8)]
    assert picks == [b"10.0.0.1:3031", b"10.0.0.2:3031", b"10.0.0.3:3031", b"127.0.0.1:9"] * 2


def test_a_new_answer_keeps_the_counters_and_marks_of_the_nodes_that_stay():
    clock = [1000.0]
    router = Router(to=["web:3031"], wall_clock=lambda: clock[0])
    router.resolve_names({"web": ("10.0.0.1", "10.0.0.2")}.get)
    nodes = list(router.static_nodes)
    stats_view = router.static_nodes            # the stats hold the list itself
    route = router.route(b"k")
    router.connect_failed(route, b"k", 0, "refused", log_it=False)
    router.connected(router.route(b"k"))
    router.resolve_names({"web": ("10.0.0.2", "10.0.0.4")}.get)
    assert [n.name for n in stats_view] == ["10.0.0.2:3031", "10.0.0.4:3031"]
    assert stats_view[0] is nodes[1] and stats_view[0].hits == 1
    assert nodes[0].dead_since and not stats_view[1].dead_since


def test_fallback_names_expand_in_order():
    router = Router(to=["127.0.0.1:1"], fallback=["fb:80", "127.0.0.1:2"])
    router.resolve_names({"fb": ("10.0.0.1", "10.0.0.2")}.get)
    first = router.route(b"k")
    order = []
    route, retries, index = first, 0, 0
    while True:
        route, retries, index = router.next_route(b"k", route, retries, index)
        if route is None:
            break
        order.append(route.address)
    assert order == [b"10.0.0.1:80", b"10.0.0.2:80", b"127.0.0.1:2"]


def test_literal_only_configurations_keep_no_name_state():
    router = Router(to=["127.0.0.1:1"], fallback=["/run/x.sock"])
    assert router.configured_to is None and router.configured_fallback is None
    assert router.host_names == []


# --------------------------------------------------------------------------- the resolver

class Lookups:
    """An injected lookup: answers from *answers* (a list is an answer, an exception is
    raised), counting calls; *gate*, when set, holds every lookup until it opens."""

    def __init__(self, answers: Dict[str, object]) -> None:
        self.answers = answers
        self.calls: List[str] = []
        self.gate = None

    def __call__(self, name: str) -> Sequence[str]:
        self.calls.append(name)
        if self.gate is not None:
            assert self.gate.wait(30)
        answer = self.answers[name]
        if isinstance(answer, Exception):
            raise answer
        return answer


def named_router(engine, router: Router, lookup: Lookups, **table_options) -> Resolver:
    """Wire *router*'s names to a resolver on *engine*'s loop, as runtime.py does."""
    table_options.setdefault("interval", 60)
    resolver = Resolver(engine.reactor, NameTable(log=names_module_log(), **table_options),
                        lookup=lookup)
    for name in router.host_names:
        resolver.watch(name)
    resolver.on_change.append(lambda: router.resolve_names(resolver.addresses))
    router.resolve_names(resolver.addresses)
    resolver.start()
    return resolver


def names_module_log():
    from uwsgi_fastrouter.log import log
    return log


def test_until_a_name_resolves_it_is_a_dead_node_then_its_address_serves(engines, log_lines):
    node, live = tcp_listener()
    fallback, fallback_address = tcp_listener()
    port = int(live.rsplit(":", 1)[1])
    lookup = Lookups({"web.test": ["127.0.0.1"]})
    lookup.gate = threading.Event()
    with node, fallback:
        router = Router(to=["web.test:%d" % port], fallback=[fallback_address])
        engine = engines(router)
        resolver = named_router(engine, router, lookup)
        client, session = engine.client(uwsgi_packet(GET))
        engine.until(lambda: session.state == RELAY, "served by the fallback")
        conn, _ = fallback.accept()
        conn.close()
        assert 'unable to connect() to node "web.test:%d" (0 retries): ' % port in log_lines.getvalue()
        assert "the host name 'web.test' has no known address" in log_lines.getvalue()
        lookup.gate.set()
        engine.until(lambda: resolver.addresses("web.test") is not None, "the answer")
        assert [n.name for n in router.static_nodes] == [live]
        client, session = engine.client(uwsgi_packet(GET))
        engine.until(lambda: session.state == RELAY, "served by the resolved node")
        conn, _ = node.accept()
        with conn:
            assert read_packet(conn) == uwsgi_packet(GET)
        resolver.stop()


def test_a_lookup_that_hangs_never_stops_the_loop_and_times_out(engines, log_lines):
    node, live = tcp_listener()
    lookup = Lookups({"slow.test": ["127.0.0.9"]})
    lookup.gate = threading.Event()
    with node:
        router = Router(to=[live])
        engine = engines(router)
        resolver = Resolver(engine.reactor, NameTable(interval=60, timeout=30,
                                                     log=names_module_log()), lookup=lookup)
        resolver.start()
        resolver.watch("slow.test")
        engine.until(lambda: lookup.calls == ["slow.test"], "the lookup started")
        for _ in range(3):          # other clients are served while the lookup hangs
            client, session = engine.client(uwsgi_packet(GET))
            engine.until(lambda: session.state == RELAY, "served")
            node.accept()[0].close()
        engine.advance(30)
        assert "unable to resolve host name slow.test: no answer within 30 seconds" \
            in log_lines.getvalue()
        assert resolver.busy == 1, "the stuck thread keeps its slot"
        lookup.gate.set()
        engine.until(lambda: resolver.busy == 0, "the late answer")
        assert resolver.addresses("slow.test") is None, "a timed-out lookup's answer is ignored"
        resolver.stop()


def test_a_name_that_stops_resolving_keeps_serving_its_last_addresses(engines, log_lines):
    node, live = tcp_listener()
    port = int(live.rsplit(":", 1)[1])
    lookup = Lookups({"web.test": ["127.0.0.1"]})
    with node:
        router = Router(to=["web.test:%d" % port])
        engine = engines(router)
        resolver = named_router(engine, router, lookup, interval=10)
        engine.until(lambda: resolver.addresses("web.test") is not None, "the first answer")
        lookup.answers["web.test"] = OSError(-2, "Name or service not known \x1b[31m")
        for _ in range(3):
            calls = len(lookup.calls)
            engine.advance(10)
            engine.until(lambda: len(lookup.calls) > calls and resolver.busy == 0, "a lookup")
        text = log_lines.getvalue()
        assert text.count("unable to resolve host name web.test") == 1
        assert "\x1b" not in text and "\\x1b[31m" in text
        client, session = engine.client(uwsgi_packet(GET))
        engine.until(lambda: session.state == RELAY, "served by the last address")
        node.accept()[0].close()
        resolver.stop()


def test_lookups_run_at_most_max_threads_at_once(engines):
    lookup = Lookups({"n%d.test" % i: ["127.0.0.%d" % (i + 1)] for i in range(6)})
    lookup.gate = threading.Event()
    engine = engines(Router())
    resolver = Resolver(engine.reactor, NameTable(interval=60), lookup=lookup, max_threads=2)
    resolver.start()
    for i in range(6):
        resolver.watch("n%d.test" % i)
    engine.until(lambda: len(lookup.calls) == 2, "two lookups")
    engine.advance(2)
    assert resolver.busy == 2 and len(lookup.calls) == 2
    lookup.gate.set()
    for _ in range(10):
        engine.advance(1)
        if all(resolver.addresses("n%d.test" % i) for i in range(6)):
            break
        engine.until(lambda: resolver.busy == 0, "answers")
    assert all(resolver.addresses("n%d.test" % i) for i in range(6))
    resolver.stop()


def test_a_process_without_names_starts_no_thread(engines):
    before = threading.active_count()
    engine = engines(Router(to=["127.0.0.1:1"]))
    engine.advance(120)
    assert threading.active_count() == before


# --------------------------------------------------------------------------- announced names

def announce_packet(key: bytes, address: bytes, unsubscribe: bool = False) -> bytes:
    return build_announcement(key, address, unsubscribe=unsubscribe)


def subscription_server(engine, names=None):
    table = SubscriptionTable()
    server = SubscriptionServer(engine.reactor, table, [], wall_clock=time.time, names=names)
    return table, server


def node_names(table, key: bytes) -> List[bytes]:
    pool = table.pool(key)
    return sorted(node.name for node in pool.nodes) if pool is not None else []


def test_announced_names_are_kept_as_given_unless_resolving_is_allowed(engines):
    engine = engines(Router())
    table, server = subscription_server(engine)
    assert server.handle(announce_packet(b"example.com", b"web.test:3031")) is not None
    assert node_names(table, b"example.com") == [b"web.test:3031"]


def test_an_allowed_announced_name_becomes_one_node_per_address(engines, log_lines):
    engine = engines(Router())
    lookup = Lookups({"web.test": ["127.0.0.2", "127.0.0.3"]})
    resolver = Resolver(engine.reactor, NameTable(interval=60), lookup=lookup)
    resolver.start()
    table, server = subscription_server(engine, resolver)
    packet = announce_packet(b"example.com", b"web.test:3031")
    assert server.handle(packet) is None
    assert "host name not resolved yet" in log_lines.getvalue()
    engine.until(lambda: resolver.addresses("web.test") is not None, "the answer")
    assert server.handle(packet) is not None
    assert node_names(table, b"example.com") == [b"127.0.0.2:3031", b"127.0.0.3:3031"]
    server.handle(announce_packet(b"example.com", b"web.test:3031", unsubscribe=True))
    assert node_names(table, b"example.com") == []
    resolver.stop()


def test_announced_names_are_bounded_and_other_announces_still_apply(engines, log_lines):
    engine = engines(Router())
    lookup = Lookups({})
    resolver = Resolver(engine.reactor, NameTable(interval=60, max_names=3), lookup=lookup)
    table, server = subscription_server(engine, resolver)
    for i in range(50):
        server.handle(announce_packet(b"k%d" % i, b"flood%d.test:80" % i))
    assert len(resolver.table.entries) == 3 and resolver.table.refused == 47
    assert "too many host names to resolve" in log_lines.getvalue()
    assert server.handle(announce_packet(b"example.com", b"127.0.0.1:3031")) is not None
    assert node_names(table, b"example.com") == [b"127.0.0.1:3031"]


def test_an_announced_address_with_control_bytes_is_no_name_and_is_logged_escaped(engines,
                                                                                   log_lines):
    engine = engines(Router())
    resolver = Resolver(engine.reactor, NameTable(interval=60), lookup=Lookups({}))
    table, server = subscription_server(engine, resolver)
    server.handle(announce_packet(b"example.com", b"evil\x1b[2J.test:80"))
    assert resolver.table.entries == {}
    assert "\x1b" not in log_lines.getvalue()


# --------------------------------------------------------------------------- the subscriber

def test_a_named_subscription_server_gets_the_packet_at_every_address(engines):
    first = Receiver()
    port = int(first.server.rsplit(":", 1)[1])
    second = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    second.bind(("127.0.0.2", port))
    engine = engines(Router())
    lookup = Lookups({"routers.test": ["127.0.0.1", "127.0.0.2"]})
    resolver = Resolver(engine.reactor, NameTable(interval=60), lookup=lookup)
    lines: List[str] = []
    sub = subscriber(engine.reactor, ["routers.test:%d:example.com" % port], lines, names=resolver)
    with second:
        sub.start()
        assert sub.errors == 1 and any("is not resolved yet" in line for line in lines)
        engine.until(lambda: sub.sent == 2, "a round to both addresses")
        for packet in (first.get(), second.recv(65536)):
            assert announcement_vars(packet)[b"key"] == b"example.com"
        sub.stop()
        assert sub.sent == 4, "the unsubscribe round went to both too"
        assert first.get()[3] == 1 and second.recv(65536)[3] == 1
    first.sock.close()


def test_a_master_copies_a_resolved_announce_to_its_routers_once_per_address(engines):
    engine = engines(Router())
    lookup = Lookups({"web.test": ["127.0.0.2", "127.0.0.3"]})
    resolver = Resolver(engine.reactor, NameTable(interval=60), lookup=lookup)
    resolver.start()
    table, server = subscription_server(engine, resolver)
    copies: list = []
    server.on_accepted = lambda announcement, pid, uid, gid: copies.append(announcement)
    packet = announce_packet(b"example.com", b"web.test:3031")
    server.handle(packet)
    engine.until(lambda: resolver.addresses("web.test") is not None, "the answer")
    server.handle(packet)
    server.handle(announce_packet(b"example.com", b"127.0.0.9:1"))
    assert [c.address for c in copies] == [b"127.0.0.2:3031", b"127.0.0.3:3031", b"127.0.0.9:1"]
    child_table, child = subscription_server(engine)          # a router process: no resolver
    child.apply_mirrored([(None, None, None, tuple(c)) for c in copies])   # as the master sends them
    assert node_names(child_table, b"example.com") == node_names(table, b"example.com")
    resolver.stop()
