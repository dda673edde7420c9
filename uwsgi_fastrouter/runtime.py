"""The one wiring: from a configuration to a running router, alone or under a master.

Theory of operation
-------------------
Three shapes run the same parts, and this module builds all three:

* the single-process router (:func:`build`, used by :mod:`uwsgi_fastrouter.cli`):
  it binds, then runs the router, the subscription server, the stats and metrics
  endpoints and the zerg server on one loop;
* the pre-fork master (:class:`MasterRuntime`, used by
  :mod:`uwsgi_fastrouter.master`): it binds (or adopts after a reload), and runs the
  subscription server with the master's copy of the table, the stats and metrics
  endpoints (which gather the router processes' counters) and the zerg server;
* a router process under the master (:func:`wire_child`): the inherited listeners,
  and a table fed by the master over the channel (no subscription socket, no
  endpoint of its own).

Every shape starts with :func:`prepare`: the checks of
:mod:`uwsgi_fastrouter.validation`, the caches and start-up scripts, the sockets
(:class:`~uwsgi_fastrouter.binding.Bindings`) and the mapper plug-ins, all before
any fork, so that a configuration that cannot run fails once, in the process that
was started.  The subscription table, the subscription server, the stats server,
the metrics server and the zerg server are each made by one function here
(:func:`make_table`, :func:`subscription_server`, :func:`stats_server`,
:func:`metrics_server`, :func:`zerg_server`), whichever shape asks for them.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterator, List, Optional, Tuple

from . import balancing, health, metrics
from .accesslog import AccessLog
from .addresses import shared_socket_index
from .binding import Bindings
from .endpoints import MetricsServer, StatsServer
from .expiry import SlicedExpiry
from .log import log, printable
from .names import NameTable, expand, names_in
from .nodecaps import NodeCaps
from .options import StartupError, access_log_target
from .reactor import Reactor
from .resolver import Resolver
from .router import Router, SubscriptionMapper
from .server import Server
from .keyfile import read_hmac_key_file
from .signing import HmacChecker, SignatureChecker, SigningError, proof_checker
from .stats import RouterReport, build_document, master_document, report_parts, subscription_stream
from .statsfork import ForkedRenderers
from .subscription import ALGORITHMS, SubscriptionTable
from .subserver import SubscriptionServer
from .validation import (chmod_mode, node_tls, skip_uids, source_allow_list, subscribe_modifier1,
                         subscribe_specs, validate, var_stripper)
from .zerg import ZergServer

__all__ = ["StartupError", "Prepared", "RouterRuntime", "MasterRuntime", "prepare", "build",
           "wire_child", "make_subscriber"]


# --------------------------------------------------------------------------
# Before any fork


class Prepared:
    """What is made once, before any process forks: the sockets, the caches, the
    mapper plug-ins and the local app.  A router process under a master uses the
    master's (the cache memory is shared across the fork)."""

    def __init__(self, bindings: Optional[Bindings] = None) -> None:
        self.bindings = bindings if bindings is not None else Bindings()
        self.registry = None                 # the caches (--cache, --cache2)
        self.use_cache = None                # --fastrouter-use-cache
        self.code_string = None              # --fastrouter-use-code-string
        self.use_socket: Optional[str] = None    # --fastrouter-use-socket: the app socket's name
        self.app = None                      # the local WSGI app (--socket + --wsgi-file/--module)


def prepare(cfg, inherited: Optional[dict] = None) -> Prepared:
    """Check *cfg*, run the start-up scripts, bind (or adopt the sockets of
    *inherited*, after a reload's re-exec) and build the mapper plug-ins."""
    validate(cfg)
    prepared = Prepared()
    prepare_scripts(cfg, prepared)
    prepared.bindings = Bindings.adopt(inherited) if inherited else Bindings.bind(cfg, chmod_mode(cfg))
    try:
        prepare_mappers(cfg, prepared)
    except BaseException:
        prepared.bindings.close_all()
        raise
    return prepared


