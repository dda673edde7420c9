"""The cache (uWSGI semantics, shared across fork), its mapper, the ``uwsgi`` module
for scripts, and the start-up scripts (``--file``, ``--wsgi-file``, ``--module``)."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import signal
import sys
import textwrap

import pytest

import support
from uwsgi_fastrouter import cache as cache_module
from uwsgi_fastrouter import uwsgi_shim
from uwsgi_fastrouter.cache import Cache, CacheMapper, CacheRegistry, parse_cache2
from uwsgi_fastrouter.scripts import ScriptError, file_module_name, run_startup_scripts


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class LogLines(list):
    def __call__(self, line: str) -> None:
        self.append(line)


@pytest.fixture
def logs():
    return LogLines()


@pytest.fixture
def make_cache(logs):
    made = []

    def make(items=10, blocksize=64, keysize=16, clock=None, name="test"):
        cache = Cache(name, items, blocksize, keysize, clock=clock or Clock(), log=logs)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()


@pytest.fixture
def shim():
    """Uninstall the ``uwsgi`` module after the test, whoever installed it."""
    yield
    uwsgi_shim.uninstall()
    sys.modules.pop("uwsgi", None)


# ---------------------------------------------------------------------------
# Cache semantics


def test_set_refuses_an_existing_key_update_overwrites(make_cache):
    cache = make_cache()
    assert cache.set("example.com", "127.0.0.1:4040")
    assert not cache.set("example.com", "other")
    assert cache.get(b"example.com") == b"127.0.0.1:4040"
    assert cache.update("example.com", b"10.0.0.1:1")
    assert cache.get("example.com") == b"10.0.0.1:1"
    assert cache.update("new", "v") and cache.get("new") == b"v"


def test_str_bytes_bytearray_and_memoryview_are_the_same_key(make_cache):
    cache = make_cache()
    assert cache.set("k\u00e9", "v\u00e9")
    assert cache.get("k\u00e9".encode("utf-8")) == "v\u00e9".encode("utf-8")
    assert cache.exists(bytearray("k\u00e9".encode("utf-8")))
    assert cache.delete(memoryview("k\u00e9".encode("utf-8")))
    assert not cache.exists("k\u00e9")


def test_other_types_are_a_type_error(make_cache):
    cache = make_cache()
    with pytest.raises(TypeError):
        cache.set("k", 5)
    with pytest.raises(TypeError):
        cache.get(5)


@pytest.mark.parametrize("key, value", [
    ("", "v"),                 # empty key
    ("k" * 17, "v"),           # key longer than keysize 16
    ("k", ""),                 # empty value
    ("k", "v" * 65),           # value larger than blocksize 64
])
def test_refused_items(make_cache, key, value):
    cache = make_cache()
    assert not cache.set(key, value)
    assert not cache.update(key, value)
    assert cache.keys() == []


def test_limits_are_inclusive(make_cache):
    cache = make_cache()
    assert cache.set("k" * 16, "v" * 64)
    assert cache.get("k" * 16) == b"v" * 64


def test_a_cache_of_n_items_holds_n_minus_1_and_logs_when_full(make_cache, logs):
    # uWSGI reserves item 0: --cache 3 stores two keys.
    cache = make_cache(items=3)
    assert cache.set("a", "1") and cache.set("b", "2")
    assert not cache.set("c", "3")
    assert not cache.update("c", "3")
    assert logs.count('*** DANGER cache "test" is FULL !!! ***') == 2
    assert cache.keys() == [b"a", b"b"]
    assert cache.update("a", "11")          # overwriting needs no new item
    assert cache.delete("b")
    assert cache.set("c", "3")              # the freed item is reused
    assert sorted(cache.keys()) == [b"a", b"c"]
    assert len(cache) == 2


def test_a_cache_of_one_item_holds_nothing(make_cache):
    cache = make_cache(items=1)
    assert not cache.set("a", "1")


def test_delete_exists_clear(make_cache):
    cache = make_cache()
    assert not cache.delete("nope")
    cache.set("a", "1")
    cache.set("b", "2")
    assert cache.exists("a") and not cache.exists("c")
    cache.clear()
    assert cache.keys() == [] and len(cache) == 0 and cache.get("a") is None
    assert cache.set("a", "again") and cache.get("a") == b"again"


def test_keys_in_insertion_order(make_cache):
    cache = make_cache(items=20)
    names = [("key%d" % i).encode() for i in range(15)]
    for name in names:
        cache.set(name, "v")
    assert cache.keys() == names


def test_expiry_is_lazy_and_exact(make_cache):
    clock = Clock()
    cache = make_cache(clock=clock)
    assert cache.set("short", "v", 10)
    assert cache.set("forever", "v")
    clock.now += 9.9
    assert cache.get("short") == b"v"
    clock.now += 0.1
    assert cache.get("short") is None
    assert not cache.exists("short")
    assert cache.keys() == [b"forever"]
    assert cache.set("short", "again")          # an expired key can be set again
    assert cache.get("short") == b"again"
    clock.now += 10 ** 6
    assert cache.get("short") == b"again"       # expires 0 = never


def test_expired_items_free_their_place(make_cache):
    clock = Clock()
    cache = make_cache(items=3, clock=clock)
    cache.set("a", "1", 5)
    cache.set("b", "2", 5)
    clock.now += 5
    assert cache.keys() == []
    assert len(cache) == 0
    assert cache.set("c", "3") and cache.set("d", "4")


def test_update_sets_expiry_and_keeps_the_hit_counter(make_cache):
    clock = Clock()
    cache = make_cache(clock=clock)
    cache.set("k", "a")
    cache.get("k")
    cache.get("k")
    assert cache.update("k", "b", 3)
    assert cache.hits("k") == 2
    clock.now += 3
    assert cache.get("k") is None


def test_negative_expiry_is_refused(make_cache):
    cache = make_cache()
    assert not cache.set("k", "v", -1)


@pytest.mark.parametrize("seed", range(4))
def test_random_operations_match_a_dict(make_cache, seed, monkeypatch):
    # A weak hash makes every probe collide, so deletions must shift entries back.
    if seed % 2:
        monkeypatch.setattr(cache_module.zlib, "crc32", lambda data: len(data) % 3)
    rng = random.Random(seed)
    cache = make_cache(items=41, blocksize=8, keysize=8)
    model = {}
    for _ in range(3000):
        key = ("k%d" % rng.randrange(60)).encode()
        value = ("v%d" % rng.randrange(1000)).encode()
        op = rng.random()
        if op < 0.4:
            expected = key not in model and len(model) < 40
            assert cache.set(key, value) == expected
            if expected:
                model[key] = value
        elif op < 0.55:
            expected = key in model or len(model) < 40
            assert cache.update(key, value) == expected
            if expected:
                model[key] = value
        elif op < 0.8:
            assert cache.delete(key) == (key in model)
            model.pop(key, None)
        else:
            assert cache.get(key) == model.get(key)
    assert sorted(cache.keys()) == sorted(model)
    assert len(cache) == len(model)
    for key, value in model.items():
        assert cache.get(key) == value


def test_the_default_size_stays_small():
    cache = Cache("default", 100)
    try:
        assert cache.size < 7 * 1024 * 1024
    finally:
        cache.close()


# ---------------------------------------------------------------------------
# Routing lookups and the mapper


def test_rotation_by_hit_counter(make_cache):
    cache = make_cache()
    cache.set("k", "A|B|C,7")
    assert [cache.lookup_for_route(b"k") for _ in range(4)] == [b"A", b"B", b"C,7", b"A"]
    cache.get("k")                      # a script's cache_get counts as well
    assert cache.lookup_for_route(b"k") == b"C,7"
    assert cache.lookup_for_route(b"missing") is None


def test_cache_mapper_routes(make_cache):
    registry = CacheRegistry(log=LogLines())
    cache = registry.add_cache("default", 10)
    cache.set("example.com:8000", "127.0.0.1:4040")
    cache.set("unbit.it", "127.0.0.1:4040,5")
    cache.set("rr", "/tmp/a.sock|/tmp/b.sock,3")
    cache.set("junk", "127.0.0.1:1,7x")
    cache.set("empty", ",5")
    mapper = CacheMapper(registry)
    try:
        route = mapper(b"example.com:8000")
        assert (route.address, route.modifier1, route.modifier2) == (b"127.0.0.1:4040", 0, 0)
        route = mapper(b"unbit.it")
        assert (route.address, route.modifier1) == (b"127.0.0.1:4040", 5)
        first, second = mapper(b"rr"), mapper(b"rr")
        assert (first.address, first.modifier1) == (b"/tmp/a.sock", 0)
        assert (second.address, second.modifier1) == (b"/tmp/b.sock", 3)
        assert mapper(b"junk").modifier1 == 7          # atoi, as uWSGI
        assert mapper(b"empty") is None
        assert mapper(b"unknown") is None
    finally:
        registry.close()


def test_cache_mapper_needs_a_cache():
    registry = CacheRegistry(log=LogLines())
    with pytest.raises(ValueError, match=r"you need to create a uwsgi cache.*add --cache"):
        CacheMapper(registry)
    registry.add_cache("default", 2)
    try:
        with pytest.raises(ValueError, match='unable to find cache "other"'):
            CacheMapper(registry, "other")
        assert CacheMapper(registry, "default").cache is registry.default
    finally:
        registry.close()


# ---------------------------------------------------------------------------
# --cache / --cache2


def test_parse_cache2():
    assert parse_cache2("name=x,items=3") == {
        "name": "x", "items": 3, "blocksize": 65536, "keysize": 2048}
    assert parse_cache2("name=x,max_items=4,blocksize=100,keysize=10")["items"] == 4
    assert parse_cache2("maxitems=5,name=x")["items"] == 5
    assert parse_cache2(r"name=a\,b,items=3")["name"] == "a,b"
    assert parse_cache2(r"name=a\\,items=3")["name"] == "a\\"
    assert parse_cache2("name=x,items=3,name=y")["name"] == "y"           # last wins
    assert parse_cache2("name=x,items=3,purge_lru=1,blah")["items"] == 3  # ignored
    assert parse_cache2("name=x,items=3,blocksize=0")["blocksize"] == 65536


@pytest.mark.parametrize("value, why", [
    ("items=5", "specify a cache name"),
    ("name=x", "maximum number of cache items"),
    ("name=x,items=0", "maximum number of cache items"),
    ("name=x,items=abc", "maximum number of cache items"),
    ("name=x,items=-1", "must not be negative"),
    ("name=x,items=3,keysize=-2", "keysize"),
])
def test_parse_cache2_errors_name_the_value(value, why):
    with pytest.raises(ValueError) as info:
        parse_cache2(value)
    assert value in str(info.value) and why in str(info.value)


def test_registry_from_options(logs):
    registry = CacheRegistry.from_options(5, 0, ["name=one,items=3,blocksize=128",
                                                 "name=two,items=2", "name=one,items=9"], log=logs)
    try:
        assert [c.name for c in registry] == ["default", "one", "two", "one"]
        assert registry.default.name == "default" and registry.default.blocksize == 65536
        assert registry.get(None) is registry.default and registry.get("") is registry.default
        assert registry.get("one").items == 3 and registry.get("one").blocksize == 128
        assert registry.get("nope") is None
        assert logs[0].startswith('*** Cache "default" initialized: ')
        assert len(logs) == 4
    finally:
        registry.close()
    second = CacheRegistry.from_options(0, 0, ["name=first,items=2"], log=logs)
    try:
        assert second.default.name == "first"
    finally:
        second.close()
    assert CacheRegistry.from_options(0, 0, [], log=logs).default is None


# ---------------------------------------------------------------------------
# Shared between processes


def _fork(child) -> int:
    """Run *child()* in a forked process; its exit status is 0 when it returns True."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if child() else 3
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    return pid


