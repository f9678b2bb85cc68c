"""``ttsd repair-store``: rebuild a damaged journal (``state/ttsd.db``) from the rows
SQLite can still read of it.

Nothing is deleted. With the state folder's lock held (no daemon can start meanwhile),
SQLite's ``quick_check`` says whether the journal is damaged at all; a sound journal is
left alone. A fresh journal is built beside the damaged one (``ttsd.db.rebuilding``),
then the damaged file, with its ``-wal`` and ``-shm``, is renamed aside to
``ttsd.db.damaged-YYYYmmdd-HHMMSS`` and the fresh one takes its name.

What is carried over, table by table: ``files``, ``lines``, ``cache`` and ``counters``,
with their ids. Each is read in rowid order a chunk at a time; where a read fails on a
damaged page, the reader steps up to the failing row one row at a time, then searches
(doubling, then bisecting the rowid) for the first row it can read again, so that one
bad page loses only its own rows. Rows SQLite returns but that make no sense (an
unknown state) are dropped, and so are lines whose file row was lost. Lines left
``running`` are ``pending`` again; the done totals (``DONE_AUDIO_US``,
``DONE_CACHED``) are recounted from the salvaged lines. ``batches``, ``releases``,
``heartbeat`` and ``workers`` (throughput history and live facts) start empty.

When lines were lost, each unfinished (``queued``) file whose claimed copy is still in
the work folder goes back to ``parsing``: at the next start ``Ingest.recover`` parses the
copy again. Its inserts are idempotent on (file, line number), so only the lost lines
come back, as pending. A WAV already in the outbox is never written again: a lost line
whose cache entry survived is answered from the cache as it is parsed (``link_hit``
finds the cache's very file at the path), and any other goes through the model once
more, after which the writer keeps the valid WAV it finds at the path instead of
writing it (``Sink._write_one``). A claimed copy whose file row was lost is adopted as a new file at the next
start (``Inbox.orphans``).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ttsd.config import PathsConfig
from ttsd.errors import ConfigError, TtsdError
from ttsd.log import get_logger
from ttsd.service import sitelock
from ttsd.store.journal import DONE_AUDIO_US, DONE_CACHED, Store, damaged, recount_done

log = get_logger(__name__)

CHUNK = 500
"""Rows read per query from the damaged copy."""
SALVAGED = ("files", "lines", "cache", "counters")
NOT_CARRIED = ("batches", "heartbeat", "releases", "workers")
FILE_STATES = ("parsing", "queued", "done", "failed")
LINE_STATES = ("pending", "running", "done", "failed")
MIN_ROWID, MAX_ROWID = -(2**63), 2**63 - 1
SIDE_FILES = ("", "-wal", "-shm")
"""A journal on disk: the database and SQLite's write-ahead log and its index."""


class JournalInUseError(TtsdError):
    """A daemon holds the state folder: the journal it writes is not rebuilt under it."""

    exit_status = sitelock.EXIT_LOCKED


@dataclass
class TableTally:
    """What became of one table's rows."""

    name: str
    salvaged: int = 0
    """Rows in the new journal."""
    held: int | None = None
    """Rows the damaged copy held, where SQLite could still count them."""
    gaps: list[tuple[int | None, int | None]] = field(default_factory=list)
    """Stretches that could not be read: (last rowid read before, first rowid read after);
    None: the table's start or end."""
    dropped: int = 0
    """Rows read but not kept (garbled, or a line whose file row was lost)."""
    error: str | None = None
    """Why nothing of the table could be read."""

    @property
    def lost(self) -> int | None:
        """Rows of the damaged copy not in the new journal; None when unknown (rows
        could not be read and could not be counted either)."""
        if self.held is not None:
            return max(0, self.held - self.salvaged)
        return None if self.gaps or self.error else self.dropped


