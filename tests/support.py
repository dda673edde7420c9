"""Test support: start real processes, talk uwsgi and HTTP to them, stop them.

Theory of operation
-------------------
Every process a test starts goes through :class:`Proc`.  A ``Proc`` runs in its own
session (so it has its own process group), its stdout and stderr go into one pipe,
and a reader thread keeps that pipe drained into a buffer so the child never blocks
on a full pipe.  :meth:`Proc.log` drains whatever is still in the pipe before it
answers, so a line the child wrote before the test's last request is always seen.

Every ``Proc`` is registered when it starts.  The autouse fixture ``procs`` in
``conftest.py`` stops, by PID, every process started during a test when the test
ends, pass or fail; an ``atexit`` hook catches the rest.  A process that ignores its
stop signal is killed (SIGKILL, by PID and then by its own process group) after a
bounded wait.  Nothing is ever looked up or killed by name.

Every wait here is bounded: :func:`wait_until` polls a predicate until a deadline,
:meth:`Proc.wait_for_log` waits for a regular expression in the output until a
deadline, and the clients (:func:`uwsgi_request`, :func:`http_request`) have an
overall deadline.

The router under test
---------------------
``ROUTER_UNDER_TEST`` selects what :func:`start_router` runs:

* unset (or ``ours``): ``python -m uwsgi_fastrouter ARGS`` from this checkout;
* ``uwsgi``: the real uWSGI FastRouter, ``uwsgi --master --die-on-term ARGS``.

The second mode runs the same tests against the behaviour we must match.

External programs
-----------------
* uWSGI: ``$UWSGI_BIN``, else ``uwsgi`` on ``PATH`` (tox installs it into its
  environment), else next to the running Python.
* nginx: ``$NGINX_BIN``, else ``nginx`` on ``PATH``, else ``/usr/sbin/nginx``.

When one is missing the test is skipped, or fails when ``$CI`` is set (CI must run
everything).
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import itertools
import json
import os
import re
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

BIND_RE = re.compile(r"uWSGI fastrouter bound on (\S+) fd (\d+)")
STATS_RE = re.compile(r"\*\*\* fastrouter stats server enabled on (\S+) fd: (\d+) \*\*\*")
APP_SOCKET_RE = re.compile(r"uwsgi socket 0 bound to (?:TCP|UNIX) address (\S+)")

# Options (with their aliases) that open a stats server.
_STATS_OPTIONS = ("--fastrouter-stats", "--fastrouter-stats-server", "--fastrouter-ss")

Pairs = Union[Mapping[Any, Any], Iterable[Tuple[Any, Any]]]


# ---------------------------------------------------------------------------
# Finding programs, choosing the router

def _missing(message: str) -> None:
    """Skip the test, or fail it when running in CI (where everything must run)."""
    if os.environ.get("CI"):
        pytest.fail(message + " (CI is set: interop tests may not be skipped)", pytrace=False)
    pytest.skip(message)


def _executable(path: Optional[str]) -> bool:
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


def uwsgi_bin() -> str:
    """Path of the real uWSGI binary: $UWSGI_BIN, else ``uwsgi`` on PATH, else skip/fail."""
    env = os.environ.get("UWSGI_BIN")
    if env:
        if not _executable(env):
            _missing("UWSGI_BIN=%s is not an executable file" % env)
        return env
    found = shutil.which("uwsgi")
    if found:
        return found
    beside = os.path.join(os.path.dirname(sys.executable), "uwsgi")
    if _executable(beside):
        return beside
    _missing("uWSGI not found: set UWSGI_BIN or run the tests through tox (it installs uwsgi)")
    raise AssertionError("unreachable")


def _openssl(directory: Union[str, Path], *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=str(directory), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)


def make_pki(directory: Union[str, Path]) -> Path:
    """Test certificates made with the ``openssl`` command in *directory* (skip, or fail
    in CI, without it): ``ca`` and ``otherca`` (self-signed), ``node`` (for node.test and
    127.0.0.1) and ``client`` (router.test), both signed by ``ca``; each NAME has
    NAME.crt and NAME.key."""
    if shutil.which("openssl") is None:
        _missing("the openssl command is not installed (Debian package openssl): the TLS "
                 "tests make their certificates with it")
    directory = Path(directory)
    for ca in ("ca", "otherca"):
        _openssl(directory, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca + ".key",
                 "-out", ca + ".crt", "-days", "2", "-subj", "/CN=test " + ca)
    for name, cn, san in (("node", "node.test", "DNS:node.test,IP:127.0.0.1"),
                          ("client", "router.test", "DNS:router.test")):
        _openssl(directory, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", name + ".key",
                 "-out", name + ".csr", "-subj", "/CN=" + cn)
        (directory / (name + ".ext")).write_text("subjectAltName=%s\n" % san)
        _openssl(directory, "x509", "-req", "-in", name + ".csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", name + ".crt", "-days", "2", "-extfile", name + ".ext")
    return directory


def nginx_bin() -> str:
    """Path of nginx: $NGINX_BIN, else ``nginx`` on PATH, else /usr/sbin/nginx; else skip/fail."""
    env = os.environ.get("NGINX_BIN")
    if env:
        if not _executable(env):
            _missing("NGINX_BIN=%s is not an executable file" % env)
        return env
    found = shutil.which("nginx")
    if found:
        return found
    if _executable("/usr/sbin/nginx"):
        return "/usr/sbin/nginx"
    _missing("nginx not found: install it (apt-get install nginx-light) or set NGINX_BIN")
    raise AssertionError("unreachable")


def router_under_test() -> str:
    """``"uwsgi"`` when the real uWSGI FastRouter is under test, else ``"ours"``."""
    mode = os.environ.get("ROUTER_UNDER_TEST", "").strip().lower()
    if mode in ("", "ours", "self", "uwsgi_fastrouter", "uwsgi-fastrouter"):
        return "ours"
    if mode == "uwsgi":
        return "uwsgi"
    raise ValueError("ROUTER_UNDER_TEST must be 'uwsgi' or unset, not %r" % mode)


def reference_mode() -> bool:
    """True when the tests run against the real uWSGI FastRouter."""
    return router_under_test() == "uwsgi"


# ---------------------------------------------------------------------------
# Bounded waiting

def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01,
               what: str = "condition") -> Any:
    """Poll *predicate* until it returns a true value (which is returned).

    Raises AssertionError naming *what* when *timeout* seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, what))
        time.sleep(interval)  # polling interval of a bounded wait, not synchronisation


