"""sd_notify(3) in a few lines: READY, STATUS, WATCHDOG, STOPPING and EXTEND_TIMEOUT_USEC.

systemd hands a ``Type=notify`` service the address of its notification socket in
``$NOTIFY_SOCKET`` (a file-system path, or ``@name`` for an abstract socket) and, with
``WatchdogSec=``, the watchdog timeout in ``$WATCHDOG_USEC``. A message is one
datagram of ``KEY=value`` lines. Outside systemd the variable is unset and every call
is a quiet no-op, so the daemon calls these unconditionally.

There is no timer thread: ``watchdog()`` pings only when the work loop calls it, so
the pings stop when that loop hangs (a stuck GPU call), and systemd restarts us.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping

from ttsd.log import get_logger

log = get_logger(__name__)


class Notifier:
    """Talks to ``$NOTIFY_SOCKET``; never raises, whatever the socket's state."""

    def __init__(self, env: Mapping[str, str] | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        env = os.environ if env is None else env
        self._address = _address(env.get("NOTIFY_SOCKET", ""))
        self.enabled: bool = self._address is not None
        """True when a notification socket was given (we run under systemd)."""
        self.watchdog_interval_s: float | None = _watchdog_interval(env) if self.enabled else None
        """Half of ``WatchdogSec=`` (sd_watchdog_enabled(3)); None when there is no watchdog."""
        self._clock = clock
        self._last_ping: float | None = None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines in one datagram; False when disabled or on any failure.

        ``send(READY=1, STATUS="queue 12")`` sends ``b"READY=1\\nSTATUS=queue 12"``.
        """
        if self._address is None or not fields:
            return False
        # A newline inside a value would start a new (forged) assignment: flatten it.
        message = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode("utf-8"), self._address)
        except (OSError, ValueError) as exc:
            log.debug("notify.failed", fields=sorted(fields), error=str(exc))
            return False
        return True

    def ready(self, status: str) -> bool:
        """Start-up is over (model loaded, inbox scanned): ``READY=1`` with a status line."""
        return self.send(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """Free-form status shown by ``systemctl status ttsd`` (e.g. queue depth)."""
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``, at most once per ``watchdog_interval_s / 2``; call it from the work loop.

        Cheap enough to call on every loop turn. Returns True when a ping went out.
        """
        if self.watchdog_interval_s is None:
            return False
        now = self._clock()
        if self._last_ping is not None and now - self._last_ping < self.watchdog_interval_s / 2:
            return False
        if not self.send(WATCHDOG=1):
            return False
        self._last_ping = now
        return True

    def stopping(self) -> bool:
        """A stop was asked for (SIGTERM): ``STOPPING=1``."""
        return self.send(STOPPING=1)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before systemd's start/stop timeout (or watchdog) fires.

        Sent while loading a model or while finishing the batch in flight after SIGTERM;
        it extends the timeout to *now + seconds*, so repeat it for long work.
        """
        return self.send(EXTEND_TIMEOUT_USEC=max(0, round(seconds * 1_000_000)))


def _address(value: str) -> str | None:
    """``$NOTIFY_SOCKET`` as a ``sendto`` address: a path, or ``@name`` → ``\\0name``."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None  # unset, empty, or a kind we do not speak (e.g. vsock:)


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds when the watchdog is meant for this process."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None  # the watchdog belongs to another process (we were forked)
        except ValueError:
            return None
    return usec / 2 / 1_000_000


def _one_line(value: str | int) -> str:
    if isinstance(value, bool):
        value = int(value)  # READY=True would read "READY=True", which systemd ignores
    return str(value).replace("\r", " ").replace("\n", " ")
