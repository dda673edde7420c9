"""End to end with real uWSGI application servers behind the router.

Every test here also runs against the real uWSGI FastRouter (``ROUTER_UNDER_TEST=uwsgi``):
the expectations are the behaviour of uWSGI 2.0.31 that a drop-in replacement keeps.
The router always listens on a UNIX socket (uWSGI prints ``:0`` for port-0 binds).
"""

from __future__ import annotations

import hashlib
import re

import pytest

from support import (
    free_dead_tcp_address,
    http_status_and_body,
    json_answer,
    node_app_source,
    payload,
    request_vars,
    sock_path,
    start_router,
    start_uwsgi_app,
    uwsgi_request,
)

pytestmark = pytest.mark.interop


def ask(router, host, **kw):
    """GET / through *router* with HTTP_HOST *host*; the backend's JSON answer."""
    return json_answer(uwsgi_request(router.addresses[0], request_vars(host), **kw))


@pytest.fixture
def two_nodes(tmp_path):
    """Node A on a TCP port, node B on a UNIX socket."""
    a = start_uwsgi_app(tmp_path, node_app_source("A"), socket="127.0.0.1:0")
    b = start_uwsgi_app(tmp_path, node_app_source("B"))
    assert a.address.startswith("127.0.0.1:") and not a.address.endswith(":0")
    assert b.address.startswith("/")
    return a, b


@pytest.fixture
def keyed_nodes(sock_dir):
    """Two nodes listening on <dir>/<key>/uwsgi.sock, keys alpha.test and beta.test."""
    nodes = {}
    for key in ("alpha.test", "beta.test"):
        (sock_dir / key).mkdir()
        nodes[key] = start_uwsgi_app(sock_dir, node_app_source(key),
                                     socket=str(sock_dir / key / "uwsgi.sock"))
    return nodes


def test_static_nodes_round_robin(tmp_path, two_nodes):
    a, b = two_nodes
    router = start_router(["--fastrouter", sock_path(tmp_path, "fr.sock"),
                           "--fastrouter-to", a.address, "--fastrouter-to", b.address])
    seen = [ask(router, "example.com")["node"] for _ in range(6)]
    assert seen == ["A", "B", "A", "B", "A", "B"]


def test_static_nodes_pass_vars_unchanged(tmp_path, two_nodes):
    a, _ = two_nodes
    router = start_router(["--fastrouter", sock_path(tmp_path, "fr.sock"), "--fastrouter-to", a.address])
    doc = json_answer(uwsgi_request(router.addresses[0],
                                    request_vars("www.example.com:8080", path="/some/where")))
    assert doc["host"] == "www.example.com:8080"
    assert doc["path"] == "/some/where"
    assert doc["server_name"] == "localhost"


def test_use_pattern_routes_by_key(tmp_path, sock_dir, keyed_nodes):
    router = start_router(["--fastrouter", sock_path(tmp_path, "fr.sock"),
                           "--fastrouter-use-pattern", "%s/%%s/uwsgi.sock" % sock_dir])
    for host in ("alpha.test", "beta.test", "beta.test", "alpha.test"):
        doc = ask(router, host)
        assert doc["node"] == host
        assert doc["host"] == host


def test_key_precedence(tmp_path, sock_dir, keyed_nodes):
    router = start_router(["--fastrouter", sock_path(tmp_path, "fr.sock"),
                           "--fastrouter-use-pattern", "%s/%%s/uwsgi.sock" % sock_dir])
    addr = router.addresses[0]
    # SERVER_NAME alone is a key.
    only_server_name = [("REQUEST_METHOD", "GET"), ("PATH_INFO", "/"), ("SERVER_NAME", "beta.test")]
    assert json_answer(uwsgi_request(addr, only_server_name))["node"] == "beta.test"
    # HTTP_HOST beats SERVER_NAME (request_vars sends SERVER_NAME=localhost first).
    assert json_answer(uwsgi_request(addr, request_vars("alpha.test")))["node"] == "alpha.test"
    # UWSGI_FASTROUTER_KEY beats HTTP_HOST, wherever it is.
    forced = [("UWSGI_FASTROUTER_KEY", "beta.test")] + request_vars("alpha.test")
    doc = json_answer(uwsgi_request(addr, forced))
    assert doc["node"] == "beta.test" and doc["host"] == "alpha.test"


def test_no_key_and_unknown_key_are_closed_without_a_byte(tmp_path, sock_dir, keyed_nodes):
    router = start_router(["--fastrouter", sock_path(tmp_path, "fr.sock"),
                           "--fastrouter-use-pattern", "%s/%%s/uwsgi.sock" % sock_dir])
    addr = router.addresses[0]
    assert uwsgi_request(addr, [("REQUEST_METHOD", "GET"), ("PATH_INFO", "/")]) == b""
    assert uwsgi_request(addr, request_vars("nobody.test")) == b""
    # The router is still fine afterwards.
    assert ask(router, "alpha.test")["node"] == "alpha.test"


def test_use_base_routes_by_key(tmp_path, sock_dir):
    nodes = {key: start_uwsgi_app(sock_dir, node_app_source(key), socket=str(sock_dir / key))
             for key in ("alpha.test", "beta.test")}
    router = start_router(["--fastrouter", sock_path(tmp_path, "fr.sock"),
                           "--fastrouter-use-base", "%s/" % sock_dir])
    for host in ("beta.test", "alpha.test", "beta.test"):
        assert ask(router, host)["node"] == host
    assert set(nodes) == {"alpha.test", "beta.test"}


