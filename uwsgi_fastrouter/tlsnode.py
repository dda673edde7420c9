"""TLS to nodes: which nodes are reached over TLS, and one TLS connection to a node.

Theory of operation
-------------------
:class:`NodeTls` is the policy of one router process.  A node is reached over TLS
when its address is listed with ``--fastrouter-tls-node`` (static, fallback or mapper
addresses, compared as written), or when it subscribed announcing the protocol
letter ``s`` (uWSGI 2.1's TLS sockets announce it; 2.1 routers store it and still
speak plain uwsgi to such nodes, 2.0 routers ignore it).  Certificates are checked against
``--fastrouter-tls-ca`` (else the system's trusted CAs) unless
``--fastrouter-tls-no-verify``; the node's name is checked, and sent as SNI, only when
``--fastrouter-tls-server-name`` is given (nodes are usually IP addresses).

:class:`TlsLink` is one connection, driven by the session's readiness callbacks and
never blocking:

1. The TCP connect completes (the socket is writable, ``SO_ERROR`` is 0), then the
   socket is wrapped and :meth:`TlsLink.handshake` is called on every readiness event
   until it returns 0; it returns READ or WRITE, the readiness it waits for.  A
   failed handshake (verification included) raises ``ssl.SSLError``: the session
   counts it as a failed connect, so retries and fallbacks apply.
2. :meth:`TlsLink.send` writes all or nothing (OpenSSL without partial writes); a
   write that must wait raises ``BlockingIOError`` and is retried later with the
   same bytes, as OpenSSL requires.
3. :meth:`TlsLink.recv_into` has the socket's signature, including the two flags the
   session's relay uses.  TLS cannot peek into the kernel, so ``MSG_PEEK`` reads
   (decrypts) for real and keeps what the client has not taken yet: ``MSG_TRUNC``
   then drops what it took and holds the rest (a copy) for the next peek; when the
   client took nothing, :meth:`TlsLink.none_taken` holds it all.  The relay calls
   one of the two after every peek, before the read buffer is used again.  One read
   decrypts at most :data:`READ_LIMIT` (64 KiB: the records that have arrived), so a
   client that stops reading costs the router at most that much held here plus the
   part of a record OpenSSL may hold: about 80 KiB per client (16 KiB on plain
   nodes, see session.py).
4. Decrypted bytes OpenSSL keeps after a read (``pending()``) and the held bytes
   are invisible to the selector: when a read leaves any, the link asks the loop to
   call the session's ``on_buffered`` once the current pass is over, so they are
   relayed without waiting for the node to send more.

The client's end of stream is not passed on (no ``shutdown`` on a TLS node): a uwsgi
request carries its ``CONTENT_LENGTH``, so the node does not wait for it
(docs/decisions.md).  Descriptors are never passed to a TLS node.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Callable, FrozenSet, Iterable, Optional

from .reactor import READ, WRITE

#: The announced protocol letter of a node that speaks uwsgi over TLS.
TLS_PROTO = b"s"

#: A TLS record's plaintext, at most.
RECORD = 16 * 1024

#: The most one relay read decrypts (records that have fully arrived, one after the
#: other): what a client that stops reading can leave held in the router.
READ_LIMIT = 64 * 1024

#: The most one write of a buffered body file hands to OpenSSL.
FILE_PIECE = 64 * 1024

_MSG_PEEK = socket.MSG_PEEK
_MSG_TRUNC = getattr(socket, "MSG_TRUNC", 0)
# The stdlib ssl module is imported at the first use (a TLS context, a TLS failure):
# loading OpenSSL costs every process about 1.5 MiB, and most never reach a TLS node.
if TYPE_CHECKING:  # pragma: no cover
    import ssl
else:
    ssl = None
_WANT: tuple = ()


def _load_ssl():
    global ssl, _WANT
    if ssl is None:
        import ssl as module
        _WANT = (module.SSLWantReadError, module.SSLWantWriteError)
        ssl = module
    return ssl


class TlsSetupError(ValueError):
    """The TLS options cannot make a client context (unreadable or bad files)."""


def client_context(cafile: Optional[str] = None, certfile: Optional[str] = None,
                   keyfile: Optional[str] = None, verify: bool = True,
                   server_name: Optional[str] = None) -> ssl.SSLContext:
    """The client context for nodes; :class:`TlsSetupError` says which file is wrong."""
    _load_ssl()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify:
        context.check_hostname = server_name is not None
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            if cafile:
                context.load_verify_locations(cafile=cafile)
            else:
                context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        except (OSError, ssl.SSLError) as exc:
            raise TlsSetupError("unable to load the CA file %s: %s" % (cafile, _reason(exc)))
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if certfile:
        try:
            context.load_cert_chain(certfile, keyfile or None)
        except (OSError, ssl.SSLError) as exc:
            raise TlsSetupError("unable to load the client certificate %s%s: %s"
                                % (certfile, " with key %s" % keyfile if keyfile else "", _reason(exc)))
    return context


def _reason(exc: BaseException) -> str:
    _load_ssl()
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.verify_message if getattr(exc, "verify_message", None) else exc.reason)
    return getattr(exc, "strerror", None) or str(exc)


def failure_reason(exc: BaseException) -> str:
    """A short reason for a failed TLS connection, for the node failure line."""
    _load_ssl()
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "TLS certificate verification failed: %s" % (exc.verify_message or exc.reason)
    if isinstance(exc, ssl.SSLError):
        return "TLS handshake failed: %s" % (exc.reason or exc)
    return getattr(exc, "strerror", None) or str(exc)


class NodeTls:
    """Which nodes are reached over TLS, and with what context (module docstring)."""

    __slots__ = ("addresses", "configured", "server_name", "_make_context", "_context")

    def __init__(self, make_context: Callable[[], ssl.SSLContext],
                 addresses: Iterable[bytes] = (), server_name: Optional[str] = None) -> None:
        self.addresses: FrozenSet[bytes] = frozenset(addresses)
        self.configured = self.addresses      # as written (host names included)
        self.server_name = server_name
        self._make_context = make_context
        self._context: Optional[ssl.SSLContext] = None   # made at the first TLS node

    def resolve(self, addresses_of: Callable[[bytes], Iterable[bytes]]) -> None:
        """A ``--fastrouter-tls-node HOST:PORT`` also covers every address the name has
        now (names.py): routes carry the resolved addresses.  *addresses_of* maps one
        configured address to what it stands for (itself for a literal)."""
        resolved = set(self.configured)
        for address in self.configured:
            resolved.update(addresses_of(address))
        self.addresses = frozenset(resolved)

    def wanted(self, route) -> bool:
        """True when *route* goes to a TLS node."""
        if route.address in self.addresses:
            return True
        return getattr(route.node, "proto", None) == TLS_PROTO

    def use_context(self, context: ssl.SSLContext) -> None:
        self._context = context

    @property
    def context(self) -> ssl.SSLContext:
        context = self._context
        if context is None:
            context = self._context = self._make_context()
        return context

    def link(self, sock: socket.socket, reactor, on_buffered: Callable[[], None]) -> "TlsLink":
        """A link for *sock*, whose non-blocking connect is under way."""
        return TlsLink(sock, self.context, self.server_name, reactor, on_buffered)


class TlsLink:
    """One TLS connection to a node, with the socket methods the session's relay uses."""

    __slots__ = ("raw", "tls", "context", "server_name", "reactor", "on_buffered", "held",
                 "peeked", "piece", "scheduled", "family")

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_name: Optional[str],
                 reactor, on_buffered: Callable[[], None]) -> None:
        _load_ssl()
        self.raw: Optional[socket.socket] = sock
        self.tls: Optional[ssl.SSLSocket] = None
        self.context = context
        self.server_name = server_name
        self.reactor = reactor
        self.on_buffered = on_buffered
        self.family = sock.family
        self.held: Optional[memoryview] = None   # decrypted bytes the client has not taken
        self.peeked = None                       # (buffer, count) of the last fresh peek
        self.piece: Optional[bytes] = None       # a body file piece OpenSSL must see again
        self.scheduled = False

    def fileno(self) -> int:
        sock = self.tls if self.tls is not None else self.raw
        return sock.fileno() if sock is not None else -1

    # ------------------------------------------------------------- handshake

    def handshake(self) -> int:
        """Advance the connection: 0 once the handshake is done, else READ or WRITE
        (what to wait for).  OSError (ssl.SSLError included) when it failed."""
        tls = self.tls
        if tls is None:
            err = self.raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            tls = self.tls = self.context.wrap_socket(
                self.raw, server_side=False, do_handshake_on_connect=False,
                server_hostname=self.server_name)
            self.raw = None          # detached by wrap_socket
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            return READ
        except ssl.SSLWantWriteError:
            return WRITE
        return 0

    # ------------------------------------------------------------------ relay

    def send(self, data) -> int:
        try:
            return self.tls.send(data)
        except _WANT:
            raise BlockingIOError("TLS write would block")

    def recv(self, nbytes: int) -> bytes:
        """Up to *nbytes* decrypted bytes (a real read, as ``socket.recv``)."""
        buf = bytearray(nbytes)
        return bytes(memoryview(buf)[:self.recv_into(buf, nbytes)])

    def recv_into(self, buf, nbytes: int = 0, flags: int = 0) -> int:
        if flags & _MSG_TRUNC:
            return self._drop(nbytes)
        held = self.held
        if held is not None:
            count = min(nbytes, len(held))
            buf[:count] = held[:count]
            if not flags & _MSG_PEEK:
                self._drop(count)
            return count
        count = self._read(buf, min(nbytes, READ_LIMIT) if nbytes else RECORD)
        if flags & _MSG_PEEK:
            self.peeked = (buf, count)
        if count and not self.scheduled and self.tls.pending():
            self._schedule()
        return count

    def _read(self, buf, limit: int) -> int:
        """Decrypt up to *limit* bytes into *buf*, record after record, as long as
        OpenSSL can go on without waiting.  A failure after some bytes is left to the
        next read (OpenSSL reports it again)."""
        tls = self.tls
        try:
            count = tls.recv_into(buf, limit)
        except _WANT:
            raise BlockingIOError("TLS read would block")
        if count and count < limit:
            view = memoryview(buf)
            while count < limit:
                try:
                    n = tls.recv_into(view[count:], limit - count)
                except OSError:
                    break
                if not n:
                    break
                count += n
        return count

    def _drop(self, count: int) -> int:
        """The client took *count* peeked bytes: forget them, hold the rest."""
        held = self.held
        if held is not None:
            rest = held[count:]
        elif self.peeked is not None:
            buf, peeked = self.peeked
            self.peeked = None
            rest = memoryview(bytes(buf[count:peeked])) if count < peeked else None
        else:
            rest = None
        # Held bytes are relayed when the client is writable again (session.py).
        self.held = rest if rest is not None and len(rest) else None
        return count

    def none_taken(self) -> None:
        """The client took none of the bytes of the last peek: hold them all."""
        self._drop(0)

    def buffered(self) -> bool:
        """True when decrypted bytes wait here or in OpenSSL (the selector cannot see them)."""
        return self.held is not None or (self.tls is not None and self.tls.pending() > 0)

    def _schedule(self) -> None:
        self.scheduled = True
        self.reactor.call_soon(self._run_buffered)

    def _run_buffered(self) -> None:
        self.scheduled = False
        if self.tls is not None and self.buffered():
            self.on_buffered()

    def send_file(self, body) -> int:
        """The next piece of a post-buffered body file (bodybuffer.py), which
        ``sendfile`` cannot encrypt; the bytes sent, 0 if the file is short."""
        piece = self.piece
        if piece is None:
            piece = os.pread(body.file.fileno(), min(body.size - body.sent, FILE_PIECE), body.sent)
            if not piece:
                return 0
        try:
            sent = self.send(piece)
        except BlockingIOError:
            self.piece = piece       # OpenSSL wants the same bytes again
            raise
        self.piece = None
        body.sent += sent
        return sent

    # ----------------------------------------------------------------- closing

    def shutdown(self, how: int) -> None:
        """The client's end of stream is not relayed to a TLS node (module docstring)."""

    def close(self) -> None:
        sock = self.tls if self.tls is not None else self.raw
        self.tls = self.raw = None
        self.held = self.peeked = self.piece = None
        if sock is not None:
            sock.close()
