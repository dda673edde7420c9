"""A client's key never leads use-pattern or use-base out of their directory (D14).

Every test puts "secret" UNIX nodes where a key with ``/``, ``.``, ``..`` or a
control byte would lead the router, sends such keys (as HTTP_HOST, SERVER_NAME
and UWSGI_FASTROUTER_KEY) and checks that no secret node was even connected to,
that the client got the usual close (or the fallback's answer with
``--fastrouter-fallback-on-no-key``), that each refusal was logged with the key
escaped, and that a plain key on the same router is still served.  Single process
and under ``--master``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from backends import FdTakingBackend, RecordingBackend, request
from support import start_router

MODES = {
    "single": [],
    "master": ["--master", "--fastrouter-processes", "2"],
}


def _host(key: bytes):
    return [(b"HTTP_HOST", key)]


def _nodes(paths):
    """A RecordingBackend on each UNIX path (directories created), by path."""
    nodes = {}
    for path in paths:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        nodes[path] = RecordingBackend("secret", unix_path=str(path))
    return nodes


def _pattern_layout(root: Path):
    """use-pattern ROOT/base/%s/uwsgi.sock: where each bad key would lead, and the good node."""
    option = ["--fastrouter-use-pattern", "%s/base/%%s/uwsgi.sock" % root]
    good = root / "base" / "good" / "uwsgi.sock"
    secrets = {
        b"../outside": root / "outside" / "uwsgi.sock",
        b"..": root / "uwsgi.sock",
        b".": root / "base" / "uwsgi.sock",
        b"x/y": root / "base" / "x" / "y" / "uwsgi.sock",
    }
    return "--fastrouter-use-pattern", option, good, b"good", secrets


def _base_layout(root: Path):
    """use-base ROOT/base/: where each bad key would lead, and the good node."""
    option = ["--fastrouter-use-base", "%s/base/" % root]
    good = root / "base" / "good.sock"
    secrets = {
        b"../outside/secret.sock": root / "outside" / "secret.sock",
        b"x/y": root / "base" / "x" / "y",
    }
    return "--fastrouter-use-base", option, good, b"good.sock", secrets


LAYOUTS = {"pattern": _pattern_layout, "base": _base_layout}


def _bad_requests(secrets):
    """(vars, key as logged) of every bad request: each key as HTTP_HOST, the first one
    also as SERVER_NAME and as UWSGI_FASTROUTER_KEY (which wins over a good HTTP_HOST),
    and keys with a NUL, a newline, an escape and DEL, and '.' and '..'."""
    keys = list(secrets)
    for extra in (b".", b"..", b"a\x00b", b"a\n[uwsgi-fastrouter] forged", b"\x1b[2Jx", b"x\x7f"):
        if extra not in keys:
            keys.append(extra)
    out = [(_host(key), key) for key in keys]
    first = keys[0]
    out.append(([(b"SERVER_NAME", first)], first))
    out.append(([(b"HTTP_HOST", b"good"), (b"UWSGI_FASTROUTER_KEY", first)], first))
    return out


def _escaped(key: bytes) -> str:
    return "".join("\\x%02x" % b if b < 0x20 or b == 0x7f else chr(b) for b in key)


@pytest.mark.parametrize("fallback", [False, True], ids=["close", "fallback"])
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_keys_that_are_not_plain_file_names_reach_no_node(sock_dir, layout, mode, fallback):
    option, args, good_path, good_key, secrets = LAYOUTS[layout](sock_dir)
    nodes = _nodes(list(secrets.values()) + [good_path])
    good = nodes.pop(good_path)
    spare = RecordingBackend("fallback")
    try:
        extra = ["--fastrouter-fallback", spare.address, "--fastrouter-fallback-on-no-key"] if fallback else []
        router = start_router(["--fastrouter", "127.0.0.1:0", *args, *MODES[mode], *extra])
        address = router.addresses[0]
        bad = _bad_requests(secrets)
        for pairs, key in bad:
            answer = request(address, pairs)
            if fallback:
                assert answer.startswith(b"HTTP/1.0 200") and b"node=fallback" in answer, (key, answer)
            else:
                assert answer == b"", (key, answer)
            router.wait_for_log(re.escape('key "%s" is not a plain file name: no route for %s'
                                          % (_escaped(key), option)))
        # the plain key still works on the same router
        assert request(address, _host(good_key)).startswith(b"HTTP/1.0 200")
        assert good.count == 1
        assert spare.count == (len(bad) if fallback else 0)
        for path, node in nodes.items():
            assert node.accept_times == [], "the router connected to %s" % path
        text = router.log()
        assert "\\x0a[uwsgi-fastrouter] forged" in text
        assert not any(line.startswith("[uwsgi-fastrouter] forged") for line in text.splitlines())
        assert "\x1b" not in text and "\x00" not in text
    finally:
        spare.stop()
        good.stop()
        for node in nodes.values():
            node.stop()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_refused_key_never_gets_the_client_descriptor(sock_dir, mode):
    """A bodyless request would be handed over with its descriptor: not to such a path."""
    (sock_dir / "base").mkdir()
    (sock_dir / "outside").mkdir()
    secret = FdTakingBackend(str(sock_dir / "outside" / "secret.sock"))
    good = FdTakingBackend(str(sock_dir / "base" / "good.sock"))
    try:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-use-base",
                               "%s/base/" % sock_dir, *MODES[mode]])
        bodyless = [(b"CONTENT_LENGTH", b"0")]
        for key in (b"../outside/secret.sock", b"good.sock/../../outside/secret.sock"):
            assert request(router.addresses[0], _host(key) + bodyless) == b""
            assert request(router.addresses[0], [(b"UWSGI_FASTROUTER_KEY", key)] + bodyless) == b""
        assert (secret.taken, secret.relayed, secret.ancillary_seen) == (0, 0, 0)
        assert request(router.addresses[0], _host(b"good.sock") + bodyless).startswith(b"HTTP/1.0 200 OK")
        assert good.taken == 1
        router.wait_for_log(r'key "\.\./outside/secret\.sock" is not a plain file name')
    finally:
        secret.stop()
        good.stop()


def test_a_forced_key_is_the_operators_and_may_name_a_subdirectory(sock_dir):
    (sock_dir / "base" / "sub").mkdir(parents=True)
    with RecordingBackend("forced", unix_path=str(sock_dir / "base" / "sub" / "node.sock")) as node:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-use-base", "%s/base/" % sock_dir,
                               "--fastrouter-force-key", "sub/node.sock"])
        assert request(router.addresses[0], _host(b"../whatever")).startswith(b"HTTP/1.0 200")
        assert node.count == 1
        assert "not a plain file name" not in router.log()

