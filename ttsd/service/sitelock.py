"""One daemon per state folder: an exclusive lock on ``state/ttsd.lock``, held for the
life of the process.

The lock is ``flock(2)`` on a file that holds the owner's pid: the kernel drops it when
the process ends, however it ends (``kill -9`` included), so a stale lock never needs
cleaning. Child processes are started with ``spawn`` and the descriptor is
close-on-exec, so no child keeps it. ``ttsd status`` and ``ttsd purge-cache`` do not
take it: the store is safe to read and purge beside a running daemon. After the pid the
file holds the daemon's last note of what it cannot write (``note``), which needs no
new disk space.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from pathlib import Path

from ttsd.errors import TtsdError

LOCK_NAME = "ttsd.lock"
NOTE_BYTES = 8192
"""The lock file's fixed size: the pid, then the daemon's last note (``note``)."""
EXIT_LOCKED = 3
"""Exit status of a daemon that found another one running on its state folder."""


class SiteLockedError(TtsdError):
    """Another ttsd process holds the state folder."""

    exit_status = EXIT_LOCKED

    def __init__(self, state: Path, pid: int | None) -> None:
        self.pid = pid
        who = f"pid {pid}" if pid else "another process (its pid is not written yet)"
        super().__init__(f"another ttsd daemon ({who}) is running on the state folder {state}; "
                         "one daemon per state folder (stop it first, or give this one its "
                         "own [paths] state)")


def acquire(state: Path) -> int:
    """Take the lock (creating the file) and write our pid into it; returns the open
    descriptor, which the caller keeps open for as long as it runs. SiteLockedError
    when another process holds it."""
    path = state / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        pid = _read_pid(fd)
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise SiteLockedError(state, pid) from None
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, _record(f"{os.getpid()}\n"), 0)
        os.fsync(fd)
    except OSError as exc:   # a full disk: the lock holds all the same, without the pid
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            os.close(fd)
            raise
    return fd


def note(fd: int, facts: dict) -> None:
    """Write ``facts`` (JSON) into the held lock file after the pid, in place: the file's
    blocks were written when it was taken, so this works on a full disk too, where the
    journal's heartbeat cannot be written (``ttsd status`` reads it: ``read_note``)."""
    text = f"{os.getpid()}\n{json.dumps(facts, separators=(',', ':'))}\n"
    if len(text.encode()) > NOTE_BYTES:
        text = f"{os.getpid()}\n{{}}\n"
    with contextlib.suppress(OSError):
        os.pwrite(fd, _record(text), 0)


def read_note(state: Path) -> dict | None:
    """The facts the running daemon last noted (None when no daemon holds the lock)."""
    if holder(state) is None:
        return None
    try:
        text = (state / LOCK_NAME).read_text(encoding="utf-8", errors="replace")
        facts = json.loads(text.split("\n")[1])
    except (OSError, ValueError, IndexError):
        return None
    return facts if isinstance(facts, dict) else None


def _record(text: str) -> bytes:
    """``text`` padded with spaces to the note's fixed size (rewritten in place)."""
    data = text.encode()[:NOTE_BYTES]
    return data + b" " * (NOTE_BYTES - len(data))


def holder(state: Path) -> int | None:
    """The pid of the process holding the lock, or None when nobody holds it."""
    try:
        fd = os.open(state / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_pid(fd) or -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().split("\n")[0].strip() or "0") or None
    return None
