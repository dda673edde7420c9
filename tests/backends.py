"""Recording uwsgi backends for tests (threads; test code only).

A :class:`RecordingBackend` listens on a TCP port (127.0.0.1:0) or a UNIX path,
reads each request's header, vars and body (``CONTENT_LENGTH`` bytes, or until EOF
when ``read_to_eof`` is set) and records them, then answers according to ``mode``:

``"echo"``  an HTTP/1.0 200 response naming the backend, the key vars and the body size;
``"big"``   a response of ``size`` bytes (``PATH_INFO=/bytes/N`` overrides);
``"hang"``  nothing, keeps the connection open until the backend stops;
``"close"`` closes without a byte.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time
from typing import List, Optional

from uwsgi_fastrouter.protocol import parse_vars


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


class Request:
    def __init__(self, header: bytes, vars_block: bytes, body: bytes, peer, half_closed: bool):
        self.modifier1, self.datasize, self.modifier2 = struct.unpack("<BHB", header)
        self.raw = header + vars_block
        self.vars = dict(parse_vars(vars_block))
        self.body = body
        self.peer = peer
        self.half_closed = half_closed


class _ThreadedServer:
    """A listening socket served by a thread; a subclass handles each connection."""

    def _listen(self, unix_path: Optional[str]) -> None:
        self.stopping = threading.Event()
        if unix_path:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(unix_path)
            self.address = unix_path
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(("127.0.0.1", 0))
            self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.sock.listen(128)
        self.sock.settimeout(0.2)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, peer = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self._accepted(conn, peer)

    def _accepted(self, conn: socket.socket, peer) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class RecordingBackend(_ThreadedServer):
    def __init__(self, name: str = "node", mode: str = "echo", unix_path: Optional[str] = None,
                 size: int = 0, read_to_eof: bool = False):
        self.name = name
        self.mode = mode
        self.size = size
        self.read_to_eof = read_to_eof
        self.requests: List[Request] = []
        self.lock = threading.Lock()
        self.open_conns: List[socket.socket] = []
        self.accept_times: List[float] = []
        self._listen(unix_path)

    def stop(self) -> None:
        super().stop()
        for conn in self.open_conns:
            try:
                conn.close()
            except OSError:
                pass

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def _accepted(self, conn: socket.socket, peer) -> None:
        self.accept_times.append(time.monotonic())
        threading.Thread(target=self._handle, args=(conn, peer), daemon=True).start()

    def _handle(self, conn: socket.socket, peer) -> None:
        conn.settimeout(10)
        try:
            header = recv_exact(conn, 4)
            if len(header) < 4:
                conn.close()
                return
            datasize = header[1] | (header[2] << 8)
            vars_block = recv_exact(conn, datasize)
            env = dict(parse_vars(vars_block))
            half_closed = False
            if self.read_to_eof:
                chunks = []
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        half_closed = True
                        break
                    chunks.append(chunk)
                body = b"".join(chunks)
            else:
                length = int(env.get(b"CONTENT_LENGTH", b"0") or 0)
                body = recv_exact(conn, length)
            request = Request(header, vars_block, body, peer, half_closed)
            with self.lock:
                self.requests.append(request)
            self._answer(conn, request)
        except OSError:
            pass
        finally:
            if self.mode != "hang":
                try:
                    conn.close()
                except OSError:
                    pass

    def _answer(self, conn: socket.socket, request: Request) -> None:
        mode = self.mode
        if mode == "hang":
            self.open_conns.append(conn)
            return
        if mode == "close":
            return
        path = request.vars.get(b"PATH_INFO", b"/")
        if mode == "big" or path.startswith(b"/bytes/"):
            size = int(path[7:]) if path.startswith(b"/bytes/") else self.size
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            block = bytes(range(256)) * 256
            left = size
            while left > 0:
                piece = block[:min(left, len(block))]
                conn.sendall(piece)
                left -= len(piece)
            return
        body = ("node=%s host=%s key=%s len=%d sha1=%s" % (
            self.name,
            request.vars.get(b"HTTP_HOST", b"").decode(),
            request.vars.get(b"UWSGI_FASTROUTER_KEY", b"").decode(),
            len(request.body),
            hashlib.sha1(request.body).hexdigest(),
        )).encode()
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body)


def uwsgi_packet(pairs, modifier1: int = 0, modifier2: int = 0) -> bytes:
    block = b"".join(struct.pack("<H", len(k)) + k + struct.pack("<H", len(v)) + v for k, v in pairs)
    return struct.pack("<BHB", modifier1, len(block), modifier2) + block


def connect(address: str, timeout: float = 10.0) -> socket.socket:
    if ":" in address and not address.startswith("/"):
        host, port = address.rsplit(":", 1)
        sock = socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        target = address
        if address.startswith("@"):
            target = "\0" + address[1:] + "\0"
        sock.connect(target)
    return sock


def request(address: str, pairs, body: bytes = b"", modifier1: int = 0, modifier2: int = 0,
            timeout: float = 10.0, half_close: bool = False) -> bytes:
    """Send one uwsgi request and read the answer to EOF."""
    with connect(address, timeout) as sock:
        sock.sendall(uwsgi_packet(pairs, modifier1, modifier2) + body)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_answer(sock)


def read_answer(sock: socket.socket) -> bytes:
    """Everything *sock* receives until EOF (a reset ends it too)."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def fd_count(pid: int) -> int:
    return len(os.listdir("/proc/%d/fd" % pid))


class FdTakingBackend(_ThreadedServer):
    """A UNIX-socket node that takes a passed client descriptor (SCM_RIGHTS) and
    answers the client on it directly, naming the client's address as it sees it;
    without a descriptor it answers on the router's connection (marked "relayed").

    ``take=False`` makes it a node that ignores descriptors, as a uWSGI 2.0 node
    does: a passed one is closed unread and the answer goes to the router.  While
    ``hold`` is true, the router's connection of a taken client is kept open (until
    stop) instead of being closed as the verdict."""

    def __init__(self, unix_path: str, take: bool = True):
        from uwsgi_fastrouter.fdpass import recv_fds
        self._recv_fds = recv_fds
        self.take = take
        self.hold = False
        self.held: List[socket.socket] = []
        self.taken = 0
        self.relayed = 0
        self.ancillary_seen = 0
        self._listen(unix_path)

    def stop(self) -> None:
        super().stop()
        for conn in self.held:
            conn.close()

    def _accepted(self, conn: socket.socket, peer) -> None:
        conn.settimeout(10)
        try:
            if self._handle(conn):
                return
        except OSError:
            pass
        conn.close()

    def _handle(self, conn: socket.socket) -> bool:
        """Serve one request; True when *conn* is held open (in ``held``).

        Counts and holds before the client's copy is closed: a test that sees the
        answer end may read the counters at once."""
        data, fds, _flags = self._recv_fds(conn, 4, 4)
        if fds:
            self.ancillary_seen += 1
        head = data + recv_exact(conn, 4 - len(data))
        datasize = head[1] | (head[2] << 8)
        recv_exact(conn, datasize)
        if fds and not self.take:
            for fd in fds:
                os.close(fd)
            fds = []
        if fds:
            client = socket.socket(fileno=fds[0])
            for extra in fds[1:]:
                os.close(extra)
            hold = self.hold   # else the router's connection is closed without a byte
            self.taken += 1
            if hold:
                self.held.append(conn)
            with client:
                peer = client.getpeername()
                client.sendall(b"HTTP/1.0 200 OK\r\n\r\ntaken peer=%s:%d" % (peer[0].encode(), peer[1]))
            return hold
        self.relayed += 1
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nrelayed")
        return False
