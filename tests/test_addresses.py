"""One address grammar for every role: the parser's tables, bind and connect agreeing,
and every role reached by ``@name`` end to end (ours, and with a real uWSGI 2.0.31)."""

from __future__ import annotations

import os
import re
import socket
import sys
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

import support
from backends import RecordingBackend, request
from support import fetch_stats, start_router, start_uwsgi_app, wait_until
from uwsgi_fastrouter import addresses
from uwsgi_fastrouter.addresses import (FD, INET, INET6, NAME, SHARED, UNIX, AddressError,
                                        parse_bind, parse_connect, shared_socket_index)
from uwsgi_fastrouter.sockets import bind_datagram, bind_listener, connect_sockaddr, node_sockaddr

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
HOST = [(b"HTTP_HOST", b"example.com"), (b"PATH_INFO", b"/")]
APP = ("def application(environ, start_response):\n"
       "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
       "    return [b'app on an abstract socket']\n")


def unique(prefix: str) -> str:
    return "%s-%d-%s" % (prefix, os.getpid(), uuid.uuid4().hex[:10])


# --------------------------------------------------------------------------- the parser


@pytest.mark.parametrize("text, options, kind, sockaddr", [
    ("127.0.0.1:3017", {}, INET, ("127.0.0.1", 3017)),
    (":3017", {}, INET, ("0.0.0.0", 3017)),
    ("127.1:0", {}, INET, ("127.0.0.1", 0)),
    ("0.0.0.0:65535", {}, INET, ("0.0.0.0", 65535)),
    ("localhost:80", {}, NAME, ("localhost", 80)),
    ("example.com:8000", {"datagram": True}, NAME, ("example.com", 8000)),
    ("::1:80", {}, NAME, ("::1", 80)),                 # the binder resolves it (IPv6 then)
    ("[::1]:80", {}, INET6, ("::1", 80, 0, 0)),
    ("[fe80::1%lo]:80", {}, INET6, ("fe80::1%lo", 80, 0, 0)),
    ("/run/fr.sock", {}, UNIX, b"/run/fr.sock"),
    ("/run/a:b.sock", {}, UNIX, b"/run/a:b.sock"),     # a '/' first: a path, ':' or not
    ("run/a:1", {}, UNIX, b"run/a:1"),                 # a '/' before the first ':'
    ("rel.sock", {}, UNIX, b"rel.sock"),               # no ':' at all
    ("r\xe9.sock", {}, UNIX, "r\xe9.sock".encode()),
    ("@name", {}, UNIX, b"\0name\0"),                  # uWSGI's abstract form, trailing NUL
    ("@name:1", {}, UNIX, b"\0name:1\0"),
    ("@name", {"datagram": True}, UNIX, b"@name"),     # uWSGI's datagram sockets: a file
    ("rel.sock", {"abstract_all": True}, UNIX, b"\0rel.sock\0"),
    ("@name", {"abstract_all": True}, UNIX, b"\0name\0"),
    ("rel.sock", {"abstract_all": True, "datagram": True}, UNIX, b"rel.sock"),
    ("fd://3", {}, FD, 3),
    ("=2", {}, SHARED, 2),
    ("=12abc", {}, SHARED, 12),                        # atoi, as uWSGI
    ("=x", {}, SHARED, 0),
    ("127.0.0.1:0", {"datagram": True}, INET, ("127.0.0.1", 0)),
])
def test_parse_bind(text, options, kind, sockaddr):
    got = parse_bind(text, **options)
    assert (got.kind, got.sockaddr, got.text) == (kind, sockaddr, text)


@pytest.mark.parametrize("text, options, reason", [
    ("", {}, "empty address"),
    ("127.0.0.1:65536", {}, "invalid port"),
    ("127.0.0.1:", {}, "invalid port"),
    ("127.0.0.1:http", {}, "invalid port"),
    ("127.0.0.1:\u0663", {}, "invalid port"),
    ("[::1]", {}, "expected [ipv6]:port"),
    ("[::1]80", {}, "expected [ipv6]:port"),
    ("[zz::1]:80", {}, "invalid IPv6 address"),
    ("h\xe9:80", {}, "invalid host name"),
    ("fd://", {}, "descriptor number"),
    ("fd://x", {}, "descriptor number"),
    ("fd://-1", {}, "descriptor number"),
    ("fd://3", {"datagram": True}, "only for stream listeners"),
    ("=0", {"datagram": True}, "only for stream listeners"),
    ("@", {}, "empty abstract socket name"),
    ("@" + "n" * 107, {}, "abstract socket name too long"),
    ("/" + "p" * 107, {}, "longer than 107 bytes"),
    ("a\0b", {}, "NUL"),
])
def test_parse_bind_errors(text, options, reason):
    with pytest.raises(AddressError) as info:
        parse_bind(text, **options)
    assert reason in str(info.value)
    assert repr(text) in str(info.value)


