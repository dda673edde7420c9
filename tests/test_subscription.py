"""The subscription datagram, the key -> nodes table and its balancing algorithms."""

from __future__ import annotations

import json
import struct
from collections import Counter
from typing import List, Optional

import pytest

from uwsgi_fastrouter.protocol import encode_vars, parse_vars
from uwsgi_fastrouter.signing import HmacChecker, hmac_tag
from uwsgi_fastrouter.subscription import (
    FORWARDED_VAR, MAX_ADDRESS, MAX_KEY, Announcement, Node, SubscriptionError,
    SubscriptionTable, TableFull, build_announcement, djb33x, forward_announcement,
    parse_announcement, stats_hash,
)

T0 = 1_700_000_000.25  # an arbitrary "now"

# docs/wire.md ("Subscription datagrams"): --socket 127.0.0.1:3031 --subscribe-to X:example.com
EXAMPLE = bytes.fromhex(
    "e0650000 03006b65 790b0065 78616d70 6c652e63 6f6d0700 61646472 6573730e"
    "00313237 2e302e30 2e313a33 30333109 006d6f64 69666965 72310100 3009006d"
    "6f646966 69657232 01003005 00636f72 65730100 3104006c 6f616401 00300600"
    "77656967 68740100 30")


def datagram(pairs, mod1=224, mod2=0, datasize=None) -> bytes:
    block = b"".join(struct.pack("<H", len(k)) + k + struct.pack("<H", len(v)) + v
                     for k, v in pairs)
    return struct.pack("<BHB", mod1, len(block) if datasize is None else datasize, mod2) + block


def ann(key=b"k", address=b"a:1", **kw) -> Announcement:
    return parse_announcement(build_announcement(key, address, **kw))


class Log(list):
    def __call__(self, line: str) -> None:
        self.append(line)


# ---------------------------------------------------------------------------
# parse_announcement


def test_the_documented_example_is_built_byte_for_byte():
    assert len(EXAMPLE) == 105
    assert build_announcement(b"example.com", b"127.0.0.1:3031", cores=1) == EXAMPLE
    unsub = build_announcement(b"example.com", b"127.0.0.1:3031", cores=1, unsubscribe=True)
    assert unsub == EXAMPLE[:3] + b"\x01" + EXAMPLE[4:]


def test_the_documented_example_parses():
    a = parse_announcement(EXAMPLE)
    assert a == Announcement(unsubscribe=False, key=b"example.com", address=b"127.0.0.1:3031",
                             modifier1=0, modifier2=0, cores=1, load=0, weight=0,
                             signed_part=EXAMPLE[4:])
    assert a.unix is None and a.sign is None and a.notify is None and not a.forwarded


def test_a_usual_packet_whose_tail_repeats_key_or_address_keeps_the_last_one():
    """The usual layout (key, address first) reuses what its tail gave before; a tail
    that names key or address again is walked in full: the last one counts."""
    for name in (b"key", b"address"):
        for _ in range(2):   # the tail unknown, then remembered
            a = parse_announcement(datagram([(b"key", b"k"), (b"address", b"a:1"),
                                             (b"weight", b"3"), (name, b"later")]))
            assert (a.key if name == b"key" else a.address) == b"later" and a.weight == 3


def test_the_same_tail_after_different_heads_gives_each_its_own_key_and_address():
    tail = [(b"modifier1", b"7"), (b"cores", b"2"), (b"weight", b"5"), (FORWARDED_VAR, b"1")]
    for i in range(3):
        for unsubscribe in (False, True):
            pkt = datagram([(b"key", b"k%d" % i), (b"address", b"a:%d" % i)] + tail,
                           mod2=1 if unsubscribe else 0)
            a = parse_announcement(pkt)
            assert (a.key, a.address, a.unsubscribe, a.signed_part) == (
                b"k%d" % i, b"a:%d" % i, unsubscribe, pkt[4:])
            assert (a.modifier1, a.cores, a.weight, a.forwarded) == (7, 2, 5, True)


def test_remembered_tails_are_bounded():
    from uwsgi_fastrouter import subscription
    for weight in range(subscription._TAILS_MAX + 50):
        assert parse_announcement(build_announcement(b"k", b"a:1", weight=weight)).weight == weight
        assert len(subscription._TAILS) <= subscription._TAILS_MAX
    # a tail that needs the strict parser is remembered too, and still refused
    bad = datagram([(b"key", b"k"), (b"address", b"a:1"), (b"weight", b"-1")])
    for _ in range(2):
        with pytest.raises(SubscriptionError, match="invalid weight"):
            parse_announcement(bad)


def test_a_long_tail_is_parsed_but_not_remembered():
    """A peer cannot park 64 KiB tails in the memo: a long one is walked every time."""
    from uwsgi_fastrouter import subscription
    notify = b"n" * (subscription._TAIL_MAX_BYTES + 1)
    subscription._TAILS.clear()
    for _ in range(2):
        a = parse_announcement(datagram([(b"key", b"k"), (b"address", b"a:1"), (b"weight", b"4"),
                                         (b"notify", notify)]))
        assert (a.key, a.weight, a.notify) == (b"k", 4, notify)
    assert subscription._TAILS == {}


def test_every_field_parses():
    pkt = datagram([
        (b"key", b"unbit.it:8000"), (b"address", b"/run/app/x.sock"), (b"modifier1", b"5"),
        (b"modifier2", b"255"), (b"cores", b"8"), (b"load", b"3"), (b"weight", b"12"),
        (b"sni_key", b"/k.pem"), (b"sni_crt", b"/c.pem"), (b"sni_ca", b"/ca.pem"),
        (b"notify", b"/run/n.sock"), (FORWARDED_VAR, b"1"), (b"unix", b"1700000000"),
        (b"sign", b"\x00\x01sig"),
    ])
    a = parse_announcement(pkt)
    assert (a.key, a.address, a.modifier1, a.modifier2, a.cores, a.load, a.weight) == (
        b"unbit.it:8000", b"/run/app/x.sock", 5, 255, 8, 3, 12)
    assert (a.sni_key, a.sni_crt, a.sni_ca, a.notify) == (b"/k.pem", b"/c.pem", b"/ca.pem",
                                                        b"/run/n.sock")
    assert a.unix == 1700000000 and a.sign == b"\x00\x01sig" and a.forwarded
    assert not a.unsubscribe
    # the signature covers every byte before the sign record
    sign_record = encode_vars([(b"sign", b"\x00\x01sig")])
    assert a.signed_part == pkt[4:-len(sign_record)]


def test_empty_paths_count_as_absent():
    a = parse_announcement(datagram(KA + [(b"notify", b"/n"), (b"sni_key", b""), (b"notify", b"")]))
    assert a.notify is None and a.sni_key is None


def test_defaults_unknown_vars_order_and_repeats():
    a = parse_announcement(datagram([
        (b"algo", b"lrc"), (b"address", b"x:1"), (b"key", b"first"), (b"backup", b"1"),
        (b"key", b"second"), (b"weight", b"007"),
    ]))
    assert a.key == b"second"  # the last occurrence counts
    assert (a.modifier1, a.modifier2, a.cores, a.load, a.weight) == (0, 0, 0, 0, 7)
    assert a.unix is None and not a.forwarded


@pytest.mark.parametrize("byte0", [224, 0, 5, 255])
def test_byte0_is_not_checked(byte0):
    assert parse_announcement(bytes([byte0]) + EXAMPLE[1:]).key == b"example.com"


