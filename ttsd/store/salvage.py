"""Salvage: a fresh journal built from the rows SQLite can still read of a damaged one
(``ttsd repair-store``, which keeps the files and the lock: ``service.repair``).

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
the work folder goes back to ``parsing``, to be parsed again at the next start.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ttsd.errors import ConfigError
from ttsd.store.errors import damaged
from ttsd.store.journal import Store
from ttsd.store.migrations import DONE_AUDIO_US, DONE_CACHED, recount_done

CHUNK = 500
"""Rows read per query from the damaged copy."""
SALVAGED = ("files", "lines", "cache", "counters")
NOT_CARRIED = ("batches", "heartbeat", "releases", "workers")
FILE_STATES = ("parsing", "queued", "done", "failed")
LINE_STATES = ("pending", "running", "done", "failed")
MIN_ROWID, MAX_ROWID = -(2**63), 2**63 - 1


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
class Salvage:
    """What a rebuild carried over, dropped and sent back."""

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
    work_paths: set[str] = field(default_factory=set)
    """The claimed copies the salvaged file rows name."""

    def table(self, name: str) -> TableTally:
        return next(t for t in self.tables if t.name == name)


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


def salvage(src: Path, target: Path) -> Salvage:
    """A fresh journal at ``target`` (the migrations of ``Store``) holding what can be
    read of ``src``, in one transaction."""
    report = Salvage()
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
    report.work_paths = {f[2] for f in files.values()}
    return report


def _salvage_files(old: sqlite3.Connection, c: sqlite3.Connection,
                   report: Salvage) -> dict[int, tuple[str, str, str]]:
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
                   files: dict[int, tuple[str, str, str]], report: Salvage) -> TableTally:
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
                   report: Salvage, verb: str, skip: tuple[str, ...] = ()) -> None:
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
               report: Salvage) -> None:
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
           report: Salvage) -> tuple[TableTally, list[str]]:
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



def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'

