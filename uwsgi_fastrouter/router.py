"""Key -> node: the mappers, static nodes with their grace marks, and the fallback list.

Theory of operation
-------------------
Exactly one mapper is active per router (uWSGI's fixed priority, docs/behaviour.md, "Mappers"):
``--fastrouter-use-cache`` > ``--fastrouter-use-pattern`` > subscriptions >
``--fastrouter-use-base`` > ``--fastrouter-use-code-string`` > ``--fastrouter-use-socket``
> ``--fastrouter-to``; with
none of them every request is closed once its vars are read.  A mapper turns a key
into a :class:`Route` (address bytes plus the modifier1/modifier2 to write into the
forwarded header) or ``None`` ("no route").

Static nodes (``--fastrouter-to``) are a round robin shared by all keys, with a cursor
that survives between requests.  A node whose connect failed is skipped for
``--fastrouter-gracetime`` seconds; it is only revived when the cursor lands on it after
the grace time (uWSGI's rule), so a dead node costs one failed connect per grace period.

A ``--fastrouter-to`` or ``--fastrouter-fallback`` entry that is ``HOST:PORT`` with a
host name stands for one node per address of the name (:meth:`Router.resolve_names`,
called with the resolver's answers; docs/decisions.md D28); until the name resolves it
is a node whose connects fail at once (no lookup), so the usual dead-node rules apply.
The lists are rebuilt in place when an answer changes; the request path itself is
unchanged and never waits for a lookup.

Retries are decided here too: the session asks the mapper (:meth:`Router.route`) for the
first attempt, :meth:`Router.route_unknown_key` when it has none
(``--fastrouter-fallback-on-no-key`` turns "no route" into the first fallback entry) and, after a failed connect, :meth:`Router.next_route` for the next
one, which is the next ``--fastrouter-fallback`` entry if a fallback list exists, else
the mapper again.  At most ``--fastrouter-max-retries`` (default 3, uWSGI 2.0's fixed
value) retries follow the first attempt.  A UNIX node whose listen queue is full is
busy, not dead: :meth:`Router.busy_backoff` says when to try it again, or that it now
counts as a failed connect.

With ``--fastrouter-node-max-conns`` (nodecaps.py) every mapper that keeps node records
skips the nodes that hold their cap of requests; the in-flight count is the node's
``ref``, taken when a lookup returns the node and given back exactly once by
:meth:`Router.release` or :meth:`Router.connect_failed`, which also offer the freed
slot to the requests waiting for one (:attr:`Router.waiting`).

Time is a parameter: every call that marks or revives takes ``now`` (wall-clock
seconds, because the stats show the grace mark as a unix timestamp).

Keys as file names
------------------
``--fastrouter-use-pattern`` and ``--fastrouter-use-base`` paste the client's key into
a node address, usually a UNIX socket path.  A key is a client's bytes, so before it
becomes part of a path it must be one plain file name: no ``/`` (it would leave the
directory), no NUL (it would cut the path short), no control byte or DEL, and not
``.`` or ``..``.  Any other key is "no route" for these two mappers, exactly like an
unknown key elsewhere (``--fastrouter-fallback-on-no-key`` still sends it to the
fallback list), and is logged, rate-limited, with the key escaped
(docs/decisions.md D14).  Nothing is connected, so no client descriptor can be
passed to such a path either.  A key set with ``--fastrouter-force-key`` is the
operator's, not a client's, and is used as given.
"""

from __future__ import annotations

import random
import re
import time
from typing import Callable, List, Optional, Sequence, Tuple

from .balancing import mount_key
from .log import RateLimitedLog, log, printable
from .names import expand, names_in
from .nodecaps import NodeCaps, Waiting

# A UNIX node whose listen queue is full (connect gives EAGAIN) is busy, not dead: it is
# tried again after a delay that starts here and doubles up to BUSY_MAX_DELAY, for at
# most --fastrouter-timeout from the first attempt.  A fixed short delay made hundreds
# of clients waiting for one busy node cost a whole CPU and slowed every other key.
# Each wait is the delay less a random part of up to BUSY_JITTER of it, so clients that
# started waiting together spread out instead of trying again all at once (a stall for
# every other client); and it ends on the next multiple of BUSY_TICK, so the loop wakes
# up at most 1/BUSY_TICK times a second for them however many wait (wake-ups cost more
# than the attempts).
BUSY_FIRST_DELAY = 0.01
BUSY_MAX_DELAY = 1.0
BUSY_JITTER = 0.5
BUSY_TICK = 0.01
_random = random.random

