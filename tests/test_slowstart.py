"""Slow start (--subscription-slow-start): a (re)joining node's weight ramps up.

Pure: every test drives the table with an injected ``now``.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uwsgi_fastrouter.slowstart import FLOOR, pick_ramped, ramp_factor
from uwsgi_fastrouter.subscription import (Node, SubscriptionTable, build_announcement,
                                           parse_announcement)

T0 = 1_700_000_000.0
RAMP = 100


def ann(key=b"k", address=b"a:1", **kw):
    return parse_announcement(build_announcement(key, address, **kw))


def table_with_old_node(algo="wrr", slow_start=RAMP, **kw):
    """A table whose key k has node a:1 (joined long ago) and b:1 joining at T0."""
    table = SubscriptionTable(algo=algo, slow_start=slow_start, tolerance=10 ** 6)
    table.announce(ann(address=b"a:1", **kw), T0 - 10 * RAMP)
    table.lookup(b"k", T0 - 5 * RAMP)      # a:1's ramp is over
    table.release(table.pool(b"k").nodes[0])
    table.announce(ann(address=b"b:1", **kw), T0)
    return table


def share_of(table, address, now, picks=1100, release=True):
    counts = Counter()
    for _ in range(picks):
        node = table.lookup(b"k", now)
        counts[node.name] += 1
        if release:
            table.release(node)
    return counts[address] / picks


def test_factor_ramps_linearly_from_the_floor_to_one():
    assert ramp_factor(T0, T0, RAMP) == FLOOR
    assert ramp_factor(T0, T0 + RAMP / 2, RAMP) == pytest.approx(FLOOR + (1 - FLOOR) / 2)
    assert ramp_factor(T0, T0 + RAMP, RAMP) == 1.0
    assert ramp_factor(0.0, T0, RAMP) == 1.0        # no ramp
    assert ramp_factor(T0, T0 - 5, RAMP) == FLOOR   # the clock stepped back


@pytest.mark.parametrize("elapsed, expected", [(0, 0.1 / 1.1), (RAMP / 2, 0.55 / 1.55),
                                               (RAMP, 0.5), (10 * RAMP, 0.5)])
def test_wrr_share_of_a_joining_node_follows_its_ramp(elapsed, expected):
    table = table_with_old_node()
    assert share_of(table, b"b:1", T0 + elapsed) == pytest.approx(expected, abs=0.01)


def test_off_by_default_a_new_node_gets_its_full_share_at_once():
    table = table_with_old_node(slow_start=0)
    assert share_of(table, b"b:1", T0) == 0.5
    assert not table.pool(b"k").ramping


def test_the_ramp_respects_weights():
    table = table_with_old_node(weight=3)
    # b:1 weighs 3 * 0.1 against a:1's 3
    assert share_of(table, b"b:1", T0) == pytest.approx(0.3 / 3.3, abs=0.01)


def test_a_dead_node_that_announces_again_ramps_again():
    table = table_with_old_node()
    now = T0 + 2 * RAMP
    assert share_of(table, b"b:1", now) == 0.5          # ramp over
    assert not table.pool(b"k").ramping
    table.announce(ann(address=b"b:1", unsubscribe=True), now)
    table.announce(ann(address=b"b:1"), now)            # a new node again
    assert share_of(table, b"b:1", now) == pytest.approx(0.1 / 1.1, abs=0.01)
    node = table.pool(b"k").by_address[b"b:1"]
    node.death_mark = 1                                  # failed, still referenced
    node.ref = 1
    table.announce(ann(address=b"b:1"), now + 2 * RAMP)  # revived by its announce
    assert node.ramp_from == now + 2 * RAMP


def test_a_refresh_of_an_alive_node_does_not_restart_its_ramp():
    table = table_with_old_node()
    table.announce(ann(address=b"b:1"), T0 + RAMP / 2)
    assert table.pool(b"k").by_address[b"b:1"].ramp_from == T0


def test_after_the_ramp_credits_are_whole_again_for_the_stats():
    table = table_with_old_node()
    share_of(table, b"b:1", T0 + 1, picks=7)
    share_of(table, b"b:1", T0 + RAMP, picks=3)
    for node in table.pool(b"k").nodes:
        assert isinstance(node.current, int)
        assert isinstance(node.wrr, int)


@pytest.mark.parametrize("algo", ["lrc", "wlrc"])
def test_least_connections_prefer_the_warm_node_until_it_is_busier(algo):
    table = table_with_old_node(algo=algo)
    # one request at a time: b:1 ((0+1)/0.1 = 10) loses to a:1 ((0+1)/1)
    assert share_of(table, b"b:1", T0) == 0.0
    # requests held: a:1 takes ten before b:1's first
    held = [table.lookup(b"k", T0).name for _ in range(11)]
    assert held.count(b"a:1") == 10 and held.count(b"b:1") == 1
    # ramp over: the plain algorithm, both equal
    table2 = table_with_old_node(algo=algo)
    held = [table2.lookup(b"k", T0 + RAMP).name for _ in range(10)]
    assert held.count(b"b:1") == 5


def test_iphash_keys_never_ramp():
    table = table_with_old_node(algo="iphash")
    assert not table.pool(b"k").ramping
    assert table.pool(b"k").by_address[b"b:1"].ramp_from == 0.0


def test_a_key_whose_only_node_ramps_still_gets_every_request():
    table = SubscriptionTable(slow_start=RAMP)
    table.announce(ann(address=b"a:1"), T0)
    assert share_of(table, b"a:1", T0, picks=10) == 1.0


@settings(max_examples=60, deadline=None)
@given(weights=st.lists(st.integers(1, 9), min_size=1, max_size=5),
       ramps=st.lists(st.floats(0, 1.5 * RAMP), min_size=5, max_size=5),
       elapsed=st.floats(0, 2 * RAMP))
def test_wrr_ramped_picks_follow_the_ramped_weights(weights, ramps, elapsed):
    """Over many picks each node's share is its ramped weight over the total."""
    nodes = []
    for i, weight in enumerate(weights):
        node = Node(b"n%d" % i, weight=weight)
        node.ramp_from = T0 - ramps[i] if ramps[i] else 0.0
        nodes.append(node)
    now = T0 + elapsed
    effective = [n.weight * ramp_factor(n.ramp_from, now, RAMP) for n in nodes]
    total = sum(effective)
    picks = 2000
    counts = Counter(pick_ramped(nodes, "wrr", now, RAMP).name for _ in range(picks))
    for node, weight in zip(nodes, effective):
        # smooth WRR is exact up to one pick per node and cycle boundary
        assert abs(counts[node.name] - picks * weight / total) <= len(nodes) + 1
        assert node.ref == counts[node.name]


@settings(max_examples=60, deadline=None)
@given(refs=st.lists(st.integers(0, 20), min_size=1, max_size=6),
       ramps=st.lists(st.floats(0, RAMP), min_size=6, max_size=6))
def test_least_ramped_pick_has_the_least_load_after_the_pick(refs, ramps):
    nodes = []
    for i, ref in enumerate(refs):
        node = Node(b"n%d" % i, weight=1 + i % 3)
        node.ref = ref
        node.ramp_from = T0 - ramps[i] if ramps[i] else 0.0
        nodes.append(node)
    before = {n.name: n.ref for n in nodes}
    chosen = pick_ramped(nodes, "wlrc", T0, RAMP)

    def load(n):
        return (before[n.name] + 1) / (n.weight * ramp_factor(n.ramp_from, T0, RAMP))

    assert load(chosen) == min(load(n) for n in nodes)
    assert chosen.ref == before[chosen.name] + 1
