"""Tests for uwsgi_fastrouter.reactor, run once per selector class of the platform."""

from __future__ import annotations

import io
import os
import selectors
import signal
import socket
import threading
import time

import pytest

from support import wait_until
from uwsgi_fastrouter import log as logmod
from uwsgi_fastrouter.reactor import HANGUP, READ, WRITE, Reactor, Timer

SELECTOR_NAMES = ["EpollSelector", "PollSelector", "SelectSelector", "KqueueSelector",
                  "DevpollSelector"]

WATCHDOG_SECONDS = 5.0


@pytest.fixture(params=SELECTOR_NAMES)
def selector_cls(request):
    cls = getattr(selectors, request.param, None)
    if cls is None:
        pytest.skip("selectors.%s is not available here" % request.param)
    return cls


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def make_reactor(selector_cls):
    made = []

    def make(**kwargs):
        reactor = Reactor(selector=selector_cls(), **kwargs)
        made.append(reactor)
        return reactor

    yield make
    for reactor in made:
        reactor.close()


@pytest.fixture
def reactor(make_reactor):
    return make_reactor()


@pytest.fixture
def socketpair():
    made = []

    def make():
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        made.extend((a, b))
        return a, b

    yield make
    for s in made:
        s.close()


@pytest.fixture
def captured_log():
    stream = io.StringIO()
    previous = logmod._stream
    logmod.set_stream(stream)
    yield stream
    logmod.set_stream(previous)


class WatchdogExpired(BaseException):
    pass


def run_bounded(reactor: Reactor, seconds: float = WATCHDOG_SECONDS) -> None:
    """Run the loop; fail if it is still running after *seconds* of real time.

    The watchdog is a thread, so it works whatever clock the reactor uses, and
    it wakes the loop through a socketpair of its own, so it works even when
    the reactor's wakeup() does not.
    """
    fired = threading.Event()
    alarm_r, alarm_w = socket.socketpair()
    alarm_r.setblocking(False)

    def on_alarm(mask):
        # Not an Exception: it passes the reactor's error choke point and
        # leaves run() even if stop() were broken.
        raise WatchdogExpired()

    def watchdog():
        fired.set()
        alarm_w.send(b"!")

    reactor.register(alarm_r.fileno(), READ, on_alarm)
    timer = threading.Timer(seconds, watchdog)
    timer.daemon = True
    timer.start()
    try:
        reactor.run()
    except WatchdogExpired:
        pass
    finally:
        timer.cancel()
        timer.join()
        reactor.unregister(alarm_r.fileno())
        alarm_r.close()
        alarm_w.close()
    assert not fired.is_set(), "reactor still running after %.1f s" % seconds


# ------------------------------------------------------------------ fd dispatch

def test_readable_dispatch(reactor, socketpair):
    a, b = socketpair()
    got = []

    def on_event(mask):
        got.append((mask, a.recv(100)))
        reactor.unregister(a.fileno())
        reactor.stop()

    reactor.register(a.fileno(), READ, on_event)
    b.send(b"ping")
    run_bounded(reactor)
    assert got == [(READ, b"ping")]
    assert not reactor.is_registered(a.fileno())


def test_writable_dispatch(reactor, socketpair):
    a, _ = socketpair()
    masks = []

    def on_event(mask):
        masks.append(mask)
        reactor.stop()

    reactor.register(a.fileno(), WRITE, on_event)
    run_bounded(reactor)
    assert masks == [WRITE]


def test_read_and_write_interest_reports_both(reactor, socketpair):
    a, b = socketpair()
    masks = []
    b.send(b"x")

    def on_event(mask):
        masks.append(mask)
        reactor.stop()

    reactor.register(a.fileno(), READ | WRITE, on_event)
    run_bounded(reactor)
    assert masks == [READ | WRITE]


def test_modify_changes_interest_and_callback(reactor, socketpair):
    a, b = socketpair()
    seen = []

    def on_write(mask):
        seen.append(("write", mask))
        # Nothing to read yet: switch to read interest with another callback.
        reactor.modify(a.fileno(), READ, on_read)
        b.send(b"data")

    def on_read(mask):
        seen.append(("read", mask, a.recv(100)))
        reactor.stop()

    reactor.register(a.fileno(), WRITE, on_write)
    run_bounded(reactor)
    assert seen == [("write", WRITE), ("read", READ, b"data")]


