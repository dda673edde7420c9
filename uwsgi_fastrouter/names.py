"""Host names of nodes and servers: what is known about each, and when to look again.

Theory of operation
-------------------
uWSGI 2.0 reaches nodes by IP literal or UNIX path only.  Here a node, a fallback
entry or a subscription server may also be ``HOST:PORT`` with a DNS host name
(:func:`uwsgi_fastrouter.addresses.host_name` tells a name from a literal).  The
lookup itself blocks, so it never runs on the event loop: this module is the pure
bookkeeping (no I/O, time is a parameter), :mod:`uwsgi_fastrouter.resolver` runs
the lookups off the loop and feeds the results back here.

A :class:`NameTable` holds one :class:`NameEntry` per host name:

* ``addresses``: the IP literals of its last successful lookup, in the order the
  resolver gave them (``None`` until the first success).  A name with three
  addresses is three nodes.  A lookup that fails or finds nothing keeps the last
  addresses.  One log line each time a name's addresses change (the first
  answer included), one when it starts failing, one when it recovers.
* ``due``: when to look it up next.  Every ``interval`` seconds after a success;
  ``interval`` 0 means "once": a name that resolved is never looked up again.
  After a failure the next try comes after ``min(interval, RETRY_DELAY)`` seconds
  (``RETRY_DELAY`` when the interval is 0), so an unresolved name keeps being tried.
* one lookup per name at a time (``started``); a lookup that has not answered
  after ``timeout`` seconds counts as failed and its late answer is ignored.

Bounds: at most ``max_names`` names.  Names the configuration gives are *pinned*;
names learnt from subscription packets are not, and one that nobody asked for
during ``idle`` seconds is forgotten, so announces cannot grow the table or keep
the resolver busy for names no longer announced.

:meth:`NameTable.version` changes whenever some name's addresses change: users
rebuild their node lists only then.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .addresses import address_text, host_name
from .log import printable

__all__ = ["NameEntry", "NameTable", "expand", "names_in", "RETRY_DELAY", "DEFAULT_MAX_NAMES"]

#: seconds between two tries of a name whose lookup failed (at most the interval)
RETRY_DELAY = 5.0
#: how many names a table holds at most
DEFAULT_MAX_NAMES = 256
#: seconds a lookup may take before it counts as failed
DEFAULT_TIMEOUT = 30.0
#: seconds an announced (unpinned) name stays without being asked for
DEFAULT_IDLE = 600.0


class NameEntry:
    """What is known about one host name."""

    __slots__ = ("name", "addresses", "due", "started", "failing", "pinned", "used")

    def __init__(self, name: str, pinned: bool, now: float) -> None:
        self.name = name
        self.addresses: Optional[Tuple[str, ...]] = None
        self.due = now                  # look it up at once
        self.started: Optional[float] = None
        self.failing = False
        self.pinned = pinned
        self.used = now


class NameTable:
    """Host name -> addresses, with the schedule of lookups (see the module doc).

    *log* receives one line per state change of a name (names are escaped)."""

    def __init__(self, *, interval: float, max_names: int = DEFAULT_MAX_NAMES,
                 timeout: float = DEFAULT_TIMEOUT, idle: float = DEFAULT_IDLE,
                 log: Callable[[str], None] = lambda line: None) -> None:
        self.interval = interval
        self.max_names = max_names
        self.timeout = timeout
        self.idle = idle
        self.log = log
        self.entries: Dict[str, NameEntry] = {}
        self.version = 0
        self.refused = 0      # names not added because the table was full

    # -- who wants which name

    def add(self, name: str, now: float, *, pinned: bool = True) -> Optional[NameEntry]:
        """Track *name* (case-insensitive); None when the table is full."""
        key = name.lower()
        entry = self.entries.get(key)
        if entry is not None:
            entry.used = now
            entry.pinned = entry.pinned or pinned
            return entry
        if len(self.entries) >= self.max_names:
            self.forget_idle(now)
            if len(self.entries) >= self.max_names:
                self.refused += 1
                return None
        entry = self.entries[key] = NameEntry(key, pinned, now)
        return entry

    def addresses(self, name: str) -> Optional[Tuple[str, ...]]:
        """The last known addresses of *name* (None: never resolved, or not tracked)."""
        entry = self.entries.get(name.lower())
        return entry.addresses if entry is not None else None

    def forget_idle(self, now: float) -> int:
        """Drop the unpinned names nobody asked for during ``idle`` seconds."""
        stale = [key for key, e in self.entries.items()
                 if not e.pinned and e.used + self.idle <= now]
        for key in stale:
            del self.entries[key]
        return len(stale)

    # -- the schedule

    def due(self, now: float) -> List[str]:
        """The names to look up now; each is marked as being looked up."""
        names = []
        for entry in self.entries.values():
            if entry.started is None and entry.due <= now:
                entry.started = now
                names.append(entry.name)
        return names

    def next_due(self) -> Optional[float]:
        """When :meth:`due` or :meth:`time_out` has something to do next (None: never)."""
        times = [e.started + self.timeout if e.started is not None else e.due
                 for e in self.entries.values()]
        times = [t for t in times if t != float("inf")]
        return min(times) if times else None

    def time_out(self, now: float) -> List[str]:
        """Lookups older than ``timeout`` count as failed; their names."""
        late = [e.name for e in self.entries.values()
                if e.started is not None and e.started + self.timeout <= now]
        for name in late:
            self.failed(name, "no answer within %g seconds" % self.timeout, now)
        return late

    # -- results

    def resolved(self, name: str, addresses: Sequence[str], now: float,
                 started: Optional[float] = None) -> bool:
        """A lookup of *name* (begun at *started*) gave *addresses*; True when they changed.

        An answer for a lookup that already timed out (or a name no longer
        tracked) is ignored.  An empty answer is a failure."""
        entry = self._current(name, started)
        if entry is None:
            return False
        if not addresses:
            return self.failed(name, "no address found", now, started)
        entry.started = None
        entry.due = now + self.interval if self.interval > 0 else float("inf")
        if entry.failing:
            entry.failing = False
            self.log("[uwsgi-fastrouter] host name %s resolves again" % printable(entry.name))
        new = tuple(dict.fromkeys(addresses))
        if new == entry.addresses:
            return False
        self.log("[uwsgi-fastrouter] host name %s %s to %s"
                 % (printable(entry.name), "resolves" if entry.addresses is None
                    else "now resolves", printable(" ".join(new))))
        entry.addresses = new
        self.version += 1
        return True

    def failed(self, name: str, reason: str, now: float, started: Optional[float] = None) -> bool:
        """A lookup of *name* failed: keep the last addresses, try again later.  False."""
        entry = self._current(name, started)
        if entry is None:
            return False
        entry.started = None
        retry = min(self.interval, RETRY_DELAY) if self.interval > 0 else RETRY_DELAY
        entry.due = now + retry
        if not entry.failing:
            entry.failing = True
            kept = ("keeping %s" % " ".join(entry.addresses) if entry.addresses
                    else "its nodes count as failed until it resolves")
            self.log("[uwsgi-fastrouter] unable to resolve host name %s: %s (%s)"
                     % (printable(entry.name), printable(reason), printable(kept)))
        return False

    def _current(self, name: str, started: Optional[float]) -> Optional[NameEntry]:
        entry = self.entries.get(name.lower())
        if entry is None or entry.started is None:
            return None
        if started is not None and entry.started != started:
            return None
        return entry


def names_in(addresses: Iterable[str]) -> List[str]:
    """The host names among *addresses* (node or server addresses as configured)."""
    found = []
    for text in addresses:
        parsed = host_name(text)
        if parsed is not None and parsed[0].lower() not in found:
            found.append(parsed[0].lower())
    return found


def expand(addresses: Iterable[str],
           lookup: Callable[[str], Optional[Tuple[str, ...]]]) -> List[str]:
    """*addresses* with every ``HOST:PORT`` replaced by one address per IP of HOST.

    A name *lookup* knows nothing about yet stays as it is (a node that cannot be
    reached, so it counts as failed); literals and paths are kept unchanged, and
    duplicates are kept (a node listed twice gets twice the share, as before)."""
    out: List[str] = []
    for text in addresses:
        parsed = host_name(text)
        if parsed is None:
            out.append(text)
            continue
        ips = lookup(parsed[0])
        if not ips:
            out.append(text)
            continue
        out.extend(address_text(ip, parsed[1]) for ip in ips)
    return out
