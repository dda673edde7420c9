"""The routing policy without sockets: static round robin, grace marks, fallbacks."""

import pytest

from uwsgi_fastrouter.router import BaseMapper, PatternMapper, Router, key_is_file_name


class Clock:
    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def names(router, key=b"k", n=6):
    out = []
    for _ in range(n):
        route = router.route(key)
        out.append(route.address.decode() if route else None)
    return out


def test_static_round_robin_ignores_the_key():
    router = Router(to=["a:1", "b:2", "c:3"], wall_clock=Clock())
    assert [router.route(k).address for k in (b"x", b"y", b"z", b"x")] == [b"a:1", b"b:2", b"c:3", b"a:1"]


def test_dead_node_is_skipped_for_the_grace_time_then_revived_when_the_cursor_lands_on_it():
    clock = Clock()
    router = Router(to=["A", "D", "B"], gracetime=30, wall_clock=clock)
    assert router.route(b"k").address == b"A"
    dead = router.route(b"k")
    assert dead.address == b"D"
    router.connect_failed(dead, b"k", 0, "Connection refused")
    assert dead.node.dead_since == clock.now
    assert names(router, n=4) == ["B", "A", "B", "A"]
    clock.now += 30
    # the cursor is on D now: its grace is over, so it is revived and tried again
    assert names(router, n=3) == ["D", "B", "A"]
    assert dead.node.dead_since == 0


def test_all_nodes_dead_means_no_route():
    clock = Clock()
    router = Router(to=["A", "B"], wall_clock=clock)
    for _ in range(2):
        route = router.route(b"k")
        router.connect_failed(route, b"k", 0, "refused")
    assert router.route(b"k") is None
    assert router.route(b"k") is None


def test_pattern_mapper_rules():
    mapper = PatternMapper("/tmp/sockets/%s/uwsgi.sock")
    assert mapper(b"example.com").address == b"/tmp/sockets/example.com/uwsgi.sock"
    assert PatternMapper("/x/%s-%s-%%-%d-%(y)").__call__(b"k").address == b"/x/k-k-%--%(y)"


def test_base_mapper_concatenates_without_a_slash():
    assert BaseMapper("/tmp/socks")(b"h1").address == b"/tmp/socksh1"
    assert BaseMapper("/tmp/sockets/")(b"example.com").address == b"/tmp/sockets/example.com"


def test_mapper_priority_pattern_over_base_over_static():
    router = Router(to=["n:1"], use_pattern="p/%s", use_base="b/", wall_clock=Clock())
    assert router.route(b"k").address == b"p/k"
    router = Router(to=["n:1"], use_base="b/", wall_clock=Clock())
    assert router.route(b"k").address == b"b/k"
    assert Router(wall_clock=Clock()).route(b"k") is None


def test_fallbacks_are_walked_in_order_and_keep_the_failed_modifiers():
    router = Router(to=["A"], fallback=["F1", "F2"], wall_clock=Clock())
    first = router.route(b"k")
    first.modifier1, first.modifier2 = 5, 6  # as a subscription node would carry them
    nxt, retries, index = router.next_route(b"k", first, 0, 0)
    assert (nxt.address, nxt.modifier1, nxt.modifier2, retries, index) == (b"F1", 5, 6, 1, 1)
    nxt, retries, index = router.next_route(b"k", nxt, retries, index)
    assert (nxt.address, retries, index) == (b"F2", 2, 2)
    assert router.next_route(b"k", nxt, retries, index) == (None, 3, 2)


def test_without_fallbacks_a_retry_asks_the_mapper_again():
    router = Router(to=["A", "B"], wall_clock=Clock())
    first = router.route(b"k")
    router.connect_failed(first, b"k", 0, "refused")
    nxt, retries, _ = router.next_route(b"k", first, 0, 0)
    assert nxt.address == b"B" and retries == 1


def test_fallback_on_no_key_needs_a_fallback_list():
    assert Router(fallback_on_no_key=True, wall_clock=Clock()).fallback_on_no_key is False
    assert Router(fallback=["F"], fallback_on_no_key=True, wall_clock=Clock()).fallback_on_no_key is True


