"""Sockets for addresses: binding listeners and servers, reaching nodes.

Theory of operation
-------------------
What an address means is decided in one place, :mod:`uwsgi_fastrouter.addresses`
(uWSGI's rules, for both directions and both socket types); this module does the
I/O that follows from it.

*Binding* (:func:`bind_listener` for ``--fastrouter``/``--socket``/shared sockets,
:func:`bind_stream_server` for the stats and zerg servers, :func:`bind_datagram` for
subscription servers) happens once at start-up, so it may block (a host name is
resolved, IPv4 preferred) and fails loudly with an :class:`AddressError` naming the
address.  A UNIX socket file left behind by an earlier run is removed first; a file
that is not a socket is never removed.  ``fd://N`` adopts an inherited listening
descriptor.  Every socket is non-blocking and close-on-exec.

*Reaching* (:func:`node_sockaddr` for nodes, :func:`connect_sockaddr` for the
rest) never blocks: no name is ever resolved.  ``node_sockaddr`` runs once per
proxied request and is memoised.

UNIX paths of nodes are kept as the raw bytes they arrived as (the kernel takes
bytes); listener paths are ``str`` as given on the command line.
"""

from __future__ import annotations

import functools
import os
import socket
import stat
from typing import Optional, Tuple

from .addresses import FD, INET, INET6, NAME, SHARED, UNIX, Address, AddressError
from .addresses import parse_bind, parse_connect

__all__ = [
    "AddressError",
    "Listener",
    "bind_datagram",
    "bind_listener",
    "bind_sibling",
    "bind_stream_server",
    "has_reuse_port",
    "connect_sockaddr",
    "node_sockaddr",
    "sockname",
]

_FAMILIES = {INET: socket.AF_INET, INET6: socket.AF_INET6}
if hasattr(socket, "AF_UNIX"):
    _FAMILIES[UNIX] = socket.AF_UNIX


# ---------------------------------------------------------------------------
# Listeners


class Listener:
    """One bound (listening, for a stream), non-blocking, close-on-exec socket.

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
    reuse_port: bool = False,
) -> Listener:
    """Bind and listen on *spec* (a ``--fastrouter`` value, see the module doc).

    *backlog* is the ``listen()`` backlog, *chmod* the mode applied to a UNIX
    socket file, *abstract_all* binds every UNIX path as an abstract name (the
    name stays as given), *defer_accept* > 0 sets ``TCP_DEFER_ACCEPT`` (Linux)
    on TCP listeners, *reuse_port* sets ``SO_REUSEPORT`` on a TCP listener
    before it is bound (so that :func:`bind_sibling` can bind the same address).

    Raises :class:`AddressError` for anything that cannot be bound, including
    ``=N`` shared sockets (the caller resolves those to a socket it holds).
    """
    address = parse_bind(spec, abstract_all=abstract_all)
    if address.kind == FD:
        return _adopt_fd(spec, address.sockaddr)
    if address.kind == SHARED:
        raise AddressError(spec, "a shared socket (=N) cannot be used here")
    return _bind(address, socket.SOCK_STREAM, backlog=backlog, chmod=chmod,
                 defer_accept=defer_accept, reuse_port=reuse_port)


def has_reuse_port() -> bool:
    """Whether this platform has ``SO_REUSEPORT``."""
    return hasattr(socket, "SO_REUSEPORT")


def bind_sibling(listener: Listener, *, backlog: int = 100, defer_accept: int = 0) -> Listener:
    """One more TCP listening socket on the exact address *listener* is bound to (its
    real port and address, not its spec), with ``SO_REUSEPORT``: the kernel then
    spreads new connections over the two sockets, each with its own queue.
    *listener* must have been bound with ``reuse_port`` (by this user)."""
    sock = socket.socket(listener.sock.family, socket.SOCK_STREAM)
    try:
        _set_stream_options(sock, defer_accept, reuse_port=True)
        try:
            sock.bind(listener.sock.getsockname())
        except OSError as exc:
            raise _os_error(listener.name, "bind a second socket with SO_REUSEPORT", exc) from exc
        _start_listening(sock, listener.name, socket.SOCK_STREAM, backlog)
    except BaseException:
        sock.close()
        raise
    return Listener(sock, listener.name)


def bind_stream_server(spec: str, *, backlog: int = 100) -> Listener:
    """Bind a plain stream server (the stats and zerg servers): no deferred accept,
    so a client is served as soon as it connects; ``@name`` is abstract."""
    return bind_listener(spec, backlog=backlog, defer_accept=0)


def bind_datagram(spec: str, *, credentials: bool = False) -> Listener:
    """Bind a datagram socket (a subscription server): UDP, or a UNIX datagram socket
    at a path (``@x`` being the file ``@x``, as in uWSGI).  With *credentials*, a UNIX
    socket gets ``SO_PASSCRED`` (Linux)."""
    address = parse_bind(spec, datagram=True)
    listener = _bind(address, socket.SOCK_DGRAM)
    if credentials and address.kind == UNIX and hasattr(socket, "SO_PASSCRED"):
        listener.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    return listener


def _os_error(spec: str, action: str, exc: OSError) -> AddressError:
    return AddressError(spec, f"cannot {action}: {exc.strerror or exc}")


def _adopt_fd(spec: str, fd: int) -> Listener:
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


def _bind(address: Address, kind: int, *, backlog: int = 0, chmod: Optional[int] = None,
          defer_accept: int = 0, reuse_port: bool = False) -> Listener:
    """Bind *address* on a new socket of type *kind*; listen if it is a stream."""
    if address.kind == UNIX:
        return _bind_unix(address, kind, backlog, chmod)
    spec = address.text
    family, sockaddr = _bind_sockaddr(address, kind)
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            _set_stream_options(sock, defer_accept, reuse_port)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            raise _os_error(spec, "bind", exc) from exc
        _start_listening(sock, spec, kind, backlog)
    except BaseException:
        sock.close()
        raise
    name = spec
    if sockaddr[1] == 0:
        name = f"{spec[: spec.rfind(':')]}:{sock.getsockname()[1]}"
    return Listener(sock, name)


def _set_stream_options(sock: socket.socket, defer_accept: int, reuse_port: bool) -> None:
    """What a TCP listener gets before ``bind()``."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port and has_reuse_port():   # --reuse-port without it: logged at start-up
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if defer_accept > 0 and hasattr(socket, "TCP_DEFER_ACCEPT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, defer_accept)


def _bind_sockaddr(address: Address, kind: int) -> Tuple[int, object]:
    """``(family, sockaddr)`` to bind an IP *address*; a host name is resolved here."""
    spec = address.text
    if address.kind == INET:
        return socket.AF_INET, address.sockaddr
    if address.kind == INET6:
        return socket.AF_INET6, _inet6_sockaddr(address, kind)
    assert address.kind == NAME, address
    host, port = address.sockaddr
    try:
        infos = socket.getaddrinfo(host, port, 0, kind)
    except (socket.gaierror, UnicodeError) as exc:
        raise AddressError(spec, f"cannot resolve {host!r}: {exc}") from exc
    infos = [i for i in infos if i[0] in (socket.AF_INET, socket.AF_INET6)]
    if not infos:
        raise AddressError(spec, f"no IPv4/IPv6 address for {host!r}")
    infos.sort(key=lambda i: i[0] != socket.AF_INET)  # IPv4 first, stable
    return infos[0][0], infos[0][4]


def _inet6_sockaddr(address: Address, kind: int) -> object:
    """The full IPv6 sockaddr (a ``%scope`` becomes its interface index); never blocks."""
    host, port = address.sockaddr[:2]
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET6, kind, 0, socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError):
        raise AddressError(address.text, f"invalid IPv6 address {host!r}") from None
    return infos[0][4]


