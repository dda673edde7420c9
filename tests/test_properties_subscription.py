"""Properties of the subscription datagram (uwsgi_fastrouter/subscription.py).

tests/test_subscription.py checks the documented datagrams and each refusal once;
these check the builder and the parser against each other over generated fields,
and the parser against hostile bytes.
"""

from __future__ import annotations

from typing import Optional

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from property_support import PROPERTY, lying_records, mutated, vars_blocks
from uwsgi_fastrouter.protocol import HEADER, encode_vars
from uwsgi_fastrouter.subscription import (
    MAX_ADDRESS, MAX_KEY, Announcement, SubscriptionError, build_announcement,
    forward_announcement, parse_announcement,
)

_NUMBER_MAX = 2 ** 63

short_bytes = st.binary(min_size=1, max_size=12)
keys = st.one_of(short_bytes, st.just(b"k" * MAX_KEY))
addresses = st.one_of(short_bytes, st.sampled_from([b"127.0.0.1:3031", b"/run/app.sock",
                                                    b"@abstract", b"a" * MAX_ADDRESS]))
numbers = st.one_of(st.integers(0, 300), st.just(_NUMBER_MAX), st.integers(0, _NUMBER_MAX))
optional_paths = st.one_of(st.none(), st.just(b""), st.binary(min_size=1, max_size=16))


_MAX_VARS = 0xFFFF


def _vars_size(fields: dict) -> int:
    return len(build_announcement(**fields)) - 4


@st.composite
def announcement_fields(draw) -> dict:
    """Valid arguments of build_announcement; some fill the datagram to within a
    few hundred bytes of the 65535-byte limit (a long SNI path)."""
    signed = draw(st.booleans())
    fields = dict(
        key=draw(keys), address=draw(addresses),
        modifier1=draw(st.integers(0, 255)), modifier2=draw(st.integers(0, 255)),
        cores=draw(numbers), load=draw(numbers), weight=draw(numbers),
        unsubscribe=draw(st.booleans()), sni_key=draw(optional_paths),
        sni_crt=draw(optional_paths), sni_ca=draw(optional_paths), notify=draw(optional_paths),
        forwarded=draw(st.booleans()),
        unix=draw(st.integers(0, _NUMBER_MAX - 1)) if signed or draw(st.booleans()) else None,
    )
    if signed:
        signature = draw(st.binary(max_size=40))
        fields["signer"] = lambda data: signature
    if draw(st.integers(0, 3)) == 0:
        fields["sni_ca"] = None
        room = _MAX_VARS - _vars_size(fields) - len(b"sni_ca") - 4 - draw(st.integers(0, 400))
        if room > 0:
            fields["sni_ca"] = b"c" * room
    return fields


def _absent_if_empty(value: Optional[bytes]) -> Optional[bytes]:
    return value or None


@PROPERTY
@given(announcement_fields())
@example(dict(key=b"k", address=b"a", unsubscribe=True, unix=_NUMBER_MAX - 1))
def test_build_then_parse_gives_the_fields_back(fields):
    packet = build_announcement(**fields)
    a = parse_announcement(packet)
    signer = fields.get("signer")
    unix = fields.get("unix")
    expected_unix = None if unix is None else unix + (1 if fields.get("unsubscribe") else 0)
    assert a == Announcement(
        unsubscribe=fields.get("unsubscribe", False), key=fields["key"],
        address=fields["address"], modifier1=fields.get("modifier1", 0),
        modifier2=fields.get("modifier2", 0), cores=fields.get("cores", 0),
        load=fields.get("load", 0), weight=fields.get("weight", 0),
        sni_key=_absent_if_empty(fields.get("sni_key")),
        sni_crt=_absent_if_empty(fields.get("sni_crt")),
        sni_ca=_absent_if_empty(fields.get("sni_ca")),
        notify=_absent_if_empty(fields.get("notify")),
        unix=expected_unix,
        sign=None if signer is None else signer(b""),
        signed_part=a.signed_part,
        forwarded=fields.get("forwarded", False),
    )
    # the signature covers exactly the vars before the sign record
    tail = b"" if signer is None else encode_vars([(b"sign", a.sign)])
    assert packet[4:] == a.signed_part + tail
    # the parsed announcement, built again, is the same datagram
    again = {name: getattr(a, name) for name in (
        "key", "address", "modifier1", "modifier2", "cores", "load", "weight", "unsubscribe",
        "sni_key", "sni_crt", "sni_ca", "notify", "forwarded")}
    if a.unix is not None:
        again["unix"] = a.unix - (1 if a.unsubscribe else 0)
    if signer is not None:
        again["signer"] = signer
    if not any(fields.get(name) == b"" for name in ("sni_key", "sni_crt", "sni_ca", "notify")):
        assert build_announcement(**again) == packet


