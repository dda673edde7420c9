#!/usr/bin/env python3
"""Fuzz target: the request head reader and the vars scan (uwsgi_fastrouter/protocol.py).

Input layout (so the fuzzer also chooses how the bytes arrive):

    byte 0         how many split points follow (low 3 bits: 0..7)
    next N bytes   the piece sizes the stream is fed in (then the rest at once)
    next byte      the reader's limit: MAX_DATASIZE, or a small one (see LIMITS)
    the rest       the bytes a client sent: header, vars, body

It checks what tests/test_properties_protocol.py checks, on whatever the fuzzer
finds: only ProtocolError may come out of the codec; any split gives what the
whole gives; the fast scan agrees with the plain walk and with the decoded vars.

    python3 fuzz/fuzz_request_head.py [libFuzzer flags] [CORPUS_DIR...] [--fallback]
"""

from __future__ import annotations

import sys

import harness

if __name__ == "__main__":
    # before the package is imported here: harness.main imports this module again,
    # with the package under coverage instrumentation
    sys.exit(harness.main("fuzz_request_head"))

from uwsgi_fastrouter.protocol import (
    HEADER_SIZE, MAX_DATASIZE, MalformedVars, HeadReader, ProtocolError, encode_vars, iter_vars,
    scan_request,
)

LIMITS = (MAX_DATASIZE, 0, 4, 64, 4096)
KEY_NAMES = (b"UWSGI_FASTROUTER_KEY", b"HTTP_HOST", b"SERVER_NAME")


def split_input(data: bytes):
    """(piece sizes, limit, stream) from a fuzzer input."""
    if not data:
        return [], MAX_DATASIZE, b""
    count = data[0] & 7
    sizes = list(data[1:1 + count])
    rest = data[1 + count:]
    limit = LIMITS[rest[0] % len(LIMITS)] if rest else MAX_DATASIZE
    return sizes, limit, rest[1:]


def feed(stream: bytes, sizes, limit: int):
    """Feed *stream* in pieces; the outcome in a comparable form."""
    reader = HeadReader(limit)
    pieces = []
    pos = 0
    for size in sizes:
        pieces.append(stream[pos:pos + size])
        pos += size
    pieces.append(stream[pos:])
    trailing = b""
    try:
        for piece in pieces:
            if reader.complete:
                trailing += piece
                continue
            taken = reader.feed(piece)
            trailing += piece[taken:]
        if not reader.complete:
            return ("incomplete", reader.needed)
        pairs = list(iter_vars(reader.vars))
    except ProtocolError as exc:
        return ("error", type(exc).__name__, str(exc))
    return ("packet", reader.modifier1, reader.datasize, pairs, trailing)


def expected_key(pairs):
    for name in KEY_NAMES:
        usable = [v for k, v in pairs if k == name and 0 < len(v) <= 255]
        if usable:
            return usable[-1]
    return None


def check_block(block: bytes) -> None:
    """scan_request and iter_vars agree on any vars block."""
    try:
        pairs = list(iter_vars(block))
    except MalformedVars as exc:
        try:
            scan_request(block)
        except MalformedVars as again:
            assert (again.offset, again.why) == (exc.offset, exc.why), (again, exc)
            return
        raise AssertionError("scan_request accepted a block iter_vars rejects: %r" % exc)
    info = scan_request(block)
    assert encode_vars(pairs) == block
    assert info.key == expected_key(pairs), (info.key, pairs)
    assert info.chunked == any(k == b"HTTP_TRANSFER_ENCODING" for k, _ in pairs)
    forced = scan_request(block, b"forced")
    assert forced.key == b"forced" and forced[1:] == info[1:]


def test_one_input(data: bytes) -> None:
    sizes, limit, stream = split_input(data)
    whole = feed(stream, [], limit)
    assert feed(stream, sizes, limit) == whole, (whole, sizes)
    if whole[0] == "packet":
        _, _modifier1, datasize, pairs, trailing = whole
        total = HEADER_SIZE + datasize
        assert trailing == stream[total:]
        assert pairs == list(iter_vars(stream[HEADER_SIZE:total]))
    if len(stream) >= HEADER_SIZE:
        check_block(stream[HEADER_SIZE:HEADER_SIZE + (stream[1] | stream[2] << 8)])
    check_block(stream)
