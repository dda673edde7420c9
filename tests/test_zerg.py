"""Zerg mode: listening sockets lent over a UNIX socket (ours and uWSGI's)."""

from __future__ import annotations

import socket

import pytest

from backends import RecordingBackend, request
from support import sock_path, start_router, start_uwsgi_app

from uwsgi_fastrouter import zerg

HOST = [(b"HTTP_HOST", b"example.com")]


def test_a_router_routes_on_the_sockets_another_router_lends(tmp_path):
    path = sock_path(tmp_path, "zerg.sock")
    with RecordingBackend("z") as node:
        lender = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address,
                               "--zerg-server", path])
        lender.wait_for_log(r"zerg server enabled")
        zergling = start_router(["--fastrouter-zerg", path, "--fastrouter-to", node.address], listeners=1)
        # the zergling accepts on the lender's port: stop the lender, requests still work
        shared = lender.addresses[0]
        assert zergling.addresses[0].endswith(shared.rsplit(":", 1)[1])
        lender.stop()
        for _ in range(5):
            assert request(shared, HOST).startswith(b"HTTP/1.0 200")


def test_garbage_from_a_zerg_server_is_a_clear_error(tmp_path):
    path = sock_path(tmp_path, "bad.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    import threading

    def serve():
        conn, _ = srv.accept()
        conn.sendall(b"not-a-zerg-server")
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    with pytest.raises(zerg.ZergError, match="invalid data received from zerg-server"):
        zerg.attach(path, timeout=5)
    t.join(5)
    srv.close()
    with pytest.raises(zerg.ZergError, match="unable to connect to zerg server"):
        zerg.attach(path, timeout=5)


@pytest.mark.interop
def test_a_real_uwsgi_zerg_server_lends_its_sockets(tmp_path):
    path = sock_path(tmp_path, "uz.sock")
    app = start_uwsgi_app(tmp_path, "def application(e, s):\n    s('200 OK', [])\n    return [b'from uwsgi']\n",
                          socket="127.0.0.1:0", extra=["--zerg-server", path])
    with RecordingBackend("z") as node:
        router = start_router(["--fastrouter-zerg", path, "--fastrouter-to", node.address], listeners=1)
        assert router.addresses[0].endswith(":" + app.address.rsplit(":", 1)[1])
        # the uWSGI worker and our router both accept on the lent socket; which one gets a
        # connection is the kernel's choice, so pause uWSGI's worker to see ours answer
        import os
        import signal
        with open("/proc/%d/task/%d/children" % (app.pid, app.pid)) as handle:
            workers = [int(p) for p in handle.read().split()]
        assert workers
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        try:
            for _ in range(5):
                assert b"node=z" in request(app.address, HOST)
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
        assert request(app.address, HOST)   # and both still answer afterwards


APP = "def application(e, s):\n    s('200 OK', [])\n    return [b'zerg worker']\n"


def test_app_workers_attach_to_a_zerg_server(tmp_path):
    path = sock_path(tmp_path, "lend.sock")
    app_file = tmp_path / "app.py"
    app_file.write_text(APP)
    with RecordingBackend("z") as node:
        lender = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address,
                               "--zerg-server", path])
        lender.wait_for_log(r"zerg server enabled")
        workers = start_router(["--zerg", path, "--wsgi-file", str(app_file), "--processes", "1"],
                               listeners=0)
        workers.wait_for_log(r"spawned uWSGI worker 1")
        shared = lender.addresses[0]
        lender.stop()                      # only the zerg workers accept now
        assert request(shared, HOST).endswith(b"zerg worker")


def test_zerg_fallback_uses_the_own_socket(tmp_path):
    app_file = tmp_path / "app.py"
    app_file.write_text(APP)
    proc = start_router(["--zerg", sock_path(tmp_path, "nobody.sock"), "--zerg-fallback",
                         "--socket", "127.0.0.1:0", "--wsgi-file", str(app_file)], listeners=0)
    m = proc.wait_for_log(r"uwsgi socket 0 bound to TCP address (127.0.0.1:\d+)")
    proc.wait_for_log(r"--zerg-fallback")
    proc.wait_for_log(r"spawned uWSGI worker 1")
    assert request(m.group(1), HOST).endswith(b"zerg worker")
