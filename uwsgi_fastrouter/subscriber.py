"""The subscriber side: telling subscription servers "requests for KEY may go to ADDRESS".

Theory of operation
-------------------
A uWSGI instance started with ``--subscribe-to`` / ``--subscribe2`` announces
itself to one or more subscription servers (a FastRouter's
``--fastrouter-subscription-server``) by sending each of them a small datagram
per key, over and over, so the router keeps its node alive; when it shuts down it
sends the same datagram with header byte 3 = 1 ("unsubscribe").

Parsing.  :func:`parse_subscribe_to` understands every ``--subscribe-to`` form::

    HOST:PORT:KEY[,MOD1[,DIGEST:PRIVKEY]]    UDP server (IPv4 literal or host name), KEY may
                                              contain ':'
    /unix/path:KEY[,...]                      UNIX datagram server (split at the first ':';
                                              a relative path needs a '/' before that ':')
    @name:KEY[,...]                           the UNIX datagram server "@name" (a file, as
                                              uWSGI's subscription servers bind it)
    ADDR=SERVER:KEY[,...]                     announce ADDR instead of the first socket
    =N=SERVER:KEY[,...]                       announce the name of shared socket N
    SERVER:@FILE                              one key per line of FILE, re-read every round

and :func:`parse_subscribe2` the ``k=v,k=v`` list of ``--subscribe2``.  Where uWSGI
silently ignores a malformed value every round, these raise
:class:`SubscribeError` naming the value, so a typo is a start-up error and not a
backend that never receives traffic.  A map file is only checked when it is read:
it may appear later, and a bad line is logged and skipped.

Announcing.  :class:`Subscriber` owns the list of specs.  A *round* walks it in
order, reads the map files, builds one packet per (server, key) with
:func:`~uwsgi_fastrouter.subscription.build_announcement` (the var order of a
2.0.31 instance: key, address, modifier1, modifier2, cores, load, weight,
[sni_*], [notify], [unix, sign]) and sends it with ``sendto`` from one of two
non-blocking datagram sockets (UDP, UNIX), kept for the subscriber's lifetime.
A send that fails (no server yet, full queue) is counted in :attr:`errors` and
logged at most once a minute per server and reason; the round goes on.

Timing follows a 2.0.31 master: a round at :meth:`Subscriber.start`, one a
second later, then one every ``freq`` seconds counted from the start (t = 0, 1,
10, 20, ... with the default 10).  Rounds are timers on the reactor
(``call_at`` on whole multiples, so they do not drift).  :meth:`Subscriber.stop`
sends the unsubscribe round synchronously and closes the sockets.

Addresses.  A spec announces, in this order of preference: the subscribe2
``socket=N`` (the instance's socket number N, via ``resolve_socket``), its explicit
address (``ADDR=`` / ``addr=``; ``=N`` means shared socket N, via
``resolve_shared``), else the instance's first socket (``default_address``).
With no default address the specs that need one are skipped -- uWSGI sends
nothing for them either -- and one warning says so at start.

A server given by host name (docs/addresses.md, "Host names") gets every packet at
each address of the name.  The names are looked up off the loop by the subscriber's
own :class:`~uwsgi_fastrouter.resolver.Resolver` (started and stopped with it); until
a name first resolves, its packets are not sent (counted in :attr:`errors`, logged at
most once a minute), and its first answer triggers a round at once.

Signing (``,DIGEST:/path/private.pem`` or ``sign=``).  The packet gets
``unix`` = now (now + 1 for an unsubscribe, as uWSGI does) and a ``sign`` var:
the RSASSA-PKCS1-v1_5 signature of the vars before it, made with
:mod:`~uwsgi_fastrouter.signing`.  The key file is re-read when it changes.  A
packet that cannot be signed (missing or bad key) is not sent at all: uWSGI
would send it without its signature.

Shared key (``--subscribe-hmac-key``, read once at start-up).  Every packet gets
``unix`` as above and an ``hmac`` var: the hex HMAC-SHA256 of the vars before it
(see :mod:`~uwsgi_fastrouter.signing`).  With an RSA signature too, ``hmac`` comes
first and the signature covers it.

subscribe2's ``check=FILE`` skips that announce (and its unsubscribe) while FILE
exists.  Its ``weight=`` applies to that subscription only.  In 2.0.31 it also
overwrites the instance's ``--weight`` from the next round on, so every other
announce of the instance starts carrying it: that is a bug and is not copied.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import TYPE_CHECKING, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from . import log as _log
from .addresses import AddressError, address_text, host_name, is_unix, parse_connect
from .signing import (RSAPrivateKey, SignatureChecker, SigningError, hmac_tag, load_private_key,
                      sign)
from .sockets import connect_sockaddr
from .subscription import ALGORITHMS, MAX_BACKUP, MAX_KEY, SubscriptionError, build_announcement

if TYPE_CHECKING:  # pragma: no cover
    from .reactor import Reactor

__all__ = [
    "SubscribeError",
    "SubscribeSpec",
    "MapFileSpec",
    "parse_subscribe_to",
    "parse_subscribe2",
    "read_map_file",
    "parse_map_file",
    "Subscriber",
]

_BYTE_MAX = 255
_NUMBER_MAX = 2 ** 63
#: a failure (per server and reason) is logged again after this many seconds
_LOG_INTERVAL = 60.0
_UCRED = struct.Struct("iII")  # struct ucred: pid_t, uid_t, gid_t
_SCM_CREDENTIALS = getattr(socket, "SCM_CREDENTIALS", 2)


class SubscribeError(ValueError):
    """A ``--subscribe-to`` / ``--subscribe2`` value (or a map file line) is malformed."""


class SubscribeSpec(NamedTuple):
    """One subscription: announce *key* to *server*.

    ``address``: ``None`` for the instance's first socket, ``b"=N"`` for shared
    socket N, else the exact bytes to announce.  ``weight``: ``None`` for the
    instance's weight.  ``sign``: ``"DIGEST:/path/private.pem"``.  ``check``: skip
    the announce while this file exists.  ``socket``: subscribe2's ``socket=N``.
    ``source``: the option value it came from (for the log).
    """

    server: str
    key: bytes
    address: Optional[bytes] = None
    modifier1: int = 0
    modifier2: int = 0
    weight: Optional[int] = None
    sign: Optional[str] = None
    check: Optional[str] = None
    sni_key: Optional[bytes] = None
    sni_crt: Optional[bytes] = None
    sni_ca: Optional[bytes] = None
    socket: Optional[int] = None
    source: str = ""
    #: uWSGI 2.1 fields, sent only when given (a 2.0 router ignores them)
    backup: Optional[int] = None
    algo: Optional[bytes] = None
    proto: Optional[bytes] = None
    vassal: Optional[bytes] = None


class MapFileSpec(NamedTuple):
    """``SERVER:@FILE``: one subscription per line of *path*, read every round."""

    server: str
    path: str
    address: Optional[bytes] = None
    source: str = ""


Spec = Union[SubscribeSpec, MapFileSpec]


# ---------------------------------------------------------------------------
# Parsing


def _b(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _fail(value: str, why: str) -> SubscribeError:
    return SubscribeError("%r: %s" % (value, why))


def _decimal(value: str, name: str, text: str, limit: int) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > limit:
        raise _fail(value, "%s must be a decimal number 0..%d, not %r" % (name, limit, text))
    return int(text)


def _check_key(value: str, key: bytes) -> bytes:
    if not key:
        raise _fail(value, "empty subscription key")
    if len(key) > MAX_KEY:
        raise _fail(value, "the subscription key is %d bytes long (at most %d)" % (len(key), MAX_KEY))
    return key


def _check_server(value: str, server: str) -> None:
    """A subscription server must be an address we can send a datagram to, or
    ``HOST:PORT`` with a host name (looked up off the loop, see :class:`Subscriber`)."""
    if host_name(server) is not None:
        return
    try:
        parse_connect(server, datagram=True)
    except AddressError as exc:
        raise _fail(value, "subscription server %s" % exc) from None


def _check_sign(value: str, spec: str) -> str:
    digest, sep, path = spec.partition(":")
    if not sep or not digest or not path:
        raise _fail(value, "the signing part must be DIGEST:/path/to/private.pem, not %r" % spec)
    try:
        SignatureChecker(digest + ":.", lambda path: None)  # validates the digest name
    except SigningError as exc:
        raise _fail(value, str(exc)) from None
    return spec


def parse_subscribe_to(value: str) -> Union[List[SubscribeSpec], MapFileSpec]:
    """Parse a ``--subscribe-to`` value (every form of the module docstring).

    Returns a list of :class:`SubscribeSpec` (one element), or a :class:`MapFileSpec`
    for ``SERVER:@FILE``.  Raises :class:`SubscribeError` naming *value*.
    """
    rest = value
    address: Optional[bytes] = None
    equal = value.find("=")
    if equal >= 0:
        if value.startswith("="):
            second = value.find("=", 1)
            if second < 0:
                raise _fail(value, "expected =N=SERVER:KEY (N: a shared socket number)")
            number = value[1:second]
            if not (number.isascii() and number.isdigit()):
                raise _fail(value, "shared socket number %r is not a number" % number)
            address = b"=%d" % int(number)
            rest = value[second + 1:]
        else:
            address = _b(value[:equal])
            rest = value[equal + 1:]
    if ":" not in rest:
        raise _fail(value, "no key: expected SERVER:KEY")
    if is_unix(rest):
        colon = rest.find(":", 1)
        if colon < 0:
            raise _fail(value, "no key: expected /unix/path:KEY")
    else:
        close = rest.find("]:") + 1 if rest.startswith("[") else 0
        port_colon = rest.find(":", close)
        colon = rest.find(":", port_colon + 1)
        if colon < 0:
            raise _fail(value, "no key: expected HOST:PORT:KEY, /unix/path:KEY or @name:KEY "
                               "(a UNIX server starts with '/' or '@' or has a '/' before its ':')")
    server = rest[:colon]
    _check_server(value, server)
    tail = rest[colon + 1:]
    if tail.startswith("@"):
        if len(tail) == 1:
            raise _fail(value, "no map file after '@'")
        return MapFileSpec(server, tail[1:], address, value)
    key_text, comma, options = tail.partition(",")
    key = _check_key(value, _b(key_text))
    modifier1 = 0
    signing: Optional[str] = None
    if comma:
        mod_text, comma, sign_text = options.partition(",")
        if mod_text:
            modifier1 = _decimal(value, "modifier1", mod_text, _BYTE_MAX)
        if comma:
            signing = _check_sign(value, sign_text)
    return [SubscribeSpec(server, key, address, modifier1, 0, None, signing, None,
                          None, None, None, None, value)]


_SUBSCRIBE2_KEYS = ("server", "key", "socket", "addr", "weight", "modifier1", "modifier2",
                    "sign", "check", "sni_key", "sni_crt", "sni_ca",
                    # uWSGI 2.1's (no router reads inactive: accepted, not sent)
                    "backup", "algo", "proto", "vassal", "inactive")


def _split_escaped(text: str, separator: str) -> List[str]:
    """Split at unescaped *separator*; a backslash takes the next character literally."""
    items: List[str] = []
    current: List[str] = []
    escaped = False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == separator:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return items


def parse_subscribe2(value: str) -> SubscribeSpec:
    """Parse a ``--subscribe2`` value: ``k=v`` items separated by ``,`` (``\\,`` is a
    literal comma).  ``server`` and ``key`` are required; the other keys are
    ``addr``, ``socket``, ``weight``, ``modifier1``, ``modifier2``, ``sign``,
    ``check``, ``sni_key``, ``sni_crt``, ``sni_ca``, and uWSGI 2.1's ``backup`` (a level,
    0..65535), ``algo`` (wrr, lrc, wlrc, iphash), ``proto`` (one letter), ``vassal`` and
    ``inactive`` (accepted and ignored, as every router does).  The server is UDP ``HOST:PORT``
    or a UNIX datagram path, by the rules of :mod:`~uwsgi_fastrouter.addresses`.
    Raises :class:`SubscribeError` naming *value*.
    """
    fields: Dict[str, str] = {}
    for item in _split_escaped(value, ","):
        if not item:
            continue
        name, eq, text = item.partition("=")
        if not eq:
            raise _fail(value, "%r is not a key=value pair" % item)
        if name not in _SUBSCRIBE2_KEYS:
            raise _fail(value, "unknown key %r (known: %s)" % (name, ", ".join(_SUBSCRIBE2_KEYS)))
        if not text:
            raise _fail(value, "empty value for %r" % name)
        fields[name] = text
    for required in ("server", "key"):
        if required not in fields:
            raise _fail(value, "%r is required" % required)
    server = fields["server"]
    _check_server(value, server)
    key = _check_key(value, _b(fields["key"]))

    def number(name: str, limit: int) -> Optional[int]:
        text = fields.get(name)
        return None if text is None else _decimal(value, name, text, limit)

    def raw(name: str) -> Optional[bytes]:
        text = fields.get(name)
        return None if text is None else _b(text)

    return SubscribeSpec(
        server=server, key=key, address=raw("addr"),
        modifier1=number("modifier1", _BYTE_MAX) or 0,
        modifier2=number("modifier2", _BYTE_MAX) or 0,
        weight=number("weight", _NUMBER_MAX),
        sign=_check_sign(value, fields["sign"]) if "sign" in fields else None,
        check=fields.get("check"),
        sni_key=raw("sni_key"), sni_crt=raw("sni_crt"), sni_ca=raw("sni_ca"),
        socket=number("socket", 65535), source=value,
        backup=number("backup", MAX_BACKUP), algo=_check_algo(value, fields.get("algo")),
        proto=_check_proto(value, fields.get("proto")),
        vassal=_check_vassal(value, fields.get("vassal")))


def _check_algo(value: str, algo: Optional[str]) -> Optional[bytes]:
    if algo is None:
        return None
    if algo not in ALGORITHMS:
        raise _fail(value, "unknown algo %r (known: %s)" % (algo, ", ".join(ALGORITHMS)))
    return _b(algo)


def _check_proto(value: str, proto: Optional[str]) -> Optional[bytes]:
    if proto is None:
        return None
    if not (len(proto) == 1 and proto.isascii() and proto.isalpha()):
        raise _fail(value, "proto must be one ASCII letter, not %r" % proto)
    return _b(proto)


def _check_vassal(value: str, vassal: Optional[str]) -> Optional[bytes]:
    if vassal is None:
        return None
    name = _b(vassal)
    if len(name) > MAX_KEY:
        raise _fail(value, "the vassal name is %d bytes long (at most %d)" % (len(name), MAX_KEY))
    return name


def parse_map_file(spec: MapFileSpec, data: bytes) -> Tuple[List[SubscribeSpec], List[str]]:
    """The subscriptions of a map file's content, and the reasons for the lines skipped.

    One ``KEY[,MODIFIER1]`` per line; empty lines (also blank ones) and lines
    starting with ``#`` are skipped; a trailing CR is dropped; the last line may
    lack its newline.  Signing is not supported in map files.
    """
    specs: List[SubscribeSpec] = []
    problems: List[str] = []
    for number, line in enumerate(data.split(b"\n"), 1):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip() or line.startswith(b"#"):
            continue
        key, comma, mod_text = line.partition(b",")
        where = "%s line %d" % (spec.path, number)
        if not key or len(key) > MAX_KEY:
            problems.append("%s: a key must be 1..%d bytes" % (where, MAX_KEY))
            continue
        modifier1 = 0
        if comma and mod_text:
            if not mod_text.isdigit() or int(mod_text) > _BYTE_MAX:
                problems.append("%s: %r is not a modifier1 (0..255; signing is not supported "
                                "in map files)" % (where, mod_text.decode("utf-8", "replace")))
                continue
            modifier1 = int(mod_text)
        specs.append(SubscribeSpec(spec.server, key, spec.address, modifier1, source=spec.source))
    return specs, problems


def read_map_file(spec: MapFileSpec) -> Tuple[List[SubscribeSpec], List[str]]:
    """Read and parse a map file (see :func:`parse_map_file`); raises :class:`OSError`."""
    with open(spec.path, "rb") as f:
        return parse_map_file(spec, f.read())


# ---------------------------------------------------------------------------
# Announcing


class Subscriber:
    """Announces *specs* (:class:`SubscribeSpec` / :class:`MapFileSpec`) on *reactor*.

    *default_address*: the instance's first socket name (``None``: there is none).
    *freq*: seconds between rounds (at least 1).  *cores*, *load()*, *weight*: the
    instance's figures sent in every packet.  *resolve_shared(N)* / *resolve_socket(N)*:
    the name of shared socket N / of socket N (``None`` when there is none).
    *modifier1*: ``--subscribe-with-modifier1`` (overrides every spec's).  *notify*:
    ``--subscription-notify-socket``.  *credentials*: attach ``SCM_CREDENTIALS`` to
    UNIX datagrams (``--subscriptions-use-credentials``).  *hmac_key*: prove every
    packet with an ``hmac`` var under this shared key (``--subscribe-hmac-key``).
    *wall_clock* gives the ``unix`` timestamps of signed packets; *log* writes one line.

    Counters: :attr:`sent` packets sent, :attr:`errors` packets that could not be
    built, signed or sent, :attr:`rounds` rounds run.

    Call :meth:`start` and :meth:`stop` from the reactor's thread (or, for ``stop``,
    after its loop has ended); ``start`` counts the schedule from the loop time
    :attr:`Reactor.now`, so schedule it with ``reactor.call_soon(subscriber.start)``
    when the loop has not run yet.
    """

    def __init__(self, reactor: "Reactor", specs: Sequence[Spec], *, default_address: Optional[bytes],
                 freq: int = 10, cores: int = 0, load: Callable[[], int] = lambda: 0,
                 weight: int = 0,
                 resolve_shared: Optional[Callable[[int], Optional[bytes]]] = None,
                 resolve_socket: Optional[Callable[[int], Optional[bytes]]] = None,
                 modifier1: Optional[int] = None, notify: Optional[bytes] = None,
                 credentials: bool = False,
                 hmac_key: Optional[bytes] = None,
                 wall_clock: Callable[[], float] = time.time,
                 log: Callable[[str], None] = _log.log,
                 names=None) -> None:
        self.reactor = reactor
        #: a Resolver for servers given as HOST:PORT with a host name (owned: started
        #: and stopped with the subscriber); None when no server has a name
        self.names = names
        self.specs: List[Spec] = list(specs)
        self.default_address = default_address
        self.freq = max(1, int(freq))
        self.cores = cores
        self.load = load
        self.weight = weight
        self.resolve_shared = resolve_shared
        self.resolve_socket = resolve_socket
        self.modifier1 = modifier1
        self.notify = notify
        self.credentials = credentials
        self.hmac_key = hmac_key
        self.wall_clock = wall_clock
        self.log = log
        self.sent = 0
        self.errors = 0
        self.rounds = 0
        self._started_at: Optional[float] = None
        self._timer = None
        self._stopped = False
        self._sockets: Dict[int, socket.socket] = {}
        self._keys: Dict[str, Tuple[Tuple[int, int, int, int], RSAPrivateKey]] = {}
        self._logged: Dict[str, float] = {}

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Announce now, again after a second, then every ``freq`` seconds."""
        if self._started_at is not None or self._stopped:
            return
        self._started_at = self.reactor.now
        if self.names is not None:
            self.names.on_change.append(self._names_changed)
            self.names.start()
            for spec in self.specs:
                named = host_name(spec.server)
                if named is not None:
                    self.names.watch(named[0])
        if self.default_address is None:
            needing = [s for s in self.specs if s.address is None
                       and getattr(s, "socket", None) is None]
            if needing:
                self.log("[uwsgi-subscriber] no socket to announce: %d subscription(s) without "
                         "an explicit address will not be sent (%s)"
                         % (len(needing), ", ".join(s.source or s.server for s in needing)))
        self._round(unsubscribe=False, verbose=True)
        self._timer = self.reactor.call_at(self._started_at + 1, self._tick)

    def stop(self, unsubscribe: bool = True, drain: bool = False) -> None:
        """Stop announcing; with *unsubscribe* send the unsubscribe round now, with
        *drain* (it wins over *unsubscribe*) a ``drain=1`` round: the routers send
        nothing new and let the requests in flight finish.  Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            if drain and self._started_at is not None:
                self._round(unsubscribe=False, verbose=True, drain=True)
            elif unsubscribe and self._started_at is not None:
                self._round(unsubscribe=True, verbose=True)
        finally:
            for sock in self._sockets.values():
                sock.close()
            self._sockets.clear()
            if self.names is not None:
                self.names.stop()

    def _names_changed(self) -> None:
        """A server's host name got (new) addresses: announce to them now."""
        if not self._stopped:
            self._round(unsubscribe=False, verbose=False)

    def _tick(self) -> None:
        self._timer = None
        if self._stopped:
            return
        start, freq, now = self._started_at, self.freq, self.reactor.now
        # the next whole multiple of freq after now (a late loop skips missed rounds)
        due = start + freq * (int((now - start) // freq) + 1)
        self._timer = self.reactor.call_at(due, self._tick)
        self._round(unsubscribe=False, verbose=False)

    # ---------------------------------------------------------------- rounds

    def announce_all(self, unsubscribe: bool = False) -> None:
        """Run one round now (outside the schedule)."""
        self._round(unsubscribe=unsubscribe, verbose=False)

    def _round(self, unsubscribe: bool, verbose: bool, drain: bool = False) -> None:
        self.rounds += 1
        try:
            load = int(self.load())
        except Exception as exc:  # a broken load probe must not stop the announces
            self._log_limited("load", "[uwsgi-subscriber] cannot read the load: %s" % exc)
            load = 0
        for spec in self.specs:
            if verbose:
                self.log("%s %s" % ("draining from" if drain else "unsubscribing from"
                                    if unsubscribe else "subscribing to",
                                    spec.source or spec.server))
            if isinstance(spec, MapFileSpec):
                for line_spec in self._read_map(spec):
                    self._announce(line_spec, unsubscribe, load, drain)
            else:
                self._announce(spec, unsubscribe, load, drain)

    def _read_map(self, spec: MapFileSpec) -> List[SubscribeSpec]:
        try:
            specs, problems = read_map_file(spec)
        except OSError as exc:
            self._log_limited("map:" + spec.path, "[uwsgi-subscriber] cannot read subscription map "
                              "file %s: %s" % (spec.path, exc.strerror or exc))
            return []
        for problem in problems:
            self._log_limited("map:" + problem, "[uwsgi-subscriber] skipped: %s" % problem)
        return specs

    def _address(self, spec: SubscribeSpec) -> Optional[bytes]:
        if spec.socket is not None and self.resolve_socket is not None:
            name = self.resolve_socket(spec.socket)
            if name:
                return name
        address = spec.address
        if address is None:
            return self.default_address
        if address.startswith(b"=") and address[1:].isdigit():
            number = int(address[1:])
            name = self.resolve_shared(number) if self.resolve_shared is not None else None
            if not name:
                self._log_limited("shared:%d" % number, "[uwsgi-subscriber] no shared socket %d: "
                                  "%s is not announced" % (number, spec.source or spec.server))
            return name or None
        return address

    def _announce(self, spec: SubscribeSpec, unsubscribe: bool, load: int,
                  drain: bool = False) -> None:
        if spec.check is not None and os.path.exists(spec.check):
            return
        address = self._address(spec)
        if address is None:
            return
        signer = None
        unix = None
        if spec.sign is not None:
            signer = self._signer(spec.sign)
            if signer is None:
                self.errors += 1
                return
            unix = int(self.wall_clock())
        hmac_signer = None
        if self.hmac_key is not None:
            key = self.hmac_key
            hmac_signer = lambda block: hmac_tag(key, block)  # noqa: E731
            unix = int(self.wall_clock())
        try:
            packet = build_announcement(
                spec.key, address,
                modifier1=self.modifier1 if self.modifier1 is not None else spec.modifier1,
                modifier2=spec.modifier2, cores=self.cores, load=load,
                weight=self.weight if spec.weight is None else spec.weight,
                unsubscribe=unsubscribe, sni_key=spec.sni_key, sni_crt=spec.sni_crt,
                sni_ca=spec.sni_ca, notify=self.notify, unix=unix, signer=signer,
                hmac_signer=hmac_signer,
                backup=spec.backup, algo=spec.algo, proto=spec.proto, vassal=spec.vassal,
                drain=drain)
        except SubscriptionError as exc:
            self.errors += 1
            self._log_limited("build:%s" % exc, "[uwsgi-subscriber] cannot announce %s: %s"
                              % (spec.source or spec.server, exc))
            return
        self._send(spec.server, packet)

    def _signer(self, spec: str) -> Optional[Callable[[bytes], bytes]]:
        digest, _, path = spec.partition(":")
        try:
            st = os.stat(path)
            stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            cached = self._keys.get(path)
            if cached is not None and cached[0] == stamp:
                key = cached[1]
            else:
                with open(path, "rb") as f:
                    key = load_private_key(f.read())
                self._keys[path] = (stamp, key)
        except (OSError, SigningError) as exc:
            self._keys.pop(path, None)
            why = getattr(exc, "strerror", None) or exc
            self._log_limited("key:%s:%s" % (path, why), "[uwsgi-subscriber] cannot sign with %s: "
                              "%s (the subscription is not sent)" % (path, why))
            return None
        return lambda block: sign(key, digest, block)

    def _send(self, server: str, packet: bytes) -> None:
        """Send *packet* to *server*; to every address of a server's host name."""
        named = host_name(server) if self.names is not None else None
        if named is None:
            self._send_to(server, server, packet)
            return
        addresses = self.names.addresses(named[0])
        if addresses is None:
            self.errors += 1
            self._log_limited("unresolved:%s" % server, "[uwsgi-subscriber] %s is not resolved "
                              "yet: no subscription packet sent to it" % server)
            return
        for ip in addresses:
            self._send_to(server, address_text(ip, named[1]), packet)

    def _send_to(self, server: str, target_address: str, packet: bytes) -> None:
        try:
            family, target = connect_sockaddr(target_address, datagram=True)
            sock = self._sockets.get(family)
            if sock is None:
                sock = socket.socket(family, socket.SOCK_DGRAM)
                sock.setblocking(False)
                self._sockets[family] = sock
            if family == socket.AF_UNIX and self.credentials:
                creds = _UCRED.pack(os.getpid(), os.getuid(), os.getgid())
                sock.sendmsg([packet], [(socket.SOL_SOCKET, _SCM_CREDENTIALS, creds)], 0, target)
            else:
                sock.sendto(packet, target)
        except (OSError, AddressError) as exc:
            self.errors += 1
            why = getattr(exc, "strerror", None) or str(exc)
            self._log_limited("send:%s:%s" % (server, why), "[uwsgi-subscriber] unable to send a "
                              "subscription packet to %s: %s" % (server, why))
            return
        self.sent += 1

    def _log_limited(self, what: str, line: str) -> None:
        """Log *line* unless the same *what* was logged less than a minute ago."""
        now = self.reactor.now
        last = self._logged.get(what)
        if last is not None and now - last < _LOG_INTERVAL:
            return
        if len(self._logged) > 1024:
            self._logged.clear()
        self._logged[what] = now
        self.log(line)
