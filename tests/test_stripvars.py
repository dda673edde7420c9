"""--fastrouter-strip-vars and --fastrouter-strip-magic-vars: the rules, the head
rewrite, and the session that sends the rewritten head (in-process engine)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from backends import recv_exact, uwsgi_packet
from test_engine import GET, engines, log_lines, read_packet, tcp_listener  # noqa: F401 (fixtures)

from uwsgi_fastrouter import options
from uwsgi_fastrouter.protocol import encode_packet, parse_vars
from uwsgi_fastrouter.router import Router
from uwsgi_fastrouter.session import RELAY
from uwsgi_fastrouter.stripvars import (MAGIC_VARS, StripRuleError, VarStripper, make_stripper,
                                        parse_rules)
from uwsgi_fastrouter.validation import validate

MAGIC = make_stripper([], magic=True)


def packet(pairs, modifier1=0, modifier2=0) -> bytes:
    return encode_packet([(k.encode(), v.encode()) for k, v in pairs], modifier1, modifier2)


# --------------------------------------------------------------------------- rules


def test_a_trailing_star_is_a_prefix_and_anything_else_a_name():
    names, prefixes = parse_rules(["HTTP_X_SECRET", "X_*", "  Y  "])
    assert names == {b"HTTP_X_SECRET", b"Y"} and prefixes == (b"X_",)


def test_a_name_a_prefix_covers_is_not_kept_twice():
    names, prefixes = parse_rules(["UWSGI_*"], magic=True)
    assert names == frozenset() and prefixes == (b"UWSGI_",)


@pytest.mark.parametrize("rule", ["", "*", "   ", "A*B", "A**"])
def test_unusable_rules_are_refused(rule):
    with pytest.raises(StripRuleError):
        parse_rules([rule])


@pytest.mark.parametrize("rule", ["*", "A*B", ""])
def test_an_unusable_rule_stops_the_start(rule):
    cfg = options.load_config(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", "127.0.0.1:1",
                               "--fastrouter-strip-vars", rule], {})
    with pytest.raises(options.StartupError, match="fastrouter-strip-vars"):
        validate(cfg)


def test_nothing_asked_means_no_stripper():
    assert make_stripper([], magic=False) is None


def test_the_magic_list_is_uwsgi_2_0s_and_keeps_the_router_key():
    assert set(MAGIC_VARS) == {
        "UWSGI_SCRIPT", "UWSGI_MODULE", "UWSGI_CALLABLE", "UWSGI_FILE", "UWSGI_APPID",
        "UWSGI_PYHOME", "UWSGI_HOME", "UWSGI_CHDIR", "UWSGI_SETENV", "UWSGI_TOUCH_RELOAD",
        "UWSGI_POSTFILE", "UWSGI_CACHE_GET", "UWSGI_SCHEME"}
    assert not MAGIC.matches(b"UWSGI_FASTROUTER_KEY")
    assert MAGIC.needles == (b"UWSGI_",)


# --------------------------------------------------------------------------- the rewrite


def test_every_occurrence_goes_and_the_datasize_and_modifiers_follow():
    head = packet([("HTTP_HOST", "h"), ("UWSGI_FILE", "/tmp/evil.py"), ("PATH_INFO", "/"),
                   ("UWSGI_APPID", "x"), ("UWSGI_FILE", "again"), ("UWSGI_FASTROUTER_KEY", "k")],
                  modifier1=5, modifier2=7)
    out = MAGIC.strip(head)
    assert bytes(out) == packet([("HTTP_HOST", "h"), ("PATH_INFO", "/"),
                                 ("UWSGI_FASTROUTER_KEY", "k")], 5, 7)


def test_a_head_without_a_match_is_not_copied():
    assert MAGIC.strip(packet([("HTTP_HOST", "h"), ("PATH_INFO", "/")])) is None
    # The needle in a value (or in a longer name) only costs the walk.
    assert MAGIC.strip(packet([("QUERY_STRING", "UWSGI_FILE=x"), ("UWSGI_FILES", "")])) is None


def test_names_are_case_sensitive_and_prefixes_match_the_start_only():
    stripper = make_stripper(["HTTP_X_*", "Secret"], magic=False)
    head = packet([("HTTP_X_A", "1"), ("secret", "2"), ("Secret", "3"), ("XHTTP_X_", "4"),
                   ("HTTP_X_", "5")])
    assert parse_vars(bytes(stripper.strip(head))[4:]) == [(b"secret", b"2"), (b"XHTTP_X_", b"4")]


def test_stripping_every_var_leaves_an_empty_block():
    stripper = make_stripper(["A*"], magic=False)
    assert bytes(stripper.strip(packet([("A", "1"), ("AB", "")], 1, 2))) == bytes([1, 0, 0, 2])


_names = st.sampled_from([b"UWSGI_FILE", b"UWSGI_APPID", b"HTTP_HOST", b"X_A", b"X_", b"Y",
                          b"UWSGI_FASTROUTER_KEY", b"PATH_INFO"])
_values = st.binary(max_size=20) | st.sampled_from([b"UWSGI_", b"X_A"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_names, _values), max_size=12),
       st.lists(st.sampled_from(["UWSGI_FILE", "X_*", "Y", "HTTP_*"]), max_size=3), st.booleans())
def test_the_rewrite_is_the_packet_of_the_kept_vars(pairs, rules, magic):
    if not rules and not magic:
        return
    stripper = make_stripper(rules, magic)
    head = encode_packet(pairs, 3, 4)
    kept = [(k, v) for k, v in pairs if not stripper.matches(k)]
    out = stripper.strip(head)
    if out is None:
        assert kept == pairs
    else:
        assert kept != pairs and bytes(out) == encode_packet(kept, 3, 4)


# --------------------------------------------------------------------------- in the session


def test_the_node_gets_the_stripped_head_with_the_early_body(engines):
    node, address = tcp_listener()
    with node:
        engine = engines(Router(to=[address]), strip_vars=MAGIC)
        vars_ = GET[:2] + [(b"CONTENT_LENGTH", b"5"), (b"UWSGI_FILE", b"/tmp/evil.py"),
                           (b"UWSGI_APPID", b"evil")]
        client, session = engine.client(uwsgi_packet(vars_, modifier1=9) + b"hello")
        engine.until(lambda: session.state == RELAY, "relaying")
        conn, _ = node.accept()
        with conn:
            got = read_packet(conn)
            assert got == uwsgi_packet(GET[:2] + [(b"CONTENT_LENGTH", b"5")])  # modifiers: route's
            assert recv_exact(conn, 5) == b"hello"


def test_a_head_that_arrives_in_pieces_is_stripped_too(engines):
    node, address = tcp_listener()
    with node:
        engine = engines(Router(to=[address]), strip_vars=make_stripper(["X_*"], magic=False))
        whole = uwsgi_packet(GET + [(b"X_TOKEN", b"secret")])
        client, session = engine.client(whole[:3])
        client.sendall(whole[3:])
        engine.until(lambda: session.state == RELAY, "relaying")
        conn, _ = node.accept()
        with conn:
            assert read_packet(conn) == uwsgi_packet(GET)


@pytest.mark.parametrize("limit", [64, 4], ids=["in-memory", "temp-file"])
def test_a_post_buffered_request_is_stripped(engines, tmp_path, limit):
    node, address = tcp_listener()
    with node:
        engine = engines(Router(to=[address]), strip_vars=MAGIC, post_buffering=limit,
                         post_buffering_dir=str(tmp_path))
        head = uwsgi_packet([(b"HTTP_HOST", b"h"), (b"UWSGI_SETENV", b"A=1"),
                             (b"CONTENT_LENGTH", b"10")])
        client, session = engine.client(head + b"abc")
        client.sendall(b"defghij")
        engine.until(lambda: session.state == RELAY and session.body is None, "the body sent")
        conn, _ = node.accept()
        with conn:
            assert read_packet(conn) == uwsgi_packet([(b"HTTP_HOST", b"h"), (b"CONTENT_LENGTH", b"10")])
            assert recv_exact(conn, 10) == b"abcdefghij"


def test_the_key_is_read_before_stripping(engines):
    node, address = tcp_listener()
    with node:
        router = Router(use_pattern="127.0.0.1:%s")
        engine = engines(router, strip_vars=make_stripper(["UWSGI_FASTROUTER_KEY"], magic=False))
        port = address.rsplit(":", 1)[1]
        client, session = engine.client(uwsgi_packet([(b"UWSGI_FASTROUTER_KEY", port.encode()),
                                                      (b"PATH_INFO", b"/")]))
        engine.until(lambda: session.state == RELAY, "relaying")
        conn, _ = node.accept()
        with conn:
            assert read_packet(conn) == uwsgi_packet([(b"PATH_INFO", b"/")])
