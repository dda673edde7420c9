#!/usr/bin/env python3
"""Run ``python -m uwsgi_fastrouter ARGS`` with its event loops timed (benchmarks only).

Usage::

    LOOPSTALL_FILE=/tmp/stalls python3 bench/loopstall.py --fastrouter ... [--master ...]

Theory of operation
-------------------
Every pass of the router's reactor ends in ``selector.select()``.  The time from one
``select()`` returning to the next one being called is what that pass spent on its
callbacks: while it runs, no other client is served.  This wrapper patches the stdlib
``EpollSelector.select`` (the reactor's default selector on Linux) before the router
is imported, and appends one line ``PID MONOTONIC BUSY_SECONDS CPU_SECONDS`` to
``$LOOPSTALL_FILE`` for every pass that took more than ``$LOOPSTALL_MIN_MS`` (default
2 ms) of wall-clock time.  CPU_SECONDS is the CPU time the pass used; the rest of
BUSY_SECONDS is time the process waited for a CPU on a loaded machine.  The patch is
inherited by forked router processes; the pid tells them apart, and ``time.monotonic``
is one clock for every process of the machine, so a reader can cut the lines into the
windows it measured.  Every collection of the cyclic garbage collector is logged too,
as ``PID MONOTONIC gcN SECONDS COLLECTED`` (N its generation).  Nothing of the router
itself is changed.

``PYTHONPATH`` picks the tree under test, as for ``python -m uwsgi_fastrouter``.
"""

from __future__ import annotations

import gc
import os
import runpy
import selectors
import sys
import time


def _install(path: str, threshold: float) -> None:
    original = selectors.EpollSelector.select
    clock = time.monotonic
    cpu_clock = time.thread_time
    state = {"pid": None, "returned": None, "cpu": 0.0, "out": None, "gc_lines": []}

    def timed_select(self, timeout=None):
        entered = clock()
        cpu = cpu_clock()
        pid = os.getpid()
        if state["pid"] != pid:          # a fresh process (forked): start over
            state["pid"] = pid
            state["returned"] = None
            state["out"] = None
            mine = "%d " % pid      # the parent's collections, copied by the fork, are not ours
            state["gc_lines"][:] = [line for line in state["gc_lines"] if line.startswith(mine)]
        returned = state["returned"]
        if state["gc_lines"]:
            _write_gc_lines(state, path)
        if returned is not None and entered - returned >= threshold:
            out = state["out"]
            if out is None:
                out = state["out"] = open(path, "a", buffering=1)
            out.write("%d %.6f %.6f %.6f\n" % (pid, entered, entered - returned, cpu - state["cpu"]))
        try:
            return original(self, timeout)
        finally:
            state["returned"] = clock()
            state["cpu"] = cpu_clock()

    selectors.EpollSelector.select = timed_select
    if os.environ.get("LOOPSTALL_SAMPLE"):
        _sample_long_passes(state, clock)

    # The cyclic garbage collector runs inside whichever pass allocates: every collection
    # is logged apart, as "PID MONOTONIC gcN SECONDS COLLECTED" (N the generation), to
    # tell its pauses from the router's work and to count them per window.  The lines
    # are kept in memory and written when the pass ends (in timed_select), so logging
    # one costs no system call inside the pass it measures.
    gc_started = {}
    gc_lines = state["gc_lines"] = []

    def on_gc(phase, info):
        if phase == "start":
            gc_started["t"] = clock()
            return
        now = clock()
        took = now - gc_started.get("t", now)
        gc_lines.append("%d %.6f gc%d %.6f %d\n" % (os.getpid(), now, info.get("generation", -1), took,
                                                    info.get("collected", 0)))

    gc.callbacks.append(on_gc)


def _write_gc_lines(state: dict, path: str) -> None:
    """The collections logged since the last pass, to the file (opened in this process
    if it is not yet)."""
    out = state["out"]
    if out is None:
        out = state["out"] = open(path, "a", buffering=1)
    lines = state["gc_lines"]
    out.write("".join(lines))
    del lines[:]


def _sample_long_passes(state: dict, clock) -> None:
    """``LOOPSTALL_SAMPLE=1``: what a pass is doing once it has run for
    ``$LOOPSTALL_SAMPLE_MS`` (default 1 ms) of wall-clock time, and every such period
    after, as ``PID MONOTONIC stack FILE:LINE:FUNCTION<...`` lines (innermost first).
    A thread per process (started at its first pass, so forked router processes get
    theirs) looks at the main thread's stack while a pass runs; the interpreter's
    switch interval is shortened to let it in.  A diagnostic, not a measurement: the
    sampler itself takes some CPU."""
    import threading
    import traceback
    period = float(os.environ.get("LOOPSTALL_SAMPLE_MS", "1")) / 1000.0
    sys.setswitchinterval(period / 4)
    timed_select = selectors.EpollSelector.select
    sampler = {"pid": None}
    main_ident = threading.main_thread().ident

    def sample_forever(pid: int, main: int) -> None:
        while True:
            time.sleep(period)
            started = state["pass_started"]
            out = state["out"]
            if started is None or out is None or state["pid"] != pid:
                continue
            if clock() - started >= period:
                frame = sys._current_frames().get(main)
                if frame is not None:
                    stack = traceback.extract_stack(frame, limit=10)
                    out.write("%d %.6f stack %s\n" % (pid, clock(), "<".join(
                        "%s:%d:%s" % (os.path.basename(f.filename), f.lineno, f.name)
                        for f in reversed(stack))))

    def sampled_select(self, timeout=None):
        pid = os.getpid()
        if sampler["pid"] != pid:
            sampler["pid"] = pid
            threading.Thread(target=sample_forever, args=(pid, threading.get_ident()),
                             daemon=True).start()
        state["pass_started"] = None
        try:
            return timed_select(self, timeout)
        finally:
            state["pass_started"] = clock()

    state["pass_started"] = None
    selectors.EpollSelector.select = sampled_select


def main() -> None:
    path = os.environ.get("LOOPSTALL_FILE")
    if path:
        _install(path, float(os.environ.get("LOOPSTALL_MIN_MS", "2")) / 1000.0)
    sys.argv = ["uwsgi_fastrouter"] + sys.argv[1:]
    runpy.run_module("uwsgi_fastrouter", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
