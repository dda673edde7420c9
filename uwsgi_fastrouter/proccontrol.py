"""Process control for the master: user and group ids, the log file, daemonizing, harakiri.

Theory of operation
-------------------
Privileges (``--uid``/``--gid``, ``--fastrouter-uid``/``--fastrouter-gid``) are dropped
after every socket is bound.  As root the order is: supplementary groups, then the
group id, then the user id -- once the user id is gone the process may no longer change
its groups.  After a setuid() to a non-root user we check that root cannot be regained.
A process that is not root cannot change its ids: asking for the ids it already has is
accepted silently, asking for others is an error (the uWSGI wording: ``cannot setuid()
as non-root user``).

The log file (``--logto``, and the value of ``--daemonize``) is opened in append mode
(mode 0640, as uWSGI creates it) and put on descriptors 1 and 2, so that whatever
writes to stdout or stderr -- Python code, a child process, a crash trace -- ends up
there; :func:`log.log` is pointed at a line-buffered stream on descriptor 2.

Reopening the log (``--touch-logreopen``, ``--log-reopen``) opens the path again and
puts the new file on descriptors 1 and 2 with ``dup2()``: the streams writing there
follow without being replaced.  Every process reopens its own descriptors: the single
router process or the master, each router process and each app worker watches the
trigger files from the one-second timer it already has (:class:`TouchWatcher`, one
``stat()`` per file and second); only the single process or the master writes the
two lines about it, the old file's last and the new file's first.

Process names (``--auto-procname`` and ``--procname*``) are uWSGI's ("uWSGI master",
"uWSGI fastrouter 1", "uWSGI worker 1", with the prefix and suffix options).  The
standard library cannot rewrite the command line ``ps`` shows, so the name goes to
the kernel's task name (``/proc/self/comm``, what ``ps -o comm``, ``top`` and
``pstree`` show; Linux keeps 15 bytes of it); where that fails, nothing happens.

Daemonizing is the classic double fork: the original process exits 0 as soon as the
first child exists; the first child starts a new session and forks again; the
grandchild (not a session leader, so it can never acquire a controlling terminal) is
the daemon.  As in uWSGI the working directory is kept, stdin comes from /dev/null and
stdout/stderr go to the log file.  Unlike uWSGI the umask is kept (uWSGI clears it,
so a daemon's files and UNIX sockets were world-writable; ``--umask`` sets it, see
docs/decisions.md D16).  The log file is opened *before* forking so that an unusable
path is reported on the terminal with an error status instead of killing an
invisible daemon.

Files at paths an operator names (docs/decisions.md D15, D16), all refused with a
:class:`SetupError` naming the option and the path rather than trusting what is there:

* The pidfile is opened with ``O_NOFOLLOW``: a symbolic link at the path is refused
  (the kernel checks it in the same call that opens, so there is no window between a
  check and the open), and so is anything that is not a regular file.  A temporary
  file renamed into place would replace a link instead of refusing it, needs write
  access to the directory (a pidfile an administrator created in a root-owned
  directory could not be written any more) and replaces the inode, owner and mode of
  a pidfile created in advance; ``O_NOFOLLOW`` keeps all of that.  The file is
  created with mode 0644 minus the umask: nobody else may rewrite the pid that
  ``--stop``/``--reload`` signal.  At exit it is removed only while it is still ours:
  a regular file (not a link) holding our pid.
* The master FIFO is never reused: whatever is at the path is unlinked (a directory
  is an error), a fresh FIFO is made with mode 0600 under a umask of 077 (so the mode
  does not depend on the process umask), opened with ``O_NOFOLLOW | O_NONBLOCK``, and
  checked after the open to be a FIFO owned by our effective user id -- a FIFO
  someone swapped in between ``mkfifo`` and ``open`` is refused.  Anyone who had the
  old one open keeps writing into a pipe nobody reads.

Router harakiri (``--fastrouter-harakiri N``) uses a heartbeat: the master creates one
shared anonymous mapping with an 8-byte slot per router process before forking; each
router stamps its slot with the monotonic clock from a one-second reactor timer (see
:func:`start_beating`).  A router whose event loop is stuck in one iteration stops
stamping.  The master looks once a second: a slot older than N seconds plus the beat
period means the loop has been stuck for at least N seconds, and the router is killed
(SIGKILL) and respawned.  CLOCK_MONOTONIC is system-wide, so stamps written by one
process compare with the time read by another.  A slot is written by one process only;
a reader takes two equal readings in a row, so it never acts on a half-written stamp.
"""

