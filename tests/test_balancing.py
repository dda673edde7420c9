"""uWSGI 2.1's subscription fields and balancing, table level: backup levels, the
algorithm per key, iphash (rendezvous hashing), mountpoint keys, --subscribe2's 2.1 keys."""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter

import pytest

from uwsgi_fastrouter import stats
from uwsgi_fastrouter.balancing import make_client_of, make_scanner, mount_key
from uwsgi_fastrouter.protocol import MalformedVars, encode_vars
from uwsgi_fastrouter.subscriber import SubscribeError, parse_subscribe2
from uwsgi_fastrouter.subscription import (
    SubscriptionError, SubscriptionTable, build_announcement, parse_announcement,
)

T0 = 1_700_000_000.25


def ann(key=b"k", address=b"a:1", **kw):
    return parse_announcement(build_announcement(key, address, **kw))


def datagram(pairs) -> bytes:
    block = encode_vars(pairs)
    return struct.pack("<BHB", 224, len(block), 0) + block


KA = [(b"key", b"k"), (b"address", b"a:1")]


# ---------------------------------------------------------------------------
# The packet


def test_the_21_fields_are_parsed():
    a = parse_announcement(datagram(KA + [(b"backup", b"2"), (b"algo", b"lrc"), (b"proto", b"h"),
                                          (b"vassal", b"app.ini")]))
    assert (a.backup, a.algo, a.proto, a.vassal, a.v21) == (2, b"lrc", b"h", b"app.ini", True)


def test_a_20_packet_has_no_21_fields():
    a = parse_announcement(datagram(KA))
    assert (a.backup, a.algo, a.proto, a.vassal, a.v21) == (0, None, None, None, False)


@pytest.mark.parametrize("pair", [
    (b"backup", b"-1"), (b"backup", b"x"), (b"backup", b"65536"), (b"backup", b""),
    (b"algo", b"roundrobin"), (b"algo", b"WRR"), (b"proto", b"hh"), (b"proto", b"1"),
    (b"proto", b"\n"), (b"vassal", b"v" * 256),
])
def test_bad_21_values_are_refused(pair):
    with pytest.raises(SubscriptionError):
        parse_announcement(datagram(KA + [pair]))


def test_build_writes_the_21_fields_only_when_given():
    plain = build_announcement(b"k", b"a:1")
    assert b"backup" not in plain and b"algo" not in plain
    a = ann(backup=0, algo=b"iphash", proto=b"u", vassal=b"v.ini")
    assert (a.backup, a.algo, a.proto, a.vassal, a.v21) == (0, b"iphash", b"u", b"v.ini", True)


# ---------------------------------------------------------------------------
# Backup levels


def levels_table(levels, algo="wrr"):
    t = SubscriptionTable(algo=algo)
    for i, level in enumerate(levels):
        t.announce(ann(b"k", b"n:%d" % i, backup=level), T0)
    return t


def picks(t, n, key=b"k", request=None):
    out = []
    for _ in range(n):
        node = t.lookup(key, T0, request)
        t.connected(node)
        out.append(node.name)
        t.release(node)
    return out


@pytest.mark.parametrize("algo", ["wrr", "lrc", "wlrc", "iphash"])
def test_backup_nodes_get_nothing_while_a_primary_is_alive(algo):
    t = levels_table([1, 0, 2, 0], algo)
    assert set(picks(t, 40, request=b"1.2.3.4")) <= {b"n:1", b"n:3"}
    if algo != "iphash":
        assert set(picks(t, 40)) == {b"n:1", b"n:3"}


@pytest.mark.parametrize("algo", ["wrr", "lrc", "wlrc"])
def test_the_lowest_alive_level_takes_over_and_gives_back(algo):
    t = levels_table([0, 1, 1, 2], algo)
    primary = t.pool(b"k").nodes[0]
    t.connect_failed(b"k", primary, T0)            # the primary dies
    assert set(picks(t, 20)) == {b"n:1", b"n:2"}     # level 1 shares the load
    for name in (b"n:1", b"n:2"):
        t.connect_failed(b"k", t.pool(b"k").by_address[name], T0)
    assert set(picks(t, 5)) == {b"n:3"}              # then level 2
    t.announce(ann(b"k", b"n:0", backup=0), T0 + 1)  # the primary is back
    assert set(picks(t, 10)) == {b"n:0"}


