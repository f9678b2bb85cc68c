"""The journal's schema: migrations m001 … m007, applied in order by ``migrate``.

Each migration runs once, in the transaction that records its name in
``_migrations``; a journal is at the newest version when every name is there. A
journal naming a migration this version does not know was written by a newer ttsd and
is refused (``JournalTooNewError``). A new migration is appended to ``MIGRATIONS``,
never inserted before the last one.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ttsd.store.errors import JournalTooNewError

if TYPE_CHECKING:
    import sqlite_utils

DONE_AUDIO_US = "done_audio_us"
"""Counter: the audio of every done line, in microseconds (each line's rounded)."""
DONE_CACHED = "done_cached"
"""Counter: done lines whose WAV came from the cache (``lines.cached``)."""


def m001_initial(db: sqlite_utils.Database) -> None:
    db.execute("""CREATE TABLE files (
        id INTEGER PRIMARY KEY, name TEXT NOT NULL, work_path TEXT NOT NULL,
        size INTEGER NOT NULL, sha256 TEXT NOT NULL, out_dir TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'parsing', kind TEXT, total_lines INTEGER DEFAULT 0,
        error TEXT, note TEXT, dest TEXT, created_at REAL NOT NULL, finished_at REAL)""")
    db.execute("""CREATE TABLE lines (
        id INTEGER PRIMARY KEY, file_id INTEGER NOT NULL REFERENCES files(id),
        number INTEGER NOT NULL, out_name TEXT, name_key TEXT, line_id TEXT,
        text TEXT NOT NULL, voice TEXT, speaker_id INTEGER DEFAULT 0,
        length_scale REAL DEFAULT 1, noise_scale REAL DEFAULT 0.667, noise_w REAL DEFAULT 0.8,
        seed INTEGER DEFAULT 0, cache_key TEXT, state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0, synth_count INTEGER NOT NULL DEFAULT 0,
        error TEXT, wav TEXT, seconds REAL, cached INTEGER NOT NULL DEFAULT 0,
        finished_at REAL, UNIQUE(file_id, number))""")
    db.execute("CREATE UNIQUE INDEX lines_name ON lines(file_id, name_key) "
               "WHERE name_key IS NOT NULL")
    db.execute("CREATE INDEX lines_state ON lines(state, id)")
    db.execute("CREATE INDEX lines_file_state ON lines(file_id, state)")
    db.execute("""CREATE TABLE cache (
        key TEXT PRIMARY KEY, path TEXT NOT NULL, bytes INTEGER NOT NULL,
        seconds REAL NOT NULL, voice TEXT, created_at REAL NOT NULL,
        last_used REAL NOT NULL, hits INTEGER NOT NULL DEFAULT 0)""")
    db.execute("CREATE INDEX cache_lru ON cache(last_used)")
    db.execute("""CREATE TABLE batches (
        id INTEGER PRIMARY KEY, at REAL NOT NULL, size INTEGER, phonemes INTEGER,
        audio_s REAL, prepare_ms REAL, model_ms REAL, write_ms REAL, device TEXT,
        dtype TEXT, voice TEXT, padded_frames INTEGER, used_frames INTEGER)""")
    db.execute("CREATE INDEX batches_at ON batches(at)")
    db.execute("""CREATE TABLE heartbeat (
        id INTEGER PRIMARY KEY CHECK (id = 1), pid INTEGER, started_at REAL, at REAL,
        state TEXT, info TEXT)""")
    db.execute("""CREATE TABLE releases (
        id INTEGER PRIMARY KEY, at REAL NOT NULL, bytes INTEGER NOT NULL, reason TEXT,
        device TEXT)""")
    db.execute("CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")


def m002_workers(db: sqlite_utils.Database) -> None:
    """Several devices: one row per worker slot (written by the daemon only), and the
    slot behind each batch and memory release."""
    db.execute("""CREATE TABLE workers (
        slot INTEGER PRIMARY KEY, device TEXT NOT NULL, backend TEXT, host TEXT,
        pid INTEGER, state TEXT NOT NULL, batches INTEGER NOT NULL DEFAULT 0,
        lines INTEGER NOT NULL DEFAULT 0, audio_s REAL NOT NULL DEFAULT 0,
        model_ms REAL NOT NULL DEFAULT 0, restarts INTEGER NOT NULL DEFAULT 0,
        failures INTEGER NOT NULL DEFAULT 0, last_error TEXT, gpu_name TEXT,
        gpu_allocated INTEGER, gpu_reserved INTEGER, gpu_peak INTEGER, gpu_total INTEGER,
        started_at REAL, updated_at REAL)""")
    db.execute("ALTER TABLE batches ADD COLUMN worker INTEGER")
    db.execute("ALTER TABLE releases ADD COLUMN worker INTEGER")


def m003_cache_stamp(db: sqlite_utils.Database) -> None:
    """The cache file's inode and mtime as the daemon last verified it: a hit whose file
    still has them (and its size) is checked with one lstat instead of reading its
    header. NULL (entries from before): the header check, then the stamp."""
    db.execute("ALTER TABLE cache ADD COLUMN ino INTEGER")
    db.execute("ALTER TABLE cache ADD COLUMN mtime_ns INTEGER")


def m004_done_totals(db: sqlite_utils.Database) -> None:
    """The done lines' audio (µs) and cached count as counters, kept by the
    transactions that mark lines done (``DONE_AUDIO_US``, ``DONE_CACHED``): ``ttsd
    status`` read them as a sum over every done row, 0.47 s per million lines."""
    recount_done(db.conn)


def m005_file_stamp(db: sqlite_utils.Database) -> None:
    """The claimed copy's mtime and inode as claimed: before a file is finished, a copy
    that no longer has them was written to after the claim (``Ingest._finish``)."""
    db.execute("ALTER TABLE files ADD COLUMN mtime_ns INTEGER")
    db.execute("ALTER TABLE files ADD COLUMN ino INTEGER")


def m006_output_columns(db: sqlite_utils.Database) -> None:
    """A line's CSV ``chapter`` column (the chapter marks of a joined file), and of a
    done line and a cache entry the file's sample rate and measured loudness (the
    manifest's ``sample_rate`` and ``lufs``)."""
    db.execute("ALTER TABLE lines ADD COLUMN chapter TEXT")
    db.execute("ALTER TABLE lines ADD COLUMN rate INTEGER")
    db.execute("ALTER TABLE lines ADD COLUMN lufs REAL")
    db.execute("ALTER TABLE cache ADD COLUMN rate INTEGER")
    db.execute("ALTER TABLE cache ADD COLUMN lufs REAL")


def m007_line_columns(db: sqlite_utils.Database) -> None:
    """A line's CSV ``volume`` (a gain on that line alone) and ``pause_after``
    (seconds of silence after it), whether it is SSML, and the text the voice says
    when a lexicon changed it (``said``)."""
    db.execute("ALTER TABLE lines ADD COLUMN volume REAL")
    db.execute("ALTER TABLE lines ADD COLUMN pause_after REAL")
    db.execute("ALTER TABLE lines ADD COLUMN markup INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE lines ADD COLUMN said TEXT")


Migration = Callable[["sqlite_utils.Database"], None]
MIGRATIONS: list[Migration] = [m001_initial, m002_workers, m003_cache_stamp, m004_done_totals,
                               m005_file_stamp, m006_output_columns, m007_line_columns]


def recount_done(c: sqlite3.Connection) -> None:
    """Set ``DONE_AUDIO_US`` and ``DONE_CACHED`` to the sums over the done rows (a
    migration, and a journal rebuilt by ``ttsd repair-store``)."""
    c.execute("INSERT OR REPLACE INTO counters SELECT ?, COALESCE(CAST(ROUND(SUM(seconds) "
              "* 1000000) AS INTEGER), 0) FROM lines WHERE state = 'done'", [DONE_AUDIO_US])
    c.execute("INSERT OR REPLACE INTO counters SELECT ?, COALESCE(SUM(cached), 0) FROM lines "
              "WHERE state = 'done'", [DONE_CACHED])


def applied(conn: sqlite3.Connection) -> list[str]:
    """The names of the migrations the journal has had, oldest first (none: a new one)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = '_migrations'").fetchone() is None:
        return []
    return [name for (name,) in conn.execute("SELECT name FROM _migrations ORDER BY rowid")]


def migrate(conn: sqlite3.Connection, path: Path,
            migrations: Sequence[Migration] = MIGRATIONS) -> list[str]:
    """Bring the journal to the newest version, inside the caller's write transaction;
    returns the names applied. JournalTooNewError for a journal a newer ttsd wrote."""
    conn.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, at REAL)")
    done = {r[0] for r in conn.execute("SELECT name FROM _migrations")}
    unknown = done - {m.__name__ for m in MIGRATIONS}
    if unknown:
        raise JournalTooNewError(
            f"the journal {path} was written by a newer ttsd (it has the migrations "
            f"{', '.join(sorted(unknown))}, which ttsd {_version()} does not know): "
            "run that newer ttsd on it; this one will not write to it")
    todo = [m for m in migrations if m.__name__ not in done]
    if not todo:
        return []
    # Imported only to migrate: sqlite_utils pulls in numpy, click and dateutil
    # (≈ 0.2 s), which `ttsd status` and a daemon's restart never need.
    import sqlite_utils

    db = sqlite_utils.Database(conn)
    for m in todo:
        m(db)
        conn.execute("INSERT INTO _migrations VALUES (?, ?)", (m.__name__, time.time()))
    return [m.__name__ for m in todo]


def _version() -> str:
    from ttsd import __version__

    return __version__