def prepare_scripts(cfg, prepared: Prepared) -> None:
    """Caches first, then the start-up scripts (once, before any process forks): a
    ``--file`` fills the caches through the ``uwsgi`` module; with ``--socket`` the
    ``--wsgi-file``/``--module`` is the local app and is loaded here, in the master."""
    from .cache import CacheRegistry
    from .scripts import ScriptError, run_startup_scripts
    from .uwsgi_shim import install, options_from_config
    try:
        prepared.registry = CacheRegistry.from_options(cfg.cache, cfg.cache_blocksize, cfg.cache2)
    except ValueError as exc:
        raise StartupError(str(exc))
    if cfg.socket or cfg.zerg:
        from .wsgiserver import AppLoadError, load_application
        install(prepared.registry, options_from_config(cfg))
        if cfg.file:
            try:
                run_startup_scripts([cfg.file], [], [], registry=prepared.registry,
                                    options=options_from_config(cfg))
            except ScriptError as exc:
                raise StartupError(str(exc))
        if cfg.wsgi_file or cfg.module:
            try:
                prepared.app = load_application(wsgi_file=cfg.wsgi_file, module=cfg.module)
            except AppLoadError as exc:
                raise StartupError(str(exc))
        return
    try:
        run_startup_scripts([cfg.file] if cfg.file else [], [cfg.wsgi_file] if cfg.wsgi_file else [],
                            [cfg.module] if cfg.module else [], registry=prepared.registry,
                            options=options_from_config(cfg))
    except ScriptError as exc:
        raise StartupError(str(exc))


def prepare_mappers(cfg, prepared: Prepared) -> None:
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
            prepared.use_cache = CacheMapper(prepared.registry, cfg.fastrouter_use_cache or None)
        option = "fastrouter-use-code-string"
        if cfg.fastrouter_use_code_string:
            from .codestring import CodeStringMapper
            prepared.code_string = CodeStringMapper(cfg.fastrouter_use_code_string)
    except ValueError as exc:
        raise StartupError('option "--%s": %s' % (option, exc))
    if cfg.fastrouter_use_socket is not None:
        index = shared_socket_index("=%d" % cfg.fastrouter_use_socket)
        app = prepared.bindings.app
        if index < len(app):
            prepared.use_socket = app[index].name
        else:
            log("[uwsgi-fastrouter] --fastrouter-use-socket: there is no socket %d: mapper not installed"
                % index)


# --------------------------------------------------------------------------
# The parts, each made in one place


def make_table(cfg) -> SubscriptionTable:
    if cfg.subscription_algo not in ALGORITHMS:
        log('[uwsgi-subscription] unknown --subscription-algo "%s": using wrr' % cfg.subscription_algo)
    return SubscriptionTable(
        tolerance=cfg.subscription_tolerance, algo=cfg.subscription_algo,
        max_keys=cfg.subscription_max_keys, max_nodes=cfg.subscription_max_nodes,
        log=log, pid=os.getpid(), verifier=_signature_checker(cfg),
        sign_tolerance=cfg.subscriptions_sign_check_tolerance,
        slow_start=cfg.subscription_slow_start, drain_timeout=cfg.subscription_drain_timeout)


def health_checker(cfg, reactor: Reactor, router: Router, table: Optional[SubscriptionTable]
                   ) -> Optional[health.HealthChecker]:
    """``--fastrouter-health-check-*``: the PING checker of this router process, or None."""
    if cfg.fastrouter_health_check_interval <= 0:
        return None
    if table is not None:
        table.health_checked = True
    return health.HealthChecker(
        reactor, router.health_targets, router.node_health_changed,
        interval=cfg.fastrouter_health_check_interval,
        timeout=cfg.fastrouter_health_check_deadline,
        fails=cfg.fastrouter_health_check_fails, passes=cfg.fastrouter_health_check_passes,
        max_probes=cfg.fastrouter_health_check_max_probes)


def _signature_checker(cfg):
    """The table's verifier: RSA (``--subscriptions-sign-check``), the shared key
    (``--subscriptions-hmac-key``), both, or ``None``."""
    shared = None
    if cfg.subscriptions_hmac_key:
        shared = HmacChecker(_hmac_key(cfg, "subscriptions-hmac-key"))
    return proof_checker(_rsa_checker(cfg), shared)


def _hmac_key(cfg, option: str) -> bytes:
    try:
        return read_hmac_key_file(getattr(cfg, option.replace("-", "_")))
    except SigningError as exc:
        raise StartupError('option "--%s": %s' % (option, exc))


def _rsa_checker(cfg):
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


def make_resolver(cfg, reactor: Reactor) -> Resolver:
    """Host name lookups off the loop, every ``--fastrouter-resolve-interval`` seconds."""
    return Resolver(reactor, NameTable(interval=cfg.fastrouter_resolve_interval, log=log))


