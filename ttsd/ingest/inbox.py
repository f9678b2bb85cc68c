"""Inbox: claim the files the watcher found settled, and read the claimed copies.

``Inbox.claim()`` renames a path into the work folder under a unique name first: the
rename is the claim, so only one caller can win. Only then is the owned copy opened
(``O_NOFOLLOW | O_NONBLOCK``), checked (regular file, one link, not too large) and
hashed in 1 MiB chunks. Symlinks are renamed as links and never followed; FIFOs are
never opened in blocking mode. Watching and settling: ``ingest.watch``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Self

from ttsd.config import InputConfig
from ttsd.errors import InputError
from ttsd.ingest.names import display_name
from ttsd.ingest.names import fit_name as _fit
from ttsd.ingest.watch import EventHandler, FileState, OverflowHook, Seen, WatchEvents, Watching
from ttsd.log import get_logger
from ttsd.output.fsio import fsync_dir
from ttsd.units import human_bytes

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver

log = get_logger(__name__)

CHUNK = 1024 * 1024
"""Read size for hashing and reading claimed files (memory stays flat)."""
FALLBACK_WORK = ".ttsd-work"
"""Claim folder inside the inbox, used when the work folder is on another filesystem."""
NAME_MAX = 255
_PREFIX_LEN = 18  # "<16 hex>--"
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass(frozen=True)
class Claimed:
    """An input file that this process owns: renamed out of the inbox and hashed."""

    name: str
    """Original file name in the inbox, e.g. ``chapter1.txt``."""
    path: Path
    """Where it lives now: ``work/<16 hex>--chapter1.txt``."""
    size: int
    sha256: str
    mtime: float
    ino: int = 0
    """Inode of the owned copy (0 = unknown, not checked by ``read``)."""
    mtime_ns: int = 0
    """The owned copy's mtime as claimed (0 = unknown)."""


@dataclass(frozen=True)
class Rejected:
    """An inbox entry ttsd will not read, with the reason in one sentence."""

    name: str
    path: Path
    """Where it lives now: the work folder, or the inbox path if it could not be moved."""
    reason: str


def claimed_name(path: Path) -> str:
    """The original inbox name of a file in the work folder (strips ``<16 hex>--``)."""
    head, sep, rest = path.name.partition("--")
    if sep and len(head) == 16 and all(c in "0123456789abcdef" for c in head) and rest:
        return rest
    return path.name


