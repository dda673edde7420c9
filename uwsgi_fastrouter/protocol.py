"""The uwsgi packet codec: bytes in, records out, no I/O.

Theory of operation
-------------------
A uwsgi request starts with a 4-byte header -- ``modifier1`` (u8), ``datasize``
(u16, little-endian), ``modifier2`` (u8) -- followed by exactly ``datasize`` bytes of
"vars": records of ``u16 key length, key, u16 value length, value``, with no count,
terminator or padding.  Keys are at least one byte long, values may be empty, and
the same key may occur more than once; everything after the vars is request body,
which this module never looks at.

The vars walk is strict, and it is the same walk everywhere in this module
(:func:`iter_vars`, :func:`scan_request`).  A block is *malformed* when:

* fewer than 3 bytes are left where a record should start (so one or two stray
  bytes at the end are an error, not padding);
* a key length is 0;
* the key, the value length or the value runs past the end of the block.

An empty block is valid and has no vars.  These are the rules uWSGI applies
before it routes a request; a router that is laxer would forward requests that
uWSGI closes.  The layout, these rules and the vars the router reads are
written out in docs/wire.md ("The uwsgi packet").

Everything here works on ``bytes``-like objects and returns ``None`` for "need
more data" (:class:`HeadReader`, the one incremental head reader: the router's
sessions and the app worker both use it), so the socket code decides how to read
and the codec can be tested one byte at a time.

:func:`scan_request` is the per-request hot path of the router: one pass over the
vars, no list built, only the few names the router cares about are compared.
"""

from __future__ import annotations

import re
import struct
import sys
from enum import IntEnum
from typing import Iterable, Iterator, List, NamedTuple, Optional, Tuple, Union

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "MAX_DATASIZE",
    "MAX_KEY_LENGTH",
    "ProtocolError",
    "MalformedVars",
    "PacketTooLarge",
    "Modifier1",
    "PacketHeader",
    "Packet",
    "parse_header",
    "iter_vars",
    "parse_vars",
    "encode_vars",
    "encode_packet",
    "HeadReader",
    "RequestInfo",
    "scan_request",
    "scan_route",
    "request_info",
]

#: modifier1 (u8), datasize (u16 little-endian), modifier2 (u8).
HEADER = struct.Struct("<BHB")
HEADER_SIZE = HEADER.size  # 4
#: The largest vars block a 16-bit datasize can announce.
MAX_DATASIZE = 65535
#: Routing keys longer than this are ignored (uWSGI keeps keys in a 255-byte slot).
MAX_KEY_LENGTH = 255

_U16 = struct.Struct("<H")

BytesLike = Union[bytes, bytearray, memoryview]
Var = Tuple[bytes, bytes]


# ---------------------------------------------------------------------------
# Errors


class ProtocolError(ValueError):
    """Base of every codec error: the bytes are not a valid uwsgi packet."""


class MalformedVars(ProtocolError):
    """The vars block breaks the record rules.

    ``offset`` is where the faulty record starts, relative to the start of the
    vars block; ``why`` is a short reason.
    """

    def __init__(self, why: str, offset: int) -> None:
        super().__init__(f"malformed uwsgi vars at offset {offset}: {why}")
        self.why = why
        self.offset = offset


class PacketTooLarge(ProtocolError):
    """A vars block is bigger than the limit (65535, or a reader's smaller limit)."""

    def __init__(self, datasize: int, limit: int) -> None:
        super().__init__(f"uwsgi vars block of {datasize} bytes exceeds the limit of {limit}")
        self.datasize = datasize
        self.limit = limit


# ---------------------------------------------------------------------------
# Records


class Modifier1(IntEnum):
    """The modifier1 values this package gives a name to (the byte is opaque
    to the router, which only overwrites it)."""

    WSGI = 0
    PSGI = 5
    LUA = 6
    RACK = 7
    CGI = 9
    MANAGE = 10
    PHP = 14
    SPOOLER = 17
    PING = 100
    ECHO = 101
    SIGNAL = 110
    CACHE = 111
    RPC = 173
    CLOSE_MARK = 200
    SUBSCRIPTION = 224
    GENERIC_RESPONSE = 255