def subscription_server(cfg, reactor: Reactor, table: SubscriptionTable, bindings: Bindings, *,
                        forwards: bool, on_node: Callable[[], None] = lambda: None,
                        on_empty: Callable[[], None] = lambda: None,
                        names: Optional[Resolver] = None) -> SubscriptionServer:
    """The subscription server on *bindings*' datagram sockets.  *forwards*: packets are
    forwarded to ``--fastrouter-resubscribe`` (not by a router process under a master,
    whose packets come from the master, which forwards them)."""
    listeners = bindings.listeners
    own = listeners[0].name.encode("utf-8", "surrogateescape") if listeners else b""
    return SubscriptionServer(
        reactor, table, bindings.datagram, wall_clock=time.time, on_node=on_node, on_empty=on_empty,
        resubscribe=cfg.fastrouter_resubscribe if forwards else (),
        resubscribe_bind=cfg.fastrouter_resubscribe_bind if forwards else None,
        own_address=own, use_credentials=cfg.subscriptions_use_credentials,
        credentials_check=cfg.subscriptions_credentials_check, skip_uids=skip_uids(cfg),
        allow=source_allow_list(cfg), names=names if cfg.subscription_resolve_names else None)


def stats_server(cfg, reactor: Reactor, bindings: Bindings, *, document=None, gather=None,
                 render_elsewhere=None) -> Optional[StatsServer]:
    """``--fastrouter-stats``: None when not asked for."""
    if bindings.stats is None:
        return None
    return StatsServer(reactor, bindings.stats, document, gather=gather, minified=cfg.stats_minified,
                       http=cfg.stats_http, timeout=cfg.socket_timeout, render_elsewhere=render_elsewhere)


def metrics_server(cfg, reactor: Reactor, bindings: Bindings, gather) -> Optional[MetricsServer]:
    """``--fastrouter-metrics``: None when not asked for."""
    if bindings.metrics is None:
        return None
    return MetricsServer(reactor, bindings.metrics, gather, timeout=cfg.socket_timeout)


def zerg_server(reactor: Reactor, bindings: Bindings) -> Optional[ZergServer]:
    """``--zerg-server``: None when not asked for."""
    if bindings.zerg_server is None:
        return None
    return ZergServer(reactor, bindings.zerg_server, bindings.listeners)


def socket_names(bindings: Bindings) -> List[str]:
    """The ``fastrouter`` member of the stats: the router's listeners, then the
    subscription sockets."""
    return [l.name for l in bindings.listeners] + [d.name for d in bindings.datagram]


def _hash_var(cfg) -> Optional[bytes]:
    """--fastrouter-hash-var as bytes, or None."""
    name = cfg.fastrouter_hash_var
    return name.encode("utf-8", "surrogateescape") if name else None


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


def mark_failed_quietly(table: Optional[SubscriptionTable], key: bytes, address: bytes):
    """A connect to *address* for *key* failed in another process (which logged it):
    mark the node in this process's copy of the table; the node, or None."""
    pool = table.pool(key) if table is not None else None
    if pool is None:
        return None
    for node in pool.nodes:
        if node.name == address:
            table.quietly(table.connect_failed, key, node, time.time())
            return node
    return None


# --------------------------------------------------------------------------
# One router process


