"""The subscription server: datagrams in, the subscription table and cheap mode updated.

Theory of operation
-------------------
Each ``--fastrouter-subscription-server`` address is a datagram socket (UDP when the
address has a ``:``, else a UNIX datagram socket) registered with the reactor.  On
readiness up to 64 datagrams are read, all of them before the first is applied; each is
parsed strictly (:func:`~uwsgi_fastrouter.subscription.parse_announcement`) and applied
to the :class:`~uwsgi_fastrouter.subscription.SubscriptionTable`.  Nothing is ever sent
back to the sender except the optional ``notify`` acknowledgement of uWSGI.

The steady state of a busy router is plain re-announces of known nodes.  When no
credentials are checked and nothing is forwarded
(:meth:`SubscriptionServer._refreshes_in_place`), such a datagram from a sender the
allow list (if any) accepts is applied straight
from its bytes (``SubscriptionTable.refresh_usual``, which hands every other packet
back); the result, the log and the counters are those of :meth:`SubscriptionServer.handle`
(tests/test_subserver_refresh.py compares the two paths).

Bad datagrams are dropped with a log line; the log is rate limited (a flood of garbage
cannot flood the log: after 20 lines in a second the rest are counted and summarised).
New keys refused because the table is full have a log of their own (at most one line a
second, saying how many more were refused meanwhile; nothing is formatted for the
others), so a flood of fresh keys neither floods the log nor hides other faults nor
costs more than counting (the policy for a full table is described in
:mod:`uwsgi_fastrouter.subscription`).

Order of the checks: the sender against ``--subscription-allow``
(uwsgi_fastrouter/allowlist.py; a refused sender is counted in ``refused_sources``
and logged, rate limited, and its datagram is not even parsed), parse, then the proof (the credential check here, the signature
check in the table), then the table's state and room.  What fails a check costs no
table entry.

``notify`` (docs/decisions.md D17).  A packet may name a UNIX datagram path that gets
a line when its node is created; the router may run as root, so it writes there only
for an announce that proved who sent it: a signature the table verified, or a
``--subscriptions-credentials-check`` the sender passed.  Otherwise (no check
configured, or a ``--subscriptions-sign-skip-uid`` sender, which skips the signature
check) the path is ignored, counted in ``notify_ignored`` and logged, rate limited.

Announced host names (docs/decisions.md D29).  With ``--subscription-resolve-names``
an announce whose address is ``HOST:PORT`` with a DNS name is applied once per address
of the name, as the resolver last saw it (the proof covers the packet as sent, so it
holds for each); the first announce of a name only asks for the lookup and is
dropped.  A master copies such an announce to its router processes once per address
(:meth:`SubscriptionServer._as_applied`), so they need no lookup.  Off,
the address is stored as given, as uWSGI does.

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

from . import sockets
from .addresses import address_text, host_name
from .allowlist import SourceAllowList
from .log import RateLimitedLog, log, printable
from .reactor import Reactor
from .sockets import AddressError, connect_sockaddr
from .subscription import (Announcement, SubscriptionError, SubscriptionTable, TableFull,
                           forward_announcement, parse_announcement)

_MAX_DATAGRAM = 65535 + 4
_ANNOUNCEMENT_SIZE = len(Announcement._fields)
_new_announcement = tuple.__new__
_DATAGRAMS_PER_EVENT = 64
_UCRED = struct.Struct("3i")
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
    """Bind a subscription server address (UDP when it has a ``:``, else a UNIX
    datagram socket; the rules are :mod:`~uwsgi_fastrouter.addresses`')."""
    bound = sockets.bind_datagram(spec, credentials=credentials)
    return DatagramListener(bound.sock, bound.name, bound.unix_path)


class SubscriptionServer:
    def __init__(self, reactor: Reactor, table: SubscriptionTable, listeners: Sequence[DatagramListener], *,
                 wall_clock: Callable[[], float],
                 on_node: Callable[[], None] = lambda: None,
                 on_empty: Callable[[], None] = lambda: None,
                 resubscribe: Sequence[str] = (), resubscribe_bind: Optional[str] = None,
                 own_address: bytes = b"",
                 use_credentials: bool = False,
                 credentials_check: Sequence[str] = (),
                 skip_uids: Sequence[int] = (),
                 allow: Optional[SourceAllowList] = None,
                 names=None) -> None:
        self.reactor = reactor
        #: --subscription-resolve-names: a Resolver for announced host names (None: off)
        self.names = names
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
        #: who may announce (``None``: everyone)
        self.allow = allow
        self.drop_log = RateLimitedLog(lambda: reactor.now, what="subscription log lines")
        self._full_logged = float("-inf")
        self._full_unlogged = 0
        self.notify_log = RateLimitedLog(lambda: reactor.now, burst=1,
                                         what="ignored notify paths")
        self.received = 0
        self.dropped = 0
        #: notify paths not written to because the announce was not verified
        self.notify_ignored = 0
        #: datagrams from senders ``--subscription-allow`` does not list
        self.refused_sources = 0
        # Called with (announcement, pid, uid, gid) for every accepted datagram: the
        # master copies it to the router processes (see apply_mirrored).
        self.on_accepted: Optional[Callable[[Announcement, Optional[int], Optional[int],
                                             Optional[int]], None]] = None
        # the addresses the last named announce was applied as (see _as_applied)
        self._named_applied: Optional[List[bytes]] = None
        self._resub_sock_inet: Optional[socket.socket] = None
        self._resub_sock_unix: Optional[socket.socket] = None
        # Targets are parsed now: a bad one is a start-up error, not a log line per packet.
        self._resub_targets = [(target, connect_sockaddr(target, datagram=True))
                               for target in self.resubscribe]
        if self.resubscribe:
            if resubscribe_bind:
                source = sockets.bind_datagram(resubscribe_bind).sock
                if source.family == socket.AF_UNIX:
                    source.close()
                    raise AddressError(resubscribe_bind, "the resubscribe source must be ip:port")
                self._resub_sock_inet = source
            else:
                self._resub_sock_inet = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self._resub_sock_inet.setblocking(False)
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
        if self.use_credentials and sock.family == socket.AF_UNIX:
            self._read_with_credentials(listener)
            return
        batch = self._receive(listener)
        self.received += len(batch)
        handle = self.handle
        if not self._refreshes_in_place():
            for data, sender in batch:
                handle(data, sender)
            return
        refresh = self.table.refresh_usual
        clock = self.wall_clock
        on_node = self.on_node
        copy = self.on_accepted
        copying = copy is not None
        allow = self.allow
        for data, sender in batch:
            # (a sender the allow list refuses goes to handle(), which counts and logs it)
            if (allow is None or allow.allows(sender)) and refresh(data, clock(), copying):
                on_node()
                if copying:
                    copy(parse_announcement(data), None, None, None)
            else:
                handle(data, sender)

    def _refreshes_in_place(self) -> bool:
        """Whether a plain refresh of a known node may go straight to the table
        (``SubscriptionTable.refresh_usual``; it falls back to :meth:`handle` for
        any other packet): true when no credentials are checked, nothing is
        forwarded, and addresses are not host names to resolve.  (The allow list is
        still asked about each sender, and a master still gets its copy of each, see
        :attr:`on_accepted`.)"""
        return not self.credentials_check and self.names is None and not self.resubscribe

    def _receive(self, listener: DatagramListener) -> List[tuple]:
        """Up to _DATAGRAMS_PER_EVENT ``(datagram, sender)`` pairs, as many as are
        queued.  They are all read before any is applied: the reads follow each other
        closely, so a sender blocked on the full queue is woken for a burst."""
        recvfrom = listener.sock.recvfrom
        batch: List[tuple] = []
        try:
            for _ in range(_DATAGRAMS_PER_EVENT):
                # (the bytes object is made at the largest size and shrunk in place:
                # cheaper than reading into a buffer and copying the datagram out)
                batch.append(recvfrom(_MAX_DATAGRAM + 1))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.EAGAIN):
                self._receive_failed(listener, exc)
        return batch

    def _read_with_credentials(self, listener: DatagramListener) -> None:
        """:meth:`_readable` of a UNIX socket read with ``SCM_CREDENTIALS``: the
        sender's pid/uid/gid go with each datagram."""
        sock = listener.sock
        for _ in range(_DATAGRAMS_PER_EVENT):
            pid = uid = gid = None
            try:
                data, ancdata, flags, sender = sock.recvmsg(_MAX_DATAGRAM + 1,
                                                            socket.CMSG_SPACE(_UCRED.size))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in (errno.ECONNREFUSED, errno.EAGAIN):
                    self._receive_failed(listener, exc)
                return
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == _SCM_CREDENTIALS \
                        and len(payload) >= _UCRED.size:
                    pid, uid, gid = _UCRED.unpack_from(payload)
            self.received += 1
            self.handle(data, sender, pid=pid, uid=uid, gid=gid, require_credentials=True)

    def _receive_failed(self, listener: DatagramListener, exc: OSError) -> None:
        log("[uwsgi-subscription for pid %d] recv on %s: %s"
            % (os.getpid(), listener.name, exc.strerror or exc))

    def handle(self, data: bytes, sender=None, *, pid: Optional[int] = None, uid: Optional[int] = None,
               gid: Optional[int] = None, require_credentials: bool = False) -> Optional[Announcement]:
        """Apply one datagram; returns the parsed announcement when it was accepted."""
        if self.allow is not None and not self.allow.allows(sender):
            self.refused_sources += 1
            return self._drop(sender, "the sender%s is not in --subscription-allow"
                              % (" (an unbound unix socket)" if not sender else ""))
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
        # proven: the table checks signatures of every untrusted packet, and a failed
        # credential check has dropped the packet above
        verified = bool(self.credentials_check) or (self.table.verifier is not None and not trusted)
        if not self._apply(announcement, sender, pid, uid, gid, trusted, True, verified):
            return None
        if self.on_accepted is not None:
            for accepted in self._as_applied(announcement):
                self.on_accepted(accepted, pid, uid, gid)
        if self.resubscribe:
            self._forward(announcement)
        return announcement

    def apply_mirrored(self, batch: list) -> None:
        """Apply the announcements the master accepted in one pass of its loop (D8), a
        list of ``(pid, uid, gid, fields)`` (frames.py), already parsed and checked by
        the master: no checks, no acknowledgement, no forwarding, and the key limit is
        the master's (see ``SubscriptionTable.announce``); the master logged the events,
        so the copies stay silent.  An item that is not the shape of an announcement is
        skipped."""
        self.table.quietly(self._apply_mirrored, batch)

    def _apply_mirrored(self, batch: list) -> None:
        apply = self._apply
        size = _ANNOUNCEMENT_SIZE
        for item in batch:
            try:
                pid, uid, gid, fields = item
            except (TypeError, ValueError):
                continue
            if type(fields) is not tuple or len(fields) != size:
                continue
            apply(_new_announcement(Announcement, fields), None, pid, uid, gid, True,
                  notify=False, verified=False, mirrored=True)

    def _apply(self, announcement: Announcement, sender, pid, uid, gid, trusted: bool,
               notify: bool, verified: bool, mirrored: bool = False) -> bool:
        if self.names is None:   # (then _named_applied stays None)
            return self._apply_node(announcement, sender, pid, uid, gid, trusted, notify, verified,
                                    mirrored)
        self._named_applied = None
        named = host_name(announcement.address)
        args = (pid, uid, gid, trusted, notify, verified, mirrored)
        if named is None:
            return self._apply_node(announcement, sender, *args)
        return self._apply_named(named, announcement, sender, args)

    def _apply_named(self, named, announcement: Announcement, sender, args: tuple) -> bool:
        """An announce whose address is ``HOST:PORT``: one node per address of HOST
        (the proof covers the packet as sent, so it holds for each).  Until HOST
        first resolves the announce is dropped; a later one finds the addresses."""
        name, port = named
        if not self.names.watch(name, pinned=False):
            self._drop(sender, "too many host names to resolve", announcement)
            return False
        addresses = self.names.addresses(name)
        if addresses is None:
            self._drop(sender, "host name not resolved yet (a later announce adds the node)",
                       announcement)
            return False
        applied = self._named_applied = []
        for ip in addresses:
            address = address_text(ip, port).encode("ascii")
            if self._apply_node(announcement._replace(address=address), sender, *args):
                applied.append(address)
        return bool(applied)

    def _as_applied(self, announcement: Announcement) -> List[Announcement]:
        """The announcement(s) the master copies to its router processes: for a name,
        one per address it was applied as (they need no lookup of their own)."""
        named, self._named_applied = self._named_applied, None
        if named is None:
            return [announcement]
        return [announcement._replace(address=address) for address in named]

    def _apply_node(self, announcement: Announcement, sender, pid, uid, gid, trusted: bool,
                    notify: bool, verified: bool, mirrored: bool = False) -> bool:
        table = self.table
        # Only a notify path needs to know (before the announce) whether the node is new.
        existed = notify and announcement.notify is not None and self._node_exists(announcement)
        try:
            node = table.announce(announcement, self.wall_clock(), uid=uid, gid=gid, pid=pid,
                                  trusted=trusted, mirrored=mirrored)
        except TableFull as exc:
            self._refused_for_room(exc, sender)
            return False
        except SubscriptionError as exc:
            self._drop(sender, str(exc), announcement)
            return False
        if node is not None:
            if notify and not existed and announcement.notify:
                if verified:
                    self._notify(announcement)
                else:
                    self._notify_ignored(announcement, sender)
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
            what = " (key: %s node: %s)" % (printable(announcement.key),
                                            printable(announcement.address))
        self.drop_log("[uwsgi-subscription for pid %d] dropped subscription datagram%s%s: %s"
                      % (os.getpid(), where, what, reason))
        return None

    def _refused_for_room(self, exc: TableFull, sender) -> None:
        self.dropped += 1
        now = self.reactor.now
        if now - self._full_logged < 1.0:
            self._full_unlogged += 1
            return
        more = self._full_unlogged
        log("[uwsgi-subscription for pid %d] subscription table full: %s%s%s"
            % (os.getpid(), exc, printable(_sender_text(sender)),
               " (and %d more since the last such line)" % more if more else ""))
        self._full_logged = now
        self._full_unlogged = 0

    def _notify_ignored(self, a: Announcement, sender) -> None:
        self.notify_ignored += 1
        self.notify_log("[uwsgi-subscription for pid %d] notify %s of %s => %s ignored%s: "
                        "the announce was neither signed nor credentials-checked"
                        % (os.getpid(), printable(a.notify), printable(a.key),
                           printable(a.address), printable(_sender_text(sender))))

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
        except (OSError, ValueError):
            pass
        finally:
            if own and sock is not None:
                sock.close()

    # -------------------------------------------------------------- forwarding

    def _forward(self, a: Announcement) -> None:
        if not self.resubscribe or a.forwarded:
            return
        try:
            packet = forward_announcement(a, self.own_address)
        except SubscriptionError as exc:  # e.g. SNI paths that fill the datagram
            self.drop_log("[uwsgi-subscription for pid %d] not resubscribing %s: %s"
                          % (os.getpid(), printable(a.key), exc))
            return
        for target, (family, addr) in self._resub_targets:
            sock = self._resub_sock_unix if family == socket.AF_UNIX else self._resub_sock_inet
            try:
                sock.sendto(packet, addr)
            except OSError as exc:
                self.drop_log("[uwsgi-subscription for pid %d] unable to resubscribe to %s: %s"
                              % (os.getpid(), target, exc.strerror or exc))


def _sender_text(sender) -> str:
    if isinstance(sender, tuple) and len(sender) >= 2:
        return " from %s:%s" % (sender[0], sender[1])
    if isinstance(sender, (bytes, str)) and sender:
        text = sender.decode("utf-8", "surrogateescape") if isinstance(sender, bytes) else sender
        return " from %s" % printable(text.replace("\0", "@"))
    return ""
