"""Building one router from a configuration: bind the sockets, wire the parts.

Used in two ways: the single-process router (:mod:`uwsgi_fastrouter.cli`) binds and
wires in one go; the pre-fork master (:mod:`uwsgi_fastrouter.master`) binds in the
master (:class:`MasterSockets`) and wires each router process after the fork, with the
subscription table fed by the master instead of by the subscription sockets.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from . import balancing, health, zerg
from .addresses import shared_socket_index as _shared_index  # "=N": atoi, as uWSGI
from .accesslog import AccessLog, compile_format
from .log import log, printable
from . import metrics
from .options import access_log_target
from .reactor import Reactor
from .router import Router, SubscriptionMapper
from .server import DEFAULT_CHUNK, Server
from .signing import SignatureChecker, SigningError
from .sockets import AddressError, bind_listener, bind_stream_server
from .stats import StatsServer, Streamed, build_document, live_pools, pool_stats, subscription_stream
from .subscription import ALGORITHMS, SubscriptionTable
from .subserver import SubscriptionServer, bind_datagram


class StartupError(Exception):
    """A configuration that cannot run; the message names the option."""


def _chmod_value(value) -> Optional[int]:
    if value is None or value is False:
        return None
    text = str(value).strip() or "666"
    try:
        return int(text, 8)
    except ValueError:
        raise StartupError('invalid value for option "chmod-socket": %r is not an octal mode' % text)


def _check(cfg) -> None:
    if not (cfg.fastrouter or cfg.fastrouter_zerg or cfg.subscribe_to or cfg.subscribe2 or cfg.socket
            or cfg.zerg):
        raise StartupError("no --fastrouter address given: nothing to route "
                           "(example: --fastrouter 127.0.0.1:3017)")
    if cfg.fastrouter_max_retries < 0:
        raise StartupError('invalid value for option "fastrouter-max-retries": must be >= 0')
    _check_access_log(cfg)


def _check_access_log(cfg) -> None:
    """A bad --fastrouter-access-log-format or an unwritable access log file stops the
    start, in the process that reads the configuration (the master too)."""
    if cfg.fastrouter_access_log_format is not None:
        try:
            compile_format(cfg.fastrouter_access_log_format)
        except ValueError as exc:
            raise StartupError(str(exc))
    path = access_log_target(cfg.fastrouter_access_log)
    if path:
        try:
            AccessLog(cfg.fastrouter_access_log_format, path).close()
        except OSError as exc:
            raise StartupError('option "--fastrouter-access-log": unable to open %s: %s'
                               % (path, exc.strerror or exc))


def _make_access_log(cfg, reactor: Optional[Reactor] = None
                     ) -> Tuple[Optional[AccessLog], Optional[Callable[[float], None]]]:
    """The access log of this router process (None when it is off) and, for a file with
    --touch-logreopen, the once-a-second task that reopens it when a trigger file is
    touched (the file is opened in each router process, in append mode)."""
    path = access_log_target(cfg.fastrouter_access_log)
    if path is None:
        return None, None
    access_log = AccessLog(cfg.fastrouter_access_log_format, path or None, reactor)
    reopen_if_touched = None
    if path and cfg.touch_logreopen:
        from .proccontrol import TouchWatcher
        watcher = TouchWatcher(cfg.touch_logreopen)

        def reopen_if_touched(_now: float) -> None:
            if watcher.touched() is not None:
                access_log.reopen()

    return access_log, reopen_if_touched


class Assembly:
    """Everything one router process runs, and what must be closed at the end."""

    def __init__(self) -> None:
        self.server: Optional[Server] = None
        self.access_log: Optional[AccessLog] = None
        self.stats: Optional[StatsServer] = None
        self.metrics_listener = None         # --fastrouter-metrics
        self.metrics: Optional[metrics.MetricsServer] = None
        self.subscriptions: Optional[SubscriptionServer] = None
        self.table = None
        self.zerg_listener = None
        self.zerg: Optional[zerg.ZergServer] = None
        self.closables: list = []       # listeners (stream and datagram), closed at exit
        self.registry = None                 # the caches (--cache, --cache2)
        # Mapper plug-ins, built once by prepare_mappers() before any fork: a router
        # process under a master gets them from the master (see wire_child).
        self.use_cache = None                # --fastrouter-use-cache
        self.code_string = None              # --fastrouter-use-code-string
        self.use_socket: Optional[str] = None    # --fastrouter-use-socket: the app socket's name
        self.app = None                      # the local WSGI app (--socket + --wsgi-file/--module)
        self.shared: list = []               # --shared-socket listeners, in order
        self.app_listeners: list = []        # --socket listeners (the local app's)
        self.external_subscriptions = True   # False in a router process under a master
        self.report_failure = None           # (key, address) -> None, set under a master
        self.health = None                   # --fastrouter-health-check-interval

    def share_mappers(self, other: "Assembly") -> None:
        """Use the caches and mapper plug-ins *other* prepared (a router process under a
        master takes the master's: the cache memory is shared across the fork)."""
        self.registry = other.registry
        self.use_cache = other.use_cache
        self.code_string = other.code_string
        self.use_socket = other.use_socket

    def start(self) -> None:
        self.server.start()
        if self.health is not None:
            self.health.start()
        if self.subscriptions is not None and self.external_subscriptions:
            self.subscriptions.start()
        if self.stats is not None:
            self.stats.start()
        if self.metrics is not None:
            self.metrics.start()
        if self.zerg is not None:
            self.zerg.start()

    def stop(self, unlink: bool = True) -> None:
        if self.health is not None:
            self.health.stop()
        if self.zerg is not None:
            self.zerg.stop()
        if self.server is not None:
            self.server.stop()
        if self.access_log is not None:
            self.access_log.close()      # the lines of the sessions just dropped too
        if self.subscriptions is not None and self.external_subscriptions:
            self.subscriptions.stop()
        if self.stats is not None:
            self.stats.stop()
        if self.metrics is not None:
            self.metrics.stop()
        for closable in self.closables:
            closable.close(unlink=unlink)

    # ---- under a master: the subscription table is fed by the master

    def apply_subscription(self, data: bytes, pid, uid, gid) -> None:
        if self.subscriptions is not None:
            self.subscriptions.apply_trusted(data, pid, uid, gid)

    def apply_drain(self, address: bytes, drained: bool) -> None:
        """The master drained *address* (the master FIFO's ``D``/``U`` commands)."""
        self.server.router.node_drained(address, drained)

    def apply_failure(self, key: bytes, address: bytes) -> None:
        table = self.table
        if table is None:
            return
        pool = table.pool(key)
        if pool is None:
            return
        for node in pool.nodes:
            if node.name == address:
                # Logged by the router process that saw it fail.
                table.quietly(table.connect_failed, key, node, time.time())
                if table.empty and not node.ref:
                    self.server.go_cheap()
                return

    def report_parts(self, pools_per_part: int = 32, totals_only: bool = False) -> Iterator[dict]:
        """This process's counters for the master's stats, in parts (see
        :class:`RouterReport`): the totals first, then (unless *totals_only*: a metrics
        scrape) the pools a few at a time, each taken from the table when its part is
        built (one removed meanwhile is left out)."""
        server = self.server
        first = {"sessions": len(server.sessions),
                 "static": [[n.hits, int(n.dead_since)] for n in server.router.static_nodes],
                 "cheap": 1 if server.cheap else 0,
                 "metrics": server.counters.snapshot(server)}
        if self.health is not None:
            first["down"] = [a.decode("latin-1") for a, up in self.health.health().items() if not up]
        yield first
        if self.table is None or totals_only:
            return
        flat: list = []
        count = 0
        for counters in live_pools(self.table, _pool_counters):
            flat += counters
            count += 1
            if count >= pools_per_part:
                yield {"pools": flat}
                flat, count = [], 0
        if flat:
            yield {"pools": flat}


def _pool_counters(pool) -> list:
    """One pool in a router process's report, flat (see :class:`RouterReport`)."""
    flat = [pool.key.decode("latin-1"), pool.hits, len(pool.nodes)]
    for n in pool.nodes:
        flat += (n.name.decode("latin-1"), n.requests, n.last_requests, n.tx, n.rx, n.ref, n.failcnt)
    return flat


class RouterReport:
    """One router process's counters, as the master receives them in parts.

    Each part is a JSON object: the first has ``sessions``, ``static`` (``[hits,
    grace]`` per static node), ``cheap`` and ``metrics`` (the request counters, see
    :meth:`~uwsgi_fastrouter.metrics.Counters.snapshot`); the others ``pools``, a flat list with,
    per pool, its key (latin-1), hits and node count, then per node its name
    (latin-1), requests, last_requests, tx, rx, ref and failcnt.

    The counters stay in one flat list with an index of positions by key: tens of
    thousands of small lists and dicts kept across passes would make every full run
    of the cyclic garbage collector (which walks them all, in one pass of the loop)
    that much longer.
    """

    __slots__ = ("sessions", "static", "cheap", "metrics", "counters", "index", "down")

    def __init__(self) -> None:
        self.sessions = 0
        self.static: list = []
        self.cheap = 0
        self.metrics: Optional[dict] = None   # the process's request counters (metrics.py)
        self.counters: list = []
        self.index: Dict[str, int] = {}   # key -> position of its hits in counters
        self.down: set = set()            # addresses its health checks hold down (latin-1)

    def add(self, data: bytes) -> None:
        """Merge one part; ValueError for one that is not a part."""
        part = json.loads(data)
        if not isinstance(part, dict):
            raise ValueError("a report part is not an object")
        try:
            if "sessions" in part:
                self.sessions = int(part["sessions"])
                self.static = [(int(hits), int(grace)) for hits, grace in part["static"]]
                self.cheap = int(part["cheap"])
                if "metrics" in part:
                    self.metrics = metrics.validate(part["metrics"])
                if "down" in part:
                    self.down = {a for a in part["down"] if type(a) is str}
            flat = part.get("pools")
            if flat is not None:
                self._index(flat)
        except (IndexError, KeyError, TypeError) as exc:
            raise ValueError("a malformed report part: %r" % (exc,)) from None

    def _index(self, flat: list) -> None:
        base = len(self.counters)
        index = {}
        at = 0
        while at < len(flat):
            key, hits, nodes = flat[at], flat[at + 1], flat[at + 2]
            if type(key) is not str or type(hits) is not int or type(nodes) is not int or nodes < 0 \
                    or at + 3 + 7 * nodes > len(flat):
                raise ValueError("a malformed pool in a report part")
            index[key] = base + at + 1
            at += 3 + 7 * nodes
        self.counters += flat
        self.index.update(index)

    def pool(self, key: str) -> Optional[Tuple[int, Dict[str, list]]]:
        """(hits, {node name: [requests, last_requests, tx, rx, ref, failcnt]}) of *key*."""
        at = self.index.get(key)
        if at is None:
            return None
        counters = self.counters
        nodes = {}
        node = at + 2
        for _ in range(counters[at + 1]):
            nodes[counters[node]] = counters[node + 1:node + 7]
            node += 7
        return counters[at], nodes


def _bind_all(cfg, parts: Assembly) -> tuple:
    chmod = _chmod_value(cfg.chmod_socket)
    listeners, datagram = [], []
    stats_listener = None
    option = "shared-socket"

    def bind(spec: str):
        return bind_listener(spec, backlog=cfg.listen, chmod=chmod, abstract_all=cfg.abstract_socket,
                             defer_accept=cfg.socket_timeout)

    def resolve(spec: str):
        index = _shared_index(spec)
        if index is None:
            listener = bind(spec)
            parts.closables.append(listener)
            return listener, None
        if index >= len(parts.shared):
            raise AddressError(spec, "unable to use shared socket %d" % index)
        return parts.shared[index], index

    try:
        shared_specs = [(spec, True) for spec in cfg.shared_socket] + \
            [(spec, False) for spec in cfg.undeferred_shared_socket]
        for number, (spec, deferred) in enumerate(shared_specs):
            listener = bind(spec) if deferred else bind_listener(
                spec, backlog=cfg.listen, chmod=chmod, abstract_all=cfg.abstract_socket, defer_accept=0)
            parts.shared.append(listener)
            parts.closables.append(listener)
            log("uwsgi shared socket %d bound to %s address %s fd %d"
                % (number, "UNIX" if listener.unix_path or spec.startswith("@") else "TCP",
                   listener.name, listener.sock.fileno()))
        option = "fastrouter"
        for spec in cfg.fastrouter:
            listener, _index = resolve(spec)
            listeners.append(listener)
            log("uWSGI fastrouter bound on %s fd %d" % (listener.name, listener.sock.fileno()))
        option = "socket"
        for number, spec in enumerate(cfg.socket):
            listener, index = resolve(spec)
            parts.app_listeners.append(listener)
            if index is None:
                log("uwsgi socket %d bound to %s address %s fd %d"
                    % (number, "UNIX" if listener.unix_path or spec.startswith("@") else "TCP",
                       listener.name, listener.sock.fileno()))
            else:
                log("uwsgi socket %d mapped to shared socket %d (%s) fd %d"
                    % (number, index, listener.name, listener.sock.fileno()))
        option = "zerg"
        for path in cfg.zerg:
            try:
                lent = zerg.attach(path)
            except zerg.ZergError as exc:
                if cfg.zerg_fallback:
                    log("%s: going on with this instance's own sockets (--zerg-fallback)" % exc)
                    continue
                raise AddressError(path, str(exc))
            for listener in lent:
                parts.app_listeners.append(listener)
                parts.closables.append(listener)
                log("uwsgi socket %d attached from the zerg server %s: %s fd %d"
                    % (len(parts.app_listeners) - 1, path, listener.name, listener.sock.fileno()))
        if cfg.fastrouter_zerg:
            option = "fastrouter-zerg"
            try:
                lent = zerg.attach(cfg.fastrouter_zerg)
            except zerg.ZergError as exc:
                raise AddressError(cfg.fastrouter_zerg, str(exc))
            for listener in lent:
                listeners.append(listener)
                parts.closables.append(listener)
                log("uWSGI fastrouter bound on %s fd %d (from the zerg server %s)"
                    % (listener.name, listener.sock.fileno(), cfg.fastrouter_zerg))
        if cfg.zerg_server:
            option = "zerg-server"
            parts.zerg_listener = bind_stream_server(cfg.zerg_server, backlog=cfg.listen)
            parts.closables.append(parts.zerg_listener)
            log("*** zerg server enabled on %s ***" % parts.zerg_listener.name)
        option = "fastrouter-subscription-server"
        for spec in cfg.fastrouter_subscription_server:
            listener = bind_datagram(spec, credentials=cfg.subscriptions_use_credentials)
            datagram.append(listener)
            parts.closables.append(listener)
            log("uWSGI fastrouter subscription server bound on %s fd %d"
                % (listener.name, listener.sock.fileno()))
        if cfg.fastrouter_stats:
            option = "fastrouter-stats"
            stats_listener = bind_stream_server(cfg.fastrouter_stats, backlog=cfg.listen)
            parts.closables.append(stats_listener)
            log("*** fastrouter stats server enabled on %s fd: %d ***"
                % (stats_listener.name, stats_listener.sock.fileno()))
        if cfg.fastrouter_metrics:
            option = "fastrouter-metrics"
            parts.metrics_listener = bind_stream_server(cfg.fastrouter_metrics, backlog=cfg.listen)
            parts.closables.append(parts.metrics_listener)
            log("*** fastrouter metrics server enabled on %s fd: %d ***"
                % (parts.metrics_listener.name, parts.metrics_listener.sock.fileno()))
    except AddressError as exc:
        for closable in parts.closables:
            closable.close(unlink=True)
        parts.closables = []
        raise StartupError('option "--%s": %s' % (option, exc))
    return listeners, datagram, stats_listener


def _signature_checker(cfg):
    if not cfg.subscriptions_sign_check:
        return None

    def read_file(path: str) -> Optional[bytes]:
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except OSError:
            return None

    try:
        return SignatureChecker(cfg.subscriptions_sign_check, read_file)
    except SigningError as exc:
        raise StartupError('option "--subscriptions-sign-check": %s' % exc)


def build(cfg, reactor: Reactor) -> Assembly:
    """Bind everything *cfg* asks for and wire the router together."""
    _check(cfg)
    parts = Assembly()
    prepare_scripts(cfg, parts)
    listeners, datagram, stats_listener = _bind_all(cfg, parts)
    try:
        prepare_mappers(cfg, parts)
        return _wire(cfg, reactor, parts, listeners, datagram, stats_listener)
    except BaseException:
        parts.stop()
        raise


def _wire(cfg, reactor, parts, listeners, datagram, stats_listener, external: bool = True) -> Assembly:
    """Build the router on bound sockets.  *external* False: a router process under a
    master, whose subscription table is fed by the master (no forwarding upstream)."""
    force_key = None
    if cfg.fastrouter_force_key:
        force_key = cfg.fastrouter_force_key.encode("utf-8", "surrogateescape")
    server_ref: list = []

    def on_empty() -> None:
        if server_ref:
            server_ref[0].go_cheap()

    subscriptions = None
    if datagram:
        parts.table = _make_table(cfg)
        fallback_key = None
        if cfg.fastrouter_subscription_fallback_key:
            fallback_key = cfg.fastrouter_subscription_fallback_key.encode("utf-8", "surrogateescape")
        subscriptions = SubscriptionMapper(
            parts.table, fallback_key=fallback_key, dotsplit=cfg.subscription_dotsplit,
            on_empty=on_empty, has_fallbacks=bool(cfg.fastrouter_fallback),
            mountpoints=cfg.subscription_mountpoints,
            client_of=balancing.make_client_of(_hash_var(cfg)))
    router = Router(
        use_cache=parts.use_cache, code_string=parts.code_string, use_socket=parts.use_socket,
        to=cfg.fastrouter_to,
        use_pattern=cfg.fastrouter_use_pattern,
        use_base=cfg.fastrouter_use_base,
        fallback=cfg.fastrouter_fallback,
        fallback_on_no_key=cfg.fastrouter_fallback_on_no_key,
        gracetime=cfg.fastrouter_gracetime or 30,
        max_retries=cfg.fastrouter_max_retries,
        quiet=cfg.fastrouter_quiet,
        subscriptions=subscriptions,
        forced_key=force_key is not None,
    )
    access_log, reopen_access_log = _make_access_log(cfg, reactor)
    server = Server(reactor, router, listeners,
                    timeout=cfg.fastrouter_timeout or 60,
                    chunk=cfg.fastrouter_buffer_size or DEFAULT_CHUNK,
                    events=cfg.fastrouter_events or 64,
                    force_key=force_key,
                    cheap=cfg.fastrouter_cheap and bool(datagram),
                    fd_passing=not cfg.no_fd_passing,
                    trust_fd_passing=cfg.fastrouter_trust_fd_passing,
                    post_buffering=cfg.fastrouter_post_buffering,
                    post_buffering_dir=cfg.fastrouter_post_buffering_dir or None,
                    post_buffering_max=cfg.fastrouter_post_buffering_max,
                    post_buffering_min_rate=cfg.fastrouter_post_buffering_min_rate,
                    access_log=access_log)
    server.counters = metrics.Counters(detailed=bool(cfg.fastrouter_metrics),
                                       max_keys=cfg.fastrouter_metrics_max_keys)
    if reopen_access_log is not None:
        server.periodic.append(reopen_access_log)
    if access_log is not None:
        parts.access_log = access_log
    server_ref.append(server)
    parts.server = server
    if datagram:
        scanner = balancing.make_scanner(cfg.subscription_mountpoints, _hash_var(cfg))
        if scanner is not None:
            server.scan_request = scanner
    if parts.zerg_listener is not None:
        parts.zerg = zerg.ZergServer(reactor, parts.zerg_listener, listeners)
    if datagram:
        table = parts.table
        own = listeners[0].name.encode("utf-8", "surrogateescape") if listeners else b""
        skip = _skip_uids(cfg)
        parts.subscriptions = SubscriptionServer(
            reactor, table, datagram, wall_clock=time.time,
            on_node=server.leave_cheap, on_empty=on_empty,
            resubscribe=cfg.fastrouter_resubscribe if external else (),
            resubscribe_bind=cfg.fastrouter_resubscribe_bind if external else None,
            own_address=own, use_credentials=cfg.subscriptions_use_credentials,
            credentials_check=cfg.subscriptions_credentials_check, skip_uids=skip)

        def expire(_now: float) -> None:
            if external:
                table.expire(time.time())
            else:   # a copy of the master's table: the master logs the expiries
                table.quietly(table.expire, time.time())
            if table.empty:
                on_empty()

        server.periodic.append(expire)
    parts.health = _make_health_checker(cfg, reactor, router, parts.table)
    server.counters.health = parts.health
    if cfg.fastrouter_cheap and not datagram:
        log("[uwsgi-fastrouter] --fastrouter-cheap has no effect without a subscription server")
    if stats_listener is not None:
        names = [l.name for l in listeners] + [d.name for d in datagram]
        static = router.static_nodes if cfg.fastrouter_to else None
        table = parts.table
        extra = (lambda doc: doc.__setitem__("subscriptions", subscription_stream(table))) \
            if table is not None else None
        parts.stats = StatsServer(
            reactor, stats_listener,
            lambda: build_document(server, names, static_nodes=static, extra=extra,
                                   cheap=server.cheap, counters=server.counters.snapshot(server),
                                   health=parts.health is not None),
            minified=cfg.stats_minified, http=cfg.stats_http, timeout=cfg.socket_timeout or 4)
    if parts.metrics_listener is not None and external:
        subscriptions = parts.subscriptions

        def scrape(deliver) -> None:
            deliver(metrics.render(server.counters.snapshot(server),
                                   metrics.subscription_counters(subscriptions, parts.table)))

        parts.metrics = metrics.MetricsServer(reactor, parts.metrics_listener, scrape,
                                              timeout=cfg.socket_timeout or 4)
    return parts




# --------------------------------------------------------------------------
# Under a master


class MasterSockets:
    """The sockets a master binds (or inherits on a reload) and the parts it runs itself:
    the subscription sockets with the master's copy of the table, the stats server and
    the zerg server.  Router processes inherit the listeners."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.parts = Assembly()          # only for its closables and zerg listener
        self.listeners: list = []
        self.datagram: list = []
        self.stats_listener = None
        self.master = None
        self.reactor = None
        self.table = None
        self.subscriptions: Optional[SubscriptionServer] = None
        self.stats: Optional[StatsServer] = None
        self.metrics: Optional[metrics.MetricsServer] = None
        self.zerg: Optional[zerg.ZergServer] = None
        self.subscriber = None
        self.subscriptions_blocked = False
        self.drained: set = set()        # addresses drained through the master FIFO
        self._stats_waiting: list = []   # stats requests waiting for the collection under way
        self._metrics_waiting: list = []  # scrapes waiting for the collection under way

    @classmethod
    def bind(cls, cfg, inherited: Optional[dict]) -> "MasterSockets":
        _check(cfg)
        self = cls(cfg)
        prepare_scripts(cfg, self.parts)
        if inherited:
            self._adopt(inherited)
        else:
            self.listeners, self.datagram, self.stats_listener = _bind_all(cfg, self.parts)
        try:
            prepare_mappers(cfg, self.parts)
        except BaseException:
            self.close_all()
            raise
        return self

    def _adopt(self, state: dict) -> None:
        """Rebuild the socket objects from the descriptors a previous image left open."""
        import socket as _socket
        from .sockets import Listener
        from .subserver import DatagramListener
        objects = []
        for kind, name, fd, unix_path in state["sockets"]:
            sock = _socket.socket(fileno=fd)
            sock.setblocking(False)
            os.set_inheritable(fd, False)
            item = (DatagramListener if kind == "dgram" else Listener)(sock, name, unix_path)
            objects.append(item)
            self.parts.closables.append(item)
        pick = lambda key: [objects[i] for i in state.get(key, [])]
        self.listeners = pick("listeners")
        self.datagram = pick("datagram")
        self.parts.shared = pick("shared")
        self.parts.app_listeners = pick("app")
        stats = pick("stats")
        self.stats_listener = stats[0] if stats else None
        metrics_l = pick("metrics")
        self.parts.metrics_listener = metrics_l[0] if metrics_l else None
        zerg_l = pick("zerg")
        self.parts.zerg_listener = zerg_l[0] if zerg_l else None

    def inheritable_state(self) -> dict:
        """Descriptor numbers for the next image; close-on-exec is cleared on them."""
        objects = self.parts.closables
        index = {id(item): i for i, item in enumerate(objects)}
        sockets = []
        for item in objects:
            fd = item.sock.fileno()
            os.set_inheritable(fd, True)
            kind = "dgram" if item.sock.type == 2 else "stream"
            sockets.append([kind, item.name, fd, item.unix_path])
        refs = lambda items: [index[id(item)] for item in items if id(item) in index]
        return {"sockets": sockets, "listeners": refs(self.listeners), "datagram": refs(self.datagram),
                "shared": refs(self.parts.shared), "app": refs(self.parts.app_listeners),
                "stats": refs([self.stats_listener] if self.stats_listener else []),
                "metrics": refs([self.parts.metrics_listener] if self.parts.metrics_listener else []),
                "zerg": refs([self.parts.zerg_listener] if self.parts.zerg_listener else [])}

    # ---- in the master

    def setup_master(self, master, reactor, inherited: Optional[dict]) -> None:
        from .master import SUBSCRIPTION, pack_credentials
        cfg = self.cfg
        self.master = master
        self.reactor = reactor
        if self.datagram:
            self.table = master.table = _make_table(cfg)
            if inherited and inherited.get("table_fd") is not None:
                fd = inherited["table_fd"]
                try:
                    with os.fdopen(fd, "rb") as handle:
                        handle.seek(0)
                        added = self.table.load(handle.read(), time.time())
                    log("graceful reload: %d subscribed node(s) carried over" % added)
                except (OSError, ValueError) as exc:
                    log("graceful reload: the subscription table could not be carried over: %s" % exc)
            own = self.listeners[0].name.encode("utf-8", "surrogateescape") if self.listeners else b""
            self.subscriptions = SubscriptionServer(
                reactor, self.table, self.datagram, wall_clock=time.time,
                resubscribe=cfg.fastrouter_resubscribe, resubscribe_bind=cfg.fastrouter_resubscribe_bind,
                own_address=own, use_credentials=cfg.subscriptions_use_credentials,
                credentials_check=cfg.subscriptions_credentials_check, skip_uids=_skip_uids(cfg))
            self.subscriptions.on_accepted = lambda data, pid, uid, gid: master.broadcast(
                SUBSCRIPTION, pack_credentials(pid, uid, gid) + data)
        if self.parts.zerg_listener is not None:
            self.zerg = zerg.ZergServer(reactor, self.parts.zerg_listener, self.listeners)
        self.subscriber = make_subscriber(cfg, reactor, self.parts)
        if self.stats_listener is not None:
            self.stats = StatsServer(reactor, self.stats_listener, gather=self._gather_stats,
                                     minified=cfg.stats_minified, http=cfg.stats_http,
                                     timeout=cfg.socket_timeout or 4)
        if self.parts.metrics_listener is not None:
            self.metrics = metrics.MetricsServer(reactor, self.parts.metrics_listener, self._gather_metrics,
                                                 timeout=cfg.socket_timeout or 4)

    def _gather_metrics(self, deliver) -> None:
        """A scrape: the router processes' totals (a totals-only round, see master.py),
        summed, with the master's subscription counters.  Scrapes arriving while a
        collection is under way share it."""
        self._metrics_waiting.append(deliver)
        if len(self._metrics_waiting) == 1:
            try:
                self.master.collect_reports(RouterReport, self._metrics_collected, totals_only=True)
            except BaseException:
                self._metrics_waiting = []
                raise

    def _metrics_collected(self, reports: List[RouterReport]) -> None:
        waiting, self._metrics_waiting = self._metrics_waiting, []
        merged = metrics.merge([r.metrics for r in reports if r.metrics is not None],
                               self.cfg.fastrouter_metrics_max_keys)
        text = metrics.render(merged, metrics.subscription_counters(self.subscriptions, self.table))
        for deliver in waiting:
            try:
                deliver(text)
            except Exception as exc:  # one broken client must not cost the others theirs
                log("[uwsgi-fastrouter] unable to send the metrics: %r" % (exc,))

    def _gather_stats(self, deliver) -> None:
        """A stats request: collect the router processes' counters (without waiting on
        this loop), then *deliver* the document.  Requests arriving while a collection
        is under way share it."""
        self._stats_waiting.append(deliver)
        if len(self._stats_waiting) == 1:
            try:
                self.master.collect_reports(RouterReport, self._reports_collected)
            except BaseException:
                self._stats_waiting = []    # the next request starts afresh
                raise

    def _reports_collected(self, reports: List[RouterReport]) -> None:
        waiting, self._stats_waiting = self._stats_waiting, []
        document = self._stats_document(reports)
        for deliver in waiting:
            try:
                deliver(document)
            except Exception as exc:  # one broken client must not cost the others theirs
                log("[uwsgi-fastrouter] unable to send the stats document: %r" % (exc,))

    def _stats_document(self, reports: List[RouterReport]) -> dict:
        names = [l.name for l in self.listeners] + [d.name for d in self.datagram]
        static = None
        # health checks: a node is shown down while some router process holds it down
        health = getattr(self.cfg, "fastrouter_health_check_interval", 0) > 0
        down = set().union(*(r.down for r in reports)) if health else None
        if self.cfg.fastrouter_to:
            static = []
            for i, name in enumerate(self.cfg.fastrouter_to):
                hits = sum(r.static[i][0] for r in reports if i < len(r.static))
                grace = max([r.static[i][1] for r in reports if i < len(r.static)] or [0])
                static.append(_StaticView(name, hits, grace, bool(down) and name in down))
        table = self.table
        extra = None
        if table is not None:
            extra = lambda d: d.__setitem__("subscriptions", _aggregate(table, reports, down))
        return build_document(_SessionsView(sum(r.sessions for r in reports)), names,
                              static_nodes=static, extra=extra, health=health,
                              cheap=bool(reports) and all(r.cheap for r in reports),
                              counters=metrics.merge([r.metrics for r in reports if r.metrics is not None]))

    def start_master(self) -> None:
        self.subscriptions_blocked = bool(self.cfg.start_unsubscribed)
        if self.subscriber is not None and not self.subscriptions_blocked:
            self.reactor.call_soon(self.subscriber.start)
        if self.subscriptions is not None:
            self.subscriptions.start()
        if self.stats is not None:
            self.stats.start()
        if self.metrics is not None:
            self.metrics.start()
        if self.zerg is not None:
            self.zerg.start()

    def toggle_subscriptions(self) -> None:
        """Master FIFO ``S``: stop announcing (and unsubscribe), or start again."""
        if self.subscriber is None:
            if not (self.cfg.subscribe_to or self.cfg.subscribe2):
                return
            self.subscriber = make_subscriber(self.cfg, self.reactor, self.parts)
            self.subscriptions_blocked = True
        if self.subscriptions_blocked:
            self.subscriptions_blocked = False
            if self.subscriber._stopped:
                self.subscriber = make_subscriber(self.cfg, self.reactor, self.parts)
            self.subscriber.start()
            log("subscriptions unblocked")
        else:
            self.subscriptions_blocked = True
            self.subscriber.stop(unsubscribe=True)
            log("subscriptions blocked")

    def before_reload(self, graceful: bool) -> None:
        """uWSGI: a brutal reload unsubscribes; a graceful one only when asked to."""
        if self.subscriber is not None and not self.subscriptions_blocked:
            self.subscriber.stop(unsubscribe=not graceful or self.cfg.unsubscribe_on_graceful_reload,
                                 drain=graceful and self.cfg.drain_on_graceful_reload)

    def stop_master(self) -> None:
        if self.subscriber is not None:
            self.subscriber.stop(unsubscribe=True)
            self.subscriber = None
        if self.subscriptions is not None:
            self.subscriptions.stop()
        if self.stats is not None:
            self.stats.stop()
        if self.metrics is not None:
            self.metrics.stop()
        if self.zerg is not None:
            self.zerg.stop()

    def node_failed(self, payload: bytes) -> None:
        key, _, address = payload.partition(b"\0")
        table = self.table
        if table is None:
            return
        pool = table.pool(key)
        if pool is not None:
            for node in pool.nodes:
                if node.name == address:
                    # Logged by the router process that saw it fail.
                    table.quietly(table.connect_failed, key, node, time.time())
                    break

    def node_drained(self, address: bytes, drained: bool) -> None:
        """The master FIFO drained *address* (or took the drain back); the router
        processes hear it from the master, and the ones spawned later at birth."""
        if drained:
            self.drained.add(address)
        else:
            self.drained.discard(address)
        log("[master-fifo] %s node %s" % ("draining" if drained else "no longer draining",
                                          printable(address)))
        if self.table is not None:
            self.table.set_drained(address, drained, time.time())

    def tick(self) -> None:
        if self.table is not None:
            self.table.expire(time.time())

    def close_master_only(self) -> None:
        """In a child: the master's own sockets are not the child's business."""
        for item in self.datagram + ([self.stats_listener] if self.stats_listener else []) \
                + ([self.parts.zerg_listener] if self.parts.zerg_listener else []) \
                + ([self.parts.metrics_listener] if self.parts.metrics_listener else []):
            try:
                item.sock.close()
            except OSError:
                pass

    def close_all(self) -> None:
        for closable in self.parts.closables:
            closable.close(unlink=True)


class _StaticView:
    __slots__ = ("name", "hits", "dead_since", "down")

    def __init__(self, name, hits, dead_since, down=False) -> None:
        self.name, self.hits, self.dead_since, self.down = name, hits, dead_since, down


class _SessionsView:
    __slots__ = ("active_sessions",)

    def __init__(self, n: int) -> None:
        self.active_sessions = n


def _aggregate(table, reports: List[RouterReport], down: Optional[set] = None) -> Streamed:
    """The master's table with every router process's counters summed, as a
    :class:`~uwsgi_fastrouter.stats.Streamed` member: a pool at a time.  *down*: the
    addresses some router process's health checks hold down (None: no checks)."""
    return Streamed(lambda: live_pools(
        table, lambda pool: _with_totals(pool_stats(pool), reports, down)))