@pytest.mark.parametrize("byte3, unsubscribe", [(0, False), (1, True), (7, True), (255, True)])
def test_byte3_selects_subscribe_or_unsubscribe(byte3, unsubscribe):
    assert parse_announcement(EXAMPLE[:3] + bytes([byte3]) + EXAMPLE[4:]).unsubscribe is unsubscribe


@pytest.mark.parametrize("value, forwarded", [(b"1", True), (b"yes", True), (b"0", False),
                                              (b"", False)])
def test_forwarded_flag(value, forwarded):
    a = parse_announcement(datagram([(b"key", b"k"), (b"address", b"a"), (FORWARDED_VAR, value)]))
    assert a.forwarded is forwarded


def _rejected(pkt: bytes, *words: str) -> SubscriptionError:
    with pytest.raises(SubscriptionError) as info:
        parse_announcement(pkt)
    for word in words:
        assert word in str(info.value)
    return info.value


KA = [(b"key", b"k"), (b"address", b"a:1")]


@pytest.mark.parametrize("pkt", [b"", b"\xe0", b"\xe0\x00\x00"])
def test_shorter_than_a_header(pkt):
    _rejected(pkt, "shorter than a header")


@pytest.mark.parametrize("delta", [-1, 1, 100, -20])
def test_datasize_must_match_the_datagram(delta):
    pkt = datagram(KA)
    bad = struct.pack("<BHB", 224, len(pkt) - 4 + delta, 0) + pkt[4:]
    _rejected(bad, "announces %d bytes" % (len(pkt) - 4 + delta), "carries %d" % (len(pkt) - 4))


def test_datasize_mismatch_by_a_trailing_byte():
    pkt = datagram(KA)
    _rejected(pkt + b"\x00", "announces")


@pytest.mark.parametrize("tail, why", [
    (b"\x01", "stray"),
    (b"\x01\x00", "stray"),
    (b"\x00\x00\x00", "zero key length"),
    (b"\x05\x00ab", "overruns"),
    (b"\x03\x00key", "value length missing"),
    (b"\x03\x00key\x05\x00ab", "overruns"),
])
def test_truncated_or_broken_vars(tail, why):
    block = encode_vars(KA) + tail
    err = _rejected(struct.pack("<BHB", 224, len(block), 0) + block, "malformed", why)
    assert err.key == b"k" and err.address == b"a:1"  # what was read before the fault


@pytest.mark.parametrize("pairs", [
    [(b"address", b"a:1")],
    [(b"key", b""), (b"address", b"a:1")],
    [(b"key", b"k" * (MAX_KEY + 1)), (b"address", b"a:1")],
])
def test_key_must_be_1_to_255_bytes(pairs):
    _rejected(datagram(pairs), "key of 1..255 bytes")


@pytest.mark.parametrize("pairs", [
    [(b"key", b"k")],
    [(b"key", b"k"), (b"address", b"")],
    [(b"key", b"k"), (b"address", b"a" * (MAX_ADDRESS + 1))],
])
def test_address_must_be_1_to_255_bytes(pairs):
    err = _rejected(datagram(pairs), "address of 1..255 bytes")
    assert err.key == b"k"


def test_longest_key_and_address_are_accepted():
    a = parse_announcement(datagram([(b"key", b"k" * 255), (b"address", b"a" * 255)]))
    assert len(a.key) == 255 and len(a.address) == 255


@pytest.mark.parametrize("name, value", [
    (b"modifier1", b""), (b"modifier1", b"12a"), (b"modifier1", b"256"), (b"modifier1", b"-1"),
    (b"modifier2", b"300"), (b"modifier2", b"+1"), (b"cores", b" 1"), (b"load", b"1_0"),
    (b"weight", b"0x10"), (b"weight", str(2 ** 63 + 1).encode()), (b"weight", b"1" * 30),
    (b"unix", b"1.5"), (b"unix", "\u0663".encode()), (b"cores", b"1 "),
])
def test_junk_numbers_are_rejected(name, value):
    _rejected(datagram(KA + [(name, value)]), "invalid %s value" % name.decode())


def test_number_limits_are_inclusive():
    a = parse_announcement(datagram(KA + [(b"modifier1", b"255"), (b"modifier2", b"0"),
                                          (b"weight", str(2 ** 63).encode()),
                                          (b"cores", b"0" * 40 + b"9")]))
    assert (a.modifier1, a.modifier2, a.weight, a.cores) == (255, 0, 2 ** 63, 9)


def test_sign_must_be_the_last_var():
    _rejected(datagram(KA + [(b"sign", b"x"), (b"unix", b"1")]), "sign var must be the last")
    _rejected(datagram(KA + [(b"sign", b"x"), (b"sign", b"y")]), "sign var must be the last")
    a = parse_announcement(datagram(KA + [(b"sign", b"")]))
    assert a.sign == b"" and a.signed_part == encode_vars(KA)


# ---------------------------------------------------------------------------
# build_announcement


def test_var_order_is_uwsgi_s():
    signed = []

    def signer(data: bytes) -> bytes:
        signed.append(data)
        return b"SIG"

    pkt = build_announcement(b"k", b"a", modifier1=1, modifier2=2, cores=3, load=4, weight=5,
                             sni_key=b"sk", sni_crt=b"sc", sni_ca=b"ca", notify=b"/n",
                             forwarded=True, unix=1000, signer=signer)
    names = [name for name, _ in parse_vars(pkt[4:])]
    assert names == [b"key", b"address", b"modifier1", b"modifier2", b"cores", b"load",
                     b"weight", b"sni_key", b"sni_crt", b"sni_ca", b"notify", FORWARDED_VAR,
                     b"unix", b"sign"]
    assert pkt[0] == 224 and pkt[3] == 0 and struct.unpack_from("<H", pkt, 1)[0] == len(pkt) - 4
    a = parse_announcement(pkt)
    assert signed == [a.signed_part] and a.sign == b"SIG" and a.unix == 1000


def test_round_trip():
    a = ann(b"example.com:8000", b"@abstract", modifier1=7, modifier2=3, cores=2, load=9,
            weight=4, sni_key=b"k", notify=b"/run/app/notify", unix=5)
    assert a == Announcement(False, b"example.com:8000", b"@abstract", 7, 3, 2, 9, 4,
                             sni_key=b"k", notify=b"/run/app/notify", unix=5, signed_part=a.signed_part)
    u = ann(b"k", b"a", unsubscribe=True, unix=5)
    assert u.unsubscribe and u.unix == 6  # uWSGI sends now + 1 with an unsubscribe


def test_build_refuses_what_parse_would_refuse():
    for key, address in ((b"", b"a"), (b"k" * 256, b"a"), (b"k", b""), (b"k", b"a" * 256)):
        with pytest.raises(SubscriptionError):
            build_announcement(key, address)
    with pytest.raises(SubscriptionError):
        build_announcement(b"k", b"a", modifier1=256)
    with pytest.raises(SubscriptionError):
        build_announcement(b"k", b"a", weight=-1)
    with pytest.raises(SubscriptionError, match="unix"):
        build_announcement(b"k", b"a", signer=lambda data: b"x")


def test_forward_announcement():
    a = ann(b"k", b"backend:1", modifier1=5, modifier2=1, cores=8, weight=3, sni_crt=b"c",
            notify=b"/n", unix=9, signer=lambda data: b"s")
    f = parse_announcement(forward_announcement(a, b"127.0.0.1:3117", weight=2))
    assert f.forwarded and not f.unsubscribe
    assert (f.key, f.address, f.modifier1, f.modifier2, f.cores, f.weight) == (
        b"k", b"127.0.0.1:3117", 5, 1, 0, 2)
    assert f.sni_crt == b"c" and f.notify is None and f.unix is None and f.sign is None
    u = parse_announcement(forward_announcement(ann(b"k", b"x", unsubscribe=True), b"r:1"))
    assert u.unsubscribe and u.forwarded


