"""Socket addresses: binding listeners and resolving node addresses.

Theory of operation
-------------------
Two directions, two sets of rules, both taken from uWSGI so that existing
configurations and subscribers keep working.

*Listening* (:func:`bind_listener`, the ``--fastrouter`` values) accepts the
forms uWSGI binds:

==================  =====================================================
``ip:port``         TCP on that IPv4 address (``:port`` = all interfaces)
``host:port``       TCP; the host is resolved now, IPv4 preferred
``[ipv6]:port``     TCP over IPv6
``/path``, ``rel``  UNIX stream socket; a stale socket file is removed first
``@name``           Linux abstract UNIX socket
``fd://N``          an inherited descriptor N that already listens
``=N``              shared socket N (not supported yet)
==================  =====================================================

An address containing ``:`` is TCP, whatever else it looks like (as in uWSGI).
Binding happens once at start-up, so it may block (DNS) and fails loudly with an
:class:`AddressError` naming the address.

*Connecting* (:func:`node_sockaddr`, the node addresses of static lists,
subscriptions and mappers) runs once per proxied request inside the event loop,
so it never blocks: host names are **not** resolved (uWSGI does not resolve
them either; ``localhost:3031`` is an invalid node address), the IPv4 host goes
through ``inet_aton`` (so the short forms ``127.1`` and an empty host meaning
``0.0.0.0`` work), and the port is the run of digits after the first ``:``.
Beyond uWSGI, ``[ipv6]:port`` is accepted for IPv6 nodes (numeric only).
Results are memoised.

Abstract UNIX names are bound and reached as ``"\\0" + name + "\\0"`` -- with one
trailing NUL counted in the address length, exactly as uWSGI does.  A peer that
uses Python's natural ``"\\0name"`` is a *different* socket and cannot talk to a
uWSGI instance (or to us) under the same ``@name``.

UNIX paths of nodes are kept as the raw bytes they arrived as (the kernel takes
bytes); listener paths are ``str`` as given on the command line.
"""

from __future__ import annotations

import functools
import os
import socket
import stat
from typing import Optional, Tuple

__all__ = [
    "AddressError",
    "Listener",
    "bind_listener",
    "bind_stream_server",
    "node_sockaddr",
    "sockname",
]

# sizeof(struct sockaddr_un.sun_path) on Linux.
_SUN_PATH_MAX = 108


class AddressError(ValueError):
    """An address cannot be parsed, bound or used.

    ``address`` is the offending address as given (``str``; bytes are decoded),
    ``reason`` the explanation; ``str()`` shows both, the address quoted.
    """

    def __init__(self, address: object, reason: str) -> None:
        if isinstance(address, bytes):
            address = address.decode("utf-8", "backslashreplace")
        super().__init__(f"{address!r}: {reason}")
        self.address = address
        self.reason = reason


# ---------------------------------------------------------------------------
# Listeners


class Listener:
    """One bound, listening, non-blocking, close-on-exec socket.

    ``name`` is the address as uWSGI logs and reports it: the spec as given,
    except that a requested port 0 is replaced by the real port and ``fd://N``
    is named after what the descriptor is bound to.  ``unix_path`` is the
    absolute path of the socket file this process created (removed by
    :meth:`close`), else ``None``.
    """

    __slots__ = ("sock", "name", "unix_path", "_file_id")

    def __init__(
        self,
        sock: socket.socket,
        name: str,
        unix_path: Optional[str] = None,
        file_id: Optional[Tuple[int, int]] = None,
    ) -> None:
        self.sock = sock
        self.name = name
        self.unix_path = unix_path
        self._file_id = file_id

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self, unlink: bool = True) -> None:
        """Close the socket; with *unlink*, also remove the socket file we created.

        The file is only removed while it is still the one we bound (same device
        and inode), so a successor that re-bound the path keeps its socket.
        Safe to call more than once.
        """
        self.sock.close()
        path, self.unix_path = self.unix_path, None
        if unlink and path is not None:
            try:
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == self._file_id:
                    os.unlink(path)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"<Listener {self.name!r} fd={self.sock.fileno()}>"


def sockname(sock: socket.socket) -> str:
    """Name a bound socket the way uWSGI names sockets it did not bind itself:
    ``ip:port`` (``:port`` for 0.0.0.0), ``[ipv6]:port``, a path, or ``@name``."""
    addr = sock.getsockname()
    if sock.family == socket.AF_INET:
        host, port = addr[0], addr[1]
        return f"{'' if host == '0.0.0.0' else host}:{port}"
    if sock.family == socket.AF_INET6:
        return f"[{addr[0]}]:{addr[1]}"
    if isinstance(addr, bytes):  # Linux abstract name
        if addr.startswith(b"\0"):
            return "@" + addr[1:].rstrip(b"\0").decode("utf-8", "surrogateescape")
        return addr.decode("utf-8", "surrogateescape")
    return str(addr)


