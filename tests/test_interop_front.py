"""End to end: --fastrouter-strip-magic-vars against a real uWSGI 2.0.31 node that honours
the magic vars, and --fastrouter-http-errors seen by plain uwsgi clients and through a
real nginx; each with and without --master."""

from __future__ import annotations

import socket

import pytest

from backends import RecordingBackend
from support import (
    free_dead_tcp_address,
    http_request,
    http_status_and_body,
    parse_http_response,
    request_vars,
    sock_path,
    start_nginx,
    start_router,
    start_uwsgi_app,
    uwsgi_request,
)

from uwsgi_fastrouter.httperrors import RESPONSES

pytestmark = pytest.mark.interop

GOOD_APP = '''\
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"the node's own app"]
'''

EVIL_APP = '''\
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"code chosen by the client ran"]
'''

MASTER = pytest.mark.parametrize("master", [False, True], ids=["single", "master"])


def router_args(master: bool, *args) -> list:
    return (["--master"] if master else []) + [str(a) for a in args]


# --------------------------------------------------------------------------- magic vars


@pytest.fixture
def node_and_evil_file(tmp_path):
    """A uWSGI 2.0.31 node with its app, and a file a client would like it to run."""
    node = start_uwsgi_app(tmp_path, GOOD_APP)
    evil = tmp_path / "evil.py"
    evil.write_text(EVIL_APP)
    return node, str(evil)


def attack(router, evil: str, appid: str) -> bytes:
    """Ask the node, through *router*, to load *evil* as a new app named *appid*."""
    raw = uwsgi_request(router.addresses[0], request_vars(
        "example.com", extra=[("UWSGI_FILE", evil), ("UWSGI_APPID", appid)]))
    status, body = http_status_and_body(raw)
    assert status == 200
    return body


@MASTER
def test_a_client_makes_a_node_run_its_file_unless_the_magic_vars_are_stripped(
        tmp_path, node_and_evil_file, master):
    node, evil = node_and_evil_file
    plain = start_router(router_args(master, "--fastrouter", sock_path(tmp_path, "plain.sock"),
                                     "--fastrouter-to", node.address))
    assert attack(plain, evil, "first") == b"code chosen by the client ran"
    node.wait_for_log(r"WSGI app \d+ \(mountpoint='first'\) ready")

    guarded = start_router(router_args(master, "--fastrouter", sock_path(tmp_path, "guarded.sock"),
                                       "--fastrouter-to", node.address,
                                       "--fastrouter-strip-magic-vars"))
    assert attack(guarded, evil, "second") == b"the node's own app"
    assert "mountpoint='second'" not in node.log()


@MASTER
def test_a_prefix_rule_strips_them_too(tmp_path, node_and_evil_file, master):
    node, evil = node_and_evil_file
    router = start_router(router_args(master, "--fastrouter", sock_path(tmp_path, "fr.sock"),
                                      "--fastrouter-to", node.address,
                                      "--fastrouter-strip-vars", "UWSGI_*"))
    assert attack(router, evil, "third") == b"the node's own app"
    assert "mountpoint='third'" not in node.log()


# --------------------------------------------------------------------------- HTTP errors


@pytest.fixture
def dead_and_silent_nodes():
    """A TCP address that refuses connects, and a TCP node that accepts (in the kernel's
    queue) but never answers; yields their ports as keys for --fastrouter-use-pattern."""
    dead, reserve = free_dead_tcp_address()
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    with reserve, silent:
        yield dead.rsplit(":", 1)[1], str(silent.getsockname()[1])


def pattern_router(tmp_path, master: bool, name: str, *extra):
    return start_router(router_args(master, "--fastrouter", sock_path(tmp_path, name),
                                    "--fastrouter-use-pattern", "127.0.0.1:%s",
                                    "--fastrouter-timeout", "1", *extra))


def ask(router, key) -> bytes:
    """A request with UWSGI_FASTROUTER_KEY *key*; with None, one with no key at all."""
    pairs = [(k, v) for k, v in request_vars(None) if k != "SERVER_NAME"]
    if key is not None:
        pairs.append(("UWSGI_FASTROUTER_KEY", key))
    return uwsgi_request(router.addresses[0], pairs, timeout=20)


@MASTER
def test_plain_clients_get_502_503_504(tmp_path, dead_and_silent_nodes, master):
    dead, silent = dead_and_silent_nodes
    router = pattern_router(tmp_path, master, "fr.sock", "--fastrouter-http-errors")
    with RecordingBackend("live") as live:
        live_key = live.address.rsplit(":", 1)[1]
        assert ask(router, dead) == RESPONSES[502]
        assert ask(router, None) == RESPONSES[503]        # no key at all
        assert ask(router, "a/b") == RESPONSES[503]       # a key the pattern refuses (D14)
        assert ask(router, silent) == RESPONSES[504]
        # the refusals touched nobody else
        assert b"node=live" in http_status_and_body(ask(router, live_key))[1]
    router.wait_for_log(r"all nodes failed")
    router.wait_for_log(r"timeout in state RELAY")


@MASTER
def test_without_the_option_every_failure_is_a_bare_close(tmp_path, dead_and_silent_nodes, master):
    dead, silent = dead_and_silent_nodes
    router = pattern_router(tmp_path, master, "fr.sock")
    assert ask(router, dead) == b""
    assert ask(router, "a/b") == b""
    assert ask(router, silent) == b""


NGINX_SERVER = """\
server_name _;
location /on/ {{
    include uwsgi_params;
    uwsgi_pass unix:{on};
}}
location /on-bad-key/ {{
    include uwsgi_params;
    uwsgi_param UWSGI_FASTROUTER_KEY "a/b";
    uwsgi_pass unix:{on};
}}
location /off/ {{
    include uwsgi_params;
    uwsgi_pass unix:{off};
}}
location /off-bad-key/ {{
    include uwsgi_params;
    uwsgi_param UWSGI_FASTROUTER_KEY "a/b";
    uwsgi_pass unix:{off};
}}
"""


@MASTER
def test_nginx_in_front_passes_the_routers_status_on(tmp_path, dead_and_silent_nodes, master):
    """nginx relays the router's answer to its client (its own uwsgi_intercept_errors is
    off); without the option it turns every bare close into its own 502."""
    dead, silent = dead_and_silent_nodes
    on = pattern_router(tmp_path, master, "on.sock", "--fastrouter-http-errors")
    off = pattern_router(tmp_path, master, "off.sock")
    nginx = start_nginx(tmp_path, NGINX_SERVER.format(on=on.addresses[0], off=off.addresses[0]))

    def get(path, host):
        status, _headers, body = http_request(nginx.address, "GET", path, host, timeout=20)
        return status, body

    assert get("/on/", dead) == (502, parse_http_response(RESPONSES[502])[2])
    assert get("/on-bad-key/", dead) == (503, parse_http_response(RESPONSES[503])[2])
    assert get("/on/", silent) == (504, parse_http_response(RESPONSES[504])[2])
    for path, host in (("/off/", dead), ("/off-bad-key/", dead), ("/off/", silent)):
        assert get(path, host)[0] == 502
    nginx.wait_for_log(r"upstream prematurely closed connection")
