"""Address parsing and binding: every listener form accepts a real connection,
node addresses follow uWSGI's outgoing rules."""

from __future__ import annotations

import os
import re
import select
import socket
import stat
import sys
import uuid

import pytest
import support

from uwsgi_fastrouter.sockets import (
    AddressError,
    Listener,
    bind_listener,
    bind_stream_server,
    node_sockaddr,
    sockname,
)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def ipv6_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def wait_readable(sock, timeout: float = 5.0) -> None:
    readable, _, _ = select.select([sock], [], [], timeout)
    assert readable, f"{sock!r} not readable within {timeout} s"


def check_accepts(listener: Listener, family: int, address, payload: bytes = b"ping") -> None:
    """Connect a client to *address*, accept it on *listener*, move bytes both ways."""
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(address)
        client.sendall(payload)
        wait_readable(listener.sock)
        conn, _ = listener.sock.accept()
        with conn:
            conn.settimeout(5)
            assert conn.recv(100) == payload
            conn.sendall(b"pong")
            assert client.recv(100) == b"pong"


def check_listener_flags(listener: Listener) -> None:
    fd = listener.sock.fileno()
    assert listener.fileno() == fd
    assert listener.sock.getblocking() is False
    assert os.get_inheritable(fd) is False
    assert listener.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


@pytest.fixture
def listeners():
    opened = []
    yield opened
    for listener in opened:
        listener.close()


def random_name(prefix: str = "uwsgi-fr-test") -> str:
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------- TCP


def test_tcp_ipv4_port_zero(listeners):
    listener = bind_listener("127.0.0.1:0")
    listeners.append(listener)
    port = listener.sock.getsockname()[1]
    assert port != 0
    assert listener.name == f"127.0.0.1:{port}"
    assert listener.unix_path is None
    assert listener.sock.family == socket.AF_INET
    assert listener.sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0
    check_listener_flags(listener)
    check_accepts(listener, socket.AF_INET, ("127.0.0.1", port))


def test_tcp_all_interfaces(listeners):
    listener = bind_listener(":0")
    listeners.append(listener)
    host, port = listener.sock.getsockname()
    assert host == "0.0.0.0"
    assert listener.name == f":{port}"
    assert sockname(listener.sock) == f":{port}"
    check_accepts(listener, socket.AF_INET, ("127.0.0.1", port))


def test_tcp_explicit_port_keeps_given_name(listeners):
    probe = bind_listener("127.0.0.1:0")
    port = probe.sock.getsockname()[1]
    probe.close()
    listener = bind_listener(f"127.0.0.1:{port}")  # SO_REUSEADDR: no TIME_WAIT trouble
    listeners.append(listener)
    assert listener.name == f"127.0.0.1:{port}"
    check_accepts(listener, socket.AF_INET, ("127.0.0.1", port))


def test_tcp_host_name_resolved_ipv4_first(listeners):
    listener = bind_listener("localhost:0")
    listeners.append(listener)
    port = listener.sock.getsockname()[1]
    assert listener.name == f"localhost:{port}"
    assert listener.sock.family == socket.AF_INET
    check_accepts(listener, socket.AF_INET, ("127.0.0.1", port))


@pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback")
def test_tcp_ipv6(listeners):
    listener = bind_listener("[::1]:0")
    listeners.append(listener)
    port = listener.sock.getsockname()[1]
    assert listener.name == f"[::1]:{port}"
    assert listener.sock.family == socket.AF_INET6
    check_listener_flags(listener)
    check_accepts(listener, socket.AF_INET6, ("::1", port))
    family, addr = node_sockaddr(f"[::1]:{port}".encode())
    check_accepts(listener, family, addr)


@pytest.mark.skipif(not hasattr(socket, "TCP_DEFER_ACCEPT"), reason="no TCP_DEFER_ACCEPT")
def test_tcp_defer_accept(listeners):
    deferred = bind_listener("127.0.0.1:0", defer_accept=4)
    plain = bind_listener("127.0.0.1:0")
    stats = bind_stream_server("127.0.0.1:0")
    listeners.extend([deferred, plain, stats])
    assert deferred.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) > 0
    assert plain.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) == 0
    assert stats.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) == 0
    # a client that sends data is handed over at once
    check_accepts(deferred, socket.AF_INET, deferred.sock.getsockname())