class PacketHeader(NamedTuple):
    modifier1: int
    datasize: int
    modifier2: int


class Packet(NamedTuple):
    header: PacketHeader
    #: ``(key, value)`` pairs in wire order, duplicates kept.
    vars: List[Var]


class RequestInfo(NamedTuple):
    """What the router needs from a request's vars (see :func:`scan_request`)."""

    key: Optional[bytes]
    content_length: Optional[int]
    remote_addr: Optional[bytes]
    remote_port: Optional[bytes]
    #: the request carries ``HTTP_TRANSFER_ENCODING``: a body of unknown length may follow
    chunked: bool = False


# ---------------------------------------------------------------------------
# Decoding


def parse_header(data: BytesLike, offset: int = 0) -> PacketHeader:
    """Decode the 4-byte header found at *offset* of *data*.

    Raises :class:`ProtocolError` if fewer than 4 bytes are available there.
    """
    try:
        return PacketHeader._make(HEADER.unpack_from(data, offset))
    except struct.error:
        raise ProtocolError(
            f"uwsgi header needs {HEADER_SIZE} bytes, got {max(0, len(data) - offset)}"
        ) from None


def _as_bytes(block: BytesLike) -> bytes:
    return block if type(block) is bytes else bytes(block)


def iter_vars(block: BytesLike) -> Iterator[Var]:
    """Yield the ``(key, value)`` pairs of a vars block, in wire order.

    *block* is exactly the vars (the ``datasize`` bytes after the header).
    Raises :class:`MalformedVars` when the walk reaches a bad record; the pairs
    before it have been yielded by then.
    """
    data = _as_bytes(block)
    end = len(data)
    pos = 0
    while pos < end:
        start = pos
        if pos + 2 >= end:
            raise MalformedVars(f"{end - pos} stray byte(s) at the end", start)
        klen = data[pos] | (data[pos + 1] << 8)
        pos += 2
        if klen == 0:
            raise MalformedVars("zero key length", start)
        kend = pos + klen
        if kend > end:
            raise MalformedVars(f"key of {klen} bytes overruns the block", start)
        key = data[pos:kend]
        pos = kend
        if pos + 2 > end:
            raise MalformedVars("value length missing", start)
        vlen = data[pos] | (data[pos + 1] << 8)
        pos += 2
        vend = pos + vlen
        if vend > end:
            raise MalformedVars(f"value of {vlen} bytes overruns the block", start)
        yield key, data[pos:vend]
        pos = vend


def parse_vars(block: BytesLike) -> List[Var]:
    """Return all ``(key, value)`` pairs of a vars block (see :func:`iter_vars`)."""
    return list(iter_vars(block))


# ---------------------------------------------------------------------------
# Encoding


def encode_vars(pairs: Iterable[Tuple[BytesLike, BytesLike]]) -> bytes:
    """Encode ``(key, value)`` pairs as a vars block.

    Keys must be 1..65535 bytes, values 0..65535 bytes, else :class:`ProtocolError`.
    The block itself is not limited here (see :func:`encode_packet`).
    """
    pack = _U16.pack
    parts = []
    append = parts.append
    for key, value in pairs:
        klen = len(key)
        vlen = len(value)
        if not 0 < klen <= 65535:
            raise ProtocolError(f"uwsgi var key must be 1..65535 bytes, got {klen}")
        if vlen > 65535:
            raise ProtocolError(f"uwsgi var value must be 0..65535 bytes, got {vlen}")
        append(pack(klen))
        append(key)
        append(pack(vlen))
        append(value)
    return b"".join(parts)


