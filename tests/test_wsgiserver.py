"""The local app server: WSGI over the uwsgi protocol, one request per connection.

handle_connection runs in a thread over socketpairs and loopback sockets; the
pre-forked path runs Worker.serve_forever in a child forked here, stopped by PID.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import struct
import sys
import threading
import time

import pytest

from support import parse_http_response, sock_path, uwsgi_packet, uwsgi_request, wait_until

from uwsgi_fastrouter.fdpass import send_fds
from uwsgi_fastrouter.wsgiserver import (
    AppLoadError,
    Worker,
    WsgiInput,
    handle_connection,
    load_application,
)

GET = [("REQUEST_METHOD", "GET"), ("REQUEST_URI", "/hello?x=1"), ("PATH_INFO", "/hello"),
       ("QUERY_STRING", "x=1"), ("SERVER_PROTOCOL", "HTTP/1.1"), ("SERVER_NAME", "localhost"),
       ("SERVER_PORT", "80"), ("REMOTE_ADDR", "127.0.0.1"), ("HTTP_HOST", "example.com")]


def with_body(length, extra=()):
    return GET + [("CONTENT_LENGTH", str(length))] + list(extra)


class Lines(list):
    """A log that keeps its lines (list.append is atomic, threads may call it)."""

    def __call__(self, line):
        self.append(line)

    def text(self):
        return "\n".join(self)


def hello_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Test", "yes")])
    return [b"hello ", b"world"]


def read_to_eof(sock, timeout=10.0):
    """Everything until EOF; a reset (a bare close that left our bytes unread) ends it too."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