def _with_totals(record: dict, reports: List[RouterReport], down: Optional[set] = None) -> dict:
    """A pool's record with the router processes' counters summed into it (and, with
    health checks, each node's ``health``)."""
    key = record["key"].decode("latin-1")
    entries = [entry for entry in (report.pool(key) for report in reports) if entry]
    record["hits"] = sum(entry[0] for entry in entries)
    for node in record["nodes"]:
        name = node["name"].decode("latin-1")
        totals = [0, 0, 0, 0, 0, 0]
        for entry in entries:
            counters = entry[1].get(name)
            if counters:
                totals = [a + b for a, b in zip(totals, counters)]
        (node["requests"], node["last_requests"], node["tx"], node["rx"], node["ref"],
         failcnt) = totals
        node["failcnt"] = max(node["failcnt"], failcnt)
        if down is not None:
            node["health"] = "down" if name in down else "up"
    return record


def _make_health_checker(cfg, reactor, router, table):
    """--fastrouter-health-check-*: the PING checker of this router process, or None."""
    if cfg.fastrouter_health_check_interval <= 0:
        return None
    if table is not None:
        table.health_checked = True
    return health.HealthChecker(
        reactor, router.health_targets, router.node_health_changed,
        interval=cfg.fastrouter_health_check_interval,
        timeout=cfg.fastrouter_health_check_deadline or 2,
        fails=cfg.fastrouter_health_check_fails, passes=cfg.fastrouter_health_check_passes,
        max_probes=cfg.fastrouter_health_check_max_probes)