@dataclass
class RepairReport:
    db: str
    dry_run: bool = False
    problem: str | None = None
    """What SQLite's check found; None: the journal is sound (or missing)."""
    missing: bool = False
    rebuilt: bool = False
    damaged_copy: str | None = None
    """Where the damaged journal was (or, in a dry run, would be) kept."""
    tables: list[TableTally] = field(default_factory=list)
    orphan_lines: int = 0
    """Lines dropped because their file row was lost."""
    requeued: int = 0
    """Lines left running, pending again."""
    reparse: list[str] = field(default_factory=list)
    """Unfinished files sent back to parsing (their claimed copy is read again)."""
    cut_short: list[str] = field(default_factory=list)
    """Unfinished files that may have lost lines, with no claimed copy to read again."""
    finished_files: int = 0
    """Finished files in the journal (lost lines may have been theirs)."""
    orphan_copies: int = 0
    """Claimed inputs in the work folder that no salvaged file row names."""

    def table(self, name: str) -> TableTally:
        return next(t for t in self.tables if t.name == name)


# ---------------------------------------------------------------------- repair

def repair(paths: PathsConfig, *, dry_run: bool = False, force: bool = False,
           now: float | None = None) -> RepairReport:
    """Check the journal and, if SQLite finds it damaged (or ``force``), rebuild it from
    what can be read, keeping the damaged copy. ``dry_run`` builds the new journal in a
    temporary folder, reports, and changes nothing. JournalInUseError (exit 3) if a
    daemon holds the state folder."""
    db = paths.db
    report = RepairReport(str(db), dry_run=dry_run)
    if not db.exists():
        report.missing = True
        return report
    with contextlib.ExitStack() as stack:
        if not dry_run:   # a dry run only reads: safe beside a daemon
            stack.enter_context(_hold(paths.state))
        report.problem = check(db)
        if report.problem is None and not force:
            return report
        copy = _aside_name(db, time.time() if now is None else now)
        report.damaged_copy = str(copy)
        if dry_run:
            target = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="ttsd-repair-"))) / db.name
        else:
            target = db.with_name(db.name + ".rebuilding")
            _remove(target)   # left by a repair that was cut short
        try:
            _rebuild(db, target, paths, report)
        except BaseException:
            _remove(target)   # the damaged journal is still in place, as it was
            raise
        if dry_run:
            return report
        _rename(db, copy)
        _rename(target, db)
        _sync_folder(db.parent)
        report.rebuilt = True
    log.warning("store.repaired", db=str(db), damaged_copy=report.damaged_copy,
                problem=report.problem,
                **{f"{t.name}_salvaged": t.salvaged for t in report.tables},
                **{f"{t.name}_lost": t.lost for t in report.tables})
    return report


def check(db: Path) -> str | None:
    """SQLite's ``quick_check`` of the journal (every page, no index contents): None
    when it passes, else what it found (its first lines, or the error it raised)."""
    conn = _open_readonly(db)
    try:
        found = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
    except sqlite3.DatabaseError as exc:
        if not damaged(exc):
            raise ConfigError(f"cannot read the journal {db}: {exc}") from None
        return str(exc)
    finally:
        conn.close()
    return None if found == ["ok"] else "; ".join(found)


@contextlib.contextmanager
def _hold(state: Path) -> Iterator[None]:
    """The state folder's lock (``sitelock``), held while the journal is rebuilt."""
    try:
        fd = sitelock.acquire(state)
    except sitelock.SiteLockedError as exc:
        who = f"pid {exc.pid}" if exc.pid else "a process whose pid is not written yet"
        raise JournalInUseError(
            f"a ttsd daemon ({who}) holds the state folder {state}: stop it first "
            "(systemctl stop ttsd); repair-store never rebuilds a journal in use") from None
    try:
        yield
    finally:
        os.close(fd)


