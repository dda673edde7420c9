"""Retry after connect (--fastrouter-retry-after-connect) and per-node concurrency caps
(--fastrouter-node-max-conns), in-process on the engine harness of test_engine.py:
real sockets, a clock the test moves, every state change checked against
session.TRANSITIONS."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from backends import uwsgi_packet
from support import sock_path
from test_engine import (GET, TIMEOUT, RecordingSession, engines, log_lines,  # noqa: F401 (fixtures)
                         read_packet, tcp_listener)

from uwsgi_fastrouter.record import FAILED, NO_ROUTE
from uwsgi_fastrouter.handoff import TRUST_AFTER
from uwsgi_fastrouter.nodecaps import NodeCaps
from uwsgi_fastrouter.router import Router, SubscriptionMapper
from uwsgi_fastrouter.session import CLOSED, CONNECTING, RELAY, WAIT_NODE
from uwsgi_fastrouter.subscription import SubscriptionTable, build_announcement, parse_announcement

POST = [(b"HTTP_HOST", b"example.com"), (b"PATH_INFO", b"/"), (b"CONTENT_LENGTH", b"5")]
ANSWER = b"HTTP/1.0 200 OK\r\n\r\nok"


def accept_request(node: socket.socket) -> socket.socket:
    """The next connection on *node*, its request head read."""
    conn, _ = node.accept()
    conn.settimeout(10)
    read_packet(conn)
    return conn


def reset(conn: socket.socket) -> None:
    """Close *conn* with a RST instead of a FIN."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def answered(engine, client: socket.socket, session) -> bytes:
    engine.until(lambda: session.state == CLOSED, "the session closed")
    client.settimeout(10)
    chunks = []
    while True:
        chunk = client.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


# --------------------------------------------------------------------------- retry after connect


@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_node_that_goes_away_before_answering_gets_the_request_sent_again(engines, log_lines, how):
    first, first_address = tcp_listener()
    second, second_address = tcp_listener()
    with first, second:
        router = Router(to=[first_address, second_address])
        engine = engines(router, retry_after_connect=True)
        client, session = engine.client(uwsgi_packet(GET))
        engine.until(lambda: session.state == RELAY, "relaying to the first node")
        conn = accept_request(first)
        (conn.close if how == "close" else lambda: reset(conn))()
        engine.until(lambda: session.route is not None
                     and session.route.address == second_address.encode(), "sent again")
        with accept_request(second) as conn2:
            conn2.sendall(ANSWER)
        assert answered(engine, client, session) == ANSWER
        assert router.static_nodes[0].dead_since, "the node is marked as after a refused connect"
        assert session.retries == 1
        assert engine.server.counters.resent == 1
        assert (RELAY, CONNECTING) in RecordingSession.changes
        assert "request sent again" in log_lines.getvalue()
        assert [n.ref for n in router.static_nodes] == [0, 0]


def test_without_the_option_the_request_is_lost_as_before(engines):
    first, first_address = tcp_listener()
    second, second_address = tcp_listener()
    with first, second:
        engine = engines(Router(to=[first_address, second_address]))
        client, session = engine.client(uwsgi_packet(GET))
        engine.until(lambda: session.state == RELAY, "relaying")
        accept_request(first).close()
        assert answered(engine, client, session) == b""
        assert engine.server.counters.resent == 0


def test_a_request_with_a_body_is_never_sent_again(engines):
    first, first_address = tcp_listener()
    second, second_address = tcp_listener()
    with first, second:
        engine = engines(Router(to=[first_address, second_address]), retry_after_connect=True)
        client, session = engine.client(uwsgi_packet(POST) + b"hello")
        engine.until(lambda: session.state == RELAY, "relaying")
        accept_request(first).close()
        assert answered(engine, client, session) == b""
        assert session.head is None and engine.server.counters.resent == 0
        # the other node still serves the next client
        client2, session2 = engine.client(uwsgi_packet(GET))
        engine.until(lambda: session2.state == RELAY, "relaying")
        with accept_request(second) as conn:
            conn.sendall(ANSWER)
        assert answered(engine, client2, session2) == ANSWER


def test_a_node_that_sent_a_byte_is_not_asked_again(engines):
    first, first_address = tcp_listener()
    second, second_address = tcp_listener()
    with first, second:
        engine = engines(Router(to=[first_address, second_address]), retry_after_connect=True)
        client, session = engine.client(uwsgi_packet(GET))
        engine.until(lambda: session.state == RELAY, "relaying")
        with accept_request(first) as conn:
            conn.sendall(b"HTTP/1.0 200")
        assert answered(engine, client, session) == b"HTTP/1.0 200"
        assert engine.server.counters.resent == 0