# One search finds any byte a file name built from a key must not contain (D14).
_UNSAFE_KEY_BYTE = re.compile(rb"[\x00-\x1f/\x7f]").search


def key_is_file_name(key: bytes) -> bool:
    """True when *key* can be pasted into a path as one plain file name (D14)."""
    return _UNSAFE_KEY_BYTE(key) is None and key != b"." and key != b".."


def refused_key_log() -> Callable[[str], None]:
    """The rate-limited log of keys refused as file names (at most 20 lines a second)."""
    return RateLimitedLog(time.monotonic, burst=20, what="refused key log lines")


def _refuse_key(log_line: Callable[[str], None], key: bytes, option: str) -> None:
    log_line('[uwsgi-fastrouter] key "%s" is not a plain file name: no route for %s'
             % (printable(key), option))


class Route:
    """Where one connection attempt goes.

    *node* is the bookkeeping record behind it (a :class:`StaticNode`, a subscribed
    node, or None for pattern/base/fallback addresses) and *owner* the mapper that
    keeps that record: it hears about the attempt's outcome through
    ``connected``/``failed``/``release``.
    """

    __slots__ = ("address", "modifier1", "modifier2", "node", "owner")

    def __init__(self, address: bytes, modifier1: int = 0, modifier2: int = 0,
                 node=None, owner=None) -> None:
        self.address = address
        self.modifier1 = modifier1
        self.modifier2 = modifier2
        self.node = node
        self.owner = owner

    def __repr__(self) -> str:
        return "Route(%r, %d, %d)" % (self.address, self.modifier1, self.modifier2)


class StaticNode:
    """One ``--fastrouter-to`` entry."""

    __slots__ = ("address", "name", "hits", "dead_since", "route", "tx", "rx", "down",
                 "drained", "ref")

    def __init__(self, address: str, owner=None) -> None:
        self.name = address
        self.address = address.encode("utf-8", "surrogateescape")
        self.hits = 0            # successful connects
        self.dead_since = 0.0    # unix time of the failure mark, 0 = alive
        self.tx = 0              # bytes read from the node
        self.rx = 0              # bytes written to the node
        self.down = False        # failed its health checks (uwsgi_fastrouter/health.py)
        self.drained = False     # drained by the operator (the master FIFO)
        self.ref = 0             # requests holding the node now (nodecaps.py)
        self.route = Route(self.address, 0, 0, self, owner)


