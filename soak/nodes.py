"""The nodes of the soak: in-process Python nodes, this package's workers, real uWSGI.

Theory of operation
-------------------
Every node serves the same four paths, so the load generator does not care which
node the router picked:

``/small``        a short JSON answer naming the node;
``/upload``       reads ``CONTENT_LENGTH`` bytes and answers their length and SHA-256;
``/download/N``   answers the first N bytes of :data:`PAYLOAD_SEED`'s SHAKE-256 stream;
``/stream/S``     answers one line a second for S seconds, then ``END``.

Every answer carries ``X-Node: NAME`` and every stream's first line names the node, so
a response that breaks off still tells which node it came from.

:class:`PyNode` is a threaded uwsgi server inside the soak process, on a fresh loopback
port at each start, that announces itself with subscription datagrams every few
seconds.  :class:`ProcNode` runs ``python3 -m uwsgi_fastrouter --socket`` workers or a
real uWSGI 2.0 server on a UNIX socket, announcing themselves with ``--subscribe-to``.
``kill()`` is abrupt (SIGKILL, or every open connection reset); ``stop()`` is graceful.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import sys
import threading
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import support  # noqa: E402  (tests/support.py: processes, uwsgi client)
from uwsgi_fastrouter.protocol import parse_vars  # noqa: E402
from uwsgi_fastrouter.subscription import build_announcement  # noqa: E402

PAYLOAD_SEED = b"uwsgi-fastrouter"
KEY = "soak.test"
ANNOUNCE_EVERY = 3.0

APP_SOURCE = '''\
import hashlib
import json
import time

NODE = {node!r}


def application(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path.startswith("/download/"):
        size = int(path.rsplit("/", 1)[1])
        data = hashlib.shake_256({seed!r}).digest(size) if size else b""
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(len(data))), ("X-Node", NODE)])
        return [data]
    if path.startswith("/stream/"):
        seconds = int(path.rsplit("/", 1)[1])
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-Node", NODE)])

        def lines():
            yield ("node=%s\\n" % NODE).encode()
            for i in range(seconds):
                time.sleep(1.0)
                yield ("tick %d\\n" % i).encode()
            yield b"END\\n"
        return lines()
    stream = environ["wsgi.input"]
    remaining = int(environ.get("CONTENT_LENGTH") or 0)
    digest = hashlib.sha256()
    got = 0
    while remaining > 0:
        chunk = stream.read(min(remaining, 65536))
        if not chunk:
            break
        digest.update(chunk)
        got += len(chunk)
        remaining -= len(chunk)
    out = json.dumps({{"node": NODE, "length": got, "sha256": digest.hexdigest()}}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(out))), ("X-Node", NODE)])
    return [out]
'''


def payload(n: int) -> bytes:
    return hashlib.shake_256(PAYLOAD_SEED).digest(n) if n else b""


# ---------------------------------------------------------------------------
# In-process Python node

class PyNode:
    """A threaded uwsgi node on 127.0.0.1 that subscribes by datagram."""

    def __init__(self, name: str, subscription_servers: Sequence[Tuple[str, int]],
                 big: bytes) -> None:
        self.name = name
        self.servers = list(subscription_servers)
        self.big = big                        # the payload prefix source (shared, read-only)
        self.kind = "python"
        self.address = ""
        self.sock: Optional[socket.socket] = None
        self.conns: set = set()
        self.lock = threading.Lock()
        self.gone = threading.Event()
        self.gone.set()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(256)
        sock.settimeout(0.2)
        self.sock = sock
        self.address = "127.0.0.1:%d" % sock.getsockname()[1]
        gone = self.gone = threading.Event()
        threading.Thread(target=self._accept_loop, args=(sock, gone), daemon=True,
                         name="node-%s" % self.name).start()
        threading.Thread(target=self._announce_loop, args=(gone,), daemon=True,
                         name="announce-%s" % self.name).start()

    def alive(self) -> bool:
        return not self.gone.is_set()

    def _announce(self, unsubscribe: bool = False) -> None:
        packet = build_announcement(KEY.encode(), self.address.encode(), unsubscribe=unsubscribe)
        for server in self.servers:
            try:
                self.udp.sendto(packet, server)
            except OSError:
                pass

    def _announce_loop(self, gone: threading.Event) -> None:
        while not gone.is_set():
            self._announce()
            gone.wait(ANNOUNCE_EVERY)

    def _accept_loop(self, sock: socket.socket, gone: threading.Event) -> None:
        while not gone.is_set():
            try:
                conn, _ = sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def kill(self) -> None:
        """Die abruptly: stop announcing, close the listener, reset every open connection."""
        self.gone.set()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        with self.lock:
            conns, self.conns = list(self.conns), set()
        for conn in conns:
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                conn.close()
            except OSError:
                pass

    def stop(self) -> None:
        """Leave gracefully: unsubscribe, stop accepting, let open requests finish."""
        self.gone.set()
        self._announce(unsubscribe=True)
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    # -- serving ----------------------------------------------------------

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(120)
        try:
            head = support_recv_exact(conn, 4)
            if len(head) < 4:
                return
            datasize = head[1] | (head[2] << 8)
            env = dict(parse_vars(support_recv_exact(conn, datasize)))
            path = env.get(b"PATH_INFO", b"/").decode("latin-1")
            if path.startswith("/download/"):
                self._download(conn, int(path.rsplit("/", 1)[1]))
            elif path.startswith("/stream/"):
                self._stream(conn, int(path.rsplit("/", 1)[1]))
            else:
                self._consume(conn, int(env.get(b"CONTENT_LENGTH", b"0") or 0))
        except (OSError, ValueError):
            pass
        finally:
            with self.lock:
                self.conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def _head(self, length: Optional[int], ctype: str) -> bytes:
        lines = ["HTTP/1.1 200 OK", "Content-Type: %s" % ctype, "X-Node: %s" % self.name]
        if length is not None:
            lines.append("Content-Length: %d" % length)
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def _download(self, conn: socket.socket, size: int) -> None:
        conn.sendall(self._head(size, "application/octet-stream"))
        view = memoryview(self.big)[:size]
        for offset in range(0, size, 1 << 20):
            conn.sendall(view[offset:offset + (1 << 20)])

    def _stream(self, conn: socket.socket, seconds: int) -> None:
        conn.sendall(self._head(None, "text/plain") + ("node=%s\n" % self.name).encode())
        tick = threading.Event()
        for i in range(seconds):
            tick.wait(1.0)
            conn.sendall(b"tick %d\n" % i)
        conn.sendall(b"END\n")

    def _consume(self, conn: socket.socket, length: int) -> None:
        digest = hashlib.sha256()
        got = 0
        while got < length:
            chunk = conn.recv(min(length - got, 262144))
            if not chunk:
                break
            digest.update(chunk)
            got += len(chunk)
        body = json.dumps({"node": self.name, "length": got, "sha256": digest.hexdigest()}).encode()
        conn.sendall(self._head(len(body), "application/json") + body)


def support_recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


# ---------------------------------------------------------------------------
# Nodes in their own processes

class ProcNode:
    """This package's ``--socket`` workers (kind ``own``) or a real uWSGI server
    (kind ``uwsgi``) on a UNIX socket, subscribing to every subscription server."""

    def __init__(self, name: str, kind: str, directory: Path,
                 subscription_servers: Sequence[Tuple[str, int]]) -> None:
        self.name = name
        self.kind = kind
        self.directory = directory
        self.servers = ["%s:%d" % s for s in subscription_servers]
        self.proc: Optional[support.Proc] = None
        self.address = support.sock_path(directory, "%s.sock" % name)
        self.app = directory / ("%s_app.py" % name)
        self.app.write_text(APP_SOURCE.format(node=name, seed=PAYLOAD_SEED))
        self.logs: List[str] = []

    def _argv(self) -> List[str]:
        subs: List[str] = []
        for server in self.servers:
            subs += ["--subscribe-to", "%s:%s" % (server, KEY)]
        common = ["--socket", self.address, "--wsgi-file", str(self.app), "--processes", "3",
                  "--socket-timeout", "120", "--subscribe-freq", "3"] + subs
        if self.kind == "uwsgi":
            return [support.uwsgi_bin(), "--master", "--die-on-term", "--need-app",
                    "--disable-logging"] + common
        return [sys.executable, "-m", "uwsgi_fastrouter", "--master"] + common

    def start(self) -> None:
        try:
            os.unlink(self.address)
        except FileNotFoundError:
            pass
        env = support._child_env(None, pythonpath=(self.kind == "own"))
        self.proc = support.Proc(self._argv(), cwd=self.directory, env=env,
                                 name="%s-%s" % (self.kind, self.name))
        self.proc.wait_for_log(r"spawned uWSGI worker 3 ", timeout=60)
        support.wait_until(lambda: support._can_connect(self.address), timeout=60,
                           what="node %s to accept" % self.name)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def _finish(self, sig: int) -> None:
        if self.proc is None:
            return
        self.proc.stop(sig, timeout=15)
        self.logs.append(self.proc.log())
        self.proc = None

    def kill(self) -> None:
        self._finish(signal.SIGKILL)

    def stop(self) -> None:
        # uWSGI with --die-on-term shuts down on SIGTERM; this package on SIGINT.
        self._finish(signal.SIGTERM if self.kind == "uwsgi" else signal.SIGINT)