def _rebuild(src: Path, target: Path, paths: PathsConfig, report: RepairReport) -> None:
    """A fresh journal at ``target`` (the migrations of ``Store``) holding what can be
    read of ``src``, in one transaction."""
    new = Store(target)
    old = _open_readonly(src)
    try:
        with new.tx() as c:
            files = _salvage_files(old, c, report)
            lines = _salvage_lines(old, c, files, report)
            _salvage_plain(old, c, "cache", report, "INSERT OR IGNORE")
            _salvage_plain(old, c, "counters", report, "INSERT OR REPLACE",
                           skip=(DONE_AUDIO_US, DONE_CACHED))
            recount_done(c)
            if lines.lost != 0:
                _send_back(c, files, report)
            report.finished_files = sum(1 for f in files.values() if f[1] in ("done", "failed"))
    finally:
        old.close()
        new.close()
    known = {f[2] for f in files.values()}
    with contextlib.suppress(FileNotFoundError), os.scandir(paths.work) as it:
        report.orphan_copies = sum(1 for e in it if e.path not in known)


def _salvage_files(old: sqlite3.Connection, c: sqlite3.Connection,
                   report: RepairReport) -> dict[int, tuple[str, str, str]]:
    """The readable file rows; returns id → (name, state, work_path)."""
    tally, cols = _start(old, c, "files", report)
    files: dict[int, tuple[str, str, str]] = {}
    if not cols:
        return files
    i_id, i_name, i_state, i_work = (cols.index(k) for k in ("id", "name", "state", "work_path"))
    keep = []
    for row in _read(old, "files", cols, tally):
        if row[i_state] not in FILE_STATES or not isinstance(row[i_id], int):
            tally.dropped += 1
            continue
        keep.append(row)
        files[row[i_id]] = (str(row[i_name]), row[i_state], str(row[i_work]))
    tally.salvaged = _insert(c, "files", cols, keep, "INSERT OR IGNORE")
    return files


def _salvage_lines(old: sqlite3.Connection, c: sqlite3.Connection,
                   files: dict[int, tuple[str, str, str]], report: RepairReport) -> TableTally:
    """The readable lines of salvaged files; running ones pending again."""
    tally, cols = _start(old, c, "lines", report)
    if not cols:
        return tally
    i_file, i_state = cols.index("file_id"), cols.index("state")
    keep: list[tuple] = []
    for row in _read(old, "lines", cols, tally):
        state = row[i_state]
        if state not in LINE_STATES:
            tally.dropped += 1
            continue
        if row[i_file] not in files:
            tally.dropped += 1
            report.orphan_lines += 1
            continue
        if state == "running":
            row = (*row[:i_state], "pending", *row[i_state + 1:])
            report.requeued += 1
        keep.append(row)
        if len(keep) >= CHUNK:
            tally.salvaged += _insert(c, "lines", cols, keep, "INSERT OR IGNORE")
            keep = []
    tally.salvaged += _insert(c, "lines", cols, keep, "INSERT OR IGNORE")
    return tally


def _salvage_plain(old: sqlite3.Connection, c: sqlite3.Connection, table: str,
                   report: RepairReport, verb: str, skip: tuple[str, ...] = ()) -> None:
    """A table whose rows stand alone (cache entries, counters); the first column's
    values in ``skip`` stay as the new journal has them."""
    tally, cols = _start(old, c, table, report)
    if not cols:
        return
    keep: list[tuple] = []
    for row in _read(old, table, cols, tally):
        if row[0] in skip:
            tally.held = None if tally.held is None else tally.held - 1
            continue
        keep.append(row)
        if len(keep) >= CHUNK:
            tally.salvaged += _insert(c, table, cols, keep, verb)
            keep = []
    tally.salvaged += _insert(c, table, cols, keep, verb)


def _send_back(c: sqlite3.Connection, files: dict[int, tuple[str, str, str]],
               report: RepairReport) -> None:
    """Lines were lost, of unknown files: every unfinished file whose claimed copy is
    still there is parsed again at the next start (which re-adds only missing lines)."""
    for fid, (name, state, work) in sorted(files.items()):
        if state != "queued":
            continue
        if os.path.lexists(work):
            c.execute("UPDATE files SET state = 'parsing' WHERE id = ?", (fid,))
            report.reparse.append(name)
        else:
            report.cut_short.append(name)


