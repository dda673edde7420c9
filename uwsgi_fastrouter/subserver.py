"""The subscription server: datagrams in, the subscription table and cheap mode updated.

Theory of operation
-------------------
Each ``--fastrouter-subscription-server`` address is a datagram socket (UDP when the
address has a ``:``, else a UNIX datagram socket) registered with the reactor.  On
readiness up to 64 datagrams are read; each is parsed strictly
(:func:`~uwsgi_fastrouter.subscription.parse_announcement`) and applied to the
:class:`~uwsgi_fastrouter.subscription.SubscriptionTable`.  Nothing is ever sent back
to the sender except the optional ``notify`` acknowledgement of uWSGI.

Bad datagrams are dropped with a log line; the log is rate limited (a flood of garbage
cannot flood the log: after 20 lines in a second the rest are counted and summarised).

With ``--subscriptions-use-credentials`` UNIX datagrams are read with
``SCM_CREDENTIALS``; the sender's pid/uid/gid feed the credential checks and the stats.

Cheap mode and re-forwarding (``--fastrouter-resubscribe``) hang off the same path: a
subscription that produced a node wakes a cheap router; a table that became empty puts
it back to sleep; every datagram that was not itself forwarded is announced upstream
with this router's own address (decisions.md D11: forwarded ones never are).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Callable, List, Optional, Sequence

from .log import RateLimitedLog, log, printable
from .reactor import Reactor
from .sockets import AddressError, node_sockaddr
from .subscription import (Announcement, SubscriptionError, SubscriptionTable, build_announcement,
                           parse_announcement)

_MAX_DATAGRAM = 65535 + 4
_DATAGRAMS_PER_EVENT = 64
_UCRED = struct.Struct("3i")
_SO_PASSCRED = getattr(socket, "SO_PASSCRED", 16)
_SCM_CREDENTIALS = getattr(socket, "SCM_CREDENTIALS", 2)


class DatagramListener:
    """One bound subscription socket."""

    __slots__ = ("sock", "name", "unix_path")

    def __init__(self, sock: socket.socket, name: str, unix_path: Optional[str]) -> None:
        self.sock = sock
        self.name = name
        self.unix_path = unix_path

    def close(self, unlink: bool = True) -> None:
        if self.sock is None:
            return
        self.sock.close()
        self.sock = None
        if unlink and self.unix_path:
            try:
                os.unlink(self.unix_path)
            except OSError:
                pass


def bind_datagram(spec: str, *, credentials: bool = False) -> DatagramListener:
    """Bind a subscription server address (uWSGI's rule: ``:`` means UDP/IPv4)."""
    if ":" in spec:
        host, _, port_text = spec.rpartition(":")
        if not port_text.isdigit() or int(port_text) > 65535:
            raise AddressError(spec, "invalid port")
        host = host or "0.0.0.0"
        try:
            infos = socket.getaddrinfo(host, int(port_text), socket.AF_INET, socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise AddressError(spec, "cannot resolve host: %s" % exc)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind(infos[0][4])
        except OSError as exc:
            sock.close()
            raise AddressError(spec, "cannot bind: %s" % (exc.strerror or exc))
        sock.setblocking(False)
        bound_host, bound_port = sock.getsockname()[:2]
        name = "%s:%d" % ("" if spec.startswith(":") else host, bound_port)
        return DatagramListener(sock, name, None)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = spec
    unix_path = None
    if spec.startswith("@"):
        path = "\0" + spec[1:] + "\0"
    else:
        try:
            if os.path.exists(spec):
                import stat
                if not stat.S_ISSOCK(os.stat(spec).st_mode):
                    sock.close()
                    raise AddressError(spec, "path exists and is not a socket")
                os.unlink(spec)
        except OSError as exc:
            sock.close()
            raise AddressError(spec, "cannot remove the stale socket: %s" % (exc.strerror or exc))
        unix_path = spec
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise AddressError(spec, "cannot bind: %s" % (exc.strerror or exc))
    if credentials:
        sock.setsockopt(socket.SOL_SOCKET, _SO_PASSCRED, 1)
    sock.setblocking(False)
    return DatagramListener(sock, spec, unix_path)


class SubscriptionServer:
    def __init__(self, reactor: Reactor, table: SubscriptionTable, listeners: Sequence[DatagramListener], *,
                 wall_clock: Callable[[], float],
                 on_node: Callable[[], None] = lambda: None,
                 on_empty: Callable[[], None] = lambda: None,
                 resubscribe: Sequence[str] = (), resubscribe_bind: Optional[str] = None,
                 own_address: bytes = b"",
                 use_credentials: bool = False,
                 credentials_check: Sequence[str] = (),
                 skip_uids: Sequence[int] = ()) -> None:
        self.reactor = reactor
        self.table = table
        self.listeners = list(listeners)
        self.wall_clock = wall_clock
        self.on_node = on_node
        self.on_empty = on_empty
        self.resubscribe = list(resubscribe)
        self.own_address = own_address
        self.use_credentials = use_credentials
        self.credentials_check = list(credentials_check)
        self.skip_uids = {u for u in skip_uids if u > 0}
        self.drop_log = RateLimitedLog(lambda: reactor.now, what="subscription log lines")
        self.received = 0
        self.dropped = 0
        # Called with (datagram, pid, uid, gid) for every accepted datagram: the
        # master copies it to the sibling router processes.
        self.on_accepted: Optional[Callable[[bytes, Optional[int], Optional[int], Optional[int]], None]] = None
        self._buf = bytearray(_MAX_DATAGRAM + 1)
        self._resub_sock_inet: Optional[socket.socket] = None
        self._resub_sock_unix: Optional[socket.socket] = None
        if self.resubscribe:
            inet = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            if resubscribe_bind:
                host, _, port = resubscribe_bind.rpartition(":")
                try:
                    inet.bind((host or "0.0.0.0", int(port)))
                except (OSError, ValueError) as exc:
                    inet.close()
                    raise AddressError(resubscribe_bind, "cannot bind: %s" % exc)
            inet.setblocking(False)
            self._resub_sock_inet = inet
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            unix.setblocking(False)
            self._resub_sock_unix = unix

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        for listener in self.listeners:
            self.reactor.add_reader(listener.sock.fileno(), lambda l=listener: self._readable(l))

    def stop(self) -> None:
        for listener in self.listeners:
            if listener.sock is not None:
                self.reactor.remove_reader(listener.sock.fileno())
        for sock in (self._resub_sock_inet, self._resub_sock_unix):
            if sock is not None:
                sock.close()
        self._resub_sock_inet = self._resub_sock_unix = None

    # ------------------------------------------------------------------ input

    def _readable(self, listener: DatagramListener) -> None:
        sock = listener.sock
        creds_wanted = self.use_credentials and sock.family == socket.AF_UNIX
        for _ in range(_DATAGRAMS_PER_EVENT):
            pid = uid = gid = None
            try:
                if creds_wanted:
                    data, ancdata, flags, sender = sock.recvmsg(_MAX_DATAGRAM + 1,
                                                                socket.CMSG_SPACE(_UCRED.size))
                    for level, kind, payload in ancdata:
                        if level == socket.SOL_SOCKET and kind == _SCM_CREDENTIALS \
                                and len(payload) >= _UCRED.size:
                            pid, uid, gid = _UCRED.unpack_from(payload)
                else:
                    n, sender = sock.recvfrom_into(self._buf)
                    data = bytes(self._buf[:n])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.EAGAIN):
                    return
                log("[uwsgi-subscription for pid %d] recv on %s: %s"
                    % (os.getpid(), listener.name, exc.strerror or exc))
                return
            self.received += 1
            self.handle(data, sender, pid=pid, uid=uid, gid=gid, require_credentials=creds_wanted)

    def handle(self, data: bytes, sender=None, *, pid: Optional[int] = None, uid: Optional[int] = None,
               gid: Optional[int] = None, require_credentials: bool = False) -> Optional[Announcement]:
        """Apply one datagram; returns the parsed announcement when it was accepted."""
        if len(data) > _MAX_DATAGRAM:
            return self._drop(sender, "datagram larger than %d bytes" % _MAX_DATAGRAM)
        try:
            announcement = parse_announcement(data)
        except SubscriptionError as exc:
            return self._drop(sender, str(exc))
        if require_credentials and uid is None:
            return self._drop(sender, "no credentials attached", announcement)
        if self.credentials_check and not self._credentials_ok(announcement.key, uid, gid):
            return self._drop(sender, "credentials of uid %s gid %s do not match any of %s"
                              % (uid, gid, ", ".join(self.credentials_check)), announcement)
        trusted = uid is not None and uid in self.skip_uids
        if not self._apply(announcement, sender, pid, uid, gid, trusted, notify=True):
            return None
        if self.on_accepted is not None:
            self.on_accepted(data, pid, uid, gid)
        self._forward(announcement)
        return announcement

    def apply_trusted(self, data: bytes, pid: Optional[int] = None, uid: Optional[int] = None,
                      gid: Optional[int] = None) -> None:
        """Apply a datagram another router process already accepted (D8): no checks,
        no acknowledgement, no forwarding (the receiving process did those)."""
        try:
            announcement = parse_announcement(data)
        except SubscriptionError:
            return
        self._apply(announcement, None, pid, uid, gid, True, notify=False)

    def _apply(self, announcement: Announcement, sender, pid, uid, gid, trusted: bool,
               notify: bool) -> bool:
        table = self.table
        existed = self._node_exists(announcement)
        try:
            node = table.announce(announcement, self.wall_clock(), uid=uid, gid=gid, pid=pid,
                                  trusted=trusted)
        except SubscriptionError as exc:
            self._drop(sender, str(exc), announcement)
            return False
        if node is not None:
            if notify and not existed and announcement.notify:
                self._notify(announcement)
            self.on_node()
        elif table.empty:
            self.on_empty()
        return True

    def _node_exists(self, a: Announcement) -> bool:
        pool = self.table.pool(a.key)
        if pool is None:
            return False
        return any(node.name == a.address for node in pool.nodes)

    def _credentials_ok(self, key: bytes, uid: Optional[int], gid: Optional[int]) -> bool:
        if uid is None or gid is None:
            return False
        name = key.decode("utf-8", "surrogateescape")
        for prefix in self.credentials_check:
            try:
                st = os.stat(prefix + name)
            except (OSError, ValueError):
                continue
            if st.st_uid == uid and st.st_gid == gid:
                return True
        return False

    def _drop(self, sender, reason: str, announcement: Optional[Announcement] = None):
        self.dropped += 1
        where = _sender_text(sender)
        what = ""
        if announcement is not None:
            what = " (key: %s node: %s)" % (announcement.key.decode("utf-8", "replace"),
                                            announcement.address.decode("utf-8", "replace"))
        self.drop_log("[uwsgi-subscription for pid %d] dropped subscription datagram%s%s: %s"
                      % (os.getpid(), where, what, reason))
        return None

    def _notify(self, a: Announcement) -> None:
        path = a.notify
        message = b"[subscription ack] " + a.key + b" => new node: " + a.address
        sock = self._resub_sock_unix
        own = sock is None
        try:
            if own:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)
            sock.sendto(message, path)
        except OSError:
            pass
        finally:
            if own and sock is not None:
                sock.close()

    # -------------------------------------------------------------- forwarding

    def _forward(self, a: Announcement) -> None:
        if not self.resubscribe or a.forwarded:
            return
        try:
            packet = build_announcement(
                a.key, self.own_address, modifier1=a.modifier1, modifier2=a.modifier2,
                unsubscribe=a.unsubscribe, sni_key=a.sni_key, sni_crt=a.sni_crt, sni_ca=a.sni_ca,
                forwarded=True)
        except SubscriptionError as exc:  # e.g. SNI paths that fill the datagram
            self.drop_log("[uwsgi-subscription for pid %d] not resubscribing %s: %s"
                          % (os.getpid(), printable(a.key), exc))
            return
        for target in self.resubscribe:
            try:
                if ":" in target and not target.startswith("/"):
                    family, addr = node_sockaddr(target.encode())
                    self._resub_sock_inet.sendto(packet, addr)
                else:
                    self._resub_sock_unix.sendto(packet, target)
            except (OSError, AddressError) as exc:
                self.drop_log("[uwsgi-subscription for pid %d] unable to resubscribe to %s: %s"
                              % (os.getpid(), target, getattr(exc, "strerror", None) or exc))


def _sender_text(sender) -> str:
    if isinstance(sender, tuple) and len(sender) >= 2:
        return " from %s:%s" % (sender[0], sender[1])
    if isinstance(sender, (bytes, str)) and sender:
        text = sender.decode("utf-8", "replace") if isinstance(sender, bytes) else sender
        return " from %s" % text.replace("\0", "@")
    return ""
