"""The subscriber side: option parsing, the datagrams, their timing, and real routers accepting them."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import List, Optional

import pytest

import support
from backends import RecordingBackend, request
from uwsgi_fastrouter.protocol import parse_vars
from uwsgi_fastrouter.reactor import Reactor
from uwsgi_fastrouter.signing import HmacChecker, SignatureChecker
from uwsgi_fastrouter.subscriber import (MapFileSpec, SubscribeError, Subscriber, SubscribeSpec,
                                         parse_map_file, parse_subscribe2, parse_subscribe_to)
from uwsgi_fastrouter.subscription import parse_announcement

# docs/wire.md ("Subscription datagrams"): --socket 127.0.0.1:3031 --subscribe-to X:example.com, as a 2.0.31 instance sends it
WIRE_EXAMPLE = bytes.fromhex(
    "e0650000 03006b65 790b0065 78616d70 6c652e63 6f6d0700 61646472 6573730e"
    "00313237 2e302e30 2e313a33 30333109 006d6f64 69666965 72310100 3009006d"
    "6f646966 69657232 01003005 00636f72 65730100 3104006c 6f616401 00300600"
    "77656967 68740100 30".replace(" ", ""))
HOST = [(b"HTTP_HOST", b"example.com")]


# ---------------------------------------------------------------------------
# --subscribe-to

def spec(server, key, **fields) -> List[SubscribeSpec]:
    return [SubscribeSpec(server, key, **fields)]


@pytest.mark.parametrize("value, expected", [
    ("127.0.0.1:3031:example.com", spec("127.0.0.1:3031", b"example.com")),
    # the key is everything after the second ':' (a port in the key is fine)
    ("127.0.0.1:3031:example.com:8000", spec("127.0.0.1:3031", b"example.com:8000")),
    ("127.0.0.1:3031:example.com:8000,5", spec("127.0.0.1:3031", b"example.com:8000", modifier1=5)),
    ("127.0.0.1:3031:k,", spec("127.0.0.1:3031", b"k")),
    ("127.0.0.1:3031:k,0,SHA1:/keys/k.pem", spec("127.0.0.1:3031", b"k", sign="SHA1:/keys/k.pem")),
    # a UNIX datagram server: split at the first ':' after the path
    ("/run/sub.sock:example.com", spec("/run/sub.sock", b"example.com")),
    ("/run/sub.sock:a:b,7", spec("/run/sub.sock", b"a:b", modifier1=7)),
    # the addresses module's rules: '@name', a relative path with a '/', an empty host, IPv6
    ("@sub:example.com", spec("@sub", b"example.com")),
    ("run/sub.sock:k", spec("run/sub.sock", b"k")),
    (":3031:k", spec(":3031", b"k")),
    ("[::1]:3031:a:b", spec("[::1]:3031", b"a:b")),
    # announce another address
    ("127.0.0.1:4000=127.0.0.1:3031:k", spec("127.0.0.1:3031", b"k", address=b"127.0.0.1:4000")),
    ("/run/app.sock=/run/sub.sock:k,9", spec("/run/sub.sock", b"k", address=b"/run/app.sock",
                                             modifier1=9)),
    # the name of shared socket N, resolved at send time
    ("=0=127.0.0.1:3031:k", spec("127.0.0.1:3031", b"k", address=b"=0")),
    ("=12=/run/sub.sock:k,3", spec("/run/sub.sock", b"k", address=b"=12", modifier1=3)),
])
def test_subscribe_to_forms(value, expected):
    got = parse_subscribe_to(value)
    assert [s._replace(source="") for s in got] == expected
    assert got[0].source == value


def test_subscribe_to_map_file_forms():
    assert parse_subscribe_to("127.0.0.1:3031:@/etc/keys.map") == MapFileSpec(
        "127.0.0.1:3031", "/etc/keys.map", None, "127.0.0.1:3031:@/etc/keys.map")
    assert parse_subscribe_to("/run/s.sock:@keys,1.map") == MapFileSpec(
        "/run/s.sock", "keys,1.map", None, "/run/s.sock:@keys,1.map")
    assert parse_subscribe_to("10.0.0.1:80=127.0.0.1:1:@m").address == b"10.0.0.1:80"
    assert parse_subscribe_to("=1=127.0.0.1:1:@m").address == b"=1"


@pytest.mark.parametrize("value, why", [
    ("127.0.0.1:3031", "no key"),
    ("127.0.0.1", "no key: expected SERVER:KEY"),
    ("sub.sock:example.com", "a UNIX server starts with '/' or '@'"),
    ("/run/sub.sock", "no key"),
    ("127.0.0.1:3031:", "empty subscription key"),
    ("127.0.0.1:3031:,5", "empty subscription key"),
    ("127.0.0.1:3031:" + "k" * 256, "256 bytes"),
    ("256.1.1.1:3031:k", "neither an IPv4 address nor a host name"),
    ("bad_host!:3031:k", "neither an IPv4 address nor a host name"),
    ("127.0.0.1:0:k", "port 0 cannot be reached"),
    ("127.0.0.1:70000:k", "port out of range"),
    ("127.0.0.1:http:k", "missing port"),
    ("/" + "p" * 120 + ":k", "longer than 107 bytes"),
    ("[::1]3031:k", "expected [ipv6]:port"),
    ("127.0.0.1:3031:k,x", "modifier1 must be a decimal"),
    ("127.0.0.1:3031:k,256", "modifier1 must be a decimal"),
    ("127.0.0.1:3031:k,0,SHA1", "DIGEST:/path"),
    ("127.0.0.1:3031:k,0,NOSUCH:/k.pem", "unknown digest"),
    ("=x=127.0.0.1:3031:k", "not a number"),
    ("=1", "=N=SERVER:KEY"),
    ("127.0.0.1:3031:@", "no map file"),
])
def test_malformed_subscribe_to_is_an_error_naming_the_value(value, why):
    with pytest.raises(SubscribeError) as info:
        parse_subscribe_to(value)
    assert repr(value) in str(info.value) and why in str(info.value)
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------
# --subscribe2

def test_subscribe2_every_key():
    got = parse_subscribe2("server=127.0.0.1:3031,key=example.com,addr=127.0.0.1:4000,socket=1,"
                           "weight=7,modifier1=5,modifier2=3,sign=SHA256:/k.pem,check=/run/maint,"
                           "sni_key=/s.key,sni_crt=/s.crt,sni_ca=/ca.crt")
    assert got._replace(source="") == SubscribeSpec(
        "127.0.0.1:3031", b"example.com", b"127.0.0.1:4000", 5, 3, 7, "SHA256:/k.pem",
        "/run/maint", b"/s.key", b"/s.crt", b"/ca.crt", 1)


def test_subscribe2_defaults_escapes_and_servers():
    got = parse_subscribe2("server=/run/sub.sock,key=a\\,b=c,")
    assert (got.server, got.key, got.address, got.modifier1, got.modifier2, got.weight) == \
        ("/run/sub.sock", b"a,b=c", None, 0, 0, None)
    # no ':' means a UNIX path, relative or abstract too
    assert parse_subscribe2("server=sub.sock,key=k").server == "sub.sock"
    assert parse_subscribe2("key=k,server=@sub").server == "@sub"
    assert parse_subscribe2("server=127.0.0.1:1,key=k,weight=0").weight == 0


@pytest.mark.parametrize("value, why", [
    ("key=k", "'server' is required"),
    ("server=127.0.0.1:1", "'key' is required"),
    ("server=127.0.0.1:1,key=k,wieght=3", "unknown key 'wieght'"),
    ("server=127.0.0.1:1,key=k,weight", "not a key=value pair"),
    ("server=127.0.0.1:1,key=k,addr=", "empty value for 'addr'"),
    ("server=127.0.0.1:1,key=k,modifier2=300", "modifier2 must be a decimal"),
    ("server=127.0.0.1:1,key=k,weight=-1", "weight must be a decimal"),
    ("server=127.0.0.1:1,key=k,socket=a", "socket must be a decimal"),
    ("server=host!:1,key=k", "neither an IPv4 address nor a host name"),
    ("server=127.0.0.1:1,key=k,sign=/k.pem", "DIGEST:/path"),
])
def test_malformed_subscribe2_is_an_error_naming_the_value(value, why):
    with pytest.raises(SubscribeError) as info:
        parse_subscribe2(value)
    assert repr(value) in str(info.value) and why in str(info.value)


# ---------------------------------------------------------------------------
# map files (docs/behaviour.md, "The subscriber side")

def test_map_file_rules():
    m = MapFileSpec("127.0.0.1:1", "keys.map", b"127.0.0.1:4000", "src")
    data = (b"# comment\n\none.example\ntwo.example:8000,5\r\n  \n"
            b"bad,5,SHA1:/k.pem\n" + b"x" * 256 + b"\nlast.example")
    specs, problems = parse_map_file(m, data)
    assert [(s.key, s.modifier1, s.address, s.server) for s in specs] == [
        (b"one.example", 0, b"127.0.0.1:4000", "127.0.0.1:1"),
        (b"two.example:8000", 5, b"127.0.0.1:4000", "127.0.0.1:1"),
        (b"last.example", 0, b"127.0.0.1:4000", "127.0.0.1:1"),
    ]
    assert len(problems) == 2
    assert "keys.map line 6" in problems[0] and "signing is not supported" in problems[0]
    assert "keys.map line 7" in problems[1]
    assert parse_map_file(m, b"") == ([], [])


# ---------------------------------------------------------------------------
# Sending: stand-ins for a server and a reactor

class Receiver:
    """A datagram socket standing in for a subscription server."""

    def __init__(self, directory: Optional[Path] = None, passcred: bool = False):
        if directory is None:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind(("127.0.0.1", 0))
            self.server = "127.0.0.1:%d" % self.sock.getsockname()[1]
        else:
            self.server = support.sock_path(directory, "sub%d.sock" % id(self))
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            if passcred:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self.sock.bind(self.server)

    def get(self, timeout: float = 10.0) -> bytes:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(65536)
        except socket.timeout:
            raise AssertionError("no datagram within %.1f s" % timeout) from None

    def drain(self) -> List[bytes]:
        """Every datagram queued right now (UNIX datagrams are queued by the time sendto returns)."""
        out = []
        self.sock.setblocking(False)
        while True:
            try:
                out.append(self.sock.recv(65536))
            except BlockingIOError:
                return out

    def close(self):
        self.sock.close()


class FakeTimer:
    def __init__(self, when, callback):
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self):
        self.cancelled = True


class FakeReactor:
    """Just what the subscriber uses of a reactor, with a clock the test moves."""

    def __init__(self, now: float = 1000.0):
        self.now = now
        self.timers: List[FakeTimer] = []

    def call_at(self, when, callback):
        timer = FakeTimer(when, callback)
        self.timers.append(timer)
        return timer

    def pending(self) -> List[float]:
        return [t.when for t in self.timers if not t.cancelled]

    def advance(self, now: float) -> None:
        self.now = now
        for timer in list(self.timers):
            if not timer.cancelled and timer.when <= now:
                self.timers.remove(timer)
                timer.callback()


def subscriber(reactor, values, lines=None, **kwargs) -> Subscriber:
    specs = []
    for value in values:
        got = parse_subscribe2(value[3:]) if value.startswith("s2:") else parse_subscribe_to(value)
        specs.extend(got if isinstance(got, list) else [got])
    kwargs.setdefault("default_address", b"127.0.0.1:3031")
    kwargs.setdefault("cores", 1)
    return Subscriber(reactor, specs, log=(lines.append if lines is not None else lambda line: None),
                      **kwargs)


def announcement_vars(packet: bytes) -> dict:
    return dict(parse_vars(packet[4:]))


# ---------------------------------------------------------------------------
# Sending: the bytes

def test_a_reactor_run_sends_the_wire_spec_example_and_unsubscribes_on_stop():
    receiver = Receiver()
    reactor = Reactor()
    lines: List[str] = []
    # the example of docs/wire.md, X being our receiver (the server's name is not in the packet)
    sub = subscriber(reactor, ["%s:example.com" % receiver.server], lines)
    reactor.call_soon(sub.start)
    thread = threading.Thread(target=reactor.run, name="subscriber-reactor", daemon=True)
    thread.start()
    try:
        first = receiver.get()
        t_first = time.monotonic()
        assert first == WIRE_EXAMPLE
        second = receiver.get(timeout=10)          # the round one second after the start
        assert second == WIRE_EXAMPLE and time.monotonic() - t_first > 0.5
    finally:
        reactor.stop()
        thread.join(10)
    assert not thread.is_alive()
    sub.stop()
    unsubscribe = receiver.get()
    assert unsubscribe == WIRE_EXAMPLE[:3] + b"\x01" + WIRE_EXAMPLE[4:]
    assert sub.sent == 3 and sub.errors == 0
    assert lines == ["subscribing to %s:example.com" % receiver.server,
                     "unsubscribing from %s:example.com" % receiver.server]
    sub.stop()                                     # idempotent: nothing more is sent
    reactor.close()
    receiver.sock.settimeout(0)
    with pytest.raises(BlockingIOError):
        receiver.sock.recv(10)
    receiver.close()


def test_rounds_at_start_one_second_later_then_every_freq(sock_dir):
    receiver = Receiver(sock_dir)
    reactor = FakeReactor(now=1000.0)
    sub = subscriber(reactor, ["%s:example.com" % receiver.server], freq=10)
    sub.start()
    assert len(receiver.drain()) == 1 and reactor.pending() == [1001.0]
    reactor.advance(1001.0)
    assert len(receiver.drain()) == 1 and reactor.pending() == [1010.0]
    reactor.advance(1009.9)
    assert receiver.drain() == []
    reactor.advance(1010.0)
    assert len(receiver.drain()) == 1 and reactor.pending() == [1020.0]
    reactor.advance(1045.5)                        # a late loop skips the rounds it missed
    assert len(receiver.drain()) == 1 and reactor.pending() == [1050.0]
    sub.start()                                    # a second start is a no-op
    assert receiver.drain() == []
    sub.stop()
    assert reactor.pending() == []
    (packet,) = receiver.drain()
    assert packet[3] == 1 and sub.rounds == 5


def test_freq_one_announces_every_second(sock_dir):
    receiver = Receiver(sock_dir)
    reactor = FakeReactor(now=0.0)
    sub = subscriber(reactor, ["%s:k" % receiver.server], freq=1)
    sub.start()
    for second in (1.0, 2.0, 3.0):
        assert reactor.pending() == [second]
        reactor.advance(second)
    assert len(receiver.drain()) == 4
    sub.stop(unsubscribe=False)
    assert receiver.drain() == []


def test_vars_order_modifiers_sni_notify_and_instance_figures(sock_dir):
    receiver = Receiver(sock_dir)
    reactor = FakeReactor()
    loads = iter([4, 9])
    sub = subscriber(reactor, ["s2:server=%s,key=k,modifier1=5,modifier2=3,sni_key=/a.key,"
                               "sni_crt=/a.crt,sni_ca=/ca.crt" % receiver.server,
                               "%s:j,17" % receiver.server],
                     cores=8, load=lambda: next(loads), weight=2, notify=b"/run/notify.sock")
    sub.start()
    a, b = receiver.drain()
    assert [name for name, _ in parse_vars(a[4:])] == [
        b"key", b"address", b"modifier1", b"modifier2", b"cores", b"load", b"weight",
        b"sni_key", b"sni_crt", b"sni_ca", b"notify"]
    assert announcement_vars(a) == {
        b"key": b"k", b"address": b"127.0.0.1:3031", b"modifier1": b"5", b"modifier2": b"3",
        b"cores": b"8", b"load": b"4", b"weight": b"2", b"sni_key": b"/a.key",
        b"sni_crt": b"/a.crt", b"sni_ca": b"/ca.crt", b"notify": b"/run/notify.sock"}
    assert announcement_vars(b)[b"modifier1"] == b"17" and announcement_vars(b)[b"load"] == b"4"
    reactor.advance(reactor.now + 1)               # load() is asked once per round
    assert {announcement_vars(p)[b"load"] for p in receiver.drain()} == {b"9"}
    # --subscribe-with-modifier1 overrides every spec's
    sub2 = subscriber(reactor, ["%s:j,17" % receiver.server], modifier1=30)
    sub2.start()
    (c,) = receiver.drain()
    assert announcement_vars(c)[b"modifier1"] == b"30"


def test_subscribe2_weight_applies_to_its_own_subscription_only(sock_dir):
    receiver = Receiver(sock_dir)
    reactor = FakeReactor()
    sub = subscriber(reactor, ["s2:server=%s,key=heavy,weight=7" % receiver.server,
                               "%s:plain" % receiver.server], weight=0)
    sub.start()
    reactor.advance(reactor.now + 1)
    weights = [(announcement_vars(p)[b"key"], announcement_vars(p)[b"weight"]) for p in receiver.drain()]
    # uWSGI 2.0.31 would leak weight 7 into "plain" from the second round on
    assert weights == [(b"heavy", b"7"), (b"plain", b"0")] * 2


def test_addresses_explicit_shared_socket_and_none(sock_dir):
    receiver = Receiver(sock_dir)
    reactor = FakeReactor()
    lines: List[str] = []
    srv = receiver.server
    sub = subscriber(reactor, ["127.0.0.1:4000=%s:explicit" % srv, "=1=%s:shared" % srv,
                               "=5=%s:noshared" % srv, "s2:server=%s,key=sock,socket=2" % srv,
                               "s2:server=%s,key=nosock,socket=9,addr=/run/x.sock" % srv,
                               "%s:default" % srv],
                     lines, default_address=None,
                     resolve_shared={1: b"127.0.0.1:5001"}.get,
                     resolve_socket={2: b"/run/app2.sock"}.get)
    sub.start()
    got = [(announcement_vars(p)[b"key"], announcement_vars(p)[b"address"]) for p in receiver.drain()]
    assert got == [(b"explicit", b"127.0.0.1:4000"), (b"shared", b"127.0.0.1:5001"),
                   (b"sock", b"/run/app2.sock"), (b"nosock", b"/run/x.sock")]
    warnings = [line for line in lines if line.startswith("[uwsgi-subscriber]")]
    assert len(warnings) == 2
    assert "no socket to announce: 1 subscription(s)" in warnings[0] and ":default" in warnings[0]
    assert "no shared socket 5" in warnings[1]
    reactor.advance(reactor.now + 1)               # the same problems are not logged again
    assert len(receiver.drain()) == 4
    assert len([line for line in lines if line.startswith("[uwsgi-subscriber]")]) == 2


def test_map_file_is_read_every_round(sock_dir):
    receiver = Receiver(sock_dir)
    reactor = FakeReactor()
    lines: List[str] = []
    mapfile = sock_dir / "keys.map"
    sub = subscriber(reactor, ["%s:@%s" % (receiver.server, mapfile)], lines)
    sub.start()                                    # no file yet: nothing sent, one log line
    assert receiver.drain() == []
    assert any("cannot read subscription map file %s" % mapfile in line for line in lines)
    mapfile.write_bytes(b"one.example\n# two.example\ntwo.example,5")
    reactor.advance(reactor.now + 1)
    got = [(announcement_vars(p)[b"key"], announcement_vars(p)[b"modifier1"]) for p in receiver.drain()]
    assert got == [(b"one.example", b"0"), (b"two.example", b"5")]
    mapfile.write_bytes(b"three.example\nbad,1,SHA1:/k\n")
    reactor.advance(reactor.now + 10)
    assert [announcement_vars(p)[b"key"] for p in receiver.drain()] == [b"three.example"]
    assert any("skipped: %s line 2" % mapfile in line for line in lines)
    sub.stop()
    assert [(p[3], announcement_vars(p)[b"key"]) for p in receiver.drain()] == [(1, b"three.example")]


def test_check_file_suspends_the_announce(sock_dir):
    receiver = Receiver(sock_dir)
    reactor = FakeReactor()
    flag = sock_dir / "maintenance"
    sub = subscriber(reactor, ["s2:server=%s,key=k,check=%s" % (receiver.server, flag),
                               "%s:other" % receiver.server])
    flag.write_text("")
    sub.start()
    assert [announcement_vars(p)[b"key"] for p in receiver.drain()] == [b"other"]
    flag.unlink()
    reactor.advance(reactor.now + 1)
    assert [announcement_vars(p)[b"key"] for p in receiver.drain()] == [b"k", b"other"]


def test_send_errors_are_counted_logged_once_and_the_round_goes_on(sock_dir):
    receiver = Receiver(sock_dir)
    reactor = FakeReactor()
    lines: List[str] = []
    missing = str(sock_dir / "nobody.sock")
    sub = subscriber(reactor, ["%s:lost" % missing, "%s:kept" % receiver.server], lines)
    sub.start()
    reactor.advance(reactor.now + 1)
    assert [announcement_vars(p)[b"key"] for p in receiver.drain()] == [b"kept", b"kept"]
    assert sub.errors == 2 and sub.sent == 2
    failures = [line for line in lines if "unable to send" in line]
    assert failures == ["[uwsgi-subscriber] unable to send a subscription packet to %s: "
                        "No such file or directory" % missing]
    reactor.advance(reactor.now + 70)              # a minute later it is logged again
    assert len([line for line in lines if "unable to send" in line]) == 2


def test_unix_datagrams_carry_credentials_when_asked(sock_dir):
    receiver = Receiver(sock_dir, passcred=True)
    sub = subscriber(FakeReactor(), ["%s:k" % receiver.server], credentials=True)
    sub.start()
    receiver.sock.settimeout(5)
    data, ancdata, _, _ = receiver.sock.recvmsg(4096, socket.CMSG_SPACE(12))
    assert announcement_vars(data)[b"key"] == b"k"
    creds = [struct.unpack("3i", payload[:12]) for level, kind, payload in ancdata
             if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
    assert creds == [(os.getpid(), os.getuid(), os.getgid())]


# ---------------------------------------------------------------------------
# Signing

OPENSSL = shutil.which("openssl")


@pytest.fixture(scope="module")
def keypair(tmp_path_factory):
    """An RSA key made by openssl: (private key path, directory of public keys)."""
    if OPENSSL is None:
        support._missing("the openssl command is not installed")
    d = support.short_dir(tmp_path_factory.mktemp("subkeys"))
    private = d / "private.pem"
    subprocess.run([OPENSSL, "genrsa", "-out", str(private), "2048"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    public_dir = d / "public"
    public_dir.mkdir()
    subprocess.run([OPENSSL, "rsa", "-in", str(private), "-pubout", "-out",
                    str(public_dir / "example.com.pem")], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    return private, public_dir


def test_signed_announces_verify_with_the_public_key_and_openssl(sock_dir, keypair):
    private, public_dir = keypair
    receiver = Receiver(sock_dir)
    reactor = FakeReactor()
    sub = subscriber(reactor, ["%s:example.com,0,SHA1:%s" % (receiver.server, private)],
                     wall_clock=lambda: 1700000000.7)
    sub.start()
    sub.stop()
    announce, unsubscribe = receiver.drain()
    checker = SignatureChecker("SHA1:%s" % public_dir, lambda path: Path(path).read_bytes())
    a, u = parse_announcement(announce), parse_announcement(unsubscribe)
    assert (a.unix, a.unsubscribe, u.unix, u.unsubscribe) == (1700000000, False, 1700000001, True)
    assert checker.check_reason(a) is None and checker.check_reason(u) is None
    assert [name for name, _ in parse_vars(announce[4:])][-2:] == [b"unix", b"sign"]
    (sock_dir / "base").write_bytes(a.signed_part)
    (sock_dir / "sig").write_bytes(a.sign)
    ok = subprocess.run([OPENSSL, "dgst", "-sha1", "-verify", str(public_dir / "example.com.pem"),
                         "-signature", str(sock_dir / "sig"), str(sock_dir / "base")],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert ok.returncode == 0 and b"Verified OK" in ok.stdout


SECRET = b"a-shared-secret-of-32-bytes-long"


def test_hmac_announces_verify_with_the_shared_key(sock_dir):
    receiver = Receiver(sock_dir)
    reactor = FakeReactor()
    sub = subscriber(reactor, ["%s:example.com" % receiver.server], hmac_key=SECRET,
                     wall_clock=lambda: 1700000000.7)
    sub.start()
    sub.stop()
    announce, unsubscribe = receiver.drain()
    checker = HmacChecker(SECRET)
    a, u = parse_announcement(announce), parse_announcement(unsubscribe)
    assert (a.unix, a.unsubscribe, u.unix, u.unsubscribe) == (1700000000, False, 1700000001, True)
    assert checker.check_reason(a) is None and checker.check_reason(u) is None
    assert [name for name, _ in parse_vars(announce[4:])][-2:] == [b"unix", b"hmac"]
    assert not HmacChecker(b"another-secret-of-some-length").check(a)


def test_hmac_and_rsa_together_each_verify(sock_dir, keypair):
    private, public_dir = keypair
    receiver = Receiver(sock_dir)
    reactor = FakeReactor()
    sub = subscriber(reactor, ["%s:example.com,0,SHA1:%s" % (receiver.server, private)],
                     hmac_key=SECRET, wall_clock=lambda: 1700000000.7)
    sub.start()
    sub.stop(unsubscribe=False)
    (announce,) = receiver.drain()
    a = parse_announcement(announce)
    assert [name for name, _ in parse_vars(announce[4:])][-3:] == [b"unix", b"hmac", b"sign"]
    rsa = SignatureChecker("SHA1:%s" % public_dir, lambda path: Path(path).read_bytes())
    assert rsa.check(a) and HmacChecker(SECRET).check(a)


def test_an_announce_that_cannot_be_signed_is_not_sent(sock_dir):
    receiver = Receiver(sock_dir)
    reactor = FakeReactor()
    lines: List[str] = []
    missing = sock_dir / "missing.pem"
    sub = subscriber(reactor, ["%s:k,0,SHA1:%s" % (receiver.server, missing)], lines)
    sub.start()
    reactor.advance(reactor.now + 1)
    assert receiver.drain() == [] and sub.errors == 2 and sub.sent == 0
    assert len([line for line in lines if "cannot sign with %s" % missing in line]) == 1


# ---------------------------------------------------------------------------
# Interop: real uWSGI

APP = """
def application(environ, start_response):
    start_response('200 OK', [('Content-Type', 'text/plain')])
    return [b'uwsgi-app']