def test_a_silent_node_gets_the_request_sent_again_at_the_timeout(engines, log_lines):
    first, first_address = tcp_listener()
    second, second_address = tcp_listener()
    with first, second:
        router = Router(to=[first_address, second_address])
        engine = engines(router, retry_after_connect=True)
        client, session = engine.client(uwsgi_packet(GET))
        engine.until(lambda: session.state == RELAY, "relaying")
        with accept_request(first):
            engine.advance(TIMEOUT + 1)
            assert session.route.address == second_address.encode()
            with accept_request(second) as conn2:
                conn2.sendall(ANSWER)
            assert answered(engine, client, session) == ANSWER
        assert router.static_nodes[0].dead_since
        assert "sent nothing for %d seconds" % TIMEOUT in log_lines.getvalue()


def test_sending_again_stops_at_max_retries(engines, log_lines):
    nodes = [tcp_listener() for _ in range(3)]
    try:
        router = Router(to=[address for _, address in nodes], max_retries=1)
        engine = engines(router, retry_after_connect=True)
        client, session = engine.client(uwsgi_packet(GET))
        for node, _ in nodes[:2]:
            engine.until(lambda: session.state != CONNECTING, "connected")
            accept_request(node).close()
            engine.one_pass()
        assert answered(engine, client, session) == b""
        assert session.outcome == FAILED and session.retries == 1
        assert "all nodes failed (1 retry)" in log_lines.getvalue()
        assert [n.ref for n in router.static_nodes] == [0, 0, 0]
    finally:
        for node, _ in nodes:
            node.close()


def test_a_passed_descriptor_is_never_sent_again(engines, sock_dir):
    path = sock_path(sock_dir, "node.sock")
    node = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    node.bind(path)
    node.listen(8)
    node.settimeout(10)
    other, other_address = tcp_listener()
    with node, other:
        engine = engines(Router(to=[path, other_address]), retry_after_connect=True)
        client, session = engine.client(uwsgi_packet(GET))
        engine.until(lambda: session.state == RELAY, "relaying")
        assert session.fd_passed
        conn, _ = node.accept()
        conn.close()
        engine.until(lambda: session.state == CLOSED, "closed")
        assert engine.server.counters.resent == 0


# --------------------------------------------------------------------------- caps


def capped_router(addresses, cap=1, wait=0, per_core=0) -> Router:
    return Router(to=addresses, caps=NodeCaps(cap, per_core, wait))


def test_past_the_cap_a_request_goes_to_another_node_then_waits_for_a_slot(engines):
    first, first_address = tcp_listener()
    second, second_address = tcp_listener()
    with first, second:
        router = capped_router([first_address, second_address], cap=1, wait=3)
        engine = engines(router)
        c1, s1 = engine.client(uwsgi_packet(GET))
        c2, s2 = engine.client(uwsgi_packet(GET))
        c3, s3 = engine.client(uwsgi_packet(GET))
        assert s1.route.address != s2.route.address
        assert s3.state == WAIT_NODE and s3.route is None
        assert [n.ref for n in router.static_nodes] == [1, 1]
        conn1 = accept_request(first)
        conn2 = accept_request(second)
        conn1.sendall(ANSWER)
        conn1.close()
        assert answered(engine, c1, s1) == ANSWER
        engine.until(lambda: s3.state == RELAY, "the waiting request took the slot")
        assert s3.route.address == first_address.encode()
        with accept_request(first) as conn3:
            conn3.sendall(ANSWER)
        assert answered(engine, c3, s3) == ANSWER
        conn2.close()
        answered(engine, c2, s2)
        assert [n.ref for n in router.static_nodes] == [0, 0]
        assert engine.server.counters.cap_waits == 1 and engine.server.counters.cap_refusals == 0


def test_a_request_that_finds_no_slot_in_time_is_closed_as_without_a_node(engines, log_lines):
    node, address = tcp_listener()
    with node:
        router = capped_router([address], cap=1, wait=2)
        engine = engines(router)
        c1, s1 = engine.client(uwsgi_packet(GET))
        c2, s2 = engine.client(uwsgi_packet(GET))
        assert s2.state == WAIT_NODE
        engine.advance(1)
        assert s2.state == WAIT_NODE
        engine.advance(1.5)
        assert s2.state == CLOSED and s2.outcome == NO_ROUTE
        assert "no slot within 2 seconds" in log_lines.getvalue()
        assert engine.server.counters.cap_refusals == 1
        assert router.waiting is not None and not router.waiting.sessions
        # the request holding the slot is not disturbed
        with accept_request(node) as conn:
            conn.sendall(ANSWER)
        assert answered(engine, c1, s1) == ANSWER
        assert router.static_nodes[0].ref == 0


def test_without_a_queue_wait_a_request_past_the_cap_is_closed_at_once(engines, log_lines):
    node, address = tcp_listener()
    with node:
        router = capped_router([address], cap=1)
        engine = engines(router)
        c1, s1 = engine.client(uwsgi_packet(GET))
        c2, s2 = engine.client(uwsgi_packet(GET))
        assert s2.state == CLOSED and s2.outcome == NO_ROUTE
        assert "at its connection cap" in log_lines.getvalue()
        assert router.static_nodes[0].ref == 1


