"""ttsd.service.notify against a real AF_UNIX datagram socket standing in for systemd's
$NOTIFY_SOCKET.

docs/reliability.md: notify-protocol (Type=notify: READY, STATUS, STOPPING on a path and
an ``@abstract`` socket) and watchdog (pings come only from the caller's loop).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ttsd.service.notify import Notifier

ROOT = Path(__file__).resolve().parents[1]


class FakeSystemd:
    """A bound SOCK_DGRAM socket that collects what a Notifier sends."""

    def __init__(self, env_value: str, bind_to: str) -> None:
        self.env_value = env_value
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)
        self.sock.settimeout(5)

    def recv(self) -> str:
        return self.sock.recv(4096).decode("utf-8")

    def pending(self) -> list[str]:
        """Every datagram already queued, without waiting."""
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096).decode("utf-8"))
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(5)
        return out

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.env_value, **extra}


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[FakeSystemd]:
    folder = tmp_path
    if len(str(tmp_path / "notify")) > 100:  # sun_path holds 108 bytes
        folder = Path(tempfile.mkdtemp(prefix="ttsd-", dir="/tmp"))
    path = str(folder / "notify")
    fake = FakeSystemd(path, path)
    yield fake
    fake.sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[FakeSystemd]:
    name = f"ttsd-test-{uuid.uuid4().hex}"
    fake = FakeSystemd("@" + name, "\0" + name)
    yield fake
    fake.sock.close()


@pytest.fixture(params=["path", "abstract"])
def systemd(request: pytest.FixtureRequest) -> FakeSystemd:
    return request.getfixturevalue(f"{request.param}_socket")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ready_sends_ready_and_status(systemd: FakeSystemd) -> None:
    """notify-protocol: READY=1 with a STATUS= line, in one datagram."""
    n = Notifier(systemd.env())
    assert n.enabled
    assert n.ready("queue 12") is True
    assert systemd.recv() == "READY=1\nSTATUS=queue 12"


def test_send_joins_fields_in_order(systemd: FakeSystemd) -> None:
    n = Notifier(systemd.env())
    assert n.send(READY=1, STATUS="queue 12")
    assert systemd.recv() == "READY=1\nSTATUS=queue 12"
    assert n.send(READY=True) and systemd.recv() == "READY=1"


def test_status_line_cannot_smuggle_other_fields(systemd: FakeSystemd) -> None:
    """A newline in a status (say, from a file name) must not become a second assignment."""
    n = Notifier(systemd.env())
    n.status("file a.txt\nREADY=1")
    assert systemd.recv() == "STATUS=file a.txt READY=1"


def test_stopping(systemd: FakeSystemd) -> None:
    """notify-protocol: STOPPING=1 on SIGTERM."""
    n = Notifier(systemd.env())
    n.stopping()
    assert systemd.recv() == "STOPPING=1"


def test_extend_timeout_is_in_microseconds(systemd: FakeSystemd) -> None:
    """notify-protocol and sigterm-mid-batch: the batch in flight may finish after SIGTERM if it
    asks for more time."""
    n = Notifier(systemd.env())
    n.extend_timeout(90)
    assert systemd.recv() == "EXTEND_TIMEOUT_USEC=90000000"
    n.extend_timeout(0.25)
    assert systemd.recv() == "EXTEND_TIMEOUT_USEC=250000"
    n.extend_timeout(-3)
    assert systemd.recv() == "EXTEND_TIMEOUT_USEC=0"


def test_watchdog_interval_is_half_of_watchdog_usec(systemd: FakeSystemd) -> None:
    """watchdog: WATCHDOG_USEC=2000000 → ping every second (sd_watchdog_enabled(3))."""
    n = Notifier(systemd.env(WATCHDOG_USEC="2000000"))
    assert n.watchdog_interval_s == 1.0
    assert Notifier(systemd.env(WATCHDOG_USEC="2000000",
                                WATCHDOG_PID=str(os.getpid()))).watchdog_interval_s == 1.0


def test_watchdog_for_another_pid_or_garbage_is_off(systemd: FakeSystemd) -> None:
    other = str(os.getpid() + 1)
    for extra in ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": other},
                  {"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "soon"},
                  {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "x"}, {}):
        n = Notifier(systemd.env(**extra))
        assert n.watchdog_interval_s is None, extra
        assert n.watchdog() is False
    assert systemd.pending() == []


def test_watchdog_pings_are_rate_limited(systemd: FakeSystemd) -> None:
    """watchdog: called on every loop turn, it pings at most every interval/2 seconds."""
    clock = FakeClock()
    n = Notifier(systemd.env(WATCHDOG_USEC="2000000"), clock=clock)
    assert n.watchdog() is True
    assert systemd.recv() == "WATCHDOG=1"
    for _ in range(100):            # a busy loop inside the same half-interval
        clock.now += 0.004
        assert n.watchdog() is False
    clock.now += 0.2                # 0.6 s since the first ping ≥ 1.0 / 2
    assert n.watchdog() is True
    assert systemd.recv() == "WATCHDOG=1"
    assert systemd.pending() == []


def test_watchdog_pings_stop_when_the_loop_stops(systemd: FakeSystemd) -> None:
    """watchdog: no timer thread pings for us, so a hung work loop starves systemd's watchdog."""
    threads_before = threading.active_count()
    n = Notifier(systemd.env(WATCHDOG_USEC="20000"))   # 20 ms watchdog, 10 ms interval
    assert n.watchdog()
    assert systemd.recv() == "WATCHDOG=1"
    systemd.sock.settimeout(0.2)                       # the "loop" hangs: nobody calls watchdog()
    with pytest.raises(TimeoutError):
        systemd.sock.recv(4096)
    assert threading.active_count() == threads_before


