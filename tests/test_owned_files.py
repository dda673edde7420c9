"""Files at paths the operator names are ours: the master FIFO, the pidfile, the umask (D15, D16).

End to end, with the real command line.  The unit tests of the functions behind them
are in test_proccontrol.py.
"""

from __future__ import annotations

import os
import re
import signal
import stat

import pytest

from backends import RecordingBackend, request
from support import Proc, router_argv, sock_path, start_router, wait_until

HOST = [(b"HTTP_HOST", b"example.com")]
MODES = {"single": [], "master": ["--master"]}


def facts(path) -> tuple:
    """(kind, permission bits, owner, inode) of *path* itself (links not followed)."""
    info = os.lstat(str(path))
    kind = "fifo" if stat.S_ISFIFO(info.st_mode) else "link" if stat.S_ISLNK(info.st_mode) \
        else "socket" if stat.S_ISSOCK(info.st_mode) else "file" if stat.S_ISREG(info.st_mode) else "?"
    return kind, stat.S_IMODE(info.st_mode), info.st_uid, info.st_ino


def fresh_fifo(path, old_inode: int) -> bool:
    """A FIFO at *path*, mode 0600, ours, and not *old_inode* (keep the old file open
    while waiting: the file system could otherwise give its inode number again)."""
    try:
        kind, mode, uid, inode = facts(path)
    except FileNotFoundError:
        return False
    return kind == "fifo" and inode != old_inode and mode == 0o600 and uid == os.geteuid()


def fifo_command(path, command: bytes) -> None:
    with open(str(path), "wb", buffering=0) as fifo:
        fifo.write(command)


def failed_start(args) -> Proc:
    proc = Proc(router_argv(args))
    wait_until(lambda: not proc.alive(), timeout=20, what="the router to give up")
    return proc


def with_umask(mask: str, args) -> list:
    """The router's command line run by a shell that sets the umask first."""
    return ["/bin/sh", "-c", 'umask %s && exec "$@"' % mask, "sh"] + router_argv(args)


# ---------------------------------------------------------------------------
# The master FIFO

def test_a_planted_fifo_is_replaced_and_commands_written_into_it_do_nothing(tmp_path):
    path = tmp_path / "master.fifo"
    os.mkfifo(str(path))
    os.chmod(str(path), 0o666)                       # planted by someone else, writable by all
    planted = os.open(str(path), os.O_RDWR | os.O_NONBLOCK)
    try:
        old_inode = os.fstat(planted).st_ino
        with RecordingBackend("f") as node:
            router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address,
                                   "--master-fifo", str(path)])
            wait_until(lambda: fresh_fifo(path, old_inode), what="a fresh FIFO (mode 0600, ours)")
            os.write(planted, b"q")                  # a shutdown, into the pipe we no longer read
            fifo_command(path, b"x")
            router.wait_for_log(r"\[master-fifo\] unknown command .x.")
            assert os.read(planted, 16) == b"q"      # nobody took it
            assert router.alive() and b"node=f" in request(router.addresses[0], HOST)
            fifo_command(path, b"q")
            wait_until(lambda: not router.alive(), timeout=20, what="q to shut the master down")
            assert router.returncode == 0
    finally:
        os.close(planted)


def test_a_regular_file_at_the_fifo_path_is_replaced(tmp_path):
    path = tmp_path / "master.fifo"
    path.write_text("not a fifo\n")
    with open(str(path)) as old, RecordingBackend("f") as node:
        router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address,
                               "--master-fifo", str(path)])
        wait_until(lambda: fresh_fifo(path, os.fstat(old.fileno()).st_ino),
                   what="a fresh FIFO (mode 0600, ours)")
        fifo_command(path, b"x")
        router.wait_for_log(r"\[master-fifo\] unknown command .x.")
        assert b"node=f" in request(router.addresses[0], HOST)
        assert "Traceback" not in router.log()


def test_the_fifo_is_made_anew_by_a_graceful_reload_and_still_works(tmp_path):
    path = tmp_path / "master.fifo"
    with RecordingBackend("f") as node:
        router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address,
                               "--master-fifo", str(path)])
        wait_until(lambda: fresh_fifo(path, 0), what="the master FIFO")
        first = os.open(str(path), os.O_RDWR | os.O_NONBLOCK)
        try:
            os.write(first, b"r")
            router.wait_for_log(r"graceful reload: \d+ old process", timeout=20)
            wait_until(lambda: fresh_fifo(path, os.fstat(first).st_ino),
                       what="the FIFO of the reloaded master (mode 0600, ours)")
            os.write(first, b"q")                    # the previous image's pipe: read by nobody
            assert b"node=f" in request(router.addresses[0], HOST)
            fifo_command(path, b"x")
            router.wait_for_log(r"\[master-fifo\] unknown command .x.")
            assert router.alive() and os.read(first, 16) == b"q"
            fifo_command(path, b"q")
            wait_until(lambda: not router.alive(), timeout=20, what="q after the reload")
            assert router.returncode == 0
        finally:
            os.close(first)


