"""--subscription-allow: which senders may announce."""

from __future__ import annotations

import pytest

from uwsgi_fastrouter.allowlist import AllowListError, SourceAllowList, allow_list


def test_no_rule_is_no_list():
    assert allow_list([]) is None and allow_list(["", "  "]) is None


def test_networks():
    a = SourceAllowList(["10.0.0.0/8", "192.168.1.7", "fd00::/8"])
    assert a.allows(("10.200.3.4", 5000))
    assert a.allows(("192.168.1.7", 1))
    assert not a.allows(("192.168.1.8", 1))
    assert a.allows(("fd12::1", 1, 0, 0))
    assert not a.allows(("fe80::1%lo", 1, 0, 1))
    assert a.allows(("::ffff:10.1.2.3", 1, 0, 0))    # IPv4 on a dual-stack socket
    assert not a.allows(("::ffff:11.1.2.3", 1, 0, 0))
    assert not a.allows(("not-an-address", 1))
    assert not a.allows("/run/x.sock") and not a.allows(None)  # UNIX senders: no network rule


def test_host_bits_are_tolerated_in_a_network():
    assert SourceAllowList(["127.0.0.1/8"]).allows(("127.9.9.9", 1))


def test_unix_paths_exact_and_prefix():
    a = SourceAllowList(["/run/one.sock", "/run/subs/", "/tmp/sub-*"])
    assert a.allows("/run/one.sock")
    assert not a.allows("/run/one.sock2")
    assert a.allows("/run/subs/a.sock") and a.allows("/run/subs/deep/b.sock")
    assert not a.allows("/run/subsX/a.sock")
    assert a.allows("/tmp/sub-1") and not a.allows("/tmp/other")
    assert a.allows(b"/run/subs/c.sock")
    assert not a.allows(("127.0.0.1", 1))           # UDP senders: no path rule


@pytest.mark.parametrize("sneaky", [
    "/run/subs/../../tmp/evil", "/run/subs/./a", "/run/subs//a", "/run/subs/a/",
])
def test_a_non_canonical_sender_path_never_matches_a_prefix(sneaky):
    assert not SourceAllowList(["/run/subs/"]).allows(sneaky)


def test_abstract_names_and_unbound_senders():
    a = SourceAllowList(["@sub-one", "@pool-*"])
    assert a.allows(b"\0sub-one") and not a.allows(b"\0sub-one-more")
    assert a.allows(b"\0pool-17")
    assert not a.allows(None) and not a.allows("")
    b = SourceAllowList(["unbound"])
    assert b.allows(None) and b.allows("")
    assert not b.allows("/run/x") and not b.allows(("127.0.0.1", 1))


@pytest.mark.parametrize("spec", ["localhost", "10.0.0.0/33", "@", "relative/path", "*"])
def test_bad_rules(spec):
    with pytest.raises(AllowListError, match="neither a network"):
        SourceAllowList([spec])


def test_the_verdict_memory_is_bounded():
    from uwsgi_fastrouter import allowlist
    a = SourceAllowList(["10.0.0.0/8"])
    for i in range(allowlist._HOST_CACHE + 10):
        assert a.allows(("10.0.%d.%d" % (i // 256, i % 256), 1))
    assert len(a._hosts) <= allowlist._HOST_CACHE
    assert not a.allows(("11.0.0.1", 1)) and not a.allows(("11.0.0.1", 1))
    for i in range(allowlist._HOST_CACHE + 10):
        assert not a.allows("/run/s%d.sock" % i)
    assert len(a._paths) <= allowlist._HOST_CACHE
