"""The stats document: uWSGI's JSON layout, rendered whole or in slices.

The endpoint that serves it (``--fastrouter-stats``) lives in
:mod:`uwsgi_fastrouter.endpoints`; this module does no I/O.

uWSGI prints its stats with its own layout (TAB indentation, no spaces, no trailing
newline, router socket names unindented) and does not escape strings.  We keep the
layout and the field names byte for byte where the values allow it, and escape
strings as JSON requires, so the document is always valid JSON (decisions.md D10).

Per connection: accept, (with ``--stats-http`` read the request first and answer
with an HTTP/1.0 header), write the whole document, close.  Writes are non-blocking
and resumed on writability, so a slow reader cannot stall the router.

Theory of operation: a document in slices
-----------------------------------------
With thousands of subscribed keys the document is megabytes of text, and building it
in one go would freeze routing for a large fraction of a second.  So it is never built
in one go.  A member whose value is :class:`Streamed` (the ``subscriptions`` list) is
an iterable *factory*: :func:`render_pieces` calls it when the text reaches that
member and renders its items one at a time, yielding a piece of text after each.  The
subscription list snapshots the table's pools (a list of references), sorts them into
uWSGI's order a run of a few hundred at a time (a pause, an empty piece, after each
run: sorting 10,000 pools in one go holds the loop for a millisecond or two), merges
the runs as it goes, and turns each pool into its stats record only when the renderer
asks for it.

Each client pulls pieces while its socket takes them, at most :data:`CHUNK` bytes at a
time and only while the pass of the event loop has stats time left: a quarter of a
millisecond (:data:`SLICE_BUDGET`, shared by every stats client) in a pass where only
stats sockets were ready, none in a pass that also had other work, where routing goes
first.  A client always gets at least one piece per pass, so none starves.  It then
returns to the loop: routing runs between slices, and the next slice is taken on the
next writability event, normally the next pass.

What a slow document shows: the pools that were in the table at the snapshot, each
rendered as it is when its turn comes (counters of that moment, nodes added or
removed since the snapshot included or left out).  A pool removed from the table
after the snapshot is skipped; a pool added after it is not in this document.  Every
document is complete and valid; two concurrent clients each get their own.

The text is the same byte for byte as :func:`render` of the same data: both walk the
document with the same emitters.
"""

from __future__ import annotations

import json
import operator
import os
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from . import UWSGI_COMPAT_VERSION, __version__
from .metrics import merge, outcome_counts
from .metrics import validate as validate_counters

HTTP_HEADER = (b"HTTP/1.0 200 OK\r\nConnection: close\r\nAccess-Control-Allow-Origin: *\r\n"
               b"Content-Type: application/json\r\n\r\n")


#: the most a stats client renders ahead of what its socket took (bytes)
CHUNK = 65536
#: seconds of stats work one pass of the event loop may do, for all stats clients
SLICE_BUDGET = 0.00025


def slice_deadline(reactor, own_events: int) -> float:
    """When a slice of low-priority work that starts now must stop: after
    :data:`SLICE_BUDGET` in a pass of the loop whose ready fds were at most
    *own_events* (the worker's own), at once (after one step) in a pass that had other
    work: then routing goes first.  *reactor* is the loop (its ``ready_count``)."""
    idle = reactor.ready_count <= own_events
    return time.monotonic() + (SLICE_BUDGET if idle else 0.0)


class Unindented(list):
    """A list whose string elements uWSGI prints without indentation."""


class Streamed:
    """A list member rendered item by item.

    *items* is called when the renderer reaches the member; the iterable it returns is
    pulled one item at a time.  Items are plain values (dicts, lists, scalars); only a
    :class:`Streamed` member of the top-level document is rendered in slices.  The
    iterable may also yield :attr:`PAUSE`: no item, a step of work done (the renderer
    yields an empty piece for it, a point where a slice can stop).
    """

    __slots__ = ("items",)

    PAUSE: Any = object()

    def values(self) -> List[Any]:
        """Every item, the pauses left out (a render in one go)."""
        pause = Streamed.PAUSE
        return [item for item in self.items() if item is not pause]

    def __init__(self, items: Callable[[], Iterable[Any]]) -> None:
        self.items = items


