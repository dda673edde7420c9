"""Every socket address the router binds or reaches, parsed with uWSGI's rules.

Theory of operation
-------------------
One grammar, four roles: an address is *bound* (listeners, the stats and zerg
servers, subscription servers) or *reached* (nodes, subscription servers named by
``--subscribe-to``/``--subscribe2``, resubscribe targets, a zerg server), on a
*stream* or a *datagram* socket.  :func:`parse_bind` and :func:`parse_connect`
turn the text into an :class:`Address` record -- a kind and the exact value that
``bind()``/``connect()``/``sendto()`` take -- or raise :class:`AddressError`.  No
socket is touched here: the I/O (resolving names, binding, removing stale files)
is :mod:`uwsgi_fastrouter.sockets`' job.

Which kind (the same in every role)::

    starts with "@"                          UNIX (see below)
    starts with "/", or has a "/" before
      its first ":", or has no ":" at all    UNIX socket path
    starts with "["                          IPv6  "[addr]:port"
    anything else                            IPv4  "host:port"

``fd://N`` (an inherited listening descriptor) and ``=N`` (shared socket N, with
uWSGI's ``atoi``: junk reads as 0) exist only for stream listeners.

``@name``: on a stream socket uWSGI binds and connects the Linux abstract name
``"\\0" + name + "\\0"`` -- one trailing NUL counted in the address length.  Both
directions use that form here, so a real uWSGI node on ``--socket @y`` is reached
as ``@y`` and our ``@y`` listeners are reachable by uWSGI.  (Python's natural
``"\\0name"`` is a different socket.)  On a datagram socket uWSGI 2.0.31 has no
abstract names at all: its subscription server and its subscribers take ``@x`` as
the file ``@x`` in their working directory.  Datagram addresses keep that meaning,
so a uWSGI node's ``--subscribe2 server=@x`` reaches our
``--fastrouter-subscription-server @x`` and ours reaches a uWSGI router's (see
``docs/addresses.md``).

TCP differs by direction, as in uWSGI.  Binding happens once at start-up: the
host and port are split at the *last* ``:``, the port must be 0..65535 in plain
digits, an empty host means every IPv4 interface and a host name is left for the
binder to resolve (kind :data:`NAME`).  Reaching runs inside the event loop for
every proxied request and must never block: split at the *first* ``:``, the host
is an IPv4 literal read like ``inet_aton`` (``127.1`` works, an empty host is
``0.0.0.0``, names are refused), the port is ``atoi`` of what follows (leading
digits, the rest ignored) and must be 1..65535.

Host names of nodes and servers (docs/addresses.md, "Host names") are told from
literals by :func:`host_name` and looked up elsewhere, off the event loop
(:mod:`uwsgi_fastrouter.resolver`); what reaches :func:`parse_connect` is then one
literal per address (:func:`address_text`).  A literal never goes near a resolver.
"""

from __future__ import annotations

import ipaddress
import sys
from typing import Any, NamedTuple, Optional, Tuple, Union

__all__ = [
    "AddressError",
    "Address",
    "INET",
    "INET6",
    "UNIX",
    "NAME",
    "FD",
    "SHARED",
    "parse_bind",
    "parse_connect",
    "is_unix",
    "shared_socket_index",
    "host_name",
    "address_text",
    "MAX_HOST_NAME",
]

# Kinds of Address.
INET = "inet"      # sockaddr ("a.b.c.d", port)
INET6 = "inet6"    # sockaddr ("v6 text", port, 0, 0); the text may carry a %scope
UNIX = "unix"      # sockaddr bytes: a path, or "\0name\0" for an abstract name
NAME = "name"      # bind only: (host name, port), resolved by the binder
FD = "fd"          # bind only: sockaddr = the inherited descriptor number
SHARED = "shared"  # bind only: sockaddr = the shared socket number

# The longest DNS name in text form, and the bytes a label may hold.
MAX_HOST_NAME = 253
_LABEL_BYTES = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"

# sizeof(struct sockaddr_un.sun_path) on Linux.
SUN_PATH_MAX = 108

Text = Union[str, bytes, bytearray, memoryview]


class AddressError(ValueError):
    """An address cannot be parsed, bound or used.

    ``address`` is the offending address as given (``str``; bytes are decoded),
    ``reason`` the explanation; ``str()`` shows both, the address quoted.
    """

    def __init__(self, address: object, reason: str) -> None:
        if isinstance(address, (bytes, bytearray, memoryview)):
            address = bytes(address).decode("utf-8", "backslashreplace")
        super().__init__(f"{address!r}: {reason}")
        self.address = address
        self.reason = reason


