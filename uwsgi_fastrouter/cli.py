"""``uwsgi-fastrouter``: options -> sockets -> router, and back out on a signal.

Start-up order (each step can fail with a message and exit status 1, before anything
is served): parse every configuration source; check the combination; bind every
listener and the stats server (logging uWSGI's lines with the real addresses); build
the router; run the event loop until SIGINT, SIGQUIT or SIGTERM; close everything and
remove the UNIX socket files this process created.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
from typing import List, Optional

from . import __version__
from .log import log
from .options import ConfigError, EarlyExit, load_config
from .reactor import Reactor
from .router import Router
from .server import DEFAULT_CHUNK, Server
from .sockets import AddressError, bind_listener, bind_stream_server
from .stats import StatsServer, build_document

EXIT_OK = 0
EXIT_CONFIG = 1

_STOP_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM)


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
    if not cfg.fastrouter:
        raise StartupError("no --fastrouter address given: nothing to route "
                           "(example: --fastrouter 127.0.0.1:3017)")
    if cfg.fastrouter_max_retries < 0:
        raise StartupError('invalid value for option "fastrouter-max-retries": must be >= 0')


def build(cfg, reactor: Reactor):
    """Bind everything *cfg* asks for; returns ``(server, stats, listeners)``."""
    _check(cfg)
    chmod = _chmod_value(cfg.chmod_socket)
    listeners = []
    stats_listener = None
    option = "fastrouter"
    try:
        for spec in cfg.fastrouter:
            listener = bind_listener(spec, backlog=cfg.listen, chmod=chmod,
                                     abstract_all=cfg.abstract_socket,
                                     defer_accept=cfg.socket_timeout)
            listeners.append(listener)
            log("uWSGI fastrouter bound on %s fd %d" % (listener.name, listener.sock.fileno()))
        if cfg.fastrouter_stats:
            option = "fastrouter-stats"
            stats_listener = bind_stream_server(cfg.fastrouter_stats, backlog=cfg.listen)
            log("*** fastrouter stats server enabled on %s fd: %d ***"
                % (stats_listener.name, stats_listener.sock.fileno()))
    except AddressError as exc:
        for listener in listeners:
            listener.close()
        raise StartupError('option "--%s": %s' % (option, exc))

    force_key = None
    if cfg.fastrouter_force_key:
        force_key = cfg.fastrouter_force_key.encode("utf-8", "surrogateescape")
    router = Router(
        to=cfg.fastrouter_to,
        use_pattern=cfg.fastrouter_use_pattern,
        use_base=cfg.fastrouter_use_base,
        fallback=cfg.fastrouter_fallback,
        fallback_on_no_key=cfg.fastrouter_fallback_on_no_key,
        gracetime=cfg.fastrouter_gracetime or 30,
        max_retries=cfg.fastrouter_max_retries,
        quiet=cfg.fastrouter_quiet,
    )
    server = Server(reactor, router, listeners,
                    timeout=cfg.fastrouter_timeout or 60,
                    chunk=cfg.fastrouter_buffer_size or DEFAULT_CHUNK,
                    events=cfg.fastrouter_events or 64,
                    force_key=force_key)
    stats = None
    if stats_listener is not None:
        names = [l.name for l in listeners]
        static = router.static_nodes if cfg.fastrouter_to else None
        stats = StatsServer(
            reactor, stats_listener,
            lambda: build_document(server, names, static_nodes=static),
            minified=cfg.stats_minified, http=cfg.stats_http, timeout=cfg.socket_timeout or 4)
        listeners = listeners + [stats_listener]
    return server, stats, listeners


def run(cfg) -> int:
    reactor = Reactor(max_events=cfg.fastrouter_events or 64)
    try:
        server, stats, listeners = build(cfg, reactor)
    except (StartupError, AddressError) as exc:
        log(str(exc))
        reactor.close()
        return EXIT_CONFIG
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        log("detected max file descriptor number: %d" % soft)
    except (OSError, ValueError):
        pass
    log("spawned uWSGI fastrouter 1 (pid: %d)" % os.getpid())

    def on_stop(signum: int) -> None:
        log("received signal %d, shutting down the fastrouter (pid: %d)" % (signum, os.getpid()))
        reactor.stop()

    for signum in _STOP_SIGNALS:
        reactor.add_signal_handler(signum, on_stop)
    # A vanished log reader or client must not kill the process.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    server.start()
    if stats is not None:
        stats.start()
    try:
        reactor.run()
    finally:
        server.stop()
        if stats is not None:
            stats.stop()
        for listener in listeners:
            listener.close(unlink=True)
        reactor.close()
    log("goodbye from uwsgi-fastrouter %s (pid: %d)" % (__version__, os.getpid()))
    return EXIT_OK


def main(argv: Optional[List[str]] = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    try:
        cfg = load_config(list(argv), os.environ)
    except EarlyExit as early:
        sys.stdout.write(early.text)
        sys.stdout.flush()
        return early.code
    except ConfigError as exc:
        log(str(exc))
        return EXIT_CONFIG
    return run(cfg)