from __future__ import annotations

import errno
import grp
import io
import mmap
import os
import pwd
import signal
import stat
import struct
import sys
import time
from typing import Callable, Iterable, Optional, Tuple

from . import log as _logmod
from .log import log

__all__ = [
    "PrivilegeError", "resolve_user", "resolve_group", "drop_privileges", "open_log",
    "log_file", "reopen_log", "TouchWatcher", "LogReopener", "process_name", "set_process_name",
    "daemonize", "Heartbeat", "harakiri_line", "start_beating", "BEAT_INTERVAL",
    "SetupError", "write_pidfile", "remove_pidfile", "make_master_fifo",
    "ProcessOps", "describe_status", "exit_status", "resolve_ids", "EXIT_CONFIG",
]

EXIT_CONFIG = 1                # a configuration or start-up error (as the command's own status)

LOG_FILE_MODE = 0o640
PIDFILE_MODE = 0o644
FIFO_MODE = 0o600
BEAT_INTERVAL = 1.0            # seconds between two heartbeats of a router process
_SLOT = struct.Struct("=d")    # one monotonic timestamp per router process


class PrivilegeError(OSError):
    """Changing the user or group id failed (or is impossible for this process)."""


# --------------------------------------------------------------------------- ids

def resolve_user(value: str) -> int:
    """A user id from a number or a user name (``ValueError`` naming *value* if unknown)."""
    return _resolve(value, "user", lambda name: pwd.getpwnam(name).pw_uid)


def resolve_group(value: str) -> int:
    """A group id from a number or a group name (``ValueError`` naming *value* if unknown)."""
    return _resolve(value, "group", lambda name: grp.getgrnam(name).gr_gid)


def _resolve(value: str, what: str, by_name: Callable[[str], int]) -> int:
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    if text:
        try:
            return by_name(text)
        except KeyError:
            pass
    raise ValueError("%s %s not found." % (what, value if text else repr(value)))


def resolve_ids(user, group) -> Tuple[Optional[int], Optional[int]]:
    """``(uid, gid)`` for the *user* and *group* options (either may be empty: None);
    an unknown name is a :class:`SetupError` naming it."""
    try:
        return (resolve_user(user) if user else None, resolve_group(group) if group else None)
    except ValueError as exc:
        raise SetupError(str(exc)) from None


def drop_privileges(uid: Optional[int], gid: Optional[int], *, who: str = "") -> None:
    """Switch to *gid* and then *uid* (either may be None: left as it is).

    *who* prefixes the log lines, e.g. ``"uWSGI fastrouter 1"`` for a router process
    (``uWSGI fastrouter 1 setuid() to 65534``); the master passes nothing.
    Raises :class:`PrivilegeError` with a clear message when a change fails.
    """
    if uid is None and gid is None:
        return
    prefix = who + " " if who else ""
    if os.getuid() != 0:
        # Not root: only the ids we already have can be "set".
        if gid is not None and gid != os.getgid():
            raise PrivilegeError(errno.EPERM, "%scannot setgid() as non-root user (to %d)"
                                 % (prefix, gid))
        if uid is not None and uid != os.getuid():
            raise PrivilegeError(errno.EPERM, "%scannot setuid() as non-root user (to %d)"
                                 % (prefix, uid))
        return
    if gid is not None:
        log("%ssetgid() to %d" % (prefix, gid))
        _call(os.setgroups, [gid], what="%ssetgroups() to [%d]" % (prefix, gid))
        _call(os.setgid, gid, what="%ssetgid() to %d" % (prefix, gid))
    if uid is not None:
        log("%ssetuid() to %d" % (prefix, uid))
        _call(os.setuid, uid, what="%ssetuid() to %d" % (prefix, uid))
        if uid != 0:
            try:
                os.setuid(0)
            except OSError:
                pass    # as it must be
            else:
                raise PrivilegeError(errno.EPERM, "%sroot privileges could be regained after "
                                     "setuid() to %d: refusing to run" % (prefix, uid))