class Served:
    """handle_connection on one end of a socketpair, in a thread."""

    def __init__(self, app, **kwargs):
        self.log = Lines()
        self.client, server = socket.socketpair()
        self.client.settimeout(10)
        kwargs.setdefault("log", self.log)
        self.thread = threading.Thread(target=handle_connection, args=(server, app), kwargs=kwargs,
                                       daemon=True)
        self.thread.start()

    def response(self):
        data = read_to_eof(self.client)
        self.join()
        return data

    def join(self, timeout=10.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "handle_connection did not return"
        self.client.close()


def serve(app, data, **kwargs):
    """Send *data* (without closing), return (raw response, log lines)."""
    served = Served(app, **kwargs)
    served.client.sendall(data)
    return served.response(), served.log


def http(raw):
    status, headers, body = parse_http_response(raw)
    return status, headers, body


# ---------------------------------------------------------------------------
# Loading the application


def test_load_wsgi_file_any_suffix(tmp_path):
    path = tmp_path / "myapp.wsgi"
    path.write_text("def application(e, s):\n    return [b'file']\nother = 42\n")
    app = load_application(wsgi_file=str(path))
    assert app(None, None) == [b"file"]
    assert load_application(wsgi_file=str(path), callable_name="application") is not None


def test_load_wsgi_file_without_the_callable(tmp_path):
    path = tmp_path / "app.py"
    path.write_text("def app(e, s):\n    return []\n")
    with pytest.raises(AppLoadError) as err:
        load_application(wsgi_file=str(path))
    assert str(err.value) == 'unable to find "application" callable in file %s' % path
    assert load_application(wsgi_file=str(path), callable_name="app")(None, None) == []


def test_load_wsgi_file_errors(tmp_path):
    with pytest.raises(AppLoadError, match="failed to open python file"):
        load_application(wsgi_file=str(tmp_path / "missing.py"))
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_here_at_all\n")
    with pytest.raises(AppLoadError) as err:
        load_application(wsgi_file=str(broken))
    assert "ModuleNotFoundError" in str(err.value)
    assert "no_such_module_here_at_all" in err.value.detail
    assert isinstance(err.value.__cause__, ImportError)
    notcallable = tmp_path / "nc.py"
    notcallable.write_text("application = 3\n")
    with pytest.raises(AppLoadError, match="not callable"):
        load_application(wsgi_file=str(notcallable))


def test_load_module_and_module_colon_callable(tmp_path, monkeypatch):
    (tmp_path / "wsgimod_for_test.py").write_text(
        "def application(e, s):\n    return [b'default']\n"
        "def other(e, s):\n    return [b'other']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "wsgimod_for_test", raising=False)
    assert load_application(module="wsgimod_for_test")(None, None) == [b"default"]
    assert load_application(module="wsgimod_for_test:other")(None, None) == [b"other"]
    with pytest.raises(AppLoadError) as err:
        load_application(module="wsgimod_for_test:nothere")
    assert str(err.value) == 'unable to find "nothere" callable in module wsgimod_for_test'
    with pytest.raises(AppLoadError, match="unable to import module"):
        load_application(module="no_such_module_here_at_all")


def test_load_module_given_as_a_file(tmp_path):
    path = tmp_path / "viamodule.py"
    path.write_text("def application(e, s):\n    return [b'm']\ndef cb(e, s):\n    return [b'cb']\n")
    assert load_application(module=str(path))(None, None) == [b"m"]
    assert load_application(module="%s:cb" % path)(None, None) == [b"cb"]


def test_load_needs_exactly_one_source(tmp_path):
    with pytest.raises(ValueError):
        load_application()
    with pytest.raises(ValueError):
        load_application(wsgi_file="a.py", module="b")


# ---------------------------------------------------------------------------
# environ


def environ_app(environ, start_response):
    shown = {k: v for k, v in environ.items() if isinstance(v, (str, int, bool, tuple))}
    shown["wsgi.errors is stderr"] = environ["wsgi.errors"] is sys.stderr
    shown["has file_wrapper"] = callable(environ.get("wsgi.file_wrapper"))
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(shown).encode()]


def environ_for(pairs, modifier1=0):
    raw, log = serve(environ_app, uwsgi_packet(pairs, modifier1))
    status, _, body = http(raw)
    assert status == 200, log
    return json.loads(body)


def test_environ_contents():
    pairs = GET + [(b"HTTP_X_NAME", b"caf\xe9"), (b"PATH_INFO", b"/second"), (b"\xe9KEY", b"")]
    env = environ_for(pairs)
    assert env["REQUEST_METHOD"] == "GET"
    assert env["QUERY_STRING"] == "x=1"
    assert env["HTTP_HOST"] == "example.com"
    assert env["HTTP_X_NAME"] == "caf\xe9"          # latin-1: one byte, one code point
    assert env["\xe9KEY"] == ""
    assert env["PATH_INFO"] == "/second"           # a repeated var: the last one wins
    assert env["SCRIPT_NAME"] == ""
    assert env["wsgi.version"] == [1, 0]
    assert env["wsgi.url_scheme"] == "http"
    assert env["wsgi.multithread"] is False
    assert env["wsgi.multiprocess"] is True
    assert env["wsgi.run_once"] is False
    assert env["wsgi.input_terminated"] is True
    assert env["wsgi.errors is stderr"] is True
    assert env["has file_wrapper"] is True


@pytest.mark.parametrize("extra, scheme", [
    ([], "http"),
    ([("UWSGI_SCHEME", "https")], "https"),
    ([("HTTPS", "on")], "https"),
    ([("HTTPS", "1")], "https"),
    ([("HTTPS", "off")], "http"),
    ([("REQUEST_SCHEME", "https")], "https"),
    ([("UWSGI_SCHEME", "http"), ("HTTPS", "on")], "http"),
])
def test_url_scheme(extra, scheme):
    assert environ_for(GET + extra)["wsgi.url_scheme"] == scheme


def test_modifier1_30_strips_script_name():
    pairs = [("SCRIPT_NAME", "/app"), ("PATH_INFO", "/app/page"), ("SERVER_PROTOCOL", "HTTP/1.1")]
    assert environ_for(pairs, modifier1=30)["PATH_INFO"] == "/page"
    assert environ_for(pairs, modifier1=0)["PATH_INFO"] == "/app/page"


def test_other_modifiers_are_refused():
    called = []
    raw, log = serve(lambda e, s: called.append(1), uwsgi_packet(GET, modifier1=5))
    assert raw == b"" and not called
    assert "-- unavailable modifier requested: 5 --" in log


# ---------------------------------------------------------------------------
# Request heads that are refused


def test_block_larger_than_buffer_size_is_skipped():
    pairs = GET + [("HTTP_X_BIG", "x" * 5000)]
    data = uwsgi_packet(pairs)
    datasize = len(data) - 4
    called = []

    def app(environ, start_response):
        called.append(1)
        return hello_app(environ, start_response)

    raw, log = serve(app, data)
    assert raw == b"" and not called
    assert "invalid request block size: %d (max 4096)...skip" % datasize in log
    raw, log = serve(app, data, buffer_size=8192)
    assert http(raw)[0] == 200 and called


def test_malformed_vars_close_the_connection():
    called = []
    raw, log = serve(lambda e, s: called.append(1), struct.pack("<BHB", 0, 3, 0) + b"\x00\x00\x00")
    assert raw == b"" and not called
    assert any("invalid uwsgi request" in line and "zero key length" in line for line in log), log


def test_peer_closing_early():
    served = Served(hello_app)
    served.client.shutdown(socket.SHUT_WR)         # nothing sent at all: no log line
    assert served.response() == b""
    assert served.log == []
    served = Served(hello_app)
    served.client.sendall(uwsgi_packet(GET)[:10])
    served.client.shutdown(socket.SHUT_WR)
    assert served.response() == b""
    assert any("incomplete uwsgi request" in line for line in served.log), served.log


def test_a_silent_peer_times_out():
    served = Served(hello_app, socket_timeout=0.2)
    served.client.sendall(b"\x00\x10")
    started = time.monotonic()
    served.join(timeout=10)
    assert time.monotonic() - started < 5
    assert any("timeout" in line for line in served.log), served.log


# ---------------------------------------------------------------------------
# Request body


def test_body_is_bounded_by_content_length():
    def app(environ, start_response):
        body = environ["wsgi.input"].read()
        again = environ["wsgi.input"].read()
        start_response("200 OK", [])
        return [body, b"|", again]

    # The client stays open and sends bytes after the body: the read must neither
    # wait for more nor take them (the answer arrives well before socket_timeout).
    raw, log = serve(app, uwsgi_packet(with_body(5)) + b"helloEXTRA", socket_timeout=60)
    assert http(raw)[2] == b"hello|", log


def test_input_leaves_bytes_after_the_body_in_the_socket():
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(10)
        a.sendall(b"line1\nline2\nrest")
        a.sendall(b"AFTER")
        body = WsgiInput(b, len(b"line1\nline2\nrest"))
        assert body.readline() == b"line1\n"
        assert body.read(3) == b"lin"
        assert list(body) == [b"e2\n", b"rest"]
        assert body.read() == b"" and body.readline() == b"" and body.remaining == 0
        assert b.recv(100) == b"AFTER"


def test_input_read_sizes_and_readlines():
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(10)
        data = b"one\ntwo\nthree\nfour"
        a.sendall(data)
        body = WsgiInput(b, len(data))
        assert body.read(0) == b""
        assert body.readline(2) == b"on"
        assert body.readline(0) == b""
        assert body.readline(100) == b"e\n"
        assert body.readlines(1) == [b"two\n"]          # a hint stops after it is reached
        assert body.readlines() == [b"three\n", b"four"]


def test_input_ends_early_when_the_peer_does():
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(10)
        a.sendall(b"abc")
        a.shutdown(socket.SHUT_WR)
        body = WsgiInput(b, 10)
        assert body.read(5) == b"abc"
        assert body.read() == b""


def test_no_content_length_means_no_body():
    def app(environ, start_response):
        start_response("200 OK", [])
        return [b"[", environ["wsgi.input"].read(), b"]"]

    raw, _ = serve(app, uwsgi_packet(GET) + b"not a body", socket_timeout=60)
    assert http(raw)[2] == b"[]"
    raw, _ = serve(app, uwsgi_packet(GET + [("CONTENT_LENGTH", "junk")]) + b"x", socket_timeout=60)
    assert http(raw)[2] == b"[]"


def test_body_lines_through_the_app():
    def app(environ, start_response):
        inp = environ["wsgi.input"]
        first = inp.readline()
        rest = inp.readlines()
        start_response("200 OK", [])
        return [json.dumps([first.decode(), [r.decode() for r in rest]]).encode()]

    body = b"a=1\nb=2\nc=3"
    raw, _ = serve(app, uwsgi_packet(with_body(len(body))) + body)
    assert json.loads(http(raw)[2]) == ["a=1\n", ["b=2\n", "c=3"]]


def test_unread_body_is_drained_after_the_response():
    served = Served(hello_app)
    body = b"x" * 300000                     # more than the socket buffers hold
    sender = threading.Thread(target=served.client.sendall,
                              args=(uwsgi_packet(with_body(len(body))) + body,), daemon=True)
    sender.start()
    raw = served.response()
    sender.join(10)
    assert not sender.is_alive(), "the unread body was not consumed"
    assert http(raw)[2] == b"hello world"


# ---------------------------------------------------------------------------
# Responses


def test_status_line_headers_and_body():
    raw, log = serve(hello_app, uwsgi_packet(GET))
    assert raw == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Test: yes\r\n\r\nhello world")
    assert log == []


def test_status_line_uses_server_protocol():
    pairs = [p for p in GET if p[0] != "SERVER_PROTOCOL"]
    raw, _ = serve(hello_app, uwsgi_packet(pairs + [("SERVER_PROTOCOL", "HTTP/1.0")]))
    assert raw.startswith(b"HTTP/1.0 200 OK\r\n")
    raw, _ = serve(hello_app, uwsgi_packet(pairs))
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")


def test_empty_body_still_sends_the_headers():
    def app(environ, start_response):
        start_response("204 No Content", [("X-A", "1")])
        return [b"", b""]

    raw, _ = serve(app, uwsgi_packet(GET))
    assert raw == b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n"


def test_generator_responses_are_streamed():
    go_on = threading.Event()

    def app(environ, start_response):
        start_response("200 OK", [])
        yield b"first"
        go_on.wait(20)
        yield b"second"

    served = Served(app)
    served.client.sendall(uwsgi_packet(GET))
    received = b""
    served.client.settimeout(5)
    while not received.endswith(b"first"):     # must arrive while the app still waits
        chunk = served.client.recv(65536)
        assert chunk, "connection closed early"
        received += chunk
    go_on.set()
    received += served.response()
    assert http(received)[2] == b"firstsecond"


def test_write_callable():
    def app(environ, start_response):
        write = start_response("200 OK", [("X-W", "1")])
        write(b"a")
        write(b"b")
        return [b"c"]

    raw, _ = serve(app, uwsgi_packet(GET))
    assert http(raw)[2] == b"abc"


def test_exception_before_headers_gives_500():
    def app(environ, start_response):
        start_response("200 OK", [])
        yield b""
        raise ZeroDivisionError("boom")

    raw, log = serve(app, uwsgi_packet(GET))
    assert raw.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    status, _, body = http(raw)
    assert status == 500 and body
    assert "ZeroDivisionError: boom" in log.text() and "Traceback" in log.text()


def test_exception_in_the_app_call_gives_500():
    def app(environ, start_response):
        raise RuntimeError("early")

    raw, log = serve(app, uwsgi_packet(GET))
    assert http(raw)[0] == 500
    assert "RuntimeError: early" in log.text()


def test_exception_after_headers_closes_the_connection():
    def app(environ, start_response):
        start_response("200 OK", [])
        yield b"partial"
        raise KeyError("late")

    raw, log = serve(app, uwsgi_packet(GET))
    assert raw == b"HTTP/1.1 200 OK\r\n\r\npartial"
    assert "KeyError: 'late'" in log.text()


@pytest.mark.parametrize("status, headers", [
    ("200", []),
    ("OK 200", []),
    (200, []),
    (b"200 OK", []),
    ("200 OK\r\nX-Injected: 1", []),
    ("200 OK", [("X-Number", 1)]),
    ("200 OK", [(b"X-Bytes", "v")]),
    ("200 OK", [("X Space", "v")]),
    ("200 OK", [("X-Split", "a\r\nInjected: 1")]),
    ("200 OK", [["X-List", "v"]]),
    ("200 OK", ("X-Not-A-List", "v")),
    ("200 OK", [("X-Unicode", "\u20ac")]),
])
def test_bad_status_or_headers_give_500(status, headers):
    def app(environ, start_response):
        start_response(status, headers)
        return [b"must not be sent"]

    raw, log = serve(app, uwsgi_packet(GET))
    assert http(raw)[0] == 500
    assert b"must not be sent" not in raw and b"Injected" not in raw
    assert "Traceback" in log.text()


def test_non_bytes_chunk_gives_500():
    def app(environ, start_response):
        start_response("200 OK", [])
        return ["text"]

    raw, log = serve(app, uwsgi_packet(GET))
    assert http(raw)[0] == 500 and "TypeError" in log.text()


def test_missing_start_response_gives_500():
    raw, log = serve(lambda environ, start_response: [], uwsgi_packet(GET))
    assert http(raw)[0] == 500 and "start_response" in log.text()


def test_second_start_response_without_exc_info_is_an_error():
    def app(environ, start_response):
        start_response("200 OK", [])
        start_response("201 Created", [])
        return [b"x"]

    raw, log = serve(app, uwsgi_packet(GET))
    assert http(raw)[0] == 500 and "AssertionError" in log.text()


def test_exc_info_replaces_unsent_headers():
    def app(environ, start_response):
        start_response("200 OK", [("X-First", "1")])
        try:
            raise ValueError("handled")
        except ValueError:
            start_response("503 Service Unavailable", [("X-Second", "1")], sys.exc_info())
        return [b"sorry"]

    raw, log = serve(app, uwsgi_packet(GET))
    status, headers, body = http(raw)
    assert (status, body) == (503, b"sorry")
    assert "x-second" in headers and "x-first" not in headers
    assert log == []


def test_exc_info_after_headers_reraises():
    def app(environ, start_response):
        start_response("200 OK", [])
        yield b"sent"
        try:
            raise ValueError("too late")
        except ValueError:
            start_response("500 Oops", [], sys.exc_info())
        yield b"never"

    raw, log = serve(app, uwsgi_packet(GET))
    assert raw == b"HTTP/1.1 200 OK\r\n\r\nsent"
    assert "ValueError: too late" in log.text()


class Closing:
    """An iterable that records close()."""

    def __init__(self, items, fail=False):
        self.items = items
        self.fail = fail
        self.closed = False

    def __iter__(self):
        for item in self.items:
            yield item
        if self.fail:
            raise RuntimeError("iteration failed")

    def close(self):
        self.closed = True


@pytest.mark.parametrize("fail", [False, True])
def test_close_is_always_called(fail):
    result = Closing([b"a", b"b"], fail=fail)

    def app(environ, start_response):
        start_response("200 OK", [])
        return result

    raw, _ = serve(app, uwsgi_packet(GET))
    assert raw.startswith(b"HTTP/1.1 200 OK") and result.closed


def test_close_is_called_when_the_client_is_gone():
    result = Closing([b"x" * 65536] * 64)
    go_on = threading.Event()

    def app(environ, start_response):
        start_response("200 OK", [])
        go_on.wait(20)
        return result

    served = Served(app)
    served.client.sendall(uwsgi_packet(GET))
    served.client.close()
    go_on.set()
    served.thread.join(10)
    assert not served.thread.is_alive()
    assert result.closed
    assert any("error writing the response" in line for line in served.log), served.log


def test_file_wrapper_with_a_real_file(tmp_path):
    path = tmp_path / "data.bin"
    content = bytes(range(256)) * 1000
    path.write_bytes(content)
    opened = []

    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", str(len(content) - 10))])
        f = open(str(path), "rb")
        f.seek(10)                                # sent from the current position
        opened.append(f)
        return environ["wsgi.file_wrapper"](f, 4096)

    raw, log = serve(app, uwsgi_packet(GET))
    status, _, body = http(raw)
    assert status == 200 and body == content[10:], log
    assert opened[0].closed


def test_file_wrapper_without_a_descriptor():
    def app(environ, start_response):
        start_response("200 OK", [])
        return environ["wsgi.file_wrapper"](io.BytesIO(b"in memory" * 3000), 1000)

    raw, _ = serve(app, uwsgi_packet(GET))
    assert http(raw)[2] == b"in memory" * 3000


def test_over_real_tcp_loopback():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        address = "127.0.0.1:%d" % srv.getsockname()[1]
        log = Lines()

        def accept_one():
            conn, _ = srv.accept()
            handle_connection(conn, hello_app, log=log)

        thread = threading.Thread(target=accept_one, daemon=True)
        thread.start()
        raw = uwsgi_request(address, GET)
        thread.join(10)
        assert not thread.is_alive()
    assert http(raw)[2] == b"hello world" and log == []


# ---------------------------------------------------------------------------
# A client handed over with the head (decisions.md D2)


def echo_body_app(environ, start_response):
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"got:", body]


