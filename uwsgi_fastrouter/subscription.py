"""Subscriptions: the announce datagram and the key -> nodes table.  Pure, no I/O.

Theory of operation
-------------------
A backend instance announces itself by sending a small uwsgi packet (modifier1 224)
to the router's subscription socket every few seconds: "requests for KEY may go to
ADDRESS".  :func:`parse_announcement` turns such a datagram into an
:class:`Announcement` (strictly: a datagram whose length fields or vars are wrong is
rejected, where uWSGI would use whatever it managed to read), and
:func:`build_announcement` writes one the way a uWSGI 2.0.31 instance does.

The :class:`SubscriptionTable` maps each key to a :class:`Pool` of :class:`Node` s.
An announce creates or refreshes a node, an unsubscribe marks it dead.  A node also
dies when it has not announced for ``tolerance`` seconds (noticed at lookup time, as
uWSGI does, or by the periodic :meth:`SubscriptionTable.expire` sweep) or when a
connect to it fails.  A dead node gets no new requests; it is deleted as soon as no
session holds a reference to it, and a pool disappears with its last node.  A node
comes back only by announcing again.

Picking a node for a request (:meth:`SubscriptionTable.lookup`) increments the
chosen node's ``ref``; the caller gives it back with :meth:`SubscriptionTable.release`
when the backend connection is closed.  Each key has its algorithm, chosen by the
``algo`` var of the announce that creates it, else the table's default
(``--subscription-algo``).  Backup levels (uWSGI 2.1): only the nodes of the lowest
``backup`` level that has an alive node are candidates, so a node announcing
``backup=1`` gets requests only while every level-0 node is dead.  Four algorithms:

``wrr``
    smooth weighted round robin: every alive node's credit grows by its weight,
    the node with the most credit is chosen and pays the total weight back.  Over
    one cycle each node is chosen exactly ``weight`` times, spread out (weights
    1, 1 alternate; 2, 3 give A B A B B ...).  uWSGI's integer-division variant
    balances 2 and 3 as 1:1; this one honours them.
``lrc``, ``wlrc``
    least reference count (plain, or divided by the weight), reproducing uWSGI's
    walk including its tie-breaking on ``last_requests``: with one request at a
    time, three nodes are visited 3 2 1 3 2 1 ...
``iphash``
    rendezvous hashing of the request's client (see :func:`_pick_hash`): what the
    client is comes from :attr:`SubscriptionTable.client_of`, asked only for such
    keys (uwsgi_fastrouter/balancing.py makes it: ``REMOTE_ADDR`` or a chosen var).

Signed subscriptions (a ``verifier`` is set): a packet creating a pool or a node
must be signed, carry a ``unix`` timestamp not older than ``sign_tolerance``, and
verify against the key's public key; a packet for an existing node must verify and
carry a timestamp strictly newer than the last one accepted for that node, so a
captured packet cannot be replayed.  "Signed" means an RSA ``sign`` or a
shared-secret ``hmac`` var, whichever the verifier checks (uwsgi_fastrouter/signing.py):
the ``unix`` and replay rules are the same for both.

Replays after a removal (docs/decisions.md D9).  Once a node is gone (unsubscribed,
expired, failed), a captured packet of it would be a valid "new node" for as long as
its timestamp is within ``sign_tolerance``.  So the table remembers, per removed
(key, address), the last timestamp it accepted from that node, and refuses a new node
whose timestamp is not newer.  An entry is needed only while a packet that old could
still pass the tolerance check: it is dropped when its timestamp falls out of the
window (:meth:`SubscriptionTable.expire`).  The memory holds at most
``replay_memory`` entries, oldest removal dropped first (logged once, counted in
``replay_memory_evicted``); past that bound a forgotten node's captured packets are
replayable again until they expire, which is uWSGI's behaviour.

Order of the checks for an announce: the datagram is parsed first (by the caller);
then the proof (signature and timestamp, or the caller's credential check) is
verified; only a proven announce is looked at against the table's state (replays)
and its room (limits), and only then is anything inserted.  An unsigned flood at a
signing router therefore never costs a table entry, nor counts as table pressure.

Under pressure (``max_keys``).  A full table refuses new keys (:class:`TableFull`,
counted in ``refused_keys``); it never evicts a node to make room, and a node already
in the table is refreshed whatever the table's state, so a flood of fresh keys cannot
push out or lock out subscribed nodes.  Without signatures a newcomer cannot be told
from an attacker's key, so new keys get free slots first come, first served, and a
slot is free again as soon as its key is removed or expires (the one-second
:meth:`SubscriptionTable.expire` sweep).  One exception protects nodes that were
already subscribed: when a key whose pool had been refreshed at least once (a real
subscriber announces periodically; a flooded key is announced once) loses its pool
(an unsubscribe before a restart, a failed connect, missed announces), its slot is
kept for it until ``2 * tolerance`` seconds after its last announce.  Reserved slots
count as used, so the table never holds more than ``max_keys`` pools plus
reservations, and the returning subscriber gets its key back even while a flood keeps
every other slot taken.

The life of a node, beyond uWSGI 2.0 (all inert unless used).  *Slow start*
(``slow_start`` seconds): a node that joins a key or comes back to it ramps its weight
up (uwsgi_fastrouter/slowstart.py).  *Health checks*: :meth:`SubscriptionTable.set_down`
takes an address out of every key until it is up again, whatever it announces.
*Drain*: a node that announces ``drain=1`` gets no new request and is removed when its
last request in flight ends (past ``drain_timeout`` it is marked dead, and still goes
only then), so its key, and the router, stay out of "no node" while a request is in
flight; a plain announce takes it back.  The operator's drain
(:meth:`SubscriptionTable.set_drained`) takes an address out like a failed health
check.  Keys skip such nodes at lookup, before the backup levels are looked at, and a
lookup pays for it only while some address is skipped or a node of its key drains.

Every time-dependent method takes ``now`` (seconds since the epoch, ``time.time()``);
``last_check`` and the tolerance comparisons use whole seconds, like uWSGI.

The datagram's layout, var by var, and the dump format are in docs/wire.md
("Subscription datagrams", "Reload hand-over"); the table's rules in short, with the
places where they differ from uWSGI, in docs/behaviour.md ("Subscriptions", "Signed
subscriptions").
"""

from __future__ import annotations

import base64
import heapq
import json
import operator
import re
import struct
from hashlib import blake2b
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

from . import slowstart
from .log import printable
from .protocol import (HEADER, HEADER_SIZE, MAX_DATASIZE, MalformedVars, Modifier1, ProtocolError,
                       encode_vars, iter_vars)

if TYPE_CHECKING:  # pragma: no cover
    from .signing import SignatureChecker

__all__ = [
    "MAX_KEY",
    "MAX_ADDRESS",
    "MAX_BACKUP",
    "REPLAY_MEMORY",
    "ALGORITHMS",
    "FORWARDED_VAR",
    "SubscriptionError",
    "TableFull",
    "Announcement",
    "parse_announcement",
    "build_announcement",
    "forward_announcement",
    "djb33x",
    "stats_hash",
    "Node",
    "Pool",
    "SubscriptionTable",
]

MAX_KEY = 255
MAX_ADDRESS = 255
#: The balancing algorithms by name; as ``--subscription-algo`` any other name means
#: ``wrr``, in a packet's ``algo`` var it is refused.
ALGORITHMS = ("wrr", "lrc", "wlrc", "iphash")
#: The highest ``backup`` level a packet may announce.
MAX_BACKUP = 65535
#: Set by a router that forwards (resubscribes) a packet; such a packet is never
#: forwarded again, so two routers resubscribing to each other cannot loop.
FORWARDED_VAR = b"fastrouter_forwarded"

_BYTE_MAX = 255
_NUMBER_MAX = 2 ** 63
_STATS_BUCKETS = 65535
#: pools sorted in one step of a stats walk (a few dozen microseconds)
STATS_SORT_STEP = 512
_DUMP_VERSION = 1
#: removed nodes whose last signed timestamp is remembered against replays
REPLAY_MEMORY = 10000
#: pools plus nodes one step of the expiry sweep looks at (SubscriptionTable.expiry_steps)
EXPIRY_STEP = 512


class SubscriptionError(ValueError):
    """A subscription packet was rejected; ``str()`` is the reason to log.

    ``key`` and ``address`` are the packet's key and address when they are known.
    """

    def __init__(self, reason: str, key: Optional[bytes] = None,
                 address: Optional[bytes] = None) -> None:
        super().__init__(reason)
        self.key = key
        self.address = address


class TableFull(SubscriptionError):
    """A new key (the table holds ``max_keys``) or a new node (its key holds
    ``max_nodes``) was refused for want of room.

    The text is made only when asked for: under a flood most refusals are counted,
    not logged.
    """

    def __init__(self, limit: int, key: bytes, address: bytes, per_key: bool = False) -> None:
        super().__init__("subscription table full", key, address)
        self.limit = limit
        self.per_key = per_key

    def __str__(self) -> str:
        if self.per_key:
            return "too many nodes for key %s (%d): %s refused" % (
                printable(self.key), self.limit, printable(self.address))
        return "too many keys (%d): %s refused" % (self.limit, printable(self.key))


