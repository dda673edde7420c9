"""The local app server: a pre-forked WSGI (PEP 3333) worker speaking the uwsgi protocol.

Theory of operation
-------------------
This is the worker side of ``--socket ADDR --wsgi-file FILE --processes N``: the
master binds the listening sockets, forks N children, and each child builds a
:class:`Worker` and calls :meth:`Worker.serve_forever`.  A worker is a uWSGI
"sync" worker: it waits on all its listeners at once and serves one request at a
time, start to finish.

*Shared listeners.*  The listening sockets are shared with sibling workers and,
in cheap mode, with a router process (docs/behaviour.md, "Shared sockets" and "Cheap mode").  Every
process is woken for every connection and the kernel gives it to exactly one of
them, so ``accept`` failing with ``EAGAIN`` is normal: the worker just waits
again.  Listeners are switched to non-blocking mode (a flag shared by every
process holding them, all of which want it).

*One request.*  A connection carries exactly one request: the 4-byte header and
``datasize`` bytes of vars, then the body.  The head is read with ``recvmsg``
(by the protocol's ``HeadReader``, which asks for nothing past the vars)
and room for one descriptor: a router that hands the client over (decisions.md
D2) sends the client's socket with the head in one message.  Then the body is
read from, and the response written to, the *client's* socket, and the connection
from the router is closed at once without a byte -- which is how the router
learns that the client was taken over.  Otherwise everything happens on the
accepted connection.  A vars block larger than ``buffer_size`` (uWSGI's
``--buffer-size``, 4096 by default) is refused as uWSGI refuses it: a log line
and a bare close.

*The response.*  The status line is ``SERVER_PROTOCOL status``, followed by the
application's headers; no header is added (the connection closes after the
response, which delimits the body).  Headers go out with the first non-empty
body chunk (or with the first ``write()``, or at the end), so an application
that fails before that still gets a clean ``500``.  After the response the
socket is half-closed (the peer sees the end even if a router still holds a
copy of a handed-over client), an unread rest of the declared body is read and
dropped (bounded), and the socket is closed.

*Timeouts.*  Every read and write waits at most ``socket_timeout`` seconds
(uWSGI's ``--socket-timeout``, default 4) for progress, so an idle or stalled
peer cannot hold a worker forever.  ``harakiri`` bounds a whole request: an
``alarm()`` armed for each connection; when it fires the worker logs and exits
with code 9, and the master starts a new one.

*Signals* (installed by :meth:`Worker.serve_forever`, in the main thread of
the worker process): SIGTERM and SIGHUP finish the current request and exit 0;
SIGINT and SIGQUIT exit 0 at once; SIGALRM is harakiri.  Handlers inherited
from the parent (a master's) are reset to the default action, and the worker
takes the signal wakeup descriptor for itself, so that nothing of the master's
signal handling runs in (or is woken by) a worker.
"""

from __future__ import annotations

import importlib
import io
import os
import re
import selectors
import signal
import socket
import sys
import time
import traceback
import types
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

from . import log as _logmod
from .acceptor import BACKOFF, EXHAUSTED, shed_waiting_client
from .fdpass import FdPassError, recv_fds
from .protocol import HeadReader, MalformedVars, PacketTooLarge, parse_vars

__all__ = [
    "AppLoadError",
    "ClientGone",
    "FileWrapper",
    "WsgiInput",
    "Worker",
    "handle_connection",
    "load_application",
    "DEFAULT_BUFFER_SIZE",
    "DEFAULT_SOCKET_TIMEOUT",
    "HARAKIRI_EXIT_CODE",
]

Log = Callable[[str], None]

#: uWSGI's --buffer-size default: the largest vars block a worker accepts.
DEFAULT_BUFFER_SIZE = 4096
#: uWSGI's --socket-timeout default, in seconds.
DEFAULT_SOCKET_TIMEOUT = 4.0
#: The exit code of a worker killed by harakiri (the master respawns it).
HARAKIRI_EXIT_CODE = 9

# modifier1 values served here: 0 (WSGI) and 30 (WSGI, SCRIPT_NAME stripped from PATH_INFO).
_WSGI = 0
_WSGI_STRIP_SCRIPT_NAME = 30
# The uwsgi PING (modifier1 100): answered with uWSGI's PONG, a header with modifier1
# 100 and modifier2 1, then the connection is closed (a router's health check).
_PING = 100
_PONG = b"\x64\x00\x00\x01"

