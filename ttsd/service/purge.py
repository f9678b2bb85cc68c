"""``ttsd purge-cache``: drop cache entries (all, older than, or least recently used
first down to a size), safely while the daemon runs.

Order of work, page by page (500 entries): the rows are deleted in one transaction
first (``Store.cache_evict``, which waits on the daemon's write lock through
``busy_timeout`` instead of failing), then their files are unlinked. A daemon that
read a row just before it went and then finds the file gone treats it as a miss and
synthesizes the line again; the daemon never sees a row whose file was removed before
the row. Short transactions per page keep the write lock brief, so the daemon's own
writes never wait long.

Only files that lie inside the cache folder are unlinked: a row whose path leads
elsewhere (absolute, ``..``, or through a symlinked folder) is dropped from the
store but its file is left alone and reported as refused.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from ttsd import units
from ttsd.config import PathsConfig
from ttsd.errors import ConfigError
from ttsd.log import get_logger
from ttsd.output.timestamps import sidecar
from ttsd.store.journal import Store
from ttsd.store.records import CacheFile
from ttsd.units import human_bytes

log = get_logger(__name__)

PAGE = 500
"""Entries per transaction (also well below SQLite's limit on bound parameters)."""


class PurgeOptionError(ConfigError, ValueError):
    """A purge option is wrong (bad age or size, or no option at all)."""


# ---------------------------------------------------------------------- options

_AGE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_AGE_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)
_AGE = re.compile(r"(?:\d+(?:\.\d+)?\s*[smhdw]\s*)+", re.IGNORECASE)