def test_register_twice_and_modify_unknown_raise(reactor, socketpair):
    a, _ = socketpair()
    reactor.register(a.fileno(), READ, lambda mask: None)
    with pytest.raises(KeyError):
        reactor.register(a.fileno(), READ, lambda mask: None)
    with pytest.raises(KeyError):
        reactor.modify(a.fileno() + 1000, READ, lambda mask: None)
    # Unregister is quiet for unknown fds, and idempotent.
    reactor.unregister(a.fileno())
    reactor.unregister(a.fileno())
    reactor.unregister(a.fileno() + 1000)
    assert not reactor.is_registered(a.fileno())


def test_unregister_in_batch_skips_stale_event(reactor, socketpair):
    """Two readable fds; whichever runs first unregisters and closes the other.

    The freed fd number is then reused for a fresh (not readable) socket
    registered with a new callback: the stale event must reach neither.
    """
    a, a_peer = socketpair()
    b, b_peer = socketpair()
    a_peer.send(b"1")
    b_peer.send(b"2")
    socks = {a.fileno(): a, b.fileno(): b}
    calls = []
    replacement = []

    def make_cb(fd, other_fd):
        def cb(mask):
            calls.append(fd)
            socks[fd].recv(10)
            if reactor.is_registered(other_fd):
                reactor.unregister(other_fd)
                socks[other_fd].close()
                c, c_peer = socket.socketpair()
                replacement.extend((c, c_peer))
                reactor.register(c.fileno(), READ, lambda mask: calls.append(("new", mask)))
            reactor.call_soon(reactor.stop)
        return cb

    fa, fb = a.fileno(), b.fileno()
    reactor.register(fa, READ, make_cb(fa, fb))
    reactor.register(fb, READ, make_cb(fb, fa))
    try:
        run_bounded(reactor)
        assert len(calls) == 1, calls
        assert calls[0] in (fa, fb)
    finally:
        for s in replacement:
            reactor.unregister(s.fileno())
            s.close()


def test_modify_in_batch_skips_stale_event(reactor, socketpair):
    """An fd whose registration changed earlier in the batch is not dispatched
    with the old mask."""
    a, a_peer = socketpair()
    b, b_peer = socketpair()
    a_peer.send(b"1")
    b_peer.send(b"2")
    calls = []

    def first(which, other):
        def cb(mask):
            calls.append((which, mask))
            if len(calls) == 1:
                # Other fd: READ interest -> WRITE interest, new callback.
                reactor.modify(other.fileno(), WRITE,
                               lambda m: calls.append(("modified", m)))
            reactor.call_soon(reactor.stop)
        return cb

    reactor.register(a.fileno(), READ, first("a", b))
    reactor.register(b.fileno(), READ, first("b", a))
    run_bounded(reactor)
    assert len(calls) == 1, calls


def test_add_reader_and_writer_share_one_fd(reactor, socketpair):
    a, b = socketpair()
    events = []
    b.send(b"hello")

    def on_read():
        events.append("read")
        a.recv(100)
        reactor.remove_reader(a.fileno())
        check()

    def on_write():
        events.append("write")
        reactor.remove_writer(a.fileno())
        check()

    def check():
        if not reactor.is_registered(a.fileno()):
            reactor.stop()

    reactor.add_reader(a.fileno(), on_read)
    reactor.add_writer(a.fileno(), on_write)
    run_bounded(reactor)
    assert sorted(events) == ["read", "write"]
    assert not reactor.is_registered(a.fileno())


def test_unregister_from_reader_cancels_pending_writer(reactor, socketpair):
    """A reader that unregisters its fd stops the writer of the same event."""
    a, b = socketpair()
    b.send(b"x")  # a is readable and writable
    events = []

    def on_read():
        events.append("read")
        reactor.unregister(a.fileno())
        reactor.call_soon(reactor.stop)

    reactor.add_reader(a.fileno(), on_read)
    reactor.add_writer(a.fileno(), lambda: events.append("write"))
    run_bounded(reactor)
    assert events == ["read"]