def _check_accepted(datagram: bytes, a: Announcement) -> None:
    """What the rest of the router may rely on in any accepted announcement."""
    assert 0 < len(a.key) <= MAX_KEY and 0 < len(a.address) <= MAX_ADDRESS
    assert 0 <= a.modifier1 <= 255 and 0 <= a.modifier2 <= 255
    assert all(0 <= n <= _NUMBER_MAX for n in (a.cores, a.load, a.weight))
    assert a.unix is None or 0 <= a.unix <= _NUMBER_MAX
    assert datagram[4:].startswith(a.signed_part)
    assert a.unsubscribe == (datagram[3] != 0)
    for path in (a.sni_key, a.sni_crt, a.sni_ca, a.notify):
        assert path is None or len(path) > 0


def _with_header(block: bytes) -> bytes:
    return HEADER.pack(224, len(block) & 0xFFFF, 0) + block


built = announcement_fields().map(lambda fields: build_announcement(**fields))
datagrams = st.one_of(
    vars_blocks.map(_with_header),
    lying_records().map(_with_header),
    mutated(built),
    built,
    st.binary(max_size=40),
)


@PROPERTY
@given(datagrams)
def test_any_bytes_are_an_announcement_or_a_subscription_error(datagram):
    try:
        a = parse_announcement(datagram)
    except SubscriptionError as exc:
        assert str(exc)
        return
    _check_accepted(datagram, a)


@PROPERTY
@given(built, st.integers(min_value=0, max_value=0xFFFF))
def test_datasize_must_match_the_vars(packet, datasize):
    lying = packet[:1] + datasize.to_bytes(2, "little") + packet[3:]
    if datasize == len(packet) - 4:
        parse_announcement(lying)
        return
    with pytest.raises(SubscriptionError, match="announces %d bytes" % datasize):
        parse_announcement(lying)


def _sometimes(draw, valid: st.SearchStrategy, edges: st.SearchStrategy):
    """Mostly a valid value, one time in four an edge (out of range or oversized)."""
    return draw(edges) if draw(st.integers(0, 3)) == 0 else draw(valid)


any_ints = st.one_of(st.integers(-3, -1), st.integers(256, 300),
                     st.integers(_NUMBER_MAX - 2, _NUMBER_MAX + 2))
edge_sizes = st.sampled_from([0, 256, 40000, 65535, 65536])


@st.composite
def any_build_arguments(draw) -> dict:
    """build_announcement's arguments over their whole range: mostly valid, with
    numbers out of range, oversized values and datagrams filled up to the limit."""
    def blob(valid_sizes=st.integers(1, 255)) -> bytes:
        return b"b" * _sometimes(draw, valid_sizes, edge_sizes)

    def maybe_blob() -> Optional[bytes]:
        return None if draw(st.booleans()) else blob(st.integers(0, 20))

    fields = dict(key=blob(), address=blob(),
                  modifier1=_sometimes(draw, st.integers(0, 255), any_ints),
                  modifier2=_sometimes(draw, st.integers(0, 255), any_ints),
                  cores=_sometimes(draw, numbers, any_ints),
                  load=_sometimes(draw, numbers, any_ints),
                  weight=_sometimes(draw, numbers, any_ints),
                  unsubscribe=draw(st.booleans()), sni_key=maybe_blob(), sni_crt=maybe_blob(),
                  sni_ca=maybe_blob(), notify=maybe_blob(), forwarded=draw(st.booleans()),
                  unix=draw(st.one_of(st.none(), numbers, any_ints)))
    fill = draw(st.sampled_from([None, "notify", "sign"]))
    if fill is not None:
        if fill == "sign" and fields["unix"] is None:
            fields["unix"] = 1_700_000_000
        try:
            used = _vars_size(dict(fields, notify=None) if fill == "notify" else fields)
        except SubscriptionError:
            used = 0
        # the record is 2 + name + 2 + value bytes
        size = max(0, _MAX_VARS - used - 4 - len(fill) + draw(st.integers(-3, 3)))
        if fill == "notify":
            fields["notify"] = b"n" * size
        else:
            signature = b"s" * size
            fields["signer"] = lambda data: signature
    return fields


