"""Process control: user/group ids, privileges, the log file, daemonizing, the harakiri heartbeat.

Everything that changes the process (ids, descriptors 1 and 2, sessions) runs in a
forked child that reports back over a pipe; every wait is bounded.
"""

from __future__ import annotations

import grp
import io
import json
import os
import pwd
import select
import signal
import stat
import sys
import time
from types import SimpleNamespace
from typing import Any, Callable, Optional

import pytest

from support import wait_until
from uwsgi_fastrouter import log as logmod
from uwsgi_fastrouter.proccontrol import (
    BEAT_INTERVAL, Heartbeat, LogReopener, PrivilegeError, SetupError, TouchWatcher, daemonize,
    drop_privileges, harakiri_line, log_file, make_master_fifo, open_log, process_name,
    remove_pidfile, reopen_log, resolve_group, resolve_user, set_process_name, start_beating,
    write_pidfile,
)
from uwsgi_fastrouter.reactor import Reactor

IS_ROOT = os.getuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="changing ids needs root")


def _nobody():
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user named nobody")


# ---------------------------------------------------------------------------
# Running code in a forked child

def _wait_exit(pid: int, timeout: float = 10.0) -> int:
    """waitpid() with a bound; the child is SIGKILLed (by PID) if it overstays."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("child %d did not exit within %.1f s" % (pid, timeout))
        time.sleep(0.01)  # polling interval of a bounded wait


def _read_all(fd: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("no complete answer from the child within %.1f s" % timeout)
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            data = os.read(fd, 65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def in_child(func: Callable[[], Any], timeout: float = 10.0) -> dict:
    """Run *func* in a forked child; return ``{"ok": True, "result": ...}`` or the error."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            os.close(rfd)
            try:
                answer = {"ok": True, "result": func()}
            except BaseException as exc:
                answer = {"ok": False, "type": type(exc).__name__, "error": str(exc),
                          "errno": getattr(exc, "errno", None),
                          "filename": getattr(exc, "filename", None)}
            data = json.dumps(answer).encode()
            while data:
                data = data[os.write(wfd, data):]
        except BaseException:
            code = 99
        finally:
            os._exit(code)
    os.close(wfd)
    try:
        raw = _read_all(rfd, timeout)
    finally:
        os.close(rfd)
        status = _wait_exit(pid, timeout)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "child status %r" % status
    return json.loads(raw.decode())


def _capture_log() -> io.StringIO:
    buf = io.StringIO()
    logmod.set_stream(buf)
    return buf


# ---------------------------------------------------------------------------
# resolve_user / resolve_group

def test_resolve_user_numbers_and_names():
    assert resolve_user("0") == 0
    assert resolve_user("root") == 0
    assert resolve_user("65534") == 65534
    assert resolve_user(" 1234 ") == 1234
    nobody = _nobody()
    assert resolve_user("nobody") == nobody.pw_uid


def test_resolve_group_numbers_and_names():
    assert resolve_group("0") == 0
    assert resolve_group(grp.getgrgid(0).gr_name) == 0
    assert resolve_group("4321") == 4321
    nobody = _nobody()
    try:
        name = grp.getgrgid(nobody.pw_gid).gr_name
    except KeyError:
        pytest.skip("nobody's group has no name")
    assert resolve_group(name) == nobody.pw_gid


@pytest.mark.parametrize("func,what", [(resolve_user, "user"), (resolve_group, "group")])
def test_resolve_unknown_names_the_value(func, what):
    with pytest.raises(ValueError) as info:
        func("no-such-name-zq9")
    assert str(info.value) == "%s no-such-name-zq9 not found." % what
    for bad in ("", "-1", "12abc"):
        with pytest.raises(ValueError):
            func(bad)


# ---------------------------------------------------------------------------
# drop_privileges

def test_drop_privileges_none_is_a_noop():
    buf = _capture_log()
    try:
        before = (os.getuid(), os.geteuid(), os.getgid(), os.getegid(), sorted(os.getgroups()))
        drop_privileges(None, None)
        after = (os.getuid(), os.geteuid(), os.getgid(), os.getegid(), sorted(os.getgroups()))
    finally:
        logmod.set_stream(None)
    assert before == after
    assert buf.getvalue() == ""


