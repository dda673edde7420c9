"""A small single-threaded event loop on top of the stdlib :mod:`selectors`.

Theory of operation
-------------------
The reactor keeps three things: a selector (fd -> interest + callback), a heap
of timers and a FIFO of "call soon" callbacks.  One pass of :meth:`Reactor.run`
is::

    timeout = 0 if call-soon callbacks are queued
              else time until the earliest live timer (never negative)
              else None (block until an fd is ready)
    ready = selector.select(timeout)        # EINTR is retried by Python (PEP 475)
    now = clock()                           # the loop time, read once per pass
    for each ready (key, mask): callback(mask)
    run timers whose deadline is <= now, earliest first
    run the call-soon callbacks that were queued before that step

Every callback (fd, timer, call-soon, signal) is invoked at one of the few
``try`` blocks in this module; an exception is logged with its traceback,
counted in :attr:`Reactor.errors` and the loop goes on.  ``KeyboardInterrupt``
and ``SystemExit`` are not caught.

Stale events.  ``select()`` returns a batch; a callback early in the batch may
unregister (and close, and even reuse the number of) an fd that appears later
in the same batch.  The reactor keeps its own ``fd -> SelectorKey`` map, filled
with the keys that ``register()``/``modify()`` return.  The selector builds a
new key object whenever the registration changes, so "the key in the batch is
still the key in the map" is an identity test that doubles as a generation
check: an event whose key is no longer current is skipped.  Skipping is always
safe because every stdlib selector is level-triggered: a condition that still
holds is reported again on the next pass.

Hot path versus conveniences.  ``register()``/``modify()`` store the callback
itself as the key's data and the dispatch loop calls ``key.data(mask)``: no
per-event allocation, one dict lookup for the stale check.  The asyncio-style
``add_reader()``/``add_writer()`` store a two-slot object instead, so that a
reader and a writer on the same fd share one registration; they are meant for
listeners, the stats server and the like.

Timers.  ``call_later()``/``call_at()`` push ``(when, seq, timer)`` on a heap;
``seq`` keeps equal deadlines in scheduling order.  ``Timer.cancel()`` only
marks the timer (lazy deletion) and counts it; when more than half of the heap
is cancelled the heap is rebuilt without them.  Cancelled entries at the top of
the heap are dropped when the next timeout is computed.  A timer scheduled
while timers are being run is never run in that same pass, so a timer that
re-arms itself with a zero delay cannot starve I/O.  Delays are relative to the
loop time :attr:`Reactor.now` (as libuv does), not to a fresh clock reading.

Signals.  A non-blocking socketpair serves two purposes: :meth:`Reactor.wakeup`
writes a byte to it from anywhere (another thread, a signal handler), and it
is given to :func:`signal.set_wakeup_fd` when the first signal handler is
added.  The C-level signal handler then writes the signal number into the pair;
the Python-level handler installed for the signal does nothing.  The reactor
reads the pair like any other fd and calls the registered callbacks with the
signal numbers it finds, inside the loop, never in signal context.

The epoll fast path.  With the stdlib ``EpollSelector`` itself (not a
subclass), the per-request calls -- register, modify, unregister, and the poll
of every pass -- skip the selector's generic Python layers (file-object lookup,
key building through a Python-level ``__new__``, the list of ``(key, mask)``
pairs of ``select()``).  The reactor drives the selector's own ``epoll`` object
and keeps the selector's own fd -> key map in step, with the same
``SelectorKey`` objects, so the selector stays a complete, consistent
``selectors`` object (``get_map()``, ``close()``, the generic path) and every
other selector goes through the ordinary ``selectors`` API.  The stale-event
rule is kept: a pass with one event has nothing before it that could have
changed its registration; a pass with several takes a snapshot of the current
key of each fd before dispatching any, and compares it as above.  The epoll
events become selector masks as ``selectors`` does: anything besides EPOLLIN
(EPOLLOUT, ERR, HUP) reports WRITE, anything besides EPOLLOUT reports READ,
limited to the registered interest.  A read interest also asks for EPOLLRDHUP,
which is passed on as the :data:`HANGUP` bit of the mask: the peer sent its FIN,
so a reader that has just emptied the socket knows it reached the end without the
read that would return 0 (the proxy saves that system call on every response).

``max_events``.  On the epoll fast path :attr:`Reactor.max_events` is the
``maxevents`` of every ``epoll_wait`` (uWSGI's ``--fastrouter-events`` bounds
its poll the same way); descriptors left over are level-triggered and come
back in the next pass.  The generic path cannot bound it: the stdlib
``select()`` asks for ``len(registered fds)`` events and has no parameter.
"""