_READ_CHUNK = 65536
# After the response, at most this much unread request body is read and dropped
# before closing (closing with unread data makes the kernel reset the connection,
# which can destroy the response before the peer has read it).
_DRAIN_LIMIT = 1 << 20

_STATUS_RE = re.compile(r"[0-9]{3} [^\x00-\x1f\x7f]*\Z")
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_BAD_VALUE_RE = re.compile(r"[\x00\r\n]")
_PROTOCOL_RE = re.compile(r"[!-~]+\Z")

_ERROR_BODY = b"Internal Server Error\n"


# ---------------------------------------------------------------------------
# Loading the application


class AppLoadError(Exception):
    """The application could not be loaded.

    The message is the log line; when loading raised, the exception is the
    ``__cause__`` and :attr:`detail` holds its formatted traceback.
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


def load_application(*, wsgi_file: Optional[str] = None, module: Optional[str] = None,
                     callable_name: str = "application") -> Callable:
    """Load a WSGI callable the way uWSGI's ``--wsgi-file`` / ``--module`` do.

    ``wsgi_file``: a Python source file (any suffix), executed as a fresh module
    named after its path.  ``module``: ``NAME`` or ``NAME:CALLABLE``, imported
    (the current directory is added to ``sys.path`` if it is not there); a
    ``NAME`` ending in ``.py`` or ``.wsgi`` is loaded as a file.  The callable is
    *callable_name* (uWSGI's ``--callable``) unless ``NAME:CALLABLE`` names one.

    Raises :class:`AppLoadError`, e.g. ``unable to find "application" callable in
    file app.py``; whether that is fatal is the caller's decision (``--need-app``).
    """
    if (wsgi_file is None) == (module is None):
        raise ValueError("give exactly one of wsgi_file and module")
    if module is not None:
        name, sep, attr = module.partition(":")
        if sep and attr:
            callable_name = attr
        if name.endswith((".py", ".wsgi")):
            namespace = _exec_file(name)
            where = "file %s" % name
        else:
            namespace = _import_module(name)
            where = "module %s" % name
    else:
        namespace = _exec_file(wsgi_file)
        where = "file %s" % wsgi_file
    app = getattr(namespace, callable_name, None)
    if app is None:
        raise AppLoadError('unable to find "%s" callable in %s' % (callable_name, where))
    if not callable(app):
        raise AppLoadError('"%s" in %s is not callable' % (callable_name, where))
    return app


def _module_name_for(path: str) -> str:
    return "uwsgi_file_" + re.sub(r"\W", "_", path)


def _exec_file(path: str) -> types.ModuleType:
    try:
        with open(path, "rb") as f:
            source = f.read()
    except OSError as exc:
        raise AppLoadError("failed to open python file %s (%s)" % (path, exc.strerror or exc)) from exc
    name = _module_name_for(path)
    mod = types.ModuleType(name)
    mod.__file__ = path
    previous = sys.modules.get(name)
    sys.modules[name] = mod
    try:
        code = compile(source, path, "exec")
        exec(code, mod.__dict__)
    except BaseException as exc:
        if previous is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous
        if not isinstance(exc, Exception):
            raise
        raise AppLoadError("unable to load app from file %s: %s" % (path, _describe(exc)),
                           traceback.format_exc()) from exc
    return mod


def _import_module(name: str) -> types.ModuleType:
    if not any(entry in ("", ".", os.getcwd()) for entry in sys.path):
        sys.path.insert(0, ".")
    try:
        return importlib.import_module(name)
    except Exception as exc:
        raise AppLoadError("unable to import module %s: %s" % (name, _describe(exc)),
                           traceback.format_exc()) from exc


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return "%s: %s" % (type(exc).__name__, text) if text else type(exc).__name__


# ---------------------------------------------------------------------------
# Request body


class WsgiInput:
    """``wsgi.input``: the request body, at most *length* bytes read from *sock*.

    Reads never ask the socket for more than what is left of the body, so bytes
    after the body stay in the socket and a read never waits for data that is
    not part of the body.  A peer that closes early ends the body early.
    """

    __slots__ = ("_sock", "_remaining", "_buf")

    def __init__(self, sock: socket.socket, length: int) -> None:
        self._sock = sock
        self._remaining = max(0, length)
        self._buf = bytearray()

    @property
    def remaining(self) -> int:
        """Body bytes not yet taken from the socket."""
        return self._remaining

    def _fill(self) -> bool:
        """One ``recv`` into the buffer; False once the body is exhausted."""
        if self._remaining <= 0:
            return False
        data = self._sock.recv(min(self._remaining, _READ_CHUNK))
        if not data:
            self._remaining = 0
            return False
        self._remaining -= len(data)
        self._buf += data
        return True

    def _take(self, n: int) -> bytes:
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def read(self, size: Optional[int] = -1) -> bytes:
        if size is None or size < 0:
            while self._fill():
                pass
            return self._take(len(self._buf))
        while len(self._buf) < size and self._fill():
            pass
        return self._take(size)

    def readline(self, size: Optional[int] = -1) -> bytes:
        limit = -1 if size is None else size
        scanned = 0
        while True:
            pos = self._buf.find(b"\n", scanned)
            if pos >= 0:
                end = pos + 1
                break
            if 0 <= limit <= len(self._buf):
                end = limit
                break
            scanned = len(self._buf)
            if not self._fill():
                end = len(self._buf)
                break
        if 0 <= limit < end:
            end = limit
        return self._take(end)

    def readlines(self, hint: Optional[int] = -1) -> List[bytes]:
        lines = []
        total = 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                return lines

    def __iter__(self) -> "WsgiInput":
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def discard(self, limit: int) -> None:
        """Read and drop up to *limit* bytes of what is left of the body (errors end it)."""
        self._buf = bytearray()
        scratch = bytearray(min(_READ_CHUNK, max(limit, 1)))
        try:
            while self._remaining > 0 and limit > 0:
                n = self._sock.recv_into(scratch, min(self._remaining, limit, len(scratch)))
                if not n:
                    break
                self._remaining -= n
                limit -= n
        except OSError:
            pass


# ---------------------------------------------------------------------------
# Response


class ClientGone(OSError):
    """Writing the response failed: the peer went away or stopped reading."""


class FileWrapper:
    """``wsgi.file_wrapper``: a file-like object sent with ``sendfile`` when it has a
    descriptor, else read in *blksize* blocks."""

    __slots__ = ("filelike", "blksize")

    def __init__(self, filelike: Any, blksize: int = 8192) -> None:
        self.filelike = filelike
        self.blksize = blksize

    def __iter__(self) -> Iterable[bytes]:
        read = self.filelike.read
        while True:
            block = read(self.blksize)
            if not block:
                return
            yield block

    def close(self) -> None:
        close = getattr(self.filelike, "close", None)
        if close is not None:
            close()


def _send_all(sock: socket.socket, *parts: Any) -> None:
    """Send every byte of *parts*; each wait for progress is bounded by the socket timeout."""
    bufs = [memoryview(p).cast("B") for p in parts if len(p)]
    try:
        while bufs:
            sent = sock.sendmsg(bufs)
            while sent:
                first = bufs[0]
                if sent >= len(first):
                    sent -= len(first)
                    del bufs[0]
                else:
                    bufs[0] = first[sent:]
                    sent = 0
    except OSError as exc:
        raise ClientGone(exc.errno, exc.strerror or str(exc) or type(exc).__name__) from exc


class _Response:
    """start_response(), write() and the sending of one response (PEP 3333 rules)."""

    __slots__ = ("sock", "protocol", "status", "headers", "head_sent", "body_bytes")

    def __init__(self, sock: socket.socket, protocol: str) -> None:
        self.sock = sock
        self.protocol = protocol
        self.status: Optional[str] = None
        self.headers: List[Tuple[str, str]] = []
        self.head_sent = False
        self.body_bytes = 0

    def start_response(self, status: str, headers: List[Tuple[str, str]], exc_info: Any = None
                       ) -> Callable[[bytes], None]:
        if exc_info:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response() called a second time without exc_info")
        _check_status(status)
        checked = _check_headers(headers)
        self.status = status
        self.headers = checked
        return self.write

    def _head(self) -> bytes:
        lines = ["%s %s\r\n" % (self.protocol, self.status)]
        lines.extend("%s: %s\r\n" % pair for pair in self.headers)
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    def _send(self, data: Any) -> None:
        if self.status is None:
            raise AssertionError("response body before start_response()")
        if not self.head_sent:
            head = self._head()
            self.head_sent = True          # from here on, no 500 can replace this response
            _send_all(self.sock, head, data)
        else:
            _send_all(self.sock, data)
        self.body_bytes += len(data)

    def write(self, data: bytes) -> None:
        """The write() callable: sends at once (the headers first, if still pending)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("write() takes bytes, not %s" % type(data).__name__)
        self._send(data)

    def send_chunk(self, chunk: Any) -> None:
        """One item of the application's iterable; empty ones send nothing."""
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise TypeError("the application yielded %s, not bytes" % type(chunk).__name__)
        if len(chunk):
            self._send(chunk)

    def send_file(self, wrapper: FileWrapper) -> bool:
        """Send a file_wrapper's file with sendfile; False if it has no usable descriptor."""
        f = wrapper.filelike
        if isinstance(f, io.TextIOBase):
            return False
        try:
            f.fileno()
            offset = f.tell()
        except (AttributeError, OSError, ValueError):
            return False
        self._send(b"")
        try:
            self.body_bytes += self.sock.sendfile(f, offset)
        except OSError as exc:
            raise ClientGone(exc.errno, exc.strerror or str(exc) or type(exc).__name__) from exc
        return True

    def finish(self) -> None:
        """The iterable is exhausted: send the head if no body chunk did."""
        if self.status is None:
            raise AssertionError("the application returned without calling start_response()")
        if not self.head_sent:
            self._send(b"")

    def send_error(self) -> None:
        body = _ERROR_BODY
        head = ("%s 500 Internal Server Error\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n"
                % (self.protocol, len(body))).encode("latin-1")
        self.head_sent = True
        _send_all(self.sock, head, body)


def _check_status(status: Any) -> None:
    if type(status) is not str:
        raise TypeError("status must be str, not %s" % type(status).__name__)
    if not _STATUS_RE.match(status):
        raise ValueError("invalid status %r (want e.g. '200 OK')" % status)
    status.encode("latin-1")


def _check_headers(headers: Any) -> List[Tuple[str, str]]:
    if not isinstance(headers, (list, tuple)):
        raise TypeError("headers must be a list, not %s" % type(headers).__name__)
    checked = []
    for item in headers:
        if not isinstance(item, tuple) or len(item) != 2:
            raise TypeError("a header must be a (name, value) tuple, not %r" % (item,))
        name, value = item
        if type(name) is not str or type(value) is not str:
            raise TypeError("header name and value must be str: %r" % (item,))
        if not _TOKEN_RE.match(name):
            raise ValueError("invalid header name %r" % name)
        if _BAD_VALUE_RE.search(value):
            raise ValueError("invalid character in the value of header %s" % name)
        value.encode("latin-1")
        checked.append((name, value))
    return checked


# ---------------------------------------------------------------------------
# One connection


def handle_connection(conn: socket.socket, app: Callable, *, worker_id: int = 1,
                      buffer_size: int = DEFAULT_BUFFER_SIZE, log: Log = _logmod.log,
                      socket_timeout: Optional[float] = DEFAULT_SOCKET_TIMEOUT) -> None:
    """Serve the one request of an accepted connection, then close it.

    Never raises for anything the peer or the application does; the outcome is
    logged (an application's ``sys.exit()`` is let through).  *socket_timeout*
    bounds every wait for the peer (``None`` or 0: no bound).  *worker_id* is the
    worker's number (1-based); no log line of a single request uses it yet.
    """
    _serve_connection(conn, app, worker_id, buffer_size, log, socket_timeout, None)


def _apply_timeout(sock: socket.socket, timeout: Optional[float]) -> None:
    # Set explicitly: a descriptor passed by a router is non-blocking (a flag of the
    # open file, shared with the router's copy), which a new socket object does not
    # know.  With a timeout it stays non-blocking, as the router wants it.
    sock.settimeout(timeout if timeout else None)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _serve_connection(conn: socket.socket, app: Callable, worker_id: int, buffer_size: int,
                      log: Log, socket_timeout: Optional[float],
                      started: Optional[Callable[[dict], None]]) -> None:
    client: Optional[socket.socket] = None
    try:
        _apply_timeout(conn, socket_timeout)
        head = _read_head(conn, buffer_size, log)
        if head is None:
            return
        modifier1, block, fd = head
        if modifier1 == _PING and fd is None:
            conn.sendall(_PONG)
            return
        sock = conn
        if fd is not None:
            try:
                client = socket.socket(fileno=fd)
            except OSError as exc:
                os.close(fd)
                log("unusable descriptor passed with the request (%s)...skip" % (exc.strerror or exc))
                return
            # Closing the router's connection without a byte tells it we took the client.
            conn.close()
            sock = client
            _apply_timeout(sock, socket_timeout)
        if modifier1 not in (_WSGI, _WSGI_STRIP_SCRIPT_NAME):
            log("-- unavailable modifier requested: %d --" % modifier1)
            return
        try:
            pairs = parse_vars(block)
        except MalformedVars as exc:
            log("invalid uwsgi request (%s)...skip" % exc)
            return
        environ = _make_environ(pairs, modifier1, sock)
        if started is not None:
            started(environ)
        _run_app(app, environ, sock, log)
        _finish(sock, environ["wsgi.input"])
    except Exception:  # a bug here must not take the worker down
        log("unexpected error serving a request:\n" + traceback.format_exc().rstrip("\n"))
    finally:
        conn.close()
        if client is not None:
            client.close()


def _read_head(conn: socket.socket, buffer_size: int, log: Log
               ) -> Optional[Tuple[int, bytes, Optional[int]]]:
    """Read header and vars (nothing more), with room for one passed descriptor.

    Returns ``(modifier1, vars, fd or None)``, or ``None`` after logging why the
    connection is to be dropped (any descriptor received is closed then).
    """
    fds: List[int] = []
    reader = HeadReader(buffer_size)
    try:
        while not reader.complete:
            data, got, _flags = recv_fds(conn, reader.needed, 1)
            fds.extend(got)
            if not data:
                if reader.received:
                    log("incomplete uwsgi request (%d of %d bytes)...skip"
                        % (reader.received, reader.expected))
                return _drop(fds)
            reader.feed(data)
    except PacketTooLarge as exc:
        log("invalid request block size: %d (max %d)...skip" % (exc.datasize, exc.limit))
        return _drop(fds)
    except socket.timeout:
        log("timeout reading the uwsgi request (%d bytes received)...skip" % reader.received)
        return _drop(fds)
    except FdPassError as exc:
        log("invalid uwsgi request (%s)...skip" % exc)
        return _drop(fds)
    except OSError as exc:
        log("error reading the uwsgi request: %s...skip" % (exc.strerror or exc))
        return _drop(fds)
    for extra in fds[1:]:
        _close_fd(extra)
    return reader.modifier1, reader.vars, (fds[0] if fds else None)


def _drop(fds: List[int]) -> None:
    for fd in fds:
        _close_fd(fd)
    return None


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _content_length(value: Optional[str]) -> int:
    """ASCII digits -> their value; anything else (or absurdly long) -> 0."""
    if not value or not (value.isascii() and value.isdigit()):
        return 0
    significant = value.lstrip("0")
    return int(significant or "0") if len(significant) <= 18 else 0


def _url_scheme(environ: dict) -> str:
    scheme = environ.get("UWSGI_SCHEME")
    if scheme:
        return scheme
    if environ.get("HTTPS", "").lower() in ("on", "1"):
        return "https"
    return environ.get("REQUEST_SCHEME") or "http"


def _make_environ(pairs: List[Tuple[bytes, bytes]], modifier1: int, sock: socket.socket) -> dict:
    environ = {key.decode("latin-1"): value.decode("latin-1") for key, value in pairs}
    environ.setdefault("SCRIPT_NAME", "")
    environ.setdefault("PATH_INFO", "")
    if modifier1 == _WSGI_STRIP_SCRIPT_NAME:
        script_name = environ["SCRIPT_NAME"]
        if script_name and environ["PATH_INFO"].startswith(script_name):
            environ["PATH_INFO"] = environ["PATH_INFO"][len(script_name):]
    environ["wsgi.version"] = (1, 0)
    environ["wsgi.url_scheme"] = _url_scheme(environ)
    environ["wsgi.input"] = WsgiInput(sock, _content_length(environ.get("CONTENT_LENGTH")))
    environ["wsgi.errors"] = sys.stderr
    environ["wsgi.multithread"] = False
    environ["wsgi.multiprocess"] = True
    environ["wsgi.run_once"] = False
    environ["wsgi.input_terminated"] = True
    environ["wsgi.file_wrapper"] = FileWrapper
    return environ


def _describe_request(environ: dict) -> str:
    """The request as log text; the client's method and URI with control bytes escaped."""
    return _logmod.printable("%s %s" % (environ.get("REQUEST_METHOD", "-"),
                                        environ.get("REQUEST_URI") or environ.get("PATH_INFO") or "-"))


def _run_app(app: Callable, environ: dict, sock: socket.socket, log: Log) -> None:
    protocol = environ.get("SERVER_PROTOCOL", "")
    if not _PROTOCOL_RE.match(protocol):
        protocol = "HTTP/1.1"
    response = _Response(sock, protocol)
    result = None
    try:
        result = app(environ, response.start_response)
        if type(result) is FileWrapper and response.status is not None and response.send_file(result):
            pass
        else:
            for chunk in result:
                response.send_chunk(chunk)
        response.finish()
    except ClientGone as exc:
        log("error writing the response to %s: %s" % (_describe_request(environ), exc.strerror or exc))
    except Exception:
        log(traceback.format_exc().rstrip("\n"))
        if response.head_sent:
            log("response to %s cut short: the application failed after sending the headers"
                % _describe_request(environ))
        else:
            try:
                response.send_error()
            except ClientGone:
                pass
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log(traceback.format_exc().rstrip("\n"))


def _finish(sock: socket.socket, body: WsgiInput) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return
    if body.remaining:
        body.discard(_DRAIN_LIMIT)


# ---------------------------------------------------------------------------
# The worker process


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass


class Worker:
    """One pre-forked worker: accepts on shared listeners, one request at a time.

    Build it and call :meth:`serve_forever` in the forked child (main thread).
    ``requests`` counts the connections served.  With *parent_pid*, the worker
    also ends (gracefully) when that process is no longer its parent, checked
    every second: a worker must not outlive its master.  *periodic*, if given, is
    called about once a second from the same wake-up (e.g. to watch a trigger file).
    *on_start*, if given, is called once the worker's signal handlers are in place
    (the master unblocks the signals it held across the fork there).
    """

    def __init__(self, listeners: Sequence[Any], app: Callable, *, worker_id: int = 1,
                 harakiri: int = 0, buffer_size: int = DEFAULT_BUFFER_SIZE, log: Log = _logmod.log,
                 socket_timeout: Optional[float] = DEFAULT_SOCKET_TIMEOUT,
                 parent_pid: Optional[int] = None,
                 periodic: Optional[Callable[[], None]] = None,
                 on_start: Optional[Callable[[], None]] = None) -> None:
        # A sockets.Listener is accepted too (its socket is used).
        self.listeners = [getattr(item, "sock", item) for item in listeners]
        self.app = app
        self.worker_id = worker_id
        self.harakiri = int(harakiri)
        self.buffer_size = buffer_size
        self.log = log
        self.socket_timeout = socket_timeout
        self.parent_pid = parent_pid
        self.periodic = periodic
        self.on_start = on_start
        self.requests = 0
        self._stopping = False
        self._pid = os.getpid()
        self._current: Optional[dict] = None
        self._since = 0.0

    # -- signal handlers (run in the main thread, between bytecodes) ---------

    def _on_graceful(self, signum: int, frame: Any) -> None:
        if not self._stopping:
            self._stopping = True
            try:
                self.log("Gracefully killing worker %d (pid: %d)..." % (self.worker_id, self._pid))
            except Exception:
                pass

    def _on_brutal(self, signum: int, frame: Any) -> None:
        _flush_std()
        os._exit(0)

    def _on_harakiri(self, signum: int, frame: Any) -> None:
        try:
            self.log("*** HARAKIRI ON WORKER %d (pid: %d, try: 1) ***" % (self.worker_id, self._pid))
            environ = self._current
            if environ is not None:
                self.log("HARAKIRI [core 0] %s - %s since %d" % (
                    _logmod.printable(environ.get("REMOTE_ADDR", "-")), _describe_request(environ),
                    int(self._since)))
        except Exception:
            pass
        _flush_std()
        os._exit(HARAKIRI_EXIT_CODE)

    def _install_signals(self) -> dict:
        ours = {
            signal.SIGTERM: self._on_graceful,
            signal.SIGHUP: self._on_graceful,
            signal.SIGINT: self._on_brutal,
            signal.SIGQUIT: self._on_brutal,
            signal.SIGALRM: self._on_harakiri if self.harakiri > 0 else signal.SIG_DFL,
        }
        saved = {}
        for signum in signal.valid_signals():
            if signum in ours:
                continue
            try:
                handler = signal.getsignal(signum)
            except (OSError, ValueError):
                continue
            if callable(handler):
                saved[signum] = signal.signal(signum, signal.SIG_DFL)
        for signum, handler in ours.items():
            saved[signum] = signal.signal(signum, handler)
        return saved

    # -- the loop --------------------------------------------------------------

    def serve_forever(self) -> int:
        """Serve until told to stop; returns the process exit code (0 when stopped
        by a signal; an application's ``sys.exit(n)`` gives *n*)."""
        self._pid = os.getpid()
        self._stopping = False
        sel = selectors.DefaultSelector()
        wake_r, wake_w = socket.socketpair()
        saved_signals: dict = {}
        saved_wakeup: Optional[int] = None
        try:
            wake_r.setblocking(False)
            wake_w.setblocking(False)
            saved_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
            saved_signals = self._install_signals()
            if self.on_start is not None:
                self.on_start()
            for listener in self.listeners:
                listener.setblocking(False)
                sel.register(listener, selectors.EVENT_READ)
            sel.register(wake_r, selectors.EVENT_READ)
            return self._loop(sel, wake_r)
        except SystemExit as exc:
            code = exc.code
            if code is None:
                return 0
            if isinstance(code, int):
                return code
            self.log(str(code))
            return 1
        finally:
            signal.alarm(0)
            if saved_wakeup is not None:
                signal.set_wakeup_fd(saved_wakeup)
            for signum, handler in saved_signals.items():
                try:
                    signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
                except (OSError, ValueError, TypeError):
                    pass
            sel.close()
            wake_r.close()
            wake_w.close()

    def _loop(self, sel: selectors.BaseSelector, wake_r: socket.socket) -> int:
        timeout = 1.0 if self.parent_pid is not None or self.periodic is not None else None
        next_periodic = time.monotonic() + 1.0
        while not self._stopping:
            events = sel.select(timeout)
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                self.log("worker %d (pid: %d): parent process %d is gone, exiting"
                         % (self.worker_id, self._pid, self.parent_pid))
                return 0
            if self.periodic is not None and time.monotonic() >= next_periodic:
                next_periodic = time.monotonic() + 1.0
                self.periodic()
            for key, _mask in events:
                if key.fileobj is wake_r:
                    try:
                        while wake_r.recv(4096):
                            pass
                    except OSError:
                        pass
                    continue
                if self._stopping:
                    break
                self._accept(key.fileobj)
        return 0

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, _addr = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another process won the race, or the client gave up: wait again
        except OSError as exc:
            if exc.errno in EXHAUSTED:
                shed_waiting_client(listener, "worker %d" % self.worker_id, exc)
            else:
                self.log("accept(): %s" % (exc.strerror or exc))
            time.sleep(BACKOFF)  # a listener that stays readable must not make the worker spin
            return
        self._since = time.time()
        if self.harakiri > 0:
            signal.alarm(self.harakiri)
        try:
            _serve_connection(conn, self.app, self.worker_id, self.buffer_size, self.log,
                              self.socket_timeout, self._started)
        finally:
            if self.harakiri > 0:
                signal.alarm(0)
            self._current = None
        self.requests += 1

    def _started(self, environ: dict) -> None:
        self._current = environ
