"""Running the router as a service: log rotation (--touch-logreopen, --log-reopen), dated
log lines, --touch-reload, process names and the app workers' --harakiri."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from backends import RecordingBackend, request
from support import free_dead_tcp_address, start_router, wait_until
from test_master import children

HOST = [(b"HTTP_HOST", b"example.com")]
CONNECT_FAILED = "unable to connect() to node"


def touch(path: Path) -> None:
    """Give *path* a modification time one second later than it has (created if missing)."""
    if not path.exists():
        path.write_text("")
        return
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def listener_in(logfile: Path) -> str:
    """The router's address, from the bound line of its log file."""
    found = wait_until(lambda: re.search(r"bound on (\S+) fd", read(logfile)),
                       what="the bound line in %s" % logfile)
    return found.group(1)


def failing_request(address: str, dead: str) -> None:
    """A request for a node that refuses: the router process writes a log line about it."""
    assert request(address, [(b"UWSGI_FASTROUTER_KEY", dead.encode())]) == b""


@pytest.mark.parametrize("master", [False, True], ids=["single", "master"])
def test_logrotate_rename_then_touch(tmp_path, master):
    logfile, rotated, trigger = tmp_path / "router.log", tmp_path / "router.log.1", tmp_path / "reopen"
    trigger.write_text("")
    dead, _keep = free_dead_tcp_address()
    args = ["--fastrouter", "127.0.0.1:0", "--fastrouter-use-pattern", "%s",
            "--logto", str(logfile), "--touch-logreopen", str(trigger)]
    router = start_router((["--master"] if master else []) + args, listeners=0)
    address = listener_in(logfile)
    failing_request(address, dead)
    wait_until(lambda: CONNECT_FAILED in read(logfile), what="the first failure in the log")

    logfile.rename(rotated)                    # what logrotate does ...
    touch(trigger)                             # ... and its postrotate
    wait_until(lambda: "%s reopened." % logfile in read(logfile), what="the reopened log file")
    assert "triggering log-reopen" in read(rotated)      # the old file's last line says why

    # Every process follows (a router process within its next one-second sweep).
    def a_failure_in_the_new_file() -> bool:
        failing_request(address, dead)
        return CONNECT_FAILED in read(logfile)
    wait_until(a_failure_in_the_new_file, timeout=15, interval=0.2, what="a router line in the new file")
    old = read(rotated)
    before = read(logfile).count(CONNECT_FAILED)
    failing_request(address, dead)
    wait_until(lambda: read(logfile).count(CONNECT_FAILED) > before, what="the next line in the new file")
    assert read(rotated) == old
    assert router.alive()


def test_touch_logreopen_before_the_file_exists(tmp_path):
    logfile, trigger = tmp_path / "router.log", tmp_path / "later"
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", "127.0.0.1:9",
                           "--logto", str(logfile), "--touch-logreopen", str(trigger)], listeners=0)
    listener_in(logfile)
    # said once the watcher is made, which is after the listeners are bound and logged
    line = "unable to stat() %s, events will be triggered as soon as the file is created" % trigger
    wait_until(lambda: line in read(logfile), what="the touch watcher's line")
    logfile.rename(tmp_path / "old.log")
    trigger.write_text("")                     # created: that is a touch
    wait_until(lambda: "reopened." in read(logfile), what="the reopened log")
    assert router.alive()


@pytest.mark.parametrize("reopen", [False, True], ids=["keep", "log-reopen"])
def test_a_reload_reopens_the_log_only_with_log_reopen(tmp_path, reopen):
    logfile, rotated = tmp_path / "router.log", tmp_path / "router.log.1"
    router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-to", "127.0.0.1:9",
                           "--logto", str(logfile)] + (["--log-reopen"] if reopen else []), listeners=0)
    listener_in(logfile)
    logfile.rename(rotated)
    os.kill(router.pid, signal.SIGHUP)
    if reopen:
        wait_until(lambda: "graceful reload: " in read(logfile), what="the reload's lines in the new file")
        assert "graceful reload: " not in read(rotated)
    else:
        wait_until(lambda: "graceful reload: " in read(rotated), what="the reload's lines in the open file")
        assert not logfile.exists()            # as in uWSGI: the open file is kept