def test_remove_reader_writer_return_bool(reactor, socketpair):
    a, _ = socketpair()
    fd = a.fileno()
    assert reactor.remove_reader(fd) is False
    assert reactor.remove_writer(fd) is False
    reactor.add_reader(fd, lambda: None)
    reactor.add_writer(fd, lambda: None)
    assert reactor.remove_writer(fd) is True
    assert reactor.remove_writer(fd) is False
    assert reactor.is_registered(fd)
    assert reactor.remove_reader(fd) is True
    assert not reactor.is_registered(fd)
    assert reactor.remove_reader(fd) is False


def test_remove_writer_keeps_reader_working(reactor, socketpair):
    a, b = socketpair()
    got = []
    reactor.add_writer(a.fileno(), lambda: got.append("write-must-not-run"))
    reactor.add_reader(a.fileno(), lambda: (got.append(a.recv(10)), reactor.stop()))
    assert reactor.remove_writer(a.fileno()) is True
    b.send(b"r")
    run_bounded(reactor)
    assert got == [b"r"]


def test_mixing_register_and_add_reader_is_refused(reactor, socketpair):
    a, b = socketpair()
    reactor.register(a.fileno(), READ, lambda mask: None)
    with pytest.raises(ValueError):
        reactor.add_reader(a.fileno(), lambda: None)
    with pytest.raises(ValueError):
        reactor.remove_writer(a.fileno())
    reactor.add_writer(b.fileno(), lambda: None)
    with pytest.raises(ValueError):
        reactor.register(b.fileno(), READ, lambda mask: None)
    with pytest.raises(ValueError):
        reactor.modify(b.fileno(), READ, lambda mask: None)


# ----------------------------------------------------------------------- timers

def test_timers_fire_in_deadline_order_with_fake_clock(make_reactor):
    clock = FakeClock()
    reactor = make_reactor(clock=clock)
    order = []
    reactor.call_later(3, order.append, "c")
    reactor.call_later(1, order.append, "a")
    reactor.call_later(2, order.append, "b")
    reactor.call_later(2, order.append, "b2")  # same deadline: scheduling order
    reactor.call_later(50, order.append, "late")

    def advance():
        assert order == []  # nothing is due before the clock moves
        clock.advance(10)

    reactor.call_soon(advance)
    reactor.call_later(5, reactor.stop)
    started = time.monotonic()
    run_bounded(reactor)
    assert order == ["a", "b", "b2", "c"]
    assert reactor.now == clock.t
    assert time.monotonic() - started < WATCHDOG_SECONDS / 2  # no real waiting


def test_timer_clock_advanced_from_a_timer(make_reactor):
    clock = FakeClock()
    reactor = make_reactor(clock=clock)
    fired = []

    def tick(n):
        fired.append((n, reactor.now))
        clock.advance(1)
        if n < 3:
            reactor.call_later(1, tick, n + 1)
        else:
            reactor.stop()

    reactor.call_later(0, tick, 0)
    run_bounded(reactor)
    assert fired == [(0, 1000.0), (1, 1001.0), (2, 1002.0), (3, 1003.0)]


def test_zero_delay_rearming_timer_does_not_starve_the_loop(make_reactor):
    """A timer that re-arms itself with delay 0 runs once per pass, so the
    rest of the pass (here: call-soon callbacks) runs in between."""
    clock = FakeClock()
    reactor = make_reactor(clock=clock)
    order = []

    def rearm(n):
        order.append("timer%d" % n)
        reactor.call_soon(order.append, "soon%d" % n)
        if n < 3:
            reactor.call_later(0, rearm, n + 1)
        else:
            reactor.stop()

    reactor.call_later(0, rearm, 1)
    run_bounded(reactor)
    assert order == ["timer1", "soon1", "timer2", "soon2", "timer3", "soon3"]