def _hash_var(cfg) -> Optional[bytes]:
    """--fastrouter-hash-var as bytes, or None."""
    name = cfg.fastrouter_hash_var
    return name.encode("utf-8", "surrogateescape") if name else None


def _make_table(cfg) -> SubscriptionTable:
    if cfg.subscription_algo not in ALGORITHMS:
        log('[uwsgi-subscription] unknown --subscription-algo "%s": using wrr' % cfg.subscription_algo)
    return SubscriptionTable(
        tolerance=cfg.subscription_tolerance or 17, algo=cfg.subscription_algo or "wrr",
        max_keys=cfg.subscription_max_keys, max_nodes=cfg.subscription_max_nodes,
        log=log, pid=os.getpid(), verifier=_signature_checker(cfg),
        sign_tolerance=cfg.subscriptions_sign_check_tolerance,
        slow_start=cfg.subscription_slow_start, drain_timeout=cfg.subscription_drain_timeout)


def _skip_uids(cfg) -> list:
    try:
        return [int(u) for u in cfg.subscriptions_sign_skip_uid]
    except ValueError:
        raise StartupError('option "--subscriptions-sign-skip-uid": not a number')


def wire_child(cfg, reactor: Reactor, sockets: MasterSockets, channel) -> Assembly:
    """A router process under a master: the inherited listeners, a table fed by the master."""
    parts = Assembly()
    parts.share_mappers(sockets.parts)
    _wire(cfg, reactor, parts, sockets.listeners, sockets.datagram, None, external=False)
    parts.external_subscriptions = False
    if parts.table is not None and sockets.table is not None:
        parts.table.load(sockets.table.dump(), time.time())
    for address in sockets.drained:
        parts.apply_drain(address, True)
    mapper = parts.server.router.subscriptions
    if mapper is not None:
        mapper.on_failed = lambda key, address: parts.report_failure and parts.report_failure(key, address)
    return parts


