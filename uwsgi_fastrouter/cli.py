"""``uwsgi-fastrouter``: options -> sockets -> router, and back out on a signal.

Start-up order (each step can fail with a message and exit status 1, before anything
is served): parse every configuration source; set ``--umask`` (before any file or
socket is created, as uWSGI does); check the combination; bind every listener and the
stats server (logging uWSGI's lines with the real addresses); build the router; write
the pidfile; run the event loop until SIGINT, SIGQUIT or SIGTERM; close everything and
remove the UNIX socket files this process created and the pidfile if it is still ours.
Under systemd (``$NOTIFY_SOCKET``) the single process reports READY=1 once its
listeners are polled and STOPPING=1 when a stop signal arrives; with a master, the
master does (see master.py).
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import stat
import sys
from typing import List, Optional

from . import __version__, sdnotify
from .runtime import StartupError, build, make_subscriber
from .log import log, set_date_format
from .options import ConfigError, EarlyExit, load_config, log_date_format
from .reactor import Reactor
from .sockets import AddressError

EXIT_OK = 0
EXIT_CONFIG = 1

_STOP_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM)


def needs_master(cfg) -> bool:
    """D1: one process unless a master is asked for or implied by several processes."""
    return bool(cfg.master or cfg.fastrouter_processes > 1 or cfg.socket or cfg.shared_socket
                or cfg.undeferred_shared_socket or cfg.zerg or cfg.fastrouter_harakiri or cfg.master_fifo
                or cfg.touch_reload)


def run_master(cfg, argv: List[str]) -> int:
    from .runtime import MasterRuntime, wire_child
    from .master import Master
    from .proccontrol import PrivilegeError, SetupError
    master = Master(cfg, argv, bind=MasterRuntime.bind, wire=wire_child,
                    startup_errors=(StartupError, AddressError))
    try:
        return master.run()
    except (StartupError, AddressError, SetupError, PrivilegeError) as exc:
        log(str(exc))
        return EXIT_CONFIG


def run(cfg) -> int:
    from .proccontrol import process_name, set_process_name
    set_process_name(process_name(cfg, "uWSGI fastrouter 1"))
    notifier = sdnotify.from_environ()
    if notifier is not None:
        notifier.status("uwsgi-fastrouter starting")
    reactor = Reactor(max_events=cfg.fastrouter_events)
    try:
        parts = build(cfg, reactor)
    except (StartupError, AddressError) as exc:
        log(str(exc))
        reactor.close()
        return EXIT_CONFIG
    if cfg.touch_logreopen:
        from .proccontrol import LogReopener, log_file
        reopener = LogReopener(cfg.touch_logreopen, log_file(cfg), announce=True)
        parts.server.periodic.append(reopener.check)
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        log("detected max file descriptor number: %d" % soft)
    except (OSError, ValueError):
        pass
    if cfg.pidfile:
        from .proccontrol import SetupError, write_pidfile
        try:
            write_pidfile(cfg.pidfile, os.getpid())
        except SetupError as exc:
            log(str(exc))
            parts.stop()
            reactor.close()
            return EXIT_CONFIG
    try:
        return _serve(cfg, reactor, parts, notifier)
    finally:
        if cfg.pidfile:
            from .proccontrol import remove_pidfile
            remove_pidfile(cfg.pidfile, os.getpid())


def _serve(cfg, reactor: Reactor, parts, notifier) -> int:
    def on_stop(signum: int) -> None:
        log("received signal %d, shutting down the fastrouter (pid: %d)" % (signum, os.getpid()))
        if notifier is not None:
            notifier.stopping("uwsgi-fastrouter shutting down")
        reactor.stop()

    for signum in _STOP_SIGNALS:
        reactor.add_signal_handler(signum, on_stop)
    # A master's reload leaves its signals blocked across the exec (see master.py); a
    # configuration that no longer asks for a master lands here with them still blocked.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS + (signal.SIGHUP, signal.SIGCHLD))
    # A vanished log reader or client must not kill the process.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # Logged once a stop signal is handled: whoever waits for this line may send one.
    log("spawned uWSGI fastrouter 1 (pid: %d)" % os.getpid())

    if cfg.uid or cfg.gid or cfg.fastrouter_uid or cfg.fastrouter_gid:
        from .proccontrol import PrivilegeError, drop_privileges, resolve_group, resolve_user
        uid, gid = cfg.fastrouter_uid or cfg.uid, cfg.fastrouter_gid or cfg.gid
        try:
            drop_privileges(resolve_user(uid) if uid else None, resolve_group(gid) if gid else None)
        except (PrivilegeError, ValueError) as exc:
            log(str(exc))
            parts.stop()
            reactor.close()
            return EXIT_CONFIG
    try:
        subscriber = make_subscriber(cfg, reactor, parts.prepared)
    except StartupError as exc:
        log(str(exc))
        parts.stop()
        reactor.close()
        return EXIT_CONFIG
    parts.start()
    if subscriber is not None:
        reactor.call_soon(subscriber.start)
    if notifier is not None:
        notifier.ready("uwsgi-fastrouter ready: %d listener(s), one process"
                       % len(parts.server.listeners))
    try:
        reactor.run()
    finally:
        if subscriber is not None:
            subscriber.stop(unsubscribe=True)
        parts.stop()
        reactor.close()
    log("goodbye from uwsgi-fastrouter %s (pid: %d)" % (__version__, os.getpid()))
    return EXIT_OK


def main(argv: Optional[List[str]] = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    warnings: List[str] = []
    try:
        cfg = load_config(list(argv), os.environ, warn=warnings.append)
    except EarlyExit as early:
        sys.stdout.write(early.text)
        sys.stdout.flush()
        return early.code
    except ConfigError as exc:
        for line in warnings:
            log(line)
        log(str(exc))
        return EXIT_CONFIG
    if cfg.umask is not None:
        os.umask(cfg.umask)
    set_date_format(log_date_format(cfg.log_date))
    for line in warnings:   # after --log-date, so that they carry the date too
        log(line)
    for value, signum, what in ((cfg.reload, signal.SIGHUP, "reload"),
                                (cfg.brutal_reload, signal.SIGTERM, "brutal-reload"),
                                (cfg.stop, signal.SIGINT, "stop")):
        if value:
            return signal_pidfile(value, signum, what)
    if cfg.fastrouter_drain or cfg.fastrouter_undrain:
        return send_drain_commands(cfg)
    try:
        _logging(cfg)
    except (OSError, ValueError) as exc:
        log("unable to open the log file: %s" % exc)
        return EXIT_CONFIG
    if needs_master(cfg):
        return run_master(cfg, list(argv))
    return run(cfg)


def signal_pidfile(path: str, signum: int, option: str) -> int:
    """--reload/--brutal-reload/--stop PIDFILE: signal a running master, as uWSGI does."""
    try:
        with open(path) as handle:
            pid = int(handle.read().strip() or "0")
    except (OSError, ValueError) as exc:
        log('option "--%s": unable to read a pid from %s: %s' % (option, path, exc))
        return EXIT_CONFIG
    if pid <= 0:
        log('option "--%s": no pid in %s' % (option, path))
        return EXIT_CONFIG
    try:
        os.kill(pid, signum)
    except OSError as exc:
        log('option "--%s": unable to signal pid %d: %s' % (option, pid, exc.strerror or exc))
        return EXIT_CONFIG
    log("signal %d sent to pid %d" % (signum, pid))
    return EXIT_OK


def send_drain_commands(cfg) -> int:
    """--fastrouter-drain/--fastrouter-undrain ADDR: write ``D ADDR`` / ``U ADDR`` lines
    to the running master's FIFO (the first --master-fifo) and exit."""
    if not cfg.master_fifo:
        log('option "--fastrouter-drain": --master-fifo PATH names the master to tell')
        return EXIT_CONFIG
    path = cfg.master_fifo[0]
    lines = ["D%s\n" % a for a in cfg.fastrouter_drain] + ["U%s\n" % a for a in cfg.fastrouter_undrain]
    if any("\n" in line[1:-1] or not line[1:-1] for line in lines):
        log('option "--fastrouter-drain": an address must be one non-empty line')
        return EXIT_CONFIG
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        reason = "no master reads it" if exc.errno == errno.ENXIO else exc.strerror or exc
        log('option "--fastrouter-drain": unable to open the master FIFO %s: %s' % (path, reason))
        return EXIT_CONFIG
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            log('option "--fastrouter-drain": %s is not a FIFO' % path)
            return EXIT_CONFIG
        os.write(fd, "".join(lines).encode("utf-8", "surrogateescape"))
    except OSError as exc:
        log('option "--fastrouter-drain": unable to write to %s: %s' % (path, exc.strerror or exc))
        return EXIT_CONFIG
    finally:
        os.close(fd)
    log("%d drain command(s) sent to %s" % (len(lines), path))
    return EXIT_OK


def _logging(cfg) -> None:
    """--daemonize LOGFILE and --logto PATH.  After a reload's re-exec the log file
    inherited on descriptors 1 and 2 is kept, unless --log-reopen (as in uWSGI)."""
    from .master import ENV_INHERIT
    from .proccontrol import daemonize, log_file, open_log
    reloaded = ENV_INHERIT in os.environ
    path = log_file(cfg)
    if cfg.daemonize is not None and not reloaded:
        daemonize(path or "")
    elif path and (not reloaded or cfg.log_reopen):
        open_log(path)
