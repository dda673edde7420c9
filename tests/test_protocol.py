"""The uwsgi codec: header, vars rules, encoding, incremental reading, key scan."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uwsgi_fastrouter.protocol import (
    HEADER,
    MAX_DATASIZE,
    MalformedVars,
    Modifier1,
    Packet,
    PacketHeader,
    HeadReader,
    PacketTooLarge,
    ProtocolError,
    RequestInfo,
    encode_packet,
    encode_vars,
    iter_vars,
    parse_header,
    parse_vars,
    scan_request,
)


def u16(n: int) -> bytes:
    return struct.pack("<H", n)


def record(key: bytes, value: bytes) -> bytes:
    return u16(len(key)) + key + u16(len(value)) + value


# The example of the wire format description: HTTP_HOST=example.com, PATH_INFO=/.
EXAMPLE = bytes.fromhex(
    "00 26 00 00 09 00 48 54 54 50 5f 48 4f 53 54 0b"
    "00 65 78 61 6d 70 6c 65 2e 63 6f 6d 09 00 50 41"
    "54 48 5f 49 4e 46 4f 01 00 2f"
)
EXAMPLE_VARS = [(b"HTTP_HOST", b"example.com"), (b"PATH_INFO", b"/")]


# --------------------------------------------------------------------------- header


def test_header_layout():
    assert HEADER.size == 4
    assert parse_header(b"\x05\x34\x12\x07") == PacketHeader(5, 0x1234, 7)
    assert parse_header(b"\xff\xff\xff\x01") == PacketHeader(255, 65535, 1)


def test_header_at_offset_and_short():
    assert parse_header(b"xx\x00\x02\x00\x00", 2) == PacketHeader(0, 2, 0)
    with pytest.raises(ProtocolError):
        parse_header(b"\x00\x02\x00")
    with pytest.raises(ProtocolError):
        parse_header(b"\x00\x02\x00\x00", 1)


def test_modifier1_names():
    assert Modifier1.WSGI == 0
    assert Modifier1.CLOSE_MARK == 200
    assert Modifier1.SUBSCRIPTION == 224
    assert Modifier1.GENERIC_RESPONSE == 255


# --------------------------------------------------------------------------- vars rules


def test_example_bytes_decode():
    header = parse_header(EXAMPLE)
    assert header == PacketHeader(0, 38, 0)
    assert parse_vars(EXAMPLE[4:]) == EXAMPLE_VARS


def test_example_bytes_encode():
    assert encode_packet(EXAMPLE_VARS) == EXAMPLE


def test_empty_block_is_valid():
    assert parse_vars(b"") == []
    assert scan_request(b"") == RequestInfo(None, None, None, None)


def test_empty_value_and_duplicates_kept_in_order():
    block = record(b"A", b"") + record(b"B", b"1") + record(b"A", b"2")
    assert parse_vars(block) == [(b"A", b""), (b"B", b"1"), (b"A", b"2")]


def test_accepts_bytearray_and_memoryview():
    block = EXAMPLE[4:]
    assert parse_vars(bytearray(block)) == EXAMPLE_VARS
    assert parse_vars(memoryview(EXAMPLE)[4:]) == EXAMPLE_VARS
    assert all(type(k) is bytes and type(v) is bytes for k, v in parse_vars(bytearray(block)))


GOOD = record(b"HTTP_HOST", b"h1")

MALFORMED = {
    "zero key length": GOOD + u16(0) + u16(1) + b"x",
    "zero key length, empty rest": GOOD + u16(0) + u16(0),
    "truncated key": GOOD + u16(10) + b"HTTP",
    "key fills the block": GOOD + u16(4) + b"HOST",
    "value length missing one byte": GOOD + u16(4) + b"HOST" + b"\x01",
    "truncated value": GOOD + u16(4) + b"HOST" + u16(5) + b"abc",
    "one stray byte": GOOD + b"\x00",
    "two stray bytes": GOOD + b"\x01\x00",
    "two stray bytes alone": b"\x05\x00",
    "one stray byte alone": b"\x05",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_vars(name):
    block = MALFORMED[name]
    with pytest.raises(MalformedVars) as info:
        parse_vars(block)
    err = info.value
    assert isinstance(err, ProtocolError) and isinstance(err, ValueError)
    expected_offset = 0 if name.endswith("alone") else len(GOOD)
    assert err.offset == expected_offset
    assert err.why
    with pytest.raises(MalformedVars) as info2:
        scan_request(block)
    assert (info2.value.offset, info2.value.why) == (err.offset, err.why)
    with pytest.raises(MalformedVars):
        scan_request(block, force_key=b"forced")


def test_malformed_reasons_are_specific():
    def why(block):
        with pytest.raises(MalformedVars) as info:
            parse_vars(block)
        return info.value.why

    assert "zero key length" in why(MALFORMED["zero key length"])
    assert "stray" in why(MALFORMED["one stray byte"])
    assert "stray" in why(MALFORMED["two stray bytes"])
    assert "key" in why(MALFORMED["truncated key"])
    assert "value length" in why(MALFORMED["value length missing one byte"])
    assert "value of 5 bytes" in why(MALFORMED["truncated value"])


def test_iter_vars_yields_good_records_before_the_error():
    it = iter_vars(MALFORMED["truncated value"])
    assert next(it) == (b"HTTP_HOST", b"h1")
    with pytest.raises(MalformedVars):
        next(it)


def test_three_byte_record_is_an_error():
    # exactly 3 bytes left: a key length and one key byte, no room for the value length
    with pytest.raises(MalformedVars):
        parse_vars(u16(1) + b"K")


# --------------------------------------------------------------------------- encoding


def test_encode_limits():
    assert encode_vars([(b"K", b"")]) == u16(1) + b"K" + u16(0)
    big = b"v" * 65535
    assert encode_vars([(b"K", big)]) == u16(1) + b"K" + u16(65535) + big
    with pytest.raises(ProtocolError):
        encode_vars([(b"", b"v")])
    with pytest.raises(ProtocolError):
        encode_vars([(b"K", b"v" * 65536)])
    with pytest.raises(ProtocolError):
        encode_vars([(b"K" * 65536, b"")])


def test_encode_packet_size_limit():
    # 1 key byte + 4 length bytes + value: exactly 65535 bytes of vars is fine
    pairs = [(b"K", b"v" * (MAX_DATASIZE - 5))]
    packet = encode_packet(pairs, 5, 1)
    assert parse_header(packet) == PacketHeader(5, 65535, 1)
    assert len(packet) == 4 + 65535
    assert parse_vars(packet[4:]) == pairs
    with pytest.raises(PacketTooLarge) as info:
        encode_packet([(b"K", b"v" * (MAX_DATASIZE - 4))])
    assert info.value.datasize == 65536
    with pytest.raises(ProtocolError):
        encode_packet([], modifier1=256)


keys = st.binary(min_size=1, max_size=300)
values = st.binary(min_size=0, max_size=600)


@given(st.lists(st.tuples(keys, values), max_size=20))
def test_round_trip_property(pairs):
    block = encode_vars(pairs)
    assert parse_vars(block) == pairs
    assert list(iter_vars(memoryview(block))) == pairs
    scan_request(block)  # validates without raising
    assert encode_packet(pairs) == HEADER.pack(0, len(block), 0) + block  # at most ~18 KiB here


@given(st.lists(st.tuples(keys, values), min_size=1, max_size=8), st.data())
def test_any_truncation_is_malformed(pairs, data):
    block = encode_vars(pairs)
    cut = data.draw(st.integers(min_value=1, max_value=len(block) - 1))
    truncated = block[:cut]
    # a cut exactly at a record boundary is a valid shorter block
    boundaries = {0}
    pos = 0
    for k, v in pairs:
        pos += 4 + len(k) + len(v)
        boundaries.add(pos)
    if cut in boundaries:
        assert parse_vars(truncated) == pairs[: sorted(boundaries).index(cut)]
        scan_request(truncated)
    else:
        with pytest.raises(MalformedVars):
            parse_vars(truncated)
        with pytest.raises(MalformedVars):
            scan_request(truncated)


# --------------------------------------------------------------------------- HeadReader


def read_head(pieces, limit=MAX_DATASIZE):
    """Feed *pieces* to a HeadReader: (reader, the bytes it did not take)."""
    reader = HeadReader(limit)
    rest = b""
    for piece in pieces:
        taken = reader.feed(piece)
        rest += piece[taken:]
    return reader, rest


def test_reader_all_at_once():
    reader, rest = read_head([EXAMPLE])
    assert reader.complete and rest == b""
    assert bytes(reader.head) == EXAMPLE
    assert parse_vars(reader.vars) == EXAMPLE_VARS
    assert (reader.modifier1, reader.datasize, reader.needed) == (0, 38, 0)


def test_reader_one_byte_at_a_time():
    reader = HeadReader()
    for i in range(len(EXAMPLE)):
        assert reader.needed == (4 - i if i < 4 else len(EXAMPLE) - i)
        assert not reader.complete
        assert reader.feed(EXAMPLE[i : i + 1]) == 1
    assert reader.complete and bytes(reader.head) == EXAMPLE


def test_reader_receives_in_place_and_asks_for_nothing_past_the_vars():
    reader = HeadReader()
    asked = []
    pos = 0
    while not reader.complete:
        asked.append(reader.needed)
        n = min(reader.needed, 3)
        reader.space()[:n] = EXAMPLE[pos:pos + n]
        pos += n
        reader.advance(n)
    assert pos == len(EXAMPLE) and max(asked) <= len(EXAMPLE)
    assert bytes(reader.head) == EXAMPLE


def test_reader_leaves_the_body():
    reader, rest = read_head([EXAMPLE[:10], EXAMPLE[10:] + b"body-1", b"+2", b""])
    assert reader.complete and parse_vars(reader.vars) == EXAMPLE_VARS
    assert rest == b"body-1+2"


def test_reader_trailing_one_byte_at_a_time():
    data = EXAMPLE + b"xyz"
    reader, rest = read_head([data[i : i + 1] for i in range(len(data))])
    assert reader.complete and rest == b"xyz"


def test_reader_empty_vars_and_empty_feeds():
    reader, rest = read_head([b"", b"\x64\x00", memoryview(b"\x00\x01rest")])
    assert reader.complete and (reader.modifier1, reader.datasize) == (100, 0)
    assert rest == b"rest"


def test_reader_max_datasize():
    packet = encode_packet([(b"K", b"v" * (MAX_DATASIZE - 5))])
    reader, rest = read_head([packet[i : i + 4096] for i in range(0, len(packet), 4096)])
    assert reader.complete and reader.datasize == 65535 and rest == b""

    small = HeadReader(max_datasize=100)
    with pytest.raises(PacketTooLarge) as info:
        small.feed(encode_packet([(b"K", b"v" * 200)])[:4])
    assert (info.value.datasize, info.value.limit) == (205, 100)


def test_reader_does_not_parse_the_vars():
    block = MALFORMED["truncated value"]
    reader, _ = read_head([struct.pack("<BHB", 0, len(block), 0) + block])
    assert reader.complete
    with pytest.raises(MalformedVars):
        parse_vars(reader.vars)


# --------------------------------------------------------------------------- scan_request


def key_of(*pairs):
    return scan_request(encode_vars(pairs)).key


H, S, F = b"HTTP_HOST", b"SERVER_NAME", b"UWSGI_FASTROUTER_KEY"


@pytest.mark.parametrize(
    "pairs, key",
    [
        ([(H, b"h1")], b"h1"),
        ([(S, b"s1")], b"s1"),
        ([(S, b"s1"), (H, b"h1")], b"h1"),
        ([(H, b"h1"), (S, b"s1")], b"h1"),
        ([(F, b"k1"), (H, b"h1"), (S, b"s1")], b"k1"),
        ([(H, b"h1"), (F, b"k1"), (S, b"s1")], b"k1"),
        ([(H, b"h1"), (S, b"s1"), (F, b"k1")], b"k1"),
        ([(H, b"h1"), (H, b"h2")], b"h2"),
        ([(H, b""), (S, b"s1")], b"s1"),
        # D3: an empty HTTP_HOST counts as absent wherever it is (uWSGI closed here)
        ([(S, b"s1"), (H, b"")], b"s1"),
        # the last *usable* occurrence of a name is its candidate
        ([(H, b"h1"), (H, b"")], b"h1"),
        ([(H, b"h1"), (H, b"x" * 256)], b"h1"),
        ([(F, b"k1"), (F, b"")], b"k1"),
        ([(F, b""), (H, b"h1")], b"h1"),
        ([(H, b"example.com:8000")], b"example.com:8000"),
        ([(b"http_host", b"lower"), (b"HTTP_HOSTS", b"longer"), (b"HTTP_HOS", b"shorter")], None),
        ([(b"PATH_INFO", b"/")], None),
        ([], None),
    ],
)
def test_key_rules(pairs, key):
    assert key_of(*pairs) == key
    # order independence (D3): the reversed order only changes "last occurrence" ties
    names = [k for k, _ in pairs]
    if len(set(names)) == len(names):
        assert key_of(*reversed(pairs)) == key


def test_key_length_limit():
    k255, k256 = b"k" * 255, b"k" * 256
    assert key_of((H, k255)) == k255
    assert key_of((S, k255)) == k255
    assert key_of((F, k255)) == k255
    assert key_of((H, k256)) is None
    assert key_of((H, k256), (S, b"s1")) == b"s1"
    assert key_of((S, b"s1"), (H, k256)) == b"s1"
    assert key_of((F, k256), (H, b"h1")) == b"h1"
    assert key_of((S, k256)) is None


def test_force_key():
    block = encode_vars([(H, b"h1"), (F, b"k1")])
    assert scan_request(block, force_key=b"forced").key == b"forced"
    assert scan_request(b"", force_key=b"forced").key == b"forced"


def test_nginx_like_request():
    pairs = [
        (b"QUERY_STRING", b""),
        (b"REQUEST_METHOD", b"POST"),
        (b"CONTENT_TYPE", b"text/plain"),
        (b"CONTENT_LENGTH", b"42"),
        (b"REQUEST_URI", b"/x"),
        (b"PATH_INFO", b"/x"),
        (b"REMOTE_ADDR", b"10.1.2.3"),
        (b"REMOTE_PORT", b"55555"),
        (b"SERVER_PORT", b"80"),
        (b"SERVER_NAME", b"srv"),
        (b"HTTP_HOST", b"example.com"),
        (b"HTTP_ACCEPT_ENCODING", b"gzip"),
    ]
    info = scan_request(encode_vars(pairs))
    assert info == RequestInfo(b"example.com", 42, b"10.1.2.3", b"55555")
    assert scan_request(bytearray(encode_vars(pairs))) == info
    assert scan_request(memoryview(encode_vars(pairs))) == info
    assert type(info.key) is bytes


@pytest.mark.parametrize(
    "values, expected",
    [
        ([], None),
        ([b"0"], 0),
        ([b"5"], 5),
        ([b"007"], 7),
        ([b"12a"], 0),
        ([b""], 0),
        ([b"-1"], 0),
        ([b"+5"], 0),
        ([b" 5"], 0),
        ([b"\xd9\xa3"], 0),  # non-ASCII digit
        ([b"5", b"7"], 7),
        ([b"5", b"junk"], 0),
        ([b"999999999999999999"], 999999999999999999),
        ([b"9999999999999999999"], 0),
        ([b"0" * 100 + b"8"], 8),
    ],
)
def test_content_length(values, expected):
    pairs = [(b"CONTENT_LENGTH", v) for v in values] + [(H, b"h")]
    assert scan_request(encode_vars(pairs)).content_length == expected


def test_remote_addr_and_port_last_wins():
    info = scan_request(
        encode_vars(
            [
                (b"REMOTE_ADDR", b"1.1.1.1"),
                (b"REMOTE_PORT", b"1"),
                (b"REMOTE_ADDR", b"2.2.2.2"),
                (b"REMOTE_PORT", b""),
            ]
        )
    )
    assert (info.remote_addr, info.remote_port) == (b"2.2.2.2", b"")


@given(
    st.lists(
        st.tuples(
            st.sampled_from([H, S, F, b"CONTENT_LENGTH", b"REMOTE_ADDR", b"OTHER_VAR_X"]),
            st.one_of(st.binary(max_size=4), st.binary(min_size=250, max_size=260)),
        ),
        max_size=10,
    )
)
def test_scan_matches_reference(pairs):
    """scan_request agrees with a plain restatement of the rules."""

    def last_usable(name):
        found = [v for k, v in pairs if k == name and 0 < len(v) <= 255]
        return found[-1] if found else None

    key = last_usable(F) or last_usable(H) or last_usable(S)
    cls = [v for k, v in pairs if k == b"CONTENT_LENGTH"]
    raddr = [v for k, v in pairs if k == b"REMOTE_ADDR"]
    info = scan_request(encode_vars(pairs))
    assert info.key == key
    assert info.content_length == (
        None if not cls else (int(cls[-1]) if cls[-1].isdigit() else 0)
    )
    assert info.remote_addr == (raddr[-1] if raddr else None)
    assert info.remote_port is None


def test_transfer_encoding_marks_a_body_of_unknown_length():
    plain = scan_request(encode_vars([(b"HTTP_HOST", b"h"), (b"CONTENT_LENGTH", b"")]))
    assert plain.chunked is False and plain.content_length == 0
    chunked = scan_request(encode_vars([(b"HTTP_HOST", b"h"), (b"HTTP_TRANSFER_ENCODING", b"chunked")]))
    assert chunked.chunked is True and chunked.key == b"h"