def _text(value: bytes) -> str:
    """A packet field as log text: control bytes escaped (docs/decisions.md D18).  Keys
    and addresses are nearly always printable ASCII, which needs no escaping: that is
    checked first (one regex match, in C) and, if so, the bytes are decoded as they are."""
    if type(value) is bytes and _PLAIN_ASCII(value) is not None:
        return value.decode("ascii")
    return printable(value)


#: printable ASCII only (what :func:`~uwsgi_fastrouter.log.printable` leaves as it is)
_PLAIN_ASCII = re.compile(rb"[\x20-\x7e]*").fullmatch


# ---------------------------------------------------------------------------
# The datagram


class Announcement(NamedTuple):
    """One parsed subscription datagram."""

    unsubscribe: bool
    key: bytes
    address: bytes
    modifier1: int = 0
    modifier2: int = 0
    cores: int = 0
    load: int = 0
    #: as sent; 0 is allowed here, the table stores ``max(1, weight)``
    weight: int = 0
    sni_key: Optional[bytes] = None
    sni_crt: Optional[bytes] = None
    sni_ca: Optional[bytes] = None
    #: a UNIX datagram path that wants a line when a new node is created
    #: (``sni_*`` and ``notify``: an empty value counts as absent)
    notify: Optional[bytes] = None
    #: the signer's timestamp (signed packets)
    unix: Optional[int] = None
    #: the raw signature; ``sign`` is always the last var
    sign: Optional[bytes] = None
    #: the vars bytes the signature covers: everything before the ``sign`` record
    #: (the whole vars block when the packet is not signed)
    signed_part: bytes = b""
    #: the shared-secret proof (hex HMAC-SHA256, see uwsgi_fastrouter/signing.py);
    #: only ``sign`` may follow it
    hmac: Optional[bytes] = None
    #: the vars bytes the ``hmac`` covers: everything before the ``hmac`` record
    hmac_part: bytes = b""
    #: a router forwarded this packet (see :data:`FORWARDED_VAR`)
    forwarded: bool = False
    #: uWSGI 2.1 fields (a 2.0 router ignores them): the node's backup level, the
    #: key's algorithm (applied when the announce creates the key), a one-letter
    #: protocol and the Emperor vassal's name (both only stored and shown)
    backup: int = 0
    algo: Optional[bytes] = None
    proto: Optional[bytes] = None
    vassal: Optional[bytes] = None
    #: the packet carried at least one of the 2.1 fields above
    v21: bool = False
    #: ``drain=1``: the node is going away (a graceful reload, a shutdown): no new
    #: requests, the ones in flight finish (a uWSGI router ignores the field)
    drain: int = 0


# var name -> (field, largest value); numbers must be plain ASCII decimals
_NUMBERS = {
    b"modifier1": ("modifier1", _BYTE_MAX),
    b"modifier2": ("modifier2", _BYTE_MAX),
    b"cores": ("cores", _NUMBER_MAX),
    b"load": ("load", _NUMBER_MAX),
    b"weight": ("weight", _NUMBER_MAX),
    b"unix": ("unix", _NUMBER_MAX),
    b"backup": ("backup", MAX_BACKUP),
    b"drain": ("drain", 1),
}
_STRINGS = {
    b"key": "key",
    b"address": "address",
    b"sni_key": "sni_key",
    b"sni_crt": "sni_crt",
    b"sni_ca": "sni_ca",
    b"notify": "notify",
    b"sign": "sign",
    b"hmac": "hmac",
    b"algo": "algo",
    b"proto": "proto",
    b"vassal": "vassal",
}
_V21_FIELDS = ("backup", "algo", "proto", "vassal")
_KEEP_EMPTY = ("key", "address", "sign", "hmac")
#: vars the quick parse leaves to the strict one: proofs (their position matters) and
#: the uWSGI 2.1 fields (checked together)
_RARE_VARS = frozenset((b"sign", b"hmac", b"backup", b"algo", b"proto", b"vassal"))


def _number(name: bytes, value: bytes, limit: int) -> int:
    # bytes.isdigit() is true for ASCII 0-9 only (and false when empty); int() alone
    # would also take signs, spaces and underscores
    digits = value.lstrip(b"0") or value[-1:]
    if not value.isdigit() or len(digits) > 20 or int(digits) > limit:
        raise SubscriptionError("invalid %s value %r (a decimal 0..%d is required)"
                                % (_text(name), value[:32], limit))
    return int(digits)


# The quick parse (below) fills a list in Announcement's field order and makes the tuple
# with no Python-level __new__; defaults come from the class itself.
_FIELD_INDEX = {name: i for i, name in enumerate(Announcement._fields)}
_FIELD_DEFAULTS = [Announcement._field_defaults.get(name) for name in Announcement._fields]
_STRING_SLOTS = {name: (_FIELD_INDEX[field], field in _KEEP_EMPTY)
                 for name, field in _STRINGS.items() if name not in _RARE_VARS}
_NUMBER_SLOTS = {name: (_FIELD_INDEX[field], limit) for name, (field, limit) in _NUMBERS.items()
                 if name not in _RARE_VARS}
_UNSUBSCRIBE = _FIELD_INDEX["unsubscribe"]
_KEY = _FIELD_INDEX["key"]
_ADDRESS = _FIELD_INDEX["address"]
_SIGNED_PART = _FIELD_INDEX["signed_part"]
_FORWARDED = _FIELD_INDEX["forwarded"]
_CORES = _FIELD_INDEX["cores"]
_LOAD = _FIELD_INDEX["load"]
_WEIGHT = _FIELD_INDEX["weight"]
_DRAIN = _FIELD_INDEX["drain"]
_new_announcement = tuple.__new__


def _parse_common(data: bytes) -> Optional[Announcement]:
    """The announcement in *data* if it is an ordinary, well-formed one (no ``sign``,
    ``hmac`` or uWSGI 2.1 var; every number at most 19 digits), else None.

    What it returns is exactly what :func:`_parse_strict` returns for the same bytes;
    anything it is not sure of (every fault, every rarer var) goes to that one, which
    names the fault.  One walk over the records, no generator, no keyword call.
    """
    end = len(data)
    if end < HEADER_SIZE or data[1] | (data[2] << 8) != end - HEADER_SIZE:
        return None
    values = _FIELD_DEFAULTS[:]
    if not _walk_vars(data, HEADER_SIZE, values, _STRING_SLOTS, _RARE_VARS):
        return None
    key = values[_KEY]
    address = values[_ADDRESS]
    if not key or len(key) > MAX_KEY or not address or len(address) > MAX_ADDRESS:
        return None
    values[_UNSUBSCRIBE] = data[3] != 0
    values[_SIGNED_PART] = data[HEADER_SIZE:]
    return _new_announcement(Announcement, values)


def _walk_vars(data: bytes, pos: int, values: list, strings: Dict[bytes, Tuple[int, bool]],
               refused: frozenset) -> bool:
    """Store the vars of ``data[pos:]`` in *values* (Announcement's field order): the
    string vars of *strings* and the numbers; False at the first fault, the first var
    of *refused*, or a number of more than 19 digits (the strict parser decides)."""
    end = len(data)
    numbers = _NUMBER_SLOTS
    while pos < end:
        if pos + 2 >= end:
            return False
        kend = pos + 2 + (data[pos] | (data[pos + 1] << 8))
        if kend == pos + 2 or kend + 2 > end:
            return False
        name = data[pos + 2:kend]
        pos = kend + 2 + (data[kend] | (data[kend + 1] << 8))
        if pos > end:
            return False
        value = data[kend + 2:pos]
        slot = strings.get(name)
        if slot is not None:
            index, keep_empty = slot
            values[index] = value if value or keep_empty else None
            continue
        number = numbers.get(name)
        if number is not None:
            if not value.isdigit() or len(value) > 19:
                return False
            index, limit = number
            values[index] = int(value)
            if values[index] > limit:
                return False
        elif name == FORWARDED_VAR:
            values[_FORWARDED] = value not in (b"", b"0")
        elif name in refused:
            return False
    return True


