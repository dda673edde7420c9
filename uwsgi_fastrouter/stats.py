"""The stats server: uWSGI's JSON document, one per connection.

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
subscription list snapshots the table's pools (a sorted list of references, a few
milliseconds for 10,000 keys) and turns each pool into its stats record only when the
renderer asks for it.

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
import socket
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

from . import UWSGI_COMPAT_VERSION, __version__
from .acceptor import ConnectionServer
from .log import log
from .metrics import outcome_counts
from .reactor import Reactor

HTTP_HEADER = (b"HTTP/1.0 200 OK\r\nConnection: close\r\nAccess-Control-Allow-Origin: *\r\n"
               b"Content-Type: application/json\r\n\r\n")


#: the most a stats client renders ahead of what its socket took (bytes)
CHUNK = 65536
#: seconds of stats work one pass of the event loop may do, for all stats clients
SLICE_BUDGET = 0.00025


def slice_deadline(reactor: Reactor, own_events: int) -> float:
    """When a slice of low-priority work that starts now must stop: after
    :data:`SLICE_BUDGET` in a pass of the loop whose ready fds were at most
    *own_events* (the worker's own), at once (after one step) in a pass that had other
    work: then routing goes first."""
    idle = reactor.ready_count <= own_events
    return time.monotonic() + (SLICE_BUDGET if idle else 0.0)


class Unindented(list):
    """A list whose string elements uWSGI prints without indentation."""


class Streamed:
    """A list member rendered item by item.

    *items* is called when the renderer reaches the member; the iterable it returns is
    pulled one item at a time.  Items are plain values (dicts, lists, scalars); only a
    :class:`Streamed` member of the top-level document is rendered in slices.
    """

    __slots__ = ("items",)

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
    for item in value.items():
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
        _emit_list(list(value.items()), depth, out, nl, tab)
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
            inner = depth + 1
            out.append(template % tuple([value if type(value) is int else _text(value, inner, nl, tab)
                                         for value in obj.values()]))
            return
    _emit_members(obj, depth, out, nl, tab)


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
    """The stats members in uWSGI's order (wire.md §3.3), then this package's own:
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


def live_pools(table, record: Callable[[Any], Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
    """``record(pool)`` for the pools of *table* in stats order, taken one at a time;
    the pool list is snapshot at the first ``next()``, and a pool no longer in the
    table when its turn comes is skipped."""
    for pool in table.pools_for_stats():
        if table.pool(pool.key) is pool:
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


def node_stats(node) -> Dict[str, Any]:
    """One node's record: its name and its numbers (``None`` shown as 0)."""
    record = {"name": node.name}
    record.update(zip(_NODE_FIELDS[1:], _node_numbers(node)))
    for field, value in record.items():
        if type(value) is not int and field != "name":
            record[field] = _number(value)
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


class StatsServer(ConnectionServer):
    """Serves the stats document to every client of *listener*.

    *document* returns the document; or *gather*, for a document that takes a while to
    collect (the master's, from its router processes), is called with a ``deliver``
    function to call once with the document, now or later.
    """

    def __init__(self, reactor: Reactor, listener, document: Optional[Callable[[], Dict[str, Any]]] = None,
                 *, gather: Optional[Callable[[Callable[[Dict[str, Any]], None]], None]] = None,
                 minified: bool = False, http: bool = False, timeout: float = 4.0) -> None:
        if (document is None) == (gather is None):
            raise TypeError("StatsServer needs document or gather")
        super().__init__(reactor, listener, "stats server")
        self.document = document
        self.gather = gather if gather is not None else self._gather_now
        self.minified = minified
        self.http = http
        self.timeout = timeout if timeout > 0 else 4.0
        self._pass = None           # the loop pass (its loop time) the budget below is for
        self._pass_deadline = 0.0

    def new_client(self, sock: socket.socket) -> "_StatsClient":
        client = _StatsClient(self, sock)
        client.start()
        return client

    def _gather_now(self, deliver: Callable[[Dict[str, Any]], None]) -> None:
        deliver(self.document())

    def pieces(self, document: Dict[str, Any]) -> Iterator[bytes]:
        """What one client is sent, in pieces: the HTTP header if asked for, the document."""
        if self.http:
            yield HTTP_HEADER
        for piece in render_pieces(document, self.minified):
            yield piece.encode("utf-8")

    def error_payload(self, exc: BaseException) -> bytes:
        log("[uwsgi-fastrouter] unable to build the stats document: %r" % (exc,))
        body = render({"version": UWSGI_COMPAT_VERSION, "error": str(exc)}, self.minified)
        return (HTTP_HEADER + body) if self.http else body

    def slice_deadline(self) -> float:
        """When this pass's stats work must stop: one budget per pass for every client,
        none in a pass that also has other work (then each client renders one piece)."""
        reactor = self.reactor
        if self._pass != reactor.now:
            self._pass = reactor.now
            self._pass_deadline = slice_deadline(reactor, len(self.clients))
        return self._pass_deadline


class _StatsClient:
    """One stats connection: (the HTTP request,) the document, in slices, then close.

    *timeout* bounds every wait: for the request, for the document, for the socket to
    take more; each write that makes progress starts it again.
    """

    __slots__ = ("server", "sock", "fd", "pieces", "pending", "offset", "sent_any", "timer", "deadline")

    def __init__(self, server: StatsServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.pieces: Optional[Iterator[bytes]] = None
        self.pending = b""          # rendered, not yet sent from *offset* on
        self.offset = 0
        self.sent_any = False
        self.deadline = server.reactor.now + server.timeout
        self.timer = server.reactor.call_at(self.deadline, self._expire)

    def start(self) -> None:
        if self.server.http:
            self.server.reactor.add_reader(self.fd, self._read_request)
        else:
            self._request_document()

    def _read_request(self) -> None:
        try:
            chunk = self.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        self.server.reactor.remove_reader(self.fd)
        if not chunk:
            self.close()
            return
        self._request_document()

    def _request_document(self) -> None:
        try:
            self.server.gather(self._deliver)
        except Exception as exc:  # never let a stats bug hurt routing
            self._deliver_error(exc)

    def _deliver(self, document: Dict[str, Any]) -> None:
        if self.sock is None:       # timed out meanwhile
            return
        self.pieces = self.server.pieces(document)
        self._write()

    def _deliver_error(self, exc: BaseException) -> None:
        if self.sock is None:
            return
        self.pieces = None
        self.pending, self.offset = self.server.error_payload(exc), 0
        self._write()

    def _fill(self) -> None:
        """Render the next slice: up to CHUNK bytes, within this pass's budget."""
        deadline = self.server.slice_deadline()
        clock = time.monotonic
        pieces = self.pieces
        taken: List[bytes] = []
        size = 0
        while True:
            try:
                piece = next(pieces)
            except StopIteration:
                self.pieces = None
                break
            taken.append(piece)
            size += len(piece)
            if size >= CHUNK or clock() >= deadline:
                break
        self.pending, self.offset = b"".join(taken), 0

    def _write(self) -> None:
        if self.offset >= len(self.pending):
            if self.pieces is None:
                self.close()
                return
            try:
                self._fill()
            except Exception as exc:  # a stats bug: an error document if nothing went out yet
                if self.sent_any:
                    log("[uwsgi-fastrouter] stats document cut short: %r" % (exc,))
                    self.close()
                    return
                self._deliver_error(exc)
                return
        if self.pending:
            try:
                sent = self.sock.send(memoryview(self.pending)[self.offset:])
            except BlockingIOError:
                sent = 0
            except OSError:
                self.close()
                return
            if sent:
                self.offset += sent
                self.sent_any = True
                self.deadline = self.server.reactor.now + self.server.timeout
        if self.offset >= len(self.pending) and self.pieces is None:
            self.close()
            return
        # More to send or to render: on the next writability event, which is the next
        # pass of the loop unless the client is slow (re-adding a writer just keeps it).
        self.server.reactor.add_writer(self.fd, self._write)

    def _expire(self) -> None:
        if self.sock is None:
            return
        if self.server.reactor.now >= self.deadline:
            self.close()
        else:
            self.timer = self.server.reactor.call_at(self.deadline, self._expire)

    def close(self) -> None:
        if self.sock is None:
            return
        self.timer.cancel()
        self.server.drop(self)
        self.sock = None
        self.pieces = None
        self.pending = b""