from __future__ import annotations

import heapq
import select as _select
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from .log import log, printable

__all__ = ["HANGUP", "READ", "WRITE", "Reactor", "Timer"]

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE

_EPOLLIN = getattr(_select, "EPOLLIN", 1)
_EPOLLOUT = getattr(_select, "EPOLLOUT", 4)
_EPOLLRDHUP = getattr(_select, "EPOLLRDHUP", 0)
#: A bit a callback may find in its mask besides READ (epoll fast path only): the
#: peer has shut down its sending side, so once the bytes already buffered are read
#: nothing more comes (a read would return 0).  Never set by other selectors.
HANGUP = _EPOLLRDHUP
#: selector interest (READ=1, WRITE=2) -> epoll interest; a read interest also asks
#: for EPOLLRDHUP, which only ever comes with EPOLLIN (a half-closed peer is readable)
_EPOLL_INTEREST = (0, _EPOLLIN | _EPOLLRDHUP, _EPOLLOUT, _EPOLLIN | _EPOLLOUT | _EPOLLRDHUP)
_PLAIN_INTERESTS = frozenset((READ, WRITE, READ | WRITE))
_NOT_IN = ~_EPOLLIN                # any epoll event but EPOLLIN reports WRITE
_NOT_OUT = ~_EPOLLOUT              # any epoll event but EPOLLOUT reports READ


def _masks_of(event: int) -> Tuple[int, int, int, int]:
    """The callback masks of one epoll *event*, by registered interest (0..3):
    ``selectors``' rule (see the module docstring) plus the HANGUP bit."""
    ready = (WRITE if event & _NOT_IN else 0) | (READ if event & _NOT_OUT else 0)
    hangup = event & _EPOLLRDHUP
    return tuple((interest & ready) | hangup for interest in range(4))  # type: ignore[return-value]


#: epoll event -> :func:`_masks_of`, for every combination of the bits epoll reports
#: (IN, PRI, OUT, ERR, HUP, RDHUP): the dispatch costs one plain-dict lookup instead of
#: half a dozen bit operations per event.  A plain dict, not a subclass with
#: ``__missing__``: indexing a dict subclass goes through a slot that calls
#: ``__getitem__`` as a method, several times the cost.  Any other event value is
#: added on first sight (:func:`_learn_masks`).
_REPORTED_BITS = [bit for bit in (_EPOLLIN, getattr(_select, "EPOLLPRI", 2), _EPOLLOUT,
                                  getattr(_select, "EPOLLERR", 8), getattr(_select, "EPOLLHUP", 16),
                                  _EPOLLRDHUP) if bit]
_EVENT_MASKS: Dict[int, Tuple[int, int, int, int]] = {}
for _combination in range(1 << len(_REPORTED_BITS)):
    _event = 0
    for _i, _bit in enumerate(_REPORTED_BITS):
        if _combination >> _i & 1:
            _event |= _bit
    _EVENT_MASKS[_event] = _masks_of(_event)
del _combination, _event, _i, _bit


def _learn_masks(event: int) -> Tuple[int, int, int, int]:
    masks = _EVENT_MASKS[event] = _masks_of(event)
    return masks


_new_key = tuple.__new__          # SelectorKey(fd, fd, events, data) without a Python frame
_SelectorKey = selectors.SelectorKey


def _epoll_parts(selector: selectors.BaseSelector) -> Tuple[Any, Optional[Dict[int, Any]]]:
    """(the epoll object, the fd -> key map) of a stdlib ``EpollSelector``, or (None, None)
    for any other selector, a subclass included, or when the class's methods were
    replaced: the fast path must skip only the stdlib's own code."""
    epoll_cls = getattr(selectors, "EpollSelector", None)
    if epoll_cls is None or type(selector) is not epoll_cls:
        return None, None
    # Methods replaced on the class itself (a tracing or test patch) are honoured.
    for name in ("select", "register", "modify", "unregister"):
        if getattr(getattr(epoll_cls, name, None), "__module__", None) != selectors.__name__:
            return None, None
    epoll = getattr(selector, "_selector", None)
    fd_to_key = getattr(selector, "_fd_to_key", None)
    if type(epoll) is not getattr(_select, "epoll", None) or type(fd_to_key) is not dict:
        return None, None
    return epoll, fd_to_key


