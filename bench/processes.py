"""Start, watch and stop the benchmark's processes, and talk uwsgi to them.

Theory of operation: every child is started with PR_SET_PDEATHSIG, so it goes
away if the driver itself dies, and stopped by PID: the chosen signal to the
process we started, a bounded wait, then SIGKILL to whatever is left of the
tree recorded just before the signal (each pid checked against its start time
so a recycled pid is never hit).  Output lines are read from pipes with a
deadline, never with an unbounded blocking read.

Pinning (``PIN=1`` in the environment, as in the shared harness, or ``bench.py
--pin``): the load side (the load generator and the backends, by their names)
runs on every CPU but the last, everything else (the routers under test) on the
last one, so the routers never compete with the load for a CPU.  On a 2-CPU box
that puts every router process on one CPU: several router processes then share
it and cannot add throughput, only show what they cost.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import shlex
import signal
import socket
import struct
import subprocess
import time
from typing import Dict, List, Mapping, Optional, Sequence, Set

import proctree

_PR_SET_PDEATHSIG = 1


def _child_setup(death_signal: int, cpus: Optional[Set[int]] = None) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if cpus:
        os.sched_setaffinity(0, cpus)


def _load_side(name: str) -> bool:
    """The programs that make the load (not the ones under test)."""
    return name == "loadgen" or name.endswith("backend")


def pinned() -> bool:
    return os.environ.get("PIN", "0") not in ("", "0")


def pin_cpus(name: str) -> Optional[Set[int]]:
    """The CPUs the program *name* is pinned to (see the module doc), or None."""
    if not pinned():
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return set(cpus[:-1]) if _load_side(name) else {cpus[-1]}


def pin_note() -> str:
    """One line saying how the programs are placed, for a report."""
    if not pinned() or pin_cpus("router") is None:
        return "not pinned (every program on every CPU)"
    return "pinned: routers on CPU %s, load generator and backend on CPU(s) %s" % (
        ",".join(map(str, sorted(pin_cpus("router")))), ",".join(map(str, sorted(pin_cpus("loadgen")))))


class Child:
    """One started process: its argv, Popen object and log file."""

    def __init__(self, name: str, argv: Sequence[str], popen: subprocess.Popen, log_path: Optional[str]):
        self.name = name
        self.argv = list(argv)
        self.popen = popen
        self.pid = popen.pid
        self.log_path = log_path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        if not self.log_path:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                data = f.read()[-8192:]
        except OSError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def spawn(
    name: str,
    argv: Sequence[str],
    log_path: Optional[str] = None,
    cwd: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
    stdout_pipe: bool = False,
    stdin_pipe: bool = False,
    death_signal: int = signal.SIGTERM,
) -> Child:
    """Start ``argv``; stderr (and stdout unless piped) go to ``log_path``."""
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        popen = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else log,
            stderr=log,
            preexec_fn=lambda cpus=pin_cpus(name): _child_setup(death_signal, cpus),
            close_fds=True,
        )
    finally:
        if log_path:
            log.close()
    return Child(name, argv, popen, log_path)


def stop(child: Child, sig: int = signal.SIGINT, grace: float = 6.0) -> int:
    """Send ``sig`` to the child, wait up to ``grace`` s, then SIGKILL its leftovers by PID.

    Returns how many processes had to be killed that way.
    """
    tree = proctree.snapshot_pids(child.pid)
    if child.alive():
        try:
            os.kill(child.pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if child.popen.poll() is not None and not _survivors(tree, skip=child.pid):
            break
        time.sleep(0.02)
    killed = 0
    for pid, _ in _survivors(tree, skip=-1):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    try:
        child.popen.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    for stream in (child.popen.stdin, child.popen.stdout):
        if stream:
            try:
                stream.close()
            except OSError:
                pass
    return killed


def _survivors(tree: List[tuple], skip: int) -> List[tuple]:
    out = []
    for pid, st in tree:
        if pid == skip:
            continue
        if proctree.start_time(pid) == st:
            fields = proctree.stat_fields(pid)
            if fields and fields[0] != "Z":
                out.append((pid, st))
    return out


class LineReader:
    """Read lines from a child's stdout pipe with a deadline."""

    def __init__(self, child: Child):
        self.child = child
        self.fd = child.popen.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buf = b""
        self.eof = False
        self.lines: List[str] = []

    def next_line(self, timeout: float) -> Optional[str]:
        deadline = time.monotonic() + timeout
        sel = selectors.DefaultSelector()
        sel.register(self.fd, selectors.EVENT_READ)
        try:
            while True:
                nl = self.buf.find(b"\n")
                if nl >= 0:
                    line = self.buf[:nl].decode("utf-8", "replace")
                    self.buf = self.buf[nl + 1:]
                    self.lines.append(line)
                    return line
                if self.eof:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                if sel.select(left):
                    try:
                        data = os.read(self.fd, 65536)
                    except BlockingIOError:
                        continue
                    if not data:
                        self.eof = True
                    self.buf += data
        finally:
            sel.close()

    def wait_for(self, prefix: str, timeout: float) -> Optional[str]:
        """The next line starting with ``prefix`` (others are kept in ``lines``), or None."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.next_line(max(0.0, deadline - time.monotonic()))
            if line is None:
                return None
            if line.startswith(prefix):
                return line


def spawn_listening(name: str, argv: Sequence[str], log_path: str, timeout: float = 10.0) -> tuple:
    """Start a bench program that prints ``LISTEN ADDR`` once it listens (``backend``).

    Returns ``(child, ADDR)``; raises RuntimeError with the log tail if no such line comes."""
    child = spawn(name, argv, log_path, stdout_pipe=True, death_signal=signal.SIGKILL)
    line = LineReader(child).wait_for("LISTEN ", timeout)
    if not line:
        stop(child)
        raise RuntimeError("%s did not start:\n%s" % (name, child.log_tail()))
    return child, line.split(None, 1)[1]


def parse_kv(line: str) -> Dict[str, str]:
    """``RESULT a=1 b=2`` -> {'a': '1', 'b': '2'}."""
    out = {}
    for tok in line.split()[1:]:
        if "=" in tok:
            k, v = tok.split("=", 1)
            out[k] = v
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (also of TIME_WAIT leftovers)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))  # no SO_REUSEADDR: a port with TIME_WAIT sockets is refused
        return s.getsockname()[1]
    finally:
        s.close()


def uwsgi_request(host: str = "localhost", path: str = "/") -> bytes:
    pairs = [
        (b"REQUEST_METHOD", b"GET"),
        (b"PATH_INFO", path.encode()),
        (b"SERVER_PROTOCOL", b"HTTP/1.1"),
        (b"HTTP_HOST", host.encode()),
    ]
    body = b"".join(struct.pack("<H", len(k)) + k + struct.pack("<H", len(v)) + v for k, v in pairs)
    return struct.pack("<BHB", 0, len(body), 0) + body


def exchange(port: int, request: bytes, timeout: float = 10.0, limit: int = 0) -> bytes:
    """Send *request* to 127.0.0.1:*port* on a new connection and read the answer to EOF
    (or to *limit* bytes, when given).  OSError when the connection fails."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(request)
        data = b""
        while not limit or len(data) < limit:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def is_http_200(data: bytes) -> bool:
    """Whether an answer is an HTTP 200 response."""
    return data.startswith(b"HTTP/1.") and data[9:12] == b"200"


def probe(port: int, timeout: float = 2.0, host: str = "localhost") -> bool:
    """One uwsgi request to 127.0.0.1:port; True if an HTTP 200 came back before EOF."""
    try:
        return is_http_200(exchange(port, uwsgi_request(host), timeout, limit=65536))
    except OSError:
        return False


def wait_serving(child: Child, port: int, timeout: float, host: str = "localhost") -> bool:
    """Poll with probe() until the child serves a request, dies, or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            return False
        if probe(port, timeout=1.0, host=host):
            return True
        time.sleep(0.05)
    return False


def expand(template: str, values: Mapping[str, str]) -> List[str]:
    """Fill ``{name}`` placeholders (values are shell-quoted) and split like a shell would."""
    quoted = {k: shlex.quote(v) for k, v in values.items()}
    return shlex.split(template.format(**quoted))