def test_every_way_a_request_ends_gives_its_slot_back_exactly_once(engines):
    """A witness request keeps one reference on the node while each other request
    ends; a slot given back twice would show as a count below the witness's one."""
    node, address = tcp_listener(64)
    with node:
        router = capped_router([address], cap=100)
        engine = engines(router)
        static = router.static_nodes[0]
        witness_client, witness = engine.client(uwsgi_packet(GET))
        witness_conn = accept_request(node)
        assert static.ref == 1
        # finished
        c, s = engine.client(uwsgi_packet(GET))
        with accept_request(node) as conn:
            conn.sendall(ANSWER)
        answered(engine, c, s)
        assert static.ref == 1
        # the client went away in the middle of its body, the node gave up
        c, s = engine.client(uwsgi_packet(POST) + b"he")
        conn = accept_request(node)
        engine.until(lambda: s.state == RELAY, "relaying")
        c.close()
        engine.until(lambda: s.client_eof, "the client's end seen")
        reset(conn)
        engine.until(lambda: s.state == CLOSED, "closed")
        assert static.ref == 1
        # timed out (the witness too: it is renewed afterwards)
        c, s = engine.client(uwsgi_packet(GET))
        conn = accept_request(node)
        engine.advance(TIMEOUT + 1)
        assert s.state == CLOSED and witness.state == CLOSED
        assert static.ref == 0
        conn.close()
        witness_conn.close()


def test_failed_connects_and_handovers_give_their_slot_back(engines, sock_dir):
    path = sock_path(sock_dir, "node.sock")
    unix_node = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix_node.bind(path)
    unix_node.listen(8)
    unix_node.settimeout(10)
    dead = sock_path(sock_dir, "dead.sock")
    with unix_node:
        router = capped_router([dead, path], cap=10)
        engine = engines(router, trust_fd_passing=True)
        dead_node, live_node = router.static_nodes
        # a request in flight on the live node, as the witness
        c, witness = engine.client(uwsgi_packet(POST) + b"hello")
        engine.until(lambda: witness.state == RELAY, "relaying")
        assert (dead_node.ref, live_node.ref) == (0, 1)
        witness_conn = accept_request(unix_node)
        # handed over, the node's verdict awaited: it took the client
        c2, s2 = engine.client(uwsgi_packet(GET))
        engine.until(lambda: s2.state == RELAY, "handed over")
        assert s2.fd_passed and live_node.ref == 2
        unix_node.accept()[0].close()
        engine.until(lambda: s2.state == CLOSED, "the verdict")
        assert (dead_node.ref, live_node.ref) == (0, 1)
        # handed over without a verdict (a trusted node): closed at once
        engine.server.context.handoffs.trust.counts[path.encode()] = TRUST_AFTER + 1
        c3, s3 = engine.client(uwsgi_packet(GET))
        assert s3.state == CLOSED and s3.fd_passed
        assert (dead_node.ref, live_node.ref) == (0, 1)
        unix_node.accept()[0].close()
        witness_conn.sendall(ANSWER)
        witness_conn.close()
        answered(engine, c, witness)
        assert (dead_node.ref, live_node.ref) == (0, 0)


def subscribed(addresses, cores=0, **caps) -> Router:
    table = SubscriptionTable()
    now = time.time()
    for address in addresses:
        table.announce(parse_announcement(build_announcement(b"example.com", address.encode(),
                                                             cores=cores)), now)
    return Router(subscriptions=SubscriptionMapper(table), caps=NodeCaps(**caps))


def test_subscribed_nodes_honour_the_cap_and_give_their_references_back(engines):
    first, first_address = tcp_listener()
    second, second_address = tcp_listener()
    with first, second:
        router = subscribed([first_address, second_address], max_conns=1, queue_timeout=3)
        engine = engines(router)
        c1, s1 = engine.client(uwsgi_packet(GET))
        c2, s2 = engine.client(uwsgi_packet(GET))
        c3, s3 = engine.client(uwsgi_packet(GET))
        assert {s1.route.address, s2.route.address} == {first_address.encode(), second_address.encode()}
        assert s3.state == WAIT_NODE
        nodes = router.subscriptions.table.pool(b"example.com").nodes
        assert [n.ref for n in nodes] == [1, 1]
        conns = {first_address: accept_request(first), second_address: accept_request(second)}
        holder = conns[s2.route.address.decode()]
        holder.sendall(ANSWER)
        holder.close()
        assert answered(engine, c2, s2) == ANSWER
        engine.until(lambda: s3.state == RELAY, "the waiting request took the slot")
        for conn in conns.values():
            conn.close()
        node3 = first if s3.route.address == first_address.encode() else second
        accept_request(node3).close()
        answered(engine, c1, s1)
        answered(engine, c3, s3)
        assert [n.ref for n in nodes] == [0, 0]


def test_the_cap_can_come_from_the_cores_a_node_announces(engines):
    node, address = tcp_listener()
    with node:
        router = subscribed([address], cores=2, per_core=1)
        engine = engines(router)
        sessions = [engine.client(uwsgi_packet(GET))[1] for _ in range(3)]
        assert [s.state for s in sessions][:2] == [RELAY, RELAY]
        assert sessions[2].state == CLOSED and sessions[2].outcome == NO_ROUTE
