"""A stats reader from PyPI reads our router's stats.

``uwsgidns`` (PyPI) points the domains a FastRouter has subscriptions for at 127.0.0.1:
its ``SubscritionChecker`` connects to the router's ``--fastrouter-stats`` TCP socket,
``json.load``s the document and collects ``subscriptions[*].key``; its subscription
listener decodes announce datagrams with ``uwsgidns.utils.uwsgi_packet_to_dict``.
Both are run here, unchanged, against our router and our subscriber (only the
checker's 30-second re-poll timer is switched off).

Without ``uwsgidns`` installed the tests are skipped (tox installs it), or fail when
``$CI`` is set.
"""

from __future__ import annotations

import socket

import pytest

import support
from uwsgi_fastrouter.reactor import Reactor
from uwsgi_fastrouter.subscriber import Subscriber, parse_subscribe_to


@pytest.fixture
def uwsgidns():
    try:
        from uwsgidns import checker, utils
    except ImportError as exc:
        support._missing("the stats reader uwsgidns is not installed (pip install uwsgidns): %s" % exc)
    return checker, utils


def announce(server: str, keys, address: bytes) -> Subscriber:
    """One announce round for *keys* from our subscriber (no event loop needed for one round)."""
    specs = [s for key in keys for s in parse_subscribe_to("%s:%s" % (server, key))]
    reactor = Reactor()
    try:
        sub = Subscriber(reactor, specs, default_address=address, cores=1, log=lambda line: None)
        sub.announce_all()
        assert sub.sent == len(keys) and sub.errors == 0
        sub.stop(unsubscribe=False)
    finally:
        reactor.close()
    return sub


def test_uwsgidns_reads_the_subscribed_keys_from_our_stats(sock_dir, uwsgidns, monkeypatch):
    checker, _ = uwsgidns
    sub = support.sock_path(sock_dir, "sub.sock")
    router = support.start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-subscription-server", sub,
                                   "--fastrouter-stats", "127.0.0.1:0"])
    router.wait_for_log(r"subscription server bound on")
    keys = ["example.com", "example.com:8000", "api.example.com"]
    if not support.reference_mode():
        # uWSGI 2.0.31 would write this key unescaped (invalid JSON); ours stays valid
        keys.append('odd"key\\')
    announce(sub, keys, b"127.0.0.1:3031")
    support.wait_until(lambda: len(support.fetch_stats(router.stats_address)["subscriptions"]) == len(keys),
                       what="%d pools in the stats" % len(keys))

    seen = []
    monkeypatch.setattr(checker.SubscritionChecker, "trigger", seen.append)

    class OnePoll(checker.SubscritionChecker):
        polls_scheduled = 0

        def _start_timer(self):              # the reader re-polls every 30 s: not here
            OnePoll.polls_scheduled += 1

    reader = OnePoll(router.stats_address)   # connects, reads, parses, triggers
    reader.socket.close()
    assert seen == [set(keys)]
    assert OnePoll.polls_scheduled == 1      # its "poll again later" after a successful read


def test_uwsgidns_decodes_our_announce_datagrams(uwsgidns):
    _, utils = uwsgidns
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.settimeout(10)
        server = "127.0.0.1:%d" % listener.getsockname()[1]
        announce(server, ["example.com"], b"127.0.0.1:3031")
        d = utils.uwsgi_packet_to_dict(listener.recv(4096))
    assert d == {b"key": b"example.com", b"address": b"127.0.0.1:3031", b"modifier1": b"0",
                 b"modifier2": b"0", b"cores": b"1", b"load": b"0", b"weight": b"0"}
