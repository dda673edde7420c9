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
from typing import List, Optional

from . import zerg
from .log import log
from .reactor import Reactor
from .router import Router, SubscriptionMapper
from .server import DEFAULT_CHUNK, Server
from .signing import SignatureChecker, SigningError
from .sockets import AddressError, bind_listener, bind_stream_server
from .stats import StatsServer, build_document, subscription_stats
from .subscription import SubscriptionTable
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
    if not cfg.fastrouter and not cfg.fastrouter_zerg:
        raise StartupError("no --fastrouter address given: nothing to route "
                           "(example: --fastrouter 127.0.0.1:3017)")
    if cfg.fastrouter_max_retries < 0:
        raise StartupError('invalid value for option "fastrouter-max-retries": must be >= 0')


class Assembly:
    """Everything one router process runs, and what must be closed at the end."""

    def __init__(self) -> None:
        self.server: Optional[Server] = None
        self.stats: Optional[StatsServer] = None
        self.subscriptions: Optional[SubscriptionServer] = None
        self.table = None
        self.zerg_listener = None
        self.zerg: Optional[zerg.ZergServer] = None
        self.closables: list = []       # listeners (stream and datagram), closed at exit

    def start(self) -> None:
        self.server.start()
        if self.subscriptions is not None:
            self.subscriptions.start()
        if self.stats is not None:
            self.stats.start()
        if self.zerg is not None:
            self.zerg.start()

    def stop(self) -> None:
        if self.zerg is not None:
            self.zerg.stop()
        if self.server is not None:
            self.server.stop()
        if self.subscriptions is not None:
            self.subscriptions.stop()
        if self.stats is not None:
            self.stats.stop()
        for closable in self.closables:
            closable.close(unlink=True)


def _bind_all(cfg, parts: Assembly) -> tuple:
    chmod = _chmod_value(cfg.chmod_socket)
    listeners, datagram = [], []
    stats_listener = None
    option = "fastrouter"
    try:
        for spec in cfg.fastrouter:
            listener = bind_listener(spec, backlog=cfg.listen, chmod=chmod,
                                     abstract_all=cfg.abstract_socket,
                                     defer_accept=cfg.socket_timeout)
            listeners.append(listener)
            parts.closables.append(listener)
            log("uWSGI fastrouter bound on %s fd %d" % (listener.name, listener.sock.fileno()))
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
    listeners, datagram, stats_listener = _bind_all(cfg, parts)
    try:
        return _wire(cfg, reactor, parts, listeners, datagram, stats_listener)
    except BaseException:
        parts.stop()
        raise


def _wire(cfg, reactor, parts, listeners, datagram, stats_listener) -> Assembly:
    force_key = None
    if cfg.fastrouter_force_key:
        force_key = cfg.fastrouter_force_key.encode("utf-8", "surrogateescape")
    server_ref: list = []

    def on_empty() -> None:
        if server_ref:
            server_ref[0].go_cheap()

    subscriptions = None
    if datagram:
        if cfg.subscription_algo not in ("wrr", "lrc", "wlrc"):
            log('[uwsgi-subscription] unknown --subscription-algo "%s": using wrr' % cfg.subscription_algo)
        parts.table = SubscriptionTable(
            tolerance=cfg.subscription_tolerance or 17, algo=cfg.subscription_algo or "wrr",
            max_keys=cfg.subscription_max_keys, max_nodes=cfg.subscription_max_nodes,
            log=log, pid=os.getpid(), verifier=_signature_checker(cfg),
            sign_tolerance=cfg.subscriptions_sign_check_tolerance)
        fallback_key = None
        if cfg.fastrouter_subscription_fallback_key:
            fallback_key = cfg.fastrouter_subscription_fallback_key.encode("utf-8", "surrogateescape")
        subscriptions = SubscriptionMapper(
            parts.table, fallback_key=fallback_key, dotsplit=cfg.subscription_dotsplit,
            on_empty=on_empty, has_fallbacks=bool(cfg.fastrouter_fallback))
    router = Router(
        to=cfg.fastrouter_to,
        use_pattern=cfg.fastrouter_use_pattern,
        use_base=cfg.fastrouter_use_base,
        fallback=cfg.fastrouter_fallback,
        fallback_on_no_key=cfg.fastrouter_fallback_on_no_key,
        gracetime=cfg.fastrouter_gracetime or 30,
        max_retries=cfg.fastrouter_max_retries,
        quiet=cfg.fastrouter_quiet,
        subscriptions=subscriptions,
    )
    server = Server(reactor, router, listeners,
                    timeout=cfg.fastrouter_timeout or 60,
                    chunk=cfg.fastrouter_buffer_size or DEFAULT_CHUNK,
                    events=cfg.fastrouter_events or 64,
                    force_key=force_key,
                    cheap=cfg.fastrouter_cheap and bool(datagram),
                    fd_passing=not cfg.no_fd_passing,
                    post_buffering=cfg.fastrouter_post_buffering,
                    post_buffering_dir=cfg.fastrouter_post_buffering_dir or None)
    server_ref.append(server)
    parts.server = server
    if parts.zerg_listener is not None:
        parts.zerg = zerg.ZergServer(reactor, parts.zerg_listener, listeners)
    if datagram:
        table = parts.table
        own = listeners[0].name.encode("utf-8", "surrogateescape") if listeners else b""
        try:
            skip = [int(u) for u in cfg.subscriptions_sign_skip_uid]
        except ValueError:
            raise StartupError('option "--subscriptions-sign-skip-uid": not a number')
        parts.subscriptions = SubscriptionServer(
            reactor, table, datagram, wall_clock=time.time,
            on_node=server.leave_cheap, on_empty=on_empty,
            resubscribe=cfg.fastrouter_resubscribe, resubscribe_bind=cfg.fastrouter_resubscribe_bind,
            own_address=own, use_credentials=cfg.subscriptions_use_credentials,
            credentials_check=cfg.subscriptions_credentials_check, skip_uids=skip)

        def expire(_now: float) -> None:
            table.expire(time.time())
            if table.empty:
                on_empty()

        server.periodic.append(expire)
    if cfg.fastrouter_cheap and not datagram:
        log("[uwsgi-fastrouter] --fastrouter-cheap has no effect without a subscription server")
    if stats_listener is not None:
        names = [l.name for l in listeners] + [d.name for d in datagram]
        static = router.static_nodes if cfg.fastrouter_to else None
        table = parts.table
        extra = (lambda doc: doc.__setitem__("subscriptions", subscription_stats(table))) \
            if table is not None else None
        parts.stats = StatsServer(
            reactor, stats_listener,
            lambda: build_document(server, names, static_nodes=static, extra=extra,
                                   cheap=server.cheap),
            minified=cfg.stats_minified, http=cfg.stats_http, timeout=cfg.socket_timeout or 4)
    return parts


