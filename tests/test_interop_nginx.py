"""End to end: real nginx (uwsgi_pass) -> router -> real uWSGI application servers.

nginx listens on a UNIX socket in the test's directory and passes every request to the
router, which picks the backend from the Host header (HTTP_HOST) with use-pattern or
use-base.  Also run against the real uWSGI FastRouter (``ROUTER_UNDER_TEST=uwsgi``).
"""

from __future__ import annotations

import hashlib
import json

import pytest

from support import (
    http_get,
    http_request,
    node_app_source,
    payload,
    sock_path,
    start_nginx,
    start_router,
    start_uwsgi_app,
)

pytestmark = pytest.mark.interop

HOSTS = ("alpha.test", "beta.test")


def nginx_in_front_of(tmp_path, router):
    return start_nginx(tmp_path, """\
server_name %s;
client_max_body_size 16m;
location / {
    include uwsgi_params;
    uwsgi_pass unix:%s;
}
""" % (" ".join(HOSTS), router.addresses[0]))


@pytest.fixture
def pattern_stack(tmp_path, sock_dir):
    """nginx -> router (use-pattern <dir>/%s/uwsgi.sock) -> one uWSGI node per host."""
    for host in HOSTS:
        (sock_dir / host).mkdir()
        start_uwsgi_app(sock_dir, node_app_source(host), socket=str(sock_dir / host / "uwsgi.sock"))
    router = start_router(["--fastrouter", sock_path(tmp_path, "fr.sock"),
                           "--fastrouter-use-pattern", "%s/%%s/uwsgi.sock" % sock_dir])
    return nginx_in_front_of(tmp_path, router)


def test_host_header_picks_the_node(pattern_stack):
    for host in ("alpha.test", "beta.test", "alpha.test", "beta.test"):
        status, headers, body = http_get(pattern_stack.address, "/hello", host)
        assert status == 200, body[:300]
        doc = json.loads(body)
        assert doc["node"] == host
        assert doc["host"] == host
        assert doc["path"] == "/hello"
        assert headers.get("x-node") == host


def test_unknown_host_is_a_bad_gateway(pattern_stack):
    # The router closes without a byte; nginx turns that into 502.
    status, _, _ = http_get(pattern_stack.address, "/", "nobody.test")
    assert status == 502
    status, _, body = http_get(pattern_stack.address, "/", "alpha.test")
    assert status == 200 and json.loads(body)["node"] == "alpha.test"


def test_upload_and_download_through_nginx(pattern_stack):
    body = payload(1024 * 1024, seed=b"nginx-upload")
    status, _, answer = http_request(pattern_stack.address, "POST", "/upload", "beta.test",
                                     body=body, timeout=30)
    assert status == 200, answer[:300]
    doc = json.loads(answer)
    assert doc["node"] == "beta.test"
    assert doc["length"] == len(body)
    assert doc["sha256"] == hashlib.sha256(body).hexdigest()

    size = 2 * 1024 * 1024
    status, headers, data = http_get(pattern_stack.address, "/download/%d" % size, "alpha.test",
                                     timeout=30)
    assert status == 200
    assert headers.get("x-node") == "alpha.test"
    assert len(data) == size
    assert data == payload(size)


def test_use_base_behind_nginx(tmp_path, sock_dir):
    for host in HOSTS:
        start_uwsgi_app(sock_dir, node_app_source(host), socket=str(sock_dir / host))
    router = start_router(["--fastrouter", sock_path(tmp_path, "fr.sock"),
                           "--fastrouter-use-base", "%s/" % sock_dir])
    nginx = nginx_in_front_of(tmp_path, router)
    for host in ("beta.test", "alpha.test"):
        status, _, body = http_get(nginx.address, "/", host)
        assert status == 200, body[:300]
        assert json.loads(body)["node"] == host