# ---------------------------------------------------------------------------
# hashing


def test_djb33x_sign_extends_high_bytes():
    assert djb33x(b"") == 5381
    assert djb33x(b"a") == (5381 * 33) ^ 0x61
    assert djb33x(b"h\xe9\xff") == 193421051
    assert stats_hash(b"h\xe9\xff") == 27266
    # the variant without sign extension gives something else
    h = 5381
    for b in b"h\xe9\xff":
        h = ((h * 33) ^ b) & 0xFFFFFFFF
    assert h % 65535 != 27266


def test_stats_hash_examples():
    assert stats_hash(b"example.com") == 30778  # from a captured stats document
    assert stats_hash(b"") == 5381
    assert all(0 <= stats_hash(bytes([b]) * 300) < 65535 for b in range(256))
    assert djb33x(b"\xff" * 1000) < 2 ** 32


# ---------------------------------------------------------------------------
# the table: subscribe, refresh, unsubscribe


def test_quietly_applies_without_a_line_and_keeps_the_log():
    """A router process under a master applies the master's events silently."""
    log = Log()
    t = SubscriptionTable(log=log, pid=42)
    node = t.quietly(t.announce, ann(b"example.com", b"127.0.0.1:3031"), T0)
    t.quietly(t.connect_failed, b"example.com", node, T0)
    assert log == [] and t.log is log and t.pool(b"example.com") is None
    t.announce(ann(b"example.com", b"127.0.0.1:3031"), T0)
    assert len(log) == 2      # its own events are still logged


def test_subscribe_creates_pool_and_node_and_logs():
    log = Log()
    t = SubscriptionTable(log=log, pid=42)
    node = t.announce(ann(b"example.com", b"127.0.0.1:3031", modifier1=5, cores=4, load=1,
                          notify=b"/run/app/notify"), T0, uid=7, gid=8, pid=99)
    assert t.node_count == 1  # raised by the announce: a new node
    assert log == [
        "[uwsgi-subscription for pid 42] new pool: example.com (hash key: 30778)",
        "[uwsgi-subscription for pid 42] example.com => new node: 127.0.0.1:3031",
    ]
    assert isinstance(node, Node)
    assert (node.name, node.modifier1, node.modifier2, node.cores, node.load, node.weight) == (
        b"127.0.0.1:3031", 5, 0, 4, 1, 1)
    assert node.last_check == int(T0) and isinstance(node.last_check, int)
    assert (node.pid, node.uid, node.gid, node.notify) == (99, 7, 8, b"/run/app/notify")
    assert (node.requests, node.last_requests, node.tx, node.rx, node.wrr, node.ref,
            node.failcnt, node.death_mark) == (0, 0, 0, 0, 0, 0, 0, 0)
    pool = t.pool(b"example.com")
    assert pool.nodes == [node] and pool.hash == 30778 and pool.hits == 0
    assert len(t) == 1 and t.node_count == 1 and not t.empty
    assert t.pool(b"EXAMPLE.COM") is None  # keys are case-sensitive bytes


def test_node_has_slots():
    node = SubscriptionTable().announce(ann(), T0)
    with pytest.raises(AttributeError):
        node.something_else = 1


def test_refresh_updates_load_figures_but_not_modifiers():
    log = Log()
    t = SubscriptionTable(log=log)
    node = t.announce(ann(b"k", b"a:1", modifier1=5, modifier2=1, cores=1, weight=2), T0)
    t.connected(node)
    again = t.announce(ann(b"k", b"a:1", modifier1=7, modifier2=3, cores=6, load=2, weight=0),
                       T0 + 5)
    assert again is node and len(log) == 2  # no new pool/node line
    assert (node.modifier1, node.modifier2) == (5, 1)
    assert (node.cores, node.load, node.weight, node.last_check) == (6, 2, 1, int(T0) + 5)
    assert node.last_requests == 0 and node.requests == 1
    assert t.node_count == 1


def test_new_nodes_are_appended():
    t = SubscriptionTable()
    nodes = [t.announce(ann(b"k", b"n%d" % i), T0) for i in range(3)]
    assert t.pool(b"k").nodes == nodes and t.node_count == 3 and len(t) == 1


def test_unsubscribe_removes_node_and_pool():
    log = Log()
    t = SubscriptionTable(log=log, pid=3)
    t.announce(ann(b"k", b"a"), T0)
    t.announce(ann(b"k", b"b"), T0)
    assert t.announce(ann(b"k", b"a", unsubscribe=True), T0) is None
    assert log[-1] == "[uWSGI fastrouter pid 3] k => marking a as failed"
    assert [n.name for n in t.pool(b"k").nodes] == [b"b"]
    t.announce(ann(b"k", b"b", unsubscribe=True), T0)
    assert t.empty and len(t) == 0 and t.node_count == 0


def test_unsubscribe_of_an_unknown_node_changes_nothing():
    log = Log()
    t = SubscriptionTable(log=log)
    t.announce(ann(b"k", b"a"), T0)
    assert t.announce(ann(b"k", b"zzz", unsubscribe=True), T0) is None
    assert t.announce(ann(b"other", b"a", unsubscribe=True), T0) is None
    assert len(log) == 2 and t.node_count == 1


def test_unsubscribe_of_a_busy_node_marks_it_until_released():
    t = SubscriptionTable()
    t.announce(ann(b"k", b"a"), T0)
    b = t.announce(ann(b"k", b"b"), T0)
    held = [t.lookup(b"k", T0) for _ in range(2)]
    assert b in held
    t.announce(ann(b"k", b"b", unsubscribe=True), T0)
    assert b.death_mark == 1 and b.failcnt == 1 and b in t.pool(b"k").nodes
    assert all(t.lookup(b"k", T0).name == b"a" for _ in range(4))  # never chosen again
    t.release(b)
    assert b not in t.pool(b"k").nodes and t.node_count == 1


def test_refresh_resurrects_a_dead_referenced_node():
    t = SubscriptionTable()
    node = t.announce(ann(), T0)
    assert t.lookup(b"k", T0) is node
    t.connect_failed(b"k", node, T0)
    assert t.lookup(b"k", T0) is None and node.death_mark
    t.announce(ann(), T0 + 1)
    assert node.death_mark == 0 and t.lookup(b"k", T0 + 1) is node
    assert node.ref == 2


# ---------------------------------------------------------------------------
# balancing


def run(t: SubscriptionTable, n: int, key=b"k", now=T0) -> List[int]:
    """*n* sequential requests: pick, connect, release.  Returns 1-based node numbers."""
    order = {node.name: i + 1 for i, node in enumerate(t.pool(key).nodes)}
    seq = []
    for _ in range(n):
        node = t.lookup(key, now)
        t.connected(node)
        t.release(node)
        seq.append(order[node.name])
    return seq


def table_with(weights, algo="wrr") -> SubscriptionTable:
    t = SubscriptionTable(algo=algo)
    for i, w in enumerate(weights):
        t.announce(ann(b"k", b"127.0.0.1:%d" % (3000 + i), weight=w), T0)
    return t