class RouterRuntime:
    """Everything one router process runs, and what must be closed at the end."""

    def __init__(self, prepared: Optional[Prepared] = None, under_master: bool = False) -> None:
        self.prepared = prepared if prepared is not None else Prepared()
        self.under_master = under_master     # the table is fed by the master
        self.server: Optional[Server] = None
        self.access_log: Optional[AccessLog] = None
        self.table: Optional[SubscriptionTable] = None
        self.subscriptions: Optional[SubscriptionServer] = None
        self.stats: Optional[StatsServer] = None
        self.metrics: Optional[MetricsServer] = None
        self.zerg: Optional[ZergServer] = None
        self.health: Optional[health.HealthChecker] = None  # --fastrouter-health-check-interval
        self.resolver: Optional[Resolver] = None   # host names of nodes, when there are some
        self.report_failure = None           # (key, address) -> None, set under a master
        self.expiry: Optional[SlicedExpiry] = None   # the table's one-second sweep

    def start(self) -> None:
        if self.resolver is not None:
            self.resolver.start()
        self.server.start()
        if self.health is not None:
            self.health.start()
        for part in self._services():
            part.start()

    def stop(self, unlink: bool = True) -> None:
        if self.health is not None:
            self.health.stop()
        if self.resolver is not None:
            self.resolver.stop()
        if self.zerg is not None:
            self.zerg.stop()
        if self.server is not None:
            self.server.stop()
        if self.access_log is not None:
            self.access_log.close()      # the lines of the sessions just dropped too
        for part in (self.subscriptions if not self.under_master else None, self.stats, self.metrics):
            if part is not None:
                part.stop()
        if not self.under_master:        # a router process leaves the sockets to the master
            self.prepared.bindings.close_all(unlink=unlink)

    def _services(self) -> Iterator:
        """What runs beside the router on this loop (a process under a master has
        no endpoint and reads no subscription socket)."""
        for part in (self.subscriptions if not self.under_master else None, self.stats, self.metrics,
                     self.zerg):
            if part is not None:
                yield part

    # ---- under a master: the subscription table is fed by the master

    def apply_announcements(self, batch: list) -> None:
        if self.subscriptions is not None:
            self.subscriptions.apply_mirrored(batch)

    def apply_drain(self, address: bytes, drained: bool) -> None:
        """The master drained *address* (the master FIFO's ``D``/``U`` commands)."""
        self.server.router.node_drained(address, drained)

    def apply_failure(self, key: bytes, address: bytes) -> None:
        node = mark_failed_quietly(self.table, key, address)
        if node is not None and self.table.empty and not node.ref:
            self.server.go_cheap()

    def report_parts(self, pools_per_part: int = 32, totals_only: bool = False) -> Iterator[dict]:
        """This process's counters for the master's stats (see
        :func:`~uwsgi_fastrouter.stats.report_parts`)."""
        return report_parts(self.server, self.table, pools_per_part, totals_only, self.health)


def build(cfg, reactor: Reactor) -> RouterRuntime:
    """The single-process router: bind everything *cfg* asks for and wire it together."""
    prepared = prepare(cfg)
    runtime = RouterRuntime(prepared)
    try:
        _wire_router(cfg, reactor, runtime)
    except BaseException:
        runtime.stop()
        raise
    return runtime


def wire_child(cfg, reactor: Reactor, master: "MasterRuntime", channel) -> RouterRuntime:
    """A router process under a master: the inherited listeners, a table fed by the master."""
    runtime = RouterRuntime(master.prepared, under_master=True)
    _wire_router(cfg, reactor, runtime)
    if runtime.table is not None and master.table is not None:
        runtime.table.load(master.table.dump(), time.time())
    for address in master.drained:
        runtime.apply_drain(address, True)
    mapper = runtime.server.router.subscriptions
    if mapper is not None:
        mapper.on_failed = lambda key, address: runtime.report_failure and runtime.report_failure(key, address)
    return runtime


def node_caps(cfg) -> Optional[NodeCaps]:
    """The per-node concurrency caps (nodecaps.py), None when no cap is set."""
    if not cfg.fastrouter_node_max_conns and not cfg.fastrouter_node_max_conns_per_core:
        if cfg.fastrouter_node_queue_wait:
            log("[uwsgi-fastrouter] --fastrouter-node-queue-wait has no effect without "
                "--fastrouter-node-max-conns or --fastrouter-node-max-conns-per-core")
        return None
    return NodeCaps(cfg.fastrouter_node_max_conns, cfg.fastrouter_node_max_conns_per_core,
                    cfg.fastrouter_node_queue_wait)


