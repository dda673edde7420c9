"""Shared fixtures: every process a test starts is stopped by PID when the test ends."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import support  # noqa: E402


def pytest_report_header(config):
    lines = ["router under test: %s" % support.router_under_test()]
    for name in ("UWSGI_BIN", "NGINX_BIN", "CI"):
        if os.environ.get(name):
            lines.append("%s=%s" % (name, os.environ[name]))
    return lines


@pytest.fixture(autouse=True)
def procs():
    """Stop (by PID, newest first) every process started during the test, pass or fail.

    Processes started by fixtures of a wider scope are left to those fixtures.
    Yields the list of live processes (``support.live_processes()``).
    """
    mark = support.current_seq()
    yield support.live_processes()
    support.stop_all(after_seq=mark)


@pytest.fixture(scope="session", autouse=True)
def _stop_everything_at_the_end():
    yield
    support.stop_all()


@pytest.fixture
def sock_dir(tmp_path: Path) -> Path:
    """A directory whose path is short enough for UNIX sockets several levels below it."""
    return support.short_dir(tmp_path)