@pytest.mark.parametrize("weights", [(1, 1, 1), (2, 1), (3, 1), (2, 3), (1, 2, 4), (5, 1, 1, 3)])
def test_wrr_honours_weights_in_every_window(weights):
    t = table_with(weights)
    total = sum(weights)
    seq = run(t, total * 6)
    for start in range(len(seq) - total + 1):
        counts = Counter(seq[start:start + total])
        assert [counts[i + 1] for i in range(len(weights))] == list(weights), (start, seq)


def test_wrr_2_3_is_exactly_2_to_3():
    seq = run(table_with((2, 3)), 500)
    assert Counter(seq) == {1: 200, 2: 300}
    assert "11" not in "".join(map(str, seq))  # the light node is never chosen twice in a row


@pytest.mark.parametrize("weights", [(1, 1), (1, 1, 1), (4, 4, 4, 4), (0, 0)])
def test_wrr_with_equal_weights_never_repeats(weights):
    seq = run(table_with(weights), 60)
    assert all(a != b for a, b in zip(seq, seq[1:])), seq
    assert set(seq) == set(range(1, len(weights) + 1))


def test_wrr_1_2_4_is_smooth():
    seq = run(table_with((1, 2, 4)), 70)
    assert seq[:7] == [3, 2, 3, 1, 3, 2, 3]  # the heavy node is spread over the cycle
    assert "333" not in "".join(map(str, seq))
    assert Counter(seq) == {1: 10, 2: 20, 3: 40}


def test_wrr_skips_dead_nodes_and_shows_non_negative_credit():
    t = table_with((1, 1, 1))
    nodes = t.pool(b"k").nodes
    held = t.lookup(b"k", T0)
    t.connect_failed(b"k", held, T0)
    seq = run(t, 10)
    assert nodes.index(held) + 1 not in seq
    assert all(n.wrr >= 0 for n in nodes)


def test_wrr_concurrent_picks_follow_weights():
    t = table_with((1, 3))
    picks = [t.lookup(b"k", T0) for _ in range(40)]  # nothing released
    assert [n.ref for n in t.pool(b"k").nodes] == [10, 30]
    assert len(picks) == 40


def test_unknown_algorithm_is_wrr():
    assert SubscriptionTable(algo="roundrobin").algo_name == "wrr"
    assert SubscriptionTable(algo="iphash").algo_name == "iphash"  # uWSGI 2.1's, known here
    assert SubscriptionTable(algo="lrc").algo_name == "lrc"
    assert SubscriptionTable().algo_name == "wrr"
    assert Counter(run(table_with((2, 3), algo="bogus"), 50)) == {1: 20, 2: 30}


@pytest.mark.parametrize("algo", ["lrc", "wlrc"])
def test_least_reference_sequential_rotation(algo):
    assert run(table_with((1, 1, 1), algo), 9) == [3, 2, 1] * 3
    assert run(table_with((1, 1), algo), 6) == [2, 1] * 3


def test_lrc_prefers_the_least_referenced_node():
    t = table_with((1, 1, 1), "lrc")
    a, b, c = t.pool(b"k").nodes
    picks = [t.lookup(b"k", T0) for _ in range(6)]  # held
    assert [n.ref for n in (a, b, c)] == [2, 2, 2]
    assert picks[:3] == [c, b, a]
    t.release(b)
    t.release(b)
    assert t.lookup(b"k", T0) is b


def test_wlrc_divides_references_by_weight():
    t = table_with((1, 3), "wlrc")
    a, b = t.pool(b"k").nodes
    for _ in range(40):
        t.lookup(b"k", T0)  # held
    # ref/weight stays balanced: the weight-3 node carries about three times the load
    assert a.ref + b.ref == 40
    assert abs(b.ref - 3 * a.ref) <= 4, (a.ref, b.ref)


def test_lrc_quirk_successor_may_be_dead():
    # a dead but still referenced successor takes part in the "at least as good" test
    t = table_with((1, 1, 1), "lrc")
    a, b, c = t.pool(b"k").nodes
    assert t.lookup(b"k", T0) is c
    t.connected(c)
    t.connect_failed(b"k", c, T0)  # dead, ref 1, last_requests 1
    # a: successor b is as good -> go on; b: successor c (dead) has ref 1 > 0 -> stop at b
    assert t.lookup(b"k", T0) is b


# ---------------------------------------------------------------------------
# requests, failures, expiry


def test_lookup_counts_hits_and_references():
    t = SubscriptionTable()
    node = t.announce(ann(), T0)
    assert t.lookup(b"nope", T0) is None
    assert t.lookup(b"k", T0) is node and t.lookup(b"k", T0) is node
    assert t.pool(b"k").hits == 2 and node.ref == 2
    t.connected(node)
    t.connected(node)
    assert (node.requests, node.last_requests) == (2, 2)
    t.release(node)
    t.release(node)
    t.release(node)  # never below zero
    assert node.ref == 0 and t.node_count == 1


def test_connect_failure_marks_once_and_removes_when_released():
    log = Log()
    t = SubscriptionTable(log=log)
    node = t.announce(ann(b"k", b"a:1"), T0)
    t.announce(ann(b"k", b"b:1"), T0)
    del log[:]
    t.lookup(b"k", T0)
    n2 = t.lookup(b"k", T0)
    assert node in (n2, t.pool(b"k").nodes[0])
    t.connect_failed(b"k", node, T0)
    t.connect_failed(b"k", node, T0)
    assert log == ["[uwsgi-fastrouter] k => marking a:1 as failed"]
    assert node.failcnt == 2 and node.death_mark == 1 and node in t.pool(b"k").nodes
    t.release(node)
    assert node not in t.pool(b"k").nodes and node.pool is None
    t.release(node)  # a second release of a removed node is harmless
    assert t.node_count == 1


def test_connect_failure_of_an_unreferenced_node_removes_it_now():
    t = SubscriptionTable()
    node = t.announce(ann(), T0)
    t.connect_failed(b"k", node, T0)
    assert t.empty and t.node_count == 0


def test_lazy_expiry_at_lookup():
    log = Log()
    t = SubscriptionTable(tolerance=17, log=log, pid=5)
    node = t.announce(ann(b"k", b"a:1"), T0)
    assert t.lookup(b"k", T0 + 17) is node  # 17 s without announce is still fine
    t.release(node)
    assert t.lookup(b"k", T0 + 18.9) is None
    assert log[-1] == ("[uwsgi-subscription for pid 5] k => marking a:1 as failed "
                       "(no announce received in 17 seconds)")
    assert t.empty and node.failcnt == 1
    # a new announce brings the key back
    assert t.announce(ann(b"k", b"a:1"), T0 + 20) is not node
    assert t.lookup(b"k", T0 + 20) is not None


def test_lazy_expiry_keeps_referenced_nodes_until_released():
    t = SubscriptionTable(tolerance=2)
    a = t.announce(ann(b"k", b"a"), T0)
    assert t.lookup(b"k", T0) is a
    b = t.announce(ann(b"k", b"b"), T0 + 3)
    assert t.lookup(b"k", T0 + 3) is b  # a expired: marked, still held
    assert a.death_mark == 1 and a in t.pool(b"k").nodes
    t.release(a)
    assert [n.name for n in t.pool(b"k").nodes] == [b"b"]


