"""One connection to the journal: opening it (settings, a probe for damage, the
migrations), its transactions and its full check.

WAL mode, ``synchronous=FULL``, ``busy_timeout`` 10 s; writers use ``BEGIN
IMMEDIATE``. One connection per thread (sqlite3 connections are not shared).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Self

from ttsd.errors import ConfigError, StoreDamagedError
from ttsd.store.errors import damaged
from ttsd.store.migrations import migrate

_WRITE_LOCKS: dict[str, threading.RLock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()


def _write_lock(path: Path) -> threading.RLock:
    """One lock per database file in this process (see ``StoreBase.tx``). Re-entrant: a
    thread nesting transactions of two connections fails in SQLite's busy timeout, as
    it would without the lock, instead of hanging."""
    key = os.path.realpath(path)
    with _WRITE_LOCKS_GUARD:
        lock = _WRITE_LOCKS.get(key)
        if lock is None:
            lock = _WRITE_LOCKS[key] = threading.RLock()
        return lock


def sqlite_ino(ino: int) -> int:
    """An inode number as SQLite's signed 64-bit INTEGER can hold it (NFS, CIFS, FUSE
    and overlay file systems hand out numbers of 2**63 and above)."""
    return ino - 2**64 if ino >= 2**63 else ino


class StoreBase:
    """The connection; ``Store`` adds what the journal holds."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        if not readonly:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"state folder {path.parent} cannot be created: {exc}") from None
            if not os.access(path.parent, os.W_OK):
                raise ConfigError(f"state folder {path.parent} is not writable (SQLite's WAL "
                                  "needs to create files beside the database)")
        uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=10.0, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.OperationalError as exc:
            raise ConfigError(f"cannot open the store {path}: {exc}") from None
        self.conn = conn
        self._write_lock = _write_lock(path)
        try:
            conn.execute("PRAGMA busy_timeout = 10000")
            if not readonly:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("PRAGMA foreign_keys = ON")
            self._probe()
            if not readonly:
                with self.tx():
                    migrate(conn, path)
        except sqlite3.DatabaseError as exc:
            if not damaged(exc):
                raise
            conn.close()
            raise StoreDamagedError(path, str(exc)) from None
        except BaseException:
            conn.close()
            raise

    @classmethod
    def open_readonly(cls, path: Path) -> Self | None:
        """A read-only store (it never writes the file), or None when there is none."""
        return cls(path, readonly=True) if path.exists() else None

    def close(self) -> None:
        self.conn.close()

    def check(self) -> None:
        """Read the whole journal (``PRAGMA quick_check``: every page, not the indexes'
        agreement with their tables): StoreDamagedError for damage anywhere. The daemon
        runs it once at start, before it writes anything (1.4 s for a 346 MB journal of
        a million lines on 2 CPU cores); the other commands rely on ``_probe``."""
        try:
            problems = [r for (r,) in self.conn.execute("PRAGMA quick_check(5)")]
        except sqlite3.DatabaseError as exc:
            if not damaged(exc):
                raise
            problems = [str(exc)]
        if problems != ["ok"]:
            raise StoreDamagedError(self.path, "; ".join(problems))

    def _probe(self) -> None:
        """Read the schema and each table's first and last row, before anything is
        written. SQLite finds a damaged page only when it reads it; this reads a few
        pages per table (its root, its inner pages down to both ends), whatever the
        journal's size, so damage to the schema, to a table's root or inner pages (the
        way to many rows) or to its ends stops every open. A full check would read the
        whole file at each open; damage elsewhere is met when its rows are read
        (``damaged``)."""
        tables = [name for (name,) in self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        for name in tables:
            for order in ("", " DESC"):
                self.conn.execute(f'SELECT * FROM "{name}" ORDER BY rowid{order} LIMIT 1'
                                  ).fetchall()

    def has_tables(self) -> bool:
        """The journal has been set up (a daemon that starts on a full disk may leave an
        empty file)."""
        return self.one("SELECT 1 FROM sqlite_master WHERE name = 'heartbeat'") is not None

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT (ROLLBACK on error), holding this process's write
        lock of the database. The daemon's threads (ingest, feeder, sink) each write
        through their own connection; without the lock, a thread meeting another's
        transaction waits in SQLite's busy handler, which sleeps 1, 2, 5, 10, … ms
        between tries (a take of 1,024 lines measured 42 ms beside the sink's commit
        and the parser's inserts). The lock hands over at once. Other processes
        (``ttsd status``, ``purge-cache``) still meet the busy handler."""
        with self._write_lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """One read transaction: every query inside sees the same committed state (in WAL
        mode a reader neither blocks the writers nor waits for them)."""
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            self.conn.execute("COMMIT")

    def q(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        """Rows as dicts (column → value)."""
        cur = self.conn.execute(sql, tuple(params))
        cols = [c[0] for c in cur.description or ()]
        return [dict(zip(cols, row)) for row in cur.fetchall()]

    def one(self, sql: str, params: Iterable[Any] = ()) -> Any:
        """The first column of the first row; None for no row."""
        row = self.conn.execute(sql, tuple(params)).fetchone()
        return row[0] if row else None


def add_counters(c: sqlite3.Connection, counts: Iterable[tuple[str, int]]) -> None:
    """Add to named counters (created at their first use), inside a write transaction."""
    c.executemany("INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) "
                  "DO UPDATE SET value = value + excluded.value", counts)