def test_call_later_zero_runs_on_next_pass(reactor):
    fired = []
    timer = reactor.call_later(0, fired.append, "now")
    assert isinstance(timer, Timer)
    assert timer.when == reactor.now
    reactor.call_later(0, reactor.stop)
    run_bounded(reactor)
    assert fired == ["now"]


def test_real_clock_timer_waits(reactor):
    fired = []
    start = reactor.now   # call_later counts from the loop time, which may lag the clock
    reactor.call_later(0.05, lambda: (fired.append(time.monotonic()), reactor.stop()))
    run_bounded(reactor)
    assert len(fired) == 1
    assert fired[0] - start >= 0.05


def test_cancel_is_idempotent_and_prevents_firing(make_reactor):
    clock = FakeClock()
    reactor = make_reactor(clock=clock)
    fired = []
    t1 = reactor.call_later(1, fired.append, 1)
    reactor.call_later(2, fired.append, 2)
    t1.cancel()
    t1.cancel()
    assert t1.cancelled
    reactor.call_soon(clock.advance, 5)
    reactor.call_later(3, reactor.stop)
    run_bounded(reactor)
    assert fired == [2]
    t1.cancel()


def test_cancel_from_inside_another_timer(make_reactor):
    clock = FakeClock()
    reactor = make_reactor(clock=clock)
    fired = []
    victims = {}

    def killer():
        fired.append("killer")
        victims["same_pass"].cancel()
        victims["later"].cancel()

    reactor.call_later(1, killer)
    victims["same_pass"] = reactor.call_later(1, fired.append, "same_pass")
    victims["later"] = reactor.call_later(2, fired.append, "later")
    reactor.call_later(1, clock.advance, 5)
    reactor.call_later(3, reactor.stop)
    reactor.call_soon(clock.advance, 1)
    run_bounded(reactor)
    assert fired == ["killer"]


def test_cancel_after_firing_is_harmless(make_reactor):
    clock = FakeClock()
    reactor = make_reactor(clock=clock)
    timer = reactor.call_later(0, reactor.stop)
    run_bounded(reactor)
    timer.cancel()
    assert reactor._cancelled_timers == 0


def test_cancelled_timers_are_compacted(reactor):
    timers = [reactor.call_later(100 + i, lambda: None) for i in range(10)]
    for t in timers[:5]:
        t.cancel()
    assert len(reactor._timers) == 10  # exactly half: kept (lazy)
    timers[5].cancel()  # more than half: rebuilt
    assert len(reactor._timers) == 4
    assert reactor._cancelled_timers == 0
    assert [e[2] for e in sorted(reactor._timers)] == timers[6:]


def test_cancelled_top_timer_does_not_shorten_the_wait(selector_cls):
    """With the earliest timer cancelled, select waits for the earliest live one."""
    clock = FakeClock()
    timeouts = []

    class Recording(selector_cls):  # type: ignore[misc,valid-type]
        def select(self, timeout=None):
            # Pretend to wait: record the timeout, move the fake clock by it.
            timeouts.append(timeout)
            clock.advance(timeout or 0.0)
            return super().select(0)

    reactor = Reactor(selector=Recording(), clock=clock)
    try:
        early = reactor.call_later(1, lambda: None)
        reactor.call_later(5, reactor.stop)
        reactor.call_later(8, lambda: None)
        reactor.call_later(9, lambda: None)
        early.cancel()  # 1 of 4 cancelled: stays in the heap (lazy)
        assert len(reactor._timers) == 4
        run_bounded(reactor)
        assert timeouts == [5.0]
        assert reactor.now == 1005.0
    finally:
        reactor.close()