def make_subscriber(cfg, reactor: Reactor, parts: Assembly):
    """``--subscribe-to`` / ``--subscribe2``: announce this instance (None when not asked)."""
    if not cfg.subscribe_to and not cfg.subscribe2:
        return None
    from .subscriber import SubscribeError, Subscriber, parse_subscribe2, parse_subscribe_to
    specs: list = []
    option = "subscribe-to"
    try:
        for value in cfg.subscribe_to:
            parsed = parse_subscribe_to(value)
            specs.extend(parsed if isinstance(parsed, list) else [parsed])
        option = "subscribe2"
        for value in cfg.subscribe2:
            specs.append(parse_subscribe2(value))
    except SubscribeError as exc:
        raise StartupError('option "--%s": %s' % (option, exc))
    modifier1 = None
    if cfg.subscribe_with_modifier1:
        try:
            modifier1 = int(cfg.subscribe_with_modifier1) % 256
        except ValueError:
            raise StartupError('option "--subscribe-with-modifier1": not a number')
    apps = parts.app_listeners
    processes = (cfg.processes or 1) if apps else 0
    default = apps[0].name.encode("utf-8", "surrogateescape") if apps else None

    def by_index(items):
        return lambda n: items[n].name.encode("utf-8", "surrogateescape") if 0 <= n < len(items) else None

    def backlog() -> int:
        return 0

    weight = processes if cfg.auto_weight else (cfg.weight or 0)
    notify = cfg.subscription_notify_socket.encode() if cfg.subscription_notify_socket else None
    return Subscriber(reactor, specs, default_address=default, freq=cfg.subscribe_freq or 10,
                      cores=processes, load=backlog, weight=weight,
                      resolve_shared=by_index(parts.shared), resolve_socket=by_index(apps),
                      modifier1=modifier1, notify=notify,
                      credentials=cfg.subscriptions_use_credentials)


