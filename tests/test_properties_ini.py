"""Properties of the INI reader and its % magic (uwsgi_fastrouter/ini.py).

tests/test_ini.py checks each rule on a hand-written example; these generate INI
text (and arbitrary text and bytes) and check the rules hold together.
"""

from __future__ import annotations

import os
from typing import Dict, List, Tuple

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from property_support import PROPERTY
from uwsgi_fastrouter import ini

def _chars(excluded: str) -> st.SearchStrategy:
    """Any character a decoded file can hold (no lone surrogates), minus *excluded*."""
    return st.characters(exclude_characters=excluded, exclude_categories=("Cs",))


# -- the % magic -------------------------------------------------------------------

#: a magic table whose values themselves hold % sequences: inserted text is final
TABLE: Dict[str, str] = {
    "s": "app.ini", "d": "/srv/50%s/", "n": "%(x)", "p": "/srv/a%%b", "0": "srv", "[": "\x1b",
    "h": "", "j": "05150000",
}
_LETTERS = "".join(TABLE)
_NOT_LETTERS = st.characters().filter(lambda c: c not in TABLE and c not in "%(")

# (source text, what the magic makes of it)
tokens = st.one_of(
    st.text(_chars("%"), min_size=1, max_size=6).map(lambda t: (t, t)),
    st.just(("%%", "%")),
    st.just(("%(", "%(")),
    st.sampled_from(_LETTERS).map(lambda c: ("%" + c, TABLE[c])),
    _NOT_LETTERS.map(lambda c: ("%" + c, "")),  # an unknown pair goes, newline included
)


@PROPERTY
@given(st.lists(tokens, max_size=12), st.booleans())
@example([("%\n", "")], True)  # "%" then a newline: both deleted
def test_magic_substitutes_each_pair_once(parts, lone_percent_at_end):
    text = "".join(source for source, _ in parts)
    expected = "".join(result for _, result in parts)
    if lone_percent_at_end:
        text += "%"  # a final lone % is deleted
    assert ini.magic_substitute(text, TABLE) == expected


@PROPERTY
@given(st.text())
def test_doubling_every_percent_protects_any_text(text):
    assert ini.magic_substitute(text.replace("%", "%%"), TABLE) == text


# -- line parsing ------------------------------------------------------------------

_STRIP = " \t\r"
_line_text = st.text(_chars("\n"), max_size=12).map(
    lambda t: t.strip(_STRIP))
keys = _line_text.filter(lambda k: k and "=" not in k and k[0] not in "[;#")
values = _line_text
section_names = st.one_of(st.just("uwsgi"), st.sampled_from(["web", "uwsgi2", "", "a b"]),
                          st.text(_chars("\n"), max_size=6))


@st.composite
def ini_files(draw) -> Tuple[str, List[Tuple[str, List[Tuple[str, str]]]]]:
    """INI text with comments, blank lines, indentation, CRLF, bare keys and %
    escaped as %%; and the sections it was made from, in file order."""
    eol = draw(st.sampled_from(["\n", "\r\n"]))

    def pad() -> str:
        return draw(st.sampled_from(["", " ", "\t", "  \t"]))

    def esc(text: str) -> str:
        return text.replace("%", "%%")

    lines: List[str] = []
    sections = []
    for name in draw(st.lists(section_names, max_size=4)):
        lines.append(pad() + "[" + esc(name) + "]" + pad())
        entries = draw(st.lists(st.tuples(keys, values), max_size=5))
        for key, value in entries:
            if draw(st.booleans()):
                lines.append(draw(st.sampled_from([";", "#"])) + esc(draw(_line_text)))
            if not value and draw(st.booleans()):
                lines.append(pad() + esc(key) + pad())  # a bare key: empty value
            else:
                lines.append(pad() + esc(key) + pad() + "=" + pad() + esc(value) + pad())
            if draw(st.booleans()):
                lines.append(pad())
        sections.append((name, entries))
    return eol.join(lines) + draw(st.sampled_from(["", eol])), sections


@PROPERTY
@given(ini_files(), st.one_of(section_names, st.just("absent")))
def test_generated_ini_text_reads_back(made, asked):
    text, sections = made
    expected = [entry for name, entries in sections if name == asked for entry in entries]
    entries, found = ini.parse(ini.magic_substitute(text, TABLE), asked)
    assert entries == expected
    assert found == bool(expected)


@PROPERTY
@given(st.text(), st.text(max_size=5))
def test_any_text_parses_into_stripped_single_line_entries(text, asked):
    entries, found = ini.parse(ini.magic_substitute(text, TABLE), asked)
    assert found == bool(entries)
    for key, value in entries:
        assert "\n" not in key + value
        assert key == key.strip(_STRIP) and value == value.strip(_STRIP)
        assert "=" not in key


# -- files through the loader ----------------------------------------------------------

@pytest.fixture(scope="module")
def ini_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ini-properties")


def _loader() -> ini.IniLoader:
    return ini.IniLoader(ini.ProcessMagic(now=1_700_000_000.0, cwd="/srv", binary="/usr/bin/x",
                                          hostname="host"))


@PROPERTY
@given(content=st.one_of(st.binary(max_size=200),
                         ini_files().map(lambda made: made[0].encode())),
       section=st.one_of(st.none(), section_names.filter(lambda s: ":" not in s)))
def test_any_file_content_loads(ini_dir, content, section):
    path = os.path.join(str(ini_dir), "any.ini")
    with open(path, "wb") as handle:
        handle.write(content)
    spec = path if section is None else path + ":" + section
    result = _loader().load(spec)
    assert result.section == (section or "uwsgi")
    assert (result.warning is None) == bool(result.entries)


@PROPERTY
@given(st.one_of(st.text(max_size=20), st.text(max_size=20).map(lambda t: "/nonexistent/" + t)))
@example("x\x00y")          # what an INI line "ini = x<NUL>y" asks for
@example(":section")        # no file read before
@example("/")               # a directory
def test_any_spec_loads_or_raises_ini_error(spec):
    try:
        _loader().load(spec)
    except ini.IniError as exc:
        assert str(exc)
