"""The pre-fork master: router processes, app workers, signals and reloads without loss.

Theory of operation
-------------------
The master binds every socket first (or adopts them after a reload), then forks
``--fastrouter-processes`` router processes and ``--processes`` app workers (when
``--socket`` and an app are configured) that all poll the same listening sockets (with
``--fastrouter-reuse-port``, router process N polls its own: see binding.py), and
supervises them: a child that dies is respawned (after a one-second back-off when it
dies young, so a broken child cannot make the master spin).  Every death is logged with
its decoded status ("exited with status 1", "killed by signal SIGSEGV").  A router
process says READY over its channel once its loop runs; one that exits with EXIT_CONFIG
before that could not start (an unknown ``--fastrouter-uid`` user, say: it logs why) and
would fail the same way forever, so the master stops everything and exits with status 1,
as the single-process router does.  App workers are not judged so: their app is loaded
in the master, before any fork.  The fork, waitpid, kill and execv calls (and the
signal mask) go through a :class:`~uwsgi_fastrouter.proccontrol.ProcessOps`, which tests
replace to exercise these decisions without making processes.

Subscriptions (decisions.md D8): the master alone reads the subscription sockets,
checks each datagram (signature, credentials), keeps its own copy of the table, and
copies every accepted announcement to each router process over that process's channel (a
UNIX stream socketpair; frames of a 4-byte length, a type byte and a payload).  The
copies are batched: the announcements accepted in one pass of the master's loop go in
one ANNOUNCEMENTS frame per process at the end of that pass, already parsed (see
frames.py), and a router process applies the batch in one go.  So a flood of datagrams
costs the master one parse each and one write per process per pass, and a router
process one read and one decode per pass; a frame of another kind sends the pending
batch first, so every process sees the events in the master's order.  A
router that marks a node failed tells the master, which tells the others: every
process has the same view.  Frames are written without blocking: what a channel does
not take at once waits in that channel's outbox and goes on writability, so a stopped
or slow process never holds up the master or a router.

The outbox is bounded (``_OUTBOX_LIMIT``).  A process that leaves that much unread
(stopped, or stuck in a long call) is replaced rather than resynchronised: its
channel is closed, its outbox freed at once, it is asked to finish its requests and
exit (SIGTERM, acted on whenever it runs again), and a new process takes its place.
The new one is forked from the master, so its table is the master's table at that
instant by construction, and every later frame goes down its fresh channel in
order.  A resync frame would have to carry the whole table (up to
``--subscription-max-keys`` pools of ``--subscription-max-nodes`` nodes), be merged
into a live copy whose nodes sessions still hold, and could itself overflow a
channel that is still not read; a replacement has none of these cases, and the
master holds nothing for a process that may never run again.

Stats (D8): the stats server (and the metrics server) runs in the master.  A request starts a collection round:
a QUERY frame with the round's number to every router process, which answers with
REPORT frames built a slice at a time on its own loop (32 pools each, so no pass of
either loop parses or builds megabytes), the last one flagged.  The master
merges each frame as it arrives.  A process that has sent nothing for half a second
(or is not done after three) is left out of that round with a log line, never waited
for; the document is then rendered from the master's table and the complete reports,
by a short-lived process of its own at a low priority (statsfork.py), so that summing
and rendering tens of thousands of pools never competes with the router processes for
a CPU.  A router process leaves the pools it never routed to out of its report.
A metrics scrape asks for the totals only (a flag byte after the round number): each
process answers with one part, its request counters included (see metrics.py).

Signals (uWSGI's meanings): SIGHUP is a graceful reload; SIGTERM a brutal reload unless
``--die-on-term`` (then a shutdown); SIGINT and SIGQUIT shut down.  ``--touch-reload``
files are looked at once a second and a touch is a graceful reload too.  Under systemd
(``$NOTIFY_SOCKET``) the master reports READY=1 once its router processes are forked,
RELOADING=1 before a reload's re-exec (the new image reports READY=1 and its MAINPID)
and STOPPING=1 on shutdown (see sdnotify.py).  SIGHUP, SIGTERM, SIGINT, SIGQUIT and
SIGCHLD are blocked across every fork until the child has its own handlers, and across
a reload's exec until the new image has installed the master's: the exec resets the
handlers to their defaults, and SIGHUP's default would kill the master and orphan its
children.  What arrived meanwhile is handled once the new loop runs; several SIGHUPs
held there are a single pending signal, so a burst makes one more reload, not ten.

A graceful reload never closes a listening socket.  The master writes its subscription
table to an unlinked temporary file, clears close-on-exec on the sockets and the file,
and re-executes itself with their numbers in the environment.  The new image (same
pid, so the old children are still its children) adopts the sockets, loads the table,
forks fresh children (router process N on slot N's sockets under
``--fastrouter-reuse-port``), and only then asks the old ones to stop accepting and to finish
what they have (SIGTERM to a router child: it stops polling its listeners and exits once
its last session ends, or after ``--fastrouter-timeout``).  Connections arriving
meanwhile wait in the kernel backlog for a few milliseconds: none is refused or cut.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import struct
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

from . import sdnotify
from .log import RateLimitedLog, log
from .reactor import Reactor
from .frames import (ANNOUNCEMENTS, DRAIN, FAILED, QUERY, READY, REPORT, FrameReader,
                     decode_announcements, encode_announcements, encode_frame)
from .stats import slice_deadline

ENV_INHERIT = "UWSGI_FASTROUTER_INHERIT"
_PROGRAM = "uwsgi-fastrouter"
_REPORT_HEAD = struct.Struct("!IB")     # round number, 1 on the last frame of a report
_RESPAWN_BACKOFF = 1.0
_STATS_WAIT = 0.5          # a router process silent this long is left out of a stats round
_STATS_CAP = 3.0           # and one not done after this long
_CHANNEL_READ = 65536      # bytes read from a channel per event (a few report frames)
_OUTBOX_LIMIT = 16 << 20   # bytes queued for one channel before its process is replaced
_REPORT_HIGH_WATER = 256 << 10   # a router builds no more report frames while this much waits
_KILL_AFTER = 10.0
_EXIT_CRASH = 70           # a child's status after an unexpected exception (EX_SOFTWARE)
_ORPHAN_GRACE = 10.0
# Blocked across a fork until the child has its own handlers, and across a reload's
# re-exec until the new image has its own: one arriving in between is held, not lost
# and never given its default action (which for SIGHUP is death).
_MASTER_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD}

def _fifo_commands(text: str) -> List[str]:
    """The commands in what was read from a master FIFO: one letter each, except
    ``D`` and ``U``, which take the rest of their line (an address)."""
    commands = []
    at = 0
    while at < len(text):
        letter = text[at]
        if letter in "DU":
            end = text.find("\n", at)
            end = len(text) if end < 0 else end
            commands.append(text[at:end])
            at = end + 1
        else:
            commands.append(letter)
            at += 1
    return commands


class Child:
    """One forked process the master supervises."""

    __slots__ = ("kind", "index", "pid", "started", "channel", "reader", "draining", "outbox",
                 "ready")

    def __init__(self, kind: str, index: int) -> None:
        self.kind = kind            # "router" or "worker"
        self.index = index          # 1-based, per kind
        self.pid = 0
        self.started = 0.0
        self.channel: Optional[socket.socket] = None   # master's end (routers only)
        self.reader = FrameReader()
        self.draining = False
        self.outbox = bytearray()   # frames the channel has not taken yet
        self.ready = False          # it said it has started (READY); workers never say


class Master:
    """Supervises router processes and app workers for one configuration."""

    def __init__(self, cfg, argv: List[str], *, bind: Callable, wire: Callable,
                 make_worker: Optional[Callable] = None, ops=None,
                 startup_errors: tuple = ()) -> None:
        from .proccontrol import PrivilegeError, ProcessOps, SetupError
        self.cfg = cfg
        self.argv = argv
        self._bind = bind            # (cfg, inherited) -> the master's runtime (runtime.MasterRuntime)
        self._wire = wire            # (cfg, reactor, master's runtime, channel) -> a router's (in a child)
        self._make_worker = make_worker
        self.ops = ops if ops is not None else ProcessOps()   # fork, waitpid, kill, execv
        # What a router process that cannot start raises: its message is logged and it
        # exits with EXIT_CONFIG (see _child_died for what the master makes of that).
        self.startup_errors = tuple(startup_errors) + (SetupError, PrivilegeError)
        self.reactor: Optional[Reactor] = None
        self.sockets = None
        self.children: Dict[int, Child] = {}
        self.routers: List[Child] = []
        self.workers: List[Child] = []
        self.old_pids: List[int] = []
        self.stopping = False
        self.exit_code = 0
        self.subscriptions = None    # the master's SubscriptionServer (external sockets)
        self.table = None
        self.heartbeat = None        # --fastrouter-harakiri: one slot per router process
        self.fifos: List[int] = []   # --master-fifo descriptors
        self.notifier = sdnotify.from_environ()   # systemd, when it started us
        self.reload_watcher = None   # --touch-reload
        self.log_reopener = None     # --touch-logreopen
        self._rounds: Dict[int, _ReportRound] = {}   # stats collections under way
        self._round_seq = 0
        self._stats_log = RateLimitedLog(time.monotonic, burst=10, what="stats log lines")
        self._outbox_log = RateLimitedLog(time.monotonic, burst=10, what="channel log lines")
        self._announcements: list = []   # accepted in this pass, not yet sent to the routers

    # ----------------------------------------------------------------- start

    def run(self) -> int:
        inherited = _read_inherited()
        from .proccontrol import process_name, set_process_name
        set_process_name(process_name(self.cfg, "uWSGI master", master=True))
        if self.notifier is not None:
            self.notifier.status("%s master starting" % _PROGRAM)
        self._start_watchers()
        # Signals first: a signal that arrives while we bind is handled once the loop runs.
        self.reactor = Reactor()
        reactor = self.reactor
        for signum, handler in ((signal.SIGHUP, self._on_hup), (signal.SIGTERM, self._on_term),
                                (signal.SIGINT, self._on_stop), (signal.SIGQUIT, self._on_stop),
                                (signal.SIGCHLD, self._on_child)):
            reactor.add_signal_handler(signum, handler)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        # After a reload the old image left these blocked across its exec: the handlers
        # exist now, so whatever arrived meanwhile is handled by the loop (several
        # SIGHUPs held there are one pending signal: one more reload).
        self.ops.sigmask(signal.SIG_UNBLOCK, _MASTER_SIGNALS)
        try:
            self.sockets = self._bind(self.cfg, inherited)
        except BaseException:
            reactor.close()
            raise
        self.old_pids = inherited.get("children", []) if inherited else []
        try:
            self._prepare_files(reload=inherited is not None)
        except BaseException:
            self._close_fifos()
            self.sockets.close_all()
            reactor.close()
            raise
        routers = self.cfg.fastrouter_processes if self.sockets.listeners else 0
        if self.cfg.fastrouter_harakiri and routers:
            from .proccontrol import Heartbeat
            self.heartbeat = Heartbeat(routers)
        self.sockets.setup_master(self, reactor, inherited)
        if inherited and routers:
            self.sockets.check_listener_groups(routers)
        for index in range(1, routers + 1):
            child = Child("router", index)
            self.routers.append(child)
            self._spawn(child)
        prepared = self.sockets.prepared
        if prepared.app is not None and prepared.bindings.app:
            self._make_worker = self._run_worker
            for index in range(1, self.cfg.processes + 1):
                child = Child("worker", index)
                self.workers.append(child)
                self._spawn(child)
        if self.old_pids:
            # The new generation is accepting: the old one may stop now.
            for pid in self.old_pids:
                self._signal(pid, signal.SIGTERM)
            log("graceful reload: %d old process(es) finishing their requests" % len(self.old_pids))
        self.sockets.start_master()
        self._on_child(0)   # old processes that exited before our SIGCHLD handler existed
        if self.notifier is not None:
            self.notifier.ready("%s ready: %d router process(es), %d app worker(s)"
                                % (_PROGRAM, len(self.routers), len(self.workers)),
                                main_pid=os.getpid() if inherited else None)
        reactor.call_later(1.0, self._tick)
        try:
            reactor.run()
        finally:
            self.sockets.stop_master()
        return self._finish()

    # ---------------------------------------------------------------- spawn

    def _spawn(self, child: Child) -> None:
        parent_end = None
        child_end = None
        if child.kind == "router":
            parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Signals stay blocked across the fork until the child has its own handlers:
        # one arriving in between would otherwise be swallowed by the master's, or be
        # given its default action (SIGHUP would kill a router process that ignores it).
        self.ops.sigmask(signal.SIG_BLOCK, _MASTER_SIGNALS)
        try:
            pid = self.ops.fork()
        except OSError as exc:
            self.ops.sigmask(signal.SIG_UNBLOCK, _MASTER_SIGNALS)
            log("*** unable to fork a %s process: %s ***" % (child.kind, exc.strerror or exc))
            for s in (parent_end, child_end):
                if s is not None:
                    s.close()
            self.reactor.call_later(_RESPAWN_BACKOFF, self._respawn, child)
            return
        if pid == 0:  # pragma: no cover - runs in the child
            code = _EXIT_CRASH
            try:
                self._in_child()
                if parent_end is not None:
                    parent_end.close()
                if child.kind == "router":
                    code = self._run_router(child, child_end)
                else:
                    code = self._make_worker(child.index)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except self.startup_errors as exc:
                from .proccontrol import EXIT_CONFIG
                log(str(exc))
                code = EXIT_CONFIG
            except BaseException as exc:
                log("%s process %d died: %r" % (child.kind, child.index, exc))
            finally:
                try:
                    sys.stderr.flush()
                except Exception:
                    pass
                os._exit(code)
        self.ops.sigmask(signal.SIG_UNBLOCK, _MASTER_SIGNALS)
        child.pid = pid
        child.started = time.monotonic()
        child.ready = child.kind != "router"
        if self.heartbeat is not None and child.kind == "router":
            self.heartbeat.reset(child.index - 1, child.started)
        child.draining = False
        self.children[pid] = child
        if child_end is not None:
            child_end.close()
            parent_end.setblocking(False)
            child.channel = parent_end
            child.reader = FrameReader()
            child.outbox = bytearray()
            self.reactor.add_reader(parent_end.fileno(), lambda c=child: self._channel_readable(c))
        what = "uWSGI fastrouter %d" % child.index if child.kind == "router" else "uWSGI worker %d" % child.index
        log("spawned %s (pid: %d)" % (what, pid))

    def _in_child(self) -> None:
        """Leave the master's loop behind: its signals and descriptors are not ours."""
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        try:
            signal.set_wakeup_fd(-1)
        except (ValueError, OSError):
            pass
        self.reactor.abandon()
        self._close_fifos(unregister=False)
        for other in self.children.values():
            if other.channel is not None:
                other.channel.close()
        self.sockets.close_master_only()

    def _run_router(self, child: Child, channel: socket.socket) -> int:
        cfg = self.cfg
        from .proccontrol import LogReopener, log_file, process_name, set_process_name
        set_process_name(process_name(cfg, "uWSGI fastrouter %d" % child.index))
        if cfg.fastrouter_uid or cfg.fastrouter_gid:
            from .proccontrol import drop_privileges, resolve_ids
            uid, gid = resolve_ids(cfg.fastrouter_uid, cfg.fastrouter_gid)
            drop_privileges(uid, gid, who="uWSGI fastrouter %d" % child.index)
        reactor = Reactor(max_events=cfg.fastrouter_events)
        self.sockets.take_listeners(child.index, self.cfg.fastrouter_processes)
        parts = self._wire(self.cfg, reactor, self.sockets, channel)
        link = RouterLink(reactor, channel, parts)
        if self.heartbeat is not None:
            from .proccontrol import start_beating
            # A process the master has let go (replaced, or left behind by a reload)
            # stops beating: its slot is its replacement's.
            link.on_master_gone = start_beating(reactor, self.heartbeat, child.index - 1).cancel
        stop_requested = []

        def graceful(_signum: int) -> None:
            if stop_requested:
                return
            stop_requested.append(True)
            parts.server.pause_accepting()
            parts.server.stopping = True
            if not parts.server.sessions:
                reactor.stop()
                return
            parts.server.on_idle = reactor.stop
            reactor.call_later(self.cfg.fastrouter_timeout, reactor.stop)

        reactor.add_signal_handler(signal.SIGTERM, graceful)
        reactor.add_signal_handler(signal.SIGINT, lambda s: reactor.stop())
        reactor.add_signal_handler(signal.SIGQUIT, lambda s: reactor.stop())
        signal.signal(signal.SIGHUP, signal.SIG_IGN)   # uWSGI's router ignores it too
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _MASTER_SIGNALS)   # blocked since the fork
        if cfg.touch_logreopen:
            reopener = LogReopener(cfg.touch_logreopen, log_file(cfg), announce=False)
            parts.server.periodic.append(reopener.check)
        parts.start()
        link.start()
        reactor.call_soon(link.ready)   # from the loop: this process has started
        try:
            reactor.run()
        finally:
            parts.stop(unlink=False)
            link.stop()
        return 0

    def _run_worker(self, index: int) -> int:
        from .proccontrol import LogReopener, log_file, process_name, set_process_name
        from .wsgiserver import Worker
        cfg = self.cfg
        set_process_name(process_name(cfg, "uWSGI worker %d" % index))
        periodic = None
        if cfg.touch_logreopen:
            periodic = LogReopener(cfg.touch_logreopen, log_file(cfg), announce=False).check
        prepared = self.sockets.prepared
        worker = Worker([l.sock for l in prepared.bindings.app], prepared.app, worker_id=index,
                        harakiri=cfg.harakiri, buffer_size=cfg.buffer_size,
                        socket_timeout=cfg.socket_timeout,
                        parent_pid=os.getppid(), periodic=periodic,
                        on_start=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, _MASTER_SIGNALS))
        return worker.serve_forever()

    # ------------------------------------------------- pidfile and master FIFO

    def _prepare_files(self, reload: bool) -> None:
        """The pidfile (as the user that started us, before the ids change; not again
        after a reload's re-exec: same pid, and the file is already there), the
        privilege drop, then the master FIFOs (owned by the user the master runs as).
        Each failure is a start-up error naming the option and the path."""
        from .proccontrol import write_pidfile
        if self.cfg.pidfile and not reload:
            write_pidfile(self.cfg.pidfile, os.getpid())
        try:
            self._drop_master_privileges()
            self._open_fifos()
        except BaseException:
            if self.cfg.pidfile:      # this process is going away (also after a reload)
                from .proccontrol import remove_pidfile
                remove_pidfile(self.cfg.pidfile, os.getpid())
            raise

    def _open_fifos(self) -> None:
        """A fresh FIFO at every ``--master-fifo`` path, at every start of this image:
        after a reload's re-exec the paths are made anew, so they are still ours."""
        from .proccontrol import make_master_fifo
        self.fifos = []
        for path in self.cfg.master_fifo:
            fd = make_master_fifo(path)
            self.fifos.append(fd)
            self.reactor.add_reader(fd, lambda fd=fd: self._fifo_readable(fd))

    def _close_fifos(self, unregister: bool = True) -> None:
        """Close the FIFO descriptors (in a child: the loop is gone, nothing to unregister)."""
        for fd in self.fifos:
            if unregister:
                self.reactor.remove_reader(fd)
            try:
                os.close(fd)
            except OSError:
                pass
        self.fifos = []

    def _fifo_readable(self, fd: int) -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            return
        for command in _fifo_commands(data.decode("latin-1")):
            if command[0] in "DU" and len(command) > 1:
                self._drain_command(command)
            elif command == "r":
                self._on_hup(signal.SIGHUP)
            elif command == "R":
                log("...brutally reloading (pid: %d)..." % os.getpid())
                self._reload(graceful=False)
            elif command in ("q", "Q"):
                self._on_stop(signal.SIGINT)
            elif command == "S":
                self.sockets.toggle_subscriptions()
            elif command.strip():
                log("[master-fifo] unknown command %r" % command)

    def _drain_command(self, command: str) -> None:
        """``D ADDRESS`` drains a node in every router process, ``U ADDRESS`` takes
        the drain back (docs/decisions.md, "The life of a node")."""
        address = command[1:].strip().encode("latin-1")
        if not 0 < len(address) <= 255:
            log("[master-fifo] %s command without an address of 1..255 bytes" % command[0])
            return
        drained = command[0] == "D"
        self.sockets.node_drained(address, drained)
        self.broadcast(DRAIN, (b"1" if drained else b"0") + address)

    # -------------------------------------------------------------- signals

    def _on_child(self, _signum: int) -> None:
        while True:
            try:
                pid, status = self.ops.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            self._child_died(pid, status)
        self._maybe_done()

    def _child_died(self, pid: int, status: int) -> None:
        """Reaped *pid*: respawn it, or give up when a router process could not start.

        "Could not start" is: it exited with EXIT_CONFIG before saying READY (from its
        loop, once it runs), i.e. its set-up failed -- starting it again would fail
        again, forever.  Any other death (a signal, another status, or after READY)
        is respawned, after a back-off when it died young."""
        from .proccontrol import EXIT_CONFIG, describe_status, exit_status
        how = describe_status(status)
        child = self.children.pop(pid, None)
        if child is None:
            if pid in self.old_pids:
                self.old_pids.remove(pid)
                log("graceful reload: old process (pid: %d) %s" % (pid, how))
                if not self.old_pids:
                    log("graceful reload: the old processes are gone")
            return
        if child.channel is not None:
            self._drain(child)     # what it said before dying (READY, say) counts
            self._close_channel(child)
        self._report_lost(child)
        what = "fastrouter %d" % child.index if child.kind == "router" else "worker %d" % child.index
        if self.stopping or child.draining:
            log("%s (pid: %d) %s" % (what, pid, how))
            return
        if not child.ready and exit_status(status) == EXIT_CONFIG:
            log("*** %s (pid: %d) could not start (%s): shutting down ***" % (what, pid, how))
            self.exit_code = EXIT_CONFIG
            self._shut_down()
            return
        log("DAMN ! %s (pid: %d) died, %s :( trying respawn ..." % (what, pid, how))
        young = time.monotonic() - child.started < _RESPAWN_BACKOFF
        self.reactor.call_later(_RESPAWN_BACKOFF if young else 0, self._respawn, child)

    def _respawn(self, child: Child) -> None:
        if not self.stopping:
            self._spawn(child)

    def _on_hup(self, _signum: int) -> None:
        log("...gracefully reloading (pid: %d)..." % os.getpid())
        self._reload(graceful=True)

    def _on_term(self, signum: int) -> None:
        if self.cfg.die_on_term:
            self._on_stop(signum)
            return
        log("...brutally reloading (pid: %d)..." % os.getpid())
        self._reload(graceful=False)

    def _on_stop(self, signum: int) -> None:
        if self.stopping:
            return
        log("received signal %d, shutting down (pid: %d)" % (signum, os.getpid()))
        self._shut_down()

    def _shut_down(self) -> None:
        """Stop every child (SIGINT, SIGKILL after a while); the loop ends once all are reaped."""
        if self.stopping:
            return
        self.stopping = True
        if self.notifier is not None:
            self.notifier.stopping("%s shutting down" % _PROGRAM)
        for pid in list(self.children) + list(self.old_pids):
            self._signal(pid, signal.SIGINT)
        self.reactor.call_later(_KILL_AFTER, self._kill_all)
        self._maybe_done()

    def _kill_all(self) -> None:
        for pid in list(self.children) + list(self.old_pids):
            self._signal(pid, signal.SIGKILL)

    def _signal(self, pid: int, signum: int) -> None:
        """Send *signum* to *pid*; a process already gone is no error."""
        try:
            self.ops.kill(pid, signum)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise

    def _maybe_done(self) -> None:
        if self.stopping and not self.children and not self.old_pids:
            self.reactor.stop()

    def _finish(self) -> int:
        if self.cfg.pidfile:
            from .proccontrol import remove_pidfile
            remove_pidfile(self.cfg.pidfile, os.getpid())
        self._close_fifos()
        self.sockets.close_all()
        self.reactor.close()
        log("goodbye from the uwsgi-fastrouter master (pid: %d)" % os.getpid())
        return self.exit_code

    # --------------------------------------------------------------- reload

    def _reload(self, graceful: bool) -> None:
        if self.stopping:
            return
        if self.notifier is not None:
            self.notifier.reloading("%s %s reload" % (_PROGRAM, "graceful" if graceful else "brutal"))
        pids = list(self.children) + list(self.old_pids)
        if not graceful:
            for pid in pids:
                self._signal(pid, signal.SIGKILL)
        self.sockets.before_reload(graceful)
        state = self.sockets.inheritable_state()
        state["children"] = pids if graceful else []
        if self.table is not None:
            handle = tempfile.TemporaryFile()
            handle.write(self.table.dump())
            handle.flush()
            fd = os.dup(handle.fileno())
            handle.close()
            os.set_inheritable(fd, True)
            state["table_fd"] = fd
        os.environ[ENV_INHERIT] = json.dumps(state)
        for child in self.children.values():
            if child.channel is not None:
                child.channel.close()
        try:
            sys.stderr.flush()
        except Exception:
            pass
        self.reactor.abandon()
        argv = [sys.executable, "-m", "uwsgi_fastrouter"] + list(self.argv)
        # The exec resets our handlers to their defaults (SIGHUP's kills) long before
        # the new image installs its own: the signals wait, blocked, until it has
        # (the mask survives the exec; Master.run unblocks them).
        self.ops.sigmask(signal.SIG_BLOCK, _MASTER_SIGNALS)
        try:
            self.ops.execv(sys.executable, argv)
        except OSError as exc:  # pragma: no cover
            log("*** reload failed: unable to exec %s: %s ***" % (sys.executable, exc))
            os._exit(1)

    # ------------------------------------------------------------- channels

    def queue_announcement(self, announcement: tuple, pid: Optional[int], uid: Optional[int],
                           gid: Optional[int]) -> None:
        """An announcement the master accepted: it goes to every router process with the
        others of this pass, at the end of the pass (see the module docstring)."""
        batch = self._announcements
        if not batch:
            self.reactor.call_soon(self._send_announcements)
        batch.append((pid, uid, gid, tuple(announcement)))

    def _send_announcements(self) -> None:
        batch = self._announcements
        if not batch:
            return
        self._announcements = []
        self._broadcast(ANNOUNCEMENTS, encode_announcements(batch), None)

    def broadcast(self, kind: int, payload: bytes, exclude: Optional[Child] = None) -> None:
        if self._announcements:
            self._send_announcements()     # what the master accepted before goes first
        self._broadcast(kind, payload, exclude)

    def _broadcast(self, kind: int, payload: bytes, exclude: Optional[Child]) -> None:
        for child in self.routers:
            if child is exclude or child.channel is None or child.draining:
                continue
            self._send(child, kind, payload)

    def _send(self, child: Child, kind: int, payload: bytes) -> bool:
        """Queue one frame for *child* and write what its channel takes now; False if
        the channel is gone, or its outbox is full: then *child* is replaced (see
        :meth:`_replace_lagging`) and the frame is not needed (the replacement starts
        from the master's table, which already has what the frame carries)."""
        sock = child.channel
        if sock is None:
            return False
        frame = encode_frame(kind, payload)
        if len(child.outbox) + len(frame) > _OUTBOX_LIMIT:
            self._replace_lagging(child)
            return False
        was_empty = not child.outbox
        child.outbox += frame
        if was_empty:
            self._flush(child)
        return child.channel is not None

    def _replace_lagging(self, child: Child) -> None:
        """*child* has left a full outbox unread: close its channel (the outbox goes
        with it), ask it to finish its requests and exit, and start a new process in
        its slot (after the respawn back-off when the lagging one is young, so a
        flood that no process could keep up with cannot make the master fork in a
        loop).  The old one stays in ``children``, marked draining: its exit is
        logged, not respawned, and a reload or shutdown signals it like any other."""
        self._outbox_log("*** fastrouter %d (pid: %d) left %d bytes of its channel unread: "
                         "replacing it (it finishes its requests and exits) ***"
                         % (child.index, child.pid, len(child.outbox)))
        self._close_channel(child)
        self._report_lost(child)
        child.draining = True
        self._signal(child.pid, signal.SIGTERM)
        replacement = Child(child.kind, child.index)
        self.routers[self.routers.index(child)] = replacement
        young = time.monotonic() - child.started < _RESPAWN_BACKOFF
        self.reactor.call_later(_RESPAWN_BACKOFF if young else 0, self._respawn, replacement)

    def _close_channel(self, child: Child) -> None:
        """Close the master's end of *child*'s channel and forget what waited in it."""
        sock = child.channel
        if sock is None:
            return
        self.reactor.unregister(sock.fileno())
        sock.close()
        child.channel = None
        child.outbox = bytearray()

    def _flush(self, child: Child) -> None:
        sock = child.channel
        if sock is None:
            return
        outbox = child.outbox
        try:
            sent = sock.send(outbox)
        except BlockingIOError:
            sent = 0
        except OSError:
            # The process is gone: its reaping closes the channel.
            del outbox[:]
            self.reactor.remove_writer(sock.fileno())
            return
        del outbox[:sent]
        if outbox:
            self.reactor.add_writer(sock.fileno(), lambda c=child: self._flush(c))
        else:
            self.reactor.remove_writer(sock.fileno())

    def _channel_readable(self, child: Child) -> bool:
        """Read what *child* sent and act on its frames; False when there was nothing
        (or the channel is at its end)."""
        sock = child.channel
        if sock is None:
            return False
        try:
            data = sock.recv(_CHANNEL_READ)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self.reactor.remove_reader(sock.fileno())
            self._report_lost(child)
            return False
        for kind, payload in child.reader.feed(data):
            if kind == READY:
                child.ready = True
            elif kind == FAILED:
                self.sockets.node_failed(payload)
                self.broadcast(FAILED, payload, exclude=child)
            elif kind == REPORT:
                self._report_frame(child, payload)
        return True

    def _drain(self, child: Child) -> None:
        """Everything a dead child wrote is in its channel: act on it before closing."""
        while self._channel_readable(child):
            pass

    # ---------------------------------------------------------------- stats

    def collect_reports(self, make_report: Callable[[], object],
                        on_done: Callable[[list], None], totals_only: bool = False) -> None:
        """Ask every router process for its counters, without waiting for them.

        ``make_report()`` makes an empty report per process (``add(part_bytes)`` is
        called for each part it sends); ``on_done(reports)`` is called once, from
        this loop, with the reports of the processes that answered completely in
        time (right away if there is none to ask).  *totals_only*: each process sends
        its first part only (its totals and request counters, not its pools)."""
        self._round_seq = (self._round_seq + 1) & 0xFFFFFFFF
        rnd = _ReportRound(self._round_seq, self.reactor.now, on_done)
        query = struct.pack("!I", rnd.ident) + (b"\x01" if totals_only else b"")
        for child in self.routers:
            if child.channel is None or child.draining or child.pid not in self.children:
                continue
            if self._send(child, QUERY, query):
                rnd.waiting[child.pid] = [child, make_report(), rnd.started]
        if not rnd.waiting:
            on_done([])
            return
        self._rounds[rnd.ident] = rnd
        rnd.timer = self.reactor.call_later(_STATS_WAIT, self._round_check, rnd)

    def _report_frame(self, child: Child, payload: bytes) -> None:
        if len(payload) < _REPORT_HEAD.size:
            return
        ident, last = _REPORT_HEAD.unpack_from(payload)
        rnd = self._rounds.get(ident)
        entry = rnd.waiting.get(child.pid) if rnd is not None else None
        if entry is None:
            return          # a late answer to a round that is over
        entry[2] = self.reactor.now
        if len(payload) > _REPORT_HEAD.size:
            try:
                entry[1].add(payload[_REPORT_HEAD.size:])
            except ValueError as exc:
                self._stats_log("stats: fastrouter %d (pid: %d) sent bad counters (%s): left out of "
                                "this document" % (child.index, child.pid, exc))
                del rnd.waiting[child.pid]
                last = 0
        if last:
            del rnd.waiting[child.pid]
            rnd.done.append(entry[1])
        if not rnd.waiting:
            self._finish_round(rnd)

    def _round_check(self, rnd: "_ReportRound") -> None:
        if self._rounds.get(rnd.ident) is not rnd:
            return
        now = self.reactor.now
        for pid, (child, _report, heard) in list(rnd.waiting.items()):
            if now - heard >= _STATS_WAIT or now - rnd.started >= _STATS_CAP:
                del rnd.waiting[pid]
                self._stats_log("stats: fastrouter %d (pid: %d) did not send its counters in time: "
                                "left out of this document" % (child.index, pid))
        if not rnd.waiting:
            self._finish_round(rnd)
            return
        wake = min(min(entry[2] for entry in rnd.waiting.values()) + _STATS_WAIT,
                   rnd.started + _STATS_CAP)
        rnd.timer = self.reactor.call_at(wake, self._round_check, rnd)

    def _report_lost(self, child: Child) -> None:
        """*child*'s channel is gone: no round waits for it any more."""
        for rnd in list(self._rounds.values()):
            if rnd.waiting.pop(child.pid, None) is not None and not rnd.waiting:
                self._finish_round(rnd)

    def _finish_round(self, rnd: "_ReportRound") -> None:
        if self._rounds.pop(rnd.ident, None) is None:
            return
        if rnd.timer is not None:
            rnd.timer.cancel()
        rnd.on_done(rnd.done)

    def _drop_master_privileges(self) -> None:
        cfg = self.cfg
        if cfg.uid or cfg.gid:
            from .proccontrol import drop_privileges, resolve_ids
            drop_privileges(*resolve_ids(cfg.uid, cfg.gid))

    def _check_harakiri(self) -> None:
        from .proccontrol import harakiri_line
        now = time.monotonic()
        for child in self.routers:
            if child.pid and not child.draining and child.pid in self.children \
                    and self.heartbeat.stale(child.index - 1, now, self.cfg.fastrouter_harakiri):
                log(harakiri_line(child.index, child.pid))
                self._signal(child.pid, signal.SIGKILL)
                self.heartbeat.reset(child.index - 1, now)

    def _start_watchers(self) -> None:
        """--touch-reload and --touch-logreopen: their files' times are taken now."""
        from .proccontrol import LogReopener, TouchWatcher, log_file
        cfg = self.cfg
        if cfg.touch_reload:
            self.reload_watcher = TouchWatcher(cfg.touch_reload, report=True)
        if cfg.touch_logreopen:
            self.log_reopener = LogReopener(cfg.touch_logreopen, log_file(cfg), announce=True)

    def _check_touches(self) -> None:
        if self.log_reopener is not None:
            self.log_reopener.check()
        if self.reload_watcher is not None and not self.stopping:
            touched = self.reload_watcher.touched()
            if touched is not None:
                log("*** %s has been touched... grace them all !!! ***" % touched)
                self._on_hup(signal.SIGHUP)

    def _tick(self) -> None:
        self._check_touches()
        if self.heartbeat is not None and not self.stopping:
            self._check_harakiri()
        self.sockets.tick()
        self._on_child(0)   # a SIGCHLD can be lost across an exec: reap here too
        self.reactor.call_later(1.0, self._tick)