def encode_packet(
    pairs: Iterable[Tuple[BytesLike, BytesLike]], modifier1: int = 0, modifier2: int = 0
) -> bytes:
    """Encode a whole packet: header followed by the vars block.

    Raises :class:`PacketTooLarge` if the vars exceed 65535 bytes and
    :class:`ProtocolError` for a modifier outside 0..255.
    """
    block = encode_vars(pairs)
    if len(block) > MAX_DATASIZE:
        raise PacketTooLarge(len(block), MAX_DATASIZE)
    if not (0 <= modifier1 <= 255 and 0 <= modifier2 <= 255):
        raise ProtocolError(f"modifiers must be 0..255, got {modifier1}/{modifier2}")
    return HEADER.pack(modifier1, len(block), modifier2) + block


# ---------------------------------------------------------------------------
# Incremental reading


class HeadReader:
    """Collect one packet's head (header and vars) from pieces, never past it.

    The socket code asks :attr:`needed` how many bytes to read at most (the rest of
    the header, then the rest of the vars), and either receives straight into
    :meth:`space` and reports the count with :meth:`advance` (True once the head is
    complete), or hands bytes it got elsewhere to :meth:`feed` (which takes what the
    head needs and says how much).  Once :attr:`complete`, :attr:`head` is the
    header followed by the vars, and nothing of what follows the vars (the body) was
    asked for.

    A header announcing more than *max_datasize* raises :class:`PacketTooLarge` (the
    reader is unusable after it).  The vars are not parsed here: see
    :func:`parse_vars` and :func:`scan_request`.
    """

    __slots__ = ("max_datasize", "datasize", "modifier1", "_buf", "_have")

    def __init__(self, max_datasize: int = MAX_DATASIZE) -> None:
        self.max_datasize = max_datasize
        self.datasize = -1            # known once the header is complete
        self.modifier1 = 0
        self._buf = bytearray(HEADER_SIZE)
        self._have = 0

    @property
    def needed(self) -> int:
        """Bytes still missing (before the header is complete: of the header only)."""
        return len(self._buf) - self._have

    @property
    def received(self) -> int:
        return self._have

    @property
    def expected(self) -> int:
        """The size of the whole head once the header is known, else of the header."""
        return len(self._buf)

    @property
    def header_complete(self) -> bool:
        return self.datasize >= 0

    @property
    def complete(self) -> bool:
        return self.datasize >= 0 and self._have == len(self._buf)

    @property
    def head(self) -> bytearray:
        """Header and vars (the whole head once :attr:`complete`)."""
        return self._buf

    @property
    def vars(self) -> bytes:
        return bytes(self._buf[HEADER_SIZE:self._have])

    def space(self) -> memoryview:
        """Where the next :attr:`needed` bytes go (for ``recv_into``)."""
        return memoryview(self._buf)[self._have:]

    def advance(self, count: int) -> bool:
        """*count* bytes were written into :meth:`space`; True once complete."""
        self._have += count
        if self.datasize < 0 and self._have == HEADER_SIZE:
            modifier1, datasize, _modifier2 = HEADER.unpack_from(self._buf)
            if datasize > self.max_datasize:
                raise PacketTooLarge(datasize, self.max_datasize)
            self.modifier1 = modifier1
            self.datasize = datasize
            self._buf.extend(bytes(datasize))
        return self.complete

    def feed(self, data: BytesLike) -> int:
        """Take from *data* what the head still needs; returns how many bytes were
        taken (the rest, if any, is body).  See :attr:`complete`."""
        view = memoryview(data)
        taken = 0
        while taken < len(view) and not self.complete:
            take = min(len(view) - taken, self.needed)
            self._buf[self._have:self._have + take] = view[taken:taken + take]
            taken += take
            self.advance(take)
        return taken


# ---------------------------------------------------------------------------
# Router view of a request

# The names scan_request looks at (its branches rely on the lengths noted here).
# A record is only sliced and compared when its key length is one of theirs.
_FR_KEY = b"UWSGI_FASTROUTER_KEY"  # 20
_HTTP_HOST = b"HTTP_HOST"  # 9
_SERVER_NAME = b"SERVER_NAME"  # 11
_CONTENT_LENGTH = b"CONTENT_LENGTH"  # 14
_REMOTE_ADDR = b"REMOTE_ADDR"  # 11
_REMOTE_PORT = b"REMOTE_PORT"  # 11
_TRANSFER_ENCODING = b"HTTP_TRANSFER_ENCODING"  # 22
_NAME_LENGTHS = frozenset(
    len(name)
    for name in (_FR_KEY, _HTTP_HOST, _SERVER_NAME, _CONTENT_LENGTH, _REMOTE_ADDR, _REMOTE_PORT,
                 _TRANSFER_ENCODING)
)