def test_active_expiry_sweep():
    log = Log()
    t = SubscriptionTable(tolerance=10, log=log)
    old = t.announce(ann(b"k", b"old"), T0)
    held = t.announce(ann(b"h", b"held"), T0)
    t.announce(ann(b"k", b"new"), T0 + 8)
    assert t.lookup(b"h", T0) is held
    del log[:]
    assert t.expire(T0 + 10) == 0 and not log
    assert t.expire(T0 + 11) == 1
    assert old.pool is None and [n.name for n in t.pool(b"k").nodes] == [b"new"]
    assert held.death_mark == 1 and t.pool(b"h") is not None
    assert len(log) == 2 and all("no announce received in 10 seconds" in line for line in log)
    assert t.expire(T0 + 12) == 0 and len(log) == 2  # marked nodes are not logged again
    t.release(held)
    assert t.pool(b"h") is None
    assert t.expire(T0 + 100) == 1 and t.empty


def test_dotsplit_examples():
    t = SubscriptionTable()
    p1 = t.announce(ann(b"example.com", b"pool1"), T0)
    p2 = t.announce(ann(b".example.com", b"pool2"), T0)
    t.announce(ann(b"com", b"pool3"), T0)
    assert t.lookup_dotsplit(b"example.com", T0) is p1
    assert t.lookup_dotsplit(b"www.example.com", T0) is p2
    assert t.lookup_dotsplit(b"a.b.example.com", T0) is p2
    assert t.lookup_dotsplit(b"x.com", T0) is None
    assert t.lookup_dotsplit(b"foo.org", T0) is None
    assert t.lookup_dotsplit(b"nodots", T0) is None


def test_dotsplit_tries_at_most_five_keys():
    t = SubscriptionTable()
    t.announce(ann(b".f.g", b"x"), T0)
    t.announce(ann(b".g", b"y"), T0)
    assert t.lookup_dotsplit(b"a.b.c.d.e.f.g", T0) is None  # .f.g would be the 6th try
    assert t.lookup_dotsplit(b"b.c.d.e.f.g", T0).name == b"x"  # the 5th try


def test_dotsplit_goes_on_when_the_pool_has_no_alive_node():
    t = SubscriptionTable()
    dead = t.announce(ann(b"www.example.com", b"dead"), T0)
    assert t.lookup(b"www.example.com", T0) is dead
    t.connect_failed(b"www.example.com", dead, T0)
    wild = t.announce(ann(b".example.com", b"wild"), T0)
    assert t.lookup_dotsplit(b"www.example.com", T0) is wild
    assert t.pool(b"www.example.com").hits == 2


# ---------------------------------------------------------------------------
# limits, stats order, hand-over


def test_ten_thousand_keys_and_no_more():
    t = SubscriptionTable(max_keys=10000)
    for i in range(10000):
        t.announce(ann(b"key%d" % i, b"a"), T0)
    assert len(t) == 10000 and t.node_count == 10000
    with pytest.raises(SubscriptionError, match="too many keys") as info:
        t.announce(ann(b"one-more", b"a"), T0)
    assert info.value.key == b"one-more"
    assert len(t) == 10000 and t.pool(b"one-more") is None
    # the others are undisturbed: refresh, new nodes in existing pools, lookups
    assert t.announce(ann(b"key5", b"a"), T0 + 1).last_check == int(T0) + 1
    assert t.announce(ann(b"key5", b"b"), T0 + 1) is not None
    assert t.lookup(b"key9999", T0 + 1).name == b"a"
    t.announce(ann(b"key0", b"a", unsubscribe=True), T0 + 1)
    assert t.announce(ann(b"one-more", b"a"), T0 + 1) is not None


def test_nodes_per_key_are_bounded():
    t = SubscriptionTable(max_nodes=3)
    for i in range(3):
        t.announce(ann(b"k", b"n%d" % i), T0)
    with pytest.raises(SubscriptionError, match="too many nodes for key k"):
        t.announce(ann(b"k", b"n3"), T0)
    assert t.node_count == 3
    assert t.announce(ann(b"k", b"n1"), T0 + 1) is not None  # refresh still works
    assert t.announce(ann(b"other", b"n3"), T0) is not None


def test_pools_for_stats_by_hash_then_creation():
    assert stats_hash(b"aana.com") == stats_hash(b"aesb.com")
    t = SubscriptionTable()
    for key in (b"example.com", b"aesb.com", b"h\xe9\xff", b"aana.com", b"zzz"):
        t.announce(ann(key, b"a"), T0)
    got = [p.key for p in t.pools_for_stats()]
    assert [stats_hash(k) for k in got] == sorted(stats_hash(k) for k in got)
    assert got.index(b"aesb.com") == got.index(b"aana.com") - 1
    # re-created pools go after their equal-hash peers
    t.announce(ann(b"aesb.com", b"a", unsubscribe=True), T0)
    t.announce(ann(b"aesb.com", b"a"), T0)
    got = [p.key for p in t.pools_for_stats()]
    assert got.index(b"aana.com") == got.index(b"aesb.com") - 1