@pytest.mark.skipif(not hasattr(selectors, "EpollSelector"), reason="epoll only")
def test_the_epoll_loop_waits_for_live_timers_from_a_fresh_clock():
    """The epoll loop's wait skips a cancelled earliest timer, and is measured from a
    clock read after the pass's callbacks: a slow callback does not make the next
    timer late."""
    clock = FakeClock()
    reactor = Reactor(selector=selectors.EpollSelector(), clock=clock)
    timeouts = []
    epoll = reactor._epoll

    class Recording:
        def __getattr__(self, name):
            return getattr(epoll, name)

        def poll(self, timeout=None, maxevents=-1):
            # Pretend to wait: record the timeout, move the fake clock by it.
            timeouts.append(timeout)
            clock.advance(timeout or 0.0)
            return epoll.poll(0, maxevents)

    reactor._epoll = Recording()
    try:
        early = reactor.call_later(1, lambda: None)
        reactor.call_later(5, clock.advance, 4.97)      # a slow timer callback...
        reactor.call_later(10, reactor.stop)            # ...right before a near timer
        reactor.call_later(12, lambda: None)
        early.cancel()
        run_bounded(reactor)
        assert timeouts[0] == 5.0                       # not 1: the cancelled one is skipped
        assert timeouts[1] == pytest.approx(0.03)       # 10 - (5 + 4.97), not 10 - 5
        assert reactor.now == pytest.approx(1010.0)
    finally:
        reactor.close()


def test_timeout_is_never_negative(make_reactor):
    clock = FakeClock()
    reactor = make_reactor(clock=clock)
    reactor.call_later(-5, reactor.stop)
    assert reactor._next_timeout() == 0.0


# ---------------------------------------------------------------- call_soon

def test_call_soon_order_and_deferral(reactor):
    order = []

    def first():
        order.append("first")
        reactor.call_soon(deferred)  # queued during the soon pass: next pass

    def deferred():
        order.append("deferred")
        reactor.stop()

    reactor.call_soon(first)
    reactor.call_soon(order.append, "second")
    run_bounded(reactor)
    assert order == ["first", "second", "deferred"]


def test_call_soon_runs_after_due_timers_of_the_same_pass(make_reactor):
    clock = FakeClock()
    reactor = make_reactor(clock=clock)
    order = []
    reactor.call_later(0, order.append, "timer")
    reactor.call_soon(order.append, "soon")
    reactor.call_soon(reactor.stop)
    run_bounded(reactor)
    assert order == ["timer", "soon"]


def test_stop_before_run_makes_one_pass(reactor):
    ran = []
    reactor.call_soon(ran.append, 1)
    reactor.stop()
    run_bounded(reactor)
    assert ran == [1]
    # The stop request was consumed: a second run needs its own stop.
    reactor.call_soon(reactor.stop)
    run_bounded(reactor)


# ---------------------------------------------------------------------- errors

def test_raising_callbacks_are_counted_and_loop_continues(reactor, socketpair, captured_log):
    a, b = socketpair()
    b.send(b"x")
    calls = []

    def bad_fd(mask):
        calls.append("fd")
        reactor.unregister(a.fileno())
        raise RuntimeError("fd boom")

    def bad_timer():
        calls.append("timer")
        raise ValueError("timer boom")

    def bad_soon():
        calls.append("soon")
        raise KeyError("soon boom")

    def bad_reader():
        calls.append("reader")
        reactor.remove_reader(b.fileno())
        raise ZeroDivisionError("reader boom")

    def finish():
        calls.append("finish")
        reactor.stop()

    reactor.register(a.fileno(), READ, bad_fd)
    reactor.call_later(0, bad_timer)
    reactor.call_soon(bad_soon)
    a.send(b"y")
    reactor.add_reader(b.fileno(), bad_reader)
    reactor.call_later(0.01, finish)
    run_bounded(reactor)
    assert sorted(calls) == ["fd", "finish", "reader", "soon", "timer"]
    assert reactor.errors == 4
    text = captured_log.getvalue()
    for message in ("fd boom", "timer boom", "soon boom", "reader boom"):
        assert message in text
    assert "Traceback (most recent call last):" in text
    assert "RuntimeError: fd boom" in text


# --------------------------------------------------------------------- signals

needs_main_thread = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal handlers can only be set from the main thread")


@pytest.fixture
def preserve_sigusr():
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler if handler is not None else signal.SIG_DFL)


@needs_main_thread
def test_signal_is_dispatched_inside_the_loop(reactor, preserve_sigusr):
    got = []

    def on_signal(signum):
        got.append((signum, threading.current_thread() is threading.main_thread()))
        reactor.stop()

    reactor.add_signal_handler(signal.SIGUSR1, on_signal)
    reactor.call_soon(os.kill, os.getpid(), signal.SIGUSR1)
    run_bounded(reactor)
    assert got == [(signal.SIGUSR1, True)]