def pass_client(app, head, client_end, extra_fds=(), **kwargs):
    """Send *head* with *client_end*'s descriptor like a router; return (router side, thread, log)."""
    router_side, worker_side = socket.socketpair()
    log = Lines()
    thread = threading.Thread(target=handle_connection, args=(worker_side, app),
                              kwargs=dict(log=log, **kwargs), daemon=True)
    thread.start()
    assert send_fds(router_side, head, [client_end.fileno()] + list(extra_fds)) == len(head)
    router_side.settimeout(10)
    return router_side, thread, log


def test_passed_client_gets_the_response_directly():
    client, client_copy = socket.socketpair()
    router_side, thread, log = pass_client(hello_app, uwsgi_packet(GET), client_copy)
    with client, client_copy, router_side:
        assert router_side.recv(100) == b""      # taken over: EOF without a byte
        # The router's copy of the client is still open: the end of the response
        # must still reach the client.
        raw = read_to_eof(client)
        thread.join(10)
        assert not thread.is_alive()
    assert http(raw)[2] == b"hello world" and log == []


def test_passed_client_body_is_read_from_the_client():
    client, client_copy = socket.socketpair()
    router_side, thread, log = pass_client(echo_body_app, uwsgi_packet(with_body(5)), client_copy)
    with client, client_copy, router_side:
        client.sendall(b"12345")
        assert router_side.recv(100) == b""
        client_copy.close()                      # as the router does once it sees the EOF
        raw = read_to_eof(client)
        thread.join(10)
    assert http(raw)[2] == b"got:12345", log