def test_the_longest_names_fit():
    assert parse_bind("@" + "n" * 106).sockaddr == b"\0" + b"n" * 106 + b"\0"
    assert parse_bind("/" + "p" * 106).sockaddr == b"/" + b"p" * 106


@pytest.mark.parametrize("text, options, kind, sockaddr", [
    (b"127.0.0.1:3031", {}, INET, ("127.0.0.1", 3031)),
    ("127.0.0.1:3031", {}, INET, ("127.0.0.1", 3031)),
    (b"127.1:80", {}, INET, ("127.0.0.1", 80)),
    (b"0x7f.1:80", {}, INET, ("127.0.0.1", 80)),
    (b"010.0.0.1:1", {}, INET, ("8.0.0.1", 1)),        # inet_aton reads octal
    (b":3031", {}, INET, ("0.0.0.0", 3031)),
    (b"127.0.0.1:3031/x", {}, INET, ("127.0.0.1", 3031)),   # atoi
    (b"127.0.0.1:3031:4", {}, INET, ("127.0.0.1", 3031)),   # the first ':'
    (b"127.0.0.1:0003031", {}, INET, ("127.0.0.1", 3031)),
    (b"[::1]:3031", {}, INET6, ("::1", 3031, 0, 0)),
    (b"@app", {}, UNIX, b"\0app\0"),
    (b"@app", {"datagram": True}, UNIX, b"@app"),
    (b"/run/app.sock", {}, UNIX, b"/run/app.sock"),
    (b"/srv/example.com:8000", {}, UNIX, b"/srv/example.com:8000"),  # use-base with a port
    (b"sockets/example.com:8000", {}, UNIX, b"sockets/example.com:8000"),
    (b"relative.sock", {}, UNIX, b"relative.sock"),
    (b"/tmp/\xe9t\xe9.sock", {}, UNIX, b"/tmp/\xe9t\xe9.sock"),
])
def test_parse_connect(text, options, kind, sockaddr):
    got = parse_connect(text, **options)
    assert (got.kind, got.sockaddr) == (kind, sockaddr)


@pytest.mark.parametrize("text, reason", [
    (b"", "empty address"),
    (b"localhost:3031", "the host name 'localhost' has no known address"),
    (b"256.1.1.1:80", "neither an IPv4 address nor a host name"),
    (b"1.2.3.4 x:80", "neither an IPv4 address nor a host name"),
    (b"1.2.3.4:", "missing port"),
    (b"1.2.3.4:abc", "missing port"),
    (b"1.2.3.4:65536", "port out of range"),
    (b"1.2.3.4:99999999999999999999", "port out of range"),
    (b"1.2.3.4:0", "port 0 cannot be reached"),
    (b"[::1]", "expected [ipv6]:port"),
    (b"[::1]:", "missing port"),
    (b"[zz::1]:80", "invalid IPv6 address"),
    (b"@", "empty abstract socket name"),
    (b"@a\0b", "NUL"),
    (b"/a\0b", "NUL"),
    (b"@" + b"n" * 110, "too long"),
    (b"/" + b"p" * 120, "longer than 107 bytes"),
])
def test_parse_connect_errors(text, reason):
    with pytest.raises(AddressError) as info:
        parse_connect(text)
    assert reason in str(info.value)


def test_unix_or_not():
    for text in ("/a", "@a", "a", "a/b:c", "./x:1", "@x:1"):
        assert addresses.is_unix(text), text
    for text in ("a:1", "127.0.0.1:1", ":1", "[::1]:1", "fd://3"):
        assert not addresses.is_unix(text), text