def test_log_date_on_every_line(tmp_path):
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", "127.0.0.1:9", "--log-date"])
    router.wait_for_log(r"spawned uWSGI fastrouter 1")
    ctime = r"[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4} - "
    lines = router.log().splitlines()
    assert lines and all(re.match(ctime, line) for line in lines), lines
    ini = tmp_path / "dated.ini"
    ini.write_text("[uwsgi]\nfastrouter = 127.0.0.1:0\nfastrouter-to = 127.0.0.1:9\n"
                   "logdate = [%%Y-%%m-%%d %%H:%%M:%%S]\n")
    dated = start_router([str(ini)], listeners=1)
    dated.wait_for_log(r"spawned uWSGI fastrouter 1")
    lines = dated.log().splitlines()
    assert all(re.match(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] - ", line) for line in lines), lines


def test_touch_reload_is_a_graceful_reload(tmp_path):
    trigger = tmp_path / "reload-me"
    trigger.write_text("")
    with RecordingBackend("t") as node:
        # no --master: --touch-reload implies it, as in uWSGI
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address,
                               "--touch-reload", str(trigger)])
        router.wait_for_log(r"spawned uWSGI fastrouter 1")
        assert len(children(router.pid)) == 1
        first = children(router.pid)[0]
        touch(trigger)
        router.wait_for_log(r"\*\*\* %s has been touched\.\.\. grace them all !!! \*\*\*" % re.escape(str(trigger)))
        router.wait_for_log(r"graceful reload: \d+ old process")
        wait_until(lambda: first not in children(router.pid), what="the old router process to finish")
        assert b"node=t" in request(router.addresses[0], HOST)
        assert router.count(r"has been touched") == 1   # the new image does not fire again


def _comm(pid: int) -> str:
    with open("/proc/%d/comm" % pid) as handle:
        return handle.read().rstrip("\n")


def test_process_names(tmp_path):
    app = tmp_path / "app.py"
    app.write_text("def application(e, s):\n    s('200 OK', [])\n    return [b'ok']\n")
    router = start_router(["--master", "--auto-procname", "--fastrouter", "127.0.0.1:0",
                           "--fastrouter-to", "127.0.0.1:9", "--socket", "127.0.0.1:0",
                           "--wsgi-file", str(app)])
    router.wait_for_log(r"spawned uWSGI worker 1")
    assert _comm(router.pid) == "uWSGI master"
    wait_until(lambda: sorted(_comm(p) for p in children(router.pid)) == ["uWSGI fastroute", "uWSGI worker 1"],
               what="the children's names")   # Linux keeps 15 bytes
    named = start_router(["--master", "--procname-prefix-spaced", "edge", "--procname-master", "boss",
                          "--fastrouter", "127.0.0.1:0", "--fastrouter-to", "127.0.0.1:9"])
    named.wait_for_log(r"spawned uWSGI fastrouter 1")
    assert _comm(named.pid) == "edge boss"
    wait_until(lambda: [_comm(p) for p in children(named.pid)] == ["edge uWSGI fast"], what="the router's name")
    single = start_router(["--procname", "lonely", "--fastrouter", "127.0.0.1:0", "--fastrouter-to", "127.0.0.1:9"])
    single.wait_for_log(r"spawned uWSGI fastrouter 1")
    assert _comm(single.pid) == "lonely"
    plain = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", "127.0.0.1:9"])
    plain.wait_for_log(r"spawned uWSGI fastrouter 1")
    assert not _comm(plain.pid).startswith("uWSGI")    # no name asked for: none given


def test_app_worker_harakiri(tmp_path, sock_dir):
    app = tmp_path / "app.py"
    app.write_text("import time\n"
                   "def application(environ, start_response):\n"
                   "    if environ['PATH_INFO'] == '/slow':\n"
                   "        time.sleep(60)\n"
                   "    start_response('200 OK', [])\n"
                   "    return [b'fast']\n")
    app_socket = str(sock_dir / "app.sock")
    router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-to", app_socket,
                           "--socket", app_socket, "--wsgi-file", str(app), "--harakiri", "1"])
    router.wait_for_log(r"spawned uWSGI worker 1")
    assert request(router.addresses[0], HOST + [(b"PATH_INFO", b"/slow")], timeout=30) == b""
    router.wait_for_log(r"\*\*\* HARAKIRI ON WORKER 1 \(pid: \d+, try: 1\) \*\*\*")
    router.wait_for_log(r"spawned uWSGI worker 1", count=2)
    assert request(router.addresses[0], HOST + [(b"PATH_INFO", b"/")]).endswith(b"fast")