def test_passed_tcp_client():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        client = socket.create_connection(srv.getsockname(), timeout=10)
        accepted, _ = srv.accept()
        accepted.setblocking(False)              # as a router holds it
        router_side, thread, log = pass_client(hello_app, uwsgi_packet(GET), accepted)
        with client, accepted, router_side:
            assert router_side.recv(100) == b""
            accepted.close()
            raw = read_to_eof(client)
            thread.join(10)
    assert http(raw)[2] == b"hello world", log


def test_a_surplus_descriptor_is_closed():
    client, client_copy = socket.socketpair()
    other, other_copy = socket.socketpair()
    router_side, thread, log = pass_client(hello_app, uwsgi_packet(GET), client_copy, [other_copy.fileno()])
    with client, client_copy, other, other_copy, router_side:
        other_copy.close()
        assert router_side.recv(100) == b""
        raw = read_to_eof(client)
        thread.join(10)
        other.settimeout(10)
        assert other.recv(10) == b""              # our copy of the surplus one was closed
    assert http(raw)[2] == b"hello world"


def test_a_refused_head_closes_the_passed_descriptor_too():
    client, client_copy = socket.socketpair()
    head = uwsgi_packet(GET + [("HTTP_X_BIG", "x" * 5000)])
    router_side, thread, log = pass_client(hello_app, head, client_copy)
    with client, client_copy, router_side:
        client_copy.close()
        assert read_to_eof(router_side) == b""     # a bare close (a reset: the vars were left unread)
        assert read_to_eof(client) == b""          # no copy left open anywhere
        thread.join(10)
    assert any(line.startswith("invalid request block size:") for line in log), log