def _wire_router(cfg, reactor: Reactor, runtime: RouterRuntime) -> None:
    """Build the router and what runs beside it on the bound sockets."""
    prepared = runtime.prepared
    bindings = prepared.bindings
    external = not runtime.under_master
    has_table = bool(bindings.datagram)
    force_key = None
    if cfg.fastrouter_force_key:
        force_key = cfg.fastrouter_force_key.encode("utf-8", "surrogateescape")
    server_ref: list = []

    def on_empty() -> None:
        if server_ref:
            server_ref[0].go_cheap()

    mapper = None
    if has_table:
        runtime.table = make_table(cfg)
        fallback_key = None
        if cfg.fastrouter_subscription_fallback_key:
            fallback_key = cfg.fastrouter_subscription_fallback_key.encode("utf-8", "surrogateescape")
        mapper = SubscriptionMapper(
            runtime.table, fallback_key=fallback_key, dotsplit=cfg.subscription_dotsplit,
            on_empty=on_empty, has_fallbacks=bool(cfg.fastrouter_fallback),
            mountpoints=cfg.subscription_mountpoints,
            client_of=balancing.make_client_of(_hash_var(cfg)))
    router = Router(
        use_cache=prepared.use_cache, code_string=prepared.code_string, use_socket=prepared.use_socket,
        to=cfg.fastrouter_to,
        use_pattern=cfg.fastrouter_use_pattern,
        use_base=cfg.fastrouter_use_base,
        fallback=cfg.fastrouter_fallback,
        fallback_on_no_key=cfg.fastrouter_fallback_on_no_key,
        gracetime=cfg.fastrouter_gracetime,
        max_retries=cfg.fastrouter_max_retries,
        quiet=cfg.fastrouter_quiet,
        subscriptions=mapper,
        forced_key=force_key is not None,
        caps=node_caps(cfg),
    )
    tls = node_tls(cfg, subscriptions=has_table)
    _resolve_router_names(cfg, reactor, runtime, router, has_table, tls)
    access_log, reopen_access_log = _make_access_log(cfg, reactor)
    listeners = bindings.listeners
    server = Server(reactor, router, listeners,
                    timeout=cfg.fastrouter_timeout,
                    chunk=cfg.fastrouter_buffer_size,
                    events=cfg.fastrouter_events,
                    force_key=force_key,
                    cheap=cfg.fastrouter_cheap and has_table,
                    fd_passing=not cfg.no_fd_passing,
                    trust_fd_passing=cfg.fastrouter_trust_fd_passing,
                    post_buffering=cfg.fastrouter_post_buffering,
                    post_buffering_dir=cfg.fastrouter_post_buffering_dir or None,
                    post_buffering_max=cfg.fastrouter_post_buffering_max,
                    post_buffering_min_rate=cfg.fastrouter_post_buffering_min_rate,
                    access_log=access_log,
                    strip_vars=var_stripper(cfg),
                    http_errors=cfg.fastrouter_http_errors,
                    tls=tls,
                    retry_after_connect=cfg.fastrouter_retry_after_connect)
    server.counters = metrics.Counters(detailed=bool(cfg.fastrouter_metrics),
                                       max_keys=cfg.fastrouter_metrics_max_keys)
    if reopen_access_log is not None:
        server.periodic.append(reopen_access_log)
    runtime.access_log = access_log
    server_ref.append(server)
    runtime.server = server
    if has_table:
        scanner = balancing.make_scanner(cfg.subscription_mountpoints, _hash_var(cfg))
        if scanner is not None:
            server.scan_request = scanner
        table = runtime.table
        runtime.subscriptions = subscription_server(cfg, reactor, table, bindings, forwards=external,
                                                    on_node=server.leave_cheap, on_empty=on_empty,
                                                    names=runtime.resolver)

        def expired() -> None:
            if table.empty:
                on_empty()

        # under a master, a copy of the master's table: the master logs the expiries
        runtime.expiry = SlicedExpiry(reactor, table, quiet=not external, on_done=expired)
        server.periodic.append(runtime.expiry)
    runtime.health = health_checker(cfg, reactor, router, runtime.table)
    server.counters.health = runtime.health
    if cfg.fastrouter_cheap and not has_table:
        log("[uwsgi-fastrouter] --fastrouter-cheap has no effect without a subscription server")
    if not external:
        return    # the endpoints and the zerg server run in the master
    runtime.zerg = zerg_server(reactor, bindings)
    names = socket_names(bindings)
    static = router.static_nodes if cfg.fastrouter_to else None
    table = runtime.table
    extra = (lambda doc: doc.__setitem__("subscriptions", subscription_stream(table))) \
        if table is not None else None
    runtime.stats = stats_server(
        cfg, reactor, bindings,
        document=lambda: build_document(server, names, static_nodes=static, extra=extra,
                                        cheap=server.cheap, counters=server.counters.snapshot(server),
                                        health=runtime.health is not None))
    subscriptions = runtime.subscriptions

    def scrape(deliver) -> None:
        deliver(metrics.render(server.counters.snapshot(server),
                               metrics.subscription_counters(subscriptions, table)))

    runtime.metrics = metrics_server(cfg, reactor, bindings, scrape)


