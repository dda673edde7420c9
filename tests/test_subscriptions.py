"""Subscriptions end to end: datagrams in, routing, cheap mode, stats, real uWSGI subscribers."""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from backends import RecordingBackend, connect, request, uwsgi_packet
from support import (sock_path, start_router, start_uwsgi_app, udp_subscription_address, uwsgi_bin,
                     wait_applied_everywhere, wait_until)
from test_subscriber import keypair  # noqa: F401  (a fixture: an openssl-made RSA key)
from uwsgi_fastrouter.signing import load_private_key, sign
from uwsgi_fastrouter.subscription import build_announcement

APP = """
def application(environ, start_response):
    start_response('200 OK', [('Content-Type', 'text/plain')])
    return [b'uwsgi-app host=' + environ.get('HTTP_HOST', '').encode()]
"""


def announce(server: str, key: bytes, address: bytes, *, unsubscribe=False, modifier1=0, weight=0,
             extra=()) -> None:
    pairs = [(b"key", key), (b"address", address), (b"modifier1", str(modifier1).encode()),
             (b"modifier2", b"0"), (b"cores", b"1"), (b"load", b"0"), (b"weight", str(weight).encode())]
    pairs += list(extra)
    send_datagram(server, uwsgi_packet(pairs, 224, 1 if unsubscribe else 0))


def send_datagram(server: str, data: bytes) -> None:
    if ":" in server and not server.startswith("/"):
        host, port = server.rsplit(":", 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(data, (host or "127.0.0.1", int(port)))
    else:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(data, server)


def sub_router(tmp_path, *extra):
    sub = str(tmp_path / "sub.sock")
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-subscription-server", sub,
                           *extra])
    router.wait_for_log(r"subscription server bound on")
    return router, sub


def stats_of(router) -> dict:
    host, port = router.stats_address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        raw = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return json.loads(raw)
            raw += chunk


HOST = [(b"HTTP_HOST", b"example.com")]


def served_by(address, key=b"example.com"):
    answer = request(address, [(b"HTTP_HOST", key)])
    if b"node=" not in answer:
        return None
    return answer.split(b"node=")[1].split(b" ")[0].decode()


def test_subscribe_route_unsubscribe(tmp_path):
    router, sub = sub_router(tmp_path)
    with RecordingBackend("a") as a, RecordingBackend("b") as b:
        assert request(router.addresses[0], HOST) == b""          # unknown key: closed
        announce(sub, b"example.com", a.address.encode(), modifier1=5)
        router.wait_for_log(r"new pool: example.com \(hash key: \d+\)")
        router.wait_for_log(r"example.com => new node: %s" % a.address)
        assert served_by(router.addresses[0]) == "a"
        assert a.requests[0].modifier1 == 5
        announce(sub, b"example.com", b.address.encode())
        router.wait_for_log(r"example.com => new node: %s" % b.address)
        assert sorted(served_by(router.addresses[0]) for _ in range(4)) == ["a", "a", "b", "b"]
        announce(sub, b"example.com", a.address.encode(), unsubscribe=True)
        router.wait_for_log(r"example.com => marking %s as failed" % a.address)
        assert {served_by(router.addresses[0]) for _ in range(4)} == {"b"}


def test_weights_are_honoured_exactly(tmp_path):
    router, sub = sub_router(tmp_path)
    with RecordingBackend("a") as a, RecordingBackend("b") as b:
        announce(sub, b"example.com", a.address.encode(), weight=2)
        announce(sub, b"example.com", b.address.encode(), weight=3)
        router.wait_for_log(r"new node: %s" % b.address)
        seen = [served_by(router.addresses[0]) for _ in range(10)]
        assert seen.count("a") == 4 and seen.count("b") == 6