def _long_content_length(digits: bytes) -> int:
    """A CONTENT_LENGTH of more than 18 ASCII digits: its value if the leading
    zeros were all that made it long, else 0 (no real body is that large, and
    Python 3.11+ refuses to convert very long digit strings)."""
    significant = digits.lstrip(b"0")
    return int(significant) if 0 < len(significant) <= 18 else 0


_new_tuple = tuple.__new__  # builds a RequestInfo without the Python-level __new__


def _raise_malformed(data: bytes) -> None:
    """Re-walk a block the fast scan rejected, to raise the precise error."""
    for _ in iter_vars(data):
        pass
    raise AssertionError("scan_request rejected a valid vars block")  # pragma: no cover


def _content_length(digits: bytes) -> int:
    """The value of a CONTENT_LENGTH var (see :func:`scan_request`)."""
    # junk (empty, signs, spaces, non-ASCII digits) -> 0: "no body to buffer";
    # bytes.isdigit() is true for ASCII 0-9 only, and false when empty
    if not digits.isdigit():
        return 0
    if len(digits) <= 18:
        return int(digits)
    return _long_content_length(digits)


# The names scan_request picks out, in the order of their groups in _RECORDS (the
# order of their lengths in _COMMON_KEY_LENGTHS, then by length).
_SCANNED = (_SERVER_NAME, _REMOTE_ADDR, _REMOTE_PORT, _HTTP_HOST, _CONTENT_LENGTH, _FR_KEY,
            _TRANSFER_ENCODING)
# The names whose value is a key candidate only when it is 1..255 bytes long.
_KEY_NAMES = (_FR_KEY, _HTTP_HOST, _SERVER_NAME)


def _records_pattern():
    """The vars walk of :func:`scan_request` as one regular expression, or None where
    the ``re`` module has no possessive repeat (before Python 3.11).

    A walk in Python costs a few dozen bytecodes per record; the ``re`` engine walks
    the same records in C.  It cannot compute a length, so the pattern spells out
    every length: ``\\x05\\x00.{5}`` is a key or value of 5 bytes, for 0..255 (a
    length of 256 or more, or any malformed record, stops the match early and the
    request goes through the Python walk, which also names the fault).  One record is
    a key then a value.  The keys of :data:`_SCANNED` come first among the keys of
    their length, and capture an empty group right after the name, i.e. where the
    value's length starts; a group in a repeat keeps its last match: the last
    occurrence, which is the rule.  (An empty value of a key name is captured too:
    :func:`scan_request` then walks the block in Python, since an earlier, non-empty
    occurrence is the candidate.  Matching empty key names as records of their own
    cost every record with a key of their lengths a failed try.)  The repeat is
    possessive (``*+``): a record that matched is never tried again, so a bad block
    costs one pass whatever it holds.  The engine tries alternatives in order, so the usual lengths of var
    names come first (:data:`_COMMON_KEY_LENGTHS`)."""
    if sys.version_info < (3, 11):  # pragma: no cover - possessive repeats are 3.11+
        return None

    def length(n: int) -> bytes:
        return re.escape(bytes((n & 255, n >> 8)))

    def any_bytes(n: int) -> bytes:
        # A possessive counted repeat of "any byte" is one step of the engine (it
        # moves by n at once and never backtracks into the run); the shortest runs
        # are cheaper still as plain dots.
        return b"." * n if n < _COUNTED_RUN else b".{%d}+" % n

    scanned: dict = {}
    for name in _SCANNED:
        scanned.setdefault(len(name), []).append(name)
    keys = []
    key_lengths = list(_COMMON_KEY_LENGTHS) + [n for n in range(1, 256)
                                               if n not in _COMMON_KEY_LENGTHS]
    grouped = [name for n in key_lengths for name in scanned.get(n, ())]
    assert grouped == list(_SCANNED), "scan_request unpacks the groups in _SCANNED's order"
    for n in key_lengths:
        names = [re.escape(name) + b"()" for name in scanned.get(n, ())]
        if names:
            keys.append(length(n) + b"(?:%s|%s)" % (b"|".join(names), any_bytes(n)))
        else:
            keys.append(length(n) + any_bytes(n))
    values = [length(n) + any_bytes(n) for n in range(256)]
    return re.compile(b"(?s)(?:(?:%s)(?:%s))*+" % (b"|".join(keys), b"|".join(values)))


