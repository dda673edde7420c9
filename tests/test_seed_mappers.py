"""The seed's "Way 3" (cache) and "Way 5" (code string) end to end through the router."""

from __future__ import annotations

import pytest

from backends import RecordingBackend, request
from support import start_router


def key_request(key: bytes):
    return [(b"HTTP_HOST", key), (b"PATH_INFO", b"/")]


def test_way3_cache_filled_by_a_script(tmp_path):
    with RecordingBackend("c1") as c1, RecordingBackend("c2") as c2:
        script = tmp_path / "foobar.py"
        script.write_text(
            "import uwsgi\n"
            "# Requests for example.com on port 8000 go to the first node\n"
            "uwsgi.cache_set('example.com:8000', '%s')\n"
            "# unbit.it goes to the second node with modifier1 5\n"
            "uwsgi.cache_set('unbit.it', '%s,5')\n"
            "uwsgi.cache_set('rr.example', '%s|%s')\n" % (c1.address, c2.address, c1.address, c2.address))
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-use-cache", "--cache", "100",
                               "--file", str(script)])
        addr = router.addresses[0]
        assert b"node=c1" in request(addr, key_request(b"example.com:8000"))
        assert b"node=c2" in request(addr, key_request(b"unbit.it"))
        assert c2.requests[-1].modifier1 == 5
        assert request(addr, key_request(b"example.com")) == b""          # cache miss: closed
        seen = [request(addr, key_request(b"rr.example")).split(b"node=")[1][:2] for _ in range(4)]
        assert seen == [b"c1", b"c2", b"c1", b"c2"]


@pytest.mark.parametrize("mode", [[], ["--master"]], ids=["single", "master"])
def test_use_cache_without_a_cache_is_a_start_up_error(tmp_path, mode):
    from support import Proc, reference_mode, router_argv, wait_until
    proc = Proc(router_argv(["--fastrouter", "127.0.0.1:0", "--fastrouter-use-cache"] + mode))
    wait_until(lambda: not proc.alive(), timeout=20, what="the router to give up")
    assert proc.returncode == 1
    assert "you need to create a uwsgi cache" in proc.log()
    if not reference_mode():
        assert 'option "--fastrouter-use-cache": you need' in proc.log()
        assert "spawned" not in proc.log()      # refused before any router process was forked


def megamapper(a: str, b: str, default: str) -> str:
    """The documentation's megamapper, as written, pointed at the test's nodes."""
    from test_codestring import MEGAMAPPER
    return (MEGAMAPPER.replace("127.0.0.1:3031", a).replace("192.168.0.100:3032", b)
            .replace("127.0.0.1:3035", a).replace("192.168.0.100:3035", b)
            .replace("192.168.0.1:1717", default))


def test_way5_the_seeds_megamapper_works_as_written(tmp_path):
    with RecordingBackend("a") as a, RecordingBackend("b") as b, RecordingBackend("d") as d:
        mapper = tmp_path / "megamapper.py"
        mapper.write_text(megamapper(a.address, b.address, d.address))
        router = start_router(["--fastrouter", "127.0.0.1:0",
                               "--fastrouter-use-code-string", "0:%s:get" % mapper])
        addr = router.addresses[0]
        seen = [request(addr, key_request(b"example.com")).split(b"node=")[1][:1] for _ in range(4)]
        assert seen == [b"a", b"b", b"a", b"b"]
        assert b"node=a" in request(addr, key_request(b"unbit.it"))
        assert a.requests[-1].modifier1 == 5
        assert b"node=d" in request(addr, key_request(b"other.org"))


def test_a_raising_mapper_closes_that_request_and_the_router_survives(tmp_path):
    with RecordingBackend("a") as a:
        mapper = tmp_path / "bad.py"
        mapper.write_text("def get(key):\n    if key == 'boom':\n        raise RuntimeError('no')\n"
                          "    if key == 'junk':\n        return 42\n    return '%s'\n" % a.address)
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-use-code-string", "0:%s:get" % mapper])
        addr = router.addresses[0]
        assert request(addr, key_request(b"boom")) == b""
        assert request(addr, key_request(b"junk")) == b""
        assert b"node=a" in request(addr, key_request(b"fine"))
        router.wait_for_log("RuntimeError")