# Longest single wait handed to select(); a longer timer just costs one more
# (idle) pass.  It keeps huge delays away from the kernel's timeout limits.
MAX_SELECT_TIMEOUT = 24 * 3600.0


class Timer:
    """A scheduled callback, returned by :meth:`Reactor.call_later` / :meth:`Reactor.call_at`."""

    __slots__ = ("when", "_callback", "_args", "_reactor", "_cancelled")

    def __init__(self, when: float, callback: Callable[..., Any], args: Tuple[Any, ...],
                 reactor: "Reactor") -> None:
        self.when = when
        self._callback: Optional[Callable[..., Any]] = callback
        self._args: Optional[Tuple[Any, ...]] = args
        # Set while the timer sits in the reactor's heap and may still fire.
        self._reactor: Optional[Reactor] = reactor
        self._cancelled = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Stop the timer from firing.  Idempotent; a no-op once it has fired."""
        if self._cancelled:
            return
        self._cancelled = True
        self._callback = None
        self._args = None
        reactor = self._reactor
        if reactor is not None:
            self._reactor = None
            reactor._timer_cancelled()

    def __repr__(self) -> str:
        state = "cancelled" if self._cancelled else ("pending" if self._reactor else "done")
        return "<Timer when=%.6f %s %r>" % (self.when, state, self._callback)


class _ReaderWriter:
    """The key data of an fd registered with add_reader()/add_writer()."""

    __slots__ = ("reader", "writer")

    def __init__(self, reader: Optional[Callable[[], Any]],
                 writer: Optional[Callable[[], Any]]) -> None:
        self.reader = reader
        self.writer = writer

    def __call__(self, mask: int) -> None:
        # Each attribute is read right before its use: the reader may have
        # removed the writer (or the whole registration, which clears both).
        if mask & READ:
            reader = self.reader
            if reader is not None:
                reader()
        if mask & WRITE:
            writer = self.writer
            if writer is not None:
                writer()

    def __repr__(self) -> str:
        return "<reader=%r writer=%r>" % (self.reader, self.writer)


def _ignore_signal(signum: int, frame: Any) -> None:
    """Python-level handler for signals the reactor dispatches.

    The C-level handler has already written the signal number to the wakeup
    fd; the real work happens in the loop.
    """


class Reactor:
    """Selector loop with timers, call-soon callbacks, signal dispatch and wakeup.

    Parameters:
    selector   -- a :class:`selectors.BaseSelector`; ``DefaultSelector()`` if omitted.
                  The reactor owns it and closes it in :meth:`close`.
    clock      -- monotonic time source in seconds (inject a fake one in tests).
    max_events -- recorded only: the stdlib selectors offer no way to bound the
                  number of events a select() returns (see the module docstring).
    """

    def __init__(self, selector: Optional[selectors.BaseSelector] = None,
                 clock: Callable[[], float] = time.monotonic,
                 max_events: int = 64) -> None:
        self._selector = selector if selector is not None else selectors.DefaultSelector()
        self._clock = clock
        self.max_events = max_events
        self.now: float = clock()
        #: how many fds were ready in the current pass (low-priority work such as the
        #: stats server yields when others were)
        self.ready_count = 0
        self.errors = 0
        self._keys: Dict[int, selectors.SelectorKey] = {}
        # The epoll fast path (module docstring); forget() skips the epoll_ctl(DEL)
        # only there.
        self._epoll, self._sel_map = _epoll_parts(self._selector)
        self._timers: List[Tuple[float, int, Timer]] = []
        self._timer_seq = 0
        self._cancelled_timers = 0
        self._soon: Deque[Tuple[Callable[..., Any], Tuple[Any, ...]]] = deque()
        self._stopping = False
        self._running_thread: Optional[int] = None
        self._closed = False
        # Signals: signum -> callback, and what to restore on removal/close.
        self._signal_handlers: Dict[int, Callable[[int], Any]] = {}
        self._saved_signal_handlers: Dict[int, Any] = {}
        self._saved_wakeup_fd: Optional[int] = None
        # The wakeup pair: written by wakeup() and by the C signal handler.
        self._wakeup_recv, self._wakeup_send = socket.socketpair()
        self._wakeup_recv.setblocking(False)
        self._wakeup_send.setblocking(False)
        self.register(self._wakeup_recv.fileno(), READ, self._on_wakeup)

    # ------------------------------------------------------------------ fds

    def register(self, fd: int, events: int, callback: Callable[[int], Any]) -> None:
        """Watch *fd* for *events* (READ|WRITE); ``callback(mask)`` gets the ready mask.

        Raises KeyError if *fd* is already registered, ValueError if it is
        registered through add_reader()/add_writer(), and whatever the selector
        raises for a bad fd or event mask.
        """
        keys = self._keys
        if fd in keys:
            if type(keys[fd].data) is _ReaderWriter:
                raise ValueError("fd %d is registered with add_reader/add_writer" % fd)
            raise KeyError("fd %d is already registered" % fd)
        epoll = self._epoll
        if epoll is None or type(fd) is not int or events not in _PLAIN_INTERESTS:
            keys[fd] = self._register(fd, events, callback)
            return
        # _register()'s fast path, inline: the proxy registers a socket per request.
        sel_map = self._sel_map
        if fd in sel_map:     # registered under its file object
            raise KeyError("fd %d is already registered" % fd)
        epoll.register(fd, _EPOLL_INTEREST[events])
        keys[fd] = sel_map[fd] = _new_key(_SelectorKey, (fd, fd, events, callback))

    def _register(self, fd: int, events: int, data: Any) -> selectors.SelectorKey:
        epoll = self._epoll
        if epoll is None:
            return self._selector.register(fd, events, data)
        if type(fd) is not int:
            fd = selectors._fileobj_to_fd(fd)  # type: ignore[attr-defined]
        if not events or events & ~(READ | WRITE):
            raise ValueError("Invalid events: %r" % (events,))
        sel_map = self._sel_map
        if fd in sel_map:
            raise KeyError("fd %d is already registered" % fd)
        epoll.register(fd, _EPOLL_INTEREST[events])
        sel_map[fd] = key = _new_key(_SelectorKey, (fd, fd, events, data))
        return key

    def modify(self, fd: int, events: int, callback: Callable[[int], Any]) -> None:
        """Change the interest and/or callback of a registered *fd*.

        Raises KeyError if *fd* is not registered, ValueError if it is
        registered through add_reader()/add_writer().
        """
        key = self._keys.get(fd)
        if key is None:
            raise KeyError("fd %d is not registered" % fd)
        if type(key.data) is _ReaderWriter:
            raise ValueError("fd %d is registered with add_reader/add_writer" % fd)
        self._modify(fd, events, callback)

    def _modify(self, fd: int, events: int, data: Any) -> None:
        if self._epoll is not None:
            self._modify_epoll(fd, events, data)
            return
        try:
            self._keys[fd] = self._selector.modify(fd, events, data)
        except BaseException:
            # Some selectors drop the registration when the kernel refuses
            # the change; keep our map in step with theirs.
            if self._selector.get_map().get(fd) is None:
                self._keys.pop(fd, None)
            raise

    def _modify_epoll(self, fd: int, events: int, data: Any) -> None:
        """modify() on the fast path: like the stdlib's, a new key only when something
        changed, and a refused change drops the registration from both maps."""
        key = self._keys[fd]
        if events == key.events:
            if data == key.data:
                return
        else:
            if not events or events & ~(READ | WRITE):
                raise ValueError("Invalid events: %r" % (events,))
            try:
                self._epoll.modify(fd, _EPOLL_INTEREST[events])
            except BaseException:
                self._sel_map.pop(fd, None)
                self._keys.pop(fd, None)
                raise
        self._keys[fd] = self._sel_map[fd] = _new_key(_SelectorKey, (fd, fd, events, data))

    def unregister(self, fd: int) -> None:
        """Stop watching *fd* (whichever way it was registered).  No error if it is not."""
        key = self._keys.pop(fd, None)
        if key is None:
            return
        data = key.data
        if type(data) is _ReaderWriter:
            # A dispatch of this object still pending in the current batch
            # must find nothing to call.
            data.reader = data.writer = None
        if self._epoll is None:
            self._selector.unregister(fd)
            return
        self._sel_map.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass   # already closed: the kernel dropped it (as the stdlib selector allows)

    def forget(self, fd: int) -> None:
        """Unregister *fd* that the caller closes right away, holding its only reference.

        With epoll the kernel drops a registration by itself when the last
        descriptor of the open file goes away, so the ``epoll_ctl(DEL)`` that
        :meth:`unregister` makes is skipped (one system call per closed socket on
        the proxy's hot path).  Only for descriptors that no other process or
        descriptor shares (not one that was passed with SCM_RIGHTS, nor one
        inherited by a fork that keeps it): for those the registration would
        outlive the close.  Other selectors unregister as usual.
        """
        key = self._keys.pop(fd, None)
        if key is None:
            return
        if self._epoll is not None:
            self._sel_map.pop(fd, None)   # the kernel drops its side at the close
        else:
            data = key.data
            if type(data) is _ReaderWriter:
                data.reader = data.writer = None
            self._selector.unregister(fd)

    def is_registered(self, fd: int) -> bool:
        return fd in self._keys

    # ------------------------------------------------ add_reader / add_writer

    def add_reader(self, fd: int, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` whenever *fd* is readable (replaces a previous reader)."""
        self._add(fd, READ, callback)

    def add_writer(self, fd: int, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` whenever *fd* is writable (replaces a previous writer)."""
        self._add(fd, WRITE, callback)

    def remove_reader(self, fd: int) -> bool:
        """Remove the reader of *fd*; return whether there was one."""
        return self._remove(fd, READ)

    def remove_writer(self, fd: int) -> bool:
        """Remove the writer of *fd*; return whether there was one."""
        return self._remove(fd, WRITE)

    def _add(self, fd: int, event: int, callback: Callable[[], Any]) -> None:
        key = self._keys.get(fd)
        if key is None:
            if event == READ:
                rw = _ReaderWriter(callback, None)
            else:
                rw = _ReaderWriter(None, callback)
            self._keys[fd] = self._register(fd, event, rw)
            return
        rw = key.data
        if type(rw) is not _ReaderWriter:
            raise ValueError("fd %d is registered with register()" % fd)
        if event == READ:
            rw.reader = callback
        else:
            rw.writer = callback
        if not key.events & event:
            self._modify(fd, key.events | event, rw)

    def _remove(self, fd: int, event: int) -> bool:
        key = self._keys.get(fd)
        if key is None:
            return False
        rw = key.data
        if type(rw) is not _ReaderWriter:
            raise ValueError("fd %d is registered with register()" % fd)
        if event == READ:
            had = rw.reader is not None
            rw.reader = None
        else:
            had = rw.writer is not None
            rw.writer = None
        remaining = key.events & ~event
        if not remaining:
            self.unregister(fd)
        elif remaining != key.events:
            self._modify(fd, remaining, rw)
        return had

    # --------------------------------------------------------------- timers

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Run ``callback(*args)`` *delay* seconds after the loop time :attr:`now`."""
        return self.call_at(self.now + delay, callback, *args)

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Run ``callback(*args)`` once the loop time reaches *when* (clock units)."""
        timer = Timer(when, callback, args, self)
        seq = self._timer_seq
        self._timer_seq = seq + 1
        heapq.heappush(self._timers, (when, seq, timer))
        return timer

    def _timer_cancelled(self) -> None:
        """A timer still in the heap was cancelled: count it, compact if over half."""
        self._cancelled_timers += 1
        timers = self._timers
        if self._cancelled_timers * 2 > len(timers):
            # In place: run() holds a reference to this very list.
            timers[:] = [entry for entry in timers if not entry[2]._cancelled]
            heapq.heapify(timers)
            self._cancelled_timers = 0

    def _next_timeout(self) -> Optional[float]:
        """Seconds until the earliest live timer (0 if overdue), None if there is none."""
        timers = self._timers
        while timers:
            when, _, timer = timers[0]
            if timer._cancelled:
                heapq.heappop(timers)
                self._cancelled_timers -= 1
                continue
            # A fresh clock reading: callbacks of this pass may have taken time.
            delay = when - self._clock()
            if delay <= 0.0:
                return 0.0
            return delay if delay < MAX_SELECT_TIMEOUT else MAX_SELECT_TIMEOUT
        return None

    def _run_timers(self) -> None:
        timers = self._timers
        now = self.now
        # Timers scheduled from inside this pass get a seq >= limit and wait
        # for the next pass.
        limit = self._timer_seq
        heappop = heapq.heappop
        while timers:
            when, seq, timer = timers[0]
            if when > now or seq >= limit:
                break
            heappop(timers)
            if timer._cancelled:
                self._cancelled_timers -= 1
                continue
            callback = timer._callback
            args = timer._args
            timer._reactor = None
            timer._callback = timer._args = None
            try:
                callback(*args)  # type: ignore[misc]
            except Exception:
                self._report(callback)

    # ------------------------------------------------------------ call soon

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` at the end of the current pass (after I/O and
        due timers), or in the next pass if called from a call-soon callback.

        From another thread, follow it with :meth:`wakeup`.
        """
        self._soon.append((callback, args))

    def _run_soon(self) -> None:
        soon = self._soon
        popleft = soon.popleft
        for _ in range(len(soon)):
            callback, args = popleft()
            try:
                callback(*args)
            except Exception:
                self._report(callback)

    # -------------------------------------------------------------- signals

    def add_signal_handler(self, signum: int, callback: Callable[[int], Any]) -> None:
        """Call ``callback(signum)`` from the loop whenever *signum* is delivered.

        Main thread only (as :func:`signal.signal` requires).  Replaces an
        earlier callback for the same signal.
        """
        self._check_open()
        if self._saved_wakeup_fd is None:
            self._saved_wakeup_fd = signal.set_wakeup_fd(
                self._wakeup_send.fileno(), warn_on_full_buffer=False)
        try:
            previous = signal.signal(signum, _ignore_signal)
        except BaseException:
            if not self._signal_handlers:
                self._restore_wakeup_fd()
            raise
        if signum not in self._saved_signal_handlers:
            self._saved_signal_handlers[signum] = previous
        self._signal_handlers[signum] = callback

    def remove_signal_handler(self, signum: int) -> None:
        """Stop dispatching *signum*; its disposition becomes SIG_DFL."""
        if self._signal_handlers.pop(signum, None) is None:
            return
        self._saved_signal_handlers.pop(signum, None)
        signal.signal(signum, signal.SIG_DFL)
        if not self._signal_handlers:
            self._restore_wakeup_fd()

    def _restore_wakeup_fd(self) -> None:
        saved = self._saved_wakeup_fd
        if saved is not None:
            self._saved_wakeup_fd = None
            signal.set_wakeup_fd(saved)

    def _on_wakeup(self, mask: int) -> None:
        # One recv per pass is enough: anything left makes the fd ready again.
        try:
            data = self._wakeup_recv.recv(4096)
        except OSError:  # BlockingIOError, InterruptedError, or closed
            return
        handlers = self._signal_handlers
        if handlers:
            for signum in data:  # 0 bytes come from wakeup() and match nothing
                callback = handlers.get(signum)
                if callback is not None:
                    try:
                        callback(signum)
                    except Exception:
                        self._report(callback)

    def wakeup(self) -> None:
        """Make a blocking select() return.  Safe from any thread or signal handler."""
        try:
            self._wakeup_send.send(b"\0")
        except OSError:
            # Full (the loop will wake anyway) or already closed.
            pass

    # ----------------------------------------------------------------- loop

    def run(self) -> None:
        """Run passes until :meth:`stop`; return after the pass in which it was called.

        If stop() was called before run(), exactly one pass is made.
        """
        self._check_open()
        if self._running_thread is not None:
            raise RuntimeError("reactor is already running")
        self._running_thread = threading.get_ident()
        try:
            if self._epoll is not None:
                self._run_epoll()
            else:
                self._run_selector()
        finally:
            self._stopping = False
            self._running_thread = None

    def _run_selector(self) -> None:
        """The loop over any selector, through the ``selectors`` API.

        It and :meth:`_run_epoll` are written out in full on purpose: a helper shared by
        the two would be one more call on every pass of the loop, the hottest code of
        the router."""
        select = self._selector.select
        clock = self._clock
        keys_get = self._keys.get
        timers = self._timers
        soon = self._soon
        next_timeout = self._next_timeout
        run_timers = self._run_timers
        run_soon = self._run_soon
        report = self._report
        self.now = clock()
        while True:
            if soon:
                timeout: Optional[float] = 0.0
            elif timers:
                timeout = next_timeout()
            else:
                timeout = None
            ready = select(timeout)
            self.now = now = clock()
            self.ready_count = len(ready)
            for key, mask in ready:
                # Skip events whose registration changed earlier in this batch.
                if keys_get(key.fd) is key:
                    try:
                        key.data(mask)
                    except Exception:
                        report(key.data)
            if timers and timers[0][0] <= now:
                run_timers()
            if soon:
                run_soon()
            if self._stopping:
                break

    def _run_epoll(self) -> None:
        """The same loop on the stdlib epoll selector's own epoll object (module docstring)."""
        poll = self._epoll.poll
        event_masks = _EVENT_MASKS
        max_events = max(int(self.max_events), 1)
        clock = self._clock
        keys_get = self._keys.get
        timers = self._timers
        soon = self._soon
        next_timeout = self._next_timeout
        run_timers = self._run_timers
        run_soon = self._run_soon
        report = self._report
        self.now = clock()
        while True:
            if soon:
                timeout: Optional[float] = 0.0
            elif timers:
                when, _, timer = timers[0]
                if timer._cancelled:
                    timeout = next_timeout()
                else:
                    # A fresh clock reading: callbacks of this pass may have taken time.
                    timeout = when - clock()
                    if timeout <= 0.0:
                        timeout = 0.0
                    elif timeout > MAX_SELECT_TIMEOUT:
                        timeout = MAX_SELECT_TIMEOUT
            else:
                timeout = None
            ready = poll(timeout, max_events)
            self.now = now = clock()
            count = len(ready)
            self.ready_count = count
            if count == 1:
                # Nothing earlier in the batch can have changed this registration.
                fd, event = ready[0]
                key = keys_get(fd)
                if key is not None:
                    try:
                        masks = event_masks[event]
                    except KeyError:
                        masks = _learn_masks(event)
                    callback = key.data
                    try:
                        callback(masks[key.events])
                    except Exception:
                        report(callback)
            elif count:
                # The key of each fd as it is now, before any callback runs.
                batch = [(keys_get(fd), event) for fd, event in ready]
                for key, event in batch:
                    if key is not None and keys_get(key.fd) is key:
                        try:
                            masks = event_masks[event]
                        except KeyError:
                            masks = _learn_masks(event)
                        callback = key.data
                        try:
                            callback(masks[key.events])
                        except Exception:
                            report(callback)
            if timers and timers[0][0] <= now:
                run_timers()
            if soon:
                run_soon()
            if self._stopping:
                break

    def stop(self) -> None:
        """Ask :meth:`run` to return at the end of the current pass (thread-safe)."""
        self._stopping = True
        if self._running_thread != threading.get_ident():
            self.wakeup()

    def _report(self, callback: Any) -> None:
        """The one place a callback's exception ends up: log it, count it."""
        self.errors += 1
        exc_type, exc, tb = sys.exc_info()
        try:
            where = repr(callback)
        except Exception:
            where = object.__repr__(callback)
        log("reactor: unhandled %s in callback %s: %s"
            % (getattr(exc_type, "__name__", exc_type), where, printable(str(exc))))
        for chunk in traceback.format_exception(exc_type, exc, tb):
            if chunk.startswith("  File "):
                lines = chunk.rstrip("\n").split("\n")   # a frame: source lines of the program
            else:
                # An exception's text may quote peer bytes: one escaped line (D18).
                lines = [printable(chunk.strip("\n"))]
            for line in lines:
                log(line)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("reactor is closed")

    def abandon(self) -> None:
        """Drop this loop in a forked child (or before an exec): close its selector and
        wakeup pair without touching the signal dispositions, which belong to whoever
        runs next.  The reactor cannot be used afterwards."""
        self._closed = True
        self._running_thread = None
        self._signal_handlers.clear()
        self._saved_signal_handlers.clear()
        self._saved_wakeup_fd = None
        for closable in (self._selector, self._wakeup_recv, self._wakeup_send):
            try:
                closable.close()
            except OSError:
                pass

    def close(self) -> None:
        """Restore signal handlers and the previous wakeup fd, close the selector
        and the wakeup pair.  Idempotent.  Registered fds are not closed."""
        if self._closed:
            return
        if self._running_thread is not None:
            raise RuntimeError("cannot close a running reactor")
        self._closed = True
        for signum, previous in self._saved_signal_handlers.items():
            # None means the handler was not installed from Python.
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._saved_signal_handlers.clear()
        self._signal_handlers.clear()
        self._restore_wakeup_fd()
        for key in self._keys.values():
            if type(key.data) is _ReaderWriter:
                key.data.reader = key.data.writer = None
        self._keys.clear()
        self._timers.clear()
        self._cancelled_timers = 0
        self._soon.clear()
        self._selector.close()
        self._wakeup_recv.close()
        self._wakeup_send.close()
