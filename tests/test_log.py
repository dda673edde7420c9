"""The rate-limited log keeps floods out of the log."""

from uwsgi_fastrouter.log import RateLimitedLog, printable


def test_burst_then_summary(capsys):
    now = [100.0]
    limited = RateLimitedLog(lambda: now[0], burst=3, what="bad datagrams")
    for i in range(10):
        limited("line %d" % i)
    now[0] += 1.0
    limited("after")
    err = capsys.readouterr().err.splitlines()
    assert err == ["line 0", "line 1", "line 2",
                   "... 7 more bad datagrams not written (at most 3 a second)", "after"]


def test_printable_escapes_what_could_forge_a_line():
    assert printable(b"example.com") == "example.com"
    assert printable(b"a\nb\r\x1b[2J\x7f") == "a\\x0ab\\x0d\\x1b[2J\\x7f"
    assert printable(b"\xff\xfeok") == "\\xff\\xfeok"
    assert printable("caf\u00e9") == "caf\u00e9"
    assert printable("\u0085next") == "\\x85next"
    assert printable(b"\xffx".decode("utf-8", "surrogateescape")) == "\\xffx"
    assert printable(bytearray(b"\x00")) == "\\x00"


def test_log_date_prefixes(capsys, monkeypatch):
    from uwsgi_fastrouter import log as logmod
    monkeypatch.setattr(logmod.time, "time", lambda: 1796263323.5)   # Thu Dec  3 2026, UTC
    monkeypatch.setenv("TZ", "UTC")
    logmod.time.tzset()
    try:
        logmod.set_date_format("")
        logmod.log("uWSGI's default")
        logmod.set_date_format("%Y-%m-%d %H:%M:%S")
        logmod.log("strftime")
        logmod.log("two\nlines")
        logmod.set_date_format(None)
        logmod.log("plain")
    finally:
        logmod.set_date_format(None)
        monkeypatch.delenv("TZ")
        logmod.time.tzset()
    assert capsys.readouterr().err.splitlines() == [
        "Thu Dec  3 02:02:03 2026 - uWSGI's default",
        "2026-12-03 02:02:03 - strftime",
        "2026-12-03 02:02:03 - two",      # one prefix per log() call, as uWSGI does
        "lines",
        "plain",
    ]


def test_log_date_prefix_is_made_once_a_second(monkeypatch, capsys):
    from uwsgi_fastrouter import log as logmod
    now = [1000.2]
    made = []
    monkeypatch.setattr(logmod.time, "time", lambda: now[0])
    real_ctime = logmod.time.ctime
    monkeypatch.setattr(logmod.time, "ctime", lambda t: made.append(t) or real_ctime(t))
    try:
        logmod.set_date_format("")
        for step in (0.0, 0.3, 0.4, 0.2, 0.0):
            now[0] += step
            logmod.log("x")
    finally:
        logmod.set_date_format(None)
    assert made == [1000, 1001]
    capsys.readouterr()


def test_log_lines_writes_a_batch_with_one_prefix_per_line(capsys, monkeypatch):
    from uwsgi_fastrouter import log as logmod
    monkeypatch.setattr(logmod.time, "time", lambda: 1796263323.5)
    try:
        logmod.set_date_format("%Y")
        logmod.log_lines(["one", "two"])
        logmod.set_date_format(None)
        logmod.log_lines(["three"])
    finally:
        logmod.set_date_format(None)
    assert capsys.readouterr().err.splitlines() == ["2026 - one", "2026 - two", "three"]
