"""The access log (--fastrouter-access-log) and the "no route" line (docs/decisions.md D19)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import types

import pytest

from support import connect, start_router, sock_path, uwsgi_packet, wait_until
from backends import FdTakingBackend, RecordingBackend, read_answer

from uwsgi_fastrouter import accesslog, options, record

MASTER = pytest.mark.parametrize("master", [[], ["--master", "--fastrouter-processes", "2"]],
                                 ids=["single", "master"])
FIELDS = ("addr", "port", "key", "node", "modifier1", "status", "rx", "tx", "ttfb", "msecs",
          "retries", "outcome", "pid")
EVERY_VARIABLE = "AL|" + "|".join("%%(%s)" % name for name in FIELDS)


class NotFoundBackend(RecordingBackend):
    """A node that answers every request with an HTTP 404."""

    def _answer(self, conn, request):
        conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")


def exchange(address: str, pairs, body: bytes = b""):
    """One request; returns (the client's own address, the answer read to EOF)."""
    with connect(address) as sock:
        me = sock.getsockname()
        sock.sendall(uwsgi_packet(pairs) + body)
        return me, read_answer(sock)


def access_lines(path: str):
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        return []
    return [dict(zip(FIELDS, line.split("|")[1:])) for line in text.splitlines()]


def wait_for_lines(path: str, count: int):
    wait_until(lambda: len(access_lines(path)) >= count, what="%d access log lines" % count)
    return access_lines(path)


# ----------------------------------------------------------------------------- pure parts

def test_every_variable_is_documented_and_has_a_getter():
    documented = [name for name, _ in options.ACCESS_LOG_VARIABLES]
    assert documented == list(accesslog.VARIABLES)
    help_text = next(o.help for o in options.OPTIONS if o.name == "fastrouter-access-log-format")
    for name in documented:
        assert "%%(%s)" % name in help_text


def test_the_format_compiles_to_one_percent_string():
    template, names = accesslog.parse_format("100% %(key) %(status)!")
    assert template == "100%% %s %s!" and names == ["key", "status"]
    with pytest.raises(ValueError, match=r"--fastrouter-access-log-format.*%\(nope\)"):
        accesslog.compile_format("%(key) %(nope)")
    # the format's own text is data, never code
    session = types.SimpleNamespace(outcome=record.OK, retries=2)
    line = accesslog.compile_format("%(outcome) \") + str(1/0) + (\" %(pid) %(retries)")
    assert line(session, "7", 0.0) == "ok \") + str(1/0) + (\" 7 2"


def test_http_status_from_the_first_bytes():
    assert accesslog.http_status(b"HTTP/1.1 404 Not Found\r\n") == "404"
    assert accesslog.http_status(b"HTTP/1.0 200") == "200"
    assert accesslog.http_status(b"Status: 200 OK") == "-"
    assert accesslog.http_status(b"HTTP/1.1 2x0 no") == "-"
    assert accesslog.http_status(b"") == "-"


def test_an_unknown_variable_is_a_start_up_error(tmp_path):
    run = subprocess.run([sys.executable, "-m", "uwsgi_fastrouter", "--fastrouter", "127.0.0.1:0",
                          "--fastrouter-to", "127.0.0.1:1", "--fastrouter-access-log",
                          "--fastrouter-access-log-format", "%(key) %(bogus)"],
                         cwd=str(tmp_path), capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(
                             os.path.abspath(accesslog.__file__)))))
    assert run.returncode != 0
    assert "--fastrouter-access-log-format" in run.stderr and "%(bogus)" in run.stderr


# ----------------------------------------------------------------------------- the router