def _call(func: Callable, arg, *, what: str) -> None:
    try:
        func(arg)
    except OSError as exc:
        raise PrivilegeError(exc.errno, "%s failed: %s" % (what, exc.strerror or exc)) from None


# --------------------------------------------------------------------------- log

def open_log(path: str) -> None:
    """Append every further output of this process (fds 1 and 2, :func:`log`) to *path*.

    Raises ``OSError`` naming *path* when the file cannot be opened.
    """
    _install_log(_open_log_fd(path))


def _open_log_fd(path: str) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                       LOG_FILE_MODE)
    except OSError as exc:
        raise OSError(exc.errno, "unable to open log file: %s" % (exc.strerror or exc),
                      path) from None


def _install_log(fd: int) -> None:
    """Put the open log file *fd* on descriptors 1 and 2 (and close *fd*)."""
    _dup_onto_std(fd)
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name, None)
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(line_buffering=True)
            except (ValueError, io.UnsupportedOperation):
                pass
    _logmod.set_stream(open(2, "w", buffering=1, encoding="utf-8",
                            errors="backslashreplace", closefd=False))


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass


def log_file(cfg) -> Optional[str]:
    """The file the log goes to: ``--logto``, else the value of ``--daemonize``."""
    if cfg.logto:
        return cfg.logto
    if cfg.daemonize:
        return cfg.daemonize
    return None


def reopen_log(path: str) -> None:
    """Open *path* again and put it on descriptors 1 and 2 (the log follows).

    Raises ``OSError`` naming *path* when it cannot be opened; the old file stays.
    """
    _dup_onto_std(_open_log_fd(path))


def _dup_onto_std(fd: int) -> None:
    """Flush, then make descriptors 1 and 2 copies of *fd*, which is closed."""
    _flush_std()
    try:
        for target in (1, 2):
            if fd != target:
                os.dup2(fd, target)
    finally:
        if fd not in (1, 2):
            os.close(fd)


class TouchWatcher:
    """Says when one of some files was touched: its modification time changed, or it
    appeared, or it went away, since the last look (the first look only records).

    ``stat`` is a parameter for the tests.  With *report*, a file missing at the first
    look is logged once, in uWSGI's words.
    """

    __slots__ = ("paths", "_seen", "_stat")

    def __init__(self, paths, *, report: bool = False, stat: Callable = os.stat) -> None:
        self.paths = list(paths)
        self._stat = stat
        self._seen = {}
        for path in self.paths:
            self._seen[path] = self._look(path)
            if self._seen[path] is None and report:
                log("unable to stat() %s, events will be triggered as soon as the file is created"
                    % path)

    def _look(self, path: str):
        try:
            return self._stat(path).st_mtime_ns
        except OSError:
            return None

    def touched(self) -> Optional[str]:
        """The first file touched since the last call, or None."""
        found = None
        for path in self.paths:
            now = self._look(path)
            if now != self._seen[path]:
                self._seen[path] = now
                if found is None:
                    found = path
        return found


class LogReopener:
    """``--touch-logreopen``: reopen the log file when a trigger file is touched.

    *log_path* is the ``--logto``/``--daemonize`` file (None: there is none, and a
    touch only says so).  *announce* makes this process write the lines about it (the
    single process or the master); the other processes reopen silently.
    Call :meth:`check` once a second.
    """

    __slots__ = ("watcher", "log_path", "announce")

    def __init__(self, triggers, log_path: Optional[str], *, announce: bool) -> None:
        self.watcher = TouchWatcher(triggers, report=announce)
        self.log_path = log_path or None
        self.announce = announce

    def check(self, _now: float = 0.0) -> None:
        touched = self.watcher.touched()
        if touched is None:
            return
        if self.log_path is None:
            if self.announce:
                log("%s touched: no --logto or --daemonize file to reopen" % touched)
            return
        if self.announce:
            log("[%d] logsize: %d, triggering log-reopen (%s touched)..."
                % (int(time.time()), _log_size(), touched))
        try:
            reopen_log(self.log_path)
        except OSError as exc:
            log("*** unable to reopen the log file %s: %s ***" % (self.log_path, exc.strerror or exc))
            return
        if self.announce:
            log("[%d] %s reopened." % (int(time.time()), self.log_path))


