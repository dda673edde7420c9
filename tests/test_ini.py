"""INI reading: the % magic, line parsing, sections, and agreement with real uWSGI."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

from uwsgi_fastrouter import UWSGI_COMPAT_VERSION
from uwsgi_fastrouter import ini
from uwsgi_fastrouter.options import load_config


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- FILE[:SECTION] -------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("app.ini", ("app.ini", None)),
        ("app.ini:web", ("app.ini", "web")),
        ("app.ini:", ("app.ini", None)),
        (":web", ("", "web")),
        ("dir/app.ini:a:b", ("dir/app.ini:a", "b")),  # the last colon splits
    ],
)
def test_split_spec(spec, expected):
    assert ini.split_spec(spec) == expected


# -- the % magic ------------------------------------------------------------------

TABLE = {"s": "app.ini", "n": "app", "d": "/srv/"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("/x/%%s/uwsgi.sock", "/x/%s/uwsgi.sock"),
        ("/x/%s/uwsgi.sock", "/x/app.ini/uwsgi.sock"),
        ("%d%n.sock", "/srv/app.sock"),
        ("50% done", "50done"),  # unknown %X pairs are deleted, X included
        ("%q%Z%!", ""),
        ("%(name)", "%(name)"),  # kept for the placeholder pass
        ("100%", "100"),  # a final lone % goes away
        ("a = 1%\nb = 2", "a = 1b = 2"),  # % eats the newline too
        ("no magic", "no magic"),
        ("%%%%", "%%"),
    ],
)
def test_magic_substitute(text, expected):
    assert ini.magic_substitute(text, TABLE) == expected


def test_djb33x_matches_uwsgi_vectors():
    # Printed by uWSGI 2.0.31 for %j of a file at this absolute path.
    assert ini.djb33x_hex("/tmp/uwsgi-fastrouter-vector.ini") == "41328F5F"
    # The seed 5381 (0x1505), bytes printed little-endian first.
    assert ini.djb33x_hex("") == "05150000"


# -- line parsing ---------------------------------------------------------------------


def test_parse_basic_rules():
    text = "\n".join(
        [
            "; a comment",
            "# another comment",
            "[uwsgi]",
            "  fastrouter = :3017  ",
            "fastrouter=:3018",
            "\tkey\t=\tvalue with = sign\r",
            'quoted = "x" ; not a comment',
            "hash = a # b",
            "   ; indented comment",
            "master",
            "empty =",
            "[other]",
            "ignored = 1",
            "[uwsgi]",
            "again = 2",
        ]
    )
    entries, found = ini.parse(text)
    assert found
    assert entries == [
        ("fastrouter", ":3017"),
        ("fastrouter", ":3018"),
        ("key", "value with = sign"),
        ("quoted", '"x" ; not a comment'),
        ("hash", "a # b"),
        ("master", ""),
        ("empty", ""),
        ("again", "2"),
    ]


def test_parse_other_section_and_header_quirk():
    text = "[uwsgi]\na = 1\n[web]\nb = 2\n"
    assert ini.parse(text, "web") == ([("b", "2")], True)
    # The last character of a header is dropped, whatever it is: "[web2" opens "web".
    assert ini.parse("[web2\nc = 3\n", "web") == ([("c", "3")], True)


def test_parse_section_with_only_comments_is_not_found():
    assert ini.parse("[uwsgi]\n; nothing\n") == ([], False)


def test_parse_crlf_lines():
    assert ini.parse("[uwsgi]\r\na = 1\r\nb\r\n") == ([("a", "1"), ("b", "")], True)


# -- files through the loader ---------------------------------------------------------------


def test_loader_file_magic(tmp_path, monkeypatch):
    conf = tmp_path / "conf.d"
    conf.mkdir()
    path = write(
        conf / "app.test.ini",
        "[uwsgi]\nd = %d\np = %p\ns = %s\nn = %n\ne = %e\nc = %c\no = %o\nx = %x\n"
        "v = %V\nesc = %[\ncwd = %v\ni = %i\nj = %j\nlast = %9\n"
        "[web]\nx = %x\n",
    )
    monkeypatch.chdir(tmp_path)
    loader = ini.IniLoader()
    values = dict(loader.load("conf.d/app.test.ini").entries)
    real = os.path.realpath(str(path))
    parts = [p for p in os.path.dirname(real).split("/") if p]
    assert values["d"] == os.path.dirname(real) + "/"
    assert values["p"] == real
    assert values["s"] == "app.test.ini"
    assert values["n"] == "app.test"
    assert values["e"] == "ini"
    assert values["c"] == "conf.d"
    assert values["o"] == "conf.d/app.test.ini"
    assert values["x"] == ""
    assert values["v"] == UWSGI_COMPAT_VERSION
    assert values["esc"] == "\x1b"
    assert values["cwd"] == os.getcwd()
    assert values["i"] == str(os.stat(str(path)).st_ino)
    assert values["j"] == ini.djb33x_hex(real)
    assert values["last"] == (parts[9] if len(parts) > 9 else "")
    # %x is the section asked for
    assert dict(loader.load("conf.d/app.test.ini:web").entries)["x"] == "web"


def test_process_letters_can_be_injected(tmp_path):
    path = write(tmp_path / "a.ini", "[uwsgi]\nt = %t\nT = %T\nv = %v\nb = %b\nh = %h\nk = %k\n")
    process = ini.ProcessMagic(now=1700000000.25, cwd="/srv", binary="/usr/bin/fr", hostname="box")
    values = dict(ini.IniLoader(process).load(str(path)).entries)
    assert values["t"] == "1700000000"
    assert values["T"] == "1700000000250000"
    assert values["v"] == "/srv"
    assert values["b"] == "/usr/bin/fr"
    assert values["h"] == "box"
    assert int(values["k"]) >= 1


def test_loader_digit_components(tmp_path):
    path = write(tmp_path / "a.ini", "[uwsgi]\nzero = %0\nall = %0/%1/%2\n")
    values = dict(ini.IniLoader().load(str(path)).entries)
    parts = [p for p in os.path.realpath(str(tmp_path)).split("/") if p]
    assert values["zero"] == parts[0]
    assert values["all"] == "/".join((parts + ["", ""])[:3])


def test_loader_symlink_keeps_link_name(tmp_path, monkeypatch):
    target = write(tmp_path / "real.ini", "[uwsgi]\np = %p\ns = %s\n")
    (tmp_path / "link.ini").symlink_to(target)
    monkeypatch.chdir(tmp_path)
    values = dict(ini.IniLoader().load("link.ini").entries)
    assert values["s"] == "link.ini"
    assert values["p"] == os.getcwd() + "/link.ini"


def test_loader_missing_section_warns(tmp_path):
    path = write(tmp_path / "a.ini", "[uwsgi]\na = 1\n")
    result = ini.IniLoader().load(str(path) + ":nope")
    assert result.entries == []
    assert result.warning == (
        '*** WARNING: Can\'t find section "nope" in INI configuration file %s ***' % path
    )
    assert ini.IniLoader().load(str(path)).warning is None


def test_loader_reread_last_file(tmp_path):
    path = write(tmp_path / "a.ini", "[uwsgi]\na = 1\n[two]\nb = 2\n")
    loader = ini.IniLoader()
    loader.load(str(path))
    assert loader.load(":two").entries == [("b", "2")]
    with pytest.raises(ini.IniError):
        ini.IniLoader().load(":two")


def test_loader_missing_file(tmp_path):
    missing = str(tmp_path / "missing.ini")
    with pytest.raises(ini.IniError) as info:
        ini.IniLoader().load(missing)
    assert str(info.value) == 'open("%s"): No such file or directory' % missing


def test_uppercase_letters_name_the_top_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    write(tmp_path / "top.ini", "[uwsgi]\nini = sub/inner.ini\ntop-s = %s\n")
    write(
        tmp_path / "sub" / "inner.ini",
        "[uwsgi]\nin-s = %s\nin-S = %S\nin-o = %o\nin-O = %O\nin-c = %c\nin-C = %C\nin-X = %X\nin-x = %x\n",
    )
    cfg = load_config(["--ini", "top.ini:uwsgi"], {})
    ph = cfg.placeholders
    assert ph["top-s"] == "top.ini"
    assert ph["in-s"] == "inner.ini"
    assert ph["in-S"] == "top.ini"
    assert ph["in-o"] == "sub/inner.ini"
    assert ph["in-O"] == "top.ini"
    assert ph["in-c"] == "sub"
    assert ph["in-C"] == os.path.basename(os.path.realpath(str(tmp_path)))
    assert ph["in-X"] == "uwsgi"
    assert ph["in-x"] == ""


# -- agreement with the real uWSGI 2.0.31 --------------------------------------------------


def _uwsgi_binary():
    found = os.environ.get("UWSGI_BIN") or shutil.which("uwsgi")
    if not found or not os.access(found, os.X_OK):
        pytest.skip("real uWSGI not found (set UWSGI_BIN or put uwsgi on PATH)")
    return found


def _uwsgi_get(args: List[str], keys: List[str], cwd: Path, env: Dict[str, str]) -> Dict[str, str]:
    command = [_uwsgi_binary()] + args
    for key in keys:
        command += ["--get", key]
    done = subprocess.run(
        command, cwd=str(cwd), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().split("\n")
    assert len(lines) >= len(keys), (lines, done.stderr)
    return dict(zip(keys, lines))


def test_same_values_as_real_uwsgi(tmp_path, monkeypatch):
    (tmp_path / "etc.d").mkdir()
    write(tmp_path / "addr.txt", "127.0.0.1:4000\n")
    write(
        tmp_path / "etc.d" / "site.main.ini",
        "\n".join(
            [
                "[uwsgi]",
                "d = %d",
                "p = %p",
                "s = %s",
                "n = %n",
                "e = %e",
                "c = %c",
                "zero = %0",
                "o = %o",
                "x = %x",
                "j = %j",
                "i = %i",
                "V = %V",
                "h = %h",
                "k = %k",
                "u = %u|%U|%g|%G",
                "pattern = /run/%%s/uwsgi.sock",
                "wrong = /run/%s/uwsgi.sock",
                "pct = 50% done",
                "inline = x ; y",
                "quoted = \"q\"",
                "bare",
                "env = $(FR_TEST_VAR)/$(FR_TEST_UNSET)",
                "atfile = @(addr.txt)",
                "early = %(late)-%(unknown)",
                "late = L",
                "rep = 1",
                "rep = 2",
                "[web]",
                "x = %x",
            ]
        )
        + "\n",
    )
    keys = ["d", "p", "s", "n", "e", "c", "zero", "o", "x", "j", "i", "V", "h", "k", "u", "pattern",
            "wrong", "pct", "inline", "quoted", "bare", "env", "atfile", "early", "late", "rep"]
    env = dict(os.environ, FR_TEST_VAR="from-env")
    env.pop("FR_TEST_UNSET", None)
    theirs = _uwsgi_get(["--ini", "etc.d/site.main.ini"], keys, tmp_path, env)
    monkeypatch.chdir(tmp_path)
    ours = load_config(["--ini", "etc.d/site.main.ini"], env).placeholders
    for key in keys:
        assert ours[key] == theirs[key], key
    theirs_web = _uwsgi_get(["--ini", "etc.d/site.main.ini:web"], ["x"], tmp_path, env)
    assert load_config(["--ini", "etc.d/site.main.ini:web"], env).placeholders["x"] == theirs_web["x"]