def prepare_mappers(cfg, parts: Assembly) -> None:
    """Build the mapper plug-ins once, on the bound sockets, before any process forks.

    A plug-in that cannot be built (no cache, a code-string file that does not load)
    is a :class:`StartupError` naming its option, raised here in the process that
    was started -- never in a forked router process, where it could only die and be
    respawned again and again.  The cache mapper reads shared memory, so the router
    processes forked later see every change; a code-string module is loaded once and
    each router process gets its own copy of its globals.
    """
    option = "fastrouter-use-cache"
    try:
        if cfg.fastrouter_use_cache is not None:
            from .cache import CacheMapper
            parts.use_cache = CacheMapper(parts.registry, cfg.fastrouter_use_cache or None)
        option = "fastrouter-use-code-string"
        if cfg.fastrouter_use_code_string:
            from .codestring import CodeStringMapper
            parts.code_string = CodeStringMapper(cfg.fastrouter_use_code_string)
    except ValueError as exc:
        raise StartupError('option "--%s": %s' % (option, exc))
    if cfg.fastrouter_use_socket is not None:
        index = _shared_index("=" + str(cfg.fastrouter_use_socket or "0"))
        if index < len(parts.app_listeners):
            parts.use_socket = parts.app_listeners[index].name
        else:
            log("[uwsgi-fastrouter] --fastrouter-use-socket: there is no socket %d: mapper not installed"
                % index)