@needs_root
def test_drop_privileges_as_root_to_nobody():
    nobody = _nobody()

    def child():
        buf = _capture_log()
        drop_privileges(nobody.pw_uid, nobody.pw_gid)
        try:
            os.setuid(0)
            regained = True
        except OSError:
            regained = False
        return {"ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid()],
                "groups": sorted(os.getgroups()), "regained": regained,
                "log": buf.getvalue().splitlines()}

    answer = in_child(child)
    assert answer["ok"], answer
    out = answer["result"]
    assert out["ids"] == [nobody.pw_uid, nobody.pw_uid, nobody.pw_gid, nobody.pw_gid]
    assert out["groups"] == [nobody.pw_gid]     # root's supplementary groups are gone
    assert out["regained"] is False
    assert out["log"] == ["setgid() to %d" % nobody.pw_gid, "setuid() to %d" % nobody.pw_uid]


@needs_root
def test_drop_privileges_prefix_and_single_ids():
    nobody = _nobody()

    def gid_only():
        buf = _capture_log()
        drop_privileges(None, nobody.pw_gid, who="uWSGI fastrouter 2")
        return {"uid": os.getuid(), "gid": os.getgid(), "log": buf.getvalue().splitlines()}

    answer = in_child(gid_only)
    assert answer["ok"], answer
    out = answer["result"]
    assert out == {"uid": 0, "gid": nobody.pw_gid,
                   "log": ["uWSGI fastrouter 2 setgid() to %d" % nobody.pw_gid]}

    def uid_only():
        buf = _capture_log()
        drop_privileges(nobody.pw_uid, None, who="uWSGI fastrouter 1")
        return {"uid": os.getuid(), "gid": os.getgid(), "log": buf.getvalue().splitlines()}

    answer = in_child(uid_only)
    assert answer["ok"], answer
    out = answer["result"]
    assert out == {"uid": nobody.pw_uid, "gid": 0,
                   "log": ["uWSGI fastrouter 1 setuid() to %d" % nobody.pw_uid]}


def test_drop_privileges_as_non_root():
    """A non-root process may "set" the ids it has; anything else is a PrivilegeError."""
    if IS_ROOT:
        nobody = _nobody()
        uid, gid = nobody.pw_uid, nobody.pw_gid
    else:
        uid, gid = os.getuid(), os.getgid()
    other = uid + 1 if uid + 1 != 0 else uid + 2

    def child():
        if IS_ROOT:
            os.setgroups([gid])
            os.setgid(gid)
            os.setuid(uid)
        buf = _capture_log()
        drop_privileges(uid, gid)           # the same ids: silently accepted
        results = {"same": buf.getvalue()}
        for args, name in (((other, None), "uid"), ((None, gid + 1), "gid")):
            try:
                drop_privileges(*args)
                results[name] = None
            except PrivilegeError as exc:
                results[name] = [isinstance(exc, OSError), exc.errno, str(exc)]
        results["ids"] = [os.getuid(), os.getgid()]
        return results

    answer = in_child(child)
    assert answer["ok"], answer
    out = answer["result"]
    assert out["same"] == ""
    assert out["uid"][0] is True and out["uid"][1] == 1
    assert "cannot setuid() as non-root user" in out["uid"][2]
    assert "cannot setgid() as non-root user" in out["gid"][2]
    assert out["ids"] == [uid, gid]


def test_privilege_error_is_an_oserror():
    assert issubclass(PrivilegeError, OSError)


# ---------------------------------------------------------------------------
# open_log

