"""The journal's migrations: every path to the newest schema ends at the same schema, a
journal a newer ttsd wrote is refused, and the columns and indexes the code relies on
are there (and used)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from ttsd.config import PathsConfig
from ttsd.errors import ConfigError
from ttsd.store.errors import JournalTooNewError
from ttsd.store.journal import Store
from ttsd.store.migrations import MIGRATIONS, Migration, applied, migrate
from ttsd.store.records import DoneTotals

NAMES = [m.__name__ for m in MIGRATIONS]

COLUMNS = {
    "files": ["id", "name", "work_path", "size", "sha256", "out_dir", "state", "kind",
              "total_lines", "error", "note", "dest", "created_at", "finished_at",
              "mtime_ns", "ino"],
    "lines": ["id", "file_id", "number", "out_name", "name_key", "line_id", "text", "voice",
              "speaker_id", "length_scale", "noise_scale", "noise_w", "seed", "cache_key",
              "state", "attempts", "synth_count", "error", "wav", "seconds", "cached",
              "finished_at", "chapter", "rate", "lufs", "volume",
              "pause_after", "markup", "said"],
    "cache": ["key", "path", "bytes", "seconds", "voice", "created_at", "last_used", "hits",
              "ino", "mtime_ns", "rate", "lufs"],
    "batches": ["id", "at", "size", "phonemes", "audio_s", "prepare_ms", "model_ms",
                "write_ms", "device", "dtype", "voice", "padded_frames", "used_frames",
                "worker"],
    "heartbeat": ["id", "pid", "started_at", "at", "state", "info"],
    "releases": ["id", "at", "bytes", "reason", "device", "worker"],
    "counters": ["name", "value"],
    "workers": ["slot", "device", "backend", "host", "pid", "state", "batches", "lines",
                "audio_s", "model_ms", "restarts", "failures", "last_error", "gpu_name",
                "gpu_allocated", "gpu_reserved", "gpu_peak", "gpu_total", "started_at",
                "updated_at"],
    "_migrations": ["name", "at"],
}
"""Every table and its columns, in order (the salvage copies rows by these names)."""
INDEXES = {
    "lines_name": ("lines", ["file_id", "name_key"], True),
    "lines_state": ("lines", ["state", "id"], False),
    "lines_file_state": ("lines", ["file_id", "state"], False),
    "cache_lru": ("cache", ["last_used"], False),
    "batches_at": ("batches", ["at"], False),
}
"""Index → (table, columns, unique)."""


def memory_db() -> sqlite3.Connection:
    return sqlite3.connect(":memory:", isolation_level=None)


def run(conn: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS) -> list[str]:
    """``migrate`` in a write transaction, as ``Store`` runs it."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        done = migrate(conn, Path("memory"), migrations)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return done


def schema(conn: sqlite3.Connection) -> dict[str, object]:
    """Tables with their columns (name, type, not null, default, key) and indexes with
    their columns, uniqueness and condition: what two journals must agree on."""
    tables = {name: [tuple(r[1:]) for r in conn.execute(f'PRAGMA table_info("{name}")')]
              for (name,) in conn.execute(
                  "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")}
    indexes = {name: ([r[2] for r in conn.execute(f'PRAGMA index_info("{name}")')], sql)
               for name, sql in conn.execute(
                   "SELECT name, sql FROM sqlite_master WHERE type = 'index' ORDER BY name")}
    return {"tables": tables, "indexes": indexes}


def newest() -> dict[str, object]:
    conn = memory_db()
    run(conn)
    return schema(conn)


# ---------------------------------------------------------------------- paths to the newest

def test_an_empty_journal_gets_every_migration_in_order() -> None:
    conn = memory_db()
    assert run(conn) == NAMES
    assert applied(conn) == NAMES
    assert run(conn) == []   # nothing left to do: a second open changes nothing
    assert {name: [c[0] for c in cols] for name, cols in schema(conn)["tables"].items()} \
        == COLUMNS


@pytest.mark.parametrize("k", range(1, len(MIGRATIONS)))
def test_each_earlier_version_migrates_to_the_newest(k: int) -> None:
    """A journal that had the first k migrations takes the rest and ends with the very
    schema a new journal gets."""
    conn = memory_db()
    assert run(conn, MIGRATIONS[:k]) == NAMES[:k]
    assert applied(conn) == NAMES[:k]
    assert run(conn) == NAMES[k:]
    assert applied(conn) == NAMES
    assert schema(conn) == newest()


@pytest.mark.parametrize("i", range(len(MIGRATIONS)))
def test_each_migration_applies_to_the_version_before_it(i: int) -> None:
    """Migration i alone, on a journal at version i - 1 (m001 on an empty one)."""
    conn = memory_db()
    run(conn, MIGRATIONS[:i])
    assert run(conn, MIGRATIONS[: i + 1]) == [NAMES[i]]
    assert applied(conn) == NAMES[: i + 1]


