"""No peer can forge a log line (D18).

Keys, Host headers, client vars, datagram fields and datagram senders that carry a
newline (and other control bytes) show up in the log escaped as ``\\xNN``: each
test sends the injected text ``\\n[uwsgi-fastrouter] forged ...`` through one path
family and checks that the escaped form is in the log, that no log line starts with
the injected text, and that other clients were still served.
"""

from __future__ import annotations

import re
import socket

import pytest

from backends import RecordingBackend, connect, request, uwsgi_packet
from support import free_dead_tcp_address, start_router, wait_applied_everywhere
from test_key_paths import MODES
from test_subscriptions import announce, send_datagram

INJECTED = "[uwsgi-fastrouter] forged"
EVIL = b"evil\n" + INJECTED.encode()
EVIL_LOGGED = "evil\\x0a" + INJECTED


def assert_not_forged(text: str) -> None:
    assert "\\x0a" + INJECTED in text
    assert not any(line.startswith(INJECTED) for line in text.splitlines()), text
    assert "\x1b" not in text


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_key_in_the_marking_line_of_a_static_node(mode):
    dead, reserved = free_dead_tcp_address()
    with reserved, RecordingBackend("live") as live:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", dead,
                               "--fastrouter-to", live.address, *MODES[mode]])
        # the first request goes to the dead node first, then to the live one
        assert b"node=live" in request(router.addresses[0], [(b"HTTP_HOST", EVIL)])
        router.wait_for_log(re.escape("[uwsgi-fastrouter] %s => marking %s as failed" % (EVIL_LOGGED, dead)))
        assert b"node=live" in request(router.addresses[0], [(b"HTTP_HOST", b"fine")])
        assert_not_forged(router.log())


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_subscribed_key_in_the_pool_and_marking_lines(sock_dir, mode):
    dead, reserved = free_dead_tcp_address()
    sub = str(sock_dir / "sub.sock")
    with reserved, RecordingBackend("live") as live:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-subscription-server", sub,
                               "--fastrouter-stats", "127.0.0.1:0", *MODES[mode]])
        router.wait_for_log(r"subscription server bound on")
        announce(sub, EVIL, dead.encode())
        announce(sub, b"fine", live.address.encode())
        for key in (EVIL_LOGGED, "fine"):
            wait_applied_everywhere(router, re.escape("%s => new node: " % key))
        assert request(router.addresses[0], [(b"HTTP_HOST", EVIL)]) == b""
        router.wait_for_log(re.escape("[uwsgi-fastrouter] %s => marking %s as failed" % (EVIL_LOGGED, dead)))
        assert b"node=live" in request(router.addresses[0], [(b"HTTP_HOST", b"fine")])
        text = router.log()
        assert "new pool: %s" % EVIL_LOGGED in text
        assert_not_forged(text)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_garbage_and_unsigned_datagrams_from_a_sender_with_a_newline(sock_dir, mode):
    sub = str(sock_dir / "sub.sock")
    (sock_dir / "keys").mkdir()
    with RecordingBackend("fallback") as spare:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-subscription-server", sub,
                               "--subscriptions-sign-check", "SHA1:%s" % (sock_dir / "keys"),
                               "--fastrouter-fallback", spare.address, "--fastrouter-fallback-on-no-key",
                               *MODES[mode]])
        router.wait_for_log(r"subscription server bound on")
        # garbage: a key but no address
        send_datagram(sub, uwsgi_packet([(b"key", EVIL), (b"modifier1", b"0")], 224, 0))
        router.wait_for_log(re.escape("subscription packet for %s without an address" % EVIL_LOGGED))
        # unsigned, from a datagram socket bound to a path with a newline and an escape
        sender_path = str(sock_dir / "s\n[uwsgi-fastrouter] forged \x1b[2J")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.bind(sender_path)
            sender.sendto(uwsgi_packet([(b"key", EVIL), (b"address", b"127.0.0.1:1\n" + INJECTED.encode())],
                                       224, 0), sub)
        router.wait_for_log(re.escape(
            "dropped subscription datagram from %s/s\\x0a%s \\x1b[2J (key: %s node: 127.0.0.1:1\\x0a%s): "
            "unsigned subscription packet for %s" % (sock_dir, INJECTED, EVIL_LOGGED, INJECTED, EVIL_LOGGED)))
        # other clients are served meanwhile
        assert b"node=fallback" in request(router.addresses[0], [(b"HTTP_HOST", b"fine")])
        assert_not_forged(router.log())