@PROPERTY
@given(any_build_arguments())
@example(dict(key=b"k", address=b"a", unix=_NUMBER_MAX, unsubscribe=True))
@example(dict(key=b"k", address=b"a", unix=-5))
@example(dict(key=b"k", address=b"a", sni_key=b"x" * 65536))
@example(dict(key=b"k", address=b"a", sni_key=b"x" * 40000, sni_crt=b"y" * 40000))
@example(dict(key=b"k", address=b"a", unix=1, signer=lambda data: b"s" * 65530))
def test_build_gives_what_parse_accepts_or_refuses(fields):
    """build_announcement never writes a datagram the parser would refuse; what it
    cannot write it refuses with its own error."""
    try:
        packet = build_announcement(**fields)
    except SubscriptionError:
        return
    _check_accepted(packet, parse_announcement(packet))


def _filled(datagram: bytes, slack: int) -> bytes:
    """*datagram* with an sni_ca var in front that makes its vars end *slack* bytes
    short of 65535 (as fuzz/fuzz_subscription.py fills datagrams)."""
    room = _MAX_VARS - (len(datagram) - 4) - slack - 4 - len(b"sni_ca")
    block = encode_vars([(b"sni_ca", b"c" * room)]) + datagram[4:]
    return datagram[:1] + len(block).to_bytes(2, "little") + datagram[3:4] + block


@PROPERTY
@given(st.one_of(built, mutated(built)), st.sampled_from([b"127.0.0.1:3117", b"r" * MAX_ADDRESS]),
       numbers)
@example(build_announcement(b"k", b"a", sni_key=b"x" * 32000, sni_crt=b"y" * 33400),
         b"r" * MAX_ADDRESS, 0)
# the fuzzer's crash (fuzz/corpus/subscription/crash-forward-overflow-*): vars of
# exactly 65535 bytes; the forwarded packet adds the router's numbers and mark
@example(_filled(HEADER.pack(224, 0, 0) + encode_vars([
    (b"key", b"big.example"), (b"address", b"127.0.0.1:3031"), (b"modifier1", b"0")]), 0),
    b"127.0.0.1:3017", 0)
def test_any_accepted_announcement_can_be_forwarded_or_is_refused(datagram, address, weight):
    """What a router forwards is derived from a hostile datagram: it is either a
    datagram the next router accepts or a SubscriptionError, never anything else."""
    try:
        a = parse_announcement(datagram)
    except SubscriptionError:
        return
    try:
        packet = forward_announcement(a, address, weight=weight)
    except SubscriptionError:
        return
    f = parse_announcement(packet)
    _check_accepted(packet, f)
    assert (f.key, f.address, f.forwarded, f.unsubscribe) == (a.key, address, True, a.unsubscribe)


def _strict_outcome(datagram: bytes):
    from uwsgi_fastrouter.subscription import _parse_strict
    try:
        return _parse_strict(datagram)
    except SubscriptionError as exc:
        return ("error", str(exc))


with_rare_vars = st.builds(
    lambda base, backup, algo, vassal: build_announcement(
        key=b"k", address=b"a", weight=base, backup=backup, algo=algo, vassal=vassal),
    st.integers(0, 5), st.one_of(st.none(), st.integers(0, 3)),
    st.one_of(st.none(), st.sampled_from([b"wrr", b"lrc", b"nope"])),
    st.one_of(st.none(), st.binary(max_size=4)))


@PROPERTY
@given(st.one_of(datagrams, mutated(with_rare_vars), with_rare_vars))
def test_quick_parse_agrees_with_the_strict_one(datagram):
    """parse_announcement walks ordinary packets quickly (the usual layout with its tail
    remembered, or one general walk) and hands the rest to the strict parser: for any
    bytes, the same announcement or the same error as the strict one."""
    from uwsgi_fastrouter.subscription import _parse_common, _parse_usual
    strict = _strict_outcome(datagram)
    quick = _parse_common(datagram)
    if quick is not None:
        assert quick == strict and type(quick) is Announcement
    for _ in range(2):   # a tail not seen yet, then the remembered one
        usual = _parse_usual(datagram)
        if usual is not None:
            assert usual == strict and type(usual) is Announcement
    try:
        got = parse_announcement(datagram)
    except SubscriptionError as exc:
        got = ("error", str(exc))
    assert got == strict


@PROPERTY
@given(st.one_of(st.binary(max_size=24), st.text(max_size=12).map(lambda t: t.encode("utf-8"))))
def test_a_field_as_log_text_is_what_printable_makes_of_it(value):
    """Keys and addresses of plain ASCII skip printable(), with the same text."""
    from uwsgi_fastrouter.log import printable
    from uwsgi_fastrouter.subscription import _text
    assert _text(value) == printable(value)