def test_open_log_redirects_everything(tmp_path):
    path = tmp_path / "router.log"
    path.write_text("an older line\n")
    fresh = tmp_path / "fresh.log"

    def child():
        os.umask(0o022)
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__   # as outside pytest
        open_log(str(path))
        print("print to stdout")                 # no explicit flush: line-buffered
        sys.stderr.write("write to stderr\n")
        logmod.log("through log()")
        os.write(1, b"raw fd 1\n")
        os.write(2, b"raw fd 2\n")
        rc = os.system("echo from a child process")
        open_log(str(fresh))
        logmod.log("into the fresh file")
        return {"rc": rc, "fd1": os.fstat(1).st_ino, "fd2": os.fstat(2).st_ino}

    answer = in_child(child)
    assert answer["ok"], answer
    assert answer["result"]["rc"] == 0
    assert answer["result"]["fd1"] == answer["result"]["fd2"] == os.stat(fresh).st_ino
    lines = path.read_text().splitlines()
    assert lines[0] == "an older line"           # appended, not truncated
    assert sorted(lines[1:]) == sorted(["print to stdout", "write to stderr", "through log()",
                                        "raw fd 1", "raw fd 2", "from a child process"])
    assert fresh.read_text() == "into the fresh file\n"
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o640


def test_reopen_log_follows_a_rename(tmp_path):
    path = tmp_path / "router.log"
    rotated = tmp_path / "router.log.1"

    def child():
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        open_log(str(path))
        logmod.log("before")
        os.rename(path, rotated)
        logmod.log("still the old file")
        reopen_log(str(path))
        logmod.log("after")                    # the same stream, now on the new file
        print("stdout too")
        os.write(2, b"raw fd 2\n")
        try:
            reopen_log(str(tmp_path / "missing" / "x.log"))
        except OSError as exc:
            failed = exc.filename
        logmod.log("the new file is kept after a failed reopen")
        return failed

    answer = in_child(child)
    assert answer["ok"], answer
    assert answer["result"] == str(tmp_path / "missing" / "x.log")
    assert rotated.read_text().splitlines() == ["before", "still the old file"]
    assert path.read_text().splitlines() == ["after", "stdout too", "raw fd 2",
                                             "the new file is kept after a failed reopen"]
    assert stat.S_IMODE(path.stat().st_mode) & 0o777 == 0o640 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class FakeStat:
    """A stat() whose answers the test sets: path -> mtime_ns, absent means missing."""

    def __init__(self, **files):
        self.files = dict(files)

    def __call__(self, path):
        if path not in self.files:
            raise FileNotFoundError(path)
        return SimpleNamespace(st_mtime_ns=self.files[path])


def test_touch_watcher_sees_changes_creation_and_removal(capsys):
    fake = FakeStat(a=1, b=5)
    watcher = TouchWatcher(["a", "b", "c"], report=True, stat=fake)
    assert capsys.readouterr().err == (
        "unable to stat() c, events will be triggered as soon as the file is created\n")
    assert watcher.touched() is None                 # the first look only records
    fake.files["b"] = 6
    assert watcher.touched() == "b"
    assert watcher.touched() is None
    fake.files["a"] = 0                              # an older time is a change too
    assert watcher.touched() == "a"
    fake.files["c"] = 7
    assert watcher.touched() == "c"
    del fake.files["c"]
    assert watcher.touched() == "c"
    fake.files["a"] = 2
    fake.files["b"] = 9
    assert watcher.touched() == "a"                  # both recorded, one reported
    assert watcher.touched() is None
    TouchWatcher(["missing"], stat=fake)             # silent without report
    assert capsys.readouterr().err == ""


def test_log_reopener_without_a_log_file_says_so(capsys):
    reopener = LogReopener(["t"], None, announce=True)
    reopener.watcher = TouchWatcher(["t"], stat=FakeStat(t=1))
    reopener.watcher._stat.files["t"] = 2
    reopener.check()
    assert "t touched: no --logto or --daemonize file to reopen" in capsys.readouterr().err


def test_log_file_is_logto_else_daemonize():
    class Cfg:
        logto = None
        daemonize = None
    cfg = Cfg()
    assert log_file(cfg) is None
    cfg.daemonize = "/var/log/d.log"
    assert log_file(cfg) == "/var/log/d.log"
    cfg.logto = "/var/log/l.log"
    assert log_file(cfg) == "/var/log/l.log"


