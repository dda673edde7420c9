"""The subscription table's expiry sweep, a step per pass of the loop (expiry.py).

The sweep must expire exactly what a sweep made in one go expires (every stale node,
no fresh one; held nodes marked and kept; drains past their time ended), look at a
bounded number of pools and nodes per step, and let the loop serve what is ready
between two steps; end to end, with and without ``--master``, every key of a big
table that stops announcing goes.
"""

from __future__ import annotations

import socket

import pytest

from backends import RecordingBackend
from support import fetch_stats, start_router, wait_until
from uwsgi_fastrouter.expiry import SlicedExpiry
from uwsgi_fastrouter.reactor import Reactor
from uwsgi_fastrouter.subscription import SubscriptionTable, build_announcement, parse_announcement

T0 = 1_700_000_000.0


def _announce(table: SubscriptionTable, key: bytes, address: bytes, now: float, **fields):
    return table.announce(parse_announcement(build_announcement(key, address, **fields)), now)


def _mixed_table(log: list) -> SubscriptionTable:
    """3,000 keys with 1 to 4 nodes each: some fresh, some stale, some stale but held by
    a session, some draining past their time, some draining within it."""
    table = SubscriptionTable(tolerance=10, max_keys=5000, drain_timeout=30, log=log.append)
    for i in range(3000):
        key = b"k%04d.example.com" % i
        for n in range(1 + i % 4):
            stale = (i + n) % 3 == 0
            node = _announce(table, key, b"10.0.%d.%d:80" % (n, i % 250), T0 - 20 if stale else T0)
            if i % 11 == 0 and stale:
                node.ref = 1                               # a session holds it
            if i % 13 == 0 and not stale:
                node.ref = 1
                table._drain(node, T0 - (40 if n % 2 else 5))   # past drain_timeout, or not yet
    return table


def _state(table: SubscriptionTable) -> list:
    return [(pool.key, pool.draining, [(n.name, n.death_mark, n.failcnt, n.ref, n.draining)
                                       for n in pool.nodes])
            for pool in table.pools_now()]


def test_the_steps_expire_exactly_what_one_sweep_expires():
    one_log: list = []
    steps_log: list = []
    one, stepped = _mixed_table(one_log), _mixed_table(steps_log)
    del one_log[:], steps_log[:]
    removed = one.expire(T0 + 1)
    before = stepped.node_count
    steps = sum(1 for _ in stepped.expiry_steps(lambda: T0 + 1, step=100))
    assert steps > 50                          # many steps, not one
    assert before - stepped.node_count == removed > 1000
    assert _state(stepped) == _state(one)
    assert steps_log == one_log and any("no announce received" in line for line in one_log)
    assert any("after draining for 30 seconds" in line for line in one_log)


def test_each_step_looks_at_a_bounded_number_of_pools_and_nodes():
    """Each key has one stale node: a step of 100 (a pool and its node count 2)
    removes at most 50 keys."""
    table = SubscriptionTable(tolerance=10, max_keys=5000)
    for i in range(2000):
        _announce(table, b"k%04d" % i, b"10.0.0.1:80", T0 - 20)
    steps = table.expiry_steps(lambda: T0, step=100)
    sizes = []
    left = len(table)
    for _ in steps:
        sizes.append(left - len(table))
        left = len(table)
    sizes.append(left - len(table))
    assert table.empty
    assert max(sizes) <= 50 and sum(sizes) == 2000 and len(sizes) >= 40


def test_the_clock_is_read_before_each_step():
    """A node that passes the tolerance while the sweep is under way goes in that sweep
    if its pool's turn comes after that moment."""
    table = SubscriptionTable(tolerance=10, max_keys=5000)
    for i in range(1000):
        _announce(table, b"k%04d" % i, b"10.0.0.1:80", T0)
    clock = [T0 + 10]                          # nothing is stale yet
    steps = table.expiry_steps(lambda: clock[0], step=100)
    next(steps)
    assert len(table) == 1000
    clock[0] = T0 + 11.5                       # now every node is stale
    for _ in steps:
        pass
    assert 900 <= 1000 - len(table) < 1000     # every pool not looked at yet


def test_pools_removed_or_added_during_the_sweep():
    log: list = []
    table = SubscriptionTable(tolerance=10, max_keys=5000, log=log.append)
    for i in range(1000):
        _announce(table, b"k%04d" % i, b"10.0.0.1:80", T0 - 20)
    steps = table.expiry_steps(lambda: T0, step=100)
    next(steps)
    # a key the sweep has not reached yet unsubscribes; one it has passed comes back
    _announce(table, b"k0900", b"10.0.0.1:80", T0, unsubscribe=True)
    assert table.pool(b"k0900") is None
    _announce(table, b"k0000", b"10.0.0.2:80", T0)
    _announce(table, b"new", b"10.0.0.3:80", T0)
    for _ in steps:
        pass
    assert sorted(pool.key for pool in table.pools_now()) == [b"k0000", b"new"]
    assert sum("no announce received" in line for line in log) == 999   # k0900 went before