def test_a_backup_node_that_drops_its_level_becomes_primary():
    t = levels_table([0, 1])
    t.announce(ann(b"k", b"n:1", backup=0), T0 + 1)
    assert set(picks(t, 10)) == {b"n:0", b"n:1"}


def test_levels_in_a_20_table_cost_nothing():
    t = levels_table([0, 0])
    assert not t.pool(b"k").levels


# ---------------------------------------------------------------------------
# The algorithm per key


def test_the_first_announce_chooses_the_keys_algorithm():
    t = SubscriptionTable(algo="wrr")
    t.announce(ann(b"a", b"x:1", algo=b"lrc"), T0)
    t.announce(ann(b"a", b"x:2", algo=b"wrr"), T0)   # too late: the key exists
    t.announce(ann(b"b", b"x:1"), T0)
    assert t.pool(b"a").algo == "lrc" and t.pool(b"b").algo == "wrr"
    t2 = SubscriptionTable(algo="wlrc")
    t2.announce(ann(b"c", b"x:1"), T0)
    assert t2.pool(b"c").algo == "wlrc"


def test_the_algorithm_survives_a_dump_and_load():
    src = levels_table([0, 1], "iphash")
    dst = SubscriptionTable()
    assert dst.load(src.dump(), T0) == 2
    pool = dst.pool(b"k")
    assert pool.algo == "iphash" and pool.hashed and pool.levels
    assert [n.backup for n in pool.nodes] == [0, 1]


# ---------------------------------------------------------------------------
# iphash: rendezvous hashing


def clients(n):
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    return [str(ipaddress.IPv4Address(base + i)).encode() for i in range(n)]


def hash_table(count):
    t = SubscriptionTable(algo="iphash")
    for i in range(count):
        t.announce(ann(b"k", b"10.1.0.%d:3031" % i), T0)
    return t


def assignment(t, addresses):
    return {c: picks(t, 1, request=c)[0] for c in addresses}


def test_iphash_is_sticky_and_spreads():
    t = hash_table(4)
    addresses = clients(4000)
    first = assignment(t, addresses)
    assert assignment(t, addresses) == first
    spread = Counter(first.values())
    assert len(spread) == 4 and min(spread.values()) > 4000 / 4 * 0.85


def test_adding_a_fifth_node_moves_about_a_fifth_of_the_clients():
    addresses = clients(10000)
    t = hash_table(4)
    before = assignment(t, addresses)
    t.announce(ann(b"k", b"10.1.0.4:3031"), T0)
    after = assignment(t, addresses)
    moved = [c for c in addresses if before[c] != after[c]]
    assert all(after[c] == b"10.1.0.4:3031" for c in moved)   # only to the new node
    assert 0.17 < len(moved) / len(addresses) < 0.23


def test_removing_a_node_moves_only_its_clients():
    addresses = clients(10000)
    t = hash_table(5)
    before = assignment(t, addresses)
    gone = t.pool(b"k").nodes[2]
    t.connect_failed(b"k", gone, T0)
    after = assignment(t, addresses)
    moved = {c for c in addresses if before[c] != after[c]}
    assert moved == {c for c in addresses if before[c] == gone.name}
    assert 0.17 < len(moved) / len(addresses) < 0.23


class FakeSession:
    def __init__(self, info, caddr):
        self.info, self.caddr = info, caddr


def scanned(pairs, mountpoints=0, hash_var=None):
    scan = make_scanner(mountpoints, hash_var)
    return scan(encode_vars(pairs))


def test_the_client_is_remote_addr_then_the_peer():
    client_of = make_client_of(None)
    info = scanned([(b"REMOTE_ADDR", b"198.51.100.7"), (b"HTTP_HOST", b"h")], mountpoints=1)
    assert client_of(FakeSession(info, ("127.0.0.1", 5000))) == b"198.51.100.7"
    info = scanned([(b"HTTP_HOST", b"h")], mountpoints=1)
    assert client_of(FakeSession(info, ("127.0.0.9", 5000))) == b"127.0.0.9"
    assert client_of(FakeSession(info, "")) == b""   # a UNIX peer


