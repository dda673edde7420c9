"""Drain: a node announces drain=1 (or the operator drains it through the master FIFO):
no new requests, the ones in flight finish, then it goes."""

from __future__ import annotations

import pytest

from backends import RecordingBackend, read_answer, request
from support import (BIND_RE, Proc, connect, fetch_stats, router_argv, sock_path, start_router,
                     uwsgi_bin, uwsgi_packet, wait_until)
from test_subscriptions import announce, send_datagram
from uwsgi_fastrouter.master import _fifo_commands
from uwsgi_fastrouter.router import Router
from uwsgi_fastrouter.subscription import (SubscriptionError, SubscriptionTable,
                                           build_announcement, parse_announcement)

MASTER = pytest.mark.parametrize("master", [[], ["--master"]], ids=["single", "master"])
T0 = 1_700_000_000.0
HOST = [(b"HTTP_HOST", b"example.com")]
DRAIN = [(b"drain", b"1")]


def ann(address: bytes, key: bytes = b"k", **kw):
    return parse_announcement(build_announcement(key, address, **kw))


class Log(list):
    def __call__(self, line):
        self.append(line)


# ---------------------------------------------------------------------------
# The table


def test_drain_is_a_field_of_the_announce():
    packet = build_announcement(b"k", b"a:1", drain=True)
    assert packet.endswith(b"\x05\x00drain\x01\x001")
    assert parse_announcement(packet).drain == 1
    assert parse_announcement(build_announcement(b"k", b"a:1")).drain == 0
    with pytest.raises(SubscriptionError, match="invalid drain"):
        parse_announcement(packet[:-1] + b"2")


def test_a_draining_node_gets_nothing_new_and_goes_after_its_last_request():
    log = Log()
    table = SubscriptionTable(log=log)
    table.announce(ann(b"a:1"), T0)
    table.announce(ann(b"b:1"), T0)
    held = [table.lookup(b"k", T0) for _ in range(2)]
    assert {n.name for n in held} == {b"a:1", b"b:1"}
    b = table.pool(b"k").by_address[b"b:1"]
    assert table.announce(ann(b"b:1", drain=True), T0 + 1) is None
    assert "draining node: b:1 (1 requests in flight)" in log[-1]
    assert {table.lookup(b"k", T0 + 1).name for _ in range(4)} == {b"a:1"}
    assert b.pool is not None                 # still there for its request
    table.release(b)
    assert b.pool is None and "drained node removed: b:1" in log[-1]


def test_a_draining_node_without_requests_goes_at_once_and_an_unknown_one_is_not_created():
    table = SubscriptionTable()
    table.announce(ann(b"a:1"), T0)
    table.announce(ann(b"a:1", drain=True), T0)
    assert table.empty
    table.announce(ann(b"x:1", drain=True), T0)
    assert table.empty


def test_a_key_whose_only_node_drains_stays_while_its_request_is_in_flight():
    table = SubscriptionTable()
    table.announce(ann(b"a:1"), T0)
    node = table.lookup(b"k", T0)
    table.announce(ann(b"a:1", drain=True), T0)
    assert table.lookup(b"k", T0) is None     # no route for new requests...
    assert not table.empty                    # ...and no cheap mode meanwhile
    table.expire(T0 + 30)
    assert not table.empty
    table.release(node)
    assert table.empty


def test_an_announce_without_drain_takes_the_node_back():
    table = SubscriptionTable(slow_start=10)
    table.announce(ann(b"a:1"), T0)
    node = table.lookup(b"k", T0)
    table.announce(ann(b"a:1", drain=True), T0)
    table.announce(ann(b"a:1"), T0 + 5)       # the reloaded node is back
    assert not node.draining and node.ramp_from == T0 + 5
    assert table.lookup(b"k", T0 + 5) is node


def test_past_the_drain_timeout_the_node_is_marked_failed_and_goes_with_its_last_request():
    log = Log()
    table = SubscriptionTable(drain_timeout=60, log=log, tolerance=10 ** 6)
    table.announce(ann(b"a:1"), T0)
    node = table.lookup(b"k", T0)
    table.announce(ann(b"a:1", drain=True), T0)
    table.expire(T0 + 59)
    assert not node.death_mark
    table.expire(T0 + 60)
    assert node.death_mark and "after draining for 60 seconds" in log[-1]
    assert not table.pool(b"k").draining
    table.release(node)
    assert table.empty


