"""--fastrouter-metrics: Prometheus text metrics, with and without --master."""

import http.client
import socket

import pytest

prometheus_parser = pytest.importorskip("prometheus_client.parser")

from uwsgi_fastrouter import __version__
from uwsgi_fastrouter.endpoints import MAX_REQUEST
from uwsgi_fastrouter.metrics import BUCKETS, Counters, label_value, merge, render
from uwsgi_fastrouter.record import NO_ROUTE
from uwsgi_fastrouter.subscription import build_announcement

from backends import RecordingBackend, request
from support import fetch_stats, free_dead_tcp_address, reference_mode, start_router, wait_until

pytestmark = pytest.mark.skipif(reference_mode(), reason="uwsgi-fastrouter's own option")

METRICS_RE = r"\*\*\* fastrouter metrics server enabled on (\S+) fd: (\d+) \*\*\*"
HOSTILE = b'evil"key\\with\nnewline'
MODES = {"single": [], "master": ["--master", "--fastrouter-processes", "2"]}


@pytest.fixture
def backend():
    with RecordingBackend("node") as server:
        yield server


def http_get(address: str, path: str, method: str = "GET"):
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        conn.close()


def scrape(address: str) -> dict:
    """The metrics as {family name: {frozenset(labels): value}} (samples by full name)."""
    status, content_type, body = http_get(address, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    samples = {}
    for family in prometheus_parser.text_string_to_metric_families(body.decode("utf-8")):
        assert family.type != "unknown", family.name     # every sample under its TYPE line
        for sample in family.samples:
            samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get(name, {}).get(frozenset(labels.items()), 0.0)


def metrics_address(router) -> str:
    """The address the router's metrics server took (it was given port 0)."""
    return router.wait_for_log(METRICS_RE).group(1)


def start(args, mode):
    router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-metrics", "127.0.0.1:0"]
                          + MODES[mode] + args)
    return router, metrics_address(router)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_counters_after_known_traffic(backend, mode):
    dead, holder = free_dead_tcp_address()
    with holder:
        router, metrics = start(["--fastrouter-use-pattern", "127.0.0.1:%s",
                                 "--fastrouter-fallback", dead, "--fastrouter-fallback", backend.address,
                                 "--fastrouter-stats", "127.0.0.1:0"], mode)
        addr = router.addresses[0]
        good = backend.address.rsplit(":", 1)[1].encode()
        bad = dead.rsplit(":", 1)[1].encode()
        for _ in range(3):
            assert request(addr, [(b"HTTP_HOST", good)]).startswith(b"HTTP/1.0 200")
        # The dead node: connect fails, retry on the first fallback (dead too), then the second.
        assert request(addr, [(b"HTTP_HOST", bad)]).startswith(b"HTTP/1.0 200")
        # A key that is not a file name: no route for the pattern mapper (D14).
        assert request(addr, [(b"HTTP_HOST", b"no/route")]) == b""
        assert request(addr, [(b"HTTP_HOST", HOSTILE)]) == b""

        def counted():
            samples = scrape(metrics)
            return samples if value(samples, "uwsgi_fastrouter_request_seconds_count") == 6 else None

        samples = wait_until(counted, what="six requests in the metrics")
        assert value(samples, "uwsgi_fastrouter_requests_total", outcome="ok") == 4
        assert value(samples, "uwsgi_fastrouter_requests_total", outcome="no_route") == 2
        assert value(samples, "uwsgi_fastrouter_requests_total", outcome="connect_failed") == 0
        assert value(samples, "uwsgi_fastrouter_retries_total") == 2
        assert value(samples, "uwsgi_fastrouter_fallbacks_total") == 2
        assert value(samples, "uwsgi_fastrouter_first_byte_seconds_count") == 4
        assert value(samples, "uwsgi_fastrouter_request_seconds_bucket", le="+Inf") == 6
        assert value(samples, "uwsgi_fastrouter_active_sessions") == 0
        assert value(samples, "uwsgi_fastrouter_bytes_total", direction="out") > 0
        assert value(samples, "uwsgi_fastrouter_bytes_total", direction="in") > 0
        assert value(samples, "uwsgi_fastrouter_key_requests_total", key=good.decode()) == 3
        assert value(samples, "uwsgi_fastrouter_key_failures_total", key=good.decode()) == 0
        assert value(samples, "uwsgi_fastrouter_key_requests_total", key=HOSTILE.decode()) == 1
        assert value(samples, "uwsgi_fastrouter_key_failures_total", key=HOSTILE.decode()) == 1
        # The pattern's node and the first fallback are the same dead address.
        assert value(samples, "uwsgi_fastrouter_node_failures_total", node=dead) == 2
        assert value(samples, "uwsgi_fastrouter_node_requests_total", node=backend.address) == 4
        assert value(samples, "uwsgi_fastrouter_cheap") == 0
        assert value(samples, "uwsgi_fastrouter_build_info", version=__version__) == 1
        assert value(samples, "uwsgi_fastrouter_process_start_time_seconds") > 1e9
        # The stats JSON carries the version and the outcome counters as extra members.
        doc = fetch_stats(router.stats_address)
        assert doc["uwsgi_fastrouter_version"] == __version__
        assert doc["no_route"] == 2 and doc["requests_ok"] == 4 and doc["connect_failed"] == 0
        # Other clients were served all along.
        assert request(addr, [(b"HTTP_HOST", good)]).startswith(b"HTTP/1.0 200")