# ---------------------------------------------------------------------------
# The pre-forked worker


def file_log(path):
    def log(line):
        fd = os.open(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode("utf-8", "replace"))
        finally:
            os.close(fd)
    return log


class Forked:
    """Workers forked by a test; whatever is still running at the end is killed by PID."""

    def __init__(self, tmp_path):
        self.log_path = tmp_path / "worker.log"
        self.log_path.touch()
        self.pids = []
        self.status = {}

    def start(self, listeners, app, **kwargs):
        log = file_log(self.log_path)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 98
            try:
                code = Worker(listeners, app, log=log, **kwargs).serve_forever()
            except BaseException:
                import traceback
                log("worker crashed:\n" + traceback.format_exc())
            finally:
                os._exit(code)
        self.pids.append(pid)
        self.wait_ready(pid)
        return pid

    def wait_ready(self, pid):
        """Wait until the worker catches SIGTERM, SIGHUP and SIGQUIT (its handlers are in).

        A signal that reaches a child before Python has finished its own after-fork
        work is lost, so no test signals a worker before this."""
        wanted = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGHUP - 1)) | (1 << (signal.SIGQUIT - 1))

        with open("/proc/self/status") as f:
            caught_here = [int(line.split()[1], 16) for line in f if line.startswith("SigCgt:")][0]
        assert not caught_here & wanted, "the test process catches the signals the probe looks for"

        def ready():
            assert self.alive(pid), "worker %d died at start:\n%s" % (pid, self.log())
            with open("/proc/%d/status" % pid) as f:
                for line in f:
                    if line.startswith("SigCgt:"):
                        return int(line.split()[1], 16) & wanted == wanted
            return False

        wait_until(ready, what="worker %d to install its signal handlers" % pid)

    def log(self):
        return self.log_path.read_text()

    def wait_log(self, text, timeout=10.0):
        wait_until(lambda: text in self.log(), timeout=timeout, what="%r in the worker log" % text)

    def alive(self, pid):
        if pid in self.status:
            return False
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            self.status[pid] = status
            return False
        return True

    def exit_code(self, pid, timeout=10.0):
        wait_until(lambda: not self.alive(pid), timeout=timeout, what="worker %d to exit" % pid)
        return os.waitstatus_to_exitcode(self.status[pid]) if hasattr(os, "waitstatus_to_exitcode") \
            else (os.WEXITSTATUS(self.status[pid]) if os.WIFEXITED(self.status[pid])
                  else -os.WTERMSIG(self.status[pid]))

    def stop_all(self):
        for pid in self.pids:
            if self.alive(pid):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