def test_operator_drain_skips_an_address_in_every_key_until_undrained():
    table = SubscriptionTable(tolerance=10 ** 6)
    for key in (b"k", b"other"):
        table.announce(ann(b"a:1", key=key), T0)
        table.announce(ann(b"b:1", key=key), T0)
    held = table.lookup(b"k", T0)
    table.set_drained(b"a:1", True, T0)
    table.announce(ann(b"a:1"), T0 + 1)       # its announces do not undrain it
    for key in (b"k", b"other"):
        assert {table.lookup(key, T0 + 1).name for _ in range(4)} == {b"b:1"}
    table.release(held)                       # in flight: finished normally
    table.set_drained(b"a:1", False, T0 + 2)
    assert b"a:1" in {table.lookup(b"k", T0 + 2).name for _ in range(2)}


def test_operator_drain_of_static_and_fallback_nodes():
    router = Router(to=["a:1", "b:1"], fallback=["f1:1", "f2:1"])
    router.node_drained(b"a:1", True)
    assert {router.route(b"k").address for _ in range(4)} == {b"b:1"}
    router.node_drained(b"f1:1", True)
    assert router._retry_route(b"k", None, 0)[0].address == b"f2:1"
    router.node_health_changed(b"a:1", False)
    router.node_drained(b"a:1", False)        # still down: still skipped
    assert {router.route(b"k").address for _ in range(4)} == {b"b:1"}
    router.node_health_changed(b"a:1", True)
    assert {router.route(b"k").address for _ in range(4)} == {b"a:1", b"b:1"}


def test_master_fifo_commands_with_an_address_take_their_line():
    assert _fifo_commands("rD/run/a.sock\nqU127.0.0.1:3031\n") == [
        "r", "D/run/a.sock", "q", "U127.0.0.1:3031"]
    assert _fifo_commands("D") == ["D"]       # no address: logged as such


# ---------------------------------------------------------------------------
# End to end


def hold_request(router):
    """Send a request through *router* without reading the answer; the client socket."""
    sock = connect(router.addresses[0])
    sock.sendall(uwsgi_packet(HOST))
    return sock


def answer_held(node: RecordingBackend) -> None:
    conn = node.open_conns[0]
    conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nnode=held")
    conn.close()


@MASTER
def test_a_node_announcing_drain_finishes_its_request_and_gets_no_new_one(sock_dir, master, procs):
    sub = str(sock_dir / "sub.sock")
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-subscription-server", sub,
                           "--fastrouter-stats", "127.0.0.1:0", "--fastrouter-cheap", *master])
    router.wait_for_log(r"subscription server bound on")
    with RecordingBackend("b", mode="hang") as slow, RecordingBackend("a") as fast:
        announce(sub, b"example.com", slow.address.encode())
        router.wait_for_log(r"new node: %s" % slow.address)
        fetch_stats(router.stats_address)
        cheap_lines = router.count("Going cheap")
        client = hold_request(router)
        wait_until(lambda: slow.count == 1, what="the request held by b")
        announce(sub, b"example.com", slow.address.encode(), extra=DRAIN)
        # under a master its table (which sees no requests) logs it, with 0 in flight
        router.wait_for_log(r"draining node: %s \(%d requests in flight\)"
                            % (slow.address, 0 if master else 1))
        fetch_stats(router.stats_address)
        # the only node drains with a request in flight: no cheap mode
        assert fetch_stats(router.stats_address)["cheap"] == 0
        assert router.count("Going cheap") == cheap_lines
        announce(sub, b"example.com", fast.address.encode())
        router.wait_for_log(r"new node: %s" % fast.address)
        fetch_stats(router.stats_address)
        for _ in range(4):
            assert b"node=a" in request(router.addresses[0], HOST)
        assert slow.count == 1
        answer_held(slow)
        assert read_answer(client).endswith(b"node=held")
        client.close()
        # under a master the router process's copy removes it now (the master's did)
        router.wait_for_log(r"drained node removed: %s" % slow.address, count=2 if master else 1)