class Address(NamedTuple):
    """A parsed address: its *kind*, what the system call takes, the text as given."""

    kind: str
    sockaddr: Any
    text: str

    @property
    def abstract(self) -> bool:
        """A Linux abstract UNIX name (no file behind it)."""
        return self.kind == UNIX and self.sockaddr[:1] == b"\0"

    @property
    def path(self) -> Optional[bytes]:
        """The file system path of a UNIX address, else None."""
        if self.kind == UNIX and self.sockaddr[:1] != b"\0":
            return self.sockaddr
        return None


# ---------------------------------------------------------------------------
# The two directions


def parse_bind(text: str, *, datagram: bool = False, abstract_all: bool = False) -> Address:
    """The address a listener or server binds (see the module doc).

    *abstract_all* (``--abstract-socket``) turns every stream UNIX path into an
    abstract name, the name being the path as written.
    """
    raw = _raw(text)
    if not raw:
        raise AddressError(text, "empty address")
    if raw.startswith(b"fd://") or raw.startswith(b"="):
        if datagram:
            raise AddressError(text, "fd://N and =N are only for stream listeners")
        if raw.startswith(b"="):
            return Address(SHARED, _atoi(raw[1:]), _text(text))
        digits = raw[5:]
        if not _digits(digits):
            raise AddressError(text, "fd:// needs a descriptor number")
        return Address(FD, int(digits), _text(text))
    if is_unix(raw):
        return _unix(text, raw, datagram, abstract_all)
    if raw.startswith(b"["):
        host, port = _split_inet6(text, raw)
        return _inet6(text, host, _strict_port(text, port))
    host, _, port_text = raw.rpartition(b":")
    port = _strict_port(text, port_text)
    if not host:
        return Address(INET, ("0.0.0.0", port), _text(text))
    quad = _inet_aton(host)
    if quad is not None:
        return Address(INET, (quad, port), _text(text))
    try:
        name = host.decode("ascii")
    except UnicodeDecodeError:
        raise AddressError(text, "invalid host name %r" % _shown(host)) from None
    return Address(NAME, (name, port), _text(text))


def parse_connect(text: Text, *, datagram: bool = False) -> Address:
    """The address of a node or server to reach; never needs a name lookup."""
    raw = _raw(text)
    if not raw:
        raise AddressError(text, "empty address")
    if is_unix(raw):
        return _unix(text, raw, datagram, False)
    if raw.startswith(b"["):
        host, port = _split_inet6(text, raw)
        return _inet6(text, host, _loose_port(text, port))
    colon = raw.find(b":")
    host, port_text = raw[:colon], raw[colon + 1:]
    quad = _inet_aton(host) if host else "0.0.0.0"
    if quad is None:
        if _is_host_name(host):
            raise AddressError(text, "the host name %r has no known address" % _shown(host))
        raise AddressError(text, "%r is neither an IPv4 address nor a host name"
                           % _shown(host))
    return Address(INET, (quad, _loose_port(text, port_text)), _text(text))


def is_unix(text: Text) -> bool:
    """True when *text* names a UNIX socket (a path or ``@name``) by the kind rules above."""
    raw = _raw(text)
    if raw[:1] in (b"/", b"@"):
        return True
    colon = raw.find(b":")
    return colon < 0 or b"/" in raw[:colon]


def host_name(text: Text) -> Optional[Tuple[str, int]]:
    """``(host, port)`` when *text* is ``HOST:PORT`` with a DNS host name, else None.

    A name is what :func:`parse_connect` refuses and a resolver can look up: not a
    UNIX path, not ``[ipv6]``, not an IPv4 literal (``inet_aton``'s forms stay
    literals), at most :data:`MAX_HOST_NAME` bytes of dot-separated labels of 1..63
    letters, digits, ``-`` or ``_`` (one trailing dot allowed), the last label not
    all digits (so ``300.1.1.1`` is still a bad address and not a name); the port
    plain decimal 1..65535.  Anything else (``None``) keeps the literal rules.
    """
    raw = _raw(text)
    if not raw or raw[:1] == b"[" or is_unix(raw):
        return None
    host, _, port = raw.partition(b":")
    if not _is_host_name(host) or not _digits(port) or not 0 < int(port) <= 65535:
        return None
    return host.decode("ascii"), int(port)


def address_text(ip: str, port: int) -> str:
    """The node address of *ip* (an IPv4 or IPv6 literal) and *port*."""
    return ("[%s]:%d" if ":" in ip else "%s:%d") % (ip, port)


def shared_socket_index(text: str) -> Optional[int]:
    """N for a ``=N`` shared socket reference (``atoi``: junk is 0), else None."""
    if not text.startswith("="):
        return None
    return _atoi(_raw(text[1:]))


# ---------------------------------------------------------------------------
# UNIX