@needs_main_thread
def test_signal_delivered_before_run_is_dispatched(reactor, preserve_sigusr):
    got = []
    reactor.add_signal_handler(signal.SIGUSR2, lambda s: (got.append(s), reactor.stop()))
    os.kill(os.getpid(), signal.SIGUSR2)
    run_bounded(reactor)
    assert got == [signal.SIGUSR2]


@needs_main_thread
def test_raising_signal_callback_is_counted(reactor, preserve_sigusr, captured_log):
    def on_signal(signum):
        reactor.call_soon(reactor.stop)
        raise RuntimeError("signal boom")

    reactor.add_signal_handler(signal.SIGUSR1, on_signal)
    reactor.call_soon(os.kill, os.getpid(), signal.SIGUSR1)
    run_bounded(reactor)
    assert reactor.errors == 1
    assert "signal boom" in captured_log.getvalue()


@needs_main_thread
def test_close_restores_previous_handler_and_wakeup_fd(selector_cls, preserve_sigusr):
    previous_calls = []

    def previous_handler(signum, frame):
        previous_calls.append(signum)

    signal.signal(signal.SIGUSR1, previous_handler)
    other_r, other_w = socket.socketpair()
    other_r.setblocking(False)
    other_w.setblocking(False)
    old = signal.set_wakeup_fd(other_w.fileno())
    try:
        reactor = Reactor(selector=selector_cls())
        reactor.add_signal_handler(signal.SIGUSR1, lambda s: None)
        assert signal.getsignal(signal.SIGUSR1) is not previous_handler
        reactor.close()
        reactor.close()  # idempotent
        assert signal.getsignal(signal.SIGUSR1) is previous_handler
        assert signal.set_wakeup_fd(other_w.fileno()) == other_w.fileno()
        os.kill(os.getpid(), signal.SIGUSR1)
        wait_until(lambda: previous_calls == [signal.SIGUSR1], timeout=WATCHDOG_SECONDS,
                   interval=0.001, what="the previous SIGUSR1 handler to run")
        assert other_r.recv(10) == bytes([signal.SIGUSR1])
    finally:
        signal.set_wakeup_fd(old)
        other_r.close()
        other_w.close()


@needs_main_thread
def test_remove_signal_handler_restores_default(reactor, preserve_sigusr):
    sentinel = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(sentinel)
    reactor.add_signal_handler(signal.SIGUSR1, lambda s: None)
    assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN)
    reactor.remove_signal_handler(signal.SIGUSR1)
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    # The last handler gone, the previous wakeup fd is back.
    assert signal.set_wakeup_fd(sentinel) == sentinel
    reactor.remove_signal_handler(signal.SIGUSR1)  # unknown: no error


@needs_main_thread
def test_failed_add_signal_handler_leaves_no_trace(reactor):
    current = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(current)
    with pytest.raises((OSError, ValueError)):
        reactor.add_signal_handler(signal.SIGKILL, lambda s: None)
    assert signal.set_wakeup_fd(current) == current


# ---------------------------------------------------------------------- wakeup

def test_wakeup_from_another_thread_releases_blocking_select(selector_cls):
    entered_blocking = threading.Event()
    timeouts = []

    class Watched(selector_cls):  # type: ignore[misc,valid-type]
        def select(self, timeout=None):
            timeouts.append(timeout)
            if timeout is None:
                entered_blocking.set()
            return super().select(timeout)

    reactor = Reactor(selector=Watched())
    errors = []

    def other_thread():
        if not entered_blocking.wait(WATCHDOG_SECONDS):
            errors.append("loop never blocked")
        reactor.call_soon(reactor.stop)
        reactor.wakeup()

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        run_bounded(reactor)
    finally:
        thread.join(WATCHDOG_SECONDS)
        reactor.close()
    assert errors == []
    assert timeouts[0] is None


