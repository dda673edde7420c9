"""Active health checks (--fastrouter-health-check-*): the uwsgi PING against real
uWSGI 2.0.31 nodes, static and subscribed, with and without --master."""

from __future__ import annotations

import os
import re
import signal

import pytest

from support import (fetch_stats, json_answer, node_app_source, request_vars, sock_path,
                     start_router, start_uwsgi_app, uwsgi_request, wait_until)
from test_metrics import metrics_address, scrape, value
from uwsgi_fastrouter.health import PING, HealthChecker, HealthState, is_pong
from uwsgi_fastrouter.router import Router
from uwsgi_fastrouter.subscription import SubscriptionTable, build_announcement, parse_announcement

MASTER = pytest.mark.parametrize("master", [[], ["--master"]], ids=["single", "master"])
CHECKS = ["--fastrouter-health-check-interval", "1", "--fastrouter-health-check-deadline", "1",
          "--fastrouter-health-check-fails", "2", "--fastrouter-health-check-passes", "2"]
T0 = 1_700_000_000.0


def node_of(router, host: str = "example.com") -> str:
    raw = uwsgi_request(router.addresses[0], request_vars(host))
    return json_answer(raw)["node"]


def ann(address: bytes, key: bytes = b"k", **kw):
    return parse_announcement(build_announcement(key, address, **kw))


# ---------------------------------------------------------------------------
# The pure parts: counting, transitions, the mappers skipping a down node


class Changes(list):
    def __call__(self, address, up):
        self.append((address, up))


def checker(changes, fails=3, passes=2):
    lines = []
    return HealthChecker(None, lambda: [], changes, interval=1, timeout=1, fails=fails,
                         passes=passes, log=lines.append), lines


def test_the_ping_packet_and_the_pong_uwsgi_sends():
    assert PING == bytes([100, 0, 0, 0])
    assert is_pong(bytes.fromhex("64000001"))     # what uWSGI 2.0.31 answers
    assert not is_pong(b"HTTP") and not is_pong(b"\x64\x00")


def test_fails_in_a_row_mark_down_and_passes_in_a_row_mark_up():
    changes = Changes()
    health, lines = checker(changes)
    state = HealthState(b"/run/\x1bnode.sock")
    for error in ("refused", None, "refused", "refused"):
        health.record(state, error)
    assert state.up and changes == []                # the pass broke the run
    health.record(state, "timed out")
    assert not state.up and changes == [(b"/run/\x1bnode.sock", False)]
    assert "\\x1b" in lines[0] and "\x1b" not in lines[0]   # the address escaped
    health.record(state, None)
    health.record(state, "refused")
    health.record(state, None)
    assert not state.up                              # passes must be in a row
    health.record(state, None)
    assert state.up and changes[-1] == (b"/run/\x1bnode.sock", True)
    assert (state.went_down, state.went_up, state.checks, state.failures) == (1, 1, 9, 5)
    health.states[state.address] = state
    assert health.totals() == [9, 5, 1, 1, 0]
    assert len(lines) == 2                           # one line per transition


def test_static_nodes_marked_down_are_skipped_and_come_back():
    router = Router(to=["a:1", "b:1", "c:1"])
    router.node_health_changed(b"b:1", False)
    assert [router.route(b"k").address for _ in range(4)] == [b"a:1", b"c:1", b"a:1", b"c:1"]
    router.node_health_changed(b"a:1", False)
    router.node_health_changed(b"c:1", False)
    assert router.route(b"k") is None
    router.node_health_changed(b"b:1", True)
    assert router.route(b"k").address == b"b:1"


def test_fallbacks_marked_down_are_skipped():
    router = Router(to=["a:1"], fallback=["f1:1", "f2:1"])
    router.node_health_changed(b"f1:1", False)
    route, index = router._retry_route(b"k", None, 0)
    assert route.address == b"f2:1" and index == 2
    assert router._retry_route(b"k", None, index) == (None, 2)


def test_a_down_subscribed_node_is_skipped_in_every_key_and_a_backup_takes_over():
    table = SubscriptionTable(tolerance=10 ** 6)
    table.health_checked = True
    table.announce(ann(b"a:1"), T0)
    table.announce(ann(b"b:1", backup=1), T0)
    table.announce(ann(b"a:1", key=b"other"), T0)
    table.set_down(b"a:1", True, T0)
    assert table.lookup(b"k", T0).name == b"b:1"
    assert table.lookup(b"other", T0) is None and not table.empty   # no cheap mode
    assert table.pool(b"k").by_address[b"a:1"].health == "down"
    table.announce(ann(b"a:1"), T0 + 1)                # announcing does not bring it back
    assert table.lookup(b"k", T0 + 1).name == b"b:1"
    table.set_down(b"a:1", False, T0 + 2)
    assert table.lookup(b"k", T0 + 2).name == b"a:1"
    table.announce(ann(b"c:1"), T0 + 3)
    assert table.pool(b"k").by_address[b"c:1"].health == "up"


def test_without_health_checks_the_stats_show_no_health():
    table = SubscriptionTable()
    node = table.announce(ann(b"a:1"), T0)
    assert node.health is None