# The usual packet (every uWSGI instance writes it so) starts with the ``key`` and the
# ``address`` var; what follows them, the tail (modifiers, cores, load, weight, ...),
# is the same for most nodes of a router and for every announce of a node.  So the
# field values a tail gives are remembered by its bytes (a parse depends on nothing
# else): an announce then costs the two head records and one dict lookup.  A tail that
# needs the general walk (a fault, a rarer var, ``key`` or ``address`` again) is
# remembered as None.  At most _TAILS_MAX tails are kept: when full, the memo starts
# over, so unusual tails (a flood of them) cost a miss each and no memory; a tail
# longer than _TAIL_MAX_BYTES (a usual one is a few dozen bytes) is walked every time,
# so the memo holds at most _TAILS_MAX x _TAIL_MAX_BYTES bytes of peers' data (2 MiB).
_KEY_RECORD = b"\x03\x00key"
_ADDRESS_RECORD = b"\x07\x00address"
#: the header (modifier1 skipped, datasize, modifier2), the key's name record, its length
_KEY_HEAD = struct.Struct("<xHB%dsH" % len(_KEY_RECORD))
_KEY_START = _KEY_HEAD.size
#: the address's name record and its length
_ADDRESS_HEAD = struct.Struct("<%dsH" % len(_ADDRESS_RECORD))
_ADDRESS_START = _ADDRESS_HEAD.size
_TAIL_STRINGS = {name: slot for name, slot in _STRING_SLOTS.items()
                 if slot[0] not in (_KEY, _ADDRESS)}
_TAIL_REFUSED = _RARE_VARS | {b"key", b"address"}
_TAILS: Dict[bytes, Optional[list]] = {}
_TAILS_MAX = 4096
_TAIL_MAX_BYTES = 512
_UNKNOWN_TAIL = object()


#: the last datagram the server's quick path (SubscriptionTable.refresh_usual) handed
#: back to the general path (or refreshed, for a master's copy), and its usual layout:
#: the parser, which looks at the same bytes object right after, finds the layout here
#: (bytes never change, and the reference held here keeps the identity from being reused)
_HANDED_BACK: list = [None, None]


def _hand_back(data: bytes, usual: tuple) -> bool:
    """Keep *usual* as the layout of *data* for :func:`_parse_usual`; False (what
    ``refresh_usual`` answers for a packet it leaves to the general path)."""
    _HANDED_BACK[0] = data
    _HANDED_BACK[1] = usual
    return False


def _parse_usual(data: bytes) -> Optional[Announcement]:
    """:func:`_parse_common` for a packet whose vars start with ``key`` and ``address``
    and whose tail is known (see _TAILS); None for any other packet (that one is
    walked in full).  Returns exactly what the general walk returns."""
    handed = _HANDED_BACK
    usual = handed[1] if data is handed[0] else _usual_layout(data)
    if usual is None:
        return None
    key, address, opcode, values = usual
    values = values[:]
    values[_KEY] = key
    values[_ADDRESS] = address
    values[_UNSUBSCRIBE] = opcode != 0
    values[_SIGNED_PART] = data[HEADER_SIZE:]
    return _new_announcement(Announcement, values)


def _usual_layout(data: bytes) -> Optional[Tuple[bytes, bytes, int, list]]:
    """``(key, address, header byte 3, the tail's field values)`` of a packet in the
    usual layout whose tail is well formed and plain (see _TAILS), else None.  The
    values are the memo's own list, in Announcement's field order: read, never change."""
    end = len(data)
    if end < _KEY_START:
        return None
    datasize, opcode, record, key_length = _KEY_HEAD.unpack_from(data)
    key_end = _KEY_START + key_length
    address_start = key_end + _ADDRESS_START
    if datasize != end - HEADER_SIZE or record != _KEY_RECORD or address_start > end:
        return None
    record, address_length = _ADDRESS_HEAD.unpack_from(data, key_end)
    address_end = address_start + address_length
    if record != _ADDRESS_RECORD or address_end > end or not 0 < key_length <= MAX_KEY \
            or not 0 < address_length <= MAX_ADDRESS:
        return None
    if end - address_end > _TAIL_MAX_BYTES:
        return None
    tail = data[address_end:]
    values = _TAILS.get(tail, _UNKNOWN_TAIL)
    if values is _UNKNOWN_TAIL:
        values = _learn_tail(tail)
    if values is None:
        return None
    return data[_KEY_START:key_end], data[address_start:address_end], opcode, values


def _learn_tail(tail: bytes) -> Optional[list]:
    """Walk a tail not seen yet and remember what it gives (see _TAILS)."""
    values: Optional[list] = _FIELD_DEFAULTS[:]
    if not _walk_vars(tail, 0, values, _TAIL_STRINGS, _TAIL_REFUSED):
        values = None
    if len(_TAILS) >= _TAILS_MAX:
        _TAILS.clear()
    _TAILS[tail] = values
    return values


def parse_announcement(datagram: bytes) -> Announcement:
    """Parse one subscription datagram, strictly (see :func:`_parse_strict`).

    Ordinary packets take a quicker walk with the same result: :func:`_parse_usual`
    for the usual layout, else :func:`_parse_common`.
    """
    data = datagram if type(datagram) is bytes else bytes(datagram)
    announcement = _parse_usual(data)
    if announcement is not None:
        return announcement
    announcement = _parse_common(data)
    if announcement is not None:
        return announcement
    return _parse_strict(data)


def _parse_strict(datagram: bytes) -> Announcement:
    """Parse one subscription datagram, strictly.

    The header's datasize must equal the vars that follow; the vars must be valid
    uwsgi records; ``key`` and ``address`` must be 1..255 bytes; numbers must be plain
    decimals (modifiers 0..255, the others 0..2**63); ``sign``, if present, must be
    the last var, and only ``sign`` may follow ``hmac``.  Header byte 3 == 0 is a subscribe, any other value an unsubscribe;
    byte 0 is not looked at.  Unknown vars are ignored, for a repeated var the last
    one counts.  Raises :class:`SubscriptionError` naming the first fault.
    """
    data = bytes(datagram)
    if len(data) < HEADER_SIZE:
        raise SubscriptionError("subscription packet of %d bytes is shorter than a header"
                                % len(data))
    _, datasize, opcode = HEADER.unpack_from(data)
    block = data[HEADER_SIZE:]
    if datasize != len(block):
        raise SubscriptionError("subscription packet announces %d bytes of vars but carries %d"
                                % (datasize, len(block)))
    fields: Dict[str, Any] = {}
    forwarded = False
    sign_start = -1  # where the sign record starts, once seen
    hmac_start = -1  # where the hmac record starts, once seen
    pos = 0
    try:
        for name, value in iter_vars(block):
            if sign_start >= 0:
                raise SubscriptionError("the sign var must be the last one",
                                        fields.get("key"), fields.get("address"))
            if hmac_start >= 0 and name != b"sign":
                raise SubscriptionError("only the sign var may follow the hmac var",
                                        fields.get("key"), fields.get("address"))
            start = pos
            pos += 4 + len(name) + len(value)
            field = _STRINGS.get(name)
            if field is not None:
                # an empty path (sni_*, notify) is no path
                fields[field] = value if value or field in _KEEP_EMPTY else None
                if field == "sign":
                    sign_start = start
                elif field == "hmac":
                    hmac_start = start
                continue
            number = _NUMBERS.get(name)
            if number is not None:
                fields[number[0]] = _number(name, value, number[1])
            elif name == FORWARDED_VAR:
                forwarded = value not in (b"", b"0")
    except MalformedVars as exc:
        raise SubscriptionError("malformed subscription packet: %s" % exc,
                                fields.get("key"), fields.get("address")) from None
    key = fields.get("key")
    address = fields.get("address")
    if key is None or not 0 < len(key) <= MAX_KEY:
        raise SubscriptionError("subscription packet without a key of 1..%d bytes" % MAX_KEY,
                                key, address)
    if address is None or not 0 < len(address) <= MAX_ADDRESS:
        raise SubscriptionError("subscription packet for %s without an address of 1..%d bytes"
                                % (_text(key), MAX_ADDRESS), key, address)
    fields["signed_part"] = block[:sign_start] if sign_start >= 0 else block
    if hmac_start >= 0:
        fields["hmac_part"] = block[:hmac_start]
    for name in _V21_FIELDS:
        if name in fields:
            _check_v21(fields, key, address)
            fields["v21"] = True
            break
    return Announcement(unsubscribe=opcode != 0, forwarded=forwarded, **fields)


def _check_v21(fields: Dict[str, Any], key: bytes, address: bytes) -> None:
    """The 2.1 string fields: ``algo`` one of :data:`ALGORITHMS`, ``proto`` one
    ASCII letter, ``vassal`` at most 255 bytes (empty values count as absent)."""
    algo = fields.get("algo")
    if algo is not None and algo.decode("latin-1") not in ALGORITHMS:
        raise SubscriptionError("unknown algo %r for %s node: %s (known: %s)"
                                % (algo[:32], _text(key), _text(address), ", ".join(ALGORITHMS)),
                                key, address)
    proto = fields.get("proto")
    if proto is not None and not (len(proto) == 1 and proto.isalpha()):
        raise SubscriptionError("invalid proto %r for %s node: %s (one ASCII letter is required)"
                                % (proto[:32], _text(key), _text(address)), key, address)
    vassal = fields.get("vassal")
    if vassal is not None and len(vassal) > MAX_KEY:
        raise SubscriptionError("vassal name of %d bytes for %s node: %s (at most %d)"
                                % (len(vassal), _text(key), _text(address), MAX_KEY), key, address)