def test_shared_socket_index():
    assert shared_socket_index("=3") == 3
    assert shared_socket_index("=3x") == 3
    assert shared_socket_index("=") == 0
    assert shared_socket_index("127.0.0.1:1") is None


def libc_inet_aton(text: str):
    try:
        return socket.inet_ntoa(socket.inet_aton(text))
    except OSError:
        return None


@pytest.mark.parametrize("text", [
    "1", "4294967295", "4294967296", "1.2", "1.16777215", "1.16777216", "1.2.3", "1.2.65535",
    "1.2.65536", "1.2.3.4", "1.2.3.255", "1.2.3.256", "256.1.1.1", "0x7f.1", "0X7F.0.0.1",
    "0x", "0x.1", "017.1", "08.1", "0", "00", "1..2", ".1", "1.", "1.2.3.4.5", "a", "0xg",
    "0x100.1", "0xffffffff", "0x100000000", "0377.0377.0377.0377", "0400.1.1.1",
])
def test_inet_aton_reads_ipv4_like_the_c_library(text):
    assert addresses._inet_aton(text.encode()) == libc_inet_aton(text)


@given(st.text(alphabet="0123456789abcdefxX.", max_size=24))
def test_inet_aton_agrees_with_the_c_library_on_any_input(text):
    assert addresses._inet_aton(text.encode()) == libc_inet_aton(text)


# --------------------------------------------------------------------------- bind and connect agree


def exchange(listener, family, sockaddr):
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(sockaddr)
        listener.sock.setblocking(True)
        conn, _ = listener.sock.accept()
        with conn:
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"


@linux_only
def test_every_stream_listener_is_reached_under_its_own_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dir").mkdir()
    for spec in ("127.1:0", ":0", "@" + unique("agree"), str(tmp_path / "a:b.sock"), "dir/c:1",
                 "plain.sock"):
        listener = bind_listener(spec)
        try:
            exchange(listener, *node_sockaddr(listener.name.encode()))
        finally:
            listener.close()


def test_every_datagram_server_is_reached_under_its_own_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spec in ("127.0.0.1:0", "@" + unique("dgram"), str(tmp_path / "sub.sock"), "rel.sock"):
        server = bind_datagram(spec)
        try:
            family, sockaddr = connect_sockaddr(server.name, datagram=True)
            with socket.socket(family, socket.SOCK_DGRAM) as client:
                client.sendto(b"hello", sockaddr)
            server.sock.settimeout(5)
            assert server.sock.recv(10) == b"hello"
            if server.name.startswith("@"):
                # uWSGI's rule for datagram sockets: '@name' is a file in the directory
                assert (tmp_path / server.name).exists()
        finally:
            server.close()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("@")]


# --------------------------------------------------------------------------- every role, ours


@linux_only
def test_listener_stats_server_and_node_on_abstract_names(tmp_path):
    listen, stats, node = unique("@fr"), unique("@frstats"), unique("@node")
    with RecordingBackend("abstract", unix_path="\0%s\0" % node[1:]) as backend:
        router = start_router(["--fastrouter", listen, "--fastrouter-to", node,
                               "--fastrouter-stats", stats], cwd=tmp_path)
        assert (router.addresses, router.stats_address) == ([listen], stats)
        assert b"node=abstract" in request(listen, HOST)
        assert backend.count == 1
        doc = fetch_stats(stats)
        assert doc["fastrouter"] == [listen]
        assert [(n["name"], n["hits"]) for n in doc["static_nodes"]] == [(node, 1)]
    assert not list(tmp_path.iterdir())        # abstract names leave no file behind


@linux_only
@pytest.mark.parametrize("master", [False, True], ids=["single", "master"])
def test_our_subscriber_meets_our_subscription_server_under_at_name(tmp_path, master):
    """--fastrouter-subscription-server @x and --subscribe-to @x:KEY used to miss each
    other (one bound "\\0x\\0", the other sent to "\\0x")."""
    (tmp_path / "app.py").write_text(APP)
    listen, app_socket = unique("@fr"), unique("@app")
    router = start_router(["--fastrouter", listen, "--fastrouter-subscription-server", "@sub"]
                          + (["--master"] if master else []), cwd=tmp_path)
    router.wait_for_log(r"subscription server bound on @sub fd")
    app = start_router(["--socket", app_socket, "--wsgi-file", tmp_path / "app.py",
                        "--subscribe-to", "@sub:example.com", "--subscribe-freq", "1"],
                       cwd=tmp_path, listeners=0)
    app.wait_for_log(r"spawned uWSGI worker 1")
    router.wait_for_log(r"example.com => new node: %s" % re.escape(app_socket))
    # under a master the router process learns the node from the master a moment later
    wait_until(lambda: request(listen, HOST).endswith(b"app on an abstract socket"),
               what="a request routed to the subscribed node")
    assert app.stop() == 0                    # the unsubscribe goes the same way
    router.wait_for_log(r"example.com => marking %s as failed" % re.escape(app_socket))