@pytest.fixture
def forked(tmp_path):
    f = Forked(tmp_path)
    yield f
    f.stop_all()


def tcp_listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock, "127.0.0.1:%d" % sock.getsockname()[1]


def pid_app(environ, start_response):
    start_response("200 OK", [])
    return [str(os.getpid()).encode()]


def test_worker_serves_all_its_listeners(forked, sock_dir):
    tcp, tcp_address = tcp_listener()
    unix_path = sock_path(sock_dir, "w.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(unix_path)
    unix.listen(16)
    abstract = socket.socket(socket.AF_UNIX)
    abstract_name = "@uwsgi-fastrouter-test-%d" % os.getpid()
    abstract.bind("\0" + abstract_name[1:] + "\0")
    abstract.listen(16)
    with tcp, unix, abstract:
        pid = forked.start([tcp, unix, abstract], pid_app, worker_id=2)
        for address in (tcp_address, unix_path, abstract_name, tcp_address):
            assert http(uwsgi_request(address, GET))[2] == str(pid).encode()
        os.kill(pid, signal.SIGINT)
        assert forked.exit_code(pid) == 0


def test_worker_counts_requests(forked):
    holder = {}

    def app(environ, start_response):
        start_response("200 OK", [])
        return [str(holder["worker"].requests).encode()]

    tcp, address = tcp_listener()
    with tcp:
        log = file_log(forked.log_path)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 98
            try:
                holder["worker"] = Worker([tcp], app, log=log)
                code = holder["worker"].serve_forever()
            finally:
                os._exit(code)
        forked.pids.append(pid)
        forked.wait_ready(pid)
        answers = [http(uwsgi_request(address, GET))[2] for _ in range(3)]
        assert answers == [b"0", b"1", b"2"]
        os.kill(pid, signal.SIGINT)
        assert forked.exit_code(pid) == 0


def test_workers_share_a_listener(forked):
    tcp, address = tcp_listener()
    with tcp:
        pids = {forked.start([tcp], pid_app, worker_id=n) for n in (1, 2, 3)}
        seen = set()
        for _ in range(30):
            status, _, body = http(uwsgi_request(address, GET))
            assert status == 200
            seen.add(int(body))
        assert seen <= pids
        # Each connection woke every worker and all but one lost the accept race:
        # none of them died of it.
        assert all(forked.alive(pid) for pid in pids), forked.log()
        for pid in pids:
            os.kill(pid, signal.SIGINT)
        assert [forked.exit_code(pid) for pid in pids] == [0, 0, 0]
    assert "crashed" not in forked.log()


def blocking_app_factory(log_path):
    log = file_log(log_path)

    def app(environ, start_response):
        log("app: reading the body")
        body = environ["wsgi.input"].read()
        start_response("200 OK", [])
        return [b"done:", body]

    return app


def test_sigterm_finishes_the_current_request(forked):
    tcp, address = tcp_listener()
    with tcp:
        pid = forked.start([tcp], blocking_app_factory(forked.log_path), socket_timeout=60)
        with socket.create_connection(tcp.getsockname(), timeout=10) as client:
            client.sendall(uwsgi_packet(with_body(5)) + b"ab")
            forked.wait_log("app: reading the body")
            os.kill(pid, signal.SIGTERM)
            forked.wait_log("Gracefully killing worker 1 (pid: %d)..." % pid)
            assert forked.alive(pid)
            client.sendall(b"cde")
            raw = read_to_eof(client)
        assert http(raw)[2] == b"done:abcde"
        assert forked.exit_code(pid) == 0


def test_sigterm_when_idle(forked):
    tcp, address = tcp_listener()
    with tcp:
        pid = forked.start([tcp], pid_app)
        assert http(uwsgi_request(address, GET))[0] == 200   # up, its handlers installed
        os.kill(pid, signal.SIGTERM)
        assert forked.exit_code(pid) == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT])
