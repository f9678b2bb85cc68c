"""Faults of the machine as states the daemon lives through.

A folder ttsd cannot write (disk full, quota, read-only, permission denied, deleted) or
a journal it cannot write is not a bug and not a reason to exit: the place is marked
*blocked* with the error and the path, work that needs it stops being taken, and it is
tried again with back-off (1 s, doubling to 60 s) until it works. The log says so at
error level once, then at warning level per retry; ``ttsd status`` and systemd's
``STATUS=`` show every blocked place; nothing is lost and nothing is synthesized in a
loop (the feeder probes an outbox before it takes lines for it again).

Places: ``outbox`` (WAVs), ``manifests`` (the outbox as the files stage writes it),
``state`` (the journal, the work and cache folders), ``done`` and ``failed`` (finished
inputs), ``inbox``. Each part of the daemon that meets a fault reports it as itself
(``who``); a place is clear again once it works for all of them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ttsd.log import get_logger
from ttsd.output.fsio import Folder
from ttsd.store.errors import OperationalError, machine_fault

log = get_logger(__name__)

FIRST_RETRY_S = 1.0
MAX_RETRY_S = 60.0
FAULT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                          errno.EIO, errno.ENOENT, errno.ENOTDIR, errno.ESTALE})
"""OS errors that say the machine cannot take a write now, not that ttsd is wrong."""
PROBE_BYTES = 256 * 1024
"""What ``probe`` writes: about one WAV, so that a disk with a few KiB left is not taken
for a writable one."""


def fault(exc: BaseException) -> str | None:
    """The error in words when ``exc`` is a fault of the machine (a full, read-only,
    unreachable or vanished place; an SQLite write that the disk refused), else None."""
    if isinstance(exc, OSError) and exc.errno in FAULT_ERRNOS:
        where = exc.filename
        return f"{exc.strerror or exc}" + (f": {os.fsdecode(where)}" if where else "")
    return machine_fault(exc)


@dataclass
class Blocked:
    """One place ttsd cannot write now."""

    place: str
    path: str
    error: str
    since: float
    """time.time() of the first failure."""
    retries: int
    next_try: float
    """monotonic() of the next try."""
    who: set[str]
    """The parts of the daemon that met the fault; the place is clear when none is left."""
    trial: bool = False
    """A probe passed and one round of real work is under way: if it fails too, that
    is a failed retry (the back-off goes on doubling), not a new blockage."""


class Health:
    """The blocked places, shared by the daemon's threads (thread-safe)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._blocked: dict[str, Blocked] = {}

    def trouble(self, place: str, path: str | os.PathLike, error: str, who: str = "") -> None:
        """``place`` failed (again) for ``who``: blocked, the next try after the back-off.
        Failures before the next try is due belong to the round that blocked it (the
        other writes of one batch): they neither count as retries nor push it back."""
        now = self._clock()
        with self._lock:
            b = self._blocked.get(place)
            if b is None:
                b = self._blocked[place] = Blocked(place, os.fspath(path), error, time.time(),
                                                   0, now + FIRST_RETRY_S, {who})
                log.error("site.blocked", place=place, path=b.path, error=error,
                          retry_in_s=FIRST_RETRY_S)
                return
            b.who.add(who)
            b.path, b.error = os.fspath(path), error
            if now < b.next_try and not b.trial:   # more of the same round (a batch's writes)
                return
            b.trial = False
            b.retries += 1
            delay = min(MAX_RETRY_S, FIRST_RETRY_S * 2 ** b.retries)
            b.next_try = now + delay
        log.warning("site.still_blocked", place=place, path=b.path, error=error,
                    retries=b.retries, retry_in_s=delay)

    def clear(self, place: str, who: str | None = None) -> None:
        """``place`` worked for ``who`` (None: for everyone): no longer blocked once it
        works for every part that met the fault."""
        with self._lock:
            b = self._blocked.get(place)
            if b is None:
                return
            if who is None:
                b.who.clear()
            else:
                b.who.discard(who)
            if b.who:
                return
            del self._blocked[place]
        log.info("site.unblocked", place=place, path=b.path,
                 after_s=round(time.time() - b.since, 1))

    def start_trial(self, place: str) -> None:
        """A probe of ``place`` passed: let one round of real work try it (until its next
        try is due), keeping the back-off should that fail as well (a disk with room
        for the probe and not for the work)."""
        now = self._clock()
        with self._lock:
            b = self._blocked.get(place)
            if b is not None:
                b.trial = True
                b.next_try = now + min(MAX_RETRY_S, FIRST_RETRY_S * 2 ** b.retries)

    def blocked(self, place: str) -> Blocked | None:
        with self._lock:
            return self._blocked.get(place)

    def due(self, place: str) -> bool:
        """Not blocked, or blocked and its next try has come."""
        with self._lock:
            b = self._blocked.get(place)
            return b is None or self._clock() >= b.next_try

    def wait(self, place: str, stop: threading.Event) -> None:
        """Sleep until ``place`` is due (or ``stop`` is set)."""
        with self._lock:
            b = self._blocked.get(place)
            left = 0.0 if b is None else b.next_try - self._clock()
        if left > 0:
            stop.wait(left)

    def retry(self, place: str, path: str | os.PathLike, write: Callable[[], object],
              stop: threading.Event, who: str) -> bool:
        """Run ``write`` until it works, waiting out faults of the machine (``fault``)
        with back-off; False when ``stop`` is set first. Any other error propagates."""
        while True:
            try:
                write()
            except (OSError, OperationalError) as exc:
                why = fault(exc)
                if why is None:
                    raise
                self.trouble(place, path, why, who)
                if stop.is_set():
                    return False
                self.wait(place, stop)
                continue
            self.clear(place, who)
            return True

    def blocked_for_s(self) -> float:
        """How long the longest blockage has lasted (0 when nothing is blocked)."""
        with self._lock:
            return max((time.time() - b.since for b in self._blocked.values()), default=0.0)

    def report(self) -> list[dict]:
        """Every blocked place, for the heartbeat (``ttsd status``)."""
        now = self._clock()
        with self._lock:
            return [{"place": b.place, "path": b.path, "error": b.error, "since": b.since,
                     "retries": b.retries, "retry_in_s": round(max(0.0, b.next_try - now), 1)}
                    for b in self._blocked.values()]

    def text(self) -> str:
        """One line for systemd's STATUS= ('' when nothing is blocked)."""
        with self._lock:
            return "; ".join(f"BLOCKED {b.place} {b.path}: {b.error}"
                             for b in self._blocked.values())


def probe(folder: Path, *, root: bool = False) -> None:
    """Raise the OSError a write into the output folder ``folder`` meets now (made if
    missing, never written through a symbolic link: ``Folder``; ``root``: the outbox
    itself, which may be one, as configured): a file of about one WAV written, synced
    and removed."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    if root:
        folder.mkdir(exist_ok=True)
        f = Folder(folder, os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
    else:
        f = Folder.open(folder)
    with f:
        name = f".ttsd-probe.{secrets.token_hex(4)}.tmp"
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=f.fd)
        try:
            os.write(fd, bytes(PROBE_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=f.fd)