def _start(old: sqlite3.Connection, c: sqlite3.Connection, table: str,
           report: RepairReport) -> tuple[TableTally, list[str]]:
    """A table's tally and the columns both journals have (none: nothing readable)."""
    tally = TableTally(table)
    report.tables.append(tally)
    try:
        have = [r[1] for r in old.execute(f'PRAGMA table_info("{table}")')]
    except sqlite3.DatabaseError as exc:
        if not damaged(exc):
            raise
        tally.error = str(exc)
        return tally, []
    if not have:
        tally.error = "no such table in the damaged copy"
        return tally, []
    want = [r[1] for r in c.execute(f'PRAGMA table_info("{table}")')]
    cols = [k for k in want if k in have]
    try:
        tally.held = int(old.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0])
    except sqlite3.DatabaseError as exc:
        if not damaged(exc):
            raise
    return tally, cols


def _read(old: sqlite3.Connection, table: str, cols: list[str],
          tally: TableTally) -> Iterator[tuple]:
    """The rows SQLite can read, in rowid order, ``CHUNK`` at a time. When a read fails
    on damage, rows are read one at a time up to the failing one; then
    ``_next_readable`` finds where reading works again, and the stretch between is
    recorded in ``tally.gaps``."""
    select = (f"SELECT rowid, {', '.join(_q(k) for k in cols)} FROM {_q(table)} "
              "WHERE rowid >= ? ORDER BY rowid LIMIT ?")
    start, limit, single, last = MIN_ROWID, CHUNK, 0, None
    while True:
        try:
            rows = old.execute(select, (start, limit)).fetchall()
        except sqlite3.DatabaseError as exc:
            if not damaged(exc):
                raise
            if limit > 1:
                limit, single = 1, 0
                continue
            resume = _next_readable(old, select, start)
            tally.gaps.append((last, resume))
            if resume is None:
                return
            start, limit = resume, CHUNK
            continue
        if not rows:
            return
        for row in rows:
            yield row[1:]
        last = rows[-1][0]
        if last >= MAX_ROWID:
            return
        start = max(start + 1, last + 1)   # onwards, even if a garbled page says otherwise
        if limit == 1:
            single += 1
            if single >= CHUNK:
                limit = CHUNK