def _log_size() -> int:
    try:
        return os.fstat(2).st_size
    except OSError:
        return 0


# ------------------------------------------------------------------ process names

def process_name(cfg, job: str, *, master: bool = False) -> Optional[str]:
    """The name for a process doing *job* ("uWSGI master", "uWSGI fastrouter 1", ...),
    or None when no ``--auto-procname``/``--procname*`` option asks for names.

    As in uWSGI: ``--procname-master`` names the master, ``--procname`` every
    process, and the prefix and suffix go around whichever name is chosen.
    """
    prefix = cfg.procname_prefix or ""
    suffix = cfg.procname_append or ""
    if not (cfg.auto_procname or prefix or suffix or cfg.procname or cfg.procname_master):
        return None
    name = job
    if master and cfg.procname_master:
        name = cfg.procname_master
    elif cfg.procname:
        name = cfg.procname
    return prefix + name + suffix


_COMM_BYTES = 15   # Linux's task name: 16 bytes with the terminating NUL


def set_process_name(name: Optional[str], comm: str = "/proc/self/comm") -> bool:
    """Give this process the task name *name* (cut to 15 bytes); False if impossible.

    Never raises: a process name is a convenience, never a reason not to start.
    """
    if not name:
        return False
    data = name.encode("utf-8", "replace")[:_COMM_BYTES]
    data = data.decode("utf-8", "ignore").encode("utf-8")   # no half character at the end
    try:
        with open(comm, "wb") as handle:
            handle.write(data)
    except (OSError, ValueError):
        return False
    return True


# ----------------------------------------------------------------------- daemon

def daemonize(logfile: Optional[str], *, umask: Optional[int] = None) -> None:
    """Become a daemon writing its output to *logfile* (None or "" = /dev/null).

    Returns in the daemon (the grandchild) only; the calling process and the first
    child leave with ``os._exit(0)``.  *umask* is set in the daemon (None, the
    default, keeps the umask the process has).  Raises ``OSError`` naming the path,
    before forking, when the log file cannot be opened.
    """
    log_fd = _open_log_fd(logfile or os.devnull)
    try:
        null_fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        os.close(log_fd)
        raise
    _flush_std()
    try:
        if os.fork() != 0:
            os._exit(0)
    except OSError:
        os.close(log_fd)
        os.close(null_fd)
        raise
    # The first child: a new session without a controlling terminal.
    try:
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
    except OSError as exc:
        log("daemonize: %s" % exc)
        os._exit(1)
    # The daemon.
    if umask is not None:
        os.umask(umask)
    if null_fd != 0:
        os.dup2(null_fd, 0)
        os.close(null_fd)
    _install_log(log_fd)


# ------------------------------------------------------- pidfile and master FIFO

class SetupError(Exception):
    """A start-up step of the process failed (exit status 1): a file the configuration
    names cannot be set up safely (the message names the option and the path), or a
    user or group to switch to does not exist.
    """


def _flag(name: str) -> int:
    return getattr(os, name, 0)