def bind_listener(
    spec: str,
    *,
    backlog: int = 100,
    chmod: Optional[int] = None,
    abstract_all: bool = False,
    defer_accept: int = 0,
) -> Listener:
    """Bind and listen on *spec* (a ``--fastrouter`` value, see the module doc).

    *backlog* is the ``listen()`` backlog, *chmod* the mode applied to a UNIX
    socket file, *abstract_all* binds every UNIX path as an abstract name (the
    name stays as given), *defer_accept* > 0 sets ``TCP_DEFER_ACCEPT`` (Linux)
    on TCP listeners.

    Raises :class:`AddressError` for anything that cannot be bound, including
    ``=N`` shared sockets (not supported yet).
    """
    if not spec:
        raise AddressError(spec, "empty address")
    if spec.startswith("fd://"):
        return _adopt_fd(spec)
    if spec.startswith("="):
        raise AddressError(spec, "shared sockets (=N) are not supported yet")
    if ":" in spec:
        return _bind_tcp(spec, backlog, defer_accept)
    if spec.startswith("@"):
        return _bind_unix(spec, spec[1:], True, backlog, None)
    return _bind_unix(spec, spec, abstract_all, backlog, chmod)


def bind_stream_server(spec: str, *, backlog: int = 100) -> Listener:
    """Bind a plain stream server (the stats server): TCP when *spec* contains
    ``:`` (no deferred accept, so a client is served as soon as it connects),
    else a UNIX stream socket, ``@name`` being abstract."""
    return bind_listener(spec, backlog=backlog, defer_accept=0)


def _ascii_digits(text: str) -> bool:
    # str.isdigit() alone also accepts non-ASCII digits, which int() would take
    return text.isdigit() and text.isascii()


def _os_error(spec: str, action: str, exc: OSError) -> AddressError:
    return AddressError(spec, f"cannot {action}: {exc.strerror or exc}")


def _adopt_fd(spec: str) -> Listener:
    text = spec[5:]
    if not _ascii_digits(text):
        raise AddressError(spec, "fd:// needs a descriptor number")
    fd = int(text)
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise _os_error(spec, f"use descriptor {fd}", exc) from exc
    try:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:
        sock.detach()
        raise _os_error(spec, f"inspect descriptor {fd}", exc) from exc
    if kind != socket.SOCK_STREAM or not listening:
        sock.detach()  # not ours to close
        raise AddressError(spec, f"descriptor {fd} is not a listening stream socket")
    sock.setblocking(False)
    sock.set_inheritable(False)
    return Listener(sock, sockname(sock))


def _split_tcp(spec: str) -> Tuple[str, int, bool]:
    """``host:port`` / ``[v6]:port`` -> (host, port, is_bracketed_ipv6)."""
    if spec.startswith("["):
        close = spec.find("]:")
        if close < 0:
            raise AddressError(spec, "expected [ipv6]:port")
        host, port_text, v6 = spec[1:close], spec[close + 2 :], True
    else:
        host, _, port_text = spec.rpartition(":")
        v6 = False
    if not _ascii_digits(port_text) or int(port_text) > 65535:
        raise AddressError(spec, f"invalid port {port_text!r}")
    return host, int(port_text), v6