def test_garbage_and_floods_are_dropped_and_routing_goes_on(tmp_path):
    router, sub = sub_router(tmp_path, "--subscription-max-keys", "100")
    with RecordingBackend("a") as a:
        announce(sub, b"example.com", a.address.encode())
        router.wait_for_log(r"new node: %s" % a.address)
        for junk in (b"", b"\x00", b"garbage datagram", uwsgi_packet([(b"key", b"k")], 224)[:-1],
                     uwsgi_packet([(b"key", b"x" * 256), (b"address", b"127.0.0.1:1")], 224),
                     uwsgi_packet([(b"key", b"k"), (b"address", b"")], 224)):
            send_datagram(sub, junk)
        router.wait_for_log(r"dropped subscription datagram")
        for i in range(1000):
            announce(sub, b"flood%d.example" % i, b"127.0.0.1:9")
        router.wait_for_log(r"too many keys")
        assert served_by(router.addresses[0]) == "a"


def test_cheap_mode_holds_clients_until_a_node_subscribes(tmp_path):
    router, sub = sub_router(tmp_path, "--fastrouter-cheap")
    router.wait_for_log(r"starting uWSGI fastrouter in cheap mode")
    with RecordingBackend("a") as a:
        result = {}

        def client():
            result["answer"] = request(router.addresses[0], HOST, timeout=20)

        t = threading.Thread(target=client)
        t.start()
        wait_until(lambda: t.is_alive(), timeout=2)
        assert "answer" not in result
        announce(sub, b"example.com", a.address.encode())
        router.wait_for_log(r"leaving cheap mode")
        t.join(20)
        assert b"node=a" in result["answer"]
        announce(sub, b"example.com", a.address.encode(), unsubscribe=True)
        router.wait_for_log(r"no more nodes available. Going cheap")


def test_stats_show_the_subscription_table(tmp_path):
    sub = str(tmp_path / "sub.sock")
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-subscription-server", sub,
                           "--fastrouter-stats", "127.0.0.1:0"])
    with RecordingBackend("a") as a:
        announce(sub, b"example.com", a.address.encode(), modifier1=5, weight=2)
        router.wait_for_log(r"new node")
        served_by(router.addresses[0])
        doc = stats_of(router)
        assert doc["fastrouter"] == [router.addresses[0], sub]
        (pool,) = doc["subscriptions"]
        assert list(pool) == ["key", "hash", "hits", "sni_enabled", "nodes"]
        assert pool["key"] == "example.com" and pool["hits"] == 1
        (node,) = pool["nodes"]
        assert list(node) == ["name", "modifier1", "modifier2", "last_check", "pid", "uid", "gid",
                              "requests", "last_requests", "tx", "rx", "cores", "load", "weight",
                              "wrr", "ref", "failcnt", "death_mark"]
        assert node["name"] == a.address and node["modifier1"] == 5 and node["weight"] == 2
        assert node["requests"] == 1 and node["tx"] > 0 and node["rx"] > 0 and node["ref"] == 0
        assert doc["cheap"] == 0


def test_dead_node_is_marked_and_the_request_retried_on_another(tmp_path):
    router, sub = sub_router(tmp_path)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_addr = "127.0.0.1:%d" % dead.getsockname()[1]
    dead.close()
    with RecordingBackend("a") as a:
        announce(sub, b"example.com", dead_addr.encode())
        announce(sub, b"example.com", a.address.encode())
        router.wait_for_log(r"new node: %s" % a.address)
        assert {served_by(router.addresses[0]) for _ in range(3)} == {"a"}
        router.wait_for_log(r"example.com => marking %s as failed" % dead_addr)


@pytest.mark.interop
def test_a_real_uwsgi_instance_subscribes_and_is_routed(tmp_path):
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-subscription-server", "127.0.0.1:0"])
    sub_addr = udp_subscription_address(router)
    app = start_uwsgi_app(tmp_path, APP, socket="127.0.0.1:0",
                          extra=["--subscribe-to", "%s:example.com" % sub_addr,
                                 "--subscribe-to", "%s:uwsgi.it,5" % sub_addr])
    router.wait_for_log(r"example.com => new node: 127.0.0.1:\d+")
    answer = request(router.addresses[0], HOST)
    assert b"uwsgi-app host=example.com" in answer
    app.stop()
    router.wait_for_log(r"example.com => marking 127.0.0.1:\d+ as failed")
    assert request(router.addresses[0], HOST) == b""


