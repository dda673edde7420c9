"""The clients of the soak: each one request, each returning a :class:`Result`.

Theory of operation
-------------------
A client kind is a function ``(router_address, stop) -> Result``.  It opens one
connection, sends one uwsgi request (head and body, at its own pace), reads the
answer (at its own pace) until EOF and checks it: status 200, complete, the right
bytes.  Any failure is one of five causes:

``refused``        the connect failed;
``reset``          a reset or broken pipe while sending or reading;
``timeout``        the client's own deadline passed;
``empty``          EOF before the first byte of an answer;
``short/corrupt``  an answer that is not a complete, correct 200.

The node that answered is taken from ``X-Node`` (or a stream's first line), even from
a broken-off answer, so a failure can be matched with that node's death.

:func:`bad_packet` sends one malformed request and reports what the router did with
it (closed, answered, still open); :func:`bad_datagram` sends one malformed
subscription datagram.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import socket
import struct
import time
from typing import Callable, Optional, Tuple

import nodes
import support

KEY = nodes.KEY
NODE_RE = re.compile(rb"X-Node: ([A-Za-z0-9_-]+)|node=([A-Za-z0-9_-]+)")


class Result:
    __slots__ = ("kind", "router", "start", "end", "ok", "cause", "detail", "node")

    def __init__(self, kind: str, router: str, start: float) -> None:
        self.kind = kind
        self.router = router
        self.start = start
        self.end = start
        self.ok = False
        self.cause = ""
        self.detail = ""
        self.node: Optional[str] = None


class Failed(Exception):
    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(detail)
        self.cause = cause
        self.detail = detail


class Conn:
    """One blocking client connection with an overall deadline."""

    def __init__(self, address: str, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        self.received = bytearray()
        try:
            self.sock = support.connect(address, timeout=min(timeout, 10.0))
        except socket.timeout:
            raise Failed("timeout", "connect timed out")
        except OSError as exc:
            raise Failed("refused", "connect: %s" % exc)

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Failed("timeout", "deadline passed after %d bytes received" % len(self.received))
        return left

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            self.sock.settimeout(min(self._left(), 5.0))
            try:
                sent = self.sock.send(view[:1 << 20])
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise Failed("reset", "send: %s" % exc)
            view = view[sent:]

    def recv(self, n: int = 262144) -> bytes:
        """Up to *n* bytes; b"" at EOF."""
        while True:
            self.sock.settimeout(min(self._left(), 5.0))
            try:
                data = self.sock.recv(n)
            except socket.timeout:
                continue
            except ConnectionResetError as exc:
                raise Failed("reset", "recv after %d bytes: %s" % (len(self.received), exc))
            self.received += data
            return data

    def read_all(self, chunk: int = 262144, keep: int = 1 << 20) -> int:
        """Read to EOF, keeping the first *keep* bytes; returns how many arrived."""
        total = len(self.received)
        while True:
            data = self.recv(chunk)
            if not data:
                return total
            total += len(data)
            if len(self.received) > keep:
                del self.received[keep:]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def head_vars(path: str, method: str = "GET", length: int = 0) -> bytes:
    return support.uwsgi_packet(support.request_vars(KEY, path=path, method=method,
                                                     body_length=length))


def _node_of(raw: bytes) -> Optional[str]:
    m = NODE_RE.search(raw[:4096])
    if not m:
        return None
    return (m.group(1) or m.group(2)).decode()


def _split(raw: bytes) -> Tuple[int, bytes]:
    if not raw:
        raise Failed("empty", "EOF before any byte")
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise Failed("short/corrupt", "incomplete head: %r" % raw[:80])
    first = head.split(b"\r\n", 1)[0].split()
    if len(first) < 2 or not first[1].isdigit():
        raise Failed("short/corrupt", "not HTTP: %r" % raw[:80])
    return int(first[1]), body


def run(kind: str, router: str, address: str, body: Callable[[Result], None]) -> Result:
    """Run one client *body* and turn its exceptions into a classified Result."""
    result = Result(kind, router, time.monotonic())
    try:
        body(result)
        result.ok = True
    except Failed as exc:
        result.cause, result.detail = exc.cause, exc.detail
    except socket.timeout as exc:
        result.cause, result.detail = "timeout", str(exc)
    except (BrokenPipeError, ConnectionResetError) as exc:
        result.cause, result.detail = "reset", str(exc)
    except OSError as exc:
        result.cause, result.detail = "reset", "%r" % exc
    result.end = time.monotonic()
    return result


# ---------------------------------------------------------------------------
# Well-behaved clients

def small(router: str, address: str) -> Result:
    def body(r: Result) -> None:
        c = Conn(address, 30)
        try:
            c.send(head_vars("/small"))
            c.read_all()
            r.node = _node_of(bytes(c.received))
            status, text = _split(bytes(c.received))
            if status != 200 or b'"length": 0' not in text:
                raise Failed("short/corrupt", "status %d body %r" % (status, text[:80]))
        finally:
            c.close()
    return run("small", router, address, body)


def upload(router: str, address: str, data: bytes, digest: str, kind: str = "upload 64M",
           pace: Optional[Tuple[int, float]] = None, timeout: float = 240) -> Result:
    """POST *data*; *pace* = (bytes per send, seconds between sends) trickles it."""
    def body(r: Result) -> None:
        c = Conn(address, timeout)
        try:
            c.send(head_vars("/upload", "POST", len(data)))
            if pace is None:
                c.send(data)
            else:
                step, pause = pace
                for offset in range(0, len(data), step):
                    c.send(data[offset:offset + step])
                    time.sleep(pause)   # the client's pace, not synchronisation
            c.read_all()
            r.node = _node_of(bytes(c.received))
            status, text = _split(bytes(c.received))
            try:
                doc = json.loads(text.decode())
            except ValueError:
                raise Failed("short/corrupt", "status %d, not JSON: %r" % (status, text[:80]))
            if status != 200 or doc.get("length") != len(data) or doc.get("sha256") != digest:
                raise Failed("short/corrupt", "status %d node saw %s bytes" % (status, doc.get("length")))
        finally:
            c.close()
    return run(kind, router, address, body)


def download(router: str, address: str, size: int, digest: str, kind: str = "download 64M",
             slow_bytes: int = 0, stall: float = 0.0, timeout: float = 240) -> Result:
    """GET *size* bytes; read the first *slow_bytes* one byte per recv (1 ms apart),
    or stall *stall* seconds before reading anything."""
    def body(r: Result) -> None:
        c = Conn(address, timeout)
        try:
            c.send(head_vars("/download/%d" % size))
            if stall:
                time.sleep(stall)   # a client that does not read: the point of the test
            for _ in range(slow_bytes):
                if not c.recv(1):
                    break
                time.sleep(0.001)   # the client's pace
            head_end = -1
            hasher = hashlib.sha256()
            total = 0
            while True:
                raw = bytes(c.received)
                if head_end < 0:
                    head_end = raw.find(b"\r\n\r\n")
                    if head_end >= 0:
                        r.node = _node_of(raw)
                        hasher.update(raw[head_end + 4:])
                        total = len(raw) - head_end - 4
                        status, _ = _split(raw)
                        if status != 200:
                            raise Failed("short/corrupt", "status %d" % status)
                        del c.received[:]
                data = c.recv(262144)
                if not data:
                    break
                if head_end >= 0:
                    hasher.update(data)
                    total += len(data)
                    del c.received[:]
            if head_end < 0:
                _split(bytes(c.received))
            if total != size or hasher.hexdigest() != digest:
                raise Failed("short/corrupt", "%d of %d bytes, hash %s" % (
                    total, size, "ok" if hasher.hexdigest() == digest else "wrong"))
        finally:
            c.close()
    return run(kind, router, address, body)


def stream(router: str, address: str, seconds: int) -> Result:
    def body(r: Result) -> None:
        c = Conn(address, seconds + 60)
        try:
            c.send(head_vars("/stream/%d" % seconds))
            try:
                c.read_all(chunk=4096)
            finally:
                r.node = _node_of(bytes(c.received))
            status, text = _split(bytes(c.received))
            ticks = text.count(b"tick ")
            if status != 200 or ticks != seconds or not text.endswith(b"END\n"):
                raise Failed("short/corrupt", "status %d, %d of %d ticks" % (status, ticks, seconds))
        finally:
            c.close()
    return run("stream 20-40 s", router, address, body)


# ---------------------------------------------------------------------------
# Hostile clients

BAD_KINDS = ("garbage head", "truncated vars", "oversize datasize", "empty key", "unknown key 64K")


def _bad_bytes(kind: str, rng: random.Random) -> Tuple[bytes, bool]:
    """(bytes, complete): a complete packet must be closed by the router promptly."""
    if kind == "garbage head":
        size = rng.randint(1, 2048)
        return struct.pack("<BHB", rng.randint(0, 255), size, rng.randint(0, 255)) + os.urandom(size), True
    if kind == "truncated vars":
        good = support.uwsgi_packet(support.request_vars(KEY))[4:]
        block = good + struct.pack("<H", 4) + b"HOST" + struct.pack("<H", 5000) + b"short"
        return struct.pack("<BHB", 0, len(block), 0) + block, True
    if kind == "oversize datasize":
        # 65535 announced, 300 sent, then the client goes away
        return struct.pack("<BHB", 0, 65535, 0) + os.urandom(300), False
    if kind == "empty key":
        block = struct.pack("<H", 0) + struct.pack("<H", 3) + b"abc"
        return struct.pack("<BHB", 0, len(block), 0) + block, True
    # a well-formed head of 64 KiB for a key nobody serves
    pairs = support.request_vars("nobody-%d.invalid" % rng.randint(0, 9),
                                 extra=[("HTTP_X_PAD", "x" * 65000)])
    return support.uwsgi_packet(pairs), True


def bad_packet(address: str, kind: str, rng: random.Random) -> str:
    """Send one bad packet; the router's reaction: closed / answered / open / refused."""
    data, complete = _bad_bytes(kind, rng)
    try:
        sock = support.connect(address, timeout=10)
    except OSError:
        return "connect failed"
    try:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return "closed"
        if not complete:
            return "client left"
        sock.settimeout(10)
        try:
            got = sock.recv(4096)
        except socket.timeout:
            return "still open after 10 s"
        except ConnectionResetError:
            return "closed"
        return "closed" if not got else "answered %r" % got[:40]
    finally:
        sock.close()


