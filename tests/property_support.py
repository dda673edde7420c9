"""Shared pieces of the property tests (``tests/test_properties_*.py``).

Settings profiles
-----------------
Every property test is decorated with :data:`PROPERTY`, the profile named by
``$PROPERTY_PROFILE``:

``ci`` (the default)
    about a hundred examples per property and no deadline (a loaded 2-core box
    makes per-example deadlines flaky); the whole property suite takes seconds.
``thorough``
    many more examples, for a long local hunt:
    ``PROPERTY_PROFILE=thorough python3 -m pytest tests/test_properties_*.py``.

Hostile bytes
-------------
:func:`vars_blocks` draws uwsgi vars blocks that are mostly *almost* valid: real
records whose length fields may lie, a truncated or padded tail, or a valid block
with a few bytes flipped, cut or inserted.  Plain random bytes rarely get past the
first record; these reach every branch of a vars walker.
"""

from __future__ import annotations

import os
import struct
from typing import List, Sequence, Tuple

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "thorough",
    parent=settings.get_profile("ci"),
    max_examples=5000,
)

#: the decorator every property test uses
PROPERTY = settings(settings.get_profile(os.environ.get("PROPERTY_PROFILE", "ci")))

_U16 = struct.Struct("<H")

Pairs = List[Tuple[bytes, bytes]]


def u16(n: int) -> bytes:
    return _U16.pack(n)


def record(key: bytes, value: bytes) -> bytes:
    return u16(len(key)) + key + u16(len(value)) + value


#: var names the router and the subscription parser look at, and near misses of
#: the same length (a walker that compares lengths first must still compare bytes)
INTERESTING_NAMES: Sequence[bytes] = (
    b"UWSGI_FASTROUTER_KEY", b"HTTP_HOST", b"SERVER_NAME", b"CONTENT_LENGTH", b"REMOTE_ADDR",
    b"REMOTE_PORT", b"HTTP_TRANSFER_ENCODING", b"UWSGI_FASTROUTER_KEX", b"HTTP_HOSX",
    b"SERVER_NAMX", b"CONTENT_LENGTX", b"http_host", b"PATH_INFO",
    b"key", b"address", b"modifier1", b"modifier2", b"cores", b"load", b"weight", b"unix",
    b"sign", b"notify", b"sni_key", b"sni_crt", b"sni_ca", b"fastrouter_forwarded",
)

names = st.one_of(st.sampled_from(INTERESTING_NAMES), st.binary(min_size=1, max_size=24))
values = st.one_of(
    st.binary(max_size=12),
    st.sampled_from([b"", b"0", b"1", b"007", b"255", b"256", b"-1", b"18446744073709551616",
                     b"9" * 19, b"0" * 30 + b"5", b"example.com", b"127.0.0.1:3031"]),
    st.integers(min_value=250, max_value=260).map(lambda n: b"v" * n),
)
pairs = st.lists(st.tuples(names, values), max_size=8)


@st.composite
def lying_records(draw) -> bytes:
    """Records whose length fields are sometimes wrong, with an optional bad tail."""
    out = b""
    for _ in range(draw(st.integers(min_value=0, max_value=5))):
        key = draw(names)
        value = draw(values)
        klen = draw(st.one_of(st.just(len(key)), st.integers(0, 0xFFFF),
                              st.integers(-2, 2).map(lambda d: max(0, len(key) + d))))
        vlen = draw(st.one_of(st.just(len(value)), st.integers(0, 0xFFFF),
                              st.integers(-2, 2).map(lambda d: max(0, len(value) + d))))
        out += u16(min(klen, 0xFFFF)) + key + u16(min(vlen, 0xFFFF)) + value
    return out + draw(st.binary(max_size=3))


@st.composite
def mutated(draw, base: st.SearchStrategy) -> bytes:
    """A few random edits (flip, delete, insert, truncate) of a drawn valid block."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        op = draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        where = draw(st.integers(min_value=0, max_value=len(data)))
        if op == "flip" and where < len(data):
            data[where] = draw(st.integers(0, 255))
        elif op == "delete":
            del data[where:where + draw(st.integers(1, 4))]
        elif op == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=4))
        else:
            del data[where:]
    return bytes(data)


def encode(pairs_: Pairs) -> bytes:
    return b"".join(record(k, v) for k, v in pairs_)


valid_blocks = pairs.map(encode)

#: any vars block, biased toward nearly valid ones
vars_blocks = st.one_of(valid_blocks, lying_records(), mutated(valid_blocks), st.binary(max_size=64))
