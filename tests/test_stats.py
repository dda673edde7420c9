"""The stats document layout (uWSGI's, with valid JSON always)."""

import json

from uwsgi_fastrouter.stats import Unindented, render


def test_layout_matches_uwsgi_pretty_mode():
    doc = {
        "version": "2.0.31",
        "active_sessions": 0,
        "fastrouter": Unindented(["127.0.0.1:3117", "/tmp/fr2.sock"]),
        "static_nodes": [{"name": "127.0.0.1:3131", "hits": 0, "grace": 0}],
        "subscriptions": [],
        "cheap": 0,
    }
    expected = (
        '{\n'
        '\t"version":"2.0.31",\n'
        '\t"active_sessions":0,\n'
        '\t"fastrouter":[\n'
        '"127.0.0.1:3117",\n'
        '"/tmp/fr2.sock"\n'
        '\t],\n'
        '\t"static_nodes":[\n'
        '\t\t{\n'
        '\t\t\t"name":"127.0.0.1:3131",\n'
        '\t\t\t"hits":0,\n'
        '\t\t\t"grace":0\n'
        '\t\t}\n'
        '\t],\n'
        '\t"subscriptions":[\n'
        '\n'
        '\t],\n'
        '\t"cheap":0\n'
        '}'
    ).encode()
    assert render(doc) == expected
    assert json.loads(expected) == json.loads(render(doc))


def test_minified():
    doc = {"version": "2.0.31", "static_nodes": [{"name": "a", "grace": 17}], "cheap": 1}
    assert render(doc, minified=True) == b'{"version":"2.0.31","static_nodes":[{"name":"a","grace":17}],"cheap":1}'


def test_strings_are_escaped_so_the_json_stays_valid():
    doc = {"key": 'a"b\\c\n\x01', "raw": b"h\xe9\xff"}
    out = render(doc)
    parsed = json.loads(out)
    assert parsed["key"] == 'a"b\\c\n\x01'
    assert parsed["raw"].startswith("h")