# The lengths of the var names a web server sends most (REMOTE_ADDR, HTTP_HOST,
# QUERY_STRING, CONTENT_LENGTH, SERVER_PROTOCOL, DOCUMENT_ROOT, HTTP_ACCEPT_ENCODING...).
_COMMON_KEY_LENGTHS = (11, 9, 12, 14, 15, 13, 20)
_COUNTED_RUN = 4
_RECORDS = _records_pattern()
# fullmatch: a block the pattern cannot walk to its end (a long or bad record) is None,
# as is every block where there is no pattern (the Python walk then does it all)
_match_records = (_RECORDS.fullmatch if _RECORDS is not None
                  else lambda data, pos=0: None)  # pragma: no cover - before Python 3.11
# The group of each scanned name in _RECORDS (groups are numbered from 1, in
# _SCANNED's order).
(_G_SERVER_NAME, _G_REMOTE_ADDR, _G_REMOTE_PORT, _G_HOST, _G_CONTENT_LENGTH, _G_FR_KEY,
 _G_CHUNKED) = (_SCANNED.index(name) + 1 for name in (
    _SERVER_NAME, _REMOTE_ADDR, _REMOTE_PORT, _HTTP_HOST, _CONTENT_LENGTH, _FR_KEY,
    _TRANSFER_ENCODING))


def scan_request(block: BytesLike, force_key: Optional[bytes] = None) -> RequestInfo:
    """Validate a request's vars block and pick out what the router needs.

    One strict pass (the rules of :func:`iter_vars`; :class:`MalformedVars` on a
    bad record) that keeps only:

    ``key``
        ``UWSGI_FASTROUTER_KEY`` > ``HTTP_HOST`` > ``SERVER_NAME``, whatever the var
        order (docs/decisions.md D3; docs/behaviour.md, "The key").  For each name
        the candidate is its *last* occurrence whose value
        is 1..255 bytes (an empty or longer value counts as absent); the key is
        the candidate of the first name that has one, else ``None``.  A
        *force_key* that is not ``None`` is the key (the block is still
        validated).
    ``content_length``
        last ``CONTENT_LENGTH``: all ASCII digits -> its value; anything else
        (empty, junk, more than 18 significant digits) -> ``0``; no such var ->
        ``None``.
    ``remote_addr``, ``remote_port``
        last occurrence, raw bytes, or ``None``.
    ``chunked``
        an ``HTTP_TRANSFER_ENCODING`` var is present (a body of unknown length).

    The walk is done by the ``re`` engine (:func:`scan_route`) when every key
    and value is shorter than 256 bytes, by :func:`_scan_walk` otherwise; both give
    the same answer.
    """
    data = block if type(block) is bytes else bytes(block)
    scanned = scan_route(data, force_key, 0)
    if scanned is None:
        return _scan_walk(data, force_key)
    return request_info(scanned[3], scanned[0])


