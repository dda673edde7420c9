"""The option table and the environment / argv / INI pipeline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from uwsgi_fastrouter import UWSGI_COMPAT_VERSION, __version__
from uwsgi_fastrouter import options as o
from uwsgi_fastrouter.options import ConfigError, EarlyExit, load_config


def load(argv: List[str], environ: Optional[Dict[str, str]] = None, warnings: Optional[List[str]] = None):
    sink = warnings if warnings is not None else []
    return load_config(argv, environ or {}, warn=sink.append)


def error_of(argv: List[str], environ: Optional[Dict[str, str]] = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(argv, environ)
    return str(info.value)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# -- the table ------------------------------------------------------------------------

SUPPORTED = {
    "fastrouter", "fastrouter-to", "fastrouter-use-pattern", "fastrouter-use-base",
    "fastrouter-fallback", "fastrouter-fallback-on-no-key",
    "fastrouter-tls-node", "fastrouter-tls-ca", "fastrouter-tls-cert", "fastrouter-tls-key",
    "fastrouter-tls-server-name", "fastrouter-tls-no-verify", "fastrouter-gracetime",
    "fastrouter-timeout", "fastrouter-buffer-size", "fastrouter-events", "fastrouter-stats",
    "fastrouter-metrics", "fastrouter-metrics-max-keys",
    "fastrouter-quiet", "fastrouter-access-log", "fastrouter-access-log-format",
    "fastrouter-force-key", "fastrouter-max-retries", "listen",
    "fastrouter-strip-vars", "fastrouter-strip-magic-vars", "fastrouter-http-errors",
    "fastrouter-retry-after-connect", "fastrouter-node-max-conns", "fastrouter-node-max-conns-per-core",
    "fastrouter-node-queue-wait",
    "socket-timeout", "abstract-socket", "chmod-socket", "master", "vacuum", "die-on-term",
    "stats-minified", "stats-http", "no-fd-passing", "fastrouter-trust-fd-passing", "ini", "set", "set-ph", "strict", "help",
    "version", "subscription-max-keys", "subscription-max-nodes",
    "fastrouter-subscription-server", "fastrouter-subscription-fallback-key", "fastrouter-hash-var",
    "fastrouter-cheap",
    "fastrouter-resubscribe", "fastrouter-resubscribe-bind", "subscription-tolerance",
    "subscription-algo", "subscription-mountpoints", "subscription-dotsplit", "subscriptions-sign-check",
    "fastrouter-resolve-interval", "subscription-resolve-names",
    "subscriptions-sign-check-tolerance", "subscriptions-sign-skip-uid",
    "subscriptions-hmac-key", "subscription-allow", "subscribe-hmac-key",
    "subscriptions-use-credentials", "subscriptions-credentials-check",
    "fastrouter-post-buffering", "fastrouter-post-buffering-dir", "fastrouter-post-buffering-max",
    "fastrouter-post-buffering-min-rate", "fastrouter-zerg", "zerg-server",
    "fastrouter-processes", "pidfile", "subscribe-to", "subscribe2", "subscribe-freq",
    "subscribe-with-modifier1", "weight", "auto-weight", "unsubscribe-on-graceful-reload",
    "subscription-notify-socket", "cache", "cache-blocksize", "cache2", "file", "wsgi-file", "module",
    "fastrouter-use-cache", "fastrouter-use-code-string", "fastrouter-use-socket", "socket",
    "shared-socket", "processes", "buffer-size", "fastrouter-harakiri", "fastrouter-uid",
    "fastrouter-gid", "uid", "gid", "daemonize", "logto", "undeferred-shared-socket",
    "force-gateway", "zerg", "zerg-fallback", "reload", "brutal-reload", "stop", "master-fifo",
    "start-unsubscribed", "log-date", "log-reopen", "touch-logreopen", "touch-reload", "harakiri",
    "auto-procname", "procname-prefix", "procname-prefix-spaced", "procname-append", "procname",
    "procname-master", "need-app", "plugins", "umask",
}
# the life of a node: slow start, health checks, drain
SUPPORTED |= {"subscription-slow-start", "fastrouter-health-check-interval",
              "fastrouter-health-check-deadline", "fastrouter-health-check-fails",
              "fastrouter-health-check-passes", "fastrouter-health-check-max-probes",
              "subscription-drain-timeout", "drain-on-graceful-reload", "fastrouter-drain",
              "fastrouter-undrain"}
# a listening socket per router process; uWSGI's SO_REUSEPORT flag
SUPPORTED |= {"fastrouter-reuse-port", "reuse-port"}


def test_table_is_consistent():
    kinds = {o.INT, o.UINT64, o.BOOL, o.STRING, o.LIST, o.MODE, o.ACTION}
    attrs = set()
    for option in o.OPTIONS:
        assert option.kind in kinds, option.name
        assert option.arg in (o.REQUIRED, o.OPTIONAL, o.NONE), option.name
        assert option.status in (o.SUPPORTED, o.PENDING, o.NOOP, o.DEPRECATED, o.REPLACED), option.name
        assert option.group in o.GROUPS, option.name
        assert option.help and "\n" not in option.help, option.name
        assert option.attr not in attrs
        attrs.add(option.attr)
        if option.arg == o.OPTIONAL:
            assert option.bare is not None, option.name


def test_statuses_match_the_plan():
    by_status: Dict[str, set] = {}
    for option in o.OPTIONS:
        by_status.setdefault(option.status, set()).add(option.name)
    assert by_status[o.SUPPORTED] == SUPPORTED
    assert by_status.get(o.NOOP, set()) == {"enable-threads", "thunder-lock"}
    assert by_status[o.REPLACED] == {"stats"}
    assert by_status[o.DEPRECATED] == {"fastrouter-subscription-slot"}
    assert o.PENDING not in by_status      # every option in the table is implemented


@pytest.fixture
def pending_option(monkeypatch):
    """The "not supported yet" path, on an option made pending for the test."""
    import dataclasses
    option = o.find_option("start-unsubscribed")
    pending = dataclasses.replace(option, status=o.PENDING)
    for name in (option.name,) + tuple(option.aliases):
        monkeypatch.setitem(o._BY_NAME, name, pending)
    return pending


def test_shorts_and_aliases():
    shorts = {opt.short: opt.name for opt in o.OPTIONS if opt.short}
    assert shorts == {
        "M": "master", "s": "socket", "p": "processes", "l": "listen", "z": "socket-timeout",
        "b": "buffer-size", "a": "abstract-socket", "C": "chmod-socket", "d": "daemonize",
        "S": "set", "w": "module", "h": "help", "t": "harakiri", "T": "enable-threads",
    }
    assert o.find_option("fastrouter-ss").name == "fastrouter-stats"
    assert o.find_option("fastrouter-stats-server").name == "fastrouter-stats"
    assert o.find_option("workers").name == "processes"
    assert o.find_option("chmod").name == "chmod-socket"
    assert o.find_option("fastrouter-grace") is None  # exact names only


def test_defaults():
    cfg = load([])
    assert cfg.fastrouter == [] and cfg.fastrouter_to == [] and cfg.fastrouter_fallback == []
    assert cfg.fastrouter_timeout == 60
    assert cfg.fastrouter_gracetime == 30
    assert cfg.fastrouter_events == 64
    assert cfg.fastrouter_buffer_size == 256 << 10   # 0 means 256 KiB: applied on load
    assert cfg.fastrouter_max_retries == 3
    assert cfg.listen == 100
    assert cfg.socket_timeout == 4
    assert cfg.buffer_size == 4096
    assert cfg.master is False and cfg.fastrouter_quiet is False
    assert cfg.fastrouter_use_pattern is None and cfg.fastrouter_stats is None
    assert cfg.chmod_socket is None
    assert cfg.subscription_tolerance == 17 and cfg.subscription_algo == "wrr"
    assert not cfg.given("fastrouter-timeout")
    # every option has its attribute
    for option in o.OPTIONS:
        assert hasattr(cfg, option.attr)
    # lists are not shared between configs
    load([]).fastrouter.append("x")
    assert load([]).fastrouter == []


# -- argv -------------------------------------------------------------------------------


def test_both_argv_forms_and_lists():
    cfg = load(["--fastrouter", ":3017", "--fastrouter=:3018", "--fastrouter-timeout", "5",
                "--fastrouter-to=a:1", "--fastrouter-to", "b:2", "--fastrouter-use-pattern=/x/%s"])
    assert cfg.fastrouter == [":3017", ":3018"]
    assert cfg.fastrouter_to == ["a:1", "b:2"]
    assert cfg.fastrouter_timeout == 5
    assert cfg.fastrouter_use_pattern == "/x/%s"  # argv values are verbatim, no magic
    assert cfg.given("fastrouter-timeout") and cfg.given("fastrouter")
    assert not cfg.given("fastrouter-gracetime")


def test_argv_values_are_verbatim():
    cfg = load(["--fastrouter-use-base", "  /srv/ ", "--fastrouter-force-key=a=b"])
    assert cfg.fastrouter_use_base == "  /srv/ "
    assert cfg.fastrouter_force_key == "a=b"


def test_scalar_last_value_wins():
    assert load(["--listen", "10", "--listen", "20"]).listen == 20


def test_required_argument_takes_next_word_even_if_dashed():
    # --fastrouter-quiet is a boolean with a required argument (uWSGI quirk).
    cfg = load(["--fastrouter-quiet", "--master"])
    assert cfg.fastrouter_quiet is True
    assert cfg.master is False
    assert load(["--fastrouter-quiet", "0"]).fastrouter_quiet is False
    assert load(["--fastrouter-quiet", "1"]).fastrouter_quiet is True


def test_missing_required_argument():
    assert error_of(["--fastrouter"]) == "option '--fastrouter' requires an argument\ngetopt_long() error"
    assert error_of(["-l"]) == "option requires an argument -- 'l'\ngetopt_long() error"


def test_optional_argument_forms():
    assert load(["--chmod-socket"]).chmod_socket == "666"
    assert load(["--chmod-socket=644"]).chmod_socket == "644"
    assert load(["--chmod=600"]).chmod_socket == "600"
    assert load(["-C"]).chmod_socket == "666"
    assert load(["-C644"]).chmod_socket == "644"
    # the space form does not take a value: the word becomes a config file
    assert error_of(["--chmod-socket", "644"]) == "unable to load configuration from 644"


def test_no_argument_option_rejects_a_value():
    assert error_of(["--master=1"]) == "option '--master' doesn't allow an argument\ngetopt_long() error"
    # an abbreviation is reported with the full name
    assert error_of(["--master=1"]) == "option '--master' doesn't allow an argument\ngetopt_long() error"


def test_unique_prefix():
    cfg = load(["--fastrouter-grace", "5", "--fastrouter-ti=7", "--master"])
    assert cfg.fastrouter_gracetime == 5
    assert cfg.fastrouter_timeout == 7
    assert cfg.master is True
    assert cfg.given("fastrouter-gracetime")


def test_exact_name_beats_longer_names():
    cfg = load(["--fastrouter-stats", "127.0.0.1:9191", "--fastrouter", ":1", "--chmod=644"])
    assert cfg.fastrouter_stats == "127.0.0.1:9191"
    assert cfg.fastrouter == [":1"]


def test_ambiguous_prefix_names_candidates():
    message = error_of(["--fastrouter-stat", "x"])
    assert message == (
        "option '--fastrouter-stat' is ambiguous; possibilities: '--fastrouter-stats' "
        "'--fastrouter-stats-server'\ngetopt_long() error"
    )
    message = error_of(["--fastrouter-s", "1"])
    for candidate in ("--fastrouter-stats", "--fastrouter-ss", "--fastrouter-subscription-server",
                      "--fastrouter-subscription-slot", "--fastrouter-subscription-fallback-key"):
        assert "'%s'" % candidate in message


def test_short_options_and_bundling():
    cfg = load(["-Ml", "1024", "-z5", "-a"])
    assert cfg.master is True and cfg.listen == 1024 and cfg.socket_timeout == 5
    assert cfg.abstract_socket is True
    cfg = load(["-aMl1024"])
    assert (cfg.abstract_socket, cfg.master, cfg.listen) == (True, True, 1024)
    cfg = load(["-MC", "-b", "8192"])
    assert cfg.chmod_socket == "666" and cfg.buffer_size == 8192


def test_unknown_options():
    # uWSGI's two lines, then a pointer to --help
    assert error_of(["--x"]) == "unrecognized option '--x'\ngetopt_long() error\n" + o.HELP_POINTER
    assert error_of(["--master", "--fastrouter-defer-connect-timeout", "3"]) == (
        "unrecognized option '--fastrouter-defer-connect-timeout'\ngetopt_long() error\n" + o.HELP_POINTER
    )
    assert error_of(["-MQ"]) == "invalid option -- 'Q'\ngetopt_long() error\n" + o.HELP_POINTER


def test_double_dash_ends_options(tmp_path):
    path = write(tmp_path / "a.ini", "[uwsgi]\nlisten = 9\n")
    assert load(["--", path]).listen == 9
    assert error_of(["--", "--master"]) == "unable to load configuration from --master"


# -- values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("12", 12), ("12abc", 12), ("abc", 0), ("", 0), ("  7", 7), ("+3", 3), ("-0", 0),
     ("99999999999", 1215752191), ("4294967296", 0)],
)
def test_c_atoi(text, expected):
    assert o.c_atoi(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [("4096", 4096), ("8k", 8), ("x", 0), ("-1", 2 ** 64 - 1), ("99999999999999999999999", 2 ** 64 - 1)],
)
def test_c_strtoul(text, expected):
    assert o.c_strtoul(text) == expected


def test_int_option_junk_and_negative():
    assert load(["--fastrouter-timeout", "12s"]).fastrouter_timeout == 12
    # atoi("soon") is 0, and 0 means the default (60) for this option
    assert load(["--fastrouter-timeout", "soon"]).fastrouter_timeout == 60
    assert load(["--listen", "soon"]).listen == 0
    assert error_of(["--fastrouter-timeout", "-5"]) == 'invalid value for option "fastrouter-timeout": must be > 0'
    assert error_of(["-l", "-1"]) == 'invalid value for option "listen": must be > 0'


def test_uint64_option():
    assert load(["--fastrouter-buffer-size", "65536"]).fastrouter_buffer_size == 65536
    assert load(["--fastrouter-buffer-size", "-1"]).fastrouter_buffer_size == 2 ** 64 - 1


def test_umask_is_an_octal_mode(tmp_path):
    assert load([]).umask is None
    assert load(["--umask", "022"]).umask == 0o022
    assert load(["--umask=0077"]).umask == 0o077
    assert load(["--umask", "7"]).umask == 0o007
    assert load([], {"UWSGI_UMASK": "027"}).umask == 0o027
    assert load([write(tmp_path / "u.ini", "[uwsgi]\numask = 0002\n")]).umask == 0o002


@pytest.mark.parametrize("value", ["", "abc", "8", "0o22", "1000", "-22", "2 2"])
def test_a_bad_umask_names_the_flag(value):
    assert error_of(["--umask=" + value]) == (
        'invalid value for option "umask": %r is not an octal mode from 000 to 777 (example: 022)'
        % value)


@pytest.mark.parametrize(
    "value, expected",
    [("true", True), ("1", True), ("yes", True), ("on", True), ("anything", True), ("", True),
     ("false", False), ("FALSE", False), ("Off", False), ("no", False), ("0", False), ("00", True)],
)
def test_bool_values(tmp_path, value, expected):
    path = write(tmp_path / "b.ini", "[uwsgi]\nmaster = %s\nvacuum = %s\n" % (value, value))
    cfg = load([path])
    assert cfg.master is expected and cfg.vacuum is expected
    assert load([], {"UWSGI_MASTER": value}).master is expected


def test_bool_bare_ini_key_is_true(tmp_path):
    path = write(tmp_path / "b.ini", "[uwsgi]\nmaster\n")
    assert load([path]).master is True


def test_bare_int_ini_key_is_atoi_of_empty(tmp_path):
    # uWSGI 2.0.31 passes an empty string, so listen() gets a backlog of 0.
    path = write(tmp_path / "b.ini", "[uwsgi]\nlisten\n")
    assert load([path]).listen == 0


def test_missing_value_means_one():
    assert o._convert(o.find_option("listen"), "listen", None) == 1
    assert o._convert(o.find_option("fastrouter-buffer-size"), "fastrouter-buffer-size", None) == 1
    assert o._convert(o.find_option("fastrouter-use-pattern"), "fastrouter-use-pattern", None) == ""


# -- environment --------------------------------------------------------------------------------


def test_env_comes_before_argv():
    env = {"UWSGI_FASTROUTER_TIMEOUT": "10", "UWSGI_FASTROUTER_TO": "env:1", "UWSGI_MASTER": "1"}
    cfg = load(["--fastrouter-timeout", "20", "--fastrouter-to", "cli:1"], env)
    assert cfg.fastrouter_timeout == 20  # scalar: the command line wins
    assert cfg.fastrouter_to == ["env:1", "cli:1"]  # list: env entries first
    assert cfg.master is True


def test_env_names():
    env = {
        "UWSGI_FASTROUTER_SS": "127.0.0.1:1",  # aliases work
        "UWSGI_FASTROUTER_GRACE": "5",  # never prefix-matched
        "UWSGI_NOT_AN_OPTION": "x",  # ignored, not even a placeholder
        "UWSGI_RELOADS": "3",  # uWSGI's bookkeeping
        "FASTROUTER_TIMEOUT": "9",  # no prefix
        "UWSGI_": "x",
    }
    cfg = load([], env)
    assert cfg.fastrouter_stats == "127.0.0.1:1"
    assert cfg.fastrouter_gracetime == 30
    assert cfg.fastrouter_timeout == 60
    assert "not-an-option" not in cfg.placeholders


def test_env_unknown_is_fine_under_strict():
    assert load(["--strict"], {"UWSGI_WHATEVER": "1"}).strict is True


def test_env_ini_is_loaded_first(tmp_path):
    path = write(tmp_path / "e.ini", "[uwsgi]\nfastrouter-to = ini:1\nlisten = 5\n")
    cfg = load(["--fastrouter-to", "cli:1", "--listen", "6"], {"UWSGI_INI": path})
    assert cfg.fastrouter_to == ["ini:1", "cli:1"]
    assert cfg.listen == 6


def test_env_pending_option_rejected(pending_option):
    assert error_of([], {"UWSGI_START_UNSUBSCRIBED": "1"}) == (
        'option "--start-unsubscribed" is not supported yet by uwsgi-fastrouter')


# -- INI through the pipeline -----------------------------------------------------------------


def test_ini_entries_in_place(tmp_path):
    path = write(
        tmp_path / "app.ini",
        "[uwsgi]\n; comment\n# comment\nfastrouter-to = ini:1\nfastrouter-to = ini:2\nlisten = 5\n"
        "fastrouter-use-pattern = /tmp/%%s/uwsgi.sock\nfastrouter-use-base = /srv/%s/\n"
        "fastrouter-stats = 127.0.0.1:9191 ; not a comment\n",
    )
    cfg = load(["--fastrouter-to", "cli:0", "--ini", path, "--fastrouter-to", "cli:3", "--listen", "7"])
    assert cfg.fastrouter_to == ["cli:0", "ini:1", "ini:2", "cli:3"]
    assert cfg.listen == 7
    assert cfg.fastrouter_use_pattern == "/tmp/%s/uwsgi.sock"
    assert cfg.fastrouter_use_base == "/srv/app.ini/"
    assert cfg.fastrouter_stats == "127.0.0.1:9191 ; not a comment"
    assert cfg.ini == [path]
    assert cfg.given("ini")


def test_ini_unknown_magic_deleted(tmp_path):
    path = write(tmp_path / "a.ini", "[uwsgi]\nfastrouter-force-key = 50% done\n")
    assert load([path]).fastrouter_force_key == "50done"


def test_ini_section_and_reread(tmp_path):
    path = write(tmp_path / "a.ini", "[uwsgi]\nlisten = 1\n[web]\nlisten = 2\nfastrouter = :9\n")
    assert load(["--ini", path + ":web"]).listen == 2
    cfg = load(["--ini", path, "--ini", ":web"])
    assert cfg.listen == 2 and cfg.fastrouter == [":9"]


def test_ini_missing_section_warns(tmp_path):
    path = write(tmp_path / "a.ini", "[uwsgi]\nlisten = 1\n")
    warnings: List[str] = []
    cfg = load(["--ini", path + ":nope", "--listen", "3"], warnings=warnings)
    assert cfg.listen == 3
    assert warnings == ['*** WARNING: Can\'t find section "nope" in INI configuration file %s ***' % path]


def test_ini_missing_file(tmp_path):
    missing = str(tmp_path / "nope.ini")
    message = error_of(["--ini", missing])
    assert missing in message
    assert error_of([missing]) == 'open("%s"): No such file or directory' % missing


def test_positional_ini_is_read_after_every_option(tmp_path):
    path = write(tmp_path / "app.ini", "[uwsgi]\nfastrouter-to = ini:1\nlisten = 5\n")
    cfg = load([path, "--fastrouter-to", "cli:1", "--listen", "7"])
    # getopt moves positionals after the options, as in uWSGI 2.0.31
    assert cfg.fastrouter_to == ["cli:1", "ini:1"]
    assert cfg.listen == 5


@pytest.mark.parametrize("name", ["x.yaml", "x.yml", "x.json", "x.js", "x.xml", "app.ini:web", "-", "plain"])
def test_positional_other_formats_rejected(name):
    assert error_of([name]) == "unable to load configuration from %s" % name


def test_nested_ini(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "base.ini", "[uwsgi]\nfastrouter-to = base:1\n")
    write(tmp_path / "app.ini", "[uwsgi]\nfastrouter-to = app:1\nini = base.ini\nfastrouter-to = app:2\n")
    assert load(["app.ini"]).fastrouter_to == ["app:1", "base:1", "app:2"]


def test_ini_including_itself_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "loop.ini", "[uwsgi]\nini = loop.ini\n")
    assert "nested more than 32 deep" in error_of(["loop.ini"])
    # the same file may still be read several times side by side
    write(tmp_path / "once.ini", "[uwsgi]\nfastrouter-to = x\n")
    assert load(["--ini", "once.ini", "--ini", "once.ini"]).fastrouter_to == ["x", "x"]


# -- substitutions ------------------------------------------------------------------------------


def test_env_substitution():
    cfg = load(["--fastrouter-use-base", "$(BASE)/$(UNSET_X)", "--fastrouter-to", "$()x"], {"BASE": "/srv"})
    assert cfg.fastrouter_use_base == "/srv/$(UNSET_X)"
    assert cfg.fastrouter_to == ["$()x"]


def test_at_file_substitution(tmp_path):
    addr = write(tmp_path / "addr.txt", "127.0.0.1:4000\n")
    two = write(tmp_path / "two.txt", "x\n\n")
    cfg = load(["--fastrouter-to", "@(%s)" % addr, "--fastrouter-to", "[@(%s)]" % two])
    assert cfg.fastrouter_to == ["127.0.0.1:4000", "[x\n]"]  # only one newline is removed


def test_at_file_missing(tmp_path):
    missing = str(tmp_path / "none.txt")
    assert error_of(["--fastrouter-to", "@(%s)" % missing]) == 'open("%s"): No such file or directory' % missing


def test_placeholder_defined_later_in_file(tmp_path):
    path = write(
        tmp_path / "a.ini",
        "[uwsgi]\nfastrouter-to = %(sock)\nfastrouter-stats = %(nope)\nsock = %(base)/x.sock\nbase = /srv\n",
    )
    cfg = load([path])
    assert cfg.fastrouter_to == ["/srv/x.sock"]
    assert cfg.fastrouter_stats == "%(nope)"
    assert cfg.placeholders == {"sock": "/srv/x.sock", "base": "/srv"}


def test_placeholder_uses_first_value_and_options():
    cfg = load(["--set", "port=1", "--set", "port=2", "--fastrouter", ":%(port)",
                "--fastrouter-to", "%(fastrouter)-%(master)", "--master"])
    assert cfg.fastrouter == [":1"]
    assert cfg.fastrouter_to == [":1-%(master)"]  # a bare flag has no value to insert


def test_placeholder_cycle_left_alone():
    cfg = load(["--set", "a=%(b)", "--set", "b=%(a)", "--fastrouter-force-key", "<%(a)>"])
    assert "%(" in cfg.fastrouter_force_key


def test_substitution_order_env_then_file_then_placeholder(tmp_path):
    addr = write(tmp_path / "addr.txt", "10.0.0.1:1\n")
    cfg = load(["--fastrouter-to", "@($(ADDR_FILE))"], {"ADDR_FILE": addr})
    assert cfg.fastrouter_to == ["10.0.0.1:1"]  # $() ran before @()
    # %() runs after @(), so a file name coming from a placeholder is not known yet
    assert error_of(["--set", "f=%s" % addr, "--fastrouter-to", "@(%(f))"]) == (
        'open("%(f)"): No such file or directory'
    )
    # ...but a placeholder may hold a @() that is read before it is inserted
    cfg = load(["--set", "f=@(%s)" % addr, "--fastrouter-to", "%(f)"])
    assert cfg.fastrouter_to == ["10.0.0.1:1"]


# -- --set, --set-ph, --strict -----------------------------------------------------------------------


def test_set():
    cfg = load(["--set", "name=web", "-S", "listen=33", "--fastrouter-force-key", "%(name)"])
    assert cfg.listen == 33 and cfg.given("listen")
    assert cfg.placeholders == {"name": "web"}
    assert cfg.fastrouter_force_key == "web"
    assert cfg.set == ["name=web", "listen=33"]
    assert error_of(["--set", "novalue"]) == "invalid placeholder/--set value"


def test_set_ph():
    cfg = load(["--set-ph", "a=1", "--set-placeholder", "b=2", "--fastrouter-force-key", "%(a)%(b)"])
    assert cfg.placeholders == {"a": "1", "b": "2"}
    assert cfg.fastrouter_force_key == "12"
    assert error_of(["--set-ph", "listen=3"]) == (
        "you cannot use listen as a placeholder, it is already available as an option"
    )


def test_ini_unknown_keys_and_prefixes_are_placeholders(tmp_path):
    path = write(tmp_path / "a.ini", "[uwsgi]\nmy-domain = example.com\nfastrouter-grace = 5\n")
    cfg = load([path])
    assert cfg.placeholders == {"my-domain": "example.com", "fastrouter-grace": "5"}
    assert cfg.fastrouter_gracetime == 30


def test_strict(tmp_path):
    path = write(tmp_path / "a.ini", "[uwsgi]\nlisten = 5\nx = 1\n")
    assert error_of(["--strict", path]) == "[strict-mode] unknown config directive: x"
    strict_last = write(tmp_path / "b.ini", "[uwsgi]\nx = 1\nstrict\n")
    assert error_of([strict_last]) == "[strict-mode] unknown config directive: x"
    assert error_of(["--strict", "--set", "foo=bar"]) == "[strict-mode] unknown config directive: foo"
    assert load(["--strict", "--set-ph", "foo=bar"]).placeholders == {"foo": "bar"}
    off = write(tmp_path / "c.ini", "[uwsgi]\nstrict = false\nx = 1\n")
    assert load([off]).placeholders == {"x": "1"}


# -- statuses -----------------------------------------------------------------------------------------


def test_pending_option_rejected_from_every_source(tmp_path, pending_option):
    assert error_of(["--start-unsubscribed"]) == (
        'option "--start-unsubscribed" is not supported yet by uwsgi-fastrouter')
    path = write(tmp_path / "a.ini", "[uwsgi]\nstart-unsubscribed = true\n")
    assert error_of([path]) == 'option "--start-unsubscribed" is not supported yet by uwsgi-fastrouter'
    assert error_of(["--set", "start-unsubscribed=1"]) == (
        'option "--start-unsubscribed" is not supported yet by uwsgi-fastrouter')


def test_deprecated_option_warns():
    warnings: List[str] = []
    cfg = load(["--fastrouter-subscription-slot", "1000"], warnings=warnings)
    assert warnings == [
        '[WARNING] option "fastrouter-subscription-slot" is deprecated: useless thanks to the new implementation'
    ]
    assert cfg.fastrouter_subscription_slot is None


def test_noop_option_accepted():
    cfg = load(["-b", "32768"])
    assert cfg.buffer_size == 32768 and cfg.given("buffer-size")


def test_alias_counts_as_canonical():
    cfg = load(["--fastrouter-ss", "127.0.0.1:1", "--stats-min"])
    assert cfg.fastrouter_stats == "127.0.0.1:1"
    assert cfg.given("fastrouter-stats") and cfg.given("stats-minified")
    assert not cfg.given("fastrouter-ss")


# -- help and version ----------------------------------------------------------------------------------


def test_help_and_version():
    for argv in (["--help"], ["-h"], ["--master", "--he"], ["-Mh"]):
        with pytest.raises(EarlyExit) as info:
            load(argv)
        assert info.value.code == 0
        assert info.value.text == o.help_text()
    with pytest.raises(EarlyExit) as info:
        load(["--version"])
    assert info.value.code == 0
    assert info.value.text == "uwsgi-fastrouter %s (uWSGI %s compatible)\n" % (__version__, UWSGI_COMPAT_VERSION)
    # options are read in order: an error before --help wins
    assert error_of(["--bogus", "--help"]).startswith("unrecognized option '--bogus'")


def test_help_text_lists_every_option_and_marks_pending():
    text = o.help_text()
    assert text.startswith("Usage: uwsgi-fastrouter")
    for option in o.OPTIONS:
        entry = o.help_entry(option)
        assert entry in text
        assert "--" + option.name in entry
        for alias in option.aliases:
            assert "--" + alias in entry
        if option.short:
            assert "-%s, --%s" % (option.short, option.name) in entry
        assert ("(not supported yet)" in entry) == (option.status == o.PENDING), option.name
        default = option.default_text()
        if default is not None:
            assert "(default: %s)" % default in entry
    assert "--fastrouter-timeout SECS" in text and "(default: 60)" in text
    assert "--chmod-socket[=MODE]" in text


# -- agreement with the real uWSGI 2.0.31 --------------------------------------------------------------


def _uwsgi_binary():
    found = os.environ.get("UWSGI_BIN") or shutil.which("uwsgi")
    if not found or not os.access(found, os.X_OK):
        pytest.skip("real uWSGI not found (set UWSGI_BIN or put uwsgi on PATH)")
    return found


@pytest.mark.parametrize(
    "argv",
    [
        ["--xyz"],
        ["--master=1"],
        ["--fastrouter"],
        ["--fastrouter-stat", "1"],
        ["--fastrouter-timeout", "-5"],
        ["-j"],
        ["-Ml"],
        ["plain"],
        ["--chmod-socket", "644"],
    ],
)
def test_error_lines_match_real_uwsgi(argv, tmp_path):
    binary = _uwsgi_binary()
    done = subprocess.run([binary] + argv, cwd=str(tmp_path), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=30)
    assert done.returncode == 1
    theirs = done.stderr.decode()
    ours = error_of(argv)
    for line in ours.split("\n"):
        if line == o.HELP_POINTER or line.startswith("did you mean"):
            continue  # our own hint after uWSGI's lines
        assert line in theirs  # uWSGI prefixes getopt lines with its program name


# -- config lines of real uWSGI router configurations ---------------------------------------------------


UWSGI_ROUTER_INI = """[uwsgi]
plugins = python3,fastrouter
plugin = corerouter python
master = true
enable-threads = true
thunder-lock = true
need-app = true
auto-procname = true
procname-prefix-spaced = edge
procname-master = edge-master
harakiri = 30
buffer-size = 32768
fastrouter = 127.0.0.1:3017
fastrouter-to = 127.0.0.1:3031
"""


def test_the_lines_real_router_configs_carry_are_accepted(tmp_path):
    warnings: List[str] = []
    cfg = load([write(tmp_path / "router.ini", UWSGI_ROUTER_INI)], warnings=warnings)
    assert warnings == ["plugins python3, fastrouter, corerouter, python: built into uwsgi-fastrouter, "
                        "nothing to load"]
    assert cfg.enable_threads and cfg.thunder_lock and cfg.need_app and cfg.auto_procname
    assert cfg.procname_prefix == "edge " and cfg.procname_master == "edge-master"
    assert cfg.harakiri == 30 and cfg.buffer_size == 32768
    assert cfg.placeholders == {}
    # the same from the command line, short options included
    cfg = load(["-T", "-t", "5", "--thunder-lock", "--need-app", "--need-app=false", "--plugins", "python"])
    assert cfg.enable_threads and cfg.harakiri == 5 and cfg.thunder_lock and cfg.need_app is False


def test_plugin_names():
    assert o.plugin_names(["python3,fastrouter", " corerouter  python ", "a,,b"]) == [
        "python3", "fastrouter", "corerouter", "python", "a", "b"]
    assert o.plugin_names(["/usr/lib/uwsgi/plugins/python3_plugin.so", "python311_plugin"]) == [
        "python3", "python311"]
    assert o.check_plugins([]) is None
    assert o.check_plugins(["python39"]) == "plugins python39: built into uwsgi-fastrouter, nothing to load"
    for bad in ("http", "python2", "rack", "fastrouter,gevent"):
        with pytest.raises(ConfigError) as info:
            o.check_plugins([bad])
        name = bad.split(",")[-1]
        assert str(info.value).startswith('unable to load plugin "%s": ' % name), info.value


def test_an_unknown_plugin_stops_the_start(tmp_path):
    done = subprocess.run([sys.executable, "-m", "uwsgi_fastrouter", "--plugins", "python3,http",
                           "--fastrouter", "127.0.0.1:0", "--fastrouter-to", "127.0.0.1:9"],
                          cwd=str(Path(o.__file__).parent.parent), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=60)
    assert done.returncode == 1
    assert b'unable to load plugin "http"' in done.stderr
    assert b"bound on" not in done.stderr


def test_ignored_ini_keys_are_listed_in_one_warning(tmp_path):
    warnings: List[str] = []
    path = write(tmp_path / "a.ini", "[uwsgi]\nchdir = /srv\nbase = /run/apps/\n"
                 "fastrouter-use-base = %(base)\nfastrouter-too = 127.0.0.1:1\nmax-requests = 5\n"
                 "chdir = /again\n")
    cfg = load([path, "--set", "cli-only=1"], warnings=warnings)
    assert cfg.fastrouter_use_base == "/run/apps/"
    assert warnings == [
        "*** WARNING: ignoring INI keys that are not uwsgi-fastrouter options: chdir, "
        "fastrouter-too (did you mean fastrouter-to?), max-requests in %s "
        "(--strict makes this an error) ***" % path]
    # placeholders that are used, and --set names, are not "ignored"
    used = write(tmp_path / "b.ini", "[uwsgi]\nbase = /x/\nfastrouter-use-base = %(base)\n")
    warnings.clear()
    load([used, "--set", "whatever=1"], warnings=warnings)
    assert warnings == []
    assert error_of(["--strict", path]) == "[strict-mode] unknown config directive: chdir"


def test_a_typo_on_the_command_line_gets_a_suggestion():
    assert error_of(["--fastrouter-tp", "x"]) == (
        "unrecognized option '--fastrouter-tp'\ngetopt_long() error\n"
        "did you mean --fastrouter-to? (run uwsgi-fastrouter --help to list every option)")
    assert error_of(["--mastr"]).endswith("did you mean --master? (%s)" % o.HELP_POINTER)
    assert error_of(["--subscription-tolerence", "3"]).endswith(
        "did you mean --subscription-tolerance? (%s)" % o.HELP_POINTER)
    assert error_of(["--zzz"]).endswith("\n" + o.HELP_POINTER)


def test_stats_says_what_to_use_instead(tmp_path):
    message = ('option "--stats" is refused: uWSGI\'s instance statistics server, which '
               "uwsgi-fastrouter does not have (giving it is an error): use --fastrouter-stats ADDR "
               "for the router's statistics")
    assert error_of(["--stats", "127.0.0.1:9191"]) == message
    assert error_of(["--stats-server", ":1"]).startswith('option "--stats-server" is refused: ')
    assert error_of([write(tmp_path / "s.ini", "[uwsgi]\nstats = /tmp/stats.sock\n")]) == message
    # the prefixes of the stats options still work
    assert load(["--stats-min"]).stats_minified is True


def test_log_date_values():
    assert load([]).log_date is None
    assert load(["--log-date"]).log_date == ""
    assert load(["--logdate=%Y"]).log_date == "%Y"
    assert o.log_date_format(None) is None
    for bare in ("", "1", "true", "On", "yes"):
        assert o.log_date_format(bare) == "", bare
    for off in ("0", "false", "off", "NO"):
        assert o.log_date_format(off) is None, off
    assert o.log_date_format("%d/%m/%Y %H:%M:%S") == "%d/%m/%Y %H:%M:%S"


def test_touch_options_repeat():
    cfg = load(["--touch-reload", "/a", "--touch-reload", "/b", "--touch-logreopen", "/c", "--log-reopen"])
    assert cfg.touch_reload == ["/a", "/b"] and cfg.touch_logreopen == ["/c"] and cfg.log_reopen


def test_touch_reload_implies_the_master():
    from uwsgi_fastrouter.cli import needs_master
    assert not needs_master(load(["--touch-logreopen", "/x"]))
    assert needs_master(load(["--touch-reload", "/x"]))


# -- --help wraps to the terminal ------------------------------------------------------------------------


@pytest.mark.parametrize("width", [50, 80, 132])
def test_help_wraps_to_the_width(width):
    text = o.help_text(width)
    for line in text.splitlines():
        # only an unbreakable flag column may be wider
        assert len(line) <= width or " " not in line.strip(), (width, line)
    assert "(default: 256 KiB)" in text and "[alias: --fastrouter-stats-server," in text
    for option in o.OPTIONS:
        assert "--" + option.name in text


def _help_of(env: Dict[str, str]) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    environ.update(env)
    done = subprocess.run([sys.executable, "-m", "uwsgi_fastrouter", "--help"],
                          cwd=str(Path(o.__file__).parent.parent), env=environ,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.decode()


def test_help_is_80_columns_when_not_a_terminal_and_follows_columns():
    plain = _help_of({})
    assert plain == o.help_text(80)
    assert max(len(line) for line in plain.splitlines() if " " in line.strip()) <= 80
    wide = _help_of({"COLUMNS": "140"})
    assert wide == o.help_text(140)
    assert max(len(line) for line in wide.splitlines()) > 100


def test_a_loaded_configuration_is_frozen():
    cfg = load(["--fastrouter", ":3017"])
    with pytest.raises(AttributeError):
        cfg.fastrouter_timeout = 5
    with pytest.raises(AttributeError):
        cfg.brand_new = 1
    with pytest.raises(AttributeError):
        del cfg.fastrouter
    assert cfg.fastrouter_timeout == 60


@pytest.mark.parametrize("name", [opt.name for opt in o.OPTIONS if opt.zero_means is not None])
def test_zero_means_the_default_where_uwsgi_says_so(name):
    option = o.find_option(name)
    assert option.zero_means == option.default   # the one default, shown in --help
    assert getattr(load(["--" + name, "0"]), option.attr) == option.default


def test_every_value_has_its_kind_type():
    cfg = load(["--fastrouter", ":1", "--master", "--listen", "7", "--umask", "022"])
    for option in o.OPTIONS:
        value = getattr(cfg, option.attr)
        if option.kind != o.ACTION and value is not None:
            assert isinstance(value, option.value_type), option.name
