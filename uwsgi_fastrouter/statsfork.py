"""Stats documents written by short-lived, low-priority processes (under ``--master``).

Theory of operation
-------------------
The master's stats document sums its router processes' reports into its own table:
with 10,000 keys that is a fifth of a second of CPU per document.  Rendered in the
master's loop (in slices, see stats.py) it never blocks a pass for long, but it keeps
a CPU busy at normal priority for as long as documents are asked for, and on a small
machine the router processes then wait for a CPU: routing latency suffers although no
loop stalls.  So the master hands a stats client whose document is ready to a process
of its own at the lowest priority there is, which renders and writes that document
and exits; the scheduler gives routing the CPUs first.

The lowest priority is Linux's idle policy (``SCHED_IDLE``) where there is one: a
router process that wakes up takes the CPU from such a process at once.  A merely
niced process (nice 10) is not preempted so: the kernel lets it finish its time
slice, and a router process woken meanwhile waits for a CPU for a few milliseconds,
which the routing latency's 99th percentile shows on a machine with few CPUs.  The
price of the idle policy is that a renderer gets next to no CPU while every CPU is
busy at normal priority: so a renderer that has been at work for :data:`IDLE_FOR`
seconds leaves that policy for nice 10 (a tenth of a CPU or so on a busy machine; at
nice 19 a big document would take minutes), where the kernel lets it (a process
needs the right to raise its own priority for that: root, or ``CAP_SYS_NICE``, or a
high enough ``RLIMIT_NICE``); one that may not stays idle and finishes when a CPU is
free.  Without the idle policy the renderer runs at nice 10 from the start.

How a document leaves the master, which never waits for it: the master forks an
intermediate process, closes its copy of the client's socket and goes on.  The
intermediate drops the master's signal handlers, closes every descriptor but the
client's socket, the standard streams and the write end of a *done* pipe (at the
renderer's priority already: the second fork, which copies the master's page tables
again, is work too), forks the renderer and exits (if that fork fails, it renders the
document itself).  So the
renderer is nobody's child (no one reaps or kills it; ``init`` does) and holds none of
the master's descriptors: the master's listeners do not outlive it, and nothing of
the master's loop is touched.  For the few milliseconds the intermediate lives it
holds copies of them all; that is harmless where, as in the master, every descriptor
is unregistered from epoll before it is closed (:meth:`Reactor.forget` would leave a
registration behind while a copy exists; the master runs no sessions, the only users
of it).  The document is a snapshot of the table and the reports at the fork, written
whole, in chunks of :data:`~uwsgi_fastrouter.stats.CHUNK` bytes each bounded by the
socket time-out; the master's fork copies its page tables and nothing else.

The intermediate and the renderer hold the *done* pipe's only write ends: when both
have exited the master reads the pipe's EOF and counts the renderer gone (its SIGCHLD
handling has reaped the intermediate, a child it does not know, without a word).  At most
:data:`MAX_RENDERERS` are alive at a time (each holds a copy-on-write image of the
master); beyond that, or when the fork fails, the document is rendered in the
master's loop as before.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import time
from typing import Callable, Iterator, Optional

from .stats import CHUNK

#: renderer processes alive at once; more concurrent stats clients are served in the loop
MAX_RENDERERS = 4
#: the renderer's nice value (added to the master's): its priority without the idle
#: policy, or once it has left that policy
RENDERER_NICE = 10
#: seconds a renderer spends under the idle policy before it asks for nice 10
IDLE_FOR = 2.0
#: Linux's idle scheduling policy (None where the platform has none)
_SCHED_IDLE = getattr(os, "SCHED_IDLE", None)

_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD)


class ForkedRenderers:
    """Hands stats clients to renderer processes, at most *limit* alive at a time.

    An instance is the ``render_elsewhere`` hook of a
    :class:`~uwsgi_fastrouter.endpoints.StatsServer`: called with a client's socket,
    the pieces of its answer (not yet rendered), the socket time-out and the function
    that makes an error answer; True when a renderer took the client (the caller then
    closes its own copy of the socket), False when the caller must serve it itself.
    Main thread only (it sets signal handlers in the forked process).

    *reap*: reap each intermediate process once it has exited.  False where the
    process reaps every child of its own (the master's SIGCHLD handling): a second
    reaper could, once the pid is reused, take the status of a child it does not own.
    """

    def __init__(self, reactor, limit: int = MAX_RENDERERS, reap: bool = True) -> None:
        self.reactor = reactor
        self.limit = limit
        self.reap = reap
        self.alive = 0

    def __call__(self, sock: socket.socket, pieces: Iterator[bytes], timeout: float,
                 error_payload: Callable[[BaseException], bytes]) -> bool:
        if self.alive >= self.limit:
            return False
        done_read, done_write = os.pipe()
        try:
            pid = _fork_intermediate(sock, pieces, timeout, error_payload, done_write)
        finally:
            os.close(done_write)
        if pid is None:
            os.close(done_read)
            return False
        self.alive += 1
        self.reactor.add_reader(done_read, lambda: self._gone(done_read, pid))
        return True

    def _gone(self, done_read: int, pid: int) -> None:
        """The processes behind *done_read* exited (the pipe's EOF)."""
        try:
            if os.read(done_read, 64):
                return          # never written to: only its EOF counts
        except BlockingIOError:
            return
        except OSError:
            pass
        self.reactor.remove_reader(done_read)
        os.close(done_read)
        self.alive -= 1
        if self.reap:
            try:
                os.waitpid(pid, os.WNOHANG)     # it has exited: this does not wait
            except ChildProcessError:
                pass


def _fork_intermediate(sock: socket.socket, pieces: Iterator[bytes], timeout: float,
                       error_payload: Callable[[BaseException], bytes], done_write: int) -> Optional[int]:
    """Fork the intermediate process: its pid, or None when the fork failed."""
    # Blocked across the fork: the master's handlers must not run in the intermediate
    # before it has dropped them.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        pid = os.fork()
    except OSError:
        pid = None
    if pid == 0:  # pragma: no cover - runs in the intermediate process
        _intermediate(sock, pieces, timeout, error_payload, done_write, previous)
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return pid


def _intermediate(sock, pieces, timeout, error_payload, done_write, mask) -> None:  # pragma: no cover
    """Leave the master behind, fork the renderer and exit; without a renderer (the
    fork failed), render the document here."""
    # The renderer's priority first of all: what this process does (closing, the
    # second fork's copy of the master's page tables) is work too.
    idle = _lower_priority()
    try:
        for signum in _SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        _close_all_but(0, 1, 2, sock.fileno(), done_write)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    except BaseException:
        os._exit(1)
    try:
        renderer = os.fork()
    except OSError:
        renderer = 0
    if renderer:
        os._exit(0)
    try:
        _render(sock, pieces, timeout, error_payload, idle)
    finally:
        os._exit(0)


def _lower_priority() -> bool:  # pragma: no cover - runs in the intermediate process
    """Nice 10, then the idle policy where there is one: True when the process is
    under the idle policy (the renderer forked next inherits both)."""
    try:
        os.nice(RENDERER_NICE)
    except OSError:
        pass
    if _SCHED_IDLE is None:
        return False
    try:
        os.sched_setscheduler(0, _SCHED_IDLE, os.sched_param(0))
    except OSError:
        return False
    return True


def _leave_idle() -> None:  # pragma: no cover - runs in the renderer
    """From the idle policy back to the usual one, at the nice value set before
    (refused without the right to raise a priority: the renderer then stays idle)."""
    try:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except OSError:
        pass


def _close_all_but(*keep: int) -> None:
    """Close every descriptor of this process except *keep* (those listed in
    /proc/self/fd, or every number up to the limit where there is no /proc)."""
    try:
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass        # the directory's own descriptor, closed already
        return
    except OSError:
        pass
    low = 0
    for fd in sorted(set(keep)):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _render(sock: socket.socket, pieces: Iterator[bytes], timeout: float,
            error_payload: Callable[[BaseException], bytes], idle: bool = False) -> None:  # pragma: no cover
    """In the renderer: the whole answer to *sock*, a chunk at a time, at low priority.
    A failure before anything was sent is an error answer (as in the loop).  Its
    priority is the intermediate's, lowered already; *idle*: under the idle policy,
    which it leaves after :data:`IDLE_FOR` seconds (looked at between chunks)."""
    gc.disable()            # a short life: a collection would only copy pages
    sock.settimeout(timeout)
    leave_idle_at = time.monotonic() + IDLE_FOR if idle else None
    sent_any = False
    chunk: list = []
    size = 0
    try:
        for piece in pieces:
            chunk.append(piece)
            size += len(piece)
            if size >= CHUNK:
                sock.sendall(b"".join(chunk))
                sent_any = True
                chunk, size = [], 0
                if leave_idle_at is not None and time.monotonic() >= leave_idle_at:
                    _leave_idle()
                    leave_idle_at = None
        if chunk:
            sock.sendall(b"".join(chunk))
    except OSError:
        return              # the client went away or stopped reading
    except Exception as exc:
        if not sent_any:
            try:
                sock.sendall(error_payload(exc))
            except Exception:
                pass