def test_use_pattern_in_ini_file_needs_double_percent(tmp_path, sock_dir, keyed_nodes):
    ini = tmp_path / "router.ini"
    ini.write_text("[uwsgi]\n"
                   "; a single percent-s would be replaced by this file's name\n"
                   "fastrouter = " + sock_path(tmp_path, "fr.sock") + "\n"
                   "fastrouter-use-pattern = " + str(sock_dir) + "/%%s/uwsgi.sock\n")
    router = start_router(["--ini", str(ini)], listeners=1)
    for host in ("alpha.test", "beta.test"):
        assert ask(router, host)["node"] == host


def test_single_percent_s_in_ini_file_is_the_file_name(tmp_path, sock_dir, keyed_nodes):
    # The pitfall the seed document warns about: %s in an ini file is the ini file's name,
    # so every request goes to <dir>/router.ini/uwsgi.sock, which does not exist.
    (tmp_path / "conf").mkdir()
    ini = tmp_path / "conf" / "router.ini"
    ini.write_text("[uwsgi]\n"
                   "fastrouter = " + sock_path(tmp_path, "fr.sock") + "\n"
                   "fastrouter-use-pattern = " + str(sock_dir) + "/%s/uwsgi.sock\n")
    router = start_router(["--ini", str(ini)], listeners=1)
    assert uwsgi_request(router.addresses[0], request_vars("alpha.test")) == b""
    (sock_dir / "router.ini").mkdir()
    start_uwsgi_app(sock_dir, node_app_source("ini-name"), socket=str(sock_dir / "router.ini" / "uwsgi.sock"))
    assert ask(router, "alpha.test")["node"] == "ini-name"


def test_large_upload_and_download_intact(tmp_path, two_nodes):
    a, b = two_nodes
    router = start_router(["--fastrouter", sock_path(tmp_path, "fr.sock"),
                           "--fastrouter-to", a.address, "--fastrouter-to", b.address])
    addr = router.addresses[0]
    body = payload(1024 * 1024, seed=b"upload")
    for _ in range(2):  # once through each node
        raw = uwsgi_request(addr, request_vars("example.com", method="POST", body_length=len(body)),
                            body=body, timeout=30)
        doc = json_answer(raw)
        assert doc["length"] == len(body)
        assert doc["sha256"] == hashlib.sha256(body).hexdigest()
    size = 5 * 1024 * 1024
    for _ in range(2):
        raw = uwsgi_request(addr, request_vars("example.com", path="/download/%d" % size), timeout=30)
        status, data = http_status_and_body(raw)
        assert status == 200
        assert len(data) == size
        assert data == payload(size)


def test_dead_static_node_is_skipped_after_its_first_failure(tmp_path, two_nodes):
    a, b = two_nodes
    dead, reserved = free_dead_tcp_address()
    with reserved:
        router = start_router(["--fastrouter", sock_path(tmp_path, "fr.sock"),
                               "--fastrouter-to", a.address, "--fastrouter-to", dead,
                               "--fastrouter-to", b.address])
        seen = [ask(router, "example.com")["node"] for _ in range(6)]
        assert seen == ["A", "B", "A", "B", "A", "B"]
        router.wait_for_log(r'unable to connect\(\) to node "%s"' % re.escape(dead))
        router.wait_for_log(r"marking %s as failed" % re.escape(dead))
        assert router.count(r'unable to connect\(\) to node "%s"' % re.escape(dead)) == 1


def test_all_static_nodes_dead_closes_the_request(tmp_path):
    dead, reserved = free_dead_tcp_address()
    with reserved:
        router = start_router(["--fastrouter", sock_path(tmp_path, "fr.sock"), "--fastrouter-to", dead])
        assert uwsgi_request(router.addresses[0], request_vars("example.com")) == b""
        router.wait_for_log(r'unable to connect\(\) to node "%s"' % re.escape(dead))


def test_fallback_rescues_a_request_to_a_dead_node(tmp_path, two_nodes):
    a, _ = two_nodes
    dead, reserved = free_dead_tcp_address()
    with reserved:
        router = start_router(["--fastrouter", sock_path(tmp_path, "fr.sock"),
                               "--fastrouter-to", dead, "--fastrouter-fallback", a.address])
        assert ask(router, "example.com")["node"] == "A"
        router.wait_for_log(r'unable to connect\(\) to node "%s"' % re.escape(dead))
        router.wait_for_log(r"marking %s as failed" % re.escape(dead))


def test_router_on_tcp_and_abstract_listeners(tmp_path, two_nodes):
    a, _ = two_nodes
    abstract = "@ufr-test-%d" % id(tmp_path)
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter", abstract,
                           "--fastrouter-to", a.address])
    tcp_addr, abstract_addr = router.addresses
    assert re.match(r"127\.0\.0\.1:[1-9]\d*$", tcp_addr), tcp_addr
    assert abstract_addr == abstract
    for addr in router.addresses:
        assert json_answer(uwsgi_request(addr, request_vars("example.com")))["node"] == "A"
