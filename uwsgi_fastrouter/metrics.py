"""Request counters and the Prometheus text exposition (``--fastrouter-metrics``).

The endpoint that serves the text lives in :mod:`uwsgi_fastrouter.endpoints`; this
module does no I/O.

Theory of operation
-------------------
Counting.  Every router process has one :class:`Counters` on its server.  A session
calls :meth:`Counters.ended` once, from ``close()``, when its request record is
complete (record.py): its outcome code says how the request ended -- ``ok``,
``no_route``, ``connect_failed``, ``timeout``, ``client_error`` or ``node_error`` --
and the record's other fields give its retries, fallbacks, key, last node, bytes
each way and times.  So the request path gains a handful of integer increments at its
end and nothing per event; a request's bytes are added when it ends.  The latency
histograms (time to the first response byte, total time; fixed buckets, the loop time
as clock), and the per-key and per-node tables are only kept when the metrics server
is on.  Those tables are bounded: past ``--fastrouter-metrics-max-keys`` entries a new
key (or node) is counted in one ``other`` entry, so a client that sends a million
distinct keys costs a fixed amount of memory.

Under a master, the counters live in the router processes.  A scrape starts a
collection round with a totals-only query (the master's QUERY/REPORT mechanism, see
master.py): each process answers with its first report part, which carries
:meth:`Counters.snapshot`; the master adds them up with :func:`merge` and renders the
sum, with its own subscription counters (the master reads the subscription sockets).
A process that does not answer in time is left out of that scrape, as for the stats.

Label values are client bytes (a key is whatever the client sent): they are decoded
as UTF-8 (undecodable bytes shown as ``\\xNN``) and escaped as the format requires
(backslash, double quote, newline).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Any, Dict, Iterable, List, Optional

from . import __version__
from .record import METRICS_INDEX

#: how a request ended, in the order of the counters
OUTCOMES = ("ok", "no_route", "connect_failed", "timeout", "client_error", "node_error")
OK, NO_ROUTE, CONNECT_FAILED, TIMEOUT, CLIENT_ERROR, NODE_ERROR = range(len(OUTCOMES))
#: upper bounds (seconds) of the latency histogram buckets; +Inf is implicit
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: default bound of the per-key and per-node tables
DEFAULT_MAX_KEYS = 100
#: when this process started (unix time)
START_TIME = time.time()


class Counters:
    """One router process's request counters (see the module docstring)."""

    __slots__ = ("by_code", "retries", "fallbacks", "bytes_in", "bytes_out", "detailed", "max_keys",
                 "first_byte", "first_byte_sum", "total", "total_sum", "keys", "nodes", "other_key",
                 "other_node", "health", "resent", "cap_waits", "cap_refusals")

    def __init__(self, detailed: bool = False, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.by_code = [0] * len(METRICS_INDEX)   # requests by record code (record.py)
        self.retries = 0
        self.fallbacks = 0
        self.resent = 0               # --fastrouter-retry-after-connect: requests sent again
        self.cap_waits = 0            # requests that waited for a node's slot (nodecaps.py)
        self.cap_refusals = 0         # requests closed for want of one
        self.bytes_in = 0             # bytes read from the clients (requests)
        self.bytes_out = 0            # bytes sent to the clients (responses)
        self.detailed = detailed
        self.max_keys = max(1, int(max_keys))
        self.first_byte = [0] * (len(BUCKETS) + 1)
        self.first_byte_sum = 0.0
        self.total = [0] * (len(BUCKETS) + 1)
        self.total_sum = 0.0
        self.keys: Dict[bytes, List[int]] = {}    # key -> [requests, failures]
        self.nodes: Dict[bytes, List[int]] = {}   # node address -> [requests, failures]
        self.other_key = [0, 0]
        self.other_node = [0, 0]
        #: the health checker (uwsgi_fastrouter/health.py), when checks run
        self.health = None

    def ended(self, record) -> None:
        """Count a finished request from its *record* (a closed session, record.py)."""
        code = record.outcome
        self.by_code[code] += 1
        self.bytes_in += record.rx
        self.bytes_out += record.tx
        retries = record.retries
        if retries:
            self.retries += retries
            self.fallbacks += record.fallback_index
        if not self.detailed:
            return
        outcome = METRICS_INDEX[code]
        started = record.started
        if record.first_byte:
            elapsed = record.first_byte - started
            self.first_byte[bisect_left(BUCKETS, elapsed)] += 1
            self.first_byte_sum += elapsed
        elapsed = record.ended - started
        self.total[bisect_left(BUCKETS, elapsed)] += 1
        self.total_sum += elapsed
        failed = 0 if outcome == OK else 1
        key = record.key
        if key:
            entry = self.keys.get(key)
            if entry is None:
                entry = self.other_key if len(self.keys) >= self.max_keys else self.keys.setdefault(key, [0, 0])
            entry[0] += 1
            entry[1] += failed
        route = record.route
        if route is not None and outcome != CONNECT_FAILED:
            entry = self._node(route.address)
            entry[0] += 1

    @property
    def outcomes(self) -> List[int]:
        """Requests by how they ended, in the order of OUTCOMES."""
        counts = [0] * len(OUTCOMES)
        for code, count in enumerate(self.by_code):
            counts[METRICS_INDEX[code]] += count
        return counts

    def node_failed(self, address: bytes) -> None:
        """A connect to *address* failed (each attempt counts)."""
        if self.detailed:
            self._node(address)[1] += 1

    def _node(self, address: bytes) -> List[int]:
        entry = self.nodes.get(address)
        if entry is None:
            entry = self.other_node if len(self.nodes) >= self.max_keys else self.nodes.setdefault(address, [0, 0])
        return entry

    def snapshot(self, server) -> Dict[str, Any]:
        """The counters as plain JSON values (keys and addresses as latin-1 text)."""
        snapshot = {
            "outcomes": self.outcomes,
            "retries": self.retries,
            "fallbacks": self.fallbacks,
            "resent": self.resent,
            "cap_waits": self.cap_waits,
            "cap_refusals": self.cap_refusals,
            "handoffs": server.fd_handoffs,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "sessions": len(server.sessions),
            "cheap": 1 if server.cheap else 0,
            "first_byte": list(self.first_byte),
            "first_byte_sum": self.first_byte_sum,
            "total": list(self.total),
            "total_sum": self.total_sum,
            "keys": _table(self.keys, self.other_key),
            "nodes": _table(self.nodes, self.other_node),
        }
        if self.health is not None:
            snapshot["health"] = self.health.totals()
        return snapshot


def _table(entries: Dict[bytes, List[int]], other: List[int]) -> List[list]:
    rows = [[name.decode("latin-1"), counts[0], counts[1]] for name, counts in entries.items()]
    if other[0] or other[1]:
        rows.append([None, other[0], other[1]])
    return rows


def outcome_counts(snapshot: Optional[Dict[str, Any]]) -> Dict[str, int]:
    """``{outcome: count}`` of a snapshot (all zero for None)."""
    values = snapshot["outcomes"] if snapshot else [0] * len(OUTCOMES)
    return dict(zip(OUTCOMES, values))


# ----------------------------------------------------------------- merging


_SUMMED = ("retries", "fallbacks", "resent", "cap_waits", "cap_refusals", "handoffs", "bytes_in", "bytes_out", "sessions",
           "first_byte_sum", "total_sum")


def merge(snapshots: Iterable[Dict[str, Any]], max_keys: int = DEFAULT_MAX_KEYS) -> Dict[str, Any]:
    """The sum of several processes' snapshots.  ``cheap`` is 1 only when every process is
    cheap; the key and node tables are bounded again (the busiest kept, the rest summed
    into ``other``)."""
    result: Dict[str, Any] = {name: 0 for name in _SUMMED}
    result["outcomes"] = [0] * len(OUTCOMES)
    result["first_byte"] = [0] * (len(BUCKETS) + 1)
    result["total"] = [0] * (len(BUCKETS) + 1)
    keys: Dict[Optional[str], List[int]] = {}
    nodes: Dict[Optional[str], List[int]] = {}
    cheap = None
    for snap in snapshots:
        for name in _SUMMED:
            result[name] += snap[name]
        for name in ("outcomes", "first_byte", "total"):
            result[name] = [a + int(b) for a, b in zip(result[name], snap[name])]
        cheap = snap["cheap"] if cheap is None else (cheap and snap["cheap"])
        _add_rows(keys, snap["keys"])
        _add_rows(nodes, snap["nodes"])
        if "health" in snap:
            result["health"] = [a + b for a, b in zip(result.get("health", [0] * 5), snap["health"])]
    result["cheap"] = 1 if cheap else 0
    result["keys"] = _bounded(keys, max_keys)
    result["nodes"] = _bounded(nodes, max_keys)
    return result


def _add_rows(into: Dict[Optional[str], List[int]], rows: List[list]) -> None:
    for name, requests, failures in rows:
        entry = into.setdefault(name, [0, 0])
        entry[0] += int(requests)
        entry[1] += int(failures)


def _bounded(entries: Dict[Optional[str], List[int]], max_keys: int) -> List[list]:
    other = entries.pop(None, [0, 0])
    named = sorted(entries.items(), key=lambda item: -item[1][0])
    rows = [[name, counts[0], counts[1]] for name, counts in named[:max_keys]]
    for _name, counts in named[max_keys:]:
        other[0] += counts[0]
        other[1] += counts[1]
    if other[0] or other[1]:
        rows.append([None, other[0], other[1]])
    return rows


def validate(snapshot: Any) -> Dict[str, Any]:
    """*snapshot* from a router process's report, checked; ValueError otherwise."""
    try:
        if not isinstance(snapshot, dict):
            raise TypeError("not an object")
        for name in _SUMMED:
            if not isinstance(snapshot[name], (int, float)):
                raise TypeError(name)
        for name, size in (("outcomes", len(OUTCOMES)), ("first_byte", len(BUCKETS) + 1),
                           ("total", len(BUCKETS) + 1)):
            if len(snapshot[name]) != size or not all(type(v) is int for v in snapshot[name]):
                raise TypeError(name)
        for name in ("keys", "nodes"):
            for row in snapshot[name]:
                if len(row) != 3 or not (row[0] is None or isinstance(row[0], str)) \
                        or type(row[1]) is not int or type(row[2]) is not int:
                    raise TypeError(name)
        if "health" in snapshot and (len(snapshot["health"]) != 5
                                     or not all(type(v) is int for v in snapshot["health"])):
            raise TypeError("health")
        snapshot["cheap"] = int(snapshot["cheap"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError("malformed metrics: %s" % exc) from None
    return snapshot


# --------------------------------------------------------------- rendering


def label_value(text: str) -> str:
    """*text* escaped for a label value of the text format."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _peer_label(name: Optional[str]) -> str:
    """A key or node name from a snapshot (latin-1 text of the client's bytes)."""
    if name is None:
        return "other"
    return label_value(name.encode("latin-1").decode("utf-8", "backslashreplace"))


def _number(value) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(int(value))


class _Text:
    """Builds the exposition text, a metric family at a time."""

    def __init__(self, prefix: str = "uwsgi_fastrouter_") -> None:
        self.prefix = prefix
        self.lines: List[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: Iterable[tuple]) -> None:
        """*samples*: ``(suffix, labels text, value)``."""
        full = self.prefix + name
        # In this format a counter's HELP and TYPE lines name its samples: name_total.
        named = full + "_total" if kind == "counter" else full
        self.lines.append("# HELP %s %s" % (named, help_text))
        self.lines.append("# TYPE %s %s" % (named, kind))
        for suffix, labels, value in samples:
            self.lines.append("%s%s%s %s" % (full, suffix, "{%s}" % labels if labels else "", _number(value)))

    def one(self, name: str, kind: str, help_text: str, value) -> None:
        self.family(name, kind, help_text, [("_total" if kind == "counter" else "", "", value)])

    def text(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode("utf-8")


def _histogram(counts: List[int], total_sum: float) -> List[tuple]:
    samples = []
    running = 0
    for bound, count in zip(BUCKETS, counts):
        running += count
        samples.append(("_bucket", 'le="%s"' % repr(bound), running))
    running += counts[-1]
    samples.append(("_bucket", 'le="+Inf"', running))
    samples.append(("_count", "", running))
    samples.append(("_sum", "", float(total_sum)))
    return samples


def render(snapshot: Dict[str, Any], subscriptions: Optional[Dict[str, int]] = None,
           start_time: float = START_TIME) -> bytes:
    """The exposition text of a (merged) snapshot and the subscription counters."""
    out = _Text()
    out.family("build_info", "gauge", "the package version (always 1)",
               [("", 'version="%s"' % label_value(__version__), 1)])
    out.one("process_start_time_seconds", "gauge", "when the router (its master) started, unix time",
            start_time)
    out.family("requests", "counter", "requests by how they ended",
               [("_total", 'outcome="%s"' % name, count)
                for name, count in zip(OUTCOMES, snapshot["outcomes"])])
    out.one("retries", "counter", "connection attempts after a failed one", snapshot["retries"])
    out.one("fallbacks", "counter", "attempts sent to a --fastrouter-fallback node", snapshot["fallbacks"])
    out.one("resent_requests", "counter", "bodyless requests sent to another node after theirs "
            "closed, reset or went silent before answering (--fastrouter-retry-after-connect)",
            snapshot["resent"])
    out.one("node_cap_waits", "counter", "requests that waited for a slot: every node of their key "
            "was at its --fastrouter-node-max-conns cap", snapshot["cap_waits"])
    out.one("node_cap_refusals", "counter", "requests closed because no node of their key had a "
            "free slot in time", snapshot["cap_refusals"])
    out.one("handoffs", "counter", "clients handed over to a unix-socket node", snapshot["handoffs"])
    out.one("active_sessions", "gauge", "client connections open now", snapshot["sessions"])
    out.family("bytes", "counter", "bytes relayed (in: read from the clients, out: sent to the clients)",
               [("_total", 'direction="in"', snapshot["bytes_in"]),
                ("_total", 'direction="out"', snapshot["bytes_out"])])
    out.family("first_byte_seconds", "histogram", "time from accept to the first response byte",
               _histogram(snapshot["first_byte"], snapshot["first_byte_sum"]))
    out.family("request_seconds", "histogram", "time from accept to close",
               _histogram(snapshot["total"], snapshot["total_sum"]))
    for table, label, what in (("keys", "key", "key"), ("nodes", "node", "node")):
        rows = snapshot[table]
        out.family("%s_requests" % label, "counter",
                   "requests by %s (past the cap summed into %s=\"other\")" % (what, label),
                   [("_total", '%s="%s"' % (label, _peer_label(name)), requests)
                    for name, requests, _failures in rows])
        out.family("%s_failures" % label, "counter",
                   "failed requests by key" if label == "key" else "failed connects by node",
                   [("_total", '%s="%s"' % (label, _peer_label(name)), failures)
                    for name, _requests, failures in rows])
    out.one("cheap", "gauge", "1 while in cheap mode (no node subscribed, listeners not polled)",
            snapshot["cheap"])
    health = snapshot.get("health")
    if health is not None:   # [checks, failed, went down, went up, down now]
        out.one("health_checks", "counter", "PING probes sent to nodes", health[0])
        out.one("health_check_failures", "counter", "PING probes that failed", health[1])
        out.family("health_transitions", "counter", "nodes marked down or up by the checks",
                   [("_total", 'to="down"', health[2]), ("_total", 'to="up"', health[3])])
        out.one("health_nodes_down", "gauge", "nodes held down by the checks now (summed over "
                "the router processes)", health[4])
    if subscriptions is not None:
        out.one("subscription_datagrams", "counter", "subscription datagrams received",
                subscriptions["received"])
        out.family("subscription_drops", "counter", "subscription datagrams dropped, by reason",
                   [("_total", 'reason="%s"' % reason, subscriptions[reason])
                    for reason in ("table_full", "key_full", "replay", "source", "other")])
        out.one("subscription_notify_ignored", "counter",
                "notify paths not written to (announce not verified)", subscriptions["notify_ignored"])
        out.one("subscription_keys", "gauge", "keys in the subscription table", subscriptions["keys"])
        out.one("subscription_nodes", "gauge", "nodes in the subscription table", subscriptions["nodes"])
    return out.text()


def subscription_counters(server, table) -> Optional[Dict[str, int]]:
    """The subscription counters of a :class:`~uwsgi_fastrouter.subserver.SubscriptionServer`
    and its table (None without a subscription server)."""
    if server is None or table is None:
        return None
    refused = table.refused_keys + table.refused_nodes + table.refused_replays
    return {
        "received": server.received,
        "table_full": table.refused_keys,
        "key_full": table.refused_nodes,
        "replay": table.refused_replays,
        "source": server.refused_sources,
        "other": max(0, server.dropped - refused - server.refused_sources),
        "notify_ignored": server.notify_ignored,
        "keys": len(table),
        "nodes": table.node_count,
    }