"""


class RunningSubscriber:
    """A Subscriber on a Reactor in a thread; :meth:`stop` unsubscribes after the loop ends."""

    def __init__(self, specs, **kwargs):
        self.lines: List[str] = []
        self.reactor = Reactor()
        self.sub = Subscriber(self.reactor, specs, log=self.lines.append, **kwargs)
        self.reactor.call_soon(self.sub.start)
        self.thread = threading.Thread(target=self.reactor.run, name="subscriber", daemon=True)
        self.thread.start()

    def stop(self, unsubscribe: bool = True) -> None:
        if self.thread is None:
            return
        self.reactor.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.thread = None
        self.sub.stop(unsubscribe=unsubscribe)
        self.reactor.close()


def start_uwsgi_router(sock_dir: Path, *extra: str) -> support.Proc:
    """The real uWSGI FastRouter on UNIX sockets: .listen, .sub (datagram), .stats."""
    listen = support.sock_path(sock_dir, "fr.sock")
    sub = support.sock_path(sock_dir, "frsub.sock")
    stats = support.sock_path(sock_dir, "frstats.sock")
    argv = [support.uwsgi_bin(), "--master", "--die-on-term", "--fastrouter", listen,
            "--fastrouter-subscription-server", sub, "--fastrouter-stats", stats] + list(extra)
    proc = support.Proc(argv, env=support._child_env(None), name="uwsgi-fastrouter-reference")
    proc.wait_for_log(r"uWSGI fastrouter bound on %s fd" % listen, timeout=20)
    proc.wait_for_log(r"subscription server bound on %s fd" % sub, timeout=20)
    proc.wait_for_log(support.STATS_RE.pattern, timeout=20)
    proc.listen, proc.sub, proc.stats = listen, sub, stats
    return proc


def nodes_of(stats_address: str, key: str) -> list:
    doc = support.fetch_stats(stats_address)
    return [node for pool in doc.get("subscriptions", []) if pool["key"] == key
            for node in pool["nodes"]]


@pytest.mark.interop
def test_a_real_uwsgi_fastrouter_accepts_our_announces_and_routes(sock_dir):
    router = start_uwsgi_router(sock_dir)
    with RecordingBackend("ours") as backend:
        running = RunningSubscriber(parse_subscribe_to("%s:example.com,5" % router.sub),
                                    default_address=backend.address.encode(), cores=4, weight=2)
        try:
            router.wait_for_log(r"\] example.com => new node: %s" % backend.address)
            answer = request(router.listen, HOST)
            assert b"node=ours host=example.com" in answer
            assert backend.requests[0].modifier1 == 5
            (node,) = nodes_of(router.stats, "example.com")
            assert (node["name"], node["modifier1"], node["cores"], node["weight"],
                    node["requests"]) == (backend.address, 5, 4, 2, 1)
        finally:
            running.stop()
        router.wait_for_log(r"example.com => marking %s as failed" % backend.address)
        assert request(router.listen, HOST) == b""


@pytest.mark.interop
def test_our_datagrams_are_byte_for_byte_those_of_a_real_uwsgi_instance(tmp_path, keypair):
    private, _ = keypair
    receiver = Receiver()
    values = ["%s:example.com" % receiver.server,
              "%s:example.com:8000,5" % receiver.server,
              "%s:example.com,0,SHA1:%s" % (receiver.server, private)]
    app = support.start_uwsgi_app(
        tmp_path, APP, socket="127.0.0.1:0",
        extra=[arg for v in values for arg in ("--subscribe-to", v)]
        + ["--subscribe2", "server=%s,key=two.example,modifier1=7,modifier2=2" % receiver.server])
    theirs = [receiver.get(timeout=30) for _ in range(4)]
    # its second round, a second later (stopping uWSGI before it takes 10 s)
    assert [receiver.get(timeout=30)[:3] for _ in range(4)] == [p[:3] for p in theirs]
    app.stop()
    receiver.drain()                               # its later rounds and its unsubscribes
    signed = parse_announcement(theirs[2])
    assert signed.sign is not None
    specs = [s for v in values for s in parse_subscribe_to(v)]
    specs.append(parse_subscribe2("server=%s,key=two.example,modifier1=7,modifier2=2" % receiver.server))
    reactor = FakeReactor()
    # same figures as that instance: 1 process x 1 core, an idle listen queue, weight 0,
    # and the signer's clock at the second uWSGI signed in
    ours = Subscriber(reactor, specs, default_address=app.address.encode(), cores=1,
                      wall_clock=lambda: signed.unix, log=lambda line: None)
    ours.start()
    ours.stop(unsubscribe=False)
    mine = [receiver.get(timeout=5) for _ in range(4)]
    assert mine == theirs


@pytest.mark.interop
def test_signed_announces_are_accepted_by_uwsgi_and_by_our_router(sock_dir, keypair):
    private, public_dir = keypair
    check = ["--subscriptions-sign-check", "SHA1:%s" % public_dir]
    reference = start_uwsgi_router(sock_dir, *check)
    sub = support.sock_path(sock_dir, "oursub.sock")
    ours = support.start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-subscription-server",
                                 sub, "--fastrouter-stats", "127.0.0.1:0"] + check)
    ours.wait_for_log(r"subscription server bound on")
    with RecordingBackend("signed") as signed_backend, RecordingBackend("unsigned") as other:
        # an unsigned announce first: both routers refuse it, ours says why
        unsigned = RunningSubscriber(
            parse_subscribe_to("%s:example.com" % sub) + parse_subscribe_to("%s:example.com" % reference.sub),
            default_address=other.address.encode())
        try:
            if not support.reference_mode():
                ours.wait_for_log(r"dropped subscription datagram.*unsigned subscription packet "
                                  r"for example.com")
        finally:
            unsigned.stop(unsubscribe=False)
        signed = RunningSubscriber(
            parse_subscribe_to("%s:example.com,0,SHA1:%s" % (sub, private))
            + parse_subscribe_to("%s:example.com,0,SHA1:%s" % (reference.sub, private)),
            default_address=signed_backend.address.encode())
        try:
            for router in (ours, reference):
                router.wait_for_log(r"\] example.com => new node: %s" % signed_backend.address)
            assert b"node=signed" in request(ours.addresses[0], HOST)
            assert b"node=signed" in request(reference.listen, HOST)
            for stats in (ours.stats_address, reference.stats):
                assert [n["name"] for n in nodes_of(stats, "example.com")] == [signed_backend.address]
        finally:
            signed.stop()
        # the signed unsubscribe (unix = now + 1) is accepted too
        for router in (ours, reference):
            router.wait_for_log(r"example.com => marking %s as failed" % signed_backend.address)
    assert other.count == 0


@pytest.mark.interop
def test_a_real_uwsgi_router_ignores_the_hmac_var_and_verifies_the_signature_over_it(
        sock_dir, keypair):
    """The shared-key proof is invisible to a uWSGI 2.0 router: an announce carrying
    hmac and an RSA signature is accepted by one that checks signatures."""
    private, public_dir = keypair
    reference = start_uwsgi_router(sock_dir, "--subscriptions-sign-check", "SHA1:%s" % public_dir)
    with RecordingBackend("both") as backend:
        running = RunningSubscriber(
            parse_subscribe_to("%s:example.com,0,SHA1:%s" % (reference.sub, private)),
            default_address=backend.address.encode(), hmac_key=SECRET)
        try:
            reference.wait_for_log(r"\] example.com => new node: %s" % backend.address)
            assert b"node=both" in request(reference.listen, HOST)
        finally:
            running.stop()
        reference.wait_for_log(r"example.com => marking %s as failed" % backend.address)