def test_process_names_follow_uwsgi():
    from uwsgi_fastrouter.options import load_config

    def name(argv, job="uWSGI fastrouter 1", master=False):
        return process_name(load_config(argv, {}, warn=lambda line: None), job, master=master)

    assert name([]) is None                                  # nothing asked: names unchanged
    assert name(["--auto-procname"]) == "uWSGI fastrouter 1"
    assert name(["--auto-procname"], "uWSGI master", master=True) == "uWSGI master"
    assert name(["--procname-prefix", "a-"]) == "a-uWSGI fastrouter 1"     # implies auto
    assert name(["--procname-prefix-spaced", "a"]) == "a uWSGI fastrouter 1"
    assert name(["--procname-prefix-spaced", "a", "--procname-prefix", "b"]) == "buWSGI fastrouter 1"
    assert name(["--procname-prefix", "b", "--procname-prefix-spaced", "a"]) == "a uWSGI fastrouter 1"
    assert name(["--procname-append", "!"]) == "uWSGI fastrouter 1!"
    assert name(["--procname", "x"]) == "x"
    assert name(["--procname", "x", "--procname-master", "m"], "uWSGI master", master=True) == "m"
    assert name(["--procname-master", "m", "--procname-prefix-spaced", "p"]) == "p uWSGI fastrouter 1"
    assert name(["--procname-master", "m", "--procname-prefix-spaced", "p"], "uWSGI master",
                master=True) == "p m"


def test_set_process_name_never_fails_start_up(tmp_path):
    comm = tmp_path / "comm"
    assert set_process_name("a name longer than fifteen bytes", str(comm))
    assert comm.read_bytes() == b"a name longer t"
    assert set_process_name("\u00e9" * 10, str(comm))
    assert comm.read_bytes() == "\u00e9".encode() * 7       # no half character
    assert set_process_name(None, str(comm)) is False
    assert set_process_name("x", str(tmp_path / "no" / "such" / "comm")) is False

    def child():
        set_process_name("renamed")
        with open("/proc/self/comm") as handle:
            return handle.read()

    answer = in_child(child)
    assert answer["ok"] and answer["result"] == "renamed\n"


def test_open_log_error_names_the_path(tmp_path):
    path = str(tmp_path / "missing-dir" / "router.log")
    with pytest.raises(OSError) as info:
        open_log(path)
    assert info.value.filename == path
    assert path in str(info.value)
    assert not (tmp_path / "missing-dir").exists()


# ---------------------------------------------------------------------------
# daemonize