def _unix(text: Text, raw: bytes, datagram: bool, abstract_all: bool) -> Address:
    if b"\0" in raw:
        raise AddressError(text, "a NUL byte in a UNIX socket name")
    if raw.startswith(b"@") and not datagram:
        name = raw[1:]
        if not name:
            raise AddressError(text, "empty abstract socket name")
        return _abstract(text, name)
    if abstract_all and not datagram:
        return _abstract(text, raw)
    if len(raw) >= SUN_PATH_MAX:
        raise AddressError(text, "UNIX socket path longer than %d bytes" % (SUN_PATH_MAX - 1))
    return Address(UNIX, raw, _text(text))


def _abstract(text: Text, name: bytes) -> Address:
    sockaddr = b"\0" + name + b"\0"
    if len(sockaddr) > SUN_PATH_MAX:
        raise AddressError(text, "abstract socket name too long (at most %d bytes)"
                           % (SUN_PATH_MAX - 2))
    return Address(UNIX, sockaddr, _text(text))


# ---------------------------------------------------------------------------
# IP


def _split_inet6(text: Text, raw: bytes) -> Tuple[bytes, bytes]:
    close = raw.find(b"]:")
    if close < 0:
        raise AddressError(text, "expected [ipv6]:port")
    return raw[1:close], raw[close + 2:]


def _inet6(text: Text, host: bytes, port: int) -> Address:
    try:
        shown = host.decode("ascii")
        ipaddress.IPv6Address(shown)
    except ValueError:  # UnicodeDecodeError is one too
        raise AddressError(text, "invalid IPv6 address %r" % _shown(host)) from None
    return Address(INET6, (shown, port, 0, 0), _text(text))


def _inet_aton(host: bytes) -> Optional[str]:
    """*host* read as ``inet_aton`` reads it, as a dotted quad; None if it is not an address.

    One to four parts separated by dots; each is decimal, octal (leading ``0``) or
    hexadecimal (``0x``); the last part fills the bytes the others left (``127.1``
    is 127.0.0.1).  Unlike the C function, nothing may follow the address.
    """
    parts = host.split(b".")
    if len(parts) > 4:
        return None
    values = []
    for part in parts:
        value = _c_number(part)
        if value is None:
            return None
        values.append(value)
    last = values.pop()
    for value in values:
        if value > 0xFF:
            return None
    if last >= 1 << (8 * (4 - len(values))):
        return None
    number = last
    for shift, value in enumerate(values):
        number |= value << (24 - 8 * shift)
    return "%d.%d.%d.%d" % (number >> 24, (number >> 16) & 0xFF, (number >> 8) & 0xFF, number & 0xFF)


def _is_host_name(host: bytes) -> bool:
    """True for a DNS name that is not an IPv4 literal (see :func:`host_name`)."""
    if not host or len(host) > MAX_HOST_NAME or not host.isascii():
        return False
    labels = host[:-1].split(b".") if host.endswith(b".") else host.split(b".")
    for label in labels:
        if not 0 < len(label) <= 63 or label.strip(_LABEL_BYTES):
            return False
    return not labels[-1].isdigit() and _inet_aton(host) is None


def _c_number(part: bytes) -> Optional[int]:
    if part[:2] in (b"0x", b"0X"):
        digits, base = part[2:], 16
    elif part[:1] == b"0":
        digits, base = part, 8
    else:
        digits, base = part, 10
    if not digits or not digits.isascii() or not digits.isalnum():
        return None
    try:
        return int(digits, base)
    except ValueError:
        return None


def _strict_port(text: Text, port: bytes) -> int:
    if not _digits(port) or int(port) > 65535:
        raise AddressError(text, "invalid port %r" % _shown(port))
    return int(port)


def _loose_port(text: Text, port: bytes) -> int:
    # atoi(): the leading decimal digits count, the rest is ignored.
    n = 0
    while n < len(port) and 0x30 <= port[n] <= 0x39:
        n += 1
    if n == 0:
        raise AddressError(text, "missing port")
    digits = port[:n].lstrip(b"0")
    if len(digits) > 5 or int(digits or b"0") > 65535:
        raise AddressError(text, "port out of range")
    if not digits:
        raise AddressError(text, "port 0 cannot be reached")
    return int(digits)


# ---------------------------------------------------------------------------
# Helpers


def _raw(text: Text) -> bytes:
    if isinstance(text, str):
        # what os.fsencode() does, without importing os into a pure module
        return text.encode(sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())
    return bytes(text)


def _text(text: Text) -> str:
    if isinstance(text, str):
        return text
    return bytes(text).decode(sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())


def _digits(value: bytes) -> bool:
    return value.isdigit() and value.isascii()


def _atoi(value: bytes) -> int:
    n = 0
    while n < len(value) and 0x30 <= value[n] <= 0x39:
        n += 1
    return int(value[:n] or b"0")


def _shown(value: bytes) -> str:
    return value.decode("utf-8", "backslashreplace")
