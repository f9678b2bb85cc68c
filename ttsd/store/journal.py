"""The journal (SQLite): every line's state, so a restart after ``kill -9`` resumes
from it. ``Store`` is one connection to it: files, lines and batches here, the cache
rows (``cache``) and the whole-journal reports (``report``) through its bases; the
schema is ``migrations``'s, the connection's settings ``base``'s.

Line states: pending → running (attempts + 1, saved before synthesis) → done | failed.
File states: parsing → queued (all lines stored) → done | failed.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ttsd.records import BatchStats
from ttsd.store.base import add_counters, sqlite_ino
from ttsd.store.cache import CacheTable, count_hits
from ttsd.store.errors import damaged
from ttsd.store.migrations import DONE_AUDIO_US, DONE_CACHED, MIGRATIONS, recount_done
from ttsd.store.records import LineRow, NewLine
from ttsd.store.report import Reports

__all__ = ["DONE_AUDIO_US", "DONE_CACHED", "MIGRATIONS", "LineRow", "NewLine", "Store",
           "damaged", "gave_up", "recount_done", "sqlite_ino"]

WORKER_FIELDS = ("device", "backend", "host", "pid", "state", "restarts", "failures",
                 "last_error", "gpu_name", "gpu_allocated", "gpu_reserved", "gpu_peak",
                 "gpu_total", "started_at")


def gave_up(attempts: int) -> str:
    """The error of a line whose synthesis killed the process ``attempts`` times."""
    return (f"synthesis was started {attempts} times and never finished (the process died "
            "each time); giving up")


def _count_done(c: sqlite3.Connection, done: Iterable[tuple[float | None, bool]]) -> None:
    """Lines (seconds, cached) going done: the ``DONE_AUDIO_US`` and ``DONE_CACHED``
    counters, in the transaction that marks them."""
    audio = cached = 0
    for seconds, linked in done:
        audio += round((seconds or 0.0) * 1_000_000)
        cached += bool(linked)
    add_counters(c, ((DONE_AUDIO_US, audio), (DONE_CACHED, cached)))


class Store(CacheTable, Reports):
    """One connection to the journal (one per thread)."""

    # ------------------------------------------------------------------ files

    def add_file(self, name: str, work_path: Path, size: int, sha256: str, out_dir: Path,
                 kind: str = "", *, mtime_ns: int | None = None, ino: int | None = None) -> int:
        with self.tx() as c:
            cur = c.execute("INSERT INTO files (name, work_path, size, sha256, out_dir, kind, "
                            "created_at, mtime_ns, ino) VALUES (?,?,?,?,?,?,?,?,?)",
                            (name, str(work_path), size, sha256, str(out_dir), kind, time.time(),
                             mtime_ns, None if ino is None else sqlite_ino(ino)))
            return int(cur.lastrowid)

    def file_grown(self, file_id: int, size: int, sha256: str, mtime_ns: int, ino: int) -> None:
        """A claimed copy that grew after the claim: its new size and hash, parsed again
        (state 'parsing') for the lines it gained."""
        with self.tx() as c:
            c.execute("UPDATE files SET state='parsing', size=?, sha256=?, mtime_ns=?, ino=? "
                      "WHERE id=?", (size, sha256, mtime_ns, sqlite_ino(ino), file_id))

    def recent_claims(self, name: str, since: float) -> int:
        """Files named ``name`` claimed at or after ``since``."""
        return int(self.one("SELECT COUNT(*) FROM files WHERE name = ? AND created_at >= ? "
                            "AND sha256 != ''", (name, since)) or 0)

    def add_rejected(self, name: str, path: Path, reason: str, dest: Path | None) -> None:
        """A file refused before it was read (a link, a FIFO, too big, not movable): a
        failed row, so that it is counted and reported like a file that failed to parse."""
        now = time.time()
        with self.tx() as c:
            c.execute("INSERT INTO files (name, work_path, size, sha256, out_dir, state, error, "
                      "dest, created_at, finished_at) VALUES (?,?,0,'','','failed',?,?,?,?)",
                      (name, str(path), reason, None if dest is None else str(dest), now, now))

    def out_dir_taken(self, out_dir: Path) -> bool:
        return bool(self.one("SELECT 1 FROM files WHERE out_dir = ? LIMIT 1", (str(out_dir),)))

    def files_in(self, *states: str) -> list[dict]:
        marks = ",".join("?" * len(states))
        return self.q(f"SELECT * FROM files WHERE state IN ({marks}) ORDER BY id", states)

    def add_lines(self, file_id: int, lines: list[NewLine]) -> int:
        """Insert a chunk of lines in one transaction (idempotent on (file, number)): a
        line with ``wav`` goes in done, and its cache use (``cached``) is counted as
        ``complete`` counts it. Returns how many lines went in done; a line already in
        the store (a file parsed again after a crash) is left as it is, and neither
        counted nor its cache use."""
        now = time.time()
        with self.tx() as c:
            answered = [ln for ln in lines if ln.wav]
            if answered:
                there = {n for (n,) in c.execute(
                    "SELECT number FROM lines WHERE file_id = ? AND number BETWEEN ? AND ?",
                    (file_id, lines[0].number, lines[-1].number))}
                answered = [ln for ln in answered if ln.number not in there]
            c.executemany(
                "INSERT OR IGNORE INTO lines (file_id, number, out_name, name_key, line_id, "
                "text, voice, speaker_id, length_scale, noise_scale, noise_w, seed, cache_key, "
                "state, error, finished_at, wav, seconds, cached, chapter, rate, lufs, volume, "
                "pause_after, markup, said) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [(file_id, ln.number, ln.out_name, ln.name_key, ln.line_id, ln.text, ln.voice,
                  ln.speaker_id, ln.length_scale, ln.noise_scale, ln.noise_w, ln.seed,
                  ln.cache_key, "failed" if ln.error else "done" if ln.wav else "pending",
                  ln.error, now if ln.error or ln.wav else None, ln.wav, ln.seconds,
                  int(ln.cached), ln.chapter, ln.rate, ln.lufs, ln.volume, ln.pause_after,
                  int(ln.markup), ln.said) for ln in lines])
            keys = [ln.cache_key for ln in answered if ln.cached]
            if keys:
                count_hits(c, keys, now)
            if answered:
                _count_done(c, [(ln.seconds, ln.cached) for ln in answered])
        return len(answered)

    def file_parsed(self, file_id: int, kind: str, total_lines: int, note: str | None) -> None:
        with self.tx() as c:
            c.execute("UPDATE files SET state='queued', kind=?, total_lines=?, note=? WHERE id=?",
                      (kind, total_lines, note, file_id))

    def fail_file(self, file_id: int, error: str, dest: str | None = None) -> None:
        """A file that cannot be read: its lines (if any) are dropped with it."""
        with self.tx() as c:
            c.execute("DELETE FROM lines WHERE file_id=? AND state IN ('pending','running')",
                      (file_id,))
            c.execute("UPDATE files SET state='failed', error=?, dest=?, finished_at=? WHERE id=?",
                      (error, dest, time.time(), file_id))

    def finishable_files(self) -> list[dict]:
        return self.q("SELECT * FROM files f WHERE f.state='queued' AND NOT EXISTS "
                      "(SELECT 1 FROM lines l WHERE l.file_id=f.id AND l.state IN "
                      "('pending','running')) ORDER BY f.id")

    def set_dest(self, file_id: int, dest: str) -> None:
        with self.tx() as c:
            c.execute("UPDATE files SET dest=? WHERE id=?", (dest, file_id))

    def finish_file(self, file_id: int) -> None:
        with self.tx() as c:
            c.execute("UPDATE files SET state='done', finished_at=? WHERE id=?",
                      (time.time(), file_id))

    def manifest_rows(self, file_id: int) -> Iterator[dict]:
        cur = self.conn.execute(
            "SELECT number, line_id, out_name, text, wav, seconds, cached, error, state, chapter, "
            "rate, lufs, markup, said "
            "FROM lines WHERE file_id=? ORDER BY number", (file_id,))
        cols = [c[0] for c in cur.description]
        for row in cur:
            yield dict(zip(cols, row))

    def file_counts(self, file_id: int) -> dict[str, int]:
        rows = self.conn.execute("SELECT state, COUNT(*) FROM lines WHERE file_id=? GROUP BY state",
                                 (file_id,)).fetchall()
        return {s: n for s, n in rows}

    # ------------------------------------------------------------------ lines

    def pending_count(self) -> int:
        return int(self.one("SELECT COUNT(*) FROM lines WHERE state IN ('pending','running')") or 0)

    def recover(self, max_attempts: int) -> int:
        """At start: lines left running by a crash go back to pending."""
        with self.tx() as c:
            n = c.execute("UPDATE lines SET state='pending' WHERE state='running'").rowcount
        return n

    def take(self, limit: int, max_attempts: int, *, fresh_only: bool = False
             ) -> tuple[list[LineRow], list[LineRow]]:
        """Oldest pending lines → running (attempts + 1, committed before synthesis).

        Lines already started ``max_attempts`` times fail instead (they killed the
        process each time); their ids are returned second. A pending line with
        attempts > 0 is a *suspect*: the process died while it was in flight. A suspect
        comes alone, in a batch of its own, so that a line that kills the process
        every time cannot take its batch-mates down with it; the lines after it wait
        for it. With ``fresh_only`` (topping up a batch) no suspect is taken.
        """
        with self.tx() as c:
            rows = c.execute(
                "SELECT l.id, l.file_id, l.number, l.text, l.voice, l.speaker_id, "
                "l.length_scale, l.noise_scale, l.noise_w, l.seed, l.cache_key, l.out_name, "
                "f.out_dir, l.attempts, f.name, l.volume, l.pause_after, l.markup, l.said "
                "FROM lines l JOIN files f "
                "ON f.id = l.file_id WHERE l.state='pending' ORDER BY l.id LIMIT ?",
                (limit,)).fetchall()
            dead = [r for r in rows if r[13] >= max_attempts]
            live = [r for r in rows if r[13] < max_attempts]
            if live and live[0][13] > 0 and not fresh_only:
                take = live[:1]
            else:
                take = list(itertools.takewhile(lambda r: r[13] == 0, live))
            now = time.time()
            if dead:
                c.executemany(
                    "UPDATE lines SET state='failed', finished_at=?, error=? WHERE id=?",
                    [(now, gave_up(r[13]), r[0]) for r in dead])
            if take:   # one statement, not one per row (see ``complete``)
                c.execute("UPDATE lines SET state='running', attempts=attempts+1 "
                          "WHERE id IN (SELECT value FROM json_each(?))",
                          (json.dumps([r[0] for r in take]),))
        return ([_row(r, r[13] + 1) for r in take], [_row(r, r[13]) for r in dead])

    def cached_ahead(self, n: int) -> tuple[int, int]:
        """(lines looked at, lines with a cache row) among the next ``n`` pending lines,
        in the order ``take`` hands them out. One indexed read, no lock."""
        looked, hits = self.conn.execute(
            "SELECT COUNT(*), COUNT(c.key) FROM (SELECT cache_key FROM lines "
            "WHERE state='pending' ORDER BY id LIMIT ?) l "
            "LEFT JOIN cache c ON c.key = l.cache_key", (n,)).fetchone()
        return int(looked), int(hits)

    def suspect_next(self, max_attempts: int) -> bool:
        """The oldest pending line was in flight when the process died (see ``take``)."""
        n = self.one("SELECT attempts FROM lines WHERE state='pending' ORDER BY id LIMIT 1")
        return n is not None and 0 < n < max_attempts

    def release(self, line_ids: list[int], *, undo_attempt: bool = True) -> None:
        """Running lines back to pending (graceful stop, requeue)."""
        with self.tx() as c:
            c.execute("UPDATE lines SET state='pending', attempts=MAX(0, attempts - ?) "
                      "WHERE id IN (SELECT value FROM json_each(?)) AND state='running'",
                      (1 if undo_attempt else 0, json.dumps(list(line_ids))))

    def complete(self, done: list[tuple[int, str, float, bool]],
                 failed: list[tuple[int, str]], cache_rows: list[dict],
                 batch: BatchStats | None, counters: dict[str, int],
                 cache_hits: list[str] = ()) -> None:
        """Record one batch's (or one piece of a batch's) outcome atomically: done (id,
        wav, seconds, cached), failed (id, error), new cache entries, the cache keys it
        used (the ``cache_hits`` counter comes from them), the batch's stats and counters.

        The done lines and the cache keys go in as one JSON parameter each, one
        statement apiece: ``executemany`` steps SQLite once per row, and releases and
        retakes the GIL around every step, so with the feeder running Python beside it
        each row waited for the GIL. 1,024 done hits, measured on 2 CPU cores: 5.3 ms
        alone either way, 24.9 ms (executemany) vs 6.6 ms (one statement) beside a busy
        thread."""
        now = time.time()
        with self.tx() as c:
            if cache_hits:
                count_hits(c, cache_hits, now)
            if done:
                c.execute("UPDATE lines SET state='done', wav=json_extract(j.value, '$[1]'), "
                          "seconds=json_extract(j.value, '$[2]'), "
                          "cached=json_extract(j.value, '$[3]'), "
                          "rate=json_extract(j.value, '$[4]'), lufs=json_extract(j.value, '$[5]'), "
                          "synth_count=synth_count + 1 - json_extract(j.value, '$[3]'), "
                          "finished_at=?, error=NULL FROM json_each(?) AS j "
                          "WHERE lines.id = json_extract(j.value, '$[0]')",
                          (now, json.dumps([(d[0], d[1], d[2], int(d[3]), *d[4:6])
                                            for d in done])))
                _count_done(c, [(d[2], d[3]) for d in done])
            c.executemany("UPDATE lines SET state='failed', error=?, finished_at=? WHERE id=?",
                          [(err, now, i) for i, err in failed])
            c.executemany("INSERT OR REPLACE INTO cache (key, path, bytes, seconds, voice, "
                          "created_at, last_used, hits, ino, mtime_ns, rate, lufs) "
                          "VALUES (?,?,?,?,?,?,?,0,?,?,?,?)",
                          [(r["key"], r["path"], r["bytes"], r["seconds"], r["voice"], now, now,
                            r.get("ino"), r.get("mtime_ns"), r.get("rate"), r.get("lufs"))
                           for r in cache_rows])
            if batch is not None:
                worker = batch.extra.get("worker")
                c.execute("INSERT INTO batches (at, size, phonemes, audio_s, prepare_ms, model_ms,"
                          " write_ms, device, dtype, voice, padded_frames, used_frames, worker) "
                          "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                          (now, batch.size, batch.phonemes, batch.audio_s, batch.prepare_ms,
                           batch.model_ms, batch.write_ms, batch.device, batch.dtype, batch.voice,
                           batch.padded_frames, batch.used_frames, worker))
                if worker is not None:  # the worker's totals move with its batch, atomically
                    mem = batch.extra.get("memory") or {}
                    c.execute("UPDATE workers SET batches=batches+1, lines=lines+?, "
                              "audio_s=audio_s+?, model_ms=model_ms+?, gpu_allocated=?, "
                              "gpu_reserved=?, gpu_peak=?, updated_at=? WHERE slot=?",
                              (batch.size, batch.audio_s, batch.model_ms, mem.get("allocated"),
                               mem.get("reserved"), mem.get("peak"), now, worker))
            add_counters(c, counters.items())

    # ------------------------------------------------------------------ daemon facts

    def heartbeat(self, pid: int, started_at: float, state: str, info: dict[str, Any]) -> None:
        with self.tx() as c:
            c.execute("INSERT INTO heartbeat (id, pid, started_at, at, state, info) "
                      "VALUES (1,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET pid=excluded.pid, "
                      "started_at=excluded.started_at, at=excluded.at, state=excluded.state, "
                      "info=excluded.info", (pid, started_at, time.time(), state, json.dumps(info)))

    def record_release(self, freed: int, reason: str, device: str,
                       worker: int | None = None) -> None:
        with self.tx() as c:
            c.execute("INSERT INTO releases (at, bytes, reason, device, worker) "
                      "VALUES (?,?,?,?,?)", (time.time(), freed, reason, device, worker))

    def workers_reset(self) -> None:
        """At start: the slots of the previous run are gone."""
        with self.tx() as c:
            c.execute("DELETE FROM workers")

    def worker_set(self, slot: int, **fields: Any) -> None:
        """Insert or update one worker slot's facts (names from WORKER_FIELDS)."""
        bad = set(fields) - set(WORKER_FIELDS)
        if bad:
            raise ValueError(f"unknown worker fields {sorted(bad)}")
        now = time.time()
        with self.tx() as c:
            sets = "".join(f"{k}=?, " for k in fields)
            cur = c.execute(f"UPDATE workers SET {sets}updated_at=? WHERE slot=?",
                            (*fields.values(), now, slot))
            if cur.rowcount == 0:
                row = {"device": "", "state": "starting", **fields}
                c.execute(f"INSERT INTO workers (slot, {', '.join(row)}, updated_at) VALUES "
                          f"({','.join('?' * (len(row) + 2))})", (slot, *row.values(), now))


def _row(r: tuple, attempts: int) -> LineRow:
    """A line of ``Store.take``'s query."""
    return LineRow(*r[:13], attempts=attempts, file=r[14], volume=r[15], pause_after=r[16],
                   markup=bool(r[17]), said=r[18])