def build_announcement(key: bytes, address: bytes, *, modifier1: int = 0, modifier2: int = 0,
                       cores: int = 0, load: int = 0, weight: int = 0,
                       unsubscribe: bool = False, sni_key: Optional[bytes] = None,
                       sni_crt: Optional[bytes] = None, sni_ca: Optional[bytes] = None,
                       notify: Optional[bytes] = None, forwarded: bool = False,
                       unix: Optional[int] = None,
                       signer: Optional[Callable[[bytes], bytes]] = None,
                       hmac_signer: Optional[Callable[[bytes], bytes]] = None,
                       backup: Optional[int] = None, algo: Optional[bytes] = None,
                       proto: Optional[bytes] = None, vassal: Optional[bytes] = None,
                       drain: bool = False) -> bytes:
    """Write a subscription datagram as a uWSGI 2.0.31 instance does.

    Var order: key, address, modifier1, modifier2, cores, load, weight, [sni_key],
    [sni_crt], [sni_ca], [notify], [backup], [algo], [proto], [vassal], [drain],
    [fastrouter_forwarded], [unix, [hmac], [sign]].  The 2.1 fields (*backup* ... *vassal*) are
    written only when given; a uWSGI 2.0 router ignores them.  The header
    is modifier1 224, the datasize, and byte 3 = 1 for an unsubscribe.

    *unix* is the current time (whole seconds); it is written whenever given, and,
    as uWSGI does, an unsubscribe carries ``unix + 1``.  With *signer* (required to
    sign; it needs *unix*) a ``sign`` var follows, holding ``signer(vars so far)``;
    with *hmac_signer* (it needs *unix* too) an ``hmac`` var holding
    ``hmac_signer(vars so far)`` comes before it.

    What :func:`parse_announcement` would refuse is refused here with
    :class:`SubscriptionError`: a field out of range, or vars over 65535 bytes
    (long SNI paths, a long signature, or a long router address when forwarding).
    """
    if not 0 < len(key) <= MAX_KEY:
        raise SubscriptionError("a subscription key must be 1..%d bytes" % MAX_KEY, key, address)
    if not 0 < len(address) <= MAX_ADDRESS:
        raise SubscriptionError("a subscription address must be 1..%d bytes" % MAX_ADDRESS,
                                key, address)
    for name, value, limit in (("modifier1", modifier1, _BYTE_MAX), ("modifier2", modifier2, _BYTE_MAX),
                               ("cores", cores, _NUMBER_MAX), ("load", load, _NUMBER_MAX),
                               ("weight", weight, _NUMBER_MAX)):
        if not 0 <= value <= limit:
            raise SubscriptionError("%s must be 0..%d, got %d" % (name, limit, value), key, address)
    stamp = None if unix is None else (unix + 1 if unsubscribe else unix)
    if stamp is not None and not 0 <= stamp <= _NUMBER_MAX:
        raise SubscriptionError("the unix timestamp must be 0..%d, got %d" % (_NUMBER_MAX, stamp),
                                key, address)
    pairs: List[Tuple[bytes, bytes]] = [
        (b"key", key),
        (b"address", address),
        (b"modifier1", b"%d" % modifier1),
        (b"modifier2", b"%d" % modifier2),
        (b"cores", b"%d" % cores),
        (b"load", b"%d" % load),
        (b"weight", b"%d" % weight),
    ]
    for name, value in ((b"sni_key", sni_key), (b"sni_crt", sni_crt), (b"sni_ca", sni_ca),
                        (b"notify", notify)):
        if value is not None:
            pairs.append((name, value))
    if backup is not None:
        if not 0 <= backup <= MAX_BACKUP:
            raise SubscriptionError("backup must be 0..%d, got %d" % (MAX_BACKUP, backup),
                                    key, address)
        pairs.append((b"backup", b"%d" % backup))
    for name, value in ((b"algo", algo), (b"proto", proto), (b"vassal", vassal)):
        if value is not None:
            pairs.append((name, value))
    if drain:
        pairs.append((b"drain", b"1"))
    if forwarded:
        pairs.append((FORWARDED_VAR, b"1"))
    if stamp is not None:
        pairs.append((b"unix", b"%d" % stamp))
    elif signer is not None or hmac_signer is not None:
        raise SubscriptionError("a signed subscription needs a unix timestamp", key, address)
    try:
        block = encode_vars(pairs)
        if hmac_signer is not None:
            block += encode_vars([(b"hmac", hmac_signer(block))])
        if signer is not None:
            block += encode_vars([(b"sign", signer(block))])
    except ProtocolError as exc:  # a value of more than 65535 bytes
        raise SubscriptionError(str(exc), key, address) from None
    if len(block) > MAX_DATASIZE:
        raise SubscriptionError("a subscription packet of %d bytes of vars exceeds the limit of %d"
                                % (len(block), MAX_DATASIZE), key, address)
    return HEADER.pack(Modifier1.SUBSCRIPTION, len(block), 1 if unsubscribe else 0) + block


def forward_announcement(a: Announcement, address: bytes, *, cores: int = 0, load: int = 0,
                         weight: int = 0) -> bytes:
    """The packet a router sends upstream for *a* (``--fastrouter-resubscribe``).

    A new packet, not a copy: the same key and direction, the received modifiers and
    SNI files, *address* (the router's own first listening address) and the router's
    own cores/load/weight; ``notify``, ``unix`` and ``sign`` are not forwarded.  It is
    marked as forwarded.  Callers must not forward an announcement whose
    ``forwarded`` is true.  :class:`SubscriptionError` when the new packet would
    not fit in a datagram (see :func:`build_announcement`).
    """
    return build_announcement(a.key, address, modifier1=a.modifier1, modifier2=a.modifier2,
                              cores=cores, load=load, weight=weight, unsubscribe=a.unsubscribe,
                              sni_key=a.sni_key, sni_crt=a.sni_crt, sni_ca=a.sni_ca,
                              forwarded=True, algo=a.algo)


# ---------------------------------------------------------------------------
# Hashing (only visible in the stats)


def djb33x(key: bytes) -> int:
    """uWSGI's key hash: ``h = h * 33 ^ byte`` from 5381, on 32 bits, where bytes
    of 0x80 and above count as negative (sign-extended) C chars."""
    # Both steps commute with taking the low 32 bits, so h is cut down once, at the end.
    h = 5381
    if key.isascii():
        for b in key:
            h = h * 33 ^ b
    else:
        for b in key:
            h = h * 33 ^ (b if b < 0x80 else 0xFFFFFF00 | b)
    return h & 0xFFFFFFFF


def stats_hash(key: bytes) -> int:
    """The ``hash`` of a pool in the stats (uWSGI's bucket number)."""
    return djb33x(key) % _STATS_BUCKETS


# ---------------------------------------------------------------------------
# Table entries


class Node:
    """One backend address subscribed under a key.

    The attribute names are the stats field names.  ``wrr`` is the node's current
    round-robin credit (never negative in the stats).
    """

    __slots__ = ("name", "modifier1", "modifier2", "last_check", "pid", "uid", "gid",
                 "requests", "last_requests", "tx", "rx", "cores", "load", "weight",
                 "current", "ref", "failcnt", "death_mark", "notify", "created_unix",
                 "last_unix", "pool", "backup", "proto", "vassal", "v21", "hrw", "ramp_from",
                 "health", "draining")

    def __init__(self, name: bytes, modifier1: int = 0, modifier2: int = 0, last_check: int = 0,
                 *, cores: int = 0, load: int = 0, weight: int = 1, pid: int = 0, uid: int = 0,
                 gid: int = 0, notify: Optional[bytes] = None, unix: int = 0) -> None:
        self.name = name
        self.modifier1 = modifier1
        self.modifier2 = modifier2
        self.last_check = last_check
        self.pid = pid
        self.uid = uid
        self.gid = gid
        self.requests = 0
        self.last_requests = 0
        self.tx = 0
        self.rx = 0
        self.cores = cores
        self.load = load
        self.weight = weight if weight > 0 else 1
        #: smooth weighted round robin: grows by ``weight`` per pick, may go negative
        self.current = 0
        self.ref = 0
        self.failcnt = 0
        self.death_mark = 0
        self.notify = notify
        self.created_unix = unix
        self.last_unix = unix
        #: the pool holding the node, ``None`` once the node is removed
        self.pool: Optional[Pool] = None
        #: uWSGI 2.1 fields: backup level (0: primary), protocol letter, vassal name;
        #: ``v21`` is true once an announce of the node carried any of them
        self.backup = 0
        self.proto: Optional[bytes] = None
        self.vassal: Optional[bytes] = None
        self.v21 = False
        #: the node's rendezvous-hashing seed (see :func:`_pick_hash`); only iphash
        #: keys use it, so it is made when the node joins one (SubscriptionTable._add)
        self.hrw = 0
        #: slow start: when the node's weight ramp began, 0 when it has none
        #: (uwsgi_fastrouter/slowstart.py)
        self.ramp_from = 0.0
        #: health checks: "up" or "down" while they run, else None (not in the stats)
        self.health: Optional[str] = None
        #: when the node announced ``drain=1`` (0: not draining)
        self.draining = 0.0

    @property
    def wrr(self) -> int:
        return int(self.current) if self.current > 0 else 0

    def __repr__(self) -> str:
        return "<Node %s ref=%d weight=%d%s>" % (_text(self.name), self.ref, self.weight,
                                                  " dead" if self.death_mark else "")