# ---------------------------------------------------------------------------
# Short paths for UNIX sockets (sun_path holds 107 bytes)

_short_dirs: List[str] = []


def short_dir(base: Union[str, Path], limit: int = 60) -> Path:
    """*base* if its path is short enough to hold UNIX sockets below it, else a fresh short dir.

    The fresh directory is created under the system temp dir (or /tmp) and removed at exit.
    """
    base = Path(base)
    if len(os.fsencode(str(base))) <= limit:
        return base
    parent = tempfile.gettempdir()
    if len(parent) > limit - 16:
        parent = "/tmp"
    path = tempfile.mkdtemp(prefix="ufr-", dir=parent)
    _short_dirs.append(path)
    return Path(path)


def sock_path(directory: Union[str, Path], name: str) -> str:
    """A UNIX socket path named *name* in *directory* (or in a short dir if that is too long)."""
    path = os.path.join(str(directory), name)
    if len(os.fsencode(path)) < 100:
        return path
    return os.path.join(str(short_dir(directory, limit=0)), name)


def _remove_short_dirs() -> None:
    while _short_dirs:
        shutil.rmtree(_short_dirs.pop(), ignore_errors=True)


# ---------------------------------------------------------------------------
# Processes

_live: List["Proc"] = []
_live_lock = threading.Lock()
_sequence = itertools.count(1)