def _kind(mode: int) -> str | None:
    """A phrase for anything that is not a regular file, else None."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def _work_name(name: str) -> str:
    """``<16 hex>--name``, the name shortened (suffix kept) to fit NAME_MAX bytes."""
    return f"{secrets.token_hex(8)}--{_fit(name, NAME_MAX - _PREFIX_LEN)}"


class Inbox(Watching):
    """Watches one folder and hands out settled paths and claims; see the module doc.

    ``ready()`` and ``claim()`` may be called from several threads.
    """

    def __init__(self, inbox: Path, work: Path, cfg: InputConfig, *,
                 suffixes: tuple[str, ...] = (".txt", ".csv")) -> None:
        self._inbox = Path(os.path.abspath(inbox))
        self._work = Path(os.path.abspath(work))
        if self._work == self._inbox:
            raise ValueError("the work folder must not be the inbox itself")
        self._cfg = cfg
        self._suffixes = tuple(suffixes)
        self._events = WatchEvents()
        self._handler = EventHandler(self._events, self._inbox)
        self._hook = OverflowHook(self._events)
        self._observer: BaseObserver | None = None
        self._lock = threading.Lock()
        self._seen: dict[Path, Seen] = {}
        self._stuck: dict[Path, FileState] = {}
        self._dirs: set[str] = set()
        self._last_scan: float | None = None
        self._cross_device = False
        self._watched: tuple[int, int] | None = None
        """(device, inode) of the inbox folder being watched."""
        self._waiting: set[Path] = set()
        """Settled paths held back because a writer still has them open (logged once)."""
        self.mode = "stopped"
        """``inotify``, ``polling``, ``rescan-only`` (no observer could start) or ``stopped``."""

    # -- watching ---------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- noticing ---------------------------------------------------------------------

    # -- claiming ---------------------------------------------------------------------

    def claim(self, path: Path) -> Claimed | Rejected | None:
        """Rename ``path`` into the work folder (the claim), then check and hash it.

        None when it vanished first (another claimer won, or the user removed it) or is
        a directory; Rejected with a reason for anything ttsd will not read.
        """
        path = Path(os.path.abspath(path))
        if path.parent != self._inbox:
            raise ValueError(f"{path} is not directly in the inbox {self._inbox}")
        name = display_name(path.name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            log.debug("inbox.vanished", name=name)
            self._forget(path)
            return None
        if stat.S_ISDIR(st.st_mode):
            log.debug("inbox.directory_ignored", name=name)
            return None
        try:
            dest = self._rename_in(path, name)
        except FileNotFoundError:
            log.debug("inbox.vanished", name=name)
            self._forget(path)
            return None
        except OSError as exc:
            reason = f"could not be moved out of the inbox: {exc.strerror or exc}"
            log.warning("inbox.claim_failed", name=name, error=reason)
            with self._lock:
                self._seen.pop(path, None)
                self._stuck[path] = FileState.of(st)
            return Rejected(name, path, reason)
        self._forget(path)
        return self.adopt(dest, name)

    def _rename_in(self, path: Path, name: str) -> Path:
        """The atomic claim: rename into the work folder (or the in-inbox fallback)."""
        folder = self._fallback_dir() if self._cross_device else self._work
        dest = folder / _work_name(name)
        try:
            try:
                os.rename(path, dest)
            except FileNotFoundError:
                if not os.path.lexists(path):
                    raise
                folder.mkdir(parents=True, exist_ok=True)  # the work folder itself was missing
                os.rename(path, dest)
        except OSError as exc:
            if exc.errno != errno.EXDEV or self._cross_device:
                raise
            self._cross_device = True
            log.warning("inbox.cross_device", work=str(self._work),
                        fallback=str(self._inbox / FALLBACK_WORK))
            folder = self._fallback_dir()
            dest = folder / dest.name
            os.rename(path, dest)
        fsync_dir(folder, gone_ok=True)
        fsync_dir(self._inbox, gone_ok=True)
        return dest

    def _fallback_dir(self) -> Path:
        folder = self._inbox / FALLBACK_WORK
        folder.mkdir(exist_ok=True)
        return folder

    def _forget(self, path: Path) -> None:
        with self._lock:
            self._seen.pop(path, None)
            self._stuck.pop(path, None)

    def adopt(self, path: Path, name: str | None = None) -> Claimed | Rejected | None:
        """Check and hash a file already in the work folder (a fresh claim, or an orphan
        found after a crash); None if it is gone."""
        if display_name(path.name) != path.name:   # claimed by a version that kept it
            path = self._rename_readable(path)
            if path is None:
                return None
        name = claimed_name(path) if name is None else name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        reason = self._refuse(st)
        if reason:
            return self._reject(name, path, reason)
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return self._reject(name, path, "a symbolic link; ttsd only reads regular files")
            return self._reject(name, path, f"cannot be read: {exc.strerror or exc}")
        try:
            before = os.fstat(fd)
            reason = self._refuse(before)
            if reason:
                return self._reject(name, path, reason)
            digest = hashlib.sha256()
            size = 0
            while chunk := os.read(fd, CHUNK):
                digest.update(chunk)
                size += len(chunk)
                if size > self._cfg.max_file_bytes:
                    return self._reject(name, path, self._too_big(size))
            after = os.fstat(fd)
        except OSError as exc:
            return self._reject(name, path, f"cannot be read: {exc.strerror or exc}")
        finally:
            os.close(fd)
        if (FileState.of(after) != FileState.of(before) or size != before.st_size
                or after.st_ino != st.st_ino):
            return self._reject(name, path,
                                "changed while being read; was it still being written?")
        claimed = Claimed(name, path, size, digest.hexdigest(), before.st_mtime, before.st_ino,
                          before.st_mtime_ns)
        log.info("inbox.claimed", name=name, size=size, sha256=claimed.sha256[:16],
                 path=str(path))
        return claimed

    @staticmethod
    def _rename_readable(path: Path) -> Path | None:
        """A claimed copy renamed, in its folder, to its ``display_name``; None if gone."""
        dest = path.with_name(display_name(path.name))
        try:
            os.rename(path, dest)
        except FileNotFoundError:
            return None
        return dest

    def _refuse(self, st: os.stat_result) -> str | None:
        kind = _kind(st.st_mode)
        if kind:
            return f"{kind}; ttsd only reads regular files"
        if st.st_nlink > 1:
            return (f"has {st.st_nlink} hard links; ttsd only reads files with a single link"
                    " (copy the file instead of linking it)")
        if st.st_size > self._cfg.max_file_bytes:
            return self._too_big(st.st_size)
        return None

    def _too_big(self, size: int) -> str:
        return (f"is {human_bytes(size)}, over input.max_file_bytes"
                f" ({human_bytes(self._cfg.max_file_bytes)})")

    @staticmethod
    def _reject(name: str, path: Path, reason: str) -> Rejected:
        log.warning("inbox.rejected", name=name, reason=reason, path=str(path))
        return Rejected(name, path, reason)

    # -- reading ----------------------------------------------------------------------

    def read(self, claimed: Claimed) -> bytes:
        """The owned copy's bytes, after checking it is still exactly what was claimed.

        Raises InputError("file changed while being read") when inode, size, mtime or
        sha256 differ from the claim (docs/reliability.md, appended-after-claim).
        """
        changed = InputError("file changed while being read", file=claimed.name)
        try:
            fd = os.open(claimed.path, _OPEN_FLAGS)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise changed from None
            raise InputError(f"cannot be read: {exc.strerror or exc}",
                             file=claimed.name) from None
        try:
            before = os.fstat(fd)
            if not self._matches(before, claimed):
                raise changed
            parts: list[bytes] = []
            left = claimed.size + 1  # one byte more reveals an append
            while left > 0 and (chunk := os.read(fd, min(CHUNK, left))):
                parts.append(chunk)
                left -= len(chunk)
            after = os.fstat(fd)
        except OSError as exc:
            raise InputError(f"cannot be read: {exc.strerror or exc}",
                             file=claimed.name) from None
        finally:
            os.close(fd)
        data = b"".join(parts)
        if (not self._matches(after, claimed) or len(data) != claimed.size
                or hashlib.sha256(data).hexdigest() != claimed.sha256):
            log.warning("inbox.changed", name=claimed.name, path=str(claimed.path))
            raise changed
        return data

    def appended(self, claimed: Claimed, old_size: int, old_sha256: str) -> str | None:
        """None when ``claimed`` (the same copy, read again) is an earlier claim of
        ``old_size`` bytes and ``old_sha256`` with lines appended: those bytes unchanged
        and ending with a line break. Otherwise how it changed, in words."""
        try:
            fd = os.open(claimed.path, _OPEN_FLAGS)
        except OSError as exc:
            return f"it can no longer be read: {exc.strerror or exc}"
        try:
            digest, left, last = hashlib.sha256(), old_size, b""
            while left > 0 and (chunk := os.read(fd, min(CHUNK, left))):
                digest.update(chunk)
                left -= len(chunk)
                last = (last + chunk)[-8:]
        except OSError as exc:
            return f"it can no longer be read: {exc.strerror or exc}"
        finally:
            os.close(fd)
        if left or digest.hexdigest() != old_sha256:
            return (f"it was {old_size} bytes and is now {claimed.size}, and its first "
                    f"{old_size} bytes are not what ttsd read")
        if last.rstrip(b"\x00")[-1:] not in (b"\n", b"\r"):
            return (f"it was {old_size} bytes and is now {claimed.size}, and its last line "
                    "was continued after ttsd had read it")
        return None

    @staticmethod
    def _matches(st: os.stat_result, claimed: Claimed) -> bool:
        return (stat.S_ISREG(st.st_mode) and st.st_size == claimed.size
                and st.st_mtime == claimed.mtime
                and (claimed.ino == 0 or st.st_ino == claimed.ino))

    # -- recovery ---------------------------------------------------------------------

    def orphans(self) -> list[Path]:
        """Entries left in the work folder (and the cross-device fallback) after a crash."""
        out: list[Path] = []
        for folder in (self._work, self._inbox / FALLBACK_WORK):
            try:
                with os.scandir(folder) as it:
                    out.extend(Path(e.path) for e in it)
            except FileNotFoundError:
                continue
        return sorted(out)

