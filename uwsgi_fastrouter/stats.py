"""The stats server: uWSGI's JSON document, one per connection.

uWSGI prints its stats with its own layout (TAB indentation, no spaces, no trailing
newline, router socket names unindented) and does not escape strings.  We keep the
layout and the field names byte for byte where the values allow it, and escape
strings as JSON requires, so the document is always valid JSON (decisions.md D10).

Per connection: accept, (with ``--stats-http`` read the request first and answer
with an HTTP/1.0 header), write the whole document, close.  Writes are non-blocking
and resumed on writability, so a slow reader cannot stall the router.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, Callable, Dict, List, Optional

from . import UWSGI_COMPAT_VERSION
from .acceptor import Acceptor, adopt
from .log import log
from .reactor import Reactor

HTTP_HEADER = (b"HTTP/1.0 200 OK\r\nConnection: close\r\nAccess-Control-Allow-Origin: *\r\n"
               b"Content-Type: application/json\r\n\r\n")


class Unindented(list):
    """A list whose string elements uWSGI prints without indentation."""


def render(document: Dict[str, Any], minified: bool = False) -> bytes:
    """Render *document* (dicts keep their order) in uWSGI's stats layout."""
    out: List[str] = []
    nl, tab = ("", "") if minified else ("\n", "\t")
    _emit_object(document, 0, out, nl, tab)
    return "".join(out).encode("utf-8")


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value))
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return json.dumps(value, ensure_ascii=False)


def _emit_value(value: Any, depth: int, out: List[str], nl: str, tab: str) -> None:
    if isinstance(value, dict):
        _emit_object(value, depth, out, nl, tab)
    elif isinstance(value, list):
        _emit_list(value, depth, out, nl, tab)
    else:
        out.append(_scalar(value))


def _emit_object(obj: Dict[str, Any], depth: int, out: List[str], nl: str, tab: str) -> None:
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
        out.append(json.dumps(key))
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


def build_document(server, socket_names: List[str], *, static_nodes: Optional[list],
                   extra: Optional[Callable[[Dict[str, Any]], None]] = None,
                   cheap: bool = False) -> Dict[str, Any]:
    """The stats members in uWSGI's order (wire.md §3.3)."""
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
    if extra is not None:
        extra(doc)
    doc["cheap"] = 1 if cheap else 0
    return doc


_NODE_FIELDS = ("name", "modifier1", "modifier2", "last_check", "pid", "uid", "gid", "requests",
                "last_requests", "tx", "rx", "cores", "load", "weight", "wrr", "ref", "failcnt",
                "death_mark")


def subscription_stats(table) -> list:
    """The ``subscriptions`` member: pools in uWSGI's order, nodes in insertion order."""
    pools = []
    for pool in table.pools_for_stats():
        pools.append({
            "key": pool.key,
            "hash": pool.hash,
            "hits": pool.hits,
            "sni_enabled": 0,
            "nodes": [{field: _number(getattr(node, field)) if field != "name" else node.name
                       for field in _NODE_FIELDS} for node in pool.nodes],
        })
    return pools


def _number(value) -> int:
    if value is None:
        return 0
    return int(value)


def _cwd() -> str:
    try:
        return os.getcwd()
    except OSError:
        return ""


class StatsServer:
    """Serves ``render(document())`` to every client of *listener*."""

    def __init__(self, reactor: Reactor, listener, document: Callable[[], Dict[str, Any]], *,
                 minified: bool = False, http: bool = False, timeout: float = 4.0) -> None:
        self.reactor = reactor
        self.listener = listener
        self.document = document
        self.minified = minified
        self.http = http
        self.timeout = timeout if timeout > 0 else 4.0
        self.clients: Dict[int, "_StatsClient"] = {}
        self.acceptor = Acceptor(reactor, listener.sock, self._accept,
                                 name="stats server %s" % listener.name)

    def start(self) -> None:
        self.acceptor.start()

    def stop(self) -> None:
        self.acceptor.stop()
        for client in list(self.clients.values()):
            client.close()

    def _accept(self, fd: int, _addr) -> None:
        client = _StatsClient(self, adopt(self.listener.sock, fd))
        self.clients[client.fd] = client
        client.start()

    def payload(self) -> bytes:
        try:
            body = render(self.document(), self.minified)
        except Exception as exc:  # never let a stats bug hurt routing
            log("[uwsgi-fastrouter] unable to build the stats document: %r" % (exc,))
            body = render({"version": UWSGI_COMPAT_VERSION, "error": str(exc)}, self.minified)
        return (HTTP_HEADER + body) if self.http else body


class _StatsClient:
    __slots__ = ("server", "sock", "fd", "data", "timer")

    def __init__(self, server: StatsServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.data = b""
        self.timer = server.reactor.call_later(server.timeout, self.close)

    def start(self) -> None:
        if self.server.http:
            self.server.reactor.add_reader(self.fd, self._read_request)
        else:
            self._begin_write()

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
        self._begin_write()

    def _begin_write(self) -> None:
        self.data = self.server.payload()
        self._write()

    def _write(self) -> None:
        try:
            sent = self.sock.send(self.data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.close()
            return
        self.data = self.data[sent:]
        if not self.data:
            self.close()
            return
        # Wait for writability (re-adding an installed writer just keeps it).
        self.server.reactor.add_writer(self.fd, self._write)

    def close(self) -> None:
        if self.sock is None:
            return
        self.timer.cancel()
        reactor = self.server.reactor
        reactor.remove_reader(self.fd)
        reactor.remove_writer(self.fd)
        self.server.clients.pop(self.fd, None)
        self.sock.close()
        self.sock = None