@linux_only
def test_a_zerg_server_on_an_abstract_name(tmp_path):
    zerg_name = unique("@zerg")
    with RecordingBackend("z") as node:
        lender = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address,
                               "--zerg-server", zerg_name])
        lender.wait_for_log(r"zerg server enabled on %s" % re.escape(zerg_name))
        zergling = start_router(["--fastrouter-zerg", zerg_name, "--fastrouter-to", node.address],
                                listeners=1)
        shared = lender.addresses[0]
        assert zergling.addresses[0].endswith(shared.rsplit(":", 1)[1])
        lender.stop()
        assert request(shared, HOST).startswith(b"HTTP/1.0 200")


def test_a_bad_address_is_a_start_up_error_naming_the_option(tmp_path):
    for option, value in (("--fastrouter-subscription-server", "127.0.0.1:99999"),
                          ("--fastrouter-stats", "@"),
                          ("--zerg-server", "127.0.0.1:http")):
        proc = support.Proc([sys.executable, "-m", "uwsgi_fastrouter", "--fastrouter",
                             "127.0.0.1:0", option, value], cwd=tmp_path,
                            env=support._child_env(None, pythonpath=True))
        wait_until(lambda: proc.returncode is not None, what="the router to exit")
        assert proc.returncode == 1
        assert option in proc.log() and repr(value) in proc.log()


# --------------------------------------------------------------------------- with a real uWSGI


@linux_only
@pytest.mark.interop
def test_a_real_uwsgi_node_on_an_abstract_socket_is_reached(tmp_path):
    node = unique("@uwsgi")
    app = start_uwsgi_app(tmp_path, APP, socket=node)
    assert app.address == node
    router = start_router(["--fastrouter", unique("@fr"), "--fastrouter-to", node])
    assert request(router.addresses[0], HOST).endswith(b"app on an abstract socket")


@linux_only
@pytest.mark.interop
def test_real_uwsgi_subscribers_and_routers_meet_ours_under_at_name(tmp_path):
    """uWSGI 2.0.31 takes '@x' as the file '@x' on datagram sockets (its --subscribe-to
    ignores '@x:KEY' altogether, --subscribe2 server=@x sends there): both ways work."""
    listen = unique("@fr")
    # a real uWSGI node announcing itself to our router
    router = start_router(["--fastrouter", listen, "--fastrouter-subscription-server", "@sub"],
                          cwd=tmp_path)
    node = unique("@uwsgi")
    start_uwsgi_app(tmp_path, APP, socket=node,
                    extra=["--chdir", tmp_path, "--subscribe2", "server=@sub,key=example.com"])
    router.wait_for_log(r"example.com => new node: %s" % re.escape(node))
    assert request(listen, HOST).endswith(b"app on an abstract socket")
    # our node announcing itself to a real uWSGI router
    theirs_dir = tmp_path / "theirs"
    theirs_dir.mkdir()
    theirs_listen = unique("@uwsgifr")
    reference = support.Proc([support.uwsgi_bin(), "--master", "--die-on-term", "--fastrouter",
                              theirs_listen, "--fastrouter-subscription-server", "@sub"],
                             cwd=theirs_dir, env=support._child_env(None))
    reference.wait_for_log(r"subscription server bound on @sub fd", timeout=20)
    with RecordingBackend("ours") as ours:
        announcer = start_router(["--subscribe-to", "%s=@sub:example.com" % ours.address,
                                  "--subscribe-freq", "1"], cwd=theirs_dir, listeners=0)
        reference.wait_for_log(r"example.com => new node: %s" % re.escape(ours.address), timeout=20)
        assert b"node=ours" in request(theirs_listen, HOST)
        announcer.stop()
