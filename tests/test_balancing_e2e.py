"""uWSGI 2.1's balancing end to end: backup nodes taking over from real uWSGI apps,
iphash / --fastrouter-hash-var stickiness, mountpoints, and a real uWSGI 2.0 router
accepting our subscriber's packets with the 2.1 fields."""

from __future__ import annotations

import pytest

from backends import RecordingBackend, request
from support import (
    BIND_RE, Proc, fetch_stats, json_answer, node_app_source, request_vars, sock_path, start_router,
    start_uwsgi_app, uwsgi_bin, uwsgi_request, wait_until,
)
from test_subscriptions import announce, served_by, sub_router as _sub_router

MASTER = pytest.mark.parametrize("master", [[], ["--master"]], ids=["single", "master"])


def sub_router(tmp_path, *extra):
    """A subscription router with a stats server: under a master, a stats document asked
    for after an event the master logged comes back only once every router process has
    applied it (support.wait_applied_everywhere)."""
    return _sub_router(tmp_path, "--fastrouter-stats", "127.0.0.1:0", *extra)


def seen(router, regex: str, count: int = 1) -> None:
    """The subscription event *regex* logged *count* times, and applied by every process."""
    router.wait_for_log(regex, count=count)
    fetch_stats(router.stats_address)


def node_of(router, host: str = "example.com", path: str = "/", extra=()) -> str:
    """The NODE name of the real uWSGI app that answered a GET for *host* *path*."""
    raw = uwsgi_request(router.addresses[0], request_vars(host, path, extra=extra))
    return json_answer(raw)["node"]


def subscriber(server: str, key: str, address: str, *fields: str):
    """Our program as a subscriber process only, announcing *address* every second."""
    spec = ",".join(["server=%s" % server, "key=%s" % key, "addr=%s" % address] + list(fields))
    return start_router(["--subscribe2", spec, "--subscribe-freq", "1"], listeners=0)


# ---------------------------------------------------------------------------
# Backup levels


@pytest.mark.interop
@MASTER
def test_a_backup_node_takes_over_while_the_primary_is_down(sock_dir, master):
    router, sub = sub_router(sock_dir, *master)
    primary_socket = sock_path(sock_dir, "primary.sock")

    def start_primary():
        return start_uwsgi_app(sock_dir, node_app_source("primary"), socket=primary_socket,
                               extra=["--subscribe-to", "%s:example.com" % sub])

    primary = start_primary()
    seen(router, r"example.com => new node: %s" % primary_socket)
    backup = start_uwsgi_app(sock_dir, node_app_source("backup"))
    announcer = subscriber(sub, "example.com", backup.address, "backup=1")
    seen(router, r"example.com => new node: %s" % backup.address)
    assert {node_of(router) for _ in range(6)} == {"primary"}
    primary.stop()                  # a uWSGI node unsubscribes when it stops
    seen(router, r"example.com => marking %s as failed" % primary_socket)
    assert {node_of(router) for _ in range(6)} == {"backup"}
    start_primary()
    seen(router, r"example.com => new node: %s" % primary_socket, count=2)
    wait_until(lambda: node_of(router) == "primary", what="traffic back on the primary")
    assert {node_of(router) for _ in range(6)} == {"primary"}
    assert announcer.stop() == 0


@MASTER
def test_a_killed_primary_is_replaced_by_the_backup_at_once(sock_dir, master):
    """The primary dies without a word: the failed connect marks it, the same request is
    retried on the backup level."""
    router, sub = sub_router(sock_dir, *master)
    backup = RecordingBackend("backup")
    primary = RecordingBackend("primary")
    with backup, primary:
        announce(sub, b"example.com", primary.address.encode())
        announce(sub, b"example.com", backup.address.encode(), extra=[(b"backup", b"1")])
        seen(router, r"new node: %s" % backup.address)
        assert {served_by(router.addresses[0]) for _ in range(6)} == {"primary"}
        primary.stop()
        assert {served_by(router.addresses[0]) for _ in range(6)} == {"backup"}


# ---------------------------------------------------------------------------
# iphash and --fastrouter-hash-var


def three_nodes_router(sock_dir, master, *extra):
    router, sub = sub_router(sock_dir, *master, *extra)
    nodes = [RecordingBackend(name) for name in ("a", "b", "c")]
    for node in nodes:
        announce(sub, b"example.com", node.address.encode())
        seen(router, r"new node: %s" % node.address)
    return router, sub, nodes