def test_tcp_address_in_use(listeners):
    first = bind_listener("127.0.0.1:0")
    listeners.append(first)
    spec = first.name
    with pytest.raises(AddressError) as info:
        bind_listener(spec)
    assert spec in str(info.value)
    assert info.value.address == spec
    assert "in use" in str(info.value)


@pytest.mark.parametrize(
    "spec", ["127.0.0.1:65536", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:٣", "[::1]", "[::1]80"]
)
def test_tcp_bad_port(spec):
    with pytest.raises(AddressError) as info:
        bind_listener(spec)
    assert repr(spec) in str(info.value)


def test_tcp_unresolvable_host(monkeypatch):
    # no DNS traffic in tests: make the resolver fail the way it does for an unknown name
    def fail(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(AddressError) as info:
        bind_listener("no-such-host.invalid:3017")
    assert "no-such-host.invalid:3017" in str(info.value)
    assert "resolve" in str(info.value)


def test_bad_ipv6_literal():
    with pytest.raises(AddressError):
        bind_listener("[not-an-address]:0")


# --------------------------------------------------------------------------- UNIX


def test_unix_path(tmp_path, listeners):
    path = str(tmp_path / "fr.sock")
    listener = bind_listener(path)
    listeners.append(listener)
    assert listener.name == path
    assert listener.unix_path == path
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    check_listener_flags(listener)
    check_accepts(listener, socket.AF_UNIX, path)
    family, addr = node_sockaddr(path.encode())
    check_accepts(listener, family, addr)
    listener.close()
    assert not os.path.exists(path)
    listener.close()  # idempotent


def test_unix_relative_path(tmp_path, monkeypatch, listeners):
    monkeypatch.chdir(tmp_path)
    listener = bind_listener("rel.sock")
    listeners.append(listener)
    assert listener.name == "rel.sock"
    assert listener.unix_path == str(tmp_path / "rel.sock")
    check_accepts(listener, socket.AF_UNIX, "rel.sock")


def test_unix_stale_socket_replaced(tmp_path, listeners):
    path = str(tmp_path / "stale.sock")
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(path)
    old.close()  # leaves the file behind, nobody listening
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        with pytest.raises(ConnectionRefusedError):
            probe.connect(path)  # the file is there, but stale
    listener = bind_listener(path)
    listeners.append(listener)
    check_accepts(listener, socket.AF_UNIX, path)


def test_unix_regular_file_is_not_removed(tmp_path):
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    with pytest.raises(AddressError) as info:
        bind_listener(str(path))
    assert "not a socket" in str(info.value)
    assert path.read_text() == "keep me"


def test_unix_chmod(tmp_path, listeners):
    path = str(tmp_path / "mode.sock")
    listener = bind_listener(path, chmod=0o600)
    listeners.append(listener)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    other = str(tmp_path / "mode2.sock")
    listeners.append(bind_listener(other, chmod=0o666))
    assert stat.S_IMODE(os.stat(other).st_mode) == 0o666


def test_unix_close_without_unlink_and_foreign_file(tmp_path):
    path = str(tmp_path / "keep.sock")
    listener = bind_listener(path)
    listener.close(unlink=False)
    assert os.path.exists(path)

    # a successor re-bound the path: our close must not remove its socket
    first = bind_listener(path)
    second = bind_listener(path)  # removes first's (stale-looking) file, binds anew
    try:
        first.close()
        assert os.path.exists(path)
        check_accepts(second, socket.AF_UNIX, path)
    finally:
        second.close()
    assert not os.path.exists(path)


def test_unix_missing_directory(tmp_path):
    spec = str(tmp_path / "no" / "such" / "dir.sock")
    with pytest.raises(AddressError) as info:
        bind_listener(spec)
    assert spec in str(info.value)


def test_unix_path_too_long(tmp_path):
    spec = str(tmp_path / ("x" * 120))
    with pytest.raises(AddressError):
        bind_listener(spec)


def test_stream_server_unix(tmp_path, listeners):
    path = str(tmp_path / "stats.sock")
    listener = bind_stream_server(path)
    listeners.append(listener)
    assert listener.name == path
    check_accepts(listener, socket.AF_UNIX, path)


# --------------------------------------------------------------------------- abstract


@linux_only
def test_abstract(listeners):
    name = random_name()
    listener = bind_listener("@" + name)
    listeners.append(listener)
    assert listener.name == "@" + name
    assert listener.unix_path is None
    assert listener.sock.getsockname() == b"\0" + name.encode() + b"\0"
    assert sockname(listener.sock) == "@" + name
    check_listener_flags(listener)
    # reachable through the node address of the same name...
    family, addr = node_sockaddr(("@" + name).encode())
    assert family == socket.AF_UNIX
    check_accepts(listener, family, addr)
    # ...but not under Python's natural form without the trailing NUL
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        with pytest.raises(ConnectionRefusedError):
            client.connect(b"\0" + name.encode())


@linux_only
def test_abstract_all(tmp_path, listeners):
    spec = str(tmp_path / "would-be-file.sock")
    listener = bind_listener(spec, abstract_all=True, chmod=0o600)
    listeners.append(listener)
    assert listener.name == spec
    assert listener.unix_path is None
    assert not os.path.exists(spec)
    check_accepts(listener, socket.AF_UNIX, b"\0" + spec.encode() + b"\0")


@linux_only
def test_abstract_in_use(listeners):
    spec = "@" + random_name()
    listeners.append(bind_listener(spec))
    with pytest.raises(AddressError) as info:
        bind_listener(spec)
    assert spec in str(info.value)


@linux_only
def test_stream_server_abstract(listeners):
    spec = "@" + random_name("stats")
    listener = bind_stream_server(spec)
    listeners.append(listener)
    check_accepts(listener, *node_sockaddr(spec.encode()))


# --------------------------------------------------------------------------- fd:// and =N


def test_fd_inherited_listener(listeners):
    original = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    original.bind(("127.0.0.1", 0))
    original.listen(5)
    port = original.getsockname()[1]
    fd = os.dup(original.fileno())
    original.close()
    listener = bind_listener(f"fd://{fd}")
    listeners.append(listener)
    assert listener.sock.fileno() == fd
    assert listener.name == f"127.0.0.1:{port}"
    check_listener_flags(listener)
    check_accepts(listener, socket.AF_INET, ("127.0.0.1", port))


@linux_only
def test_fd_inherited_unix_and_abstract(tmp_path, listeners):
    path = str(tmp_path / "inh.sock")
    for address, expected in ((path, path), (b"\0inh-" + uuid.uuid4().hex.encode(), None)):
        original = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        original.bind(address)
        original.listen(5)
        fd = os.dup(original.fileno())
        original.close()
        listener = bind_listener(f"fd://{fd}")
        listeners.append(listener)
        if expected is None:
            expected = "@" + address[1:].decode()
        assert listener.name == expected
        assert listener.unix_path is None  # not ours to unlink
        check_accepts(listener, socket.AF_UNIX, address)


def test_fd_not_listening_is_rejected_and_left_open():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fd = os.dup(sock.fileno())
    sock.close()
    try:
        with pytest.raises(AddressError) as info:
            bind_listener(f"fd://{fd}")
        assert "not a listening stream socket" in str(info.value)
        os.fstat(fd)  # still open
    finally:
        os.close(fd)


def test_fd_datagram_is_rejected():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fd = os.dup(sock.fileno())
    sock.close()
    try:
        with pytest.raises(AddressError):
            bind_listener(f"fd://{fd}")
        os.fstat(fd)
    finally:
        os.close(fd)


def test_fd_not_a_socket_is_rejected_and_left_open():
    r, w = os.pipe()
    try:
        with pytest.raises(AddressError):
            bind_listener(f"fd://{r}")
        os.fstat(r)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("spec", ["fd://", "fd://x", "fd://-1", "fd://٣"])
def test_fd_bad_number(spec):
    with pytest.raises(AddressError):
        bind_listener(spec)


def test_fd_closed_descriptor():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(AddressError) as info:
        bind_listener(f"fd://{r}")
    assert f"fd://{r}" in str(info.value)


def test_a_shared_socket_reference_is_not_bound_here():
    with pytest.raises(AddressError) as info:
        bind_listener("=0")
    assert "a shared socket (=N) cannot be used here" in str(info.value)


def test_empty_spec():
    with pytest.raises(AddressError):
        bind_listener("")


# --------------------------------------------------------------------------- node_sockaddr


@pytest.mark.parametrize(
    "address, expected",
    [
        (b"127.0.0.1:3031", (socket.AF_INET, ("127.0.0.1", 3031))),
        (b"127.1:80", (socket.AF_INET, ("127.0.0.1", 80))),
        (b":3031", (socket.AF_INET, ("0.0.0.0", 3031))),
        (b"10.0.0.7:8000", (socket.AF_INET, ("10.0.0.7", 8000))),
        (b"127.0.0.1:3031/extra", (socket.AF_INET, ("127.0.0.1", 3031))),  # atoi
        (b"127.0.0.1:3031:4", (socket.AF_INET, ("127.0.0.1", 3031))),  # first ':'
        (b"127.0.0.1:65535", (socket.AF_INET, ("127.0.0.1", 65535))),
        (b"127.0.0.1:0003031", (socket.AF_INET, ("127.0.0.1", 3031))),
        (b"@app", (socket.AF_UNIX, b"\0app\0")),
        (b"/run/app.sock", (socket.AF_UNIX, b"/run/app.sock")),
        (b"relative.sock", (socket.AF_UNIX, b"relative.sock")),
        (b"/tmp/\xe9t\xe9.sock", (socket.AF_UNIX, b"/tmp/\xe9t\xe9.sock")),  # raw bytes
        ("127.0.0.1:3031", (socket.AF_INET, ("127.0.0.1", 3031))),
    ],
)
def test_node_sockaddr(address, expected):
    assert node_sockaddr(address) == expected


@pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback")
def test_node_sockaddr_ipv6():
    family, addr = node_sockaddr(b"[::1]:3031")
    assert family == socket.AF_INET6
    assert addr[:2] == ("::1", 3031)


@pytest.mark.parametrize(
    "address, reason",
    [
        (b"", "empty"),
        (b"localhost:3031", "has no known address"),
        (b"256.1.1.1:80", "IPv4"),
        (b"1.2.3.4 x:80", "IPv4"),
        (b"1.2.3.4:", "port"),
        (b"1.2.3.4:abc", "port"),
        (b"1.2.3.4:65536", "port"),
        (b"127.0.0.1:0", "port 0"),
        (b"127.0.0.1:00", "port 0"),
        (b"1.2.3.4:99999999999999999999", "port"),
        (b"[::1]", "ipv6"),
        (b"[::1]:", "port"),
        (b"[zz::1]:80", "IPv6"),
        (b"@", "empty"),
        (b"@" + b"n" * 110, "too long"),
        (b"/" + b"p" * 120, "path"),
    ],
)
def test_node_sockaddr_errors(address, reason):
    with pytest.raises(AddressError) as info:
        node_sockaddr(address)
    assert reason.lower() in str(info.value).lower()


def test_node_sockaddr_is_cached():
    node_sockaddr.cache_clear()
    first = node_sockaddr(b"127.0.0.1:3999")
    second = node_sockaddr(b"127.0.0.1:3999")
    assert first is second
    assert node_sockaddr.cache_info().hits == 1


def test_node_sockaddr_reaches_tcp_listener(listeners):
    listener = bind_listener("127.0.0.1:0")
    listeners.append(listener)
    port = listener.sock.getsockname()[1]
    check_accepts(listener, *node_sockaddr(f"127.1:{port}".encode()))
    check_accepts(listener, *node_sockaddr(f"127.0.0.1:{port}".encode()))


# --------------------------------------------------------------------------- real uWSGI


@linux_only
@pytest.mark.interop
def test_abstract_node_address_reaches_real_uwsgi(tmp_path):
    """uWSGI binds '@name' as "\\0name\\0"; node_sockaddr must produce the same."""
    name = random_name("uwsgi-abstract")
    proc = support.Proc(
        [support.uwsgi_bin(), "--socket", "@" + name, "--processes", "1", "--disable-logging"],
        cwd=tmp_path,
    )
    try:
        proc.wait_for_log(re.escape(f"bound to UNIX address @{name} fd"), timeout=20)
        family, addr = node_sockaddr(("@" + name).encode())
        with socket.socket(family, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(addr)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            with pytest.raises(ConnectionRefusedError):
                client.connect(b"\0" + name.encode())
    finally:
        proc.stop()