def _process_gone(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        return not _pid_exists(pid)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run_daemon(tmp_path, logfile: Optional[str]) -> dict:
    """Fork a child that daemonizes; the daemon reports about itself in a JSON file."""
    report = tmp_path / "daemon.json"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, then in the daemon
        try:
            os.umask(0o027)
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__   # as outside pytest
            daemonize(logfile)
            info = {
                "pid": os.getpid(),
                "sid": os.getsid(0), "pgid": os.getpgid(0),
                "cwd": os.getcwd(), "umask": os.umask(0),
                "stdin": [os.fstat(0).st_rdev, os.fstat(0).st_ino],
                "stdout_ino": os.fstat(1).st_ino, "stderr_ino": os.fstat(2).st_ino,
            }
            print("daemon stdout %d" % info["pid"])
            logmod.log("daemon log %d" % info["pid"])
            tmp = str(report) + ".tmp"
            with open(tmp, "w") as handle:
                json.dump(info, handle)
            os.rename(tmp, str(report))
        finally:
            os._exit(0)
    status = _wait_exit(pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    wait_until(report.exists, timeout=10.0, what="the daemon's report")
    info = json.loads(report.read_text())
    info["child"] = pid
    try:
        wait_until(lambda: _process_gone(info["pid"]), timeout=10.0, what="the daemon to exit")
    except AssertionError:
        os.kill(info["pid"], signal.SIGKILL)
        raise
    return info


def test_daemonize_detaches(tmp_path, monkeypatch):
    monkeypatch.chdir(str(tmp_path))
    logfile = tmp_path / "daemon.log"
    info = _run_daemon(tmp_path, str(logfile))
    assert info["pid"] != info["child"]
    assert info["sid"] != os.getsid(0)           # a session of its own...
    assert info["sid"] != info["pid"]            # ...but not its leader (no tty can come back)
    assert info["pgid"] == info["sid"]
    assert info["cwd"] == str(tmp_path)          # the working directory is kept
    assert info["umask"] == 0o027                # kept (uWSGI clears it: D16)
    null = os.stat(os.devnull)
    assert info["stdin"] == [null.st_rdev, null.st_ino]
    assert info["stdout_ino"] == info["stderr_ino"] == os.stat(logfile).st_ino
    assert logfile.read_text().splitlines() == ["daemon stdout %d" % info["pid"],
                                                "daemon log %d" % info["pid"]]


def test_daemonize_without_log_file_writes_to_dev_null(tmp_path, monkeypatch):
    monkeypatch.chdir(str(tmp_path))
    info = _run_daemon(tmp_path, "")
    null = os.stat(os.devnull)
    assert info["stdout_ino"] == info["stderr_ino"] == null.st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["daemon.json"]


def test_daemonize_reports_a_bad_log_file_before_forking(tmp_path):
    path = str(tmp_path / "missing-dir" / "daemon.log")

    def child():
        me = os.getpid()
        try:
            daemonize(path)
        except OSError as exc:
            return {"same_process": os.getpid() == me, "filename": exc.filename}
        os._exit(3)   # the daemon (should never get here)

    answer = in_child(child)
    assert answer == {"ok": True, "result": {"same_process": True, "filename": path}}


# ---------------------------------------------------------------------------
# The pidfile and the master FIFO (D15, D16)

@pytest.fixture
def umask():
    """Set the umask for one test; the previous one is restored afterwards."""
    saved = os.umask(0o022)
    yield os.umask
    os.umask(saved)


def test_pidfile_is_written_with_mode_0644_minus_the_umask(tmp_path, umask):
    path = tmp_path / "a.pid"
    umask(0o027)
    write_pidfile(str(path), 4242)
    assert path.read_text() == "4242\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    inode = path.stat().st_ino
    path.write_text("999999 and more\n")
    write_pidfile(str(path), 17)                   # an existing file is rewritten in place
    assert path.read_text() == "17\n" and path.stat().st_ino == inode


def test_pidfile_refuses_a_symlink_and_leaves_its_target_alone(tmp_path):
    target = tmp_path / "precious"
    target.write_text("do not touch\n")
    link = tmp_path / "a.pid"
    link.symlink_to(target)
    with pytest.raises(SetupError) as info:
        write_pidfile(str(link), 4242)
    assert str(info.value) == ('option "--pidfile": %s is a symbolic link: refusing to write the pid '
                               'through it (remove it, or give the real path)' % link)
    assert target.read_text() == "do not touch\n" and link.is_symlink()
    dangling = tmp_path / "b.pid"
    dangling.symlink_to(tmp_path / "created-through-the-link")
    with pytest.raises(SetupError, match="symbolic link"):
        write_pidfile(str(dangling), 4242)
    assert not (tmp_path / "created-through-the-link").exists()


def test_pidfile_refuses_what_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "a.pid"
    os.mkfifo(str(fifo))
    with pytest.raises(SetupError, match=r'option "--pidfile": .*a\.pid is not a regular file'):
        write_pidfile(str(fifo), 4242)             # without blocking on the FIFO
    with pytest.raises(SetupError, match=r'option "--pidfile": unable to write the pidfile .*missing'):
        write_pidfile(str(tmp_path / "missing" / "a.pid"), 4242)


def test_pidfile_is_removed_only_while_it_is_ours(tmp_path):
    path = tmp_path / "a.pid"
    write_pidfile(str(path), 4242)
    assert remove_pidfile(str(path), 4242) and not path.exists()
    assert not remove_pidfile(str(path), 4242)     # gone already: nothing to do
    path.write_text("4243\n")                      # another process's pid now
    assert not remove_pidfile(str(path), 4242) and path.read_text() == "4243\n"
    target = tmp_path / "precious"
    target.write_text("4242\n")
    path.unlink()
    path.symlink_to(target)                         # a link, even to a file with our pid
    assert not remove_pidfile(str(path), 4242)
    assert path.is_symlink() and target.read_text() == "4242\n"


def _fifo_facts(path) -> tuple:
    info = os.lstat(str(path))
    return stat.S_ISFIFO(info.st_mode), stat.S_IMODE(info.st_mode), info.st_uid


def test_master_fifo_replaces_a_planted_fifo(tmp_path, umask):
    path = tmp_path / "master.fifo"
    os.mkfifo(str(path))
    os.chmod(str(path), 0o666)
    planted = os.open(str(path), os.O_RDWR | os.O_NONBLOCK)
    old_inode = os.fstat(planted).st_ino
    umask(0)                                        # the mode must not depend on it
    fd = make_master_fifo(str(path))
    try:
        assert _fifo_facts(path) == (True, 0o600, os.geteuid())
        assert os.stat(str(path)).st_ino != old_inode
        os.write(planted, b"q")                     # into the old pipe: nobody reads it...
        with pytest.raises(BlockingIOError):
            os.read(fd, 16)                         # ...and the new one holds nothing
        with open(str(path), "wb", buffering=0) as writer:
            writer.write(b"r")
        assert os.read(fd, 16) == b"r"
        assert os.get_inheritable(fd) is False and os.get_blocking(fd) is False
    finally:
        os.close(fd)
        os.close(planted)


@pytest.mark.parametrize("mask", [0o022, 0o277, 0o777])
def test_master_fifo_mode_is_0600_whatever_the_umask(tmp_path, umask, mask):
    umask(mask)
    fd = make_master_fifo(str(tmp_path / "m.fifo"))
    os.close(fd)
    assert _fifo_facts(tmp_path / "m.fifo") == (True, 0o600, os.geteuid())
    assert umask(0o022) == mask                     # the process umask is left as it was


def test_master_fifo_replaces_a_regular_file_and_a_symlink(tmp_path):
    path = tmp_path / "m.fifo"
    path.write_text("junk")
    os.close(make_master_fifo(str(path)))
    assert _fifo_facts(path)[:2] == (True, 0o600)
    target = tmp_path / "precious"
    target.write_text("keep")
    path.unlink()
    path.symlink_to(target)
    os.close(make_master_fifo(str(path)))
    assert _fifo_facts(path)[:2] == (True, 0o600) and target.read_text() == "keep"


def test_master_fifo_failures_name_the_option_and_the_path(tmp_path):
    directory = tmp_path / "m.fifo"
    directory.mkdir()
    with pytest.raises(SetupError) as info:
        make_master_fifo(str(directory))
    assert str(info.value) == ('option "--master-fifo": %s is a directory: refusing to replace it '
                               'with the master FIFO' % directory)
    assert directory.is_dir()
    missing = tmp_path / "missing" / "m.fifo"
    with pytest.raises(SetupError) as info:
        make_master_fifo(str(missing))
    assert str(info.value) == ('option "--master-fifo": %s cannot be created as the master FIFO: '
                               'No such file or directory' % missing)


# ---------------------------------------------------------------------------
# Heartbeat (router harakiri)

def test_harakiri_line():
    assert harakiri_line(1, 4242) == "*** HARAKIRI ON GATEWAY uWSGI fastrouter 1 (pid: 4242) ***"


def test_heartbeat_is_shared_across_fork():
    heartbeat = Heartbeat(3)
    heartbeat.reset(0, 10.0)

    def child():
        heartbeat.beat(1, 12345.5)
        heartbeat.beat(2, 777.25)
        return heartbeat.last(0)

    answer = in_child(child)
    assert answer == {"ok": True, "result": 10.0}
    assert [heartbeat.last(i) for i in range(3)] == [10.0, 12345.5, 777.25]
    heartbeat.close()


def test_stale_with_injected_times():
    heartbeat = Heartbeat(2)
    assert BEAT_INTERVAL == heartbeat.period == 1.0
    limit = 3.0
    # Never stamped: not supervised yet.
    assert heartbeat.last(0) == 0.0
    assert not heartbeat.stale(0, 1e9, limit)
    heartbeat.reset(0, 100.0)
    assert not heartbeat.stale(0, 100.0, limit)
    assert not heartbeat.stale(0, 104.0, limit)   # limit + one beat period: still fine
    assert heartbeat.stale(0, 104.01, limit)
    heartbeat.beat(0, 104.0)
    assert not heartbeat.stale(0, 104.01, limit)
    assert heartbeat.stale(0, 108.5, limit)
    # Harakiri off.
    assert not heartbeat.stale(0, 1e9, 0)
    # Slots are independent.
    heartbeat.reset(1, 50.0)
    assert heartbeat.stale(1, 104.01, limit) and not heartbeat.stale(0, 104.01, limit)
    # A respawn resets the slot.
    heartbeat.reset(1, 104.01)
    assert not heartbeat.stale(1, 104.01, limit)


def test_heartbeat_bounds():
    with pytest.raises(ValueError):
        Heartbeat(0)
    heartbeat = Heartbeat(2)
    for slot in (-1, 2):
        with pytest.raises(IndexError):
            heartbeat.beat(slot, 1.0)
        with pytest.raises(IndexError):
            heartbeat.last(slot)


class _FakeReactor:
    def __init__(self):
        self.pending = []

    def call_later(self, delay, callback, *args):
        timer = _FakeTimer(delay, callback, args)
        self.pending.append(timer)
        return timer


class _FakeTimer:
    def __init__(self, delay, callback, args):
        self.delay, self.callback, self.args, self.cancelled = delay, callback, args, False

    def cancel(self):
        self.cancelled = True


def test_start_beating_repeats_and_cancels():
    heartbeat = Heartbeat(2, period=0.5)
    reactor = _FakeReactor()
    now = [1000.0]
    beater = start_beating(reactor, heartbeat, 1, clock=lambda: now[0])
    assert heartbeat.last(1) == 1000.0 and heartbeat.last(0) == 0.0
    assert [t.delay for t in reactor.pending] == [0.5]
    now[0] = 1000.5
    reactor.pending[-1].callback()
    assert heartbeat.last(1) == 1000.5
    assert len(reactor.pending) == 2
    beater.cancel()
    assert reactor.pending[-1].cancelled


def _state(pid: int) -> str:
    with open("/proc/%d/stat" % pid) as handle:
        return handle.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
def test_stuck_router_goes_stale():
    """A child beating from a real reactor is fresh; stopped (a stuck loop), it goes stale."""
    heartbeat = Heartbeat(1, period=0.05)
    limit = 1.0
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            reactor = Reactor()
            start_beating(reactor, heartbeat, 0)
            reactor.run()
        finally:
            os._exit(0)
    try:
        first = wait_until(lambda: heartbeat.last(0) > start and heartbeat.last(0),
                           timeout=10.0, what="a first heartbeat")
        wait_until(lambda: heartbeat.last(0) > first, timeout=10.0, what="a second heartbeat")
        assert not heartbeat.stale(0, time.monotonic(), limit)
        os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: _state(pid) == "T", timeout=10.0, what="the child to stop")
        stamp = heartbeat.last(0)
        wait_until(lambda: heartbeat.stale(0, time.monotonic(), limit), timeout=10.0,
                   what="the heartbeat to go stale")
        assert heartbeat.last(0) == stamp            # stopped: no beat since
        assert time.monotonic() - stamp > limit + heartbeat.period
    finally:
        os.kill(pid, signal.SIGKILL)
        _wait_exit(pid)
