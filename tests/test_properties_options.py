"""Properties of the option pipeline (uwsgi_fastrouter/options.py).

tests/test_options.py checks each getopt rule, conversion and substitution on
examples; these check that any command line, environment or INI file ends in a
Config or in the module's own errors, and that the three ways of writing the same
options give the same Config.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Dict, List, Optional, Tuple

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from property_support import PROPERTY
from uwsgi_fastrouter import options as o
from uwsgi_fastrouter.options import ConfigError, EarlyExit, load_config

# Options that take a value from every source the same way (the immediate ones,
# --ini/--set/--help..., act while collecting and are covered by tests/test_options.py).
VALUED = [opt for opt in o.OPTIONS if opt.kind != o.ACTION]
ENVIRON = {"HOME_X": "/home/x", "PATH": "/bin"}


def _outcome(argv: List[str], environ: Dict[str, str]) -> Tuple[str, object]:
    """What loading gives, in a comparable form: the effective settings or the error."""
    warnings: List[str] = []
    try:
        config = load_config(argv, environ, warn=warnings.append)
    except ConfigError as exc:
        return ("error", str(exc))
    except EarlyExit as exc:
        return ("exit", exc.code)
    settings = {opt.attr: getattr(config, opt.attr) for opt in VALUED}
    given = sorted(name for name in config._given if name not in ("ini", "set", "set-ph"))
    return ("config", (settings, config.placeholders, given, warnings))


# -- any input ------------------------------------------------------------------------

#: more digits than int() converts (Python 3.11+), with or without leading zeros
long_numbers = st.tuples(st.integers(0, 5000), st.integers(1, 5000)).map(
    lambda zn: "0" * zn[0] + "7" * zn[1])
#: what a real argv element can be: any bytes but NUL, decoded as Python does
argv_text = st.one_of(st.binary(max_size=12).filter(lambda b: b"\0" not in b).map(os.fsdecode),
                      long_numbers)
long_names = st.sampled_from(o._LONG_NAMES)
shorts = "".join(sorted(o._BY_SHORT))
_VALUE_TAKERS = [n for n in o._LONG_NAMES if o._BY_NAME[n].arg == o.REQUIRED]
_NUMERIC = [n for n in o._LONG_NAMES if o._BY_NAME[n].kind in (o.INT, o.UINT64)]
#: one occurrence of an option, as getopt would accept it
well_formed = st.one_of(
    st.tuples(st.sampled_from(_NUMERIC), long_numbers).map(lambda nv: ["--%s=%s" % nv]),
    st.tuples(st.sampled_from(_VALUE_TAKERS), argv_text).map(lambda nv: ["--" + nv[0], nv[1]]),
    st.tuples(long_names, argv_text).map(lambda nv: ["--%s=%s" % nv]),
    long_names.map(lambda n: ["--" + n]),
)
#: anything else a command line may hold
odd_word = st.one_of(
    st.tuples(long_names, st.integers(1, 12)).map(lambda nk: "--" + nk[0][:nk[1]]),  # prefixes
    st.text(st.sampled_from(shorts + "xq9"), min_size=1, max_size=3).map(lambda s: "-" + s),
    st.sampled_from(["--", "-", "x.ini", "missing.ini:web", ":web", "--ini", "--set", "--set-ph",
                     "--strict", "a=b", "%(a)", "$(HOME_X)", "@(/nonexistent/file)", "0", "-1",
                     "--help", "--version"]),
    argv_text,
)
argvs = st.lists(st.one_of(well_formed, well_formed, odd_word.map(lambda w: [w])),
                 max_size=6).map(lambda groups: [word for group in groups for word in group])
env_names = st.one_of(long_names.map(lambda n: "UWSGI_" + n.upper().replace("-", "_")),
                      st.sampled_from(["UWSGI_RELOADS", "UWSGI_", "UWSGI_X", "HOME_X"]))


@PROPERTY
@given(argvs, st.dictionaries(env_names, argv_text, max_size=3))
@example(["--listen", "1" * 5000], {})
@example(["--fastrouter-post-buffering", "9" * 4500], {})
@example([], {"UWSGI_SUBSCRIPTION_TOLERANCE": "0" * 4400 + "5"})
def test_any_command_line_gives_a_config_or_a_config_error(argv, environ):
    kind, _ = _outcome(argv, dict(ENVIRON, **environ))
    event("outcome: %s" % kind)
    assert kind in ("config", "error", "exit")


@PROPERTY
@given(st.one_of(st.text(st.sampled_from(" \t+-0123456789x"), max_size=30), long_numbers,
                 st.tuples(st.sampled_from(["", "-", "+", " -"]), long_numbers).map("".join)))
@example("7" * 4301)
@example("0" * 4292 + "7" * 9)
def test_c_numbers_of_any_text_stay_in_range(text):
    """atoi and strtoul never raise and stay in their C types, however long the digits."""
    assert -(1 << 31) <= o.c_atoi(text) < 1 << 31
    assert 0 <= o.c_strtoul(text) < 1 << 64
    match = re.match(r"[ \t]*([+-]?)([0-9]+)", text)
    if match and len(match.group(2).lstrip("0")) <= 9:  # fits a C int: the plain value
        sign = -1 if match.group(1) == "-" else 1
        assert o.c_atoi(text) == sign * int(match.group(2).lstrip("0") or "0")


_ini_key = st.one_of(long_names, st.sampled_from(["ini", "set", "strict", "x", ""]))
_ini_value = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\n"), max_size=10),
    st.sampled_from(["@(x\x00y)", "x\x00y", ":web", "%(ini)", "%%(x)", "%s", "@(/)", "1"]),
    long_numbers,
)
ini_lines = st.lists(st.tuples(_ini_key, _ini_value).map(lambda kv: "%s = %s" % kv), max_size=6)


@pytest.fixture(scope="module")
def ini_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("option-properties")


@PROPERTY
@given(lines=ini_lines, section=st.sampled_from(["uwsgi", "web"]))
@example(lines=["ini = x\x00y"], section="uwsgi")           # an INI names a file with a NUL
@example(lines=["listen = @(x\x00y)"], section="uwsgi")     # and reads one with @()
def test_any_ini_file_gives_a_config_or_a_config_error(ini_dir, lines, section):
    path = os.path.join(str(ini_dir), "any.ini")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("[%s]\n%s\n" % (section, "\n".join(lines)))
    kind, _ = _outcome(["--ini", path], ENVIRON)
    event("outcome: %s" % kind)
    assert kind in ("config", "error", "exit")


@PROPERTY
@given(st.one_of(st.integers(min_value=1, max_value=150), st.integers(1, 150).map(lambda n: n * 20)),
       st.booleans())
@example(3000, True)  # deeper than the interpreter allows
def test_placeholder_chains_resolve_or_are_refused(length, first_is_outermost):
    """``--set-ph p0=%(p1) ... p{n-1}=end``: a chain of any length either resolves
    to ``end`` or is refused as too deep, never a crash."""
    links = [("p%d" % i, "%%(p%d)" % (i + 1)) for i in range(length - 1)]
    links.append(("p%d" % (length - 1), "end"))
    if not first_is_outermost:
        links.reverse()
    argv = [word for name, value in links for word in ("--set-ph", "%s=%s" % (name, value))]
    argv += ["--fastrouter-use-base", "%(p0)"]
    kind, result = _outcome(argv, ENVIRON)
    if kind == "error":
        assert "nested" in result
        assert first_is_outermost and length > o.MAX_PLACEHOLDER_DEPTH
    else:
        assert kind == "config" and result[0]["fastrouter_use_base"] == "end"


# -- one configuration, three ways to write it ------------------------------------------------

_value_chars = st.one_of(
    st.sampled_from("abz019 -_.,:/=;#[]\"'%()$@\t"),
    # anything else a value may hold: no newline (it ends an INI line), no NUL (the
    # environment cannot hold one), no lone surrogate (not in a file or an argv)
    st.characters(exclude_categories=("Cs",), exclude_characters="\n\x00"),
)
_plain_values = st.text(_value_chars, max_size=10).map(lambda t: t.strip(" \t\r"))
_NONE_ARG = {opt.name for opt in VALUED if opt.arg == o.NONE}
_REFERABLE = [opt.name for opt in VALUED if opt.arg != o.NONE] + ["undefined-name"]
values = st.one_of(
    _plain_values,
    st.sampled_from(["0", "1", "-5", "off", "No", "true", "12abc", "18446744073709551617"]),
    st.tuples(_plain_values, st.sampled_from(_REFERABLE), _plain_values).map(
        lambda t: ("%s%%(%s)%s" % t).strip(" \t\r")),
    st.tuples(_plain_values, _plain_values).map(lambda t: ("%s$(HOME_X)%s" % t).strip(" \t\r")),
).filter(lambda v: "@(" not in v)


def _unique_prefixes(name: str) -> List[str]:
    return [name[:k] for k in range(1, len(name) + 1)
            if [n for n in o._LONG_NAMES if n.startswith(name[:k])] == [name] or k == len(name)]


def _setting(opt) -> str:
    """The setting an option writes: --procname-prefix and --procname-prefix-spaced share
    one (the last wins), so the sources' order would matter if both were drawn."""
    return "procname-prefix" if opt.name.startswith("procname-prefix") else opt.name


