"""Noticing inbox files: watchdog events, rescans, settling, and open writers.

The watchdog observer (inotify, or polling on NFS/CIFS and when inotify fails) only
tells us *which* paths to look at: its handler enqueues paths into a thread-safe set
and does nothing else. ``ready()`` drains that set, adds a full scan of the inbox on
the first call and every ``rescan_s`` (lost events, queue overflow), and returns the
paths whose ``(size, mtime_ns, inode)`` has not changed for ``settle_s``.

A settled path is handed out only when no process has it open for writing. Where the
kernel can say so, a read lease (``fcntl(F_SETLEASE, F_RDLCK)``, granted only while no
one has the file open for writing; taken and given back at once) decides; where it
cannot (another owner's file without CAP_LEASE, NFS, CIFS), inotify's open and close
events count the processes that have the file open; with neither (polling a network
file system), ``settle_s`` of quiet is all ttsd can go by (``writer_open``). Only this
module imports watchdog.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserverVFS

from ttsd.config import InputConfig
from ttsd.ingest.names import display_name, eligible_name
from ttsd.log import get_logger

log = get_logger(__name__)
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

MAX_QUEUED_EVENTS = 10_000
"""More distinct queued paths than this are dropped in favour of a full rescan."""


_WATCHDOG_LOGGER = "watchdog.observers.inotify_c"


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


class WatchEvents:
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


class EventHandler(FileSystemEventHandler):
    """Records every path an event names and counts opens and closes; no I/O, no
    decisions."""

    def __init__(self, events: WatchEvents, folder: Path) -> None:
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


class OverflowHook(logging.Handler):
    """Turns watchdog's "inotify queue overflowed" warning into an immediate rescan."""

    def __init__(self, events: WatchEvents) -> None:
        super().__init__(level=logging.WARNING)
        self._events = events

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self._events.flag_overflow()


def stop_observer(observer: BaseObserver) -> None:
    """Stop and join an observer, started or not."""
    try:
        observer.stop()
    except Exception:  # a half-started observer may fail to unschedule
        log.debug("inbox.observer_stop_failed", exc_info=True)
    if observer.is_alive():
        observer.join(timeout=10)
        if observer.is_alive():
            log.warning("inbox.observer_join_timeout")


class Watching:
    """The watching half of ``Inbox`` (a mixin: they share the inbox's state)."""

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
            stop_observer(observer)
            raise
        return observer

    def stop(self) -> None:
        """Stop and join the observer thread(s); safe to call twice."""
        observer, self._observer = self._observer, None
        logging.getLogger(_WATCHDOG_LOGGER).removeHandler(self._hook)
        if observer is not None:
            stop_observer(observer)
            log.info("inbox.stopped", inbox=str(self._inbox))
        self.mode = "stopped"

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
        stop_observer(observer)
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