class StaticMapper:
    """uWSGI's static round robin with dead-node grace (docs/behaviour.md, "Mappers")."""

    def __init__(self, addresses: Sequence[str], gracetime: int, clock) -> None:
        self.nodes: List[StaticNode] = [StaticNode(a, self) for a in addresses]
        self.gracetime = gracetime
        self.clock = clock           # wall clock, for the grace marks
        self.cursor = 0
        self.down_count = 0          # nodes down (health checks) or drained
        self.caps: Optional[NodeCaps] = None    # --fastrouter-node-max-conns
        self.waiting: Optional[Waiting] = None  # told when a slot is given back

    def connected(self, route: Route) -> None:
        route.node.hits += 1

    def failed(self, route: Route, key: bytes) -> None:
        node = route.node
        if not node.dead_since:
            node.dead_since = self.clock()
            log("[uwsgi-fastrouter] %s => marking %s as failed"
                % (printable(key), printable(node.name)))

    def release(self, route: Route) -> None:
        node = route.node
        if node.ref > 0:
            node.ref -= 1
        if self.waiting is not None and self.waiting.sessions:
            self.waiting.slot_freed()

    def set_down(self, address: bytes, down: bool) -> None:
        """The health checks marked the nodes at *address* down (or up again)."""
        self._set_flag(address, "down", down)

    def set_drained(self, address: bytes, drained: bool) -> None:
        """The operator drained the nodes at *address* (or took the drain back)."""
        self._set_flag(address, "drained", drained)

    def _set_flag(self, address: bytes, flag: str, value: bool) -> None:
        for node in self.nodes:
            if node.address == address:
                setattr(node, flag, value)
        self.down_count = sum(1 for node in self.nodes if node.down or node.drained)

    def _route_skipping(self) -> Optional[Route]:
        """:meth:`__call__` while some node is down or drained (health checks, the
        operator) or caps are set (nodecaps.py): the first node from the cursor on that
        is neither down, drained, inside its grace time nor at its cap.  As in the plain
        walk, only the node at the cursor is revived once its grace time is over."""
        nodes = self.nodes
        count = len(nodes)
        caps = self.caps
        now = self.clock()
        alive = False
        for step in range(count):
            index = (self.cursor + step) % count
            node = nodes[index]
            if node.down or node.drained:
                continue
            if node.dead_since:
                if step or node.dead_since + self.gracetime > now:
                    continue
                node.dead_since = 0.0
            alive = True
            if caps is None or caps.has_room(node):
                self.cursor = (index + 1) % count
                node.ref += 1
                return node.route
        self.cursor = (self.cursor + 1) % count
        if alive:
            caps.full = True     # only a cap can have turned an alive node away
        return None

    def rebuild(self, addresses: Sequence[str]) -> None:
        """Make the node list *addresses*; a node that stays keeps its counters and
        its failure mark.  The list object is kept (the stats hold it)."""
        old: dict = {}
        for node in self.nodes:
            old.setdefault(node.name, []).append(node)
        nodes = []
        for address in addresses:
            kept = old.get(address)
            nodes.append(kept.pop(0) if kept else StaticNode(address, self))
        self.nodes[:] = nodes
        self.cursor %= len(nodes)
        self.down_count = sum(1 for node in nodes if node.down or node.drained)

    def route(self, key: bytes, request=None) -> Optional[Route]:
        """The next node's route (the round robin); *request* is not looked at.  The
        router calls this bound method directly (one call less than ``__call__``)."""
        if self.down_count or self.caps is not None:
            return self._route_skipping()
        nodes = self.nodes
        count = len(nodes)
        index = self.cursor
        node = nodes[index]
        if node.dead_since:
            if node.dead_since + self.gracetime <= self.clock():
                node.dead_since = 0.0
            else:
                for step in range(1, count):
                    candidate = nodes[(index + step) % count]
                    if not candidate.dead_since:
                        index = (index + step) % count
                        node = candidate
                        break
                else:
                    self.cursor = (self.cursor + 1) % count
                    return None
        self.cursor = (index + 1) % count
        node.ref += 1
        return node.route

    __call__ = route


class PatternMapper:
    """``--fastrouter-use-pattern``: ``%s`` becomes the key, ``%%`` a percent sign,
    ``%(`` stays, any other ``%X`` is dropped (uWSGI's rules).

    *check_keys* False (a forced key) skips the file-name check of the key (D14);
    *refusal_log* receives the line for a refused key."""

    def __init__(self, pattern: str, *, check_keys: bool = True,
                 refusal_log: Optional[Callable[[str], None]] = None) -> None:
        raw = pattern.encode("utf-8", "surrogateescape")
        # Pre-split the pattern into literal parts around the %s slots.
        parts: List[bytes] = []
        current = bytearray()
        i = 0
        while i < len(raw):
            c = raw[i:i + 1]
            if c == b"%" and i + 1 < len(raw):
                nxt = raw[i + 1:i + 2]
                if nxt == b"s":
                    parts.append(bytes(current))
                    current = bytearray()
                elif nxt == b"%":
                    current += b"%"
                elif nxt == b"(":
                    current += b"%("
                i += 2
                continue
            current += c
            i += 1
        parts.append(bytes(current))
        self.parts = parts
        # Without a %s the key never reaches the address: nothing to check.
        self.check_keys = check_keys and len(parts) > 1
        self.refusal_log = refusal_log or refused_key_log()

    def __call__(self, key: bytes) -> Optional[Route]:
        # key_is_file_name(), written out: one function call less on every request.
        if self.check_keys and (_UNSAFE_KEY_BYTE(key) is not None or key == b"." or key == b".."):
            _refuse_key(self.refusal_log, key, "--fastrouter-use-pattern")
            return None
        return Route(key.join(self.parts))


class BaseMapper:
    """``--fastrouter-use-base``: the base string immediately followed by the key.

    *check_keys* and *refusal_log* as for :class:`PatternMapper`."""

    def __init__(self, base: str, *, check_keys: bool = True,
                 refusal_log: Optional[Callable[[str], None]] = None) -> None:
        self.base = base.encode("utf-8", "surrogateescape")
        self.check_keys = check_keys
        self.refusal_log = refusal_log or refused_key_log()

    def __call__(self, key: bytes) -> Optional[Route]:
        if self.check_keys and (_UNSAFE_KEY_BYTE(key) is not None or key == b"." or key == b".."):
            _refuse_key(self.refusal_log, key, "--fastrouter-use-base")
            return None
        return Route(self.base + key)