def render(document: Dict[str, Any], minified: bool = False) -> bytes:
    """Render *document* (dicts keep their order) in uWSGI's stats layout."""
    out: List[str] = []
    nl, tab = ("", "") if minified else ("\n", "\t")
    _emit_object(document, 0, out, nl, tab)
    return "".join(out).encode("utf-8")


def render_pieces(document: Dict[str, Any], minified: bool = False) -> Iterator[str]:
    """:func:`render`'s text in pieces (their concatenation is the same text): a piece
    per top-level member, and one per item of a :class:`Streamed` member."""
    out: List[str] = []
    nl, tab = ("", "") if minified else ("\n", "\t")
    out.append("{")
    out.append(nl)
    first = True
    for key, value in document.items():
        if not first:
            out.append(",")
            out.append(nl)
        first = False
        out.append(tab)
        out.append(_key(key))
        out.append(":")
        if isinstance(value, Streamed):
            yield from _stream_list(value, out, nl, tab)
        else:
            _emit_value(value, 1, out, nl, tab)
        yield "".join(out)
        out.clear()
    out.append(nl)
    out.append("}")
    yield "".join(out)


def _stream_list(value: "Streamed", out: List[str], nl: str, tab: str) -> Iterator[str]:
    """A top-level :class:`Streamed` member (depth 1), the text so far in *out* first."""
    out.append("[")
    out.append(nl)
    inner = tab * 2
    first = True
    pause = Streamed.PAUSE
    for item in value.items():
        if item is pause:
            yield ""
            continue
        if not first:
            out.append(",")
            out.append(nl)
        first = False
        out.append(inner)
        _emit_value(item, 2, out, nl, tab)
        yield "".join(out)
        out.clear()
    out.append(nl)
    out.append(tab)
    out.append("]")


# json.dumps(text, ensure_ascii=False) without its Python layers.
_json_string = json.encoder.encode_basestring
_KEYS: Dict[str, str] = {}


def _key(name: str) -> str:
    """A member name as JSON (the few names of the document are encoded once)."""
    text = _KEYS.get(name)
    if text is None:
        text = json.dumps(name)
        if len(_KEYS) < 256:
            _KEYS[name] = text
    return text


def _scalar(value: Any) -> str:
    if type(value) is int:
        return str(value)
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value))
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if type(value) is str:
        return _json_string(value)
    if value is _HOLE:
        return _HOLE_TEXT
    return json.dumps(value, ensure_ascii=False)


def _emit_value(value: Any, depth: int, out: List[str], nl: str, tab: str) -> None:
    if isinstance(value, dict):
        _emit_object(value, depth, out, nl, tab)
    elif isinstance(value, list):
        _emit_list(value, depth, out, nl, tab)
    elif isinstance(value, Streamed):
        _emit_list(value.values(), depth, out, nl, tab)
    else:
        out.append(_scalar(value))


# The objects of a document are many (a pool, a node: thousands of each) and of a few
# shapes (their member names).  Each shape is rendered once by the generic emitter with
# a hole for every value, giving a %-template; an object of that shape is then one %
# operation on the texts of its values.  The template comes from the generic emitter,
# so the text is the same.
_HOLE = object()              # a value that _scalar() renders as _HOLE_TEXT
_HOLE_TEXT = str(object())    # a str object told apart by identity
_TEMPLATES: Dict[tuple, str] = {}
_MAX_TEMPLATES = 64


def _emit_object(obj: Dict[str, Any], depth: int, out: List[str], nl: str, tab: str) -> None:
    if len(obj) > 2:
        shape = (tuple(obj), depth, nl, tab)
        template = _TEMPLATES.get(shape)
        if template is None and len(_TEMPLATES) < _MAX_TEMPLATES:
            template = _TEMPLATES[shape] = _template(shape[0], depth, nl, tab)
        if template is not None:
            out.append(template % _texts(obj, depth + 1, nl, tab))
            return
    _emit_members(obj, depth, out, nl, tab)