@st.composite
def settings_in_three_forms(draw):
    """A few options with values; each written on the command line (some way),
    in an INI file or in the environment; and all of them on the command line."""
    chosen = draw(st.lists(st.sampled_from(VALUED), unique_by=_setting, max_size=6))
    canonical: List[str] = []
    argv: List[str] = []
    ini_lines: List[str] = []
    environ: Dict[str, str] = {}
    for opt in chosen:
        value: Optional[str] = None if opt.arg == o.NONE else draw(values)
        if value is None:
            canonical.append("--" + opt.name)
        else:
            canonical.append("--%s=%s" % (opt.name, value))
        form = draw(st.sampled_from(["argv", "ini", "env"]))
        if form == "ini":
            escaped = "" if value is None else value.replace("%", "%%")
            ini_lines.append(opt.name if value is None else "%s = %s" % (opt.name, escaped))
        elif form == "env":
            environ["UWSGI_" + opt.name.upper().replace("-", "_")] = value or ""
        elif value is None:
            argv.append("-" + opt.short if opt.short and draw(st.booleans()) else "--" + opt.name)
        elif opt.arg == o.OPTIONAL:
            argv.append("--%s=%s" % (opt.name, value))
        else:
            written = draw(st.sampled_from(_unique_prefixes(opt.name)))
            style = draw(st.sampled_from(["separate", "attached", "short", "short-attached"]))
            if opt.short and style == "short":
                argv += ["-" + opt.short, value]
            elif opt.short and style == "short-attached" and value:
                argv.append("-" + opt.short + value)
            elif style == "attached":
                argv.append("--%s=%s" % (written, value))
            else:
                argv += ["--" + written, value]
    return canonical, argv, ini_lines, environ


@PROPERTY
@given(settings_in_three_forms())
@example((["--listen=%(weight)", "--weight=5"], ["--weight", "5"], ["listen = %%(weight)"], {}))
def test_argv_ini_and_environment_give_the_same_config(forms):
    """The same option values give the same Config whether they come from argv,
    an INI file or UWSGI_* variables (a bare flag counts as true in each)."""
    canonical, argv, ini_lines, environ = forms
    expected = _outcome(canonical, ENVIRON)
    event("outcome: %s" % expected[0])
    with tempfile.TemporaryDirectory() as tmp:
        if ini_lines:
            path = os.path.join(tmp, "same.ini")
            with open(path, "w", encoding="utf-8") as handle:
                handle.write("[uwsgi]\n" + "\n".join(ini_lines) + "\n")
            argv = ["--ini", path] + argv
        assert _outcome(argv, dict(ENVIRON, **environ)) == expected