class Pool:
    """The nodes subscribed under one key, in subscription order."""

    __slots__ = ("key", "hash", "hits", "nodes", "by_address", "sni_enabled", "refreshed",
                 "last_announce", "algo", "pick", "hashed", "levels", "v21", "ramping",
                 "draining")

    def __init__(self, key: bytes, algo: str = "wrr") -> None:
        self.key = key
        self.hash = stats_hash(key)
        #: lookups of this key (retries included)
        self.hits = 0
        self.nodes: List[Node] = []
        self.by_address: Dict[bytes, Node] = {}
        #: stats only; SNI contexts are an HTTPS-router matter
        self.sni_enabled = 0
        #: a node of this key announced itself again (a periodic subscriber, not a
        #: one-off key): the key's slot is kept for a while when the pool goes
        self.refreshed = False
        #: when an announce last reached this key (whole seconds)
        self.last_announce = 0
        #: the key's algorithm, fixed when the key is created; ``pick(nodes)`` for
        #: wrr/lrc/wlrc, ``hashed`` for iphash (it needs the request's client)
        self.algo = algo
        self.pick = _PICKERS.get(algo, _pick_wrr)
        self.hashed = algo == "iphash"
        #: some node of the key announced a backup level above 0
        self.levels = False
        #: an announce of the key carried a uWSGI 2.1 field (the stats show them)
        self.v21 = False
        #: slow start: some node of the key may be inside its weight ramp
        self.ramping = False
        #: some node of the key announced ``drain=1``
        self.draining = False

    def __repr__(self) -> str:
        return "<Pool %s nodes=%d>" % (_text(self.key), len(self.nodes))


# ---------------------------------------------------------------------------
# Balancing: each picks among the alive nodes and takes a reference on the choice


def _pick_wrr(nodes: List[Node]) -> Optional[Node]:
    best = None
    total = 0
    for node in nodes:
        if node.death_mark:
            continue
        weight = node.weight
        total += weight
        current = node.current + weight
        node.current = current
        if best is None or current > best.current:
            best = node
    if best is not None:
        best.current -= total
        best.ref += 1
    return best


def _pick_lrc(nodes: List[Node]) -> Optional[Node]:
    # uWSGI's walk: 0 doubles as "nothing chosen yet"; a chosen node without references
    # ends the walk unless its successor (alive or not) is at least as good.
    chosen = None
    least = 0
    last = len(nodes) - 1
    for i, node in enumerate(nodes):
        if node.death_mark:
            continue
        ref = node.ref
        if least == 0 or ref < least:
            least = ref
            chosen = node
            if least == 0:
                nxt = nodes[i + 1] if i < last else None
                if not (nxt is not None and nxt.ref <= ref
                        and nxt.last_requests <= node.last_requests):
                    break
    if chosen is not None:
        chosen.ref += 1
    return chosen


def _pick_wlrc(nodes: List[Node]) -> Optional[Node]:
    # as _pick_lrc, comparing references per unit of weight
    chosen = None
    least = 0.0
    last = len(nodes) - 1
    for i, node in enumerate(nodes):
        if node.death_mark:
            continue
        load = node.ref / node.weight
        if least == 0 or load < least:
            least = load
            chosen = node
            if least == 0:
                nxt = nodes[i + 1] if i < last else None
                if not (nxt is not None and nxt.ref / nxt.weight <= load
                        and nxt.last_requests <= node.last_requests):
                    break
    if chosen is not None:
        chosen.ref += 1
    return chosen


_PICKERS = {"wrr": _pick_wrr, "lrc": _pick_lrc, "wlrc": _pick_wlrc}

_MASK64 = (1 << 64) - 1


def _seed(value: bytes) -> int:
    """64 well-mixed bits of *value*, the same in every process and run."""
    return int.from_bytes(blake2b(value, digest_size=8).digest(), "little")


def _pick_hash(nodes: List[Node], client: bytes) -> Optional[Node]:
    """Rendezvous (highest random weight) hashing: every alive node gets the score
    ``mix(seed(client) ^ node.hrw)`` and the highest score wins.  The same client
    always lands on the same node while the node set stays the same; a node added
    or removed only moves the clients whose best score it has or had, about 1/N of
    them.  Weights are not looked at."""
    h = _seed(client)
    best = None
    top = -1
    for node in nodes:
        if node.death_mark:
            continue
        # murmur3's 64-bit finaliser
        x = h ^ node.hrw
        x = ((x ^ (x >> 33)) * 0xFF51AFD7ED558CCD) & _MASK64
        x = ((x ^ (x >> 33)) * 0xC4CEB9FE1A85EC53) & _MASK64
        x ^= x >> 33
        if x > top:
            top = x
            best = node
    if best is not None:
        best.ref += 1
    return best


def _lowest_level(nodes: List[Node]) -> List[Node]:
    """The nodes of the lowest backup level that has an alive node (all of *nodes*
    when none is alive: the pickers then find nothing)."""
    level = None
    for node in nodes:
        if not node.death_mark and (level is None or node.backup < level):
            level = node.backup
    if level is None:
        return nodes
    return [node for node in nodes if node.backup == level]


def _request_bytes(request: Any) -> bytes:
    """The default client of an iphash lookup: *request* itself when it is bytes."""
    return request if type(request) is bytes else b""


def _no_log(line: str) -> None:
    pass


# ---------------------------------------------------------------------------
# The table


