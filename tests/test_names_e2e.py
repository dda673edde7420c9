"""Host names end to end: ``localhost`` as a static node, as a subscription server our
subscriber announces to, and as the address a real uWSGI 2.0.31 node announces; with
and without --master."""

from __future__ import annotations

import pytest

from backends import RecordingBackend, request
from support import (sock_path, start_router, start_uwsgi_app, udp_subscription_address,
                     wait_applied_everywhere)
from test_subscriptions import APP, HOST, served_by

MASTER = pytest.mark.parametrize("master", [[], ["--master"]], ids=["single", "master"])
RESOLVED = r"host name localhost resolves to 127\.0\.0\.1"


@MASTER
def test_fastrouter_to_localhost_reaches_the_node(master):
    with RecordingBackend("a") as backend:
        port = backend.address.rsplit(":", 1)[1]
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", "localhost:" + port,
                               "--fastrouter-stats", "127.0.0.1:0", *master])
        router.wait_for_log(RESOLVED)
        assert [served_by(router.addresses[0]) for _ in range(3)] == ["a"] * 3
        assert "unable to connect" not in router.log()


@MASTER
def test_a_fallback_given_as_localhost_rescues_a_dead_node(master):
    dead = "127.0.0.1:9"                  # the discard port: nothing listens there
    with RecordingBackend("fb") as backend:
        port = backend.address.rsplit(":", 1)[1]
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", dead,
                               "--fastrouter-fallback", "localhost:" + port, *master])
        router.wait_for_log(RESOLVED)
        assert served_by(router.addresses[0]) == "fb"


@MASTER
def test_our_subscriber_announces_to_a_server_given_by_name(master):
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-stats", "127.0.0.1:0",
                           "--fastrouter-subscription-server", "127.0.0.1:0", *master])
    sub_port = int(udp_subscription_address(router).rsplit(":", 1)[1])
    with RecordingBackend("g") as backend:
        announcer = start_router(["--subscribe-to", "%s=localhost:%d:example.com"
                                  % (backend.address, sub_port), "--subscribe-freq", "1", *master],
                                 listeners=0)
        announcer.wait_for_log(RESOLVED)
        wait_applied_everywhere(router, r"example.com => new node: %s" % backend.address)
        assert served_by(router.addresses[0]) == "g"
        assert announcer.stop() == 0            # the unsubscribe goes to the name's address too
        router.wait_for_log(r"example.com => marking %s as failed" % backend.address)


@pytest.mark.interop
@MASTER
def test_a_real_uwsgi_node_and_our_named_subscriber_share_the_router(tmp_path, master):
    """The uWSGI node announces its IP (2.0.31 takes no names); our subscriber reaches the
    same subscription server by name."""
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-stats", "127.0.0.1:0",
                           "--fastrouter-subscription-server", "127.0.0.1:0", *master])
    sub_port = int(udp_subscription_address(router).rsplit(":", 1)[1])
    app = start_uwsgi_app(tmp_path, APP, socket="127.0.0.1:0",
                          extra=["--subscribe-to", "127.0.0.1:%d:uwsgi.test" % sub_port])
    with RecordingBackend("ours") as backend:
        start_router(["--subscribe-to", "%s=localhost:%d:example.com" % (backend.address, sub_port),
                      "--subscribe-freq", "1", *master], listeners=0)
        wait_applied_everywhere(router, r"uwsgi.test => new node: %s" % app.address)
        wait_applied_everywhere(router, r"example.com => new node: %s" % backend.address)
        assert b"uwsgi-app host=uwsgi.test" in request(router.addresses[0],
                                                       [(b"HTTP_HOST", b"uwsgi.test")])
        assert served_by(router.addresses[0]) == "ours"


@pytest.mark.interop
def announce_by_name(tmp_path, sub: str) -> int:
    """A real uWSGI node on a port of its own choosing (port 0), announced to the
    subscription server *sub* as ``localhost:PORT`` by a second real uWSGI instance
    (uWSGI's ``addr=``); the node's port."""
    node = start_uwsgi_app(tmp_path, APP, socket="127.0.0.1:0")
    node_port = int(node.address.rsplit(":", 1)[1])
    start_uwsgi_app(tmp_path, APP, socket="127.0.0.1:0",
                    extra=["--subscribe2", "server=%s,key=example.com,addr=localhost:%d"
                           % (sub, node_port)])
    return node_port


@MASTER
def test_a_name_a_real_uwsgi_node_announces_is_resolved_when_allowed(tmp_path, master):
    sub = sock_path(tmp_path, "sub.sock")
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-stats", "127.0.0.1:0",
                           "--fastrouter-subscription-server", sub,
                           "--subscription-resolve-names", *master])
    node_port = announce_by_name(tmp_path, sub)
    # the first announce starts the lookup; a later one (10 s apart) adds the node
    wait_applied_everywhere(router, r"example.com => new node: 127\.0\.0\.1:%d" % node_port,
                            timeout=40)
    assert b"uwsgi-app host=example.com" in request(router.addresses[0], HOST)


@pytest.mark.interop
def test_without_the_option_an_announced_name_is_a_node_that_cannot_be_reached(tmp_path):
    """As in uWSGI: the name is the node's address, and its connect fails (logged)."""
    sub = sock_path(tmp_path, "sub.sock")
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-subscription-server", sub])
    node_port = announce_by_name(tmp_path, sub)
    router.wait_for_log(r"example.com => new node: localhost:%d" % node_port)
    assert request(router.addresses[0], HOST) == b""
    router.wait_for_log(r"the host name 'localhost' has no known address")
    assert "resolves to" not in router.log()