def test_probes_are_bounded_one_per_address_and_a_silent_node_times_out():
    """Five nodes whose listen queue takes the connection but nobody answers, at most
    two probes at a time, rounds faster than the deadline."""
    import socket
    from uwsgi_fastrouter.reactor import Reactor
    listeners = []
    for _ in range(5):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)                    # never accepted
        listeners.append(sock)
    addresses = [b"127.0.0.1:%d" % s.getsockname()[1] for s in listeners]
    reactor = Reactor()
    changes = Changes()
    in_flight = []

    def on_change(address, up):
        changes(address, up)
        if len(changes) == len(addresses):
            reactor.stop()

    health = HealthChecker(reactor, lambda: addresses, on_change, interval=0.05, timeout=0.3,
                           fails=1, passes=1, max_probes=2, log=lambda line: None)
    fill = health._fill

    def watched_fill():
        fill()
        states = [probe.state for probe in health.probes.values()]
        in_flight.append((len(states), len(set(map(id, states)))))

    health._fill = watched_fill
    health.start()
    safety = reactor.call_later(30, reactor.stop)
    try:
        reactor.run()
    finally:
        safety.cancel()
        health.stop()
        reactor.close()
        for sock in listeners:
            sock.close()
    assert sorted(changes) == sorted((a, False) for a in addresses)
    assert max(n for n, _ in in_flight) == 2
    assert all(n == unique for n, unique in in_flight)        # one probe per address
    assert all(s.last_error == "timed out" for s in health.states.values())


# ---------------------------------------------------------------------------
# Real uWSGI 2.0.31 nodes


def _stop_group(proc, sig):
    os.killpg(proc.pid, sig)     # the master and its worker


@pytest.mark.interop
@MASTER
def test_a_stopped_static_node_goes_down_before_a_request_hits_it_and_comes_back(
        sock_dir, master, procs):
    sockets = [sock_path(sock_dir, "a.sock"), sock_path(sock_dir, "b.sock")]
    node_a = start_uwsgi_app(sock_dir, node_app_source("a"), socket=sockets[0])
    node_b = start_uwsgi_app(sock_dir, node_app_source("b"), socket=sockets[1])
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", sockets[0],
                           "--fastrouter-to", sockets[1], "--fastrouter-stats", "127.0.0.1:0",
                           "--fastrouter-metrics", "127.0.0.1:0", *CHECKS, *master])
    metrics = metrics_address(router)
    assert {node_of(router) for _ in range(4)} == {"a", "b"}
    node_b.stop()
    router.wait_for_log(r"health check: node %s is down \(2 failed checks"
                        % re.escape(sockets[1]))
    before = router.count("unable to connect")
    assert {node_of(router) for _ in range(6)} == {"a"}
    assert router.count("unable to connect") == before     # no request went to b
    stats = fetch_stats(router.stats_address)
    assert [n["health"] for n in stats["static_nodes"]] == ["up", "down"]
    samples = scrape(metrics)
    assert value(samples, "uwsgi_fastrouter_health_transitions_total", to="down") == 1
    assert value(samples, "uwsgi_fastrouter_health_nodes_down") == 1
    assert value(samples, "uwsgi_fastrouter_health_check_failures_total") >= 2
    start_uwsgi_app(sock_dir, node_app_source("b"), socket=sockets[1])
    router.wait_for_log(r"health check: node %s is up again \(2 passed checks"
                        % re.escape(sockets[1]))
    wait_until(lambda: node_of(router) == "b", what="requests reaching b again")
    assert node_a.alive()


@pytest.mark.interop
@MASTER
def test_a_sigstopped_subscribed_node_times_out_goes_down_and_up_after_sigcont(
        sock_dir, master, procs):
    sub = str(sock_dir / "sub.sock")
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-subscription-server",
                           sub, "--fastrouter-stats", "127.0.0.1:0", *CHECKS, *master])
    router.wait_for_log(r"subscription server bound on")
    subscribe = ["--subscribe-to", "%s:example.com" % sub]
    node_a = start_uwsgi_app(sock_dir, node_app_source("a"), socket="127.0.0.1:0",
                             extra=subscribe)
    node_b = start_uwsgi_app(sock_dir, node_app_source("b"), socket="127.0.0.1:0",
                             extra=subscribe)
    router.wait_for_log(r"example.com => new node: %s" % node_b.address)
    fetch_stats(router.stats_address)      # applied by every router process
    wait_until(lambda: {node_of(router) for _ in range(4)} == {"a", "b"}, what="both nodes used")
    _stop_group(node_b, signal.SIGSTOP)    # accepts into its backlog, never answers
    try:
        router.wait_for_log(r"health check: node %s is down \(2 failed checks, last: timed out"
                            % re.escape(node_b.address))
        assert {node_of(router) for _ in range(6)} == {"a"}
        stats = fetch_stats(router.stats_address)
        health = {n["name"]: n["health"] for n in stats["subscriptions"][0]["nodes"]}
        assert health == {node_a.address: "up", node_b.address: "down"}
    finally:
        _stop_group(node_b, signal.SIGCONT)
    router.wait_for_log(r"health check: node %s is up again" % re.escape(node_b.address))
    wait_until(lambda: node_of(router) == "b", what="requests reaching b again")


@pytest.mark.interop
def test_checks_are_off_by_default(sock_dir, procs):
    socket_a = sock_path(sock_dir, "a.sock")
    node = start_uwsgi_app(sock_dir, node_app_source("a"), socket=socket_a)
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", socket_a,
                           "--fastrouter-stats", "127.0.0.1:0"])
    assert node_of(router) == "a"
    assert "health" not in fetch_stats(router.stats_address)["static_nodes"][0]
    assert node.count(r"^PING") == 0