def test_a_backend_that_cannot_subscribe_is_announced_by_a_subscriber_process(tmp_path):
    router, sub = sub_router(tmp_path)
    with RecordingBackend("g") as backend:      # think of gunicorn speaking uwsgi
        announcer = start_router(["--subscribe-to", "%s=%s:example.com" % (backend.address, sub),
                                  "--subscribe-freq", "1"], listeners=0)
        router.wait_for_log(r"example.com => new node: %s" % backend.address)
        assert served_by(router.addresses[0]) == "g"
        assert announcer.stop() == 0            # a clean stop unsubscribes
        router.wait_for_log(r"example.com => marking %s as failed" % backend.address)
        assert request(router.addresses[0], HOST) == b""


# ---------------------------------------------------------------------------
# notify (D17), replays after a removal (D9), floods of new keys

MASTER = pytest.mark.parametrize("master", [[], ["--master"]], ids=["single", "master"])
ACK = b"[subscription ack] example.com => new node: "


def applied(router, regex: str, times: int = 1) -> None:
    """Wait until an event is logged *times* in all (once per event: by the master under
    one, its router processes apply it silently), then until every process applied it."""
    wait_until(lambda: router.count(regex) == times, what="%d lines %s" % (times, regex))
    wait_applied_everywhere(router, regex)
    assert router.count(regex) == times


def signed_packet(private: Path, key: bytes, address: bytes, unix: int, **fields) -> bytes:
    """A datagram signed as ``--subscribe-to ...,SHA1:PRIVATE`` signs it."""
    secret = load_private_key(Path(private).read_bytes())
    return build_announcement(key, address, unix=unix,
                              signer=lambda data: sign(secret, "SHA1", data), **fields)


def send_as(server: str, data: bytes, uid: int, gid: int) -> None:
    """Send a datagram carrying these credentials (root may name any)."""
    creds = struct.pack("3i", os.getpid(), uid, gid)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds)], 0, server)


