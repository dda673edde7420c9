"""The seed's "Cheap mode and shared sockets" ini, unchanged but for addresses and paths."""

from __future__ import annotations

import socket
import threading

from backends import RecordingBackend, request
from support import start_router, wait_until
from test_master import Load, children
from test_subscriptions import announce

APP = """
def application(environ, start_response):
    body = environ['wsgi.input'].read()
    start_response('200 OK', [('Content-Type', 'text/plain')])
    return [b'local app host=' + environ.get('HTTP_HOST', '').encode() + b' len=%d' % len(body)]
"""

SEED_INI = """[uwsgi]
;create a shared socket (the webserver will connect to it)
shared-socket = 127.0.0.1:0

; bind the fastrouter to the shared socket
fastrouter = =0
; bind an instance to the same socket
socket = =0

; having a master is always a good thing...
master = true
; our subscription server
fastrouter-subscription-server = %(sub)s
; our app
wsgi-file = %(app)s
; a bunch of processes
processes = 2
; and put the fastrouter in cheap mode
fastrouter-cheap = true
"""

HOST = [(b"HTTP_HOST", b"example.com")]


def who(answer: bytes) -> str:
    if answer.startswith(b"HTTP/1.1 200 OK") and b"local app" in answer:
        return "local"
    if b"node=" in answer:
        return "remote"
    return "failed"


def test_the_seeds_cheap_mode_with_a_shared_socket(tmp_path):
    app = tmp_path / "myheavyapp.wsgi"
    app.write_text(APP)
    sub = str(tmp_path / "sub.sock")
    ini = tmp_path / "seed.ini"
    ini.write_text(SEED_INI % {"sub": sub, "app": app})
    router = start_router([str(ini)], listeners=1)
    router.wait_for_log(r"uwsgi shared socket 0 bound to TCP address 127.0.0.1:\d+")
    router.wait_for_log(r"spawned uWSGI worker 2")
    router.wait_for_log(r"starting uWSGI fastrouter in cheap mode")
    addr = router.addresses[0]
    # no node subscribed: the local app answers everything
    assert {who(request(addr, HOST)) for _ in range(20)} == {"local"}
    with RecordingBackend("remote") as node:
        load = Load(addr, clients=2)
        try:
            announce(sub, b"example.com", node.address.encode())
            router.wait_for_log(r"leaving cheap mode")
            # both answer now; ask until the remote node has been seen (bounded)
            seen = set()
            for _ in range(400):
                seen.add(who(request(addr, HOST)))
                if "remote" in seen:
                    break
            assert "remote" in seen and "failed" not in seen
        finally:
            load.finish()
        assert load.failed == 0 and load.ok > 0
        # A request the router accepted just before the unsubscribe has no node left and
        # is closed (as in uWSGI): the load stops first, so only the switch is checked.
        announce(sub, b"example.com", node.address.encode(), unsubscribe=True)
        router.wait_for_log(r"no more nodes available. Going cheap")
    assert {who(request(addr, HOST)) for _ in range(20)} == {"local"}


def test_the_local_app_reads_bodies_and_survives_a_reload(tmp_path):
    import os
    import signal
    app = tmp_path / "app.py"
    app.write_text(APP)
    router = start_router(["--master", "--socket", "127.0.0.1:0", "--wsgi-file", str(app),
                           "--processes", "2"], listeners=0)
    m = router.wait_for_log(r"uwsgi socket 0 bound to TCP address (127.0.0.1:\d+)")
    addr = m.group(1)
    router.wait_for_log(r"spawned uWSGI worker 2")
    answer = request(addr, HOST + [(b"CONTENT_LENGTH", b"5")], body=b"hello")
    assert b"local app host=example.com len=5" in answer
    load = Load(addr, clients=2)
    try:
        os.kill(router.pid, signal.SIGHUP)
        router.wait_for_log(r"graceful reload: \d+ old process", timeout=20)
        wait_until(lambda: load.ok > 20, what="requests after the reload")
    finally:
        load.finish()
    assert load.failed == 0


def test_undeferred_shared_sockets_are_numbered_after_the_others(tmp_path):
    with RecordingBackend("u") as node:
        router = start_router(["--shared-socket", "127.0.0.1:0", "--undeferred-shared-socket", "127.0.0.1:0",
                               "--fastrouter", "=1", "--fastrouter-to", node.address])
        first = router.wait_for_log(r"uwsgi shared socket 0 bound to TCP address (\S+) fd").group(1)
        second = router.wait_for_log(r"uwsgi shared socket 1 bound to TCP address (\S+) fd").group(1)
        assert router.addresses == [second] and first != second
        assert b"node=u" in request(second, HOST)
