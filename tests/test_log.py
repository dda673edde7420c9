"""The rate-limited log keeps floods out of the log."""

from uwsgi_fastrouter.log import RateLimitedLog


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
