#!/usr/bin/env python3
"""Fuzz target: the subscription datagram parser (uwsgi_fastrouter/subscription.py).

Input layout: one or more datagrams, each as a little-endian u16 length and that
many bytes (a short last one takes what is left).  A length with the top bit set
asks for the datagram to be filled up to the 64 KiB limit: the byte after it says
how many bytes short of 65535 the vars end, and an ``sni_ca`` var of the right size
goes in front (libFuzzer would hardly build inputs that big by itself, and the
limit is where a builder can overflow).  Each datagram goes through
parse_announcement; an accepted one is checked, forwarded (built again as a
router resubscribing would) and applied to a small table, with a lookup and a
release after it.  Only SubscriptionError may come out of any of these.

    python3 fuzz/fuzz_subscription.py [libFuzzer flags] [CORPUS_DIR...] [--fallback]
"""

from __future__ import annotations

import struct
import sys

import harness

if __name__ == "__main__":
    # before the package is imported here: harness.main imports this module again,
    # with the package under coverage instrumentation
    sys.exit(harness.main("fuzz_subscription"))

from uwsgi_fastrouter.protocol import encode_vars
from uwsgi_fastrouter.subscription import (
    MAX_ADDRESS, MAX_KEY, SubscriptionError, SubscriptionTable, forward_announcement,
    parse_announcement,
)

NOW = 1_700_000_000.0
ROUTER_ADDRESS = b"127.0.0.1:3017"


class Verifier:
    """Accepts a signature of b"good": lets the fuzzer reach the signed paths."""

    def check(self, announcement) -> bool:
        return announcement.sign == b"good"


def fill_to_limit(datagram: bytes, slack: int) -> bytes:
    """*datagram* with an ``sni_ca`` var in front, sized so that its vars end *slack*
    bytes short of 65535; the header's datasize follows."""
    room = 0xFFFF - (len(datagram) - 4) - slack - 4 - len(b"sni_ca")
    if len(datagram) < 4 or room < 0:
        return datagram
    block = encode_vars([(b"sni_ca", b"c" * room)]) + datagram[4:]
    return datagram[:1] + struct.pack("<H", len(block)) + datagram[3:4] + block


def datagrams(data: bytes):
    pos = 0
    while pos < len(data):
        word = struct.unpack_from("<H", data, pos)[0] if pos + 2 <= len(data) else 0
        pos += 2
        size = word & 0x7FFF
        datagram = data[pos:pos + size]
        pos += size
        if word & 0x8000:
            slack = data[pos] if pos < len(data) else 0
            pos += 1
            datagram = fill_to_limit(datagram, slack)
        yield datagram


def check_accepted(datagram: bytes, a) -> None:
    assert 0 < len(a.key) <= MAX_KEY and 0 < len(a.address) <= MAX_ADDRESS
    assert 0 <= a.modifier1 <= 255 and 0 <= a.modifier2 <= 255
    assert datagram[4:].startswith(a.signed_part)
    assert a.unsubscribe == (datagram[3] != 0)


def test_one_input(data: bytes) -> None:
    tables = (SubscriptionTable(max_keys=4, max_nodes=3),
              SubscriptionTable(algo="lrc", max_keys=4, max_nodes=3, verifier=Verifier()))
    now = NOW
    for datagram in datagrams(data):
        now += 1
        try:
            a = parse_announcement(datagram)
        except SubscriptionError:
            continue
        check_accepted(datagram, a)
        if not a.forwarded:
            try:
                again = parse_announcement(forward_announcement(a, ROUTER_ADDRESS))
            except SubscriptionError:
                pass
            else:
                assert (again.key, again.unsubscribe, again.forwarded) == (a.key, a.unsubscribe, True)
        for table in tables:
            try:
                table.announce(a, now)
            except SubscriptionError:
                continue
            node = table.lookup(a.key, now)
            if node is not None:
                table.release(node)
    for table in tables:
        table.expire(now + 100)
        assert len(table) == 0 or all(p.nodes for p in table.pools_for_stats())