def scan_route(data: bytes, force_key: Optional[bytes] = None, start: int = HEADER_SIZE):
    """The router's per-request scan: :func:`scan_request` without the parts most
    requests never need.

    *data* holds the vars from *start* to its end (by default a whole head: the
    4-byte header, then the vars).  Returns ``(key, content_length, chunked,
    match)`` with the meanings of :func:`scan_request`, where *match* is what
    :func:`request_info` reads the rest from if it is ever asked for (the client's
    address, for a log line or a balancing rule); no :class:`RequestInfo` is built
    here.  Returns None where the pattern does not decide: a key or value of 256
    bytes or more, a malformed block, or an empty last occurrence of the chosen
    key name (an earlier one may count); :func:`scan_request` then walks the block
    in Python and names a fault.
    """
    match = _match_records(data, start)
    if match is None:
        return None
    # Each group is empty and sits where its value's length starts (-1: no such
    # var); all lengths are below 256 here, so the low byte is the length.  The
    # groups are read one by one: Match.regs would build a tuple per group.
    at_of = match.start
    if force_key is None:
        at = at_of(_G_FR_KEY)
        if at < 0:
            at = at_of(_G_HOST)
            if at < 0:
                at = at_of(_G_SERVER_NAME)
        if at >= 0:
            size = data[at]
            if not size:
                return None
            force_key = data[at + 2:at + 2 + size]
    at = at_of(_G_CONTENT_LENGTH)
    if at >= 0:
        clen = _content_length(data[at + 2:at + 2 + data[at]]) if data[at] else 0
    else:
        clen = None
    return force_key, clen, at_of(_G_CHUNKED) >= 0, match


def request_info(match: "re.Match", key: Optional[bytes]) -> RequestInfo:
    """The :class:`RequestInfo` of a block that :func:`scan_route` matched, with
    *key* (the one it returned)."""
    data = match.string
    at_of = match.start
    at = at_of(_G_CONTENT_LENGTH)
    if at >= 0:
        clen = _content_length(data[at + 2:at + 2 + data[at]]) if data[at] else 0
    else:
        clen = None
    at = at_of(_G_REMOTE_ADDR)
    raddr = data[at + 2:at + 2 + data[at]] if at >= 0 else None
    at = at_of(_G_REMOTE_PORT)
    rport = data[at + 2:at + 2 + data[at]] if at >= 0 else None
    return _new_tuple(RequestInfo, (key, clen, raddr, rport, at_of(_G_CHUNKED) >= 0))


def _scan_walk(data: bytes, force_key: Optional[bytes]) -> RequestInfo:
    """:func:`scan_request` as a walk in Python: the path of blocks with a key or
    value of 256 bytes or more, and the one that names the fault of a bad block."""
    # The walk does the fewest checks that still catch every malformed block:
    # an index past the end (stray bytes, a key running into or past the value
    # length) raises IndexError; a zero key length stops the loop early; a value
    # running past the end leaves ``pos > end``.  Any of them ends with
    # ``pos != end`` and the slow path names the fault.
    end = len(data)
    pos = 0
    lengths = _NAME_LENGTHS
    fr_key = host = server_name = clen = raddr = rport = None
    chunked = False
    try:
        while pos < end:
            klen = data[pos] | data[pos + 1] << 8
            if not klen:
                break
            kpos = pos + 2
            kend = kpos + klen
            vpos = kend + 2
            pos = vpos + (data[kend] | data[kend + 1] << 8)
            if klen in lengths:
                name = data[kpos:kend]
                if klen == 9:
                    if name == _HTTP_HOST and 0 < pos - vpos <= 255:
                        host = data[vpos:pos]
                elif klen == 11:
                    if name == _SERVER_NAME:
                        if 0 < pos - vpos <= 255:
                            server_name = data[vpos:pos]
                    elif name == _REMOTE_ADDR:
                        raddr = data[vpos:pos]
                    elif name == _REMOTE_PORT:
                        rport = data[vpos:pos]
                elif klen == 14:
                    if name == _CONTENT_LENGTH:
                        clen = data[vpos:pos]
                elif klen == 20:
                    if name == _FR_KEY and 0 < pos - vpos <= 255:
                        fr_key = data[vpos:pos]
                elif name == _TRANSFER_ENCODING:
                    chunked = True
    except IndexError:
        pos = -1
    if pos != end:
        _raise_malformed(data)
    if force_key is None:
        force_key = fr_key or host or server_name
    if clen is not None:
        clen = _content_length(clen)
    return _new_tuple(RequestInfo, (force_key, clen, raddr, rport, chunked))
