"""``--fastrouter-use-code-string``: the Python mapper of decision D5."""

from __future__ import annotations

import sys
import textwrap

import pytest

from uwsgi_fastrouter.codestring import MODULE_NAME, CodeStringError, CodeStringMapper


class LogLines(list):
    def __call__(self, line: str) -> None:
        self.append(line)


class StepClock:
    """Each reading is *step* seconds after the previous one."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


# The two mappers of the FastRouter documentation, copied as written.
SIMPLE = textwrap.dedent("""\
    def get(key):
        return '127.0.0.1:3031'
""")

MEGAMAPPER = textwrap.dedent("""\
    domains = {}
    domains['example.com'] = {'nodes': ('127.0.0.1:3031', '192.168.0.100:3032'), 'node': 0}
    domains['unbit.it'] = {'nodes': ('127.0.0.1:3035,5', '192.168.0.100:3035,5'), 'node': 0}

    DEFAULT_NODE = '192.168.0.1:1717'

    def get(key):
        if key not in domains:
            return DEFAULT_NODE

        # get the node to forward requests to
        nodes = domains[key]['nodes']
        current_node = domains[key]['node']
        value = nodes[current_node]

        # round robin :P
        next_node = current_node + 1
        if next_node >= len(nodes):
            next_node = 0

        domains[key]['node'] = next_node

        return value
""")


@pytest.fixture
def logs():
    return LogLines()


@pytest.fixture
def write(tmp_path):
    def write(source: str, name: str = "mapper.py") -> str:
        path = tmp_path / name
        path.write_text(source)
        return str(path)
    return write


def routes(mapper, key: bytes, times: int):
    out = []
    for _ in range(times):
        route = mapper(key)
        out.append(None if route is None else (route.address, route.modifier1, route.modifier2))
    return out


def test_the_simple_mapper(write, logs):
    mapper = CodeStringMapper("0:%s:get" % write(SIMPLE), log=logs)
    assert routes(mapper, b"anything", 2) == [(b"127.0.0.1:3031", 0, 0)] * 2
    assert logs == []


def test_the_megamapper_round_robin(write, logs):
    mapper = CodeStringMapper("0:%s:get" % write(MEGAMAPPER, "megamapper.py"), log=logs)
    assert routes(mapper, b"example.com", 4) == [
        (b"127.0.0.1:3031", 0, 0), (b"192.168.0.100:3032", 0, 0),
        (b"127.0.0.1:3031", 0, 0), (b"192.168.0.100:3032", 0, 0)]
    assert routes(mapper, b"unbit.it", 3) == [
        (b"127.0.0.1:3035", 5, 0), (b"192.168.0.100:3035", 5, 0), (b"127.0.0.1:3035", 5, 0)]
    assert routes(mapper, b"unknown.org", 1) == [(b"192.168.0.1:1717", 0, 0)]
    assert logs == []


def test_the_module_is_loaded_once_and_not_importable(write):
    path = write("import sys\nLOADS = 1\ndef get(key):\n    return None\n")
    mapper = CodeStringMapper("0:%s:get" % path)
    assert mapper.module.LOADS == 1
    assert mapper.module.__name__ == MODULE_NAME
    assert MODULE_NAME not in sys.modules
    with pytest.raises(ImportError):
        __import__(MODULE_NAME)


def test_the_key_is_a_str_and_bytes_returns_work(write):
    path = write("SEEN = []\n"
                 "def get(key):\n"
                 "    SEEN.append(key)\n"
                 "    return b'/tmp/s.sock,9'\n")
    mapper = CodeStringMapper("0:%s:get" % path)
    route = mapper(b"caf\xc3\xa9.example")
    assert (route.address, route.modifier1) == (b"/tmp/s.sock", 9)
    mapper(b"bad\xff")
    assert mapper.module.SEEN == ["caf\u00e9.example", "bad\udcff"]


@pytest.mark.parametrize("result", ["None", "''", "b''"])
def test_nothing_means_no_route(write, logs, result):
    mapper = CodeStringMapper("0:%s:get" % write("def get(key):\n    return %s\n" % result),
                              log=logs)
    assert mapper(b"k") is None
    assert logs == []


@pytest.mark.parametrize("result, why", [
    ("42", "returned int"),
    ("['a']", "returned list"),
    ("'127.0.0.1:1,x'", "modifier1"),
    ("'127.0.0.1:1,256'", "modifier1"),
    ("'127.0.0.1:1,'", "modifier1"),
    ("',5'", "no address"),
])
def test_garbage_is_logged_and_means_no_route(write, logs, result, why):
    mapper = CodeStringMapper("0:%s:get" % write("def get(key):\n    return %s\n" % result),
                              log=logs)
    assert mapper(b"example.com") is None
    assert len(logs) == 1
    assert "get()" in logs[0] and why in logs[0] and "example.com" in logs[0]


def test_an_exception_is_logged_and_means_no_route(write, logs):
    path = write("def get(key):\n    return {}[key]\n")
    mapper = CodeStringMapper("0:%s:get" % path, log=logs)
    assert mapper(b"example.com") is None
    assert len(logs) == 1
    assert "KeyError" in logs[0] and "%s line 2" % path in logs[0]
    assert mapper(b"again") is None                       # and it keeps working
    assert len(logs) == 2


def test_a_slow_call_is_logged_as_blocking(write, logs):
    path = write(SIMPLE)
    slow = CodeStringMapper("0:%s:get" % path, log=logs, time_limit=1.0, clock=StepClock(1.5))
    assert slow(b"k").address == b"127.0.0.1:3031"        # the answer still counts
    assert len(logs) == 1 and "blocked the router for 1.500 seconds" in logs[0]
    fast = CodeStringMapper("0:%s:get" % path, log=logs, time_limit=1.0, clock=StepClock(0.5))
    fast(b"k")
    assert len(logs) == 1


@pytest.mark.parametrize("spec", ["", "0", "0:file.py", "0::get", "0:file.py:", "x:file.py:get"])
def test_malformed_options(spec):
    with pytest.raises(ValueError, match="invalid code_string option"):
        CodeStringMapper(spec)


def test_only_python_is_supported(write):
    with pytest.raises(ValueError, match=r"only Python \(modifier1 0\) is supported.*6"):
        CodeStringMapper("6:%s:get" % write(SIMPLE))


def test_the_function_name_may_hold_colons_file_ends_at_the_second(write):
    # FILE ends at the second colon, FUNC is the rest (uWSGI's split).
    with pytest.raises(CodeStringError, match='no function "get:x"'):
        CodeStringMapper("0:%s:get:x" % write(SIMPLE))


@pytest.mark.parametrize("source, expected", [
    ("def get(key):\n  return (\n", "SyntaxError"),
    ("raise RuntimeError('at load')\n", "RuntimeError: at load"),
    ("X = 1\n", 'no function "get"'),
    ("get = 5\n", 'no function "get"'),
    ("open('/nonexistent/file')\n", "FileNotFoundError"),
])
def test_load_failures_are_startup_errors(write, source, expected):
    with pytest.raises(CodeStringError, match=expected):
        CodeStringMapper("0:%s:get" % write(source))
    assert MODULE_NAME not in sys.modules


def test_a_missing_file_is_a_startup_error(tmp_path):
    with pytest.raises(CodeStringError, match="unable to open"):
        CodeStringMapper("0:%s:get" % (tmp_path / "nope.py"))
