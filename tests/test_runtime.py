"""The runtime builder's pieces in-process: the checks, the record of bound sockets, the
document-only stats and metrics modules, and defaults kept in the option table."""

from __future__ import annotations

import ast
import os
import re
import socket
from pathlib import Path

import pytest

from uwsgi_fastrouter import options
from uwsgi_fastrouter.binding import Bindings
from uwsgi_fastrouter.options import StartupError, load_config
from uwsgi_fastrouter.validation import chmod_mode, skip_uids, subscribe_modifier1, validate

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "uwsgi_fastrouter"


def load(argv):
    return load_config(argv, {}, warn=lambda line: None)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("argv, message", [
    ([], "no --fastrouter address given: nothing to route (example: --fastrouter 127.0.0.1:3017)"),
    (["--fastrouter", ":0", "--chmod-socket=rw"],
     'invalid value for option "chmod-socket": \'rw\' is not an octal mode'),
    (["--fastrouter", ":0", "--subscriptions-sign-skip-uid", "root"],
     'option "--subscriptions-sign-skip-uid": not a number'),
    (["--fastrouter", ":0", "--subscribe-to", "127.0.0.1:1:k", "--subscribe-with-modifier1", "x"],
     'option "--subscribe-with-modifier1": not a number'),
    (["--fastrouter", ":0", "--fastrouter-access-log-format", "%(nope)"], None),
    (["--fastrouter", ":0"] + [arg for i in range(257) for arg in ("--fastrouter-to", "n%d:1" % i)],
     "--fastrouter-to and --fastrouter-fallback name 257 host names; at most 256 can be looked up"),
])
def test_each_cross_option_check_names_its_option(argv, message):
    with pytest.raises(StartupError) as caught:
        validate(load(argv))
    if message is not None:
        assert str(caught.value) == message
    else:
        assert "nope" in str(caught.value)


def test_checked_values_are_read_one_way():
    cfg = load(["--fastrouter", ":0", "--chmod-socket", "--subscriptions-sign-skip-uid", "7",
                "--subscribe-to", "127.0.0.1:1:k", "--subscribe-with-modifier1", "300"])
    validate(cfg)
    assert chmod_mode(cfg) == 0o666            # bare: the table's bare value
    assert skip_uids(cfg) == [7]
    assert subscribe_modifier1(cfg) == 300 % 256
    assert chmod_mode(load(["--fastrouter", ":0"])) is None


# ---------------------------------------------------------------- bindings

def test_bindings_cross_a_reexec_by_role(sock_dir):
    cfg = load(["--fastrouter", "127.0.0.1:0", "--fastrouter", os.path.join(sock_dir, "r.sock"),
                "--fastrouter-subscription-server", os.path.join(sock_dir, "sub.sock"),
                "--fastrouter-stats", "127.0.0.1:0", "--shared-socket", "127.0.0.1:0",
                "--socket", "=0"])
    bound = Bindings.bind(cfg, chmod_mode(cfg))
    adopted = None
    try:
        assert [l.name for l in bound.app] == [bound.shared[0].name]
        assert bound.master_only() == bound.datagram + [bound.stats]
        state = bound.inheritable_state()
        # The next image gets the same descriptors; here, copies of them.
        for entry in state["sockets"]:
            entry[2] = os.dup(entry[2])
        adopted = Bindings.adopt(state)
        for role in ("listeners", "datagram", "shared", "app"):
            assert [x.name for x in getattr(adopted, role)] == [x.name for x in getattr(bound, role)], role
        assert adopted.stats.name == bound.stats.name
        assert adopted.metrics is None and adopted.zerg_server is None
        # An adopted listener still accepts.
        host, port = adopted.listeners[0].sock.getsockname()
        with socket.create_connection((host, port), timeout=5):
            pass
    finally:
        if adopted is not None:
            for item in adopted.owned:
                item.close(unlink=False)
        bound.close_all()
    assert not os.path.exists(os.path.join(sock_dir, "r.sock"))


def test_a_bind_failure_names_the_option_and_closes_what_was_bound(sock_dir):
    path = os.path.join(sock_dir, "first.sock")
    cfg = load(["--fastrouter", path, "--fastrouter-stats", "=7"])
    with pytest.raises(StartupError) as caught:
        Bindings.bind(cfg, None)
    assert str(caught.value).startswith('option "--fastrouter-stats": ')
    assert not os.path.exists(path)


# ------------------------------------------------------------ module shape

def _own_imports(name: str) -> set:
    tree = ast.parse((PACKAGE_DIR / (name + ".py")).read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                found.add((node.module or "").split(".")[0])
            elif node.module:
                found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
    return found


@pytest.mark.parametrize("name", ["stats", "metrics"])
def test_the_documents_do_no_io(name):
    assert not _own_imports(name) & {"reactor", "acceptor", "sockets", "socket", "selectors", "endpoints"}


def test_no_use_site_restates_a_default():
    # uWSGI's "0 means the default" is applied when the configuration is loaded.
    pattern = re.compile(r"\bcfg\.([a-z_0-9]+) or ([0-9]|\"[^\"])")   # "" is None made empty
    found = []
    for path in PACKAGE_DIR.glob("*.py"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            found += ["%s:%d: %s" % (path.name, number, line.strip()) for _ in pattern.finditer(line)]
    assert found == []
    assert [o.name for o in options.OPTIONS if o.zero_means is not None]


def test_the_frame_codec_takes_a_stream_in_any_pieces():
    from uwsgi_fastrouter.frames import FAILED, READY, FrameReader, encode_frame
    stream = encode_frame(READY, b"") + encode_frame(FAILED, b"key\0127.0.0.1:1")
    reader = FrameReader()
    frames = []
    for at in range(len(stream)):
        frames += reader.feed(stream[at:at + 1])
    assert frames == [(READY, b""), (FAILED, b"key\0127.0.0.1:1")]
    assert "frames" in {n for n in _own_imports("master")}
    assert not _own_imports("frames") - {"__future__", "marshal", "struct", "typing"}


@pytest.mark.parametrize("mode", [[], ["--master"]], ids=["single", "master"])
def test_a_bad_combination_stops_the_start_before_anything_is_bound(sock_dir, mode):
    from support import Proc, router_argv, wait_until
    proc = Proc(router_argv(mode + ["--fastrouter", os.path.join(sock_dir, "r.sock"),
                                    "--subscribe-to", "127.0.0.1:9:example.com",
                                    "--subscribe-with-modifier1", "five"]))
    wait_until(lambda: not proc.alive(), timeout=20, what="the router to give up")
    assert proc.returncode == 1
    log = proc.log()
    assert 'option "--subscribe-with-modifier1": not a number' in log
    assert "bound on" not in log and "Traceback" not in log