def test_done_totals_are_counted_when_a_journal_with_done_lines_gets_them() -> None:
    """m004 on a journal that already has done lines: the counters start at their sums
    (a cached line, a synthesized one, a failed and a pending one)."""
    conn = memory_db()
    run(conn, MIGRATIONS[:3])
    conn.execute("INSERT INTO files (id, name, work_path, size, sha256, out_dir, created_at) "
                 "VALUES (1, 'a.txt', '/w/a.txt', 1, '', '/o/a', 0)")
    conn.executemany("INSERT INTO lines (file_id, number, text, state, seconds, cached) "
                     "VALUES (1, ?, 'x', ?, ?, ?)",
                     [(1, "done", 1.25, 1), (2, "done", 2.5, 0), (3, "failed", None, 0),
                      (4, "pending", None, 0)])
    run(conn)
    assert dict(conn.execute("SELECT name, value FROM counters")) == \
        {"done_audio_us": 3_750_000, "done_cached": 1}


def test_opening_an_older_journal_file_migrates_it(tmp_path: Path) -> None:
    """The first writer of this version to open a journal brings it up to date; a
    read-only open (``ttsd status``) leaves it as it was."""
    db = tmp_path / "ttsd.db"
    conn = sqlite3.connect(db, isolation_level=None)
    run(conn, MIGRATIONS[:2])
    conn.close()
    reader = Store(db, readonly=True)
    assert applied(reader.conn) == NAMES[:2]
    assert reader.done_totals() == DoneTotals(0.0, 0)   # summed: no counters yet
    reader.close()
    store = Store(db)
    assert applied(store.conn) == NAMES
    assert store.counters() == {"done_audio_us": 0, "done_cached": 0}
    store.close()


# ---------------------------------------------------------------------- from the future

def future_journal(db: Path) -> None:
    store = Store(db)
    with store.tx() as c:
        c.execute("INSERT INTO _migrations VALUES ('m006_from_a_newer_ttsd', 0)")
    store.close()


def test_a_journal_from_a_newer_ttsd_is_refused(tmp_path: Path) -> None:
    conn = memory_db()
    run(conn)
    conn.execute("INSERT INTO _migrations VALUES ('m006_from_a_newer_ttsd', 0)")
    with pytest.raises(JournalTooNewError, match="newer ttsd.*m006_from_a_newer_ttsd"):
        run(conn)
    db = tmp_path / "ttsd.db"
    future_journal(db)
    with pytest.raises(ConfigError, match="m006_from_a_newer_ttsd"):
        Store(db)
    reader = Store(db, readonly=True)   # reading it (ttsd status) is harmless
    assert applied(reader.conn) == [*NAMES, "m006_from_a_newer_ttsd"]
    reader.close()


def test_a_journal_from_a_newer_ttsd_stops_a_command_with_one_clear_line(
        tmp_path: Path) -> None:
    paths = PathsConfig(inbox=tmp_path / "inbox", outbox=tmp_path / "outbox",
                        done=tmp_path / "done", failed=tmp_path / "failed",
                        state=tmp_path / "state")
    future_journal(paths.db)
    config = tmp_path / "config.toml"
    config.write_text(f'[paths]\nstate = "{paths.state}"\n', encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "ttsd.cli", "--config", str(config),
                          "purge-cache", "--all"], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith(f"ttsd: the journal {paths.db} was written by a newer ttsd")
    assert "m006_from_a_newer_ttsd" in out.stderr


# ---------------------------------------------------------------------- what the code relies on

def test_indexes_the_code_relies_on() -> None:
    conn = memory_db()
    run(conn)
    for name, (table, columns, unique) in INDEXES.items():
        listed = {r[1]: bool(r[2]) for r in conn.execute(f'PRAGMA index_list("{table}")')}
        assert listed.get(name) is unique, name
        assert [r[2] for r in conn.execute(f'PRAGMA index_info("{name}")')] == columns, name


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "ttsd.db")
    yield s
    s.close()


def plans(store: Store, call) -> list[str]:
    """The query plans of the SELECTs ``call`` runs on the store's connection."""
    seen: list[str] = []
    store.conn.set_trace_callback(seen.append)
    try:
        call()
    finally:
        store.conn.set_trace_callback(None)
    return [" / ".join(r[3] for r in store.conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
            for sql in seen if sql.lstrip().upper().startswith("SELECT")]


def test_hot_reads_use_their_indexes(store: Store) -> None:
    """The reads that run per batch, per status call or per purge page walk an index,
    not the whole table: taking lines (lines_state), counting lines by state and the
    progress bar's count (covering scans of lines_state and lines_file_state), and the
    cache's least recently used walk (cache_lru)."""
    take = plans(store, lambda: store.take(8, max_attempts=3))
    assert any("lines_state" in p for p in take), take
    counts = plans(store, store.line_states)
    assert counts and all("COVERING INDEX lines_state" in p for p in counts), counts
    progress = plans(store, lambda: store.progress(0.0, DoneTotals(0.0, 0)))
    assert any("COVERING INDEX lines_file_state" in p for p in progress), progress
    page = plans(store, lambda: store.cache_page((0.0, 0), 500))
    assert page and all("cache_lru" in p for p in page), page