@pytest.mark.parametrize("where", ["missing-directory", "directory"])
def test_an_impossible_fifo_path_is_a_start_up_error(tmp_path, where):
    if where == "directory":
        path = tmp_path / "master.fifo"
        path.mkdir()
        why = "is a directory"
    else:
        path = tmp_path / "missing" / "master.fifo"
        why = "cannot be created as the master FIFO: No such file or directory"
    proc = failed_start(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-to", "127.0.0.1:9",
                         "--master-fifo", str(path)])
    assert proc.returncode == 1
    log = proc.log()
    assert 'option "--master-fifo": %s %s' % (path, why) in log
    assert "Traceback" not in log and "spawned" not in log


# ---------------------------------------------------------------------------
# The pidfile

@pytest.mark.parametrize("mode", MODES)
def test_a_symlink_at_the_pidfile_path_is_refused(tmp_path, mode):
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    pidfile = tmp_path / "r.pid"
    pidfile.symlink_to(target)
    proc = failed_start(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", "127.0.0.1:9",
                         "--pidfile", str(pidfile)] + MODES[mode])
    assert proc.returncode == 1
    assert 'option "--pidfile": %s is a symbolic link' % pidfile in proc.log()
    assert target.read_text() == "keep me\n" and pidfile.is_symlink()
    assert "Traceback" not in proc.log()


@pytest.mark.parametrize("mode", MODES)
def test_the_pidfile_is_removed_at_exit_only_while_it_is_ours(tmp_path, mode):
    pidfile = tmp_path / "r.pid"
    args = ["--fastrouter", "127.0.0.1:0", "--fastrouter-to", "127.0.0.1:9", "--vacuum",
            "--pidfile", str(pidfile)] + MODES[mode]
    router = start_router(args)
    router.wait_for_log(r"spawned uWSGI fastrouter 1")
    assert pidfile.read_text() == "%d\n" % router.pid
    assert router.stop() == 0
    assert not pidfile.exists()                       # ours: removed
    for replace in ("another pid", "a symlink"):
        router = start_router(args)
        router.wait_for_log(r"spawned uWSGI fastrouter 1")
        pidfile.unlink()
        if replace == "another pid":
            pidfile.write_text("1\n")
        else:
            target = tmp_path / "precious"
            target.write_text("%d\n" % router.pid)
            pidfile.symlink_to(target)
        assert router.stop() == 0
        assert "pidfile %s left in place" % pidfile in router.log()
        if replace == "another pid":
            assert pidfile.read_text() == "1\n"
        else:
            assert pidfile.is_symlink() and target.read_text() == "%d\n" % router.pid
            pidfile.unlink()


# ---------------------------------------------------------------------------
# The umask

@pytest.mark.parametrize("mode", MODES)
def test_umask_applies_to_unix_sockets_and_the_pidfile(tmp_path, sock_dir, mode):
    listener = sock_path(sock_dir, "r.sock")
    pidfile = tmp_path / "r.pid"
    router = Proc(with_umask("000", ["--umask", "077", "--fastrouter", listener, "--fastrouter-to",
                                     "127.0.0.1:9", "--pidfile", str(pidfile)] + MODES[mode]))
    router.wait_for_log(r"spawned uWSGI fastrouter 1")
    assert facts(listener)[:2] == ("socket", 0o700)
    assert facts(pidfile)[:2] == ("file", 0o600)
    assert router.stop() == 0


@pytest.mark.parametrize("mode", MODES)
def test_daemonize_keeps_the_umask(tmp_path, sock_dir, mode):
    listener = sock_path(sock_dir, "d.sock")
    pidfile = tmp_path / "d.pid"
    logfile = tmp_path / "d.log"
    launcher = Proc(with_umask("027", ["--fastrouter", listener, "--fastrouter-to", "127.0.0.1:9",
                                       "--daemonize", str(logfile), "--pidfile", str(pidfile)]
                               + MODES[mode]))
    wait_until(lambda: not launcher.alive(), what="the launcher to return")
    assert launcher.returncode == 0
    wait_until(lambda: logfile.exists() and "spawned uWSGI fastrouter 1" in logfile.read_text(),
               what="the daemon's log")
    # the daemon is in a session of its own: it is stopped here, by its pid
    daemon = int(re.search(r"\(pid: (\d+)\)", logfile.read_text()).group(1))
    try:
        if mode == "master":
            daemon = int(pidfile.read_text())
        assert pidfile.read_text() == "%d\n" % daemon
        assert facts(pidfile)[:2] == ("file", 0o640)
        assert facts(listener)[:2] == ("socket", 0o750)
        assert facts(logfile)[:2] == ("file", 0o640)
    finally:
        os.kill(daemon, signal.SIGINT)
        wait_until(lambda: not os.path.exists("/proc/%d" % daemon) or
                   open("/proc/%d/stat" % daemon).read().rsplit(")", 1)[1].split()[0] == "Z",
                   timeout=15, what="the daemon to stop")


def test_a_bad_umask_is_a_start_up_error():
    proc = failed_start(["--umask", "22x", "--fastrouter", "127.0.0.1:0"])
    assert proc.returncode == 1
    assert 'invalid value for option "umask": \'22x\' is not an octal mode' in proc.log()