class Proc:
    """A started child process whose output is collected; stopped by PID.

    ``pid``: the child's PID.  ``seq``: start order (the ``procs`` fixture uses it).
    """

    def __init__(self, argv: Sequence[Any], cwd: Optional[Union[str, Path]] = None,
                 env: Optional[Mapping[str, str]] = None, name: Optional[str] = None) -> None:
        self.argv = [str(a) for a in argv]
        self.name = name or os.path.basename(self.argv[0])
        self._popen = subprocess.Popen(
            self.argv, cwd=None if cwd is None else str(cwd), env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.pid: int = self._popen.pid
        self.seq = next(_sequence)
        self._pipe = self._popen.stdout
        self._fd = self._pipe.fileno()
        os.set_blocking(self._fd, False)
        self._buf = bytearray()
        self._eof = False
        self._stop_signal_sent: Optional[int] = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._reader, name="log-%s-%d" % (self.name, self.pid),
                                        daemon=True)
        self._thread.start()
        with _live_lock:
            _live.append(self)

    def __repr__(self) -> str:
        return "<%s %s pid=%d>" % (type(self).__name__, self.name, self.pid)

    # -- output ------------------------------------------------------------

    def _drain_locked(self) -> None:
        got = False
        while not self._eof:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                self._eof = True
                break
            self._buf += data
            got = True
        if got or self._eof:
            self._cond.notify_all()

    def _reader(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._fd, selectors.EVENT_READ)
            while True:
                sel.select(0.2)
                with self._cond:
                    if self._eof or self._pipe.closed:
                        return
                    self._drain_locked()
                    if self._eof:
                        return
        except (OSError, ValueError):
            return
        finally:
            sel.close()

    def _pending(self) -> int:
        try:
            raw = fcntl.ioctl(self._fd, termios.FIONREAD, b"\0\0\0\0")
            return struct.unpack("i", raw)[0]
        except OSError:
            return 0

    def log(self) -> str:
        """All output (stdout and stderr) so far, including what is still in the pipe."""
        with self._cond:
            if not self._pipe.closed:
                self._drain_locked()
            return self._buf.decode("utf-8", "replace")

    def count(self, regex: str) -> int:
        """How many times *regex* matches the output so far."""
        return len(re.findall(regex, self.log()))

    def wait_for_log(self, regex: str, timeout: float = 10.0, count: int = 1) -> "re.Match[str]":
        """Wait until *regex* has matched the output *count* times; return the last match.

        Raises AssertionError (with the output) after *timeout* seconds, or as soon as the
        process has exited without producing it.
        """
        rx = re.compile(regex)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if not self._pipe.closed:
                    self._drain_locked()
                text = self._buf.decode("utf-8", "replace")
                matches = list(rx.finditer(text))
                if len(matches) >= count:
                    return matches[count - 1]
                exited = self._popen.poll() is not None
                if self._eof or (exited and self._pending() == 0):
                    try:
                        self._popen.wait(2)  # for the exit code in the message
                    except subprocess.TimeoutExpired:
                        pass
                    raise AssertionError("%r exited (code %s) before printing %r:\n%s"
                                         % (self, self._popen.returncode, regex, _tail(text)))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError("timed out after %.1f s waiting for %r in the output of %r:\n%s"
                                         % (timeout, regex, self, _tail(text)))
                self._cond.wait(min(remaining, 0.05))

    # -- life --------------------------------------------------------------

    def alive(self) -> bool:
        return self._popen.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return self._popen.poll()

    def stop(self, sig: int = signal.SIGINT, timeout: float = 10.0) -> int:
        """Send *sig* to the PID, wait up to *timeout* s, then SIGKILL; return the exit code.

        Children left behind in the process's own process group are killed too.
        Idempotent.
        """
        if self._popen.poll() is None:
            if self._stop_signal_sent != sig:
                self.send_stop_signal(sig)
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._popen.wait(10)
        self._kill_leftovers()
        self._thread.join(5)
        with self._cond:
            if not self._pipe.closed:
                self._drain_locked()
                self._pipe.close()
        with _live_lock:
            if self in _live:
                _live.remove(self)
        return self._popen.returncode

    def send_stop_signal(self, sig: int = signal.SIGINT) -> None:
        """Send *sig* to the PID without waiting (``stop()`` then only waits)."""
        if self._popen.poll() is None:
            self._stop_signal_sent = sig
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def _kill_leftovers(self) -> None:
        # The child ran in its own session, so its PID is also its process group id; any
        # member still there (a worker of a killed master, say) belongs to this test.
        try:
            os.killpg(self.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "Proc":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def live_processes() -> List[Proc]:
    with _live_lock:
        return list(_live)


def stop_all(after_seq: int = 0) -> List[str]:
    """Stop every live process started after *after_seq*; return their reprs.

    All are signalled first (newest first), then each is waited for, so they shut down
    in parallel.
    """
    chosen = [p for p in sorted(live_processes(), key=lambda p: p.seq, reverse=True)
              if p.seq > after_seq]
    for proc in chosen:
        proc.send_stop_signal()
    for proc in chosen:
        proc.stop()
    return [repr(p) for p in chosen]


def current_seq() -> int:
    """The start number of the most recently started process (0 if none)."""
    with _live_lock:
        return max([p.seq for p in _live] + [0])


def _at_exit() -> None:
    stop_all()
    _remove_short_dirs()


atexit.register(_at_exit)


def _child_env(env: Optional[Mapping[str, Optional[str]]], pythonpath: bool = False) -> dict:
    """os.environ plus *env* (a value of None removes the variable), minus our own knobs."""
    out = dict(os.environ)
    out.pop("UWSGI_BIN", None)  # a knob of these tests; uWSGI would read it as option "bin"
    for key, value in (env or {}).items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = str(value)
    if pythonpath:
        old = out.get("PYTHONPATH")
        out["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + old if old else "")
    return out


# ---------------------------------------------------------------------------
# Finding the real port of a "host:0" listener (uWSGI prints the 0)

def _children(pid: int) -> List[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def files_open_under(pid: int, directory: Union[str, Path]) -> List[str]:
    """What *pid* and its descendants hold open below *directory* (``/proc/PID/fd`` links;
    an unlinked file shows as ``PATH (deleted)``)."""
    prefix = os.path.join(str(directory), "")
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            fds = os.listdir("/proc/%d/fd" % p)
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink("/proc/%d/fd/%s" % (p, fd))
            except OSError:
                continue
            if link.startswith(prefix):
                found.append(link)
        todo.extend(_children(p))
    return found


def _listening_port(pid: int, fd: int) -> Optional[int]:
    """Port of the TCP socket *fd* of *pid* or of one of its descendants, from /proc."""
    todo, seen = [pid], set()
    while todo:
        p = todo.pop(0)
        if p in seen:
            continue
        seen.add(p)
        try:
            link = os.readlink("/proc/%d/fd/%d" % (p, fd))
        except OSError:
            link = ""
        m = re.match(r"socket:\[(\d+)\]$", link)
        if m:
            inode = m.group(1)
            for cols in tcp_table_rows():
                if len(cols) > 9 and cols[9] == inode:
                    return int(cols[1].rsplit(":", 1)[1], 16)
        todo.extend(_children(p))
    return None


def tcp_table_rows() -> List[List[str]]:
    """The rows of /proc/net/tcp and /proc/net/tcp6, split into columns (local address,
    state, tx:rx queues, ..., inode)."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows.extend(row.split() for row in f.read().splitlines()[1:])
        except OSError:
            continue
    return rows


def _resolve(address: str, fd: int, pid: int, timeout: float = 5.0) -> str:
    """Replace a ``:0`` port in *address* by the real one (found from the fd in /proc)."""
    if ":" not in address or address.startswith(("/", "@")) or not address.endswith(":0"):
        return address
    port = wait_until(lambda: _listening_port(pid, fd), timeout=timeout,
                      what="the real port of %s (fd %d)" % (address, fd))
    host = address[:-2] or "127.0.0.1"
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    return "%s:%d" % (host, port)


# ---------------------------------------------------------------------------
# The router

class RouterProc(Proc):
    """A running router.  ``addresses``: its listeners (real ports); ``stats_address`` or None."""

    addresses: List[str]
    stats_address: Optional[str]


def _count_listener_args(args: Sequence[str]) -> int:
    n = 0
    for i, arg in enumerate(args):
        if arg == "--fastrouter" and i + 1 < len(args):
            n += 1
        elif arg.startswith("--fastrouter="):
            n += 1
    return n


def _has_stats_arg(args: Sequence[str]) -> bool:
    return any(a in _STATS_OPTIONS or a.split("=", 1)[0] in _STATS_OPTIONS for a in args)


def router_argv(args: Sequence[Any]) -> List[str]:
    """The command line that runs the router under test with *args*."""
    args = [str(a) for a in args]
    if reference_mode():
        return [uwsgi_bin(), "--master", "--die-on-term"] + args
    return [sys.executable, "-m", "uwsgi_fastrouter"] + args


def start_router(args: Sequence[Any], cwd: Optional[Union[str, Path]] = None,
                 env: Optional[Mapping[str, Optional[str]]] = None, listeners: Optional[int] = None,
                 stats: Optional[bool] = None, timeout: float = 20.0) -> RouterProc:
    """Start the router under test with *args* and wait until it listens.

    Waits for one ``uWSGI fastrouter bound on ADDR fd N`` line per ``--fastrouter`` in
    *args* (or *listeners* lines, for listeners given in an ini file), and for the stats
    line when a stats option is in *args* (or *stats* is true).  *env* adds variables to
    the child's environment (None removes one).  Stop it with ``.stop()`` (SIGINT).
    """
    args = [str(a) for a in args]
    argv = router_argv(args)
    if listeners is None:
        listeners = _count_listener_args(args)
    if stats is None:
        stats = _has_stats_arg(args)
    proc = RouterProc(argv, cwd=cwd, env=_child_env(env, pythonpath=not reference_mode()),
                      name="uwsgi-fastrouter" if not reference_mode() else "uwsgi-reference-router")
    try:
        proc.addresses = []
        for i in range(listeners):
            m = proc.wait_for_log(BIND_RE.pattern, timeout=timeout, count=i + 1)
            proc.addresses.append(_resolve(m.group(1), int(m.group(2)), proc.pid))
        proc.stats_address = None
        if stats:
            m = proc.wait_for_log(STATS_RE.pattern, timeout=timeout)
            proc.stats_address = _resolve(m.group(1), int(m.group(2)), proc.pid)
    except BaseException:
        proc.stop()
        raise
    return proc


def udp_subscription_address(router: "RouterProc") -> str:
    """The ``127.0.0.1:PORT`` the router's UDP subscription server took (it was given
    ``127.0.0.1:0``), read from its start-up line."""
    bound = router.wait_for_log(r"subscription server bound on (127\.0\.0\.1:\d+) fd")
    return bound.group(1)


def wait_applied_everywhere(router: "RouterProc", regex: str, timeout: float = 20.0) -> None:
    """Wait until a subscription event the master logged (*regex*) is applied by every
    router process too.  Under a master the event is logged once, by the master, and
    the router processes apply it silently; but the master's channel to each router
    process is in order, so a stats document asked for afterwards (its query goes
    down the same channels) comes back only once every process has applied it.
    Needs ``--fastrouter-stats`` (also harmless without a master)."""
    router.wait_for_log(regex, timeout=timeout)
    fetch_stats(router.stats_address, timeout=timeout)


def fetch_stats(address: str, timeout: float = 10.0) -> dict:
    """Connect to a stats server, read the document to EOF and parse it as JSON."""
    raw = _exchange(address, b"", timeout)
    if raw.startswith(b"HTTP/"):
        raw = raw.split(b"\r\n\r\n", 1)[1]
    return json.loads(raw.decode("utf-8"))


# ---------------------------------------------------------------------------
# Real uWSGI application servers

class UwsgiProc(Proc):
    """A running uWSGI application server; ``address`` is its socket (real port)."""

    address: str
    directory: Path


_app_counter = itertools.count(1)


def start_uwsgi_app(tmp_path: Union[str, Path], app_source: str, socket: Optional[str] = None,
                    extra: Sequence[Any] = (), timeout: float = 30.0,
                    socket_option: str = "--socket") -> UwsgiProc:
    """Run a real uWSGI app server for *app_source* (a WSGI module defining ``application``).

    The app is written to its own directory below *tmp_path*.  *socket* defaults to a UNIX
    socket in that directory; ``127.0.0.1:0`` gets a free port (``.address`` has the real
    one).  *socket_option* names the listener option (``--suwsgi-socket`` takes
    ``ADDR,CERT,KEY[,CIPHERS,CLIENT_CA]``; ``.address`` is still the bare address).
    Returns once the app is loaded and the socket accepts connections.
    """
    n = next(_app_counter)
    directory = Path(tmp_path) / ("app%d" % n)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "app.py").write_text(app_source)
    if socket is None:
        socket = sock_path(directory, "uwsgi.sock")
    argv = [uwsgi_bin(), "--master", socket_option, socket, "--wsgi-file", str(directory / "app.py"),
            "--processes", "1", "--die-on-term", "--need-app"] + [str(e) for e in extra]
    proc = UwsgiProc(argv, cwd=directory, env=_child_env(None), name="uwsgi-app%d" % n)
    try:
        proc.directory = directory
        m = proc.wait_for_log(APP_SOCKET_RE.pattern, timeout=timeout)
        proc.address = m.group(1)
        proc.wait_for_log(r"WSGI app 0 \(mountpoint='[^']*'\) ready", timeout=timeout)
        proc.wait_for_log(r"spawned uWSGI worker 1 ", timeout=timeout)
        wait_until(lambda: _can_connect(proc.address), timeout=timeout,
                   what="uWSGI app at %s to accept" % proc.address)
    except BaseException:
        proc.stop()
        raise
    return proc


def _can_connect(address: str) -> bool:
    try:
        connect(address, timeout=1.0).close()
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------
# uwsgi protocol client

def _b(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return str(value).encode("utf-8")


def uwsgi_packet(pairs: Pairs, modifier1: int = 0, modifier2: int = 0) -> bytes:
    """A uwsgi request head: 4-byte header (modifier1, little-endian datasize, modifier2) + vars."""
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    body = bytearray()
    for key, value in items:
        k, v = _b(key), _b(value)
        body += struct.pack("<H", len(k)) + k + struct.pack("<H", len(v)) + v
    if len(body) > 0xFFFF:
        raise ValueError("vars block of %d bytes does not fit the 16-bit datasize" % len(body))
    return struct.pack("<BHB", modifier1, len(body), modifier2) + bytes(body)


def request_vars(host: Optional[str], path: str = "/", method: str = "GET", body_length: int = 0,
                 extra: Iterable[Tuple[Any, Any]] = ()) -> List[Tuple[str, str]]:
    """The vars a web server would send for a simple request (HTTP_HOST omitted if host is None)."""
    pairs = [("REQUEST_METHOD", method), ("REQUEST_URI", path), ("PATH_INFO", path),
             ("QUERY_STRING", ""), ("SERVER_PROTOCOL", "HTTP/1.1"), ("SERVER_NAME", "localhost"),
             ("SERVER_PORT", "80"), ("REMOTE_ADDR", "127.0.0.1"), ("REMOTE_PORT", "40000")]
    if host is not None:
        pairs.append(("HTTP_HOST", host))
    if body_length:
        pairs.append(("CONTENT_LENGTH", str(body_length)))
        pairs.append(("CONTENT_TYPE", "application/octet-stream"))
    pairs.extend((str(k), str(v)) for k, v in extra)
    return pairs


def connect(address: str, timeout: float = 10.0) -> socket.socket:
    """A connected socket for a uWSGI-style address.

    ``ip:port``, ``[ipv6]:port`` (an empty host means 127.0.0.1) -> TCP; ``@name`` -> Linux
    abstract socket, with the trailing NUL byte uWSGI puts in the address; anything else
    is a UNIX socket path.
    """
    if address.startswith("@"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: Any = "\0" + address[1:] + "\0"
    elif ":" in address and not address.startswith(("/", ".")):
        host, _, port = address.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            target = (host[1:-1], int(port))
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            target = (host or "127.0.0.1", int(port))
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target = address
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except BaseException:
        sock.close()
        raise
    return sock


def _exchange(address: str, data: bytes, timeout: float) -> bytes:
    """Send *data* while reading the answer until EOF, within *timeout* seconds overall.

    A reset (or a broken pipe while sending) ends the exchange like an EOF: it is how a
    peer's close looks when it left some of our bytes unread.
    """
    deadline = time.monotonic() + timeout
    sock = connect(address, timeout)
    sock.setblocking(False)
    out = memoryview(data)
    received = bytearray()
    sel = selectors.DefaultSelector()
    try:
        sel.register(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if out else 0))
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no EOF from %s after %.1f s (%d of %d bytes sent, %d received)"
                                   % (address, timeout, len(data) - len(out), len(data), len(received)))
            for key, events in sel.select(min(remaining, 1.0)):
                if events & selectors.EVENT_WRITE and out:
                    try:
                        sent = sock.send(out[:262144])
                        out = out[sent:]
                    except BlockingIOError:
                        pass
                    except (BrokenPipeError, ConnectionResetError):
                        out = out[len(out):]
                    if not out:
                        sel.modify(sock, selectors.EVENT_READ)
                if events & selectors.EVENT_READ:
                    try:
                        chunk = sock.recv(262144)
                    except BlockingIOError:
                        continue
                    except ConnectionResetError:
                        return bytes(received)
                    if not chunk:
                        return bytes(received)
                    received += chunk
    finally:
        sel.close()
        sock.close()


def uwsgi_request(address: str, pairs: Pairs, body: bytes = b"", modifier1: int = 0,
                  modifier2: int = 0, timeout: float = 10.0) -> bytes:
    """Send one uwsgi request (head + *body*) to *address* and return everything read until EOF.

    The client never half-closes (uWSGI's router drops a session on client EOF).  An empty
    result means the peer closed without answering.  Raises TimeoutError after *timeout* s.
    """
    return _exchange(address, uwsgi_packet(pairs, modifier1, modifier2) + bytes(body), timeout)


# ---------------------------------------------------------------------------
# HTTP responses (what uWSGI apps and nginx send)

def parse_http_response(raw: bytes) -> Tuple[int, dict, bytes]:
    """(status, headers with lower-case names, body) of one raw HTTP/1.x response.

    Chunked bodies are decoded; a Content-Length longer than the body is an AssertionError.
    """
    if not raw:
        raise AssertionError("empty response: the connection was closed without a byte")
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise AssertionError("incomplete HTTP response head: %r" % raw[:200])
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise AssertionError("not an HTTP response: %r" % raw[:200])
    headers: dict = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if len(body) < length:
            raise AssertionError("truncated body: %d of %d bytes" % (len(body), length))
        body = body[:length]
    return int(parts[1]), headers, body


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            raise AssertionError("truncated chunked body")
        size = int(data[pos:eol].split(b";", 1)[0], 16)
        pos = eol + 2
        if size == 0:
            return bytes(out)
        if pos + size > len(data):
            raise AssertionError("truncated chunk")
        out += data[pos:pos + size]
        pos += size + 2


def http_status_and_body(raw: bytes) -> Tuple[int, bytes]:
    """(status, body) of a raw HTTP response, as a uWSGI app sends it through the router."""
    status, _, body = parse_http_response(raw)
    return status, body


# ---------------------------------------------------------------------------
# nginx in front

UWSGI_PARAMS = """\
uwsgi_param  QUERY_STRING       $query_string;
uwsgi_param  REQUEST_METHOD     $request_method;
uwsgi_param  CONTENT_TYPE       $content_type;
uwsgi_param  CONTENT_LENGTH     $content_length;

uwsgi_param  REQUEST_URI        $request_uri;
uwsgi_param  PATH_INFO          $document_uri;
uwsgi_param  DOCUMENT_ROOT      $document_root;
uwsgi_param  SERVER_PROTOCOL    $server_protocol;
uwsgi_param  REQUEST_SCHEME     $scheme;
uwsgi_param  HTTPS              $https if_not_empty;

uwsgi_param  REMOTE_ADDR        $remote_addr;
uwsgi_param  REMOTE_PORT        $remote_port;
uwsgi_param  SERVER_PORT        $server_port;
uwsgi_param  SERVER_NAME        $server_name;
"""

_NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log stderr notice;

events {{
    worker_connections 256;
}}

http {{
    access_log off;
    client_body_temp_path {dir}/tmp/client_body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;

    server {{
        listen unix:{sock};
{server_block}
    }}
}}
"""


class NginxProc(Proc):
    """A running nginx; ``address`` is the UNIX socket it listens on, ``directory`` its prefix."""

    address: str
    directory: Path


_nginx_counter = itertools.count(1)


def start_nginx(tmp_path: Union[str, Path], server_block: str, timeout: float = 20.0) -> NginxProc:
    """Run nginx in the foreground (one process) with everything below *tmp_path*.

    *server_block* is the inside of a ``server { }`` block without ``listen``: nginx
    listens on a UNIX socket (``.address``).  ``include uwsgi_params;`` works: the stock
    parameter lines are written next to the configuration file.  Errors go to the log.
    """
    n = next(_nginx_counter)
    directory = Path(tmp_path) / ("nginx%d" % n)
    (directory / "tmp").mkdir(parents=True, exist_ok=True)
    sock = sock_path(directory, "nginx.sock")
    (directory / "uwsgi_params").write_text(UWSGI_PARAMS)
    indented = "\n".join("        " + line if line.strip() else "" for line in server_block.splitlines())
    conf = directory / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(dir=directory, sock=sock, server_block=indented))
    argv = [nginx_bin(), "-p", str(directory) + "/", "-c", str(conf), "-e", "stderr"]
    proc = NginxProc(argv, cwd=directory, env=_child_env(None), name="nginx%d" % n)
    proc.address = sock
    proc.directory = directory

    def ready() -> bool:
        if not proc.alive():
            raise AssertionError("nginx exited (code %s):\n%s" % (proc.returncode, proc.log()))
        return os.path.exists(sock) and _can_connect(sock)

    try:
        wait_until(ready, timeout=timeout, what="nginx to listen on %s" % sock)
    except BaseException:
        proc.stop()
        raise
    return proc


def http_request(address: str, method: str, path: str, host: str, body: bytes = b"",
                 headers: Optional[Mapping[str, str]] = None,
                 timeout: float = 10.0) -> Tuple[int, dict, bytes]:
    """One HTTP/1.0 request (``Connection: close``); returns (status, headers, body)."""
    lines = ["%s %s HTTP/1.0" % (method, path), "Host: %s" % host, "Connection: close"]
    if body or method in ("POST", "PUT"):
        lines.append("Content-Length: %d" % len(body))
    for name, value in (headers or {}).items():
        lines.append("%s: %s" % (name, value))
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + bytes(body)
    return parse_http_response(_exchange(address, data, timeout))


def http_get(unix_path: str, path: str, host: str, timeout: float = 10.0) -> Tuple[int, dict, bytes]:
    """GET *path* with ``Host: host`` from the HTTP server on *unix_path*: (status, headers, body)."""
    return http_request(unix_path, "GET", path, host, timeout=timeout)


# ---------------------------------------------------------------------------
# A backend app for interop tests, and its payloads

def payload(n: int, seed: bytes = b"uwsgi-fastrouter") -> bytes:
    """*n* deterministic, non-repeating bytes (a shift or a lost chunk changes the hash)."""
    return hashlib.shake_256(seed).digest(n) if n else b""


NODE_APP = '''\
import hashlib
import json

NODE = {node!r}


def application(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path.startswith("/download/"):
        size = int(path.rsplit("/", 1)[1])
        data = hashlib.shake_256(b"uwsgi-fastrouter").digest(size) if size else b""
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(len(data))), ("X-Node", NODE)])
        return [data]
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
    doc = {{
        "node": NODE,
        "host": environ.get("HTTP_HOST"),
        "server_name": environ.get("SERVER_NAME"),
        "method": environ.get("REQUEST_METHOD"),
        "path": path,
        "length": got,
        "sha256": digest.hexdigest(),
    }}
    out = json.dumps(doc).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(out))), ("X-Node", NODE)])
    return [out]
'''


def node_app_source(node: str) -> str:
    """WSGI source of a backend named *node*.

    ``GET /download/N`` returns :func:`payload` (N bytes).  Anything else returns JSON:
    ``node``, ``host`` (HTTP_HOST), ``server_name``, ``method``, ``path``, and ``length``
    and ``sha256`` of the request body it read.
    """
    return NODE_APP.format(node=node)


def json_answer(raw: bytes) -> dict:
    """The JSON document of a :func:`node_app_source` answer (status must be 200)."""
    status, body = http_status_and_body(raw)
    assert status == 200, (status, body[:200])
    return json.loads(body.decode("utf-8"))


def free_dead_tcp_address() -> Tuple[str, socket.socket]:
    """A loopback ``ip:port`` that refuses connections, and the socket that reserves it.

    The socket is bound but never listens, so connects are refused and no other process
    can take the port while the caller keeps the socket open.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return "127.0.0.1:%d" % sock.getsockname()[1], sock


def busy_unix_node(path: str) -> Tuple[socket.socket, List[socket.socket]]:
    """A UNIX socket at *path* whose listen queue is full: a non-blocking connect to it
    gets EAGAIN.  Returns the listening socket (it never accepts unless the caller does)
    and the connected sockets that fill its queue; the caller closes them all."""
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(0)
    fillers: List[socket.socket] = []
    for _ in range(8):
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        filler.setblocking(False)
        try:
            filler.connect(path)
        except BlockingIOError:
            filler.close()
            return lsock, fillers
        fillers.append(filler)
    for sock in [lsock] + fillers:
        sock.close()
    raise AssertionError("the listen queue of %s never filled up" % path)