def _next_readable(old: sqlite3.Connection, select: str, bad: int) -> int | None:
    """The smallest rowid above ``bad`` from which a read works again (None: none).

    A read from rowid x descends the table's tree to x: it fails while x falls in a
    damaged page (or under a damaged inner page) and works past it, so the search
    doubles its step until a read works, then bisects back to the edge."""
    def works(x: int) -> bool:
        try:
            old.execute(select, (x, 1)).fetchall()
        except sqlite3.DatabaseError as exc:
            if not damaged(exc):
                raise
            return False
        return True

    lo, step = bad, 1
    while True:
        hi = min(lo + step, MAX_ROWID)
        if works(hi):
            break
        if hi == MAX_ROWID:
            return None
        lo, step = hi, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if works(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _insert(c: sqlite3.Connection, table: str, cols: list[str], rows: list[tuple],
            verb: str) -> int:
    """Insert rows as they were (ids included); returns how many went in (``OR IGNORE``
    skips one that breaks a constraint of the fresh schema)."""
    if not rows:
        return 0
    before = c.total_changes
    c.executemany(f"{verb} INTO {_q(table)} ({', '.join(_q(k) for k in cols)}) "
                  f"VALUES ({', '.join('?' * len(cols))})", rows)
    return c.total_changes - before


# ---------------------------------------------------------------------- files

def _open_readonly(db: Path) -> sqlite3.Connection:
    """A read-only connection that never writes the file (it may create the ``-shm``
    a WAL journal needs beside it)."""
    return sqlite3.connect(f"file:{urllib.parse.quote(str(db))}?mode=ro", uri=True,
                           timeout=10.0, isolation_level=None)


def _aside_name(db: Path, now: float) -> Path:
    """``ttsd.db.damaged-YYYYmmdd-HHMMSS`` (``-2``, ``-3``… if taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    base = db.with_name(f"{db.name}.damaged-{stamp}")
    copy, n = base, 1
    while any(os.path.lexists(f"{copy}{s}") for s in SIDE_FILES):
        n += 1
        copy = base.with_name(f"{base.name}-{n}")
    return copy


def _rename(src: Path, dst: Path) -> None:
    """A journal with its side files, renamed."""
    for side in SIDE_FILES:
        if os.path.lexists(f"{src}{side}"):
            os.rename(f"{src}{side}", f"{dst}{side}")


def _remove(db: Path) -> None:
    for side in SIDE_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{db}{side}")


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# ---------------------------------------------------------------------- render

def render(report: RepairReport) -> str:
    """What was found, kept, carried over and lost, for a terminal."""
    if report.missing:
        return f"no journal at {report.db}: nothing to repair"
    if report.problem is None and not report.tables:
        return (f"the journal {report.db} passed SQLite's quick_check: nothing to repair "
                "(--force rebuilds it anyway)")
    would = report.dry_run
    out = [f"the journal {report.db} is damaged: {report.problem}" if report.problem
           else f"the journal {report.db} passed SQLite's quick_check (rebuilt: --force)"]
    out.append(f"{'would keep' if would else 'kept'} the damaged copy as "
               f"{report.damaged_copy} (nothing is deleted)")
    out.append(f"{'would rebuild' if would else 'rebuilt'} {report.db} from what SQLite "
               "could read:")
    for t in report.tables:
        out.append(f"  {t.name:9} {_tally(t)}")
    out.append(f"  not carried over: {', '.join(NOT_CARRIED)} (throughput history and live "
               "facts; they fill again as the daemon runs)")
    notes = []
    if report.requeued:
        notes.append(f"pending again: {_count(report.requeued, 'line')} left in flight")
    if report.orphan_lines:
        notes.append(f"dropped: {_count(report.orphan_lines, 'line')} whose file row was lost")
    if report.reparse:
        notes.append(
            f"back to parsing: {_count(len(report.reparse), 'unfinished file')} "
            f"({_names(report.reparse)}). At the next start ttsd reads the claimed copy "
            "again and adds back only the lost lines; a WAV already in the outbox is kept, "
            "never written again")
    if report.cut_short:
        notes.append(
            f"cut short: {_count(len(report.cut_short), 'unfinished file')} "
            f"({_names(report.cut_short)}) may have lost lines and no claimed copy is left "
            "to read again: drop the file into the inbox again for the missing lines")
    lines = next((t for t in report.tables if t.name == "lines"), None)
    if lines is not None and lines.lost != 0 and report.finished_files:
        notes.append("lost lines of finished files stay lost to the journal: their WAVs and "
                     "manifest.csv stay in the outbox, but ttsd status no longer counts them")
    if report.orphan_copies:
        notes.append(
            f"no file row: {_count(report.orphan_copies, 'claimed input')} in the work "
            "folder. The next start takes each as a new file (its WAVs go to a new outbox "
            "folder)")
    out.extend(f"  {n}" for n in notes)
    out.append("dry run: nothing was changed" if would else
               "start ttsd again (systemctl start ttsd, or ttsd run)")
    return "\n".join(out)


def _tally(t: TableTally) -> str:
    if t.error:
        return f"none salvaged ({t.error})"
    lost = "? lost (could not be counted)" if t.lost is None else f"{t.lost:,} lost"
    text = f"{t.salvaged:,} salvaged, {lost}"
    where = [_gap(g) for g in t.gaps[:3]]
    if len(t.gaps) > 3:
        where.append(f"{len(t.gaps) - 3:,} more")
    if where:
        text += f"; unreadable {', '.join(where)}"
    if t.name == "counters":
        text += "; the done totals recounted from the salvaged lines"
    return text


def _gap(gap: tuple[int | None, int | None]) -> str:
    before, after = gap
    if before is None and after is None:
        return "throughout"
    if before is None:
        return f"before row {after}"
    if after is None:
        return f"after row {before}"
    return f"between rows {before} and {after}"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5:,} more" if len(names) > 5 else "")