def served_for(router, pairs) -> str:
    answer = request(router.addresses[0], [(b"HTTP_HOST", b"example.com")] + pairs)
    return answer.split(b"node=")[1].split(b" ")[0].decode()


@MASTER
def test_iphash_sends_a_client_always_to_the_same_node(sock_dir, master):
    router, _, nodes = three_nodes_router(sock_dir, master, "--subscription-algo", "iphash")
    try:
        clients = [b"203.0.113.%d" % i for i in range(1, 32)]  # 31: not a multiple of 3
        first = {c: served_for(router, [(b"REMOTE_ADDR", c)]) for c in clients}
        for _ in range(3):
            assert {c: served_for(router, [(b"REMOTE_ADDR", c)]) for c in clients} == first
        assert len(set(first.values())) == 3     # the clients are spread over the nodes
    finally:
        for node in nodes:
            node.stop()


def test_the_key_chooses_iphash_in_its_first_announce(sock_dir):
    router, sub = sub_router(sock_dir)
    with RecordingBackend("a") as a, RecordingBackend("b") as b:
        announce(sub, b"example.com", a.address.encode(), extra=[(b"algo", b"iphash")])
        announce(sub, b"example.com", b.address.encode(), extra=[(b"algo", b"iphash")])
        seen(router, r"new node: %s" % b.address)
        for client in (b"192.0.2.1", b"192.0.2.2", b"192.0.2.3", b"192.0.2.4"):
            assert len({served_for(router, [(b"REMOTE_ADDR", client)]) for _ in range(4)}) == 1


@MASTER
def test_hash_var_sticks_a_cookie_to_a_node(sock_dir, master):
    router, _, nodes = three_nodes_router(sock_dir, master, "--subscription-algo", "iphash",
                                          "--fastrouter-hash-var", "HTTP_COOKIE")
    try:
        cookies = [b"sid=%d" % i for i in range(30)]
        # the same cookie from ever-changing addresses
        first = {c: served_for(router, [(b"HTTP_COOKIE", c), (b"REMOTE_ADDR", b"10.0.0.1")])
                 for c in cookies}
        again = {c: served_for(router, [(b"HTTP_COOKIE", c), (b"REMOTE_ADDR", b"10.9.%d.1" % i)])
                 for i, c in enumerate(cookies)}
        assert again == first and len(set(first.values())) == 3
    finally:
        for node in nodes:
            node.stop()


def test_a_bad_algo_in_a_packet_is_dropped_and_others_still_served(sock_dir):
    router, sub = sub_router(sock_dir)
    with RecordingBackend("a") as a, RecordingBackend("b") as b:
        announce(sub, b"bad.example", b.address.encode(), extra=[(b"algo", b"roundrobin")])
        router.wait_for_log(r"unknown algo b?'roundrobin' for bad.example")
        announce(sub, b"example.com", a.address.encode(), extra=[(b"backup", b"-1")])
        router.wait_for_log(r"invalid backup value")
        announce(sub, b"example.com", a.address.encode())
        seen(router, r"new node: %s" % a.address)
        assert served_by(router.addresses[0]) == "a"
        assert request(router.addresses[0], [(b"HTTP_HOST", b"bad.example")]) == b""


# ---------------------------------------------------------------------------
# Mountpoints


@MASTER
def test_mountpoints_route_by_host_and_first_path_segment(sock_dir, master):
    router, sub = sub_router(sock_dir, *master, "--subscription-mountpoints", "1")
    with RecordingBackend("app1") as app1, RecordingBackend("app2") as app2, \
            RecordingBackend("root") as root:
        for key, node in ((b"example.com/app1", app1), (b"example.com/app2", app2),
                          (b"example.com", root)):
            announce(sub, key, node.address.encode())
            seen(router, r"new node: %s" % node.address)

        def served(path: bytes) -> str:
            return served_for(router, [(b"PATH_INFO", path)])

        assert served(b"/app1/x") == "app1" and served(b"/app2/y") == "app2"
        assert served(b"/other") == "root" and served(b"/") == "root"
        assert served(b"/app1") == "app1"
        assert app1.requests[0].vars[b"PATH_INFO"] == b"/app1/x"   # passed unchanged


