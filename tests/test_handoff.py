"""The pure bookkeeping behind --fastrouter-trust-fd-passing."""

from __future__ import annotations

from uwsgi_fastrouter.handoff import CHECK_EVERY, MAX_NODES, TRUST_AFTER, HandoffTrust

A = b"/run/a.sock"
B = b"/run/b.sock"


def pattern(trust: HandoffTrust, address: bytes, count: int) -> str:
    """'u' for an unchecked handoff, 'v' for a verified one that the node took."""
    out = []
    for _ in range(count):
        if trust.unchecked(address):
            out.append("u")
        else:
            trust.taken(address)
            out.append("v")
    return "".join(out)


def test_disabled_never_skips_a_verdict():
    trust = HandoffTrust(False)
    assert pattern(trust, A, 200) == "v" * 200
    assert trust.counts == {} and trust.unchecked_total == 0


def test_trusted_after_a_run_of_takes_then_checked_once_in_a_while():
    trust = HandoffTrust(True)
    seen = pattern(trust, A, 3 * CHECK_EVERY + 1)
    assert seen[:TRUST_AFTER] == "v" * TRUST_AFTER
    checks = [i for i, c in enumerate(seen) if c == "v" and i >= TRUST_AFTER]
    assert checks == [CHECK_EVERY, 2 * CHECK_EVERY, 3 * CHECK_EVERY]
    assert trust.unchecked_total == len(seen) - TRUST_AFTER - 3


def test_nodes_are_counted_apart():
    trust = HandoffTrust(True)
    pattern(trust, A, TRUST_AFTER)
    assert trust.unchecked(A)
    assert not trust.unchecked(B)


def test_an_ignored_descriptor_resets_the_node():
    trust = HandoffTrust(True)
    assert trust.ignored(A) is False          # never trusted: nothing to report
    pattern(trust, A, TRUST_AFTER + 5)
    assert trust.ignored(A) is True and trust.reverted == 1
    assert pattern(trust, A, TRUST_AFTER) == "v" * TRUST_AFTER


def test_handoffs_concurrent_with_a_check_do_not_wait_for_it():
    trust = HandoffTrust(True)
    pattern(trust, A, CHECK_EVERY)            # the next handoff is a check
    assert not trust.unchecked(A)             # the check, its verdict not in yet
    assert trust.unchecked(A)                 # the next one goes unchecked
    trust.taken(A)                            # the check's verdict: nothing to count
    assert pattern(trust, A, CHECK_EVERY - 2) == "u" * (CHECK_EVERY - 2)
    assert not trust.unchecked(A)             # the next check, CHECK_EVERY after the last


def test_concurrent_handoffs_while_earning_trust_all_wait():
    trust = HandoffTrust(True)
    assert not any(trust.unchecked(A) for _ in range(3 * TRUST_AFTER))
    for _ in range(TRUST_AFTER):
        trust.taken(A)
    assert trust.unchecked(A)


def test_an_unreachable_node_is_verified_from_scratch():
    trust = HandoffTrust(True)
    pattern(trust, A, TRUST_AFTER + 1)
    trust.forget(A)
    assert pattern(trust, A, TRUST_AFTER) == "v" * TRUST_AFTER


def test_the_table_is_bounded():
    trust = HandoffTrust(True)
    for i in range(MAX_NODES + 10):
        trust.taken(b"/n/%d" % i)
    assert len(trust.counts) <= MAX_NODES