def _texts(obj: Dict[str, Any], depth: int, nl: str, tab: str) -> tuple:
    """The values of *obj* as a template takes them: ints as they are (``%s`` prints
    them), strings and bytes as JSON strings, the rest through :func:`_text`.  The
    common types are handled here, without a call each: a stats document is mostly
    names and numbers, by the ten thousand."""
    texts = []
    append = texts.append
    for value in obj.values():
        kind = type(value)
        if kind is int:
            append(value)
        elif kind is bytes:
            append(_json_string(value.decode("utf-8", "replace")))
        elif kind is str and value is not _HOLE_TEXT:
            append(_json_string(value))
        elif kind is list and value and type(value[0]) is dict and not isinstance(value, Unindented):
            append(_dicts_text(value, depth, nl, tab))
        else:
            append(_text(value, depth, nl, tab))
    return tuple(texts)


def _dicts_text(items: list, depth: int, nl: str, tab: str) -> str:
    """:func:`_emit_list`'s text for a list whose first item is a dict (a pool's nodes)."""
    out: List[str] = ["[", nl]
    inner = tab * (depth + 1)
    first = True
    for item in items:
        if not first:
            out.append(",")
            out.append(nl)
        first = False
        out.append(inner)
        if type(item) is dict:
            _emit_object(item, depth + 1, out, nl, tab)
        else:
            _emit_value(item, depth + 1, out, nl, tab)
    out.append(nl)
    out.append(tab * depth)
    out.append("]")
    return "".join(out)


def _text(value: Any, depth: int, nl: str, tab: str) -> str:
    """The text of one value at *depth*."""
    if isinstance(value, (dict, list, Streamed)):
        out: List[str] = []
        _emit_value(value, depth, out, nl, tab)
        return "".join(out)
    return _scalar(value)


def _template(keys: tuple, depth: int, nl: str, tab: str) -> str:
    parts: List[str] = []
    _emit_members(dict.fromkeys(keys, _HOLE), depth, parts, nl, tab)
    return "".join("%s" if part is _HOLE_TEXT else part.replace("%", "%%") for part in parts)


def _emit_members(obj: Dict[str, Any], depth: int, out: List[str], nl: str, tab: str) -> None:
    out.append("{")
    out.append(nl)
    inner = tab * (depth + 1)
    first = True
    for key, value in obj.items():
        if not first:
            out.append(",")
            out.append(nl)
        first = False
        out.append(inner)
        out.append(_key(key))
        out.append(":")
        _emit_value(value, depth + 1, out, nl, tab)
    out.append(nl)
    out.append(tab * depth)
    out.append("}")


def _emit_list(items: list, depth: int, out: List[str], nl: str, tab: str) -> None:
    out.append("[")
    out.append(nl)
    inner = "" if isinstance(items, Unindented) else tab * (depth + 1)
    first = True
    for item in items:
        if not first:
            out.append(",")
            out.append(nl)
        first = False
        out.append(inner)
        _emit_value(item, depth + 1, out, nl, tab)
    out.append(nl)
    out.append(tab * depth)
    out.append("]")


#: the members added after uWSGI's (readers of uWSGI's document ignore them): the
#: package version, then how many requests ended each way (see metrics.OUTCOMES)
_OUTCOME_MEMBERS = (("ok", "requests_ok"), ("no_route", "no_route"), ("connect_failed", "connect_failed"),
                    ("timeout", "timeouts"), ("client_error", "client_errors"), ("node_error", "node_errors"))