def test_sigint_and_sigquit_exit_at_once(forked, sig):
    tcp, _ = tcp_listener()
    with tcp:
        pid = forked.start([tcp], blocking_app_factory(forked.log_path), socket_timeout=60)
        with socket.create_connection(tcp.getsockname(), timeout=10) as client:
            client.sendall(uwsgi_packet(with_body(5)) + b"ab")
            forked.wait_log("app: reading the body")
            os.kill(pid, sig)
            assert forked.exit_code(pid) == 0
            assert read_to_eof(client) == b""


@pytest.mark.slow
def test_harakiri_kills_a_hanging_request(forked):
    tcp, _ = tcp_listener()
    with tcp:
        pid = forked.start([tcp], blocking_app_factory(forked.log_path), worker_id=3, harakiri=1,
                           socket_timeout=60)
        with socket.create_connection(tcp.getsockname(), timeout=10) as client:
            client.sendall(uwsgi_packet(with_body(5)))     # the body never comes
            assert forked.exit_code(pid) == 9
            assert read_to_eof(client) == b""
    log = forked.log()
    assert "*** HARAKIRI ON WORKER 3 (pid: %d, try: 1) ***" % pid in log
    assert "GET /hello?x=1" in log


def test_harakiri_spares_quick_requests(forked):
    tcp, address = tcp_listener()
    with tcp:
        pid = forked.start([tcp], pid_app, harakiri=1)
        for _ in range(3):
            assert http(uwsgi_request(address, GET))[0] == 200
        assert forked.alive(pid)
        os.kill(pid, signal.SIGINT)
        assert forked.exit_code(pid) == 0


def test_worker_takes_a_passed_client(forked, sock_dir):
    path = sock_path(sock_dir, "fd.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(path)
    unix.listen(16)
    with unix:
        pid = forked.start([unix], pid_app)
        client, client_copy = socket.socketpair()
        with client, client_copy, socket.socket(socket.AF_UNIX) as router_side:
            router_side.settimeout(10)
            router_side.connect(path)
            send_fds(router_side, uwsgi_packet(GET), [client_copy.fileno()])
            assert router_side.recv(100) == b""
            client_copy.close()
            raw = read_to_eof(client)
        assert http(raw)[2] == str(pid).encode()
        os.kill(pid, signal.SIGINT)
        assert forked.exit_code(pid) == 0


def test_worker_logs_an_oversized_block(forked):
    tcp, address = tcp_listener()
    with tcp:
        pid = forked.start([tcp], pid_app, buffer_size=300)
        pairs = GET + [("HTTP_X_PAD", "p" * 300)]
        assert uwsgi_request(address, pairs) == b""
        assert http(uwsgi_request(address, GET))[0] == 200      # still serving
        forked.wait_log("invalid request block size: %d (max 300)...skip" % (len(uwsgi_packet(pairs)) - 4))
        os.kill(pid, signal.SIGINT)
        assert forked.exit_code(pid) == 0


def test_sys_exit_in_the_app_is_the_exit_code(forked):
    def app(environ, start_response):
        sys.exit(7)

    tcp, address = tcp_listener()
    with tcp:
        pid = forked.start([tcp], app)
        assert uwsgi_request(address, GET) == b""
        assert forked.exit_code(pid) == 7


def test_worker_exits_when_its_parent_is_not_the_expected_one(forked):
    tcp, _ = tcp_listener()
    with tcp:
        pid = forked.start([tcp], pid_app, parent_pid=os.getpid() + 1000000)
        assert forked.exit_code(pid) == 0
    assert "is gone" in forked.log()


def test_inherited_python_signal_handlers_are_reset(forked):
    # A handler of the parent (like a master's SIGUSR1 handler) must not run in a
    # worker: after the reset SIGUSR1 has its default action and ends the worker.
    tcp, address = tcp_listener()
    marker = forked.log_path.with_name("usr1")
    previous = signal.signal(signal.SIGUSR1, lambda *a: marker.write_text("parent handler ran"))
    try:
        with tcp:
            pid = forked.start([tcp], pid_app)
            assert http(uwsgi_request(address, GET))[0] == 200   # the worker is up
            os.kill(pid, signal.SIGUSR1)
            assert forked.exit_code(pid) == -signal.SIGUSR1
        assert not marker.exists()
    finally:
        signal.signal(signal.SIGUSR1, previous)


# ---------------------------------------------------------------------------
# With real peers: nginx in front, and the router handing clients over


def interop_app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/fail":
        raise RuntimeError("the application failed")
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (b"part%d;" % i for i in range(50))
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "application/json"), ("X-Pid", str(os.getpid()))])
    return [json.dumps({"method": environ["REQUEST_METHOD"], "path": path,
                        "query": environ.get("QUERY_STRING", ""), "body_len": len(body),
                        "body_sum": sum(body), "host": environ.get("HTTP_HOST"),
                        # the socket the request is served on (TCP: a client handed over by the router)
                        "family": int(environ["wsgi.input"]._sock.family)}).encode()]