class SubscriptionTable:
    """Pools by key, with uWSGI's subscribe, expiry and balancing rules.

    ``max_keys`` bounds the number of pools (plus the slots kept for returning
    subscribers) and ``max_nodes`` the nodes of one pool, so a flood of announces
    cannot grow memory without limit; a rejected packet leaves the table as it was.
    With a ``verifier``, up to ``replay_memory`` removed nodes are remembered against
    replays (see the module's documentation for both policies).
    """

    def __init__(self, *, tolerance: int = 17, algo: str = "wrr", max_keys: int = 10000,
                 max_nodes: int = 64, log: Callable[[str], None] = _no_log, pid: int = 0,
                 verifier: Optional["SignatureChecker"] = None,
                 sign_tolerance: int = 86400, replay_memory: int = REPLAY_MEMORY,
                 slow_start: float = 0, drain_timeout: float = 0) -> None:
        self.tolerance = tolerance
        #: seconds over which a (re)joining node's weight ramps up; 0: off
        self.slow_start = slow_start
        #: health checks run (nodes get a ``health``), and the addresses they marked down
        self.health_checked = False
        self.down: set = set()
        #: addresses the operator drained (the master FIFO's ``D`` command)
        self.drained: set = set()
        #: the addresses no key picks: ``down | drained``
        self.skipped: set = set()
        #: seconds a node that announced ``drain=1`` is kept for its requests in
        #: flight; 0: until the last one ends
        self.drain_timeout = drain_timeout
        #: the algorithm of keys whose creating announce names none: ``algo`` if it
        #: is one of :data:`ALGORITHMS`, else ``wrr``
        self.algo_name = algo if algo in ALGORITHMS else "wrr"
        #: iphash's input: ``client_of(request)`` -> bytes, *request* being what the
        #: caller of :meth:`lookup` passed (called only for iphash keys)
        self.client_of: Callable[[Any], bytes] = _request_bytes
        self.max_keys = max_keys
        self.max_nodes = max_nodes
        self.log = log
        self.pid = pid
        #: a :class:`~uwsgi_fastrouter.signing.SignatureChecker` (anything with
        #: ``check(announcement) -> bool``), or ``None`` to accept unsigned packets
        self.verifier = verifier
        self.sign_tolerance = sign_tolerance
        self.replay_memory = replay_memory
        self._pools: Dict[bytes, Pool] = {}
        self.node_count = 0
        # key -> until (whole seconds): slots kept for subscribers whose pool went,
        # oldest first
        self._reserved: "OrderedDict[bytes, int]" = OrderedDict()
        # (key, address) -> last accepted unix of a removed signed node, oldest first
        self._removed_unix: "OrderedDict[Tuple[bytes, bytes], int]" = OrderedDict()
        #: refusals, for the stats: a new key while the table was full, a new node
        #: while its key was full, a replayed packet of a removed node
        self.refused_keys = 0
        self.refused_nodes = 0
        self.refused_replays = 0
        #: removed nodes forgotten early because the replay memory was full
        self.replay_memory_evicted = 0
        #: per-node concurrency caps (a nodecaps.NodeCaps), None without them
        self.caps: Any = None

    # -- queries ------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._pools)

    @property
    def empty(self) -> bool:
        return not self._pools

    def pool(self, key: bytes) -> Optional[Pool]:
        return self._pools.get(key)

    def pools_for_stats(self) -> List[Pool]:
        """Pools by stats hash, ties in creation order."""
        return sorted(self._pools.values(), key=_by_hash)

    def pools_for_stats_in_steps(self, step: int = STATS_SORT_STEP) -> Iterator[Optional[Pool]]:
        """The pools of :meth:`pools_for_stats`, in the same order, sorted a step at a
        time: the pools are listed at the first ``next()``, a ``None`` follows the sort
        of each run of *step* of them, then come the pools, merged from the runs one at
        a time.  A walk that pauses at each ``None`` never sorts more than *step* pools
        in one go."""
        pools = list(self._pools.values())
        runs = []
        for start in range(0, len(pools), step):
            runs.append(sorted(pools[start:start + step], key=_by_hash))
            yield None
        # Equal keys come out in the order of their runs: ties stay in creation order.
        yield from heapq.merge(*runs, key=_by_hash)

    @property
    def reserved_keys(self) -> int:
        """Slots kept for returning subscribers (some may be past their time until
        the next :meth:`expire`)."""
        return len(self._reserved)

    def removed_unix(self, key: bytes, address: bytes) -> Optional[int]:
        """The last timestamp accepted from a removed signed node, if remembered."""
        return self._removed_unix.get((key, address))

    # -- announces ----------------------------------------------------------

    def announce(self, a: Announcement, now: float, *, uid: Optional[int] = None,
                 gid: Optional[int] = None, pid: Optional[int] = None,
                 trusted: bool = False, mirrored: bool = False) -> Optional[Node]:
        """Apply a subscribe or unsubscribe packet.

        Returns the node created or refreshed, ``None`` for an unsubscribe.  Raises
        :class:`SubscriptionError` for a packet the table rejects (signatures,
        replays) and :class:`TableFull` for want of room; the table is then
        unchanged.  A refresh of a node in the table is never refused for room.
        A call that created a node raised :attr:`node_count` (that is when
        ``notify`` gets its line).  *uid*, *gid*, *pid* are the sender's
        credentials, if known; *trusted* skips the signature checks
        (``--subscriptions-sign-skip-uid``).  *mirrored*: the master's table
        accepted this packet already (docs/decisions.md D8); it is applied without
        checks, and the limits are the master's (up to twice them here: this
        table's expiry may run a moment behind the master's).
        """
        pool = self._pools.get(a.key)
        node = pool.by_address.get(a.address) if pool is not None else None
        check = self.verifier is not None and not (trusted or mirrored)
        if a.unsubscribe:
            if node is None:
                return None
            if check:
                self._check_known(a, node)
            if not node.death_mark:
                self.log("[uWSGI fastrouter pid %d] %s => marking %s as failed"
                         % (self.pid, _text(a.key), _text(a.address)))
            node.failcnt += 1
            node.death_mark = 1
            if node.ref == 0:
                self._remove(node)
            return None
        now_s = int(now)
        if a.drain:
            if node is not None:
                if check:
                    self._check_known(a, node)
                self._drain(node, now)
            return None     # nothing to drain: the packet creates nothing
        if node is not None:
            if check:
                self._check_known(a, node)
            self._refresh(pool, node, now, a.cores, a.load, a.weight)
            if a.v21 or node.v21:
                _apply_v21(pool, node, a)
            if pid is not None:
                node.pid = pid
            if uid is not None:
                node.uid = uid
            if gid is not None:
                node.gid = gid
            return node
        # A new node: its proof first, then the table's memory, then room.
        if check:
            self._check_new(a, now_s)
            self._check_not_replayed(a)
        room = 2 if mirrored else 1
        if pool is None:
            self._check_room_for_key(a, now_s, room * self.max_keys)
        elif len(pool.nodes) >= room * self.max_nodes:
            self.refused_nodes += 1
            raise TableFull(self.max_nodes, a.key, a.address, per_key=True)
        if pool is None:
            pool = self._pools[a.key] = Pool(a.key, a.algo.decode("ascii") if a.algo
                                             else self.algo_name)
            self._reserved.pop(a.key, None)
            self.log("[uwsgi-subscription for pid %d] new pool: %s (hash key: %d)"
                     % (self.pid, _text(a.key), pool.hash))
        node = Node(a.address, a.modifier1, a.modifier2, now_s, cores=a.cores, load=a.load,
                    weight=a.weight, pid=pid or 0, uid=uid or 0, gid=gid or 0, notify=a.notify,
                    unix=a.unix or 0)
        if a.v21:
            _apply_v21(pool, node, a)
        if self._removed_unix:
            self._removed_unix.pop((a.key, a.address), None)
        self._add(pool, node)
        self.start_ramp(node, now)
        self.log("[uwsgi-subscription for pid %d] %s => new node: %s"
                 % (self.pid, _text(a.key), _text(a.address)))
        return node

    def refresh_usual(self, data: bytes, now: float, keep_layout: bool = False) -> bool:
        """Refresh the node a plain re-announce names, straight from the datagram's
        bytes: the steady state of a busy router, without an :class:`Announcement`.

        It covers a table without a ``verifier``, and a subscribe in the usual layout
        whose tail the memo of tails knows (well formed; no ``sign``, ``hmac``, 2.1 var
        or ``drain``) for a node already in the table that never announced a 2.1
        field.  For such a packet it does what :meth:`announce` does when the sender's
        credentials are unknown, and returns True; for any other packet it returns
        False and changes nothing: the caller parses the packet and applies it the
        general way, which finds the layout read here (so does a parse of a refreshed
        packet with *keep_layout*: a master copies it to its router processes)."""
        if self.verifier is not None:
            return False
        usual = _usual_layout(data)
        if usual is None:
            return False
        key, address, opcode, values = usual
        pool = self._pools.get(key)
        if pool is None or opcode or values[_DRAIN]:
            return _hand_back(data, usual)
        node = pool.by_address.get(address)
        if node is None or node.v21:
            return _hand_back(data, usual)
        self._refresh(pool, node, now, values[_CORES], values[_LOAD], values[_WEIGHT])
        if keep_layout:
            _hand_back(data, usual)
        return True

    def _refresh(self, pool: Pool, node: Node, now: float, cores: int, load: int,
                 weight: int) -> None:
        """What every accepted subscribe of a node already in the table updates."""
        if node.death_mark or node.draining:
            self.start_ramp(node, now)
        now_s = int(now)
        node.death_mark = 0
        node.draining = 0.0
        node.last_check = now_s
        node.cores = cores
        node.load = load
        node.weight = weight if weight > 0 else 1
        node.last_requests = 0
        pool.refreshed = True
        pool.last_announce = now_s

    def _signature_fault(self, a: Announcement) -> Optional[str]:
        """Why *a*'s proof (signature or hmac) is not acceptable, or ``None``."""
        if a.sign is None and a.hmac is None:
            return "unsigned subscription packet for %s" % _text(a.key)
        verifier = self.verifier
        reason = getattr(verifier, "check_reason", None)
        if reason is not None:
            return reason(a)
        if not verifier.check(a):
            return "invalid signature in subscription packet for %s node: %s" % (
                _text(a.key), _text(a.address))
        return None

    def _check_new(self, a: Announcement, now: int) -> None:
        if (a.sign is not None or a.hmac is not None) and a.unix is None:
            raise SubscriptionError("signed subscription packet for %s without a unix timestamp"
                                    % _text(a.key), a.key, a.address)
        if a.unix is not None and a.unix < now - self.sign_tolerance:
            raise SubscriptionError("expired subscription packet for %s node: %s (unix %d, now %d, "
                                    "tolerance %d)" % (_text(a.key), _text(a.address), a.unix, now,
                                                       self.sign_tolerance), a.key, a.address)
        fault = self._signature_fault(a)
        if fault is not None:
            raise SubscriptionError(fault, a.key, a.address)

    def _check_not_replayed(self, a: Announcement) -> None:
        """A removed node comes back only with a packet newer than its last one."""
        last = self._removed_unix.get((a.key, a.address))
        if last is not None and a.unix is not None and a.unix <= last:
            self.refused_replays += 1
            raise SubscriptionError(
                "replayed subscription packet for slot: %s node: %s (unix %d; the node was "
                "removed after accepting unix %d)"
                % (printable(a.key), printable(a.address), a.unix, last), a.key, a.address)

    def _check_room_for_key(self, a: Announcement, now: int, limit: int) -> None:
        """Raise :class:`TableFull` unless a pool for the new key *a.key* fits."""
        until = self._reserved.get(a.key)
        if until is not None:
            if until >= now:
                return  # the slot kept for this key
            del self._reserved[a.key]
        if len(self._pools) + len(self._reserved) < limit:
            return
        self._forget_reservations(now)
        if len(self._pools) + len(self._reserved) < limit:
            return
        self.refused_keys += 1
        raise TableFull(self.max_keys, a.key, a.address)

    def _check_known(self, a: Announcement, node: Node) -> None:
        fault = self._signature_fault(a)
        if fault is not None:
            raise SubscriptionError(fault, a.key, a.address)
        if a.unix is None or a.unix <= node.last_unix:
            raise SubscriptionError("invalid (sniffed ?) packet sent for slot: %s node: %s "
                                    "unix_check: %d" % (_text(a.key), _text(a.address),
                                                        node.last_unix), a.key, a.address)
        node.last_unix = a.unix

    # -- requests -----------------------------------------------------------

    def lookup(self, key: bytes, now: float, request: Any = None) -> Optional[Node]:
        """Choose a node for a request for *key* and take a reference on it.

        Nodes past the tolerance are marked dead on the way; dead nodes that no
        session references are removed (with the pool once it is empty).  Only
        the nodes of the lowest backup level with an alive node are candidates.
        *request* is looked at only for an iphash key, through :attr:`client_of`.
        """
        pool = self._pools.get(key)
        if pool is None:
            return None
        pool.hits += 1
        nodes = pool.nodes
        limit = int(now) - self.tolerance
        doomed = False
        for node in nodes:
            if node.last_check < limit:
                self._expired(key, node)
            if node.death_mark and node.ref == 0:
                doomed = True
        if doomed:
            self._sweep(pool)
            if not pool.nodes:
                return None
        if self.skipped or pool.draining:
            skipped = self.skipped
            nodes = [node for node in nodes if not node.draining and node.name not in skipped]
            if not nodes:
                return None
        if pool.levels:
            nodes = _lowest_level(nodes)
        if self.caps is not None:
            nodes = self.caps.open_nodes(nodes)
        if pool.hashed:
            return _pick_hash(nodes, self.client_of(request))
        if pool.ramping:
            return self._pick_ramping(pool, nodes, now)
        return pool.pick(nodes)

    def addresses(self) -> List[bytes]:
        """Every address subscribed under some key (each once)."""
        seen: Dict[bytes, None] = {}
        for pool in self._pools.values():
            seen.update(dict.fromkeys(pool.by_address))
        return list(seen)

    def set_down(self, address: bytes, down: bool, now: float) -> None:
        """The health checks marked *address* down: no key picks it until it is up
        again (and then its weight ramps up again, with slow start)."""
        if down:
            self.down.add(address)
        else:
            self.down.discard(address)
        self.skipped = self.down | self.drained
        for pool in self._pools.values():
            node = pool.by_address.get(address)
            if node is None:
                continue
            node.health = "down" if down else "up"
            if not down:
                self.start_ramp(node, now)

    def set_drained(self, address: bytes, drained: bool, now: float) -> None:
        """The operator drained *address* (no key picks it; its requests in flight
        finish) or took the drain back (with slow start, its weight ramps up again)."""
        if drained:
            self.drained.add(address)
        else:
            self.drained.discard(address)
        self.skipped = self.down | self.drained
        if not drained and address not in self.down:
            for pool in self._pools.values():
                node = pool.by_address.get(address)
                if node is not None:
                    self.start_ramp(node, now)

    def _drain(self, node: Node, now: float) -> None:
        """*node* announced ``drain=1``: no new requests; it goes when its last
        request in flight ends (at once without any) or after ``drain_timeout``."""
        pool = node.pool
        if not node.draining:
            node.draining = now
            self.log("[uwsgi-subscription for pid %d] %s => draining node: %s (%d requests in "
                     "flight)" % (self.pid, _text(pool.key), _text(node.name), node.ref))
        pool.draining = True
        node.last_check = int(now)
        if node.ref == 0:
            self._drained(node)

    def _drained(self, node: Node) -> None:
        self.log("[uwsgi-subscription for pid %d] %s => drained node removed: %s"
                 % (self.pid, _text(node.pool.key), _text(node.name)))
        self._remove(node)

    def start_ramp(self, node: Node, now: float) -> None:
        """Slow start: *node* (re)joins its key now; with ``slow_start`` set its
        weight ramps up from now on (iphash keys are never ramped)."""
        pool = node.pool
        if self.slow_start and pool is not None and not pool.hashed:
            node.ramp_from = now
            pool.ramping = True

    def _pick_ramping(self, pool: Pool, nodes: List[Node], now: float) -> Optional[Node]:
        """:meth:`lookup`'s pick for a key with a node that may be ramping."""
        if slowstart.still_ramping(pool.nodes, now, self.slow_start):
            return slowstart.pick_ramped(nodes, pool.algo, now, self.slow_start)
        pool.ramping = False
        for node in pool.nodes:   # the ramp left fractional credits behind
            node.current = int(round(node.current))
        return pool.pick(nodes)

    def lookup_dotsplit(self, key: bytes, now: float, request: Any = None) -> Optional[Node]:
        """:meth:`lookup` for *key*, then for its dot-led suffixes (at most 5 tries):
        ``a.b.example.com``, ``.b.example.com``, ``.example.com``, ``.com``."""
        for _ in range(5):
            node = self.lookup(key, now, request)
            if node is not None:
                return node
            dot = key.find(b".", 1)
            if dot < 0:
                return None
            key = key[dot:]
        return None

    def release(self, node: Node) -> None:
        """A session stopped using *node*; a dead node nobody uses is removed."""
        if node.ref > 0:
            node.ref -= 1
        if node.ref == 0 and node.pool is not None:
            if node.death_mark:
                self._remove(node)
            elif node.draining:
                self._drained(node)

    def quietly(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``method(*args, **kwargs)`` with this table's lines left out: under a master, the
        subscription events, expiries and relayed failures that the master's table
        logs once are applied silently by the router processes' copies (and the
        failures a router process logged by the master's)."""
        saved, self.log = self.log, _no_log
        try:
            return method(*args, **kwargs)
        finally:
            self.log = saved

    def connected(self, node: Node) -> None:
        node.requests += 1
        node.last_requests += 1

    def connect_failed(self, key: bytes, node: Node, now: float) -> None:
        """A connect to *node* failed: mark it dead (it goes once nobody uses it)."""
        node.failcnt += 1
        if not node.death_mark:
            self.log("[uwsgi-fastrouter] %s => marking %s as failed" % (_text(key), _text(node.name)))
            node.death_mark = 1
        if node.ref == 0 and node.pool is not None:
            self._remove(node)

    def expire(self, now: float) -> int:
        """Mark every node past the tolerance dead and remove the dead nodes nobody
        uses; forget the kept slots and the replay timestamps whose time is over.
        Returns how many nodes were removed.  The whole sweep at once; the router runs
        it a step at a time (:meth:`expiry_steps`, every second)."""
        before = self.node_count
        for _ in self.expiry_steps(lambda: now):
            pass
        return before - self.node_count

    def expiry_steps(self, clock: Callable[[], float], step: int = EXPIRY_STEP) -> Iterator[None]:
        """:meth:`expire`'s sweep in steps, for a caller that runs one step per pass of
        its event loop: each ``next()`` looks at about *step* pools and nodes (a pool
        counts one, each of its nodes one more; as many pools per step as make *step*
        with the table's mean pool size at the start), so no step is long whatever the
        table's size.  ``clock()`` is read at the start and before each step (*now* of
        :meth:`expire`): a node expires no later than in a sweep made in one go when
        the sweep starts.  The pools swept are the table's at the start: one removed
        meanwhile has nothing left to sweep (a pool leaves the table only once it has
        no node, and never gets one again), and one added meanwhile waits for the next
        sweep (it has just announced; a lookup never picks a node past the tolerance
        anyway)."""
        now = clock()
        self._forget_reservations(int(now))
        self._forget_removed(int(now))
        pools = list(self._pools.values())
        per_step = max(1, step * len(pools) // max(1, len(pools) + self.node_count))
        for start in range(0, len(pools), per_step):
            if start:
                yield
                now = clock()
            limit = int(now) - self.tolerance
            for pool in pools[start:start + per_step]:
                doomed = False
                if pool.draining:
                    self._end_drains(pool, now)
                for node in pool.nodes:
                    if node.last_check < limit:
                        self._expired(pool.key, node)
                    if node.death_mark and node.ref == 0:
                        doomed = True
                if doomed:
                    self._sweep(pool)

    def pools_now(self) -> List[Pool]:
        """The pools as they are now, in the table's own order: no sort, for a walk
        whose reader finds each pool by its key (a router process's stats report),
        where :meth:`pools_for_stats` would sort thousands of pools in one go."""
        return list(self._pools.values())

    # -- bookkeeping --------------------------------------------------------

    def _end_drains(self, pool: Pool, now: float) -> None:
        """Past ``drain_timeout`` a draining node counts as failed: it goes when its
        last request in flight ends, whatever the state of the others."""
        draining = False
        for node in pool.nodes:
            if node.draining and not node.death_mark:
                if self.drain_timeout and now - node.draining >= self.drain_timeout:
                    self.log("[uwsgi-subscription for pid %d] %s => %s still has %d requests in "
                             "flight after draining for %d seconds: marking it as failed"
                             % (self.pid, _text(pool.key), _text(node.name), node.ref,
                                self.drain_timeout))
                    node.death_mark = 1
                    node.failcnt += 1
                else:
                    draining = True
        pool.draining = draining

    def _expired(self, key: bytes, node: Node) -> None:
        if not node.death_mark:
            self.log("[uwsgi-subscription for pid %d] %s => marking %s as failed "
                     "(no announce received in %d seconds)"
                     % (self.pid, _text(key), _text(node.name), self.tolerance))
            node.death_mark = 1
            node.failcnt += 1

    def _add(self, pool: Pool, node: Node) -> None:
        if pool.hashed:
            node.hrw = _seed(node.name)
        if self.health_checked:
            node.health = "down" if node.name in self.down else "up"
        pool.nodes.append(node)
        pool.by_address[node.name] = node
        node.pool = pool
        if node.last_check > pool.last_announce:
            pool.last_announce = node.last_check
        self.node_count += 1

    def _remove(self, node: Node) -> None:
        pool = node.pool
        if pool is None:
            return
        pool.nodes.remove(node)
        self._forget(pool, node)

    def _sweep(self, pool: Pool) -> None:
        """Remove the pool's dead unreferenced nodes, in place."""
        keep = []
        for node in pool.nodes:
            if node.death_mark and node.ref == 0:
                self._forget(pool, node)
            else:
                keep.append(node)
        pool.nodes[:] = keep
        if not keep and self._pools.get(pool.key) is pool:
            self._drop_pool(pool)

    def _forget(self, pool: Pool, node: Node) -> None:
        if pool.by_address.get(node.name) is node:
            del pool.by_address[node.name]
        node.pool = None
        self.node_count -= 1
        if self.verifier is not None and node.last_unix:
            self._remember_removed(pool.key, node)
        if not pool.nodes and self._pools.get(pool.key) is pool:
            self._drop_pool(pool)

    def _drop_pool(self, pool: Pool) -> None:
        del self._pools[pool.key]
        if pool.refreshed:
            reserved = self._reserved
            reserved[pool.key] = pool.last_announce + 2 * self.tolerance
            reserved.move_to_end(pool.key)
            if len(reserved) > self.max_keys:
                reserved.popitem(last=False)

    def _forget_reservations(self, now: int) -> None:
        """Drop the kept slots whose time is over, from the oldest on (their times
        are nearly in order; a late one goes at a later sweep)."""
        reserved = self._reserved
        while reserved:
            key, until = next(iter(reserved.items()))
            if until >= now:
                break
            del reserved[key]

    def _remember_removed(self, key: bytes, node: Node) -> None:
        memory = self._removed_unix
        entry = (key, node.name)
        memory[entry] = node.last_unix
        memory.move_to_end(entry)
        if len(memory) > self.replay_memory:
            memory.popitem(last=False)
            self.replay_memory_evicted += 1
            if self.replay_memory_evicted == 1:
                self.log("[uwsgi-subscription for pid %d] %d removed nodes remembered against "
                         "replays: from now on the oldest is forgotten for each new one"
                         % (self.pid, self.replay_memory))

    def _forget_removed(self, now: int) -> None:
        """Drop the remembered timestamps so old that a packet carrying them would be
        refused as expired anyway, from the oldest removal on."""
        memory = self._removed_unix
        horizon = now - self.sign_tolerance
        while memory:
            entry, unix = next(iter(memory.items()))
            if unix >= horizon:
                break
            del memory[entry]

    # -- hand-over ----------------------------------------------------------

    def dump(self) -> bytes:
        """The table as bytes (JSON, versioned) for :meth:`load` in another process.

        Alive nodes only, with their counters and signature state, and the
        timestamps remembered against replays; references, round-robin credits and
        kept slots are not carried over.
        """
        pools = []
        for pool in self._pools.values():
            nodes = [{
                "name": _enc(n.name), "modifier1": n.modifier1, "modifier2": n.modifier2,
                "last_check": n.last_check, "pid": n.pid, "uid": n.uid, "gid": n.gid,
                "requests": n.requests, "last_requests": n.last_requests, "tx": n.tx, "rx": n.rx,
                "cores": n.cores, "load": n.load, "weight": n.weight, "failcnt": n.failcnt,
                "notify": None if n.notify is None else _enc(n.notify),
                "created_unix": n.created_unix, "last_unix": n.last_unix,
                "backup": n.backup, "proto": None if n.proto is None else _enc(n.proto),
                "vassal": None if n.vassal is None else _enc(n.vassal), "v21": n.v21,
            } for n in pool.nodes if not n.death_mark]
            if nodes:
                pools.append({"key": _enc(pool.key), "hits": pool.hits, "nodes": nodes,
                              "algo": pool.algo, "v21": pool.v21})
        doc = {"version": _DUMP_VERSION, "pools": pools,
               "removed": [[_enc(key), _enc(address), unix]
                           for (key, address), unix in self._removed_unix.items()]}
        return json.dumps(doc, separators=(",", ":")).encode("ascii")

    def load(self, data: bytes, now: float) -> int:
        """Add the nodes of a :meth:`dump` to this table; returns how many were added.

        A node this table already knows is kept as it is (it announced since);
        nodes past the tolerance at *now* and nodes beyond the limits are skipped.
        Raises :class:`SubscriptionError`, with the table unchanged, for data that is
        not a dump of this version.
        """
        entries, removed = _parse_dump(data)
        limit = int(now) - self.tolerance
        added = 0
        for key, hits, nodes, algo, v21 in entries:
            for node in nodes:
                if node.last_check < limit:
                    continue
                pool = self._pools.get(key)
                if pool is None:
                    if len(self._pools) >= self.max_keys:
                        break
                    pool = self._pools[key] = Pool(key, algo or self.algo_name)
                    self._reserved.pop(key, None)
                    pool.hits = hits
                    pool.v21 = v21
                if node.name in pool.by_address or len(pool.nodes) >= self.max_nodes:
                    continue
                self._add(pool, node)
                if node.backup:
                    pool.levels = True
                added += 1
        if self.verifier is not None:
            for key, address, unix in removed:
                pool = self._pools.get(key)
                if pool is None or address not in pool.by_address:
                    self._removed_unix[(key, address)] = unix
                    if len(self._removed_unix) > self.replay_memory:
                        self._removed_unix.popitem(last=False)
            self._forget_removed(int(now))
        return added


def _parse_dump(data: bytes) -> Tuple[List[Tuple[bytes, int, List[Node], Optional[str], bool]],
                                        List[Tuple[bytes, bytes, int]]]:
    try:
        doc = json.loads(bytes(data).decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SubscriptionError("not a subscription table dump: %s" % exc) from None
    if not isinstance(doc, dict) or doc.get("version") != _DUMP_VERSION:
        raise SubscriptionError("unsupported subscription table dump version: %r"
                                % (doc.get("version") if isinstance(doc, dict) else None))
    entries = []
    try:
        for entry in doc["pools"]:
            key = _dec(entry["key"])
            nodes = []
            for item in entry["nodes"]:
                name = _dec(item["name"])
                notify = item["notify"]
                if not (0 < len(key) <= MAX_KEY and 0 < len(name) <= MAX_ADDRESS):
                    raise ValueError("key or address length out of range")
                node = Node(name, int(item["modifier1"]), int(item["modifier2"]),
                            int(item["last_check"]), cores=int(item["cores"]),
                            load=int(item["load"]), weight=int(item["weight"]),
                            pid=int(item["pid"]), uid=int(item["uid"]), gid=int(item["gid"]),
                            notify=None if notify is None else _dec(notify))
                node.requests = int(item["requests"])
                node.last_requests = int(item["last_requests"])
                node.tx = int(item["tx"])
                node.rx = int(item["rx"])
                node.failcnt = int(item["failcnt"])
                node.created_unix = int(item["created_unix"])
                node.last_unix = int(item["last_unix"])
                node.backup = int(item.get("backup", 0))
                proto, vassal = item.get("proto"), item.get("vassal")
                node.proto = None if proto is None else _dec(proto)
                node.vassal = None if vassal is None else _dec(vassal)
                node.v21 = bool(item.get("v21", False))
                nodes.append(node)
            algo = entry.get("algo")
            if algo is not None and algo not in ALGORITHMS:
                raise ValueError("unknown algo %r" % (algo,))
            entries.append((key, int(entry["hits"]), nodes, algo, bool(entry.get("v21", False))))
        removed = [(_dec(key), _dec(address), int(unix))
                   for key, address, unix in doc.get("removed", ())]
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise SubscriptionError("damaged subscription table dump: %r" % (exc,)) from None
    return entries, removed


def _apply_v21(pool: Pool, node: Node, a: Announcement) -> None:
    """Store an announce's 2.1 fields on its node (every announce sets them all)."""
    node.backup = a.backup
    node.proto = a.proto
    node.vassal = a.vassal
    node.v21 = pool.v21 = True
    if a.backup:
        pool.levels = True


_by_hash = operator.attrgetter("hash")


def _enc(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _dec(value: str) -> bytes:
    return base64.b64decode(value.encode("ascii"), validate=True)