# --------------------------------------------------------------------------
# On the loop


def _sweep_on(reactor: Reactor, pools: int, **kwargs) -> SlicedExpiry:
    table = SubscriptionTable(tolerance=10, max_keys=pools + 10, log=kwargs.pop("log", lambda line: None))
    for i in range(pools):
        _announce(table, b"k%05d" % i, b"10.0.0.1:80", T0 - 20)
    return SlicedExpiry(reactor, table, clock=lambda: T0, **kwargs)


def _one_pass(reactor: Reactor) -> None:
    reactor.stop()
    reactor.run()                              # stopped before run(): exactly one pass


def test_the_loop_serves_ready_clients_between_two_steps():
    reactor = Reactor()
    done = []
    expiry = _sweep_on(reactor, 5000, on_done=lambda: done.append(1))
    served = []
    a, b = socket.socketpair()
    try:
        reactor.add_reader(a.fileno(), lambda: served.append(a.recv(16)))
        expiry()                               # the tick: the first step
        assert expiry.running and len(expiry.table) < 5000
        b.send(b"x")                           # a client's bytes arrive meanwhile
        _one_pass(reactor)
        assert served == [b"x"] and expiry.running and not done
        passes = 0
        while expiry.running:
            _one_pass(reactor)
            passes += 1
        assert expiry.table.empty and done == [1] and passes > 5
        assert expiry.started == expiry.finished == 1
    finally:
        reactor.remove_reader(a.fileno())
        a.close()
        b.close()
        reactor.close()


def test_a_new_second_lets_the_sweep_under_way_finish():
    reactor = Reactor()
    try:
        expiry = _sweep_on(reactor, 3000)
        expiry()
        left = len(expiry.table)
        expiry()                               # the next tick, while the sweep goes on
        assert expiry.started == 1 and len(expiry.table) == left
        while expiry.running:
            _one_pass(reactor)
        assert expiry.table.empty
        expiry()                               # a later tick starts a new sweep
        assert expiry.started == 2
    finally:
        reactor.close()


def test_a_quiet_sweep_logs_nothing_and_a_loud_one_every_expiry():
    for quiet in (True, False):
        reactor = Reactor()
        lines: list = []
        try:
            expiry = _sweep_on(reactor, 1200, quiet=quiet, log=lines.append)
            expiry()
            while expiry.running:
                _one_pass(reactor)
            assert expiry.table.empty
            assert sum("no announce received" in line for line in lines) == (0 if quiet else 1200)
        finally:
            reactor.close()


def test_a_step_that_fails_does_not_stop_the_next_sweeps():
    reactor = Reactor()
    try:
        expiry = _sweep_on(reactor, 10)
        expiry.table.expiry_steps = lambda clock: iter(_raises())
        with pytest.raises(RuntimeError):
            expiry()
        assert not expiry.running
    finally:
        reactor.close()


def _raises():
    raise RuntimeError("broken")
    yield  # pragma: no cover


# --------------------------------------------------------------------------
# End to end


@pytest.mark.parametrize("master", [False, True], ids=["single", "master"])
def test_every_key_of_a_big_table_that_stops_announcing_expires(tmp_path, master):
    """2,000 keys announce once: each is logged as failed once (by the master under
    ``--master``), the stats end up empty, and every router process, whose copy of
    the table empties by its own sweeps, goes cheap."""
    sub = str(tmp_path / "sub.sock")
    keys = 2000
    extra = ["--master", "--fastrouter-processes", "2"] if master else []
    with RecordingBackend("a") as node:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-subscription-server", sub,
                               "--fastrouter-stats", "127.0.0.1:0", "--fastrouter-cheap",
                               "--subscription-tolerance", "3"] + extra)
        router.wait_for_log(r"subscription server bound on")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            for i in range(keys):
                s.sendto(build_announcement(b"k%05d.example.com" % i, node.address.encode(), cores=1), sub)
        router.wait_for_log(r"k%05d\.example\.com => new node" % (keys - 1), timeout=30)
        router.wait_for_log(r"no announce received", timeout=30)
        wait_until(lambda: router.count(r"no announce received in 3 seconds") == keys, timeout=60,
                   interval=0.1, what="every key logged as expired")
        wait_until(lambda: fetch_stats(router.stats_address)["subscriptions"] == [], timeout=30,
                   interval=0.1, what="no pool left in the stats")
        router.wait_for_log(r"no more nodes available. Going cheap", count=2 if master else 1, timeout=30)
        assert router.count(r"no announce received") == keys     # each once, by one table