def unix_listener(directory, name):
    path = sock_path(directory, name)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    sock.listen(64)
    return sock, path


@pytest.mark.interop
def test_behind_nginx(forked, tmp_path, sock_dir):
    from support import http_request, start_nginx

    listener, path = unix_listener(sock_dir, "app.sock")
    with listener:
        for n in (1, 2):
            forked.start([listener], interop_app, worker_id=n)
        nginx = start_nginx(tmp_path, """\
client_max_body_size 16m;
location / {
    include uwsgi_params;
    uwsgi_pass unix:%s;
}
""" % path)
        status, headers, body = http_request(nginx.address, "GET", "/x?y=1", "example.com")
        doc = json.loads(body)
        assert status == 200 and doc["path"] == "/x" and doc["query"] == "y=1"
        assert doc["host"] == "example.com" and int(headers["x-pid"]) in forked.pids
        data = bytes(range(256)) * 4000                       # 1 MB, more than the socket buffers
        status, _, body = http_request(nginx.address, "POST", "/upload", "example.com", body=data)
        doc = json.loads(body)
        assert status == 200 and (doc["body_len"], doc["body_sum"]) == (len(data), sum(data))
        status, _, body = http_request(nginx.address, "GET", "/stream", "example.com")
        assert status == 200 and body == b"".join(b"part%d;" % i for i in range(50))
        status, _, _ = http_request(nginx.address, "GET", "/fail", "example.com")
        assert status == 500
        assert "RuntimeError: the application failed" in forked.log()
        assert all(forked.alive(pid) for pid in forked.pids)


@pytest.mark.interop
def test_behind_the_router_with_fd_passing(forked, sock_dir):
    from support import start_router

    listener, path = unix_listener(sock_dir, "node.sock")
    with listener:
        pid = forked.start([listener], interop_app)
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", path])
        address = router.addresses[0]
        # CONTENT_LENGTH "" as a web server sends it: "no body" for sure
        pairs = GET + [("PATH_INFO", "/handed-over"), ("CONTENT_LENGTH", "")]
        for _ in range(10):           # bodyless: the router hands the client over
            status, headers, body = http(uwsgi_request(address, pairs))
            doc = json.loads(body)
            assert status == 200 and doc["path"] == "/handed-over"
            assert doc["family"] == socket.AF_INET
        data = b"z" * 100000          # with a body: relayed through the router
        status, _, body = http(uwsgi_request(address, with_body(len(data)), body=data))
        doc = json.loads(body)
        assert status == 200 and doc["body_len"] == len(data) and doc["family"] == socket.AF_UNIX
        assert forked.alive(pid)


@pytest.mark.interop
def test_nginx_router_worker(forked, tmp_path, sock_dir):
    from support import http_request, start_nginx, start_router

    listener, path = unix_listener(sock_dir, "node.sock")
    with listener:
        for n in (1, 2):
            forked.start([listener], interop_app, worker_id=n)
        router = start_router(["--fastrouter", sock_path(tmp_path, "fr.sock"), "--fastrouter-to", path])
        nginx = start_nginx(tmp_path, """\
client_max_body_size 16m;
location / {
    include uwsgi_params;
    uwsgi_pass unix:%s;
}
""" % router.addresses[0])
        for _ in range(5):
            status, _, body = http_request(nginx.address, "GET", "/via-router", "example.com")
            assert status == 200 and json.loads(body)["path"] == "/via-router"
            status, _, body = http_request(nginx.address, "GET", "/stream", "example.com")
            assert status == 200 and body.endswith(b"part49;")
        data = b"q" * 500000
        status, _, body = http_request(nginx.address, "PUT", "/put", "example.com", body=data)
        assert status == 200 and json.loads(body)["body_len"] == len(data)
        assert all(forked.alive(pid) for pid in forked.pids)


def test_a_ping_is_answered_with_uwsgis_pong():
    raw, lines = serve(hello_app, bytes([100, 0, 0, 0]))
    assert raw == bytes.fromhex("64000001") and lines.text() == ""