def test_stop_from_another_thread(selector_cls):
    entered_blocking = threading.Event()

    class Watched(selector_cls):  # type: ignore[misc,valid-type]
        def select(self, timeout=None):
            if timeout is None:
                entered_blocking.set()
            return super().select(timeout)

    reactor = Reactor(selector=Watched())

    def other_thread():
        entered_blocking.wait(WATCHDOG_SECONDS)
        reactor.stop()

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        run_bounded(reactor)
    finally:
        thread.join(WATCHDOG_SECONDS)
        reactor.close()
    assert entered_blocking.is_set()


def test_wakeup_after_close_is_harmless(selector_cls):
    reactor = Reactor(selector=selector_cls())
    reactor.close()
    reactor.wakeup()
    with pytest.raises(RuntimeError):
        reactor.run()


def test_run_is_not_reentrant(reactor):
    caught = []

    def nested():
        try:
            reactor.run()
        except RuntimeError as exc:
            caught.append(str(exc))
        reactor.stop()

    reactor.call_soon(nested)
    run_bounded(reactor)
    assert caught and "already running" in caught[0]


def test_default_selector_and_max_events():
    reactor = Reactor(max_events=16)
    try:
        assert reactor.max_events == 16
        assert isinstance(reactor._selector, selectors.DefaultSelector)
        reactor.call_soon(reactor.stop)
        run_bounded(reactor)
    finally:
        reactor.close()


def test_forget_then_close_leaves_no_stale_registration(reactor):
    # The proxy forgets a socket right before closing it; a new socket that gets the
    # same fd number must see only its own events, on every selector.
    a, b = socket.socketpair()
    a.setblocking(False)
    old_calls = []
    reactor.register(a.fileno(), READ, old_calls.append)
    fd = a.fileno()
    b.send(b"pending data the old owner never read")
    reactor.forget(fd)
    a.close()
    assert not reactor.is_registered(fd)
    c, d = socket.socketpair()
    try:
        reused = c if c.fileno() == fd else d if d.fileno() == fd else None
        other = d if reused is c else c
        got = []

        def on_new(mask):
            got.append(reused.recv(100))
            reactor.stop()

        if reused is None:
            # No fd reuse on this platform: still check that the forgotten fd stays quiet.
            reactor.call_later(0.05, reactor.stop)
            run_bounded(reactor)
            assert old_calls == []
            return
        reactor.register(fd, READ, on_new)
        other.send(b"new")
        run_bounded(reactor)
        assert got == [b"new"] and old_calls == []
        reactor.unregister(fd)
    finally:
        b.close()
        c.close()
        d.close()


# ------------------------------------------------------ the epoll fast path

needs_epoll = pytest.mark.skipif(not hasattr(selectors, "EpollSelector"),
                                 reason="no epoll here")


@needs_epoll
def test_max_events_bounds_each_epoll_pass():
    """On the stdlib epoll selector max_events is epoll_wait's maxevents; the fds left
    over are reported in the next passes (level-triggered), none is lost."""
    reactor = Reactor(selector=selectors.EpollSelector(), max_events=2)
    pairs = [socket.socketpair() for _ in range(5)]
    seen = []
    counts = []
    try:
        for a, b in pairs:
            a.setblocking(False)
            b.send(b"x")

            def on_ready(mask, sock=a):
                seen.append(sock.recv(10))
                counts.append(reactor.ready_count)
            reactor.register(a.fileno(), READ, on_ready)
        reactor.call_soon(reactor.stop)
        run_bounded(reactor)
        assert len(seen) == 2 and counts == [2, 2]
        for _ in range(2):
            reactor.call_soon(reactor.stop)
            run_bounded(reactor)
        assert seen == [b"x"] * 5
        assert counts == [2, 2, 2, 2, 1]
    finally:
        for a, b in pairs:
            reactor.unregister(a.fileno())
            a.close()
            b.close()
        reactor.close()


