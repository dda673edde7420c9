"""Every mapper end to end, as one process and under the master.

Each case starts the router with one mapper, as a new user would write it, sends real
requests through it to a real backend and checks the answers; then checks that no
router process died on the way (no respawn line, the same children as at start).  Every
mapper runs as one process, under ``--master`` and under ``--master
--fastrouter-processes 2``.  ``--fastrouter-use-socket`` needs ``--socket``, which
always runs a master (the app workers need one), so it has only the two master modes.
"""

from __future__ import annotations

import contextlib
from typing import Callable, List, Optional

import pytest

from backends import RecordingBackend, request
from support import sock_path, start_router, wait_applied_everywhere, wait_until
from test_codestring import SIMPLE
from test_local_app import APP
from test_master import children
from test_seed_mappers import key_request
from test_subscriptions import announce

MODES = {
    "single": [],
    "master": ["--master"],
    "master-2": ["--master", "--fastrouter-processes", "2"],
}


class Case:
    """What one mapper needs: its options, the key to send, the answer to expect."""

    def __init__(self, tmp_path, sock_dir, stack: contextlib.ExitStack) -> None:
        self.tmp_path = tmp_path
        self.sock_dir = sock_dir
        self.stack = stack
        self.args: List[str] = []
        self.key = b"example.com"
        self.expect = b"node=n"
        self.after_start: Optional[Callable] = None

    def backend(self, unix_name: Optional[str] = None) -> RecordingBackend:
        path = sock_path(self.sock_dir, unix_name) if unix_name else None
        return self.stack.enter_context(RecordingBackend("n", unix_path=path))


def static(case: Case) -> None:
    case.args = ["--fastrouter-to", case.backend().address]


def pattern(case: Case) -> None:
    node = case.backend("node.sock")
    case.args = ["--fastrouter-use-pattern", node.address.replace("node.sock", "%s.sock")]
    case.key = b"node"


def base(case: Case) -> None:
    node = case.backend("node.sock")
    case.args = ["--fastrouter-use-base", node.address[:-len("node.sock")]]
    case.key = b"node.sock"


def subscription(case: Case) -> None:
    node = case.backend()
    server = sock_path(case.sock_dir, "sub.sock")
    case.args = ["--fastrouter-subscription-server", server, "--fastrouter-stats", "127.0.0.1:0"]

    def subscribe(router, processes: int) -> None:
        announce(server, case.key, node.address.encode())
        # logged once (by the master, if any), applied by every process that keeps a table
        wait_applied_everywhere(router, r"example.com => new node")
        assert router.count(r"example.com => new node") == 1

    case.after_start = subscribe


def code_string(case: Case) -> None:
    node = case.backend()
    mapper = case.tmp_path / "mapper.py"
    mapper.write_text(SIMPLE.replace("127.0.0.1:3031", node.address))
    case.args = ["--fastrouter-use-code-string", "0:%s:get" % mapper]


def cache(case: Case) -> None:
    node = case.backend()
    script = case.tmp_path / "fill.py"
    script.write_text("import uwsgi\nuwsgi.cache_set('example.com', '%s')\n" % node.address)
    case.args = ["--fastrouter-use-cache", "--cache", "100", "--file", str(script)]


def use_socket(case: Case) -> None:
    app = case.tmp_path / "app.wsgi"
    app.write_text(APP)
    case.args = ["--socket", sock_path(case.sock_dir, "app.sock"), "--wsgi-file", str(app),
                 "--fastrouter-use-socket"]
    case.expect = b"local app host=example.com"


MAPPERS = [static, pattern, base, subscription, code_string, cache, use_socket]
CASES = [pytest.param(mapper, mode, id="%s-%s" % (mapper.__name__, mode))
         for mapper in MAPPERS for mode in MODES
         if not (mapper is use_socket and mode == "single")]


def _children_if(pid: int, count: int) -> Optional[List[int]]:
    """The children of *pid*, sorted, when there are *count* of them; else None."""
    found = sorted(children(pid))
    return found if len(found) == count else None


@pytest.mark.parametrize("mapper, mode", CASES)
def test_every_mapper_serves_and_no_router_process_dies(mapper, mode, tmp_path, sock_dir):
    with contextlib.ExitStack() as stack:
        case = Case(tmp_path, sock_dir, stack)
        mapper(case)
        router = start_router(["--fastrouter", "127.0.0.1:0"] + case.args + MODES[mode])
        routers = 2 if mode == "master-2" else 1
        router.wait_for_log(r"spawned uWSGI fastrouter %d \(pid: \d+\)" % routers)
        if mapper is use_socket:
            router.wait_for_log(r"spawned uWSGI worker 1 \(pid: \d+\)")
        if case.after_start is not None:
            case.after_start(router, 1 if mode == "single" else 1 + routers)
        # the supervised children (a stats fetch may leave a short-lived extra one:
        # statsfork.py's intermediate process, which the master reaps at once)
        supervised = routers + (1 if mapper is use_socket else 0)
        started = wait_until(lambda: _children_if(router.pid, supervised),
                             what="the supervised children only") if mode != "single" else []
        for _ in range(6):
            answer = request(router.addresses[0], key_request(case.key))
            assert case.expect in answer, (answer, router.log()[-2000:])
        log = router.log()
        assert "DAMN" not in log and " died" not in log, log[-2000:]
        if mode != "single":
            wait_until(lambda: sorted(children(router.pid)) == started,     # nobody was respawned
                       what="the children started first, and no other")
        assert router.stop() == 0