class SubscriptionMapper:
    """Subscribed nodes (``--fastrouter-subscription-server``), docs/behaviour.md "Subscriptions".

    A lookup takes a reference on the node it returns; it is given back through
    :meth:`release` when the session is over or its attempt failed.  When a lookup
    finds the table empty, or a failed connect emptied it and there is no fallback
    list, *on_empty* is called (cheap mode goes back to sleep).
    """

    def __init__(self, table, *, fallback_key: Optional[bytes] = None, dotsplit: bool = False,
                 clock=None, on_empty=None, has_fallbacks: bool = False,
                 mountpoints: int = 0, client_of=None) -> None:
        import time
        self.table = table
        #: --subscription-mountpoints: try host/seg1/.../segN first (see balancing.py)
        self.mountpoints = mountpoints
        if client_of is not None:
            table.client_of = client_of
        self.fallback_key = fallback_key
        self.dotsplit = dotsplit
        self.clock = clock or time.time
        self.on_empty = on_empty
        self.has_fallbacks = has_fallbacks
        self.on_failed = None   # (key, address): tell the other router processes (D8)
        self.waiting: Optional[Waiting] = None  # told when a slot is given back

    def __call__(self, key: bytes, request=None) -> Optional[Route]:
        table = self.table
        now = self.clock()
        node = None
        if self.mountpoints and request is not None:
            mounted = mount_key(key, request.info, self.mountpoints)
            if mounted is not None:
                node = table.lookup(mounted, now, request)
        if node is not None:
            pass
        elif self.dotsplit:
            node = table.lookup_dotsplit(key, now, request)
        else:
            node = table.lookup(key, now, request)
            if node is None and self.fallback_key:
                node = table.lookup(self.fallback_key, now, request)
        if node is None:
            if self.on_empty is not None and table.empty:
                self.on_empty()
            return None
        return Route(node.name, node.modifier1, node.modifier2, node, self)

    def connected(self, route: Route) -> None:
        self.table.connected(route.node)

    def failed(self, route: Route, key: bytes) -> None:
        node = route.node
        # the key the node is subscribed under: a mountpoint, dot-split or fallback
        # key differs from the request's
        pool = node.pool
        pool_key = pool.key if pool is not None else key
        self.table.connect_failed(pool_key, node, self.clock())
        if self.on_failed is not None:
            self.on_failed(pool_key, node.name)

    def release(self, route: Route) -> None:
        table = self.table
        table.release(route.node)
        if self.on_empty is not None and not self.has_fallbacks and table.empty:
            self.on_empty()
        if self.waiting is not None and self.waiting.sessions:
            self.waiting.slot_freed()


class FixedMapper:
    """``--fastrouter-use-socket``: every request to one address (the instance's own socket)."""

    def __init__(self, address: str) -> None:
        self.route = Route(address.encode("utf-8", "surrogateescape"))

    def __call__(self, key: bytes) -> Optional[Route]:
        return self.route


class NoMapper:
    """No mapper configured: every request is closed after its vars."""

    def __call__(self, key: bytes) -> Optional[Route]:
        return None


