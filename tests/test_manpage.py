"""The committed man page is the generated one, and it documents every option."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from uwsgi_fastrouter import options as o
from uwsgi_fastrouter.manpage import render_manpage

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man" / "uwsgi-fastrouter.1"


def plain(troff: str) -> str:
    """The page with the escapes this generator uses undone, for text searches."""
    return troff.replace("\\-", "-").replace("\\fB", "").replace("\\fI", "").replace("\\fR", "")


def test_committed_page_is_up_to_date():
    assert MAN.read_text() == render_manpage(), (
        "man/uwsgi-fastrouter.1 is stale: run python -m uwsgi_fastrouter.manpage > man/uwsgi-fastrouter.1"
    )


def test_module_entry_point_prints_the_page():
    done = subprocess.run(
        [sys.executable, "-m", "uwsgi_fastrouter.manpage"], cwd=str(ROOT),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == render_manpage()


def test_every_option_in_help_and_man():
    help_text = o.help_text()
    page = plain(render_manpage())
    for option in o.OPTIONS:
        for name in option.names:
            assert "--" + name in help_text, name
            assert "--" + name in page, name
        if option.short:
            assert "-%s, --%s" % (option.short, option.name) in page


def test_man_documents_arguments_defaults_and_status():
    page = plain(render_manpage())
    assert "--fastrouter-timeout SECS" in page
    assert "--chmod-socket[=MODE]" in page
    assert "Default: 60." in page
    assert "Default: 256 KiB." in page
    entries = {}
    for chunk in render_manpage().split("\n.TP\n")[1:]:
        head, _nl, body = chunk.partition("\n")
        entries[plain(head)] = plain(body)
    for option in o.OPTIONS:
        head = ("-%s, " % option.short if option.short else "") + "--" + option.name + option.argument_text()
        body = entries[head]
        assert ("(not supported yet)" in body) == (option.status == o.PENDING), option.name
        default = option.default_text()
        if default is not None:
            assert "Default: %s." % default in body, option.name
        if option.aliases:
            assert "Aliases: " + ", ".join("--" + a for a in option.aliases) + "." in body


def test_man_sections():
    page = render_manpage()
    headers = [line[4:] for line in page.splitlines() if line.startswith(".SH ")]
    assert headers == ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "SIGNALS", "ENVIRONMENT",
                       "FILES", "EXIT STATUS", "EXAMPLES", "SEE ALSO"]
    text = plain(page)
    assert "UWSGI_" in text and "UWSGI_RELOADS" in text
    assert "%%s" in text  # the INI % magic note
    assert "50done" in text


def section(name: str) -> str:
    """The plain text of the man page section *name*."""
    page = plain(render_manpage())
    start = page.index("\n.SH %s\n" % name) + len(name) + 5
    end = page.find("\n.SH ", start)
    return page[start:end if end >= 0 else len(page)]


def test_man_examples_cover_the_common_set_ups():
    examples = section("EXAMPLES")
    assert "--fastrouter-to 127.0.0.1:3031" in examples                 # a static node list
    assert "--fastrouter-subscription-server" in examples and "--subscribe-to" in examples
    assert "fastrouter-use-pattern = /run/uwsgi/apps/%%s/uwsgi.sock" in examples
    assert "touch-logreopen" in examples and "postrotate" in examples   # logrotate
    # the systemd unit
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "--die-on-term", "--master"):
        assert line in examples, line
    unit = examples[examples.index("[Unit]"):]
    assert unit.index("[Service]") < unit.index("ExecStart=") < unit.index("[Install]")


def test_man_signals_name_what_the_router_does():
    signals = section("SIGNALS")
    for name in ("SIGHUP", "SIGTERM", "SIGINT", "SIGQUIT", "SIGPIPE"):
        assert name in signals, name
    assert "graceful reload" in signals and "--die-on-term" in signals
    assert "Without a master" in signals


def test_man_environment_and_files():
    environment = section("ENVIRONMENT")
    for name in ("UWSGI_", "NOTIFY_SOCKET", "COLUMNS", "UWSGI_FASTROUTER_INHERIT"):
        assert name in environment, name
    files = section("FILES")
    for name in ("--logto", "--touch-logreopen", "--touch-reload", "--pidfile", "--log-reopen"):
        assert name in files, name


def test_man_has_no_stray_requests():
    for line in render_manpage().splitlines():
        # every line starting with . or ' must be a request this generator emits
        if line.startswith((".", "'")):
            assert line.split(" ")[0] in {
                ".TH", ".SH", ".SS", ".TP", ".PP", ".B", ".BR", ".br", ".RS", ".RE", ".nf", ".fi",
            }, line


def test_groff_renders_without_warnings():
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff not installed")
    done = subprocess.run([groff, "-ww", "-z", "-man"], input=render_manpage().encode(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert done.returncode == 0
    assert done.stderr.decode() == ""