class _ReportRound:
    """One stats request's collection of counters from the router processes."""

    __slots__ = ("ident", "started", "waiting", "done", "on_done", "timer")

    def __init__(self, ident: int, started: float, on_done: Callable[[list], None]) -> None:
        self.ident = ident
        self.started = started
        self.waiting: Dict[int, list] = {}   # pid -> [child, report, when last heard from]
        self.done: list = []
        self.on_done = on_done
        self.timer = None


class RouterLink:
    """A router process's end of its channel to the master.

    Frames to the master wait in an outbox and go as the channel takes them.  A stats
    QUERY is answered with REPORT frames built from ``parts.report_parts()`` a slice at
    a time (see :func:`~uwsgi_fastrouter.stats.slice_deadline`; none while the outbox
    holds more than :data:`_REPORT_HIGH_WATER`), so routing goes on meanwhile.
    """

    def __init__(self, reactor: Reactor, channel: socket.socket, parts) -> None:
        self.reactor = reactor
        self.channel = channel
        self.parts = parts
        self.reader = FrameReader()
        self.outbox = bytearray()
        self.report = None          # (round number, iterator of parts) while answering
        self.on_master_gone: Optional[Callable[[], None]] = None   # called once, at the EOF
        channel.setblocking(False)
        parts.report_failure = self.node_failed

    def start(self) -> None:
        self.reactor.add_reader(self.channel.fileno(), self._readable)

    def stop(self) -> None:
        if self.channel is not None:
            self.reactor.unregister(self.channel.fileno())
            self.channel.close()
            self.channel = None
        self.report = None

    def ready(self) -> None:
        """Tell the master this process has started (its loop runs)."""
        if self.channel is not None:
            self.outbox += encode_frame(READY, b"")
            self._flush()

    def node_failed(self, key: bytes, address: bytes) -> None:
        if self.channel is not None:
            self.outbox += encode_frame(FAILED, key + b"\0" + address)
            self._flush()

    def _readable(self) -> None:
        try:
            data = self.channel.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            # The master closed our channel: it is re-executing itself (a reload: the
            # new image tells us to stop once its own router processes accept), it
            # replaced us (we left our channel unread: a SIGTERM is on its way) or it
            # died.  Keep serving meanwhile, but never outlive it by long.
            self.reactor.unregister(self.channel.fileno())
            self.outbox = bytearray()
            self.report = None
            if self.on_master_gone is not None:
                self.on_master_gone()
                self.on_master_gone = None
            self.reactor.call_later(_ORPHAN_GRACE, os.kill, os.getpid(), signal.SIGTERM)
            return
        for kind, payload in self.reader.feed(data):
            if kind == ANNOUNCEMENTS:
                batch = decode_announcements(payload)
                if batch is not None:
                    self.parts.apply_announcements(batch)
            elif kind == FAILED:
                key, _, address = payload.partition(b"\0")
                self.parts.apply_failure(key, address)
            elif kind == DRAIN and payload:
                self.parts.apply_drain(payload[1:], payload[:1] == b"1")
            elif kind == QUERY and len(payload) >= 4:
                # A newer round replaces one still being answered (the master has
                # given up on that one).
                totals_only = payload[4:5] == b"\x01"
                self.report = (struct.unpack_from("!I", payload)[0],
                               self.parts.report_parts(totals_only=totals_only))
                self._pump()

    def _pump(self) -> None:
        """Build report frames for this pass's budget, then let the channel take them."""
        report = self.report
        if report is not None:
            ident, parts = report
            deadline = slice_deadline(self.reactor, 1)
            while len(self.outbox) < _REPORT_HIGH_WATER:
                try:
                    part = next(parts)
                except StopIteration:
                    part = None
                except Exception as exc:  # never let a stats bug hurt routing
                    log("[uwsgi-fastrouter] unable to build the stats report: %r" % (exc,))
                    part = None
                if part is None:
                    self.outbox += encode_frame(REPORT, _REPORT_HEAD.pack(ident, 1))
                    self.report = None
                    break
                if part:        # an empty part is a pause in a walk: nothing to send
                    self.outbox += encode_frame(REPORT, _REPORT_HEAD.pack(ident, 0)
                                                + json.dumps(part, separators=(",", ":")).encode())
                if time.monotonic() >= deadline:
                    break
        self._flush()

    def _flush(self) -> None:
        channel = self.channel
        if channel is None:
            return
        outbox = self.outbox
        if outbox:
            try:
                sent = channel.send(outbox)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = len(outbox)      # the master is gone: _readable sees the EOF
            del outbox[:sent]
        if outbox or self.report is not None:
            # More to write, or more to build: on writability, the next pass.
            self.reactor.add_writer(channel.fileno(), self._pump)
        else:
            self.reactor.remove_writer(channel.fileno())


def _read_inherited() -> Optional[dict]:
    raw = os.environ.pop(ENV_INHERIT, None)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        log("*** ignoring a malformed %s ***" % ENV_INHERIT)
        return None