@MASTER
def test_one_line_per_request_in_a_file(tmp_path, master):
    """A relayed request, a 404, a handoff, a failed node with retries, a refused key and
    a request without a key: one line each, with the facts of that request."""
    base = str(tmp_path) + "/"
    log_path = str(tmp_path / "access.log")
    ok_node = RecordingBackend("ok", unix_path=base + "ok.sock")
    missing = NotFoundBackend("nf", unix_path=base + "nf.sock")
    taker = FdTakingBackend(base + "fd.sock")
    with ok_node, missing, taker:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-use-base", base,
                               "--fastrouter-access-log=" + log_path,
                               "--fastrouter-access-log-format", EVERY_VARIABLE] + master)
        addr = router.addresses[0]
        me, answer = exchange(addr, [(b"HTTP_HOST", b"ok.sock"), (b"PATH_INFO", b"/")])
        assert answer.startswith(b"HTTP/1.0 200 OK")
        ok_answer = len(answer)
        line = wait_for_lines(log_path, 1)[0]
        assert line["addr"] == me[0] and line["port"] == str(me[1])
        assert line["key"] == "ok.sock" and line["node"] == base + "ok.sock"
        assert line["modifier1"] == "0" and line["status"] == "200" and line["outcome"] == "ok"
        assert line["tx"] == str(ok_answer) and int(line["rx"]) > 4
        assert float(line["ttfb"]) <= float(line["msecs"]) and line["retries"] == "0"
        assert int(line["pid"]) != router.pid or not master

        exchange(addr, [(b"HTTP_HOST", b"nf.sock"), (b"REMOTE_ADDR", b"10.1.2.3"),
                        (b"REMOTE_PORT", b"4444"), (b"CONTENT_LENGTH", b"5")], b"hello")
        line = wait_for_lines(log_path, 2)[1]
        assert (line["addr"], line["port"], line["status"], line["outcome"]) == \
            ("10.1.2.3", "4444", "404", "ok")
        assert int(line["rx"]) >= 5 + 4

        _, answer = exchange(addr, [(b"HTTP_HOST", b"fd.sock"), (b"PATH_INFO", b"/")])
        assert b"taken" in answer
        line = wait_for_lines(log_path, 3)[2]
        assert (line["status"], line["tx"], line["outcome"]) == ("-", "-", "handoff")

        exchange(addr, [(b"HTTP_HOST", b"gone.sock")])
        line = wait_for_lines(log_path, 4)[3]
        assert (line["node"], line["retries"], line["outcome"]) == (base + "gone.sock", "3", "failed")
        assert (line["status"], line["tx"], line["ttfb"]) == ("-", "0", "-")

        exchange(addr, [(b"HTTP_HOST", b"..")])
        exchange(addr, [(b"PATH_INFO", b"/no-key\n")])
        lines = wait_for_lines(log_path, 6)
        assert (lines[4]["key"], lines[4]["node"], lines[4]["outcome"]) == ("..", "-", "noroute")
        assert (lines[5]["key"], lines[5]["outcome"]) == ("-", "noroute")
        assert len(access_lines(log_path)) == 6
        # A missing socket is one failure line for the request, not one per retry,
        # and the request's end is one "no route" line.
        router.wait_for_log(r'no route for key "gone.sock": all nodes failed \(3 retries\)')
        assert router.count(r'unable to connect\(\) to node "%sgone.sock"' % re.escape(base)) == 1
        # The refused key has its own line, and no second one.
        router.wait_for_log(r'key "\.\." is not a plain file name')
        router.wait_for_log(r'no route for key "": the request carries no key')
        assert router.count(r'no route for key "\.\."') == 0
        assert "AL|" not in router.log()


@MASTER
def test_bare_option_writes_the_default_format_to_the_main_log(tmp_path, master):
    with RecordingBackend("n") as node:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address,
                               "--fastrouter-access-log"] + master)
        me, _ = exchange(router.addresses[0], [(b"HTTP_HOST", b"example.com\x1b[2J")])
        router.wait_for_log(
            r'%s "example.com\\x1b\[2J" => %s modifier1=0 status=200 rx=\d+ tx=\d+ '
            r'ttfb=[\d.]+ms time=[\d.]+ms retries=0 ok' % (re.escape(me[0]), re.escape(node.address)))


def test_the_access_log_file_is_reopened_on_touch_logreopen(tmp_path):
    log_path = str(tmp_path / "access.log")
    trigger = tmp_path / "rotate"
    trigger.write_text("")
    with RecordingBackend("n") as node:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address,
                               "--fastrouter-access-log=" + log_path, "--touch-logreopen", trigger,
                               "--fastrouter-access-log-format", EVERY_VARIABLE])
        exchange(router.addresses[0], [(b"HTTP_HOST", b"one")])
        wait_for_lines(log_path, 1)
        os.rename(log_path, log_path + ".1")
        os.utime(trigger, (1, 1))

        def next_request_in_the_new_file() -> bool:
            exchange(router.addresses[0], [(b"HTTP_HOST", b"two")])
            return bool(access_lines(log_path))

        wait_until(next_request_in_the_new_file, what="the access log reopened")
        assert [l["key"] for l in access_lines(log_path + ".1")][0] == "one"


# ----------------------------------------------------------------------------- no route (D19)

@MASTER
def test_no_route_lines_say_why(tmp_path, master):
    """Nothing subscribed: the request is closed as before, with a rate-limited line
    naming the key (escaped), the reason and the client; other clients are served."""
    dgram = sock_path(tmp_path, "sub.sock")
    if True:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-subscription-server",
                               dgram] + master)
        me, answer = exchange(router.addresses[0], [(b"HTTP_HOST", b"bad\nkey.example")])
        assert answer == b""
        router.wait_for_log(r'client_addr: %s client_port: %d\] no route for key '
                            r'"bad\\x0akey.example": no node subscribed'
                            % (re.escape(me[0]), me[1]))
        assert exchange(router.addresses[0], [(b"HTTP_HOST", b"again")])[1] == b""
        router.wait_for_log(r'no route for key "again": no node subscribed')
    router2 = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", "127.0.0.1:1",
                            "--fastrouter-max-retries", "1"] + master)
    exchange(router2.addresses[0], [(b"HTTP_HOST", b"x")])
    router2.wait_for_log(r'no route for key "x": all nodes failed \(1 retry\)')
    if not master:   # the mark is per process: under a master "y" may go to the other one
        exchange(router2.addresses[0], [(b"HTTP_HOST", b"y")])
        router2.wait_for_log(r'no route for key "y": all nodes are marked as failed')