class Router:
    """The routing policy of one router process."""

    def __init__(self, *, to: Sequence[str] = (), use_pattern: Optional[str] = None,
                 use_base: Optional[str] = None, fallback: Sequence[str] = (),
                 fallback_on_no_key: bool = False, gracetime: int = 30,
                 max_retries: int = 3, quiet: bool = False, wall_clock=None,
                 subscriptions: Optional[SubscriptionMapper] = None,
                 use_cache=None, code_string=None, use_socket: Optional[str] = None,
                 forced_key: bool = False, caps: Optional[NodeCaps] = None) -> None:
        # forced_key: every key is --fastrouter-force-key, the operator's (see the module doc).
        self.wall_clock = wall_clock or time.time
        self.static = StaticMapper(to, gracetime, self.wall_clock) if to else None
        self.subscriptions = subscriptions
        if use_cache is not None:
            self.mapper = use_cache
        elif use_pattern is not None:
            self.mapper = PatternMapper(use_pattern, check_keys=not forced_key)
        elif subscriptions is not None:
            self.mapper = subscriptions
        elif use_base is not None:
            self.mapper = BaseMapper(use_base, check_keys=not forced_key)
        elif code_string is not None:
            self.mapper = code_string
        elif use_socket is not None:
            self.mapper = FixedMapper(use_socket)
        elif self.static is not None:
            self.mapper = self.static
        else:
            self.mapper = NoMapper()
        if self.mapper is subscriptions:
            # the subscription mapper takes the request along: called directly
            self.route = subscriptions
        elif self.mapper is self.static:
            self.route = self.static.route
        self.fallbacks = [Route(a.encode("utf-8", "surrogateescape")) for a in fallback]
        #: fallback addresses marked down by the health checks, drained by the
        #: operator, and both: the ones skipped
        self.fallbacks_down: set = set()
        self.fallbacks_drained: set = set()
        self.fallbacks_skipped: set = set()
        # the configured lists, kept while they hold host names (see resolve_names)
        self.configured_to = list(to) if names_in(to) else None
        self.configured_fallback = list(fallback) if names_in(fallback) else None
        self.fallback_on_no_key = fallback_on_no_key and bool(self.fallbacks)
        self.max_retries = max_retries
        self.quiet = quiet
        # --fastrouter-node-max-conns (nodecaps.py): None when off
        self.caps = caps
        self.waiting: Optional[Waiting] = None
        if caps is not None:
            self.waiting = Waiting()
            if self.static is not None:
                self.static.caps = caps
                self.static.waiting = self.waiting
            if subscriptions is not None:
                subscriptions.table.caps = caps
                subscriptions.waiting = self.waiting
            self._uncapped_route = self.route
            self.route = self._capped_route

    def _capped_route(self, key: bytes, request=None) -> Optional[Route]:
        """:meth:`route` with caps: :attr:`NodeCaps.full` tells this lookup's story."""
        self.caps.full = False
        return self._uncapped_route(key, request)

    @property
    def host_names(self) -> List[str]:
        """The host names in ``--fastrouter-to`` and ``--fastrouter-fallback``."""
        return names_in((self.configured_to or []) + (self.configured_fallback or []))

    def resolve_names(self, lookup: Callable[[str], Optional[Tuple[str, ...]]]) -> None:
        """Rebuild the static nodes and the fallback list: every address *lookup*
        knows for a host name is one node; a name it does not know yet stays a node
        that cannot be reached (it counts as failed, like a dead node)."""
        if self.configured_to is not None and self.static is not None:
            self.static.rebuild(expand(self.configured_to, lookup))
        if self.configured_fallback is not None:
            old = {route.address: route for route in self.fallbacks}
            routes = []
            for address in expand(self.configured_fallback, lookup):
                raw = address.encode("utf-8", "surrogateescape")
                routes.append(old.get(raw) or Route(raw))
            self.fallbacks[:] = routes

    @property
    def static_nodes(self) -> List[StaticNode]:
        return self.static.nodes if self.static is not None else []

    def route(self, key: bytes, request=None) -> Optional[Route]:
        """The first attempt's route for *key*, or None (no route).  *request* (the
        session) is handed to the subscription mapper only (mountpoints, iphash)."""
        return self.mapper(key)

    def connected(self, route: Route) -> None:
        """The connect to *route* succeeded.  (Session._connected does the same
        without the call: change both.)"""
        owner = route.owner
        if owner is not None:
            owner.connected(route)

    def connect_failed(self, route: Route, key: bytes, retries: int, reason: str,
                       log_it: bool = True) -> None:
        """Log a failed connect (unless *log_it* is False), mark the node it went to
        and release it."""
        if log_it and not self.quiet:
            log('[uwsgi-fastrouter] unable to connect() to node "%s" (%d retries): %s'
                % (printable(route.address), retries, reason))
        owner = route.owner
        if owner is not None:
            owner.failed(route, key)
            owner.release(route)

    def at_cap(self) -> bool:
        """The last lookup found no node because every alive node of the key holds as
        many requests as its cap allows (nodecaps.py)."""
        caps = self.caps
        return caps is not None and caps.full

    def no_route_reason(self, key: bytes, cheap: bool = False) -> Optional[str]:
        """Why the mapper found no node for *key*, for the "no route" line (D19); None
        when the mapper already logged the refusal (a key that is no file name)."""
        mapper = self.mapper
        if isinstance(mapper, (PatternMapper, BaseMapper)):
            if mapper.check_keys and not key_is_file_name(key):
                return None
        elif isinstance(mapper, NoMapper):
            return "no node configured"
        elif mapper is self.subscriptions and mapper.table.empty:
            return "no node subscribed" + (" (cheap mode)" if cheap else "")
        elif mapper is self.static:
            return "all nodes are marked as failed"
        return "unknown key"

    def route_unknown_key(self, key: bytes) -> Tuple[Optional[Route], int, int]:
        """The mapper had no route for *key*: ``(route or None, retries, fallback_index)``.

        With ``--fastrouter-fallback-on-no-key`` the key goes to the fallback list, as
        if a first attempt had failed (nothing logged or marked); else None."""
        if not self.fallback_on_no_key:
            return None, 0, 0
        route, fallback_index = self._retry_route(key, None, 0)
        return route, 1, fallback_index

    def next_route(self, key: bytes, failed: Route, retries: int, fallback_index: int,
                   request=None) -> Tuple[Optional[Route], int, int]:
        """After a failed connect to *failed* (already reported with
        :meth:`connect_failed`): ``(route or None, retries, fallback_index)`` for the next
        attempt; None once ``--fastrouter-max-retries`` is spent or nothing is left."""
        if retries >= self.max_retries:
            return None, retries, fallback_index
        route, fallback_index = self._retry_route(key, failed, fallback_index, request)
        return route, retries + 1, fallback_index

    @staticmethod
    def busy_backoff(now: float, busy: Optional[Tuple[float, float]], timeout: float
                     ) -> Optional[Tuple[float, Tuple[float, float]]]:
        """A UNIX node's listen queue is full: ``(when to connect again, back-off state)``,
        or None once *timeout* has passed since the first attempt (a failed connect).

        *busy* is the state returned by the previous call, None at the first."""
        if busy is None:
            deadline, delay = now + timeout, BUSY_FIRST_DELAY
        else:
            deadline, delay = busy
            delay = min(delay * 2, BUSY_MAX_DELAY)
        left = deadline - now
        if left <= 0:
            return None
        wait = min(delay * (1.0 - BUSY_JITTER * _random()), left)
        return (int((now + wait) / BUSY_TICK) + 1) * BUSY_TICK, (deadline, delay)

    def _retry_route(self, key: bytes, previous: Optional[Route], fallback_index: int,
                    request=None):
        """The route for the next attempt after a failure, as ``(route, fallback_index)``.

        *fallback_index* is the position of the next fallback entry to use (0 before
        any).  Fallback nodes inherit the modifiers of the route that failed (uWSGI
        keeps them).  Returns ``(None, index)`` when there is nothing left to try.
        """
        if self.fallbacks:
            if self.fallbacks_skipped:
                while (fallback_index < len(self.fallbacks)
                       and self.fallbacks[fallback_index].address in self.fallbacks_skipped):
                    fallback_index += 1
            if fallback_index >= len(self.fallbacks):
                return None, fallback_index
            entry = self.fallbacks[fallback_index]
            if previous is not None and (previous.modifier1 or previous.modifier2):
                entry = Route(entry.address, previous.modifier1, previous.modifier2)
            return entry, fallback_index + 1
        return self.route(key, request), fallback_index

    # -- health checks (uwsgi_fastrouter/health.py) ---------------------------

    def health_targets(self) -> List[bytes]:
        """Every node address the health checks probe: static, fallback and
        subscribed nodes, each once."""
        seen = dict.fromkeys(node.address for node in self.static_nodes)
        seen.update(dict.fromkeys(route.address for route in self.fallbacks))
        if self.subscriptions is not None:
            seen.update(dict.fromkeys(self.subscriptions.table.addresses()))
        return list(seen)

    def node_health_changed(self, address: bytes, up: bool) -> None:
        """The health checks marked *address* down (skipped by every mapper and the
        fallback list from now on) or up again."""
        if self.static is not None:
            self.static.set_down(address, not up)
        self._set_fallback(self.fallbacks_down, address, not up)
        if self.subscriptions is not None:
            self.subscriptions.table.set_down(address, not up, self.wall_clock())

    def node_drained(self, address: bytes, drained: bool) -> None:
        """The operator drained *address*: no new request goes to it, by any mapper
        or the fallback list, until the drain is taken back; requests in flight
        finish."""
        if self.static is not None:
            self.static.set_drained(address, drained)
        self._set_fallback(self.fallbacks_drained, address, drained)
        if self.subscriptions is not None:
            self.subscriptions.table.set_drained(address, drained, self.wall_clock())

    def _set_fallback(self, addresses: set, address: bytes, skip: bool) -> None:
        if not skip:
            addresses.discard(address)
        elif any(route.address == address for route in self.fallbacks):
            addresses.add(address)
        self.fallbacks_skipped = self.fallbacks_down | self.fallbacks_drained