def test_the_hash_var_replaces_remote_addr_when_present():
    client_of = make_client_of(b"HTTP_COOKIE")
    info = scanned([(b"REMOTE_ADDR", b"1.1.1.1"), (b"HTTP_COOKIE", b"sid=9")], hash_var=b"HTTP_COOKIE")
    assert client_of(FakeSession(info, ("127.0.0.1", 1))) == b"sid=9"
    info = scanned([(b"REMOTE_ADDR", b"1.1.1.1")], hash_var=b"HTTP_COOKIE")
    assert client_of(FakeSession(info, ("127.0.0.1", 1))) == b"1.1.1.1"


# ---------------------------------------------------------------------------
# Mountpoints and the scanner


def test_no_scanner_without_the_options():
    assert make_scanner(0, None) is None
    assert make_scanner(0, b"REMOTE_ADDR") is None


@pytest.mark.parametrize("path, n, expected", [
    (b"/app1/x", 1, b"example.com/app1"),
    (b"/app1", 1, b"example.com/app1"),
    (b"/a/b/c", 2, b"example.com/a/b"),
    (b"/a", 2, b"example.com/a"),
    (b"/", 1, None),
    (b"", 1, None),
    (None, 1, None),
    (b"/" + b"x" * 300, 1, None),
])
def test_mount_key(path, n, expected):
    pairs = [(b"HTTP_HOST", b"example.com")] + ([(b"PATH_INFO", path)] if path is not None else [])
    info = scanned(pairs, mountpoints=n)
    assert info.key == b"example.com"
    assert mount_key(info.key, info, n) == expected


def test_the_scanner_refuses_what_scan_request_refuses():
    with pytest.raises(MalformedVars):
        make_scanner(1, None)(encode_vars([(b"HTTP_HOST", b"h")]) + b"\x01")


# ---------------------------------------------------------------------------
# Stats


def test_stats_show_the_21_fields_only_for_keys_that_use_them():
    t = SubscriptionTable()
    t.announce(ann(b"old", b"x:1"), T0)
    t.announce(ann(b"new", b"x:1", backup=1, proto=b"h", vassal=b"v.ini", algo=b"lrc"), T0)
    records = {r["key"]: r for r in stats.subscription_stats(t)}
    assert "algo" not in records[b"old"] and "backup" not in records[b"old"]["nodes"][0]
    assert list(records[b"new"])[-2:] == ["algo", "nodes"] and records[b"new"]["algo"] == "lrc"
    node = records[b"new"]["nodes"][0]
    assert list(node)[-3:] == ["vassal", "backup", "proto"]
    assert (node["vassal"], node["backup"], node["proto"]) == (b"v.ini", 1, b"h")


# ---------------------------------------------------------------------------
# --subscribe2


def test_subscribe2_takes_the_21_keys():
    spec = parse_subscribe2("server=127.0.0.1:7000,key=example.com,backup=1,algo=iphash,proto=h,"
                            "vassal=app.ini,inactive=1")
    assert (spec.backup, spec.algo, spec.proto, spec.vassal) == (1, b"iphash", b"h", b"app.ini")


@pytest.mark.parametrize("item", ["backup=x", "backup=65536", "algo=rr", "proto=hh", "proto=1"])
def test_subscribe2_refuses_bad_21_values(item):
    with pytest.raises(SubscribeError):
        parse_subscribe2("server=127.0.0.1:7000,key=k," + item)


def test_the_subscriber_sends_the_21_fields_it_was_given(sock_dir):
    from test_subscriber import FakeReactor, Receiver, announcement_vars, subscriber
    receiver = Receiver(sock_dir)
    sub = subscriber(FakeReactor(), ["s2:server=%s,key=spare,backup=1,algo=lrc,proto=h,vassal=v.ini,"
                                     "inactive=1" % receiver.server, "%s:plain" % receiver.server])
    sub.start()
    spare, plain = [announcement_vars(p) for p in receiver.drain()]
    assert (spare[b"backup"], spare[b"algo"], spare[b"proto"], spare[b"vassal"]) == (
        b"1", b"lrc", b"h", b"v.ini")
    assert b"inactive" not in spare
    assert not {b"backup", b"algo", b"proto", b"vassal"} & set(plain)   # a 2.0 packet
