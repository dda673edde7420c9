"""tlsnode.py in one process: the policy, the start-up checks and one link's relay
methods, against an in-process TLS server on a socket pair (certificates made with
openssl, see support.make_pki)."""

from __future__ import annotations

import os
import socket
import ssl
import tempfile
from types import SimpleNamespace

import pytest

from support import make_pki
from uwsgi_fastrouter.bodybuffer import BufferedBody
from uwsgi_fastrouter.options import StartupError, load_config
from uwsgi_fastrouter.reactor import READ
from uwsgi_fastrouter.router import Route
from uwsgi_fastrouter.tlsnode import READ_LIMIT, RECORD, NodeTls, client_context
from uwsgi_fastrouter.validation import node_tls


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


class SoonReactor:
    """Only what a link uses of the loop: call_soon, run by hand."""

    def __init__(self):
        self.soon = []

    def call_soon(self, callback, *args):
        self.soon.append((callback, args))

    def run_soon(self):
        soon, self.soon = self.soon, []
        for callback, args in soon:
            callback(*args)


def handshaken(pki, **context_args):
    """A connected (client link, server SSLSocket) pair over a socket pair."""
    client_sock, server_sock = socket.socketpair()
    client_sock.setblocking(False)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(pki / "node.crt"), str(pki / "node.key"))
    server = server_ctx.wrap_socket(server_sock, server_side=True, do_handshake_on_connect=False)
    server.setblocking(False)
    reactor = SoonReactor()
    called = []
    policy = NodeTls(lambda: client_context(cafile=str(pki / "ca.crt"), **context_args))
    link = policy.link(client_sock, reactor, lambda: called.append(True))
    client_done = server_done = False
    for _ in range(100):
        if not client_done:
            client_done = link.handshake() == 0
        if not server_done:
            try:
                server.do_handshake()
                server_done = True
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
        if client_done and server_done:
            break
    assert client_done and server_done
    server.setblocking(True)
    reactor.called = called
    return link, server, reactor


def read_everything(link, size, take):
    """Peek/consume like the session's relay, the client taking *take* bytes at a time
    (after each peek the relay consumes what the client took, or calls none_taken)."""
    buf = bytearray(65540)
    got = bytearray()
    while len(got) < size:
        n = link.recv_into(buf, 65536, socket.MSG_PEEK)
        assert 0 < n <= READ_LIMIT
        taken = min(take, n)
        got += buf[:taken]
        assert link.recv_into(buf, taken, socket.MSG_TRUNC) == taken
    return bytes(got)


def test_policy_picks_listed_addresses_and_proto_s_nodes():
    policy = NodeTls(lambda: None, [b"10.0.0.1:3031"])
    assert policy.wanted(Route(b"10.0.0.1:3031"))
    assert not policy.wanted(Route(b"10.0.0.2:3031"))
    assert policy.wanted(Route(b"10.0.0.2:3031", node=SimpleNamespace(proto=b"s")))
    assert not policy.wanted(Route(b"10.0.0.2:3031", node=SimpleNamespace(proto=b"h")))
    assert not policy.wanted(Route(b"10.0.0.2:3031", node=SimpleNamespace(proto=None)))


def test_handshake_waits_for_readiness_and_then_relays_both_ways(pki):
    client_sock, server_sock = socket.socketpair()
    client_sock.setblocking(False)
    link = NodeTls(lambda: client_context(cafile=str(pki / "ca.crt"))).link(
        client_sock, SoonReactor(), lambda: None)
    assert link.handshake() == READ          # the ClientHello went out, the answer is awaited
    server_sock.close()
    with pytest.raises(OSError):
        for _ in range(10):
            link.handshake()
    link.close()
    link, server, _ = handshaken(pki)
    assert link.send(b"head") == 4
    assert server.recv(4) == b"head"
    with pytest.raises(BlockingIOError):
        link.recv_into(bytearray(10), 10)
    server.sendall(b"answer")
    buf = bytearray(10)
    assert link.recv_into(buf, 10) == 6 and bytes(buf[:6]) == b"answer"
    server.close()
    assert link.recv_into(buf, 10) == 0      # end of stream
    link.close()
    link.close()


@pytest.mark.parametrize("take", [1, 1000, RECORD, 65536])
def test_peek_and_consume_keep_what_the_client_did_not_take(pki, take):
    link, server, _ = handshaken(pki)
    data = os.urandom(100000)
    server.sendall(data)
    assert read_everything(link, len(data), take) == data
    assert link.held is None
    link.close()


def test_a_peek_the_client_took_nothing_of_is_held(pki):
    link, server, _ = handshaken(pki)
    server.sendall(b"x" * 5000 + b"y" * 5000)
    buf = bytearray(65540)
    n = link.recv_into(buf, 65536, socket.MSG_PEEK)
    assert n == 10000
    link.none_taken()
    buf[:n] = b"z" * n                       # the scratch buffer is reused by others
    assert link.buffered()
    assert link.recv_into(buf, 65536, socket.MSG_PEEK) == n and bytes(buf[:n]) == b"x" * 5000 + b"y" * 5000
    link.close()