def notify_socket(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    return sock


@MASTER
def test_notify_is_written_only_for_a_verified_announce(sock_dir, keypair, master):
    private, public_dir = keypair
    sub = sock_path(sock_dir, "sub.sock")
    # a sender that may subscribe without a signature (root's uid cannot be listed)
    uid, gid = (65534, 65534) if os.getuid() == 0 else (os.getuid(), os.getgid())
    router = start_router(master + [
        "--fastrouter", "127.0.0.1:0", "--fastrouter-subscription-server", sub,
        "--fastrouter-subscription-server", "127.0.0.1:0", "--subscriptions-sign-check", "SHA1:%s" % public_dir,
        "--subscriptions-use-credentials", "--subscriptions-sign-skip-uid", str(uid),
        "--fastrouter-stats", "127.0.0.1:0"])
    router.wait_for_log(r"subscription server bound on", count=2)
    udp = udp_subscription_address(router)
    path = sock_path(sock_dir, "notify.sock")
    with notify_socket(path) as notify, RecordingBackend("a") as a, RecordingBackend("b") as b:
        send_as(sub, build_announcement(b"example.com", a.address.encode(), notify=path.encode()),
                uid, gid)
        router.wait_for_log(r"example.com => new node: %s" % a.address)   # accepted, unsigned
        # the barrier: a signed announce naming the same path is acknowledged; an ack for
        # the unsigned one would have come first
        send_datagram(udp, signed_packet(private, b"example.com", b.address.encode(),
                                         int(time.time()), notify=path.encode()))
        assert notify.recv(4096) == ACK + b.address.encode()
        router.wait_for_log(r"notify %s of example.com => %s ignored: the announce was neither "
                            r"signed nor credentials-checked" % (re.escape(path), a.address))
        # both nodes serve
        applied(router, r"new node: %s" % b.address)
        assert sorted(served_by(router.addresses[0]) for _ in range(4)) == ["a", "a", "b", "b"]


def test_notify_is_not_written_for_an_unchecked_announce(sock_dir):
    sub = sock_path(sock_dir, "sub.sock")
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-subscription-server", sub])
    router.wait_for_log(r"subscription server bound on")
    path = sock_path(sock_dir, "notify.sock")
    with notify_socket(path) as notify, RecordingBackend("a") as a:
        announce(sub, b"example.com", a.address.encode(), extra=[(b"notify", path.encode())])
        router.wait_for_log(r"notify %s of example.com => %s ignored" % (re.escape(path), a.address))
        assert served_by(router.addresses[0]) == "a"
        notify.setblocking(False)
        with pytest.raises(BlockingIOError):   # nothing was sent (and nothing will be)
            notify.recv(4096)


@MASTER
def test_notify_is_written_for_a_credentials_checked_announce(sock_dir, master):
    owners = sock_dir / "owners"
    owners.mkdir()
    (owners / "example.com").write_bytes(b"")      # ours: the sender's uid and gid
    sub = sock_path(sock_dir, "sub.sock")
    router = start_router(master + [
        "--fastrouter", "127.0.0.1:0", "--fastrouter-subscription-server", sub,
        "--subscriptions-use-credentials", "--subscriptions-credentials-check", "%s/" % owners,
        "--fastrouter-stats", "127.0.0.1:0"])
    router.wait_for_log(r"subscription server bound on")
    path = sock_path(sock_dir, "notify.sock")
    with notify_socket(path) as notify, RecordingBackend("a") as a:
        announce(sub, b"example.com", a.address.encode(), extra=[(b"notify", path.encode())])
        assert notify.recv(4096) == ACK + a.address.encode()
        applied(router, r"new node: %s" % a.address)
        assert served_by(router.addresses[0]) == "a"
    assert "ignored" not in router.log()


@MASTER
def test_a_captured_subscribe_replayed_after_the_unsubscribe_is_refused(sock_dir, keypair, master):
    private, public_dir = keypair
    sub = sock_path(sock_dir, "sub.sock")
    router = start_router(master + ["--fastrouter", "127.0.0.1:0",
                                    "--fastrouter-subscription-server", sub,
                                    "--subscriptions-sign-check", "SHA1:%s" % public_dir,
                                    "--fastrouter-stats", "127.0.0.1:0"])
    router.wait_for_log(r"subscription server bound on")
    with RecordingBackend("a") as a:
        address = a.address.encode()
        now = int(time.time())
        captured = signed_packet(private, b"example.com", address, now)
        send_datagram(sub, captured)
        applied(router, r"new node: %s" % a.address)
        assert served_by(router.addresses[0]) == "a"
        send_datagram(sub, signed_packet(private, b"example.com", address, now, unsubscribe=True))
        applied(router, r"marking %s as failed" % a.address)
        send_datagram(sub, captured)                   # the replay
        router.wait_for_log(r"replayed subscription packet for slot: example.com node: %s "
                            r"\(unix %d; the node was removed after accepting unix %d\)"
                            % (a.address, now, now + 1))
        assert request(router.addresses[0], HOST) == b""
        # the instance itself signs newer packets and comes back
        send_datagram(sub, signed_packet(private, b"example.com", address, now + 2))
        applied(router, r"new node: %s" % a.address, 2)
        assert served_by(router.addresses[0]) == "a"
    assert router.count(r"new node: %s" % a.address) == 2


@MASTER
def test_a_flood_of_new_keys_does_not_lock_out_subscribed_nodes(tmp_path, master):
    router, sub = sub_router(tmp_path, *master, "--subscription-max-keys", "20",
                             "--fastrouter-stats", "127.0.0.1:0")
    with RecordingBackend("a") as a, RecordingBackend("b") as b:
        for _ in range(2):                             # a periodic subscriber
            announce(sub, b"example.com", a.address.encode())
        applied(router, r"example.com => new node")
        for flood in range(5):
            for i in range(100):
                announce(sub, b"flood%d-%d.example" % (flood, i), b"127.0.0.1:9")
            announce(sub, b"example.com", a.address.encode())    # its refresh, amid the flood
            assert served_by(router.addresses[0]) == "a"
        router.wait_for_log(r"too many keys \(20\): flood\d-\d+.example refused")
        # it restarts on another port while the flood goes on: its slot was kept
        announce(sub, b"example.com", a.address.encode(), unsubscribe=True)
        applied(router, r"marking %s as failed" % a.address)
        for i in range(100):
            announce(sub, b"flood-late-%d.example" % i, b"127.0.0.1:9")
        announce(sub, b"example.com", b.address.encode())
        applied(router, r"example.com => new node: %s" % b.address)
        assert served_by(router.addresses[0]) == "b"
        log = router.log()
        assert "example.com refused" not in log and "key: example.com" not in log


def test_unsigned_floods_never_cost_a_key_at_a_signing_router(sock_dir, keypair):
    private, public_dir = keypair
    sub = sock_path(sock_dir, "sub.sock")
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-subscription-server", sub,
                           "--fastrouter-stats", "127.0.0.1:0", "--subscription-max-keys", "1",
                           "--subscriptions-sign-check", "SHA1:%s" % public_dir])
    router.wait_for_log(r"subscription server bound on")
    with RecordingBackend("a") as a, RecordingBackend("b") as b:
        now = int(time.time())
        send_datagram(sub, signed_packet(private, b"example.com", a.address.encode(), now))
        router.wait_for_log(r"example.com => new node: %s" % a.address)
        for i in range(300):
            send_datagram(sub, build_announcement(b"flood%d.example" % i, b"127.0.0.1:9", unix=now))
        # the barrier: a second signed node for the key (the table is full: 1 key)
        send_datagram(sub, signed_packet(private, b"example.com", b.address.encode(), now))
        router.wait_for_log(r"example.com => new node: %s" % b.address)
        doc = stats_of(router)
        assert [pool["key"] for pool in doc["subscriptions"]] == ["example.com"]
        assert sorted(served_by(router.addresses[0]) for _ in range(2)) == ["a", "b"]
    log = router.log()
    assert "unsigned subscription packet for flood0.example" in log
    assert "too many keys" not in log and "table full" not in log