@pytest.mark.parametrize("mode", sorted(MODES))
def test_keys_past_the_cap_are_summed_into_other(backend, mode):
    router, metrics = start(["--fastrouter-to", backend.address, "--fastrouter-metrics-max-keys", "2"], mode)
    addr = router.addresses[0]
    keys = [b"k%d.example.com" % i for i in range(6)]
    for key in keys:
        assert request(addr, [(b"HTTP_HOST", key)]).startswith(b"HTTP/1.0 200")

    def counted():
        samples = scrape(metrics)
        return samples if value(samples, "uwsgi_fastrouter_requests_total", outcome="ok") == 6 else None

    samples = wait_until(counted, what="six requests in the metrics")
    series = samples["uwsgi_fastrouter_key_requests_total"]
    names = {dict(labels)["key"] for labels in series}
    assert "other" in names
    assert len(names) == 3          # two keys of their own and "other"
    assert sum(series.values()) == 6
    assert value(samples, "uwsgi_fastrouter_key_requests_total", key="other") >= 4


@pytest.mark.parametrize("mode", sorted(MODES))
def test_other_paths_are_404_and_the_router_keeps_serving(backend, mode):
    router, metrics = start(["--fastrouter-to", backend.address], mode)
    assert http_get(metrics, "/")[0] == 404
    assert http_get(metrics, "/metrics/x")[0] == 404
    assert http_get(metrics, "/metrics", method="POST")[0] == 405
    status, _type, body = http_get(metrics, "/metrics", method="HEAD")
    assert status == 200 and body == b""
    with socket.create_connection(tuple_address(metrics), timeout=10) as sock:
        sock.sendall(b"garbage\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")
    with socket.create_connection(tuple_address(metrics), timeout=10) as sock:
        sock.sendall(b"GET /" + b"x" * (MAX_REQUEST - 4))    # one byte over, no end of head
        assert sock.recv(100).startswith(b"HTTP/1.1 431")
    assert request(router.addresses[0], [(b"HTTP_HOST", b"a")]).startswith(b"HTTP/1.0 200")
    assert value(scrape(metrics), "uwsgi_fastrouter_requests_total", outcome="ok") == 1


def tuple_address(address: str):
    host, port = address.rsplit(":", 1)
    return host, int(port)


# ---------------------------------------------------------------- in-process


def test_label_values_are_escaped():
    assert label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def test_render_parses_and_merge_bounds_the_tables():
    class Record:   # a closed session's request record (record.py)
        def __init__(self, key, ended):
            self.key, self.route, self.retries, self.fallback_index = key, None, 0, 0
            self.started, self.first_byte, self.ended = 1.0, 0.0, ended
            self.rx, self.tx, self.outcome = 10, 20, NO_ROUTE

    class Server:
        fd_handoffs, sessions, cheap = 0, (), False

    one, two = Counters(detailed=True, max_keys=2), Counters(detailed=True, max_keys=2)
    for key in (b"a", b"b", b"c", HOSTILE):
        one.ended(Record(key, 1.2))
    for key in (b"d", b"a"):
        two.ended(Record(key, 100.0))
    merged = merge([one.snapshot(Server()), two.snapshot(Server())], max_keys=2)
    text = render(merged).decode()
    families = {f.name: f for f in prometheus_parser.text_string_to_metric_families(text)}
    keys = {s.labels["key"]: s.value for s in families["uwsgi_fastrouter_key_requests"].samples}
    assert keys == {"a": 2, "b": 1, "other": 3}
    assert merged["outcomes"][1] == 6
    buckets = {s.labels["le"]: s.value for s in families["uwsgi_fastrouter_request_seconds"].samples
               if s.name.endswith("_bucket")}
    assert buckets["0.25"] == 4 and buckets["+Inf"] == 6 and len(buckets) == len(BUCKETS) + 1