@needs_epoll
def test_fast_path_keeps_the_selectors_map_in_step(socketpair):
    """The fast path drives the selector's epoll object itself: the selector's own map
    must hold the very keys the reactor holds, after every kind of change."""
    reactor = Reactor(selector=selectors.EpollSelector())
    a, b = socketpair()
    c, d = socketpair()

    def same_maps():
        theirs = dict(reactor._selector.get_map())
        assert set(theirs) == set(reactor._keys)
        for fd, key in reactor._keys.items():
            assert theirs[fd] is key
            assert key.fd == fd and key.fileobj == fd

    try:
        def cb(mask):
            return None
        reactor.register(a.fileno(), READ, cb)
        same_maps()
        reactor.modify(a.fileno(), READ | WRITE, cb)
        assert reactor._selector.get_key(a.fileno()).events == READ | WRITE
        same_maps()
        key = reactor._keys[a.fileno()]
        reactor.modify(a.fileno(), READ | WRITE, cb)   # nothing changed: the same key
        assert reactor._keys[a.fileno()] is key
        reactor.add_reader(c.fileno(), lambda: None)
        reactor.add_writer(c.fileno(), lambda: None)
        same_maps()
        with pytest.raises(KeyError):
            reactor.register(a.fileno(), READ, cb)
        with pytest.raises(ValueError):
            reactor.register(b.fileno(), 4, cb)
        assert not reactor.is_registered(b.fileno())
        same_maps()
        reactor.remove_writer(c.fileno())
        same_maps()
        reactor.unregister(c.fileno())
        reactor.forget(a.fileno())
        same_maps()
        assert reactor._keys == {reactor._wakeup_recv.fileno(): reactor._keys[reactor._wakeup_recv.fileno()]}
    finally:
        reactor.close()


@needs_epoll
def test_fast_path_masks_follow_the_registered_interest(socketpair):
    """A peer that went away makes epoll report HUP: a READ-only registration sees READ
    (never a WRITE it did not ask for), a READ|WRITE one sees both, as with selectors;
    both see the HANGUP bit (the peer's FIN)."""
    reactor = Reactor(selector=selectors.EpollSelector())
    a, b = socketpair()
    c, d = socketpair()
    masks = {}
    try:
        reactor.register(a.fileno(), READ, lambda m: masks.setdefault("read", m))
        reactor.register(c.fileno(), READ | WRITE, lambda m: masks.setdefault("both", m))
        b.close()
        d.close()
        reactor.call_soon(reactor.stop)
        run_bounded(reactor)
        assert masks == {"read": READ | HANGUP, "both": READ | WRITE | HANGUP}
    finally:
        reactor.unregister(a.fileno())
        reactor.unregister(c.fileno())
        reactor.close()


@needs_epoll
def test_hangup_comes_only_with_the_peers_fin(socketpair):
    """Bytes alone make a socket READ; the HANGUP bit joins once the peer has shut down
    its sending side, and never for a write-only registration."""
    reactor = Reactor(selector=selectors.EpollSelector())
    a, b = socketpair()
    c, d = socketpair()
    masks = []
    try:
        reactor.register(a.fileno(), READ, masks.append)
        reactor.register(c.fileno(), WRITE, masks.append)
        b.send(b"x")
        reactor.call_soon(reactor.stop)
        run_bounded(reactor)
        assert sorted(masks) == [READ, WRITE]
        masks.clear()
        b.shutdown(socket.SHUT_WR)
        d.shutdown(socket.SHUT_WR)
        reactor.call_soon(reactor.stop)
        run_bounded(reactor)
        assert sorted(masks) == sorted([READ | HANGUP, WRITE])
    finally:
        for sock in (a, c):
            reactor.unregister(sock.fileno())
        reactor.close()


@needs_epoll
def test_a_patched_epoll_selector_is_driven_through_its_methods(monkeypatch):
    """The fast path skips only the stdlib's own code: a select() replaced on the class
    (a tracer, say) is called on every pass."""
    calls = []
    original = selectors.EpollSelector.select

    def traced(self, timeout=None):
        calls.append(timeout)
        return original(self, timeout)

    monkeypatch.setattr(selectors.EpollSelector, "select", traced)
    reactor = Reactor(selector=selectors.EpollSelector())
    try:
        reactor.call_soon(reactor.stop)
        run_bounded(reactor)
        assert calls
    finally:
        reactor.close()