def _wait(pid: int, timeout: float = 20.0) -> int:
    result = {}

    def done():
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            result["status"] = status
        return got

    try:
        support.wait_until(done, timeout=timeout, what="child %d to exit" % pid)
    except AssertionError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    return os.waitstatus_to_exitcode(result["status"])


# Forking a process with threads is deprecated from Python 3.12 on; these children
# only touch the cache and leave with os._exit.
fork_test = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@fork_test
def test_a_child_sets_a_key_the_parent_sees_it(make_cache):
    cache = make_cache()
    cache.set("before", "fork")
    pid = _fork(lambda: cache.get("before") == b"fork"
                and cache.set("example.com", "10.0.0.1:3031"))
    assert _wait(pid) == 0
    assert cache.get("example.com") == b"10.0.0.1:3031"
    assert cache.keys() == [b"before", b"example.com"]


@fork_test
def test_rotation_is_shared_between_processes(make_cache):
    cache = make_cache()
    cache.set("k", "A|B|C")
    assert cache.lookup_for_route(b"k") == b"A"
    pid = _fork(lambda: cache.lookup_for_route(b"k") == b"B")
    assert _wait(pid) == 0
    assert cache.lookup_for_route(b"k") == b"C"


@fork_test
def test_concurrent_writers_keep_the_table_consistent(make_cache):
    cache = make_cache(items=801, blocksize=16, keysize=16)

    def writer(n):
        def run():
            for i in range(200):
                if not cache.set("w%d-%d" % (n, i), "v%d" % i):
                    return False
            for i in range(0, 200, 2):
                if not cache.delete("w%d-%d" % (n, i)):
                    return False
            return True
        return run

    pids = [_fork(writer(n)) for n in range(4)]
    for i in range(300):                     # the parent reads meanwhile
        cache.get("w0-%d" % (i % 200))
    assert [_wait(pid, 60) for pid in pids] == [0, 0, 0, 0]
    expected = sorted(("w%d-%d" % (n, i)).encode() for n in range(4) for i in range(1, 200, 2))
    assert sorted(cache.keys()) == expected
    assert len(cache) == 400
    for n in range(4):
        assert cache.get("w%d-199" % n) == b"v199"