def _resolve_router_names(cfg, reactor: Reactor, runtime: RouterRuntime, router: Router,
                          has_table: bool, tls) -> None:
    """A resolver for the host names of ``--fastrouter-to``/``--fastrouter-fallback``
    (and of announces, with ``--subscription-resolve-names``; and of the
    ``--fastrouter-tls-node`` entries of the *tls* policy); none without names, so
    literal-only configurations run exactly as before."""
    names = router.host_names
    tls_names = names_in(cfg.fastrouter_tls_node) if tls is not None else []
    # under a master the announces arrive with the master's answers (subserver.py)
    announced = has_table and cfg.subscription_resolve_names and not runtime.under_master
    if not names and not tls_names and not announced:
        return
    resolver = runtime.resolver = make_resolver(cfg, reactor)
    for name in names + [n for n in tls_names if n not in names]:
        resolver.watch(name)
    if names:
        resolver.on_change.append(lambda: router.resolve_names(resolver.addresses))
        router.resolve_names(resolver.addresses)
    if tls_names:
        def addresses_of(address: bytes) -> List[bytes]:
            text = address.decode("utf-8", "surrogateescape")
            return [a.encode("utf-8", "surrogateescape")
                    for a in expand([text], resolver.addresses)]

        resolver.on_change.append(lambda: tls.resolve(addresses_of))
        tls.resolve(addresses_of)


def make_subscriber(cfg, reactor: Reactor, prepared: Prepared):
    """``--subscribe-to`` / ``--subscribe2``: announce this instance (None when not asked)."""
    if not cfg.subscribe_to and not cfg.subscribe2:
        return None
    specs = subscribe_specs(cfg)
    from .subscriber import Subscriber
    bindings = prepared.bindings
    apps = bindings.app
    processes = cfg.processes if apps else 0
    default = apps[0].name.encode("utf-8", "surrogateescape") if apps else None

    def by_index(items):
        return lambda n: items[n].name.encode("utf-8", "surrogateescape") if 0 <= n < len(items) else None

    def backlog() -> int:
        return 0

    weight = processes if cfg.auto_weight else cfg.weight
    notify = cfg.subscription_notify_socket.encode() if cfg.subscription_notify_socket else None
    hmac_key = _hmac_key(cfg, "subscribe-hmac-key") if cfg.subscribe_hmac_key else None
    named_servers = names_in(spec.server for spec in specs)
    return Subscriber(reactor, specs, default_address=default, freq=cfg.subscribe_freq,
                      cores=processes, load=backlog, weight=weight,
                      resolve_shared=by_index(bindings.shared), resolve_socket=by_index(apps),
                      modifier1=subscribe_modifier1(cfg), notify=notify,
                      credentials=cfg.subscriptions_use_credentials, hmac_key=hmac_key,
                      names=make_resolver(cfg, reactor) if named_servers else None)


# --------------------------------------------------------------------------
# The master