def prepare_scripts(cfg, parts: Assembly) -> None:
    """Caches first, then the start-up scripts (once, before any process forks): a
    ``--file`` fills the caches through the ``uwsgi`` module; with ``--socket`` the
    ``--wsgi-file``/``--module`` is the local app and is loaded here, in the master."""
    from .cache import CacheRegistry
    from .scripts import ScriptError, run_startup_scripts
    from .uwsgi_shim import install, options_from_config
    try:
        parts.registry = CacheRegistry.from_options(cfg.cache, cfg.cache_blocksize, cfg.cache2)
    except ValueError as exc:
        raise StartupError(str(exc))
    if cfg.socket or cfg.zerg:
        from .wsgiserver import AppLoadError, load_application
        install(parts.registry, options_from_config(cfg))
        if cfg.file:
            try:
                run_startup_scripts([cfg.file], [], [], registry=parts.registry,
                                    options=options_from_config(cfg))
            except ScriptError as exc:
                raise StartupError(str(exc))
        if cfg.wsgi_file or cfg.module:
            try:
                parts.app = load_application(wsgi_file=cfg.wsgi_file, module=cfg.module)
            except AppLoadError as exc:
                raise StartupError(str(exc))
        return
    try:
        run_startup_scripts([cfg.file] if cfg.file else [], [cfg.wsgi_file] if cfg.wsgi_file else [],
                            [cfg.module] if cfg.module else [], registry=parts.registry,
                            options=options_from_config(cfg))
    except ScriptError as exc:
        raise StartupError(str(exc))