@fork_test
def test_the_lock_excludes_a_forked_process(make_cache):
    # flock on an inherited descriptor would let the child in; the record lock must not.
    cache = make_cache()
    lock = cache._lock

    def child():
        try:
            fcntl.lockf(lock._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        except OSError as exc:
            return exc.errno in (errno.EACCES, errno.EAGAIN)
        return False

    with lock:
        pid = _fork(child)
        assert _wait(pid) == 0
    # Released: now the child gets it (and the cache works in the child).
    pid = _fork(lambda: cache.set("x", "y"))
    assert _wait(pid) == 0
    assert cache.get("x") == b"y"


# ---------------------------------------------------------------------------
# The uwsgi module


@pytest.fixture
def registry(logs):
    registry = CacheRegistry.from_options(3, 0, ["name=other,items=5"], log=logs)
    yield registry
    registry.close()


def test_the_shim_functions(registry, shim):
    uwsgi_shim.install(registry, {})
    import uwsgi
    assert uwsgi.cache_set("a", "1") is True
    assert uwsgi.cache_set("a", "2") is None
    assert uwsgi.cache_set("e", "") is None
    assert uwsgi.cache_set("b", b"x") is True
    assert uwsgi.cache_set("c", b"x") is None                # full: 3 items hold 2
    assert uwsgi.cache_keys() == [b"a", b"b"]
    assert uwsgi.cache_get("a") == b"1" and uwsgi.cache_get(b"a") == b"1"
    assert uwsgi.cache_update("a", "3") is True and uwsgi.cache_get("a") == b"3"
    assert uwsgi.cache_del("zz") is None and uwsgi.cache_del("a") is True
    assert uwsgi.cache_exists("a") is None and uwsgi.cache_exists("b") is True
    assert uwsgi.cache_clear() is True and uwsgi.cache_keys() == []
    assert uwsgi.cache_set("n", "v", 0, "other") is True
    assert uwsgi.cache_get("n", "other") == b"v" and uwsgi.cache_get("n") is None
    assert uwsgi.cache_get("n", "nonexist") is None
    assert uwsgi.cache_set("n", "v", 0, "nonexist") is None
    assert uwsgi.cache_clear("nonexist") is None
    with pytest.raises(ValueError, match="no local uWSGI cache available"):
        uwsgi.cache_keys("nonexist")
    with pytest.raises(TypeError):
        uwsgi.cache_set("x", 5)
    with pytest.raises(TypeError):
        uwsgi.cache_set(key="q", value="v")                  # positional only, as uWSGI
    assert uwsgi.version == b"2.0.31" and uwsgi.numproc == 0 and uwsgi.worker_id() == 0
    with pytest.raises(AttributeError):
        uwsgi.cache_inc                                      # noqa: B018 - not offered


def test_the_shim_without_caches(shim):
    uwsgi_shim.install(None, None)
    import uwsgi
    assert uwsgi.cache_set("a", "b") is None and uwsgi.cache_get("a") is None
    assert uwsgi.opt == {}


def test_opt():
    opt = uwsgi_shim.build_opt([("cache", "3"), ("master", True), ("fastrouter-to", "a"),
                                ("fastrouter-to", "b"), ("foo", "bar"), ("cheap", False),
                                ("listen", 100), ("empty", [])])
    assert opt == {"cache": b"3", "master": True, "fastrouter-to": [b"a", b"b"], "foo": b"bar",
                   "listen": b"100"}
    single = uwsgi_shim.build_opt({"fastrouter": ["127.0.0.1:3017"]})
    assert single == {"fastrouter": b"127.0.0.1:3017"}


def test_opt_from_a_parsed_configuration():
    from uwsgi_fastrouter.options import load_config
    cfg = load_config(["--fastrouter", ":3017", "--fastrouter", "/tmp/s.sock", "--master",
                       "--fastrouter-timeout", "30", "--set", "foo=bar"], {})
    opt = uwsgi_shim.options_from_config(cfg)
    assert opt["fastrouter"] == [b":3017", b"/tmp/s.sock"]
    assert opt["master"] is True
    assert opt["fastrouter-timeout"] == b"30"
    assert opt["foo"] == b"bar"
    assert "fastrouter-to" not in opt


# ---------------------------------------------------------------------------
# Start-up scripts


SEED_FILL = textwrap.dedent("""\
    import uwsgi
    # Requests for example.com on port 8000 will go to 127.0.0.1:4040
    uwsgi.cache_set("example.com:8000", "127.0.0.1:4040")
    # Requests for unbit.it will go to 127.0.0.1:4040 with the modifier1 set to 5 (perl/PSGI)
    uwsgi.cache_set("unbit.it", "127.0.0.1:4040,5")
""")


def test_the_fill_script_of_the_documentation(tmp_path, registry, logs, shim):
    script = tmp_path / "foobar.py"
    script.write_text(SEED_FILL)
    run_startup_scripts([str(script)], [], [], registry=registry, options={"cache": "3"}, log=logs)
    mapper = CacheMapper(registry)
    route = mapper(b"unbit.it")
    assert (route.address, route.modifier1) == (b"127.0.0.1:4040", 5)
    assert mapper(b"example.com:8000").address == b"127.0.0.1:4040"
    assert 'unable to find "application" callable in file %s' % script in logs
    assert sys.modules[file_module_name(str(script))].__file__ == str(script)


def test_file_module_names_follow_uwsgi():
    assert file_module_name("sub.dir/my-probe.py") == "uwsgi_file_sub_dir_my-probe"
    assert file_module_name("/srv/app.wsgi") == "uwsgi_file__srv_app_wsgi"


def test_an_application_callable_is_not_reported(tmp_path, registry, logs, shim):
    script = tmp_path / "app.wsgi"
    script.write_text("import uwsgi\nuwsgi.cache_set('k', uwsgi.opt['cache'])\n"
                      "def application(environ, start_response):\n    return []\n")
    run_startup_scripts(None, str(script), None, registry=registry, options={"cache": "3"},
                        log=logs)
    assert logs.count('unable to find "application" callable in file %s' % script) == 0
    assert registry.default.get("k") == b"3"


def test_a_raising_script_is_a_startup_error(tmp_path, registry, logs, shim):
    script = tmp_path / "bad.py"
    script.write_text("x = 1\nraise RuntimeError('boom')\n")
    with pytest.raises(ScriptError) as info:
        run_startup_scripts([str(script)], [], [], registry=registry, options={}, log=logs)
    text = str(info.value)
    assert "Traceback" in text and "RuntimeError: boom" in text
    assert 'File "%s", line 2' % script in text
    assert "scripts.py" not in text                  # our own frames are left out


@pytest.mark.parametrize("source, expected", [
    ("def broken(:\n", "SyntaxError"),
    ("import sys\nsys.exit(3)\n", "SystemExit"),
    ("open('/nonexistent/file')\n", "FileNotFoundError: .*nonexistent"),  # the script's own OSError
])
def test_other_script_failures(tmp_path, registry, logs, shim, source, expected):
    script = tmp_path / "bad.py"
    script.write_text(source)
    with pytest.raises(ScriptError, match=expected):
        run_startup_scripts([str(script)], [], [], registry=registry, options={}, log=logs)


def test_a_missing_file_is_a_startup_error(tmp_path, registry, logs, shim):
    with pytest.raises(ScriptError, match="No such file"):
        run_startup_scripts([str(tmp_path / "nope.py")], [], [], registry=registry, options={},
                            log=logs)


def test_modules_run_before_files(tmp_path, registry, logs, shim, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "fill_mod_a.py").write_text(
        "import uwsgi\nuwsgi.cache_set('order', 'module', 0, 'other')\n"
        "def app(e, s):\n    return []\n")
    script = tmp_path / "fill_file.py"
    script.write_text("import uwsgi\nuwsgi.cache_update('order', "
                      "uwsgi.cache_get('order', 'other') + b',file', 0, 'other')\n")
    try:
        run_startup_scripts([str(script)], [], ["fill_mod_a:app"], registry=registry, options={},
                            log=logs)
        assert registry.get("other").get("order") == b"module,file"
        assert not any("fill_mod_a" in line for line in logs)      # app exists
    finally:
        sys.modules.pop("fill_mod_a", None)


def test_a_module_without_application_and_a_failing_module(tmp_path, registry, logs, shim,
                                                          monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "fill_mod_b.py").write_text("X = 1\n")
    (tmp_path / "fill_mod_c.py").write_text("1 / 0\n")
    try:
        run_startup_scripts([], [], ["fill_mod_b"], registry=registry, options={}, log=logs)
        assert 'unable to find "application" callable in module fill_mod_b' in logs
        with pytest.raises(ScriptError, match="ZeroDivisionError"):
            run_startup_scripts([], [], ["fill_mod_c"], registry=registry, options={}, log=logs)
        with pytest.raises(ScriptError, match="fill_mod_missing"):
            run_startup_scripts([], [], ["fill_mod_missing"], registry=registry, options={},
                                log=logs)
    finally:
        sys.modules.pop("fill_mod_b", None)


def test_the_current_directory_is_importable(tmp_path, registry, logs, shim, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in (".", "", os.getcwd())])
    (tmp_path / "fill_mod_cwd.py").write_text("import uwsgi\nuwsgi.cache_set('cwd', 'yes')\n")
    try:
        run_startup_scripts([], [], ["fill_mod_cwd"], registry=registry, options={}, log=logs)
        assert registry.default.get("cwd") == b"yes"
        assert sys.path[0] == os.getcwd()
    finally:
        sys.modules.pop("fill_mod_cwd", None)