def build_document(server, socket_names: List[str], *, static_nodes: Optional[list],
                   extra: Optional[Callable[[Dict[str, Any]], None]] = None,
                   cheap: bool = False, counters: Optional[Dict[str, Any]] = None,
                   health: bool = False) -> Dict[str, Any]:
    """The stats members in uWSGI's order (docs/wire.md, "Members, in order"), then this package's own:
    its version and the request outcome counters of *counters* (a
    :meth:`~uwsgi_fastrouter.metrics.Counters.snapshot`, or None: all zero).  With
    *health* (health checks run) each static node also shows ``health``."""
    doc: Dict[str, Any] = {
        "version": UWSGI_COMPAT_VERSION,
        "pid": os.getpid(),
        "uid": os.getuid(),
        "gid": os.getgid(),
        "cwd": _cwd(),
        "active_sessions": server.active_sessions,
        "fastrouter": Unindented(socket_names),
    }
    if static_nodes is not None:
        doc["static_nodes"] = [
            {"name": node.name, "hits": node.hits, "grace": int(node.dead_since)}
            for node in static_nodes
        ]
        if health:
            for record, node in zip(doc["static_nodes"], static_nodes):
                record["health"] = "down" if node.down else "up"
    if extra is not None:
        extra(doc)
    doc["cheap"] = 1 if cheap else 0
    doc["uwsgi_fastrouter_version"] = __version__
    outcomes = outcome_counts(counters)
    for outcome, member in _OUTCOME_MEMBERS:
        doc[member] = outcomes[outcome]
    return doc


_NODE_FIELDS = ("name", "modifier1", "modifier2", "last_check", "pid", "uid", "gid", "requests",
                "last_requests", "tx", "rx", "cores", "load", "weight", "wrr", "ref", "failcnt",
                "death_mark")


def subscription_stats(table) -> list:
    """The ``subscriptions`` member: pools in uWSGI's order, nodes in insertion order."""
    return [pool_stats(pool) for pool in table.pools_for_stats()]


def subscription_stream(table) -> Streamed:
    """:func:`subscription_stats` as a :class:`Streamed` member: the pools are listed
    when the renderer reaches the member, each is turned into its record when its turn
    comes, and one removed from the table meanwhile is skipped."""
    return Streamed(lambda: live_pools(table, pool_stats))


def live_pools(table, record: Callable[[Any], Dict[str, Any]]) -> Iterator[Any]:
    """``record(pool)`` for the pools of *table* in stats order, taken one at a time,
    with a :attr:`Streamed.PAUSE` after each step of the sort; the pool list is
    snapshot at the first ``next()``, and a pool no longer in the table when its turn
    comes is skipped."""
    pause = Streamed.PAUSE
    for pool in table.pools_for_stats_in_steps():
        if pool is None:
            yield pause
        elif table.pool(pool.key) is pool:
            yield record(pool)


def pool_stats(pool) -> Dict[str, Any]:
    """One pool's record in the ``subscriptions`` member.  A key that uses uWSGI 2.1
    features (a 2.1 field in an announce, an algorithm 2.0 lacks) also shows uWSGI
    2.1's ``algo``, and its nodes ``vassal``, ``backup`` and ``proto``."""
    if pool.v21 or pool.hashed:
        return {
            "key": pool.key,
            "hash": pool.hash,
            "hits": pool.hits,
            "sni_enabled": 0,
            "algo": pool.algo,
            "nodes": [node_stats_v21(node) for node in pool.nodes],
        }
    return {
        "key": pool.key,
        "hash": pool.hash,
        "hits": pool.hits,
        "sni_enabled": 0,
        "nodes": [node_stats(node) for node in pool.nodes],
    }


_node_numbers = operator.attrgetter(*_NODE_FIELDS[1:])
_ONLY_INT = {int}


def node_stats(node) -> Dict[str, Any]:
    """One node's record: its name and its numbers (``None`` shown as 0)."""
    numbers = _node_numbers(node)
    if set(map(type, numbers)) != _ONLY_INT:       # None, a float: converted one by one
        numbers = tuple(value if type(value) is int else _number(value) for value in numbers)
    record = dict(zip(_NODE_FIELDS, (node.name,) + numbers))
    health = getattr(node, "health", None)
    if health is not None:
        record["health"] = health      # only while health checks run
    return record


def node_stats_v21(node) -> Dict[str, Any]:
    """:func:`node_stats` plus uWSGI 2.1's ``vassal``, ``backup`` and ``proto`` (empty
    strings for an absent vassal or proto)."""
    record = node_stats(node)
    record["vassal"] = node.vassal or b""
    record["backup"] = node.backup
    record["proto"] = node.proto or b""
    return record


def _number(value) -> int:
    if value is None:
        return 0
    return int(value)


def _cwd() -> str:
    try:
        return os.getcwd()
    except OSError:
        return ""


