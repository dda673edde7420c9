"""Real uWSGI 2.0.31 nodes killed (SIGKILL) or stopped (SIGSTOP) under load, with
--fastrouter-retry-after-connect; and --fastrouter-node-max-conns against nodes that
count their own concurrency.  With and without --master."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import List

import pytest

import support
from support import request_vars, start_router, start_uwsgi_app, uwsgi_request, wait_until

pytestmark = pytest.mark.skipif(support.reference_mode(), reason="options of this router only")

# A node that answers at once, except on node "A" for /hold: there the request waits
# (a marker file per method says it arrived) until the node is killed.  /count keeps
# the node's concurrency in a file: one line per request, "+" on entry, "-" on exit.
APP = '''\
import fcntl
import os
import time

NODE = {node!r}
HERE = os.path.dirname(os.path.abspath(__file__))


def _note(mark):
    with open(os.path.join(HERE, "concurrency"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(mark + "\\n")


def application(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    if path == "/hold" and NODE == "A":
        open(os.path.join(HERE, "held-" + environ["REQUEST_METHOD"]), "w").close()
        time.sleep(60)      # a node that never answers (the test ends it by PID)
    if path == "/count":
        _note("+")
        time.sleep(0.05)    # the request's own work, so requests overlap in the node
        _note("-")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [("node=" + NODE).encode()]
'''


def start_node(tmp_path: Path, name: str, processes: int = 1) -> support.UwsgiProc:
    return start_uwsgi_app(tmp_path, APP.format(node=name), socket="127.0.0.1:0",
                           extra=["--processes", processes] if processes > 1 else ())


def node_pids(node: support.UwsgiProc) -> List[int]:
    return [node.pid] + support._children(node.pid)


def get(router: str, path: str = "/") -> bytes:
    return uwsgi_request(router, request_vars("example.com", path), timeout=30)


def post(router: str, path: str = "/") -> bytes:
    return uwsgi_request(router, request_vars("example.com", path, "POST", 5), b"hello", timeout=30)


class Load:
    """*clients* threads sending bodyless requests in a loop until stopped; each
    answer without a node's 200 counts as a failure."""

    def __init__(self, router: str, clients: int = 4) -> None:
        self.router = router
        self.done = 0
        self.failed: List[bytes] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                answer = get(self.router)
            except OSError as exc:
                answer = repr(exc).encode()
            with self.lock:
                if answer.startswith(b"HTTP/1.1 200") or answer.startswith(b"HTTP/1.0 200"):
                    self.done += 1
                else:
                    self.failed.append(answer)

    def wait_for(self, more: int) -> None:
        target = self.done + more
        wait_until(lambda: self.done >= target, timeout=60, what="%d more answers" % more)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(60)


def router_args(nodes, master: bool, *extra) -> list:
    args = ["--fastrouter", "127.0.0.1:0", "--fastrouter-retry-after-connect"]
    for node in nodes:
        args += ["--fastrouter-to", node.address]
    if master:
        args.append("--master")
    return args + list(extra)


@pytest.mark.parametrize("master", [False, True], ids=["alone", "master"])
def test_a_killed_node_loses_no_bodyless_request(tmp_path, procs, master):
    a = start_node(tmp_path, "A", processes=4)    # two held, two serving the load
    b = start_node(tmp_path, "B")
    c = start_node(tmp_path, "C")
    router = start_router(router_args([a, b, c], master))
    address = router.addresses[0]
    held = {}

    def hold(method):
        held[method] = (get if method == "GET" else post)(address, "/hold")

    # the round robin starts with A: a bodyless and a body request held there
    holders = [threading.Thread(target=hold, args=("GET",), daemon=True)]
    holders[0].start()
    wait_until(lambda: (a.directory / "held-GET").exists(), what="A holding a GET")
    assert b"node=" in get(address) and b"node=" in get(address)     # B, C
    holders.append(threading.Thread(target=hold, args=("POST",), daemon=True))
    holders[1].start()
    wait_until(lambda: (a.directory / "held-POST").exists(), what="A holding a POST")
    load = Load(address)
    try:
        load.wait_for(20)
        for pid in node_pids(a):
            os.kill(pid, signal.SIGKILL)
        for thread in holders:
            thread.join(60)
        load.wait_for(40)
    finally:
        load.stop()
    assert load.failed == []
    assert held["GET"].endswith(b"node=B") or held["GET"].endswith(b"node=C"), held["GET"]
    assert held["POST"] == b"", "a request with a body is never sent again"
    router.wait_for_log(r"request sent again \(--fastrouter-retry-after-connect\)")


@pytest.mark.parametrize("master", [False, True], ids=["alone", "master"])
def test_a_stopped_node_loses_no_bodyless_request(tmp_path, procs, master):
    a, b, c = (start_node(tmp_path, name) for name in "ABC")
    router = start_router(router_args([a, b, c], master, "--fastrouter-timeout", "2"))
    address = router.addresses[0]
    load = Load(address)
    stopped = node_pids(a)
    try:
        load.wait_for(20)
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        router.wait_for_log(r"sent nothing for 2 seconds before its first response byte: request sent again", timeout=30)
        load.wait_for(40)
    finally:
        load.stop()
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    assert load.failed == []


def concurrency_peak(node: support.UwsgiProc) -> int:
    level = peak = 0
    for mark in (node.directory / "concurrency").read_text().split():
        level += 1 if mark == "+" else -1
        peak = max(peak, level)
    return peak


@pytest.mark.parametrize("master", [False, True], ids=["alone", "master"])
def test_a_node_never_holds_more_requests_than_its_cap(tmp_path, procs, master):
    a = start_node(tmp_path, "A", processes=4)
    b = start_node(tmp_path, "B", processes=4)
    args = ["--fastrouter", "127.0.0.1:0", "--fastrouter-to", a.address, "--fastrouter-to", b.address,
            "--fastrouter-node-max-conns", "1", "--fastrouter-node-queue-wait", "30"]
    router = start_router(args + (["--master"] if master else []))
    answers: List[bytes] = []

    def client() -> None:
        for _ in range(5):
            answers.append(get(router.addresses[0], "/count"))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(answers) == 40 and all(answer.endswith((b"node=A", b"node=B")) for answer in answers)
    assert concurrency_peak(a) == 1 and concurrency_peak(b) == 1


@pytest.mark.parametrize("master", [False, True], ids=["alone", "master"])
def test_a_request_that_finds_no_slot_in_time_is_closed(tmp_path, procs, master):
    a = start_node(tmp_path, "A", processes=2)
    args = ["--fastrouter", "127.0.0.1:0", "--fastrouter-to", a.address,
            "--fastrouter-node-max-conns", "1", "--fastrouter-node-queue-wait", "1",
            "--fastrouter-retry-after-connect"]
    router = start_router(args + (["--master"] if master else []))
    address = router.addresses[0]
    held = []
    holder = threading.Thread(target=lambda: held.append(get(address, "/hold")), daemon=True)
    holder.start()
    wait_until(lambda: (a.directory / "held-GET").exists(), what="A holding a GET")
    assert get(address) == b""                  # no slot within 1 s: closed
    router.wait_for_log(r"no slot within 1 seconds \(--fastrouter-node-queue-wait\)")
    for pid in node_pids(a):
        os.kill(pid, signal.SIGKILL)
    holder.join(60)
    assert held == [b""]      # the only node is gone: nothing to send it to