def test_connect_failure_is_logged_unless_quiet(capsys):
    router = Router(to=["127.0.0.1:9"], wall_clock=Clock())
    route = router.route(b"example.com")
    router.connect_failed(route, b"example.com", 0, "Connection refused")
    err = capsys.readouterr().err
    assert '[uwsgi-fastrouter] unable to connect() to node "127.0.0.1:9" (0 retries): Connection refused' in err
    assert "[uwsgi-fastrouter] example.com => marking 127.0.0.1:9 as failed" in err
    quiet = Router(to=["127.0.0.1:9"], quiet=True, wall_clock=Clock())
    route = quiet.route(b"k")
    quiet.connect_failed(route, b"k", 0, "refused")
    err = capsys.readouterr().err
    assert "unable to connect()" not in err and "marking" in err


# ---------------------------------------------------------------- keys as file names (D14)

UNSAFE_KEYS = [b"../outside/secret.sock", b"x/y", b"/etc", b"a\x00b", b".", b"..", b"a\nb",
               b"\x1b[2J", b"del\x7f", b"tab\there", b"\x01"]
SAFE_KEYS = [b"example.com", b"example.com:8000", b"...", b".hidden", b"a..b", b"caf\xc3\xa9",
             b"\xff\x80", b"with space", b"x" * 255]


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_a_key_that_is_not_a_plain_file_name_is_refused(key):
    assert not key_is_file_name(key)


@pytest.mark.parametrize("key", SAFE_KEYS)
def test_plain_file_names_are_accepted(key):
    assert key_is_file_name(key)


def test_every_control_byte_and_del_is_refused_and_nothing_else_alone():
    refused = {b for b in range(256) if not key_is_file_name(b"k" + bytes([b]))}
    assert refused == set(range(0x20)) | {0x2F, 0x7F}


@pytest.mark.parametrize("make", [
    lambda log: PatternMapper("/srv/%s/uwsgi.sock", refusal_log=log),
    lambda log: BaseMapper("/srv/base/", refusal_log=log),
])
def test_path_mappers_give_no_route_for_unsafe_keys_and_log_them_escaped(make):
    lines = []
    mapper = make(lines.append)
    for key in UNSAFE_KEYS:
        assert mapper(key) is None
    assert len(lines) == len(UNSAFE_KEYS)
    assert all("\n" not in line and "\x00" not in line and "\x1b" not in line for line in lines)
    assert 'key "a\\x0ab" is not a plain file name: no route for --fastrouter-' in lines[6]
    assert 'key "../outside/secret.sock"' in lines[0]
    for key in SAFE_KEYS:
        assert mapper(key) is not None
    assert len(lines) == len(UNSAFE_KEYS)


def test_a_pattern_without_the_key_needs_no_check():
    lines = []
    assert PatternMapper("/srv/one.sock", refusal_log=lines.append)(b"../x").address == b"/srv/one.sock"
    assert lines == []


def test_a_forced_key_is_the_operators_and_is_used_as_given():
    router = Router(use_base="/srv/", forced_key=True, wall_clock=Clock())
    assert router.route(b"sub/node.sock").address == b"/srv/sub/node.sock"
    router = Router(use_pattern="/srv/%s.sock", forced_key=True, wall_clock=Clock())
    assert router.route(b"sub/node").address == b"/srv/sub/node.sock"


def test_a_refused_key_goes_to_the_fallbacks_only_with_fallback_on_no_key():
    router = Router(use_base="/srv/", fallback=["F1"], fallback_on_no_key=True, wall_clock=Clock())
    assert router.route(b"..") is None and router.fallback_on_no_key
    assert router.route_unknown_key(b"..")[0].address == b"F1"
    router = Router(use_base="/srv/", fallback=["F1"], wall_clock=Clock())
    assert router.route(b"..") is None and not router.fallback_on_no_key


def test_refusals_go_to_a_rate_limited_log_by_default():
    from uwsgi_fastrouter.log import RateLimitedLog
    for mapper in (BaseMapper("/srv/"), PatternMapper("/srv/%s")):
        assert isinstance(mapper.refusal_log, RateLimitedLog) and mapper.refusal_log.burst == 20