def _start_listening(sock: socket.socket, spec: str, kind: int, backlog: int) -> None:
    """The last step of every bind: listen (a stream), then non-blocking."""
    if kind == socket.SOCK_STREAM:
        try:
            sock.listen(backlog)
        except OSError as exc:
            raise _os_error(spec, "listen", exc) from exc
    sock.setblocking(False)


def _bind_unix(address: Address, kind: int, backlog: int, chmod: Optional[int]) -> Listener:
    spec = address.text
    if not hasattr(socket, "AF_UNIX"):  # pragma: no cover - not Linux/BSD
        raise AddressError(spec, "UNIX sockets are not available on this platform")
    path = address.path
    if path is not None:
        _remove_stale(spec, path)
    sock = socket.socket(socket.AF_UNIX, kind)
    file_id = None
    unix_path = None
    try:
        try:
            sock.bind(address.sockaddr)
        except OSError as exc:
            raise _os_error(spec, "bind", exc) from exc
        if path is not None:
            unix_path = os.path.abspath(os.fsdecode(path))
            st = os.stat(path)
            file_id = (st.st_dev, st.st_ino)
            if chmod is not None:
                try:
                    os.chmod(path, chmod)
                except OSError as exc:
                    raise _os_error(spec, "chmod", exc) from exc
        _start_listening(sock, spec, kind, backlog)
    except BaseException:
        sock.close()
        if file_id is not None:
            _unlink_quietly(path)
        raise
    return Listener(sock, spec, unix_path, file_id)


def _remove_stale(spec: str, path: bytes) -> None:
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


def _unlink_quietly(path: bytes) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# ---------------------------------------------------------------------------
# Addresses to reach


@functools.lru_cache(maxsize=4096)
def node_sockaddr(address: bytes) -> Tuple[int, object]:
    """``(family, sockaddr)`` to ``connect()`` a stream socket to the node *address*.

    The rules are :func:`uwsgi_fastrouter.addresses.parse_connect`'s: IPv4 literals
    only (``127.1`` and an empty host work, names are never resolved), the port is
    ``atoi`` of what follows the first ``:``, ``[ipv6]:port``, ``@name`` is the
    abstract ``"\\0name\\0"``, and a path is anything that starts with ``/``, has no
    ``:``, or has a ``/`` before its first ``:``.  Memoised: it runs for every
    proxied request.

    Raises :class:`AddressError`.  ``str`` is accepted too (encoded as UTF-8).
    """
    if isinstance(address, str):
        address = address.encode("utf-8", "surrogateescape")
    return connect_sockaddr(address)


def connect_sockaddr(address, *, datagram: bool = False) -> Tuple[int, object]:
    """``(family, sockaddr)`` to reach *address* (``str`` or ``bytes``) with a stream
    socket, or with a datagram socket when *datagram* (``@x`` is then the file
    ``@x``).  Never blocks.  Raises :class:`AddressError`."""
    parsed = parse_connect(address, datagram=datagram)
    if parsed.kind == INET6:
        kind = socket.SOCK_DGRAM if datagram else socket.SOCK_STREAM
        return socket.AF_INET6, _inet6_sockaddr(parsed, kind)
    family = _FAMILIES.get(parsed.kind)
    if family is None:  # pragma: no cover - AF_UNIX missing on this platform
        raise AddressError(address, "UNIX sockets are not available on this platform")
    return family, parsed.sockaddr