def write_pidfile(path: str, pid: int, option: str = "pidfile") -> None:
    """Write *pid* to *path* without following a symbolic link (see the module doc)."""
    flags = (os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK
             | _flag("O_CLOEXEC") | _flag("O_NOCTTY"))
    try:
        fd = os.open(path, flags, PIDFILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SetupError('option "--%s": %s is a symbolic link: refusing to write the pid '
                             'through it (remove it, or give the real path)' % (option, path)) from None
        if exc.errno == errno.ENXIO:
            raise SetupError('option "--%s": %s is not a regular file' % (option, path)) from None
        raise SetupError('option "--%s": unable to write the pidfile %s: %s'
                         % (option, path, exc.strerror or exc)) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SetupError('option "--%s": %s is not a regular file' % (option, path))
        data = b"%d\n" % pid
        if os.write(fd, data) != len(data):
            raise SetupError('option "--%s": short write to the pidfile %s' % (option, path))
    except OSError as exc:
        raise SetupError('option "--%s": unable to write the pidfile %s: %s'
                         % (option, path, exc.strerror or exc)) from None
    finally:
        os.close(fd)


def remove_pidfile(path: str, pid: int) -> bool:
    """Remove *path* if it is still ours: a regular file (not a link) holding *pid*.

    Anything else -- a link, another pid, something that is gone -- is left alone
    with a log line.  Returns True when the file was removed.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _flag("O_CLOEXEC"))
    except FileNotFoundError:
        return False
    except OSError as exc:
        log("pidfile %s left in place: %s" % (path, "it is a symbolic link" if exc.errno == errno.ELOOP
                                              else exc.strerror or exc))
        return False
    try:
        info = os.fstat(fd)
        content = os.read(fd, 64) if stat.S_ISREG(info.st_mode) else b""
    except OSError:
        content = b""
    finally:
        os.close(fd)
    if content.strip() != str(pid).encode():
        log("pidfile %s left in place: it no longer holds this process's pid (%d)" % (path, pid))
        return False
    try:
        if not os.path.samestat(os.lstat(path), info):
            log("pidfile %s left in place: it was replaced meanwhile" % path)
            return False
        os.unlink(path)
    except OSError:
        return False
    return True


def make_master_fifo(path: str, option: str = "master-fifo") -> int:
    """A fresh FIFO at *path* (see the module doc), opened read-write and non-blocking.

    Read-write, so the pipe never reports end-of-file when a writer goes away.
    Returns the descriptor (close-on-exec); raises :class:`SetupError`.
    """
    def fail(what: str) -> SetupError:
        return SetupError('option "--%s": %s %s' % (option, path, what))

    _clear_fifo_path(path, fail)
    _mkfifo_private(path, fail)
    return _open_own_fifo(path, fail)


def _clear_fifo_path(path: str, fail: Callable[[str], SetupError]) -> None:
    """Unlink whatever is at *path* (a link itself, never its target); not a directory."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno in (errno.EISDIR, errno.EPERM) and os.path.isdir(path):
            raise fail("is a directory: refusing to replace it with the master FIFO") from None
        raise fail("cannot be replaced by the master FIFO: %s" % (exc.strerror or exc)) from None


def _mkfifo_private(path: str, fail: Callable[[str], SetupError]) -> None:
    """mkfifo with exactly FIFO_MODE: the umask is 077 for the call (it can only take
    bits away, and 0600 has none a umask of 077 removes)."""
    old_umask = os.umask(0o077)
    try:
        os.mkfifo(path, FIFO_MODE)
    except OSError as exc:
        raise fail("cannot be created as the master FIFO: %s" % (exc.strerror or exc)) from None
    finally:
        os.umask(old_umask)


def _open_own_fifo(path: str, fail: Callable[[str], SetupError]) -> int:
    """Open the FIFO just made and check it is still a FIFO of ours with mode 0600."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW | _flag("O_CLOEXEC"))
    except OSError as exc:
        raise fail("cannot be opened as the master FIFO: %s" % (exc.strerror or exc)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISFIFO(info.st_mode) or info.st_uid != os.geteuid():
            raise fail("was replaced while the master FIFO was being made: refusing it")
        if stat.S_IMODE(info.st_mode) != FIFO_MODE:
            os.fchmod(fd, FIFO_MODE)
    except OSError as exc:
        os.close(fd)
        raise fail("cannot be made private: %s" % (exc.strerror or exc)) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


# --------------------------------------------------------------------- harakiri

def harakiri_line(index: int, pid: int) -> str:
    """The master's log line when it kills router process *index* (1-based)."""
    return "*** HARAKIRI ON GATEWAY uWSGI fastrouter %d (pid: %d) ***" % (index, pid)


class Heartbeat:
    """One monotonic timestamp per router process, in memory shared across fork().

    Create it in the master before forking the routers.  Slots are numbered from 0.
    A slot that holds 0.0 (never stamped) is never stale.
    """

    __slots__ = ("slots", "period", "_map")

    def __init__(self, slots: int, period: float = BEAT_INTERVAL) -> None:
        if slots < 1:
            raise ValueError("a heartbeat needs at least one slot, not %r" % (slots,))
        self.slots = slots
        self.period = period
        # Anonymous mappings are MAP_SHARED by default: children see the same pages.
        self._map = mmap.mmap(-1, _SLOT.size * slots)

    def _offset(self, slot: int) -> int:
        if not 0 <= slot < self.slots:
            raise IndexError("heartbeat slot %d out of range 0..%d" % (slot, self.slots - 1))
        return slot * _SLOT.size

    def beat(self, slot: int, now: float) -> None:
        """Stamp *slot* with *now* (called by the router process that owns the slot)."""
        _SLOT.pack_into(self._map, self._offset(slot), now)

    def reset(self, slot: int, now: float) -> None:
        """Stamp *slot* at (re)spawn, so a new process gets the full limit."""
        _SLOT.pack_into(self._map, self._offset(slot), now)

    def last(self, slot: int) -> float:
        """The latest stamp of *slot* (0.0 if never stamped)."""
        offset = self._offset(slot)
        value = _SLOT.unpack_from(self._map, offset)[0]
        for _ in range(8):
            again = _SLOT.unpack_from(self._map, offset)[0]
            if again == value:
                break
            value = again
        return value

    def stale(self, slot: int, now: float, limit: float) -> bool:
        """True when the owner of *slot* has not beaten for more than *limit* seconds
        of loop time (the beat period is added: a healthy loop beats every period).
        A *limit* of 0 or less means harakiri is off.
        """
        if limit <= 0:
            return False
        last = self.last(slot)
        if last == 0.0:
            return False
        return now - last > limit + self.period

    def close(self) -> None:
        """Unmap the shared memory (in a process that no longer needs it)."""
        if not self._map.closed:
            self._map.close()


class _Beater:
    """A repeating reactor timer stamping one heartbeat slot."""

    __slots__ = ("reactor", "heartbeat", "slot", "clock", "timer")

    def __init__(self, reactor, heartbeat: Heartbeat, slot: int,
                 clock: Callable[[], float]) -> None:
        self.reactor = reactor
        self.heartbeat = heartbeat
        self.slot = slot
        self.clock = clock
        self.timer = None

    def fire(self) -> None:
        self.heartbeat.beat(self.slot, self.clock())
        self.timer = self.reactor.call_later(self.heartbeat.period, self.fire)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def start_beating(reactor, heartbeat: Heartbeat, slot: int,
                  clock: Callable[[], float] = time.monotonic) -> _Beater:
    """In a router process: stamp *slot* now and every ``heartbeat.period`` seconds
    from *reactor*'s timers.  Returns a handle whose ``cancel()`` stops the beats.
    """
    beater = _Beater(reactor, heartbeat, slot, clock)
    beater.fire()
    return beater


# ------------------------------------------------------------ process calls

class ProcessOps:
    """The calls through which the master makes, reaps, signals and replaces processes.

    One small object, so that the master's decisions (respawn, give up, reload) can be
    tested in-process with a fake in its place: nothing is forked then.
    """

    def fork(self) -> int:
        return os.fork()

    def waitpid(self, pid: int, options: int) -> Tuple[int, int]:
        return os.waitpid(pid, options)

    def kill(self, pid: int, signum: int) -> None:
        os.kill(pid, signum)

    def execv(self, path: str, argv: list) -> None:
        os.execv(path, argv)

    def sigmask(self, how: int, signals: Iterable[int]) -> None:
        signal.pthread_sigmask(how, signals)


def exit_status(status: int) -> Optional[int]:
    """The exit status in a ``waitpid()`` *status*, or None when a signal ended the process."""
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else None


def describe_status(status: int) -> str:
    """A ``waitpid()`` *status* in words: "exited with status 1", "killed by signal SIGSEGV"."""
    if os.WIFEXITED(status):
        return "exited with status %d" % os.WEXITSTATUS(status)
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "%d" % number
        return "killed by signal %s%s" % (name, " (core dumped)" if os.WCOREDUMP(status) else "")
    return "ended with wait status %d" % status
