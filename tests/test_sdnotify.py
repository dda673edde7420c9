"""systemd readiness (sd_notify over $NOTIFY_SOCKET): the module, and the order of the
messages a router sends through start, reload and stop, with and without a master."""

from __future__ import annotations

import os
import signal
import socket
from typing import Dict, List

import pytest

from backends import RecordingBackend, request
from support import start_router, wait_until
from uwsgi_fastrouter import sdnotify

HOST = [(b"HTTP_HOST", b"example.com")]


class FakeSystemd:
    """A notification socket like systemd's: a UNIX datagram socket the test reads."""

    def __init__(self, address: str, env_value: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(15)
        self.env_value = env_value
        self.seen: List[Dict[str, str]] = []

    def next(self) -> Dict[str, str]:
        """The next message as a dict (bounded wait: the socket's timeout)."""
        data = self.sock.recv(4096)
        assert data.endswith(b"\n"), data
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.seen.append(fields)
        return fields

    def until(self, name: str) -> Dict[str, str]:
        """Read messages until one carries *name*; return that one."""
        while True:
            fields = self.next()
            if name in fields:
                return fields

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(sock_dir):
    fake = FakeSystemd(str(sock_dir / "notify.sock"), str(sock_dir / "notify.sock"))
    yield fake
    fake.close()


@pytest.fixture
def abstract_systemd():
    name = "uwsgi-fastrouter-test-notify-%d" % os.getpid()
    fake = FakeSystemd("\0" + name, "@" + name)
    yield fake
    fake.close()


# -- the module ------------------------------------------------------------------------------------


def test_socket_address_forms():
    assert sdnotify.socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert sdnotify.socket_address("@abstract/name") == "\0abstract/name"
    assert sdnotify.socket_address("") is None
    assert sdnotify.socket_address("relative/path") is None
    assert sdnotify.socket_address("/bad\0path") is None


def test_no_notify_socket_means_no_notifier(capsys):
    assert sdnotify.from_environ({}) is None
    assert sdnotify.from_environ({"NOTIFY_SOCKET": ""}) is None
    assert sdnotify.from_environ({"NOTIFY_SOCKET": "relative"}) is None
    assert "ignoring NOTIFY_SOCKET" in capsys.readouterr().err


def test_messages_reach_a_path_and_an_abstract_socket(systemd, abstract_systemd):
    for fake in (systemd, abstract_systemd):
        notifier = sdnotify.from_environ({"NOTIFY_SOCKET": fake.env_value})
        assert notifier.status("starting")
        assert fake.next() == {"STATUS": "starting"}
        assert notifier.ready("up\nand running", main_pid=42)
        assert fake.next() == {"READY": "1", "STATUS": "up and running", "MAINPID": "42"}
        assert notifier.reloading("reload")
        fields = fake.next()
        assert fields["RELOADING"] == "1" and int(fields["MONOTONIC_USEC"]) > 0
        assert notifier.stopping("bye")
        assert fake.next() == {"STOPPING": "1", "STATUS": "bye"}


def test_a_missing_socket_is_logged_once_and_never_raises(tmp_path, capsys):
    notifier = sdnotify.from_environ({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert notifier.ready("x") is False
    assert notifier.stopping("y") is False
    assert capsys.readouterr().err.count("unable to notify systemd") == 1


# -- the router ------------------------------------------------------------------------------------


def _can_connect(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5):
        return True


def test_single_process_start_and_stop(systemd):
    with RecordingBackend("s") as node:
        router = start_router(["--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address],
                              env={"NOTIFY_SOCKET": systemd.env_value})
        assert systemd.next() == {"STATUS": "uwsgi-fastrouter starting"}
        ready = systemd.next()
        assert ready["READY"] == "1" and "MAINPID" not in ready
        assert "ready" in ready["STATUS"]
        assert _can_connect(router.addresses[0])          # READY=1 only once bound
        assert b"node=s" in request(router.addresses[0], HOST)
        router.send_stop_signal(signal.SIGTERM)
        assert systemd.next()["STOPPING"] == "1"
        assert router.stop(signal.SIGTERM) == 0


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_master_start_reload_and_stop(request_fixture_systemd, abstract):
    systemd = request_fixture_systemd(abstract)
    with RecordingBackend("m") as node:
        router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-to", node.address],
                              env={"NOTIFY_SOCKET": systemd.env_value})
        assert systemd.next() == {"STATUS": "uwsgi-fastrouter master starting"}
        ready = systemd.next()
        assert ready["READY"] == "1" and "MAINPID" not in ready
        router.wait_for_log(r"spawned uWSGI fastrouter 1")
        assert b"node=m" in request(router.addresses[0], HOST)

        os.kill(router.pid, signal.SIGHUP)
        reloading = systemd.next()
        assert reloading["RELOADING"] == "1" and "graceful" in reloading["STATUS"]
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert systemd.next() == {"STATUS": "uwsgi-fastrouter master starting"}
        ready = systemd.next()
        assert ready["READY"] == "1" and ready["MAINPID"] == str(router.pid)   # same pid after the re-exec
        router.wait_for_log(r"graceful reload: \d+ old process")
        assert b"node=m" in request(router.addresses[0], HOST)

        router.send_stop_signal(signal.SIGINT)
        assert systemd.next()["STOPPING"] == "1"
        assert router.stop() == 0
    # nothing else was sent: no router process or worker speaks to systemd
    assert [sorted(m) for m in systemd.seen] == [
        ["STATUS"], ["READY", "STATUS"],
        ["MONOTONIC_USEC", "RELOADING", "STATUS"], ["STATUS"], ["MAINPID", "READY", "STATUS"],
        ["STATUS", "STOPPING"],
    ]
    systemd.sock.settimeout(0.2)
    with pytest.raises(socket.timeout):
        systemd.next()


def test_die_on_term_is_a_stop_and_a_plain_term_a_reload(systemd):
    router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-to", "127.0.0.1:9"],
                          env={"NOTIFY_SOCKET": systemd.env_value})
    systemd.until("READY")
    os.kill(router.pid, signal.SIGTERM)      # brutal reload without --die-on-term
    assert systemd.until("RELOADING")["STATUS"].endswith("brutal reload")
    assert systemd.until("READY")["MAINPID"] == str(router.pid)
    router.stop()
    dying = start_router(["--master", "--die-on-term", "--fastrouter", "127.0.0.1:0",
                          "--fastrouter-to", "127.0.0.1:9"], env={"NOTIFY_SOCKET": systemd.env_value})
    systemd.until("READY")
    dying.send_stop_signal(signal.SIGTERM)
    assert systemd.next()["STOPPING"] == "1"
    assert dying.stop(signal.SIGTERM) == 0


def test_without_notify_socket_nothing_changes(tmp_path):
    router = start_router(["--master", "--fastrouter", "127.0.0.1:0", "--fastrouter-to", "127.0.0.1:9"],
                          env={"NOTIFY_SOCKET": None})
    router.wait_for_log(r"spawned uWSGI fastrouter 1")
    assert "notify" not in router.log().lower()
    assert router.alive()


@pytest.fixture
def request_fixture_systemd(sock_dir):
    made = []

    def make(abstract: bool) -> FakeSystemd:
        if abstract:
            name = "uwsgi-fastrouter-test-notify-%d-%d" % (os.getpid(), len(made))
            fake = FakeSystemd("\0" + name, "@" + name)
        else:
            path = str(sock_dir / ("notify%d.sock" % len(made)))
            fake = FakeSystemd(path, path)
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.close()
