"""Inbox: watch a folder, notice files that have stopped changing, and claim them.

The watchdog observer (inotify, or polling on NFS/CIFS and when inotify fails) only
tells us *which* paths to look at: its handler enqueues paths into a thread-safe set
and does nothing else. ``Inbox.ready()`` drains that set, adds a full scan of the inbox
on the first call and every ``rescan_s`` (lost events, queue overflow), and returns the
paths whose ``(size, mtime_ns, inode)`` has not changed for ``settle_s``.

A settled path is handed out only when no process has it open for writing. Where the
kernel can say so, a read lease (``fcntl(F_SETLEASE, F_RDLCK)``, granted only while no
one has the file open for writing; taken and given back at once) decides; where it
cannot (another owner's file without CAP_LEASE, NFS, CIFS), inotify's open and close
events count the processes that have the file open; with neither (polling a network
file system), ``settle_s`` of quiet is all ttsd can go by (``writer_open``).

``Inbox.claim()`` renames a path into the work folder under a unique name first: the
rename is the claim, so only one caller can win. Only then is the owned copy opened
(``O_NOFOLLOW | O_NONBLOCK``), checked (regular file, one link, not too large) and
hashed in 1 MiB chunks. Symlinks are renamed as links and never followed; FIFOs are
never opened in blocking mode. Only this module imports watchdog.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import signal
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserverVFS

from ttsd.config import InputConfig
from ttsd.errors import InputError
from ttsd.log import get_logger
from ttsd.ingest.names import fit_name as _fit
from ttsd.units import human_bytes

log = get_logger(__name__)

CHUNK = 1024 * 1024
"""Read size for hashing and reading claimed files (memory stays flat)."""
MAX_QUEUED_EVENTS = 10_000
"""More distinct queued paths than this are dropped in favour of a full rescan."""
FALLBACK_WORK = ".ttsd-work"
"""Claim folder inside the inbox, used when the work folder is on another filesystem."""
NAME_MAX = 255
_PREFIX_LEN = 18  # "<16 hex>--"
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_WATCHDOG_LOGGER = "watchdog.observers.inotify_c"


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


@dataclass(frozen=True)
class FileState:
    """What the stability check compares between observations."""

    size: int
    mtime_ns: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileState:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True)
class Seen:
    """A path's state and the (monotonic) time it was first observed in that state."""

    state: FileState
    since: float


def settled(prev: Seen | None, cur: FileState, settle_s: float, now: float) -> tuple[Seen, bool]:
    """Fold one observation into ``prev``; True once ``cur`` has held for ``settle_s``.

    Any change of size, mtime or inode restarts the clock. Pure: no I/O, no clock.
    """
    seen = prev if prev is not None and prev.state == cur else Seen(cur, now)
    return seen, now - seen.since >= settle_s


def eligible_name(name: str, suffixes: tuple[str, ...]) -> bool:
    """True for names ttsd may pick up; temp, hidden and editor names wait to be renamed."""
    lower = name.lower()
    if name.startswith(".") or lower.endswith((".tmp", ".part", "~", ".swp")):
        return False
    return lower.endswith(tuple(s.lower() for s in suffixes))