@pytest.mark.parametrize("mode", sorted(MODES))
def test_client_vars_in_a_session_line(sock_dir, mode):
    with RecordingBackend("live") as live:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", live.address,
                               "--fastrouter-post-buffering", "8"] + MODES[mode])
        pairs = [(b"HTTP_HOST", EVIL), (b"REMOTE_ADDR", b"10.0.0.1\n" + INJECTED.encode()),
                 (b"REMOTE_PORT", b"1\x1b[2J"), (b"CONTENT_LENGTH", b"100")]
        with connect(router.addresses[0]) as sock:
            sock.sendall(uwsgi_packet(pairs) + b"0123456789")   # 90 bytes of the body never come
        router.wait_for_log(re.escape("[uwsgi-fastrouter key: %s client_addr: 10.0.0.1\\x0a%s client_port: "
                                      "1\\x1b[2J" % (EVIL_LOGGED, INJECTED)))
        assert b"node=live" in request(router.addresses[0], [(b"HTTP_HOST", b"fine")])
        assert live.count == 1
        assert_not_forged(router.log())


@pytest.mark.parametrize("mode", sorted(MODES))
def test_client_vars_of_a_bodyless_request_in_a_session_line(mode):
    # The usual request reads REMOTE_ADDR and REMOTE_PORT only when a line asks for
    # them (Session.info): they are escaped all the same.
    # The key is the node's address (--fastrouter-use-pattern %s): each request goes
    # where it says, in either mode.
    with RecordingBackend("silent", mode="hang") as silent, RecordingBackend("live") as live:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-use-pattern", "%s",
                               "--fastrouter-timeout", "1"] + MODES[mode])
        pairs = [(b"HTTP_HOST", silent.address.encode()),
                 (b"REMOTE_ADDR", b"10.0.0.1\n" + INJECTED.encode()), (b"REMOTE_PORT", b"1\x1b[2J")]
        with connect(router.addresses[0]) as sock:
            sock.sendall(uwsgi_packet(pairs))
            router.wait_for_log(re.escape("[uwsgi-fastrouter key: %s client_addr: 10.0.0.1\\x0a%s "
                                          "client_port: 1\\x1b[2J node: %s] timeout in state RELAY"
                                          % (silent.address, INJECTED, silent.address)))
        assert b"node=live" in request(router.addresses[0], [(b"HTTP_HOST", live.address.encode())])
        assert_not_forged(router.log())


def test_a_key_in_a_code_string_failure(tmp_path):
    with RecordingBackend("live") as live:
        mapper = tmp_path / "mapper.py"
        mapper.write_text("def get(key):\n"
                          "    if key == 'fine':\n"
                          "        return %r\n"
                          "    raise ValueError('no node for ' + key)\n" % live.address)
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-use-code-string", "0:%s:get" % mapper])
        assert request(router.addresses[0], [(b"HTTP_HOST", EVIL + b"\x1b[2J")]) == b""
        # (a multi-line exception text was already joined with spaces; the rest is escaped now)
        router.wait_for_log(re.escape("raised ValueError: no node for evil %s\\x1b[2J" % INJECTED))
        router.wait_for_log(re.escape("for key %s\\x1b[2J: no route" % EVIL_LOGGED))
        assert b"node=live" in request(router.addresses[0], [(b"HTTP_HOST", b"fine")])
        assert_not_forged(router.log())


# ------------------------------------------------------------- without sockets

def test_a_request_line_of_the_app_server_is_escaped():
    from uwsgi_fastrouter.wsgiserver import _describe_request
    environ = {"REQUEST_METHOD": "GET", "REQUEST_URI": "/a\n" + INJECTED + "\x1b[2J\x85"}
    assert _describe_request(environ) == "GET /a\\x0a%s\\x1b[2J\\x85" % INJECTED


def test_an_exception_text_in_a_callback_report_is_one_escaped_line():
    import io

    from uwsgi_fastrouter import log as logmod
    from uwsgi_fastrouter.reactor import Reactor

    stream = io.StringIO()
    previous = logmod._stream
    logmod.set_stream(stream)
    reactor = Reactor()
    try:
        def bad() -> None:
            raise ValueError("key " + EVIL.decode())

        def stop() -> None:
            reactor.stop()

        reactor.call_soon(bad)
        reactor.call_later(0.01, stop)
        reactor.run()
    finally:
        reactor.close()
        logmod.set_stream(previous)
    text = stream.getvalue()
    assert "ValueError: key %s" % EVIL_LOGGED in text
    assert "Traceback (most recent call last):" in text and '  File "' in text
    assert_not_forged(text)