@pytest.mark.parametrize("step", [1, 2, 3, 512])
def test_pools_for_stats_in_steps_is_the_same_order_a_run_at_a_time(step):
    t = SubscriptionTable()
    keys = [b"aesb.com", b"k%d" % 7, b"aana.com", b"example.com", b"h\xe9\xff", b"zzz"]
    keys += [b"key-%03d.example.com" % i for i in range(40)]
    for key in keys:
        t.announce(ann(key, b"a"), T0)
    # a re-created pool goes after its equal-hash peer, in steps as in one go
    t.announce(ann(b"aesb.com", b"a", unsubscribe=True), T0)
    t.announce(ann(b"aesb.com", b"a"), T0)
    walk = list(t.pools_for_stats_in_steps(step))
    pauses = [i for i, pool in enumerate(walk) if pool is None]
    runs = -(-len(keys) // step)
    assert pauses == list(range(runs))      # a pause per run sorted, all before any pool
    assert [p.key for p in walk[runs:]] == [p.key for p in t.pools_for_stats()]
    assert list(SubscriptionTable().pools_for_stats_in_steps(step)) == []


def test_dump_and_load_round_trip():
    src = SubscriptionTable()
    a = src.announce(ann(b"k", b"a:1", modifier1=5, modifier2=2, cores=3, load=4, weight=6,
                         notify=b"/n", unix=int(T0)), T0, uid=1, gid=2, pid=3)
    src.announce(ann(b"k", b"b:1"), T0)
    src.announce(ann(b"\xff\x00key", b"@x"), T0)
    dead = src.announce(ann(b"k", b"dead"), T0)
    src.lookup(b"k", T0)
    src.connected(a)
    a.tx, a.rx, a.failcnt = 100, 200, 1
    dead.ref = 1  # a session still uses it: marked dead, not yet removed
    src.connect_failed(b"k", dead, T0)
    assert dead in src.pool(b"k").nodes
    data = src.dump()
    assert json.loads(data)["version"] == 1

    dst = SubscriptionTable()
    assert dst.load(data, T0 + 5) == 3
    assert [p.key for p in dst.pools_for_stats()] == [p.key for p in src.pools_for_stats()]
    b = dst.pool(b"k").by_address[b"a:1"]
    for field in ("modifier1", "modifier2", "last_check", "pid", "uid", "gid", "requests",
                  "last_requests", "tx", "rx", "cores", "load", "weight", "failcnt", "notify",
                  "created_unix", "last_unix"):
        assert getattr(b, field) == getattr(a, field), field
    assert b.ref == 0 and b.death_mark == 0 and dst.pool(b"k").hits == src.pool(b"k").hits
    assert [n.name for n in dst.pool(b"k").nodes] == [b"a:1", b"b:1"]
    assert dst.node_count == 3
    assert dst.lookup(b"\xff\x00key", T0 + 5).name == b"@x"


def test_an_iphash_key_sends_each_client_to_the_same_node_after_a_hand_over():
    """The rendezvous seeds are made when a node joins an iphash key, by an announce
    or by a load: the loaded key picks as the original one did."""
    src = SubscriptionTable(algo="iphash")
    for i in range(5):
        src.announce(ann(b"k", b"10.1.0.%d:3031" % i), T0)
    dst = SubscriptionTable()
    assert dst.load(src.dump(), T0) == 5
    clients = [b"10.9.%d.%d" % (i // 256, i % 256) for i in range(500)]
    picked = {}
    for table in (src, dst):
        for client in clients:
            node = table.lookup(b"k", T0, client)
            table.release(node)
            picked.setdefault(client, []).append(node.name)
    assert all(a == b for a, b in picked.values())
    assert len({a for a, _ in picked.values()}) == 5


def test_load_keeps_newer_nodes_and_skips_expired_ones():
    src = SubscriptionTable()
    src.announce(ann(b"k", b"old"), T0 - 100)
    src.announce(ann(b"k", b"known", modifier1=1), T0)
    dst = SubscriptionTable()
    mine = dst.announce(ann(b"k", b"known", modifier1=9), T0 + 1)
    assert dst.load(src.dump(), T0 + 2) == 0
    assert dst.pool(b"k").nodes == [mine] and mine.modifier1 == 9


@pytest.mark.parametrize("data", [b"", b"junk", b"\xff", b"[]", b'{"version":2,"pools":[]}',
                                  b'{"version":1}', b'{"version":1,"pools":[{"key":"!!"}]}',
                                  b'{"version":1,"pools":[{"key":"aw==","hits":0,"nodes":[1]}]}'])
def test_load_rejects_damaged_dumps_without_change(data):
    t = SubscriptionTable()
    t.announce(ann(), T0)
    with pytest.raises(SubscriptionError):
        t.load(data, T0)
    assert t.node_count == 1 and len(t) == 1


def test_load_respects_limits():
    src = SubscriptionTable()
    for i in range(5):
        src.announce(ann(b"k%d" % i, b"a"), T0)
        src.announce(ann(b"k%d" % i, b"b"), T0)
    dst = SubscriptionTable(max_keys=3, max_nodes=1)
    assert dst.load(src.dump(), T0) == 3
    assert len(dst) == 3 and dst.node_count == 3


# ---------------------------------------------------------------------------
# signed subscriptions (the D9 policy), with a stand-in verifier


class FakeVerifier:
    """Accepts a signature equal to b"good"; knows the keys in *keys*."""

    def __init__(self, keys=(b"k",)):
        self.keys = set(keys)
        self.calls = 0

    def check(self, a: Announcement) -> bool:
        self.calls += 1
        return a.key in self.keys and a.sign == b"good"


def signed(key=b"k", address=b"a:1", unix: Optional[int] = int(T0), sig=b"good", **kw):
    return ann(key, address, unix=unix, signer=lambda data: sig, **kw)


def test_signed_new_node_needs_a_fresh_valid_signature():
    v = FakeVerifier()
    t = SubscriptionTable(verifier=v, sign_tolerance=100)
    with pytest.raises(SubscriptionError, match="unsigned"):
        t.announce(ann(), T0)
    with pytest.raises(SubscriptionError, match="without a unix"):
        t.announce(parse_announcement(datagram(KA + [(b"sign", b"good")])), T0)
    with pytest.raises(SubscriptionError, match="expired"):
        t.announce(signed(unix=int(T0) - 101), T0)
    with pytest.raises(SubscriptionError, match="invalid signature"):
        t.announce(signed(sig=b"bad"), T0)
    with pytest.raises(SubscriptionError):
        t.announce(signed(key=b"unknown-key"), T0)  # no key file
    assert t.empty
    node = t.announce(signed(unix=int(T0) - 100), T0)  # exactly at the tolerance
    assert node.created_unix == node.last_unix == int(T0) - 100
    # no upper bound on the timestamp
    assert t.announce(signed(address=b"b:1", unix=int(T0) + 10 ** 6), T0) is not None


def test_signed_refresh_must_be_strictly_newer():
    t = SubscriptionTable(verifier=FakeVerifier())
    node = t.announce(signed(unix=1000 + int(T0)), T0)
    assert t.announce(signed(unix=1001 + int(T0)), T0 + 1) is node
    assert node.last_unix == 1001 + int(T0) and node.created_unix == 1000 + int(T0)
    for unix in (1001, 1000, 999):  # a replay, or older than the last accepted one
        with pytest.raises(SubscriptionError) as info:
            t.announce(signed(unix=unix + int(T0)), T0 + 2)
        assert str(info.value) == ("invalid (sniffed ?) packet sent for slot: k node: a:1 "
                                   "unix_check: %d" % (1001 + int(T0)))
    assert node.last_check == int(T0) + 1
    with pytest.raises(SubscriptionError, match="invalid signature"):
        t.announce(signed(unix=2000 + int(T0), sig=b"bad"), T0 + 2)
    assert node.last_unix == 1001 + int(T0)


def test_signed_unsubscribe():
    t = SubscriptionTable(verifier=FakeVerifier())
    t.announce(signed(unix=int(T0)), T0)
    with pytest.raises(SubscriptionError, match="sniffed"):
        # built with unix T0 - 1, sent as T0: not newer than the subscribe
        t.announce(signed(unix=int(T0) - 1, unsubscribe=True), T0)
    with pytest.raises(SubscriptionError, match="invalid signature"):
        t.announce(signed(unix=int(T0) + 5, unsubscribe=True, sig=b"bad"), T0)
    assert t.node_count == 1
    t.announce(signed(unix=int(T0), unsubscribe=True), T0)  # carries T0 + 1
    assert t.empty
    # an unsubscribe for a node that does not exist is not checked at all
    assert t.announce(ann(b"k", b"a:1", unsubscribe=True), T0) is None


def test_trusted_senders_skip_the_signature_checks():
    v = FakeVerifier()
    t = SubscriptionTable(verifier=v)
    assert t.announce(ann(), T0, uid=1000, trusted=True) is not None
    assert t.announce(ann(unsubscribe=True), T0, trusted=True) is None
    with pytest.raises(SubscriptionError):
        t.announce(ann(b"k", b"c"), T0, uid=1000)
    assert v.calls == 0  # unsigned packets fail before the verifier is asked
    assert t.empty


def test_rejected_signed_packet_leaves_the_table_alone():
    log = Log()
    t = SubscriptionTable(verifier=FakeVerifier(), log=log)
    with pytest.raises(SubscriptionError) as info:
        t.announce(signed(sig=b"bad"), T0)
    assert info.value.key == b"k" and info.value.address == b"a:1"
    assert t.empty and not log


# ---------------------------------------------------------------------------
# replays after a removal (D9): the last timestamp of a removed node is remembered


def test_a_replay_after_the_signed_unsubscribe_is_refused():
    log = Log()
    t = SubscriptionTable(verifier=FakeVerifier(), log=log)
    captured = signed(unix=int(T0))
    t.announce(captured, T0)
    t.announce(signed(unix=int(T0), unsubscribe=True), T0)  # carries T0 + 1
    assert t.empty and t.removed_unix(b"k", b"a:1") == int(T0) + 1
    for replay in (captured, signed(unix=int(T0) + 1)):
        with pytest.raises(SubscriptionError) as info:
            t.announce(replay, T0 + 5)
        assert str(info.value) == ("replayed subscription packet for slot: k node: a:1 (unix %d; "
                                   "the node was removed after accepting unix %d)"
                                   % (replay.unix, int(T0) + 1))
    assert t.empty and t.refused_replays == 2
    # the node itself comes back with a newer packet, and is then judged as any node
    del log[:]
    node = t.announce(signed(unix=int(T0) + 2), T0 + 5)
    assert node is not None and node.last_unix == int(T0) + 2
    assert t.removed_unix(b"k", b"a:1") is None
    assert log == ["[uwsgi-subscription for pid 0] new pool: k (hash key: %d)" % stats_hash(b"k"),
                   "[uwsgi-subscription for pid 0] k => new node: a:1"]
    with pytest.raises(SubscriptionError, match="sniffed"):
        t.announce(captured, T0 + 6)


def test_a_replay_after_expiry_or_a_failed_connect_is_refused():
    t = SubscriptionTable(verifier=FakeVerifier(), tolerance=10)
    t.announce(signed(unix=int(T0)), T0)
    t.announce(signed(unix=int(T0) + 8), T0 + 8)
    assert t.expire(T0 + 19) == 1 and t.empty  # no announce for 11 s
    for unix in (int(T0), int(T0) + 8):
        with pytest.raises(SubscriptionError, match="replayed"):
            t.announce(signed(unix=unix), T0 + 20)
    node = t.announce(signed(unix=int(T0) + 20), T0 + 20)
    t.connect_failed(b"k", node, T0 + 21)
    assert t.empty and t.removed_unix(b"k", b"a:1") == int(T0) + 20
    with pytest.raises(SubscriptionError, match="replayed"):
        t.announce(signed(unix=int(T0) + 20), T0 + 22)
    # another node of the key is not concerned
    assert t.announce(signed(address=b"b:1", unix=int(T0)), T0 + 22) is not None


def test_removed_nodes_are_remembered_as_long_as_the_signing_tolerance():
    t = SubscriptionTable(verifier=FakeVerifier(), sign_tolerance=100)
    t.announce(signed(unix=int(T0)), T0)
    t.announce(signed(unix=int(T0), unsubscribe=True), T0)
    t.expire(T0 + 101)          # unix T0 + 1 would still pass the tolerance check
    assert t.removed_unix(b"k", b"a:1") == int(T0) + 1
    with pytest.raises(SubscriptionError, match="replayed"):
        t.announce(signed(unix=int(T0) + 1), T0 + 101)
    t.expire(T0 + 102)          # from now on such a packet is refused as expired
    assert t.removed_unix(b"k", b"a:1") is None
    with pytest.raises(SubscriptionError, match="expired"):
        t.announce(signed(unix=int(T0) + 1), T0 + 102)


def test_the_replay_memory_is_bounded_oldest_removal_first():
    log = Log()
    t = SubscriptionTable(verifier=FakeVerifier(), replay_memory=2, log=log)
    for name in (b"a:1", b"b:1", b"c:1"):
        t.announce(signed(address=name, unix=int(T0)), T0)
        t.announce(signed(address=name, unix=int(T0), unsubscribe=True), T0)
    assert t.removed_unix(b"k", b"a:1") is None and t.replay_memory_evicted == 1
    assert [line for line in log if "remembered against replays" in line] == [
        "[uwsgi-subscription for pid 0] 2 removed nodes remembered against replays: from now on "
        "the oldest is forgotten for each new one"]
    # past the bound a forgotten node's packets are accepted again (uWSGI's behaviour)
    assert t.announce(signed(address=b"a:1", unix=int(T0)), T0 + 1) is not None
    with pytest.raises(SubscriptionError, match="replayed"):
        t.announce(signed(address=b"b:1", unix=int(T0)), T0 + 1)


def test_unsigned_tables_remember_nothing_and_trusted_senders_skip_the_check():
    t = SubscriptionTable()
    t.announce(ann(unix=int(T0)), T0)
    t.announce(ann(unsubscribe=True, unix=int(T0)), T0)
    assert t.removed_unix(b"k", b"a:1") is None
    t = SubscriptionTable(verifier=FakeVerifier())
    t.announce(signed(unix=int(T0)), T0)
    t.announce(signed(unix=int(T0), unsubscribe=True), T0)
    assert t.announce(signed(unix=int(T0)), T0, trusted=True) is not None


def test_the_replay_memory_survives_a_hand_over():
    src = SubscriptionTable(verifier=FakeVerifier())
    src.announce(signed(unix=int(T0)), T0)
    src.announce(signed(unix=int(T0), unsubscribe=True), T0)
    dst = SubscriptionTable(verifier=FakeVerifier())
    assert dst.load(src.dump(), T0 + 1) == 0
    assert dst.removed_unix(b"k", b"a:1") == int(T0) + 1
    with pytest.raises(SubscriptionError, match="replayed"):
        dst.announce(signed(unix=int(T0)), T0 + 1)
    # a dump without the list (an older router's) loads as before
    doc = json.loads(src.dump())
    del doc["removed"]
    assert SubscriptionTable(verifier=FakeVerifier()).load(json.dumps(doc).encode(), T0) == 0


# ---------------------------------------------------------------------------
# a full table under a flood of new keys


def test_a_flood_of_new_keys_never_refuses_or_expires_a_subscribed_node():
    t = SubscriptionTable(max_keys=5, tolerance=10)
    legit = t.announce(ann(b"legit", b"a:1"), T0)
    refused = 0
    for i in range(300):                       # 30 s of 10 fresh keys a second
        now = T0 + i / 10
        if i % 50 == 0:                        # the subscriber's announce every 5 s
            assert t.announce(ann(b"legit", b"a:1"), now) is legit
        t.expire(now)
        try:
            t.announce(ann(b"flood%d" % i, b"x:1"), now)
        except TableFull as exc:
            assert str(exc) == "too many keys (5): flood%d refused" % i
            refused += 1
        assert t.lookup(b"legit", now) is legit
        t.release(legit)
        assert len(t) <= 5
    assert refused > 200 and t.refused_keys == refused
    assert legit.pool is not None and legit.death_mark == 0


def test_new_keys_get_the_slots_of_expired_and_removed_keys_at_once():
    t = SubscriptionTable(max_keys=3, tolerance=10)
    for i in range(3):
        t.announce(ann(b"flood%d" % i, b"x:1"), T0 + i)
    with pytest.raises(TableFull):
        t.announce(ann(b"new", b"a:1"), T0 + 10)
    assert t.expire(T0 + 11) == 1               # flood0 expired
    assert t.announce(ann(b"new", b"a:1"), T0 + 11) is not None
    t.announce(ann(b"flood1", b"x:1", unsubscribe=True), T0 + 11)
    assert t.announce(ann(b"new2", b"a:1"), T0 + 11) is not None   # one-off keys keep no slot


@pytest.mark.parametrize("how", ["unsubscribe", "connect failure", "expiry"])
def test_a_subscriber_whose_pool_went_gets_its_key_back_while_a_flood_fills_the_table(how):
    t = SubscriptionTable(max_keys=3, tolerance=10)
    node = t.announce(ann(b"legit", b"a:1"), T0)
    t.announce(ann(b"legit", b"a:1"), T0 + 5)           # a periodic subscriber
    t.announce(ann(b"flood0", b"x:1"), T0 + 5)
    t.announce(ann(b"flood1", b"x:1"), T0 + 5)
    now = T0 + 6
    if how == "unsubscribe":                             # a restart
        t.announce(ann(b"legit", b"a:1", unsubscribe=True), now)
    elif how == "connect failure":
        t.connect_failed(b"legit", node, now)
    else:                                                # its announces were lost
        now = T0 + 16
        t.announce(ann(b"flood0", b"x:1"), T0 + 15)
        t.announce(ann(b"flood1", b"x:1"), T0 + 15)
        t.expire(now)
    assert t.pool(b"legit") is None and t.reserved_keys == 1
    with pytest.raises(TableFull):                       # the flood does not get its slot
        t.announce(ann(b"flood2", b"x:1"), now)
    back = t.announce(ann(b"legit", b"b:1"), now + 1)    # back, on another port
    assert back is not None and t.reserved_keys == 0 and len(t) == 3
    assert t.refused_keys == 1


def test_a_kept_slot_is_freed_twice_the_tolerance_after_the_last_announce():
    t = SubscriptionTable(max_keys=2, tolerance=10)
    t.announce(ann(b"legit", b"a:1"), T0)
    t.announce(ann(b"legit", b"a:1"), T0 + 1)
    t.announce(ann(b"flood0", b"x:1"), T0 + 1)
    t.announce(ann(b"legit", b"a:1", unsubscribe=True), T0 + 2)
    with pytest.raises(TableFull):
        t.announce(ann(b"flood1", b"x:1"), T0 + 21)
    assert t.announce(ann(b"flood1", b"x:1"), T0 + 22) is not None   # no sweep needed
    assert t.reserved_keys == 0
    with pytest.raises(TableFull):                       # the slot went to flood1
        t.announce(ann(b"legit", b"a:1"), T0 + 22)
    # the sweep forgets kept slots too
    t = SubscriptionTable(max_keys=2, tolerance=10)
    t.announce(ann(b"legit", b"a:1"), T0)
    t.announce(ann(b"legit", b"a:1"), T0 + 1)
    t.announce(ann(b"legit", b"a:1", unsubscribe=True), T0 + 2)
    t.expire(T0 + 21)
    assert t.reserved_keys == 1
    t.expire(T0 + 22)
    assert t.reserved_keys == 0


def test_a_full_key_refuses_new_nodes_but_refreshes_its_own():
    t = SubscriptionTable(max_nodes=2)
    a = t.announce(ann(b"k", b"a"), T0)
    t.announce(ann(b"k", b"b"), T0)
    with pytest.raises(TableFull, match="too many nodes for key k"):
        t.announce(ann(b"k", b"c"), T0)
    assert t.announce(ann(b"k", b"a"), T0 + 1) is a and t.refused_nodes == 1


def test_the_proof_is_checked_before_the_room():
    v = FakeVerifier(keys=(b"k", b"k2"))
    t = SubscriptionTable(verifier=v, max_keys=1)
    t.announce(signed(unix=int(T0)), T0)
    with pytest.raises(SubscriptionError, match="unsigned") as info:
        t.announce(ann(b"flood", b"x:1", unix=int(T0)), T0)
    assert not isinstance(info.value, TableFull)
    with pytest.raises(SubscriptionError, match="invalid signature"):
        t.announce(signed(b"k2", sig=b"bad"), T0)
    assert t.refused_keys == 0
    with pytest.raises(TableFull):                    # a proven new key meets the limit
        t.announce(signed(b"k2"), T0)
    assert t.refused_keys == 1 and len(t) == 1


# ---------------------------------------------------------------------------
# the shared-secret proof (an hmac var): same freshness and replay rules as sign

HKEY = b"0123456789abcdef-shared"


def hmaced(key=b"k", address=b"a:1", unix: Optional[int] = int(T0), secret=HKEY, **kw):
    return ann(key, address, unix=unix, hmac_signer=lambda block: hmac_tag(secret, block), **kw)


def test_hmac_var_parses_with_what_it_covers():
    a = parse_announcement(datagram(KA + [(b"unix", b"5"), (b"hmac", b"ab")]))
    assert a.hmac == b"ab" and a.hmac_part == encode_vars(KA + [(b"unix", b"5")])
    assert a.sign is None and a.unix == 5
    assert parse_announcement(datagram(KA)).hmac is None
    assert parse_announcement(datagram(KA + [(b"hmac", b"")])).hmac == b""  # present, empty


def test_only_sign_may_follow_hmac():
    _rejected(datagram(KA + [(b"hmac", b"x"), (b"unix", b"1")]), "only the sign var may follow")
    _rejected(datagram(KA + [(b"hmac", b"x"), (b"hmac", b"y")]), "only the sign var may follow")
    _rejected(datagram(KA + [(b"sign", b"x"), (b"hmac", b"y")]), "sign var must be the last")
    a = parse_announcement(datagram(KA + [(b"hmac", b"h"), (b"sign", b"s")]))
    assert a.hmac_part == encode_vars(KA)
    assert a.signed_part == encode_vars(KA + [(b"hmac", b"h")])  # RSA covers the hmac


def test_build_writes_hmac_after_unix_and_before_sign():
    seen = []
    pkt = build_announcement(b"k", b"a:1", unix=7, hmac_signer=lambda b: seen.append(b) or b"H",
                             signer=lambda b: seen.append(b) or b"S")
    names = [n for n, _ in parse_vars(pkt[4:])]
    assert names[-3:] == [b"unix", b"hmac", b"sign"]
    assert seen[1] == seen[0] + encode_vars([(b"hmac", b"H")])
    with pytest.raises(SubscriptionError, match="needs a unix"):
        build_announcement(b"k", b"a:1", hmac_signer=lambda b: b"H")


def test_hmac_new_node_needs_a_fresh_valid_hmac():
    t = SubscriptionTable(verifier=HmacChecker(HKEY), sign_tolerance=100)
    with pytest.raises(SubscriptionError, match="unsigned"):
        t.announce(ann(), T0)
    with pytest.raises(SubscriptionError, match="without a unix"):
        t.announce(parse_announcement(datagram(KA + [(b"hmac", b"00")])), T0)
    with pytest.raises(SubscriptionError, match="expired"):
        t.announce(hmaced(unix=int(T0) - 101), T0)
    with pytest.raises(SubscriptionError, match="invalid hmac"):
        t.announce(hmaced(secret=b"another-key-of-16-bytes"), T0)
    with pytest.raises(SubscriptionError, match="without an hmac"):
        t.announce(signed(), T0)  # an RSA signature is no proof here
    assert t.empty
    node = t.announce(hmaced(unix=int(T0) - 100), T0)
    assert node.last_unix == int(T0) - 100


def test_hmac_refresh_and_replay_after_removal_follow_the_signature_rules():
    t = SubscriptionTable(verifier=HmacChecker(HKEY))
    captured = hmaced(unix=int(T0))
    t.announce(captured, T0)
    with pytest.raises(SubscriptionError, match="sniffed"):
        t.announce(captured, T0 + 1)
    t.announce(hmaced(unix=int(T0), unsubscribe=True), T0 + 1)  # carries T0 + 1
    assert t.empty
    with pytest.raises(SubscriptionError, match="replayed"):
        t.announce(captured, T0 + 2)
    assert t.refused_replays == 1
    assert t.announce(hmaced(unix=int(T0) + 2), T0 + 2) is not None


def test_an_altered_hmac_packet_is_refused():
    t = SubscriptionTable(verifier=HmacChecker(HKEY))
    good = build_announcement(b"k", b"a:1", unix=int(T0),
                              hmac_signer=lambda block: hmac_tag(HKEY, block))
    forged = good.replace(b"a:1", b"b:1")
    with pytest.raises(SubscriptionError, match="invalid hmac"):
        t.announce(parse_announcement(forged), T0)
    assert t.announce(parse_announcement(good), T0) is not None
