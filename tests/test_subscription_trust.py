"""Who may subscribe, end to end: RSA, the shared key (hmac) and the sender allow list.

One router per test, real datagrams over UDP and UNIX sockets, real subscribers (ours
and a uWSGI 2.0.31 instance).  Every refusal is checked together with a proven
announce that is served, so a router that refuses everything would fail too.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from backends import RecordingBackend, request
from support import sock_path, start_router, start_uwsgi_app, udp_subscription_address
from test_subscriber import keypair  # noqa: F401  (a fixture: an openssl-made RSA key)
from test_subscriptions import (APP, HOST, MASTER, applied, send_datagram,
                                served_by, signed_packet)
from uwsgi_fastrouter.signing import hmac_tag
from uwsgi_fastrouter.subscription import build_announcement

SECRET = b"a-shared-secret-of-32-bytes-long"
TOLERANCE = 600


def key_file(directory: Path, secret: bytes = SECRET, name: str = "hmac.key") -> str:
    path = Path(directory) / name
    path.write_bytes(secret + b"\n")
    os.chmod(path, 0o600)
    return str(path)


def hmac_packet(key: bytes, address: bytes, unix: int, secret: bytes = SECRET, **fields) -> bytes:
    """A datagram as ``--subscribe-hmac-key`` proves it."""
    return build_announcement(key, address, unix=unix,
                              hmac_signer=lambda block: hmac_tag(secret, block), **fields)


def send_udp_from(source: str, server: str, data: bytes) -> None:
    host, port = server.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.sendto(data, (host, int(port)))


def send_unix_from(source: str, server: str, data: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(source)
        try:
            s.sendto(data, server)
        finally:
            os.unlink(source)


def drop_line(key: str, why: str) -> str:
    return r"dropped subscription datagram.*\(key: %s node: [^)]*\): %s" % (key, why)


@MASTER
def test_the_trust_matrix(sock_dir, keypair, master):
    """unsigned, RSA, HMAC, wrong key, replay, stale unix, disallowed and allowed sources,
    against one router that takes either proof and listens on UDP and UNIX."""
    private, public_dir = keypair
    unix_sub = sock_path(sock_dir, "sub.sock")
    allowed_dir = sock_dir / "subscribers"
    allowed_dir.mkdir()
    router = start_router(master + [
        "--fastrouter", "127.0.0.1:0",
        "--fastrouter-subscription-server", "127.0.0.1:0", "--fastrouter-subscription-server", unix_sub,
        "--subscriptions-sign-check", "SHA1:%s" % public_dir,
        "--subscriptions-hmac-key", key_file(sock_dir),
        "--subscriptions-sign-check-tolerance", str(TOLERANCE),
        "--subscription-allow", "127.0.0.1/32", "--subscription-allow", "%s/" % allowed_dir,
        "--fastrouter-stats", "127.0.0.1:0"])
    router.wait_for_log(r"subscription server bound on", count=2)
    udp = udp_subscription_address(router)
    entry = router.addresses[0]
    now = int(time.time())
    with RecordingBackend("rsa") as rsa, RecordingBackend("hmac") as shared, \
            RecordingBackend("evil") as evil, RecordingBackend("local") as local:
        # unsigned: refused
        send_datagram(udp, build_announcement(b"example.com", evil.address.encode()))
        router.wait_for_log(drop_line("example.com", "unsigned subscription packet for example.com"))
        # RSA alone: accepted
        send_datagram(udp, signed_packet(private, b"example.com", rsa.address.encode(), now))
        applied(router, r"example.com => new node: %s" % rsa.address)
        assert served_by(entry) == "rsa"
        # HMAC alone: accepted
        captured = hmac_packet(b"h.example", shared.address.encode(), now)
        send_datagram(udp, captured)
        applied(router, r"h.example => new node: %s" % shared.address)
        assert served_by(entry, b"h.example") == "hmac"
        # the wrong shared key: refused
        send_datagram(udp, hmac_packet(b"w.example", evil.address.encode(), now,
                                       secret=b"not-the-router-s-key-at-all"))
        router.wait_for_log(drop_line("w.example", "invalid hmac in subscription packet"))
        # a stale unix: refused
        send_datagram(udp, hmac_packet(b"s.example", evil.address.encode(), now - TOLERANCE - 60))
        router.wait_for_log(drop_line("s.example", "expired subscription packet"))
        # replays: of a live node, then after its unsubscribe
        send_datagram(udp, captured)
        router.wait_for_log(drop_line("h.example", r"invalid \(sniffed \?\) packet"))
        send_datagram(udp, hmac_packet(b"h.example", shared.address.encode(), now,
                                       unsubscribe=True))
        applied(router, r"h.example => marking %s as failed" % shared.address)
        send_datagram(udp, captured)
        router.wait_for_log(drop_line("h.example", "replayed subscription packet"))
        assert request(entry, [(b"HTTP_HOST", b"h.example")]) == b""
        # a proven packet from a source not allowed: refused before anything else
        send_udp_from("127.0.0.2", udp, hmac_packet(b"x.example", evil.address.encode(), now))
        router.wait_for_log(r"dropped subscription datagram from 127\.0\.0\.2:\d+: the sender is "
                            r"not in --subscription-allow")
        outside = sock_path(sock_dir, "outside.sock")
        send_unix_from(outside, unix_sub, hmac_packet(b"x.example", evil.address.encode(), now))
        router.wait_for_log(r"dropped subscription datagram from %s: the sender is not in "
                            r"--subscription-allow" % outside)
        send_datagram(unix_sub, hmac_packet(b"x.example", evil.address.encode(), now))
        router.wait_for_log(r"the sender \(an unbound unix socket\) is not in --subscription-allow")
        # an allowed UNIX sender with a proof: accepted
        send_unix_from(str(allowed_dir / "one.sock"), unix_sub,
                       hmac_packet(b"l.example", local.address.encode(), now))
        applied(router, r"l.example => new node: %s" % local.address)
        assert served_by(entry, b"l.example") == "local"
        # what was refused left no trace in the table, and the proven nodes still serve
        assert request(entry, [(b"HTTP_HOST", b"x.example")]) == b""
        assert request(entry, [(b"HTTP_HOST", b"w.example")]) == b""
        assert served_by(entry) == "rsa"
    assert evil.count == 0
    assert "x.example => new node" not in router.log()


@MASTER
def test_our_subscriber_process_proves_its_announces_with_the_shared_key(sock_dir, master):
    router = start_router(master + [
        "--fastrouter", "127.0.0.1:0", "--fastrouter-subscription-server", "127.0.0.1:0",
        "--subscriptions-hmac-key", key_file(sock_dir, name="router.key"),
        "--subscription-allow", "127.0.0.1", "--fastrouter-stats", "127.0.0.1:0"])
    udp = udp_subscription_address(router)
    with RecordingBackend("g") as backend:
        announcer = start_router([
            "--subscribe-to", "%s=%s:example.com" % (backend.address, udp),
            "--subscribe-hmac-key", key_file(sock_dir, name="subscriber.key"),
            "--subscribe-freq", "1"], listeners=0)
        applied(router, r"example.com => new node: %s" % backend.address)
        assert served_by(router.addresses[0]) == "g"
        assert announcer.stop() == 0            # a clean stop unsubscribes, proven too
        applied(router, r"example.com => marking %s as failed" % backend.address)
    assert "hmac" not in router.log() and "unsigned" not in router.log()


def test_a_bad_key_file_stops_the_start_with_a_clear_error(sock_dir):
    loose = Path(key_file(sock_dir))
    os.chmod(loose, 0o644)
    for option in ("--subscriptions-hmac-key", "--subscribe-hmac-key"):
        args = [option, str(loose)]
        if option == "--subscriptions-hmac-key":
            args += ["--fastrouter", "127.0.0.1:0", "--fastrouter-subscription-server", "127.0.0.1:0"]
        else:       # (the start stops at the key file: nothing is ever sent there)
            args += ["--subscribe-to", "127.0.0.1:9:k"]
        proc = start_router(args, listeners=0)
        proc.wait_for_log(r'option "%s": the key file %s is open to other users \(mode 0644\)'
                          % (option, loose))
        assert proc.stop() != 0


@pytest.mark.interop
@MASTER
def test_a_real_uwsgi_subscriber_is_refused_when_hmac_is_required_and_accepted_when_allowed(
        sock_dir, tmp_path, master):
    strict = start_router(master + [
        "--fastrouter", "127.0.0.1:0", "--fastrouter-subscription-server", "127.0.0.1:0",
        "--subscriptions-hmac-key", key_file(sock_dir), "--fastrouter-stats", "127.0.0.1:0"])
    allowing = start_router(master + [
        "--fastrouter", "127.0.0.1:0", "--fastrouter-subscription-server", "127.0.0.1:0",
        "--subscription-allow", "127.0.0.0/8", "--fastrouter-stats", "127.0.0.1:0"])
    strict_udp, open_udp = udp_subscription_address(strict), udp_subscription_address(allowing)
    app = start_uwsgi_app(tmp_path, APP, socket="127.0.0.1:0",
                          extra=["--subscribe-to", "%s:example.com" % strict_udp,
                                 "--subscribe-to", "%s:example.com" % open_udp])
    strict.wait_for_log(drop_line("example.com", "unsigned subscription packet for example.com"))
    applied(allowing, r"example.com => new node: %s" % app.address)
    assert b"uwsgi-app host=example.com" in request(allowing.addresses[0], HOST)
    assert request(strict.addresses[0], HOST) == b""
    app.stop()
    allowing.wait_for_log(r"example.com => marking %s as failed" % app.address)
    assert "new node" not in strict.log()