def test_a_datagram_too_big_to_forward_is_kept_and_not_forwarded(tmp_path):
    """Resubscribing writes a new packet with the router's own address and the
    forwarded mark: for a datagram already at the 64 KiB limit (long SNI paths) it
    cannot fit.  The router keeps the node, logs why it does not forward, and goes
    on forwarding the others (it used to raise out of the subscription callback)."""
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.bind(("127.0.0.1", 0))
    upstream.settimeout(10)
    router, sub = sub_router(tmp_path, "--fastrouter-resubscribe",
                             "127.0.0.1:%d" % upstream.getsockname()[1])
    with RecordingBackend("a") as a, upstream:
        pairs = [(b"key", b"example.com"), (b"address", a.address.encode()), (b"modifier1", b"0"),
                 (b"modifier2", b"0"), (b"cores", b"1"), (b"load", b"0"), (b"weight", b"0")]
        used = len(uwsgi_packet(pairs, 224)) - 4 + 4 + len(b"sni_key")
        big = uwsgi_packet(pairs + [(b"sni_key", b"k" * (65535 - 5 - used))], 224)
        assert len(big) == 4 + 65535 - 5
        send_datagram(sub, big)
        router.wait_for_log(r"example.com => new node: %s" % a.address)
        router.wait_for_log(r"not resubscribing example.com: .*exceeds the limit of 65535")
        assert served_by(router.addresses[0]) == "a"
        announce(sub, b"other.example", b"127.0.0.1:9")
        data, _ = upstream.recvfrom(65536)
        assert b"other.example" in data and b"example.com" not in data
        assert router.count(r"unhandled") == 0