@pytest.mark.interop
def test_one_port_many_apps_by_path_with_real_uwsgi_apps(sock_dir):
    """The pip-only set-up: uWSGI apps subscribe as host/path, one router port."""
    router, sub = sub_router(sock_dir, "--subscription-mountpoint", "1")
    for name in ("app1", "app2"):
        start_uwsgi_app(sock_dir, node_app_source(name),
                        extra=["--subscribe-to", "%s:example.com/%s" % (sub, name)])
        seen(router, r"example.com/%s => new node" % name)
    start_uwsgi_app(sock_dir, node_app_source("root"), extra=["--subscribe-to", "%s:example.com" % sub])
    seen(router, r"\] example.com => new node")
    assert node_of(router, path="/app1/x") == "app1"
    assert node_of(router, path="/app2/y") == "app2"
    assert node_of(router, path="/other") == "root"


# ---------------------------------------------------------------------------
# A uWSGI 2.0 router and our 2.1 fields


@pytest.mark.interop
def test_a_uwsgi_20_router_routes_our_announces_with_21_fields(sock_dir):
    listen = sock_path(sock_dir, "fr.sock")
    sub = sock_path(sock_dir, "sub.sock")
    uwsgi_router = Proc([uwsgi_bin(), "--master", "--die-on-term", "--fastrouter", listen,
                         "--fastrouter-subscription-server", sub], name="uwsgi-2.0-router")
    try:
        uwsgi_router.wait_for_log(BIND_RE.pattern)
        uwsgi_router.wait_for_log(r"subscription server bound on")
        with RecordingBackend("n") as node:
            announcer = subscriber(sub, "example.com", node.address, "backup=1", "algo=lrc",
                                   "proto=u", "vassal=app.ini", "inactive=1")
            uwsgi_router.wait_for_log(r"example.com => new node: %s" % node.address)
            answer = request(listen, [(b"HTTP_HOST", b"example.com")])
            assert b"node=n" in answer
            assert announcer.stop() == 0
    finally:
        uwsgi_router.stop()


@MASTER
def test_stats_show_the_21_fields_in_21s_names(sock_dir, master):
    from test_subscriptions import stats_of
    sub = str(sock_dir / "sub.sock")
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-subscription-server", sub,
                           "--fastrouter-stats", "127.0.0.1:0", *master])
    announce(sub, b"new.example", b"127.0.0.1:1", extra=[
        (b"algo", b"wlrc"), (b"backup", b"2"), (b"proto", b"h"), (b"vassal", b"app.ini")])
    announce(sub, b"old.example", b"127.0.0.1:2")
    seen(router, r"old.example => new node")
    pools = {pool["key"]: pool for pool in stats_of(router)["subscriptions"]}
    assert pools["new.example"]["algo"] == "wlrc"
    (node,) = pools["new.example"]["nodes"]
    assert (node["vassal"], node["backup"], node["proto"]) == ("app.ini", 2, "h")
    assert "algo" not in pools["old.example"]
    assert "backup" not in pools["old.example"]["nodes"][0]


def test_a_dead_mounted_node_is_marked_under_its_own_key_in_the_master(sock_dir):
    """The router process tells the master which node failed under which key: the
    mountpoint's, not the request's host key."""
    router, sub = sub_router(sock_dir, "--master", "--subscription-mountpoints", "1")
    with RecordingBackend("app1") as app1, RecordingBackend("root") as root:
        announce(sub, b"example.com/app1", app1.address.encode())
        announce(sub, b"example.com", root.address.encode())
        seen(router, r"new node: %s" % root.address)
        assert served_for(router, [(b"PATH_INFO", b"/app1/x")]) == "app1"
        app1.stop()
        # the retry finds the mountpoint empty and falls back to the host key
        assert served_for(router, [(b"PATH_INFO", b"/app1/x")]) == "root"
        # the line names the key the node is subscribed under, not the request's host
        router.wait_for_log(r"example.com/app1 => marking %s as failed" % app1.address)
        # and the master's table (the stats document) dropped it from that key
        wait_until(lambda: "example.com/app1" not in
                   {pool["key"] for pool in fetch_stats(router.stats_address)["subscriptions"]},
                   what="the mounted node gone from the master's table")