def display_name(name: str) -> str:
    """A file name as ttsd records and reports it: the name itself when it is valid
    UTF-8, else its bytes decoded with each byte that is not written ``\\xNN`` (a
    Latin-1 ``café.txt`` becomes ``caf\\xe9.txt``), so that it can be stored, logged and
    used for the outbox and done/ names."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def claimed_name(path: Path) -> str:
    """The original inbox name of a file in the work folder (strips ``<16 hex>--``)."""
    head, sep, rest = path.name.partition("--")
    if sep and len(head) == 16 and all(c in "0123456789abcdef" for c in head) and rest:
        return rest
    return path.name


def writer_open(path: Path | str) -> bool | None:
    """Whether some process has ``path`` open for writing, as the kernel sees it: True,
    False, or None where it cannot say (not a regular file, a file system without
    leases, another owner's file without CAP_LEASE).

    A read lease is granted only while nobody has the file open for writing; it is
    given back at once. (A writer opening the file in that instant makes the kernel
    signal the lease holder with SIGIO, which ``Inbox.start`` ignores.)"""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError as exc:
            return True if exc.errno == errno.EAGAIN else None
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


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


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (ignored where directories cannot be synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


class _Events:
    """Thread-safe set of paths named by watchdog events, and how many times each path
    is open (inotify's open and close events); the handler only records."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: set[str] = set()
        self._opens: dict[str, int] = {}
        self.overflowed = False
        self._folder_gone = False

    def add(self, path: str) -> None:
        with self._lock:
            if len(self._paths) >= MAX_QUEUED_EVENTS:
                self._paths.clear()
                self.overflowed = True
            self._paths.add(path)

    def opened(self, path: str, delta: int) -> None:
        """One more (+1) or one fewer (-1) open of ``path``; never below zero (an open
        from before the watch started is closed unseen)."""
        with self._lock:
            n = self._opens.get(path, 0) + delta
            if n > 0 and len(self._opens) < MAX_QUEUED_EVENTS:
                self._opens[path] = n
            else:
                self._opens.pop(path, None)

    def moved(self, src: str, dest: str) -> None:
        """A rename carries the open count with it (the descriptors stay open)."""
        with self._lock:
            n = self._opens.pop(src, 0)
            if n:
                self._opens[dest] = n

    def gone(self, path: str) -> None:
        with self._lock:
            self._opens.pop(path, None)

    def open_count(self, path: str) -> int:
        with self._lock:
            return self._opens.get(path, 0)

    def flag_overflow(self) -> None:
        with self._lock:
            self.overflowed = True
            self._opens.clear()   # events were lost: the counts are unknown

    def flag_gone(self) -> None:
        """The watched folder itself was deleted (its watch is dead)."""
        with self._lock:
            self._folder_gone = True

    def take_gone(self) -> bool:
        with self._lock:
            gone, self._folder_gone = self._folder_gone, False
            return gone

    def drain(self) -> tuple[set[str], bool]:
        with self._lock:
            paths, self._paths = self._paths, set()
            overflowed, self.overflowed = self.overflowed, False
            if overflowed:
                self._opens.clear()
        return paths, overflowed


class _Handler(FileSystemEventHandler):
    """Records every path an event names and counts opens and closes; no I/O, no
    decisions."""

    def __init__(self, events: _Events, folder: Path) -> None:
        super().__init__()
        self._events = events
        self._folder = str(folder)

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            if event.event_type == "deleted" and os.fsdecode(event.src_path) == self._folder:
                self._events.flag_gone()
            return
        src = os.fsdecode(event.src_path)
        kind = event.event_type
        if kind == "opened":
            self._events.opened(src, +1)
            return
        if kind in ("closed", "closed_no_write"):
            self._events.opened(src, -1)
        elif kind == "deleted":
            self._events.gone(src)
        self._events.add(src)
        dest = os.fsdecode(getattr(event, "dest_path", "") or "")
        if dest:
            self._events.moved(src, dest)
            self._events.add(dest)


class _OverflowHook(logging.Handler):
    """Turns watchdog's "inotify queue overflowed" warning into an immediate rescan."""

    def __init__(self, events: _Events) -> None:
        super().__init__(level=logging.WARNING)
        self._events = events

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self._events.flag_overflow()


class Inbox:
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
        self._events = _Events()
        self._handler = _Handler(self._events, self._inbox)
        self._hook = _OverflowHook(self._events)
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

    def start(self) -> None:
        """Start the observer: inotify, else polling (config or fallback), never raising
        for a watch problem: with no observer at all, ``ready()`` rescans every second."""
        if self._observer is not None:
            return
        self._inbox.mkdir(parents=True, exist_ok=True)
        self._work.mkdir(parents=True, exist_ok=True)
        st = os.stat(self._inbox)
        self._watched = (st.st_dev, st.st_ino)
        if threading.current_thread() is threading.main_thread():
            # A writer opening a file while ``writer_open`` holds its lease makes the
            # kernel send SIGIO, whose default action ends the process.
            signal.signal(signal.SIGIO, signal.SIG_IGN)
        logging.getLogger(_WATCHDOG_LOGGER).addHandler(self._hook)
        if not self._cfg.polling:
            try:
                self._observer = self._start_observer(Observer())
                self.mode = "inotify"
            except OSError as exc:
                hint = (" (raise fs.inotify.max_user_watches / max_user_instances)"
                        if exc.errno in (errno.ENOSPC, errno.EMFILE) else "")
                log.warning("inbox.inotify_failed", inbox=str(self._inbox),
                            error=f"{exc.strerror or exc}{hint}", fallback="polling")
        if self._observer is None:
            interval = max(0.1, min(1.0, self._cfg.settle_s / 2))
            try:
                observer = PollingObserverVFS(os.lstat, os.scandir, polling_interval=interval)
                self._observer = self._start_observer(observer)
                self.mode = "polling"
                log.info("inbox.polling", inbox=str(self._inbox), interval_s=interval)
            except OSError as exc:
                self.mode = "rescan-only"
                log.error("inbox.watch_failed", inbox=str(self._inbox), error=str(exc),
                          fallback="rescan every second")
        else:
            log.info("inbox.watching", inbox=str(self._inbox), mode=self.mode)

    def _start_observer(self, observer: BaseObserver) -> BaseObserver:
        try:
            observer.schedule(self._handler, str(self._inbox), recursive=False)
            observer.start()
        except BaseException:
            _stop_observer(observer)
            raise
        return observer

    def stop(self) -> None:
        """Stop and join the observer thread(s); safe to call twice."""
        observer, self._observer = self._observer, None
        logging.getLogger(_WATCHDOG_LOGGER).removeHandler(self._hook)
        if observer is not None:
            _stop_observer(observer)
            log.info("inbox.stopped", inbox=str(self._inbox))
        self.mode = "stopped"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- noticing ---------------------------------------------------------------------

    def ready(self, now: float | None = None) -> list[Path]:
        """Inbox paths whose (size, mtime_ns, inode) held for ``settle_s`` and that no
        process has open for writing (``_writing``), oldest first.

        Symlinks, FIFOs, sockets, devices, multi-link and oversized files are returned
        too (``claim`` rejects them with a reason); they are only ``lstat``-ed here.
        """
        now = time.monotonic() if now is None else now
        self._follow_inbox()
        queued, overflowed = self._events.drain()
        candidates = {Path(p) for p in queued}
        rescan_s = self._cfg.rescan_s if self.mode in ("inotify", "polling") else 1.0
        if overflowed:
            log.warning("inbox.overflow", inbox=str(self._inbox), action="full rescan")
        if overflowed or self._last_scan is None or now - self._last_scan >= rescan_s:
            candidates |= self._scan()
            self._last_scan = now
        with self._lock:
            candidates |= set(self._seen) | set(self._stuck)
            out: list[tuple[int, str, Path]] = []
            for path in candidates:
                if path.parent != self._inbox or not eligible_name(path.name, self._suffixes):
                    continue
                try:
                    st = os.lstat(path)
                except OSError:
                    self._seen.pop(path, None)
                    self._stuck.pop(path, None)
                    continue
                if stat.S_ISDIR(st.st_mode):
                    self._seen.pop(path, None)
                    if path.name not in self._dirs:
                        self._dirs.add(path.name)
                        log.warning("inbox.directory_ignored", name=display_name(path.name),
                                    reason="a folder, not a file: ttsd reads only the files "
                                           "directly in the inbox")
                    continue
                state = FileState.of(st)
                if path in self._stuck:
                    if self._stuck[path] == state:
                        continue
                    del self._stuck[path]
                seen, ok = settled(self._seen.get(path), state, self._cfg.settle_s, now)
                self._seen[path] = seen
                if ok:
                    out.append((st.st_mtime_ns, path.name, path))
        ready = [p for _, _, p in sorted(out) if not self._writing(p)]
        return ready

    def _writing(self, path: Path) -> bool:
        """A settled path that some process still has open for writing (a writer that
        paused longer than ``settle_s``): the kernel's answer (``writer_open``), else,
        under inotify, whether the file is still open at all. Logged once per wait."""
        st = None
        with contextlib.suppress(OSError):
            st = os.lstat(path)
        busy = None
        if st is not None and stat.S_ISREG(st.st_mode):
            busy = writer_open(path)
            if busy is None and self.mode == "inotify":
                busy = self._events.open_count(str(path)) > 0
        if busy:
            if path not in self._waiting:
                self._waiting.add(path)
                log.info("inbox.waiting_for_writer", name=path.name,
                         reason="a process still has it open for writing")
            return True
        self._waiting.discard(path)
        return False

    def _follow_inbox(self) -> None:
        """Watch the inbox again when the folder at its path is no longer the one
        watched (deleted, and made again or not: it is made again here), so that files
        dropped into the new one are seen at once, not at the next rescan."""
        if self._observer is None or self._watched is None:
            return
        if not self._events.take_gone():   # deleted (a new folder may reuse its inode)
            try:
                st = os.stat(self._inbox)
                if (st.st_dev, st.st_ino) == self._watched:
                    return
            except OSError:
                pass
        log.warning("inbox.replaced", inbox=str(self._inbox), action="watching it again")
        observer, self._observer = self._observer, None
        _stop_observer(observer)
        try:
            self.start()
        except OSError as exc:   # the path cannot be made again now: rescans go on
            log.error("inbox.watch_failed", inbox=str(self._inbox), error=str(exc))
            return
        self._last_scan = None   # look at the new folder's files now

    def use(self, cfg: InputConfig) -> None:
        """New [input] settings (its ``polling`` is read only when watching starts)."""
        self._cfg = cfg

    def rescan(self) -> None:
        """Look at every file of the inbox at the next ``ready``."""
        self._last_scan = None

    def pending(self) -> int:
        """Eligible inbox files seen but not yet settled or claimed."""
        with self._lock:
            return len(self._seen)

    def _scan(self) -> set[Path]:
        """Every entry directly in the inbox (no stat, no follow)."""
        found: set[Path] = set()
        dirs: set[str] = set()
        try:
            with os.scandir(self._inbox) as it:
                for entry in it:
                    found.add(Path(entry.path))
                    if entry.is_dir(follow_symlinks=False):
                        dirs.add(entry.name)
        except OSError as exc:
            log.warning("inbox.scan_failed", inbox=str(self._inbox), error=str(exc))
        with self._lock:
            self._dirs &= dirs
        return found

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
        _fsync_dir(folder)
        _fsync_dir(self._inbox)
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
        sha256 differ from the claim (RELIABILITY row 43).
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


def _stop_observer(observer: BaseObserver) -> None:
    """Stop and join an observer, started or not."""
    try:
        observer.stop()
    except Exception:  # a half-started observer may fail to unschedule
        log.debug("inbox.observer_stop_failed", exc_info=True)
    if observer.is_alive():
        observer.join(timeout=10)
        if observer.is_alive():
            log.warning("inbox.observer_join_timeout")