# --------------------------------------------------------------------------
# Under a master: each router process reports its counters, the master sums them


def report_parts(server, table, pools_per_part: int = 32, totals_only: bool = False,
                 health=None) -> Iterator[dict]:
    """A router process's counters for the master's stats, in parts (see
    :class:`RouterReport`): the totals of *server* first, then (unless *totals_only*: a
    metrics scrape) the pools of *table* a few at a time, each taken from the table when
    its part is built (one removed meanwhile is left out).  A pool whose counters are
    all zero is left out too: the master sums what it gets into its own table, where a
    missing pool adds nothing, as zeros would.  So that a walk over many such pools
    is sliced too, an empty part (``{}``: nothing to send) comes after every
    *pools_per_part* x 8 pools looked at without a part."""
    first = {"sessions": len(server.sessions),
             "static": [[n.hits, int(n.dead_since)] for n in server.router.static_nodes],
             "cheap": 1 if server.cheap else 0,
             "metrics": server.counters.snapshot(server)}
    if health is not None:
        first["down"] = [a.decode("latin-1") for a, up in health.health().items() if not up]
    yield first
    if table is None or totals_only:
        return
    flat: list = []
    count = 0
    idle = 0
    # In the table's own order (no sort: the master finds each pool of a report by its
    # key); a pool removed since the walk started is left out, like an idle one.
    pool_now = table.pool
    for pool in table.pools_now():
        counters = _pool_counters(pool)
        if counters is None or pool_now(pool.key) is not pool:
            idle += 1
            if idle >= pools_per_part * 8:
                yield {}
                idle = 0
            continue
        flat += counters
        count += 1
        if count >= pools_per_part:
            yield {"pools": flat}
            flat, count, idle = [], 0, 0
    if flat:
        yield {"pools": flat}


def _pool_counters(pool) -> Optional[list]:
    """One pool in a router process's report, flat (see :class:`RouterReport`); None
    for a pool whose counters are all zero (a key this process never routed to)."""
    nodes = pool.nodes
    if not pool.hits:
        for n in nodes:
            if n.requests or n.last_requests or n.tx or n.rx or n.ref or n.failcnt:
                break
        else:
            return None
    flat = [pool.key.decode("latin-1"), pool.hits, len(nodes)]
    for n in nodes:
        flat += (n.name.decode("latin-1"), n.requests, n.last_requests, n.tx, n.rx, n.ref, n.failcnt)
    return flat


class RouterReport:
    """One router process's counters, as the master receives them in parts.

    Each part is a JSON object: the first has ``sessions``, ``static`` (``[hits,
    grace]`` per static node), ``cheap`` and ``metrics`` (the request counters, see
    :meth:`~uwsgi_fastrouter.metrics.Counters.snapshot`); the others ``pools``, a flat list with,
    per pool, its key (latin-1), hits and node count, then per node its name
    (latin-1), requests, last_requests, tx, rx, ref and failcnt.

    The counters stay in one flat list with an index of positions by key: tens of
    thousands of small lists and dicts kept across passes would make every full run
    of the cyclic garbage collector (which walks them all, in one pass of the loop)
    that much longer.
    """

    __slots__ = ("sessions", "static", "cheap", "metrics", "counters", "index", "down")

    def __init__(self) -> None:
        self.sessions = 0
        self.static: list = []
        self.cheap = 0
        self.metrics: Optional[dict] = None   # the process's request counters (metrics.py)
        self.counters: list = []
        self.index: Dict[str, int] = {}   # key -> position of its hits in counters
        self.down: set = set()            # addresses its health checks hold down (latin-1)

    def add(self, data: bytes) -> None:
        """Merge one part; ValueError for one that is not a part."""
        part = json.loads(data)
        if not isinstance(part, dict):
            raise ValueError("a report part is not an object")
        try:
            if "sessions" in part:
                self.sessions = int(part["sessions"])
                self.static = [(int(hits), int(grace)) for hits, grace in part["static"]]
                self.cheap = int(part["cheap"])
                if "metrics" in part:
                    self.metrics = validate_counters(part["metrics"])
                if "down" in part:
                    self.down = {a for a in part["down"] if type(a) is str}
            flat = part.get("pools")
            if flat is not None:
                self._index(flat)
        except (IndexError, KeyError, TypeError) as exc:
            raise ValueError("a malformed report part: %r" % (exc,)) from None

    def _index(self, flat: list) -> None:
        base = len(self.counters)
        index = {}
        at = 0
        while at < len(flat):
            key, hits, nodes = flat[at], flat[at + 1], flat[at + 2]
            if type(key) is not str or type(hits) is not int or type(nodes) is not int or nodes < 0 \
                    or at + 3 + 7 * nodes > len(flat):
                raise ValueError("a malformed pool in a report part")
            index[key] = base + at + 1
            at += 3 + 7 * nodes
        self.counters += flat
        self.index.update(index)

    def pool(self, key: str) -> Optional[Tuple[int, Dict[str, list]]]:
        """(hits, {node name: [requests, last_requests, tx, rx, ref, failcnt]}) of *key*."""
        at = self.index.get(key)
        if at is None:
            return None
        counters = self.counters
        nodes = {}
        node = at + 2
        for _ in range(counters[at + 1]):
            nodes[counters[node]] = counters[node + 1:node + 7]
            node += 7
        return counters[at], nodes


