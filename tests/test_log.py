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