class MasterRuntime:
    """What the master runs itself on the sockets it binds (or adopts on a reload): the
    subscription server with the master's copy of the table, the stats and metrics
    endpoints, the zerg server and the subscriber.  Router processes inherit the
    listeners and get their table from :func:`wire_child`."""

    def __init__(self, cfg, prepared: Optional[Prepared] = None) -> None:
        self.cfg = cfg
        self.prepared = prepared if prepared is not None else Prepared()
        self.master = None
        self.reactor = None
        self.table: Optional[SubscriptionTable] = None
        self.subscriptions: Optional[SubscriptionServer] = None
        self.stats: Optional[StatsServer] = None
        self.metrics: Optional[MetricsServer] = None
        self.zerg: Optional[ZergServer] = None
        self.subscriber = None
        self.resolver: Optional[Resolver] = None   # announced host names (--subscription-resolve-names)
        self.subscriptions_blocked = False
        self.drained: set = set()        # addresses drained through the master FIFO
        self.expiry: Optional[SlicedExpiry] = None   # the master table's one-second sweep
        self._stats_waiting: list = []   # stats requests waiting for the collection under way
        self._metrics_waiting: list = []  # scrapes waiting for the collection under way

    @classmethod
    def bind(cls, cfg, inherited: Optional[dict]) -> "MasterRuntime":
        return cls(cfg, prepare(cfg, inherited))

    @property
    def listeners(self) -> list:
        return self.prepared.bindings.listeners

    def inheritable_state(self) -> dict:
        return self.prepared.bindings.inheritable_state()

    def take_listeners(self, index: int, processes: int) -> None:
        """In router process *index* (of *processes*), before it is wired: its own
        listening sockets under --fastrouter-reuse-port, else the shared ones."""
        self.prepared.bindings.keep_for_process(index, processes)

    def check_listener_groups(self, processes: int) -> None:
        """After a reload: say so when the per-process sockets inherited do not match
        what the configuration now asks for (the inherited ones are kept, so that no
        queued connection is reset; binding.py says how they are shared out)."""
        groups = 1 + len(self.prepared.bindings.per_process)
        wanted = processes if self.cfg.fastrouter_reuse_port else 1
        if groups != wanted:
            log("reload: the %d router process(es) share the %d listening socket(s) per "
                "address bound at start; a changed --fastrouter-reuse-port or "
                "--fastrouter-processes takes effect on a restart" % (processes, groups))

    # ---- in the master

    def setup_master(self, master, reactor, inherited: Optional[dict]) -> None:
        cfg = self.cfg
        bindings = self.prepared.bindings
        self.master = master
        self.reactor = reactor
        if bindings.datagram:
            self.table = master.table = make_table(cfg)
            self.expiry = SlicedExpiry(reactor, self.table)
            if inherited and inherited.get("table_fd") is not None:
                self._load_table(inherited["table_fd"])
            if cfg.subscription_resolve_names:
                self.resolver = make_resolver(cfg, reactor)
            self.subscriptions = subscription_server(cfg, reactor, self.table, bindings, forwards=True,
                                                     names=self.resolver)
            self.subscriptions.on_accepted = master.queue_announcement
        self.zerg = zerg_server(reactor, bindings)
        self.subscriber = make_subscriber(cfg, reactor, self.prepared)
        self.stats = stats_server(cfg, reactor, bindings, gather=self._gather_stats,
                                  render_elsewhere=ForkedRenderers(reactor, reap=False))
        self.metrics = metrics_server(cfg, reactor, bindings, self._gather_metrics)

    def _load_table(self, fd: int) -> None:
        """The table the previous image wrote before its re-exec."""
        try:
            with os.fdopen(fd, "rb") as handle:
                handle.seek(0)
                added = self.table.load(handle.read(), time.time())
            log("graceful reload: %d subscribed node(s) carried over" % added)
        except (OSError, ValueError) as exc:
            log("graceful reload: the subscription table could not be carried over: %s" % exc)

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
        document = master_document(reports, self.table, socket_names(self.prepared.bindings),
                                   self.cfg.fastrouter_to,
                                   health=self.cfg.fastrouter_health_check_interval > 0)
        for deliver in waiting:
            try:
                deliver(document)
            except Exception as exc:  # one broken client must not cost the others theirs
                log("[uwsgi-fastrouter] unable to send the stats document: %r" % (exc,))

    def _services(self) -> Iterator:
        for part in (self.resolver, self.subscriptions, self.stats, self.metrics, self.zerg):
            if part is not None:
                yield part

    def start_master(self) -> None:
        self.subscriptions_blocked = bool(self.cfg.start_unsubscribed)
        if self.subscriber is not None and not self.subscriptions_blocked:
            self.reactor.call_soon(self.subscriber.start)
        for part in self._services():
            part.start()

    def toggle_subscriptions(self) -> None:
        """Master FIFO ``S``: stop announcing (and unsubscribe), or start again."""
        if self.subscriber is None:
            if not (self.cfg.subscribe_to or self.cfg.subscribe2):
                return
            self.subscriber = make_subscriber(self.cfg, self.reactor, self.prepared)
            self.subscriptions_blocked = True
        if self.subscriptions_blocked:
            self.subscriptions_blocked = False
            if self.subscriber._stopped:
                self.subscriber = make_subscriber(self.cfg, self.reactor, self.prepared)
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
        for part in self._services():
            part.stop()

    def node_failed(self, payload: bytes) -> None:
        key, _, address = payload.partition(b"\0")
        mark_failed_quietly(self.table, key, address)

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
        if self.expiry is not None:
            self.expiry()

    def close_master_only(self) -> None:
        """In a child: the master's own sockets are not the child's business."""
        self.prepared.bindings.close_master_only()
        for resolver in (self.resolver, getattr(self.subscriber, "names", None)):
            if resolver is not None:
                resolver.abandon()

    def close_all(self) -> None:
        self.prepared.bindings.close_all(unlink=True)