def master_document(reports: List["RouterReport"], table, socket_names: List[str],
                    static_names: List[str], health: bool = False) -> Dict[str, Any]:
    """The master's stats document: its own sockets and subscription table, with the
    router processes' *reports* summed in (the static nodes of *static_names*: hits
    summed, the longest grace).  With *health* (health checks run) a node is shown
    down while some router process holds it down."""
    down = set().union(*(r.down for r in reports)) if health else None
    static = None
    if static_names:
        static = []
        for i, name in enumerate(static_names):
            hits = sum(r.static[i][0] for r in reports if i < len(r.static))
            grace = max([r.static[i][1] for r in reports if i < len(r.static)] or [0])
            static.append(_StaticView(name, hits, grace, bool(down) and name in down))
    extra = None
    if table is not None:
        extra = lambda d: d.__setitem__("subscriptions", _aggregate(table, reports, down))
    return build_document(_SessionsView(sum(r.sessions for r in reports)), socket_names,
                          static_nodes=static, extra=extra, health=health,
                          cheap=bool(reports) and all(r.cheap for r in reports),
                          counters=merge([r.metrics for r in reports if r.metrics is not None]))


class _StaticView:
    __slots__ = ("name", "hits", "dead_since", "down")

    def __init__(self, name, hits, dead_since, down=False) -> None:
        self.name, self.hits, self.dead_since, self.down = name, hits, dead_since, down


class _SessionsView:
    __slots__ = ("active_sessions",)

    def __init__(self, n: int) -> None:
        self.active_sessions = n


def _aggregate(table, reports: List[RouterReport], down: Optional[set] = None) -> Streamed:
    """The master's table with every router process's counters summed, as a
    :class:`~uwsgi_fastrouter.stats.Streamed` member: a pool at a time.  *down*: the
    addresses some router process's health checks hold down (None: no checks)."""
    return Streamed(lambda: live_pools(
        table, lambda pool: _with_totals(pool_stats(pool), reports, down)))


def _with_totals(record: dict, reports: List[RouterReport], down: Optional[set] = None) -> dict:
    """A pool's record with the router processes' counters summed into it (and, with
    health checks, each node's ``health``)."""
    key = record["key"].decode("latin-1")
    entries = [entry for entry in (report.pool(key) for report in reports) if entry]
    record["hits"] = sum(entry[0] for entry in entries)
    for node in record["nodes"]:
        name = node["name"].decode("latin-1")
        totals = [0, 0, 0, 0, 0, 0]
        for entry in entries:
            counters = entry[1].get(name)
            if counters:
                totals = [a + b for a, b in zip(totals, counters)]
        (node["requests"], node["last_requests"], node["tx"], node["rx"], node["ref"],
         failcnt) = totals
        node["failcnt"] = max(node["failcnt"], failcnt)
        if down is not None:
            node["health"] = "down" if name in down else "up"
    return record
