"""Stats documents written by short-lived, low-priority processes (under ``--master``).

Theory of operation
-------------------
The master's stats document sums its router processes' reports into its own table:
with 10,000 keys that is a fifth of a second of CPU per document.  Rendered in the
master's loop (in slices, see stats.py) it never blocks a pass for long, but it keeps
a CPU busy at normal priority for as long as documents are asked for, and on a small
machine the router processes then wait for a CPU: routing latency suffers although no
loop stalls.  So the master hands a stats client whose document is ready to a process
of its own at a low priority (nice 10), which renders and writes that document
and exits; the scheduler gives routing the CPUs first.  Nice 10, not 19: on a machine
whose CPUs are all busy at normal priority the renderer still gets about a tenth of
one (at 19 it would get one part in seventy, and a big document would take minutes).

How a document leaves the master: the master forks an intermediate process and waits
for it.  The intermediate drops the master's signal handlers, closes every descriptor
but the client's socket, the standard streams and the write end of a *done* pipe,
forks the renderer and exits.  So when the master's ``waitpid`` returns, no process
but the master holds any of its descriptors (an epoll registration outlives a close
while another process holds the file, and the master's listeners must not stay open
after it exits), the renderer is nobody's child (the master never reaps or kills it;
``init`` does), and the master closes its copy of the client's socket and goes on.
The master blocks for two forks and an exit, a few milliseconds; the document is a
snapshot of the table and the reports at the fork, written whole, in chunks of
:data:`~uwsgi_fastrouter.stats.CHUNK` bytes each bounded by the socket time-out.

The renderer holds the *done* pipe's only write end: its exit is the pipe's EOF in
the master, which counts the renderers alive and hands out at most
:data:`MAX_RENDERERS` at a time (each holds a copy-on-write image of the master);
beyond that, or when a fork fails, the document is rendered in the master's loop as
before.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
from typing import Callable, Iterator

from .stats import CHUNK

#: renderer processes alive at once; more concurrent stats clients are served in the loop
MAX_RENDERERS = 4
#: the renderer's nice value (added to the master's)
RENDERER_NICE = 10

_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD)


class ForkedRenderers:
    """Hands stats clients to renderer processes, at most *limit* alive at a time.

    An instance is the ``render_elsewhere`` hook of a
    :class:`~uwsgi_fastrouter.endpoints.StatsServer`: called with a client's socket,
    the pieces of its answer (not yet rendered), the socket time-out and the function
    that makes an error answer; True when a renderer took the client (the caller then
    closes its own copy of the socket), False when the caller must serve it itself.
    """

    def __init__(self, reactor, limit: int = MAX_RENDERERS) -> None:
        self.reactor = reactor
        self.limit = limit
        self.alive = 0

    def __call__(self, sock: socket.socket, pieces: Iterator[bytes], timeout: float,
                 error_payload: Callable[[BaseException], bytes]) -> bool:
        if self.alive >= self.limit:
            return False
        done_read, done_write = os.pipe()
        try:
            started = _start_renderer(sock, pieces, timeout, error_payload, done_write)
        finally:
            os.close(done_write)
        if not started:
            os.close(done_read)
            return False
        self.alive += 1
        self.reactor.add_reader(done_read, lambda: self._gone(done_read))
        return True

    def _gone(self, done_read: int) -> None:
        """The renderer behind *done_read* exited (the pipe's EOF)."""
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


def _start_renderer(sock: socket.socket, pieces: Iterator[bytes], timeout: float,
                    error_payload: Callable[[BaseException], bytes], done_write: int) -> bool:
    """Fork the intermediate process and wait for it; True when the renderer runs."""
    # Blocked across the fork: the master's handlers must not run in the intermediate
    # before it has dropped them.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return False
    if pid == 0:  # pragma: no cover - runs in the intermediate process
        _intermediate(sock, pieces, timeout, error_payload, done_write, previous)
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _intermediate(sock, pieces, timeout, error_payload, done_write, mask) -> None:  # pragma: no cover
    """Leave the master behind, fork the renderer and exit (0: the renderer runs)."""
    try:
        for signum in _SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        _close_all_but(0, 1, 2, sock.fileno(), done_write)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        renderer = os.fork()
    except BaseException:
        os._exit(1)
    if renderer:
        os._exit(0)
    try:
        _render(sock, pieces, timeout, error_payload)
    finally:
        os._exit(0)


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
            error_payload: Callable[[BaseException], bytes]) -> None:  # pragma: no cover
    """In the renderer: the whole answer to *sock*, a chunk at a time, at low priority.
    A failure before anything was sent is an error answer (as in the loop)."""
    try:
        os.nice(RENDERER_NICE)
    except OSError:
        pass
    gc.disable()            # a short life: a collection would only copy pages
    sock.settimeout(timeout)
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