def _bind_tcp(spec: str, backlog: int, defer_accept: int) -> Listener:
    host, port, v6 = _split_tcp(spec)
    if v6:
        family = socket.AF_INET6
        try:
            infos = socket.getaddrinfo(
                host, port, socket.AF_INET6, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST
            )
        except (socket.gaierror, UnicodeError) as exc:
            raise AddressError(spec, f"invalid IPv6 address {host!r}") from exc
        sockaddr = infos[0][4]
    elif host == "":
        family, sockaddr = socket.AF_INET, ("0.0.0.0", port)
    else:
        try:
            infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise AddressError(spec, f"cannot resolve {host!r}: {exc}") from exc
        infos = [i for i in infos if i[0] in (socket.AF_INET, socket.AF_INET6)]
        if not infos:
            raise AddressError(spec, f"no IPv4/IPv6 address for {host!r}")
        infos.sort(key=lambda i: i[0] != socket.AF_INET)  # IPv4 first, stable
        family, sockaddr = infos[0][0], infos[0][4]

    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if defer_accept > 0 and hasattr(socket, "TCP_DEFER_ACCEPT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, defer_accept)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            raise _os_error(spec, "bind", exc) from exc
        try:
            sock.listen(backlog)
        except OSError as exc:
            raise _os_error(spec, "listen", exc) from exc
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    name = spec
    if port == 0:
        real = sock.getsockname()[1]
        name = f"{spec[: spec.rfind(':')]}:{real}"
    return Listener(sock, name)


def _bind_unix(
    spec: str, path: str, abstract: bool, backlog: int, chmod: Optional[int]
) -> Listener:
    if not hasattr(socket, "AF_UNIX"):  # pragma: no cover - not Linux/BSD
        raise AddressError(spec, "UNIX sockets are not available on this platform")
    if not path:
        raise AddressError(spec, "empty socket name")
    raw = os.fsencode(path)
    if abstract:
        addr: object = b"\0" + raw + b"\0"
        if len(addr) > _SUN_PATH_MAX:
            raise AddressError(spec, "abstract socket name too long")
    else:
        if len(raw) >= _SUN_PATH_MAX:
            raise AddressError(spec, f"UNIX socket path longer than {_SUN_PATH_MAX - 1} bytes")
        addr = raw
        _remove_stale(spec, path)

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    file_id = None
    unix_path = None
    try:
        try:
            sock.bind(addr)
        except OSError as exc:
            raise _os_error(spec, "bind", exc) from exc
        if not abstract:
            unix_path = os.path.abspath(path)
            st = os.stat(path)
            file_id = (st.st_dev, st.st_ino)
            if chmod is not None:
                try:
                    os.chmod(path, chmod)
                except OSError as exc:
                    raise _os_error(spec, "chmod", exc) from exc
        try:
            sock.listen(backlog)
        except OSError as exc:
            raise _os_error(spec, "listen", exc) from exc
        sock.setblocking(False)
    except BaseException:
        sock.close()
        if file_id is not None:
            _unlink_quietly(path)
        raise
    return Listener(sock, spec, unix_path, file_id)


def _remove_stale(spec: str, path: str) -> None:
    """Remove a socket file left behind by a previous run.

    As in uWSGI, a socket file is removed even if something still listens on
    it (the new listener takes the path over).  Unlike uWSGI, which unlinks
    whatever is there, anything that is not a socket is left alone and
    reported: a typo must not delete a regular file.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _os_error(spec, "inspect the socket path", exc) from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise AddressError(spec, "path exists and is not a socket")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _os_error(spec, "remove the stale socket", exc) from exc


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# ---------------------------------------------------------------------------
# Node addresses (outgoing)


@functools.lru_cache(maxsize=4096)
def node_sockaddr(address: bytes) -> Tuple[int, object]:
    """``(family, sockaddr)`` to ``connect()`` to the node *address*.

    Follows uWSGI's outgoing rules (see the module doc), except that an address
    starting with ``/`` is always a UNIX path: contains ``:`` -> IPv4
    TCP (split at the first ``:``, numeric host via ``inet_aton``, empty host =
    ``0.0.0.0``, port = the leading digits after the ``:``); ``[ipv6]:port`` ->
    IPv6 TCP (an extension); ``@name`` -> abstract UNIX ``"\\0name\\0"``; anything
    else -> UNIX path (bytes, as given).  Host names are never resolved.

    Raises :class:`AddressError` for an empty address, an invalid IPv4/IPv6
    host, a missing port or one above 65535, or a name too long for a UNIX
    socket.  ``str`` is accepted too (encoded as UTF-8).
    """
    if isinstance(address, str):
        address = address.encode("utf-8", "surrogateescape")
    if not address:
        raise AddressError(address, "empty node address")
    # A path that starts with "/" is a UNIX socket even if it contains ":" (uWSGI
    # would try TCP and fail): so --fastrouter-use-base /dir/ works for keys with a
    # port, like example.com:8000.  No TCP address can start with "/".
    colon = -1 if address[0] == 0x2F else address.find(b":")
    if colon >= 0:
        if address[0] == 0x5B:  # '['
            return _node_inet6(address)
        host = _ipv4_host(address, address[:colon])
        return socket.AF_INET, (host, _port(address, address[colon + 1 :]))
    if address[0] == 0x40:  # '@'
        if len(address) == 1:
            raise AddressError(address, "empty abstract socket name")
        sockaddr = b"\0" + address[1:] + b"\0"
        if len(sockaddr) > _SUN_PATH_MAX:
            raise AddressError(address, "abstract socket name too long")
        return socket.AF_UNIX, sockaddr
    if len(address) >= _SUN_PATH_MAX or b"\0" in address:
        raise AddressError(address, "invalid UNIX socket path")
    return socket.AF_UNIX, address


def _ipv4_host(address: bytes, host: bytes) -> str:
    if not host:
        return "0.0.0.0"
    try:
        text = host.decode("ascii")
        if not text.replace(".", "").isalnum():  # inet_aton ignores trailing junk after a space
            raise ValueError(text)
        return socket.inet_ntoa(socket.inet_aton(text))
    except (UnicodeError, ValueError, OSError):
        shown = host.decode("latin-1")
        raise AddressError(
            address, f"invalid IPv4 address {shown!r} (host names are not resolved)"
        ) from None


def _port(address: bytes, text: bytes) -> int:
    # atoi(): the leading decimal digits count, the rest is ignored.
    n = 0
    while n < len(text) and 0x30 <= text[n] <= 0x39:
        n += 1
    if n == 0:
        raise AddressError(address, "missing port")
    digits = text[:n].lstrip(b"0")
    if len(digits) > 5 or int(digits or b"0") > 65535:
        raise AddressError(address, "port out of range")
    return int(digits or b"0")


def _node_inet6(address: bytes) -> Tuple[int, object]:
    close = address.find(b"]:")
    if close < 0:
        raise AddressError(address, "expected [ipv6]:port")
    port = _port(address, address[close + 2 :])
    try:
        host = address[1:close].decode("ascii")
        infos = socket.getaddrinfo(
            host, port, socket.AF_INET6, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST
        )
    except (UnicodeError, socket.gaierror, ValueError):
        raise AddressError(address, "invalid IPv6 address") from None
    return socket.AF_INET6, infos[0][4]