def test_disabled_without_notify_socket() -> None:
    """notify-protocol: outside systemd every call is a quiet no-op."""
    for env in ({}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "@"},
                {"NOTIFY_SOCKET": "vsock:2:1234"}, {"WATCHDOG_USEC": "2000000"}):
        n = Notifier(env)
        assert not n.enabled
        assert n.watchdog_interval_s is None
        assert n.send(READY=1) is False
        assert n.ready("x") is False
        assert n.watchdog() is False
        assert n.status("x") is False
        assert n.stopping() is False
        assert n.extend_timeout(5) is False


def test_send_failure_returns_false_and_never_raises(tmp_path: Path) -> None:
    """systemd went away (socket path missing), or the path is not a socket: False, no exception."""
    missing = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone"), "WATCHDOG_USEC": "2000000"})
    assert missing.enabled
    assert missing.send(READY=1) is False
    assert missing.ready("x") is False
    assert missing.watchdog() is False
    assert missing.stopping() is False
    (tmp_path / "plain").write_text("not a socket")
    assert Notifier({"NOTIFY_SOCKET": str(tmp_path / "plain")}).status("x") is False
    nobody = Notifier({"NOTIFY_SOCKET": f"@ttsd-test-nobody-{uuid.uuid4().hex}"})
    assert nobody.send(READY=1) is False
    too_long = Notifier({"NOTIFY_SOCKET": "/" + "x" * 200})
    assert too_long.send(READY=1) is False


def test_failed_ping_is_retried_on_the_next_call(tmp_path: Path) -> None:
    """A ping that did not go out does not count against the rate limit."""
    path = tmp_path / "n"
    clock = FakeClock()
    n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"}, clock=clock)
    assert n.watchdog() is False              # nobody listening yet
    fake = FakeSystemd(str(path), str(path))
    try:
        assert n.watchdog() is True           # same instant: not rate-limited
        assert fake.recv() == "WATCHDOG=1"
    finally:
        fake.sock.close()


def test_reads_the_process_environment(path_socket: FakeSystemd) -> None:
    """notify-protocol: a child process finds $NOTIFY_SOCKET in its environment, as under
    systemd."""
    code = ("from ttsd.service.notify import Notifier; n = Notifier(); "
            "assert n.watchdog_interval_s == 1.0, n.watchdog_interval_s; "
            "n.ready('queue 0'); n.watchdog(); n.stopping()")
    env = {**os.environ, "NOTIFY_SOCKET": path_socket.env_value, "WATCHDOG_USEC": "2000000",
           "PYTHONPATH": str(ROOT)}
    env.pop("WATCHDOG_PID", None)
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    assert [path_socket.recv() for _ in range(3)] == [
        "READY=1\nSTATUS=queue 0", "WATCHDOG=1", "STOPPING=1"]