PARITY_PROBE = textwrap.dedent("""\
    import os
    import uwsgi
    results = []
    def note(what, value):
        results.append("%s=%r" % (what, value))
    note("set", uwsgi.cache_set("a", "1"))
    note("set again", uwsgi.cache_set("a", "2"))
    note("set empty", uwsgi.cache_set("e", ""))
    note("set b", uwsgi.cache_set("b", b"x"))
    note("set full", uwsgi.cache_set("c", b"x"))
    note("keys", uwsgi.cache_keys())
    note("get", (uwsgi.cache_get("a"), uwsgi.cache_get(b"a"), uwsgi.cache_get("zz")))
    note("update", uwsgi.cache_update("a", "3"))
    note("get updated", uwsgi.cache_get("a"))
    note("del", (uwsgi.cache_del("zz"), uwsgi.cache_del("a")))
    note("exists", (uwsgi.cache_exists("a"), uwsgi.cache_exists("b")))
    note("too big", uwsgi.cache_set("big", "x" * 5000))
    note("key too long", uwsgi.cache_set("k" * 3000, "x"))
    note("clear", uwsgi.cache_clear())
    note("keys after clear", uwsgi.cache_keys())
    note("named", (uwsgi.cache_set("n", "v", 0, "other"), uwsgi.cache_get("n", "other"),
                   uwsgi.cache_get("n")))
    note("no such cache", (uwsgi.cache_get("n", "nonexist"),
                           uwsgi.cache_set("n", "v", 0, "nonexist")))
    try:
        uwsgi.cache_keys("nonexist")
    except ValueError as exc:
        note("keys of no cache", str(exc))
    try:
        uwsgi.cache_set(key="q", value="v")
    except TypeError:
        note("keywords", "TypeError")
    note("version", uwsgi.version)
    note("opt cache", uwsgi.opt.get("cache"))
    with open("results.txt", "w") as out:
        out.write("\\n".join(results) + "\\n")
    if hasattr(uwsgi, "masterpid"):      # the real uWSGI: leave before it starts serving
        os._exit(0)
""")


@pytest.mark.interop
def test_the_shim_answers_like_uwsgi(tmp_path, registry, logs, shim, monkeypatch):
    real_dir = tmp_path / "real"
    ours_dir = tmp_path / "ours"
    for directory in (real_dir, ours_dir):
        directory.mkdir()
        (directory / "probe.py").write_text(PARITY_PROBE)
    proc = support.Proc([support.uwsgi_bin(), "--master", "--fastrouter", "127.0.0.1:0",
                         "--cache", "3", "--cache-blocksize", "4096",
                         "--cache2", "name=other,items=5", "--file", "probe.py"], cwd=real_dir)
    support.wait_until(lambda: not proc.alive(), timeout=30, what="uWSGI to run the probe")
    assert proc.stop() == 0, proc.log()
    monkeypatch.chdir(ours_dir)
    ours = CacheRegistry.from_options(3, 4096, ["name=other,items=5"], log=logs)
    try:
        run_startup_scripts(["probe.py"], [], [], registry=ours, options={"cache": "3"}, log=logs)
    finally:
        ours.close()
    expected = (real_dir / "results.txt").read_text().splitlines()
    assert (ours_dir / "results.txt").read_text().splitlines() == expected
    assert len(expected) == 21