DGRAM_KINDS = ("random bytes", "truncated subscription", "bad modifier", "junk key")


def bad_datagram(server: Tuple[str, int], kind: str, rng: random.Random, udp: socket.socket) -> None:
    from uwsgi_fastrouter.subscription import build_announcement
    if kind == "random bytes":
        data = os.urandom(rng.randint(0, 1500))
    elif kind == "truncated subscription":
        full = build_announcement(KEY.encode(), b"127.0.0.1:1")
        data = full[:rng.randint(1, len(full) - 1)]
    elif kind == "bad modifier":
        full = build_announcement(b"junk.invalid", b"127.0.0.1:1")
        data = bytes([rng.randint(0, 255)]) + full[1:3] + bytes([rng.randint(0, 255)]) + full[4:]
    else:
        # a well-formed announce of a node nobody runs, under one of a few junk keys
        data = build_announcement(b"junk%d.invalid" % rng.randint(0, 9),
                                  b"127.0.0.1:%d" % rng.randint(1, 65535))
    try:
        udp.sendto(data, server)
    except OSError:
        pass


def stats_ok(address: str) -> Tuple[bool, int, str]:
    """(ok, nodes seen for the soak key, error) for one stats document."""
    try:
        doc = support.fetch_stats(address, timeout=10)
    except Exception as exc:   # any failure to read or parse is a stats failure
        return False, 0, "%s: %s" % (type(exc).__name__, exc)
    count = 0
    for pool in doc.get("subscriptions", []) or []:
        if isinstance(pool, dict) and pool.get("key") == KEY:
            count = len(pool.get("nodes", []) or [])
    return True, count, ""

