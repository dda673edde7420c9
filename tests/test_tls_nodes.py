"""TLS to nodes, end to end against real uWSGI 2.0.31 ``--suwsgi-socket`` nodes.

The certificates are made here with the ``openssl`` command: a CA, a node certificate
for ``node.test`` and 127.0.0.1 signed by it, a client certificate signed by it, and a
second CA that signed nothing the nodes use.  A node started with a client CA
prefixed by ``!`` refuses clients without a certificate signed by that CA (uWSGI's
rule for the fifth field of ``--suwsgi-socket``).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from support import (
    connect,
    fetch_stats,
    http_status_and_body,
    json_answer,
    make_pki,
    node_app_source,
    payload,
    request_vars,
    sock_path,
    start_router,
    start_uwsgi_app,
    uwsgi_bin,
    uwsgi_packet,
    uwsgi_request,
    wait_until,
)

pytestmark = pytest.mark.interop

MASTER = pytest.mark.parametrize("master", [[], ["--master"]], ids=["single", "master"])


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    directory = make_pki(tmp_path_factory.mktemp("pki"))
    if b"suwsgi-socket" not in subprocess.run([uwsgi_bin(), "--help"], stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, timeout=60).stdout:
        pytest.skip("this uWSGI was built without SSL (no --suwsgi-socket): install libssl-dev "
                    "and build it again")
    return directory


def tls_node(tmp_path, pki: Path, name: str, client_ca: bool = False):
    """A real uWSGI node speaking uwsgi over TLS on a free port; with *client_ca* it
    requires a client certificate signed by the test CA."""
    spec = "127.0.0.1:0,%s,%s" % (pki / "node.crt", pki / "node.key")
    if client_ca:
        spec += ",HIGH,!%s" % (pki / "ca.crt")
    return start_uwsgi_app(tmp_path, node_app_source(name), socket=spec,
                           socket_option="--suwsgi-socket")


def tls_args(pki: Path, *, ca: str = "ca", client_cert: bool = True):
    args = ["--fastrouter-tls-ca", pki / (ca + ".crt")]
    if client_cert:
        args += ["--fastrouter-tls-cert", pki / "client.crt", "--fastrouter-tls-key", pki / "client.key"]
    return args


def get(router, host="example.com", path="/", timeout=30):
    return uwsgi_request(router.addresses[0], request_vars(host, path=path), timeout=timeout)


def check_small_large_and_post(router) -> None:
    """GET a small answer and a 5 MiB one, POST a 1 MiB body and an empty one."""
    doc = json_answer(get(router))
    assert doc["node"] == "T" and doc["host"] == "example.com"
    size = 5 * 1024 * 1024
    status, data = http_status_and_body(get(router, path="/download/%d" % size))
    assert status == 200 and len(data) == size and data == payload(size)
    body = payload(1024 * 1024, seed=b"upload")
    doc = json_answer(uwsgi_request(router.addresses[0],
                                    request_vars("example.com", method="POST", body_length=len(body)),
                                    body=body, timeout=30))
    assert doc["length"] == len(body) and doc["sha256"] == hashlib.sha256(body).hexdigest()
    doc = json_answer(uwsgi_request(router.addresses[0],
                                    request_vars("example.com", method="POST", body_length=0)))
    assert doc["length"] == 0


@MASTER
def test_static_tls_node_with_client_certificate(tmp_path, pki, master):
    node = tls_node(tmp_path, pki, "T", client_ca=True)
    router = start_router(["--fastrouter", sock_path(tmp_path, "fr.sock"),
                           "--fastrouter-to", node.address, "--fastrouter-tls-node", node.address,
                           *tls_args(pki)] + master)
    check_small_large_and_post(router)
    assert "unable to connect" not in router.log()


@pytest.mark.parametrize("buffer_size", ["512", "1000"])
def test_reads_smaller_than_a_record_relay_everything(tmp_path, pki, buffer_size):
    """Relay reads smaller than a TLS record leave decrypted bytes in OpenSSL, which
    the selector cannot see: they must still reach the client, to the last byte."""
    node = tls_node(tmp_path, pki, "T")
    router = start_router(["--fastrouter", sock_path(tmp_path, "fr.sock"),
                           "--fastrouter-to", node.address, "--fastrouter-tls-node", node.address,
                           "--fastrouter-buffer-size", buffer_size, *tls_args(pki, client_cert=False)])
    for size in (20000, 3 * 1024 * 1024 + 7):
        status, data = http_status_and_body(get(router, path="/download/%d" % size))
        assert status == 200 and len(data) == size and data == payload(size)


@MASTER
def test_post_buffered_bodies_to_a_tls_node(tmp_path, pki, master):
    """Post-buffered bodies, in memory and in a temporary file (which sendfile cannot
    encrypt), reach a TLS node intact."""
    node = tls_node(tmp_path, pki, "T")
    router = start_router(["--fastrouter", sock_path(tmp_path, "fr.sock"),
                           "--fastrouter-to", node.address, "--fastrouter-tls-node", node.address,
                           "--fastrouter-post-buffering", "4096",
                           "--fastrouter-post-buffering-dir", tmp_path,
                           *tls_args(pki, client_cert=False)] + master)
    for length in (1000, 3 * 1024 * 1024 + 1):
        body = payload(length, seed=b"buffered")
        doc = json_answer(uwsgi_request(router.addresses[0],
                                        request_vars("example.com", method="POST", body_length=length),
                                        body=body, timeout=30))
        assert doc["length"] == length and doc["sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("why, args, line", [
    ("wrong CA", lambda pki: tls_args(pki, ca="otherca"),
     r"TLS certificate verification failed: (self.signed|unable to get local issuer)"),
    ("wrong name", lambda pki: tls_args(pki) + ["--fastrouter-tls-server-name", "other.test"],
     r"TLS certificate verification failed: .*(mismatch|other\.test)"),
], ids=["wrong-ca", "wrong-name"])
def test_a_node_that_fails_verification_is_a_failed_connect(tmp_path, pki, why, args, line):
    """The request goes to the next node (here a plain one, which serves it), and the
    TLS node's failure is logged with its reason; without another node the client is
    closed without a byte."""
    node = tls_node(tmp_path, pki, "T")
    plain = start_uwsgi_app(tmp_path, node_app_source("P"))
    router = start_router(["--fastrouter", sock_path(tmp_path, "fr.sock"),
                           "--fastrouter-to", node.address, "--fastrouter-tls-node", node.address,
                           "--fastrouter-fallback", plain.address, *args(pki)])
    assert json_answer(get(router))["node"] == "P"
    router.wait_for_log(r'unable to connect\(\) to node "%s" \(0 retries\): %s' % (node.address, line))
    alone = start_router(["--fastrouter", sock_path(tmp_path, "alone.sock"),
                          "--fastrouter-to", node.address, "--fastrouter-tls-node", node.address,
                          *args(pki)])
    assert get(alone) == b""
    alone.wait_for_log(line)


@MASTER
def test_a_tls_node_given_by_host_name_is_reached_over_tls(tmp_path, pki, master):
    # --fastrouter-tls-node localhost:PORT must cover the addresses the name resolves to:
    # the routes carry those, never the name.
    node = tls_node(tmp_path, pki, "T")
    named = "localhost:%s" % node.address.rsplit(":", 1)[1]
    router = start_router(["--fastrouter", sock_path(tmp_path, "fr.sock"),
                           "--fastrouter-to", named, "--fastrouter-tls-node", named,
                           *tls_args(pki, client_cert=False)] + master)
    wait_until(lambda: get_node_or_none(router) == "T", timeout=20, what="an answer over TLS")


def get_node_or_none(router):
    try:
        return json_answer(get(router, timeout=10))["node"]
    except Exception:
        return None


def test_right_server_name_is_sent_and_checked(tmp_path, pki):
    node = tls_node(tmp_path, pki, "T")
    router = start_router(["--fastrouter", sock_path(tmp_path, "fr.sock"),
                           "--fastrouter-to", node.address, "--fastrouter-tls-node", node.address,
                           "--fastrouter-tls-server-name", "node.test", *tls_args(pki, client_cert=False)])
    assert json_answer(get(router))["node"] == "T"


def test_node_requiring_a_client_certificate_refuses_a_router_without_one(tmp_path, pki):
    """The node closes the TLS connection (a log line, the client gets nothing), and
    other clients, to another node, are still served."""
    node = tls_node(tmp_path, pki, "T", client_ca=True)
    plain = start_uwsgi_app(tmp_path, node_app_source("P"))
    sub = str(tmp_path / "sub.sock")
    router = start_router(["--fastrouter", sock_path(tmp_path, "fr.sock"),
                           "--fastrouter-subscription-server", sub,
                           "--fastrouter-tls-node", node.address, *tls_args(pki, client_cert=False)])
    start_router(["--subscribe2", "server=%s,key=tls.test,addr=%s" % (sub, node.address),
                  "--subscribe2", "server=%s,key=plain.test,addr=%s" % (sub, plain.address),
                  "--subscribe-freq", "1"], listeners=0)
    router.wait_for_log(r"plain\.test")
    router.wait_for_log(r"tls\.test")
    assert get(router, host="tls.test") == b""
    # The node's alert after the handshake (TLS 1.3 checks the client's certificate
    # then), or its close during the handshake, whichever the router sees first.
    node_line = re.escape(node.address)
    router.wait_for_log(r'(key: tls\.test .*node: %s\] error (reading from|writing to) node: .*'
                        r'(certificate required|reset by peer|Broken pipe)'
                        r'|unable to connect\(\) to node "%s" .*TLS handshake failed)' % (node_line, node_line))
    assert json_answer(get(router, host="plain.test"))["node"] == "P"


@MASTER
def test_subscribed_node_announcing_proto_s_is_reached_over_tls(tmp_path, pki, master):
    """Our subscriber announces proto=s (uWSGI 2.1's letter for TLS nodes); the router
    reaches that node over TLS with no --fastrouter-tls-node, and the plain node of the
    same key in plain uwsgi."""
    node = tls_node(tmp_path, pki, "T", client_ca=True)
    plain = start_uwsgi_app(tmp_path, node_app_source("P"))
    sub = str(tmp_path / "sub.sock")
    router = start_router(["--fastrouter", sock_path(tmp_path, "fr.sock"),
                           "--fastrouter-subscription-server", sub,
                           "--fastrouter-stats", "127.0.0.1:0", *tls_args(pki)] + master)
    start_router(["--subscribe2", "server=%s,key=example.com,addr=%s,proto=s" % (sub, node.address),
                  "--subscribe2", "server=%s,key=example.com,addr=%s" % (sub, plain.address),
                  "--subscribe-freq", "1"], listeners=0)

    def both_subscribed():
        nodes = [n for entry in fetch_stats(router.stats_address)["subscriptions"]
                 for n in entry["nodes"]]
        return {n["name"]: n["proto"] for n in nodes} == {node.address: "s", plain.address: ""}

    wait_until(both_subscribed, what="both nodes subscribed, the TLS one with proto s")
    served = {json_answer(get(router))["node"] for _ in range(4)}
    assert served == {"T", "P"}
    check_small_large_and_post_on(router, "T")
    assert "unable to connect" not in router.log()


def check_small_large_and_post_on(router, name: str) -> None:
    """Repeat until the round robin hands a large download to node *name*."""
    size = 2 * 1024 * 1024
    for _ in range(4):
        raw = get(router, path="/download/%d" % size)
        status, data = http_status_and_body(raw)
        assert status == 200 and data == payload(size)
        if b"X-Node: %s" % name.encode() in raw:
            return
    raise AssertionError("node %s never served the download" % name)


@MASTER
def test_a_node_that_never_answers_the_handshake_times_out_into_the_fallback(tmp_path, master):
    """A TLS node that accepts TCP but never speaks: the handshake counts against
    --fastrouter-timeout like a connect, and the request goes to the fallback node."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)                          # the kernel completes the TCP handshake
    address = "127.0.0.1:%d" % silent.getsockname()[1]
    plain = start_uwsgi_app(tmp_path, node_app_source("P"))
    with silent:
        router = start_router(["--fastrouter", sock_path(tmp_path, "fr.sock"),
                               "--fastrouter-to", address, "--fastrouter-tls-node", address,
                               "--fastrouter-tls-no-verify", "--fastrouter-timeout", "1",
                               "--fastrouter-fallback", plain.address] + master)
        assert json_answer(get(router))["node"] == "P"
        router.wait_for_log(r'unable to connect\(\) to node "%s" \(0 retries\): timeout' % re.escape(address))


HOLDING_APP = '''\
import os


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    yield b"a" * 10000
    # Silent until the test opens the FIFO for writing.
    os.close(os.open({fifo!r}, os.O_RDONLY))
    yield b"b" * 10
'''


def test_decrypted_bytes_are_relayed_while_the_node_is_silent(tmp_path, pki):
    """With reads smaller than the record, most of a 10,000-byte record is decrypted
    but not yet relayed when the node's socket runs dry; it must reach the client
    without waiting for the node's next bytes (or its close)."""
    fifo = tmp_path / "release"
    os.mkfifo(fifo)
    spec = "127.0.0.1:0,%s,%s" % (pki / "node.crt", pki / "node.key")
    node = start_uwsgi_app(tmp_path, HOLDING_APP.format(fifo=str(fifo)), socket=spec,
                           socket_option="--suwsgi-socket")
    router = start_router(["--fastrouter", sock_path(tmp_path, "fr.sock"),
                           "--fastrouter-to", node.address, "--fastrouter-tls-node", node.address,
                           "--fastrouter-buffer-size", "512", *tls_args(pki, client_cert=False)])
    with connect(router.addresses[0]) as client:
        client.sendall(uwsgi_packet(request_vars("example.com")))
        got = b""
        while b"a" * 10000 not in got:
            chunk = client.recv(65536)     # the socket's time-out bounds the wait
            assert chunk, "closed early: %r" % got[-200:]
            got += chunk
        with open(fifo, "wb"):
            pass
        while True:
            chunk = client.recv(65536)
            if not chunk:
                break
            got += chunk
    assert got.endswith(b"a" * 10000 + b"b" * 10)