@pytest.mark.parametrize("mode", sorted(MODES))
def test_connect_failed_client_error_and_timeout(mode):
    dead, holder = free_dead_tcp_address()
    with holder:
        router, metrics = start(["--fastrouter-to", dead, "--fastrouter-max-retries", "0",
                                 "--fastrouter-timeout", "1"], mode)
        addr = router.addresses[0]
        assert request(addr, [(b"HTTP_HOST", b"down.example.com")]) == b""
        assert request(addr, [], body=b"") == b""                       # no key at all: no route
        with socket.create_connection(tuple_address(addr), timeout=10) as sock:
            sock.sendall(b"\x00\x04\x00\x00\x09\x00ab")                  # vars that do not parse
            assert sock.recv(10) == b""
        with socket.create_connection(tuple_address(addr), timeout=10) as sock:
            sock.sendall(b"\x00\x40\x00")                                # a head that never ends
            assert sock.recv(10) == b""                                  # closed by the time-out

        def counted():
            samples = scrape(metrics)
            return samples if value(samples, "uwsgi_fastrouter_request_seconds_count") == 4 else None

        samples = wait_until(counted, what="four requests in the metrics")
        assert value(samples, "uwsgi_fastrouter_requests_total", outcome="connect_failed") == 1
        assert value(samples, "uwsgi_fastrouter_requests_total", outcome="no_route") == 1
        assert value(samples, "uwsgi_fastrouter_requests_total", outcome="client_error") == 1
        assert value(samples, "uwsgi_fastrouter_requests_total", outcome="timeout") == 1
        assert value(samples, "uwsgi_fastrouter_requests_total", outcome="ok") == 0
        assert value(samples, "uwsgi_fastrouter_node_failures_total", node=dead) == 1
        assert value(samples, "uwsgi_fastrouter_key_failures_total", key="down.example.com") == 1


@pytest.mark.parametrize("mode", sorted(MODES))
def test_subscription_counters(backend, mode, sock_dir):
    sub = str(sock_dir / "sub.sock")
    router, metrics = start(["--fastrouter-subscription-server", sub], mode)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.sendto(build_announcement(b"app.example.com", backend.address.encode()), sub)
        sender.sendto(b"\x00\x10\x00\x00not a subscription", sub)
    addr = router.addresses[0]
    wait_until(lambda: request(addr, [(b"HTTP_HOST", b"app.example.com")]).startswith(b"HTTP/1.0 200"),
               what="the subscribed node serving")

    def counted():
        samples = scrape(metrics)
        return samples if value(samples, "uwsgi_fastrouter_subscription_datagrams_total") == 2 else None

    samples = wait_until(counted, what="two datagrams in the metrics")
    assert value(samples, "uwsgi_fastrouter_subscription_drops_total", reason="other") == 1
    assert value(samples, "uwsgi_fastrouter_subscription_drops_total", reason="table_full") == 0
    assert value(samples, "uwsgi_fastrouter_subscription_keys") == 1
    assert value(samples, "uwsgi_fastrouter_subscription_nodes") == 1
    assert value(samples, "uwsgi_fastrouter_cheap") == 0
    assert value(samples, "uwsgi_fastrouter_requests_total", outcome="ok") >= 1


def test_the_metrics_socket_survives_a_graceful_reload(backend):
    import os
    import signal
    router, metrics = start(["--fastrouter-to", backend.address], "master")
    assert request(router.addresses[0], [(b"HTTP_HOST", b"a")]).startswith(b"HTTP/1.0 200")
    os.kill(router.pid, signal.SIGHUP)
    router.wait_for_log(r"graceful reload: \d+ old process", timeout=20)
    assert request(router.addresses[0], [(b"HTTP_HOST", b"a")]).startswith(b"HTTP/1.0 200")
    # The same listening socket, now served by the new image; the counters start afresh
    # with the new router processes.
    samples = wait_until(lambda: scrape(metrics), what="a scrape after the reload")
    assert value(samples, "uwsgi_fastrouter_build_info", version=__version__) == 1
