"""The once-a-second expiry sweep of a subscription table, a step per pass of the loop.

Theory of operation
-------------------
Every second a router (and, under ``--master``, the master and each router process
with its copy of the table) marks the nodes past the tolerance dead and removes the
dead nodes nobody uses (:meth:`SubscriptionTable.expire`).  With 10,000 keys that walk
costs a few milliseconds of CPU: done in one pass of the event loop, every request
whose events are ready meanwhile waits for it, once a second.

:class:`SlicedExpiry` runs the same sweep through
:meth:`SubscriptionTable.expiry_steps`: the first step in the pass of the one-second
timer, each further one at the end of the next pass (``call_soon``), so the loop
serves whatever is ready between two steps of a few hundred pools each.  Each step
reads the clock, so a node expires no later than in a sweep made in one go when the
sweep starts; a sweep of 10,000 pools takes a few dozen passes, normally a few
milliseconds.  A new second that finds the previous sweep still going lets it finish
rather than start over (starting over could leave the last pools unswept for as long
as the loop is that busy).  What a sweep does when it ends (a router with an empty
table turns cheap) is *on_done*.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator, Optional

__all__ = ["SlicedExpiry"]


class SlicedExpiry:
    """Call an instance every second (``server.periodic`` or a master's tick) to sweep
    *table* a step per pass of *reactor*.

    *quiet*: apply the expiries without their log lines (a router process's copy of
    the master's table: the master logs them once).
    """

    def __init__(self, reactor, table, *, quiet: bool = False,
                 on_done: Optional[Callable[[], None]] = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.reactor = reactor
        self.table = table
        self.quiet = quiet
        self.on_done = on_done
        self.clock = clock
        self._steps: Optional[Iterator[None]] = None
        #: sweeps started, and finished (for tests and benchmarks)
        self.started = 0
        self.finished = 0

    @property
    def running(self) -> bool:
        return self._steps is not None

    def __call__(self, _now: float = 0.0) -> None:
        """The one-second tick: start a sweep unless one is still going."""
        if self._steps is not None:
            return
        self._steps = self.table.expiry_steps(self.clock)
        self.started += 1
        self._step()

    def _step(self) -> None:
        steps = self._steps
        if steps is None:
            return
        try:
            if self.quiet:
                self.table.quietly(next, steps)
            else:
                next(steps)
        except StopIteration:
            self._steps = None
            self.finished += 1
            if self.on_done is not None:
                self.on_done()
            return
        except BaseException:
            self._steps = None      # the next second starts afresh
            raise
        self.reactor.call_soon(self._step)