def parse_age(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w``, ``1.5h``, ``1h30m`` → seconds."""
    s = text.strip()
    if not _AGE.fullmatch(s):
        raise PurgeOptionError(
            f"age {text!r}: expected a number and a unit (s, m, h, d or w), e.g. 30d, 12h, 90m")
    return sum(float(n) * _AGE_UNITS[u.lower()] for n, u in _AGE_PART.findall(s))


def parse_size(text: str) -> int:
    """``2GB``, ``500MB``, ``100k`` (decimal), ``1.5GiB``, ``64MiB`` (binary), ``4096`` →
    bytes (rounded down); see ``ttsd.units``."""
    try:
        return units.parse_size(text)
    except ValueError as exc:
        raise PurgeOptionError(str(exc)) from None


# ---------------------------------------------------------------------- purge

@dataclass
class PurgeReport:
    removed: int = 0
    """Cache entries removed from the store (or that would be, in a dry run)."""
    freed_bytes: int = 0
    """Disk space given back: sizes of the unlinked files no outbox WAV still links to
    (``cache.link``)."""
    kept: int = 0
    """Entries left in the cache."""
    kept_bytes: int = 0
    """Their size, as the store records it."""
    dry_run: bool = False
    missing_files: int = 0
    """Removed entries whose file was already gone (not an error)."""
    refused: int = 0
    """Removed entries whose path leads outside the cache folder: file left alone."""
    refused_paths: list[str] = field(default_factory=list)
    linked: int = 0
    """Unlinked files whose data stays on disk: an outbox WAV is a hard link to it
    (``cache.link``)."""
    linked_bytes: int = 0


def purge(paths: PathsConfig, *, all: bool = False, older_than_s: float | None = None,
          max_bytes: int | None = None, dry_run: bool = False,
          now: float | None = None) -> PurgeReport:
    """Remove cache entries: every one (``all``), those last used more than
    ``older_than_s`` ago, and least recently used ones until the total is at most
    ``max_bytes``. Options combine (union). ``dry_run`` changes nothing and reports
    what would go. Safe while the daemon runs (see the module's docstring).
    """
    if not all and older_than_s is None and max_bytes is None:
        raise PurgeOptionError("nothing to purge: say --all, --older-than or --max-size")
    if older_than_s is not None and not (math.isfinite(older_than_s) and older_than_s >= 0):
        raise PurgeOptionError(f"--older-than must be a duration >= 0, got {older_than_s!r}")
    if max_bytes is not None and max_bytes < 0:
        raise PurgeOptionError(f"--max-size must be >= 0 bytes, got {max_bytes!r}")
    now = time.time() if now is None else now
    report = PurgeReport(dry_run=dry_run)
    if not paths.db.exists():
        return report  # never ran: nothing recorded, nothing to remove (and no DB created)
    store = Store.open_readonly(paths.db) if dry_run else Store(paths.db)
    if store is None:  # removed since the check above
        return report
    try:
        gone_bytes = _purge(store, paths.cache, report, all=all, max_bytes=max_bytes,
                            cutoff=None if older_than_s is None else now - older_than_s)
        totals = store.cache_totals()
        count, size = totals.entries, totals.bytes
        if dry_run:
            count, size = count - report.removed, size - gone_bytes
        report.kept, report.kept_bytes = count, size
    finally:
        store.close()
    log.info("cache.purge", removed=report.removed, freed_bytes=report.freed_bytes,
             kept=report.kept, missing=report.missing_files, refused=report.refused,
             linked=report.linked, dry_run=dry_run)
    return report


def _purge(store: Store, cache_dir: Path, report: PurgeReport, *, all: bool,
           max_bytes: int | None, cutoff: float | None) -> int:
    """Walk entries least recently used first, a page at a time (keyset on
    (last_used, rowid): the cache_lru index order), and remove the victims.

    Every criterion picks a prefix of that order, except that ``all`` is bounded by
    the rowids present at the start (entries the daemon adds meanwhile stay).
    Returns the bytes (as the store records them) of the entries removed.
    """
    snapshot_rowid = store.cache_last_rowid()
    total = store.cache_totals().bytes
    root = os.path.realpath(cache_dir)
    after: tuple[float, int] = (-math.inf, -1)
    gone_bytes = 0
    while True:
        page = store.cache_page(after, PAGE)
        if not page:
            return gone_bytes
        after = (page[-1].last_used, page[-1].rowid)
        victims: list[CacheFile] = []
        done = False
        for entry in page:
            if all:
                if entry.rowid > snapshot_rowid:
                    continue  # added while we purge: keep it, look further
            elif not ((cutoff is not None and entry.last_used < cutoff)
                      or (max_bytes is not None and total > max_bytes)):
                done = True  # this and everything used later stay
                break
            victims.append(CacheFile(entry.key, entry.path, entry.bytes))
            total -= entry.bytes
        gone_bytes += _remove(store, victims, root, report)
        if done:
            return gone_bytes


def _remove(store: Store, victims: list[CacheFile], root: str, report: PurgeReport) -> int:
    """Rows first (one transaction), then files; returns the rows' recorded bytes."""
    if not victims:
        return 0
    rows = victims if report.dry_run else store.cache_evict([v.key for v in victims])
    for r in rows:
        report.removed += 1
        _unlink(Path(r.path), root, report)
    return sum(int(r.bytes) for r in rows)


def _unlink(path: Path, root: str, report: PurgeReport) -> None:
    """Unlink one cached file (only inside ``root``, the cache folder's real path)."""
    target = unlink_target(path, root)
    if target is None:
        report.refused += 1
        report.refused_paths.append(str(path))
        log.warning("cache.purge_refused", path=str(path), reason="outside the cache folder")
        return
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        report.missing_files += 1
        return
    if stat.S_ISDIR(st.st_mode):
        report.refused += 1
        report.refused_paths.append(str(path))
        log.warning("cache.purge_refused", path=str(path), reason="a folder")
        return
    if not report.dry_run:
        try:
            os.unlink(target)
        except FileNotFoundError:
            report.missing_files += 1
            return
        stamps = sidecar(target)   # its timestamps, if kept
        if stamps != target:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stamps)
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        report.linked += 1
        report.linked_bytes += st.st_size
    else:
        report.freed_bytes += st.st_size


def unlink_target(path: Path, root: str) -> str | None:
    """The real path to unlink for ``path`` (relative paths are taken from ``root``) if
    it lies inside ``root``; None otherwise. The folders are resolved (symlinks and
    ``..``); the last component is not followed, so a symlink is removed, not its target
    (``ingest.names.inside``, which asks whether a path *resolves* below a folder,
    follows it).
    """
    full = Path(root) / path if not path.is_absolute() else path
    name = full.name
    if name in ("", ".", "..") or "\0" in str(full):
        return None
    parent = os.path.realpath(full.parent)
    if os.path.commonpath([parent, root]) != root:
        return None
    return os.path.join(parent, name)


# ---------------------------------------------------------------------- render

def render(report: PurgeReport) -> str:
    """What was removed and freed, for a terminal."""
    verb = "would remove" if report.dry_run else "removed"
    text = (f"{verb} {report.removed:,} cache entries, "
            f"{'would free' if report.dry_run else 'freed'} {human_bytes(report.freed_bytes)}; "
            f"kept {report.kept:,} entries ({human_bytes(report.kept_bytes)})")
    notes = []
    if report.linked:
        notes.append(f"{report.linked:,} files ({human_bytes(report.linked_bytes)}) are still "
                     "hard-linked from the outbox, so their space stays in use until those "
                     "WAVs go")
    if report.missing_files:
        notes.append(f"{report.missing_files:,} of their files were already missing")
    if report.refused:
        shown = ", ".join(report.refused_paths[:5])
        more = f" and {report.refused - 5:,} more" if report.refused > 5 else ""
        notes.append(f"{report.refused:,} entries pointed outside the cache folder; "
                     f"their files were left alone: {shown}{more}")
    if report.dry_run:
        notes.append("dry run: nothing was changed")
    return "\n".join([text, *(f"  {n}" for n in notes)])