@pytest.mark.interop
def test_a_uwsgi_20_router_takes_a_drain_announce_as_a_plain_one(sock_dir, procs):
    listen = sock_path(sock_dir, "fr.sock")
    sub = sock_path(sock_dir, "sub.sock")
    uwsgi_router = Proc([uwsgi_bin(), "--master", "--die-on-term", "--fastrouter", listen,
                         "--fastrouter-subscription-server", sub], name="uwsgi-2.0-router")
    uwsgi_router.wait_for_log(BIND_RE.pattern)
    uwsgi_router.wait_for_log(r"subscription server bound on")
    with RecordingBackend("n") as node:
        send_datagram(sub, build_announcement(b"example.com", node.address.encode(), drain=True))
        uwsgi_router.wait_for_log(r"example.com => new node: %s" % node.address)
        assert b"node=n" in request(listen, HOST)


def test_operator_drain_through_the_master_fifo(sock_dir, procs):
    fifo = str(sock_dir / "master.fifo")
    with RecordingBackend("a") as node_a, RecordingBackend("b") as node_b:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--master", "--master-fifo", fifo,
                               "--fastrouter-to", node_a.address, "--fastrouter-to",
                               node_b.address])

        def tell(option):
            cmd = Proc(router_argv(["--master-fifo", fifo, option, node_b.address]), name="drain")
            wait_until(lambda: not cmd.alive(), timeout=20, what="the drain command to exit")
            assert cmd.returncode == 0

        def answers(n=6):
            return {request(router.addresses[0], HOST).rsplit(b"node=", 1)[1][:1] for _ in range(n)}

        assert answers() == {b"a", b"b"}
        tell("--fastrouter-drain")
        router.wait_for_log(r"\[master-fifo\] draining node %s" % node_b.address)
        wait_until(lambda: answers() == {b"a"}, what="b drained in the router process")
        count = node_b.count
        assert answers(8) == {b"a"} and node_b.count == count
        tell("--fastrouter-undrain")
        router.wait_for_log(r"\[master-fifo\] no longer draining node %s" % node_b.address)
        wait_until(lambda: b"b" in answers(), what="b back")


def test_drain_command_without_a_master_fifo_is_refused(procs):
    cmd = Proc(router_argv(["--fastrouter-drain", "127.0.0.1:1"]), name="drain")
    cmd.wait_for_log(r"--master-fifo PATH names the master")
    wait_until(lambda: not cmd.alive(), timeout=20, what="the drain command to exit")
    assert cmd.returncode == 1


# ---------------------------------------------------------------------------
# Our subscriber: drain=1 before a graceful reload (--drain-on-graceful-reload)


def test_the_subscriber_sends_a_drain_round_when_stopped_with_drain(sock_dir):
    from test_subscriber import FakeReactor, Receiver, announcement_vars, subscriber
    receiver = Receiver(sock_dir)
    lines = []
    sub = subscriber(FakeReactor(), ["%s:example.com" % receiver.server], lines)
    sub.start()
    assert b"drain" not in announcement_vars(receiver.get())
    sub.stop(unsubscribe=True, drain=True)      # drain wins
    packet = receiver.get()
    assert packet[3] == 0 and announcement_vars(packet)[b"drain"] == b"1"
    assert lines[-1] == "draining from %s:example.com" % receiver.server
    assert receiver.drain() == []
    receiver.close()


@pytest.mark.parametrize("asked, expected", [(["--drain-on-graceful-reload"], "drain"),
                                             ([], "nothing")])
def test_a_graceful_reload_announces_drain_when_asked(sock_dir, procs, asked, expected):
    from test_subscriber import Receiver, announcement_vars
    receiver = Receiver(sock_dir)
    with RecordingBackend("n") as node:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--master", "--subscribe2",
                               "server=%s,key=example.com,addr=127.0.0.1:3031" % receiver.server,
                               "--fastrouter-to", node.address, *asked])
        assert b"drain" not in announcement_vars(receiver.get())
        receiver.drain()
        import os
        import signal
        os.kill(router.pid, signal.SIGHUP)
        router.wait_for_log(r"graceful reload: \d+ old process")
        packet = receiver.get()       # the first one after the reload began
        fields = announcement_vars(packet)
        kind = "drain" if fields.get(b"drain") == b"1" else "unsubscribe" if packet[3] else "announce"
        # without the option: no unsubscribe (uWSGI's rule), the new image announces
        assert kind == ("drain" if expected == "drain" else "announce")
    receiver.close()