def test_bytes_left_in_openssl_after_a_small_read_are_announced_once(pki):
    link, server, reactor = handshaken(pki)
    server.sendall(b"a" * 3000)
    buf = bytearray(100)
    assert link.recv_into(buf, 100) == 100
    assert link.buffered() and len(reactor.soon) == 1
    assert link.recv_into(buf, 100) == 100
    assert len(reactor.soon) == 1            # one call is pending already
    reactor.run_soon()
    assert reactor.called == [True]
    link.recv_into(bytearray(RECORD), RECORD)
    assert not link.buffered()
    reactor.run_soon()
    link.close()


def test_a_post_buffered_body_file_is_sent_piece_by_piece(pki):
    link, server, _ = handshaken(pki)
    data = os.urandom(200000)
    body_file = tempfile.TemporaryFile()
    body_file.write(data)
    body_file.flush()
    body = BufferedBody(bytearray(), 0, body_file, len(data))
    server.setblocking(False)
    got = bytearray()
    while not body.all_sent:
        try:
            link.send_file(body)
        except BlockingIOError:
            assert link.piece is not None    # the same bytes are offered again
        while True:
            try:
                got += server.recv(65536)
            except ssl.SSLWantReadError:
                break
    while len(got) < len(data):
        try:
            got += server.recv(65536)
        except ssl.SSLWantReadError:
            break
    assert bytes(got) == data
    body.close()
    link.close()


def _cfg(*argv):
    return load_config(["--fastrouter", "127.0.0.1:0", *map(str, argv)], {})


def test_start_up_checks(pki, tmp_path):
    assert node_tls(_cfg(), subscriptions=False) is None
    assert node_tls(_cfg(), subscriptions=True) is not None
    policy = node_tls(_cfg("--fastrouter-tls-node", "127.0.0.1:1", "--fastrouter-tls-ca", pki / "ca.crt",
                           "--fastrouter-tls-cert", pki / "client.crt",
                           "--fastrouter-tls-key", pki / "client.key"), subscriptions=False)
    assert policy.addresses == {b"127.0.0.1:1"}
    assert policy.context.verify_mode == ssl.CERT_REQUIRED and not policy.context.check_hostname
    named = node_tls(_cfg("--fastrouter-tls-node", "x:1", "--fastrouter-tls-server-name", "node.test"),
                     subscriptions=False)
    assert named.context.check_hostname and named.server_name == "node.test"
    loose = node_tls(_cfg("--fastrouter-tls-node", "x:1", "--fastrouter-tls-no-verify"), subscriptions=False)
    assert loose.context.verify_mode == ssl.CERT_NONE
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    for argv, message in (
            (["--fastrouter-tls-key", pki / "client.key"], "needs --fastrouter-tls-cert"),
            (["--fastrouter-tls-no-verify", "--fastrouter-tls-ca", pki / "ca.crt"], "contradict"),
            (["--fastrouter-tls-ca", tmp_path / "missing.pem"], "unable to load the CA file"),
            (["--fastrouter-tls-ca", tmp_path / "junk.pem"], "unable to load the CA file"),
            (["--fastrouter-tls-cert", pki / "client.crt", "--fastrouter-tls-key", pki / "node.key"],
             "unable to load the client certificate")):
        with pytest.raises(StartupError, match=message):
            node_tls(_cfg(*argv), subscriptions=False)


@pytest.mark.parametrize("mode", [[], ["--master"]], ids=["single", "master"])
def test_a_bad_tls_file_stops_the_start_before_anything_is_bound(sock_dir, mode):
    from support import Proc, router_argv, wait_until
    (sock_dir / "junk.pem").write_text("not a certificate\n")
    proc = Proc(router_argv(mode + ["--fastrouter", os.path.join(sock_dir, "r.sock"),
                                    "--fastrouter-to", "127.0.0.1:9", "--fastrouter-tls-node", "127.0.0.1:9",
                                    "--fastrouter-tls-ca", sock_dir / "junk.pem"]))
    wait_until(lambda: not proc.alive(), timeout=20, what="the router to give up")
    assert proc.returncode == 1
    log = proc.log()
    assert "TLS to nodes: unable to load the CA file %s" % (sock_dir / "junk.pem") in log
    assert "bound on" not in log and "Traceback" not in log


def test_a_router_without_tls_nodes_does_not_load_ssl():
    # OpenSSL costs every process about 1.5 MiB: it is loaded at the first TLS use only.
    import subprocess
    import sys
    code = ("import sys, uwsgi_fastrouter.cli, uwsgi_fastrouter.runtime, uwsgi_fastrouter.session;"
            "print('ssl' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, timeout=60,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    assert out.stdout.strip() == b"False"
